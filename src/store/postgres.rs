//! PostgreSQL: **one lease row per batch**, and claimed rows decoded straight from sqlx.
//!
//! A claim takes a per-table advisory lock, drops expired leases, reads due rows that no live
//! lease holds, and inserts one `outbox_leases` row with their ids; it writes no event row. The
//! lock serialises claims, so each claim's snapshot sees every earlier claim's lease (without
//! it, two claims could read the same rows before either lease committed). The write-back
//! deletes the lease and updates the rows in one transaction; if the lease is gone (it expired
//! and another relay took the rows over), it changes nothing. A stamped row lease cost a second
//! full row write per event, which capped throughput near half a raw claim-and-mark loop
//! (BENCHMARKS.md).

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, TransactionTrait, Value};
use uuid::Uuid;

use super::claim::{Claim, Claimed};
use super::rows::{CLAIMED_COLUMNS, ClaimedRow, read_claimed};
use super::sql::stmt;
use super::write_back::{self, Fate, Guard, OnPublish, WriteBack};
use crate::error::Result;

const PG: DbBackend = DbBackend::Postgres;

/// The ids held by a live batch lease; binds the current time.
const LIVE_LEASED_IDS: &str = "SELECT unnest(ids) AS id FROM outbox_leases WHERE locked_until >= ?";

/// Condition on `e`: not held by a live lease; needs a `leased` CTE of [`LIVE_LEASED_IDS`].
const NOT_LEASED: &str = " AND e.id NOT IN (SELECT id FROM leased)";

/// Serialises claims on one outbox table: keyed by the lease table's oid, which
/// `outbox_leases` resolves to through the connection's `search_path`, so outboxes in other
/// schemas of the same database (other tenants, say) never wait on each other.
const CLAIM_LOCK: &str = "SELECT pg_advisory_xact_lock(hashtext('seaorm_outbox.claim'), \
     ('outbox_leases'::regclass::oid::bigint % 2147483647)::int)";

/// The tail of the head probe. `OFFSET 0` keeps the planner from turning the probe into a hash
/// anti-join over the whole backlog. The `next_attempt_at` test, true of every row, names a
/// column outside the aggregate index, so the probe is a plain index scan: that marks the
/// entries of the aggregate's already-published events dead as it passes them, and later probes
/// skip them. An index-only scan never does, and fetched every published predecessor from the
/// heap on every probe: 100 per probe half way through a 200-per-aggregate drain, the main cost
/// of an ordered claim as a backlog drains (BENCHMARKS.md).
const PROBE: &str = " AND p.next_attempt_at IS NOT NULL OFFSET 0";

/// How many due rows per batch slot the first ordered claim looks through for heads.
const HEAD_WINDOW: i64 = 8;

/// The longest run per aggregate for which an ordered claim tests heads and reads their runs
/// with one probe (the default `events_per_aggregate`).
const ONE_PROBE_MAX_SHARE: u32 = 8;

/// The sqlx pool behind `db`, if it is a PostgreSQL pool (not a mock or proxy).
#[cfg(feature = "postgres")]
pub(crate) fn pool(db: &DatabaseConnection) -> Option<&sea_orm::sqlx::PgPool> {
    match &db.inner {
        sea_orm::DatabaseConnectionType::SqlxPostgresPoolConnection(_) => {
            Some(db.get_postgres_connection_pool())
        }
        _ => None,
    }
}

/// The schema this pool's connections write to: the insert trigger's NOTIFY payload, so a
/// listener can tell its own outbox's wake-ups from other schemas'.
#[cfg(feature = "postgres")]
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn current_schema(
    pool: &sea_orm::sqlx::PgPool,
) -> Result<String, sea_orm::sqlx::Error> {
    sea_orm::sqlx::query_scalar("SELECT current_schema()")
        .fetch_one(pool)
        .await
}

/// Claims a batch: see the module docs and [`super::claim`].
pub(super) async fn claim(db: &DatabaseConnection, c: &Claim<'_>) -> Result<Claimed> {
    let claimed = |rows, walked| Claimed { rows, walked };
    if !c.ordered {
        return Ok(claimed(lease(db, c, None).await?, false));
    }
    // Finding a head can mean walking every due row when most aggregates are busy (each
    // non-head costs an index probe: about a second over 200,000 rows, see BENCHMARKS.md). So
    // claim heads among the oldest due rows only; if there are none there, look for one anywhere
    // outside the lock (which the walk would otherwise hold that long), and only if there is
    // one, walk the backlog under the lock.
    let window = i64::from(c.limit).saturating_mul(HEAD_WINDOW);
    let rows = lease(db, c, Some(window)).await?;
    if !rows.is_empty() || c.opportunistic || !any_head(db, c).await? {
        return Ok(claimed(rows, false));
    }
    Ok(claimed(lease(db, c, None).await?, true))
}

