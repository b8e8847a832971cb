//! `inbox_messages` and `inbox_dead_letters`: the consumer side's statements.
//!
//! The record is insert-first: the primary key `(consumer, message_id)` decides between a new
//! message and a duplicate, with no `SELECT` before the `INSERT` and no lock held beyond the
//! caller's transaction. MySQL spells "insert unless the key exists" `INSERT IGNORE`, which
//! also downgrades truncation to a warning, so every value is length-checked before it is sent.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, QueryResult, Value};
use uuid::Uuid;

use super::sql::stmt;
use super::{check_batch, check_page};
use crate::error::{Error, Result};

/// The longest consumer name, message id, ordering key, source or position stored (characters
/// of the `VARCHAR(255)` columns).
pub const MAX_INBOX_KEY_CHARS: usize = 255;

/// One message's inbox row.
#[derive(Clone, Debug)]
pub(crate) struct Received<'a> {
    pub(crate) consumer: &'a str,
    pub(crate) message_id: &'a str,
    pub(crate) source: Option<&'a str>,
    pub(crate) position: Option<&'a str>,
    pub(crate) received_at: DateTime<Utc>,
    pub(crate) processed_at: DateTime<Utc>,
}

impl Received<'_> {
    /// The row's values, in the column order every record statement lists.
    pub(super) fn values(&self) -> [Value; 6] {
        [
            self.consumer.into(),
            self.message_id.into(),
            fit(self.source).into(),
            fit(self.position).into(),
            self.received_at.into(),
            self.processed_at.into(),
        ]
    }
}

/// A message a consumer gave up on, kept with everything needed to apply it later.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct InboxDeadLetter {
    /// This dead letter's own id (a message without an id still gets one).
    pub id: Uuid,
    /// The consumer that failed.
    pub consumer: String,
    /// The message's id, when it had one.
    pub message_id: Option<String>,
    /// The ordering key it carried.
    pub ordering_key: Option<String>,
    /// Where it came from: topic, subject, queue or stream.
    pub source: Option<String>,
    /// Its position there: partition and offset, stream sequence or entry id.
    pub position: Option<String>,
    /// Its headers, in order.
    pub headers: Vec<(String, String)>,
    /// Its body, as received.
    pub payload: Vec<u8>,
    /// Why it failed, last attempt's error.
    pub error: String,
    /// Handler attempts spent (0: it never reached the handler).
    pub attempts: u32,
    /// When the consumer first received it.
    pub received_at: DateTime<Utc>,
    /// When it was dead-lettered (last).
    pub failed_at: DateTime<Utc>,
    /// Set while a replay is requested and not yet picked up by a running consumer.
    pub replay_requested_at: Option<DateTime<Utc>>,
}

/// Which dead letters an operation applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadLetters<'a> {
    /// One, by its [`InboxDeadLetter::id`].
    Id(Uuid),
    /// Every one of this consumer's.
    Consumer(&'a str),
    /// Every one.
    All,
}

/// `Err` unless `value` fits its column.
pub(crate) fn check_len(field: &'static str, value: &str) -> Result<()> {
    let len = value.chars().count();
    if value.trim().is_empty() {
        return Err(Error::InvalidInboxKey {
            field,
            reason: "must not be empty".into(),
        });
    }
    if len > MAX_INBOX_KEY_CHARS {
        return Err(Error::InvalidInboxKey {
            field,
            reason: format!("is {len} characters; the maximum is {MAX_INBOX_KEY_CHARS}"),
        });
    }
    if value.contains('\0') {
        return Err(Error::InvalidInboxKey {
            field,
            reason: "must not contain the NUL character".into(),
        });
    }
    Ok(())
}

/// Optional metadata is cut to fit rather than refused: it describes, it does not decide.
fn fit(value: Option<&str>) -> Option<String> {
    value.map(|v| {
        v.replace('\0', "")
            .chars()
            .take(MAX_INBOX_KEY_CHARS)
            .collect()
    })
}

