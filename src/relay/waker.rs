//! In-process wake-up: the app tells the relays of its own process that it committed events,
//! so they claim at once instead of at their next poll. It is what MySQL, MariaDB and SQLite
//! have in place of PostgreSQL's LISTEN/NOTIFY, and it adds nothing there but a wake-up that
//! skips the trip through the server.
//!
//! Polling stays underneath: a wake-up that is never sent (a commit made without the helper,
//! another process's writes) costs latency, never an event.
//!
//! On SQLite, one writer at a time, the waker also queues the app's write transactions
//! ([`RelayWaker::begin`], [`RelayWaker::transaction`]) and its relays' write-backs behind one
//! async lock: the next in line starts the moment the last commits, where SQLite's busy handler
//! would sleep 1, 2, 5, 10 ms between tries.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, TransactionError,
    TransactionTrait,
};
use tokio::sync::{Notify, OwnedMutexGuard};

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
    writers: Writers,
}

/// SQLite's writers of this process, queued in turn: the app's transactions begun through a
/// [`RelayWaker`] and the write-backs of its relays.
#[derive(Clone, Debug, Default)]
pub(crate) struct Writers(Arc<tokio::sync::Mutex<()>>);

impl Writers {
    /// How long a turn is waited for before going on without it: SQLite's own locking then
    /// decides, as without the queue (a transaction held open for long must not stall a relay).
    const PATIENCE: Duration = Duration::from_secs(1);

    /// Waits for this writer's turn on SQLite; `None` elsewhere (and past [`Self::PATIENCE`]).
    pub(crate) async fn turn(&self, db: &impl ConnectionTrait) -> Option<OwnedMutexGuard<()>> {
        if db.get_database_backend() != DbBackend::Sqlite {
            return None;
        }
        tokio::time::timeout(Self::PATIENCE, Arc::clone(&self.0).lock_owned())
            .await
            .ok()
    }
}

/// A transaction begun by [`RelayWaker::begin`]: use it as the [`DatabaseTransaction`] it
/// derefs to (`Outbox::new(&*txn)`), then [`commit`](Self::commit) it, which wakes the relays.
/// Dropped without a commit, it rolls back.
pub struct WakingTransaction {
    txn: DatabaseTransaction,
    turn: Option<OwnedMutexGuard<()>>,
    waker: RelayWaker,
}

impl WakingTransaction {
    /// Commits, then wakes the relays.
    ///
    /// # Errors
    /// The commit's own error, in which case no relay is woken.
    pub async fn commit(self) -> Result<(), DbErr> {
        let Self { txn, turn, waker } = self;
        txn.commit().await?;
        drop(turn);
        waker.wake();
        Ok(())
    }

    /// Rolls back; no relay is woken.
    ///
    /// # Errors
    /// The rollback's own error.
    pub async fn rollback(self) -> Result<(), DbErr> {
        self.txn.rollback().await
    }
}

impl std::ops::Deref for WakingTransaction {
    type Target = DatabaseTransaction;

    fn deref(&self) -> &DatabaseTransaction {
        &self.txn
    }
}

impl std::fmt::Debug for WakingTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WakingTransaction")
            .field("queued", &self.turn.is_some())
            .finish_non_exhaustive()
    }
}

impl RelayWaker {
    /// A waker with no relay yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Begins a transaction on `db` whose [`commit`](WakingTransaction::commit) wakes the
    /// relays. On SQLite it first waits its turn behind the process's other write transactions
    /// begun this way and the relays' write-backs, so neither side sleeps in SQLite's busy
    /// handler; don't wait for a relay to deliver while you hold it.
    ///
    /// # Errors
    /// The connection's error beginning the transaction.
    pub async fn begin(&self, db: &DatabaseConnection) -> Result<WakingTransaction, DbErr> {
        let turn = self.writers.turn(db).await;
        Ok(WakingTransaction {
            txn: db.begin().await?,
            turn,
            waker: self.clone(),
        })
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
    /// [`TransactionTrait::transaction`] does, and wakes the relays once it has committed. On
    /// SQLite the transaction waits its turn as [`begin`](Self::begin)'s does.
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
        let turn = self.writers.turn(db).await;
        let out = db.transaction(callback).await?;
        drop(turn);
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

    /// The writer queue this waker's transactions and its relays' write-backs share.
    pub(super) fn writers(&self) -> &Writers {
        &self.writers
    }

    /// A waker with no relay yet, sharing `writers`.
    pub(super) fn sharing(writers: &Writers) -> Self {
        Self {
            relays: Arc::default(),
            writers: writers.clone(),
        }
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
