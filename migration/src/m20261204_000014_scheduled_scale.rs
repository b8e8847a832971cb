//! Scheduled rows at scale on MySQL / MariaDB and SQLite: a million events scheduled for next
//! week must not slow what the relay does with the due ones (BENCHMARKS.md, the
//! scheduled-rows drain). A no-op on PostgreSQL, whose partial indexes already leave them out.
//!
//! * **MySQL / MariaDB:** `outbox_events.displaced_partition`, an indexed `VIRTUAL` column that
//!   is the row's `partition_no` while the row holds its aggregate's later events (the predicate
//!   of the partial `outbox_events_displaced_idx` elsewhere), and `NULL` otherwise. A relay
//!   taking partitions over reads the events that hold their aggregates there; without a partial
//!   index that read went through every pending row of the partitions taken (3.4–3.8 s per
//!   million, at each take). Adding a `VIRTUAL` column is instant (metadata only); the index is
//!   then built online (`LOCK=NONE`: readers and writers go on; 4.1 s for a million rows on
//!   MariaDB 10.11, an insert meanwhile waited 22 ms). Each later insert adds one entry (under
//!   `NULL`); a write-back that publishes a row leaves it as it was.
//! * **SQLite:** `outbox_events_aggregate_idx` without `status`: `(aggregate_type,
//!   aggregate_id, occurred_at, id)`. With `status` in the key every published row moved its
//!   entry to another part of its aggregate's range, the write-back's largest cost (marking
//!   50,000 rows published in batches of 500 took 1.9 s, 3.9 s beside a million scheduled rows;
//!   0.4 s either way without `status`). The price: a lookup of an aggregate's pending events
//!   steps over its published rows still retained. The default relay (owned partitions) makes
//!   none; a relay claiming under leases (`Claiming::Leases`) makes one per candidate, so there
//!   keep retention short for aggregates with long histories. Rebuilding the index holds the
//!   write lock while it reads the table (3.1 s for a million rows here).

use sea_orm::DatabaseBackend;
use sea_orm_migration::prelude::*;

/// Scheduled rows at scale: see the module docs.
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "seaorm_outbox_m20261204_000014_scheduled_scale"
    }
}

/// The index `seaorm_outbox` reads on MySQL when a relay takes partitions over.
const INDEX: &str = "outbox_events_displaced_partition_idx";

/// SQLite's aggregate index, without and with `status` (the latter as migration 1 made it).
fn sqlite_aggregate_index(columns: &str) -> String {
    // One batch, so one connection: SQLite's pool would otherwise run the CREATE on a
    // connection that still sees the dropped index.
    format!(
        "DROP INDEX IF EXISTS outbox_events_aggregate_idx; \
         CREATE INDEX outbox_events_aggregate_idx ON outbox_events ({columns})"
    )
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        match manager.get_database_backend() {
            DatabaseBackend::MySql => {
                if !crate::m20261203_000012_partitions::column_exists(
                    manager,
                    "outbox_events",
                    "displaced_partition",
                )
                .await?
                {
                    // The same predicate as `outbox_events_displaced_idx` (migration 13).
                    db.execute_unprepared(
                        "ALTER TABLE outbox_events ADD COLUMN displaced_partition SMALLINT AS \
                         (IF(status = 'pending' AND next_attempt_at > created_at \
                         AND (deliver_at IS NULL OR attempts > 0 \
                         OR next_attempt_at <> deliver_at OR holds_aggregate), \
                         partition_no, NULL)) VIRTUAL, ALGORITHM=INSTANT",
                    )
                    .await?;
                }
                if !crate::m20261203_000012_partitions::has_mysql_index(manager, INDEX).await? {
                    db.execute_unprepared(&format!(
                        "ALTER TABLE outbox_events ADD INDEX {INDEX} (displaced_partition), \
                         LOCK=NONE"
                    ))
                    .await?;
                }
            }
            DatabaseBackend::Sqlite => {
                db.execute_unprepared(&sqlite_aggregate_index(
                    "aggregate_type, aggregate_id, occurred_at, id",
                ))
                .await?;
            }
            _ => {}
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        match manager.get_database_backend() {
            DatabaseBackend::MySql => {
                db.execute_unprepared(&format!(
                    "ALTER TABLE outbox_events DROP INDEX {INDEX}, DROP COLUMN displaced_partition"
                ))
                .await?;
            }
            DatabaseBackend::Sqlite => {
                db.execute_unprepared(&sqlite_aggregate_index(
                    "aggregate_type, aggregate_id, status, occurred_at, id",
                ))
                .await?;
            }
            _ => {}
        }
        Ok(())
    }
}
