//! Statements that read the same on every backend: the insert, listings, single-event state
//! changes and counts (most rendered by SeaQuery from the entity), the purge and the row-lease
//! statistics that MySQL and SQLite share.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, IntoCondition};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DbBackend, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect, Statement,
};
use seaorm_outbox_entity::{OutboxEventColumn as Col, OutboxEvents, OutboxStatus};
use uuid::Uuid;

use super::sql::{for_backend, placeholders};
use super::{INSERT_CHUNK, Requeue};
use crate::error::Result;
use crate::event::{OutboxEvent, ValidEvent, partition_of};

/// Bound values per inserted event, where the library computes the partition (PostgreSQL,
/// SQLite); MySQL's generated column computes its own, one fewer.
const INSERT_PARAMS: usize = 13;

/// Deletes up to `?` published rows older than `?`, oldest first (MySQL has its own).
pub(super) const PURGE_PUBLISHED: &str = "DELETE FROM outbox_events WHERE id IN (SELECT id \
     FROM outbox_events WHERE status = 'published' AND published_at < ? \
     ORDER BY published_at LIMIT ?)";

/// The pending-rows part of the stats snapshot where rows carry their lease (MySQL, SQLite).
/// An event waiting for its `deliver_at` counts as scheduled, not due nor in backoff, and
/// its lag (`oldest`) starts at that time.
pub(super) const PENDING_COUNTS: &str = "SELECT \
       COUNT(CASE WHEN locked_by IS NULL AND deliver_at > ? THEN 1 END) AS scheduled, \
       COUNT(CASE WHEN next_attempt_at <= ? \
         AND (locked_by IS NOT NULL OR deliver_at IS NULL OR deliver_at <= ?) THEN 1 END) AS due, \
       COUNT(CASE WHEN next_attempt_at > ? AND locked_by IS NULL \
         AND (deliver_at IS NULL OR deliver_at <= ?) THEN 1 END) AS backoff, \
       COUNT(CASE WHEN next_attempt_at > ? AND locked_by IS NOT NULL THEN 1 END) AS leased, \
       MIN(CASE WHEN deliver_at > ? THEN NULL WHEN deliver_at > occurred_at THEN deliver_at \
         ELSE occurred_at END) AS oldest, \
       MIN(CASE WHEN deliver_at > ? THEN deliver_at END) AS next_scheduled \
     FROM outbox_events WHERE status = 'pending'";

/// How many times [`PENDING_COUNTS`] binds the snapshot's time.
pub(super) const PENDING_COUNTS_BINDS: usize = 8;

/// Dead letters and the events published since `?`, both on indexes.
pub(super) const FAILED_AND_RECENT: &str = "SELECT \
       (SELECT COUNT(*) FROM outbox_events WHERE status = 'failed') AS failed, \
       (SELECT COUNT(*) FROM outbox_events WHERE status = 'published' AND published_at >= ?) \
         AS recent";

/// Inserts validated events with one hand-written `INSERT` per [`INSERT_CHUNK`]: the statement
/// a raw-SQL outbox would send, cached per backend for the common single-event case, so the
/// write path costs no more than one.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn insert(
    db: &impl ConnectionTrait,
    events: Vec<ValidEvent>,
    created_at: DateTime<Utc>,
) -> Result<()> {
    let backend = db.get_database_backend();
    let mut rows = events.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<_> = rows.by_ref().take(INSERT_CHUNK).collect();
        let n = chunk.len();
        let mut values = Vec::with_capacity(n * INSERT_PARAMS);
        for e in chunk {
            if backend != DbBackend::MySql {
                let p = super::partitions::column_value(partition_of(
                    &e.aggregate_type,
                    &e.aggregate_id,
                ));
                values.push(p.into());
            }
            values.extend([
                e.id.into(),
                e.event_type.into(),
                e.aggregate_type.into(),
                e.aggregate_id.into(),
                sea_orm::Value::Json(Some(Box::new(e.payload))),
                sea_orm::Value::Json(Some(Box::new(e.headers))),
                e.occurred_at.into(),
                created_at.into(),
                // Due at its place in its aggregate's order (`occurred_at`), or now if that is
                // later: owned partitions read due rows in this order, so an aggregate's events
                // written together or back-dated still come out in `occurred_at` order. A
                // scheduled event is due at its time, which places it in that order; one that
                // holds its aggregate is due at once, for a relay to learn of it and hold.
                e.deliver_at
                    .filter(|_| !e.holds_aggregate)
                    .unwrap_or_else(|| e.occurred_at.min(created_at))
                    .into(),
                e.deliver_at.into(),
                e.holds_aggregate.into(),
                e.expires_at.into(),
            ]);
        }
        let sql = insert_sql(backend, n);
        db.execute_raw(Statement::from_sql_and_values(
            backend,
            sql.as_ref(),
            values,
        ))
        .await?;
    }
    Ok(())
}

