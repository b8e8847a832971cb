//! The outbox repository: the five-operation contract plus batches and dead-letter handling,
//! generic over any [`ConnectionTrait`] so the same calls work on a pool or inside the caller's
//! transaction.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect,
};
use seaorm_outbox_entity::{OutboxEventColumn as Col, OutboxEvents, OutboxStatus};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::event::{DomainEvent, NewEvent, OutboxEvent, now};
use crate::sql;

/// Largest `limit` accepted by the listing calls; larger is [`Error::LimitTooLarge`].
pub const MAX_PAGE_SIZE: u64 = 10_000;

/// Stored error messages are cut to this many bytes (at a character boundary) plus a marker, so
/// a 10 MB stack trace costs no more than a short one.
pub const MAX_ERROR_BYTES: usize = 4096;

/// Events per `INSERT` in [`OutboxRepository::add_events`]; keeps each statement under every
/// backend's bind-parameter limit.
pub const INSERT_CHUNK: usize = 1000;

/// Repository settings.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct OutboxConfig {
    /// Largest serialised payload accepted, in bytes. Default 1 MiB.
    pub max_payload_bytes: usize,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: 1024 * 1024,
        }
    }
}

impl OutboxConfig {
    /// Sets [`max_payload_bytes`](Self::max_payload_bytes).
    pub fn max_payload_bytes(mut self, bytes: usize) -> Self {
        self.max_payload_bytes = bytes;
        self
    }
}

/// The outbox contract.
///
/// Nothing here begins, commits or rolls back a transaction: run it on the caller's
/// [`DatabaseTransaction`](sea_orm::DatabaseTransaction) and the event shares that
/// transaction's fate.
#[async_trait]
pub trait OutboxRepository: Send + Sync {
    /// Stores one event as pending. Never commits. Returns its id.
    async fn add_event(&self, event: NewEvent) -> Result<Uuid>;

    /// Stores many events with one `INSERT` per [`INSERT_CHUNK`] events. All are validated
    /// before any is written. Never commits.
    async fn add_events(&self, events: Vec<NewEvent>) -> Result<Vec<Uuid>>;

    /// Pending events, oldest `occurred_at` first, id breaking ties. Dead letters are excluded.
    /// `limit` above [`MAX_PAGE_SIZE`] is [`Error::LimitTooLarge`].
    async fn get_unpublished(&self, limit: u64, offset: u64) -> Result<Vec<OutboxEvent>>;

    /// Marks a pending event published. Idempotent on a published event; an unknown id is
    /// [`Error::NotFound`]; a dead letter is [`Error::InvalidState`] (requeue it first).
    async fn mark_published(&self, id: Uuid) -> Result<()>;

    /// Marks many pending events published in one statement and returns how many changed.
    /// Already-published ids are skipped. If any id is unknown ([`Error::NotFound`]) or a dead
    /// letter ([`Error::InvalidState`]) the error is returned after the others were marked; run it
    /// in a transaction to make that all-or-nothing.
    async fn mark_published_many(&self, ids: &[Uuid]) -> Result<u64>;

    /// How many events are pending (due, in backoff or leased). Dead letters are not counted.
    async fn count_unpublished(&self) -> Result<u64>;

    /// Dead-letters a pending event: status failed, `failed_at` set, the message kept (cut to
    /// [`MAX_ERROR_BYTES`]). Idempotent on a dead letter; a published event is
    /// [`Error::InvalidState`]; an unknown id is [`Error::NotFound`].
    async fn mark_failed(&self, id: Uuid, error_message: &str) -> Result<()>;
}

/// The SeaORM implementation of [`OutboxRepository`], borrowing a connection or transaction.
///
/// ```no_run
/// use sea_orm::{DatabaseConnection, TransactionTrait, TransactionSession};
/// use seaorm_outbox::{NewEvent, Outbox, OutboxRepository};
///
/// # async fn f(db: DatabaseConnection) -> Result<(), Box<dyn std::error::Error>> {
/// let txn = db.begin().await?;
/// // ... your domain writes on &txn ...
/// Outbox::new(&txn)
///     .add_event(NewEvent::new("order.placed", "order", "42").payload(&serde_json::json!({"total": 5})))
///     .await?;
/// txn.commit().await?; // the order row and its event become visible together
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Outbox<'c, C> {
    db: &'c C,
    config: OutboxConfig,
}

impl<'c, C: ConnectionTrait> Outbox<'c, C> {
    /// A repository on `db` with the default [`OutboxConfig`].
    pub fn new(db: &'c C) -> Self {
        Self::with_config(db, OutboxConfig::default())
    }

