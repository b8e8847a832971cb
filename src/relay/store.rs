//! The relay's SQL: claiming a batch under a lease, and writing outcomes back only while the
//! lease is still ours.
//!
//! A claim sets `locked_by` to a token unique to this batch and moves `next_attempt_at` to the
//! lease end, so a claimed row is simply "not due" to every other relay, and one partial index
//! on `(next_attempt_at, id) WHERE status = 'pending'` serves the claim. Every write-back is
//! conditional on `locked_by = token`: if the lease expired and another relay re-claimed the
//! row, the late writer changes nothing.
//!
//! * PostgreSQL: one `UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED) RETURNING *`.
//! * SQLite: the same statement without the lock clause; SQLite has one writer at a time, so the
//!   statement is atomic anyway.
//! * MySQL/MariaDB (no `UPDATE … RETURNING`, no `LIMIT` in `IN` subqueries): a short
//!   READ COMMITTED transaction of `SELECT … FOR UPDATE SKIP LOCKED` then `UPDATE`. It never
//!   spans the broker call.

use chrono::{DateTime, Utc};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, FromQueryResult, IsolationLevel,
    TransactionTrait, Value,
};
use seaorm_outbox_entity::OutboxEventModel;
use uuid::Uuid;

use super::config::{DeadLetterPolicy, Ordering};
use crate::error::Result;
use crate::sql::{placeholders, stmt};

/// What the relay decided for one claimed event.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Fate {
    Published,
    Retry {
        error: String,
        at: DateTime<Utc>,
    },
    Dead {
        error: String,
    },
    /// Not attempted (its aggregate is blocked, or the relay is stopping): hand it back.
    Release {
        at: DateTime<Utc>,
    },
}

/// How many rows each write-back touched; fewer than asked means the lease was lost.
#[derive(Debug, Default)]
pub(crate) struct WriteBack {
    pub(crate) published: u64,
    pub(crate) retried: u64,
    pub(crate) dead: u64,
    pub(crate) released: u64,
    pub(crate) expected: u64,
}

pub(crate) struct Claim<'a> {
    pub(crate) token: &'a str,
    pub(crate) now: DateTime<Utc>,
    pub(crate) lease_end: DateTime<Utc>,
    pub(crate) limit: u32,
    pub(crate) ordering: Ordering,
    pub(crate) policy: DeadLetterPolicy,
}

impl Claim<'_> {
    /// The statuses of earlier events that block an event under per-aggregate order.
    fn blocking(&self) -> &'static str {
        match self.policy {
            DeadLetterPolicy::Continue => "'pending'",
            DeadLetterPolicy::Hold => "'pending', 'failed'",
        }
    }

    /// `NOT EXISTS` an earlier blocking event of `e`'s aggregate: `e` is its aggregate's head.
    /// The row comparison is an index condition on `outbox_events_aggregate_idx`, so the probe
    /// reads one entry, not the aggregate's whole backlog. `fence` (PostgreSQL's `OFFSET 0`)
    /// keeps the planner from turning it into a hash anti-join over the whole backlog.
    fn is_head(&self, fence: &str) -> String {
        format!(
            "NOT EXISTS (SELECT 1 FROM outbox_events p \
               WHERE p.aggregate_type = e.aggregate_type AND p.aggregate_id = e.aggregate_id \
               AND p.status IN ({}) \
               AND (p.occurred_at, p.id) < (e.occurred_at, e.id){fence})",
            self.blocking()
        )
    }

    /// Due heads, oldest due first, at most `limit` of them.
    fn heads(&self, lock: &str, fence: &str) -> String {
        format!(
            "SELECT e.id, e.aggregate_type, e.aggregate_id FROM outbox_events e \
             WHERE e.status = 'pending' AND e.next_attempt_at <= ? AND {} \
             ORDER BY e.next_attempt_at, e.id LIMIT ?{lock}",
            self.is_head(fence)
        )
    }
}