/// `INSERT … VALUES (…)` for `rows` events; the one-row statement is built once per backend.
fn insert_sql(backend: DbBackend, rows: usize) -> std::borrow::Cow<'static, str> {
    use std::sync::OnceLock;
    static ONE: [OnceLock<String>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let build = |rows: usize| {
        let (column, params) = match backend {
            DbBackend::MySql => ("", INSERT_PARAMS - 1),
            _ => ("partition_no, ", INSERT_PARAMS),
        };
        let row = format!("({}, 'pending', 0)", placeholders(params));
        let sql = format!(
            "INSERT INTO outbox_events ({column}id, event_type, aggregate_type, aggregate_id, \
             payload, headers, occurred_at, created_at, next_attempt_at, deliver_at, \
             holds_aggregate, expires_at, status, attempts) \
             VALUES {}",
            vec![row; rows].join(", ")
        );
        for_backend(backend, &sql).into_owned()
    };
    if rows == 1 {
        let slot = match backend {
            DbBackend::Postgres => &ONE[0],
            DbBackend::MySql => &ONE[1],
            _ => &ONE[2],
        };
        std::borrow::Cow::Borrowed(slot.get_or_init(|| build(1)).as_str())
    } else {
        std::borrow::Cow::Owned(build(rows))
    }
}

/// Events in `status`, a page in `order`.
async fn list(
    db: &impl ConnectionTrait,
    status: OutboxStatus,
    order: [(Col, sea_orm::Order); 2],
    limit: u64,
    offset: u64,
) -> Result<Vec<OutboxEvent>> {
    let mut query = OutboxEvents::find().filter(Col::Status.eq(status));
    for (col, dir) in order {
        query = query.order_by(col, dir);
    }
    query
        .limit(limit)
        .offset(offset)
        .all(db)
        .await?
        .into_iter()
        .map(OutboxEvent::try_from)
        .collect()
}

/// Pending events, oldest `occurred_at` first, id breaking ties.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn pending(
    db: &impl ConnectionTrait,
    limit: u64,
    offset: u64,
) -> Result<Vec<OutboxEvent>> {
    use sea_orm::Order::Asc;
    let order = [(Col::OccurredAt, Asc), (Col::Id, Asc)];
    list(db, OutboxStatus::Pending, order, limit, offset).await
}

/// Dead letters, most recently failed first.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn failed(
    db: &impl ConnectionTrait,
    limit: u64,
    offset: u64,
) -> Result<Vec<OutboxEvent>> {
    use sea_orm::Order::Desc;
    let order = [(Col::FailedAt, Desc), (Col::Id, Desc)];
    list(db, OutboxStatus::Failed, order, limit, offset).await
}

/// One event by id, in any status.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn get(db: &impl ConnectionTrait, id: Uuid) -> Result<Option<OutboxEvent>> {
    OutboxEvents::find_by_id(id)
        .one(db)
        .await?
        .map(OutboxEvent::try_from)
        .transpose()
}

/// How many events are in `status`.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn count(db: &impl ConnectionTrait, status: OutboxStatus) -> Result<u64> {
    Ok(OutboxEvents::find()
        .filter(Col::Status.eq(status))
        .count(db)
        .await?)
}

