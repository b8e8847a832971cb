//! `HandlerError::retry_after` on each real broker: the message is applied no earlier than the
//! delay asked for, nothing of the refused attempt is kept, and where it waits:
//! - a message with an ordering key is held by the consumer on every source, its key's later
//!   messages behind it and other keys going on;
//! - a message without one is handed back to NATS JetStream (`NakWithDelay`), and a handler that
//!   keeps asking ends as a dead letter after `max_attempts`, counted across deliveries;
//! - a Redis entry held longer than another instance's `claim_idle` is not taken by it.
#![cfg(all(
    feature = "kafka",
    feature = "nats",
    feature = "rabbitmq",
    feature = "redis"
))]

mod common;
#[path = "support/scratch.rs"]
mod scratch;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::{Backend, TestDb};
use scratch::{Broker, Scratch, unique};
use sea_orm::{ConnectionTrait, DatabaseTransaction, Statement};
use seaorm_outbox::broker::kafka::KafkaSource;
use seaorm_outbox::broker::nats::NatsSource;
use seaorm_outbox::broker::rabbitmq::RabbitMqSource;
use seaorm_outbox::broker::redis::RedisSource;
use seaorm_outbox::inbox::{
    Consumer, ConsumerConfig, ConsumerStats, Handler, HandlerError, Incoming, OrderingKey,
};
use tokio_util::sync::CancellationToken;

const DELAY: Duration = Duration::from_millis(1500);

/// What the handler saw of one message: each call's attempt, deliveries and time.
#[derive(Clone, Debug)]
struct Call {
    attempt: u32,
    deliveries: u32,
    at: Instant,
}

#[derive(Clone)]
struct Later {
    /// What it asks for.
    delay: Duration,
    /// Each call by message (its `n` header): `later-*` asks for `delay` on its first call,
    /// `always*` every time.
    calls: Arc<Mutex<HashMap<String, Vec<Call>>>>,
    applied: Arc<Mutex<Vec<(String, Instant)>>>,
}

impl Later {
    fn new(delay: Duration) -> Self {
        Self {
            delay,
            calls: Arc::default(),
            applied: Arc::default(),
        }
    }

    fn calls(&self, n: &str) -> Vec<Call> {
        self.calls
            .lock()
            .expect("lock")
            .get(n)
            .cloned()
            .unwrap_or_default()
    }

    fn applied(&self) -> Vec<(String, Instant)> {
        self.applied.lock().expect("lock").clone()
    }
}

#[async_trait]
impl Handler for Later {
    async fn handle(&self, txn: &DatabaseTransaction, msg: &Incoming) -> Result<(), HandlerError> {
        let n = msg.header("n").unwrap_or_default().to_owned();
        let first = {
            let mut calls = self.calls.lock().expect("lock");
            let mine = calls.entry(n.clone()).or_default();
            mine.push(Call {
                attempt: msg.attempt,
                deliveries: msg.deliveries,
                at: Instant::now(),
            });
            mine.len() == 1
        };
        // A write the refused attempt must not leave behind.
        txn.execute_raw(Statement::from_string(
            txn.get_database_backend(),
            format!("INSERT INTO effects (n) VALUES ('{n}')"),
        ))
        .await?;
        if n.starts_with("always") || (first && n.starts_with("later")) {
            return Err(HandlerError::retry_after(self.delay));
        }
        self.applied.lock().expect("lock").push((n, Instant::now()));
        Ok(())
    }
}

fn message(n: &str, key: Option<&str>) -> (Vec<(String, String)>, Vec<u8>) {
    let mut headers = vec![
        ("event-id".to_owned(), unique("e")),
        ("n".to_owned(), n.to_owned()),
    ];
    if let Some(key) = key {
        headers.push(("aggregate-id".to_owned(), key.to_owned()));
    }
    (headers, b"{}".to_vec())
}

async fn setup() -> TestDb {
    let t = TestDb::new(Backend::Postgres).await;
    t.db.execute_unprepared("CREATE TABLE effects (n VARCHAR(64) NOT NULL)")
        .await
        .expect("effects");
    t
}

