//! Every kind of dead letter through one set of endpoints: list, replay one or many, discard.
//! Each route names its kind ([`Outbox`], [`Inbox`]); the work is the core's
//! [`DeadLetterStore`], so a new kind is a marker type and four routes.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query};
use axum::response::IntoResponse;
use sea_orm::DatabaseConnection;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::api::{ApiResult, audit, page};
use super::auth::Caller;
use super::error::ApiError;
use super::tenants::Db;
use seaorm_outbox::dead_letter::{DeadLetterStore, InboxDeadLetters, OutboxDeadLetters, Selection};

/// A kind of dead letter the API serves.
pub(crate) trait Kind: Send + Sync + 'static {
    /// Its store on the admin's connection.
    fn store(db: &DatabaseConnection) -> Box<dyn DeadLetterStore + '_>;
    /// What the audit line calls its actions: `replay`, `inbox replay`, ….
    const AUDIT: &'static str;
    /// The key of a replay's answer: replayed at once, or requested of a consumer.
    const REPLAYED: &'static str;
    /// What a many-replay body may name besides `all`.
    const GROUPS: &'static str;
    /// Whether this database has them (a tenant's may be another backend than the router's).
    fn serves(_db: &DatabaseConnection) -> bool {
        true
    }
}

/// `K`'s store on `db`, or a 404 where that database has none.
fn store<K: Kind>(db: &DatabaseConnection) -> Result<Box<dyn DeadLetterStore + '_>, ApiError> {
    if K::serves(db) {
        Ok(K::store(db))
    } else {
        Err(ApiError::not_found(
            "no such dead letters on this database (the log relay's are on PostgreSQL only)",
        ))
    }
}

/// The outbox's failed events.
pub(crate) struct Outbox;

impl Kind for Outbox {
    fn store(db: &DatabaseConnection) -> Box<dyn DeadLetterStore + '_> {
        Box::new(OutboxDeadLetters::new(db))
    }
    const AUDIT: &'static str = "";
    const REPLAYED: &'static str = "replayed";
    const GROUPS: &'static str = "both aggregate_type and aggregate_id";
}

/// The consumers' inbox dead letters.
pub(crate) struct Inbox;

impl Kind for Inbox {
    fn store(db: &DatabaseConnection) -> Box<dyn DeadLetterStore + '_> {
        Box::new(InboxDeadLetters::new(db))
    }
    const AUDIT: &'static str = "inbox ";
    const REPLAYED: &'static str = "replay_requested";
    const GROUPS: &'static str = "a consumer";
}

/// The log relay's dead letters (PostgreSQL). A replay writes the event to the log again under
/// the default message prefix, which the relay must read.
#[cfg(feature = "log-relay")]
pub(crate) struct Log;

#[cfg(feature = "log-relay")]
impl Kind for Log {
    fn store(db: &DatabaseConnection) -> Box<dyn DeadLetterStore + '_> {
        Box::new(seaorm_outbox::relay::wal::LogDeadLetters::new(db))
    }
    const AUDIT: &'static str = "log ";
    const REPLAYED: &'static str = "replayed";
    const GROUPS: &'static str = "one id";
    fn serves(db: &DatabaseConnection) -> bool {
        db.get_database_backend() == sea_orm::DbBackend::Postgres
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListParams {
    consumer: Option<String>,
    limit: Option<u64>,
    offset: Option<u64>,
}

/// `GET …/dead-letters[?consumer=]`: a page, with the total and the next offset.
pub(crate) async fn list<K: Kind>(
    db: Db,
    params: Result<Query<ListParams>, QueryRejection>,
) -> ApiResult {
    let Query(p) = params?;
    let (limit, offset) = page(p.limit, p.offset)?;
    let consumer = p.consumer.filter(|c| !c.is_empty());
    let which = consumer
        .as_deref()
        .map_or(Selection::All, Selection::Consumer);
    let store = store::<K>(&db.db)?;
    let total = store.count(which).await?;
    let rows: Vec<_> = store
        .list(which, limit, offset)
        .await?
        .into_iter()
        .map(|d| d.detail)
        .collect();
    let next = (offset + limit < total).then_some(offset + limit);
    Ok(Json(json!({ "dead_letters": rows, "total": total, "next_offset": next })).into_response())
}

/// `POST …/dead-letters/{id}/replay`.
pub(crate) async fn replay_one<K: Kind>(
    db: Db,
    Caller(who): Caller,
    id: Result<Path<Uuid>, PathRejection>,
) -> ApiResult {
    let Path(id) = id?;
    let n = store::<K>(&db.db)?.replay(Selection::One(id)).await?;
    found::<K>(n, id)?;
    audit(
        &who.name,
        &format!("{}replay", K::AUDIT),
        &db.audited(&id.to_string()),
        n,
    );
    Ok(Json(json!({ K::REPLAYED: n })).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReplayMany {
    #[serde(default)]
    all: bool,
    aggregate_type: Option<String>,
    aggregate_id: Option<String>,
    consumer: Option<String>,
}

fn given(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.is_empty())
}

/// `POST …/dead-letters/replay` with `{"all": true}` or a group: the outbox's
/// `{"aggregate_type", "aggregate_id"}`, the inbox's `{"consumer"}`.
pub(crate) async fn replay_many<K: Kind>(
    db: Db,
    Caller(who): Caller,
    body: Result<Json<ReplayMany>, JsonRejection>,
) -> ApiResult {
    let Json(b) = body?;
    let group = (
        given(b.aggregate_type),
        given(b.aggregate_id),
        given(b.consumer),
    );
    let (what, which) = match (b.all, &group) {
        (true, (None, None, None)) => ("all".to_owned(), Selection::All),
        (false, (Some(t), Some(id), None)) => {
            (format!("aggregate {t}/{id}"), Selection::Aggregate(t, id))
        }
        (false, (None, None, Some(c))) => (format!("consumer {c}"), Selection::Consumer(c)),
        _ => {
            return Err(ApiError::bad_request(format!(
                "give either {{\"all\": true}} or {}",
                K::GROUPS
            )));
        }
    };
    let n = store::<K>(&db.db)?.replay(which).await?;
    audit(
        &who.name,
        &format!("{}replay", K::AUDIT),
        &db.audited(&what),
        n,
    );
    Ok(Json(json!({ K::REPLAYED: n })).into_response())
}

/// `DELETE …/dead-letters/{id}`: gone without being delivered or applied.
pub(crate) async fn discard<K: Kind>(
    db: Db,
    Caller(who): Caller,
    id: Result<Path<Uuid>, PathRejection>,
) -> ApiResult {
    let Path(id) = id?;
    let n = store::<K>(&db.db)?.discard(Selection::One(id)).await?;
    found::<K>(n, id)?;
    audit(
        &who.name,
        &format!("{}discard", K::AUDIT),
        &db.audited(&id.to_string()),
        n,
    );
    Ok(Json(json!({ "discarded": n })).into_response())
}

fn found<K: Kind>(n: u64, id: Uuid) -> Result<(), ApiError> {
    if n == 0 {
        let noun = K::AUDIT.trim_end();
        return Err(ApiError::not_found(format!(
            "no {}dead letter {id}",
            if noun.is_empty() {
                String::new()
            } else {
                format!("{noun} ")
            }
        )));
    }
    Ok(())
}
