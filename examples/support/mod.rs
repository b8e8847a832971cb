//! Shared by the broker examples: an in-memory SQLite outbox with a few committed events, and a
//! relay run that drains it.
#![allow(dead_code)]

use std::time::Duration;

use sea_orm::{ConnectOptions, Database, DatabaseConnection, TransactionTrait};
use sea_orm_migration::MigratorTrait;
use seaorm_outbox::relay::{Relay, RelayConfig};
use seaorm_outbox::{NewEvent, Outbox, OutboxRepository, Publisher, RelayStats};
use tokio_util::sync::CancellationToken;

/// An empty in-memory SQLite database on one connection that never closes (each in-memory
/// connection would be a database of its own).
pub(crate) async fn memory_sqlite() -> anyhow::Result<DatabaseConnection> {
    let mut opts = ConnectOptions::new("sqlite::memory:");
    opts.max_connections(1)
        .min_connections(1)
        .idle_timeout(None::<Duration>)
        .sqlx_logging(false);
    Ok(Database::connect(opts).await?)
}

/// A migrated in-memory outbox holding `n` committed events over three orders.
pub(crate) async fn outbox_with_events(n: usize) -> anyhow::Result<DatabaseConnection> {
    let db = memory_sqlite().await?;
    seaorm_outbox_migration::Migrator::up(&db, None).await?;
    let txn = db.begin().await?;
    let events = (0..n)
        .map(|i| {
            NewEvent::new("order.placed", "order", format!("order-{}", i % 3))
                .payload(&serde_json::json!({ "n": i }))
                .header("correlation-id", format!("example-{i}"))
        })
        .collect();
    Outbox::new(&txn).add_events(events).await?;
    txn.commit().await?;
    Ok(db)
}

/// Runs a relay until the outbox is empty (or 30 s pass), then stops it.
pub(crate) async fn drain<P: Publisher + 'static>(
    db: &DatabaseConnection,
    publisher: P,
) -> anyhow::Result<RelayStats> {
    let relay = Relay::builder(db.clone(), publisher)
        .config(RelayConfig::default().idle_poll_interval(Duration::from_millis(100)))
        .build()?;
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });
    let outbox = Outbox::new(db);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while outbox.count_unpublished().await? > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    let stats = run.await?;
    println!(
        "relay: published={} retried={} dead_lettered={} pending={}",
        stats.published,
        stats.retried,
        stats.dead_lettered,
        outbox.count_unpublished().await?
    );
    Ok(stats)
}
