//! The three ways to run the outbox migrations, on every backend:
//! 1. the migration binary that `sea-orm-cli migrate -d migration` runs (default features);
//! 2. a host app's own `Migrator` with our migrations appended;
//! 3. the standalone `Migrator`, whose bookkeeping table never collides with the host's.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::process::Command;

use common::{Backend, TestDb};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use sea_orm_migration::prelude::*;
use seaorm_outbox_migration::{MIGRATION_TABLE, Migrator};

on_all_backends!(
    unmigrated:
    cli_binary_migrates_up_and_down,
    host_migrator_runs_our_migrations_under_fixed_names,
    standalone_migrator_coexists_with_the_host_bookkeeping,
    a_consumer_only_host_gets_the_inbox_tables_alone_and_the_outbox_later,
    the_scheduled_scale_migration_indexes_what_the_relay_reads,
    the_browse_migration_indexes_occurred_at_with_brin_on_postgres,
);

/// Names of the tables in the test's database or schema.
async fn tables(t: &TestDb) -> Vec<String> {
    let sql = match t.db.get_database_backend() {
        DbBackend::Postgres => format!(
            "SELECT table_name AS name FROM information_schema.tables WHERE table_schema = '{}'",
            t.name
        ),
        DbBackend::MySql => format!(
            "SELECT table_name AS name FROM information_schema.tables WHERE table_schema = '{}'",
            t.name
        ),
        _ => "SELECT name FROM sqlite_master WHERE type = 'table'".to_owned(),
    };
    let rows =
        t.db.query_all_raw(Statement::from_string(t.db.get_database_backend(), sql))
            .await
            .expect("list tables");
    let mut names: Vec<String> = rows
        .iter()
        .map(|r| r.try_get::<String>("", "name").expect("name"))
        .collect();
    names.sort();
    names
}

async fn versions(t: &TestDb, table: &str) -> Vec<String> {
    let rows =
        t.db.query_all_raw(Statement::from_string(
            t.db.get_database_backend(),
            format!("SELECT version FROM {table} ORDER BY version"),
        ))
        .await
        .expect("read bookkeeping");
    rows.iter()
        .map(|r| r.try_get::<String>("", "version").expect("version"))
        .collect()
}

fn our_names() -> Vec<String> {
    seaorm_outbox_migration::migrations()
        .iter()
        .map(|m| m.name().to_owned())
        .collect()
}

async fn cli_binary_migrates_up_and_down(t: &TestDb) {
    if t.backend == Backend::SqliteMemory {
        return; // a separate process cannot see another process's in-memory database
    }
    let env = t.child_env();
    let url = &env
        .iter()
        .find(|(k, _)| *k == "OUTBOX_CHILD_URL")
        .expect("url")
        .1;
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_seaorm-outbox-migration"))
            .args(args)
            .args(["-u", url, "-s", &t.name])
            .output()
            .expect("run the migration binary");
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    cli(&["up"]);
    let after_up = tables(t).await;
    assert!(
        after_up.contains(&"outbox_events".to_owned()),
        "{after_up:?}"
    );
    assert!(
        after_up.contains(&MIGRATION_TABLE.to_owned()),
        "{after_up:?}"
    );
    assert!(
        !after_up.contains(&"seaql_migrations".to_owned()),
        "{after_up:?}"
    );
    assert_eq!(versions(t, MIGRATION_TABLE).await, our_names());
    let status = cli(&["status"]);
    assert!(status.contains("Applied"), "{status}");

    let all = our_names().len().to_string();
    cli(&["down", "-n", &all]);
    let after_down = tables(t).await;
    assert!(
        !after_down.contains(&"outbox_events".to_owned()),
        "{after_down:?}"
    );
    assert!(versions(t, MIGRATION_TABLE).await.is_empty());
    // And up again: the down migrations leave a clean slate.
    cli(&["up"]);
    assert!(tables(t).await.contains(&"outbox_events".to_owned()));
}

/// A host migration that lives in the host app.
struct CreateOrders;

impl MigrationName for CreateOrders {
    fn name(&self) -> &str {
        "m20260101_000001_create_orders"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateOrders {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("orders")
                    .col(ColumnDef::new("id").integer().not_null().primary_key())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table("orders").to_owned())
            .await
    }
}

struct HostMigrator;

impl MigratorTrait for HostMigrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut all: Vec<Box<dyn MigrationTrait>> = vec![Box::new(CreateOrders)];
        all.extend(seaorm_outbox_migration::migrations());
        all
    }
}

