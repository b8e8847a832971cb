//! The outbox's JSON endpoints: statistics with health and relays, the per-minute history,
//! events browsed by filter, one event, dead letters (list, replay, discard) and the purge.
//! Every write action is logged through `tracing` (target `seaorm_outbox::admin`, unchanged by the move to its own crate) with who did
//! it, what, and how many rows.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::AdminState;
use super::auth::Caller;
use super::error::ApiError;
use super::tenants::Db;
use seaorm_outbox::OutboxStatus;
use seaorm_outbox::repository::{EventCursor, EventOrder, EventQuery, Outbox};
use seaorm_outbox::stats::BreakerState;

/// The largest page the API serves: a dashboard never needs more, and a bigger one is a
/// mistake or an attempt to load the database.
pub(crate) const MAX_PAGE: u64 = 500;

/// The deepest offset served: `OFFSET` reads every skipped row; filter by time instead.
pub(crate) const MAX_OFFSET: u64 = 100_000;

pub(crate) type ApiResult = Result<Response, ApiError>;

/// `limit` (default 50) and `offset` (default 0), checked against the caps.
pub(crate) fn page(limit: Option<u64>, offset: Option<u64>) -> Result<(u64, u64), ApiError> {
    let limit = limit.unwrap_or(50);
    let offset = offset.unwrap_or(0);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_PAGE}, not {limit}"
        )));
    }
    if offset > MAX_OFFSET {
        return Err(ApiError::bad_request(format!(
            "offset must be at most {MAX_OFFSET}, not {offset}; narrow the query by time"
        )));
    }
    Ok((limit, offset))
}

/// `GET /health`, outside auth: the outbox's verdict, 503 when unhealthy.
pub(crate) async fn health(State(s): State<Arc<AdminState>>, db: Db) -> Response {
    let h = Outbox::new(&db.db).health(&s.thresholds).await;
    let status = StatusCode::from_u16(h.http_status()).unwrap_or(StatusCode::OK);
    (
        status,
        Json(json!({ "status": h.status, "reasons": h.reasons })),
    )
        .into_response()
}

/// `GET /api/stats`: the backlog, dead letters, health with its reasons, the relays and their
/// breakers, and the inbox's dead letters and consumer processes.
pub(crate) async fn stats(
    State(s): State<Arc<AdminState>>,
    db: Db,
    Caller(who): Caller,
) -> ApiResult {
    let outbox = Outbox::new(&db.db);
    let mut health = outbox.health(&s.thresholds).await;
    let Some(stats) = health.stats.take() else {
        return Err(ApiError::from(seaorm_outbox::Error::Database(
            sea_orm::DbErr::Custom(health.reasons.join("; ")),
        )));
    };
    let relays = outbox.relays(s.relays_within).await?;
    for r in &relays {
        if r.breaker != BreakerState::Closed {
            health.degraded(format!(
                "relay {}: publisher {} unavailable{}",
                r.name,
                r.publisher,
                r.last_error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            ));
        }
    }
    let log = log_relay(&s, &db.db, &mut health).await?;
    let inbox = if s.inbox {
        let inbox = seaorm_outbox::inbox::Inbox::new(&db.db);
        let n = inbox.count_dead_letters(None).await?;
        // A database not yet migrated to `inbox_consumers` (migration 15) still gets its
        // page: the panel just lists nobody.
        let consumers = match inbox.consumers(s.relays_within).await {
            Ok(c) => json!(c),
            Err(e) => {
                tracing::debug!(target: "seaorm_outbox::admin", error = %e, "inbox consumers not read");
                Value::Null
            }
        };
        json!({ "dead_letters": n, "consumers": consumers })
    } else {
        Value::Null
    };
    Ok(Json(json!({
        "at": stats.at,
        "pending": stats.pending(),
        "pending_due": stats.pending_due,
        "pending_backoff": stats.pending_backoff,
        "pending_leased": stats.pending_leased,
        "scheduled": stats.scheduled,
        "next_scheduled_at": stats.next_scheduled_at,
        "failed": stats.failed,
        "oldest_pending_at": stats.oldest_pending_at,
        "oldest_pending_age_secs": stats.oldest_pending_age().map(|d| d.as_secs_f64()),
        "published_last_hour": stats.published_last_hour,
        "health": { "status": health.status, "reasons": health.reasons },
        "relays": relays,
        "inbox": inbox,
        "log": log,
        "refresh_secs": s.refresh.as_secs_f64(),
        "caller": who,
    }))
    .into_response())
}

