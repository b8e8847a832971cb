//! Relay throughput to a no-op sink against a raw-SQL claim-and-mark loop on the same table.

use std::time::{Duration, Instant};

use anyhow::Result;
use sea_orm::sqlx;
use seaorm_outbox::relay::{Ordering, Relay, RelayConfig};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::cpu::{CpuMeter, CpuPerEvent};
use crate::db::{BenchDb, Kind, Workload};
use crate::sink::Sink;

pub(crate) const BATCH: u32 = 500;

/// A drain's rate and the CPU it cost per event.
pub(crate) struct Drained {
    pub(crate) rate: f64,
    pub(crate) cpu: Option<CpuPerEvent>,
}

/// What a raw loop's claim returns.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Read {
    /// Only the ids: the cheapest possible loop, but not one that could publish anything.
    Ids,
    /// The columns a publisher sends (id, type, aggregate, payload, headers, occurred_at,
    /// attempts), fetched as rows: the same job the relay does, in hand-written SQL.
    Events,
}

/// The columns [`Read::Events`] fetches.
const EVENT_COLUMNS: &str =
    "id, event_type, aggregate_type, aggregate_id, payload, headers, occurred_at, attempts";

/// Events/s of `workers` raw claim-and-mark loops draining `n` seeded events.
pub(crate) async fn raw(
    db: &BenchDb,
    workers: usize,
    n: u64,
    read: Read,
    workload: Workload,
) -> Result<Drained> {
    db.reset().await?;
    db.seed_workload(n, workload).await?;
    let kind = db.kind;
    run_loops(db, workers, n, "raw loop", move |conn| {
        raw_loop(kind, conn, read)
    })
    .await
}

/// Events/s of `workers` copies of issue 16's minimal outbox loop (PostgreSQL only): a
/// `raw_outbox` table with one partial index, drained in autocommit by one statement per batch
/// that claims and marks 500 rows, until it updates none. It reads nothing back, takes no lease
/// and keeps no order: the ceiling any polling outbox on this server is measured against.
pub(crate) async fn minimal(
    db: &BenchDb,
    workers: usize,
    n: u64,
    workload: Workload,
) -> Result<Drained> {
    db.reset().await?;
    db.seed_minimal(n, workload).await?;
    let drained = run_loops(db, workers, n, "minimal loop", minimal_loop).await?;
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM raw_outbox WHERE published_at IS NULL")
            .fetch_one(db.db.get_postgres_connection_pool())
            .await?;
    anyhow::ensure!(left == 0, "the minimal loop left {left} events");
    db.exec("TRUNCATE raw_outbox").await?;
    Ok(drained)
}

async fn minimal_loop(conn: sea_orm::DatabaseConnection) -> Result<()> {
    let pool = conn.get_postgres_connection_pool();
    loop {
        let done = sqlx::query(
            "WITH c AS (SELECT id FROM raw_outbox WHERE published_at IS NULL ORDER BY occurred_at \
             LIMIT $1 FOR UPDATE SKIP LOCKED) \
             UPDATE raw_outbox t SET published_at = now() FROM c WHERE t.id = c.id",
        )
        .bind(i64::from(BATCH))
        .execute(pool)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(());
        }
    }
}

/// Runs `workers` copies of a hand-written drain loop, each on its own two-connection pool,
/// over the `n` events already seeded; checks that nothing is left pending.
async fn run_loops<F, Fut>(
    db: &BenchDb,
    workers: usize,
    n: u64,
    what: &str,
    work: F,
) -> Result<Drained>
where
    F: Fn(sea_orm::DatabaseConnection) -> Fut,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let mut tasks = Vec::new();
    let meter = CpuMeter::start();
    let start = Instant::now();
    for _ in 0..workers {
        tasks.push(tokio::spawn(work(db.pool(2).await?)));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = start.elapsed();
    let cpu = meter.and_then(|m| m.per_event(n));
    anyhow::ensure!(db.count_pending().await? == 0, "{what} left events");
    Ok(Drained {
        rate: n as f64 / elapsed.as_secs_f64(),
        cpu,
    })
}

