//! `outbox-bench`: seaorm-outbox measured against raw SQL on the local PostgreSQL, MariaDB and
//! SQLite (and the local brokers), printed as one table with each target met or not.
//!
//! ```text
//! cargo run --release -p seaorm-outbox-bench -- [--quick] [--only SECTION,...] [--repeat N]
//! ```
//!
//! Sections: `throughput`, `write`, `latency`, `backlog`, `retained`, `brokers`, `inbox`,
//! `scheduled` (issue 29: the due drain with and without 1M scheduled rows), `admin` (issue
//! 31: each admin endpoint's median on a 10M-row PostgreSQL table), `group` (issue 30: a
//! `RelayGroup`'s memory, idle CPU and connections over 10, 100 and 1,000 idle schemas), `log`
//! (issue 18's log relay, on a PostgreSQL of its own with `wal_level=logical`, or
//! `OUTBOX_BENCH_LOGICAL_URL`).
//! `--pg-only` skips MariaDB and SQLite in `throughput`, `--others-only` PostgreSQL; `--relays 1,2,4` picks the relay counts (default 1,2,4; 1 with `--quick`)
//! (PostgreSQL) and `--ordering unordered|ordered` one ordering; `--vacuum-every-ms N` runs `VACUUM` on the
//! table every N ms, standing in for autovacuum where the server has it off. `--workload
//! spread|single` picks one throughput backlog: spread over 1,000 aggregates with ~100-byte
//! payloads, or one event per aggregate with ~230-byte payloads (default both). On PostgreSQL
//! every relay figure is also measured against issue 16's minimal `raw_outbox` loop.
//! `--on-publish retain|delete` picks one write-back mode for the relays (default both).
//! `--repeat N` runs each throughput figure and its raw baseline N times, alternating, and
//! reports the medians (default 3). `OUTBOX_BENCH_PROBES=lease,txheld` adds raw-SQL probes of
//! two other claim designs beside the raw loop. `--quick` shrinks every size so the whole run takes well under two minutes; its figures are
//! only a smoke test.

mod admin;
mod backlog;
mod brokers;
mod cpu;
mod db;
mod group;
mod inbox;
mod inbox_latency;
mod latency;
mod log_relay;
mod report;
mod scheduled;
mod sink;
mod throughput;
mod write_path;

use anyhow::Result;
use seaorm_outbox::relay::{Claiming, OnPublish, Ordering};

use db::{BenchDb, Kind, Workload};
use report::{Row, Target};
use throughput::Read;

