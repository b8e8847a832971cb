//! Issue 18's log relay on a PostgreSQL with `wal_level=logical` (the bench's own: initdb
//! into a temporary directory, a free port, fsync on; or `OUTBOX_BENCH_LOGICAL_URL`): the
//! write path, a drain against the minimal claim-and-mark loop on the same server, commit →
//! publish latency at 1,000 ev/s, the relay's RSS over a long drain, and the WAL a stopped
//! relay's slot retains; then table mode's drain. `OUTBOX_BENCH_TABLE_ONLY=1` runs only that
//! last part.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use sea_orm::{ConnectionTrait, DatabaseConnection, TransactionTrait};
use seaorm_outbox::relay::wal::{LogRelay, LogRelayConfig, Transport};
use seaorm_outbox::{NewEvent, Outbox, OutboxRepository};
use tokio_util::sync::CancellationToken;

use crate::db::{BenchDb, Kind, Workload};
use crate::latency::Write;
use crate::report::{Row, Target};
use crate::sink::Sink;
use crate::{Sizes, throughput};

#[allow(dead_code, unreachable_pub)]
#[path = "../../tests/common/pg_server.rs"]
mod pg_server;

/// Events per seeding transaction.
const SEED_TXN: u64 = 100;

fn config(slot: &str, transport: Transport) -> LogRelayConfig {
    LogRelayConfig::default()
        .transport(transport)
        .slot(slot)
        .publication(slot)
        .metrics_interval(None)
}

fn event(g: u64) -> NewEvent {
    NewEvent::new("order.placed", "order", g.to_string()).json_payload(serde_json::json!({
        "order_id": g,
        "customer_id": format!("c-{}", g % 9973),
        "total_cents": g % 100_000,
        "currency": "EUR",
        "note": "x".repeat(120),
    }))
}

/// Writes `n` events, `SEED_TXN` per transaction, from 4 writers: as messages (`emit_events`),
/// or in table mode as `outbox_events` rows (`add_events`).
async fn seed(db: &BenchDb, n: u64, table: bool) -> Result<()> {
    let conn = db.pool(5).await?;
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            let mut g = w * SEED_TXN;
            while g < n {
                let txn = conn.begin().await?;
                let end = (g + SEED_TXN).min(n);
                let events = (g..end).map(event).collect();
                if table {
                    Outbox::new(&txn).add_events(events).await?;
                } else {
                    Outbox::new(&txn).emit_events(events).await?;
                }
                txn.commit().await?;
                g += 4 * SEED_TXN;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    conn.close().await?;
    Ok(())
}

async fn retained(db: &DatabaseConnection, slot: &str) -> Result<u64> {
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            format!(
                "SELECT (pg_current_wal_lsn() - restart_lsn)::int8 AS n FROM pg_replication_slots \
                 WHERE slot_name = '{slot}'"
            ),
        ))
        .await?
        .ok_or_else(|| anyhow::anyhow!("slot {slot} missing"))?;
    Ok(row.try_get::<i64>("", "n")?.max(0) as u64)
}

struct Drain {
    rate: f64,
    retained_stopped: u64,
    retained_after: u64,
    rss: (f64, f64, f64),
}

/// Seeds `n` events with the relay stopped, then drains them to the no-op sink.
async fn drain(db: &BenchDb, slot: &str, n: u64, transport: Transport) -> Result<Drain> {
    drain_with(db, n, config(slot, transport)).await
}

/// Table mode: `n` rows inserted by `add_events`, drained from the slot and marked published.
async fn table_drain(db: &BenchDb, slot: &str, n: u64) -> Result<f64> {
    db.reset().await?;
    let table_slot = format!("{slot}_t");
    let cfg = config(&table_slot, Transport::Stream).table(true);
    let d = drain_with(db, n, cfg).await?;
    db.exec(&format!("SELECT pg_drop_replication_slot('{table_slot}')"))
        .await?;
    let left = db.count_pending().await?;
    anyhow::ensure!(left == 0, "table mode left {left} rows pending");
    db.reset().await?;
    Ok(d.rate)
}

