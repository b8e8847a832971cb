//! Relay outbox events to Kafka.
//!
//! ```text
//! cargo run --example relay_kafka --features kafka      # KAFKA_BOOTSTRAP=host:9092
//! ```
//!
//! Without `KAFKA_BOOTSTRAP` it starts librdkafka's in-process mock cluster, a real
//! Kafka-protocol broker, so it runs on a machine with no Kafka.

mod support;

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use seaorm_outbox::broker::kafka::KafkaPublisher;
use seaorm_outbox::wire::Router;

const TOPIC: &str = "outbox-example";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mock;
    let bootstrap = match std::env::var("KAFKA_BOOTSTRAP") {
        Ok(b) => b,
        Err(_) => {
            mock = MockCluster::new(3)?;
            mock.create_topic(TOPIC, 3, 3)?;
            println!("no KAFKA_BOOTSTRAP: using an in-process mock cluster");
            mock.bootstrap_servers()
        }
    };
    let db = support::outbox_with_events(10).await?;
    let publisher =
        std::sync::Arc::new(KafkaPublisher::new(&bootstrap)?.router(Router::fixed(TOPIC)));
    support::drain(&db, publisher).await?;

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "outbox-example")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[TOPIC])?;
    let mut received = 0;
    while let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await {
        received += 1;
        if received == 1 {
            println!(
                "first message: partition={} key={} payload={}",
                m.partition(),
                String::from_utf8_lossy(m.key().unwrap_or_default()),
                String::from_utf8_lossy(m.payload().unwrap_or_default())
            );
        }
        if received == 10 {
            break;
        }
    }
    println!("topic {TOPIC}: received {received} messages");
    Ok(())
}