async fn raw_loop(kind: Kind, conn: sea_orm::DatabaseConnection, read: Read) -> Result<()> {
    use sea_orm::sqlx::Row as _;
    let batch = i64::from(BATCH);
    let cols = match read {
        Read::Ids => "id",
        Read::Events => EVENT_COLUMNS,
    };
    match kind {
        Kind::Postgres => {
            let pool = conn.get_postgres_connection_pool();
            loop {
                let mut tx = pool.begin().await?;
                let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {cols} FROM outbox_events WHERE status = 'pending' AND next_attempt_at <= now() \
                     ORDER BY next_attempt_at, id LIMIT $1 FOR UPDATE SKIP LOCKED",
                )))
                .bind(batch)
                .fetch_all(&mut *tx)
                .await?;
                let ids: Vec<Uuid> = rows
                    .iter()
                    .map(|r| r.try_get(0))
                    .collect::<Result<_, _>>()?;
                if ids.is_empty() {
                    tx.commit().await?;
                    return Ok(());
                }
                sqlx::query("UPDATE outbox_events SET status = 'published', published_at = now() WHERE id = ANY($1)")
                    .bind(&ids)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            }
        }
        Kind::MySql => {
            let pool = conn.get_mysql_connection_pool();
            loop {
                let mut tx = pool.begin().await?;
                let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {cols} FROM outbox_events WHERE status = 'pending' AND next_attempt_at <= UTC_TIMESTAMP(6) \
                     ORDER BY next_attempt_at, id LIMIT ? FOR UPDATE SKIP LOCKED",
                )))
                .bind(batch)
                .fetch_all(&mut *tx)
                .await?;
                let ids: Vec<Vec<u8>> = rows
                    .iter()
                    .map(|r| r.try_get(0))
                    .collect::<Result<_, _>>()?;
                if ids.is_empty() {
                    tx.commit().await?;
                    return Ok(());
                }
                let marks = vec!["?"; ids.len()].join(",");
                let sql = format!(
                    "UPDATE outbox_events SET status = 'published', published_at = UTC_TIMESTAMP(6) WHERE id IN ({marks})"
                );
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                for id in &ids {
                    q = q.bind(id);
                }
                q.execute(&mut *tx).await?;
                tx.commit().await?;
            }
        }
        Kind::Sqlite => {
            let pool = conn.get_sqlite_connection_pool();
            loop {
                let now = chrono::Utc::now();
                let done = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE outbox_events SET status = 'published', published_at = ?1 WHERE id IN \
                     (SELECT id FROM outbox_events WHERE status = 'pending' AND next_attempt_at <= ?1 \
                      ORDER BY next_attempt_at, id LIMIT ?2) RETURNING {cols}",
                )))
                .bind(now)
                .bind(batch)
                .fetch_all(pool)
                .await?;
                if done.is_empty() {
                    return Ok(());
                }
            }
        }
    }
}

