//! Per-test scratch resources on the local brokers: a fresh NATS stream, a RabbitMQ queue, a
//! Redis stream key, each removed again by the test. Included with `#[path]` by the tests that
//! run every broker (it needs all four broker features).
#![allow(dead_code, unreachable_pub, missing_docs)]

use uuid::Uuid;

pub fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", Uuid::now_v7().simple())
}

/// The local NATS's URL, a JetStream context, and a fresh stream over `<name>.>`.
pub async fn nats_stream(prefix: &str) -> (String, async_nats::jetstream::Context, String) {
    let url = format!(
        "nats://{}",
        env_or("OUTBOX_TEST_NATS_ADDR", "127.0.0.1:4222")
    );
    let client = async_nats::connect(&url).await.expect("nats reachable");
    let js = async_nats::jetstream::new(client);
    let stream = unique(prefix);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("{stream}.>")],
        ..Default::default()
    })
    .await
    .expect("stream");
    (url, js, stream)
}

/// A durable queue of its own on the local RabbitMQ; [`delete`](Self::delete) removes it.
pub struct RabbitQueue {
    pub uri: String,
    pub queue: String,
    channel: lapin::Channel,
    _conn: lapin::Connection,
}

impl RabbitQueue {
    pub async fn create(prefix: &str) -> Self {
        use lapin::options::QueueDeclareOptions;
        use lapin::types::FieldTable;
        let addr = env_or("OUTBOX_TEST_AMQP_ADDR", "127.0.0.1:5672");
        let uri = format!("amqp://guest:guest@{addr}/%2f");
        let conn = lapin::Connection::connect(&uri, lapin::ConnectionProperties::default())
            .await
            .expect("rabbitmq reachable");
        let channel = conn.create_channel().await.expect("channel");
        let queue = unique(prefix);
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue");
        Self {
            uri,
            queue,
            channel,
            _conn: conn,
        }
    }

    pub async fn delete(self) {
        self.channel
            .queue_delete(self.queue.as_str().into(), Default::default())
            .await
            .expect("delete queue");
    }
}

/// The local Redis's URL and a fresh stream key.
pub fn redis_stream(prefix: &str) -> (String, String) {
    let url = format!(
        "redis://{}",
        env_or("OUTBOX_TEST_REDIS_ADDR", "127.0.0.1:6379")
    );
    (url, unique(prefix))
}

pub async fn redis_delete(url: &str, key: &str) {
    let client = redis::Client::open(url).expect("redis");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let _: i64 = redis::cmd("DEL")
        .arg(key)
        .query_async(&mut conn)
        .await
        .expect("del");
}
