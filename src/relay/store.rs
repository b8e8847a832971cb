//! The relay's SQL: claiming a batch under a lease, and writing outcomes back only while the
//! lease is still ours.
//!
//! * PostgreSQL: **one lease row per batch.** A claim takes a per-table advisory lock, drops
//!   expired leases, reads due rows that no live lease holds, and inserts one `outbox_leases`
//!   row with their ids; it writes no event row. The lock serialises claims, so each claim's
//!   snapshot sees every earlier claim's lease (without it, two claims could read the same rows
//!   before either lease committed). The write-back deletes the lease and updates the rows in
//!   one transaction; if the lease is gone (it expired and another relay took the rows over),
//!   it changes nothing. A stamped row lease cost a second full row write per event, which
//!   capped throughput near half a raw claim-and-mark loop (BENCHMARKS.md).
//! * SQLite: `UPDATE … SET locked_by, locked_until, next_attempt_at WHERE id IN (SELECT …)
//!   RETURNING …`. A claimed row is simply "not due" to everyone else; SQLite has one writer
//!   at a time, so the statement is atomic. Write-backs are conditional on `locked_by = token`.
//! * MySQL/MariaDB (no `UPDATE … RETURNING`, no `LIMIT` in `IN` subqueries): the same row lease
//!   in a short READ COMMITTED transaction of `SELECT … FOR UPDATE SKIP LOCKED` then `UPDATE`.
//!
//! No claim transaction ever spans the broker call.

use chrono::{DateTime, Utc};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, IsolationLevel, QueryResult, TransactionTrait,
    Value,
};
use uuid::Uuid;

use super::config::{DeadLetterPolicy, Ordering};
use super::cursor::DueKey;
use crate::error::Result;
use crate::event::{CLAIMED_COLUMNS, OutboxEvent};
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

/// A claimed row: the event, or (its id if readable, why not) for a row this library cannot read.
pub(crate) type ClaimedRow = std::result::Result<OutboxEvent, (Option<Uuid>, String)>;

/// What a claim found.
pub(crate) struct Claimed {
    pub(crate) rows: Vec<ClaimedRow>,
    /// It searched the whole due backlog for aggregate heads (per-aggregate order). An empty
    /// claim that did is the one expensive poll worth throttling; any other empty claim is
    /// cheap, and a slow one only means a busy server.
    pub(crate) walked: bool,
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
    /// A claim made while this relay's previous batch is still being written back: under
    /// per-aggregate order it only looks within the window and never walks the backlog, as its
    /// own in-flight aggregates may be all that is left.
    pub(crate) opportunistic: bool,
    /// Per-aggregate order on PostgreSQL: the most consecutive events one aggregate adds to
    /// the batch ([`next_share`]).
    pub(crate) share: u32,
    /// PostgreSQL: where the scan of due rows starts ([`super::cursor`]); `None` scans them all.
    /// The relay passes `None` on the other backends, which leave no dead index entries behind.
    pub(crate) from: Option<DueKey>,
}