/// Inserts `r` unless its key exists; `true` when it was new. Inside the caller's transaction,
/// a concurrent insert of the same key waits for that transaction and then counts as existing.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn record(db: &impl ConnectionTrait, r: &Received<'_>) -> Result<bool> {
    check_len("consumer", r.consumer)?;
    check_len("message_id", r.message_id)?;
    let backend = db.get_database_backend();
    let sql = match backend {
        DbBackend::MySql => {
            "INSERT IGNORE INTO inbox_messages (consumer, message_id, source, position, \
             received_at, processed_at) VALUES (?, ?, ?, ?, ?, ?)"
        }
        _ => {
            "INSERT INTO inbox_messages (consumer, message_id, source, position, received_at, \
             processed_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (consumer, message_id) DO NOTHING"
        }
    };
    let res = db
        .execute_raw(stmt(backend, sql, r.values().to_vec()))
        .await?;
    Ok(res.rows_affected() == 1)
}

/// Whether `consumer` has applied `message_id`.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn processed(
    db: &impl ConnectionTrait,
    consumer: &str,
    message_id: &str,
) -> Result<bool> {
    let backend = db.get_database_backend();
    let row = db
        .query_one_raw(stmt(
            backend,
            "SELECT 1 AS hit FROM inbox_messages WHERE consumer = ? AND message_id = ?",
            vec![consumer.into(), message_id.into()],
        ))
        .await?;
    Ok(row.is_some())
}

/// Deletes at most `batch` rows processed before `older_than`, oldest first, in one statement
/// on the `processed_at` index; returns how many.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn purge_processed(
    db: &impl ConnectionTrait,
    older_than: DateTime<Utc>,
    batch: u64,
) -> Result<u64> {
    check_batch(batch)?;
    let backend = db.get_database_backend();
    let sql = match backend {
        DbBackend::MySql => {
            "DELETE FROM inbox_messages WHERE processed_at < ? ORDER BY processed_at LIMIT ?"
        }
        _ => {
            "DELETE FROM inbox_messages WHERE (consumer, message_id) IN (SELECT consumer, \
             message_id FROM inbox_messages WHERE processed_at < ? ORDER BY processed_at LIMIT ?)"
        }
    };
    let values = vec![older_than.into(), i64::try_from(batch).unwrap_or(0).into()];
    Ok(db
        .execute_raw(stmt(backend, sql, values))
        .await?
        .rows_affected())
}

/// How many messages `consumer` (or every consumer) has recorded.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn count_processed(
    db: &impl ConnectionTrait,
    consumer: Option<&str>,
) -> Result<u64> {
    count(db, "inbox_messages", consumer).await
}

/// How many dead letters `consumer` (or every consumer) has.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn count_dead_letters(
    db: &impl ConnectionTrait,
    consumer: Option<&str>,
) -> Result<u64> {
    count(db, "inbox_dead_letters", consumer).await
}

async fn count(db: &impl ConnectionTrait, table: &str, consumer: Option<&str>) -> Result<u64> {
    let backend = db.get_database_backend();
    let (filter, values): (&str, Vec<Value>) = match consumer {
        Some(c) => (" WHERE consumer = ?", vec![c.into()]),
        None => ("", vec![]),
    };
    let sql = format!("SELECT COUNT(*) AS n FROM {table}{filter}");
    let row = db.query_one_raw(stmt(backend, &sql, values)).await?;
    Ok(match row {
        Some(r) => u64::try_from(r.try_get::<i64>("", "n")?).unwrap_or(0),
        None => 0,
    })
}

const DEAD_LETTER_COLUMNS: &str = "id, consumer, message_id, ordering_key, source, position, \
     headers, payload, error, attempts, received_at, failed_at, replay_requested_at";

/// The most bytes of headers JSON kept: MySQL's `TEXT` holds 65,535.
const MAX_HEADERS_JSON: usize = 60_000;

/// The headers as JSON, the leading ones that fit [`MAX_HEADERS_JSON`]: like the other
/// metadata, they describe the message and are cut rather than refused, and `INSERT IGNORE`
/// must never meet a value its column would truncate.
fn headers_json(headers: &[(String, String)]) -> String {
    let mut keep = headers.len();
    loop {
        let json = serde_json::to_string(&headers[..keep]).unwrap_or_else(|_| "[]".into());
        if json.len() <= MAX_HEADERS_JSON || keep == 0 {
            return json;
        }
        keep -= 1;
    }
}

/// The namespace of [`dead_letter_id`]'s UUIDv5s.
const DEAD_LETTER_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_2a54_8e0b_4d6e_9a3f_51c7_d2e8_b401);