    /// A repository on `db` with `config`.
    pub fn with_config(db: &'c C, config: OutboxConfig) -> Self {
        Self { db, config }
    }

    /// Stores a typed [`DomainEvent`]. Never commits.
    pub async fn add<E: DomainEvent + Sync>(&self, event: &E) -> Result<Uuid> {
        self.add_event(NewEvent::from_domain(event)).await
    }

    /// A snapshot of the backlog: pending split into due / backoff / leased, dead letters, the
    /// oldest pending event, and what was published in the last hour.
    pub async fn stats(&self) -> Result<crate::stats::OutboxStats> {
        crate::stats::OutboxStats::read(self.db).await
    }

    /// Health against `thresholds`; never fails: an unreadable database is
    /// [`HealthStatus::Unhealthy`](crate::HealthStatus::Unhealthy).
    pub async fn health(
        &self,
        thresholds: &crate::stats::HealthThresholds,
    ) -> crate::stats::Health {
        crate::stats::Health::from_stats(self.stats().await, thresholds)
    }

    /// One event by id, in any status.
    pub async fn get(&self, id: Uuid) -> Result<OutboxEvent> {
        OutboxEvents::find_by_id(id)
            .one(self.db)
            .await?
            .ok_or(Error::NotFound { id })?
            .try_into()
    }

    /// Dead letters, most recently failed first.
    pub async fn list_failed(&self, limit: u64, offset: u64) -> Result<Vec<OutboxEvent>> {
        check_limit(limit)?;
        OutboxEvents::find()
            .filter(Col::Status.eq(OutboxStatus::Failed))
            .order_by_desc(Col::FailedAt)
            .order_by_desc(Col::Id)
            .limit(limit)
            .offset(offset)
            .all(self.db)
            .await?
            .into_iter()
            .map(OutboxEvent::try_from)
            .collect()
    }

    /// How many dead letters there are.
    pub async fn count_failed(&self) -> Result<u64> {
        self.count(OutboxStatus::Failed).await
    }

    /// Puts a dead letter back to pending with attempts reset (replay). The last error is kept
    /// for the record. A pending or published event is [`Error::InvalidState`].
    pub async fn requeue(&self, id: Uuid) -> Result<()> {
        let n = self.requeue_where(Col::Id.eq(id)).await?;
        self.expect_one(n, id, "requeue", &[OutboxStatus::Failed])
            .await
    }

    /// Requeues every dead letter; returns how many.
    pub async fn requeue_all(&self) -> Result<u64> {
        self.requeue_where(Expr::value(true)).await
    }

    /// Requeues the dead letters of one aggregate; returns how many.
    pub async fn requeue_aggregate(&self, aggregate_type: &str, aggregate_id: &str) -> Result<u64> {
        self.requeue_where(
            sea_orm::Condition::all()
                .add(Col::AggregateType.eq(aggregate_type))
                .add(Col::AggregateId.eq(aggregate_id)),
        )
        .await
    }

    /// Deletes a dead letter for good. Only dead letters can be discarded.
    pub async fn discard(&self, id: Uuid) -> Result<()> {
        let res = OutboxEvents::delete_many()
            .filter(Col::Id.eq(id))
            .filter(Col::Status.eq(OutboxStatus::Failed))
            .exec(self.db)
            .await?;
        self.expect_one(res.rows_affected, id, "discard", &[]).await
    }

    /// Deletes published events whose `published_at` is older than `older_than`, at most
    /// `batch_size` rows per statement, until none are left. Returns how many were deleted.
    ///
    /// Run it on a connection, not inside a transaction: each batch then commits on its own,
    /// so a purge of millions of rows never holds one huge transaction or long locks.
    pub async fn purge_published(&self, older_than: DateTime<Utc>, batch_size: u64) -> Result<u64> {
        let mut total = 0;
        loop {
            let n = self.purge_published_batch(older_than, batch_size).await?;
            total += n;
            if n < batch_size {
                return Ok(total);
            }
        }
    }