/// The log relay's slots and dead letters for `/api/stats`, `null` when not served; a lost slot
/// makes `health` unhealthy.
#[cfg(feature = "log-relay")]
async fn log_relay(
    s: &AdminState,
    db: &sea_orm::DatabaseConnection,
    health: &mut seaorm_outbox::stats::Health,
) -> Result<Value, ApiError> {
    use seaorm_outbox::relay::wal::{LogDeadLetters, slots};
    // A tenant's database may be another backend than the router's own.
    if !s.log_relay || db.get_database_backend() != sea_orm::DbBackend::Postgres {
        return Ok(Value::Null);
    }
    let slots = slots(db).await?;
    for slot in slots.iter().filter(|slot| slot.wal_status == "lost") {
        health.unhealthy(format!(
            "log relay slot {} is lost: the server dropped WAL it had not confirmed, so events \
             written after {} cannot be read from it",
            slot.name, slot.confirmed_lsn
        ));
    }
    let dead = LogDeadLetters::new(db).count().await?;
    Ok(json!({ "slots": slots, "dead_letters": dead }))
}

#[cfg(not(feature = "log-relay"))]
async fn log_relay(
    _: &AdminState,
    _: &sea_orm::DatabaseConnection,
    _: &mut seaorm_outbox::stats::Health,
) -> Result<Value, ApiError> {
    Ok(Value::Null)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HistoryParams {
    minutes: Option<u32>,
}

/// `GET /api/history?minutes=60`: per minute, events published and the sampled backlog.
pub(crate) async fn history(
    db: Db,
    params: Result<Query<HistoryParams>, QueryRejection>,
) -> ApiResult {
    let Query(p) = params?;
    let minutes = p.minutes.unwrap_or(60);
    if !(1..=1440).contains(&minutes) {
        return Err(ApiError::bad_request(format!(
            "minutes must be between 1 and 1440, not {minutes}"
        )));
    }
    let series = Outbox::new(&db.db).history(minutes).await?;
    Ok(Json(json!({ "minutes": series })).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventsParams {
    status: Option<String>,
    event_type: Option<String>,
    aggregate_type: Option<String>,
    aggregate_id: Option<String>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    order: Option<String>,
    sort: Option<String>,
    scheduled: Option<bool>,
    limit: Option<u64>,
    offset: Option<u64>,
    after: Option<String>,
}

/// A form's empty field means "any".
fn given(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.is_empty())
}

pub(crate) fn parse_status(s: &str) -> Result<OutboxStatus, ApiError> {
    match s {
        "pending" => Ok(OutboxStatus::Pending),
        "published" => Ok(OutboxStatus::Published),
        "failed" => Ok(OutboxStatus::Failed),
        other => Err(ApiError::bad_request(format!(
            "unknown status {other:?}: expected pending, published or failed"
        ))),
    }
}

/// `GET /api/events`: a page of events by status, type, aggregate and `occurred_at` range,
/// newest written first by default. `next` is the cursor of the next page (`after=`): keyset
/// paging, as fast deep in a 10M-row table as on its first page. `offset` still works, capped.
pub(crate) async fn events(
    db: Db,
    params: Result<Query<EventsParams>, QueryRejection>,
) -> ApiResult {
    let Query(p) = params?;
    let (limit, offset) = page(p.limit, p.offset)?;
    let status = given(p.status).as_deref().map(parse_status).transpose()?;
    let oldest_first = match given(p.order).as_deref() {
        None | Some("newest") => false,
        Some("oldest") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown order {other:?}: expected newest or oldest"
            )));
        }
    };
    let order = match given(p.sort).as_deref() {
        None | Some("written") => EventOrder::Written,
        Some("occurred") => EventOrder::Occurred,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown sort {other:?}: expected written or occurred"
            )));
        }
    };
    let after = given(p.after)
        .map(|c| c.parse::<EventCursor>())
        .transpose()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    if after.is_some() && offset > 0 {
        return Err(ApiError::bad_request("give after or offset, not both"));
    }
    if let (Some(a), Some(b)) = (p.since, p.until)
        && a > b
    {
        return Err(ApiError::bad_request("since is after until"));
    }
    let query = EventQuery::default()
        .status(status)
        .event_type(given(p.event_type))
        .aggregate_type(given(p.aggregate_type))
        .aggregate_id(given(p.aggregate_id))
        .since(p.since)
        .until(p.until)
        .oldest_first(oldest_first)
        .order(order)
        .scheduled(p.scheduled.unwrap_or(false))
        .limit(limit)
        .offset(offset)
        .after(after);
    let page = Outbox::new(&db.db).events_page(&query).await?;
    let more = page.next.is_some();
    Ok(Json(json!({
        "events": page.events,
        "offset": offset,
        "next": page.next,
        "next_offset": (more && after.is_none()).then_some(offset + limit),
    }))
    .into_response())
}

