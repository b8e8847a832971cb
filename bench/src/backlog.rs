//! Backlog scale: draining a large backlog at a steady rate, with flat memory; and the claim
//! cost with millions of published rows retained.

use std::time::{Duration, Instant};

use anyhow::Result;
use seaorm_outbox::relay::{Ordering, Relay};
use tokio_util::sync::CancellationToken;

use crate::db::BenchDb;
use crate::report::{Row, Target};
use crate::sink::Sink;
use crate::throughput::{drain_with, relay_config};

pub(crate) async fn section(db: &BenchDb, n: u64, rows: &mut Vec<Row>) -> Result<()> {
    db.reset().await?;
    db.seed_pending(n, 1000).await?;
    let sink = Sink::default();
    let relay = Relay::builder(db.pool(2).await?, sink.clone())
        .config(relay_config(Ordering::PerAggregate))
        .build()?;
    let stop = CancellationToken::new();
    let start = Instant::now();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });
    let tenth = n / 10;
    let (mut t10, mut t90) = (None, None);
    let (mut rss_at_10, mut rss_peak) = (0.0f64, 0.0f64);
    loop {
        let done = sink.delivered();
        let rss = crate::cpu::rss_mib();
        if t10.is_none() && done >= tenth {
            t10 = Some(start.elapsed());
            rss_at_10 = rss;
        }
        if t10.is_some() {
            rss_peak = rss_peak.max(rss);
        }
        if t90.is_none() && done >= n - tenth {
            t90 = Some(start.elapsed());
        }
        if done >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total = start.elapsed();
    stop.cancel();
    task.await?;
    let first = tenth as f64 / t10.unwrap_or(total).as_secs_f64();
    let last = tenth as f64 / (total - t90.unwrap_or_default()).as_secs_f64();
    eprintln!(
        "backlog {n}: first 10% {first:.0}/s, last 10% {last:.0}/s, RSS {rss_at_10:.1} → peak {rss_peak:.1} MiB"
    );
    rows.push(Row {
        section: "backlog scale",
        name: format!("PostgreSQL drain of {n}: rate over the last 10%"),
        value: last,
        unit: "ev/s",
        baseline: Some(("first 10%".into(), first)),
        target: Some(Target::RatioAtLeast(0.8)),
    });
    rows.push(Row {
        section: "memory",
        name: format!("relay peak RSS while draining {n}"),
        value: rss_peak,
        unit: "MiB",
        baseline: Some(("RSS at 10%".into(), rss_at_10)),
        target: Some(Target::RatioAtMost(1.2)),
    });
    Ok(())
}

/// Time per 100-event claim → write-back cycle, over `reps` cycles of fresh events.
async fn cycle_ms(db: &BenchDb, reps: u64) -> Result<f64> {
    db.seed_pending(100 * reps, 1000).await?;
    let sink = Sink::default();
    let config = relay_config(Ordering::PerAggregate).batch_size(100);
    let elapsed = drain_with(db, 1, sink, config, 100 * reps).await?;
    Ok(elapsed.as_secs_f64() * 1000.0 / reps as f64)
}

pub(crate) async fn retained_section(
    db: &BenchDb,
    retained: u64,
    rows: &mut Vec<Row>,
) -> Result<()> {
    db.reset().await?;
    let empty = cycle_ms(db, 50).await?;
    db.reset().await?;
    db.seed_published(retained).await?;
    // What autovacuum does for a live table (it is off on this machine).
    db.exec("VACUUM ANALYZE outbox_events").await?;
    let full = cycle_ms(db, 50).await?;
    eprintln!(
        "claim cycle: empty table {empty:.2} ms, with {retained} published retained {full:.2} ms"
    );
    rows.push(Row {
        section: "backlog scale",
        name: format!("PostgreSQL claim→write-back of 100, {retained} published rows retained"),
        value: full,
        unit: "ms",
        baseline: Some(("empty table".into(), empty)),
        target: Some(Target::RatioAtMost(1.2)),
    });
    Ok(())
}
