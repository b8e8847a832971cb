//! Migrations for the `seaorm-outbox` tables: the outbox's and the consumer inbox's.
//!
//! Use them in one of two ways:
//!
//! * **Inside your own migrator.** Append [`migrations()`] (both sides), [`outbox_migrations()`]
//!   (a producer only) or [`inbox_migrations()`] (a consumer only) to your
//!   `MigratorTrait::migrations` list. The two sets touch disjoint tables, so either can be
//!   added alone, and the other later. The migrations carry fixed, prefixed names (`seaorm_outbox_m…`), so they never clash
//!   with your own files and are recorded in your `seaql_migrations` table like any other.
//! * **Standalone.** Run [`Migrator`], which keeps its bookkeeping in its own table
//!   ([`MIGRATION_TABLE`]), so it never collides with a host app's `seaql_migrations`.
//!   `sea-orm-cli migrate -d migration up` runs it through this crate's binary.
//!
//! ```no_run
//! use sea_orm_migration::prelude::*;
//!
//! pub struct HostMigrator;
//!
//! impl MigratorTrait for HostMigrator {
//!     fn migrations() -> Vec<Box<dyn MigrationTrait>> {
//!         let mut all: Vec<Box<dyn MigrationTrait>> = vec![/* your own migrations */];
//!         all.extend(seaorm_outbox_migration::migrations());
//!         all
//!     }
//! }
//! ```

use sea_orm_migration::prelude::*;

mod m20261127_000001_create_outbox_events;
mod m20261127_000002_relay_lease_and_notify;
mod m20261127_000003_tune_for_queue_workload;
mod m20261127_000004_batch_leases;
mod m20261127_000005_partial_aggregate_index;
mod m20261128_000006_uncompressed_lease_ids;
mod m20261201_000007_relay_heartbeats;
mod m20261202_000008_inbox;
mod m20261202_000009_published_tally;
mod m20261202_000010_log_dead_letters;
mod m20261202_000011_backlog_samples;
mod m20261203_000012_partitions;
mod m20261204_000013_scheduled;
mod m20261204_000014_scheduled_scale;
mod m20261205_000015_inbox_consumers;
mod m20261205_000016_browse_by_time;

pub use m20261127_000001_create_outbox_events::Migration as CreateOutboxEvents;
pub use m20261127_000002_relay_lease_and_notify::Migration as RelayLeaseAndNotify;
pub use m20261127_000003_tune_for_queue_workload::Migration as TuneForQueueWorkload;
pub use m20261127_000004_batch_leases::Migration as BatchLeases;
pub use m20261127_000005_partial_aggregate_index::Migration as PartialAggregateIndex;
pub use m20261128_000006_uncompressed_lease_ids::Migration as UncompressedLeaseIds;
pub use m20261201_000007_relay_heartbeats::Migration as RelayHeartbeats;
pub use m20261202_000008_inbox::Migration as Inbox;
pub use m20261202_000009_published_tally::Migration as PublishedTally;
pub use m20261202_000010_log_dead_letters::Migration as LogDeadLetters;
pub use m20261202_000011_backlog_samples::Migration as BacklogSamples;
pub use m20261203_000012_partitions::Migration as Partitions;
pub use m20261204_000013_scheduled::Migration as Scheduled;
pub use m20261204_000014_scheduled_scale::Migration as ScheduledScale;
pub use m20261205_000015_inbox_consumers::Migration as InboxConsumers;
pub use m20261205_000016_browse_by_time::Migration as BrowseByTime;

/// The bookkeeping table of the standalone [`Migrator`].
pub const MIGRATION_TABLE: &str = "seaorm_outbox_migrations";

/// The PostgreSQL `NOTIFY` channel the insert trigger signals on; the payload is the schema name.
pub const NOTIFY_CHANNEL: &str = "seaorm_outbox";

/// Every migration, outbox and inbox, oldest first. Append these to a host app's migrator.
pub fn migrations() -> Vec<Box<dyn MigrationTrait>> {
    let mut all = outbox_migrations();
    all.extend(inbox_migrations());
    // The two sets touch disjoint tables; interleaved by name, they apply (and are recorded)
    // in the order they were written, as every migrator lists them.
    all.sort_by(|a, b| a.name().cmp(b.name()));
    all
}

/// The outbox's migrations only (`outbox_events`, its lease table, `outbox_relays`,
/// `outbox_published_tally`, `outbox_backlog_samples`, and on PostgreSQL
/// `outbox_log_dead_letters`), oldest first.
pub fn outbox_migrations() -> Vec<Box<dyn MigrationTrait>> {
    vec![
        Box::new(CreateOutboxEvents),
        Box::new(RelayLeaseAndNotify),
        Box::new(TuneForQueueWorkload),
        Box::new(BatchLeases),
        Box::new(PartialAggregateIndex),
        Box::new(UncompressedLeaseIds),
        Box::new(RelayHeartbeats),
        Box::new(PublishedTally),
        Box::new(LogDeadLetters),
        Box::new(BacklogSamples),
        Box::new(Partitions),
        Box::new(Scheduled),
        Box::new(ScheduledScale),
        Box::new(BrowseByTime),
    ]
}

/// The consumer inbox's migrations only (`inbox_messages`, `inbox_dead_letters`,
/// `inbox_consumers`), oldest first.
pub fn inbox_migrations() -> Vec<Box<dyn MigrationTrait>> {
    vec![Box::new(Inbox), Box::new(InboxConsumers)]
}

/// A standalone migrator with its own bookkeeping table ([`MIGRATION_TABLE`]).
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        migrations()
    }

    fn migration_table_name() -> DynIden {
        Alias::new(MIGRATION_TABLE).into_iden()
    }
}

/// Column and index identifiers shared by the migrations.
#[derive(DeriveIden, Clone, Copy)]
pub(crate) enum OutboxEvents {
    Table,
    Id,
    EventType,
    AggregateType,
    AggregateId,
    Payload,
    Headers,
    OccurredAt,
    CreatedAt,
    Status,
    Attempts,
    LastError,
    NextAttemptAt,
    PublishedAt,
    FailedAt,
    LockedBy,
    LockedUntil,
}

/// Runs `statements` in order on PostgreSQL and does nothing elsewhere: the shape of every
/// PostgreSQL-only migration (triggers, table settings, the lease table, partial indexes).
pub(crate) async fn on_postgres(
    manager: &SchemaManager<'_>,
    statements: &[&str],
) -> Result<(), DbErr> {
    if manager.get_database_backend() != sea_orm::DatabaseBackend::Postgres {
        return Ok(());
    }
    let db = manager.get_connection();
    for sql in statements {
        db.execute_unprepared(sql).await?;
    }
    Ok(())
}

/// A UTC timestamp column with microsecond precision on every backend.
///
/// MySQL's `TIMESTAMP` keeps whole seconds and ends in 2038, so MySQL gets `DATETIME(6)` holding
/// UTC; PostgreSQL gets `timestamptz` and SQLite the text form SeaORM reads back.
pub(crate) fn timestamp(manager: &SchemaManager, col: impl IntoIden) -> ColumnDef {
    let mut def = ColumnDef::new(col);
    match manager.get_database_backend() {
        sea_orm::DatabaseBackend::MySql => def.custom(Alias::new("DATETIME(6)")),
        _ => def.timestamp_with_time_zone(),
    };
    def
}
