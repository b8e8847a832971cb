//! Fault injection against real databases: the connection cut between publish and write-back,
//! the database server restarted under four relay processes, relay processes SIGKILLed in a
//! loop while a writer process keeps adding events, and a relay paused (SIGSTOP) past its
//! partition lease. Each test prints its figures.

mod common;
mod support;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::TestDb;
use common::pg_server::PgServer;
use common::proxy::Proxy;
use sea_orm::{DatabaseConnection, TransactionTrait};
use seaorm_outbox::publisher::{BoxError, InMemoryPublisher};
use seaorm_outbox::relay::{Relay, RelayConfig};
use seaorm_outbox::{NewEvent, Outbox, OutboxEvent, OutboxRepository, PublishOutcome, Publisher};
use support::{
    all_rows, assert_crash_bounds, fast, locked_rows, order_violations, read_log, read_receipts,
    scattered_events, seed, wait_until,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

on_backends!(
    [postgres: Postgres, mysql: MySql] =>
    connection_lost_between_publish_and_write_back,
);

on_backends!(
    [postgres: Postgres] =>
    relay_processes_sigkilled_in_a_loop_lose_nothing,
    a_relay_paused_past_its_lease_loses_nothing_and_keeps_order,
);

/// The batch size of every relay here; duplicates are bounded by batches in flight.
const BATCH: u32 = support::CHILD_BATCH;

/// Pending events, or `None` while the database cannot answer.
async fn pending_now(db: &DatabaseConnection) -> Option<u64> {
    Outbox::new(db).count_unpublished().await.ok()
}

/// Records every call, and holds call number `at` (1-based) until released.
#[derive(Clone)]
struct HoldOnce {
    sink: InMemoryPublisher,
    calls: Arc<AtomicUsize>,
    at: usize,
    entered: Arc<Notify>,
    release: Arc<Notify>,
}

#[async_trait]
impl Publisher for HoldOnce {
    async fn publish(&self, events: &[OutboxEvent]) -> Result<Vec<PublishOutcome>, BoxError> {
        let out = self.sink.publish(events).await?;
        if self.calls.fetch_add(1, AtomicOrdering::SeqCst) + 1 == self.at {
            self.entered.notify_one();
            self.release.notified().await;
        }
        Ok(out)
    }
}

/// The relay's database connection is cut through a proxy while a batch is published but not
/// yet written back, for longer than the lease. The relay keeps running, loses nothing, sends
/// again at most what was in flight, and leaves nothing leased.
async fn connection_lost_between_publish_and_write_back(t: &TestDb) {
    let ids = seed(&t.db, scattered_events(1_000, 100)).await;
    let proxy = Proxy::start(&t.server_addr()).await;
    let publisher = HoldOnce {
        sink: InMemoryPublisher::new(),
        calls: Arc::default(),
        at: 3,
        entered: Arc::default(),
        release: Arc::default(),
    };
    let relay = Relay::builder(t.connect_via(proxy.addr).await, publisher.clone())
        .config(fast(
            RelayConfig::default()
                .batch_size(BATCH)
                .lease_duration(Duration::from_secs(3))
                .partition_lease(Duration::from_secs(3))
                .publish_timeout(Duration::from_secs(2)),
        ))
        .build()
        .expect("relay");
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });
    tokio::time::timeout(Duration::from_secs(60), publisher.entered.notified())
        .await
        .expect("the relay reached its third publish");
    proxy.cut();
    publisher.release.notify_one();
    // Longer than the lease: the write-back gives up, and the batch goes out again.
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.restore();
    wait_until(Duration::from_secs(60), "the drain to finish", || async {
        pending_now(&t.db).await == Some(0)
    })
    .await;
    wait_until(Duration::from_secs(20), "no lease left", || async {
        locked_rows(&t.db).await == 0
    })
    .await;
    assert!(!task.is_finished(), "the relay kept running");
    stop.cancel();
    let stats = task.await.expect("relay");
    let delivered: Vec<_> = publisher.sink.deliveries().iter().map(|e| e.id).collect();
    // The held batch, and the one before it if its pipelined write-back was still under way.
    let bound = 2 * BATCH as usize;
    let dups = assert_crash_bounds(&delivered, &ids, bound);
    assert!(
        dups > 0,
        "the cut outlasted the lease, so the held batch went out again"
    );
    let stored = all_rows(&t.db).await;
    assert_eq!(order_violations(&delivered, &stored), 0);
    eprintln!(
        "fault figures (connection cut, {:?}): {} events, {} delivered, {dups} duplicates \
         (bound {bound}), lost 0, leased afterwards 0, lost leases {}",
        t.backend,
        ids.len(),
        delivered.len(),
        stats.lost_leases
    );
}