async fn host_migrator_runs_our_migrations_under_fixed_names(t: &TestDb) {
    HostMigrator::up(&t.db, None).await.expect("host up");
    let mut expected = vec!["m20260101_000001_create_orders".to_owned()];
    expected.extend(our_names());
    expected.sort();
    assert_eq!(versions(t, "seaql_migrations").await, expected);
    assert!(our_names().iter().all(|n| n.starts_with("seaorm_outbox_m")));
    let names = tables(t).await;
    assert!(names.contains(&"outbox_events".to_owned()) && names.contains(&"orders".to_owned()));
    assert!(
        !names.contains(&MIGRATION_TABLE.to_owned()),
        "no second bookkeeping table"
    );

    HostMigrator::down(&t.db, None).await.expect("host down");
    let names = tables(t).await;
    assert!(!names.contains(&"outbox_events".to_owned()) && !names.contains(&"orders".to_owned()));
}

/// A host that only knows its own migrations, as most apps do.
struct HostOnly;

impl MigratorTrait for HostOnly {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(CreateOrders)]
    }
}

async fn standalone_migrator_coexists_with_the_host_bookkeeping(t: &TestDb) {
    HostOnly::up(&t.db, None).await.expect("host up");
    Migrator::up(&t.db, None).await.expect("outbox up");
    // Each migrator sees only its own history: neither reports the other's as missing.
    HostOnly::up(&t.db, None).await.expect("host up again");
    assert!(
        HostOnly::get_pending_migrations(&t.db)
            .await
            .expect("host status")
            .is_empty()
    );
    assert!(
        Migrator::get_pending_migrations(&t.db)
            .await
            .expect("status")
            .is_empty()
    );
    assert_eq!(
        versions(t, "seaql_migrations").await,
        vec!["m20260101_000001_create_orders"]
    );
    assert_eq!(versions(t, MIGRATION_TABLE).await, our_names());

    Migrator::down(&t.db, None).await.expect("outbox down");
    let names = tables(t).await;
    assert!(!names.contains(&"outbox_events".to_owned()));
    assert!(
        names.contains(&"orders".to_owned()),
        "the host's tables are untouched"
    );
}

/// A consuming service: its own migrations and the inbox's, no outbox.
struct ConsumerHost;

impl MigratorTrait for ConsumerHost {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut all: Vec<Box<dyn MigrationTrait>> = vec![Box::new(CreateOrders)];
        all.extend(seaorm_outbox_migration::inbox_migrations());
        all
    }
}

/// The same service once it also produces events.
struct BothSides;

impl MigratorTrait for BothSides {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut all: Vec<Box<dyn MigrationTrait>> = vec![Box::new(CreateOrders)];
        all.extend(seaorm_outbox_migration::inbox_migrations());
        all.extend(seaorm_outbox_migration::outbox_migrations());
        all
    }
}

async fn a_consumer_only_host_gets_the_inbox_tables_alone_and_the_outbox_later(t: &TestDb) {
    ConsumerHost::up(&t.db, None)
        .await
        .expect("consumer host up");
    let names = tables(t).await;
    for table in [
        "inbox_messages",
        "inbox_dead_letters",
        "inbox_consumers",
        "orders",
    ] {
        assert!(names.contains(&table.to_owned()), "{table}: {names:?}");
    }
    assert!(!names.contains(&"outbox_events".to_owned()), "{names:?}");
    // Adding the outbox later applies only its migrations.
    assert_eq!(
        BothSides::get_pending_migrations(&t.db)
            .await
            .expect("pending")
            .len(),
        seaorm_outbox_migration::outbox_migrations().len()
    );
    BothSides::up(&t.db, None).await.expect("both up");
    assert!(tables(t).await.contains(&"outbox_events".to_owned()));
    BothSides::down(&t.db, None).await.expect("both down");
    let names = tables(t).await;
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("inbox_") || n.starts_with("outbox_")),
        "{names:?}"
    );
}

/// The columns of SQLite's `outbox_events_aggregate_idx`, in key order.
async fn sqlite_aggregate_index(t: &TestDb) -> Vec<String> {
    let rows =
        t.db.query_all_raw(Statement::from_string(
            DbBackend::Sqlite,
            "SELECT name FROM pragma_index_info('outbox_events_aggregate_idx') ORDER BY seqno",
        ))
        .await
        .expect("index info");
    rows.iter()
        .map(|r| r.try_get::<String>("", "name").expect("name"))
        .collect()
}

