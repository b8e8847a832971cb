//! Every SQL statement the library sends, behind one backend-neutral interface.
//!
//! [`repository`](crate::repository), [`stats`](crate::stats) and [`relay`](crate::relay) call
//! the functions here and never write SQL of their own. What differs per backend lives in one
//! file each, so auditing what the library sends to MariaDB means reading `mysql.rs` and the
//! portable statements every backend shares:
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | this interface; it picks the backend's implementation |
//! | [`portable`] | the insert, listings, single-event state changes, counts, the purge |
//! | [`browse`] | events filtered for an operator; the per-minute history for the dashboard |
//! | [`claim`] | a claim's parameters and result, and the per-aggregate head test |
//! | [`write_back`] | a batch's outcomes written back, one statement per kind |
//! | [`heartbeats`] | each running relay's row in `outbox_relays` |
//! | [`inbox`] | the consumer side: `inbox_messages` and `inbox_dead_letters` |
//! | [`inbox_batch`] | a batch's inbox record in one statement, and its undo |
//! | [`consumers`] | each running consumer process's row in `inbox_consumers` |
//! | [`logical`] | message mode's write; the log relay's slot, publication, peek, advance |
//! | [`log_dead_letters`] | the log relay's dead letters |
//! | [`pgoutput`] | decoding the records a logical slot returns |
//! | [`partitions`] | owned partitions: `outbox_partitions`, the owner's claim and write-back |
//! | [`postgres`] | batch lease rows, the claim cursor's scan, the sqlx row decoder |
//! | [`mysql`] | `FOR UPDATE SKIP LOCKED` row leases, `DELETE … LIMIT` |
//! | [`sqlite`] | one `UPDATE … RETURNING` claim, timestamps stored as text |
//! | [`rows`] | rows into [`OutboxEvent`](crate::OutboxEvent)s |
//! | [`sql`] | `?` placeholders renumbered for PostgreSQL |
//!
//! No claim transaction ever spans the broker call.

mod browse;
mod claim;
pub(crate) mod consumers;
mod heartbeats;
pub(crate) mod inbox;
pub(crate) mod inbox_batch;
#[cfg(feature = "postgres")]
pub(crate) mod log_dead_letters;
#[cfg(feature = "postgres")]
pub(crate) mod logical;
mod mysql;
pub(crate) mod partitions;
#[cfg(feature = "postgres")]
mod pgoutput;
mod portable;
mod postgres;
mod rows;
pub(crate) mod schedule;
#[cfg(feature = "postgres")]
pub(crate) mod schemas;
#[cfg(feature = "postgres")]
pub(crate) mod slots;
mod sql;
mod sqlite;
mod write_back;

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend};
use uuid::Uuid;

use crate::error::{Error, Result};

pub use browse::{EventCursor, EventOrder, EventPage, EventQuery, MinuteStats};
pub(crate) use browse::{events, events_page, history, record_sample};
pub(crate) use claim::{Claim, Claimed, DueKey};
pub(crate) use heartbeats::{Heartbeat, beat, forget, heard_since, partition_relays_since};
pub use inbox::{DeadLetters, InboxDeadLetter, MAX_INBOX_KEY_CHARS};
#[cfg(feature = "postgres")]
pub use log_dead_letters::LogDeadLetter;
#[cfg(feature = "postgres")]
pub(crate) use pgoutput::{Lsn, Record, decode as decode_pgoutput};
pub(crate) use portable::{
    count, count_published_before, discard, failed, get, insert, mark_failed, mark_published,
    pending, requeue, statuses,
};
#[cfg(feature = "postgres")]
pub(crate) use postgres::{current_schema as pg_current_schema, pool as pg_pool};
pub(crate) use rows::ClaimedRow;
pub use schedule::SCHEDULE_MARGIN;
#[cfg(feature = "postgres")]
pub use slots::{InvalidWalPosition, SlotStatus, WalPosition};
pub use write_back::OnPublish;
pub(crate) use write_back::{Fate, WriteBack};