/// One claim under the lock; `window` bounds the due rows searched for heads. Two statements
/// in one short transaction: the advisory lock, then drop-expired + select + insert-lease as one
/// statement, whose snapshot is taken after the lock, so it sees every earlier claim's lease.
async fn lease(
    db: &DatabaseConnection,
    c: &Claim<'_>,
    window: Option<i64>,
) -> Result<Vec<ClaimedRow>> {
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
    let picked = if !c.ordered {
        values.push(c.now.into());
        values.extend(from);
        values.push(limit.into());
        format!(
            "SELECT e.* FROM outbox_events e WHERE e.status = 'pending' \
             AND e.next_attempt_at <= ?{live} ORDER BY e.next_attempt_at, e.id LIMIT ?"
        )
    } else if let Some(w) = window.filter(|_| c.share <= ONE_PROBE_MAX_SHARE) {
        values.push(c.now.into());
        values.extend(from);
        values.extend([w.into(), i64::from(c.share.max(1)).into(), limit.into()]);
        // One probe per candidate instead of two: the candidate's aggregate's oldest blocking
        // events, `share` of them, are read once. The candidate is a head if it comes first;
        // its run is the prefix up to the first event that is not pending or is leased. With
        // one event per aggregate this halves the index descents of a claim (BENCHMARKS.md).
        // A candidate that is not a head costs up to `share` rows instead of one, so only short
        // runs take this form; the walk and longer runs keep the separate head probe.
        format!(
            "SELECT f.* FROM ( \
               SELECT e.id, e.aggregate_type, e.aggregate_id, e.next_attempt_at \
               FROM outbox_events e \
               WHERE e.status = 'pending' AND e.next_attempt_at <= ?{live} \
               ORDER BY e.next_attempt_at, e.id LIMIT ?) e \
             CROSS JOIN LATERAL ( \
               SELECT f.* FROM ( \
                 SELECT f.*, first_value(f.id) OVER w AS run_head, \
                   bool_and(f.status = 'pending' AND f.id NOT IN (SELECT id FROM leased)) \
                     OVER w AS run_free \
                 FROM (SELECT f.* FROM outbox_events f \
                   WHERE f.aggregate_type = e.aggregate_type \
                   AND f.aggregate_id = e.aggregate_id AND f.status IN ({}){} \
                   ORDER BY f.occurred_at, f.id LIMIT ?) f \
                 WINDOW w AS (ORDER BY f.occurred_at, f.id)) f \
               WHERE f.run_head = e.id AND f.run_free) f \
             LIMIT ?",
            c.blocking(),
            Claim::not_scheduled_after_e("f")
        )
    } else {
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
                    c.is_head(PROBE)
                )
            }
            // The walk for a head anywhere: from the start, as `any_head` found one there.
            None => {
                values.extend([c.now.into(), limit.into()]);
                c.heads("", PROBE, NOT_LEASED)
            }
        };
        values.extend([c.now.into(), i64::from(c.share.max(1)).into(), limit.into()]);
        // A nested loop pulled through the outer `LIMIT`: each head found, in due order, adds
        // up to `share` of its aggregate's oldest pending events (itself first), and the search
        // for heads stops as soon as the batch is full. So a batch of 500 from aggregates with
        // long backlogs costs 500 / `share` head probes, not 500, and leaves the other
        // aggregates to concurrent relays. A cut can only shorten the last head's run, so every
        // aggregate's part is still a prefix.
        format!(
            "SELECT f.* FROM ({heads}) h CROSS JOIN LATERAL ( \
               SELECT f.* FROM outbox_events f \
               WHERE f.aggregate_type = h.aggregate_type AND f.aggregate_id = h.aggregate_id \
               AND f.status = 'pending' AND f.id NOT IN (SELECT id FROM leased){} \
               ORDER BY f.occurred_at, f.id LIMIT ?) f \
             LIMIT ?",
            Claim::not_scheduled_yet("f.")
        )
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
    let rows = txn.query_all_raw(stmt(PG, &sql, values)).await?;
    txn.commit().await?;
    Ok(read_claimed(&rows, c.token))
}

/// Per-aggregate order: whether any due head is free of a live lease.
async fn any_head(db: &DatabaseConnection, c: &Claim<'_>) -> Result<bool> {
    let sql = format!(
        "WITH leased AS ({LIVE_LEASED_IDS}) {}",
        c.heads("", PROBE, NOT_LEASED)
    );
    let rows = db
        .query_all_raw(stmt(
            PG,
            &sql,
            vec![c.now.into(), c.now.into(), 1i64.into()],
        ))
        .await?;
    Ok(!rows.is_empty())
}

