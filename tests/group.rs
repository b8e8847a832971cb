//! A [`RelayGroup`] serving many tenants from one process, on real databases: each tenant a
//! PostgreSQL schema, a MariaDB database, a SQLite file, or a private PostgreSQL server the
//! test stops. What a user relies on:
//! - no publisher call ever mixes tenants, and every event is delivered, in per-aggregate order;
//! - a tenant whose database is down does not slow the others, and drains with nothing lost
//!   once it is back, through a second outage during its recovery too;
//! - a small tenant is not starved by a big backlog (its commit → publish latency is printed);
//! - removing a tenant mid-drain writes its batch in flight back and leaves nothing leased;
//! - a broker outage is one outage: the shared breaker sends probes, not one per tenant;
//! - one LISTEN connection wakes the tenant whose schema the NOTIFY names.
#![cfg(feature = "postgres")]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::pg_server::PgServer;
use common::{Backend, TestDb};
use sea_orm::{DatabaseConnection, TransactionTrait};
use seaorm_outbox::publisher::{BoxError, Publisher};
use seaorm_outbox::relay::{BreakerConfig, GroupConfig, RelayConfig, RelayGroup};
use seaorm_outbox::{
    Error, HealthStatus, HealthThresholds, NewEvent, Outbox, OutboxEvent, OutboxRepository,
    PublishOutcome,
};
use tokio_util::sync::CancellationToken;

/// Records every call: the tenants its events came from (their `aggregate_type`), and when
/// each event arrived. `down` makes every call find the broker unavailable; `slow` delays the
/// calls for one tenant.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Seen>>,
    down: Arc<AtomicBool>,
    slow: Option<(String, Duration)>,
    /// Every event of this tenant is refused: retried, then dead-lettered.
    poison: Option<String>,
}

#[derive(Default)]
struct Seen {
    /// Calls whose events came from more than one tenant.
    mixed: usize,
    /// Calls made while down.
    refused: usize,
    /// Every delivery: the event and when it arrived.
    delivered: Vec<(OutboxEvent, Instant)>,
}

#[async_trait]
impl Publisher for Recorder {
    async fn publish(&self, events: &[OutboxEvent]) -> Result<Vec<PublishOutcome>, BoxError> {
        let tenants: HashSet<&str> = events.iter().map(|e| e.aggregate_type.as_str()).collect();
        if let Some((tenant, delay)) = &self.slow
            && tenants.contains(tenant.as_str())
        {
            tokio::time::sleep(*delay).await;
        }
        let mut seen = self.seen.lock().expect("seen");
        if tenants.len() > 1 {
            seen.mixed += 1;
        }
        if self.down.load(Ordering::SeqCst) {
            seen.refused += 1;
            return Ok(vec![
                PublishOutcome::Unavailable("down".into());
                events.len()
            ]);
        }
        if let Some(p) = &self.poison
            && tenants.contains(p.as_str())
        {
            return Ok(vec![PublishOutcome::Retry("poison".into()); events.len()]);
        }
        let at = Instant::now();
        seen.delivered
            .extend(events.iter().map(|e| (e.clone(), at)));
        Ok(vec![PublishOutcome::Delivered; events.len()])
    }
}

impl Recorder {
    /// Distinct events delivered for `tenant`.
    fn delivered(&self, tenant: &str) -> usize {
        let seen = self.seen.lock().expect("seen");
        seen.delivered
            .iter()
            .filter(|(e, _)| e.aggregate_type == tenant)
            .map(|(e, _)| e.id)
            .collect::<HashSet<_>>()
            .len()
    }

    /// Panics if a call mixed tenants, or an aggregate's first deliveries came out of order.
    fn check(&self) {
        let seen = self.seen.lock().expect("seen");
        assert_eq!(seen.mixed, 0, "a publisher call mixed tenants");
        let mut first = HashSet::new();
        let mut last: HashMap<(String, String), i64> = HashMap::new();
        for (e, _) in &seen.delivered {
            if !first.insert(e.id) {
                continue;
            }
            let seq = e.payload["seq"].as_i64().expect("seq");
            let key = (e.aggregate_type.clone(), e.aggregate_id.clone());
            if let Some(prev) = last.insert(key.clone(), seq) {
                assert!(prev < seq, "{key:?}: {seq} delivered after {prev}");
            }
        }
    }
}

