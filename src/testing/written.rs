//! [`events_written`]: what the code under test wrote to the outbox.

use sea_orm::ConnectionTrait;

use crate::error::Result;
use crate::event::OutboxEvent;
use crate::repository::{EventOrder, EventQuery, Outbox};
use crate::store::MAX_PAGE_SIZE;

/// Every event in the outbox (any status), oldest first by `occurred_at`. On the transaction that
/// wrote them it includes what is not committed yet, so a test can check what a request
/// handler added before (or instead of) committing; on a database of the test's own it is
/// exactly what the code under test wrote.
///
/// ```
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use sea_orm::{Database, TransactionTrait};
/// use sea_orm_migration::MigratorTrait;
/// use seaorm_outbox::testing::events_written;
/// use seaorm_outbox::{NewEvent, Outbox, OutboxRepository};
///
/// let db = Database::connect("sqlite::memory:").await?;
/// seaorm_outbox_migration::Migrator::up(&db, None).await?;
///
/// let txn = db.begin().await?;
/// Outbox::new(&txn)
///     .add_event(NewEvent::new("order.placed", "order", "42"))
///     .await?;
/// let written = events_written(&txn).await?;
/// assert_eq!(written.len(), 1);
/// assert_eq!(written[0].event_type, "order.placed");
/// txn.rollback().await?;
/// assert!(events_written(&db).await?.is_empty(), "rolled back: never existed");
/// # Ok(()) }
/// # tokio::runtime::Runtime::new().unwrap().block_on(f()).unwrap();
/// ```
///
/// # Errors
/// The database's.
pub async fn events_written<C: ConnectionTrait>(db: &C) -> Result<Vec<OutboxEvent>> {
    let outbox = Outbox::new(db);
    let mut all = Vec::new();
    loop {
        let page = outbox
            .events(
                &EventQuery::default()
                    .order(EventOrder::Occurred)
                    .oldest_first(true)
                    .limit(MAX_PAGE_SIZE)
                    .offset(all.len() as u64),
            )
            .await?;
        let last = (page.len() as u64) < MAX_PAGE_SIZE;
        all.extend(page);
        if last {
            return Ok(all);
        }
    }
}
