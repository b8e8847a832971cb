//! The whole flow on an in-memory SQLite database, no server needed:
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! It migrates, writes a domain row and its event in one transaction, shows that a rolled-back
//! transaction leaves nothing, lists pending events, marks one published by hand, dead-letters
//! one, then runs a relay that drains the rest to a publisher that prints them.

use std::time::Duration;

use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, TransactionTrait};
use sea_orm_migration::MigratorTrait;
use seaorm_outbox::publisher::StdoutPublisher;
use seaorm_outbox::relay::{Relay, RelayConfig};
use seaorm_outbox::{DomainEvent, Outbox, OutboxRepository};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

#[derive(Serialize)]
struct OrderPlaced {
    order_id: u32,
    total_cents: i64,
}

impl DomainEvent for OrderPlaced {
    fn event_type(&self) -> &str {
        "order.placed"
    }
    fn aggregate_type(&self) -> &str {
        "order"
    }
    fn aggregate_id(&self) -> String {
        self.order_id.to_string()
    }
}

/// Inserts an order row and its event in one transaction, then commits or rolls back.
async fn place_order(db: &DatabaseConnection, order_id: u32, commit: bool) -> anyhow::Result<()> {
    let txn = db.begin().await?;
    txn.execute_unprepared(&format!(
        "INSERT INTO orders (id, total_cents) VALUES ({order_id}, {})",
        order_id * 100
    ))
    .await?;
    Outbox::new(&txn)
        .add(&OrderPlaced {
            order_id,
            total_cents: i64::from(order_id) * 100,
        })
        .await?;
    if commit {
        txn.commit().await?;
    } else {
        txn.rollback().await?;
    }
    Ok(())
}

async fn counts(db: &DatabaseConnection, when: &str) -> anyhow::Result<()> {
    let outbox = Outbox::new(db);
    let orders = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT COUNT(*) AS n FROM orders",
        ))
        .await?
        .map(|r| r.try_get::<i64>("", "n"))
        .transpose()?
        .unwrap_or(0);
    println!(
        "[{when}] orders={orders} pending={} dead_letters={}",
        outbox.count_unpublished().await?,
        outbox.count_failed().await?
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // In-memory SQLite lives as long as its one connection.
    let mut opts = ConnectOptions::new("sqlite::memory:");
    opts.max_connections(1)
        .min_connections(1)
        .idle_timeout(None::<Duration>)
        .sqlx_logging(false);
    let db = Database::connect(opts).await?;
    seaorm_outbox_migration::Migrator::up(&db, None).await?;
    db.execute_unprepared(
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, total_cents INTEGER NOT NULL)",
    )
    .await?;
    println!("migrated: outbox_events is ready");

    place_order(&db, 1, true).await?;
    counts(&db, "order 1 committed with its event").await?;
    place_order(&db, 2, false).await?;
    counts(&db, "order 2 rolled back: no row, no event").await?;
    for id in 3..=6 {
        place_order(&db, id, true).await?;
    }
    counts(&db, "orders 3-6 committed").await?;

    let outbox = Outbox::new(&db);
    println!("pending, oldest first:");
    let pending = outbox.get_unpublished(10, 0).await?;
    for e in &pending {
        println!(
            "  {} {} {}/{} payload={}",
            e.id, e.event_type, e.aggregate_type, e.aggregate_id, e.payload
        );
    }
    outbox.mark_published(pending[0].id).await?;
    println!("marked {} published by hand", pending[0].id);
    outbox
        .mark_failed(pending[1].id, "payload rejected by a downstream schema")
        .await?;
    println!("dead-lettered {}", pending[1].id);
    counts(&db, "before the relay").await?;

    println!("running a relay with the log publisher:");
    let relay = Relay::builder(db.clone(), StdoutPublisher::stdout())
        .config(RelayConfig::default().idle_poll_interval(Duration::from_millis(100)))
        .build()?;
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });
    while outbox.count_unpublished().await? > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    let stats = run.await?;
    println!(
        "relay stopped: published={} retried={} dead_lettered={}",
        stats.published, stats.retried, stats.dead_lettered
    );
    counts(&db, "after the relay").await?;

    println!("replaying the dead letter:");
    outbox.replay(pending[1].id).await?;
    let relay = Relay::builder(db.clone(), StdoutPublisher::stdout()).build()?;
    relay.drain().await?;
    counts(&db, "after replay").await?;
    Ok(())
}