/// Writes `n` events for `tenant` (its `aggregate_type`) over 10 aggregates, in one
/// transaction per 1,000.
async fn seed(db: &DatabaseConnection, tenant: &str, from: usize, n: usize) {
    for chunk in (from..from + n).collect::<Vec<_>>().chunks(1000) {
        let txn = db.begin().await.expect("begin");
        let events = chunk
            .iter()
            .map(|i| {
                NewEvent::new("t", tenant, (i % 10).to_string())
                    .payload(&serde_json::json!({ "seq": i }))
            })
            .collect();
        Outbox::new(&txn).add_events(events).await.expect("add");
        txn.commit().await.expect("commit");
    }
}

async fn count(t: &TestDb, status: &str) -> i64 {
    t.scalar(&format!(
        "SELECT COUNT(*) FROM outbox_events WHERE status = '{status}'"
    ))
    .await
}

fn relay_config() -> RelayConfig {
    RelayConfig::default()
        .batch_size(100)
        .idle_poll_interval(Duration::from_millis(50))
        .breaker(
            BreakerConfig::default()
                .base(Duration::from_millis(100))
                .cap(Duration::from_millis(400)),
        )
}

fn group(publisher: Recorder, config: GroupConfig) -> RelayGroup<Recorder> {
    RelayGroup::builder(publisher)
        .relay_config(relay_config())
        .config(config.idle_poll_max(Duration::from_millis(200)))
        .build()
        .expect("group")
}

fn start(g: &RelayGroup<Recorder>) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (g, stop) = (g.clone(), stop.clone());
        async move {
            g.run(stop).await;
        }
    });
    (stop, task)
}

