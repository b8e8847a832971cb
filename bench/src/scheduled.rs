//! Issue 29's scale check: the drain of due events with and without a million events
//! scheduled over the next week on the same aggregates, in the same run. The claim must not
//! step over scheduled rows, so the two rates should match.

use std::time::Duration;

use anyhow::Result;
use chrono::Utc;
use seaorm_outbox::relay::Ordering;
use seaorm_outbox::{NewEvent, Outbox, OutboxRepository};

use crate::db::{BenchDb, Kind, Workload};
use crate::report::{Row, Target};
use crate::sink::Sink;
use crate::throughput::{drain_leaving, relay_config};

const WEEK_SECS: u64 = 7 * 24 * 3600;
/// The due backlog's aggregates; the scheduled events land on the same ones.
const AGGREGATES: u64 = 1000;

/// One drain of `n` due events by one relay at its defaults, `scheduled` rows left pending.
async fn drain(db: &BenchDb, n: u64, scheduled: u64) -> Result<f64> {
    db.seed_workload(
        n,
        Workload::Spread {
            aggregates: AGGREGATES,
        },
    )
    .await?;
    let config = relay_config(Ordering::PerAggregate);
    let elapsed = drain_leaving(db, 1, Sink::default(), config, n, scheduled).await?;
    Ok(n as f64 / elapsed.as_secs_f64())
}

/// Writes `n` events scheduled evenly over the next week.
async fn seed_scheduled(db: &BenchDb, n: u64) -> Result<()> {
    if db.kind == Kind::Postgres {
        // Server-side, as `add_event` writes them: due at `deliver_at`, so the due index's
        // scan ends before them.
        let step_us = WEEK_SECS * 1_000_000 / n.max(1);
        db.exec(&format!(
            "INSERT INTO outbox_events (id, event_type, aggregate_type, aggregate_id, payload, headers, \
               occurred_at, created_at, status, attempts, next_attempt_at, deliver_at) \
             SELECT {id}, 'bench.reminder', 'agg', (g % {AGGREGATES})::text, \
               jsonb_build_object('n', g), '{{}}'::jsonb, t, t, 'pending', 0, d, d \
             FROM (SELECT g, now() - interval '3 hours' + g * interval '1 microsecond' AS t, \
                          now() + interval '1 hour' + (g - 10000000)::float8 * {step_us} * interval '1 microsecond' AS d \
                   FROM generate_series(10000001, {end}) g) s",
            id = crate::db::UUID_V7,
            end = 10_000_000 + n,
        ))
        .await?;
    } else {
        let outbox = Outbox::new(&db.db);
        let start = Utc::now() + chrono::Duration::hours(1);
        let step = Duration::from_micros(WEEK_SECS * 1_000_000 / n.max(1));
        let mut i = 0;
        while i < n {
            let batch: Vec<NewEvent> = (i..(i + 1000).min(n))
                .map(|g| {
                    let at = start + step * u32::try_from(g).unwrap_or(u32::MAX);
                    NewEvent::new("bench.reminder", "agg", (g % AGGREGATES).to_string())
                        .json_payload(serde_json::json!({ "n": g }))
                        .deliver_at(at)
                })
                .collect();
            outbox.add_events(batch).await?;
            i += 1000;
        }
    }
    Ok(())
}

/// Alternates drains on `db` (nothing scheduled) and on a second database of its kind holding
/// `scheduled` rows, so both sides see the same machine.
pub(crate) async fn section(
    db: &BenchDb,
    n: u64,
    scheduled: u64,
    repeat: usize,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let label = db.kind.label();
    db.reset().await?;
    let beside = BenchDb::new_second(db.kind).await?;
    let started = std::time::Instant::now();
    seed_scheduled(&beside, scheduled).await?;
    eprintln!(
        "{label} seeded {scheduled} scheduled in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for _ in 0..repeat {
        let rate = drain(db, n, 0).await?;
        eprintln!("{label} drain of {n} due, nothing scheduled: {rate:.0}/s");
        without.push(rate);
        let rate = drain(&beside, n, scheduled).await?;
        eprintln!("{label} drain of {n} due, {scheduled} scheduled: {rate:.0}/s");
        with.push(rate);
    }
    anyhow::ensure!(
        beside.count_pending().await? == scheduled,
        "a scheduled event was delivered early"
    );
    beside.drop().await?;
    rows.push(Row {
        section: "scheduled delivery",
        name: format!("{label} drain of {n} due events, {scheduled} scheduled over the next week"),
        value: crate::median(&mut with),
        unit: "ev/s",
        baseline: Some(("nothing scheduled".into(), crate::median(&mut without))),
        target: Some(Target::RatioAtLeast(0.95)),
    });
    db.reset().await
}
