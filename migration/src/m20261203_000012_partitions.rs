//! Hash partitions for per-aggregate order: `outbox_events.partition_no`, the due index keyed by
//! it, and `outbox_partitions` (partition, owner token, epoch), the table through which relays
//! divide the partitions.
//!
//! Every event of one aggregate has the same partition, the first four bytes of
//! `md5(aggregate_type || ':' || aggregate_id)` modulo 256 (`seaorm_outbox::event::partition_of`).
//! The one relay that owns a partition delivers its aggregates in order without proving, row by
//! row, that each event is its aggregate's head.
//!
//! What it does to a live table, per backend:
//! * **PostgreSQL:** adds a nullable column (a catalog change, no rewrite) and a `BEFORE
//!   INSERT` trigger that fills it when a writer leaves it out (the library always sets it, and
//!   the trigger's `WHEN` clause then costs nothing). Rows already in the table are given their
//!   partition by the relays, online, a thousand per short transaction, before they claim
//!   (`outbox_events_unpartitioned_idx` finds them). The due index is rebuilt with
//!   `partition_no` as its last key column, so a relay that owns some of the partitions
//!   filters on the index entry instead of fetching rows it will not take: `CREATE INDEX` holds
//!   a `SHARE` lock, blocking writers (not readers) while it builds, about a second per million
//!   pending rows. On a large live table, build it first with `CREATE INDEX CONCURRENTLY
//!   outbox_events_due_partition_idx ON outbox_events (next_attempt_at, id, partition_no)
//!   WHERE status = 'pending'` and this migration skips it.
//! * **MySQL / MariaDB:** a `VIRTUAL` generated column computed with `MD5` and `CONV`: adding
//!   it changes only metadata, no row is written, and no writer ever has to know about it. The
//!   due index is rebuilt with it as its last column, online (`LOCK=NONE`: writers go on).
//! * **SQLite:** a nullable column the library fills, and the same indexes as PostgreSQL.
//!
//! `outbox_relays.claims` (nullable, a catalog change) holds the owner token of a relay that
//! takes a share of the partitions: its heartbeat row is its ownership's lease, one row
//! written per renewal however many partitions it holds, and relays claiming under leases do
//! not count when the partitions are divided.
//!
//! `outbox_events_displaced_idx` (PostgreSQL, SQLite) lists the pending events whose next
//! attempt was moved past their creation, retried or held behind their aggregate's failure: a
//! relay that takes a partition over reads them to learn which aggregates must wait.

use sea_orm::DatabaseBackend;
use sea_orm_migration::prelude::*;

/// Adds partitions: see the module docs.
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "seaorm_outbox_m20261203_000012_partitions"
    }
}

/// The fixed partition count (`seaorm_outbox::event::PARTITIONS`).
const PARTITIONS: u16 = 256;

/// PostgreSQL's and SQLite's partial indexes.
const PARTIAL_INDEXES: [&str; 3] = [
    "CREATE INDEX IF NOT EXISTS outbox_events_due_partition_idx ON outbox_events \
     (next_attempt_at, id, partition_no) WHERE status = 'pending'",
    "CREATE INDEX IF NOT EXISTS outbox_events_displaced_idx ON outbox_events (partition_no) \
     WHERE status = 'pending' AND next_attempt_at > created_at",
    "CREATE INDEX IF NOT EXISTS outbox_events_unpartitioned_idx ON outbox_events (id) \
     WHERE partition_no IS NULL AND status IN ('pending', 'failed')",
];

const PG_TRIGGER: [&str; 3] = [
    "CREATE OR REPLACE FUNCTION outbox_events_partition() RETURNS trigger \
     LANGUAGE plpgsql AS $$ BEGIN \
       NEW.partition_no := (('x' || substr(md5(NEW.aggregate_type || ':' || \
         NEW.aggregate_id), 1, 8))::bit(32)::bigint % 256)::smallint; \
       RETURN NEW; \
     END $$",
    "DROP TRIGGER IF EXISTS outbox_events_partition ON outbox_events",
    "CREATE TRIGGER outbox_events_partition BEFORE INSERT ON outbox_events FOR EACH ROW \
     WHEN (NEW.partition_no IS NULL) EXECUTE FUNCTION outbox_events_partition()",
];

