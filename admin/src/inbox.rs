//! The consumer inbox's dead letters: list, ask the consumer to replay, discard.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::AdminState;
use super::api::{ApiResult, Page, audit};
use super::auth::Caller;
use super::error::ApiError;
use seaorm_outbox::inbox::{DeadLetters, Inbox, InboxDeadLetter};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListParams {
    consumer: Option<String>,
    limit: Option<u64>,
    offset: Option<u64>,
}

/// A dead letter as JSON: the payload as text when it is UTF-8, else as bytes.
fn view(d: &InboxDeadLetter) -> serde_json::Value {
    let payload = match std::str::from_utf8(&d.payload) {
        Ok(text) => json!({ "text": text }),
        Err(_) => json!({ "bytes": d.payload }),
    };
    json!({
        "id": d.id,
        "consumer": d.consumer,
        "message_id": d.message_id,
        "ordering_key": d.ordering_key,
        "source": d.source,
        "position": d.position,
        "headers": d.headers,
        "payload": payload,
        "error": d.error,
        "attempts": d.attempts,
        "received_at": d.received_at,
        "failed_at": d.failed_at,
        "replay_requested_at": d.replay_requested_at,
    })
}

/// `GET /api/inbox/dead-letters?consumer=…`: oldest failure first, with the total.
pub(crate) async fn list(
    State(s): State<Arc<AdminState>>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> ApiResult {
    let Query(p) = params?;
    let (limit, offset) = Page::checked(p.limit, p.offset)?;
    let consumer = p.consumer.filter(|c| !c.is_empty());
    let which = consumer
        .as_deref()
        .map_or(DeadLetters::All, DeadLetters::Consumer);
    let inbox = Inbox::new(&s.db);
    let total = inbox.count_dead_letters(consumer.as_deref()).await?;
    let rows = inbox.dead_letters(which, limit, offset).await?;
    let next = (offset + limit < total).then_some(offset + limit);
    let rows: Vec<_> = rows.iter().map(view).collect();
    Ok(Json(json!({ "dead_letters": rows, "total": total, "next_offset": next })).into_response())
}

/// `POST /api/inbox/dead-letters/{id}/replay`: the running consumer applies it again.
pub(crate) async fn replay_one(
    State(s): State<Arc<AdminState>>,
    Caller(who): Caller,
    id: Result<Path<Uuid>, PathRejection>,
) -> ApiResult {
    let Path(id) = id?;
    let n = Inbox::new(&s.db).replay(DeadLetters::Id(id)).await?;
    found(n, id)?;
    audit(&who.name, "inbox replay", &id.to_string(), n);
    Ok(Json(json!({ "replay_requested": n })).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReplayMany {
    #[serde(default)]
    all: bool,
    consumer: Option<String>,
}

/// `POST /api/inbox/dead-letters/replay` with `{"all": true}` or `{"consumer": …}`.
pub(crate) async fn replay_many(
    State(s): State<Arc<AdminState>>,
    Caller(who): Caller,
    body: Result<Json<ReplayMany>, JsonRejection>,
) -> ApiResult {
    let Json(b) = body?;
    let consumer = b.consumer.filter(|c| !c.is_empty());
    let (what, which) = match (b.all, consumer.as_deref()) {
        (true, None) => ("all".to_owned(), DeadLetters::All),
        (false, Some(c)) => (format!("consumer {c}"), DeadLetters::Consumer(c)),
        _ => {
            return Err(ApiError::bad_request(
                "give either {\"all\": true} or a consumer",
            ));
        }
    };
    let n = Inbox::new(&s.db).replay(which).await?;
    audit(&who.name, "inbox replay", &what, n);
    Ok(Json(json!({ "replay_requested": n })).into_response())
}

/// `DELETE /api/inbox/dead-letters/{id}`: dropped without applying it.
pub(crate) async fn discard(
    State(s): State<Arc<AdminState>>,
    Caller(who): Caller,
    id: Result<Path<Uuid>, PathRejection>,
) -> ApiResult {
    let Path(id) = id?;
    let n = Inbox::new(&s.db).discard(DeadLetters::Id(id)).await?;
    found(n, id)?;
    audit(&who.name, "inbox discard", &id.to_string(), n);
    Ok(Json(json!({ "discarded": n })).into_response())
}

fn found(n: u64, id: Uuid) -> Result<(), ApiError> {
    if n == 0 {
        return Err(ApiError::not_found(format!("no inbox dead letter {id}")));
    }
    Ok(())
}