/// Claims up to `claim.limit` due events, oldest due first.
///
/// Under per-aggregate order it first finds up to `limit` aggregate *heads* — due events with no
/// earlier pending event (nor, under [`DeadLetterPolicy::Hold`], dead letter) of their aggregate
/// — then takes each head's aggregate's next pending events, a prefix per aggregate, up to
/// `limit` in all. Nobody else can claim those followers while their head is pending, so the
/// prefix is ours to send in order. On PostgreSQL each head's share is capped at an equal split
/// of the batch, so the follower lookup reads a bounded number of index entries.
pub(crate) async fn claim(db: &DatabaseConnection, c: &Claim<'_>) -> Result<Vec<OutboxEventModel>> {
    let backend = db.get_database_backend();
    let limit = i64::from(c.limit);
    if backend == DbBackend::MySql {
        return claim_mysql(db, c).await;
    }
    let mut values: Vec<Value> = vec![c.token.into(), c.lease_end.into(), c.lease_end.into()];
    let ids = match (c.ordering, backend) {
        (Ordering::Unordered, _) => {
            values.extend([c.now.into(), limit.into()]);
            let lock = if backend == DbBackend::Postgres {
                " FOR UPDATE SKIP LOCKED"
            } else {
                ""
            };
            format!(
                "SELECT id FROM outbox_events WHERE status = 'pending' AND next_attempt_at <= ? \
                 ORDER BY next_attempt_at, id LIMIT ?{lock}"
            )
        }
        (Ordering::PerAggregate, DbBackend::Postgres) => {
            values.extend([c.now.into(), limit.into(), limit.into(), limit.into()]);
            format!(
                "WITH heads AS ({}) \
                 SELECT f.id FROM heads h CROSS JOIN LATERAL ( \
                   SELECT f.id, f.occurred_at FROM outbox_events f \
                   WHERE f.aggregate_type = h.aggregate_type AND f.aggregate_id = h.aggregate_id \
                   AND f.status = 'pending' ORDER BY f.occurred_at, f.id \
                   LIMIT (SELECT CEIL(?::float8 / GREATEST(COUNT(*), 1))::bigint FROM heads)) f \
                 ORDER BY f.occurred_at, f.id LIMIT ?",
                c.heads(" FOR UPDATE SKIP LOCKED", " OFFSET 0")
            )
        }
        (Ordering::PerAggregate, _) => {
            // SQLite: one writer at a time, so no locks; no LATERAL, so a plain join.
            values.extend([c.now.into(), limit.into(), limit.into()]);
            format!(
                "WITH heads AS ({}) \
                 SELECT f.id FROM outbox_events f JOIN heads h \
                   ON f.aggregate_type = h.aggregate_type AND f.aggregate_id = h.aggregate_id \
                 WHERE f.status = 'pending' ORDER BY f.occurred_at, f.id LIMIT ?",
                c.heads("", "")
            )
        }
    };
    let sql = format!(
        "UPDATE outbox_events SET locked_by = ?, locked_until = ?, next_attempt_at = ? \
         WHERE id IN ({ids}) RETURNING *"
    );
    let rows = db.query_all_raw(stmt(backend, &sql, values)).await?;
    rows.iter()
        .map(|r| OutboxEventModel::from_query_result(r, "").map_err(Into::into))
        .collect()
}