pub(crate) struct Sizes {
    pub(crate) drain: u64,
    pub(crate) drain_other: u64,
    pub(crate) write_secs: f64,
    pub(crate) latency_secs: u64,
    pub(crate) backlog: u64,
    pub(crate) retained: u64,
    pub(crate) broker: u64,
    pub(crate) inbox: u64,
    pub(crate) scheduled: u64,
    pub(crate) admin: u64,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        if quick {
            // Enough for every section to run end to end (the smoke test, in a debug build,
            // in CI); far too small to judge anything.
            Self {
                drain: 2_000,
                drain_other: 1_000,
                write_secs: 0.3,
                latency_secs: 1,
                backlog: 4_000,
                retained: 10_000,
                broker: 1_000,
                inbox: 500,
                scheduled: 5_000,
                admin: 20_000,
            }
        } else {
            Self {
                drain: 200_000,
                drain_other: 50_000,
                write_secs: 5.0,
                latency_secs: 10,
                backlog: 1_000_000,
                retained: 5_000_000,
                broker: 50_000,
                inbox: 100_000,
                scheduled: 1_000_000,
                admin: 10_000_000,
            }
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.split(',').map(str::to_owned).collect());
    let wants = |s: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == s));
    let sizes = Sizes::new(quick);
    let pg_only = args.iter().any(|a| a == "--pg-only");
    let others_only = args.iter().any(|a| a == "--others-only");
    // `--vacuum-every-ms N`: a side task VACUUMs the table, standing in for autovacuum where it
    // is off (as on the machine BENCHMARKS.md was measured on).
    let vacuum_every = args
        .iter()
        .position(|a| a == "--vacuum-every-ms")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse::<u64>().ok());
    let relays: Vec<usize> = args
        .iter()
        .position(|a| a == "--relays")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.split(',').filter_map(|n| n.parse().ok()).collect())
        // A smoke test needs every code path, not every relay count.
        .unwrap_or_else(|| if quick { vec![1] } else { vec![1, 2, 4] });
    let orderings: Vec<Ordering> = match args
        .iter()
        .position(|a| a == "--ordering")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
    {
        Some("unordered") => vec![Ordering::Unordered],
        Some("ordered") => vec![Ordering::PerAggregate],
        _ => vec![Ordering::Unordered, Ordering::PerAggregate],
    };
    let on_publish: Vec<OnPublish> = match args
        .iter()
        .position(|a| a == "--on-publish")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
    {
        Some("retain") => vec![OnPublish::Retain],
        Some("delete") => vec![OnPublish::Delete],
        _ => vec![OnPublish::Retain, OnPublish::Delete],
    };
    let workloads: Vec<Workload> = match args
        .iter()
        .position(|a| a == "--workload")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
    {
        Some("spread") => vec![Workload::Spread { aggregates: 1000 }],
        Some("single") => vec![Workload::PerEvent],
        _ => vec![Workload::Spread { aggregates: 1000 }, Workload::PerEvent],
    };
    // `--repeat N`: runs of each throughput figure, median taken (default 3; 1 with `--quick`).
    let repeat = args
        .iter()
        .position(|a| a == "--repeat")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(if quick { 1 } else { 3 })
        .max(1);
    let mut rows: Vec<Row> = Vec::new();
    let started = std::time::Instant::now();

    let pg = BenchDb::new(Kind::Postgres).await?;
    let vacuum_stop = tokio_util::sync::CancellationToken::new();
    if let Some(ms) = vacuum_every {
        let conn = pg.pool(1).await?;
        let stop = vacuum_stop.clone();
        tokio::spawn(async move {
            use sea_orm::ConnectionTrait;
            while !stop.is_cancelled() {
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                let _ = conn.execute_unprepared("VACUUM outbox_events").await;
            }
        });
    }
    if wants("throughput") {
        let plan = Plan {
            workers: &relays,
            orderings: &orderings,
            on_publish: &on_publish,
            workloads: &workloads,
            repeat,
        };
        if !others_only {
            throughput_section(&pg, sizes.drain, &plan, &mut rows).await?;
        }
        for kind in [Kind::MySql, Kind::Sqlite].into_iter().filter(|_| !pg_only) {
            let other = BenchDb::new(kind).await?;
            let plan = Plan {
                workers: &[1],
                ..plan
            };
            throughput_section(&other, sizes.drain_other, &plan, &mut rows).await?;
            other.drop().await?;
        }
    }
    if wants("write") {
        for kind in [Kind::Postgres, Kind::MySql, Kind::Sqlite] {
            let db = if kind == Kind::Postgres {
                None
            } else {
                Some(BenchDb::new(kind).await?)
            };
            write_path::section(db.as_ref().unwrap_or(&pg), sizes.write_secs, &mut rows).await?;
            if let Some(db) = db {
                db.drop().await?;
            }
        }
    }
    if wants("latency") {
        // Flush what earlier sections wrote, so a checkpoint does not land mid-measurement.
        pg.exec("CHECKPOINT").await?;
        let mut others = Vec::new();
        for kind in [Kind::MySql, Kind::Sqlite].into_iter().filter(|_| !pg_only) {
            others.push(BenchDb::new(kind).await?);
        }
        let views: Vec<&BenchDb> = others.iter().collect();
        latency::section(&pg, &views, sizes.latency_secs, &mut rows).await?;
        for db in others {
            db.drop().await?;
        }
    }
    if wants("backlog") {
        pg.exec("CHECKPOINT").await?;
        backlog::section(&pg, sizes.backlog, &mut rows).await?;
    }
    if wants("retained") {
        backlog::retained_section(&pg, sizes.retained, &mut rows).await?;
    }
    if wants("brokers") {
        brokers::section(&pg, sizes.broker, &mut rows).await?;
    }
    if wants("inbox") {
        inbox::section(&pg, sizes.inbox, repeat, &mut rows).await?;
        for kind in [Kind::MySql, Kind::Sqlite].into_iter().filter(|_| !pg_only) {
            let other = BenchDb::new(kind).await?;
            inbox::section(&other, sizes.inbox, repeat, &mut rows).await?;
            other.drop().await?;
        }
    }
    if wants("group") {
        group::section(quick, &mut rows).await?;
    }
    if wants("scheduled") {
        scheduled::section(&pg, sizes.drain / 2, sizes.scheduled, repeat, &mut rows).await?;
        for kind in [Kind::MySql, Kind::Sqlite].into_iter().filter(|_| !pg_only) {
            let other = BenchDb::new(kind).await?;
            scheduled::section(
                &other,
                sizes.drain_other,
                sizes.scheduled,
                repeat,
                &mut rows,
            )
            .await?;
            other.drop().await?;
        }
    }
    if wants("admin") {
        admin::section(&pg, sizes.admin, &mut rows).await?;
    }
    if wants("log") {
        log_relay::section(&sizes, repeat, &mut rows).await?;
    }
    vacuum_stop.cancel();
    pg.drop().await?;

    println!();
    println!("{}", report::render(&rows));
    let missed = rows.iter().filter(|r| r.met() == Some(false)).count();
    let targets = rows.iter().filter(|r| r.met().is_some()).count();
    println!(
        "{} of {targets} targets met{} in {:.0}s",
        targets - missed,
        if quick {
            " (quick mode: sizes too small to judge)"
        } else {
            ""
        },
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What the throughput section runs: every workload × worker count × relay variant.
struct Plan<'a> {
    workers: &'a [usize],
    orderings: &'a [Ordering],
    on_publish: &'a [OnPublish],
    workloads: &'a [Workload],
    repeat: usize,
}