async fn wait_until(what: &str, within: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_on_every_backend_drain_in_their_own_batches_in_order() {
    let tenants = [
        ("pg", TestDb::new(Backend::Postgres).await),
        ("maria", TestDb::new(Backend::MySql).await),
        ("sqlite", TestDb::new(Backend::SqliteFile).await),
    ];
    let rec = Recorder::default();
    let g = group(rec.clone(), GroupConfig::default());
    for (id, t) in &tenants {
        seed(&t.db, id, 0, 1500).await;
        g.add_tenant(*id, t.db.clone()).await.expect("add");
    }
    let (stop, task) = start(&g);
    wait_until("all drained", Duration::from_secs(60), async || {
        tenants.iter().all(|(id, _)| rec.delivered(id) == 1500)
    })
    .await;
    // Health per tenant, read from each tenant's own database: one added now with a dead
    // letter is degraded, the others healthy, the group as bad as its worst.
    let late = TestDb::new(Backend::SqliteFile).await;
    let dead = Outbox::new(&late.db)
        .add_event(NewEvent::new("t", "late", "x").payload(&serde_json::json!({ "seq": 0 })))
        .await
        .expect("add");
    Outbox::new(&late.db)
        .mark_failed(dead, "bad")
        .await
        .expect("fail");
    g.add_tenant("late", late.db.clone()).await.expect("add");
    let health = loop {
        let h = g.health(&HealthThresholds::default()).await;
        if h.tenants.get("late").is_some_and(|l| l.last_poll.is_some()) {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(health.tenants.len(), 4);
    assert_eq!(
        health.tenants["late"].status,
        HealthStatus::Degraded,
        "{health:?}"
    );
    for (id, _) in &tenants {
        assert_eq!(
            health.tenants[*id].status,
            HealthStatus::Healthy,
            "{id}: {health:?}"
        );
    }
    assert_eq!(health.status, HealthStatus::Degraded);
    g.remove_tenant("late").await.expect("remove");
    late.cleanup().await;
    stop.cancel();
    task.await.expect("group");
    rec.check();
    for (id, t) in &tenants {
        assert_eq!(count(t, "published").await, 1500, "{id}");
        assert_eq!(g.stats()[*id].published, 1500, "{id}");
    }

    // A stopped group leaves no heartbeat rows behind.
    for (id, t) in &tenants {
        assert_eq!(
            t.scalar("SELECT COUNT(*) FROM outbox_relays").await,
            0,
            "{id}"
        );
    }
    for (_, t) in tenants {
        t.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_whose_database_is_down_slows_no_one_and_loses_nothing() {
    const HEALTHY: [&str; 3] = ["a", "b", "c"];
    const EACH: usize = 3000;
    let healthy: Vec<TestDb> =
        futures_util::future::join_all(HEALTHY.iter().map(|_| TestDb::new(Backend::Postgres)))
            .await;
    let server = PgServer::start();
    let down = TestDb::new_postgres_at(&server.url()).await;
    seed(&down.db, "down", 0, 2000).await;

    // Baseline: the healthy tenants alone.
    let drain = async |g: &RelayGroup<Recorder>, rec: &Recorder, round: usize| {
        for (id, t) in HEALTHY.iter().zip(&healthy) {
            seed(&t.db, id, round * EACH, EACH).await;
        }
        let began = Instant::now();
        let (stop, task) = start(g);
        wait_until(
            "healthy tenants drained",
            Duration::from_secs(120),
            async || {
                HEALTHY
                    .iter()
                    .all(|id| rec.delivered(id) == (round + 1) * EACH)
            },
        )
        .await;
        (began.elapsed(), stop, task)
    };
    let rec = Recorder {
        slow: Some(("down".into(), Duration::from_millis(20))),
        ..Recorder::default()
    };
    let g = group(rec.clone(), GroupConfig::default());
    for (id, t) in HEALTHY.iter().zip(&healthy) {
        g.add_tenant(*id, t.db.clone()).await.expect("add");
    }
    let (alone, stop, task) = drain(&g, &rec, 0).await;
    stop.cancel();
    task.await.expect("group");

    // The same again, with a tenant whose server is stopped.
    let down_db = down.connect_again().await;
    server.stop();
    g.add_tenant("down", down_db)
        .await
        .expect("add a tenant whose database is down");
    let (beside, stop, task) = drain(&g, &rec, 1).await;
    let health = g.health(&HealthThresholds::default()).await;
    assert_eq!(
        health.tenants["down"].status,
        HealthStatus::Unhealthy,
        "{:?}",
        health.tenants["down"]
    );
    for id in HEALTHY {
        assert_ne!(
            health.tenants[id].status,
            HealthStatus::Unhealthy,
            "{id}: {:?}",
            health.tenants[id]
        );
    }
    assert_eq!(health.http_status(), 503);
    println!(
        "healthy tenants drained {} events in {alone:?} alone, {beside:?} beside a stopped one",
        HEALTHY.len() * EACH
    );
    // Loose: the two drains ran at different moments of a loaded machine.
    assert!(
        beside < alone * 3 + Duration::from_secs(3),
        "a stopped tenant slowed the others: {beside:?} against {alone:?}"
    );

    // Back, then down again part way through its recovery, then back for good.
    server.start_again();
    wait_until("the tenant recovers", Duration::from_secs(60), async || {
        rec.delivered("down") >= 200
    })
    .await;
    assert!(
        rec.delivered("down") < 2000,
        "recovered before the second outage"
    );
    server.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.start_again();
    wait_until("the tenant drains", Duration::from_secs(90), async || {
        rec.delivered("down") == 2000
    })
    .await;
    stop.cancel();
    task.await.expect("group");
    rec.check();
    assert_eq!(count(&down, "published").await, 2000);
    assert_eq!(count(&down, "pending").await, 0);
    assert_eq!(
        count(&down, "failed").await,
        0,
        "an outage is no dead letter"
    );
    for (id, t) in HEALTHY.iter().zip(&healthy) {
        assert_eq!(count(t, "published").await, 2 * EACH as i64, "{id}");
    }
    for t in healthy {
        t.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_whose_databases_hang_free_their_workers() {
    const HUNG: [&str; 2] = ["a-hung", "b-hung"];
    const HEALTHY: [&str; 2] = ["c", "d"];
    let all: Vec<TestDb> =
        futures_util::future::join_all((0..4).map(|_| TestDb::new(Backend::Postgres))).await;
    let (hung, healthy) = all.split_at(2);
    let rec = Recorder::default();
    // Two workers, and the hung tenants come first in turn: without freeing their workers,
    // nothing else would run.
    let g = group(
        rec.clone(),
        GroupConfig::default()
            .workers(2)
            .stall_after(Duration::from_millis(300)),
    );
    let mut proxies = Vec::new();
    for (id, t) in HUNG.iter().zip(hung) {
        seed(&t.db, id, 0, 300).await;
        let proxy = common::proxy::Proxy::start(&t.server_addr()).await;
        g.add_tenant(*id, t.connect_via(proxy.addr).await)
            .await
            .expect("add");
        proxies.push(proxy);
    }
    for (id, t) in HEALTHY.iter().zip(healthy) {
        seed(&t.db, id, 0, 2000).await;
        g.add_tenant(*id, t.db.clone()).await.expect("add");
    }
    for p in &proxies {
        p.hang();
    }
    let began = Instant::now();
    let (stop, task) = start(&g);
    // A hung batch would otherwise hold its worker until the connection gives up (5 s).
    wait_until(
        "the healthy tenants' first deliveries",
        Duration::from_secs(3),
        async || HEALTHY.iter().any(|id| rec.delivered(id) > 0),
    )
    .await;
    wait_until(
        "the healthy tenants drain",
        Duration::from_secs(30),
        async || HEALTHY.iter().all(|id| rec.delivered(id) == 2000),
    )
    .await;
    let took = began.elapsed();
    println!("two healthy tenants drained beside two hung ones in {took:?}");
    assert_eq!(HUNG.iter().map(|id| rec.delivered(id)).sum::<usize>(), 0);
    for p in &proxies {
        p.restore();
    }
    wait_until(
        "the hung tenants drain once answered",
        Duration::from_secs(60),
        async || HUNG.iter().all(|id| rec.delivered(id) == 300),
    )
    .await;
    stop.cancel();
    task.await.expect("group");
    rec.check();
    for t in &all {
        assert_eq!(count(t, "pending").await, 0);
        assert_eq!(count(t, "failed").await, 0);
    }
    for t in all {
        t.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_tenant_is_served_while_a_big_backlog_drains() {
    const BIG: usize = 20_000;
    let big = TestDb::new(Backend::Postgres).await;
    let small = TestDb::new(Backend::Postgres).await;
    seed(&big.db, "big", 0, BIG).await;
    let rec = Recorder::default();
    // One worker: the turns alone keep the small tenant going.
    let g = group(rec.clone(), GroupConfig::default().workers(1));
    g.add_tenant("big", big.db.clone()).await.expect("add");
    let waker = g.add_tenant("small", small.db.clone()).await.expect("add");
    let (stop, task) = start(&g);
    wait_until(
        "the big drain is under way",
        Duration::from_secs(30),
        async || rec.delivered("big") >= 1000,
    )
    .await;
    let mut committed = HashMap::new();
    for i in 0..20 {
        let txn = small.db.begin().await.expect("begin");
        let id = Outbox::new(&txn)
            .add_event(NewEvent::new("t", "small", "s").payload(&serde_json::json!({ "seq": i })))
            .await
            .expect("add");
        txn.commit().await.expect("commit");
        waker.wake();
        committed.insert(id, Instant::now());
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    wait_until(
        "the small tenant's events",
        Duration::from_secs(30),
        async || rec.delivered("small") == 20,
    )
    .await;
    let big_then = rec.delivered("big");
    let mut latency: Vec<Duration> = rec
        .seen
        .lock()
        .expect("seen")
        .delivered
        .iter()
        .filter_map(|(e, at)| committed.get(&e.id).map(|c| at.duration_since(*c)))
        .collect();
    latency.sort();
    let worst = latency[latency.len() - 1];
    println!(
        "small tenant commit→publish beside a {BIG}-event drain, one worker: median {:?}, max {worst:?}; big had {big_then} delivered",
        latency[latency.len() / 2]
    );
    assert!(
        big_then < BIG,
        "the big tenant finished first: nothing was measured"
    );
    assert!(
        worst < Duration::from_secs(1),
        "the small tenant waited {worst:?}"
    );
    stop.cancel();
    task.await.expect("group");
    rec.check();
    big.cleanup().await;
    small.cleanup().await;
}

async fn leased(t: &TestDb) -> i64 {
    match t.backend {
        Backend::Postgres => t.scalar("SELECT COUNT(*) FROM outbox_leases").await,
        _ => {
            t.scalar(
                "SELECT COUNT(*) FROM outbox_events WHERE status = 'pending' AND locked_by IS NOT NULL",
            )
            .await
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_tenant_mid_drain_writes_its_batch_back_and_leaves_nothing_leased() {
    for backend in [Backend::Postgres, Backend::MySql, Backend::SqliteFile] {
        let t = TestDb::new(backend).await;
        seed(&t.db, "slow", 0, 1000).await;
        let rec = Recorder {
            slow: Some(("slow".into(), Duration::from_millis(100))),
            ..Recorder::default()
        };
        let g = group(rec.clone(), GroupConfig::default());
        g.add_tenant("slow", t.db.clone()).await.expect("add");
        assert!(matches!(
            g.add_tenant("slow", t.db.clone()).await,
            Err(Error::Tenant { exists: true, .. })
        ));
        let (stop, task) = start(&g);
        wait_until("two batches out", Duration::from_secs(30), async || {
            rec.delivered("slow") >= 200
        })
        .await;
        let stats = g.remove_tenant("slow").await.expect("remove");
        let published = count(&t, "published").await;
        assert_eq!(stats.published as i64, published, "{backend:?}");
        assert_eq!(
            rec.delivered("slow") as i64,
            published,
            "{backend:?}: a delivered event left unmarked"
        );
        assert!(published < 1000, "{backend:?}: drained before the removal");
        assert_eq!(leased(&t).await, 0, "{backend:?}: a lease left behind");
        assert!(matches!(
            g.remove_tenant("slow").await,
            Err(Error::Tenant { exists: false, .. })
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            count(&t, "published").await,
            published,
            "{backend:?}: a removed tenant was relayed"
        );
        // Added again while the group runs, it drains the rest, each event once.
        g.add_tenant("slow", t.db.clone()).await.expect("add again");
        wait_until("the rest", Duration::from_secs(60), async || {
            rec.delivered("slow") == 1000
        })
        .await;
        stop.cancel();
        task.await.expect("group");
        rec.check();
        assert_eq!(
            rec.seen.lock().expect("seen").delivered.len(),
            1000,
            "{backend:?}: a duplicate"
        );
        assert_eq!(count(&t, "published").await, 1000);
        t.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_is_one_outage_for_all_tenants() {
    const TENANTS: usize = 6;
    let dbs: Vec<TestDb> =
        futures_util::future::join_all((0..TENANTS).map(|_| TestDb::new(Backend::SqliteMemory)))
            .await;
    let rec = Recorder::default();
    rec.down.store(true, Ordering::SeqCst);
    let g = group(rec.clone(), GroupConfig::default());
    for (i, t) in dbs.iter().enumerate() {
        let id = format!("t{i}");
        seed(&t.db, &id, 0, 200).await;
        g.add_tenant(id, t.db.clone()).await.expect("add");
    }
    let (stop, task) = start(&g);
    let outage = Duration::from_secs(3);
    tokio::time::sleep(outage).await;
    let refused = rec.seen.lock().expect("seen").refused;
    assert!(
        g.breaker().unavailable_since.is_some(),
        "the breaker is open"
    );
    // One outage: the first batches (one per worker), then one probe per reopening (at least
    // 50 ms apart, doubling to 400 ms). Six breakers would probe six times as often.
    let bound = 4 + (outage.as_millis() / 50) as usize / 4 + 2;
    println!("{TENANTS} tenants, {outage:?} outage: {refused} publisher calls (bound {bound})");
    assert!(refused <= bound, "{refused} calls during the outage");
    rec.down.store(false, Ordering::SeqCst);
    wait_until(
        "all drained after the outage",
        Duration::from_secs(30),
        async || (0..TENANTS).all(|i| rec.delivered(&format!("t{i}")) == 200),
    )
    .await;
    stop.cancel();
    task.await.expect("group");
    rec.check();
    for t in &dbs {
        assert_eq!(count(t, "published").await, 200);
        assert_eq!(
            t.scalar("SELECT COUNT(*) FROM outbox_events WHERE attempts > 0")
                .await,
            0,
            "the outage spent attempts"
        );
    }
    for t in dbs {
        t.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_listen_connection_wakes_the_tenant_its_notify_names() {
    let a = TestDb::new(Backend::Postgres).await;
    let b = TestDb::new(Backend::Postgres).await;
    let listener = common::open(Backend::Postgres, &common::postgres_url(), "public").await;
    let rec = Recorder::default();
    // Polls 10 s apart: only a wake-up delivers within the test's second.
    let g = RelayGroup::builder(rec.clone())
        .relay_config(relay_config().idle_poll_interval(Duration::from_secs(10)))
        .config(GroupConfig::default().idle_poll_max(Duration::from_secs(10)))
        .listen(listener)
        .build()
        .expect("group");
    g.add_tenant("a", a.db.clone()).await.expect("add");
    g.add_tenant("b", b.db.clone()).await.expect("add");
    let (stop, task) = start(&g);
    // Let the first polls and the LISTEN settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (id, t) in [("b", &b), ("a", &a)] {
        let began = Instant::now();
        seed(&t.db, id, 0, 1).await;
        wait_until(
            &format!("{id} woken by NOTIFY"),
            Duration::from_secs(2),
            async || rec.delivered(id) == 1,
        )
        .await;
        println!("{id}: delivered {:?} after its commit", began.elapsed());
    }
    stop.cancel();
    task.await.expect("group");
    a.cleanup().await;
    b.cleanup().await;
}

/// Connections the schema tenants' pools hold now (their `application_name` is
/// `outbox/<schema>`).
async fn tenant_connections(admin: &TestDb, schemas: &[String]) -> i64 {
    let names = schemas
        .iter()
        .map(|s| format!("'outbox/{s}'"))
        .collect::<Vec<_>>()
        .join(",");
    admin
        .scalar(&format!(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name IN ({names})"
        ))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_tenants_share_one_scan_and_only_the_warm_ones_hold_connections() {
    const SCHEMAS: usize = 12;
    let all: Vec<TestDb> =
        futures_util::future::join_all((0..SCHEMAS).map(|_| TestDb::new(Backend::Postgres))).await;
    let names: Vec<String> = all.iter().map(|t| t.name.clone()).collect();
    // A tenant whose schema has no outbox table (its migrations never ran).
    let broken = TestDb::empty(Backend::Postgres).await;
    let rec = Recorder::default();
    let g = RelayGroup::builder(rec.clone())
        .relay_config(relay_config())
        .config(
            // The pools' idle timeout stays at its 10 s: a parked tenant lets its connections go
            // at once, but for the two that parked last.
            GroupConfig::default()
                .scan_interval(Duration::from_millis(200))
                .warm_schemas(2),
        )
        .schemas(common::open(Backend::Postgres, &common::postgres_url(), "public").await)
        .build()
        .expect("group");
    for (i, t) in all.iter().enumerate() {
        seed(&t.db, &format!("s{i}"), 0, 150).await;
        g.add_schema(format!("s{i}"), &t.name).await.expect("add");
    }
    g.add_schema("broken", &broken.name).await.expect("add");
    assert!(matches!(
        g.add_schema("s0", "elsewhere").await,
        Err(Error::Tenant { exists: true, .. })
    ));
    let (stop, task) = start(&g);
    wait_until(
        "every schema drained",
        Duration::from_secs(60),
        async || (0..SCHEMAS).all(|i| rec.delivered(&format!("s{i}")) == 150),
    )
    .await;

    // Written back too: the last batches' write-backs still hold connections.
    wait_until(
        "every schema written back",
        Duration::from_secs(30),
        async || (0..SCHEMAS).all(|i| g.stats()[&format!("s{i}")].published == 150),
    )
    .await;
    // Idle: the pools let their connections go, but for the two warm ones.
    let mut seen = Vec::new();
    // Within the pools' 10 s idle timeout, so only the cooling can explain it.
    wait_until("idle pools closed", Duration::from_secs(5), async || {
        let n = tenant_connections(&all[0], &names).await;
        if seen.last() != Some(&n) {
            seen.push(n);
        }
        (1..=4).contains(&n)
    })
    .await;
    println!("tenant connections once written back: {seen:?}");

    // A commit in an idle schema is delivered at once, through the one LISTEN.
    let began = Instant::now();
    seed(&all[7].db, "s7", 150, 1).await;
    wait_until("woken by NOTIFY", Duration::from_secs(2), async || {
        rec.delivered("s7") == 151
    })
    .await;
    println!("s7: delivered {:?} after its commit", began.elapsed());

    // A scheduled event: the NOTIFY at its commit finds it not yet due; only the scan
    // delivers it once it is.
    let t = &all[3];
    let txn = t.db.begin().await.expect("begin");
    Outbox::new(&txn)
        .add_event(
            NewEvent::new("t", "s3", "later")
                .payload(&serde_json::json!({ "seq": 1 }))
                .deliver_after(Duration::from_millis(1000)),
        )
        .await
        .expect("add");
    txn.commit().await.expect("commit");
    let committed = Instant::now();
    wait_until("the scheduled event", Duration::from_secs(5), async || {
        rec.delivered("s3") == 151
    })
    .await;
    let after = committed.elapsed();
    println!("scheduled 1 s ahead, delivered after {after:?}");
    assert!(
        after >= Duration::from_millis(1000) && after < Duration::from_secs(3),
        "{after:?}"
    );

    let health = g.health(&HealthThresholds::default()).await;
    assert_eq!(health.tenants["broken"].status, HealthStatus::Unhealthy);
    assert_ne!(health.tenants["s0"].status, HealthStatus::Unhealthy);
    // A parked tenant is polled by the scan: its health says so (no stale poll).
    let polled = health.tenants["s0"].last_poll.expect("polled");
    let age = chrono::Utc::now() - polled;
    assert!(
        age < chrono::Duration::milliseconds(800),
        "s0 last polled {age} ago"
    );
    stop.cancel();
    task.await.expect("group");
    rec.check();
    for t in all {
        t.cleanup().await;
    }
    broken.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_carry_the_tenant_up_to_the_cap_then_other() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    static SNAPSHOTTER: std::sync::OnceLock<metrics_util::debugging::Snapshotter> =
        std::sync::OnceLock::new();
    let snapshotter = SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let s = recorder.snapshotter();
        recorder.install().expect("the test binary's only recorder");
        s
    });
    let dbs: Vec<TestDb> = futures_util::future::join_all(
        [Backend::Postgres, Backend::MySql, Backend::SqliteFile].map(TestDb::new),
    )
    .await;
    let rec = Recorder::default();
    let g = group(rec.clone(), GroupConfig::default().tenant_labels(2));
    let ids = ["label-a", "label-b", "label-c"];
    for (id, t) in ids.iter().zip(&dbs) {
        seed(&t.db, id, 0, 10).await;
        g.add_tenant(*id, t.db.clone()).await.expect("add");
    }
    let (stop, task) = start(&g);
    wait_until("drained", Duration::from_secs(30), async || {
        ids.iter().all(|id| rec.delivered(id) == 10)
    })
    .await;
    stop.cancel();
    task.await.expect("group");
    let mut published: HashMap<String, u64> = HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        if key.key().name() != seaorm_outbox::telemetry::names::PUBLISHED {
            continue;
        }
        let tenant = key
            .key()
            .labels()
            .find(|l| l.key() == "tenant")
            .map(|l| l.value().to_owned())
            .unwrap_or_default();
        if let DebugValue::Counter(n) = value {
            *published.entry(tenant).or_default() += n;
        }
    }
    // Other tests of this binary publish too: only these tenants' labels are checked.
    assert_eq!(published.get("label-a"), Some(&10), "{published:?}");
    assert_eq!(published.get("label-b"), Some(&10), "{published:?}");
    assert!(
        published.get("other").is_some_and(|n| *n >= 10),
        "{published:?}"
    );
    assert_eq!(published.get("label-c"), None, "beyond the cap");
    for t in dbs {
        t.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_full_of_poison_events_slows_no_one() {
    let poison = TestDb::new(Backend::Postgres).await;
    let others: Vec<TestDb> =
        futures_util::future::join_all((0..2).map(|_| TestDb::new(Backend::Postgres))).await;
    let rec = Recorder {
        poison: Some("poison".into()),
        ..Recorder::default()
    };
    let g =
        RelayGroup::builder(rec.clone())
            .relay_config(relay_config().max_attempts(3).backoff(
                seaorm_outbox::relay::Backoff::new(
                    Duration::from_millis(20),
                    Duration::from_millis(50),
                ),
            ))
            .config(GroupConfig::default().workers(2))
            .build()
            .expect("group");
    seed(&poison.db, "poison", 0, 500).await;
    g.add_tenant("poison", poison.db.clone())
        .await
        .expect("add");
    for (i, t) in others.iter().enumerate() {
        seed(&t.db, &format!("o{i}"), 0, 3000).await;
        g.add_tenant(format!("o{i}"), t.db.clone())
            .await
            .expect("add");
    }
    let began = Instant::now();
    let (stop, task) = start(&g);
    wait_until("the others drain", Duration::from_secs(60), async || {
        (0..2).all(|i| rec.delivered(&format!("o{i}")) == 3000)
    })
    .await;
    println!(
        "two tenants drained 6,000 events in {:?} beside one whose every event fails",
        began.elapsed()
    );
    wait_until(
        "the poison dead-lettered",
        Duration::from_secs(60),
        async || count(&poison, "failed").await == 500,
    )
    .await;
    stop.cancel();
    task.await.expect("group");
    rec.check();
    assert_eq!(rec.delivered("poison"), 0);
    assert_eq!(count(&poison, "pending").await, 0);
    assert!(
        g.breaker().unavailable_since.is_none(),
        "a refused event is no outage"
    );
    for t in &others {
        assert_eq!(count(t, "published").await, 3000);
        assert_eq!(count(t, "failed").await, 0);
    }
    poison.cleanup().await;
    for t in others {
        t.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_schema_tenants_open_no_connection_at_start() {
    let all: Vec<TestDb> =
        futures_util::future::join_all((0..6).map(|_| TestDb::new(Backend::Postgres))).await;
    let names: Vec<String> = all.iter().map(|t| t.name.clone()).collect();
    let rec = Recorder::default();
    let g = RelayGroup::builder(rec.clone())
        .relay_config(relay_config())
        .config(GroupConfig::default().scan_interval(Duration::from_millis(200)))
        .schemas(common::open(Backend::Postgres, &common::postgres_url(), "public").await)
        .build()
        .expect("group");
    for (i, t) in all.iter().enumerate() {
        g.add_schema(format!("e{i}"), &t.name).await.expect("add");
    }
    let (stop, task) = start(&g);
    // The scan, and the LISTEN's first connect, find nothing to do: no tenant pool connects.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(tenant_connections(&all[0], &names).await, 0);
    seed(&all[4].db, "e4", 0, 3).await;
    wait_until("e4's events", Duration::from_secs(5), async || {
        rec.delivered("e4") == 3
    })
    .await;
    assert!(tenant_connections(&all[0], &names).await <= 2);
    stop.cancel();
    task.await.expect("group");
    for t in all {
        t.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_whose_tables_are_locked_slow_no_one_on_mariadb_and_sqlite() {
    use sea_orm::ConnectionTrait;
    // Locked: a MariaDB tenant under `LOCK TABLES … WRITE` from another session, a SQLite
    // tenant whose file another writer holds. They come first in turn, and there are two
    // workers: without freeing stalled workers nothing else would run.
    let locked = [
        ("a-maria", TestDb::new(Backend::MySql).await),
        ("a-lite", TestDb::new(Backend::SqliteFile).await),
    ];
    let healthy = [
        ("maria", TestDb::new(Backend::MySql).await),
        ("lite", TestDb::new(Backend::SqliteFile).await),
    ];
    let rec = Recorder::default();
    let g = group(
        rec.clone(),
        GroupConfig::default()
            .workers(2)
            .stall_after(Duration::from_millis(300)),
    );
    for (id, t) in &locked {
        seed(&t.db, id, 0, 300).await;
        g.add_tenant(*id, t.db.clone()).await.expect("add");
    }
    for (id, t) in &healthy {
        seed(&t.db, id, 0, 2000).await;
        g.add_tenant(*id, t.db.clone()).await.expect("add");
    }
    let maria_lock = locked[0].1.connect_again().await;
    let maria_txn = maria_lock.begin().await.expect("begin");
    maria_txn
        .execute_unprepared("LOCK TABLES outbox_events WRITE")
        .await
        .expect("lock");
    let lite_lock = locked[1].1.connect_again().await;
    let lite_txn = lite_lock.begin().await.expect("begin");
    lite_txn
        .execute_unprepared("UPDATE outbox_events SET attempts = attempts")
        .await
        .expect("hold the writer lock");

    let began = Instant::now();
    let (stop, task) = start(&g);
    // Locked batches would otherwise hold both workers for MariaDB's 50 s lock wait and
    // SQLite's 30 s busy timeout.
    wait_until(
        "the healthy tenants' first deliveries",
        Duration::from_secs(10),
        async || healthy.iter().any(|(id, _)| rec.delivered(id) > 0),
    )
    .await;
    wait_until(
        "the healthy tenants drain",
        Duration::from_secs(60),
        async || healthy.iter().all(|(id, _)| rec.delivered(id) == 2000),
    )
    .await;
    let took = began.elapsed();
    println!("MariaDB and SQLite tenants drained 4,000 events beside two locked ones in {took:?}");
    assert_eq!(rec.delivered("a-maria") + rec.delivered("a-lite"), 0);

    maria_txn
        .execute_unprepared("UNLOCK TABLES")
        .await
        .expect("unlock");
    maria_txn.commit().await.expect("commit");
    lite_txn.rollback().await.expect("rollback");
    wait_until(
        "the locked tenants drain once free",
        Duration::from_secs(90),
        async || locked.iter().all(|(id, _)| rec.delivered(id) == 300),
    )
    .await;
    stop.cancel();
    task.await.expect("group");
    rec.check();
    for (id, t) in locked.iter().chain(&healthy) {
        assert_eq!(count(t, "pending").await, 0, "{id}");
        assert_eq!(count(t, "failed").await, 0, "{id}");
    }
    for (_, t) in locked.into_iter().chain(healthy) {
        t.cleanup().await;
    }
}
