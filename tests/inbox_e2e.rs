//! Outbox → relay → broker → consumer → inbox → the consumer's domain table, end to end on each
//! real broker, with PostgreSQL on both sides and three faults injected in one run:
//! - the relay process SIGKILLed mid-batch, twice, so the broker may get duplicates;
//! - the consumer process aborted between its commit and its acknowledgement, twice, so the
//!   broker redelivers what it already applied;
//! - a handler that fails about 20 % of its attempts.
//!
//! Checked: every event's effect applied exactly once (one effect row per event id), none
//! lost, per-aggregate order intact in the order effects were committed, no dead letter.
#![cfg(all(
    feature = "kafka",
    feature = "nats",
    feature = "rabbitmq",
    feature = "redis"
))]

mod common;
#[path = "support/scratch.rs"]
mod scratch;
mod support;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::{Backend, TestDb};
use scratch::{Broker, Scratch, env_or, nats_stream};
use sea_orm::{ConnectionTrait, DatabaseTransaction, Statement, TransactionTrait};
use seaorm_outbox::BoxError;
use seaorm_outbox::broker::kafka::{KafkaPublisher, KafkaSource};
use seaorm_outbox::broker::nats::{NatsPublisher, NatsSource};
use seaorm_outbox::broker::rabbitmq::{RabbitMqPublisher, RabbitMqSource};
use seaorm_outbox::broker::redis::{RedisPublisher, RedisSource};
use seaorm_outbox::inbox::{
    Acknowledge, Consumer, ConsumerConfig, Delivery, Handler, HandlerError, Incoming, Source,
    SourceContext,
};
use seaorm_outbox::relay::RelayConfig;
use seaorm_outbox::wire::Router;
use seaorm_outbox::{NewEvent, Outbox, OutboxRepository, Publisher, Relay};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const EVENTS: usize = 1500;
const AGGREGATES: usize = 30;
const CONSUMER: &str = "e2e";

impl Broker {
    async fn publisher(&self) -> Arc<dyn Publisher> {
        match self {
            Self::Nats { url, stream } => Arc::new(
                NatsPublisher::connect(url)
                    .await
                    .expect("nats")
                    .router(Router::prefixed(format!("{stream}."))),
            ),
            Self::RabbitMq { uri, queue } => {
                Arc::new(RabbitMqPublisher::new(uri.clone()).router(Router::fixed(queue.clone())))
            }
            Self::Redis { url, stream } => Arc::new(
                RedisPublisher::connect(url)
                    .await
                    .expect("redis")
                    .router(Router::fixed(stream.clone())),
            ),
            Self::Kafka { bootstrap, topic } => Arc::new(
                KafkaPublisher::new(bootstrap)
                    .expect("kafka")
                    .router(Router::fixed(topic.clone())),
            ),
        }
    }
}

// ---- the child processes ----

/// Not a test on its own: a relay process of the end-to-end tests, SIGKILLed at random.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of the end-to-end tests"]
async fn e2e_relay_child() {
    let Some(db) = TestDb::from_child_env().await else {
        return;
    };
    let broker: Broker = serde_json::from_str(&env_or("OUTBOX_E2E_BROKER", "")).expect("broker");
    let relay = Relay::builder(db, broker.publisher().await)
        .config(support::fast(
            RelayConfig::default()
                .batch_size(50)
                .lease_duration(Duration::from_secs(2))
                // Each restart has a new name: its predecessor's partitions wait out the lease.
                .partition_lease(Duration::from_secs(2))
                .publish_timeout(Duration::from_secs(1)),
        ))
        .build()
        .expect("relay");
    relay.run(CancellationToken::new()).await;
}

/// Writes one effect row per message through the consumer's transaction, failing about one
/// attempt in five.
struct Effects;

/// The chain's first consumer: [`Effects`], and in the same transaction an `invoice` event
/// of its own through the outbox, for the chain's second consumer.
struct EffectsAndEmit;

#[async_trait]
impl Handler for EffectsAndEmit {
    async fn handle(&self, txn: &DatabaseTransaction, msg: &Incoming) -> Result<(), HandlerError> {
        Effects.handle(txn, msg).await?;
        let p: Payload = msg.json()?;
        let billed = NewEvent::new("invoice.billed", "invoice", p.agg.clone()).payload(&p);
        Outbox::new(txn).add_event(billed).await?;
        Ok(())
    }
}

/// The chain's second consumer: one `ledger` row per invoice event.
struct Ledger;