async fn throughput_section(
    db: &BenchDb,
    n: u64,
    plan: &Plan<'_>,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let Plan {
        workers,
        orderings,
        on_publish,
        workloads,
        repeat,
    } = *plan;
    let label = db.kind.label();
    let pg = db.kind == Kind::Postgres;
    let cpu = |c: Option<cpu::CpuPerEvent>| c.map(|c| format!(" ({c})")).unwrap_or_default();
    for &workload in workloads {
        let wl = workload.label();
        for &w in workers {
            // Baselines and relays alternate, `repeat` times; the table takes each one's
            // median, which steadies a machine whose absolute rates swing by a third from run
            // to run.
            let mut minimal = Vec::new();
            let mut raws = Vec::new();
            let mut raw_ids = Vec::new();
            // Retained, each ordering is also run the way it claimed before owned partitions
            // (leases, and a head probe per event when ordered), in the same run, to compare.
            let variants: Vec<(Ordering, OnPublish, Claiming)> = on_publish
                .iter()
                .flat_map(|&p| orderings.iter().map(move |&o| (o, p)))
                .flat_map(|(o, p)| {
                    let old = p == OnPublish::Retain;
                    std::iter::once((o, p, Claiming::OwnedPartitions)).chain(old.then_some((
                        o,
                        p,
                        Claiming::Leases,
                    )))
                })
                .collect();
            let mut relays: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
            for _ in 0..repeat {
                if pg {
                    let m = throughput::minimal(db, w, n, workload).await?;
                    eprintln!(
                        "{label} [{wl}] minimal loop x{w}: {:.0}/s{}",
                        m.rate,
                        cpu(m.cpu)
                    );
                    minimal.push(m.rate);
                }
                let ids = throughput::raw(db, w, n, Read::Ids, workload).await?;
                eprintln!(
                    "{label} [{wl}] raw loop, ids only x{w}: {:.0}/s{}",
                    ids.rate,
                    cpu(ids.cpu)
                );
                raw_ids.push(ids.rate);
                let raw = throughput::raw(db, w, n, Read::Events, workload).await?;
                eprintln!(
                    "{label} [{wl}] raw loop x{w}: {:.0}/s{}",
                    raw.rate,
                    cpu(raw.cpu)
                );
                raws.push(raw.rate);
                let probes = std::env::var("OUTBOX_BENCH_PROBES").unwrap_or_default();
                if pg && probes.contains("lease") {
                    let probe = throughput::lease_table_probe(db, w, n, workload).await?;
                    eprintln!(
                        "{label} [{wl}] lease-table probe x{w}: {:.0}/s ({:.2}x){}",
                        probe.rate,
                        probe.rate / raw.rate,
                        cpu(probe.cpu)
                    );
                }
                if pg && probes.contains("txheld") {
                    let probe = throughput::tx_held_probe(db, w, n, workload).await?;
                    eprintln!(
                        "{label} [{wl}] tx-held probe x{w}: {:.0}/s ({:.2}x){}",
                        probe.rate,
                        probe.rate / raw.rate,
                        cpu(probe.cpu)
                    );
                }
                for (i, &(ordering, publish, claiming)) in variants.iter().enumerate() {
                    let config = throughput::relay_config(ordering)
                        .on_publish(publish)
                        .claiming(claiming);
                    let relay = throughput::relay(db, w, n, config, workload).await?;
                    eprintln!(
                        "{label} [{wl}] relay {} x{w}: {:.0}/s{}",
                        variant_label(ordering, publish, claiming),
                        relay.rate,
                        cpu(relay.cpu)
                    );
                    relays[i].push(relay.rate);
                }
            }
            let minimal = median(&mut minimal);
            let raw = median(&mut raws);
            let raw_ids = median(&mut raw_ids);
            for (i, &(ordering, publish, claiming)) in variants.iter().enumerate() {
                let value = median(&mut relays[i]);
                let name = format!(
                    "{label} {n} events ({wl}), {w} relay{}, {}",
                    if w == 1 { "" } else { "s" },
                    variant_label(ordering, publish, claiming)
                );
                let old = claiming == Claiming::Leases;
                // Issue 16's targets: against the minimal outbox on PostgreSQL, against the
                // backend's own raw loop elsewhere (the minimal schema is PostgreSQL's).
                let target = match (ordering, pg, w) {
                    (Ordering::Unordered, true, 1) => 0.9,
                    (Ordering::Unordered, _, _) => 0.85,
                    (_, true, _) => 0.75,
                    _ => 0.7,
                };
                if pg {
                    rows.push(Row {
                        section: "relay throughput",
                        name: name.clone(),
                        value,
                        unit: "ev/s",
                        baseline: Some((format!("minimal raw_outbox loop ×{w}"), minimal)),
                        target: (!old).then_some(Target::RatioAtLeast(target)),
                    });
                }
                rows.push(Row {
                    section: "relay throughput",
                    name: if pg {
                        "… against a raw loop on outbox_events".to_owned()
                    } else {
                        name
                    },
                    value,
                    unit: "ev/s",
                    baseline: Some((format!("raw loop ×{w}"), raw)),
                    target: (!pg && !old).then_some(Target::RatioAtLeast(target)),
                });
                // A loop that reads only ids could not publish anything: beside, no verdict.
                rows.push(Row {
                    section: "relay throughput",
                    name: "… against a loop on outbox_events that reads only ids".to_owned(),
                    value,
                    unit: "ev/s",
                    baseline: Some((format!("ids-only loop ×{w}"), raw_ids)),
                    target: None,
                });
            }
        }
    }
    Ok(())
}

fn variant_label(ordering: Ordering, publish: OnPublish, claiming: Claiming) -> String {
    let label = match publish {
        OnPublish::Delete => format!("{}, delete on publish", ordering_label(ordering)),
        _ => ordering_label(ordering).to_owned(),
    };
    match (ordering, claiming) {
        (_, Claiming::Leases) => format!("{label}, leases (0.1's claim)"),
        _ => label,
    }
}

fn ordering_label(ordering: Ordering) -> &'static str {
    match ordering {
        Ordering::Unordered => "unordered",
        _ => "per-aggregate order",
    }
}

/// The median (the upper one of an even count); 0 for none.
fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(0.0)
}
