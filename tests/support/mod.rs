//! Helpers shared by the relay and broker tests: seeding events and running relays.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use sea_orm::DatabaseConnection;
use seaorm_outbox::relay::{Backoff, Relay, RelayConfig};
use seaorm_outbox::{NewEvent, Outbox, OutboxRepository, Publisher, RelayStats};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::common::TestDb;

pub const BASE_SECS: i64 = 1_790_000_000;

pub fn base() -> DateTime<Utc> {
    Utc.timestamp_opt(BASE_SECS, 0).single().expect("time")
}

/// `n` events over `aggregates` aggregates, scattered pseudo-randomly so a batch holds several
/// events of one aggregate; `seq` in the payload is the event's position within its aggregate.
pub fn scattered_events(n: usize, aggregates: u64) -> Vec<NewEvent> {
    let mut seqs: HashMap<u64, u64> = HashMap::new();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let agg = x % aggregates;
            let seq = seqs.entry(agg).or_default();
            *seq += 1;
            NewEvent::new("test.event", "agg", agg.to_string())
                .occurred_at(base() + chrono::Duration::microseconds(i as i64))
                .payload(&serde_json::json!({ "seq": *seq, "i": i, "text": "grüße ✓" }))
                .header("correlation-id", format!("c-{i}"))
        })
        .collect()
}

pub async fn seed(db: &DatabaseConnection, events: Vec<NewEvent>) -> Vec<Uuid> {
    let mut ids = Vec::new();
    let mut events = events.into_iter().peekable();
    while events.peek().is_some() {
        let chunk: Vec<_> = events.by_ref().take(2000).collect();
        ids.extend(Outbox::new(db).add_events(chunk).await.expect("seed"));
    }
    ids
}

pub fn fast(config: RelayConfig) -> RelayConfig {
    config
        .idle_poll_interval(Duration::from_millis(50))
        .backoff(Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(50),
        ))
}

pub async fn pending(db: &DatabaseConnection) -> u64 {
    Outbox::new(db).count_unpublished().await.expect("count")
}

/// Waits until `cond` holds, polling; panics with `what` after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `relays` relays (each on its own pool) until the outbox is empty, then stops them.
pub async fn run_relays_until_empty<P: Publisher + Clone + 'static>(
    t: &TestDb,
    relays: usize,
    publisher: P,
    config: RelayConfig,
    limit: Duration,
) -> Vec<RelayStats> {
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for r in 0..relays {
        let relay = Relay::builder(t.connect_again().await, publisher.clone())
            .config(config.clone().name(format!("r{r}")))
            .build()
            .expect("relay");
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move { relay.run(stop).await }));
    }
    wait_until(limit, "the outbox to drain", || async {
        pending(&t.db).await == 0
    })
    .await;
    stop.cancel();
    let mut stats = Vec::new();
    for task in tasks {
        stats.push(task.await.expect("relay task"));
    }
    stats
}

/// Runs `relay` in a task until the returned token is cancelled; the handle yields its stats.
pub fn spawn<P: Publisher + 'static>(
    relay: Relay<P>,
) -> (CancellationToken, tokio::task::JoinHandle<RelayStats>) {
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });
    (stop, task)
}

/// Every row of the outbox, in any status.
pub async fn all_rows(db: &DatabaseConnection) -> Vec<seaorm_outbox::OutboxEvent> {
    use sea_orm::EntityTrait;
    seaorm_outbox_entity::OutboxEvents::find()
        .all(db)
        .await
        .expect("rows")
        .into_iter()
        .map(|m| seaorm_outbox::OutboxEvent::try_from(m).expect("row"))
        .collect()
}

/// Appends each delivered id to a file, one line each, written with one `write` per call and
/// flushed before acking: the file is what a consumer received, in order, across processes
/// that share it (`O_APPEND`).
pub struct FileRecorder(std::fs::File);

impl FileRecorder {
    pub fn open(path: impl AsRef<std::path::Path>) -> Self {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .expect("log");
        Self(file)
    }
}

#[async_trait::async_trait]
impl Publisher for FileRecorder {
    async fn publish(
        &self,
        events: &[seaorm_outbox::OutboxEvent],
    ) -> Result<Vec<seaorm_outbox::PublishOutcome>, seaorm_outbox::BoxError> {
        use std::io::Write;
        // One line per event: its id, this process, and when the "broker" got it, so a test
        // can tell which relay published what, in order.
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or_default();
        let pid = std::process::id();
        let mut lines = String::new();
        for e in events {
            lines.push_str(&format!("{} {pid} {at}\n", e.id));
        }
        (&self.0).write_all(lines.as_bytes())?;
        self.0.sync_data()?;
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(vec![seaorm_outbox::PublishOutcome::Delivered; events.len()])
    }
}