#[async_trait]
impl Handler for Ledger {
    async fn handle(&self, txn: &DatabaseTransaction, msg: &Incoming) -> Result<(), HandlerError> {
        let p: Payload = msg.json()?;
        txn.execute_raw(Statement::from_sql_and_values(
            txn.get_database_backend(),
            "INSERT INTO ledger (message_id, agg, seq) VALUES ($1, $2, $3)",
            [msg.message_id.clone().into(), p.agg.into(), p.seq.into()],
        ))
        .await?;
        Ok(())
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Payload {
    agg: String,
    seq: i64,
}

fn injected_failure(id: &str, attempt: u32) -> bool {
    let mut h: u64 = 1469598103934665603;
    for b in id.bytes().chain(attempt.to_le_bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(1099511628211);
    }
    h.is_multiple_of(5)
}

#[async_trait]
impl Handler for Effects {
    async fn handle(&self, txn: &DatabaseTransaction, msg: &Incoming) -> Result<(), HandlerError> {
        let p: Payload = msg.json()?;
        if injected_failure(&msg.message_id, msg.attempt) {
            return Err(HandlerError::retry("injected handler failure"));
        }
        txn.execute_raw(Statement::from_sql_and_values(
            txn.get_database_backend(),
            "INSERT INTO effects (message_id, agg, seq) VALUES ($1, $2, $3)",
            [msg.message_id.clone().into(), p.agg.into(), p.seq.into()],
        ))
        .await?;
        Ok(())
    }
}

/// Logs every delivery's event id to a file, and aborts the process inside the `crash_at`-th
/// acknowledgement: after that message's transaction committed, before the broker heard.
struct Faulty<S> {
    inner: S,
    log: PathBuf,
    crash_at: Option<usize>,
}

struct CrashingAck {
    inner: Box<dyn Acknowledge>,
    count: Arc<AtomicUsize>,
    crash_at: Option<usize>,
}

#[async_trait]
impl Acknowledge for CrashingAck {
    async fn ack(self: Box<Self>) -> Result<(), BoxError> {
        let n = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        if Some(n) == self.crash_at {
            std::process::abort();
        }
        self.inner.ack().await
    }

    async fn in_progress(&self) {
        self.inner.in_progress().await;
    }
}

#[async_trait]
impl<S: Source> Source for Faulty<S> {
    fn broker(&self) -> &'static str {
        self.inner.broker()
    }

    async fn run(self, ctx: SourceContext) -> seaorm_outbox::Result<()> {
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("delivery log");
        let count = Arc::new(AtomicUsize::new(0));
        let crash_at = self.crash_at;
        ctx.run_inner(self.inner, move |d| {
            let id = d.message.header("event-id").unwrap_or("-").to_owned();
            writeln!(log, "{id}").expect("log delivery");
            let ack = Box::new(CrashingAck {
                inner: d.ack,
                count: Arc::clone(&count),
                crash_at,
            });
            Delivery {
                message: d.message,
                ack,
            }
        })
        .await
    }
}

/// Not a test on its own: a consumer process of the end-to-end tests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of the end-to-end tests"]
async fn e2e_consumer_child() {
    let Some(db) = TestDb::from_child_env().await else {
        return;
    };
    let broker: Broker = serde_json::from_str(&env_or("OUTBOX_E2E_BROKER", "")).expect("broker");
    let log = PathBuf::from(env_or("OUTBOX_E2E_LOG", ""));
    let crash_at = std::env::var("OUTBOX_E2E_CRASH_AT")
        .ok()
        .and_then(|s| s.parse().ok());
    let batch = std::env::var("OUTBOX_E2E_BATCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let config = ConsumerConfig::default()
        .concurrency(8)
        .batch_size(batch)
        .max_in_flight(256)
        .max_attempts(30)
        .retry_backoff(Duration::from_millis(5))
        .max_retry_backoff(Duration::from_millis(50));
    let chain = std::env::var("OUTBOX_E2E_CHAIN").is_ok();
    let stop = CancellationToken::new();
    if chain {
        let Broker::Nats { url, stream } = broker else {
            panic!("the chain runs on NATS");
        };
        let consumer = Consumer::builder(db, CONSUMER, EffectsAndEmit)
            .config(config)
            .build()
            .expect("consumer");
        let client = async_nats::connect(url).await.expect("nats");
        let source = NatsSource::new(async_nats::jetstream::new(client), &stream, CONSUMER)
            .filter_subject(format!("{stream}.order"))
            .ack_wait(Duration::from_secs(3));
        let faulty = Faulty {
            inner: source,
            log: log.clone(),
            crash_at,
        };
        consumer.run(faulty, stop).await.expect("consumer ran");
        return;
    }
    let consumer = Consumer::builder(db, CONSUMER, Effects)
        .config(config)
        .build()
        .expect("consumer");
    fn faulty<S>(inner: S, log: &Path, crash_at: Option<usize>) -> Faulty<S> {
        Faulty {
            inner,
            log: log.to_owned(),
            crash_at,
        }
    }
    let result = match broker {
        Broker::Nats { url, stream } => {
            let client = async_nats::connect(url).await.expect("nats");
            let js = async_nats::jetstream::new(client);
            let source = NatsSource::new(js, stream, CONSUMER).ack_wait(Duration::from_secs(3));
            consumer.run(faulty(source, &log, crash_at), stop).await
        }
        Broker::RabbitMq { uri, queue } => {
            consumer
                .run(
                    faulty(RabbitMqSource::new(uri, queue).prefetch(64), &log, crash_at),
                    stop,
                )
                .await
        }
        Broker::Redis { url, stream } => {
            let client = redis::Client::open(url).expect("redis");
            let source =
                RedisSource::new(client, stream, CONSUMER).claim_idle(Duration::from_secs(5));
            consumer.run(faulty(source, &log, crash_at), stop).await
        }
        Broker::Kafka { bootstrap, topic } => {
            let mut config = rdkafka::ClientConfig::new();
            config
                .set("bootstrap.servers", &bootstrap)
                .set("group.id", CONSUMER)
                .set("auto.offset.reset", "earliest")
                .set("session.timeout.ms", "6000")
                .set("heartbeat.interval.ms", "500");
            consumer
                .run(
                    faulty(KafkaSource::from_config(config, &[&topic]), &log, crash_at),
                    stop,
                )
                .await
        }
    };
    result.expect("consumer ran");
}

/// Spawns `test` from this binary with `env`; its stderr goes to `OUTBOX_E2E_LOG` + `.stderr`.
fn child(test: &str, env: &[(&'static str, String)]) -> Child {
    let log = env
        .iter()
        .find(|(k, _)| *k == "OUTBOX_E2E_LOG")
        .map(|(_, v)| format!("{v}.stderr"))
        .expect("log path");
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("stderr log");
    Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", test, "--ignored", "--nocapture"])
        .envs(env.iter().cloned())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn child")
}

fn kill(c: &mut Child) {
    let _ = c.kill(); // SIGKILL on Unix; it may have exited already
    let _ = c.wait();
}

// ---- the parent ----

/// Writes the events in domain transactions: an order row and its events, committed together.
async fn write_events(t: &TestDb) -> Vec<Uuid> {
    t.db.execute_unprepared(
        "CREATE TABLE orders (id BIGINT PRIMARY KEY); \
         CREATE TABLE effects (ord BIGSERIAL PRIMARY KEY, message_id TEXT NOT NULL, \
           agg TEXT NOT NULL, seq BIGINT NOT NULL)",
    )
    .await
    .expect("tables");
    let mut ids = Vec::with_capacity(EVENTS);
    for chunk in 0..EVENTS / 100 {
        let txn = t.db.begin().await.expect("begin");
        let mut events = Vec::with_capacity(100);
        for i in chunk * 100..(chunk + 1) * 100 {
            txn.execute_unprepared(&format!("INSERT INTO orders VALUES ({i})"))
                .await
                .expect("domain row");
            let agg = format!("order-{}", i % AGGREGATES);
            let id = Uuid::now_v7();
            let e = NewEvent::new("order.placed", "order", agg.clone())
                .id(id)
                .payload(&Payload {
                    agg,
                    seq: (i / AGGREGATES) as i64,
                });
            ids.push(id);
            events.push(e);
        }
        Outbox::new(&txn).add_events(events).await.expect("add");
        txn.commit().await.expect("commit");
    }
    ids
}

/// `batch`: the consumer's batch size (1: a transaction per message). `chain` (NATS): the
/// consumer also emits an event per message through the outbox in its transaction, which the
/// relay publishes and a second consumer (`ledger`, in this process) applies.
async fn end_to_end(broker: Broker, batch: usize, chain: bool) {
    let t = TestDb::new(Backend::Postgres).await;
    let all = write_events(&t).await;
    let ledger = if chain {
        Some(start_ledger(&t, &broker).await)
    } else {
        None
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("deliveries.log");
    let mut env = t.child_env();
    env.push(("OUTBOX_E2E_BATCH", batch.to_string()));
    if chain {
        env.push(("OUTBOX_E2E_CHAIN", "1".to_owned()));
    }
    env.push((
        "OUTBOX_E2E_BROKER",
        serde_json::to_string(&broker).expect("json"),
    ));
    env.push(("OUTBOX_E2E_LOG", log.display().to_string()));
    let started = Instant::now();

    // Consumers: the first two abort inside an acknowledgement (after commit); the third runs on.
    let crash_points = [150usize, 400];
    let mut consumer_runs = 0usize;
    let mut consumer = {
        let mut e = env.clone();
        e.push(("OUTBOX_E2E_CRASH_AT", crash_points[0].to_string()));
        child("e2e_consumer_child", &e)
    };
    // The relay: SIGKILLed twice while it publishes, then left to finish.
    let mut relay = child("e2e_relay_child", &env);
    let mut relay_kills = 0usize;
    let limit = Instant::now() + Duration::from_secs(240);
    loop {
        assert!(
            Instant::now() < limit,
            "{}: not done in time: {} of {EVENTS} applied, {} pending; children said: {}",
            broker.name(),
            t.scalar("SELECT COUNT(*) FROM effects").await,
            support::pending(&t.db).await,
            std::fs::read_to_string(format!("{}.stderr", log.display())).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let pending = support::pending(&t.db).await as usize;
        if relay_kills < 2 && pending < EVENTS - (relay_kills + 1) * 300 {
            kill(&mut relay);
            relay_kills += 1;
            relay = child("e2e_relay_child", &env);
        }
        if let Some(status) = consumer.try_wait().expect("consumer status") {
            consumer_runs += 1;
            assert!(
                consumer_runs <= crash_points.len(),
                "{}: the consumer exited unexpectedly: {status}",
                broker.name()
            );
            let mut e = env.clone();
            if let Some(at) = crash_points.get(consumer_runs) {
                e.push(("OUTBOX_E2E_CRASH_AT", at.to_string()));
            }
            consumer = child("e2e_consumer_child", &e);
        }
        let distinct = t
            .scalar("SELECT COUNT(DISTINCT message_id) FROM effects")
            .await;
        if distinct as usize >= EVENTS && consumer_runs == crash_points.len() {
            break;
        }
    }
    if let Some((_, ledger_stop)) = &ledger {
        // The relay goes on publishing what the consumer emitted, to the ledger.
        while t
            .scalar("SELECT COUNT(DISTINCT message_id) FROM ledger")
            .await
            < EVENTS as i64
        {
            assert!(
                Instant::now() < limit,
                "the ledger got {} of {EVENTS}",
                t.scalar("SELECT COUNT(*) FROM ledger").await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        ledger_stop.cancel();
    }
    // Let stray redeliveries arrive: none may add an effect.
    tokio::time::sleep(Duration::from_secs(2)).await;
    kill(&mut consumer);
    kill(&mut relay);

    let elapsed = started.elapsed();

    let effects =
        t.db.query_all_raw(Statement::from_string(
            t.db.get_database_backend(),
            "SELECT message_id, agg, seq FROM effects ORDER BY ord",
        ))
        .await
        .expect("effects");
    let mut seen = HashSet::new();
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut order_violations = 0usize;
    for r in &effects {
        let id: String = r.try_get("", "message_id").expect("id");
        let agg: String = r.try_get("", "agg").expect("agg");
        let seq: i64 = r.try_get("", "seq").expect("seq");
        assert!(
            seen.insert(id.clone()),
            "{}: {id} applied twice",
            broker.name()
        );
        if last.insert(agg, seq).is_some_and(|prev| prev >= seq) {
            order_violations += 1;
        }
    }
    let expected: HashSet<String> = all.iter().map(Uuid::to_string).collect();
    assert_eq!(
        seen,
        expected,
        "{}: every event applied, none lost",
        broker.name()
    );
    assert_eq!(
        order_violations,
        0,
        "{}: per-aggregate order",
        broker.name()
    );
    assert_eq!(
        t.scalar("SELECT COUNT(*) FROM inbox_dead_letters").await,
        0,
        "{}: nothing dead-lettered",
        broker.name()
    );
    // After the first consumer's own checks, so a failure here is the chain's.
    if let Some((run, _)) = ledger {
        run.await.expect("ledger joined").expect("ledger ran");
        check_ledger(&t).await;
    }
    let deliveries = read_lines(&log);
    let redelivered = deliveries - EVENTS;
    eprintln!(
        "e2e figures ({}, batches of {batch}): {EVENTS} events, relay SIGKILLed {relay_kills}×, consumer aborted \
         between commit and ack {}×, ~20% handler attempts failed; {deliveries} deliveries \
         reached the consumer ({redelivered} duplicates), {} effects applied, 0 lost, \
         0 order violations, {:.1}s",
        broker.name(),
        crash_points.len(),
        effects.len(),
        elapsed.as_secs_f64()
    );
    assert!(
        redelivered > 0,
        "{}: the consumer crashes must cause redeliveries",
        broker.name()
    );
    t.cleanup().await;
}

/// The chain's second consumer, on its own durable over the consumer's emitted events.
async fn start_ledger(
    t: &TestDb,
    broker: &Broker,
) -> (
    tokio::task::JoinHandle<seaorm_outbox::Result<seaorm_outbox::inbox::ConsumerStats>>,
    CancellationToken,
) {
    let Broker::Nats { url, stream } = broker else {
        panic!("the chain runs on NATS");
    };
    t.db.execute_unprepared(
        "CREATE TABLE ledger (ord BIGSERIAL PRIMARY KEY, message_id TEXT NOT NULL, \
         agg TEXT NOT NULL, seq BIGINT NOT NULL)",
    )
    .await
    .expect("ledger table");
    let client = async_nats::connect(url.as_str()).await.expect("nats");
    let source = NatsSource::new(async_nats::jetstream::new(client), stream, "ledger")
        .filter_subject(format!("{stream}.invoice"));
    let consumer = Consumer::builder(t.connect_again().await, "ledger", Ledger)
        .config(ConsumerConfig::default().batch_size(32))
        .build()
        .expect("ledger");
    let stop = CancellationToken::new();
    let token = stop.clone();
    (
        tokio::spawn(async move { consumer.run(source, token).await }),
        stop,
    )
}

/// The consumer emitted one event per message it applied, never one per delivery, and the
/// ledger applied each once.
///
/// The ledger's per-aggregate order is counted and printed, not asserted: the relay can publish
/// an aggregate's later event first when an earlier one's transaction commits behind the
/// claim's start key (a consumer batch outlasting the relay's batches), a known gap in the
/// owned-partitions claim left to its issue (28). The first consumer's order is asserted above.
async fn check_ledger(t: &TestDb) {
    assert_eq!(
        t.scalar("SELECT COUNT(*) FROM outbox_events WHERE aggregate_type = 'invoice'")
            .await,
        EVENTS as i64,
        "one emitted event per applied message, whatever the redeliveries"
    );
    assert_eq!(
        t.scalar("SELECT COUNT(*) FROM ledger").await,
        EVENTS as i64,
        "each emitted event applied once"
    );
    let rows =
        t.db.query_all_raw(Statement::from_string(
            t.db.get_database_backend(),
            "SELECT agg, seq FROM ledger ORDER BY ord",
        ))
        .await
        .expect("ledger");
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut out_of_order = 0usize;
    for r in rows {
        let agg: String = r.try_get("", "agg").expect("agg");
        let seq: i64 = r.try_get("", "seq").expect("seq");
        if last.insert(agg, seq).is_some_and(|p| p >= seq) {
            out_of_order += 1;
        }
    }
    eprintln!(
        "chain: {EVENTS} invoice events emitted once and applied once; {out_of_order} applied out of their aggregate's order (relay, issue 28)"
    );
}

fn read_lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn end_to_end_through_nats_jetstream() {
    let (broker, scratch) = Scratch::nats("e2e_").await;
    end_to_end(broker, 1, false).await;
    scratch.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn end_to_end_through_nats_jetstream_in_batch_mode() {
    let (broker, scratch) = Scratch::nats("e2eb_").await;
    end_to_end(broker, 32, false).await;
    scratch.remove().await;
}

/// The consumer that publishes, end to end: order events → relay → consumer (aborted twice)
/// → an invoice event per order through its outbox → relay → a second consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn end_to_end_through_nats_jetstream_in_batch_mode_emitting_to_a_second_consumer() {
    let (broker, scratch) = Scratch::nats("e2ec_").await;
    end_to_end(broker, 32, true).await;
    scratch.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn end_to_end_through_rabbitmq() {
    let (broker, scratch) = Scratch::rabbitmq("e2e_").await;
    end_to_end(broker, 1, false).await;
    scratch.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn end_to_end_through_rabbitmq_in_batch_mode() {
    let (broker, scratch) = Scratch::rabbitmq("e2eb_").await;
    end_to_end(broker, 32, false).await;
    scratch.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn end_to_end_through_redis_streams() {
    let (broker, scratch) = Scratch::redis("e2e_");
    end_to_end(broker, 1, false).await;
    scratch.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn end_to_end_through_redis_streams_in_batch_mode() {
    let (broker, scratch) = Scratch::redis("e2eb_");
    end_to_end(broker, 32, false).await;
    scratch.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn end_to_end_through_kafka() {
    let (broker, scratch) = Scratch::kafka(3, "e2e-events", 4);
    end_to_end(broker, 1, false).await;
    scratch.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn end_to_end_through_kafka_in_batch_mode() {
    let (broker, scratch) = Scratch::kafka(3, "e2eb-events", 4);
    end_to_end(broker, 32, false).await;
    scratch.remove().await;
}

/// Two instances of one logical consumer, each on its own durable of the same stream, so each
/// is handed every message at about the same time: for each message exactly one applies it and
/// the other sees a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_given_the_same_messages_in_parallel_apply_each_once() {
    let t = TestDb::new(Backend::Postgres).await;
    t.db.execute_unprepared(
        "CREATE TABLE effects (ord BIGSERIAL PRIMARY KEY, message_id TEXT NOT NULL, \
         agg TEXT NOT NULL, seq BIGINT NOT NULL)",
    )
    .await
    .expect("effects");
    let (_, js, stream) = nats_stream("e2e_dup_").await;
    let n = 300u64;
    for i in 0..n {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("event-id", Uuid::now_v7().to_string().as_str());
        headers.insert("aggregate-id", format!("a{}", i % 20).as_str());
        let body = serde_json::to_vec(&Payload {
            agg: format!("a{}", i % 20),
            seq: (i / 20) as i64,
        })
        .expect("json");
        js.publish_with_headers(format!("{stream}.e"), headers, body.into())
            .await
            .expect("publish")
            .await
            .expect("ack");
    }
    let config = ConsumerConfig::default()
        .concurrency(8)
        .max_attempts(30)
        .retry_backoff(Duration::from_millis(5))
        .max_retry_backoff(Duration::from_millis(50));
    let a = Arc::new(
        Consumer::builder(t.db.clone(), "ledger", Effects)
            .config(config.clone())
            .build()
            .expect("a"),
    );
    let b = Arc::new(
        Consumer::builder(t.connect_again().await, "ledger", Effects)
            .config(config)
            .build()
            .expect("b"),
    );
    let stop = CancellationToken::new();
    let run = |c: Arc<Consumer<Effects>>, durable: &str| {
        let source = NatsSource::new(js.clone(), stream.clone(), durable);
        let stop = stop.clone();
        tokio::spawn(async move { c.run(source, stop).await })
    };
    let (ra, rb) = (
        run(Arc::clone(&a), "ledger_a"),
        run(Arc::clone(&b), "ledger_b"),
    );
    let limit = Instant::now() + Duration::from_secs(60);
    loop {
        let (sa, sb) = (a.stats(), b.stats());
        if sa.applied + sa.duplicates >= n && sb.applied + sb.duplicates >= n {
            break;
        }
        assert!(Instant::now() < limit, "stuck: {sa:?} {sb:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    let (sa, sb) = (
        ra.await.expect("join").expect("a ran"),
        rb.await.expect("join").expect("b ran"),
    );
    assert_eq!(sa.applied + sb.applied, n, "{sa:?} {sb:?}");
    assert_eq!(sa.duplicates + sb.duplicates, n, "{sa:?} {sb:?}");
    eprintln!("parallel copies: instance a {sa:?}, instance b {sb:?}");
    assert_eq!(t.scalar("SELECT COUNT(*) FROM effects").await, n as i64);
    assert_eq!(
        t.scalar("SELECT COUNT(DISTINCT message_id) FROM effects")
            .await,
        n as i64
    );
    js.delete_stream(&stream).await.expect("delete stream");
    t.cleanup().await;
}