/// The count `sql` returns (sea-orm-migration's `has_column` and `has_index` need schema
/// discovery this crate does not build with).
async fn count(manager: &SchemaManager<'_>, sql: &str) -> Result<i64, DbErr> {
    let backend = manager.get_database_backend();
    Ok(manager
        .get_connection()
        .query_one_raw(sea_orm::Statement::from_string(backend, sql))
        .await?
        .map(|r| r.try_get_by_index::<i64>(0))
        .transpose()?
        .unwrap_or(0))
}

/// Whether `table` has `column`, in the connection's own schema (PostgreSQL's
/// `current_schema()`, so a host app's per-tenant schema is honoured; MySQL's `DATABASE()`).
/// The names are the migrations' own constants, never input.
pub(crate) async fn column_exists(
    manager: &SchemaManager<'_>,
    table: &str,
    column: &str,
) -> Result<bool, DbErr> {
    let sql = match manager.get_database_backend() {
        DatabaseBackend::MySql => format!(
            "SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE() \
             AND table_name = '{table}' AND column_name = '{column}'"
        ),
        DatabaseBackend::Postgres => format!(
            "SELECT COUNT(*) FROM information_schema.columns WHERE \
             table_schema = current_schema() AND table_name = '{table}' \
             AND column_name = '{column}'"
        ),
        _ => format!("SELECT COUNT(*) FROM pragma_table_info('{table}') WHERE name = '{column}'"),
    };
    Ok(count(manager, &sql).await? > 0)
}

pub(crate) async fn has_mysql_index(
    manager: &SchemaManager<'_>,
    name: &str,
) -> Result<bool, DbErr> {
    let sql = format!(
        "SELECT COUNT(*) FROM information_schema.statistics WHERE table_schema = DATABASE() \
         AND table_name = 'outbox_events' AND index_name = '{name}'"
    );
    Ok(count(manager, &sql).await? > 0)
}

#[derive(DeriveIden, Clone, Copy)]
enum OutboxPartitions {
    Table,
    PartitionNo,
    Owner,
    Epoch,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let backend = manager.get_database_backend();
        match backend {
            DatabaseBackend::Postgres => {
                db.execute_unprepared(
                    "ALTER TABLE outbox_events ADD COLUMN IF NOT EXISTS partition_no SMALLINT",
                )
                .await?;
                for sql in PG_TRIGGER.iter().chain(&PARTIAL_INDEXES) {
                    db.execute_unprepared(sql).await?;
                }
                db.execute_unprepared("DROP INDEX IF EXISTS outbox_events_due_idx")
                    .await?;
            }
            DatabaseBackend::MySql => {
                if !column_exists(manager, "outbox_events", "partition_no").await? {
                    db.execute_unprepared(
                        "ALTER TABLE outbox_events ADD COLUMN partition_no SMALLINT AS \
                         (CONV(SUBSTRING(MD5(CONCAT(aggregate_type, ':', aggregate_id)), 1, 8), \
                         16, 10) % 256) VIRTUAL",
                    )
                    .await?;
                }
                if !has_mysql_index(manager, "outbox_events_due_partition_idx").await? {
                    db.execute_unprepared(
                        "ALTER TABLE outbox_events ADD INDEX outbox_events_due_partition_idx \
                         (status, next_attempt_at, id, partition_no), LOCK=NONE",
                    )
                    .await?;
                }
                if has_mysql_index(manager, "outbox_events_due_idx").await? {
                    db.execute_unprepared(
                        "ALTER TABLE outbox_events DROP INDEX outbox_events_due_idx, LOCK=NONE",
                    )
                    .await?;
                }
            }
            _ => {
                if !column_exists(manager, "outbox_events", "partition_no").await? {
                    db.execute_unprepared(
                        "ALTER TABLE outbox_events ADD COLUMN partition_no INTEGER",
                    )
                    .await?;
                }
                for sql in PARTIAL_INDEXES {
                    db.execute_unprepared(sql).await?;
                }
                db.execute_unprepared("DROP INDEX IF EXISTS outbox_events_due_idx")
                    .await?;
            }
        }