/// Migration 14: on MySQL an indexed virtual column that is the partition of exactly the rows
/// that hold their aggregates (a retried row, not an untouched scheduled one); on SQLite the
/// aggregate index without `status`; down puts each back.
async fn the_scheduled_scale_migration_indexes_what_the_relay_reads(t: &TestDb) {
    Migrator::up(&t.db, None).await.expect("up");
    match t.db.get_database_backend() {
        DbBackend::MySql => {
            let row = |id: u8, next: &str, deliver: &str, attempts: u8| {
                format!(
                    "(UNHEX('{id:032x}'), 'e', 'order', '{id}', '{{}}', '{{}}', \
                     '2026-01-01 00:00:00', '2026-01-01 00:00:00', 'pending', {attempts}, \
                     '{next}', {deliver})"
                )
            };
            t.db.execute_unprepared(&format!(
                "INSERT INTO outbox_events (id, event_type, aggregate_type, aggregate_id, \
                 payload, headers, occurred_at, created_at, status, attempts, \
                 next_attempt_at, deliver_at) VALUES {}, {}, {}",
                row(1, "2026-01-01 00:00:00", "NULL", 0),
                row(2, "2026-01-01 00:05:00", "NULL", 1),
                row(3, "2026-02-01 00:00:00", "'2026-02-01 00:00:00'", 0),
            ))
            .await
            .expect("rows");
            let displaced = t
                .scalar(
                    "SELECT COUNT(*) FROM outbox_events \
                     FORCE INDEX (outbox_events_displaced_partition_idx) \
                     WHERE displaced_partition = partition_no",
                )
                .await;
            assert_eq!(displaced, 1, "only the retried row holds its aggregate");
            assert_eq!(
                t.scalar(
                    "SELECT COUNT(*) FROM outbox_events WHERE displaced_partition IS NOT NULL \
                     AND aggregate_id = '2'"
                )
                .await,
                1
            );
            t.db.execute_unprepared("DELETE FROM outbox_events")
                .await
                .expect("empty");
        }
        DbBackend::Sqlite => {
            assert_eq!(
                sqlite_aggregate_index(t).await,
                ["aggregate_type", "aggregate_id", "occurred_at", "id"]
            );
        }
        _ => {}
    }
    // Down through migrations 16 (browse_by_time), 15 (inbox_consumers) and this one.
    Migrator::down(&t.db, Some(3)).await.expect("down three");
    match t.db.get_database_backend() {
        DbBackend::MySql => assert_eq!(
            t.scalar(&format!(
                "SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = '{}' \
                 AND table_name = 'outbox_events' AND column_name = 'displaced_partition'",
                t.name
            ))
            .await,
            0
        ),
        DbBackend::Sqlite => assert_eq!(
            sqlite_aggregate_index(t).await,
            [
                "aggregate_type",
                "aggregate_id",
                "status",
                "occurred_at",
                "id"
            ]
        ),
        _ => {}
    }
}

/// Migration 16: a BRIN index on `occurred_at` on PostgreSQL, gone after down; nothing on the
/// other backends.
async fn the_browse_migration_indexes_occurred_at_with_brin_on_postgres(t: &TestDb) {
    Migrator::up(&t.db, None).await.expect("up");
    let sql = match t.db.get_database_backend() {
        DbBackend::Postgres => format!(
            "SELECT COUNT(*) FROM pg_indexes WHERE schemaname = '{}' \
                 AND indexname = 'outbox_events_occurred_brin' AND indexdef LIKE '%USING brin (occurred_at)%'",
            t.name
        ),
        DbBackend::MySql => format!(
            "SELECT COUNT(*) FROM information_schema.statistics WHERE table_schema = '{}' \
                 AND index_name = 'outbox_events_occurred_brin'",
            t.name
        ),
        _ => "SELECT COUNT(*) FROM sqlite_master WHERE name = 'outbox_events_occurred_brin'"
            .to_owned(),
    };
    let brin = || t.scalar(&sql);
    let want = i64::from(t.db.get_database_backend() == DbBackend::Postgres);
    assert_eq!(brin().await, want);
    Migrator::down(&t.db, Some(1)).await.expect("down one");
    assert_eq!(brin().await, 0);
    Migrator::up(&t.db, None).await.expect("up again");
    assert_eq!(brin().await, want);
}
