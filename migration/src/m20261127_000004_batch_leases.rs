//! PostgreSQL: one lease row per claimed batch, so a claim writes no event row.
//!
//! The relay's claim used to stamp `locked_by`/`locked_until` on every claimed row, a second
//! full row write per event (the first being "published"). On PostgreSQL a claim now records a
//! single `outbox_leases` row holding the batch's ids; other relays skip ids held by a live
//! lease, and the write-back deletes the lease in the same transaction that marks the rows.
//! BENCHMARKS.md has the measurements. MySQL and SQLite keep the per-row lease columns.

use sea_orm_migration::prelude::*;

use crate::on_postgres;

/// Creates `outbox_leases` on PostgreSQL; a no-op elsewhere.
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "seaorm_outbox_m20261127_000004_batch_leases"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // Small and hot: every claim and every write-back touches it, so vacuum it often.
        on_postgres(
            manager,
            &["CREATE TABLE outbox_leases (\
                 token varchar(64) PRIMARY KEY, \
                 locked_until timestamptz NOT NULL, \
                 ids uuid[] NOT NULL) \
               WITH (autovacuum_vacuum_threshold = 100, autovacuum_vacuum_scale_factor = 0)"],
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        on_postgres(manager, &["DROP TABLE IF EXISTS outbox_leases"]).await
    }
}