/// `GET /api/events/{id}`: one event in full.
pub(crate) async fn event(db: Db, id: Result<Path<Uuid>, PathRejection>) -> ApiResult {
    let Path(id) = id?;
    let e = Outbox::new(&db.db).get(id).await?;
    Ok(Json(e).into_response())
}

/// `DELETE /api/scheduled/{id}`: cancels a scheduled event ([`Outbox::cancel`]), in its own
/// transaction. 409 when it can no longer be taken back (due, attempted, held, published or
/// dead-lettered).
pub(crate) async fn cancel_scheduled(
    db: Db,
    Caller(who): Caller,
    id: Result<Path<Uuid>, PathRejection>,
) -> ApiResult {
    let Path(id) = id?;
    Outbox::new(&db.db).cancel(id).await?;
    audit(&who.name, "cancel", &db.audited(&id.to_string()), 1);
    Ok(Json(json!({ "cancelled": 1 })).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Purge {
    older_than_secs: u64,
}

/// `POST /api/purge` with `{"older_than_secs": N}`: deletes published events older than that,
/// in batches that each commit.
pub(crate) async fn purge(
    db: Db,
    Caller(who): Caller,
    body: Result<Json<Purge>, JsonRejection>,
) -> ApiResult {
    let Json(b) = body?;
    let age = i64::try_from(b.older_than_secs)
        .ok()
        .and_then(chrono::Duration::try_seconds)
        .ok_or_else(|| ApiError::bad_request("older_than_secs is too large"))?;
    let cutoff = chrono::Utc::now()
        .checked_sub_signed(age)
        .ok_or_else(|| ApiError::bad_request("older_than_secs is too large"))?;
    let n = Outbox::new(&db.db).purge_published(cutoff, 1000).await?;
    audit(
        &who.name,
        "purge",
        &db.audited(&format!("published before {}", cutoff.to_rfc3339())),
        n,
    );
    Ok(Json(json!({ "purged": n })).into_response())
}

/// The audit line of a write action.
pub(crate) fn audit(who: &str, action: &str, what: &str, rows: u64) {
    tracing::info!(
        target: "seaorm_outbox::admin",
        who,
        action,
        what,
        rows,
        "outbox admin {action}"
    );
}
