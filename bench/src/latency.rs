//! Commit → publish latency at a steady 1,000 events/s after a one-second warm-up: on
//! PostgreSQL with LISTEN/NOTIFY and with polling; on MariaDB and SQLite with the in-process
//! [`RelayWaker`] and with the default poll, against PostgreSQL's NOTIFY in the same run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use sea_orm::{DatabaseTransaction, TransactionTrait};
use seaorm_outbox::relay::{Relay, RelayConfig, RelayWaker};
use seaorm_outbox::{NewEvent, Outbox, OutboxRepository};
use tokio_util::sync::CancellationToken;

use crate::db::BenchDb;
use crate::report::{Row, Target};
use crate::sink::Sink;

const RATE: u64 = 1000;
const PRODUCERS: u64 = 4;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// How a producer writes its events.
#[derive(Clone, Copy)]
pub(crate) enum Write {
    /// A table row (`add_event`).
    Row,
    /// A logical message (`Outbox::emit`).
    Message,
}

/// Writes `event` in `txn` as `write` says.
async fn write_event(
    txn: &DatabaseTransaction,
    write: Write,
    event: NewEvent,
) -> Result<uuid::Uuid> {
    let outbox = Outbox::new(txn);
    Ok(match write {
        Write::Row => outbox.add_event(event).await?,
        Write::Message => outbox.emit(event).await?,
    })
}

/// (p50, p99, max) commit → publish in ms of `RATE` events/s from `PRODUCERS` writers for
/// `secs`, one event per transaction, after a one-second warm-up that is left out (connections
/// a relay opens on demand cost ~90 ms each here): the steady state. A relay publishing to
/// `sink` runs already; `before` events were delivered before this began. With `waker`, each
/// transaction goes through [`RelayWaker::begin`] (on SQLite, queued with the relay's
/// write-backs).
pub(crate) async fn measure(
    db: &BenchDb,
    sink: &Sink,
    secs: u64,
    write: Write,
    before: u64,
    waker: Option<RelayWaker>,
) -> Result<(f64, f64, f64)> {
    let commits: Arc<Mutex<HashMap<uuid::Uuid, Instant>>> = Arc::default();
    let total = RATE * secs;
    let warm = RATE / PRODUCERS;
    let mut producers = Vec::new();
    let conn = db.pool(PRODUCERS as u32 + 1).await?;
    for p in 0..PRODUCERS {
        let (conn, commits, waker) = (conn.clone(), commits.clone(), waker.clone());
        producers.push(tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_micros(1_000_000 * PRODUCERS / RATE));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for i in 0..warm + total / PRODUCERS {
                tick.tick().await;
                let event = NewEvent::new("order.placed", "order", format!("{p}-{i}"))
                    .json_payload(serde_json::json!({ "i": i }));
                let id = match &waker {
                    Some(w) => {
                        let txn = w.begin(&conn).await?;
                        let id = write_event(&txn, write, event).await?;
                        txn.commit().await?;
                        id
                    }
                    None => {
                        let txn = conn.begin().await?;
                        let id = write_event(&txn, write, event).await?;
                        txn.commit().await?;
                        id
                    }
                };
                if i >= warm {
                    commits
                        .lock()
                        .map_err(|_| anyhow::anyhow!("poisoned"))?
                        .insert(id, Instant::now());
                }
            }
            anyhow::Ok(())
        }));
    }
    for p in producers {
        p.await??;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while sink.delivered() < before + total + warm * PRODUCERS && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let arrivals = sink
        .arrivals
        .as_ref()
        .map(|a| a.lock().map(|a| a.clone()))
        .transpose()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .unwrap_or_default();
    let commits = commits.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let mut lat: Vec<f64> = commits
        .iter()
        .filter_map(|(id, c)| {
            arrivals
                .get(id)
                .map(|a| a.saturating_duration_since(*c).as_secs_f64() * 1000.0)
        })
        .collect();
    anyhow::ensure!(
        lat.len() as u64 == total,
        "only {} of {total} events arrived",
        lat.len()
    );
    lat.sort_by(f64::total_cmp);
    Ok((
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat[lat.len() - 1],
    ))
}

/// (p50, p99, max) commit → publish in ms through a relay, woken by `waker` if given.
async fn run(
    db: &BenchDb,
    secs: u64,
    config: RelayConfig,
    waker: Option<RelayWaker>,
) -> Result<(f64, f64, f64)> {
    db.reset().await?;
    let sink = Sink::timed();
    let mut relay = Relay::builder(db.pool(4).await?, sink.clone()).config(config);
    if let Some(w) = &waker {
        relay = relay.waker(w);
    }
    let relay = relay.build()?;
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await; // first poll and LISTEN
    let result = measure(db, &sink, secs, Write::Row, 0, waker).await;
    stop.cancel();
    task.await?;
    result
}

pub(crate) async fn section(
    pg: &BenchDb,
    others: &[&BenchDb],
    secs: u64,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let push = RelayConfig::default()
        .idle_poll_interval(Duration::from_secs(1))
        .metrics_interval(None);
    let (p50, p99, max) = run(pg, secs, push, None).await?;
    eprintln!("latency NOTIFY: p50 {p50:.2} ms p99 {p99:.2} ms max {max:.2} ms");
    let poll = RelayConfig::default()
        .idle_poll_interval(Duration::from_millis(100))
        .listen_notify(false)
        .metrics_interval(None);
    let (q50, q99, qmax) = run(pg, secs, poll, None).await?;
    eprintln!("latency polling 100ms: p50 {q50:.2} ms p99 {q99:.2} ms max {qmax:.2} ms");
    rows.push(Row {
        section: "latency",
        name: format!(
            "PostgreSQL commit→publish p99, {RATE} ev/s, LISTEN/NOTIFY (p50 {p50:.2}, max {max:.1})"
        ),
        value: p99,
        unit: "ms",
        baseline: Some(("polling every 100 ms, p99".into(), q99)),
        target: Some(Target::AtMost(10.0)),
    });
    rows.push(Row {
        section: "latency",
        name: format!("PostgreSQL commit→publish p50, polling every 100 ms (max {qmax:.1})"),
        value: q50,
        unit: "ms",
        baseline: None,
        target: None,
    });
    for db in others {
        // The defaults: a 1 s idle poll, the waker the only push.
        let config = RelayConfig::default().metrics_interval(None);
        let waker = RelayWaker::new();
        let (w50, w99, wmax) = run(db, secs, config.clone(), Some(waker)).await?;
        let (n50, n99, nmax) = run(db, secs, config, None).await?;
        let kind = db.kind.label();
        eprintln!(
            "latency {kind}: waker p50 {w50:.2} p99 {w99:.2} max {wmax:.2}; \
             polling p50 {n50:.2} p99 {n99:.2} max {nmax:.2}"
        );
        rows.push(Row {
            section: "latency",
            name: format!(
                "{kind} commit→publish p99, {RATE} ev/s, RelayWaker (p50 {w50:.2}, max {wmax:.1})"
            ),
            value: w99,
            unit: "ms",
            baseline: Some((
                format!("default 1 s poll, p99 (p50 {n50:.1}, max {nmax:.1})"),
                n99,
            )),
            target: None,
        });
        rows.push(Row {
            section: "latency",
            name: format!("{kind} RelayWaker p99 against PostgreSQL's NOTIFY p99 (same run)"),
            value: w99,
            unit: "ms",
            baseline: Some(("PostgreSQL LISTEN/NOTIFY p99".into(), p99)),
            target: Some(Target::RatioAtMost(2.0)),
        });
    }
    Ok(())
}
