//! PostgreSQL: the aggregate index covers only pending and dead-lettered rows.
//!
//! Its readers (the per-aggregate head check, the follower lookup, replay by aggregate) only
//! ever look for `pending` or `failed` rows. Indexing published rows too meant every write-back
//! inserted one entry per event into a different aggregate's range of an index that grows with
//! retention: with 5M published rows retained, a 100-row write-back dirtied 219 pages and took
//! 3.5 ms, against 118 pages and 1.3 ms with this index (BENCHMARKS.md). With the batch lease a
//! published row now leaves this index for good. MySQL has no partial indexes and SQLite cannot
//! prove `status IN ('pending')` implies the index predicate, so both keep the full index.
//!
//! `CREATE INDEX` blocks writes to the table while it builds; on a large live table, build it
//! by hand first with `CREATE INDEX CONCURRENTLY` under another name and swap the names.

use sea_orm_migration::prelude::*;

use crate::on_postgres;

/// Replaces `outbox_events_aggregate_idx` with a partial index on PostgreSQL; a no-op elsewhere.
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "seaorm_outbox_m20261127_000005_partial_aggregate_index"
    }
}

const COLUMNS: &str = "(aggregate_type, aggregate_id, status, occurred_at, id)";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        swap(manager, " WHERE status IN ('pending', 'failed')").await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        swap(manager, "").await
    }
}

async fn swap(manager: &SchemaManager<'_>, predicate: &str) -> Result<(), DbErr> {
    on_postgres(
        manager,
        &[
            "DROP INDEX IF EXISTS outbox_events_aggregate_idx",
            &format!(
                "CREATE INDEX outbox_events_aggregate_idx ON outbox_events {COLUMNS}{predicate}"
            ),
        ],
    )
    .await
}