async fn claim_mysql(db: &DatabaseConnection, c: &Claim<'_>) -> Result<Vec<OutboxEventModel>> {
    let backend = DbBackend::MySql;
    let limit = i64::from(c.limit);
    // READ COMMITTED: no gap locks, so claims never block writers' inserts.
    let txn = db
        .begin_with_config(Some(IsolationLevel::ReadCommitted), None)
        .await?;
    let rows = match c.ordering {
        Ordering::Unordered => {
            txn.query_all_raw(stmt(
                backend,
                "SELECT * FROM outbox_events WHERE status = 'pending' AND next_attempt_at <= ? \
                 ORDER BY next_attempt_at, id LIMIT ? FOR UPDATE SKIP LOCKED",
                vec![c.now.into(), limit.into()],
            ))
            .await?
        }
        Ordering::PerAggregate => {
            // A locking read does not lock its subquery's rows, so the head check sees every
            // earlier pending event, locked or not.
            let heads = txn
                .query_all_raw(stmt(
                    backend,
                    &c.heads(" FOR UPDATE SKIP LOCKED", ""),
                    vec![c.now.into(), limit.into()],
                ))
                .await?;
            if heads.is_empty() {
                Vec::new()
            } else {
                let mut values: Vec<Value> = Vec::with_capacity(heads.len() * 2 + 1);
                let mut keys = Vec::with_capacity(heads.len());
                for h in &heads {
                    values.push(h.try_get::<String>("", "aggregate_type")?.into());
                    values.push(h.try_get::<String>("", "aggregate_id")?.into());
                    keys.push("(aggregate_type = ? AND aggregate_id = ?)");
                }
                values.push(limit.into());
                txn.query_all_raw(stmt(
                    backend,
                    &format!(
                        "SELECT * FROM outbox_events WHERE status = 'pending' AND ({}) \
                         ORDER BY occurred_at, id LIMIT ?",
                        keys.join(" OR ")
                    ),
                    values,
                ))
                .await?
            }
        }
    };
    let mut models = rows
        .iter()
        .map(|r| OutboxEventModel::from_query_result(r, ""))
        .collect::<Result<Vec<_>, _>>()?;
    if !models.is_empty() {
        let mut values: Vec<Value> = vec![c.token.into(), c.lease_end.into(), c.lease_end.into()];
        values.extend(models.iter().map(|m| Value::from(m.id)));
        txn.execute_raw(stmt(
            backend,
            &format!(
                "UPDATE outbox_events SET locked_by = ?, locked_until = ?, next_attempt_at = ? \
                 WHERE id IN ({})",
                placeholders(models.len())
            ),
            values,
        ))
        .await?;
        for m in &mut models {
            m.locked_by = Some(c.token.to_owned());
            m.locked_until = Some(c.lease_end);
            m.next_attempt_at = c.lease_end;
        }
    }
    txn.commit().await?;
    Ok(models)
}

/// Writes every fate back with at most one statement per kind, all conditional on the lease,
/// in one transaction when there is more than one kind.
pub(crate) async fn write_back(
    db: &DatabaseConnection,
    token: &str,
    now: DateTime<Utc>,
    fates: &[(Uuid, Fate)],
) -> Result<WriteBack> {
    let mut published = Vec::new();
    let mut retried = Vec::new();
    let mut dead = Vec::new();
    let mut released = Vec::new();
    for (id, fate) in fates {
        match fate {
            Fate::Published => published.push(*id),
            Fate::Retry { error, at } => retried.push((*id, error, *at)),
            Fate::Dead { error } => dead.push((*id, error)),
            Fate::Release { at } => released.push((*id, *at)),
        }
    }
    let kinds = [
        !published.is_empty(),
        !retried.is_empty(),
        !dead.is_empty(),
        !released.is_empty(),
    ]
    .iter()
    .filter(|k| **k)
    .count();
    let mut out = WriteBack {
        expected: fates.len() as u64,
        ..WriteBack::default()
    };
    if kinds == 0 {
        return Ok(out);
    }
    let backend = db.get_database_backend();
    let statements = build_write_back(backend, token, now, &published, &retried, &dead, &released);
    if kinds == 1 {
        for (kind, s) in statements {
            *out.slot(kind) = db.execute_raw(s).await?.rows_affected();
        }
    } else {
        let txn = db.begin().await?;
        for (kind, s) in statements {
            *out.slot(kind) = txn.execute_raw(s).await?.rows_affected();
        }
        txn.commit().await?;
    }
    Ok(out)
}