async fn drain_with(db: &BenchDb, n: u64, cfg: LogRelayConfig) -> Result<Drain> {
    let (table, slot) = (cfg.table, cfg.slot.clone());
    let sink = Sink::default();
    let relay = LogRelay::builder(db.pool(2).await?, sink.clone())
        .config(cfg)
        .build()?;
    relay.prepare().await?;
    relay.drain().await?; // start from an empty slot
    seed(db, n, table).await?;
    let retained_stopped = retained(&db.db, &slot).await?;
    let peak = Arc::new(Mutex::new((crate::cpu::rss_mib(), crate::cpu::rss_mib())));
    let stop = CancellationToken::new();
    let sampler = tokio::spawn({
        let (peak, stop) = (peak.clone(), stop.clone());
        async move {
            while !stop.is_cancelled() {
                if let Ok(mut p) = peak.lock() {
                    p.1 = p.1.max(crate::cpu::rss_mib());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let before = sink.delivered();
    let start = Instant::now();
    relay.drain().await?;
    let elapsed = start.elapsed();
    stop.cancel();
    sampler.await?;
    anyhow::ensure!(
        sink.delivered() - before == n,
        "the log relay delivered {} of {n}",
        sink.delivered() - before
    );
    let retained_after = retained(&db.db, &slot).await?;
    let (start_rss, peak_rss) = *peak.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    Ok(Drain {
        rate: n as f64 / elapsed.as_secs_f64(),
        retained_stopped,
        retained_after,
        rss: (start_rss, peak_rss, crate::cpu::rss_mib()),
    })
}

/// With the relay running again after a drain (heartbeat every second): how long until the
/// slot's retained WAL is under 16 MiB, and how much it then is.
async fn released(db: &BenchDb, slot: &str, limit: Duration) -> Result<(f64, u64)> {
    let relay = LogRelay::builder(db.pool(2).await?, Sink::default())
        .config(config(slot, Transport::Stream).heartbeat_interval(Duration::from_secs(1)))
        .build()?;
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });
    let start = Instant::now();
    let mut now = retained(&db.db, slot).await?;
    while now >= 16 << 20 && start.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(250)).await;
        now = retained(&db.db, slot).await?;
    }
    stop.cancel();
    task.await?;
    Ok((start.elapsed().as_secs_f64(), now))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// (p50, p99, max) commit → publish in ms at 1,000 ev/s from 4 writers, one event per
/// transaction, after a one-second warm-up.
async fn latency(
    db: &BenchDb,
    slot: &str,
    secs: u64,
    transport: Transport,
) -> Result<(f64, f64, f64)> {
    let sink = Sink::timed();
    let relay = LogRelay::builder(db.pool(2).await?, sink.clone())
        .config(config(slot, transport))
        .build()?;
    relay.prepare().await?;
    relay.drain().await?;
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });
    // Steady state: a started stream first decodes from the slot's restart position (what
    // `released` measures), so wait for one event to come through.
    let probe = db.pool(1).await?;
    let txn = probe.begin().await?;
    Outbox::new(&txn).emit(event(u64::MAX / 2)).await?;
    txn.commit().await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while sink.delivered() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let result = crate::latency::measure(db, &sink, secs, Write::Message, 1, None).await;
    stop.cancel();
    task.await?;
    result
}

