//! Relay outbox events to RabbitMQ with publisher confirms.
//!
//! ```text
//! cargo run --example relay_rabbitmq --features rabbitmq  # AMQP_URL, default amqp://guest:guest@127.0.0.1:5672/%2f
//! ```

mod support;

use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use seaorm_outbox::broker::rabbitmq::RabbitMqPublisher;
use seaorm_outbox::wire::Router;

const QUEUE: &str = "outbox_example";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    channel
        .queue_declare(
            QUEUE.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;

    let db = support::outbox_with_events(10).await?;
    // The default exchange routes to the queue named by the routing key.
    let publisher =
        std::sync::Arc::new(RabbitMqPublisher::new(url.clone()).router(Router::fixed(QUEUE)));
    support::drain(&db, publisher).await?;

    let mut received = 0;
    while let Some(msg) = channel
        .basic_get(QUEUE.into(), BasicGetOptions { no_ack: true })
        .await?
    {
        received += 1;
        if received == 1 {
            println!(
                "first message: message_id={:?} payload={}",
                msg.delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string()),
                String::from_utf8_lossy(&msg.delivery.data)
            );
        }
    }
    println!("queue {QUEUE}: received {received} messages");
    channel
        .queue_delete(QUEUE.into(), QueueDeleteOptions::default())
        .await?;
    Ok(())
}
