//! The relay against real databases: many relays, crashes, retries, poison events, ordering,
//! push wake-up, shutdown and retention.

mod common;
mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use common::TestDb;
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement, TransactionTrait};
use seaorm_outbox::publisher::{BoxError, InMemoryPublisher, StdoutPublisher};
use seaorm_outbox::relay::{
    Backoff, Claiming, DeadLetterPolicy, Jitter, OnPublish, Ordering, Relay, RelayConfig,
};
use seaorm_outbox::{
    Error, NewEvent, Outbox, OutboxEvent, OutboxRepository, OutboxStatus, PublishOutcome, Publisher,
};
use support::{
    all_rows, assert_aggregate_order, assert_crash_bounds, base, fast, locked_rows, pending,
    run_relays_until_empty, scattered_events, seed, wait_until,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

on_backends!(
    [postgres: Postgres, mysql: MySql, sqlite_file: SqliteFile] =>
    four_relays_deliver_20k_events_once_in_aggregate_order,
    four_unordered_relays_deliver_each_event_once,
    aborted_relay_task_loses_nothing,
    killed_relay_process_loses_nothing,
    stale_relay_cannot_overwrite_the_new_lease_owner,
    stale_relay_deleting_on_publish_cannot_delete_the_new_owners_dead_letters,
    stale_partition_owner_cannot_overwrite_the_new_owner,
    stale_partition_owner_deleting_cannot_delete_the_new_owners_dead_letters,
    four_relays_deleting_on_publish_deliver_each_event_once_in_order,
    a_waker_wakes_every_relay_of_the_process_right_after_the_commit,
    a_scheduled_event_goes_out_at_its_time_ordered_by_it_across_a_take_over,
    a_scheduled_event_between_two_events_holds_neither,
    a_scheduled_event_that_holds_later_events_goes_first_across_a_restart,
);

on_all_backends!(
    flaky_publisher_delivers_everything_with_recorded_attempts,
    retries_honour_next_attempt_at,
    poison_event_is_dead_lettered_without_blocking_others,
    hold_policy_waits_for_replay,
    rejected_event_is_dead_lettered_at_once,
    cancel_mid_publish_releases_the_batch,
    cancel_mid_publish_releases_the_leased_batch,
    cancel_with_grace_finishes_the_batch,
    retention_purges_only_old_published_events,
    invalid_relay_config_is_rejected,
    a_free_aggregate_behind_a_long_blocked_backlog_is_found,
    unreadable_row_is_dead_lettered_and_the_rest_delivered,
    an_event_committed_behind_the_claim_cursor_is_delivered,
    a_running_relay_keeps_a_heartbeat_row_and_removes_it_on_stop,
    delete_on_publish_keeps_dead_letters_retries_and_the_hours_count,
    an_expired_event_is_dead_lettered_unsent_and_counted,
);

on_backends!(
    [postgres: Postgres] =>
    ordered_relays_take_runs_and_leave_other_aggregates_to_each_other,
    notify_wakes_an_idle_relay_on_commit_only,
    a_batch_sends_one_notify_and_a_rollback_none,
    without_listen_an_idle_relay_waits_for_its_poll,
    claims_in_one_schema_never_wait_for_another_schemas,
);

/// Asserts every id was delivered exactly once.
fn assert_exactly_once(delivered: &[OutboxEvent], ids: &[Uuid]) {
    let mut seen = HashSet::new();
    for e in delivered {
        assert!(seen.insert(e.id), "event {} delivered twice", e.id);
    }
    assert_eq!(seen.len(), ids.len(), "every event delivered");
    assert!(ids.iter().all(|id| seen.contains(id)));
}

async fn four_relays_deliver_20k_events_once_in_aggregate_order(t: &TestDb) {
    let ids = seed(&t.db, scattered_events(20_000, 200)).await;
    let sink = InMemoryPublisher::new();
    let stats = run_relays_until_empty(
        t,
        4,
        sink.clone(),
        // The first relay up takes every partition and gives the others theirs at its next
        // round, a tenth of the partition lease later: short enough for a drain of seconds.
        fast(
            RelayConfig::default()
                .batch_size(200)
                .partition_lease(Duration::from_secs(2))
                .publish_timeout(Duration::from_secs(1)),
        ),
        Duration::from_secs(240),
    )
    .await;
    let delivered = sink.deliveries();
    assert_exactly_once(&delivered, &ids);
    assert_aggregate_order(&delivered);
    assert_eq!(stats.iter().map(|s| s.published).sum::<u64>(), 20_000);
    assert!(
        stats.iter().filter(|s| s.published > 0).count() >= 2,
        "the work was shared: {stats:?}"
    );
}

async fn four_unordered_relays_deliver_each_event_once(t: &TestDb) {
    let ids = seed(&t.db, scattered_events(5_000, 50)).await;
    let sink = InMemoryPublisher::new();
    run_relays_until_empty(
        t,
        4,
        sink.clone(),
        fast(
            RelayConfig::default()
                .batch_size(100)
                .ordering(Ordering::Unordered),
        ),
        Duration::from_secs(120),
    )
    .await;
    assert_exactly_once(&sink.deliveries(), &ids);
}

/// Records deliveries to a shared log, then pauses, so a relay can be stopped mid-batch
/// between the broker's ack and the write-back.
#[derive(Clone)]
struct SlowRecorder {
    log: Arc<Mutex<Vec<Uuid>>>,
    pause: Duration,
}

#[async_trait]
impl Publisher for SlowRecorder {
    async fn publish(&self, events: &[OutboxEvent]) -> Result<Vec<PublishOutcome>, BoxError> {
        self.log
            .lock()
            .expect("log")
            .extend(events.iter().map(|e| e.id));
        tokio::time::sleep(self.pause).await;
        Ok(vec![PublishOutcome::Delivered; events.len()])
    }
}

async fn aborted_relay_task_loses_nothing(t: &TestDb) {
    const BATCH: u32 = 50;
    let ids = seed(&t.db, scattered_events(1_000, 20)).await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let config = fast(
        RelayConfig::default()
            .batch_size(BATCH)
            .lease_duration(Duration::from_secs(2))
            .partition_lease(Duration::from_secs(2))
            .publish_timeout(Duration::from_secs(1)),
    );
    let first = Relay::builder(
        t.connect_again().await,
        SlowRecorder {
            log: log.clone(),
            pause: Duration::from_millis(30),
        },
    )
    .config(config.clone())
    .build()
    .expect("relay");
    let task = tokio::spawn(async move { first.run(CancellationToken::new()).await });
    wait_until(
        Duration::from_secs(60),
        "the first relay to be mid-drain",
        || async { log.lock().expect("log").len() >= 200 },
    )
    .await;
    task.abort();
    let _ = task.await;
    assert!(
        pending(&t.db).await > 0,
        "the first relay was stopped mid-drain"
    );

    run_relays_until_empty(
        t,
        1,
        SlowRecorder {
            log: log.clone(),
            pause: Duration::ZERO,
        },
        config,
        Duration::from_secs(60),
    )
    .await;
    assert_crash_bounds(&log.lock().expect("log"), &ids, BATCH as usize);
}

/// Not a test on its own: the relay process that `killed_relay_process_loses_nothing` spawns
/// and SIGKILLs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of killed_relay_process_loses_nothing"]
async fn relay_child_process() {
    support::run_child_relay().await;
}

async fn killed_relay_process_loses_nothing(t: &TestDb) {
    let ids = seed(&t.db, scattered_events(2_000, 20)).await;
    let dir = tempfile::tempdir().expect("dir");
    let log_path = dir.path().join("deliveries.log");
    let read_log = || support::read_log(&log_path);
    let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "relay_child_process", "--ignored", "--nocapture"])
        .envs(t.child_env())
        .env("OUTBOX_CHILD_LOG", &log_path)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn relay process");
    wait_until(
        Duration::from_secs(60),
        "the child relay to be mid-drain",
        || async { read_log().len() >= 300 },
    )
    .await;
    child.kill().expect("SIGKILL"); // Child::kill sends SIGKILL on Unix.
    child.wait().expect("reap");
    let remaining = pending(&t.db).await;
    assert!(remaining > 0, "the child was killed mid-drain");

    let sink = InMemoryPublisher::new();
    run_relays_until_empty(
        t,
        1,
        sink.clone(),
        fast(RelayConfig::default().batch_size(50)),
        Duration::from_secs(60),
    )
    .await;
    let mut all = read_log();
    all.extend(sink.deliveries().iter().map(|e| e.id));
    assert_crash_bounds(&all, &ids, 50);
}

