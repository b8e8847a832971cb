//! Each broker publisher against its real server: NATS JetStream, RabbitMQ and Redis on this
//! machine, Kafka through librdkafka's in-process mock cluster (a real Kafka-protocol broker).
//!
//! For each: a relay drains 5,000 events from PostgreSQL; a consumer reads them back and checks
//! count, payload bytes, headers and per-aggregate order; an outage (a proxy cut, or the mock's
//! brokers taken down) longer than the whole retry horizon opens the relay's breaker, spends no
//! attempt and dead-letters nothing, and every event arrives in order after recovery; and a
//! permanent error dead-letters only the event that caused it.
#![cfg(any(
    feature = "kafka",
    feature = "nats",
    feature = "rabbitmq",
    feature = "redis"
))]

mod common;
mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::TestDb;
use seaorm_outbox::relay::{BreakerConfig, BreakerState, Ordering, RelayConfig};
use seaorm_outbox::{
    HealthStatus, HealthThresholds, NewEvent, Outbox, OutboxConfig, OutboxEvent, OutboxRepository,
    OutboxStatus, Publisher,
};
use support::{
    all_rows, fast, pending, run_relays_until_empty, scattered_events, seed, wait_until,
};
use uuid::Uuid;

const EVENTS: usize = 5_000;

/// One message as a consumer saw it.
struct Got {
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

/// Every stored event arrived once, with its payload bytes and headers, in aggregate order.
fn check(got: &[Got], sent: &[OutboxEvent]) {
    assert_eq!(got.len(), sent.len(), "message count");
    let by_id: HashMap<String, &OutboxEvent> = sent.iter().map(|e| (e.id.to_string(), e)).collect();
    let mut seen = std::collections::HashSet::new();
    let mut last_seq: HashMap<&str, u64> = HashMap::new();
    for g in got {
        let h = |name: &str| {
            g.headers
                .get(name)
                .map(String::as_str)
                .unwrap_or_else(|| panic!("header {name} missing: {:?}", g.headers))
        };
        let id = h("event-id");
        let e = by_id
            .get(id)
            .unwrap_or_else(|| panic!("unknown event {id}"));
        assert!(seen.insert(id.to_owned()), "event {id} arrived twice");
        assert_eq!(
            g.body,
            serde_json::to_vec(&e.payload).expect("json"),
            "payload bytes of {id}"
        );
        assert_eq!(h("event-type"), e.event_type);
        assert_eq!(h("aggregate-type"), e.aggregate_type);
        assert_eq!(h("aggregate-id"), e.aggregate_id);
        assert_eq!(
            h("occurred-at"),
            e.occurred_at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        );
        assert_eq!(h("content-type"), "application/json");
        assert_eq!(
            Some(h("correlation-id")),
            e.headers.get("correlation-id").map(String::as_str)
        );
        let seq = e.payload["seq"].as_u64().expect("seq");
        let prev = last_seq.insert(e.aggregate_id.as_str(), seq).unwrap_or(0);
        assert_eq!(seq, prev + 1, "aggregate {} out of order", e.aggregate_id);
    }
}

/// Drains `EVENTS` events through `publisher` with two relays and returns what was stored.
async fn drain_all<P: Publisher + Clone + 'static>(t: &TestDb, publisher: P) -> Vec<OutboxEvent> {
    seed(&t.db, scattered_events(EVENTS, 50)).await;
    let stats = run_relays_until_empty(
        t,
        2,
        publisher,
        fast(RelayConfig::default().batch_size(500)),
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(
        stats.iter().map(|s| s.published).sum::<u64>(),
        EVENTS as u64,
        "{stats:?}"
    );
    all_rows(&t.db).await
}

/// Runs one relay with the broker unreachable for longer than the whole retry horizon
/// (`max_attempts` × the backoff cap), then restores it. During the outage the breaker opens,
/// health turns degraded then unhealthy, and no attempt is spent; after it every event is
/// delivered with 0 attempts and 0 dead letters. `cut`/`restore` act on the broker. Returns the
/// stored events.
async fn outage<P: Publisher + Clone + 'static>(
    t: &TestDb,
    publisher: P,
    cut: impl FnOnce(),
    restore: impl FnOnce(),
    config: RelayConfig,
) -> Vec<OutboxEvent> {
    let ids = seed(&t.db, scattered_events(200, 20)).await;
    let name = publisher.name().to_owned();
    cut();
    let started = std::time::Instant::now();
    let (relay, stop, task) = run_until_the_breaker_opens(t, publisher, config.clone()).await;
    let thresholds = HealthThresholds::default().max_publisher_outage(Duration::from_secs(5));
    let early = relay.health(&thresholds).await;
    let says_unavailable =
        |h: &seaorm_outbox::Health| h.reasons.iter().any(|r| r.contains("unavailable"));
    assert!(says_unavailable(&early), "{early:?}");
    let horizon = config.backoff.cap * config.max_attempts;
    tokio::time::sleep(horizon + Duration::from_secs(2)).await;
    let late = relay.health(&thresholds).await;
    assert_eq!(late.status, HealthStatus::Unhealthy, "{late:?}");
    assert!(says_unavailable(&late), "{late:?}");
    let during = all_rows(&t.db).await;
    assert_eq!(during.len(), ids.len());
    assert!(
        during
            .iter()
            .all(|e| e.status == OutboxStatus::Pending && e.attempts == 0),
        "the outage spent no attempt and dead-lettered nothing"
    );
    let outage_secs = started.elapsed().as_secs_f64();
    restore();
    wait_until(
        Duration::from_secs(90),
        "delivery after recovery",
        || async { pending(&t.db).await == 0 },
    )
    .await;
    assert_eq!(relay.breaker().state, BreakerState::Closed);
    assert_ne!(
        relay.health(&thresholds).await.status,
        HealthStatus::Unhealthy
    );
    stop.cancel();
    let stats = task.await.expect("relay");
    assert_eq!(stats.published, ids.len() as u64, "{stats:?}");
    assert_eq!((stats.retried, stats.dead_lettered), (0, 0), "{stats:?}");
    let stored = all_rows(&t.db).await;
    assert!(
        stored
            .iter()
            .all(|e| e.status == OutboxStatus::Published && e.attempts == 0)
    );
    eprintln!(
        "outage figures ({name}): {} events, broker down {outage_secs:.1}s (retry horizon {horizon:?}), \
         attempts spent 0, dead letters 0, delivered {}",
        ids.len(),
        stats.published
    );
    stored
}

