//! Per-test scratch resources on the local brokers: a fresh NATS stream, a RabbitMQ queue, a
//! Redis stream key, each removed again by the test. Included with `#[path]` by the tests that
//! run every broker (it needs all four broker features).
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::time::Duration;

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

/// A message as a broker client sends it: headers and body.
pub type RawMessage = (Vec<(String, String)>, Vec<u8>);

/// Where a test's messages go; passed to child processes as JSON.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub enum Broker {
    Nats { url: String, stream: String },
    RabbitMq { uri: String, queue: String },
    Redis { url: String, stream: String },
    Kafka { bootstrap: String, topic: String },
}

impl Broker {
    /// Sends each `(headers, body)` as the broker's own client would, in order, each confirmed;
    /// Kafka's record key is the `aggregate-id` header.
    pub async fn send_raw(&self, messages: Vec<RawMessage>) {
        match self {
            Self::Nats { url, stream } => {
                let js = async_nats::jetstream::new(async_nats::connect(url).await.expect("nats"));
                for (headers, body) in messages {
                    let mut map = async_nats::HeaderMap::new();
                    for (k, v) in headers {
                        map.insert(k.as_str(), v.as_str());
                    }
                    js.publish_with_headers(format!("{stream}.e"), map, body.into())
                        .await
                        .expect("publish")
                        .await
                        .expect("stored");
                }
            }
            Self::RabbitMq { uri, queue } => {
                use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
                use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
                let conn = lapin::Connection::connect(uri, Default::default())
                    .await
                    .expect("rabbitmq");
                let ch = conn.create_channel().await.expect("channel");
                ch.confirm_select(ConfirmSelectOptions::default())
                    .await
                    .expect("confirms");
                for (headers, body) in messages {
                    let mut table = FieldTable::default();
                    for (k, v) in headers {
                        table.insert(
                            ShortString::from(k),
                            AMQPValue::LongString(LongString::from(v)),
                        );
                    }
                    let props = lapin::BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_headers(table);
                    ch.basic_publish(
                        ShortString::from(""),
                        ShortString::from(queue.clone()),
                        BasicPublishOptions::default(),
                        &body,
                        props,
                    )
                    .await
                    .expect("publish")
                    .await
                    .expect("confirmed");
                }
            }
            Self::Redis { url, stream } => {
                let client = redis::Client::open(url.as_str()).expect("redis");
                let mut conn = client
                    .get_multiplexed_async_connection()
                    .await
                    .expect("redis");
                for (headers, body) in messages {
                    let mut cmd = redis::cmd("XADD");
                    cmd.arg(stream).arg("*").arg("payload").arg(body);
                    for (k, v) in headers {
                        cmd.arg(k).arg(v);
                    }
                    let _: String = cmd.query_async(&mut conn).await.expect("xadd");
                }
            }
            Self::Kafka { bootstrap, topic } => {
                use rdkafka::message::{Header, OwnedHeaders};
                use rdkafka::producer::{FutureProducer, FutureRecord};
                let producer: FutureProducer = rdkafka::ClientConfig::new()
                    .set("bootstrap.servers", bootstrap)
                    .create()
                    .expect("producer");
                for (headers, body) in messages {
                    let key = headers
                        .iter()
                        .find(|(k, _)| k == "aggregate-id")
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default();
                    let mut h = OwnedHeaders::new();
                    for (k, v) in &headers {
                        h = h.insert(Header {
                            key: k,
                            value: Some(v.as_bytes()),
                        });
                    }
                    producer
                        .send(
                            FutureRecord::to(topic).key(&key).payload(&body).headers(h),
                            Duration::from_secs(10),
                        )
                        .await
                        .expect("produced");
                }
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Nats { .. } => "nats",
            Self::RabbitMq { .. } => "rabbitmq",
            Self::Redis { .. } => "redis",
            Self::Kafka { .. } => "kafka",
        }
    }
}

/// What a [`Broker`] of a test's own holds, removed by [`remove`](Self::remove).
pub enum Scratch {
    Nats(async_nats::jetstream::Context, String),
    RabbitMq(RabbitQueue),
    Redis(String, String),
    Kafka(rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>),
}

impl Scratch {
    pub async fn nats(prefix: &str) -> (Broker, Self) {
        let (url, js, stream) = nats_stream(prefix).await;
        let broker = Broker::Nats {
            url,
            stream: stream.clone(),
        };
        (broker, Self::Nats(js, stream))
    }

    pub async fn rabbitmq(prefix: &str) -> (Broker, Self) {
        let q = RabbitQueue::create(prefix).await;
        let broker = Broker::RabbitMq {
            uri: q.uri.clone(),
            queue: q.queue.clone(),
        };
        (broker, Self::RabbitMq(q))
    }

    pub fn redis(prefix: &str) -> (Broker, Self) {
        let (url, stream) = redis_stream(prefix);
        let broker = Broker::Redis {
            url: url.clone(),
            stream: stream.clone(),
        };
        (broker, Self::Redis(url, stream))
    }

    /// librdkafka's in-process mock cluster of `brokers`, with `topic` over `partitions`.
    pub fn kafka(brokers: i32, topic: &str, partitions: i32) -> (Broker, Self) {
        let cluster = rdkafka::mocking::MockCluster::new(brokers).expect("mock cluster");
        cluster
            .create_topic(topic, partitions, brokers)
            .expect("topic");
        let broker = Broker::Kafka {
            bootstrap: cluster.bootstrap_servers(),
            topic: topic.to_owned(),
        };
        (broker, Self::Kafka(cluster))
    }

    pub async fn remove(self) {
        match self {
            Self::Nats(js, stream) => {
                js.delete_stream(&stream).await.expect("delete stream");
            }
            Self::RabbitMq(q) => q.delete().await,
            Self::Redis(url, key) => redis_delete(&url, &key).await,
            Self::Kafka(cluster) => drop(cluster),
        }
    }
}