impl Claim<'_> {
    /// Reads claimed rows of [`CLAIMED_COLUMNS`] into events leased to this claim's token.
    fn read(&self, rows: &[QueryResult]) -> Vec<ClaimedRow> {
        #[cfg(feature = "postgres")]
        if let Some(first) = rows.first().and_then(QueryResult::try_as_pg_row)
            && crate::event::pg::claimed_types_match(first)
        {
            return rows
                .iter()
                .map(|r| match r.try_as_pg_row() {
                    Some(pg) => crate::event::pg::from_claimed_row(pg, self.token),
                    None => OutboxEvent::from_claimed_row(r, self.token),
                })
                .collect();
        }
        rows.iter()
            .map(|r| OutboxEvent::from_claimed_row(r, self.token))
            .collect()
    }

    /// The statuses of earlier events that block an event under per-aggregate order.
    fn blocking(&self) -> &'static str {
        match self.policy {
            DeadLetterPolicy::Continue => "'pending'",
            DeadLetterPolicy::Hold => "'pending', 'failed'",
        }
    }

    /// `NOT EXISTS` an earlier blocking event of `e`'s aggregate: `e` is its aggregate's head.
    /// The row comparison is an index condition on `outbox_events_aggregate_idx`, so the probe
    /// reads one entry, not the aggregate's whole backlog. `fence` is [`PG_PROBE`] on
    /// PostgreSQL, which keeps the probe a plain index scan rather than a hash anti-join.
    fn is_head(&self, fence: &str) -> String {
        format!(
            "NOT EXISTS (SELECT 1 FROM outbox_events p \
               WHERE p.aggregate_type = e.aggregate_type AND p.aggregate_id = e.aggregate_id \
               AND p.status IN ({}) \
               AND (p.occurred_at, p.id) < (e.occurred_at, e.id){fence})",
            self.blocking()
        )
    }

    /// Due heads, oldest due first, at most `limit` of them. `also` is an extra condition on
    /// `e` (PostgreSQL: not held by a live lease).
    fn heads(&self, lock: &str, fence: &str, also: &str) -> String {
        format!(
            "SELECT e.id, e.aggregate_type, e.aggregate_id FROM outbox_events e \
             WHERE e.status = 'pending' AND e.next_attempt_at <= ?{also} AND {} \
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
/// prefix is ours to send in order. On PostgreSQL each head adds at most `claim.share` events
/// and heads are looked for only until the batch is full; elsewhere each head's share is an even
/// split of the batch.
pub(crate) async fn claim(db: &DatabaseConnection, c: &Claim<'_>) -> Result<Claimed> {
    let backend = db.get_database_backend();
    let limit = i64::from(c.limit);
    // Without PostgreSQL's window, every ordered claim searches the due rows for heads.
    let walked = c.ordering == Ordering::PerAggregate;
    match backend {
        DbBackend::MySql => {
            let rows = claim_mysql(db, c).await?;
            return Ok(Claimed { rows, walked });
        }
        DbBackend::Postgres => return claim_postgres(db, c).await,
        _ => {}
    }
    let mut values: Vec<Value> = vec![c.token.into(), c.lease_end.into(), c.lease_end.into()];
    let ids = match c.ordering {
        Ordering::Unordered => {
            values.extend([c.now.into(), limit.into()]);
            "SELECT id FROM outbox_events WHERE status = 'pending' AND next_attempt_at <= ? \
             ORDER BY next_attempt_at, id LIMIT ?"
                .to_owned()
        }
        Ordering::PerAggregate => {
            // One writer at a time, so no locks; no LATERAL, so a plain join.
            values.extend([c.now.into(), limit.into(), limit.into()]);
            format!(
                "WITH heads AS ({}) \
                 SELECT f.id FROM outbox_events f JOIN heads h \
                   ON f.aggregate_type = h.aggregate_type AND f.aggregate_id = h.aggregate_id \
                 WHERE f.status = 'pending' ORDER BY f.occurred_at, f.id LIMIT ?",
                c.heads("", "", "")
            )
        }
    };
    let sql = format!(
        "UPDATE outbox_events SET locked_by = ?, locked_until = ?, next_attempt_at = ? \
         WHERE id IN ({ids}) RETURNING {CLAIMED_COLUMNS}"
    );
    let rows = db.query_all_raw(stmt(backend, &sql, values)).await?;
    Ok(Claimed {
        rows: c.read(&rows),
        walked,
    })
}

/// The run per aggregate for a relay's next ordered claim on PostgreSQL, from what its last
/// claim (made with `current`) got: `claimed` events from `aggregates` aggregates, the longest
/// run being `longest`.
///
/// * A full batch: ease back by an eighth towards `floor`, so that once many aggregates are due
///   again, batches spread over them and need fewer waves.
/// * A short batch with a run cut at `current`: too few aggregates are due to fill a batch, so
///   give each an even split of it.
/// * A short batch with every run complete: the backlog is shallow; back to `floor`.
pub(crate) fn next_share(
    current: u32,
    floor: u32,
    limit: u32,
    claimed: usize,
    aggregates: usize,
    longest: usize,
) -> u32 {
    let current = current.max(floor);
    let reached = |n: usize, of: u32| u64::try_from(n).unwrap_or(u64::MAX) >= u64::from(of);
    if reached(claimed, limit) {
        (current - current / 8).max(floor)
    } else if aggregates > 0 && reached(longest, current) {
        let aggregates = u32::try_from(aggregates).unwrap_or(u32::MAX);
        limit.div_ceil(aggregates).max(floor)
    } else {
        floor
    }
}

/// The ids held by a live batch lease (PostgreSQL); binds the current time.
pub(crate) const LIVE_LEASED_IDS: &str =
    "SELECT unnest(ids) AS id FROM outbox_leases WHERE locked_until >= ?";

/// Condition on `e`: not held by a live lease; needs a `leased` CTE of [`LIVE_LEASED_IDS`].
const NOT_LEASED: &str = " AND e.id NOT IN (SELECT id FROM leased)";

/// Serialises claims on one outbox table: keyed by the table's oid, so outboxes in other
/// schemas of the same database never wait on each other.
const CLAIM_LOCK: &str = "SELECT pg_advisory_xact_lock(hashtext('seaorm_outbox.claim'), \
     ('outbox_leases'::regclass::oid::bigint % 2147483647)::int)";

/// PostgreSQL: see the module docs.
async fn claim_postgres(db: &DatabaseConnection, c: &Claim<'_>) -> Result<Claimed> {
    let claimed = |rows, walked| Claimed { rows, walked };
    match c.ordering {
        Ordering::Unordered => Ok(claimed(lease_postgres(db, c, None).await?, false)),
        Ordering::PerAggregate => {
            // Finding a head can mean walking every due row when most aggregates are busy
            // (each non-head costs an index probe: about a second over 200,000 rows, see
            // BENCHMARKS.md). So claim heads among the oldest due rows only; if there are none
            // there, look for one anywhere outside the lock (which the walk would otherwise
            // hold that long), and only if there is one, walk the backlog under the lock.
            let window = i64::from(c.limit).saturating_mul(HEAD_WINDOW);
            let rows = lease_postgres(db, c, Some(window)).await?;
            if !rows.is_empty() || c.opportunistic || !any_head(db, c).await? {
                return Ok(claimed(rows, false));
            }
            Ok(claimed(lease_postgres(db, c, None).await?, true))
        }
    }
}

/// The tail of PostgreSQL's head probe. `OFFSET 0` keeps the planner from turning the probe
/// into a hash anti-join over the whole backlog. The `next_attempt_at` test, true of every row,
/// names a column outside the aggregate index, so the probe is a plain index scan: that marks
/// the entries of the aggregate's already-published events dead as it passes them, and later
/// probes skip them. An index-only scan never does, and fetched every published predecessor
/// from the heap on every probe: 100 per probe half way through a 200-per-aggregate drain, the
/// main cost of an ordered claim as a backlog drains (BENCHMARKS.md).
const PG_PROBE: &str = " AND p.next_attempt_at IS NOT NULL OFFSET 0";

/// How many due rows per batch slot the first ordered claim looks through for heads.
const HEAD_WINDOW: i64 = 8;

/// One claim under the lock; `window` bounds the due rows searched for heads. Two statements
/// in one short transaction: the advisory lock, then drop-expired + select + insert-lease as one
/// statement, whose snapshot is taken after the lock, so it sees every earlier claim's lease.
async fn lease_postgres(
    db: &DatabaseConnection,
    c: &Claim<'_>,
    window: Option<i64>,
) -> Result<Vec<ClaimedRow>> {
    let backend = DbBackend::Postgres;
    let limit = i64::from(c.limit);
    // `?`s in order: now (expired), now (live), then the selection's own, then token, lease end.
    let mut values: Vec<Value> = vec![c.now.into(), c.now.into()];
    // The row comparison is an index condition on the due index: the scan starts there.
    let (live, from) = match c.from {
        Some((at, id)) => (
            format!("{NOT_LEASED} AND (e.next_attempt_at, e.id) >= (?, ?)"),
            vec![Value::from(at), Value::from(id)],
        ),
        None => (NOT_LEASED.to_owned(), Vec::new()),
    };
    let picked = match c.ordering {
        Ordering::Unordered => {
            values.push(c.now.into());
            values.extend(from);
            values.push(limit.into());
            format!(
                "SELECT e.* FROM outbox_events e WHERE e.status = 'pending' \
                 AND e.next_attempt_at <= ?{live} ORDER BY e.next_attempt_at, e.id LIMIT ?"
            )
        }
        Ordering::PerAggregate => {
            let heads = match window {
                Some(w) => {
                    values.push(c.now.into());
                    values.extend(from);
                    values.extend([w.into(), limit.into()]);
                    format!(
                        "SELECT e.id, e.aggregate_type, e.aggregate_id FROM ( \
                           SELECT e.id, e.aggregate_type, e.aggregate_id, e.occurred_at, \
                             e.next_attempt_at FROM outbox_events e \
                           WHERE e.status = 'pending' AND e.next_attempt_at <= ?{live} \
                           ORDER BY e.next_attempt_at, e.id LIMIT ?) e \
                         WHERE {} ORDER BY e.next_attempt_at, e.id LIMIT ?",
                        c.is_head(PG_PROBE)
                    )
                }
                // The walk for a head anywhere: from the start, as `any_head` found one there.
                None => {
                    values.extend([c.now.into(), limit.into()]);
                    c.heads("", PG_PROBE, NOT_LEASED)
                }
            };
            values.extend([i64::from(c.share.max(1)).into(), limit.into()]);
            // A nested loop pulled through the outer `LIMIT`: each head found, in due order,
            // adds up to `share` of its aggregate's oldest pending events (itself first), and
            // the search for heads stops as soon as the batch is full. So a batch of 500 from
            // aggregates with long backlogs costs 500 / `share` head probes, not 500, and
            // leaves the other aggregates to concurrent relays. A cut can only shorten the last
            // head's run, so every aggregate's part is still a prefix.
            format!(
                "SELECT f.* FROM ({heads}) h CROSS JOIN LATERAL ( \
                   SELECT f.* FROM outbox_events f \
                   WHERE f.aggregate_type = h.aggregate_type AND f.aggregate_id = h.aggregate_id \
                   AND f.status = 'pending' AND f.id NOT IN (SELECT id FROM leased) \
                   ORDER BY f.occurred_at, f.id LIMIT ?) f \
                 LIMIT ?"
            )
        }
    };
    values.extend([c.token.into(), c.lease_end.into()]);
    let sql = format!(
        "WITH expired AS (DELETE FROM outbox_leases WHERE locked_until < ?), \
         leased AS ({LIVE_LEASED_IDS}), \
         picked AS ({picked}), \
         lease AS (INSERT INTO outbox_leases (token, locked_until, ids) \
           SELECT ?, ?, array_agg(id) FROM picked HAVING COUNT(*) > 0) \
         SELECT {CLAIMED_COLUMNS} FROM picked"
    );
    let txn = db.begin().await?;
    txn.execute_unprepared(CLAIM_LOCK).await?;
    let rows = txn.query_all_raw(stmt(backend, &sql, values)).await?;
    txn.commit().await?;
    Ok(c.read(&rows))
}

/// PostgreSQL, per-aggregate order: whether any due head is free of a live lease.
async fn any_head(db: &DatabaseConnection, c: &Claim<'_>) -> Result<bool> {
    let sql = format!(
        "WITH leased AS ({LIVE_LEASED_IDS}) {}",
        c.heads("", PG_PROBE, NOT_LEASED)
    );
    let rows = db
        .query_all_raw(stmt(
            DbBackend::Postgres,
            &sql,
            vec![c.now.into(), c.now.into(), 1i64.into()],
        ))
        .await?;
    Ok(!rows.is_empty())
}

async fn claim_mysql(db: &DatabaseConnection, c: &Claim<'_>) -> Result<Vec<ClaimedRow>> {
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
                &format!(
                    "SELECT {CLAIMED_COLUMNS} FROM outbox_events \
                     WHERE status = 'pending' AND next_attempt_at <= ? \
                     ORDER BY next_attempt_at, id LIMIT ? FOR UPDATE SKIP LOCKED"
                ),
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
                    &c.heads(" FOR UPDATE SKIP LOCKED", "", ""),
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
                        "SELECT {CLAIMED_COLUMNS} FROM outbox_events \
                         WHERE status = 'pending' AND ({}) ORDER BY occurred_at, id LIMIT ?",
                        keys.join(" OR ")
                    ),
                    values,
                ))
                .await?
            }
        }
    };
    let mut claimed = c.read(&rows);
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
            backend,
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
    Ok(claimed)
}