/// A running relay (its handle, stop token and task) once it has found the broker unavailable.
async fn run_until_the_breaker_opens<P: Publisher + 'static>(
    t: &TestDb,
    publisher: P,
    config: RelayConfig,
) -> (
    Arc<seaorm_outbox::Relay<P>>,
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<seaorm_outbox::RelayStats>,
) {
    let relay = Arc::new(
        seaorm_outbox::Relay::builder(t.connect_again().await, publisher)
            .config(config)
            .build()
            .expect("relay"),
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn({
        let (relay, stop) = (relay.clone(), stop.clone());
        async move { relay.run(stop).await }
    });
    wait_until(Duration::from_secs(60), "the breaker to open", || async {
        relay.breaker().state != BreakerState::Closed
    })
    .await;
    (relay, stop, task)
}

/// Outage runs keep the default `max_attempts` with the timing shrunk: backoff 100 ms to 1 s
/// (so the retry horizon is 10 s), the breaker's probes 100 ms to 1 s apart.
fn outage_config() -> RelayConfig {
    fast(RelayConfig::default().batch_size(50))
        .publish_timeout(Duration::from_secs(3))
        .lease_duration(Duration::from_secs(10))
        .backoff(seaorm_outbox::relay::Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(1),
        ))
        .breaker(
            BreakerConfig::default()
                .base(Duration::from_millis(100))
                .cap(Duration::from_secs(1)),
        )
}

/// Seeds `n` ordinary events and one `poison` event, drains, and checks only the poison one
/// was dead-lettered, at its first attempt.
async fn only_the_bad_event_is_dead_lettered<P: Publisher + Clone + 'static>(
    t: &TestDb,
    publisher: P,
    poison: NewEvent,
) {
    let good = seed(&t.db, scattered_events(20, 5)).await;
    let bad = Outbox::with_config(
        &t.db,
        OutboxConfig::default().max_payload_bytes(4 * 1024 * 1024),
    )
    .add_event(poison)
    .await
    .expect("add the bad event");
    let relay = seaorm_outbox::Relay::builder(t.db.clone(), publisher)
        .config(fast(RelayConfig::default().ordering(Ordering::Unordered)))
        .build()
        .expect("relay");
    let stats = relay.drain().await.expect("drain");
    assert_eq!(stats.dead_lettered, 1, "{stats:?}");
    assert_eq!(stats.published, good.len() as u64, "{stats:?}");
    let dead = Outbox::new(&t.db).get(bad).await.expect("get");
    assert_eq!(dead.status, OutboxStatus::Failed);
    assert_eq!(dead.attempts, 1);
    assert!(dead.last_error.is_some());
}