/// Runs `consumer` on `broker` as instance `instance` until `stop`.
async fn run(
    consumer: Arc<Consumer<Later>>,
    broker: Broker,
    instance: &str,
    claim_idle: Duration,
    stop: CancellationToken,
) -> ConsumerStats {
    let name = consumer.name().to_owned();
    let ran = match broker {
        Broker::Nats { url, stream } => {
            let js = async_nats::jetstream::new(async_nats::connect(url).await.expect("nats"));
            consumer.run(NatsSource::new(js, stream, name), stop).await
        }
        Broker::RabbitMq { uri, queue } => {
            consumer.run(RabbitMqSource::new(uri, queue), stop).await
        }
        Broker::Redis { url, stream } => {
            let client = redis::Client::open(url).expect("redis");
            let source = RedisSource::new(client, stream, name)
                .instance(instance)
                .claim_idle(claim_idle);
            consumer.run(source, stop).await
        }
        Broker::Kafka { bootstrap, topic } => {
            let mut config = rdkafka::ClientConfig::new();
            config
                .set("bootstrap.servers", &bootstrap)
                .set("group.id", &name)
                .set("auto.offset.reset", "earliest");
            consumer
                .run(KafkaSource::from_config(config, &[&topic]), stop)
                .await
        }
    };
    ran.expect("consumer ran")
}

fn consumer(t: &TestDb, h: &Later, config: ConsumerConfig) -> Arc<Consumer<Later>> {
    Arc::new(
        Consumer::builder(t.db.clone(), "later", h.clone())
            .config(config)
            .build()
            .expect("consumer"),
    )
}

/// Starts `c` on `broker` as instance "one": its stop token and its task.
fn start(
    c: &Arc<Consumer<Later>>,
    broker: &Broker,
) -> (CancellationToken, tokio::task::JoinHandle<ConsumerStats>) {
    let stop = CancellationToken::new();
    let task = tokio::spawn(run(
        Arc::clone(c),
        broker.clone(),
        "one",
        Duration::from_secs(60),
        stop.clone(),
    ));
    (stop, task)
}

/// Batch mode, its batches given time to fill so the messages meet in one.
fn batched() -> ConsumerConfig {
    ConsumerConfig::default()
        .batch_size(16)
        .max_batch_delay(Duration::from_millis(50))
}

