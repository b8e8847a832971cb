//! `outbox_log_dead_letters`: what the log relay gave up on, written, listed, replayed and
//! discarded. There is no outbox row to mark for a message-mode event, so it is kept here.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, Statement, TransactionSession, TransactionTrait, Value};
use seaorm_outbox_entity::OutboxStatus;
use uuid::Uuid;

use super::logical::emit;
use super::sql::stmt;
use crate::error::{Error, Result};
use crate::event::{OutboxEvent, headers_from_json};

const PG: DbBackend = DbBackend::Postgres;

/// A record the log relay gave up on: an event the broker refused, or a message it could not
/// read. There is no outbox row to mark, so it is kept here.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct LogDeadLetter {
    /// The event's id, or a fresh one for a message that could not be read.
    pub id: Uuid,
    /// The event, if it could be read.
    pub event: Option<OutboxEvent>,
    /// What could not be read, as text (lossy), when `event` is `None`.
    pub raw: Option<String>,
    /// The slot it came from.
    pub slot: String,
    /// Why it was given up.
    pub error: String,
    /// Delivery attempts made.
    pub attempts: u32,
    /// When.
    pub failed_at: DateTime<Utc>,
}

const DEAD_COLUMNS: &str = "id, slot, event_type, aggregate_type, aggregate_id, payload, headers, \
     occurred_at, committed_at, raw, error, attempts, failed_at";

#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn dead_letter(db: &impl ConnectionTrait, d: &LogDeadLetter) -> Result<()> {
    let e = d.event.as_ref();
    let headers = e.map(|e| {
        serde_json::Value::Object(
            e.headers
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect(),
        )
    });
    let values: Vec<Value> = vec![
        d.id.into(),
        d.slot.clone().into(),
        e.map(|e| e.event_type.clone()).into(),
        e.map(|e| e.aggregate_type.clone()).into(),
        e.map(|e| e.aggregate_id.clone()).into(),
        Value::Json(e.map(|e| Box::new(e.payload.clone()))),
        Value::Json(headers.map(Box::new)),
        e.map(|e| e.occurred_at).into(),
        e.map(|e| e.created_at).into(),
        d.raw.clone().into(),
        d.error.clone().into(),
        i32::try_from(d.attempts).unwrap_or(i32::MAX).into(),
        d.failed_at.into(),
    ];
    // A redelivered range (after a crash) dead-letters the same event again: keep the first.
    let sql = format!(
        "INSERT INTO outbox_log_dead_letters ({DEAD_COLUMNS}) VALUES ({}) ON CONFLICT (id) DO NOTHING",
        vec!["?"; 13].join(", ")
    );
    db.execute_raw(stmt(PG, &sql, values)).await?;
    Ok(())
}

fn read_dead(r: &sea_orm::QueryResult) -> Result<LogDeadLetter> {
    let id: Uuid = r.try_get("", "id")?;
    let event_type: Option<String> = r.try_get("", "event_type")?;
    let event = match event_type {
        None => None,
        Some(event_type) => {
            let headers: Option<serde_json::Value> = r.try_get("", "headers")?;
            let created_at: DateTime<Utc> = r.try_get("", "committed_at")?;
            Some(OutboxEvent {
                id,
                event_type,
                aggregate_type: r.try_get("", "aggregate_type")?,
                aggregate_id: r.try_get("", "aggregate_id")?,
                payload: r
                    .try_get::<Option<serde_json::Value>>("", "payload")?
                    .unwrap_or_default(),
                headers: headers_from_json(headers.unwrap_or_else(|| serde_json::json!({})))
                    .map_err(|e| Error::CorruptRow {
                        id,
                        reason: e.to_string(),
                        source: Some(Box::new(e)),
                    })?,
                occurred_at: r.try_get("", "occurred_at")?,
                created_at,
                status: OutboxStatus::Failed,
                attempts: 0,
                last_error: None,
                next_attempt_at: created_at,
                published_at: None,
                failed_at: None,
                locked_by: None,
                deliver_at: None,
                expires_at: None,
            })
        }
    };
    let attempts: i32 = r.try_get("", "attempts")?;
    let failed_at: DateTime<Utc> = r.try_get("", "failed_at")?;
    let error: String = r.try_get("", "error")?;
    Ok(LogDeadLetter {
        id,
        event: event.map(|mut e| {
            e.attempts = attempts.max(0) as u32;
            e.last_error = Some(error.clone());
            e.failed_at = Some(failed_at);
            e
        }),
        raw: r.try_get("", "raw")?,
        slot: r.try_get("", "slot")?,
        error,
        attempts: attempts.max(0) as u32,
        failed_at,
    })
}

