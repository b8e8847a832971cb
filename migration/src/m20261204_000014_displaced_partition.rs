//! MySQL / MariaDB: `outbox_events.displaced_partition`, an indexed `VIRTUAL` column that is
//! the row's `partition_no` while the row holds its aggregate's later events (the predicate of
//! PostgreSQL's and SQLite's partial `outbox_events_displaced_idx`), and `NULL` otherwise.
//!
//! A relay taking a partition over reads the events that hold their aggregates there. MySQL
//! has no partial index, so without this column that read went through every pending row of
//! the partitions taken: with a million events scheduled for next week, 3.4–3.8 s on each take
//! before the first delivery (BENCHMARKS.md, the scheduled-rows drain). Through this index it
//! reads only the few displaced rows. A no-op on PostgreSQL and SQLite.
//!
//! What it does to a live table: adding a `VIRTUAL` column is instant (metadata only, no row
//! written); the index is then built online (`LOCK=NONE`: readers and writers go on while it
//! reads the table). Each later insert adds one entry (under `NULL`) to the index; a write-back
//! that publishes a row leaves the entry as it was.

use sea_orm::DatabaseBackend;
use sea_orm_migration::prelude::*;

/// Adds `displaced_partition` on MySQL: see the module docs.
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "seaorm_outbox_m20261204_000014_displaced_partition"
    }
}

/// The index `seaorm_outbox` reads on MySQL when a relay takes partitions over.
const INDEX: &str = "outbox_events_displaced_partition_idx";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DatabaseBackend::MySql {
            return Ok(());
        }
        let db = manager.get_connection();
        if !crate::m20261203_000012_partitions::column_exists(
            manager,
            "outbox_events",
            "displaced_partition",
        )
        .await?
        {
            // The same predicate as `outbox_events_displaced_idx` elsewhere (migration 13).
            db.execute_unprepared(
                "ALTER TABLE outbox_events ADD COLUMN displaced_partition SMALLINT AS \
                 (IF(status = 'pending' AND next_attempt_at > created_at \
                 AND (deliver_at IS NULL OR attempts > 0 OR next_attempt_at <> deliver_at \
                 OR holds_aggregate), partition_no, NULL)) VIRTUAL, ALGORITHM=INSTANT",
            )
            .await?;
        }
        if !crate::m20261203_000012_partitions::has_mysql_index(manager, INDEX).await? {
            db.execute_unprepared(&format!(
                "ALTER TABLE outbox_events ADD INDEX {INDEX} (displaced_partition), LOCK=NONE"
            ))
            .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DatabaseBackend::MySql {
            return Ok(());
        }
        manager
            .get_connection()
            .execute_unprepared(&format!(
                "ALTER TABLE outbox_events DROP INDEX {INDEX}, DROP COLUMN displaced_partition"
            ))
            .await?;
        Ok(())
    }
}