/// Blocks every publish until released, then reports delivered.
#[derive(Clone)]
struct Gate {
    entered: Arc<tokio::sync::Notify>,
    open: Arc<tokio::sync::Semaphore>,
}

impl Gate {
    /// A gate that lets nothing through until permits are added.
    fn closed() -> Self {
        Self {
            entered: Arc::default(),
            open: Arc::new(tokio::sync::Semaphore::new(0)),
        }
    }
}

#[async_trait]
impl Publisher for Gate {
    async fn publish(&self, events: &[OutboxEvent]) -> Result<Vec<PublishOutcome>, BoxError> {
        self.entered.notify_one();
        // Each permit lets exactly one call through.
        self.open.acquire().await?.forget();
        Ok(vec![PublishOutcome::Delivered; events.len()])
    }
}

/// A publisher that rejects everything, so its outcome is visible in the table.
#[derive(Clone)]
struct RejectAll;

#[async_trait]
impl Publisher for RejectAll {
    async fn publish(&self, events: &[OutboxEvent]) -> Result<Vec<PublishOutcome>, BoxError> {
        Ok(vec![
            PublishOutcome::Reject(
                "rejected by the new owner".into()
            );
            events.len()
        ])
    }
}

async fn stale_relay_cannot_overwrite_the_new_lease_owner(t: &TestDb) {
    stale_write_back_changes_nothing(t, OnPublish::Retain, Claiming::Leases).await;
}

/// A stale relay's delete is as conditional on its lease as its update: the rows the new
/// owner dead-lettered stay.
async fn stale_relay_deleting_on_publish_cannot_delete_the_new_owners_dead_letters(t: &TestDb) {
    stale_write_back_changes_nothing(t, OnPublish::Delete, Claiming::Leases).await;
    let stats = Outbox::new(&t.db).stats().await.expect("stats");
    assert_eq!(
        stats.published_last_hour, 0,
        "nothing was tallied: {stats:?}"
    );
}

/// Owned partitions: a write-back after the partition changed hands is refused by the epoch
/// fence, whether it updates or deletes.
async fn stale_partition_owner_cannot_overwrite_the_new_owner(t: &TestDb) {
    stale_write_back_changes_nothing(t, OnPublish::Retain, Claiming::OwnedPartitions).await;
}

async fn stale_partition_owner_deleting_cannot_delete_the_new_owners_dead_letters(t: &TestDb) {
    stale_write_back_changes_nothing(t, OnPublish::Delete, Claiming::OwnedPartitions).await;
    let stats = Outbox::new(&t.db).stats().await.expect("stats");
    assert_eq!(
        stats.published_last_hour, 0,
        "nothing was tallied: {stats:?}"
    );
}

async fn stale_write_back_changes_nothing(t: &TestDb, on_publish: OnPublish, claiming: Claiming) {
    // Ten aggregates, one event each: the stale relay claims them all in one batch.
    let ids = seed(
        &t.db,
        (0..10)
            .map(|i| NewEvent::new("t", "agg", i.to_string()))
            .collect(),
    )
    .await;
    let gate = Gate::closed();
    let config = RelayConfig::default().batch_size(10).claiming(claiming);
    let stale = Relay::builder(t.connect_again().await, gate.clone())
        .config(config.clone().on_publish(on_publish))
        .build()
        .expect("relay");
    let (stop, task) = support::spawn(stale);
    gate.entered.notified().await;

    // Time passes: the stale relay's lease runs out while it is still publishing.
    let past = Utc::now() - chrono::Duration::seconds(5);
    let (sql, values) = if claiming == Claiming::OwnedPartitions {
        // Its partitions lapse and are no longer its own (as if it missed its renewals and
        // another relay came and went): its renewals find nothing to renew.
        (
            "UPDATE outbox_partitions SET owner = 'gone' WHERE partition_no >= ?",
            vec![0i32.into()],
        )
    } else if t.db_backend() == sea_orm::DbBackend::Postgres {
        // PostgreSQL leases a batch with one `outbox_leases` row, not per row.
        (
            "UPDATE outbox_leases SET locked_until = ?",
            vec![past.into()],
        )
    } else {
        (
            "UPDATE outbox_events SET next_attempt_at = ?, locked_until = ?",
            vec![past.into(), past.into()],
        )
    };
    t.exec("expire lease", sql, values).await;

    // A second relay takes the events over and dead-letters them.
    let owner = Relay::builder(t.connect_again().await, RejectAll)
        .config(config)
        .build()
        .expect("relay");
    let taken = owner.drain().await.expect("drain");
    assert_eq!(taken.dead_lettered, 10);

    // The stale relay finishes and reports delivered: it must not overwrite the new outcome.
    gate.open.add_permits(100);
    wait_until(Duration::from_secs(10), "the stale write-back", || async {
        gate.open.available_permits() < 100
    })
    .await;
    stop.cancel();
    let stats = task.await.expect("stale relay");
    assert_eq!(stats.published, 0, "{stats:?}");
    assert_eq!(stats.lost_leases, 10, "{stats:?}");
    let outbox = Outbox::new(&t.db);
    for id in ids {
        let e = outbox.get(id).await.expect("get");
        assert_eq!(e.status, OutboxStatus::Failed);
        assert_eq!(e.last_error.as_deref(), Some("rejected by the new owner"));
    }
}

/// Fails each attempt with probability `p` (retryable), and records every attempt's time.
#[derive(Clone)]
struct Flaky {
    p: f64,
    sink: InMemoryPublisher,
    attempts: Arc<Mutex<HashMap<Uuid, Vec<DateTime<Utc>>>>>,
    failures: Arc<AtomicU64>,
}

impl Flaky {
    fn new(p: f64) -> Self {
        Self {
            p,
            sink: InMemoryPublisher::new(),
            attempts: Arc::default(),
            failures: Arc::default(),
        }
    }
}

#[async_trait]
impl Publisher for Flaky {
    async fn publish(&self, events: &[OutboxEvent]) -> Result<Vec<PublishOutcome>, BoxError> {
        let now = Utc::now();
        let mut out = Vec::with_capacity(events.len());
        for e in events {
            self.attempts
                .lock()
                .expect("attempts")
                .entry(e.id)
                .or_default()
                .push(now);
            if rand_unit() < self.p {
                self.failures.fetch_add(1, AtomicOrdering::Relaxed);
                out.push(PublishOutcome::Retry("broker timeout".into()));
            } else {
                self.sink.publish(std::slice::from_ref(e)).await?;
                out.push(PublishOutcome::Delivered);
            }
        }
        Ok(out)
    }
}

fn rand_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Uuid::now_v7().as_u128());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

async fn flaky_publisher_delivers_everything_with_recorded_attempts(t: &TestDb) {
    let ids = seed(&t.db, scattered_events(500, 25)).await;
    let flaky = Flaky::new(0.3);
    run_relays_until_empty(
        t,
        2,
        flaky.clone(),
        fast(RelayConfig::default().batch_size(50).max_attempts(60)),
        Duration::from_secs(120),
    )
    .await;
    let delivered = flaky.sink.deliveries();
    assert_exactly_once(&delivered, &ids);
    assert_aggregate_order(&delivered);
    let rows = all_rows(&t.db).await;
    assert!(rows.iter().all(|e| e.status == OutboxStatus::Published));
    let recorded: u64 = rows.iter().map(|e| u64::from(e.attempts)).sum();
    assert_eq!(
        recorded,
        flaky.failures.load(AtomicOrdering::Relaxed),
        "each failure counted once"
    );
    assert!(recorded > 50, "about 30% of attempts failed: {recorded}");
    assert!(
        rows.iter()
            .any(|e| e.attempts > 0 && e.last_error.as_deref() == Some("broker timeout"))
    );
}

