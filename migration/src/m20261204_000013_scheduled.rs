//! Scheduled delivery: `outbox_events.deliver_at`, the time an event was scheduled for
//! (`NewEvent::deliver_at`), or `NULL`; and `holds_aggregate`, set on a scheduled event that
//! keeps its place in its aggregate's order (`NewEvent::holds_later_events`); and `expires_at`,
//! after which an undelivered event is not sent (`NewEvent::expires_at`).
//!
//! A scheduled event is written with its `next_attempt_at` at that time, so the due index never
//! reaches it before then: a million events scheduled for next week cost a claim nothing. (One
//! that holds its aggregate is written due now instead: a relay reads it once and hands it back
//! until its time, which is how the relay learns to hold the aggregate.) By default it is
//! ordered by its delivery time, so it must not hold its aggregate's later events the way a
//! retried event does; `outbox_events_displaced_idx`, which a relay taking a partition over reads
//! to learn what holds, leaves it out until it has been attempted or handed back, unless it was
//! written to hold its aggregate.
//!
//! What it does to a live table:
//! * **PostgreSQL, SQLite:** adds the columns (catalog changes, no rewrite: nullable, or with a
//!   constant default) and rebuilds
//!   the partial `outbox_events_displaced_idx` with the new predicate. `CREATE INDEX` holds a
//!   `SHARE` lock (writers wait, readers do not) while it reads the table; the index itself
//!   holds only the few events in backoff.
//! * **MariaDB:** the table is **rebuilt, with writers blocked** for the whole copy. MariaDB
//!   (10.11 checked) refuses `ALGORITHM=INSTANT` here and refuses `LOCK=NONE` because the
//!   table has an indexed virtual column (`partition_no`, from the partitions migration), so
//!   the server falls back to a copy under a shared lock: readers go on, inserts wait, for
//!   as long as copying the whole table takes (12 s for a million small rows on MariaDB
//!   10.11 on a 2-core machine; an insert issued 1 s in waited 10.9 s). On a large table run
//!   it in a maintenance window or with an online schema-change tool (pt-online-schema-change,
//!   gh-ost), then mark the migration applied.
//! * **MySQL 8.0.12+:** adds the column instantly (metadata only) when the server accepts it,
//!   otherwise the same rebuild as MariaDB.

use sea_orm::DatabaseBackend;
use sea_orm_migration::prelude::*;

/// Adds `deliver_at`: see the module docs.
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "seaorm_outbox_m20261204_000013_scheduled"
    }
}

/// The events that hold their aggregate's later ones (`seaorm_outbox`'s blockers query repeats
/// it, so the planner can use the partial index): pending and moved past their creation, but not
/// a scheduled event nobody has touched yet unless it holds its aggregate.
const DISPLACED: &str = "status = 'pending' AND next_attempt_at > created_at \
     AND (deliver_at IS NULL OR attempts > 0 OR next_attempt_at <> deliver_at \
     OR holds_aggregate)";

async fn has_deliver_at(manager: &SchemaManager<'_>) -> Result<bool, DbErr> {
    crate::m20261203_000012_partitions::column_exists(manager, "outbox_events", "deliver_at").await
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        match manager.get_database_backend() {
            DatabaseBackend::MySql => {
                if !has_deliver_at(manager).await? {
                    // No ALGORITHM clause: let the server pick (a rebuild on MariaDB, see above).
                    db.execute_unprepared(
                        "ALTER TABLE outbox_events ADD COLUMN deliver_at DATETIME(6) NULL, \
                         ADD COLUMN holds_aggregate BOOLEAN NOT NULL DEFAULT FALSE, \
                         ADD COLUMN expires_at DATETIME(6) NULL",
                    )
                    .await?;
                }
            }
            backend => {
                let add = if has_deliver_at(manager).await? {
                    String::new()
                } else {
                    let time = if backend == DatabaseBackend::Postgres {
                        "TIMESTAMPTZ"
                    } else {
                        "TIMESTAMP"
                    };
                    format!(
                        "ALTER TABLE outbox_events ADD COLUMN deliver_at {time} NULL; \
                         ALTER TABLE outbox_events ADD COLUMN holds_aggregate BOOLEAN NOT NULL \
                         DEFAULT FALSE; \
                         ALTER TABLE outbox_events ADD COLUMN expires_at {time} NULL; "
                    )
                };
                // One batch, so one connection: SQLite's pool would otherwise run the CREATE on
                // a connection that still sees the dropped index.
                db.execute_unprepared(&format!(
                    "{add}DROP INDEX IF EXISTS outbox_events_displaced_idx; \
                     CREATE INDEX outbox_events_displaced_idx ON outbox_events (partition_no) \
                     WHERE {DISPLACED}"
                ))
                .await?;
            }
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        if manager.get_database_backend() != DatabaseBackend::MySql {
            db.execute_unprepared(
                "DROP INDEX IF EXISTS outbox_events_displaced_idx; \
                 CREATE INDEX outbox_events_displaced_idx ON outbox_events (partition_no) \
                 WHERE status = 'pending' AND next_attempt_at > created_at",
            )
            .await?;
        }
        for column in ["deliver_at", "holds_aggregate", "expires_at"] {
            db.execute_unprepared(&format!("ALTER TABLE outbox_events DROP COLUMN {column}"))
                .await?;
        }
        Ok(())
    }
}