/// A dead letter's id, derived from what identifies the message to its consumer, so a message
/// the broker redelivers after it was dead-lettered maps to the same row: its message id; else
/// where it sat in its source (a stream sequence, an entry id, a partition and offset); else,
/// for a broker with no stable position, its bytes. UUIDv5 (SHA-1), stable across versions and
/// processes.
pub(crate) fn dead_letter_id(
    consumer: &str,
    message_id: Option<&str>,
    source: &str,
    position: Option<&str>,
    headers: &[(String, String)],
    payload: &[u8],
) -> Uuid {
    let mut name = Vec::with_capacity(64 + payload.len());
    name.extend_from_slice(consumer.as_bytes());
    name.push(0);
    match (message_id, position) {
        (Some(id), _) => {
            name.extend_from_slice(b"id\0");
            name.extend_from_slice(id.as_bytes());
        }
        (None, Some(position)) => {
            name.extend_from_slice(b"at\0");
            name.extend_from_slice(source.as_bytes());
            name.push(0);
            name.extend_from_slice(position.as_bytes());
        }
        (None, None) => {
            name.extend_from_slice(b"bytes\0");
            name.extend_from_slice(source.as_bytes());
            for (k, v) in headers {
                name.push(0);
                name.extend_from_slice(k.as_bytes());
                name.push(0);
                name.extend_from_slice(v.as_bytes());
            }
            name.push(0);
            name.extend_from_slice(payload);
        }
    }
    Uuid::new_v5(&DEAD_LETTER_NAMESPACE, &name)
}

/// Stores a dead letter unless one with its id exists; `true` when it was new. With ids from
/// [`dead_letter_id`], a redelivered message that was dead-lettered already adds nothing.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn insert_dead_letter(
    db: &impl ConnectionTrait,
    d: &InboxDeadLetter,
) -> Result<bool> {
    let backend = db.get_database_backend();
    let headers = headers_json(&d.headers);
    let values: Vec<Value> = vec![
        d.id.into(),
        d.consumer.clone().into(),
        fit(d.message_id.as_deref()).into(),
        fit(d.ordering_key.as_deref()).into(),
        fit(d.source.as_deref()).into(),
        fit(d.position.as_deref()).into(),
        headers.into(),
        d.payload.clone().into(),
        super::truncate_error(&d.error).into(),
        i64::from(d.attempts).into(),
        d.received_at.into(),
        d.failed_at.into(),
        d.replay_requested_at.into(),
    ];
    let marks = super::sql::placeholders(values.len());
    let sql = match backend {
        // Every value was fitted to its column above, so IGNORE only skips the duplicate key.
        DbBackend::MySql => {
            format!(
                "INSERT IGNORE INTO inbox_dead_letters ({DEAD_LETTER_COLUMNS}) VALUES ({marks})"
            )
        }
        _ => format!(
            "INSERT INTO inbox_dead_letters ({DEAD_LETTER_COLUMNS}) VALUES ({marks}) \
             ON CONFLICT (id) DO NOTHING"
        ),
    };
    let res = db.execute_raw(stmt(backend, &sql, values)).await?;
    Ok(res.rows_affected() == 1)
}

/// Whether a dead letter with this id exists.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn dead_letter_exists(db: &impl ConnectionTrait, id: Uuid) -> Result<bool> {
    let backend = db.get_database_backend();
    let row = db
        .query_one_raw(stmt(
            backend,
            "SELECT 1 AS hit FROM inbox_dead_letters WHERE id = ?",
            vec![id.into()],
        ))
        .await?;
    Ok(row.is_some())
}

/// A replayed dead letter failed again: its row takes the new error and attempt count.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn refail_dead_letter(
    db: &impl ConnectionTrait,
    id: Uuid,
    error: &str,
    attempts: u32,
    failed_at: DateTime<Utc>,
) -> Result<()> {
    let backend = db.get_database_backend();
    db.execute_raw(stmt(
        backend,
        "UPDATE inbox_dead_letters SET error = ?, attempts = attempts + ?, failed_at = ?, \
         replay_requested_at = NULL WHERE id = ?",
        vec![
            super::truncate_error(error).into(),
            i64::from(attempts).into(),
            failed_at.into(),
            id.into(),
        ],
    ))
    .await?;
    Ok(())
}

fn selector(which: DeadLetters<'_>) -> (&'static str, Vec<Value>) {
    match which {
        DeadLetters::Id(id) => ("id = ?", vec![id.into()]),
        DeadLetters::Consumer(c) => ("consumer = ?", vec![c.into()]),
        DeadLetters::All => ("1 = 1", vec![]),
    }
}