#[derive(Clone, Copy)]
enum Kind {
    Published,
    Retried,
    Dead,
    Released,
}

impl WriteBack {
    fn slot(&mut self, kind: Kind) -> &mut u64 {
        match kind {
            Kind::Published => &mut self.published,
            Kind::Retried => &mut self.retried,
            Kind::Dead => &mut self.dead,
            Kind::Released => &mut self.released,
        }
    }
}

const UNLOCK: &str = "locked_by = NULL, locked_until = NULL";

fn build_write_back(
    backend: DbBackend,
    token: &str,
    now: DateTime<Utc>,
    published: &[Uuid],
    retried: &[(Uuid, &String, DateTime<Utc>)],
    dead: &[(Uuid, &String)],
    released: &[(Uuid, DateTime<Utc>)],
) -> Vec<(Kind, sea_orm::Statement)> {
    let mut out = Vec::new();
    // `… WHERE locked_by = ? AND id IN (…)` with the token and ids appended to `values`.
    let finish = |sql: String, mut values: Vec<Value>, ids: Vec<Uuid>| {
        let sql = format!(
            "{sql} WHERE locked_by = ? AND id IN ({})",
            placeholders(ids.len())
        );
        values.push(token.into());
        values.extend(ids.into_iter().map(Value::from));
        stmt(backend, &sql, values)
    };
    // `CASE id WHEN ? THEN ? … END` over `pairs`.
    fn case(pairs: Vec<(Uuid, Value)>, values: &mut Vec<Value>) -> String {
        let mut sql = String::from("CASE id");
        for (id, v) in pairs {
            sql.push_str(" WHEN ? THEN ?");
            values.push(id.into());
            values.push(v);
        }
        sql.push_str(" END");
        sql
    }
    if !published.is_empty() {
        out.push((
            Kind::Published,
            finish(
                format!(
                    "UPDATE outbox_events SET status = 'published', published_at = ?, {UNLOCK}"
                ),
                vec![now.into()],
                published.to_vec(),
            ),
        ));
    }
    if !retried.is_empty() {
        let mut values = Vec::new();
        let errors = case(
            retried
                .iter()
                .map(|(id, e, _)| (*id, Value::from((*e).clone())))
                .collect(),
            &mut values,
        );
        let ats = case(
            retried
                .iter()
                .map(|(id, _, at)| (*id, Value::from(*at)))
                .collect(),
            &mut values,
        );
        out.push((
            Kind::Retried,
            finish(
                format!(
                    "UPDATE outbox_events SET attempts = attempts + 1, last_error = {errors}, \
                     next_attempt_at = {ats}, {UNLOCK}"
                ),
                values,
                retried.iter().map(|(id, _, _)| *id).collect(),
            ),
        ));
    }
    if !dead.is_empty() {
        let mut values = vec![now.into()];
        let errors = case(
            dead.iter()
                .map(|(id, e)| (*id, Value::from((*e).clone())))
                .collect(),
            &mut values,
        );
        out.push((
            Kind::Dead,
            finish(
                format!(
                    "UPDATE outbox_events SET status = 'failed', failed_at = ?, \
                     attempts = attempts + 1, last_error = {errors}, {UNLOCK}"
                ),
                values,
                dead.iter().map(|(id, _)| *id).collect(),
            ),
        ));
    }
    if !released.is_empty() {
        let mut values = Vec::new();
        let ats = case(
            released
                .iter()
                .map(|(id, at)| (*id, Value::from(*at)))
                .collect(),
            &mut values,
        );
        out.push((
            Kind::Released,
            finish(
                format!("UPDATE outbox_events SET next_attempt_at = {ats}, {UNLOCK}"),
                values,
                released.iter().map(|(id, _)| *id).collect(),
            ),
        ));
    }
    out
}
