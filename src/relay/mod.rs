//! The relay: claims due events (from the hash partitions it owns, or under a lease), hands
//! them to a [`Publisher`], and writes the outcomes back — published, retried with backoff,
//! dead-lettered, or released.
//!
//! # Guarantees
//!
//! * **At least once.** An event is marked published only after the publisher reported it
//!   delivered. A relay that dies between the broker's ack and the write-back leaves the event
//!   leased; after the lease it is claimed and sent again. Duplicates are bounded by what was in
//!   flight, at most two batches per relay (one published while the previous is written back);
//!   consumers deduplicate on the event id, which publishers send as the message id.
//! * **No double publish without a crash or a pause.** Each of the 256 hash partitions has one
//!   owner at a time ([`Claiming::OwnedPartitions`], the default, ordered or not): a relay
//!   reads only its own partitions, publishes only while its ownership is valid by its own
//!   clock, and every write-back is fenced on the ownership's epoch. Relays under
//!   [`Claiming::Leases`] claim with `FOR UPDATE SKIP LOCKED` (PostgreSQL, MySQL 8, MariaDB
//!   10.6+) or SQLite's single writer, and every write-back is conditional on still holding the
//!   lease. Either way a relay that lost its claim cannot overwrite the new owner's outcome.
//! * **Per-aggregate order** ([`Ordering::PerAggregate`], the default): see [`Ordering`].
//! * **An outage is not a bad event.** A publisher call that finds the broker unavailable hands
//!   its batch back unattempted and opens the circuit breaker: no claims, no attempts spent, no
//!   dead letters, until a jittered probe ([`BreakerConfig`]) is answered; [`Relay::breaker`]
//!   tells its state.
//! * **Bounded delay behind a drain (PostgreSQL).** While a relay drains full batches, each claim
//!   scans the due rows from where the previous batch ended, skipping the index entries that
//!   published rows leave until VACUUM. An event that becomes claimable behind that point (a
//!   writer's transaction that outlasted a batch, an expired lease, or under per-aggregate order
//!   an event whose predecessor was in flight when the scan passed it) is found by the next
//!   full scan: a short claim, or at most a second later.

mod any;
mod batch;
mod breaker;
mod config;
mod cursor;
mod delivery;
mod group;
mod holds;
mod lanes;
#[cfg(feature = "postgres")]
pub mod wal;

/// The WAL relay's old path: now [`wal`].
#[cfg(feature = "postgres")]
#[deprecated(
    since = "0.2.0",
    note = "renamed `relay::wal`: \"log\" meant three things"
)]
#[doc(hidden)]
pub mod log {
    #[doc(hidden)]
    pub use super::wal::*;
}
mod ownership;
mod rebalance;
mod run;
mod wake;
mod waker;
mod write_back;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering as AtomicOrdering};

use chrono::{DateTime, Utc};
use sea_orm::DatabaseConnection;

pub use any::{AnyRelay, RelayTotals};
#[doc(hidden)]
pub use breaker::BreakerState;
pub use breaker::BreakerStatus;
pub use config::{
    Backoff, BreakerConfig, Claiming, DeadLetterPolicy, Jitter, MAX_BATCH_SIZE, OnExpiry,
    OnPublish, Ordering, RelayConfig,
};
pub use group::{GroupConfig, GroupHealth, RelayGroup, RelayGroupBuilder};
pub use wake::NOTIFY_CHANNEL;
pub use waker::{RelayWaker, WakingTransaction};

use crate::error::Result;
use crate::publisher::Publisher;
use crate::repository::Outbox;
use crate::stats::{Health, HealthThresholds};

/// What a relay did, summed over its run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayStats {
    /// Events marked published.
    pub published: u64,
    /// Failed attempts scheduled for a retry.
    pub retried: u64,
    /// Events moved to the dead letter.
    pub dead_lettered: u64,
    /// Of `dead_lettered`, events that expired undelivered ([`NewEvent::expires_at`]).
    ///
    /// [`NewEvent::expires_at`]: crate::NewEvent::expires_at
    pub expired: u64,
    /// Events handed back unattempted (blocked behind a failure, or at shutdown).
    pub released: u64,
    /// Batches claimed (empty polls are not counted).
    pub batches: u64,
    /// Events whose lease had expired and been taken over before the write-back.
    pub lost_leases: u64,
    /// Published events deleted by retention.
    pub purged: u64,
}