async fn retries_honour_next_attempt_at(t: &TestDb) {
    seed(&t.db, scattered_events(40, 40)).await;
    let flaky = Flaky::new(0.5);
    let backoff =
        Backoff::new(Duration::from_millis(40), Duration::from_millis(160)).jitter(Jitter::None);
    run_relays_until_empty(
        t,
        2,
        flaky.clone(),
        fast(RelayConfig::default().max_attempts(60)).backoff(backoff),
        Duration::from_secs(60),
    )
    .await;
    let attempts = flaky.attempts.lock().expect("attempts");
    let mut retried = 0;
    for times in attempts.values() {
        for (k, pair) in times.windows(2).enumerate() {
            retried += 1;
            let gap = (pair[1] - pair[0]).to_std().expect("ordered");
            let min = backoff.delay(k as u32 + 1);
            assert!(
                gap + Duration::from_millis(1) >= min,
                "{times:?} attempt {} came {gap:?} after the last, before its {min:?} backoff",
                k + 2
            );
        }
    }
    assert!(retried > 5, "some events were retried: {retried}");
}

/// Always fails the events in `ids` (while `on`), delivers the rest.
#[derive(Clone)]
struct Poison {
    ids: Arc<Mutex<HashSet<Uuid>>>,
    on: Arc<AtomicBool>,
    reject: bool,
    sink: InMemoryPublisher,
}

#[async_trait]
impl Publisher for Poison {
    async fn publish(&self, events: &[OutboxEvent]) -> Result<Vec<PublishOutcome>, BoxError> {
        let mut out = Vec::new();
        for e in events {
            let poisoned = self.ids.lock().expect("ids").contains(&e.id);
            if poisoned && self.on.load(AtomicOrdering::SeqCst) {
                out.push(if self.reject {
                    PublishOutcome::Reject("schema violation".into())
                } else {
                    PublishOutcome::Retry("poison".into())
                });
            } else {
                self.sink.publish(std::slice::from_ref(e)).await?;
                out.push(PublishOutcome::Delivered);
            }
        }
        Ok(out)
    }
}

/// Events `a-1, a-2` of aggregate `a` and `b-1..b-3` of `b`, in time order; `a-1` is the poison.
async fn seed_poison(db: &DatabaseConnection, p: &Poison) -> (Vec<Uuid>, Vec<Uuid>) {
    let mk = |agg: &str, seq: u64, i: i64| {
        NewEvent::new("t", "agg", agg)
            .occurred_at(base() + chrono::Duration::seconds(i))
            .payload(&serde_json::json!({ "seq": seq }))
    };
    let a = seed(db, vec![mk("a", 1, 0), mk("a", 2, 2)]).await;
    let b = seed(db, vec![mk("b", 1, 1), mk("b", 2, 3), mk("b", 3, 4)]).await;
    p.ids.lock().expect("ids").insert(a[0]);
    (a, b)
}

fn poison(reject: bool) -> Poison {
    Poison {
        ids: Arc::default(),
        on: Arc::new(AtomicBool::new(true)),
        reject,
        sink: InMemoryPublisher::new(),
    }
}

/// Drains repeatedly (events in backoff become due again) until `done` or the deadline.
async fn drain_until<P: Publisher>(relay: &Relay<P>, mut done: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    loop {
        relay.drain().await.expect("drain");
        if done().await {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "drain never settled"
        );
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
}

async fn poison_event_is_dead_lettered_without_blocking_others(t: &TestDb) {
    let p = poison(false);
    let (a, b) = seed_poison(&t.db, &p).await;
    let relay = Relay::builder(t.db.clone(), p.clone())
        .config(fast(RelayConfig::default().max_attempts(3)))
        .build()
        .expect("relay");
    let outbox = Outbox::new(&t.db);
    drain_until(&relay, async || {
        outbox.count_unpublished().await.expect("count") == 0
    })
    .await;

    let dead = outbox.get(a[0]).await.expect("get");
    assert_eq!(dead.status, OutboxStatus::Failed);
    assert_eq!(dead.attempts, 3);
    assert!(
        dead.last_error
            .as_deref()
            .is_some_and(|e| e.contains("gave up after 3 attempts"))
    );
    // b was never held up, and a-2 followed only after a-1 was dead (policy: continue).
    let delivered: Vec<Uuid> = p.sink.deliveries().iter().map(|e| e.id).collect();
    assert!(b.iter().all(|id| delivered.contains(id)));
    assert_eq!(delivered.iter().filter(|id| **id == a[1]).count(), 1);
    assert_eq!(
        outbox.get(a[1]).await.expect("get").status,
        OutboxStatus::Published
    );
    let pos = |id: Uuid| delivered.iter().position(|d| *d == id).expect("delivered");
    assert!(
        pos(b[0]) < pos(a[1]),
        "b was not blocked behind the poison aggregate"
    );
}

async fn hold_policy_waits_for_replay(t: &TestDb) {
    let p = poison(false);
    let (a, b) = seed_poison(&t.db, &p).await;
    let relay = Relay::builder(t.db.clone(), p.clone())
        .config(fast(
            RelayConfig::default()
                .max_attempts(2)
                .dead_letter_policy(DeadLetterPolicy::Hold),
        ))
        .build()
        .expect("relay");
    let outbox = Outbox::new(&t.db);
    drain_until(&relay, async || {
        outbox.count_failed().await.expect("failed") == 1
            && outbox.count_unpublished().await.expect("count") == 1
    })
    .await;
    // Settle: more drains must not release a-2 while a-1 is dead.
    for _ in 0..3 {
        relay.drain().await.expect("drain");
    }
    assert_eq!(
        outbox.get(a[0]).await.expect("get").status,
        OutboxStatus::Failed
    );
    assert_eq!(
        outbox.get(a[1]).await.expect("get").status,
        OutboxStatus::Pending,
        "held"
    );
    for id in &b {
        assert_eq!(
            outbox.get(*id).await.expect("get").status,
            OutboxStatus::Published
        );
    }

    // Fix the cause, replay the dead letter: a-1 then a-2 go out, in order.
    p.on.store(false, AtomicOrdering::SeqCst);
    outbox.replay(a[0]).await.expect("requeue");
    drain_until(&relay, async || {
        outbox.count_unpublished().await.expect("count") == 0
    })
    .await;
    let delivered: Vec<Uuid> = p.sink.deliveries().iter().map(|e| e.id).collect();
    let tail: Vec<Uuid> = delivered.iter().rev().take(2).rev().copied().collect();
    assert_eq!(tail, a);
}

async fn rejected_event_is_dead_lettered_at_once(t: &TestDb) {
    let p = poison(true);
    let (a, b) = seed_poison(&t.db, &p).await;
    let relay = Relay::builder(t.db.clone(), p.clone())
        .config(fast(RelayConfig::default()))
        .build()
        .expect("relay");
    let stats = relay.drain().await.expect("drain");
    assert_eq!(stats.dead_lettered, 1, "{stats:?}");
    assert_eq!(stats.retried, 0, "{stats:?}");
    assert_eq!(stats.published, 4, "{stats:?}");
    let outbox = Outbox::new(&t.db);
    let e = outbox.get(a[0]).await.expect("get");
    assert_eq!(e.status, OutboxStatus::Failed);
    assert_eq!(e.attempts, 1);
    assert_eq!(e.last_error.as_deref(), Some("schema violation"));
    // Under the default continue policy the aggregate's next event follows.
    assert_eq!(
        outbox.get(a[1]).await.expect("get").status,
        OutboxStatus::Published
    );
    assert_eq!(p.sink.len(), b.len() + 1);
}

async fn ordered_relays_take_runs_and_leave_other_aggregates_to_each_other(t: &TestDb) {
    // 20 aggregates × 10 events, interleaved. Batches of 40 with runs of 4: the first relay
    // takes the oldest 10 aggregates' first four events, so a second relay still finds ten
    // free aggregates. (With one event per aggregate the first batch would hold all 20, and
    // the second relay could take nothing until it was written back.)
    seed(
        &t.db,
        (0..200)
            .map(|i| {
                NewEvent::new("t", "agg", (i % 20).to_string())
                    .occurred_at(base() + chrono::Duration::microseconds(i))
            })
            .collect(),
    )
    .await;
    let config = || {
        fast(
            RelayConfig::default()
                .claiming(Claiming::Leases)
                .batch_size(40)
                .events_per_aggregate(4)
                .shutdown_grace(Duration::from_millis(100)),
        )
    };
    let mut running = Vec::new();
    for expected in [40, 80] {
        let gate = Gate::closed();
        let relay = Relay::builder(t.db.clone(), gate.clone())
            .config(config())
            .build()
            .expect("relay");
        running.push(support::spawn(relay));
        tokio::time::timeout(Duration::from_secs(10), gate.entered.notified())
            .await
            .expect("the relay claimed a batch");
        assert_eq!(locked_rows(&t.db).await, expected);
    }
    // Each lease holds a 4-event prefix of ten aggregates, and the two share none.
    let leases =
        t.db.query_all_raw(Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT e.aggregate_id, COUNT(*) AS n, COUNT(DISTINCT l.token) AS leases, \
               MAX(e.occurred_at) AS last FROM outbox_leases l \
             JOIN outbox_events e ON e.id = ANY(l.ids) GROUP BY e.aggregate_id",
        ))
        .await
        .expect("leases");
    assert_eq!(leases.len(), 20);
    for row in &leases {
        let agg: String = row.try_get("", "aggregate_id").expect("aggregate");
        let n: i64 = row.try_get("", "n").expect("n");
        let holders: i64 = row.try_get("", "leases").expect("leases");
        let last: DateTime<Utc> = row.try_get("", "last").expect("last");
        let first: i64 = agg.parse().expect("number");
        assert_eq!((n, holders), (4, 1), "aggregate {agg}");
        assert_eq!(
            last,
            base() + chrono::Duration::microseconds(first + 60),
            "a prefix"
        );
    }
    for (stop, task) in running {
        stop.cancel();
        task.await.expect("relay");
    }
    assert_eq!(locked_rows(&t.db).await, 0);
}

