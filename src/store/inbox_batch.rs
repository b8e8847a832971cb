//! The inbox record for a batch of messages in one statement, and its undo for the ones whose
//! handler failed.
//!
//! PostgreSQL and SQLite return the keys they inserted (`ON CONFLICT DO NOTHING RETURNING`).
//! MySQL has no `RETURNING`: `INSERT IGNORE` reports only how many rows it inserted, which
//! tells "all new" apart from "some existed" but not which. The second case (a redelivery
//! racing, a concurrent consumer instance) is [`Batch::Unknown`]: the caller rolls back and
//! records the batch row by row, where each row's count is exact.
//!
//! On PostgreSQL `ON CONFLICT` costs a speculative insertion per row (about a third of the
//! record's price); a plain `INSERT` does the same uniqueness check for less. So while
//! duplicates are rare the caller asks for [`Check::Optimistic`]: a plain insert, and a
//! unique violation is [`Batch::Unknown`] (roll back, record again with `ON CONFLICT`).

use std::collections::HashSet;

use sea_orm::{ConnectionTrait, DbBackend, SqlErr, Value};

use super::inbox::{Received, check_len};
use super::sql::stmt;
use crate::error::Result;

/// Rows per statement: under every backend's limit of bound values (6 per row).
pub(crate) const MAX_BATCH_ROWS: usize = 1000;

/// What a multi-row record found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Batch {
    /// These message ids were new and are now recorded; the others were there already.
    New(HashSet<String>),
    /// Some ids existed, and this backend cannot say which: roll back, record one by one.
    Unknown,
}

/// How a multi-row record finds the ids recorded before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    /// Each row skips an existing key (`ON CONFLICT DO NOTHING`, `INSERT IGNORE`).
    Exact,
    /// PostgreSQL: a plain insert; any existing key fails the statement, and with it the
    /// transaction ([`Batch::Unknown`]). Elsewhere the same as `Exact`.
    Optimistic,
}

/// Records every row of `rows` (one consumer, distinct ids, at most [`MAX_BATCH_ROWS`]) unless
/// its key exists. Never commits.
#[tracing::instrument(level = "debug", skip_all, fields(rows = rows.len()), err(level = "debug"))]
pub(crate) async fn record_many(
    db: &impl ConnectionTrait,
    rows: &[Received<'_>],
    check: Check,
) -> Result<Batch> {
    if rows.is_empty() {
        return Ok(Batch::New(HashSet::new()));
    }
    let mut values: Vec<Value> = Vec::with_capacity(rows.len() * 6);
    for r in rows {
        check_len("consumer", r.consumer)?;
        check_len("message_id", r.message_id)?;
        values.extend(r.values());
    }
    let tuples = vec!["(?, ?, ?, ?, ?, ?)"; rows.len()].join(", ");
    let columns =
        "inbox_messages (consumer, message_id, source, position, received_at, processed_at)";
    let backend = db.get_database_backend();
    if backend == DbBackend::MySql {
        let sql = format!("INSERT IGNORE INTO {columns} VALUES {tuples}");
        let res = db.execute_raw(stmt(backend, &sql, values)).await?;
        return Ok(if res.rows_affected() == rows.len() as u64 {
            Batch::New(rows.iter().map(|r| r.message_id.to_owned()).collect())
        } else {
            Batch::Unknown
        });
    }
    if backend == DbBackend::Postgres && check == Check::Optimistic {
        let sql = format!("INSERT INTO {columns} VALUES {tuples}");
        return match db.execute_raw(stmt(backend, &sql, values)).await {
            Ok(_) => Ok(Batch::New(
                rows.iter().map(|r| r.message_id.to_owned()).collect(),
            )),
            Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
                Ok(Batch::Unknown)
            }
            Err(e) => Err(e.into()),
        };
    }
    let sql = format!(
        "INSERT INTO {columns} VALUES {tuples} ON CONFLICT (consumer, message_id) DO NOTHING \
         RETURNING message_id"
    );
    let inserted = db.query_all_raw(stmt(backend, &sql, values)).await?;
    let mut new = HashSet::with_capacity(inserted.len());
    for row in inserted {
        new.insert(row.try_get::<String>("", "message_id")?);
    }
    Ok(Batch::New(new))
}

/// Deletes `consumer`'s records of `ids` in the caller's transaction: the rows of messages whose
/// handler failed inside a batch that commits without them.
#[tracing::instrument(level = "debug", skip_all, fields(ids = ids.len()), err(level = "debug"))]
pub(crate) async fn unrecord(
    db: &impl ConnectionTrait,
    consumer: &str,
    ids: &[&str],
) -> Result<()> {
    for chunk in ids.chunks(MAX_BATCH_ROWS) {
        let backend = db.get_database_backend();
        let sql = format!(
            "DELETE FROM inbox_messages WHERE consumer = ? AND message_id IN ({})",
            super::sql::placeholders(chunk.len())
        );
        let mut values: Vec<Value> = vec![consumer.into()];
        values.extend(chunk.iter().map(|id| Value::from(*id)));
        db.execute_raw(stmt(backend, &sql, values)).await?;
    }
    Ok(())
}
