//! In-process wake-up: the app tells the relays of its own process that it committed events,
//! so they claim at once instead of at their next poll. It is what MySQL, MariaDB and SQLite
//! have in place of PostgreSQL's LISTEN/NOTIFY, and it adds nothing there but a wake-up that
//! skips the trip through the server.
//!
//! Polling stays underneath: a wake-up that is never sent (a commit made without the helper,
//! another process's writes) costs latency, never an event.

use std::sync::{Arc, Mutex, Weak};

use sea_orm::{DatabaseConnection, DatabaseTransaction, DbErr, TransactionError, TransactionTrait};
use tokio::sync::Notify;

use super::lock;

/// Wakes the relays it was given to, right after the app commits events.
///
/// Cheap to clone: keep one in the app's state beside the `DatabaseConnection`, and give it to
/// each relay of the process with [`RelayBuilder::waker`](super::RelayBuilder::waker). Commit
/// through [`commit`](Self::commit) or [`transaction`](Self::transaction), or call
/// [`wake`](Self::wake) after a commit made any other way.
///
/// ```
/// use sea_orm::{Database, TransactionTrait};
/// use seaorm_outbox::publisher::StdoutPublisher;
/// use seaorm_outbox::relay::{Relay, RelayWaker};
/// use seaorm_outbox::{NewEvent, Outbox, OutboxRepository};
///
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// let db = Database::connect("sqlite::memory:").await?;
/// let waker = RelayWaker::new();
/// let relay = Relay::builder(db.clone(), StdoutPublisher::stdout())
///     .waker(&waker)
///     .build()?;
/// // ... spawn `relay.run(stop)` ...
///
/// let txn = db.begin().await?;
/// // ... the domain writes ...
/// Outbox::new(&txn)
///     .add_event(NewEvent::new("order.placed", "order", "42"))
///     .await?;
/// waker.commit(txn).await?; // commits, then wakes the relay
/// # Ok(()) }
/// ```
///
/// A wake-up reaches relays of this process only. A relay that is busy when woken claims again
/// as soon as its batch is done; a relay that is not running keeps one pending wake-up.
#[derive(Clone, Default)]
pub struct RelayWaker {
    relays: Arc<Mutex<Vec<Weak<Notify>>>>,
}

impl RelayWaker {
    /// A waker with no relay yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Wakes every live relay given this waker. Call it after the commit: a wake-up before it
    /// finds nothing to claim, and the relay goes back to sleep until its next poll.
    pub fn wake(&self) {
        let mut relays = lock(&self.relays);
        // Dropped relays leave dead entries: pruned here, so the list stays as long as the
        // relays alive.
        relays.retain(|relay| match relay.upgrade() {
            Some(notify) => {
                notify.notify_one();
                true
            }
            None => false,
        });
    }

    /// Commits `txn`, then wakes the relays.
    ///
    /// # Errors
    /// The commit's own error, in which case no relay is woken.
    pub async fn commit(&self, txn: DatabaseTransaction) -> Result<(), DbErr> {
        txn.commit().await?;
        self.wake();
        Ok(())
    }

    /// Runs `callback` in a transaction on `db`, as
    /// [`TransactionTrait::transaction`] does, and wakes the relays once it has committed.
    ///
    /// # Errors
    /// As [`TransactionTrait::transaction`]: the callback's error (rolled back) or the
    /// connection's; no relay is woken then.
    pub async fn transaction<F, T, E>(
        &self,
        db: &DatabaseConnection,
        callback: F,
    ) -> Result<T, TransactionError<E>>
    where
        F: for<'c> FnOnce(
                &'c DatabaseTransaction,
            ) -> std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<T, E>> + Send + 'c>,
            > + Send,
        T: Send,
        E: std::fmt::Display + std::fmt::Debug + Send,
    {
        let out = db.transaction(callback).await?;
        self.wake();
        Ok(out)
    }

    /// How many live relays this waker wakes.
    pub fn relays(&self) -> usize {
        lock(&self.relays)
            .iter()
            .filter(|r| r.strong_count() > 0)
            .count()
    }

    /// Adds a relay's wake-up.
    pub(super) fn register(&self, notify: &Arc<Notify>) {
        let mut relays = lock(&self.relays);
        relays.retain(|r| r.strong_count() > 0);
        relays.push(Arc::downgrade(notify));
    }
}

impl std::fmt::Debug for RelayWaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayWaker")
            .field("relays", &self.relays())
            .finish()
    }
}
