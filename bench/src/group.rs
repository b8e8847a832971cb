//! Issue 30's resources: one `RelayGroup` over 10, 100 and 1,000 idle PostgreSQL schemas —
//! the process's memory, its idle CPU and the server's, the connections it holds, and the
//! commit → publish latency of one event in an idle schema — beside the plumbing a user
//! writes today (one `Relay` per schema at its defaults) where the server's 100 connections
//! allow it.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, TransactionTrait};
use sea_orm_migration::MigratorTrait;
use seaorm_outbox::publisher::InMemoryPublisher;
use seaorm_outbox::relay::{GroupConfig, Relay, RelayGroup};
use seaorm_outbox::{NewEvent, Outbox, OutboxRepository};
use tokio_util::sync::CancellationToken;

use crate::cpu::CpuMeter;
use crate::db::{opts, pg_url};
use crate::report::Row;

/// How long each setup idles while measured, and first settles: past the first polls and the
/// schema pools' idle timeout (10 s), so what is measured is the steady idle state. `--quick`
/// only checks that it runs.
fn spans(quick: bool) -> (Duration, Duration) {
    if quick {
        (Duration::from_secs(1), Duration::from_secs(1))
    } else {
        (Duration::from_secs(10), Duration::from_secs(12))
    }
}

/// `n` migrated schemas named `<prefix>_<i>`.
async fn schemas(admin: &DatabaseConnection, prefix: &str, n: usize) -> Result<Vec<String>> {
    let names: Vec<String> = (0..n).map(|i| format!("{prefix}_{i}")).collect();
    let made: Vec<Result<()>> = futures_util::stream::iter(names.clone())
        .map(|name| async move {
            admin
                .execute_unprepared(&format!(
                    "DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}"
                ))
                .await?;
            let mut o = opts(&pg_url(), 1);
            o.set_schema_search_path(name.clone());
            let db = Database::connect(o).await?;
            seaorm_outbox_migration::Migrator::up(&db, None).await?;
            db.close().await?;
            Ok(())
        })
        .buffer_unordered(8)
        .collect()
        .await;
    made.into_iter().collect::<Result<Vec<()>>>()?;
    Ok(names)
}

async fn drop_schemas(admin: &DatabaseConnection, names: &[String]) -> Result<()> {
    for chunk in names.chunks(50) {
        admin
            .execute_unprepared(&format!(
                "DROP SCHEMA IF EXISTS {} CASCADE",
                chunk.join(", ")
            ))
            .await?;
    }
    Ok(())
}

/// One scan of `names` as the group makes it (chunks of 250 schemas, one due-index probe
/// each), timed: the median of five, in ms.
async fn scan_ms(admin: &DatabaseConnection, names: &[String]) -> Result<f64> {
    let mut times = Vec::new();
    for _ in 0..5 {
        let began = Instant::now();
        for chunk in names.chunks(250) {
            let sql = chunk
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    format!(
                        "SELECT {i} WHERE EXISTS (SELECT 1 FROM \"{s}\".outbox_events \
                         WHERE status = 'pending' AND next_attempt_at <= now())"
                    )
                })
                .collect::<Vec<_>>()
                .join(" UNION ALL ");
            admin.execute_unprepared(&sql).await?;
        }
        times.push(began.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[2])
}

/// Connections to the server other than `admin`'s own.
async fn connections(admin: &DatabaseConnection) -> Result<i64> {
    let row = admin
        .query_one_raw(sea_orm::Statement::from_string(
            admin.get_database_backend(),
            "SELECT COUNT(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
             AND pid <> pg_backend_pid()",
        ))
        .await?
        .context("a count")?;
    Ok(row.try_get_by_index::<i64>(0)?)
}

/// The machine's own idle CPU (the brokers and databases on it), % of one core: taken off the
/// server's share below.
fn background(idle: Duration) -> Result<f64> {
    let cpu = CpuMeter::start().context("/proc")?;
    std::thread::sleep(idle);
    let used = cpu.per_event(1).context("/proc")?;
    Ok(used.server_us / 1e6 / idle.as_secs_f64() * 100.0)
}

/// What one setup costs while idle.
struct Idle {
    rss: f64,
    client_cpu: f64,
    server_cpu: f64,
    connections: i64,
    latency: Duration,
}

