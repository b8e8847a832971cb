//! The log relay against a real PostgreSQL with `wal_level=logical`: a server of these tests'
//! own (initdb into a temporary directory, a free port), shared by the tests running at once,
//! each in its own schema, slot and publication. The refusal test uses the shared server, which
//! runs `wal_level=replica`. It lives with the binary because half of it drives the log relay
//! through `seaorm-outbox relay --mode log` and `log failed …`.
#![cfg(feature = "nats")]

#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "../../tests/support/mod.rs"]
mod support;

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::TestDb;
use common::pg_server::PgServer;
use sea_orm::{
    ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement, TransactionTrait,
};
use seaorm_outbox::publisher::{BoxError, InMemoryPublisher};
use seaorm_outbox::relay::wal::{
    LogDeadLetters, LogRelay, LogRelayConfig, LogRole, Transport, WalPosition, current_position,
    wait_confirmed,
};
use seaorm_outbox::relay::{Backoff, BreakerConfig, OnPublish};
use seaorm_outbox::{
    Error, HealthStatus, HealthThresholds, InvalidEvent, NewEvent, Outbox, OutboxConfig,
    OutboxEvent, OutboxRepository, PublishOutcome, Publisher, WriteMode,
};
use support::wait_until;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Each of these runs over both transports: the replication stream and polled SQL.
macro_rules! over_both_transports {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::Transport;

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn stream() {
                super::$name(Transport::Stream).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sql() {
                super::$name(Transport::Sql).await;
            }
        }
    )*};
}

over_both_transports!(
    committed_events_arrive_in_order_rolled_back_ones_never,
    commit_order_across_concurrent_writers,
    table_mode_reads_inserts_and_marks_them_published,
    table_mode_can_delete_what_it_delivered,
    rejections_and_unreadable_messages_are_dead_lettered_then_replayed,
    a_broker_outage_holds_the_slot_and_spends_nothing,
    a_standby_takes_over_when_the_leader_dies,
    the_slot_advances_on_an_idle_database,
    relay_sigkilled_mid_stream_loses_nothing,
    waiting_for_a_commit_to_be_confirmed,
    graceful_stops_leave_no_fatal_in_the_server_log,
);

/// An isolated outbox on the logical server: a schema, and a slot and publication named after
/// it.
struct LogDb {
    server: Arc<PgServer>,
    t: TestDb,
    slot: String,
    transport: Transport,
}

impl LogDb {
    async fn new(transport: Transport) -> Self {
        Self::on(PgServer::shared_logical(), transport).await
    }

    async fn on(server: Arc<PgServer>, transport: Transport) -> Self {
        let t = TestDb::new_postgres_at(&server.url()).await;
        let slot = t.name.to_lowercase();
        Self {
            server,
            t,
            slot,
            transport,
        }
    }

    fn db(&self) -> &DatabaseConnection {
        &self.t.db
    }

    /// Message mode under this test's prefix: messages are database-wide, and the tests share
    /// one database.
    fn outbox<'c, C: ConnectionTrait>(&self, c: &'c C) -> Outbox<'c, C> {
        Outbox::with_config(c, OutboxConfig::default().message_prefix(self.slot.clone()))
    }

    /// Fast polling and retries, this test's slot, publication and message prefix.
    fn config(&self) -> LogRelayConfig {
        LogRelayConfig::default()
            .transport(self.transport)
            .slot(self.slot.clone())
            .publication(self.slot.clone())
            .message_prefix(self.slot.clone())
            .idle_poll_interval(Duration::from_millis(20))
            .standby_interval(Duration::from_millis(100))
            .backoff(Backoff::new(
                Duration::from_millis(10),
                Duration::from_millis(50),
            ))
            .breaker(
                BreakerConfig::default()
                    .base(Duration::from_millis(50))
                    .cap(Duration::from_millis(200)),
            )
    }

    async fn relay<P: Publisher>(&self, publisher: P, config: LogRelayConfig) -> LogRelay<P> {
        let relay = LogRelay::builder(self.t.connect_again().await, publisher)
            .config(config)
            .build()
            .expect("log relay");
        relay.prepare().await.expect("prepare");
        relay
    }

    async fn sql(&self, sql: &str) {
        self.db()
            .execute_unprepared(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// The slot's confirmed position, as a number.
    async fn confirmed(&self) -> i64 {
        self.scalar(&format!(
            "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::int8 AS n FROM pg_replication_slots \
             WHERE slot_name = '{}'",
            self.slot
        ))
        .await
    }

    async fn scalar(&self, sql: &str) -> i64 {
        self.db()
            .query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
            .await
            .expect(sql)
            .expect("a row")
            .try_get::<i64>("", "n")
            .expect("n")
    }

    async fn flush_lsn(&self) -> i64 {
        self.scalar("SELECT (pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::int8 AS n")
            .await
    }

    /// Drops the slot, so the shared server keeps no WAL for a finished test.
    async fn finish(self) {
        let _ = self
            .db()
            .execute_unprepared(&format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = '{}' AND NOT active",
                self.slot
            ))
            .await;
        drop(self.server);
    }
}

fn event(aggregate: &str, n: u64) -> NewEvent {
    NewEvent::new("test.written", "agg", aggregate).payload(&serde_json::json!({ "n": n }))
}