/// Largest `limit` accepted by the listing calls and the purge's batch; larger is
/// [`Error::LimitTooLarge`].
pub const MAX_PAGE_SIZE: u64 = 10_000;

/// Stored error messages are cut to this many bytes (at a character boundary) plus a marker, so
/// a 10 MB stack trace costs no more than a short one.
pub const MAX_ERROR_BYTES: usize = 4096;

/// Events per `INSERT`; keeps each statement under every backend's bind-parameter limit.
pub const INSERT_CHUNK: usize = 1000;

/// Which dead letters a requeue puts back.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Requeue<'a> {
    Id(Uuid),
    All,
    /// `(aggregate_type, aggregate_id)`.
    Aggregate(&'a str, &'a str),
}

/// The counts behind a stats snapshot.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    pub(crate) due: u64,
    pub(crate) backoff: u64,
    pub(crate) leased: u64,
    pub(crate) failed: u64,
    pub(crate) oldest_pending_at: Option<DateTime<Utc>>,
    pub(crate) scheduled: u64,
    pub(crate) next_scheduled_at: Option<DateTime<Utc>>,
    pub(crate) published_since: u64,
}

/// `Ok` if `limit` is at most [`MAX_PAGE_SIZE`].
pub(crate) fn check_page(limit: u64) -> Result<()> {
    if limit > MAX_PAGE_SIZE {
        return Err(Error::LimitTooLarge {
            requested: limit,
            max: MAX_PAGE_SIZE,
        });
    }
    Ok(())
}

/// `Ok` if a purge's `batch` is between 1 and [`MAX_PAGE_SIZE`]: 0 would never finish.
pub(crate) fn check_batch(batch: u64) -> Result<()> {
    if batch == 0 || batch > MAX_PAGE_SIZE {
        return Err(Error::LimitTooLarge {
            requested: batch,
            max: MAX_PAGE_SIZE,
        });
    }
    Ok(())
}

/// Cuts `message` to [`MAX_ERROR_BYTES`] at a character boundary, saying how much was cut.
pub(crate) fn truncate_error(message: &str) -> String {
    if message.len() <= MAX_ERROR_BYTES {
        return message.to_owned();
    }
    let mut end = MAX_ERROR_BYTES;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}… [truncated; {} bytes in all]",
        &message[..end],
        message.len()
    )
}

/// Deletes at most `batch_size` published events older than `older_than`, oldest first, in one
/// statement, and the deleted-on-publish tally's minutes before then; returns how many events.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn purge_published_batch(
    db: &impl ConnectionTrait,
    older_than: DateTime<Utc>,
    batch_size: u64,
) -> Result<u64> {
    check_batch(batch_size)?;
    let backend = db.get_database_backend();
    let template = match backend {
        DbBackend::MySql => mysql::PURGE_PUBLISHED,
        _ => portable::PURGE_PUBLISHED,
    };
    let values = vec![
        older_than.into(),
        i64::try_from(batch_size).unwrap_or(0).into(),
    ];
    let res = db.execute_raw(sql::stmt(backend, template, values)).await?;
    // The deleted-on-publish tally ages out with the rows (a few rows per hour, on its key).
    db.execute_raw(sql::stmt(
        backend,
        "DELETE FROM outbox_published_tally WHERE minute < ?",
        vec![write_back::minute(older_than).into()],
    ))
    .await?;
    Ok(res.rows_affected())
}

