//! `outbox_relays`: each running relay's heartbeat row, upserted by the relay and read by
//! operators. MySQL's upsert is in [`mysql`](super::mysql).

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, Value};

use super::mysql;
use super::sql::stmt;
use crate::error::Result;

/// One relay's row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Heartbeat {
    pub(crate) name: String,
    pub(crate) publisher: String,
    pub(crate) started_at: DateTime<Utc>,
    pub(crate) heartbeat_at: DateTime<Utc>,
    /// `closed`, `open` or `half_open`.
    pub(crate) breaker: String,
    pub(crate) unavailable_since: Option<DateTime<Utc>>,
    pub(crate) last_error: Option<String>,
    /// The owner token of a relay that takes a share of the owned partitions (this row is then
    /// its ownership's lease); `None` otherwise.
    pub(crate) claims: Option<String>,
}

const COLUMNS: &str =
    "name, publisher, started_at, heartbeat_at, breaker, unavailable_since, last_error";

/// PostgreSQL and SQLite; `started_at` stays as first written.
const UPSERT: &str = "INSERT INTO outbox_relays (name, publisher, started_at, heartbeat_at, \
     breaker, unavailable_since, last_error, claims) VALUES (?, ?, ?, ?, ?, ?, ?, ?) \
     ON CONFLICT (name) DO UPDATE SET publisher = excluded.publisher, \
     heartbeat_at = excluded.heartbeat_at, breaker = excluded.breaker, \
     unavailable_since = excluded.unavailable_since, last_error = excluded.last_error, \
     claims = excluded.claims";

/// Writes `h`, and drops the rows of relays silent since before `forget_before` (crashed
/// relays never delete their own).
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn beat(
    db: &impl ConnectionTrait,
    h: &Heartbeat,
    forget_before: DateTime<Utc>,
) -> Result<()> {
    let backend = db.get_database_backend();
    let upsert = match backend {
        DbBackend::MySql => mysql::UPSERT_HEARTBEAT,
        _ => UPSERT,
    };
    let values: Vec<Value> = vec![
        h.name.clone().into(),
        h.publisher.clone().into(),
        h.started_at.into(),
        h.heartbeat_at.into(),
        h.breaker.clone().into(),
        h.unavailable_since.into(),
        h.last_error.clone().into(),
        h.claims.clone().into(),
    ];
    db.execute_raw(stmt(backend, upsert, values)).await?;
    delete(db, "heartbeat_at < ?", forget_before.into()).await
}

/// Removes relay `name`'s row, when it stops.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn forget(db: &impl ConnectionTrait, name: &str) -> Result<()> {
    delete(db, "name = ?", name.into()).await
}

/// Deletes the rows matching `condition`, which binds `value`.
async fn delete(db: &impl ConnectionTrait, condition: &str, value: Value) -> Result<()> {
    let backend = db.get_database_backend();
    let sql = format!("DELETE FROM outbox_relays WHERE {condition}");
    db.execute_raw(stmt(backend, &sql, vec![value])).await?;
    Ok(())
}

/// The relays heard from since `since`, by name.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn heard_since(
    db: &impl ConnectionTrait,
    since: DateTime<Utc>,
) -> Result<Vec<Heartbeat>> {
    let backend = db.get_database_backend();
    let rows = db
        .query_all_raw(stmt(
            backend,
            &format!("SELECT {COLUMNS} FROM outbox_relays WHERE heartbeat_at >= ? ORDER BY name"),
            vec![since.into()],
        ))
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Heartbeat {
                name: r.try_get("", "name")?,
                publisher: r.try_get("", "publisher")?,
                started_at: r.try_get("", "started_at")?,
                heartbeat_at: r.try_get("", "heartbeat_at")?,
                breaker: r.try_get("", "breaker")?,
                unavailable_since: r.try_get("", "unavailable_since")?,
                last_error: r.try_get("", "last_error")?,
                claims: None,
            })
        })
        .collect()
}

/// How many relays taking a share of the owned partitions were heard from since `since`.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn partition_relays_since(
    db: &impl ConnectionTrait,
    since: DateTime<Utc>,
) -> Result<Vec<String>> {
    let backend = db.get_database_backend();
    let rows = db
        .query_all_raw(stmt(
            backend,
            "SELECT name FROM outbox_relays WHERE heartbeat_at >= ? AND claims IS NOT NULL",
            vec![since.into()],
        ))
        .await?;
    rows.iter().map(|r| Ok(r.try_get_by_index(0)?)).collect()
}