/// Writes `per_txn` events of `aggregate` per transaction in message mode under `prefix`,
/// `txns` times.
async fn emit_as(
    db: &DatabaseConnection,
    prefix: &str,
    aggregate: &str,
    txns: u64,
    per_txn: u64,
) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for t in 0..txns {
        let txn = db.begin().await.expect("begin");
        let events = (0..per_txn)
            .map(|i| event(aggregate, t * per_txn + i))
            .collect();
        let outbox = Outbox::with_config(&txn, OutboxConfig::default().message_prefix(prefix));
        ids.extend(outbox.emit_events(events).await.expect("emit"));
        txn.commit().await.expect("commit");
    }
    ids
}

fn ids(events: &[OutboxEvent]) -> Vec<Uuid> {
    events.iter().map(|e| e.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refuses_wal_level_replica_with_the_fix() {
    let t = TestDb::new(common::Backend::Postgres).await;
    let relay = LogRelay::builder(t.connect_again().await, InMemoryPublisher::new())
        .config(LogRelayConfig::default().slot("never_created"))
        .build()
        .expect("builds: nothing is checked until prepare");
    let err = relay.prepare().await.expect_err("replica cannot decode");
    let msg = err.to_string();
    assert!(matches!(err, Error::LogRelay { .. }), "{err:?}");
    assert!(
        msg.contains("wal_level is `replica`") && msg.contains("wal_level = logical"),
        "{msg}"
    );
    // The writing side works on any wal_level: only decoding needs `logical`.
    let txn = t.db.begin().await.expect("begin");
    Outbox::new(&txn)
        .emit(event("a", 1))
        .await
        .expect("emit on replica");
    txn.rollback().await.expect("rollback");
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refuses_a_role_without_replication() {
    let l = LogDb::new(Transport::Stream).await;
    let role = format!("r_{}", l.slot);
    l.sql(&format!(
        "CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA \"{0}\" TO {role}; \
         GRANT SELECT ON ALL TABLES IN SCHEMA \"{0}\" TO {role}",
        l.t.name
    ))
    .await;
    let url = l.server.url().replacen("postgres@", &format!("{role}@"), 1);
    let db = Database::connect(url).await.expect("connect as the role");
    let relay = LogRelay::builder(db, InMemoryPublisher::new())
        .config(l.config())
        .build()
        .expect("relay");
    let err = relay.prepare().await.expect_err("no REPLICATION");
    assert!(err.to_string().contains("REPLICATION"), "{err}");
    l.finish().await;
}

async fn committed_events_arrive_in_order_rolled_back_ones_never(transport: Transport) {
    let l = LogDb::new(transport).await;
    let p = InMemoryPublisher::new();
    let relay = l.relay(p.clone(), l.config()).await;

    let committed = emit_as(l.db(), &l.slot, "a", 2, 3).await;
    let txn = l.db().begin().await.expect("begin");
    l.outbox(&txn)
        .emit_events(vec![event("a", 100), event("b", 101)])
        .await
        .expect("emit");
    txn.rollback().await.expect("rollback");
    // The repository's switch: add_event writes a message, no row.
    let txn = l.db().begin().await.expect("begin");
    let config = OutboxConfig::default()
        .write_mode(WriteMode::Message)
        .message_prefix(l.slot.clone());
    let switched = Outbox::with_config(&txn, config)
        .add_event(event("b", 7).header("correlation-id", "c-1"))
        .await
        .expect("add_event in message mode");
    txn.commit().await.expect("commit");
    // Validated exactly like add_event: nothing is written.
    let bad = Outbox::new(l.db())
        .emit(NewEvent::new("", "agg", "x"))
        .await;
    assert!(matches!(
        bad,
        Err(Error::InvalidEvent(InvalidEvent::Empty { .. }))
    ));

    let stats = relay.drain().await.expect("drain");
    let got = p.deliveries();
    let mut want = committed.clone();
    want.push(switched);
    assert_eq!(ids(&got), want, "committed only, in commit order");
    assert_eq!(stats.published, 7);
    assert_eq!(
        Outbox::new(l.db())
            .count_unpublished()
            .await
            .expect("count"),
        0,
        "message mode writes no row"
    );
    let last = &got[6];
    assert_eq!(last.payload, serde_json::json!({ "n": 7 }));
    assert_eq!(
        last.headers.get("correlation-id").map(String::as_str),
        Some("c-1")
    );
    assert!(
        last.created_at >= last.occurred_at,
        "created_at is the commit time"
    );
    // Confirmed: a second drain sends nothing again.
    relay.drain().await.expect("drain");
    assert_eq!(p.len(), 7);
    l.finish().await;
}

/// Eight writers whose transactions serialise on one counter row, so their commit order is
/// the counter's order (not the order they began or generated ids in): the relay delivers in
/// exactly that order while they write.
async fn commit_order_across_concurrent_writers(transport: Transport) {
    let l = LogDb::new(transport).await;
    l.sql("CREATE TABLE counter (n bigint NOT NULL); INSERT INTO counter VALUES (0)")
        .await;
    let p = InMemoryPublisher::new();
    let relay = l.relay(p.clone(), l.config()).await;
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });
    const WRITERS: u64 = 8;
    const TXNS: u64 = 40;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let db = l.t.connect_again().await;
        let prefix = l.slot.clone();
        writers.push(tokio::spawn(async move {
            for _ in 0..TXNS {
                let txn = db.begin().await.expect("begin");
                // An id made before the lock: commit order is not id order.
                let early = NewEvent::new("test.early", "w", w.to_string());
                let row = txn
                    .query_one_raw(Statement::from_string(
                        DbBackend::Postgres,
                        "UPDATE counter SET n = n + 1 RETURNING n",
                    ))
                    .await
                    .expect("count")
                    .expect("row");
                let n: i64 = row.try_get("", "n").expect("n");
                Outbox::with_config(&txn, OutboxConfig::default().message_prefix(prefix.clone()))
                    .emit_events(vec![
                        early.payload(&serde_json::json!({ "n": n })),
                        event(&w.to_string(), n as u64),
                    ])
                    .await
                    .expect("emit");
                tokio::time::sleep(Duration::from_millis(1)).await;
                txn.commit().await.expect("commit");
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    let total = (WRITERS * TXNS * 2) as usize;
    wait_until(Duration::from_secs(30), "every event delivered", || async {
        p.len() >= total
    })
    .await;
    stop.cancel();
    let stats = task.await.expect("relay");
    let ns: Vec<i64> = p
        .deliveries()
        .iter()
        .map(|e| e.payload["n"].as_i64().expect("n"))
        .collect();
    let want: Vec<i64> = (1..=(WRITERS * TXNS) as i64).flat_map(|n| [n, n]).collect();
    assert_eq!(ns, want, "commit order, each transaction's events together");
    assert!(stats.reads > 1, "read while the writers wrote");
    l.finish().await;
}

async fn table_mode(l: &LogDb, on_publish: OnPublish) {
    let p = InMemoryPublisher::new();
    let relay = l
        .relay(p.clone(), l.config().table(true).on_publish(on_publish))
        .await;
    let outbox = Outbox::new(l.db());
    let txn = l.db().begin().await.expect("begin");
    let first = Outbox::new(&txn)
        .add_events((0..5).map(|i| event("t", i)).collect())
        .await
        .expect("add");
    txn.commit().await.expect("commit");
    let txn = l.db().begin().await.expect("begin");
    Outbox::new(&txn)
        .add_event(event("t", 99))
        .await
        .expect("add");
    txn.rollback().await.expect("rollback");
    // Both ways at once: a message between two row transactions.
    let message = emit_as(l.db(), &l.slot, "m", 1, 1).await;
    // A scheduled row cannot be held by a log relay: never sent early, kept as a dead letter.
    let scheduled = outbox
        .add_event(event("s", 0).deliver_after(Duration::from_secs(3600)))
        .await
        .expect("add scheduled");
    // Expired by the time the relay reads it: dead-lettered unsent, counted.
    let expired = outbox
        .add_event(event("x", 0).deliver_within(Duration::from_millis(1)))
        .await
        .expect("add expiring");
    let last = outbox.add_event(event("t", 5)).await.expect("add");
    tokio::time::sleep(Duration::from_millis(5)).await;

    let stats = relay.drain().await.expect("drain");
    // The stream reported its last position itself: the stop decoded nothing again.
    assert_eq!(stats.stop_advances, 0, "{stats:?}");
    let mut want = first.clone();
    want.extend(message);
    want.push(last);
    assert_eq!(ids(&p.deliveries()), want);
    assert_eq!(stats.published, 7);
    assert_eq!(stats.unreadable, 1, "{stats:?}");
    assert_eq!((stats.expired, stats.dead_lettered), (1, 1), "{stats:?}");
    let dead = LogDeadLetters::new(l.db())
        .with_prefix(l.slot.clone())
        .get(expired)
        .await
        .expect("get")
        .expect("the expired row is a dead letter");
    assert!(dead.error.starts_with("expired at"), "{}", dead.error);
    let dead = LogDeadLetters::new(l.db())
        .with_prefix(l.slot.clone())
        .get(scheduled)
        .await
        .expect("get")
        .expect("the scheduled row is a dead letter");
    assert!(dead.error.starts_with("scheduled for"), "{}", dead.error);
    assert_eq!(dead.event.map(|e| e.aggregate_id), Some("s".to_owned()));
    // Message mode has no row to hold: refused, nothing emitted.
    let refused = outbox
        .emit(event("s", 1).deliver_after(Duration::from_secs(3600)))
        .await;
    assert!(
        matches!(refused, Err(Error::Unsupported { .. })),
        "{refused:?}"
    );
    assert_eq!(p.deliveries()[0].payload, serde_json::json!({ "n": 0 }));
    // The scheduled and expired rows stay in the table, pending, as table mode's dead letters do.
    assert_eq!(outbox.count_unpublished().await.expect("count"), 2);
    let published = outbox
        .count_published_before(chrono::Utc::now())
        .await
        .expect("count");
    match on_publish {
        OnPublish::Delete => assert_eq!(published, 0, "delivered rows deleted"),
        _ => {
            assert_eq!(published, 6, "delivered rows marked published");
            assert!(
                outbox
                    .get(first[0])
                    .await
                    .expect("get")
                    .published_at
                    .is_some()
            );
        }
    }
    // Deleted or kept, the statistics count them as published.
    let stats = outbox.stats().await.expect("stats");
    assert_eq!(stats.published_last_hour, 6, "{stats:?}");
    // The relay's own write-back is not read back as events.
    relay.drain().await.expect("drain");
    assert_eq!(p.len(), 7);
}

async fn table_mode_reads_inserts_and_marks_them_published(transport: Transport) {
    let l = LogDb::new(transport).await;
    table_mode(&l, OnPublish::Retain).await;
    l.finish().await;
}

async fn table_mode_can_delete_what_it_delivered(transport: Transport) {
    let l = LogDb::new(transport).await;
    table_mode(&l, OnPublish::Delete).await;
    l.finish().await;
}

/// A bulk import: one transaction of more rows than PostgreSQL takes bind parameters in one
/// statement (65,535). Its read is one transaction, so its write-back is one statement; it
/// used to fail on every attempt, and the slot never moved past the import.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn table_mode_settles_a_transaction_past_the_bind_parameter_limit() {
    const N: u64 = 70_000;
    let l = LogDb::new(Transport::Stream).await;
    let p = InMemoryPublisher::new();
    let relay = l.relay(p.clone(), l.config().table(true)).await;
    let txn = l.db().begin().await.expect("begin");
    for chunk in 0..N / 5_000 {
        let events = (0..5_000)
            .map(|i| event("bulk", chunk * 5_000 + i))
            .collect();
        Outbox::new(&txn).add_events(events).await.expect("add");
    }
    txn.commit().await.expect("commit");
    let stats = relay.drain().await.expect("drain");
    assert_eq!((stats.published, p.len() as u64), (N, N), "{stats:?}");
    let outbox = Outbox::new(l.db());
    assert_eq!(outbox.count_unpublished().await.expect("count"), 0);
    assert_eq!(outbox.count_failed().await.expect("count"), 0);
    // Settled, so the slot moved past it: a second drain reads nothing.
    let again = relay.drain().await.expect("drain");
    assert_eq!((again.published, p.len() as u64), (0, N), "{again:?}");
    l.finish().await;
}

/// Rejects events of aggregate `poison` until `heal`ed.
#[derive(Clone, Default)]
struct Picky {
    inner: InMemoryPublisher,
    healed: Arc<AtomicBool>,
    down: Arc<AtomicBool>,
    /// Every event offered, in order, and whether it was taken.
    offered: Arc<std::sync::Mutex<Vec<(Uuid, bool)>>>,
}

#[async_trait]
impl Publisher for Picky {
    async fn publish(&self, events: &[OutboxEvent]) -> Result<Vec<PublishOutcome>, BoxError> {
        if self.down.load(AtomicOrdering::SeqCst) {
            return Ok(vec![
                PublishOutcome::Unavailable("connection refused".into());
                events.len()
            ]);
        }
        let mut out = Vec::new();
        for e in events {
            let refused = !self.healed.load(AtomicOrdering::SeqCst)
                && (e.aggregate_id == "poison"
                    || (e.aggregate_id == "flaky" && e.payload["n"] == 0));
            self.offered.lock().expect("log").push((e.id, !refused));
            if e.aggregate_id == "poison" && !self.healed.load(AtomicOrdering::SeqCst) {
                out.push(PublishOutcome::Reject("too large".into()));
            } else if e.aggregate_id == "flaky"
                && e.payload["n"] == 0
                && !self.healed.load(AtomicOrdering::SeqCst)
            {
                out.push(PublishOutcome::Retry("try later".into()));
            } else {
                self.inner.publish(std::slice::from_ref(e)).await?;
                out.push(PublishOutcome::Delivered);
            }
        }
        Ok(out)
    }
}

async fn rejections_and_unreadable_messages_are_dead_lettered_then_replayed(transport: Transport) {
    let l = LogDb::new(transport).await;
    let p = Picky::default();
    // One event per call, so the held event is not in the refused one's call.
    let relay = l
        .relay(p.clone(), l.config().max_attempts(3).batch_size(1))
        .await;
    let ok = emit_as(l.db(), &l.slot, "fine", 1, 2).await;
    let poison = emit_as(l.db(), &l.slot, "poison", 1, 1).await;
    // Two events of `flaky`: the first is refused every time, so the second waits for it to be
    // given up, while a later aggregate's event goes ahead.
    let flaky = emit_as(l.db(), &l.slot, "flaky", 1, 2).await;
    let other = emit_as(l.db(), &l.slot, "other", 1, 1).await;
    // A message under our prefix that no Outbox wrote.
    l.sql(&format!(
        "SELECT pg_logical_emit_message(true, '{}', 'not json')",
        l.slot
    ))
    .await;

    let stats = relay.drain().await.expect("drain");
    assert_eq!(stats.dead_lettered, 2, "{stats:?}");
    assert_eq!(stats.unreadable, 1);
    assert_eq!(stats.retried, 2, "attempts 1 and 2 retried, 3 gave up");
    let delivered = ids(&p.inner.deliveries());
    let want: HashSet<Uuid> = [ok.clone(), other.clone(), vec![flaky[1]]]
        .concat()
        .into_iter()
        .collect();
    assert_eq!(delivered[..2], ok[..], "in commit order");
    assert_eq!(delivered.iter().copied().collect::<HashSet<_>>(), want);
    // The second flaky event was not offered until the first had had its last attempt.
    let offered = p.offered.lock().expect("log").clone();
    let last_try = offered
        .iter()
        .rposition(|(id, _)| *id == flaky[0])
        .expect("tried");
    let held = offered
        .iter()
        .position(|(id, _)| *id == flaky[1])
        .expect("offered");
    assert!(held > last_try, "{offered:?}");
    assert_eq!(offered.iter().filter(|(id, _)| *id == flaky[0]).count(), 3);

    let dead = LogDeadLetters::new(l.db()).with_prefix(l.slot.clone());
    let list = dead.list(10, 0).await.expect("list");
    assert_eq!(list.len(), 3);
    let unreadable = list.iter().find(|d| d.event.is_none()).expect("unreadable");
    assert_eq!(unreadable.raw.as_deref(), Some("not json"));
    assert!(
        unreadable.error.contains("not an outbox envelope"),
        "{}",
        unreadable.error
    );
    let rejected = list.iter().find(|d| d.id == poison[0]).expect("poison");
    assert_eq!(rejected.error, "too large");
    assert_eq!(
        rejected.event.as_ref().map(|e| e.aggregate_id.as_str()),
        Some("poison")
    );
    assert_eq!(
        list.iter().find(|d| d.id == flaky[0]).map(|d| d.attempts),
        Some(3)
    );
    let health = relay.health(&HealthThresholds::default()).await;
    assert_eq!(
        health.status,
        HealthStatus::Degraded,
        "{:?}",
        health.reasons
    );
    assert!(
        health
            .reasons
            .iter()
            .any(|r| r.contains("log dead letters"))
    );

    // The CLI lists them, and refuses to replay the unreadable one, in one line.
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_seaorm-outbox"))
            .env("OUTBOX_DATABASE_URL", l.server.url())
            .env("OUTBOX_DATABASE_SCHEMA", &l.t.name)
            .args(args)
            .output()
            .expect("seaorm-outbox")
    };
    let listed = cli(&["log", "failed", "list", "--json"]);
    assert!(listed.status.success());
    let json: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("json");
    assert_eq!(json.as_array().map(Vec::len), Some(3), "{json}");
    let refused = cli(&["log", "failed", "replay", &unreadable.id.to_string()]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("discard it instead") && stderr.lines().count() == 1,
        "{stderr}"
    );
    // A record that never was an event cannot be replayed, only discarded.
    assert!(matches!(
        dead.replay(unreadable.id).await,
        Err(Error::CorruptRow { .. })
    ));
    assert!(matches!(
        dead.replay(Uuid::now_v7()).await,
        Err(Error::NotFound { .. })
    ));
    p.healed.store(true, AtomicOrdering::SeqCst);
    assert_eq!(dead.replay_all().await.expect("replay"), 2);
    relay.drain().await.expect("drain");
    let again: HashSet<Uuid> = ids(&p.inner.deliveries()).into_iter().collect();
    assert!(
        again.contains(&poison[0]) && again.contains(&flaky[0]),
        "replayed with their ids"
    );
    let discarded = cli(&["log", "failed", "discard", &unreadable.id.to_string()]);
    assert!(discarded.status.success());
    assert_eq!(dead.count().await.expect("count"), 0);
    assert!(matches!(
        dead.discard(unreadable.id).await,
        Err(Error::NotFound { .. })
    ));
    l.finish().await;
}

/// The broker down: the breaker opens, no attempt is spent, nothing is dead-lettered, and the
/// slot does not move past the events; health says so. Back up: everything arrives.
async fn a_broker_outage_holds_the_slot_and_spends_nothing(transport: Transport) {
    let l = LogDb::new(transport).await;
    let p = Picky::default();
    p.down.store(true, AtomicOrdering::SeqCst);
    let relay = Arc::new(l.relay(p.clone(), l.config().max_attempts(1)).await);
    let before = l.confirmed().await;
    let mut written = emit_as(l.db(), &l.slot, "x", 1, 2).await;
    // The first transaction's commit ends before this: a slot confirmed this far skipped it.
    let first_committed = l.flush_lsn().await;
    written.extend(emit_as(l.db(), &l.slot, "x", 9, 2).await);
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (relay, stop) = (relay.clone(), stop.clone());
        async move { relay.run(stop).await }
    });
    wait_until(Duration::from_secs(10), "the breaker to open", || async {
        relay.breaker().unavailable_since.is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Other tests' WAL before the first event may be confirmed; the events may not.
    assert!(
        l.confirmed().await < first_committed,
        "the slot waits for the broker"
    );
    let h = relay
        .health(&HealthThresholds::default().max_slot_lag_bytes(100))
        .await;
    assert_eq!(h.status, HealthStatus::Degraded, "{:?}", h.reasons);
    assert!(
        h.reasons.iter().any(|r| r.contains("bytes of WAL behind")),
        "{:?}",
        h.reasons
    );
    assert!(
        h.reasons.iter().any(|r| r.contains("unavailable")),
        "{:?}",
        h.reasons
    );
    p.down.store(false, AtomicOrdering::SeqCst);
    wait_until(
        Duration::from_secs(10),
        "delivery after the outage",
        || async { p.inner.len() >= written.len() },
    )
    .await;
    stop.cancel();
    let stats = task.await.expect("relay");
    assert_eq!(ids(&p.inner.deliveries()), written);
    assert_eq!((stats.dead_lettered, stats.retried), (0, 0));
    assert!(l.confirmed().await > before);
    l.finish().await;
}

async fn a_standby_takes_over_when_the_leader_dies(transport: Transport) {
    let l = LogDb::new(transport).await;
    let (a, b) = (InMemoryPublisher::new(), InMemoryPublisher::new());
    let leader = Arc::new(l.relay(a.clone(), l.config()).await);
    let standby = Arc::new(l.relay(b.clone(), l.config()).await);
    let stop = CancellationToken::new();
    let leader_task = tokio::spawn({
        let (leader, stop) = (leader.clone(), stop.clone());
        async move { leader.run(stop).await }
    });
    wait_until(Duration::from_secs(5), "a leader", || async {
        leader.role() == LogRole::Leader
    })
    .await;
    let standby_task = tokio::spawn({
        let (standby, stop) = (standby.clone(), stop.clone());
        async move { standby.run(stop).await }
    });
    wait_until(Duration::from_secs(5), "the standby", || async {
        standby.role() == LogRole::Standby
    })
    .await;
    let first = emit_as(l.db(), &l.slot, "s", 50, 2).await;
    wait_until(Duration::from_secs(10), "the leader to deliver", || async {
        a.len() >= first.len()
    })
    .await;
    assert_eq!(b.len(), 0, "one active relay per slot");
    // Normal operation: the leader has confirmed what it sent (a crash before that would
    // have the standby send it again).
    let sent = l.flush_lsn().await;
    wait_until(Duration::from_secs(10), "the leader to confirm", || async {
        l.confirmed().await >= sent
    })
    .await;
    // The leader's process dies: its session ends, and with it the lock.
    leader_task.abort();
    let _ = leader_task.await;
    let second = emit_as(l.db(), &l.slot, "s", 50, 2).await;
    wait_until(
        Duration::from_secs(10),
        "the standby to take over",
        || async { b.len() >= second.len() },
    )
    .await;
    assert_eq!(standby.role(), LogRole::Leader);
    stop.cancel();
    let stats = standby_task.await.expect("standby");
    assert_eq!(stats.took_lead, 1);
    assert_eq!(ids(&a.deliveries()), first);
    assert_eq!(
        ids(&b.deliveries()),
        second,
        "nothing sent twice, nothing lost"
    );
    l.finish().await;
}

/// However idle the outbox is, the slot moves: to the server's position when other tables are
/// written, and past the relay's own heartbeat when nothing is written at all.
async fn the_slot_advances_on_an_idle_database(transport: Transport) {
    // A server of its own: the shared one has other tests' WAL, so it is never idle.
    let l = LogDb::on(Arc::new(PgServer::start_logical()), transport).await;
    l.sql("CREATE TABLE other (id bigserial, body text)").await;
    let relay = Arc::new(
        l.relay(
            InMemoryPublisher::new(),
            l.config().heartbeat_interval(Duration::from_millis(300)),
        )
        .await,
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (relay, stop) = (relay.clone(), stop.clone());
        async move { relay.run(stop).await }
    });
    // Busy elsewhere: 2 MB of WAL that holds no event.
    l.sql("INSERT INTO other (body) SELECT repeat('x', 200) FROM generate_series(1, 8000)")
        .await;
    let after_writes = l.flush_lsn().await;
    wait_until(
        Duration::from_secs(10),
        "the slot to pass the other writes",
        || async { l.confirmed().await >= after_writes },
    )
    .await;
    // Nothing written at all: the heartbeat gives the slot somewhere to go.
    let quiet = l.flush_lsn().await;
    wait_until(
        Duration::from_secs(10),
        "the slot to pass a heartbeat",
        || async { l.confirmed().await > quiet },
    )
    .await;
    // The server lets go of the WAL once decoding passes its next snapshot of running
    // transactions (written every 15 s while there is activity).
    wait_until(
        Duration::from_secs(45),
        "the other writes' WAL released",
        || async {
            let slot = relay.slot().await.expect("slot").expect("exists");
            slot.retained_bytes < 1_000_000
        },
    )
    .await;
    stop.cancel();
    let stats = task.await.expect("relay");
    assert!(stats.heartbeats >= 1, "{stats:?}");
    assert_eq!(stats.published, 0);
    l.finish().await;
}

async fn jetstream(mode_table: bool) {
    use seaorm_outbox::broker::nats::NatsPublisher;
    use seaorm_outbox::broker::nats::async_nats::{self, jetstream};
    use seaorm_outbox::wire::Router;
    let l = LogDb::new(Transport::Stream).await;
    let addr = std::env::var("OUTBOX_TEST_NATS_ADDR").unwrap_or_else(|_| "127.0.0.1:4222".into());
    let client = async_nats::connect(format!("nats://{addr}"))
        .await
        .unwrap_or_else(|e| panic!("NATS at {addr} is not reachable: {e}"));
    let js = jetstream::new(client.clone());
    let name = format!("log_{}", Uuid::now_v7().simple());
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("{name}.>")],
            ..Default::default()
        })
        .await
        .expect("stream");
    let publisher = NatsPublisher::new(client).router(Router::prefixed(format!("{name}.")));
    let relay = l.relay(publisher, l.config().table(mode_table)).await;
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });
    let mut want = Vec::new();
    for t in 0..100u64 {
        let txn = l.db().begin().await.expect("begin");
        let events: Vec<NewEvent> = (0..3)
            .map(|i| event(&(t % 7).to_string(), t * 3 + i))
            .collect();
        let outbox = l.outbox(&txn);
        want.extend(if mode_table {
            outbox.add_events(events).await.expect("add")
        } else {
            outbox.emit_events(events).await.expect("emit")
        });
        txn.commit().await.expect("commit");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while stream.get_info().await.expect("info").state.messages < want.len() as u64 {
        assert!(
            Instant::now() < deadline,
            "JetStream did not get every event"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if mode_table {
        // Rows are marked once the broker has acknowledged them.
        let waited = Instant::now();
        let deadline = waited + Duration::from_secs(30);
        while Outbox::new(l.db())
            .count_unpublished()
            .await
            .expect("count")
            > 0
        {
            if Instant::now() > deadline {
                stop.cancel();
                let stats = task.await.expect("relay");
                let left = Outbox::new(l.db())
                    .get_unpublished(100, 0)
                    .await
                    .expect("left");
                panic!(
                    "rows not marked published: {:?}; {stats:?}",
                    left.iter().map(|e| e.id).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "table mode: rows marked {:?} after the stream had every event",
            waited.elapsed()
        );
    }
    stop.cancel();
    task.await.expect("relay");
    let mut got = Vec::new();
    for seq in 1..=want.len() as u64 {
        let m = stream.get_raw_message(seq).await.expect("message");
        let id = m
            .headers
            .get("event-id")
            .expect("event-id")
            .as_str()
            .to_owned();
        got.push(Uuid::parse_str(&id).expect("uuid"));
    }
    assert_eq!(got, want, "every event once, in commit order");
    if mode_table {
        assert_eq!(
            Outbox::new(l.db())
                .count_unpublished()
                .await
                .expect("count"),
            0
        );
    }
    js.delete_stream(&name).await.expect("delete stream");
    l.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn message_mode_end_to_end_to_jetstream() {
    jetstream(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn table_mode_end_to_end_to_jetstream() {
    jetstream(true).await;
}

/// The `seaorm-outbox relay --mode log` process, printing each event it publishes to `out`.
fn relay_process(l: &LogDb, out: &std::path::Path, max_changes: u32) -> Child {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .expect("out");
    Command::new(env!("CARGO_BIN_EXE_seaorm-outbox"))
        .env("OUTBOX_DATABASE_URL", l.server.url())
        .env("OUTBOX_DATABASE_SCHEMA", &l.t.name)
        .args([
            "relay",
            "--mode",
            "log",
            "--publisher",
            "stdout",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .args([
            "--slot",
            &l.slot,
            "--publication",
            &l.slot,
            "--poll-interval",
            "20ms",
        ])
        .args([
            "--max-changes",
            &max_changes.to_string(),
            "--message-prefix",
            &l.slot,
        ])
        .stdout(Stdio::from(file))
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the relay")
}

fn printed(out: &std::path::Path) -> Vec<Uuid> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(" id=").nth(1)?.split(' ').next()?.parse().ok())
        .collect()
}

/// The relay process SIGKILLed mid-stream and restarted, four times, while a writer commits:
/// nothing is lost, and what is sent twice stays within the reads that were in flight.
async fn relay_sigkilled_mid_stream_loses_nothing(transport: Transport) {
    const MAX_CHANGES: u32 = 300;
    let l = LogDb::new(transport).await;
    // Prepared first, so the slot exists before the writer starts.
    drop(l.relay(InMemoryPublisher::new(), l.config()).await);
    let dir = tempfile::tempdir().expect("dir");
    let out = dir.path().join("published.log");
    let writer = tokio::spawn({
        let db = l.t.connect_again().await;
        let prefix = l.slot.clone();
        async move {
            let mut ids = Vec::new();
            for t in 0..600u64 {
                ids.extend(emit_as(&db, &prefix, &(t % 13).to_string(), 1, 3).await);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            ids
        }
    });
    let mut kills = 0;
    let mut relay = relay_process(&l, &out, MAX_CHANGES);
    while !writer.is_finished() {
        tokio::time::sleep(Duration::from_millis(900)).await;
        relay.kill().expect("SIGKILL");
        relay.wait().expect("reap");
        kills += 1;
        relay = relay_process(&l, &out, MAX_CHANGES);
    }
    let written = writer.await.expect("writer");
    wait_until(Duration::from_secs(30), "every event printed", || {
        let seen: HashSet<Uuid> = printed(&out).into_iter().collect();
        let done = written.iter().all(|id| seen.contains(id));
        async move { done }
    })
    .await;
    // `status` shows the slot the process reads.
    let status = Command::new(env!("CARGO_BIN_EXE_seaorm-outbox"))
        .env("OUTBOX_DATABASE_URL", l.server.url())
        .env("OUTBOX_DATABASE_SCHEMA", &l.t.name)
        .arg("status")
        .output()
        .expect("status");
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        status.contains(&l.slot) && status.contains("log slots"),
        "{status}"
    );
    relay.kill().expect("SIGKILL");
    relay.wait().expect("reap");

    let all = printed(&out);
    let dups = support::assert_crash_bounds(&all, &written, kills * MAX_CHANGES as usize);
    // First deliveries keep each aggregate's order (and commit order overall).
    let pos: HashMap<Uuid, usize> = written.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let mut seen = HashSet::new();
    let firsts: Vec<usize> = all
        .iter()
        .filter(|id| seen.insert(**id))
        .map(|id| pos[id])
        .collect();
    assert!(
        firsts.windows(2).all(|w| w[0] < w[1]),
        "first deliveries in commit order"
    );
    eprintln!(
        "log relay SIGKILL figures: {} events, {kills} kills, {} printed, {dups} duplicates \
         (bound {}), lost 0",
        written.len(),
        all.len(),
        kills * MAX_CHANGES as usize
    );
    l.finish().await;
}

/// Taking a log relay out of service: while it reads its slot, `log slot drop` refuses (naming
/// the reading process) and keeps it; right after the relay stops, the drop succeeds (waiting
/// out the stream's server process), and a second finds nothing to drop.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slot_is_dropped_once_its_relay_stops_and_refused_while_read() {
    let l = LogDb::new(Transport::Stream).await;
    let relay = l.relay(InMemoryPublisher::new(), l.config()).await;
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });
    let slot_rows = |active_only: bool| {
        format!(
            "SELECT COUNT(*) AS n FROM pg_replication_slots WHERE slot_name = '{}'{}",
            l.slot,
            if active_only { " AND active" } else { "" }
        )
    };
    wait_until(
        Duration::from_secs(20),
        "the relay reads its slot",
        || async { l.scalar(&slot_rows(true)).await == 1 },
    )
    .await;
    let drop_slot = |wait: &str| {
        Command::new(env!("CARGO_BIN_EXE_seaorm-outbox"))
            .env("OUTBOX_DATABASE_URL", l.server.url())
            .env("OUTBOX_DATABASE_SCHEMA", &l.t.name)
            .args(["log", "slot", "drop", &l.slot, "--wait", wait])
            .output()
            .expect("log slot drop")
    };
    let refused = drop_slot("300ms");
    let err = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(
        err.contains("still read by server process") && err.lines().count() == 1,
        "{err}"
    );
    assert_eq!(l.scalar(&slot_rows(false)).await, 1, "kept");

    stop.cancel();
    task.await.expect("relay");
    let dropped = drop_slot("30s");
    assert!(
        dropped.status.success(),
        "{}",
        String::from_utf8_lossy(&dropped.stderr)
    );
    assert!(String::from_utf8_lossy(&dropped.stdout).starts_with("dropped replication slot"));
    assert_eq!(l.scalar(&slot_rows(false)).await, 0, "gone");
    let again = drop_slot("1s");
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing dropped"));
    l.finish().await;
}

/// A commit's position, read after it commits, is confirmed once its events are delivered:
/// waiting on it replaces a sleep. A stopped relay's slot is not confirmed past a later
/// commit (a typed timeout), and an unknown slot is refused.
async fn waiting_for_a_commit_to_be_confirmed(transport: Transport) {
    let l = LogDb::new(transport).await;
    let p = InMemoryPublisher::new();
    let relay = l.relay(p.clone(), l.config()).await;
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });
    let written = emit_as(l.db(), &l.slot, "a", 3, 4).await;
    let at = current_position(l.db()).await.expect("position");
    let confirmed = wait_confirmed(l.db(), &l.slot, at, Duration::from_secs(20))
        .await
        .expect("confirmed");
    assert!(confirmed >= at);
    let got = ids(&p.deliveries());
    assert!(
        written.iter().all(|id| got.contains(id)),
        "every event of the commit was delivered when its position was confirmed"
    );
    stop.cancel();
    task.await.expect("relay");

    // Stopped: a later commit is not confirmed.
    emit_as(l.db(), &l.slot, "b", 1, 2).await;
    let later = current_position(l.db()).await.expect("position");
    let err = wait_confirmed(l.db(), &l.slot, later, Duration::from_millis(300))
        .await
        .expect_err("nothing confirms it");
    match &err {
        Error::NotConfirmed {
            position,
            confirmed,
            ..
        } => {
            assert_eq!(position.parse::<WalPosition>().expect("X/Y"), later);
            assert!(confirmed.parse::<WalPosition>().expect("X/Y") < later);
        }
        other => panic!("expected NotConfirmed, got {other}"),
    }
    assert!(matches!(
        wait_confirmed(l.db(), "no_such_slot", later, Duration::from_millis(100)).await,
        Err(Error::LogRelay { .. })
    ));
    // `slots` reports the same position, typed.
    let slot = seaorm_outbox::relay::wal::slots(l.db())
        .await
        .expect("slots")
        .into_iter()
        .find(|s| s.name == l.slot)
        .expect("our slot");
    assert!(slot.confirmed_lsn >= confirmed && slot.confirmed_lsn < later);
    l.finish().await;
}

/// Three graceful stops (drains) and a hand-over on a server of the test's own: its log holds
/// no `FATAL` line for them (log-based alerting keys on those), each stop confirmed its last
/// position through the stream, and nothing was sent twice.
async fn graceful_stops_leave_no_fatal_in_the_server_log(transport: Transport) {
    let server = Arc::new(PgServer::start_logical());
    let l = LogDb::on(Arc::clone(&server), transport).await;
    let p = InMemoryPublisher::new();
    let mut sent = Vec::new();
    for round in 0..3_u64 {
        // (Its prepare creates the slot: events must come after it.)
        let relay = l.relay(p.clone(), l.config()).await;
        sent.extend(emit_as(l.db(), &l.slot, "agg", 20, 1).await);
        let stats = relay.drain().await.expect("drain");
        assert_eq!(stats.stop_advances, 0, "round {round}: {stats:?}");
    }
    // A running relay stopped by its token, as a process stop does.
    let relay = l.relay(p.clone(), l.config()).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });
    sent.extend(emit_as(l.db(), &l.slot, "agg", 1, 1).await);
    let started = std::time::Instant::now();
    while p.len() < sent.len() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{} of {} delivered",
            p.len(),
            sent.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A stream shows as read by the relay, under its name.
    let ours = || async {
        seaorm_outbox::relay::wal::slots(l.db())
            .await
            .expect("slots")
            .into_iter()
            .find(|s| s.name == l.slot)
            .expect("our slot")
    };
    if transport == Transport::Stream {
        let slot = ours().await;
        assert!(slot.active, "{slot:?}");
        assert!(
            slot.reader
                .as_deref()
                .is_some_and(|r| r.starts_with("log-")),
            "{slot:?}"
        );
    }
    stop.cancel();
    run.await.expect("join");
    assert_eq!(ids(&p.deliveries()), sent, "each once, in order");
    // The server process of the last stream exits a moment after the stop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let slot = ours().await;
    assert_eq!(
        (slot.active, slot.reader.as_deref()),
        (false, None),
        "{slot:?}"
    );
    let log = server.log();
    let fatal: Vec<&str> = log.lines().filter(|l| l.contains("FATAL")).collect();
    assert!(fatal.is_empty(), "{}", fatal.join("\n"));
    l.finish().await;
}