pub(crate) async fn section(sizes: &Sizes, repeat: usize, rows: &mut Vec<Row>) -> Result<()> {
    // fsync on (the test servers turn it off), as on the shared server the other sections use.
    let server = match std::env::var("OUTBOX_BENCH_LOGICAL_URL") {
        Ok(_) => None,
        Err(_) => Some(pg_server::PgServer::start_with(&[
            "wal_level=logical",
            "fsync=on",
            "max_replication_slots=8",
        ])),
    };
    let url = match &server {
        Some(s) => s.url(),
        None => std::env::var("OUTBOX_BENCH_LOGICAL_URL")?,
    };
    let db = BenchDb::new_at(Kind::Postgres, url).await?;
    let slot = format!("bench_{}", std::process::id());

    let table_only = std::env::var("OUTBOX_BENCH_TABLE_ONLY").is_ok();
    if !table_only {
        crate::write_path::log_section(&db, sizes.write_secs, rows).await?;

        let n = sizes.drain;
        let (mut log, mut sql, mut minimal) = (Vec::new(), Vec::new(), Vec::new());
        let mut last = None;
        for _ in 0..repeat {
            let d = drain(&db, &slot, n, Transport::Stream).await?;
            eprintln!(
                "log relay (stream) drain of {n}: {:.0} ev/s; WAL retained while stopped {} B, after {} B",
                d.rate, d.retained_stopped, d.retained_after
            );
            log.push(d.rate);
            last = Some(d);
            let q = drain(&db, &slot, n, Transport::Sql).await?;
            eprintln!("log relay (sql) drain of {n}: {:.0} ev/s", q.rate);
            sql.push(q.rate);
            let m = throughput::minimal(&db, 1, n, Workload::PerEvent).await?;
            eprintln!("minimal loop drain of {n}: {:.0} ev/s", m.rate);
            minimal.push(m.rate);
        }
        let (log, sql, minimal) = (median(log), median(sql), median(minimal));
        let (secs, left) = released(
            &db,
            &slot,
            Duration::from_secs(if n > 50_000 { 45 } else { 5 }),
        )
        .await?;
        eprintln!("log relay resumed: retained WAL {left} B after {secs:.1} s");
        rows.push(Row {
            section: "log relay",
            name: format!("drain {n} message-mode events to the no-op sink (one relay, stream)"),
            value: log,
            unit: "ev/s",
            baseline: Some(("minimal claim-and-mark loop, same server".into(), minimal)),
            target: Some(Target::RatioAtLeast(1.5)),
        });
        rows.push(Row {
            section: "log relay",
            name: format!("drain {n} message-mode events, Transport::Sql (peek + advance)"),
            value: sql,
            unit: "ev/s",
            baseline: Some(("minimal claim-and-mark loop, same server".into(), minimal)),
            target: None,
        });
        if let Some(d) = last {
            rows.push(Row {
                section: "log relay",
                name: format!("WAL the slot retains with the relay stopped for {n} events"),
                value: d.retained_stopped as f64 / 1_048_576.0,
                unit: "MiB",
                baseline: None,
                target: None,
            });
            rows.push(Row {
                section: "log relay",
                name: "WAL the slot retains right after the drain".into(),
                value: d.retained_after as f64 / 1_048_576.0,
                unit: "MiB",
                baseline: None,
                target: None,
            });
            rows.push(Row {
                section: "log relay",
                name: format!(
                    "WAL the slot retains {secs:.1} s after the relay resumed (heartbeat 1 s)"
                ),
                value: left as f64 / 1_048_576.0,
                unit: "MiB",
                baseline: None,
                target: None,
            });
        }

        let big = sizes.backlog;
        let d = drain(&db, &slot, big, Transport::Stream).await?;
        let (start, peak, end) = d.rss;
        eprintln!(
            "log relay drain of {big}: {:.0} ev/s; RSS {start:.0} → peak {peak:.0} → {end:.0} MiB",
            d.rate
        );
        rows.push(Row {
        section: "log relay",
        name: format!(
            "bench process RSS draining {big} at {:.0} ev/s (start {start:.0} MiB, end {end:.0} MiB)",
            d.rate
        ),
        value: peak,
        unit: "MiB peak",
        baseline: Some(("RSS before the drain".into(), start)),
        target: None,
    });

        let (p50, p99, max) = latency(&db, &slot, sizes.latency_secs, Transport::Stream).await?;
        eprintln!("log relay (stream) latency: p50 {p50:.2} ms p99 {p99:.2} ms max {max:.2} ms");
        let (q50, q99, qmax) = latency(&db, &slot, sizes.latency_secs, Transport::Sql).await?;
        eprintln!("log relay (sql) latency: p50 {q50:.2} ms p99 {q99:.2} ms max {qmax:.2} ms");
        rows.push(Row {
            section: "log relay",
            name: format!("commit→publish p99 at 1,000 ev/s, stream (p50 {p50:.2}, max {max:.1})"),
            value: p99,
            unit: "ms",
            baseline: Some((format!("Transport::Sql p99 (p50 {q50:.1})"), q99)),
            target: Some(Target::AtMost(5.0)),
        });
        db.exec(&format!(
        "SELECT pg_drop_replication_slot('{slot}') FROM pg_replication_slots WHERE slot_name = '{slot}'"
    ))
    .await?;
    }
    let n = sizes.drain;

    // Table mode last, once message mode's slot is gone: a slot that exists while these rows
    // are written decodes them all again on its next start.
    let (mut table, mut minimal) = (Vec::new(), Vec::new());
    for _ in 0..repeat {
        let t = table_drain(&db, &slot, n).await?;
        eprintln!("log relay (table mode) drain of {n}: {t:.0} ev/s");
        table.push(t);
        let m = throughput::minimal(&db, 1, n, Workload::PerEvent).await?;
        eprintln!("minimal loop drain of {n}: {:.0} ev/s", m.rate);
        minimal.push(m.rate);
    }
    let (table, minimal) = (median(table), median(minimal));
    rows.push(Row {
        section: "log relay",
        name: format!("table mode: drain {n} rows written by add_event, marked published (stream)"),
        value: table,
        unit: "ev/s",
        baseline: Some(("minimal claim-and-mark loop, same server".into(), minimal)),
        target: Some(Target::RatioAtLeast(1.0)),
    });

    db.drop().await?;
    drop(server);
    Ok(())
}
