//! `inbox_consumers`: each running consumer process's heartbeat row, upserted by the consumer
//! and read by operators. As `outbox_relays` does for relays.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, Value};
use serde::Serialize;

use super::sql::stmt;
use crate::error::Result;

/// One consumer process as it last reported itself.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct ConsumerHeartbeat {
    /// The consumer's name (its inbox scope).
    pub consumer: String,
    /// Which process: `host:pid:run`.
    pub instance: String,
    /// Its source's broker, e.g. `nats`.
    pub broker: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it last wrote its row.
    pub heartbeat_at: DateTime<Utc>,
    /// Messages applied since it started.
    pub applied: u64,
    /// Duplicates skipped since it started.
    pub duplicates: u64,
    /// Messages dead-lettered since it started.
    pub dead_lettered: u64,
    /// Failed handler attempts that were retried, since it started.
    pub retries: u64,
    /// Applied per minute over its last heartbeat interval.
    pub applied_per_min: f64,
    /// Duplicates per minute over its last heartbeat interval.
    pub duplicates_per_min: f64,
    /// Dead letters per minute over its last heartbeat interval.
    pub dead_lettered_per_min: f64,
    /// Messages it held: received and not yet settled (running, batching, or queued behind
    /// their key).
    pub held: u64,
    /// How long its oldest message waiting for a handler had waited, in seconds; `None` when
    /// none waited. It sees only what it received: the broker's backlog not yet delivered is
    /// the broker's figure.
    pub lag_secs: Option<f64>,
}

const COLUMNS: &str = "consumer, instance, broker, started_at, heartbeat_at, applied, \
     duplicates, dead_lettered, retries, applied_per_min, duplicates_per_min, \
     dead_lettered_per_min, held, lag_secs";

const UPDATES: [&str; 11] = [
    "broker",
    "heartbeat_at",
    "applied",
    "duplicates",
    "dead_lettered",
    "retries",
    "applied_per_min",
    "duplicates_per_min",
    "dead_lettered_per_min",
    "held",
    "lag_secs",
];

/// The upsert on `backend`; `started_at` stays as first written.
fn upsert(backend: DbBackend) -> String {
    let (conflict, set): (&str, Vec<String>) = match backend {
        DbBackend::MySql => (
            "ON DUPLICATE KEY UPDATE",
            UPDATES
                .iter()
                .map(|c| format!("{c} = VALUES({c})"))
                .collect(),
        ),
        _ => (
            "ON CONFLICT (consumer, instance) DO UPDATE SET",
            UPDATES
                .iter()
                .map(|c| format!("{c} = excluded.{c}"))
                .collect(),
        ),
    };
    format!(
        "INSERT INTO inbox_consumers ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         {conflict} {}",
        set.join(", ")
    )
}

fn int(n: u64) -> Value {
    i64::try_from(n).unwrap_or(i64::MAX).into()
}

/// Writes `h`, and drops the rows of consumers silent since before `forget_before` (a crashed
/// consumer never deletes its own).
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn beat(
    db: &impl ConnectionTrait,
    h: &ConsumerHeartbeat,
    forget_before: DateTime<Utc>,
) -> Result<()> {
    let backend = db.get_database_backend();
    let values: Vec<Value> = vec![
        h.consumer.clone().into(),
        h.instance.clone().into(),
        h.broker.clone().into(),
        h.started_at.into(),
        h.heartbeat_at.into(),
        int(h.applied),
        int(h.duplicates),
        int(h.dead_lettered),
        int(h.retries),
        h.applied_per_min.into(),
        h.duplicates_per_min.into(),
        h.dead_lettered_per_min.into(),
        int(h.held),
        h.lag_secs.into(),
    ];
    db.execute_raw(stmt(backend, &upsert(backend), values))
        .await?;
    db.execute_raw(stmt(
        backend,
        "DELETE FROM inbox_consumers WHERE heartbeat_at < ?",
        vec![forget_before.into()],
    ))
    .await?;
    Ok(())
}

/// Removes one process's row, when it stops.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn forget(
    db: &impl ConnectionTrait,
    consumer: &str,
    instance: &str,
) -> Result<()> {
    let backend = db.get_database_backend();
    db.execute_raw(stmt(
        backend,
        "DELETE FROM inbox_consumers WHERE consumer = ? AND instance = ?",
        vec![consumer.into(), instance.into()],
    ))
    .await?;
    Ok(())
}

/// The consumer processes heard from since `since`, by consumer then instance.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn heard_since(
    db: &impl ConnectionTrait,
    since: DateTime<Utc>,
) -> Result<Vec<ConsumerHeartbeat>> {
    let backend = db.get_database_backend();
    let rows = db
        .query_all_raw(stmt(
            backend,
            &format!(
                "SELECT {COLUMNS} FROM inbox_consumers WHERE heartbeat_at >= ? \
                 ORDER BY consumer, instance"
            ),
            vec![since.into()],
        ))
        .await?;
    let count = |r: &sea_orm::QueryResult, c: &str| -> Result<u64> {
        let n: i64 = r.try_get("", c)?;
        Ok(u64::try_from(n).unwrap_or(0))
    };
    rows.iter()
        .map(|r| {
            Ok(ConsumerHeartbeat {
                consumer: r.try_get("", "consumer")?,
                instance: r.try_get("", "instance")?,
                broker: r.try_get("", "broker")?,
                started_at: r.try_get("", "started_at")?,
                heartbeat_at: r.try_get("", "heartbeat_at")?,
                applied: count(r, "applied")?,
                duplicates: count(r, "duplicates")?,
                dead_lettered: count(r, "dead_lettered")?,
                retries: count(r, "retries")?,
                applied_per_min: r.try_get("", "applied_per_min")?,
                duplicates_per_min: r.try_get("", "duplicates_per_min")?,
                dead_lettered_per_min: r.try_get("", "dead_lettered_per_min")?,
                held: count(r, "held")?,
                lag_secs: r.try_get("", "lag_secs")?,
            })
        })
        .collect()
}
