//! Relay drain rate through each real broker, with acknowledgements.

use std::sync::Arc;

use anyhow::Result;
use seaorm_outbox::Publisher;
use seaorm_outbox::publisher::{
    KafkaPublisher, NatsPublisher, RabbitMqPublisher, RedisPublisher, Router,
};
use seaorm_outbox::relay::Ordering;

use crate::db::BenchDb;
use crate::report::{Row, Target};
use crate::throughput::relay_config;

async fn drain<P: Publisher + 'static>(db: &BenchDb, n: u64, publisher: P) -> Result<f64> {
    db.reset().await?;
    db.seed_pending(n, 1000).await?;
    let relay = seaorm_outbox::Relay::builder(db.pool(2).await?, publisher)
        .config(relay_config(Ordering::PerAggregate))
        .build()?;
    let start = std::time::Instant::now();
    let stats = relay.drain().await?;
    anyhow::ensure!(
        stats.published == n,
        "published {} of {n}: {stats:?}",
        stats.published
    );
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

pub(crate) async fn section(db: &BenchDb, n: u64, rows: &mut Vec<Row>) -> Result<()> {
    let stream = format!("BENCH_{}", std::process::id());
    let client = async_nats::connect("nats://127.0.0.1:4222").await?;
    let js = async_nats::jetstream::new(client.clone());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("{stream}.>")],
        ..Default::default()
    })
    .await?;
    let nats = drain(
        db,
        n,
        NatsPublisher::new(client).router(Router::prefixed(format!("{stream}."))),
    )
    .await?;
    js.delete_stream(&stream).await?;

    let queue = format!("bench_{}", std::process::id());
    let conn = lapin::Connection::connect(
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        lapin::ConnectionProperties::default(),
    )
    .await?;
    let ch = conn.create_channel().await?;
    ch.queue_declare(
        queue.as_str().into(),
        lapin::options::QueueDeclareOptions::default(),
        lapin::types::FieldTable::default(),
    )
    .await?;
    let rabbit = drain(
        db,
        n,
        Arc::new(
            RabbitMqPublisher::new("amqp://guest:guest@127.0.0.1:5672/%2f")
                .router(Router::fixed(queue.clone())),
        ),
    )
    .await?;
    ch.queue_delete(
        queue.as_str().into(),
        lapin::options::QueueDeleteOptions::default(),
    )
    .await?;

    let key = format!("bench:{}", std::process::id());
    let redis = drain(
        db,
        n,
        RedisPublisher::connect("redis://127.0.0.1:6379")
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .router(Router::fixed(key.clone())),
    )
    .await?;
    let mut rc = redis::Client::open("redis://127.0.0.1:6379")?
        .get_multiplexed_async_connection()
        .await?;
    let _: () = redis::cmd("DEL").arg(&key).query_async(&mut rc).await?;

    let mock = rdkafka::mocking::MockCluster::new(3)?;
    mock.create_topic("bench", 4, 3)?;
    let kafka = drain(
        db,
        n,
        Arc::new(KafkaPublisher::new(&mock.bootstrap_servers())?.router(Router::fixed("bench"))),
    )
    .await?;

    eprintln!(
        "brokers: NATS {nats:.0}/s RabbitMQ {rabbit:.0}/s Redis {redis:.0}/s Kafka mock {kafka:.0}/s"
    );
    for (name, rate, target) in [
        (
            "NATS JetStream, PubAck awaited",
            nats,
            Some(Target::AtLeast(15_000.0)),
        ),
        ("RabbitMQ, publisher confirms", rabbit, None),
        ("Redis Streams, XADD pipeline", redis, None),
        ("Kafka (librdkafka mock cluster), acks=all", kafka, None),
    ] {
        rows.push(Row {
            section: "broker drain",
            name: format!("{name}, {n} events from PostgreSQL"),
            value: rate,
            unit: "ev/s",
            baseline: None,
            target,
        });
    }
    Ok(())
}