fn big_event(bytes: usize) -> NewEvent {
    NewEvent::new("test.big", "agg", "big")
        .payload(&serde_json::json!({ "blob": "x".repeat(bytes) }))
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn unique(prefix: &str) -> String {
    format!("{prefix}{}", Uuid::now_v7().simple())
}

#[cfg(feature = "nats")]
mod nats {
    use super::*;
    use async_nats::jetstream;
    use seaorm_outbox::broker::nats::NatsPublisher;
    use seaorm_outbox::wire::Router;

    on_backends!(
        [postgres: Postgres] =>
        relay_drains_5000_events_to_jetstream,
        a_republished_batch_is_stored_once,
        outage_then_recovery,
        poison_during_an_outage_is_dead_lettered_alone_after_recovery,
        oversized_message_is_dead_lettered_alone,
        cloudevents_binary_mode_uses_ce_headers,
    );

    fn addr() -> String {
        env_or("OUTBOX_TEST_NATS_ADDR", "127.0.0.1:4222")
    }

    async fn client(addr: &str) -> async_nats::Client {
        async_nats::connect(format!("nats://{addr}"))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "NATS at {addr} is not reachable; start it or set OUTBOX_TEST_NATS_ADDR: {e}"
                )
            })
    }

    /// A fresh stream over `<name>.>` and a publisher that routes into it.
    async fn stream(client: &async_nats::Client) -> (String, jetstream::stream::Stream) {
        let name = unique("outbox_");
        let js = jetstream::new(client.clone());
        let stream = js
            .create_stream(jetstream::stream::Config {
                name: name.clone(),
                subjects: vec![format!("{name}.>")],
                ..Default::default()
            })
            .await
            .expect("create stream");
        (name, stream)
    }

    fn publisher(client: async_nats::Client, stream: &str) -> NatsPublisher {
        NatsPublisher::new(client).router(Router::prefixed(format!("{stream}.")))
    }

    async fn read_all(stream: &jetstream::stream::Stream) -> Vec<Got> {
        let count = stream.get_info().await.expect("info").state.messages;
        let mut got = Vec::new();
        for seq in 1..=count {
            let m = stream.get_raw_message(seq).await.expect("message");
            let headers = [
                "event-id",
                "event-type",
                "aggregate-type",
                "aggregate-id",
                "occurred-at",
                "content-type",
                "correlation-id",
                "Nats-Msg-Id",
            ]
            .iter()
            .filter_map(|k| {
                m.headers
                    .get(*k)
                    .map(|v| ((*k).to_owned(), v.as_str().to_owned()))
            })
            .collect();
            got.push(Got {
                headers,
                body: m.payload.to_vec(),
            });
        }
        got
    }

    async fn cleanup(client: &async_nats::Client, name: &str) {
        jetstream::new(client.clone())
            .delete_stream(name)
            .await
            .expect("delete stream");
    }

    async fn relay_drains_5000_events_to_jetstream(t: &TestDb) {
        let c = client(&addr()).await;
        let (name, stream) = stream(&c).await;
        let sent = drain_all(t, publisher(c.clone(), &name)).await;
        let got = read_all(&stream).await;
        check(&got, &sent);
        assert!(
            got.iter()
                .all(|g| g.headers.get("Nats-Msg-Id") == g.headers.get("event-id"))
        );
        cleanup(&c, &name).await;
    }

    async fn a_republished_batch_is_stored_once(t: &TestDb) {
        let c = client(&addr()).await;
        let (name, stream) = stream(&c).await;
        seed(&t.db, scattered_events(300, 10)).await;
        let events = Outbox::new(&t.db)
            .get_unpublished(300, 0)
            .await
            .expect("events");
        let p = publisher(c.clone(), &name);
        for _ in 0..2 {
            let outcomes = p.publish(&events).await.expect("publish");
            assert!(
                outcomes
                    .iter()
                    .all(|o| *o == seaorm_outbox::PublishOutcome::Delivered)
            );
        }
        assert_eq!(
            stream.get_info().await.expect("info").state.messages,
            300,
            "duplicates were dropped"
        );
        cleanup(&c, &name).await;
    }

    /// A client that reaches the server through `proxy`, reconnecting by itself.
    async fn through(proxy: &common::proxy::Proxy) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(format!("nats://{}", proxy.addr))
            .await
            .expect("connect through the proxy")
    }

    async fn outage_then_recovery(t: &TestDb) {
        let direct = client(&addr()).await;
        let (name, stream) = stream(&direct).await;
        let proxy = common::proxy::Proxy::start(&addr()).await;
        let via_proxy = through(&proxy).await;
        let p = publisher(via_proxy, &name);
        let sent = outage(t, p, || proxy.cut(), || proxy.restore(), outage_config()).await;
        let got = read_all(&stream).await;
        // Acks lost in the cut can make the relay send again; the stream's dedup window keeps one.
        check(&got, &sent);
        cleanup(&direct, &name).await;
    }

    /// An event whose subject no stream takes (retryable `no responders`) waits out an outage
    /// like every other, spending nothing; once the server is back it alone uses up its
    /// `max_attempts` and is dead-lettered, and the rest arrive in order.
    async fn poison_during_an_outage_is_dead_lettered_alone_after_recovery(t: &TestDb) {
        let direct = client(&addr()).await;
        let (name, stream) = stream(&direct).await;
        let proxy = common::proxy::Proxy::start(&addr()).await;
        let via_proxy = through(&proxy).await;
        seed(&t.db, scattered_events(50, 5)).await;
        let poison = Outbox::new(&t.db)
            .add_event(NewEvent::new("test.poison", "agg", "poison"))
            .await
            .expect("add the poison event");
        let n = name.clone();
        let p = NatsPublisher::new(via_proxy).router(Router::new(move |e| {
            if e.aggregate_id == "poison" {
                format!("{n}_no_stream.poison")
            } else {
                format!("{n}.{}", e.aggregate_type)
            }
        }));
        proxy.cut();
        let config = outage_config();
        let (_relay, stop, task) = run_until_the_breaker_opens(t, p, config.clone()).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let held = Outbox::new(&t.db).get(poison).await.expect("get");
        assert_eq!((held.status, held.attempts), (OutboxStatus::Pending, 0));
        proxy.restore();
        wait_until(
            Duration::from_secs(90),
            "the good events delivered and the poison dead-lettered",
            || async { pending(&t.db).await == 0 },
        )
        .await;
        stop.cancel();
        let stats = task.await.expect("relay");
        assert_eq!((stats.published, stats.dead_lettered), (50, 1), "{stats:?}");
        let rows = all_rows(&t.db).await;
        let (dead, good): (Vec<_>, Vec<_>) = rows.into_iter().partition(|e| e.id == poison);
        assert_eq!(dead[0].status, OutboxStatus::Failed);
        assert_eq!(dead[0].attempts, config.max_attempts, "{:?}", dead[0]);
        assert!(
            good.iter()
                .all(|e| e.status == OutboxStatus::Published && e.attempts == 0)
        );
        check(&read_all(&stream).await, &good);
        cleanup(&direct, &name).await;
    }

    async fn cloudevents_binary_mode_uses_ce_headers(t: &TestDb) {
        use seaorm_outbox::wire::Envelope;
        let c = client(&addr()).await;
        let (name, stream) = stream(&c).await;
        let id = Outbox::new(&t.db)
            .add_event(
                NewEvent::new("order.placed", "order", "42")
                    .payload(&serde_json::json!({"n": 1}))
                    .header(
                        "traceparent",
                        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                    ),
            )
            .await
            .expect("add");
        let p = publisher(c.clone(), &name).envelope(Envelope::CloudEventsBinary {
            source: "/tests".into(),
        });
        let relay = seaorm_outbox::Relay::builder(t.db.clone(), p)
            .build()
            .expect("relay");
        assert_eq!(relay.drain().await.expect("drain").published, 1);
        let m = stream.get_raw_message(1).await.expect("message");
        let h = |k: &str| m.headers.get(k).map(|v| v.as_str().to_owned());
        assert_eq!(h("ce-specversion").as_deref(), Some("1.0"));
        assert_eq!(h("ce-id"), Some(id.to_string()));
        assert_eq!(h("ce-type").as_deref(), Some("order.placed"));
        assert_eq!(h("ce-source").as_deref(), Some("/tests"));
        assert_eq!(h("ce-subject").as_deref(), Some("42"));
        assert!(h("ce-time").is_some());
        assert_eq!(h("content-type").as_deref(), Some("application/json"));
        assert_eq!(
            h("traceparent").as_deref(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert_eq!(&m.payload[..], br#"{"n":1}"#);
        cleanup(&c, &name).await;
    }

    async fn oversized_message_is_dead_lettered_alone(t: &TestDb) {
        let c = client(&addr()).await;
        let (name, _stream) = stream(&c).await;
        let max = c.server_info().max_payload;
        only_the_bad_event_is_dead_lettered(t, publisher(c.clone(), &name), big_event(max + 1))
            .await;
        cleanup(&c, &name).await;
    }
}

#[cfg(feature = "redis")]
mod redis_streams {
    use super::*;
    use seaorm_outbox::broker::redis::RedisPublisher;
    use seaorm_outbox::wire::Router;

    on_backends!(
        [postgres: Postgres] =>
        relay_drains_5000_events_to_a_stream,
        outage_then_recovery,
        wrong_type_key_is_dead_lettered_alone,
        max_len_caps_the_stream,
        cloudevents_structured_mode_wraps_the_body,
    );

    fn addr() -> String {
        env_or("OUTBOX_TEST_REDIS_ADDR", "127.0.0.1:6379")
    }

    async fn connect(addr: &str) -> RedisPublisher {
        RedisPublisher::connect(&format!("redis://{addr}"))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "Redis at {addr} is not reachable; start it or set OUTBOX_TEST_REDIS_ADDR: {e}"
                )
            })
    }

    async fn conn() -> redis::aio::MultiplexedConnection {
        let mut conn = redis::Client::open(format!("redis://{}", addr()))
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        // Reading back thousands of entries while the other tests load both cores can outlast
        // the client's default response timeout.
        conn.set_response_timeout(Duration::from_secs(30));
        conn
    }

    async fn read_all(key: &str) -> Vec<Got> {
        let entries: Vec<(String, HashMap<String, Vec<u8>>)> = redis::cmd("XRANGE")
            .arg(key)
            .arg("-")
            .arg("+")
            .query_async(&mut conn().await)
            .await
            .expect("XRANGE");
        entries
            .into_iter()
            .map(|(_, mut fields)| {
                let body = fields
                    .remove(seaorm_outbox::publisher::redis::BODY_FIELD)
                    .expect("payload field");
                let headers = fields
                    .into_iter()
                    .map(|(k, v)| (k, String::from_utf8(v).expect("utf-8")))
                    .collect();
                Got { headers, body }
            })
            .collect()
    }

    async fn del(key: &str) {
        let _: () = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut conn().await)
            .await
            .expect("DEL");
    }

    async fn relay_drains_5000_events_to_a_stream(t: &TestDb) {
        let key = unique("outbox:");
        let p = connect(&addr()).await.router(Router::fixed(key.clone()));
        let sent = drain_all(t, p).await;
        check(&read_all(&key).await, &sent);
        del(&key).await;
    }

    async fn outage_then_recovery(t: &TestDb) {
        let key = unique("outbox:");
        let proxy = common::proxy::Proxy::start(&addr()).await;
        let p = connect(&proxy.addr.to_string())
            .await
            .router(Router::fixed(key.clone()));
        let sent = outage(t, p, || proxy.cut(), || proxy.restore(), outage_config()).await;
        // Replies lost in the cut can make the relay add an event again; consumers dedupe on
        // event-id, so check the unique set.
        let mut got = read_all(&key).await;
        let mut ids = std::collections::HashSet::new();
        got.retain(|g| ids.insert(g.headers["event-id"].clone()));
        check(&got, &sent);
        del(&key).await;
    }

    async fn wrong_type_key_is_dead_lettered_alone(t: &TestDb) {
        let key = unique("outbox:");
        let trap = unique("outbox:string:");
        let _: () = redis::cmd("SET")
            .arg(&trap)
            .arg("not a stream")
            .query_async(&mut conn().await)
            .await
            .expect("SET");
        let (k, tr) = (key.clone(), trap.clone());
        let p = connect(&addr()).await.router(Router::new(move |e| {
            if e.aggregate_id == "big" {
                tr.clone()
            } else {
                k.clone()
            }
        }));
        only_the_bad_event_is_dead_lettered(t, p, big_event(10)).await;
        del(&key).await;
        del(&trap).await;
    }

    async fn cloudevents_structured_mode_wraps_the_body(t: &TestDb) {
        use seaorm_outbox::wire::Envelope;
        let key = unique("outbox:");
        let id = Outbox::new(&t.db)
            .add_event(
                NewEvent::new("order.placed", "order", "42").payload(&serde_json::json!({"n": 1})),
            )
            .await
            .expect("add");
        let p = connect(&addr())
            .await
            .router(Router::fixed(key.clone()))
            .envelope(Envelope::CloudEventsStructured {
                source: "/tests".into(),
            });
        let relay = seaorm_outbox::Relay::builder(t.db.clone(), p)
            .build()
            .expect("relay");
        assert_eq!(relay.drain().await.expect("drain").published, 1);
        let got = read_all(&key).await;
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0].headers["content-type"],
            "application/cloudevents+json"
        );
        let ce: serde_json::Value = serde_json::from_slice(&got[0].body).expect("json");
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["id"], id.to_string());
        assert_eq!(ce["type"], "order.placed");
        assert_eq!(ce["source"], "/tests");
        assert_eq!(ce["datacontenttype"], "application/json");
        assert_eq!(ce["data"], serde_json::json!({"n": 1}));
        del(&key).await;
    }

    async fn max_len_caps_the_stream(t: &TestDb) {
        let key = unique("outbox:");
        let p = connect(&addr())
            .await
            .router(Router::fixed(key.clone()))
            .max_len(Some(10));
        seed(&t.db, scattered_events(1000, 10)).await;
        let relay = seaorm_outbox::Relay::builder(t.db.clone(), p)
            .build()
            .expect("relay");
        assert_eq!(relay.drain().await.expect("drain").published, 1000);
        let len: usize = redis::cmd("XLEN")
            .arg(&key)
            .query_async(&mut conn().await)
            .await
            .expect("XLEN");
        assert!(len < 1000, "approximate trimming kept {len}");
        del(&key).await;
    }
}

