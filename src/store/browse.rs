//! What an operator browses: events filtered by status, type, aggregate and time, and the
//! per-minute history behind the dashboard's chart (`outbox_backlog_samples`, the published
//! rows and `outbox_published_tally`).

use chrono::{DateTime, TimeDelta, Utc};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    Value,
};
use seaorm_outbox_entity::{OutboxEventColumn as Col, OutboxEvents, OutboxStatus};
use serde::Serialize;

use super::mysql;
use super::sql::stmt;
use super::write_back::minute;
use crate::error::Result;
use crate::event::OutboxEvent;

/// Which events a listing returns: every filter set must match. Built with chained setters;
/// the default is every event, newest first, 50 to a page.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EventQuery {
    /// Only events in this status.
    pub status: Option<OutboxStatus>,
    /// Only events of this exact type.
    pub event_type: Option<String>,
    /// Only events of this aggregate type.
    pub aggregate_type: Option<String>,
    /// Only events of this aggregate id (with or without `aggregate_type`).
    pub aggregate_id: Option<String>,
    /// Only events that occurred at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only events that occurred before this time.
    pub until: Option<DateTime<Utc>>,
    /// Oldest first instead of newest first.
    pub oldest_first: bool,
    /// Only events still scheduled for later (pending, `deliver_at` after now), soonest
    /// `deliver_at` first (`oldest_first` does not apply). Reads every pending row: a page of
    /// scheduled events costs about what [`OutboxStats`](crate::OutboxStats) does.
    pub scheduled: bool,
    /// Page size, at most [`MAX_PAGE_SIZE`](super::MAX_PAGE_SIZE). Default 50.
    pub limit: u64,
    /// Events to skip.
    pub offset: u64,
}

impl Default for EventQuery {
    fn default() -> Self {
        Self {
            status: None,
            event_type: None,
            aggregate_type: None,
            aggregate_id: None,
            since: None,
            until: None,
            oldest_first: false,
            scheduled: false,
            limit: 50,
            offset: 0,
        }
    }
}

impl EventQuery {
    setters! {
        /// Sets [`status`](Self::status).
        status: Option<OutboxStatus>,
        /// Sets [`event_type`](Self::event_type).
        event_type: Option<String>,
        /// Sets [`aggregate_type`](Self::aggregate_type).
        aggregate_type: Option<String>,
        /// Sets [`aggregate_id`](Self::aggregate_id).
        aggregate_id: Option<String>,
        /// Sets [`since`](Self::since).
        since: Option<DateTime<Utc>>,
        /// Sets [`until`](Self::until).
        until: Option<DateTime<Utc>>,
        /// Sets [`oldest_first`](Self::oldest_first).
        oldest_first: bool,
        /// Sets [`scheduled`](Self::scheduled).
        scheduled: bool,
        /// Sets [`limit`](Self::limit).
        limit: u64,
        /// Sets [`offset`](Self::offset).
        offset: u64,
    }
}

/// The events `q` picks, a page of them, ordered by `occurred_at` then id.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn events(db: &impl ConnectionTrait, q: &EventQuery) -> Result<Vec<OutboxEvent>> {
    super::check_page(q.limit)?;
    let mut query = OutboxEvents::find();
    if let Some(s) = q.status {
        query = query.filter(Col::Status.eq(s));
    }
    if let Some(t) = &q.event_type {
        query = query.filter(Col::EventType.eq(t.as_str()));
    }
    if let Some(t) = &q.aggregate_type {
        query = query.filter(Col::AggregateType.eq(t.as_str()));
    }
    if let Some(id) = &q.aggregate_id {
        query = query.filter(Col::AggregateId.eq(id.as_str()));
    }
    if let Some(t) = q.since {
        query = query.filter(Col::OccurredAt.gte(t));
    }
    if let Some(t) = q.until {
        query = query.filter(Col::OccurredAt.lt(t));
    }
    let dir = if q.oldest_first {
        sea_orm::Order::Asc
    } else {
        sea_orm::Order::Desc
    };
    query = if q.scheduled {
        query
            .filter(Col::Status.eq(OutboxStatus::Pending))
            .filter(Col::DeliverAt.gt(crate::event::now()))
            .order_by(Col::DeliverAt, sea_orm::Order::Asc)
            .order_by(Col::Id, sea_orm::Order::Asc)
    } else {
        query
            .order_by(Col::OccurredAt, dir.clone())
            .order_by(Col::Id, dir)
    };
    query
        .limit(q.limit)
        .offset(q.offset)
        .all(db)
        .await?
        .into_iter()
        .map(OutboxEvent::try_from)
        .collect()
}

