//! Outbox → broker → inbox, end to end: a producer writes orders and their events in one
//! transaction each, a relay publishes them, the relay "crashes" and sends four again, and a
//! consumer applies each event exactly once into its own database through the inbox.
//!
//! ```text
//! cargo run --example inbox --features nats,rabbitmq,redis,kafka -- --broker nats
//! ```
//!
//! `--broker` is `nats` (default, `NATS_URL`), `rabbitmq` (`AMQP_URL`), `redis` (`REDIS_URL`)
//! or `kafka` (`KAFKA_BOOTSTRAP`, else librdkafka's in-process mock cluster). Both databases
//! are in-memory SQLite.

mod support;

use std::sync::Arc;
use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseConnection, DatabaseTransaction};
use sea_orm_migration::MigratorTrait;
use seaorm_outbox::broker::kafka::{KafkaPublisher, KafkaSource};
use seaorm_outbox::broker::nats::{NatsPublisher, NatsSource};
use seaorm_outbox::broker::rabbitmq::{RabbitMqPublisher, RabbitMqSource};
use seaorm_outbox::broker::redis::{RedisPublisher, RedisSource};
use seaorm_outbox::inbox::{Consumer, ConsumerStats, Handler, HandlerError, Incoming, Source};
use seaorm_outbox::wire::Router;
use seaorm_outbox::{Outbox, OutboxRepository, Publisher};
use tokio_util::sync::CancellationToken;

const NAME: &str = "outbox_inbox_example";

/// The consumer's effect: a shipment per order, written in the inbox's transaction.
struct Ship;

#[derive(serde::Deserialize)]
struct Placed {
    n: u64,
}

#[async_trait::async_trait]
impl Handler for Ship {
    async fn handle(&self, txn: &DatabaseTransaction, msg: &Incoming) -> Result<(), HandlerError> {
        let placed: Placed = msg.json()?;
        txn.execute_unprepared(&format!(
            "INSERT INTO shipments (order_n, event_id) VALUES ({}, '{}')",
            placed.n, msg.message_id
        ))
        .await?;
        println!("applied  event {} (order {})", msg.message_id, placed.n);
        Ok(())
    }
}

/// A migrated, empty in-memory consumer database with a domain table.
async fn consumer_db() -> anyhow::Result<DatabaseConnection> {
    let db = support::memory_sqlite().await?;
    // A consuming service needs only the inbox tables.
    struct InboxOnly;
    impl MigratorTrait for InboxOnly {
        fn migrations() -> Vec<Box<dyn sea_orm_migration::MigrationTrait>> {
            seaorm_outbox_migration::inbox_migrations()
        }
    }
    InboxOnly::up(&db, None).await?;
    db.execute_unprepared(
        "CREATE TABLE shipments (order_n INTEGER NOT NULL, event_id TEXT NOT NULL)",
    )
    .await?;
    Ok(db)
}

