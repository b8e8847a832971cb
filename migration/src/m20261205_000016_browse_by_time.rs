//! Browsing a large retained outbox by time on PostgreSQL: a BRIN index on
//! `outbox_events.occurred_at`, so the admin API's event listing over a time range (sorted by
//! occurrence) reads the block ranges of that range instead of the whole table: one hour five
//! days back in a 10M-row table went from 3.4 s to 18–22 ms (BENCHMARKS.md, issue 31).
//!
//! A BRIN index holds one summary per 128 pages, so it costs inserts next to nothing (a bulk
//! insert of 200,000 rows into a 10M-row table: 1.39–1.43 s without it, 1.42–1.44 s with it)
//! and its build is short: `CREATE INDEX` holds writes for it, 1.25 s for 10M rows. It is a
//! no-op on MySQL / MariaDB and SQLite, which have no such index; there a time range reads
//! the rows in the listing's order until it has a page.
//!
//! Rows the relay writes back move to new pages, and a purge frees pages that later inserts
//! reuse, so the summaries widen over the table's life: the index then reads more ranges
//! than it needs, never fewer. `VACUUM` summarises new ranges (autovacuum does it).

use sea_orm_migration::prelude::*;

use crate::on_postgres;

/// The BRIN index on `occurred_at` (PostgreSQL only).
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "seaorm_outbox_m20261205_000016_browse_by_time"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        on_postgres(
            manager,
            &[
                "CREATE INDEX IF NOT EXISTS outbox_events_occurred_brin ON outbox_events \
               USING brin (occurred_at)",
            ],
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        on_postgres(
            manager,
            &["DROP INDEX IF EXISTS outbox_events_occurred_brin"],
        )
        .await
    }
}