#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn dead_letters(
    db: &impl ConnectionTrait,
    limit: u64,
    offset: u64,
) -> Result<Vec<LogDeadLetter>> {
    let sql = format!(
        "SELECT {DEAD_COLUMNS} FROM outbox_log_dead_letters ORDER BY failed_at, id LIMIT ? OFFSET ?"
    );
    let rows = db
        .query_all_raw(stmt(PG, &sql, vec![limit.into(), offset.into()]))
        .await?;
    rows.iter().map(read_dead).collect()
}

/// One dead letter by id.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn dead_letter_by_id(
    db: &impl ConnectionTrait,
    id: Uuid,
) -> Result<Option<LogDeadLetter>> {
    let sql = format!("SELECT {DEAD_COLUMNS} FROM outbox_log_dead_letters WHERE id = ?");
    let row = db.query_one_raw(stmt(PG, &sql, vec![id.into()])).await?;
    row.as_ref().map(read_dead).transpose()
}

#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn count_dead_letters(db: &impl ConnectionTrait) -> Result<u64> {
    let row = db
        .query_one_raw(Statement::from_string(
            PG,
            "SELECT count(*) AS n FROM outbox_log_dead_letters",
        ))
        .await?;
    Ok(row
        .map(|r| r.try_get::<i64>("", "n"))
        .transpose()?
        .unwrap_or(0)
        .max(0) as u64)
}

/// Removes one dead letter; whether it existed.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn discard_dead_letter(db: &impl ConnectionTrait, id: Uuid) -> Result<bool> {
    let r = db
        .execute_raw(stmt(
            PG,
            "DELETE FROM outbox_log_dead_letters WHERE id = ?",
            vec![id.into()],
        ))
        .await?;
    Ok(r.rows_affected() > 0)
}

/// Sends dead letters back through the log: in one transaction each row is deleted and its
/// event written again as a message, so the relay delivers it as new; `None` replays all.
/// A message that could not be read has no event to send, and is refused by id.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn replay_dead_letters<C: ConnectionTrait + TransactionTrait>(
    db: &C,
    prefix: &str,
    only: Option<Uuid>,
) -> Result<u64> {
    let txn = db.begin().await?;
    let rows = match only {
        Some(id) => {
            txn.query_all_raw(stmt(
                PG,
                &format!(
                    "SELECT {DEAD_COLUMNS} FROM outbox_log_dead_letters WHERE id = ? FOR UPDATE"
                ),
                vec![id.into()],
            ))
            .await?
        }
        None => {
            txn.query_all_raw(Statement::from_string(
                PG,
                format!(
                    "SELECT {DEAD_COLUMNS} FROM outbox_log_dead_letters \
                     WHERE event_type IS NOT NULL ORDER BY committed_at, id FOR UPDATE"
                ),
            ))
            .await?
        }
    };
    if let Some(id) = only
        && rows.is_empty()
    {
        return Err(Error::NotFound { id });
    }
    let mut n = 0;
    for r in &rows {
        let d = read_dead(r)?;
        let Some(e) = d.event else {
            return Err(Error::CorruptRow {
                id: d.id,
                reason: format!(
                    "it was never readable ({}); there is no event to replay, discard it instead",
                    d.error
                ),
                source: None,
            });
        };
        let content = e.to_envelope().map_err(|err| Error::CorruptRow {
            id: d.id,
            reason: err.to_string(),
            source: Some(Box::new(err)),
        })?;
        emit(&txn, prefix, vec![content]).await?;
        discard_dead_letter(&txn, d.id).await?;
        n += 1;
    }
    txn.commit().await?;
    Ok(n)
}