/// Deletes the pending rows whose id passes `id_test` (`= ANY(…)`, `IN (…)`) and adds them to
/// `now`'s minute in `outbox_published_tally`, in one statement; returns how many it deleted.
/// `with` holds common table expressions the test reads, each followed by `, `; `values` are
/// theirs and the test's, in order.
pub(super) async fn delete_tallied(
    db: &impl ConnectionTrait,
    with: &str,
    id_test: &str,
    mut values: Vec<Value>,
    now: DateTime<Utc>,
) -> Result<u64> {
    values.push(write_back::minute(now).into());
    let sql = format!(
        "WITH {with}gone AS (DELETE FROM outbox_events \
           WHERE id {id_test} AND status = 'pending' RETURNING 1), \
         n AS (SELECT COUNT(*) AS n FROM gone), \
         tally AS (INSERT INTO outbox_published_tally (minute, events) \
           SELECT ?, n FROM n WHERE n > 0 \
           ON CONFLICT (minute) DO UPDATE \
           SET events = outbox_published_tally.events + excluded.events) \
         SELECT n FROM n"
    );
    let n: i64 = match db.query_one_raw(stmt(PG, &sql, values)).await? {
        Some(r) => r.try_get_by_index(0)?,
        None => 0,
    };
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Writes a batch back under its lease row: deleting the row first, in the same transaction,
/// makes every statement conditional on still holding the lease.
pub(super) async fn write_back(
    db: &DatabaseConnection,
    token: &str,
    now: DateTime<Utc>,
    fates: &[(Uuid, Fate)],
    on_publish: OnPublish,
) -> Result<WriteBack> {
    let mut out = WriteBack::expecting(fates);
    let all_published = fates.iter().all(|(_, f)| *f == Fate::Published);
    if all_published && on_publish == OnPublish::Delete {
        // Lease, delete and tally in one statement.
        out.published = delete_tallied(
            db,
            "lease AS (DELETE FROM outbox_leases WHERE token = ? RETURNING ids), ",
            "= ANY((SELECT ids FROM lease)::uuid[])",
            vec![token.into()],
            now,
        )
        .await?;
        return Ok(out);
    }
    if all_published {
        // The common case in one statement: the lease row carries the ids, so none are sent.
        out.published = db
            .execute_raw(stmt(
                PG,
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
            PG,
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
    // Released events that may go again at once need no row write: dropping the lease hands
    // them back.
    let free_now = |f: &Fate| matches!(f, Fate::Release { at } if *at <= now);
    out.released = fates.iter().filter(|(_, f)| free_now(f)).count() as u64;
    let rest = write_back::sort_fates(fates.iter().filter(|(_, f)| !free_now(f)));
    for (kind, s) in write_back::statements(PG, Guard::Pending, now, &rest, on_publish) {
        *out.slot(kind) += txn.execute_raw(s).await?.rows_affected();
    }
    if on_publish == OnPublish::Delete && out.published > 0 {
        txn.execute_raw(write_back::tally(PG, now, out.published))
            .await?;
    }
    txn.commit().await?;
    Ok(out)
}

/// The pending-rows part of the stats snapshot: a row is leased when a live batch lease holds
/// its id (or, left over from a version that stamped rows, a live row lease). Returns columns
/// `due`, `backoff`, `leased` and `oldest`.
pub(super) fn pending_counts_sql() -> String {
    format!(
        "WITH leased AS (SELECT DISTINCT id FROM ({LIVE_LEASED_IDS}) l), \
         p AS (SELECT e.next_attempt_at, e.occurred_at, e.deliver_at, \
                 (l.id IS NOT NULL OR (e.next_attempt_at > ? AND e.locked_by IS NOT NULL)) AS leased, \
                 COALESCE(e.deliver_at > ?, FALSE) AS later \
               FROM outbox_events e LEFT JOIN leased l ON l.id = e.id \
               WHERE e.status = 'pending') \
         SELECT \
           COUNT(CASE WHEN NOT leased AND later THEN 1 END) AS scheduled, \
           COUNT(CASE WHEN NOT leased AND NOT later AND next_attempt_at <= ? THEN 1 END) AS due, \
           COUNT(CASE WHEN NOT leased AND NOT later AND next_attempt_at > ? THEN 1 END) AS backoff, \
           COUNT(CASE WHEN leased THEN 1 END) AS leased, \
           MIN(CASE WHEN later THEN NULL ELSE GREATEST(occurred_at, deliver_at) END) AS oldest, \
           MIN(CASE WHEN later THEN deliver_at END) AS next_scheduled \
         FROM p"
    )
}

/// How many times [`pending_counts_sql`] binds the snapshot's time.
pub(super) const PENDING_COUNTS_BINDS: usize = 5;