    /// One statement of [`purge_published`](Self::purge_published): deletes at most
    /// `batch_size` published events older than `older_than`, oldest first, and returns how many.
    pub async fn purge_published_batch(
        &self,
        older_than: DateTime<Utc>,
        batch_size: u64,
    ) -> Result<u64> {
        if batch_size == 0 || batch_size > MAX_PAGE_SIZE {
            return Err(Error::LimitTooLarge {
                requested: batch_size,
                max: MAX_PAGE_SIZE,
            });
        }
        let backend = self.db.get_database_backend();
        let template = match backend {
            // MySQL cannot take LIMIT inside an IN subquery, but has DELETE … LIMIT.
            DbBackend::MySql => {
                "DELETE FROM outbox_events WHERE status = 'published' AND published_at < ? \
                 ORDER BY published_at LIMIT ?"
            }
            _ => {
                "DELETE FROM outbox_events WHERE id IN (SELECT id FROM outbox_events \
                 WHERE status = 'published' AND published_at < ? ORDER BY published_at LIMIT ?)"
            }
        };
        let res = self
            .db
            .execute_raw(sql::stmt(
                backend,
                template,
                vec![older_than.into(), (batch_size as i64).into()],
            ))
            .await?;
        Ok(res.rows_affected())
    }

    /// How many published events are older than `older_than` (what a purge would delete).
    pub async fn count_published_before(&self, older_than: DateTime<Utc>) -> Result<u64> {
        Ok(OutboxEvents::find()
            .filter(Col::Status.eq(OutboxStatus::Published))
            .filter(Col::PublishedAt.lt(older_than))
            .count(self.db)
            .await?)
    }

    async fn count(&self, status: OutboxStatus) -> Result<u64> {
        Ok(OutboxEvents::find()
            .filter(Col::Status.eq(status))
            .count(self.db)
            .await?)
    }

    async fn requeue_where(&self, cond: impl sea_orm::sea_query::IntoCondition) -> Result<u64> {
        let res = OutboxEvents::update_many()
            .col_expr(Col::Status, Expr::value(OutboxStatus::Pending))
            .col_expr(Col::Attempts, Expr::value(0))
            .col_expr(Col::NextAttemptAt, Expr::value(now()))
            .col_expr(Col::FailedAt, Expr::value(Option::<DateTime<Utc>>::None))
            .col_expr(Col::LockedBy, Expr::value(Option::<String>::None))
            .col_expr(Col::LockedUntil, Expr::value(Option::<DateTime<Utc>>::None))
            .filter(Col::Status.eq(OutboxStatus::Failed))
            .filter(cond)
            .exec(self.db)
            .await?;
        Ok(res.rows_affected)
    }

    /// After a conditional single-row change touched `n` rows: `Ok` if it touched one or the row
    /// is already in one of the `ok_if` states; otherwise why not.
    async fn expect_one(
        &self,
        n: u64,
        id: Uuid,
        operation: &'static str,
        ok_if: &[OutboxStatus],
    ) -> Result<()> {
        if n > 0 {
            return Ok(());
        }
        let status = OutboxEvents::find_by_id(id)
            .select_only()
            .column(Col::Status)
            .into_tuple::<OutboxStatus>()
            .one(self.db)
            .await?
            .ok_or(Error::NotFound { id })?;
        if ok_if.contains(&status) {
            Ok(())
        } else {
            Err(Error::InvalidState {
                id,
                status,
                operation,
            })
        }
    }
}