async fn cancel_mid_publish_releases_the_batch(t: &TestDb) {
    cancel_mid_publish(t, Claiming::OwnedPartitions).await;
}

async fn cancel_mid_publish_releases_the_leased_batch(t: &TestDb) {
    cancel_mid_publish(t, Claiming::Leases).await;
}

async fn cancel_mid_publish(t: &TestDb, claiming: Claiming) {
    seed(&t.db, scattered_events(30, 5)).await;
    let gate = Gate::closed();
    let leases = claiming == Claiming::Leases;
    // Runs long enough that one batch takes every event, however they fall per aggregate.
    let relay = Relay::builder(t.db.clone(), gate.clone())
        .config(fast(
            RelayConfig::default()
                .claiming(claiming)
                .shutdown_grace(Duration::from_millis(100))
                .events_per_aggregate(30),
        ))
        .build()
        .expect("relay");
    let (stop, task) = support::spawn(relay);
    gate.entered.notified().await;
    if leases {
        assert_eq!(locked_rows(&t.db).await, 30, "the batch is claimed");
        // Health checks see the lease, whichever way the backend records it.
        let s = Outbox::new(&t.db).stats().await.expect("stats");
        assert_eq!((s.pending_leased, s.pending_due), (30, 0), "{s:?}");
    } else {
        let owned = t
            .scalar("SELECT COUNT(*) FROM outbox_partitions WHERE owner IS NOT NULL")
            .await;
        assert_eq!(owned, 256, "the only relay owns every partition");
    }
    let cancelled = Instant::now();
    stop.cancel();
    let stats = task.await.expect("relay");
    assert!(
        cancelled.elapsed() < Duration::from_secs(2),
        "returned promptly: {:?}",
        cancelled.elapsed()
    );
    assert_eq!(stats.published, 0);
    assert_eq!(stats.released, 30, "{stats:?}");
    assert_eq!(locked_rows(&t.db).await, 0, "nothing left claimed");
    let owned = t
        .scalar("SELECT COUNT(*) FROM outbox_partitions WHERE owner IS NOT NULL")
        .await;
    assert_eq!(owned, 0, "every partition given up at the stop");
    assert_eq!(pending(&t.db).await, 30);
    let s = Outbox::new(&t.db).stats().await.expect("stats");
    assert_eq!((s.pending_leased, s.pending_due), (0, 30), "{s:?}");
    // Released events are due again at once, to a relay started right after.
    let sink = InMemoryPublisher::new();
    let again = Relay::builder(t.db.clone(), sink.clone())
        .config(RelayConfig::default().claiming(claiming))
        .build()
        .expect("relay");
    assert_eq!(again.drain().await.expect("drain").published, 30);
}

async fn cancel_with_grace_finishes_the_batch(t: &TestDb) {
    // Distinct aggregates: the batch is one publisher call.
    seed(
        &t.db,
        (0..30)
            .map(|i| NewEvent::new("t", "agg", i.to_string()))
            .collect(),
    )
    .await;
    let gate = Gate::closed();
    let relay = Relay::builder(t.db.clone(), gate.clone())
        .config(fast(
            RelayConfig::default().shutdown_grace(Duration::from_secs(10)),
        ))
        .build()
        .expect("relay");
    let (stop, task) = support::spawn(relay);
    gate.entered.notified().await;
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    gate.open.add_permits(1); // the broker acks during the grace period
    let stats = task.await.expect("relay");
    assert_eq!(stats.published, 30, "{stats:?}");
    assert_eq!(pending(&t.db).await, 0);
    assert_eq!(locked_rows(&t.db).await, 0);
}

async fn retention_purges_only_old_published_events(t: &TestDb) {
    let ids = seed(&t.db, scattered_events(20, 4)).await;
    let outbox = Outbox::new(&t.db);
    outbox.mark_failed(ids[0], "dead").await.expect("fail");
    let relay = Relay::builder(t.db.clone(), InMemoryPublisher::new())
        .config(fast(
            RelayConfig::default()
                .retention(Some(Duration::from_millis(300)))
                .purge_interval(Duration::from_millis(50))
                .purge_batch_size(3),
        ))
        .build()
        .expect("relay");
    let (stop, task) = support::spawn(relay);
    wait_until(Duration::from_secs(5), "the drain", || async {
        pending(&t.db).await == 0
    })
    .await;
    // Published just now: younger than the retention, still there.
    assert_eq!(all_rows(&t.db).await.len(), 20);
    let late = seed(&t.db, vec![NewEvent::new("t", "agg", "late")]).await;
    wait_until(Duration::from_secs(10), "the purge", || async {
        all_rows(&t.db).await.len() <= 2
    })
    .await;
    stop.cancel();
    let stats = task.await.expect("relay");
    assert!(stats.purged >= 19, "{stats:?}");
    let left: Vec<Uuid> = all_rows(&t.db).await.iter().map(|e| e.id).collect();
    assert!(left.contains(&ids[0]), "dead letters are never purged");
    assert!(
        left.len() == 1 || left.contains(&late[0]),
        "only old published rows go"
    );
}

async fn four_relays_deleting_on_publish_deliver_each_event_once_in_order(t: &TestDb) {
    let ids = seed(&t.db, scattered_events(5_000, 50)).await;
    let sink = InMemoryPublisher::new();
    let stats = run_relays_until_empty(
        t,
        4,
        sink.clone(),
        fast(
            RelayConfig::default()
                .batch_size(100)
                .on_publish(OnPublish::Delete),
        ),
        Duration::from_secs(120),
    )
    .await;
    let delivered = sink.deliveries();
    assert_exactly_once(&delivered, &ids);
    assert_aggregate_order(&delivered);
    assert_eq!(stats.iter().map(|s| s.published).sum::<u64>(), 5_000);
    assert!(
        all_rows(&t.db).await.is_empty(),
        "every published row is gone"
    );
    let snapshot = Outbox::new(&t.db).stats().await.expect("stats");
    assert_eq!(snapshot.published_last_hour, 5_000, "{snapshot:?}");
    assert_eq!(snapshot.pending(), 0);
}