/// Not a test on its own: the relay process the fault tests spawn, restart and SIGKILL. It
/// appends every delivery to `OUTBOX_CHILD_LOG` before acking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of the fault tests"]
async fn fault_relay_child() {
    support::run_child_relay().await;
}

/// Not a test on its own: the writer process of the SIGKILL loop. For `OUTBOX_WRITER_SECS` it
/// commits one transaction at a time, each with three consecutive events of one of 200
/// aggregates, about 300 events a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of the fault tests"]
async fn fault_writer_child() {
    let Some(db) = TestDb::from_child_env().await else {
        return;
    };
    let secs: u64 = std::env::var("OUTBOX_WRITER_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let until = Instant::now() + Duration::from_secs(secs);
    let mut n: u64 = 0;
    while Instant::now() < until {
        let agg = (n * 7919) % 200;
        let txn = db.begin().await.expect("begin");
        let events = (0..3)
            .map(|_| NewEvent::new("test.written", "agg", agg.to_string()))
            .collect();
        Outbox::new(&txn).add_events(events).await.expect("add");
        txn.commit().await.expect("commit");
        n += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Spawns one child of this test binary: `test` with `env`.
fn child(test: &str, env: &[(&'static str, String)]) -> Child {
    Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", test, "--ignored", "--nocapture"])
        .envs(env.iter().cloned())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child")
}

fn relay_children(t: &TestDb, log: &std::path::Path, n: usize) -> Vec<Child> {
    let mut env = t.child_env();
    env.push(("OUTBOX_CHILD_LOG", log.display().to_string()));
    (0..n).map(|_| child("fault_relay_child", &env)).collect()
}

/// Sends `signal` (`STOP`, `CONT`) to `child` with `kill(1)`: the workspace forbids `unsafe`.
fn signal(child: &Child, signal: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill(1)")
        .success();
    assert!(ok, "kill -{signal}");
}

/// How many partitions each relay owns, by owner token.
async fn owners(db: &DatabaseConnection) -> Vec<(String, i64)> {
    use sea_orm::ConnectionTrait;
    db.query_all_raw(sea_orm::Statement::from_string(
        db.get_database_backend(),
        "SELECT owner, COUNT(*) AS n FROM outbox_partitions WHERE owner IS NOT NULL \
         GROUP BY owner ORDER BY owner",
    ))
    .await
    .map(|rows| {
        rows.iter()
            .filter_map(|r| Some((r.try_get("", "owner").ok()?, r.try_get("", "n").ok()?)))
            .collect()
    })
    .unwrap_or_default()
}

/// Each partition's owner as the table says now.
async fn partition_owners(db: &DatabaseConnection) -> HashMap<i64, Option<String>> {
    use sea_orm::ConnectionTrait;
    db.query_all_raw(sea_orm::Statement::from_string(
        db.get_database_backend(),
        "SELECT partition_no, owner FROM outbox_partitions",
    ))
    .await
    .map(|rows| {
        rows.iter()
            .filter_map(|r| {
                let p: i16 = r.try_get("", "partition_no").ok()?;
                Some((i64::from(p), r.try_get("", "owner").ok()?))
            })
            .collect()
    })
    .unwrap_or_default()
}

/// Counts, per partition, the owner changes it sees by reading `outbox_partitions` every
/// 20 ms until `stop`. Ownership leases last seconds, so no change goes unseen.
fn watch_owner_changes(
    db: DatabaseConnection,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<HashMap<i64, usize>> {
    tokio::spawn(async move {
        let mut last = partition_owners(&db).await;
        let mut changes: HashMap<i64, usize> = HashMap::new();
        while !stop.is_cancelled() {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = partition_owners(&db).await;
            for (p, owner) in &now {
                if last.get(p).is_some_and(|o| o != owner) {
                    *changes.entry(*p).or_default() += 1;
                }
            }
            if !now.is_empty() {
                last = now;
            }
        }
        changes
    })
}

/// From the broker's side: per partition, how often the publishing process changed in the
/// order the broker received its events. Two relays publishing one partition at once would
/// interleave and change more often than its owner did.
async fn publisher_switches(db: &DatabaseConnection, log: &std::path::Path) -> HashMap<i64, usize> {
    use sea_orm::ConnectionTrait;
    let partition: HashMap<uuid::Uuid, i64> = db
        .query_all_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT id, partition_no FROM outbox_events",
        ))
        .await
        .expect("partitions")
        .iter()
        .map(|r| {
            let id: uuid::Uuid = r.try_get("", "id").expect("id");
            let p: i16 = r.try_get("", "partition_no").expect("partition");
            (id, i64::from(p))
        })
        .collect();
    let mut last: HashMap<i64, u32> = HashMap::new();
    let mut switches: HashMap<i64, usize> = HashMap::new();
    for (id, pid) in read_receipts(log) {
        let p = partition[&id];
        if last.insert(p, pid).is_some_and(|before| before != pid) {
            *switches.entry(p).or_default() += 1;
        }
    }
    switches
}

/// No partition published by two relays at once: from the broker's side, each partition's
/// publishing process changed no more often than its owner did. Returns the changes.
async fn assert_one_publisher_at_a_time(
    db: &DatabaseConnection,
    log: &std::path::Path,
    owner_changes: &HashMap<i64, usize>,
) -> usize {
    let switches = publisher_switches(db, log).await;
    for (p, n) in &switches {
        let owned = owner_changes.get(p).copied().unwrap_or(0);
        assert!(
            *n <= owned,
            "partition {p}: the publishing relay changed {n} times, its owner {owned} times"
        );
    }
    switches.values().sum()
}

fn kill(c: &mut Child) {
    c.kill().expect("SIGKILL"); // Child::kill sends SIGKILL on Unix.
    c.wait().expect("reap");
}

/// A PostgreSQL the test owns is stopped (immediately, like a crash) and started again while
/// four relay processes drain it. Every relay rides it out; nothing is lost; duplicates stay
/// within the batches in flight; nothing is left leased.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_restarted_under_four_relay_processes() {
    let server = PgServer::start();
    let t = TestDb::new_postgres_at(&server.url()).await;
    let ids = seed(&t.db, scattered_events(6_000, 200)).await;
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("deliveries.log");
    let mut relays = relay_children(&t, &log, 4);
    wait_until(
        Duration::from_secs(60),
        "the relays to be mid-drain",
        || async { read_log(&log).len() >= 1_000 },
    )
    .await;
    let before = read_log(&log).len();
    let server = tokio::task::spawn_blocking(move || {
        server.restart(Duration::from_secs(2));
        server
    })
    .await
    .expect("restart");
    wait_until(Duration::from_secs(120), "the drain to finish", || async {
        pending_now(&t.db).await == Some(0)
    })
    .await;
    wait_until(Duration::from_secs(20), "no lease left", || async {
        locked_rows(&t.db).await == 0
    })
    .await;
    for r in &mut relays {
        assert!(
            r.try_wait().expect("status").is_none(),
            "every relay kept running"
        );
        kill(r);
    }
    let delivered = read_log(&log);
    // Each relay may have two batches delivered but not written back: one being written back
    // while the next is published.
    let bound = 4 * 2 * BATCH as usize;
    let dups = assert_crash_bounds(&delivered, &ids, bound);
    let stored = all_rows(&t.db).await;
    assert_eq!(order_violations(&delivered, &stored), 0);
    eprintln!(
        "fault figures (database restart): {} events, restart after {before} deliveries, \
         {} delivered, {dups} duplicates (bound {bound}), lost 0, leased afterwards 0, order \
         violations 0",
        ids.len(),
        delivered.len()
    );
    drop(server);
}

/// Four relay processes and a writer process on PostgreSQL for about a minute, one relay
/// SIGKILLed and restarted every few seconds. Nothing is lost, duplicates stay within what the
/// killed relays had in flight, first deliveries keep per-aggregate order, and no partition is
/// published by two relays at once (checked from the broker's side).
async fn relay_processes_sigkilled_in_a_loop_lose_nothing(t: &TestDb) {
    const WRITE_SECS: u64 = 40;
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("deliveries.log");
    let mut writer_env = t.child_env();
    writer_env.push(("OUTBOX_WRITER_SECS", WRITE_SECS.to_string()));
    let watching = CancellationToken::new();
    let watcher = watch_owner_changes(t.db.clone(), watching.clone());
    let mut writer = child("fault_writer_child", &writer_env);
    let mut relays = relay_children(t, &log, 4);
    let started = Instant::now();
    let mut kills = 0usize;
    while writer.try_wait().expect("writer status").is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(WRITE_SECS + 60),
            "the writer did not finish"
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        let victim = kills % relays.len();
        kill(&mut relays[victim]);
        relays[victim] = relay_children(t, &log, 1).remove(0);
        kills += 1;
    }
    assert!(
        writer.wait().expect("writer").success(),
        "the writer failed"
    );
    wait_until(Duration::from_secs(120), "the drain to finish", || async {
        pending_now(&t.db).await == Some(0)
    })
    .await;
    for r in &mut relays {
        kill(r);
    }
    watching.cancel();
    let changes = watcher.await.expect("watcher");
    assert_one_publisher_at_a_time(&t.db, &log, &changes).await;
    let stored = all_rows(&t.db).await;
    let ids: Vec<_> = stored.iter().map(|e| e.id).collect();
    assert!(ids.len() > 3_000, "the writer wrote {} events", ids.len());
    let delivered = read_log(&log);
    // A killed relay may have two batches delivered but not written back (one being written
    // back while the next is published).
    let bound = kills * 2 * BATCH as usize;
    let dups = assert_crash_bounds(&delivered, &ids, bound);
    let violations = order_violations(&delivered, &stored);
    eprintln!(
        "fault figures (SIGKILL loop): {} events written, {kills} kills, {} delivered, {dups} \
         duplicates (bound {bound}; {} per kill), lost 0, order violations {violations}, {:.0}s",
        ids.len(),
        delivered.len(),
        dups / kills.max(1),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(violations, 0, "per-aggregate order on first deliveries");
}

/// Two relay processes drain 30,000 events; one is paused with SIGSTOP past its partition
/// lease (as a stop-the-world pause or a frozen VM would pause it, possibly mid-publish), so
/// the other takes its partitions over and keeps delivering; then it is resumed. Nothing is
/// lost, duplicates stay within what the paused relay had in flight (its write-back is
/// refused once its partitions moved), first deliveries keep per-aggregate order, no partition
/// is published by two relays at once (checked from the broker's side), and the resumed relay
/// takes a share again.
async fn a_relay_paused_past_its_lease_loses_nothing_and_keeps_order(t: &TestDb) {
    let ids = seed(&t.db, scattered_events(30_000, 200)).await;
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("deliveries.log");
    let watching = CancellationToken::new();
    let watcher = watch_owner_changes(t.db.clone(), watching.clone());
    let mut relays = relay_children(t, &log, 2);
    wait_until(
        Duration::from_secs(60),
        "both relays to own a share",
        || async { owners(&t.db).await.len() == 2 },
    )
    .await;
    wait_until(Duration::from_secs(60), "the drain under way", || async {
        read_log(&log).len() >= 1_000
    })
    .await;
    signal(&relays[0], "STOP");
    let at_pause = read_log(&log).len();
    // The partition lease is 2 s: the running relay takes all 256 over.
    wait_until(Duration::from_secs(30), "the take-over", || async {
        let o = owners(&t.db).await;
        o.len() == 1 && o[0].1 == 256
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before_resume = read_log(&log).len();
    assert!(
        before_resume > at_pause,
        "the other relay delivered while one was paused ({at_pause} then {before_resume})"
    );
    signal(&relays[0], "CONT");
    wait_until(
        Duration::from_secs(30),
        "the resumed relay to take a share",
        || async { owners(&t.db).await.len() == 2 },
    )
    .await;
    wait_until(Duration::from_secs(120), "the drain to finish", || async {
        pending_now(&t.db).await == Some(0)
    })
    .await;
    wait_until(Duration::from_secs(20), "no lease left", || async {
        locked_rows(&t.db).await == 0
    })
    .await;
    for r in &mut relays {
        assert!(
            r.try_wait().expect("status").is_none(),
            "both relays kept running"
        );
        kill(r);
    }
    watching.cancel();
    let changes = watcher.await.expect("watcher");
    let moved = assert_one_publisher_at_a_time(&t.db, &log, &changes).await;
    let delivered = read_log(&log);
    // The paused relay's batch being published and the one being written back.
    let bound = 2 * BATCH as usize;
    let dups = assert_crash_bounds(&delivered, &ids, bound);
    let stored = all_rows(&t.db).await;
    let violations = order_violations(&delivered, &stored);
    eprintln!(
        "fault figures (SIGSTOP past the lease): {} events, paused after {at_pause} deliveries, \
         {} more while paused, {} delivered, {dups} duplicates (bound {bound}), lost 0, order \
         violations {violations}, publisher changes {moved} (owner changes {})",
        ids.len(),
        before_resume - at_pause,
        delivered.len(),
        changes.values().sum::<usize>()
    );
    assert_eq!(violations, 0, "per-aggregate order on first deliveries");
}