async fn wait_for(h: &Later, applied: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while h.applied().len() < applied {
        assert!(Instant::now() < deadline, "applied only {:?}", h.applied());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `later-1` asks for `DELAY` on its first call; `next-2` of the same key must wait behind it;
/// `other` of another key must not.
async fn a_keyed_message_is_held_with_its_key_behind_it(
    broker: Broker,
    scratch: Scratch,
    config: ConsumerConfig,
) {
    let t = setup().await;
    let h = Later::new(DELAY);
    let c = consumer(&t, &h, config);
    let (stop, task) = start(&c, &broker);
    broker
        .send_raw(vec![
            message("later-1", Some("a")),
            message("next-2", Some("a")),
            message("other", Some("b")),
        ])
        .await;
    wait_for(&h, 3).await;
    stop.cancel();
    let stats = task.await.expect("task");

    let order: Vec<String> = h.applied().into_iter().map(|(n, _)| n).collect();
    assert_eq!(order, ["other", "later-1", "next-2"], "{}", broker.name());
    let calls = h.calls("later-1");
    assert_eq!(calls.len(), 2, "{calls:?}");
    let waited = h.applied()[1].1 - calls[0].at;
    assert!(waited >= DELAY, "applied {waited:?} after the refusal");
    assert!(waited < DELAY * 4, "held {waited:?}, far over {DELAY:?}");
    assert_eq!(calls[1].attempt, 2);
    assert_eq!(h.calls("next-2").len(), 1, "held behind, never refused");
    assert_eq!((stats.applied, stats.retries, stats.deferred), (3, 1, 0));
    assert_eq!(stats.dead_lettered, 0);
    // One effect per message: the refused attempt's write was rolled back.
    assert_eq!(t.scalar("SELECT COUNT(*) FROM effects").await, 3);
    assert_eq!(
        t.scalar("SELECT COUNT(*) FROM effects WHERE n = 'later-1'")
            .await,
        1
    );
    scratch.remove().await;
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_after_holds_a_keyed_message_on_nats() {
    let (broker, scratch) = Scratch::nats("later").await;
    a_keyed_message_is_held_with_its_key_behind_it(broker, scratch, ConsumerConfig::default())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_after_holds_a_keyed_message_on_rabbitmq() {
    let (broker, scratch) = Scratch::rabbitmq("later").await;
    a_keyed_message_is_held_with_its_key_behind_it(broker, scratch, ConsumerConfig::default())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_after_holds_a_keyed_message_on_redis() {
    let (broker, scratch) = Scratch::redis("later");
    a_keyed_message_is_held_with_its_key_behind_it(broker, scratch, ConsumerConfig::default())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_after_holds_a_keyed_message_on_kafka() {
    let (broker, scratch) = Scratch::kafka(1, &unique("later"), 1);
    a_keyed_message_is_held_with_its_key_behind_it(broker, scratch, ConsumerConfig::default())
        .await;
}

/// In batch mode the refused message leaves the batch and waits the delay asked, not the
/// backoff; the rest of the batch is applied at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_after_holds_a_keyed_message_in_batch_mode_on_nats() {
    let (broker, scratch) = Scratch::nats("later").await;
    a_keyed_message_is_held_with_its_key_behind_it(broker, scratch, batched()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_after_holds_a_keyed_message_in_batch_mode_on_redis() {
    let (broker, scratch) = Scratch::redis("later");
    a_keyed_message_is_held_with_its_key_behind_it(broker, scratch, batched()).await;
}

/// Without an ordering key NATS gets the message back with the delay: it comes again as a
/// second delivery. One that always asks is dead-lettered after `max_attempts` calls in all,
/// one per delivery.
async fn an_unkeyed_message_is_handed_back_to_nats(config: ConsumerConfig) {
    let (broker, scratch) = Scratch::nats("later").await;
    let t = setup().await;
    let h = Later::new(DELAY);
    let config = config.ordering(OrderingKey::none()).max_attempts(3);
    let c = consumer(&t, &h, config);
    let (stop, task) = start(&c, &broker);
    broker
        .send_raw(vec![message("later-x", None), message("always", None)])
        .await;
    wait_for(&h, 1).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.stats().dead_lettered < 1 {
        assert!(Instant::now() < deadline, "{:?}", c.stats());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    let stats = task.await.expect("task");

    let calls = h.calls("later-x");
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(
        (calls[0].deliveries, calls[1].deliveries),
        (1, 2),
        "came back from the broker"
    );
    assert_eq!(calls[1].attempt, 2);
    let waited = h.applied()[0].1 - calls[0].at;
    assert!(waited >= DELAY, "redelivered after {waited:?}");

    let always = h.calls("always");
    let attempts: Vec<(u32, u32)> = always.iter().map(|c| (c.attempt, c.deliveries)).collect();
    assert_eq!(
        attempts,
        [(1, 1), (2, 2), (3, 3)],
        "one attempt per delivery"
    );
    assert_eq!(stats.deferred, 3, "later-x once, always twice");
    assert_eq!((stats.applied, stats.dead_lettered), (1, 1));
    assert_eq!(t.scalar("SELECT COUNT(*) FROM inbox_dead_letters").await, 1);
    assert_eq!(t.scalar("SELECT COUNT(*) FROM effects").await, 1);
    scratch.remove().await;
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_after_without_a_key_hands_the_message_back_to_nats() {
    an_unkeyed_message_is_handed_back_to_nats(ConsumerConfig::default()).await;
}

/// The same from a batch: the delivery count decides the attempt, so the last delivery's
/// refusal is the dead letter, and each earlier one is handed back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_after_without_a_key_hands_the_message_back_to_nats_in_batch_mode() {
    an_unkeyed_message_is_handed_back_to_nats(batched()).await;
}

/// A Redis entry held for longer than another instance's `claim_idle` stays with its holder:
/// the held message keeps its idle time reset, so the other's `XAUTOCLAIM` does not take it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_held_redis_entry_is_not_claimed_by_another_instance() {
    let (broker, scratch) = Scratch::redis("later");
    let t = setup().await;
    // Held 5 s; the other instance claims what idles 2.5 s.
    let held = Duration::from_secs(5);
    let h = Later::new(held);
    let config = ConsumerConfig::default();
    let first = consumer(&t, &h, config.clone());
    let stop = CancellationToken::new();
    let idle = Duration::from_millis(2500);
    let a = tokio::spawn(run(first, broker.clone(), "a", idle, stop.clone()));
    broker.send_raw(vec![message("later-held", None)]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while h.calls("later-held").is_empty() {
        assert!(Instant::now() < deadline, "never received");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The second instance starts once the first holds the entry: it can only claim it.
    let second = consumer(&t, &h, config);
    let b = tokio::spawn(run(second, broker.clone(), "b", idle, stop.clone()));
    wait_for(&h, 1).await;
    // Let the second instance look again after the apply, in case it took a copy.
    tokio::time::sleep(idle * 2).await;
    stop.cancel();
    let (a, b) = (a.await.expect("a"), b.await.expect("b"));

    let calls = h.calls("later-held");
    assert_eq!(calls.len(), 2, "taken by the other instance: {calls:?}");
    let waited = h.applied()[0].1 - calls[0].at;
    assert!(waited >= held, "applied {waited:?} after the refusal");
    assert_eq!((a.applied, b.applied, b.duplicates), (1, 0, 0));
    scratch.remove().await;
    t.cleanup().await;
}
