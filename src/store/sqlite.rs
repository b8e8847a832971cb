//! SQLite: one writer at a time, so a claim is a single `UPDATE … SET locked_by, locked_until,
//! next_attempt_at WHERE id IN (SELECT …) RETURNING …`, atomic without locks. A claimed row is
//! simply "not due" to everyone else; write-backs are conditional on `locked_by = token`.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, QueryResult, Value};

use super::claim::{Claim, Claimed};
use super::rows::{CLAIMED_COLUMNS, read_claimed};
use super::sql::stmt;
use crate::error::Result;

/// Claims a batch: see the module docs and [`super::claim`].
pub(super) async fn claim(db: &DatabaseConnection, c: &Claim<'_>) -> Result<Claimed> {
    let limit = i64::from(c.limit);
    let mut values: Vec<Value> = vec![c.token.into(), c.lease_end.into(), c.lease_end.into()];
    let ids = if c.ordered {
        // No LATERAL, so a plain join of the heads' aggregates, oldest first.
        values.extend([c.now.into(), limit.into(), c.now.into(), limit.into()]);
        format!(
            "WITH heads AS ({}) \
             SELECT f.id FROM outbox_events f JOIN heads h \
               ON f.aggregate_type = h.aggregate_type AND f.aggregate_id = h.aggregate_id \
             WHERE f.status = 'pending'{} ORDER BY f.occurred_at, f.id LIMIT ?",
            c.heads("", "", ""),
            Claim::not_scheduled_yet("f.")
        )
    } else {
        values.extend([c.now.into(), limit.into()]);
        "SELECT id FROM outbox_events WHERE status = 'pending' AND next_attempt_at <= ? \
         ORDER BY next_attempt_at, id LIMIT ?"
            .to_owned()
    };
    let sql = format!(
        "UPDATE outbox_events SET locked_by = ?, locked_until = ?, next_attempt_at = ? \
         WHERE id IN ({ids}) RETURNING {CLAIMED_COLUMNS}"
    );
    let rows = db
        .query_all_raw(stmt(DbBackend::Sqlite, &sql, values))
        .await?;
    Ok(Claimed {
        rows: read_claimed(&rows, c.token),
        walked: c.ordered,
    })
}

/// An aggregate of times (`MIN(occurred_at)`) comes back as the stored text.
pub(super) fn time_column(row: &QueryResult, col: &str) -> Result<Option<DateTime<Utc>>> {
    let text: Option<String> = row.try_get("", col)?;
    Ok(text.and_then(|t| {
        DateTime::parse_from_rfc3339(&t)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }))
}