/// Dead letters, oldest failure first, optionally one consumer's.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn dead_letters(
    db: &impl ConnectionTrait,
    which: DeadLetters<'_>,
    limit: u64,
    offset: u64,
) -> Result<Vec<InboxDeadLetter>> {
    check_page(limit)?;
    let backend = db.get_database_backend();
    let (filter, mut values) = selector(which);
    values.push(i64::try_from(limit).unwrap_or(0).into());
    values.push(i64::try_from(offset).unwrap_or(i64::MAX).into());
    let sql = format!(
        "SELECT {DEAD_LETTER_COLUMNS} FROM inbox_dead_letters WHERE {filter} \
         ORDER BY failed_at, id LIMIT ? OFFSET ?"
    );
    let rows = db.query_all_raw(stmt(backend, &sql, values)).await?;
    rows.iter().map(dead_letter).collect()
}

/// Asks the running consumers to apply these dead letters again; returns how many were marked.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn request_replay(
    db: &impl ConnectionTrait,
    which: DeadLetters<'_>,
    at: DateTime<Utc>,
) -> Result<u64> {
    let backend = db.get_database_backend();
    let (filter, values) = selector(which);
    let mut all: Vec<Value> = vec![at.into()];
    all.extend(values);
    let sql = format!("UPDATE inbox_dead_letters SET replay_requested_at = ? WHERE {filter}");
    Ok(db
        .execute_raw(stmt(backend, &sql, all))
        .await?
        .rows_affected())
}

/// Deletes these dead letters; returns how many.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn discard(db: &impl ConnectionTrait, which: DeadLetters<'_>) -> Result<u64> {
    let backend = db.get_database_backend();
    let (filter, values) = selector(which);
    let sql = format!("DELETE FROM inbox_dead_letters WHERE {filter}");
    Ok(db
        .execute_raw(stmt(backend, &sql, values))
        .await?
        .rows_affected())
}

/// Takes up to `limit` of `consumer`'s replay requests. Each is taken by clearing its request
/// with a conditional `UPDATE`, so of several consumers polling at once exactly one takes it.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn take_replays(
    db: &impl ConnectionTrait,
    consumer: &str,
    limit: u64,
) -> Result<Vec<InboxDeadLetter>> {
    check_page(limit)?;
    let backend = db.get_database_backend();
    let sql = format!(
        "SELECT {DEAD_LETTER_COLUMNS} FROM inbox_dead_letters WHERE consumer = ? \
         AND replay_requested_at IS NOT NULL ORDER BY failed_at, id LIMIT ?"
    );
    let rows = db
        .query_all_raw(stmt(
            backend,
            &sql,
            vec![consumer.into(), i64::try_from(limit).unwrap_or(0).into()],
        ))
        .await?;
    let mut taken = Vec::with_capacity(rows.len());
    for row in &rows {
        let d = dead_letter(row)?;
        let res = db
            .execute_raw(stmt(
                backend,
                "UPDATE inbox_dead_letters SET replay_requested_at = NULL \
                 WHERE id = ? AND replay_requested_at IS NOT NULL",
                vec![d.id.into()],
            ))
            .await?;
        if res.rows_affected() == 1 {
            taken.push(d);
        }
    }
    Ok(taken)
}

fn dead_letter(r: &QueryResult) -> Result<InboxDeadLetter> {
    let id: Uuid = r.try_get("", "id")?;
    let headers: String = r.try_get("", "headers")?;
    let headers = serde_json::from_str(&headers).map_err(|e| Error::CorruptRow {
        id,
        reason: format!("inbox dead letter headers: {e}"),
        source: Some(Box::new(e)),
    })?;
    Ok(InboxDeadLetter {
        id,
        consumer: r.try_get("", "consumer")?,
        message_id: r.try_get("", "message_id")?,
        ordering_key: r.try_get("", "ordering_key")?,
        source: r.try_get("", "source")?,
        position: r.try_get("", "position")?,
        headers,
        payload: r.try_get("", "payload")?,
        error: r.try_get("", "error")?,
        attempts: u32::try_from(r.try_get::<i32>("", "attempts")?).unwrap_or(0),
        received_at: r.try_get("", "received_at")?,
        failed_at: r.try_get("", "failed_at")?,
        replay_requested_at: r.try_get("", "replay_requested_at")?,
    })
}