impl std::ops::AddAssign for RelayStats {
    fn add_assign(&mut self, o: Self) {
        self.published += o.published;
        self.retried += o.retried;
        self.dead_lettered += o.dead_lettered;
        self.expired += o.expired;
        self.released += o.released;
        self.batches += o.batches;
        self.lost_leases += o.lost_leases;
        self.purged += o.purged;
    }
}

/// Builds a [`Relay`].
#[derive(Debug)]
pub struct RelayBuilder<P> {
    db: DatabaseConnection,
    publisher: P,
    config: RelayConfig,
    waker: Option<RelayWaker>,
    breaker: Option<Arc<std::sync::Mutex<breaker::Breaker>>>,
    tenant: Option<String>,
}

impl<P: Publisher> RelayBuilder<P> {
    /// Shares `breaker` with other relays of one publisher (a [`RelayGroup`]'s tenants): a
    /// broker outage is one outage, seen by all of them at once.
    /// A [`RelayGroup`] tenant's id, for its metrics' `tenant` label.
    fn tenant_label(mut self, tenant: Option<String>) -> Self {
        self.tenant = tenant;
        self
    }

    fn shared_breaker(mut self, breaker: Arc<std::sync::Mutex<breaker::Breaker>>) -> Self {
        self.breaker = Some(breaker);
        self
    }

    /// Lets `waker` wake this relay right after the app's commit ([`RelayWaker`]): on MySQL,
    /// MariaDB and SQLite, the way to deliver within milliseconds rather than at the next
    /// [`idle_poll_interval`](RelayConfig::idle_poll_interval).
    #[must_use]
    pub fn waker(mut self, waker: &RelayWaker) -> Self {
        self.waker = Some(waker.clone());
        self
    }

    /// Sets the configuration.
    #[must_use]
    pub fn config(mut self, config: RelayConfig) -> Self {
        self.config = config;
        self
    }

    /// Validates the configuration and builds the relay.
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) for a config that cannot work.
    pub fn build(self) -> Result<Relay<P>> {
        self.config.validate()?;
        let name = self.config.name.clone().unwrap_or_else(|| {
            format!("relay-{}-{:04x}", std::process::id(), rand::random::<u16>())
        });
        // Leave room for `:` and a 32-character batch or run id within 64-character tokens.
        let name: String = name.chars().take(31).collect();
        let owner = ownership::Ownership::new(&name);
        let wake = Arc::new(tokio::sync::Notify::new());
        if let Some(waker) = &self.waker {
            waker.register(&wake);
        }
        let writers = self
            .waker
            .as_ref()
            .map(|w| w.writers().clone())
            .unwrap_or_default();
        Ok(Relay {
            wake,
            db: self.db,
            publisher: self.publisher,
            name,
            share: AtomicU32::new(self.config.events_per_aggregate),
            ownership: std::sync::Mutex::new(owner),
            holds: std::sync::Mutex::default(),
            lanes: std::sync::Mutex::default(),
            lane_gate: tokio::sync::RwLock::new(()),
            lane_wake: tokio::sync::Notify::new(),
            batch_seq: AtomicU64::new(0),
            written: AtomicU64::new(0),
            cursor: std::sync::Mutex::default(),
            breaker: self.breaker.unwrap_or_default(),
            tenant: self.tenant,
            config: self.config,
            last_poll: Arc::new(AtomicI64::new(0)),
            writers,
        })
    }
}

