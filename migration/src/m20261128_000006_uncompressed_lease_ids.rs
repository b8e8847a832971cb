//! PostgreSQL: a batch lease's ids are stored out of line without compression.
//!
//! A lease holds its batch's ids, 8 KB for 500, so PostgreSQL moves them to TOAST and first
//! tries to compress them. UUIDv7s of one batch share their timestamp prefix, so pglz does not
//! give up early: it works through the whole array, then throws the result away because it
//! saved too little. That attempt was 80 % of a lease insert (290 µs against 58 µs per lease
//! of 500 ids, BENCHMARKS.md), about half a microsecond of server CPU per event relayed.
//! `STORAGE EXTERNAL` keeps the ids out of line, so dead leases stay small in the live-lease
//! scan, but never compresses them. It changes only how new values are stored: no rewrite,
//! no lock held beyond the catalog update.

use sea_orm_migration::prelude::*;

use crate::on_postgres;

/// Sets `outbox_leases.ids` to `STORAGE EXTERNAL` on PostgreSQL; a no-op elsewhere.
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "seaorm_outbox_m20261128_000006_uncompressed_lease_ids"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        set_storage(manager, "EXTERNAL").await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        set_storage(manager, "EXTENDED").await
    }
}

async fn set_storage(manager: &SchemaManager<'_>, storage: &str) -> Result<(), DbErr> {
    on_postgres(
        manager,
        &[&format!(
            "ALTER TABLE outbox_leases ALTER COLUMN ids SET STORAGE {storage}"
        )],
    )
    .await
}
