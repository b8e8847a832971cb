//! Scheduled events: cancelling and rescheduling one that no relay can have read yet.
//!
//! Relays under owned partitions read due rows without locking them, so a row can be taken back
//! only while it is not due by any relay's clock: its time must be more than
//! [`SCHEDULE_MARGIN`] ahead of the caller's clock when the statement runs.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, Value};
use seaorm_outbox_entity::OutboxStatus;
use uuid::Uuid;

use super::sql::stmt;
use crate::error::{Error, Result};

/// How long before its time a scheduled event can still be cancelled or rescheduled: the 1 s
/// of clock skew the relays allow writers, plus 1 s for the statement to reach the database.
pub const SCHEDULE_MARGIN: std::time::Duration = std::time::Duration::from_secs(2);

/// A scheduled event that nobody has attempted and no relay holds, not due within the margin
/// (binds that bound). One that holds its aggregate is read by a relay at once and handed back
/// until its time, so its `next_attempt_at` says nothing: a relay never sends an event before
/// its `deliver_at`, so the margin on that is enough.
const UNTOUCHED: &str = "status = 'pending' AND deliver_at IS NOT NULL AND attempts = 0 \
     AND (next_attempt_at = deliver_at OR holds_aggregate) AND locked_by IS NULL \
     AND deliver_at > ?";

fn bound(now: DateTime<Utc>) -> DateTime<Utc> {
    now + chrono::Duration::from_std(SCHEDULE_MARGIN).unwrap_or_default()
}

/// Deletes scheduled event `id`, or says why it cannot.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn cancel(db: &impl ConnectionTrait, id: Uuid, now: DateTime<Utc>) -> Result<()> {
    let b = db.get_database_backend();
    let done = db
        .execute_raw(stmt(
            b,
            &format!("DELETE FROM outbox_events WHERE id = ? AND {UNTOUCHED}"),
            vec![id.into(), bound(now).into()],
        ))
        .await?;
    if done.rows_affected() == 1 {
        return Ok(());
    }
    Err(why_not(db, id, "cancelled").await?)
}

/// Moves scheduled event `id` to `at` (not in the past), or says why it cannot.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn reschedule(
    db: &impl ConnectionTrait,
    id: Uuid,
    at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<()> {
    let b = db.get_database_backend();
    let at = at.max(now);
    let done = db
        .execute_raw(stmt(
            b,
            &format!(
                // One that holds its aggregate is never made due later than it is: the relay
                // must read it to learn of it (and hands it back until `deliver_at` anyway).
                "UPDATE outbox_events SET next_attempt_at = CASE \
                   WHEN holds_aggregate AND next_attempt_at < ? THEN next_attempt_at ELSE ? END, \
                 deliver_at = ? WHERE id = ? AND {UNTOUCHED}"
            ),
            vec![
                at.into(),
                at.into(),
                at.into(),
                id.into(),
                bound(now).into(),
            ],
        ))
        .await?;
    if done.rows_affected() == 1 {
        return Ok(());
    }
    Err(why_not(db, id, "rescheduled").await?)
}

/// The error for an event the conditional statement did not change.
async fn why_not(db: &impl ConnectionTrait, id: Uuid, operation: &'static str) -> Result<Error> {
    let b = db.get_database_backend();
    let row = db
        .query_one_raw(stmt(
            b,
            "SELECT status, deliver_at, attempts, next_attempt_at, locked_by, holds_aggregate \
             FROM outbox_events WHERE id = ?",
            vec![Value::from(id)],
        ))
        .await?;
    let Some(r) = row else {
        return Ok(Error::NotFound { id });
    };
    let status: String = r.try_get_by_index(0)?;
    let deliver_at: Option<DateTime<Utc>> = r.try_get_by_index(1)?;
    let attempts: i32 = r.try_get_by_index(2)?;
    let next: DateTime<Utc> = r.try_get_by_index(3)?;
    let locked: Option<String> = r.try_get_by_index(4)?;
    let holds: bool = r.try_get_by_index(5)?;
    let status = match status.as_str() {
        "published" => Some(OutboxStatus::Published),
        "failed" => Some(OutboxStatus::Failed),
        _ => None,
    };
    if let Some(status) = status {
        return Ok(Error::InvalidState {
            id,
            status,
            operation: if operation == "cancelled" {
                "cancel"
            } else {
                "reschedule"
            },
        });
    }
    let reason = match deliver_at {
        None => "it was not scheduled (NewEvent::deliver_at)",
        Some(_) if locked.is_some() => "a relay holds it right now; try again in a moment",
        Some(at) if attempts > 0 || (next != at && !holds) => {
            "a relay has already attempted it or handed it back"
        }
        Some(_) => "it is due, or due within 2 s, and a relay may already be sending it",
    };
    Ok(Error::NotScheduled {
        id,
        operation,
        reason,
    })
}