/// The counts for a snapshot at `at`, with three indexed queries (pending rows; dead letters and
/// the published rows since `published_since`; the deleted-on-publish tally since then);
/// published history is never scanned.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn counts(
    db: &impl ConnectionTrait,
    at: DateTime<Utc>,
    published_since: DateTime<Utc>,
) -> Result<Counts> {
    let backend = db.get_database_backend();
    let (pending_sql, binds) = match backend {
        DbBackend::Postgres => (
            std::borrow::Cow::Owned(postgres::pending_counts_sql()),
            postgres::PENDING_COUNTS_BINDS,
        ),
        _ => (
            std::borrow::Cow::Borrowed(portable::PENDING_COUNTS),
            portable::PENDING_COUNTS_BINDS,
        ),
    };
    let pending = db
        .query_one_raw(sql::stmt(backend, &pending_sql, vec![at.into(); binds]))
        .await?;
    let totals = db
        .query_one_raw(sql::stmt(
            backend,
            portable::FAILED_AND_RECENT,
            vec![published_since.into()],
        ))
        .await?;
    // Events deleted on publish: their minutes' tallies (at most 61 rows), to the minute.
    let tallied = db
        .query_all_raw(sql::stmt(
            backend,
            "SELECT events FROM outbox_published_tally WHERE minute >= ?",
            vec![published_since.into()],
        ))
        .await?
        .iter()
        .map(|r| r.try_get_by_index::<i64>(0))
        .sum::<std::result::Result<i64, _>>()?;
    let int = |row: &Option<sea_orm::QueryResult>, col: &str| -> Result<u64> {
        Ok(match row {
            Some(r) => u64::try_from(r.try_get::<i64>("", col)?).unwrap_or(0),
            None => 0,
        })
    };
    let time = |col: &str| -> Result<Option<DateTime<Utc>>> {
        Ok(match (&pending, backend) {
            (None, _) => None,
            (Some(r), DbBackend::Sqlite) => sqlite::time_column(r, col)?,
            (Some(r), _) => r.try_get("", col)?,
        })
    };
    Ok(Counts {
        due: int(&pending, "due")?,
        backoff: int(&pending, "backoff")?,
        leased: int(&pending, "leased")?,
        failed: int(&totals, "failed")?,
        oldest_pending_at: time("oldest")?,
        scheduled: int(&pending, "scheduled")?,
        next_scheduled_at: time("next_scheduled")?,
        published_since: int(&totals, "recent")? + u64::try_from(tallied).unwrap_or(0),
    })
}

/// Claims up to `claim.limit` due events, oldest due first, under a lease for `claim.token`.
///
/// Under per-aggregate order it finds aggregate *heads* — due events with no earlier pending
/// event (nor, when dead letters hold, dead letter) of their aggregate — and takes each head's
/// aggregate's next pending events, a prefix per aggregate. Nobody else can claim those
/// followers while their head is pending, so the prefix is ours to send in order. On PostgreSQL
/// each head adds at most `claim.share` events and heads are looked for only until the batch is
/// full; elsewhere each head's share is an even split of the batch.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn claim(db: &DatabaseConnection, c: &Claim<'_>) -> Result<Claimed> {
    match db.get_database_backend() {
        DbBackend::Postgres => postgres::claim(db, c).await,
        DbBackend::MySql => mysql::claim(db, c).await,
        _ => sqlite::claim(db, c).await,
    }
}

/// Writes every fate back with at most one statement per kind, all conditional on the batch's
/// lease still being `token`'s.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn write_back(
    db: &DatabaseConnection,
    token: &str,
    now: DateTime<Utc>,
    fates: &[(Uuid, Fate)],
    on_publish: OnPublish,
) -> Result<WriteBack> {
    match db.get_database_backend() {
        DbBackend::Postgres => postgres::write_back(db, token, now, fates, on_publish).await,
        _ => {
            let guard = write_back::Guard::RowLease(token);
            write_back::guarded(db, guard, now, fates, on_publish).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_respects_char_boundaries() {
        let msg = "é".repeat(MAX_ERROR_BYTES); // 2 bytes each
        let cut = truncate_error(&msg);
        assert!(cut.len() < MAX_ERROR_BYTES + 64);
        assert!(cut.ends_with(&format!("{} bytes in all]", msg.len())));
        assert_eq!(truncate_error("short"), "short");
    }
}