#[cfg(feature = "rabbitmq")]
mod rabbitmq {
    use super::*;
    use futures_util::StreamExt;
    use lapin::options::{BasicConsumeOptions, QueueDeclareOptions, QueueDeleteOptions};
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{Connection, ConnectionProperties};
    use seaorm_outbox::broker::rabbitmq::RabbitMqPublisher;
    use seaorm_outbox::wire::Router;

    on_backends!(
        [postgres: Postgres] =>
        relay_drains_5000_events_to_a_queue,
        outage_then_recovery,
        unroutable_message_is_dead_lettered_alone,
        interleaved_unroutable_messages_are_each_dead_lettered,
    );

    fn addr() -> String {
        env_or("OUTBOX_TEST_AMQP_ADDR", "127.0.0.1:5672")
    }

    fn uri(addr: &str) -> String {
        format!("amqp://guest:guest@{addr}/%2f")
    }

    async fn channel() -> lapin::Channel {
        let conn = Connection::connect(&uri(&addr()), ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "RabbitMQ at {} is not reachable; start it or set OUTBOX_TEST_AMQP_ADDR: {e}",
                    addr()
                )
            });
        conn.create_channel().await.expect("channel")
    }

    async fn queue(ch: &lapin::Channel) -> String {
        let name = unique("outbox_");
        ch.queue_declare(
            name.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare queue");
        name
    }

    async fn read_all(ch: &lapin::Channel, queue: &str, n: usize) -> Vec<Got> {
        let mut consumer = ch
            .basic_consume(
                queue.into(),
                "test".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let mut got = Vec::new();
        while got.len() < n {
            let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
                .await
                .expect("a message within 10 s")
                .expect("stream open")
                .expect("delivery");
            let headers: HashMap<String, String> = d
                .properties
                .headers()
                .as_ref()
                .map(|t| {
                    t.inner()
                        .iter()
                        .filter_map(|(k, v)| match v {
                            AMQPValue::LongString(s) => Some((
                                k.to_string(),
                                String::from_utf8_lossy(s.as_bytes()).into_owned(),
                            )),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            let message_id = d.properties.message_id().as_ref().map(|s| s.to_string());
            assert_eq!(
                message_id.as_ref(),
                headers.get("event-id"),
                "message_id is the event id"
            );
            assert_eq!(*d.properties.delivery_mode(), Some(2), "persistent");
            got.push(Got {
                headers,
                body: d.data,
            });
        }
        got
    }

    async fn delete(ch: &lapin::Channel, queue: &str) {
        ch.queue_delete(queue.into(), QueueDeleteOptions::default())
            .await
            .expect("delete queue");
    }

    async fn relay_drains_5000_events_to_a_queue(t: &TestDb) {
        let ch = channel().await;
        let q = queue(&ch).await;
        let sent = drain_all(
            t,
            std::sync::Arc::new(
                RabbitMqPublisher::new(uri(&addr())).router(Router::fixed(q.clone())),
            ),
        )
        .await;
        check(&read_all(&ch, &q, EVENTS).await, &sent);
        delete(&ch, &q).await;
    }

    async fn outage_then_recovery(t: &TestDb) {
        let ch = channel().await;
        let q = queue(&ch).await;
        let proxy = common::proxy::Proxy::start(&addr()).await;
        let p = std::sync::Arc::new(
            RabbitMqPublisher::new(uri(&proxy.addr.to_string())).router(Router::fixed(q.clone())),
        );
        let sent = outage(t, p, || proxy.cut(), || proxy.restore(), outage_config()).await;
        let mut got = read_all(&ch, &q, sent.len()).await;
        // Confirms lost in the cut can make the relay send again: dedupe on event-id.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut ids = std::collections::HashSet::new();
        got.retain(|g| ids.insert(g.headers["event-id"].clone()));
        check(&got, &sent);
        delete(&ch, &q).await;
    }

    /// A publisher routing to `q`, except the events whose aggregate id is `lost`: to a queue
    /// that does not exist.
    fn sending_nowhere(q: &str, lost: fn(&str) -> bool) -> std::sync::Arc<RabbitMqPublisher> {
        let nowhere = unique("no_such_queue_");
        let q = q.to_owned();
        std::sync::Arc::new(
            RabbitMqPublisher::new(uri(&addr())).router(Router::new(move |e| {
                if lost(&e.aggregate_id) {
                    nowhere.clone()
                } else {
                    q.clone()
                }
            })),
        )
    }

    async fn unroutable_message_is_dead_lettered_alone(t: &TestDb) {
        let ch = channel().await;
        let q = queue(&ch).await;
        let p = sending_nowhere(&q, |agg| agg == "big");
        only_the_bad_event_is_dead_lettered(t, p, big_event(10)).await;
        delete(&ch, &q).await;
    }

    /// The broker acks a run of messages at once (`multiple`) and sends the returns first: each
    /// return must be matched to its own event, not to whichever of the run lapin resolves
    /// first. Every 7th of 600 events, in batches of 200, goes nowhere; exactly those are
    /// dead-lettered, and exactly the others reach the queue.
    async fn interleaved_unroutable_messages_are_each_dead_lettered(t: &TestDb) {
        let ch = channel().await;
        let q = queue(&ch).await;
        let p = sending_nowhere(&q, |agg| agg.starts_with("lost"));
        let events = (0..600)
            .map(|i| {
                let agg = if i % 7 == 3 {
                    format!("lost-{i}")
                } else {
                    format!("kept-{i}")
                };
                NewEvent::new("test.event", "agg", agg).payload(&serde_json::json!({ "i": i }))
            })
            .collect();
        let ids = seed(&t.db, events).await;
        let lost: std::collections::HashSet<String> = ids
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 7 == 3)
            .map(|(_, id)| id.to_string())
            .collect();
        let relay = seaorm_outbox::Relay::builder(t.db.clone(), p)
            .config(fast(
                RelayConfig::default()
                    .ordering(Ordering::Unordered)
                    .batch_size(200),
            ))
            .build()
            .expect("relay");
        let stats = relay.drain().await.expect("drain");
        assert_eq!(stats.dead_lettered as usize, lost.len(), "{stats:?}");
        assert_eq!(stats.published as usize, 600 - lost.len(), "{stats:?}");
        let failed: std::collections::HashSet<String> = Outbox::new(&t.db)
            .list_failed(1000, 0)
            .await
            .expect("dead letters")
            .into_iter()
            .map(|e| e.id.to_string())
            .collect();
        let wrong: Vec<_> = failed.symmetric_difference(&lost).collect();
        assert!(
            wrong.is_empty(),
            "exactly the unroutable events are dead letters; these are not: {wrong:?}"
        );
        let got: std::collections::HashSet<String> = read_all(&ch, &q, 600 - lost.len())
            .await
            .into_iter()
            .map(|g| g.headers["event-id"].clone())
            .collect();
        assert!(got.is_disjoint(&lost));
        assert_eq!(got.len(), 600 - lost.len());
        delete(&ch, &q).await;
    }
}

#[cfg(feature = "kafka")]
mod kafka {
    use super::*;
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::{Headers, Message};
    use rdkafka::mocking::MockCluster;
    use seaorm_outbox::broker::kafka::KafkaPublisher;
    use seaorm_outbox::wire::Router;
    use std::sync::Arc;

    on_backends!(
        [postgres: Postgres] =>
        relay_drains_5000_events_to_a_topic,
        outage_then_recovery,
        oversized_message_is_dead_lettered_alone,
    );

    const TOPIC: &str = "outbox-events";

    fn cluster() -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
        let c = MockCluster::new(3).expect("mock cluster");
        c.create_topic(TOPIC, 4, 3).expect("topic");
        c
    }

    fn publisher(bootstrap: &str, timeout_ms: &str) -> Arc<KafkaPublisher> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", bootstrap)
            .set("message.timeout.ms", timeout_ms);
        Arc::new(
            KafkaPublisher::from_config(config)
                .expect("producer")
                .router(Router::fixed(TOPIC)),
        )
    }

    async fn read_all(bootstrap: &str, n: usize) -> Vec<Got> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", unique("g"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        consumer.subscribe(&[TOPIC]).expect("subscribe");
        let mut got = Vec::new();
        while got.len() < n {
            let m = tokio::time::timeout(Duration::from_secs(20), consumer.recv())
                .await
                .expect("a message within 20 s")
                .expect("message");
            let headers = m
                .headers()
                .map(|hs| {
                    hs.iter()
                        .filter_map(|h| {
                            Some((h.key.to_owned(), String::from_utf8(h.value?.to_vec()).ok()?))
                        })
                        .collect()
                })
                .unwrap_or_default();
            let g = Got {
                headers,
                body: m.payload().unwrap_or_default().to_vec(),
            };
            assert_eq!(
                m.key()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .as_ref(),
                g.headers.get("aggregate-id"),
                "keyed by aggregate"
            );
            got.push(g);
        }
        got
    }

    async fn relay_drains_5000_events_to_a_topic(t: &TestDb) {
        let c = cluster();
        let sent = drain_all(t, publisher(&c.bootstrap_servers(), "8000")).await;
        check(&read_all(&c.bootstrap_servers(), EVENTS).await, &sent);
    }

    async fn outage_then_recovery(t: &TestDb) {
        let c = cluster();
        let p = publisher(&c.bootstrap_servers(), "1000");
        let down = || (1..=3).for_each(|b| c.broker_down(b).expect("broker down"));
        let up = || (1..=3).for_each(|b| c.broker_up(b).expect("broker up"));
        let sent = outage(t, p, down, up, outage_config()).await;
        let mut got = read_all(&c.bootstrap_servers(), sent.len()).await;
        let mut ids = std::collections::HashSet::new();
        got.retain(|g| ids.insert(g.headers["event-id"].clone()));
        check(&got, &sent);
    }

    async fn oversized_message_is_dead_lettered_alone(t: &TestDb) {
        let c = cluster();
        // librdkafka's message.max.bytes defaults to 1,000,000.
        only_the_bad_event_is_dead_lettered(
            t,
            publisher(&c.bootstrap_servers(), "8000"),
            big_event(1_100_000),
        )
        .await;
    }
}