/// One minute of the outbox's history.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct MinuteStats {
    /// The minute's start.
    pub minute: DateTime<Utc>,
    /// Events published in the minute: rows marked published then, plus the deleted-on-publish
    /// tally.
    pub published: u64,
    /// The backlog (pending events) a relay sampled in the minute; `None` when no relay with
    /// gauges on ran then.
    pub pending: Option<u64>,
    /// The dead letters sampled with `pending`.
    pub failed: Option<u64>,
}

/// The `minutes` whole minutes up to and including `now`'s, oldest first. Reads one range
/// count of the published index per minute, and the tally's and the samples' rows of those
/// minutes.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn history(
    db: &impl ConnectionTrait,
    now: DateTime<Utc>,
    minutes: u32,
) -> Result<Vec<MinuteStats>> {
    let backend = db.get_database_backend();
    let last = minute(now);
    let first = last - TimeDelta::minutes(i64::from(minutes.max(1)) - 1);
    let mut out: Vec<MinuteStats> = (0..minutes.max(1))
        .map(|i| MinuteStats {
            minute: first + TimeDelta::minutes(i64::from(i)),
            ..MinuteStats::default()
        })
        .collect();
    let len = out.len();
    let index = |at: DateTime<Utc>| -> Option<usize> {
        usize::try_from((at - first).num_minutes())
            .ok()
            .filter(|&i| i < len)
    };

    // One indexed range COUNT per minute, in one statement: portable (no date truncation per
    // backend), and each reads only its minute of the published index. Measured on PostgreSQL
    // with a million publications in the hour: 72 ms, against 930 ms for one scan of the hour
    // with a CASE per minute.
    let counts: Vec<String> = (0..out.len())
        .map(|i| {
            format!(
                "(SELECT COUNT(*) FROM outbox_events WHERE status = 'published' \
                 AND published_at >= ? AND published_at < ?) AS m{i}"
            )
        })
        .collect();
    let sql = format!("SELECT {}", counts.join(", "));
    let mut values: Vec<Value> = Vec::with_capacity(out.len() * 2);
    for m in &out {
        values.push(m.minute.into());
        values.push((m.minute + TimeDelta::minutes(1)).into());
    }
    if let Some(row) = db.query_one_raw(stmt(backend, &sql, values)).await? {
        for (i, m) in out.iter_mut().enumerate() {
            let n: i64 = row.try_get("", &format!("m{i}"))?;
            m.published = u64::try_from(n).unwrap_or(0);
        }
    }

    let tally = db
        .query_all_raw(stmt(
            backend,
            "SELECT minute, events FROM outbox_published_tally WHERE minute >= ?",
            vec![first.into()],
        ))
        .await?;
    for r in &tally {
        let at: DateTime<Utc> = r.try_get("", "minute")?;
        let n: i64 = r.try_get("", "events")?;
        if let Some(i) = index(at) {
            out[i].published += u64::try_from(n).unwrap_or(0);
        }
    }

    let samples = db
        .query_all_raw(stmt(
            backend,
            "SELECT minute, pending, failed FROM outbox_backlog_samples WHERE minute >= ?",
            vec![first.into()],
        ))
        .await?;
    for r in &samples {
        let at: DateTime<Utc> = r.try_get("", "minute")?;
        let pending: i64 = r.try_get("", "pending")?;
        let failed: i64 = r.try_get("", "failed")?;
        if let Some(i) = index(at) {
            out[i].pending = Some(u64::try_from(pending).unwrap_or(0));
            out[i].failed = Some(u64::try_from(failed).unwrap_or(0));
        }
    }
    Ok(out)
}

/// PostgreSQL and SQLite: the minute's sample, last writer wins.
const SAMPLE_UPSERT: &str = "INSERT INTO outbox_backlog_samples (minute, pending, failed) \
     VALUES (?, ?, ?) ON CONFLICT (minute) DO UPDATE SET pending = excluded.pending, \
     failed = excluded.failed";

/// Writes `at`'s minute's backlog sample and drops samples from before `forget_before`.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn record_sample(
    db: &impl ConnectionTrait,
    at: DateTime<Utc>,
    pending: u64,
    failed: u64,
    forget_before: DateTime<Utc>,
) -> Result<()> {
    let backend = db.get_database_backend();
    let upsert = match backend {
        DbBackend::MySql => mysql::UPSERT_SAMPLE,
        _ => SAMPLE_UPSERT,
    };
    let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let values: Vec<Value> = vec![minute(at).into(), int(pending).into(), int(failed).into()];
    db.execute_raw(stmt(backend, upsert, values)).await?;
    db.execute_raw(stmt(
        backend,
        "DELETE FROM outbox_backlog_samples WHERE minute < ?",
        vec![forget_before.into()],
    ))
    .await?;
    Ok(())
}