/// The ids a [`FileRecorder`] wrote, in order.
pub fn read_log(path: &std::path::Path) -> Vec<Uuid> {
    read_receipts(path).into_iter().map(|(id, _)| id).collect()
}

/// What a [`FileRecorder`] wrote, in order: each id with the process that published it.
pub fn read_receipts(path: &std::path::Path) -> Vec<(Uuid, u32)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let id = parts.next()?.parse().ok()?;
            let pid = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            Some((id, pid))
        })
        .collect()
}

/// Checks a crash run: everything delivered, duplicates no more than `batch`. Returns the
/// number of duplicates.
pub fn assert_crash_bounds(all: &[Uuid], ids: &[Uuid], batch: usize) -> usize {
    let unique: std::collections::HashSet<_> = all.iter().collect();
    assert!(
        ids.iter().all(|id| unique.contains(id)),
        "an event was lost"
    );
    let dups = all.len() - unique.len();
    assert!(
        dups <= batch,
        "{dups} duplicates exceed the bound of {batch}"
    );
    dups
}

/// Events still held by a lease: a row lease (MySQL, SQLite) or a batch lease row (PostgreSQL).
pub async fn locked_rows(db: &DatabaseConnection) -> usize {
    use sea_orm::ConnectionTrait;
    let by_row = all_rows(db)
        .await
        .iter()
        .filter(|e| e.locked_by.is_some())
        .count();
    if db.get_database_backend() != sea_orm::DbBackend::Postgres {
        return by_row;
    }
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT COALESCE(SUM(cardinality(ids)), 0)::bigint AS n FROM outbox_leases",
        ))
        .await
        .expect("count leases")
        .expect("one row");
    by_row + usize::try_from(row.try_get::<i64>("", "n").expect("n")).expect("count")
}

/// Per-aggregate order on first deliveries: in `delivered` (the order a consumer saw, ids),
/// each aggregate's events first appear in `occurred_at`, id order. Returns the violations.
pub fn order_violations(delivered: &[Uuid], stored: &[seaorm_outbox::OutboxEvent]) -> usize {
    let by_id: HashMap<Uuid, &seaorm_outbox::OutboxEvent> =
        stored.iter().map(|e| (e.id, e)).collect();
    let mut seen = std::collections::HashSet::new();
    let mut last: HashMap<(&str, &str), (DateTime<Utc>, Uuid)> = HashMap::new();
    let mut violations = 0;
    for id in delivered {
        if !seen.insert(*id) {
            continue;
        }
        let Some(e) = by_id.get(id) else { continue };
        let key = (e.aggregate_type.as_str(), e.aggregate_id.as_str());
        let at = (e.occurred_at, e.id);
        if last.get(&key).is_some_and(|prev| *prev > at) {
            violations += 1;
        }
        last.insert(key, at);
    }
    violations
}

/// The batch size of [`run_child_relay`]'s relay.
pub const CHILD_BATCH: u32 = 50;

/// The body of a relay child process: opens the database the parent described
/// ([`TestDb::child_env`]), and runs a relay (batches of 50, 2 s leases) that appends every
/// delivery to `OUTBOX_CHILD_LOG` before acking, until it is killed. Nothing without the env.
pub async fn run_child_relay() {
    let Some(db) = TestDb::from_child_env().await else {
        return;
    };
    let log = std::env::var("OUTBOX_CHILD_LOG").expect("OUTBOX_CHILD_LOG");
    let relay = Relay::builder(db, FileRecorder::open(log))
        .config(fast(
            RelayConfig::default()
                .batch_size(CHILD_BATCH)
                .lease_duration(Duration::from_secs(2))
                // Each child has a new name: a killed one's partitions wait out the lease.
                .partition_lease(Duration::from_secs(2))
                .publish_timeout(Duration::from_secs(1)),
        ))
        .build()
        .expect("relay");
    relay.run(CancellationToken::new()).await;
}

/// Asserts each aggregate's first deliveries arrive in `seq` order.
pub fn assert_aggregate_order(delivered: &[seaorm_outbox::OutboxEvent]) {
    let mut last: HashMap<&str, u64> = HashMap::new();
    let mut first = std::collections::HashSet::new();
    for e in delivered {
        if !first.insert(e.id) {
            continue;
        }
        let seq = e.payload["seq"].as_u64().expect("seq");
        let prev = last.insert(&e.aggregate_id, seq).unwrap_or(0);
        assert_eq!(
            seq,
            prev + 1,
            "aggregate {} got seq {seq} after {prev}",
            e.aggregate_id
        );
    }
}