/// How many published events are older than `older_than`.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn count_published_before(
    db: &impl ConnectionTrait,
    older_than: DateTime<Utc>,
) -> Result<u64> {
    Ok(OutboxEvents::find()
        .filter(Col::Status.eq(OutboxStatus::Published))
        .filter(Col::PublishedAt.lt(older_than))
        .count(db)
        .await?)
}

/// The statuses of those of `ids` that exist.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn statuses(
    db: &impl ConnectionTrait,
    ids: &[Uuid],
) -> Result<Vec<(Uuid, OutboxStatus)>> {
    Ok(OutboxEvents::find()
        .select_only()
        .column(Col::Id)
        .column(Col::Status)
        .filter(Col::Id.is_in(ids.iter().copied()))
        .into_tuple()
        .all(db)
        .await?)
}

/// Sets `status` and the columns in `set` on the events `cond` picks among those in `from`,
/// clearing any row lease; returns how many changed.
async fn transition(
    db: &impl ConnectionTrait,
    from: OutboxStatus,
    set: Vec<(Col, Expr)>,
    cond: impl IntoCondition,
) -> Result<u64> {
    let mut update = OutboxEvents::update_many()
        .col_expr(Col::LockedBy, Expr::value(Option::<String>::None))
        .col_expr(Col::LockedUntil, Expr::value(Option::<DateTime<Utc>>::None));
    for (col, value) in set {
        update = update.col_expr(col, value);
    }
    let res = update
        .filter(Col::Status.eq(from))
        .filter(cond)
        .exec(db)
        .await?;
    Ok(res.rows_affected)
}

/// Marks those of `ids` that are pending published; returns how many.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn mark_published(
    db: &impl ConnectionTrait,
    ids: &[Uuid],
    now: DateTime<Utc>,
) -> Result<u64> {
    let set = vec![
        (Col::Status, Expr::value(OutboxStatus::Published)),
        (Col::PublishedAt, Expr::value(now)),
    ];
    transition(
        db,
        OutboxStatus::Pending,
        set,
        Col::Id.is_in(ids.iter().copied()),
    )
    .await
}

/// Dead-letters `id` if it is pending, keeping `error`; returns how many changed.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn mark_failed(
    db: &impl ConnectionTrait,
    id: Uuid,
    error: String,
    now: DateTime<Utc>,
) -> Result<u64> {
    let set = vec![
        (Col::Status, Expr::value(OutboxStatus::Failed)),
        (Col::FailedAt, Expr::value(now)),
        (Col::LastError, Expr::value(error)),
    ];
    transition(db, OutboxStatus::Pending, set, Col::Id.eq(id)).await
}

/// Puts the dead letters `which` picks back to pending, due `now`, attempts reset, expiry
/// cleared; the last error stays for the record. Returns how many.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn requeue(
    db: &impl ConnectionTrait,
    which: Requeue<'_>,
    now: DateTime<Utc>,
) -> Result<u64> {
    let cond = match which {
        Requeue::Id(id) => Condition::all().add(Col::Id.eq(id)),
        Requeue::All => Condition::all(),
        Requeue::Aggregate(t, id) => Condition::all()
            .add(Col::AggregateType.eq(t))
            .add(Col::AggregateId.eq(id)),
    };
    let set = vec![
        (Col::Status, Expr::value(OutboxStatus::Pending)),
        (Col::Attempts, Expr::value(0)),
        (Col::NextAttemptAt, Expr::value(now)),
        (Col::FailedAt, Expr::value(Option::<DateTime<Utc>>::None)),
        // A replay is an operator's decision to send: an expired event would only expire again.
        (Col::ExpiresAt, Expr::value(Option::<DateTime<Utc>>::None)),
    ];
    transition(db, OutboxStatus::Failed, set, cond).await
}

/// Deletes `id` if it is a dead letter; returns how many.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn discard(db: &impl ConnectionTrait, id: Uuid) -> Result<u64> {
    let res = OutboxEvents::delete_many()
        .filter(Col::Id.eq(id))
        .filter(Col::Status.eq(OutboxStatus::Failed))
        .exec(db)
        .await?;
    Ok(res.rows_affected)
}
