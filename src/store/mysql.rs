//! MySQL 8 / MariaDB 10.6+: a row lease (`locked_by`, `locked_until`) taken in a short READ
//! COMMITTED transaction of `SELECT … FOR UPDATE SKIP LOCKED` then `UPDATE`, since there is no
//! `UPDATE … RETURNING` and no `LIMIT` inside an `IN` subquery.

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, IsolationLevel, TransactionTrait};
use sea_orm::{QueryResult, Value};
use uuid::Uuid;

use super::claim::{Claim, Claimed};
use super::rows::{CLAIMED_COLUMNS, read_claimed};
use super::sql::{placeholders, stmt};
use crate::error::Result;

const MY: DbBackend = DbBackend::MySql;

/// `DELETE … LIMIT` in place of the portable `id IN (SELECT … LIMIT)`, which MySQL refuses.
pub(super) const PURGE_PUBLISHED: &str = "DELETE FROM outbox_events WHERE status = 'published' AND published_at < ? \
     ORDER BY published_at LIMIT ?";

/// `ON DUPLICATE KEY UPDATE` in place of the portable `ON CONFLICT … DO UPDATE`.
pub(super) const UPSERT_HEARTBEAT: &str = "INSERT INTO outbox_relays (name, publisher, \
     started_at, heartbeat_at, breaker, unavailable_since, last_error, claims) \
     VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON DUPLICATE KEY UPDATE publisher = VALUES(publisher), \
     heartbeat_at = VALUES(heartbeat_at), breaker = VALUES(breaker), \
     unavailable_since = VALUES(unavailable_since), last_error = VALUES(last_error), \
     claims = VALUES(claims)";

/// `ON DUPLICATE KEY UPDATE` in place of the portable tally upsert: adds `?` events to minute
/// `?`'s row of `outbox_published_tally`.
pub(super) const UPSERT_TALLY: &str = "INSERT INTO outbox_published_tally (minute, events) \
     VALUES (?, ?) ON DUPLICATE KEY UPDATE events = events + VALUES(events)";

/// `ON DUPLICATE KEY UPDATE` in place of the portable backlog-sample upsert.
pub(super) const UPSERT_SAMPLE: &str = "INSERT INTO outbox_backlog_samples (minute, pending, \
     failed) VALUES (?, ?, ?) ON DUPLICATE KEY UPDATE pending = VALUES(pending), \
     failed = VALUES(failed)";

/// Claims a batch: see the module docs and [`super::claim`]. Under per-aggregate order it
/// locks up to `limit` heads, then reads their aggregates' pending events in order; nobody
/// else can claim those followers while their head is pending.
pub(super) async fn claim(db: &DatabaseConnection, c: &Claim<'_>) -> Result<Claimed> {
    let limit = i64::from(c.limit);
    // READ COMMITTED: no gap locks, so claims never block writers' inserts.
    let txn = db
        .begin_with_config(Some(IsolationLevel::ReadCommitted), None)
        .await?;
    let rows = if c.ordered {
        // A locking read does not lock its subquery's rows, so the head check sees every
        // earlier pending event, locked or not.
        let heads = txn
            .query_all_raw(stmt(
                MY,
                &c.heads(" FOR UPDATE SKIP LOCKED", "", ""),
                vec![c.now.into(), limit.into()],
            ))
            .await?;
        if heads.is_empty() {
            Vec::new()
        } else {
            txn.query_all_raw(followers(&heads, c.now, limit)?).await?
        }
    } else {
        txn.query_all_raw(stmt(
            MY,
            &format!(
                "SELECT {CLAIMED_COLUMNS} FROM outbox_events \
                 WHERE status = 'pending' AND next_attempt_at <= ? \
                 ORDER BY next_attempt_at, id LIMIT ? FOR UPDATE SKIP LOCKED"
            ),
            vec![c.now.into(), limit.into()],
        ))
        .await?
    };
    let mut claimed = read_claimed(&rows, c.token);
    let ids: Vec<Uuid> = claimed
        .iter()
        .filter_map(|r| match r {
            Ok(e) => Some(e.id),
            Err((id, _)) => *id,
        })
        .collect();
    if !ids.is_empty() {
        let mut values: Vec<Value> = vec![c.token.into(), c.lease_end.into(), c.lease_end.into()];
        values.extend(ids.iter().map(|id| Value::from(*id)));
        txn.execute_raw(stmt(
            MY,
            &format!(
                "UPDATE outbox_events SET locked_by = ?, locked_until = ?, next_attempt_at = ? \
                 WHERE id IN ({})",
                placeholders(ids.len())
            ),
            values,
        ))
        .await?;
        for e in claimed.iter_mut().flatten() {
            e.next_attempt_at = c.lease_end;
        }
    }
    txn.commit().await?;
    Ok(Claimed {
        rows: claimed,
        walked: c.ordered,
    })
}

/// The pending events of the aggregates `heads` leads, oldest first, at most `limit`.
fn followers(
    heads: &[QueryResult],
    now: chrono::DateTime<chrono::Utc>,
    limit: i64,
) -> Result<sea_orm::Statement> {
    let mut values: Vec<Value> = Vec::with_capacity(heads.len() * 2 + 1);
    let mut keys = Vec::with_capacity(heads.len());
    for h in heads {
        values.push(h.try_get::<String>("", "aggregate_type")?.into());
        values.push(h.try_get::<String>("", "aggregate_id")?.into());
        keys.push("(aggregate_type = ? AND aggregate_id = ?)");
    }
    values.extend([now.into(), limit.into()]);
    Ok(stmt(
        MY,
        &format!(
            "SELECT {CLAIMED_COLUMNS} FROM outbox_events \
             WHERE status = 'pending' AND ({}){} ORDER BY occurred_at, id LIMIT ?",
            keys.join(" OR "),
            Claim::not_scheduled_yet("")
        ),
        values,
    ))
}