        // Which heartbeats count when relays divide the partitions: not those of relays that
        // claim under leases.
        if !column_exists(manager, "outbox_relays", "claims").await? {
            db.execute_unprepared("ALTER TABLE outbox_relays ADD COLUMN claims VARCHAR(64) NULL")
                .await?;
        }

        use OutboxPartitions as P;
        manager
            .create_table(
                Table::create()
                    .table(P::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(P::PartitionNo)
                            .small_integer()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(P::Owner).string_len(64).null())
                    .col(ColumnDef::new(P::Epoch).big_integer().not_null().default(0))
                    .to_owned(),
            )
            .await?;
        let rows: Vec<String> = (0..PARTITIONS).map(|p| format!("({p}, 0)")).collect();
        let rows = rows.join(", ");
        let insert = match backend {
            DatabaseBackend::MySql => {
                format!("INSERT IGNORE INTO outbox_partitions (partition_no, epoch) VALUES {rows}")
            }
            _ => format!(
                "INSERT INTO outbox_partitions (partition_no, epoch) VALUES {rows} \
                 ON CONFLICT (partition_no) DO NOTHING"
            ),
        };
        db.execute_unprepared(&insert).await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        manager
            .drop_table(
                Table::drop()
                    .table(OutboxPartitions::Table)
                    .if_exists()
                    .to_owned(),
            )
            .await?;
        db.execute_unprepared("ALTER TABLE outbox_relays DROP COLUMN claims")
            .await?;
        match manager.get_database_backend() {
            DatabaseBackend::Postgres => {
                for sql in [
                    "CREATE INDEX IF NOT EXISTS outbox_events_due_idx ON outbox_events \
                     (next_attempt_at, id) WHERE status = 'pending'",
                    "DROP TRIGGER IF EXISTS outbox_events_partition ON outbox_events",
                    "DROP FUNCTION IF EXISTS outbox_events_partition()",
                    "DROP INDEX IF EXISTS outbox_events_due_partition_idx",
                    "DROP INDEX IF EXISTS outbox_events_displaced_idx",
                    "DROP INDEX IF EXISTS outbox_events_unpartitioned_idx",
                    "ALTER TABLE outbox_events DROP COLUMN IF EXISTS partition_no",
                ] {
                    db.execute_unprepared(sql).await?;
                }
            }
            DatabaseBackend::MySql => {
                db.execute_unprepared(
                    "ALTER TABLE outbox_events ADD INDEX outbox_events_due_idx \
                     (status, next_attempt_at, id), DROP INDEX outbox_events_due_partition_idx, \
                     DROP COLUMN partition_no",
                )
                .await?;
            }
            _ => {
                for sql in [
                    "CREATE INDEX IF NOT EXISTS outbox_events_due_idx ON outbox_events \
                     (next_attempt_at, id) WHERE status = 'pending'",
                    "DROP INDEX IF EXISTS outbox_events_due_partition_idx",
                    "DROP INDEX IF EXISTS outbox_events_displaced_idx",
                    "DROP INDEX IF EXISTS outbox_events_unpartitioned_idx",
                    "ALTER TABLE outbox_events DROP COLUMN partition_no",
                ] {
                    db.execute_unprepared(sql).await?;
                }
            }
        }
        Ok(())
    }
}