async fn delete_on_publish_keeps_dead_letters_retries_and_the_hours_count(t: &TestDb) {
    let p = poison(false);
    let (a, b) = seed_poison(&t.db, &p).await;
    let relay = Relay::builder(t.db.clone(), p.clone())
        .config(fast(
            RelayConfig::default()
                .max_attempts(3)
                .on_publish(OnPublish::Delete),
        ))
        .build()
        .expect("relay");
    let outbox = Outbox::new(&t.db);
    drain_until(&relay, async || {
        outbox.count_unpublished().await.expect("count") == 0
    })
    .await;
    // The poison event was retried, then kept as a dead letter; the four others are gone.
    let dead = outbox.get(a[0]).await.expect("the dead letter is a row");
    assert_eq!(dead.status, OutboxStatus::Failed);
    assert_eq!(dead.attempts, 3);
    for id in b.iter().chain(&a[1..]) {
        assert!(
            matches!(outbox.get(*id).await, Err(Error::NotFound { .. })),
            "{id} was deleted on publish"
        );
    }
    assert_eq!(outbox.stats().await.expect("stats").published_last_hour, 4);

    // Replayed, it is delivered and deleted like the others, and counted once more.
    p.on.store(false, AtomicOrdering::SeqCst);
    outbox.replay(a[0]).await.expect("replay");
    drain_until(&relay, async || {
        outbox.count_unpublished().await.expect("count") == 0
    })
    .await;
    assert!(all_rows(&t.db).await.is_empty());
    let stats = outbox.stats().await.expect("stats");
    assert_eq!(
        (stats.published_last_hour, stats.failed),
        (5, 0),
        "{stats:?}"
    );

    // Retention ages the tally out with the rows: nothing published before a cutoff remains.
    let cutoff = Utc::now() + chrono::Duration::minutes(2);
    outbox.purge_published(cutoff, 100).await.expect("purge");
    assert_eq!(outbox.stats().await.expect("stats").published_last_hour, 0);
}

async fn invalid_relay_config_is_rejected(t: &TestDb) {
    let bad = [
        RelayConfig::default().batch_size(0),
        RelayConfig::default().max_attempts(0),
        RelayConfig::default()
            .lease_duration(Duration::from_secs(1))
            .publish_timeout(Duration::from_secs(2)),
        // A publish could outlast the partition lease it started under.
        RelayConfig::default().partition_lease(Duration::from_secs(12)),
    ];
    for config in bad {
        let res = Relay::builder(t.db.clone(), StdoutPublisher::stdout())
            .config(config)
            .build();
        assert!(matches!(res, Err(Error::Config(_))));
    }
}

async fn notify_wakes_an_idle_relay_on_commit_only(t: &TestDb) {
    let (sink, mut rx) = InMemoryPublisher::channel();
    let relay = Relay::builder(t.connect_again().await, sink.clone())
        .config(RelayConfig::default().idle_poll_interval(Duration::from_secs(30)))
        .build()
        .expect("relay");
    let (stop, task) = support::spawn(relay);
    // Let the first (empty) poll and the LISTEN happen.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let write = |name: &'static str, commit: bool| {
        let db = t.db.clone();
        async move {
            let txn = db.begin().await.expect("begin");
            Outbox::new(&txn)
                .add_event(NewEvent::new("t", "agg", name))
                .await
                .expect("add");
            let at = Instant::now();
            if commit {
                txn.commit().await.expect("commit")
            } else {
                txn.rollback().await.expect("rollback")
            }
            at
        }
    };
    let recv = async |rx: &mut tokio::sync::mpsc::UnboundedReceiver<OutboxEvent>| {
        tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .ok()
            .flatten()
    };

    let rolled_back = write("rolled-back", false).await;
    let committed = write("committed", true).await;
    let got = recv(&mut rx)
        .await
        .expect("the committed event arrives without waiting 30 s");
    let latency = committed.elapsed();
    assert_eq!(got.aggregate_id, "committed");
    assert!(
        latency < Duration::from_secs(1),
        "commit→publish took {latency:?}"
    );
    let _ = rolled_back;

    // Drop the LISTEN connection: the relay reconnects and is still woken.
    let killed =
        t.db.query_all_raw(Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()",
        ))
        .await
        .expect("terminate listeners");
    assert!(!killed.is_empty(), "a LISTEN connection existed");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let again = write("after-reconnect", true).await;
    let got = recv(&mut rx).await.expect("woken after the reconnect");
    assert_eq!(got.aggregate_id, "after-reconnect");
    assert!(
        again.elapsed() < Duration::from_secs(1),
        "took {:?}",
        again.elapsed()
    );

    stop.cancel();
    task.await.expect("relay");
    assert!(
        sink.deliveries()
            .iter()
            .all(|e| e.aggregate_id != "rolled-back"),
        "a rollback is never seen"
    );
    assert_eq!(sink.len(), 2);
}

async fn a_batch_sends_one_notify_and_a_rollback_none(t: &TestDb) {
    use sea_orm::sqlx::postgres::PgListener;
    let mut listener = PgListener::connect(&common::postgres_url())
        .await
        .expect("listen");
    listener
        .listen(seaorm_outbox::relay::NOTIFY_CHANNEL)
        .await
        .expect("listen");
    // Notifications for this test's schema arriving within 400 ms of quiet.
    let ours = async |listener: &mut PgListener| {
        let mut n = 0;
        while let Ok(msg) = tokio::time::timeout(Duration::from_millis(400), listener.recv()).await
        {
            if msg.expect("notification").payload() == t.name {
                n += 1;
            }
        }
        n
    };

    let txn = t.db.begin().await.expect("begin");
    Outbox::new(&txn)
        .add_events(
            (0..10)
                .map(|i| NewEvent::new("t", "agg", i.to_string()))
                .collect(),
        )
        .await
        .expect("batch");
    txn.rollback().await.expect("rollback");
    assert_eq!(ours(&mut listener).await, 0, "a rollback notifies nobody");

    let txn = t.db.begin().await.expect("begin");
    Outbox::new(&txn)
        .add_events(
            (0..10)
                .map(|i| NewEvent::new("t", "agg", i.to_string()))
                .collect(),
        )
        .await
        .expect("batch");
    Outbox::new(&txn)
        .add_event(NewEvent::new("t", "agg", "x"))
        .await
        .expect("one more");
    assert_eq!(ours(&mut listener).await, 0, "nothing before commit");
    txn.commit().await.expect("commit");
    assert_eq!(
        ours(&mut listener).await,
        1,
        "one notification per committed transaction"
    );

    // The off switch for polling deployments (PgBouncer transaction pooling, or to spare the
    // commit-time NOTIFY lock): set per session here, per database or role in production.
    let txn = t.db.begin().await.expect("begin");
    txn.execute_unprepared("SET LOCAL seaorm_outbox.notify = off")
        .await
        .expect("switch off");
    Outbox::new(&txn)
        .add_event(NewEvent::new("t", "agg", "quiet"))
        .await
        .expect("add");
    txn.commit().await.expect("commit");
    assert_eq!(
        ours(&mut listener).await,
        0,
        "seaorm_outbox.notify = off skips the NOTIFY"
    );
}