#[async_trait]
impl<C: ConnectionTrait> OutboxRepository for Outbox<'_, C> {
    async fn add_event(&self, event: NewEvent) -> Result<Uuid> {
        let mut ids = self.add_events(vec![event]).await?;
        Ok(ids.pop().unwrap_or_default())
    }

    async fn add_events(&self, events: Vec<NewEvent>) -> Result<Vec<Uuid>> {
        let max = self.config.max_payload_bytes;
        let valid = events
            .into_iter()
            .map(|e| e.validate(max))
            .collect::<Result<Vec<_>, _>>()?;
        let ids: Vec<Uuid> = valid.iter().map(|e| e.id).collect();
        let created_at = now();
        let backend = self.db.get_database_backend();
        // A hand-written INSERT: the statement a raw-SQL outbox would send, cached per backend
        // for the common single-event case, so the write path costs no more than one.
        let mut rows = valid.into_iter().peekable();
        while rows.peek().is_some() {
            let chunk: Vec<_> = rows.by_ref().take(INSERT_CHUNK).collect();
            let n = chunk.len();
            let mut values = Vec::with_capacity(n * INSERT_PARAMS);
            for e in chunk {
                values.extend([
                    e.id.into(),
                    e.event_type.into(),
                    e.aggregate_type.into(),
                    e.aggregate_id.into(),
                    sea_orm::Value::Json(Some(Box::new(e.payload))),
                    sea_orm::Value::Json(Some(Box::new(e.headers))),
                    e.occurred_at.into(),
                    created_at.into(),
                    created_at.into(),
                ]);
            }
            let sql = insert_sql(backend, n);
            self.db
                .execute_raw(sea_orm::Statement::from_sql_and_values(
                    backend,
                    sql.as_ref(),
                    values,
                ))
                .await?;
        }
        Ok(ids)
    }

    async fn get_unpublished(&self, limit: u64, offset: u64) -> Result<Vec<OutboxEvent>> {
        check_limit(limit)?;
        OutboxEvents::find()
            .filter(Col::Status.eq(OutboxStatus::Pending))
            .order_by_asc(Col::OccurredAt)
            .order_by_asc(Col::Id)
            .limit(limit)
            .offset(offset)
            .all(self.db)
            .await?
            .into_iter()
            .map(OutboxEvent::try_from)
            .collect()
    }

    async fn mark_published(&self, id: Uuid) -> Result<()> {
        let n = self.mark_published_many(&[id]).await?;
        debug_assert!(n <= 1);
        Ok(())
    }

    async fn mark_published_many(&self, ids: &[Uuid]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let res = OutboxEvents::update_many()
            .col_expr(Col::Status, Expr::value(OutboxStatus::Published))
            .col_expr(Col::PublishedAt, Expr::value(now()))
            .col_expr(Col::LockedBy, Expr::value(Option::<String>::None))
            .col_expr(Col::LockedUntil, Expr::value(Option::<DateTime<Utc>>::None))
            .filter(Col::Id.is_in(ids.iter().copied()))
            .filter(Col::Status.eq(OutboxStatus::Pending))
            .exec(self.db)
            .await?;
        let marked = res.rows_affected;
        if marked as usize == ids.len() {
            return Ok(marked);
        }
        // Some ids were not pending: find out whether each is fine (already published) or not.
        let found: Vec<(Uuid, OutboxStatus)> = OutboxEvents::find()
            .select_only()
            .column(Col::Id)
            .column(Col::Status)
            .filter(Col::Id.is_in(ids.iter().copied()))
            .into_tuple()
            .all(self.db)
            .await?;
        for id in ids {
            match found.iter().find(|(f, _)| f == id) {
                None => return Err(Error::NotFound { id: *id }),
                Some((_, OutboxStatus::Failed)) => {
                    return Err(Error::InvalidState {
                        id: *id,
                        status: OutboxStatus::Failed,
                        operation: "mark published",
                    });
                }
                Some(_) => {}
            }
        }
        Ok(marked)
    }

    async fn count_unpublished(&self) -> Result<u64> {
        self.count(OutboxStatus::Pending).await
    }

    async fn mark_failed(&self, id: Uuid, error_message: &str) -> Result<()> {
        let res = OutboxEvents::update_many()
            .col_expr(Col::Status, Expr::value(OutboxStatus::Failed))
            .col_expr(Col::FailedAt, Expr::value(now()))
            .col_expr(Col::LastError, Expr::value(truncate_error(error_message)))
            .col_expr(Col::LockedBy, Expr::value(Option::<String>::None))
            .col_expr(Col::LockedUntil, Expr::value(Option::<DateTime<Utc>>::None))
            .filter(Col::Id.eq(id))
            .filter(Col::Status.eq(OutboxStatus::Pending))
            .exec(self.db)
            .await?;
        self.expect_one(
            res.rows_affected,
            id,
            "mark failed",
            &[OutboxStatus::Failed],
        )
        .await
    }
}

/// Bound values per inserted event.
const INSERT_PARAMS: usize = 9;

/// `INSERT … VALUES (…)` for `rows` events; the one-row statement is built once per backend.
fn insert_sql(backend: DbBackend, rows: usize) -> std::borrow::Cow<'static, str> {
    use std::sync::OnceLock;
    static ONE: [OnceLock<String>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let build = |rows: usize| {
        let row = format!("({}, 'pending', 0)", sql::placeholders(INSERT_PARAMS));
        let sql = format!(
            "INSERT INTO outbox_events (id, event_type, aggregate_type, aggregate_id, payload, \
             headers, occurred_at, created_at, next_attempt_at, status, attempts) VALUES {}",
            vec![row; rows].join(", ")
        );
        sql::for_backend(backend, &sql).into_owned()
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

fn check_limit(limit: u64) -> Result<()> {
    if limit > MAX_PAGE_SIZE {
        return Err(Error::LimitTooLarge {
            requested: limit,
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