/// Idles for `idle` after `warm_up`, then commits one event in `schema` and times its
/// delivery through `publisher`.
async fn measure(
    admin: &DatabaseConnection,
    (rss_before, conns_before, background): (f64, i64, f64),
    (idle, warm_up): (Duration, Duration),
    schema: &str,
    publisher: &InMemoryPublisher,
) -> Result<Idle> {
    tokio::time::sleep(warm_up).await;
    let cpu = CpuMeter::start().context("/proc")?;
    tokio::time::sleep(idle).await;
    let used = cpu.per_event(1).context("/proc")?;
    let share = |us: f64| us / 1e6 / idle.as_secs_f64() * 100.0;
    let connections = connections(admin).await? - conns_before;
    let rss = crate::cpu::rss_mib() - rss_before;
    let mut o = opts(&pg_url(), 1);
    o.set_schema_search_path(schema.to_owned());
    let db = Database::connect(o).await?;
    let before = publisher.len();
    let txn = db.begin().await?;
    Outbox::new(&txn)
        .add_event(NewEvent::new("bench.idle", "tenant", "1"))
        .await?;
    txn.commit().await?;
    let began = Instant::now();
    while publisher.len() == before {
        anyhow::ensure!(
            began.elapsed() < Duration::from_secs(30),
            "the event was not delivered"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let latency = began.elapsed();
    db.close().await?;
    Ok(Idle {
        rss,
        client_cpu: share(used.client_us),
        server_cpu: (share(used.server_us) - background).max(0.0),
        connections,
        latency,
    })
}

fn report(label: &str, n: usize, idle: &Idle, rows: &mut Vec<Row>) {
    println!(
        "group: {label} over {n} idle schemas: +{:.1} MiB, CPU {:.2}% client / {:.2}% server, +{} connections, commit→publish {:.0} ms",
        idle.rss,
        idle.client_cpu,
        idle.server_cpu,
        idle.connections,
        idle.latency.as_secs_f64() * 1000.0
    );
    let row = |name: String, value: f64, unit| Row {
        section: "group",
        name,
        value,
        unit,
        baseline: None,
        target: None,
    };
    rows.push(row(
        format!("{label}, {n} idle schemas: memory"),
        idle.rss,
        "MiB",
    ));
    rows.push(row(
        format!("{label}, {n} idle schemas: client CPU"),
        idle.client_cpu,
        "% core",
    ));
    rows.push(row(
        format!("{label}, {n} idle schemas: server CPU"),
        idle.server_cpu,
        "% core",
    ));
    rows.push(row(
        format!("{label}, {n} idle schemas: connections"),
        idle.connections as f64,
        "conns",
    ));
}

/// The section: each size with a group, and with one relay per schema where it fits.
pub(crate) async fn section(quick: bool, rows: &mut Vec<Row>) -> Result<()> {
    let admin = Database::connect(opts(&pg_url(), 1)).await?;
    // `OUTBOX_BENCH_GROUP_SIZES=1000`: some sizes only.
    let sizes: Vec<usize> = match std::env::var("OUTBOX_BENCH_GROUP_SIZES") {
        Ok(v) => v.split(',').filter_map(|n| n.trim().parse().ok()).collect(),
        Err(_) if quick => vec![10],
        Err(_) => vec![10, 100, 1000],
    };
    let spans = spans(quick);
    let prefix = format!("obg{}", std::process::id());
    for n in sizes {
        let names = schemas(&admin, &prefix, n).await?;
        // The schemas' creation leaves dirty pages the checkpointer would write while the
        // group is measured: write them now, then take the machine's own idle CPU (brokers,
        // databases) as it is with the schemas in place.
        admin.execute_unprepared("CHECKPOINT").await?;
        let background = tokio::task::spawn_blocking(move || background(spans.0)).await??;
        println!(
            "group: {n} schemas in place, nothing running: the machine's own idle CPU {background:.2}% of a core, taken off the server figures"
        );
        let before = (
            crate::cpu::rss_mib(),
            connections(&admin).await?,
            background,
        );
        let publisher = InMemoryPublisher::new();
        let group = RelayGroup::builder(publisher.clone())
            .config(GroupConfig::default())
            .schemas(Database::connect(opts(&pg_url(), 2)).await?)
            .build()?;
        for s in &names {
            group.add_schema(s.clone(), s).await?;
        }
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (g, stop) = (group.clone(), stop.clone());
            async move { g.run(stop).await }
        });
        let idle = measure(&admin, before, spans, &names[n / 2], &publisher).await?;
        report("RelayGroup", n, &idle, rows);
        let scan = scan_ms(&admin, &names).await?;
        println!("group: one scan of {n} schemas takes {scan:.1} ms (median of 5)");
        rows.push(Row {
            section: "group",
            name: format!("RelayGroup, {n} idle schemas: one scan"),
            value: scan,
            unit: "ms",
            baseline: None,
            target: None,
        });
        stop.cancel();
        task.await?;
        drop(group);

        // One relay per schema, as written by hand today: a pool and a LISTEN each.
        if n <= 40 {
            let before = (
                crate::cpu::rss_mib(),
                connections(&admin).await?,
                background,
            );
            let publisher = InMemoryPublisher::new();
            let stop = CancellationToken::new();
            let mut tasks = Vec::new();
            for s in &names {
                let mut o = opts(&pg_url(), 2);
                o.set_schema_search_path(s.clone());
                let relay =
                    Relay::builder(Database::connect(o).await?, publisher.clone()).build()?;
                let stop = stop.clone();
                tasks.push(tokio::spawn(async move { relay.run(stop).await }));
            }
            let idle = measure(&admin, before, spans, &names[n / 2], &publisher).await?;
            report("one Relay per schema", n, &idle, rows);
            stop.cancel();
            for t in tasks {
                t.await?;
            }
        } else {
            println!(
                "group: one Relay per schema over {n} schemas not run: a pool and a LISTEN each need {} connections, the server allows 100",
                2 * n
            );
        }
        drop_schemas(&admin, &names).await?;
    }
    Ok(())
}