async fn without_listen_an_idle_relay_waits_for_its_poll(t: &TestDb) {
    let (sink, mut rx) = InMemoryPublisher::channel();
    let relay = Relay::builder(t.connect_again().await, sink)
        .config(
            RelayConfig::default()
                .idle_poll_interval(Duration::from_secs(3))
                .listen_notify(false),
        )
        .build()
        .expect("relay");
    let (stop, task) = support::spawn(relay);
    // Settled: it owns every partition (a take wakes its loop, which on a loaded machine could
    // come after the commit below and pass for a wake-up), and its first poll is behind it.
    support::wait_until(
        Duration::from_secs(10),
        "the relay to own everything",
        || async {
            let relays = Outbox::new(&t.db).relays(Duration::from_secs(60)).await;
            relays.is_ok_and(|r| r.iter().map(|r| r.partitions).sum::<u64>() == 256)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let committed = Instant::now();
    Outbox::new(&t.db)
        .add_event(NewEvent::new("t", "agg", "x"))
        .await
        .expect("add");
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("polled")
        .expect("event");
    assert_eq!(got.aggregate_id, "x");
    assert!(
        committed.elapsed() > Duration::from_secs(2),
        "woken by the poll, not a NOTIFY: {:?}",
        committed.elapsed()
    );
    stop.cancel();
    task.await.expect("relay");
}

/// An aggregate in backoff with a long backlog of due followers fills the oldest due rows; a
/// free aggregate's head behind them must still be found (PostgreSQL first searches a window
/// of 8 due rows per batch slot, then walks the backlog).
async fn a_free_aggregate_behind_a_long_blocked_backlog_is_found(t: &TestDb) {
    let blocked = seed(
        &t.db,
        (0..60)
            .map(|i| NewEvent::new("t", "blocked", "1").json_payload(serde_json::json!(i)))
            .collect(),
    )
    .await;
    let free = seed(&t.db, vec![NewEvent::new("t", "free", "1")]).await;
    let later = Utc::now() + chrono::Duration::hours(1);
    t.exec(
        "park the head",
        "UPDATE outbox_events SET next_attempt_at = ? WHERE id = ?",
        vec![later.into(), blocked[0].into()],
    )
    .await;

    let sink = InMemoryPublisher::new();
    let relay = Relay::builder(t.db.clone(), sink.clone())
        .config(fast(RelayConfig::default().batch_size(2)))
        .build()
        .expect("relay");
    let stats = relay.drain().await.expect("drain");
    assert_eq!(stats.published, 1, "{stats:?}");
    let delivered: Vec<Uuid> = sink.deliveries().iter().map(|e| e.id).collect();
    assert_eq!(delivered, free, "only the free aggregate's event goes");
    assert_eq!(pending(&t.db).await, 60, "the blocked aggregate waits");
}

/// A row the relay cannot turn into an event (here: headers that are not a map of strings, as
/// another writer might leave) would fail forever: it is dead-lettered with the reason, and the
/// rows around it are delivered.
async fn unreadable_row_is_dead_lettered_and_the_rest_delivered(t: &TestDb) {
    let ids = seed(
        &t.db,
        (0..4)
            .map(|i| {
                NewEvent::new("t", "agg", format!("a{i}"))
                    .occurred_at(base() + chrono::Duration::seconds(i))
            })
            .collect(),
    )
    .await;
    // Not a map, and a map with a value that is not a string: each reason names what is wrong.
    let corrupt = [
        (ids[1], serde_json::json!([1, 2]), "found an array"),
        (
            ids[3],
            serde_json::json!({ "k": 1 }),
            "header `k` is a number",
        ),
    ];
    for (id, headers, _) in &corrupt {
        t.exec(
            "corrupt headers",
            "UPDATE outbox_events SET headers = ? WHERE id = ?",
            vec![headers.clone().into(), (*id).into()],
        )
        .await;
    }

    let sink = InMemoryPublisher::new();
    let relay = Relay::builder(t.db.clone(), sink.clone())
        .config(fast(RelayConfig::default()))
        .build()
        .expect("relay");
    let stats = relay.drain().await.expect("drain");
    assert_eq!((stats.published, stats.dead_lettered), (2, 2), "{stats:?}");
    let delivered: Vec<Uuid> = sink.deliveries().iter().map(|e| e.id).collect();
    assert_eq!(delivered.len(), 2);
    assert!(delivered.contains(&ids[0]) && delivered.contains(&ids[2]));
    // The rows are still unreadable as events, so read them as the entity model.
    use sea_orm::EntityTrait;
    for (id, _, reason) in corrupt {
        let dead = seaorm_outbox_entity::OutboxEvents::find_by_id(id)
            .one(&t.db)
            .await
            .expect("row")
            .expect("exists");
        assert_eq!(dead.status, OutboxStatus::Failed);
        let error = dead.last_error.unwrap_or_default();
        assert!(
            error.contains("corrupt") && error.contains(reason),
            "{error}"
        );
    }
    // It is out of the way: nothing is left to claim.
    assert_eq!(relay.drain().await.expect("drain").batches, 0);
}

/// Writes one event an hour old, once, during the first publish: as a long transaction that
/// stamped its event early, or a crashed relay's expired lease, would leave one.
struct WritesAStraggler {
    db: DatabaseConnection,
    inner: InMemoryPublisher,
    straggler: Mutex<Option<NewEvent>>,
}

#[async_trait]
impl Publisher for WritesAStraggler {
    async fn publish(&self, events: &[OutboxEvent]) -> Result<Vec<PublishOutcome>, BoxError> {
        use sea_orm::sea_query::Expr;
        use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
        use seaorm_outbox_entity::{OutboxEventColumn as Col, OutboxEvents};

        let first = self.straggler.lock().expect("lock").take();
        if let Some(event) = first {
            // Due an hour ago: behind every later claim's cursor.
            let (id, due) = (event.event_id(), Utc::now() - chrono::Duration::hours(1));
            let txn = self.db.begin().await?;
            Outbox::new(&txn).add_event(event).await?;
            OutboxEvents::update_many()
                .col_expr(Col::NextAttemptAt, Expr::value(due))
                .filter(Col::Id.eq(id))
                .exec(&txn)
                .await?;
            txn.commit().await?;
        }
        self.inner.publish(events).await
    }
}

/// While a relay drains full batches, each claim starts where the last one ended (on
/// PostgreSQL, so that it skips the index entries of published rows). An event that commits
/// behind that point is still delivered: an empty claim from the cursor is not the end of the
/// backlog, and the next claim scans from the start.
async fn an_event_committed_behind_the_claim_cursor_is_delivered(t: &TestDb) {
    for ordering in [Ordering::Unordered, Ordering::PerAggregate] {
        let ids = seed(&t.db, scattered_events(30, 30)).await;
        let hour_ago = Utc::now() - chrono::Duration::hours(1);
        let straggler = NewEvent::new("t", "late", "1").occurred_at(hour_ago);
        let straggler_id = straggler.event_id();
        let publisher = WritesAStraggler {
            db: t.db.clone(),
            inner: InMemoryPublisher::new(),
            straggler: Mutex::new(Some(straggler)),
        };
        let sink = publisher.inner.clone();
        let relay = Relay::builder(t.db.clone(), publisher)
            .config(fast(
                RelayConfig::default().batch_size(10).ordering(ordering),
            ))
            .build()
            .expect("relay");
        let stats = relay.drain().await.expect("drain");
        assert_eq!(stats.published, 31, "{ordering:?}: {stats:?}");
        let mut expected = ids.clone();
        expected.push(straggler_id);
        assert_exactly_once(&sink.deliveries(), &expected);
        assert_eq!(pending(&t.db).await, 0);
    }
}

/// The claim lock is keyed by the outbox's own lease table, so two outboxes in one database
/// (two tenants' schemas) never serialise each other's claims: with schema A's claim lock held,
/// a relay on schema B drains, while one on A waits.
async fn claims_in_one_schema_never_wait_for_another_schemas(t: &TestDb) {
    let other = TestDb::new(common::Backend::Postgres).await;
    seed(&other.db, scattered_events(20, 5)).await;
    seed(&t.db, scattered_events(20, 5)).await;
    let holder = t.connect_again().await;
    let txn = holder.begin().await.expect("begin");
    txn.execute_unprepared(
        "SELECT pg_advisory_xact_lock(hashtext('seaorm_outbox.claim'), \
         ('outbox_leases'::regclass::oid::bigint % 2147483647)::int)",
    )
    .await
    .expect("hold schema A's claim lock");
    // The claim lock belongs to leases; owned partitions take no lock at all.
    let drain = |db: DatabaseConnection| async move {
        Relay::builder(db, InMemoryPublisher::new())
            .config(fast(RelayConfig::default().claiming(Claiming::Leases)))
            .build()
            .expect("relay")
            .drain()
            .await
    };
    let b = tokio::time::timeout(Duration::from_secs(10), drain(other.connect_again().await))
        .await
        .expect("schema B's relay does not wait for schema A's lock")
        .expect("drain B");
    assert_eq!(b.published, 20);
    let a = tokio::time::timeout(Duration::from_secs(1), drain(t.connect_again().await)).await;
    assert!(
        a.is_err(),
        "schema A's relay waits while its own lock is held"
    );
    txn.rollback().await.expect("release");
    other.cleanup().await;
}

/// Every backend stores and reads the relay registry: a running relay's row appears with its
/// name, publisher and a closed breaker, is refreshed, and goes when the relay stops.
async fn a_running_relay_keeps_a_heartbeat_row_and_removes_it_on_stop(t: &TestDb) {
    let relay = Relay::builder(t.connect_again().await, InMemoryPublisher::new())
        .config(
            fast(RelayConfig::default())
                .name("beating")
                .heartbeat_interval(Some(Duration::from_millis(100))),
        )
        .build()
        .expect("relay");
    let (stop, task) = support::spawn(relay);
    let outbox = Outbox::new(&t.db);
    let started = Instant::now();
    let mut first = None;
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "two heartbeats"
        );
        let rows = outbox
            .relays(Duration::from_secs(60))
            .await
            .expect("relays");
        if let Some(r) = rows.first() {
            assert_eq!(
                (r.name.as_str(), r.publisher.as_str()),
                ("beating", "memory")
            );
            assert_eq!(r.breaker, seaorm_outbox::relay::BreakerState::Closed);
            assert!(r.unavailable_since.is_none() && r.started_at <= r.heartbeat_at);
            if *first.get_or_insert(r.heartbeat_at) < r.heartbeat_at {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    task.await.expect("relay");
    assert!(
        outbox
            .relays(Duration::from_secs(60))
            .await
            .expect("relays")
            .is_empty()
    );
}

/// Without NOTIFY (MySQL, SQLite, or PostgreSQL with it off) a relay idles for its whole poll
/// interval, here 30 s; a [`RelayWaker`] given to two relays that split the partitions wakes
/// both, so each event is delivered by whichever owns it within a second.
async fn a_waker_wakes_every_relay_of_the_process_right_after_the_commit(t: &TestDb) {
    use seaorm_outbox::RelayWaker;
    let waker = RelayWaker::new();
    let (sink, mut rx) = InMemoryPublisher::channel();
    let config = RelayConfig::default()
        .idle_poll_interval(Duration::from_secs(30))
        .listen_notify(false)
        .partition_lease(Duration::from_secs(2))
        .publish_timeout(Duration::from_secs(1));
    let mut relays = Vec::new();
    for _ in 0..2 {
        let relay = Relay::builder(t.connect_again().await, sink.clone())
            .config(config.clone())
            .waker(&waker)
            .build()
            .expect("relay");
        relays.push(support::spawn(relay));
    }
    assert_eq!(waker.relays(), 2);
    let owners = "SELECT COUNT(DISTINCT owner) FROM outbox_partitions WHERE owner IS NOT NULL";
    wait_until(
        Duration::from_secs(20),
        "both relays own partitions",
        || async { t.scalar(owners).await == 2 },
    )
    .await;
    // A round after the split: releases and takes are done, nothing else wakes the loops.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let recv = async |rx: &mut tokio::sync::mpsc::UnboundedReceiver<OutboxEvent>, within| {
        tokio::time::timeout(within, rx.recv()).await.ok().flatten()
    };
    let add = async |txn: &sea_orm::DatabaseTransaction, id: String| {
        Outbox::new(txn)
            .add_event(NewEvent::new("t", "agg", id))
            .await
            .expect("add");
    };

    // The control: a plain commit waits for the poll, so the wake-up is what the rest measures.
    let txn = t.db.begin().await.expect("begin");
    add(&txn, "plain".into()).await;
    txn.commit().await.expect("commit");
    assert!(
        recv(&mut rx, Duration::from_millis(1500)).await.is_none(),
        "an idle relay claimed before its poll without a wake-up"
    );
    let woken = Instant::now();
    waker.wake();
    let got = recv(&mut rx, Duration::from_secs(1)).await;
    assert_eq!(got.map(|e| e.aggregate_id).as_deref(), Some("plain"));
    let plain = woken.elapsed();

    // Twenty aggregates over 256 partitions fall to both relays: each must have been woken.
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let txn = t.db.begin().await.expect("begin");
        add(&txn, format!("agg-{i}")).await;
        let at = Instant::now();
        waker.commit(txn).await.expect("commit");
        let got = recv(&mut rx, Duration::from_secs(2)).await.expect("woken");
        assert_eq!(got.aggregate_id, format!("agg-{i}"));
        slowest = slowest.max(at.elapsed());
    }
    // The closure form: committed, then woken; a callback that fails commits nothing and the
    // relays find nothing.
    waker
        .transaction(&t.db, |txn| {
            Box::pin(async move {
                Outbox::new(txn)
                    .add_event(NewEvent::new("t", "agg", "closure"))
                    .await
            })
        })
        .await
        .expect("transaction");
    let got = recv(&mut rx, Duration::from_secs(2)).await;
    assert_eq!(got.map(|e| e.aggregate_id).as_deref(), Some("closure"));
    let failed = waker
        .transaction(&t.db, |txn| {
            Box::pin(async move {
                Outbox::new(txn)
                    .add_event(NewEvent::new("t", "agg", "rolled-back"))
                    .await?;
                Err::<(), _>(Error::Config("the domain write failed".into()))
            })
        })
        .await;
    assert!(failed.is_err());
    assert!(recv(&mut rx, Duration::from_millis(500)).await.is_none());
    // `begin`: the event goes once committed; one dropped uncommitted writes nothing.
    let txn = waker.begin(&t.db).await.expect("begin");
    add(&txn, "begun".into()).await;
    txn.commit().await.expect("commit");
    let got = recv(&mut rx, Duration::from_secs(2)).await;
    assert_eq!(got.map(|e| e.aggregate_id).as_deref(), Some("begun"));
    let txn = waker.begin(&t.db).await.expect("begin");
    add(&txn, "dropped".into()).await;
    drop(txn);
    // One held open (SQLite: holding the writers' turn) does not stall the relays: a
    // write-back waits for the turn at most a second, then goes on.
    let open = waker.begin(&t.db).await.expect("begin");
    let txn = t.db.begin().await.expect("begin");
    add(&txn, "beside-open".into()).await;
    waker.commit(txn).await.expect("commit");
    let got = recv(&mut rx, Duration::from_secs(2)).await;
    assert_eq!(got.map(|e| e.aggregate_id).as_deref(), Some("beside-open"));
    wait_until(
        Duration::from_secs(5),
        "written back beside the open transaction",
        || async { pending(&t.db).await == 0 },
    )
    .await;
    open.rollback().await.expect("rollback");
    assert!(recv(&mut rx, Duration::from_millis(300)).await.is_none());
    eprintln!("wake → publish {plain:?}; commit → publish, slowest of 20: {slowest:?}");

    for (stop, task) in relays {
        stop.cancel();
        task.await.expect("relay");
    }
    // The relays are gone: a wake-up reaches nobody and does not fail.
    waker.wake();
    assert_eq!(waker.relays(), 0);
    assert_eq!(sink.len(), 24);
    assert_eq!(pending(&t.db).await, 0);
}

/// A scheduled event is published no earlier than its time, by whichever relay owns it then,
/// and is ordered by that time: its aggregate's later events are not held behind it, not even
/// by a relay that takes its partition over (which learns what holds from the table).
async fn a_scheduled_event_goes_out_at_its_time_ordered_by_it_across_a_take_over(t: &TestDb) {
    let (sink, mut rx) = InMemoryPublisher::channel();
    let outbox = Outbox::new(&t.db);
    let delay = Duration::from_secs(3);
    let at = Utc::now() + chrono::Duration::from_std(delay).expect("delay");
    let reminder = outbox
        .add_event(NewEvent::new("reminder", "order", "7").deliver_at(at))
        .await
        .expect("scheduled");
    let config = fast(RelayConfig::default().partition_lease(Duration::from_secs(2)))
        .publish_timeout(Duration::from_secs(1));
    let start = |sink: InMemoryPublisher| {
        let config = config.clone();
        async move {
            support::spawn(
                Relay::builder(t.connect_again().await, sink)
                    .config(config)
                    .build()
                    .expect("relay"),
            )
        }
    };
    // The first relay runs, stops, and a second takes the partitions over.
    let (stop, task) = start(sink.clone()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    task.await.expect("relay");
    assert!(sink.is_empty(), "nothing before its time");
    let (stop, task) = start(sink.clone()).await;
    let cancelled = outbox
        .add_event(NewEvent::new("cancelled", "order", "7"))
        .await
        .expect("later event");
    let first = tokio::time::timeout(Duration::from_secs(2), rx.recv())
        .await
        .expect("the later event is not held behind the scheduled one")
        .expect("event");
    assert_eq!(first.id, cancelled);
    let second = tokio::time::timeout(delay + Duration::from_secs(3), rx.recv())
        .await
        .expect("the scheduled event arrives")
        .expect("event");
    let arrived = Utc::now();
    assert_eq!(second.id, reminder);
    assert!(arrived >= at, "published at {arrived}, scheduled for {at}");
    stop.cancel();
    task.await.expect("relay");
    assert_eq!(sink.len(), 2);
    assert_eq!(pending(&t.db).await, 0);
}

/// `first`, a scheduled event, `second`, all of one aggregate: under either claim the two
/// unscheduled ones go out at once and in order (the scheduled one is neither a head that holds
/// `second` nor a follower claimed with `first`), the scheduled one at its time.
async fn a_scheduled_event_between_two_events_holds_neither(t: &TestDb) {
    for claiming in [Claiming::Leases, Claiming::OwnedPartitions] {
        let (sink, mut rx) = InMemoryPublisher::channel();
        let outbox = Outbox::new(&t.db);
        let key = format!("{claiming:?}");
        let at = Utc::now() + chrono::Duration::seconds(2);
        let mut ids = Vec::new();
        for e in [
            NewEvent::new("first", "order", &key),
            NewEvent::new("reminder", "order", &key).deliver_at(at),
            NewEvent::new("second", "order", &key),
        ] {
            ids.push(outbox.add_event(e).await.expect("add"));
        }
        let relay = Relay::builder(t.connect_again().await, sink.clone())
            .config(fast(RelayConfig::default().claiming(claiming)))
            .build()
            .expect("relay");
        let (stop, task) = support::spawn(relay);
        let mut got = Vec::new();
        for _ in 0..2 {
            let e = tokio::time::timeout(Duration::from_millis(1500), rx.recv())
                .await
                .unwrap_or_else(|_| panic!("{claiming:?}: only {got:?} before the scheduled time"))
                .expect("event");
            got.push(e.id);
        }
        assert_eq!(got, [ids[0], ids[2]], "{claiming:?}");
        let e = tokio::time::timeout(Duration::from_secs(4), rx.recv())
            .await
            .expect("the scheduled event")
            .expect("event");
        assert_eq!(e.id, ids[1]);
        assert!(Utc::now() >= at, "{claiming:?}: before its time");
        stop.cancel();
        task.await.expect("relay");
        assert_eq!(sink.len(), 3);
    }
    assert_eq!(pending(&t.db).await, 0);
}

/// `holds_later_events`: a reminder keeps its place, so a "cancelled" written after it waits
/// for it, also for a relay that starts after the first one handed the reminder back (which
/// learns of it from the table, not from memory). Another aggregate goes on meanwhile.
async fn a_scheduled_event_that_holds_later_events_goes_first_across_a_restart(t: &TestDb) {
    let modes = [
        (Claiming::Leases, Ordering::PerAggregate),
        (Claiming::OwnedPartitions, Ordering::PerAggregate),
        (Claiming::Leases, Ordering::Unordered),
    ];
    for (claiming, ordering) in modes {
        let (sink, mut rx) = InMemoryPublisher::channel();
        let outbox = Outbox::new(&t.db);
        let key = format!("{claiming:?}{ordering:?}");
        let at = chrono::SubsecRound::trunc_subsecs(Utc::now() + chrono::Duration::seconds(4), 6);
        let first = outbox
            .add_event(NewEvent::new("placed", "order", &key))
            .await
            .expect("add");
        let reminder = outbox
            .add_event(
                NewEvent::new("reminder", "order", &key)
                    .deliver_at(at)
                    .holds_later_events(),
            )
            .await
            .expect("add");
        let config = fast(RelayConfig::default().claiming(claiming).ordering(ordering));
        let start = |config: RelayConfig, sink: InMemoryPublisher| async move {
            let relay = Relay::builder(t.connect_again().await, sink)
                .config(config)
                .build()
                .expect("relay");
            support::spawn(relay)
        };
        let (stop, task) = start(config.clone(), sink.clone()).await;
        let e = tokio::time::timeout(Duration::from_millis(1500), rx.recv())
            .await
            .expect("the first event")
            .expect("event");
        assert_eq!(e.id, first, "{key}");
        // The relay reads the reminder at once and hands it back until its time.
        support::wait_until(
            Duration::from_secs(2),
            "the reminder handed back",
            || async { outbox.get(reminder).await.expect("get").next_attempt_at == at },
        )
        .await;
        stop.cancel();
        task.await.expect("relay");

        let cancelled = outbox
            .add_event(NewEvent::new("cancelled", "order", &key))
            .await
            .expect("add");
        let other = outbox
            .add_event(NewEvent::new("placed", "order", format!("{key}-other")))
            .await
            .expect("add");
        let (stop, task) = start(config, sink.clone()).await;
        // Unordered, nothing holds: "cancelled" goes at once too.
        let (now_ids, later) = match ordering {
            Ordering::PerAggregate => (vec![other], vec![reminder, cancelled]),
            _ => (vec![other, cancelled], vec![reminder]),
        };
        let mut got = Vec::new();
        for _ in 0..now_ids.len() {
            let e = tokio::time::timeout(Duration::from_millis(1500), rx.recv())
                .await
                .unwrap_or_else(|_| panic!("{key}: only {got:?} before the reminder's time"))
                .expect("event");
            got.push(e.id);
        }
        got.sort();
        let mut sorted = now_ids.clone();
        sorted.sort();
        assert_eq!(got, sorted, "{key}");
        let mut rest = Vec::new();
        for _ in 0..later.len() {
            let e = tokio::time::timeout(Duration::from_secs(6), rx.recv())
                .await
                .unwrap_or_else(|_| panic!("{key}: only {rest:?}"))
                .expect("event");
            assert!(
                Utc::now() >= at,
                "{key}: {} before the reminder's time",
                e.event_type
            );
            rest.push(e.id);
        }
        assert_eq!(rest, later, "{key}: the reminder first");
        stop.cancel();
        task.await.expect("relay");
        assert_eq!(sink.len(), 4, "{key}");
    }
    assert_eq!(pending(&t.db).await, 0);
}

/// An event refused until after its expiry is dead-lettered as expired, unsent, with its
/// aggregate's later event going on (policy: continue); counted in the stats; a replay clears
/// the expiry and sends it. Ordered and unordered.
async fn an_expired_event_is_dead_lettered_unsent_and_counted(t: &TestDb) {
    for ordering in [Ordering::PerAggregate, Ordering::Unordered] {
        let p = poison(false);
        let outbox = Outbox::new(&t.db);
        let key = format!("{ordering:?}");
        let doomed = outbox
            .add_event(NewEvent::new("t", "agg", &key).deliver_within(Duration::from_millis(600)))
            .await
            .expect("add");
        let next = outbox
            .add_event(NewEvent::new("t", "agg", &key))
            .await
            .expect("add");
        p.ids.lock().expect("ids").insert(doomed);
        let backoff =
            Backoff::new(Duration::from_millis(20), Duration::from_millis(50)).jitter(Jitter::None);
        let relay = Relay::builder(t.db.clone(), p.clone())
            .config(fast(
                RelayConfig::default()
                    .max_attempts(10_000)
                    .ordering(ordering)
                    .backoff(backoff),
            ))
            .build()
            .expect("relay");
        let mut stats = seaorm_outbox::relay::RelayStats::default();
        let start = Instant::now();
        while outbox.count_unpublished().await.expect("count") > 0 {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{key}: never settled"
            );
            stats += relay.drain().await.expect("drain");
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        let dead = outbox.get(doomed).await.expect("get");
        assert_eq!(dead.status, OutboxStatus::Failed, "{key}");
        let error = dead.last_error.unwrap_or_default();
        assert!(error.starts_with("expired at"), "{key}: {error}");
        assert!(dead.attempts > 1, "{key}: tried until it expired");
        assert_eq!(
            (stats.expired, stats.dead_lettered),
            (1, 1),
            "{key}: {stats:?}"
        );
        let delivered: Vec<Uuid> = p.sink.deliveries().iter().map(|e| e.id).collect();
        assert_eq!(delivered, [next], "{key}: the expired event was never sent");

        // A replay is a decision to send it anyway.
        p.on.store(false, AtomicOrdering::SeqCst);
        outbox.replay(doomed).await.expect("replay");
        assert_eq!(outbox.get(doomed).await.expect("get").expires_at, None);
        relay.drain().await.expect("drain");
        assert_eq!(p.sink.len(), 2, "{key}");
    }
}