/// Writes every fate back with at most one statement per kind, all conditional on the lease:
/// on PostgreSQL by deleting the batch's lease row first, in the same transaction; elsewhere by
/// `locked_by = token` on each row, in one transaction when there is more than one kind.
pub(crate) async fn write_back(
    db: &DatabaseConnection,
    token: &str,
    now: DateTime<Utc>,
    fates: &[(Uuid, Fate)],
) -> Result<WriteBack> {
    let mut out = WriteBack {
        expected: fates.len() as u64,
        ..WriteBack::default()
    };
    let backend = db.get_database_backend();
    if backend == DbBackend::Postgres {
        if fates.iter().all(|(_, f)| *f == Fate::Published) {
            // The common case in one statement: the lease row carries the ids, so none are sent.
            out.published = db
                .execute_raw(stmt(
                    backend,
                    "WITH lease AS (DELETE FROM outbox_leases WHERE token = ? RETURNING ids) \
                     UPDATE outbox_events SET status = 'published', published_at = ? \
                     WHERE id = ANY((SELECT ids FROM lease)::uuid[]) AND status = 'pending'",
                    vec![token.into(), now.into()],
                ))
                .await?
                .rows_affected();
            return Ok(out);
        }
        let txn = db.begin().await?;
        let held = txn
            .execute_raw(stmt(
                backend,
                "DELETE FROM outbox_leases WHERE token = ?",
                vec![token.into()],
            ))
            .await?
            .rows_affected();
        if held == 0 {
            // Expired and taken over: the new owner decides these events' fate.
            txn.rollback().await?;
            return Ok(out);
        }
        // Released events that may go again at once need no row write: dropping the lease
        // hands them back.
        let free_now = |f: &Fate| matches!(f, Fate::Release { at } if *at <= now);
        out.released = fates.iter().filter(|(_, f)| free_now(f)).count() as u64;
        let rest = sort_fates(fates.iter().filter(|(_, f)| !free_now(f)));
        for (kind, s) in build_write_back(backend, None, now, &rest) {
            *out.slot(kind) += txn.execute_raw(s).await?.rows_affected();
        }
        txn.commit().await?;
        return Ok(out);
    }
    let sorted = sort_fates(fates);
    let statements = build_write_back(backend, Some(token), now, &sorted);
    if statements.len() <= 1 {
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

/// Fates grouped by kind, each group one statement.
#[derive(Default)]
struct Sorted<'a> {
    published: Vec<Uuid>,
    retried: Vec<(Uuid, &'a String, DateTime<Utc>)>,
    dead: Vec<(Uuid, &'a String)>,
    released: Vec<(Uuid, DateTime<Utc>)>,
}

fn sort_fates<'a>(fates: impl IntoIterator<Item = &'a (Uuid, Fate)>) -> Sorted<'a> {
    let mut s = Sorted::default();
    for (id, fate) in fates {
        match fate {
            Fate::Published => s.published.push(*id),
            Fate::Retry { error, at } => s.retried.push((*id, error, *at)),
            Fate::Dead { error } => s.dead.push((*id, error)),
            Fate::Release { at } => s.released.push((*id, *at)),
        }
    }
    s
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

/// One statement per non-empty kind. `row_lease`: `Some(token)` where rows carry the lease
/// (each statement is conditional on it and clears it); `None` on PostgreSQL, where the caller
/// holds the batch's lease row and the rows need only still be pending.
fn build_write_back(
    backend: DbBackend,
    row_lease: Option<&str>,
    now: DateTime<Utc>,
    sorted: &Sorted<'_>,
) -> Vec<(Kind, sea_orm::Statement)> {
    let Sorted {
        published,
        retried,
        dead,
        released,
    } = sorted;
    let mut out = Vec::new();
    // `… WHERE <lease> AND id IN (…)`, the guard's values and the ids appended to `values`.
    let finish = |sql: String, mut values: Vec<Value>, ids: Vec<Uuid>| {
        let sql = match row_lease {
            Some(token) => {
                values.push(token.into());
                format!(
                    "{sql}, locked_by = NULL, locked_until = NULL \
                     WHERE locked_by = ? AND id IN ({})",
                    placeholders(ids.len())
                )
            }
            None => format!(
                "{sql} WHERE status = 'pending' AND id IN ({})",
                placeholders(ids.len())
            ),
        };
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
                "UPDATE outbox_events SET status = 'published', published_at = ?".to_owned(),
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
                     next_attempt_at = {ats}"
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
                     attempts = attempts + 1, last_error = {errors}"
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
                format!("UPDATE outbox_events SET next_attempt_at = {ats}"),
                values,
                released.iter().map(|(id, _)| *id).collect(),
            ),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::next_share;

    #[test]
    fn share_deepens_only_when_runs_were_cut_and_eases_back_when_full() {
        // 1,000 aggregates with long backlogs: 63 runs of 8 fill the batch; it stays at 8.
        assert_eq!(next_share(8, 8, 500, 500, 63, 8), 8);
        // Ten hot aggregates: runs of 8 were cut, batch short → an even split of 500.
        assert_eq!(next_share(8, 8, 500, 80, 10, 8), 50);
        // Full at 50: ease back by an eighth, then refill from the short batch that follows.
        assert_eq!(next_share(50, 8, 500, 500, 10, 50), 44);
        assert_eq!(next_share(44, 8, 500, 440, 10, 44), 50);
        // Shallow backlog (every run complete): back to the floor at once.
        assert_eq!(next_share(50, 8, 500, 30, 20, 3), 8);
        // Never below the floor, nor an empty batch's division by zero.
        assert_eq!(next_share(8, 8, 500, 500, 500, 1), 8);
        assert_eq!(next_share(1, 8, 500, 0, 0, 0), 8);
        assert_eq!(next_share(8, 8, 500, 8, 1, 8), 500);
    }
}