/// Moves events from the outbox table to a [`Publisher`].
///
/// Run as many relays as you like, in one process or many: they share the table safely.
///
/// ```no_run
/// use sea_orm::Database;
/// use seaorm_outbox::publisher::StdoutPublisher;
/// use seaorm_outbox::relay::{Relay, RelayConfig};
/// use tokio_util::sync::CancellationToken;
///
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// let db = Database::connect("sqlite://outbox.db?mode=rwc").await?;
/// let relay = Relay::builder(db, StdoutPublisher::stdout())
///     .config(RelayConfig::default().batch_size(200))
///     .build()?;
/// let stop = CancellationToken::new();
/// let task = tokio::spawn({
///     let stop = stop.clone();
///     async move { relay.run(stop).await }
/// });
/// // ... on shutdown:
/// stop.cancel();
/// let stats = task.await?;
/// println!("published {}", stats.published);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Relay<P> {
    db: DatabaseConnection,
    publisher: P,
    config: RelayConfig,
    name: String,
    last_poll: Arc<AtomicI64>,
    /// Rung by the NOTIFY listener and by [`RelayWaker`]s: claim now.
    wake: Arc<tokio::sync::Notify>,
    /// The next ordered claim's run per aggregate ([`delivery::next_share`]).
    share: AtomicU32,
    /// Where the next claim's scan of due rows starts ([`cursor`]).
    cursor: std::sync::Mutex<cursor::Cursor>,
    /// Whether the publisher answers ([`breaker`]); shared by a group's tenants.
    breaker: Arc<std::sync::Mutex<breaker::Breaker>>,
    /// Owned partitions: what this relay holds ([`ownership`]).
    ownership: std::sync::Mutex<ownership::Ownership>,
    /// Owned partitions: the aggregates held back ([`holds`]).
    holds: std::sync::Mutex<holds::Holds>,
    /// Owned partitions: hot aggregates read beside the claim loop ([`lanes`]).
    lanes: std::sync::Mutex<lanes::Lanes>,
    /// Held shared by a lane's step; taken to release partitions once no step is under way.
    lane_gate: tokio::sync::RwLock<()>,
    /// Rung when a lane opens.
    lane_wake: tokio::sync::Notify,
    /// The claim loop's last batch number, and the last one written back (lanes wait on it).
    batch_seq: AtomicU64,
    written: AtomicU64,
    /// SQLite: the queue its write-backs share with its wakers' transactions.
    writers: waker::Writers,
    /// A group tenant's metrics label.
    tenant: Option<String>,
}

impl<P: Publisher> Relay<P> {
    /// Starts building a relay over `db` that publishes through `publisher`.
    pub fn builder(db: DatabaseConnection, publisher: P) -> RelayBuilder<P> {
        RelayBuilder {
            db,
            publisher,
            config: RelayConfig::default(),
            waker: None,
            breaker: None,
            tenant: None,
        }
    }

    /// Now by the relay's [`clock`](RelayConfig::clock): what its decisions about due,
    /// backoff and expiry go by.
    fn now(&self) -> DateTime<Utc> {
        self.config.clock.now()
    }

    /// A [`RelayWaker`] that wakes this relay (for a relay built without
    /// [`RelayBuilder::waker`]; each call gives a new handle).
    pub fn waker(&self) -> RelayWaker {
        let waker = RelayWaker::sharing(&self.writers);
        waker.register(&self.wake);
        waker
    }

    /// This relay's name, the prefix of its lease tokens.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The publisher.
    pub fn publisher(&self) -> &P {
        &self.publisher
    }

    /// The configuration.
    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// When the relay last polled the table, successfully or not; `None` before the first poll.
    pub fn last_poll(&self) -> Option<DateTime<Utc>> {
        match self.last_poll.load(AtomicOrdering::Relaxed) {
            0 => None,
            ms => DateTime::from_timestamp_millis(ms),
        }
    }

    /// Whether the publisher is answering: the circuit breaker's state, and since when and why
    /// the publisher has been unavailable.
    pub fn breaker(&self) -> BreakerStatus {
        lock(&self.breaker).status()
    }

    /// Health: the outbox's backlog, lag and dead letters against `thresholds`, plus whether
    /// this relay's loop is still polling and its publisher answering (degraded while the
    /// breaker is open, unhealthy once it has been open for
    /// [`max_publisher_outage`](HealthThresholds::max_publisher_outage)).
    pub async fn health(&self, thresholds: &HealthThresholds) -> Health {
        let mut h = Outbox::new(&self.db).health(thresholds).await;
        h.check_poll(self.last_poll(), thresholds);
        let b = self.breaker();
        if let Some(since) = b.unavailable_since {
            h.check_publisher(
                self.publisher.name(),
                since,
                b.last_error.as_deref(),
                thresholds,
            );
        }
        h
    }

    fn cursor(&self) -> std::sync::MutexGuard<'_, cursor::Cursor> {
        lock(&self.cursor)
    }
}

/// Locks relay state that holds plain data only: a panic elsewhere while holding it cannot
/// leave it torn, so a poisoned lock is used as it is.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
