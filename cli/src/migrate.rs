//! `seaorm-outbox migrate`: the library's migrations for a user with no `migration` crate of
//! their own (the binary installed, or the library added as a dependency).
//!
//! This is the migration crate's standalone `Migrator`, recorded in its own table,
//! `seaorm_outbox_migrations`, as `sea-orm-cli migrate -d migration` in a clone records it: a
//! host app's `seaql_migrations` also holds the app's own versions, which sea-orm-migration would
//! report here as "applied but missing". A database a host app's migrator set up is adopted:
//! the first run copies the library's versions from `seaql_migrations` (the same names), so
//! nothing runs twice.

use clap::Subcommand;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, TransactionTrait};
use sea_orm_migration::MigratorTrait;
use seaorm_outbox_migration::{MIGRATION_TABLE as TABLE, Migrator};

use crate::{CliResult, Failure, parse_count};
/// Where a host app's `Migrator` and `sea-orm-cli` record theirs.
const SHARED_TABLE: &str = "seaql_migrations";

#[derive(Clone, Subcommand)]
pub(crate) enum MigrateCommand {
    /// Apply the pending migrations (all, or the next N).
    Up {
        #[arg(short = 'n', long = "num", value_name = "N")]
        num: Option<String>,
    },
    /// Roll back the last N applied migrations (one unless told).
    Down {
        #[arg(short = 'n', long = "num", value_name = "N", default_value = "1")]
        num: String,
    },
    /// Each migration and whether it is applied.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) async fn run(
    db: &DatabaseConnection,
    schema: Option<&str>,
    cmd: MigrateCommand,
) -> CliResult {
    match cmd {
        MigrateCommand::Status { json } => status(db, json).await,
        MigrateCommand::Up { num } => {
            let steps = num.map(|n| parse_steps(&n)).transpose()?;
            if let (Some(schema), DbBackend::Postgres) = (schema, db.get_database_backend()) {
                // The connection's search path names it; it need not exist yet.
                db.execute_unprepared(&format!(
                    "CREATE SCHEMA IF NOT EXISTS \"{}\"",
                    schema.replace('"', "\"\"")
                ))
                .await?;
            }
            adopt(db).await?;
            let before = applied(db).await?;
            Migrator::up(db, steps).await.map_err(failed)?;
            report(db, &before, "applied").await
        }
        MigrateCommand::Down { num } => {
            let steps = parse_steps(&num)?;
            adopt(db).await?;
            let before = applied(db).await?;
            Migrator::down(db, Some(steps)).await.map_err(failed)?;
            report(db, &before, "rolled back").await
        }
    }
}

fn parse_steps(n: &str) -> CliResult<u32> {
    let n = parse_count("--num", n)?;
    u32::try_from(n).map_err(|_| Failure::input(format!("--num {n} is too large")))
}

fn failed(e: sea_orm::DbErr) -> Failure {
    Failure::from(format!("migration failed: {e}"))
}

/// Prints the versions whose state changed since `before`.
async fn report(db: &DatabaseConnection, before: &[String], verb: &str) -> CliResult {
    let after = applied(db).await?;
    let changed: Vec<&String> = after
        .iter()
        .filter(|v| !before.contains(v))
        .chain(before.iter().filter(|v| !after.contains(v)))
        .collect();
    if changed.is_empty() {
        out!("nothing {verb}: {} of {} applied", after.len(), total());
    } else {
        for v in &changed {
            out!("{verb} {v}");
        }
        out!("{} of {} applied", after.len(), total());
    }
    Ok(())
}

fn total() -> usize {
    Migrator::migrations().len()
}

async fn status(db: &DatabaseConnection, json: bool) -> CliResult {
    let applied = applied(db).await?;
    let rows: Vec<(String, bool)> = Migrator::migrations()
        .iter()
        .map(|m| {
            let v = m.name().to_owned();
            let done = applied.contains(&v);
            (v, done)
        })
        .collect();
    if json {
        let list: Vec<serde_json::Value> = rows
            .iter()
            .map(|(v, done)| serde_json::json!({ "version": v, "applied": done }))
            .collect();
        out!("{}", serde_json::Value::Array(list));
    } else {
        for (v, done) in &rows {
            out!("{v}  {}", if *done { "applied" } else { "pending" });
        }
    }
    Ok(())
}

/// The library's versions recorded as applied: in [`TABLE`], or, before this command first ran
/// on the database, in [`SHARED_TABLE`]. Reads only.
async fn applied(db: &DatabaseConnection) -> CliResult<Vec<String>> {
    for table in [TABLE, SHARED_TABLE] {
        if has_table(db, table).await? {
            return ours_in(db, table).await;
        }
    }
    Ok(Vec::new())
}

/// The library's versions recorded in `table`, oldest first.
async fn ours_in(db: &DatabaseConnection, table: &str) -> CliResult<Vec<String>> {
    let ours: Vec<String> = Migrator::migrations()
        .iter()
        .map(|m| m.name().to_owned())
        .collect();
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            format!("SELECT version FROM {table} ORDER BY version"),
        ))
        .await?;
    let mut out = Vec::new();
    for row in rows {
        let v: String = row.try_get_by_index(0)?;
        if ours.contains(&v) {
            out.push(v);
        }
    }
    Ok(out)
}

/// On the first run against a database migrated by a host app's `Migrator` or `sea-orm-cli`,
/// records their versions of the library's migrations in [`TABLE`].
async fn adopt(db: &DatabaseConnection) -> CliResult {
    if has_table(db, TABLE).await? || !has_table(db, SHARED_TABLE).await? {
        return Ok(());
    }
    let versions = ours_in(db, SHARED_TABLE).await?;
    // One transaction where DDL is transactional (PostgreSQL, SQLite): a run cut short leaves
    // no empty table that would make the next one apply everything again.
    let txn = db.begin().await?;
    Migrator::install(&txn).await?;
    if !versions.is_empty() {
        copy_versions(&txn, versions).await?;
    }
    txn.commit().await?;
    Ok(())
}

async fn copy_versions(db: &impl ConnectionTrait, versions: Vec<String>) -> CliResult {
    let b = db.get_database_backend();
    let placeholders: Vec<String> = (1..=versions.len())
        .map(|i| match b {
            DbBackend::Postgres => format!("${i}"),
            _ => "?".to_owned(),
        })
        .collect();
    db.execute_raw(Statement::from_sql_and_values(
        b,
        format!(
            "INSERT INTO {TABLE} (version, applied_at) SELECT version, applied_at \
             FROM {SHARED_TABLE} WHERE version IN ({})",
            placeholders.join(", ")
        ),
        versions.into_iter().map(sea_orm::Value::from),
    ))
    .await?;
    Ok(())
}

/// Whether `table` exists where the connection's unqualified names resolve (sea-orm-migration's
/// `has_table` needs driver features this binary leaves to sea-orm).
async fn has_table(db: &DatabaseConnection, table: &str) -> CliResult<bool> {
    let b = db.get_database_backend();
    let sql = match b {
        DbBackend::Postgres => {
            "SELECT COUNT(*) FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_name = $1"
        }
        DbBackend::MySql => {
            "SELECT COUNT(*) FROM information_schema.tables \
             WHERE table_schema = DATABASE() AND table_name = ?"
        }
        _ => "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?",
    };
    let row = db
        .query_one_raw(Statement::from_sql_and_values(b, sql, [table.into()]))
        .await?;
    let n: i64 = match row {
        Some(r) => r.try_get_by_index(0)?,
        None => 0,
    };
    Ok(n > 0)
}