/// Runs `consumer` on `source` until it has seen `n` messages (or 30 s pass).
async fn consume<S: Source>(
    consumer: Arc<Consumer<Ship>>,
    source: S,
    n: u64,
) -> anyhow::Result<ConsumerStats> {
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (c, stop) = (Arc::clone(&consumer), stop.clone());
        async move { c.run(source, stop).await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = consumer.stats();
        if s.applied + s.duplicates + s.dead_lettered >= n || tokio::time::Instant::now() > deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    Ok(run.await??)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let broker = args
        .iter()
        .position(|a| a == "--broker")
        .and_then(|i| args.get(i + 1))
        .map_or("nats", String::as_str)
        .to_owned();
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());

    let producer = support::outbox_with_events(10).await?;
    let events = Outbox::new(&producer).get_unpublished(10, 0).await?;
    let db = consumer_db().await?;
    let consumer = Arc::new(Consumer::new(db.clone(), "shipping", Ship)?);

    // Each arm: make the destination, relay into it, resend four events as a relay that died
    // before its write-back would, then consume.
    let resend = |p: Arc<dyn Publisher>| {
        let again = events[..4].to_vec();
        async move { p.publish(&again).await.map_err(|e| anyhow::anyhow!("{e}")) }
    };
    let stats = match broker.as_str() {
        "nats" => {
            let client = async_nats::connect(env("NATS_URL", "nats://127.0.0.1:4222")).await?;
            let js = async_nats::jetstream::new(client.clone());
            let _ = js.delete_stream(NAME).await;
            // A short duplicate window, so the resend reaches the consumer and the inbox,
            // not the server, has to catch it.
            js.create_stream(async_nats::jetstream::stream::Config {
                name: NAME.into(),
                subjects: vec![format!("{NAME}.>")],
                duplicate_window: Duration::from_millis(100),
                ..Default::default()
            })
            .await?;
            let p: Arc<dyn Publisher> =
                Arc::new(NatsPublisher::new(client).router(Router::prefixed(format!("{NAME}."))));
            support::drain(&producer, Arc::clone(&p)).await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
            resend(p).await?;
            let stats =
                consume(consumer, NatsSource::new(js.clone(), NAME, "shipping"), 14).await?;
            js.delete_stream(NAME).await?;
            stats
        }
        "rabbitmq" => {
            let uri = env("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
            let conn =
                lapin::Connection::connect(&uri, lapin::ConnectionProperties::default()).await?;
            let ch = conn.create_channel().await?;
            ch.queue_declare(NAME.into(), Default::default(), Default::default())
                .await?;
            let p: Arc<dyn Publisher> =
                Arc::new(RabbitMqPublisher::new(uri.clone()).router(Router::fixed(NAME)));
            support::drain(&producer, Arc::clone(&p)).await?;
            resend(p).await?;
            let stats = consume(consumer, RabbitMqSource::new(uri, NAME), 14).await?;
            ch.queue_delete(NAME.into(), Default::default()).await?;
            stats
        }
        "redis" => {
            let url = env("REDIS_URL", "redis://127.0.0.1:6379");
            let p: Arc<dyn Publisher> = Arc::new(
                RedisPublisher::connect(&url)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .router(Router::fixed(NAME)),
            );
            support::drain(&producer, Arc::clone(&p)).await?;
            resend(p).await?;
            let client = redis::Client::open(url)?;
            let stats = consume(
                consumer,
                RedisSource::new(client.clone(), NAME, "shipping"),
                14,
            )
            .await?;
            let mut conn = client.get_multiplexed_async_connection().await?;
            let _: i64 = redis::cmd("DEL").arg(NAME).query_async(&mut conn).await?;
            stats
        }
        "kafka" => {
            let mock;
            let bootstrap = match std::env::var("KAFKA_BOOTSTRAP") {
                Ok(b) => b,
                Err(_) => {
                    mock = rdkafka::mocking::MockCluster::new(1)?;
                    mock.create_topic(NAME, 3, 1)?;
                    println!("no KAFKA_BOOTSTRAP: using an in-process mock cluster");
                    mock.bootstrap_servers()
                }
            };
            let p: Arc<dyn Publisher> =
                Arc::new(KafkaPublisher::new(&bootstrap)?.router(Router::fixed(NAME)));
            support::drain(&producer, Arc::clone(&p)).await?;
            resend(p).await?;
            consume(
                consumer,
                KafkaSource::new(&bootstrap, "shipping", &[NAME]),
                14,
            )
            .await?
        }
        other => anyhow::bail!("unknown --broker `{other}`: nats, rabbitmq, redis or kafka"),
    };
    let rows = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT COUNT(*) AS n, COUNT(DISTINCT event_id) AS d FROM shipments",
        ))
        .await?
        .ok_or_else(|| anyhow::anyhow!("no count"))?;
    let (n, distinct): (i64, i64) = (rows.try_get("", "n")?, rows.try_get("", "d")?);
    println!(
        "{broker}: 14 deliveries (10 events, 4 sent again); applied {}, skipped {} as duplicates, \
         dead-lettered {}; shipments table: {n} rows for {distinct} events",
        stats.applied, stats.duplicates, stats.dead_lettered
    );
    Ok(())
}