pub(crate) fn relay_config(ordering: Ordering) -> RelayConfig {
    // `OUTBOX_BENCH_RUN=N`: the relays' `events_per_aggregate` (the library's default if unset).
    let run = std::env::var("OUTBOX_BENCH_RUN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(RelayConfig::default().events_per_aggregate);
    // Relays start together on a seeded backlog: a 2 s partition lease (a round every 200 ms)
    // lets them divide the partitions within half a second of a drain that lasts several, as
    // relays already running would have. Steady-state speed does not depend on it.
    RelayConfig::default()
        .events_per_aggregate(run)
        .batch_size(BATCH)
        .ordering(ordering)
        .partition_lease(Duration::from_secs(2))
        .publish_timeout(Duration::from_secs(1))
        .listen_notify(false)
        .metrics_interval(None)
        .idle_poll_interval(Duration::from_secs(1))
}

/// Events/s of `relays` relays draining `n` seeded events to a no-op sink.
pub(crate) async fn relay(
    db: &BenchDb,
    relays: usize,
    n: u64,
    config: RelayConfig,
    workload: Workload,
) -> Result<Drained> {
    db.reset().await?;
    db.seed_workload(n, workload).await?;
    let sink = Sink::default();
    let meter = CpuMeter::start();
    let elapsed = drain_with(db, relays, sink, config, n).await?;
    Ok(Drained {
        rate: n as f64 / elapsed.as_secs_f64(),
        cpu: meter.and_then(|m| m.per_event(n)),
    })
}

/// Runs relays until `n` events were delivered and nothing is pending; returns the time taken.
pub(crate) async fn drain_with(
    db: &BenchDb,
    relays: usize,
    sink: Sink,
    config: RelayConfig,
    n: u64,
) -> Result<Duration> {
    drain_leaving(db, relays, sink, config, n, 0).await
}

/// [`drain_with`], done when `left` events (scheduled for later) are all that is pending.
pub(crate) async fn drain_leaving(
    db: &BenchDb,
    relays: usize,
    sink: Sink,
    config: RelayConfig,
    n: u64,
    left: u64,
) -> Result<Duration> {
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    let mut built = Vec::new();
    for r in 0..relays {
        built.push(
            Relay::builder(db.pool(2).await?, sink.clone())
                .config(config.clone().name(format!("bench{r}")))
                .build()?,
        );
    }
    let start = Instant::now();
    for relay in built {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move { relay.run(stop).await }));
    }
    let mut first = None;
    while sink.delivered() < n {
        if first.is_none() && sink.delivered() > 0 {
            first = Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let delivered = start.elapsed();
    let first = first.unwrap_or(delivered);
    // Until the last write-back landed. With rows left scheduled, count only the due ones:
    // counting a million pending rows per look would time the bench, not the relay.
    loop {
        let waiting = if left == 0 {
            db.count_pending().await?
        } else {
            db.count_due().await?
        };
        if waiting == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = start.elapsed();
    if left > 0 || std::env::var_os("OUTBOX_BENCH_SPLIT").is_some() {
        eprintln!(
            "  first delivery at {:.2}s, all delivered at {:.2}s, written back by {:.2}s",
            first.as_secs_f64(),
            delivered.as_secs_f64(),
            elapsed.as_secs_f64()
        );
    }
    stop.cancel();
    for t in tasks {
        t.await?;
    }
    let pending = db.count_pending().await?;
    anyhow::ensure!(pending == left, "{pending} pending, {left} expected");
    Ok(elapsed)
}

/// Events/s of `workers` loops of a *lease-table* design, PostgreSQL only: the claim reads due
/// rows (with their payloads, as a relay must) that no live lease holds and records one lease
/// row holding their ids; the write-back deletes the lease and marks the rows, in one
/// transaction. No row is written at claim time. Claims are serialised by an advisory lock,
/// because without a row write a concurrent claim's snapshot could not see the new lease.
pub(crate) async fn lease_table_probe(
    db: &BenchDb,
    workers: usize,
    n: u64,
    workload: Workload,
) -> Result<Drained> {
    db.reset().await?;
    db.exec(
        "CREATE TABLE IF NOT EXISTS bench_leases (token uuid PRIMARY KEY, \
         locked_until timestamptz NOT NULL, ids uuid[] NOT NULL)",
    )
    .await?;
    db.exec("TRUNCATE bench_leases").await?;
    db.seed_workload(n, workload).await?;
    run_loops(db, workers, n, "lease-table loop", lease_table_loop).await
}

async fn lease_table_loop(conn: sea_orm::DatabaseConnection) -> Result<()> {
    use sea_orm::sqlx::Row as _;
    let pool = conn.get_postgres_connection_pool();
    let batch = i64::from(BATCH);
    loop {
        let token = Uuid::now_v7();
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(4242)")
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM bench_leases WHERE locked_until < now()")
            .execute(&mut *tx)
            .await?;
        let rows = sqlx::query(
            "SELECT id, event_type, aggregate_type, aggregate_id, payload, headers, occurred_at, attempts \
             FROM outbox_events WHERE status = 'pending' AND next_attempt_at <= now() \
             AND id NOT IN (SELECT unnest(ids) FROM bench_leases) \
             ORDER BY next_attempt_at, id LIMIT $1",
        )
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
        let ids: Vec<Uuid> = rows.iter().map(|r| r.get::<Uuid, _>(0)).collect();
        if ids.is_empty() {
            tx.commit().await?;
            let live: i64 = sqlx::query_scalar("SELECT count(*) FROM bench_leases")
                .fetch_one(pool)
                .await?;
            if live == 0 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        sqlx::query(
            "INSERT INTO bench_leases (token, locked_until, ids) VALUES ($1, now() + interval '30 seconds', $2)",
        )
        .bind(token)
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut tx = pool.begin().await?;
        let held = sqlx::query("DELETE FROM bench_leases WHERE token = $1")
            .bind(token)
            .execute(&mut *tx)
            .await?;
        anyhow::ensure!(held.rows_affected() == 1, "lease lost");
        sqlx::query(
            "UPDATE outbox_events SET status = 'published', published_at = now() WHERE id = ANY($1)",
        )
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
    }
}

/// Events/s of `workers` loops of a *transaction-held* design, PostgreSQL only: the claim
/// `SELECT * … FOR UPDATE SKIP LOCKED` opens a transaction that stays open through the (no-op)
/// publish and ends with the `UPDATE` and `COMMIT`; batch N's write-back overlaps batch N+1's
/// claim on a second connection, as the relay pipelines.
pub(crate) async fn tx_held_probe(
    db: &BenchDb,
    workers: usize,
    n: u64,
    workload: Workload,
) -> Result<Drained> {
    db.reset().await?;
    db.seed_workload(n, workload).await?;
    run_loops(db, workers, n, "tx-held loop", tx_held_loop).await
}

async fn tx_held_loop(conn: sea_orm::DatabaseConnection) -> Result<()> {
    use sea_orm::sqlx::Row as _;
    let pool = conn.get_postgres_connection_pool().clone();
    let batch = i64::from(BATCH);
    let mut held: Option<(sqlx::Transaction<'static, sqlx::Postgres>, Vec<Uuid>)> = None;
    loop {
        let finish = async {
            if let Some((mut tx, ids)) = held.take() {
                sqlx::query(
                    "UPDATE outbox_events SET status = 'published', published_at = now() WHERE id = ANY($1)",
                )
                .bind(&ids)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
            }
            anyhow::Ok(())
        };
        let claim = async {
            let mut tx = pool.begin().await?;
            let rows = sqlx::query(
                "SELECT * FROM outbox_events WHERE status = 'pending' AND next_attempt_at <= now() \
                 ORDER BY next_attempt_at, id LIMIT $1 FOR UPDATE SKIP LOCKED",
            )
            .bind(batch)
            .fetch_all(&mut *tx)
            .await?;
            let ids: Vec<Uuid> = rows.iter().map(|r| r.get::<Uuid, _>("id")).collect();
            anyhow::Ok((tx, ids))
        };
        let (f, c) = tokio::join!(finish, claim);
        f?;
        let (tx, ids) = c?;
        if ids.is_empty() {
            tx.commit().await?;
            return Ok(());
        }
        held = Some((tx, ids));
    }
}
