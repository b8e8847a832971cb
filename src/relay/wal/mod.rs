//! The log relay (PostgreSQL): events read from the write-ahead log through a logical
//! replication slot, in commit order, instead of polled from the table.
//!
//! Two ways to write, chosen per app, and one relay reads both:
//!
//! * **Message mode** ([`Outbox::emit`], or [`WriteMode::Message`] on the repository): the event
//!   is a transactional logical message, `pg_logical_emit_message(true, prefix, json)`, in the
//!   caller's transaction; there is no table row at all.
//! * **Table mode** ([`LogRelayConfig::table`]): `add_event` inserts its row as usual, and the
//!   relay reads the inserts from a publication; delivered rows are then marked published (or
//!   deleted), so the table's counts stay true.
//!
//! # How it works
//!
//! By default ([`Transport::Stream`]) the relay streams the slot over the replication protocol
//! (`START_REPLICATION … LOGICAL`, pgoutput with `messages` on) on a connection of its own: the
//! server decodes each change once and pushes committed transactions, in commit order. The
//! relay publishes them, writes its dead letters, and only then reports the position as
//! confirmed, every [`confirm_interval`](LogRelayConfig::confirm_interval) (100 ms), and with
//! `pg_replication_slot_advance` when the stream ends. [`Transport::Sql`] polls
//! `pg_logical_slot_peek_binary_changes` and confirms with `pg_replication_slot_advance` over an
//! ordinary connection instead, for poolers and proxies that pass no replication connection.
//!
//! To know a commit's events were delivered, read [`current_position`] after it commits and
//! [`wait_confirmed`] on it.
//!
//! # Guarantees
//!
//! * **At least once.** The slot is confirmed only past events the broker acknowledged or that
//!   were dead-lettered. After a crash the next reader starts from the confirmed position, so
//!   what is sent twice is bounded by one read ([`LogRelayConfig::max_changes`]).
//! * **Commit order,** which keeps per-aggregate order and more: publisher calls carry
//!   consecutive runs of it. An event the broker refuses is retried with backoff and holds its
//!   aggregate's later events; other aggregates go on, but the slot cannot move past it, so a
//!   long retry holds WAL. (Later events of its aggregate that were in the same call as the
//!   refused one, and that the broker took, stay delivered: a broker that refuses one event of
//!   a key and accepts the next has already reordered them.)
//! * **One active relay per slot.** The leader holds a session advisory lock on a connection of
//!   its own; others wait as hot standbys and take over within
//!   [`standby_interval`](LogRelayConfig::standby_interval) once its session ends (a crash
//!   closes it). A graceful stop confirms what it sent first, so a hand-over sends nothing twice.
//! * **WAL is not kept forever.** An idle relay advances its slot to the server's position, and
//!   writes a heartbeat message every [`heartbeat_interval`](LogRelayConfig::heartbeat_interval)
//!   so even a database with no writes at all lets the slot move.
//! * **Nothing is skipped silently.** A per-event rejection, or a record that cannot be read,
//!   is kept in `outbox_log_dead_letters` with the reason ([`LogDeadLetters`]) before the slot
//!   moves past it.
//!
//! [`Outbox::emit`]: crate::Outbox::emit
//! [`WriteMode::Message`]: crate::repository::WriteMode::Message

mod config;
mod dead_letters;
mod deliver;
mod peek;
mod read;
mod session;
mod stream;

use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::DatabaseConnection;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use self::config::{LogRelayConfig, Transport};
pub use self::dead_letters::LogDeadLetters;
pub use crate::store::{InvalidWalPosition, LogDeadLetter, SlotStatus, WalPosition};

use super::breaker::{Breaker, BreakerStatus};
use super::lock;
use crate::error::{Error, Result};
use crate::publisher::Publisher;
use crate::stats::{Health, HealthThresholds};
use crate::store::{self, slots};

/// What a log relay does right now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum LogRole {
    /// Connecting, checking the server, or backing off after an error.
    #[default]
    Starting,
    /// Another relay holds the slot; this one waits to take over.
    Standby,
    /// Reading the slot and publishing.
    Leader,
}

/// What a log relay did, summed over its run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LogRelayStats {
    /// Events the broker acknowledged.
    pub published: u64,
    /// Refused attempts that were retried.
    pub retried: u64,
    /// Events dead-lettered after a rejection or their last attempt, or expired.
    pub dead_lettered: u64,
    /// Of `dead_lettered`, events that expired undelivered ([`NewEvent::expires_at`]).
    ///
    /// [`NewEvent::expires_at`]: crate::NewEvent::expires_at
    pub expired: u64,
    /// Records that could not be read, dead-lettered with the reason.
    pub unreadable: u64,
    /// Committed transactions read.
    pub transactions: u64,
    /// Reads of the slot.
    pub reads: u64,
    /// Heartbeat messages written on an idle database.
    pub heartbeats: u64,
    /// Times this relay took the lead.
    pub took_lead: u64,
    /// Stream sessions whose last position had not reached the slot when they ended, so the
    /// stop wrote it with `pg_replication_slot_advance`, which decodes the slot again from
    /// its restart position (on a busy slot, seconds and hundreds of megabytes). A graceful
    /// stop waits up to `confirm_interval` + 1 s for the stream to report it instead.
    pub stop_advances: u64,
}

impl std::ops::AddAssign for LogRelayStats {
    fn add_assign(&mut self, o: Self) {
        self.published += o.published;
        self.retried += o.retried;
        self.dead_lettered += o.dead_lettered;
        self.expired += o.expired;
        self.unreadable += o.unreadable;
        self.transactions += o.transactions;
        self.reads += o.reads;
        self.heartbeats += o.heartbeats;
        self.took_lead += o.took_lead;
        self.stop_advances += o.stop_advances;
    }
}

/// Builds a [`LogRelay`].
#[derive(Debug)]
pub struct LogRelayBuilder<P> {
    db: DatabaseConnection,
    publisher: P,
    config: LogRelayConfig,
    name: Option<String>,
}

impl<P: Publisher> LogRelayBuilder<P> {
    /// Sets the configuration.
    #[must_use]
    pub fn config(mut self, config: LogRelayConfig) -> Self {
        self.config = config;
        self
    }

    /// Names the relay in logs (default: `log-<pid>-<random>`).
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Validates the configuration and builds the relay. Nothing is checked on the server
    /// yet: [`LogRelay::prepare`] does that.
    ///
    /// # Errors
    /// [`Error::Config`] for a config that cannot work.
    pub fn build(self) -> Result<LogRelay<P>> {
        self.config.validate()?;
        if store::pg_pool(&self.db).is_none() {
            return Err(Error::Config(
                "the log relay reads PostgreSQL's write-ahead log: it needs a PostgreSQL pool"
                    .into(),
            ));
        }
        Ok(LogRelay {
            name: self.name.unwrap_or_else(|| {
                format!("log-{}-{:04x}", std::process::id(), rand::random::<u16>())
            }),
            db: self.db,
            publisher: self.publisher,
            config: self.config,
            breaker: Mutex::default(),
            state: Mutex::default(),
        })
    }
}

/// The logical replication slots (pgoutput) of `db`'s database, with their lag and retained
/// WAL: for status pages and the `status` command.
///
/// # Errors
/// Database errors.
pub async fn slots(db: &impl sea_orm::ConnectionTrait) -> Result<Vec<SlotStatus>> {
    slots::slots(db, None).await
}

/// Drops the replication slot `slot` of `db`'s database, to take a log relay out of service
/// for good (a slot nobody reads keeps WAL on the server without bound, and a database with a
/// slot cannot be dropped). Returns whether there was one.
///
/// Stop the relays reading it first. The server process of a stream that just ended holds the
/// slot for a moment (`pg_drop_replication_slot` fails with 55006 meanwhile): this waits up to
/// `wait` for it to let go. To start over after a lost slot, drop it and start the relay, whose
/// [`LogRelay::prepare`] creates a new one at the current position; events committed between
/// the old slot's loss and the new one are not in its log (table mode: still pending rows,
/// which a polling [`Relay`](crate::relay::Relay) can deliver).
///
/// # Errors
/// [`Error::LogRelay`] if the slot is still read after `wait`; database errors.
pub async fn drop_slot(db: &DatabaseConnection, slot: &str, wait: Duration) -> Result<bool> {
    let pool = crate::store::pg_pool(db).ok_or_else(|| {
        Error::Config("dropping a replication slot needs a PostgreSQL pool".into())
    })?;
    slots::drop_slot(pool, slot, wait).await
}

/// The server's current WAL position. Read after a transaction commits, every event it wrote
/// (message or table mode) lies before it: pass it to [`wait_confirmed`] to know they were
/// delivered.
///
/// # Errors
/// Database errors.
pub async fn current_position(db: &impl sea_orm::ConnectionTrait) -> Result<WalPosition> {
    slots::current_position(db).await
}

/// Waits until `slot` is confirmed at or past `position`, polling every 20 ms; returns the
/// confirmed position. The relay confirms a position only once everything that committed
/// before it was acknowledged by the broker or dead-lettered, and reports it to the server
/// every [`confirm_interval`](LogRelayConfig::confirm_interval) (100 ms): a test, or a
/// graceful hand-over, can wait for a commit's events this way rather than sleep.
///
/// ```no_run
/// # async fn f(db: sea_orm::DatabaseConnection) -> seaorm_outbox::Result<()> {
/// use std::time::Duration;
/// use seaorm_outbox::relay::wal::{current_position, wait_confirmed};
///
/// // … commit a transaction that emits events …
/// let written = current_position(&db).await?;
/// wait_confirmed(&db, "seaorm_outbox", written, Duration::from_secs(10)).await?;
/// # Ok(()) }
/// ```
///
/// # Errors
/// [`Error::NotConfirmed`] after `timeout`; [`Error::LogRelay`] if there is no such slot;
/// database errors.
pub async fn wait_confirmed(
    db: &impl sea_orm::ConnectionTrait,
    slot: &str,
    position: WalPosition,
    timeout: Duration,
) -> Result<WalPosition> {
    let started = Instant::now();
    loop {
        let confirmed =
            slots::confirmed_position(db, slot)
                .await?
                .ok_or_else(|| Error::LogRelay {
                    slot: slot.to_owned(),
                    reason: "no such slot in this database".to_owned(),
                    source: None,
                })?;
        if confirmed >= position {
            return Ok(confirmed);
        }
        if started.elapsed() >= timeout {
            return Err(Error::NotConfirmed {
                slot: slot.to_owned(),
                position: position.to_string(),
                confirmed: confirmed.to_string(),
                waited: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Default)]
struct State {
    role: LogRole,
    last_poll: Option<DateTime<Utc>>,
    /// The oldest commit not yet confirmed, as of the last read.
    behind_since: Option<DateTime<Utc>>,
}

/// Delivers events from PostgreSQL's write-ahead log to a [`Publisher`]; see the
/// [module](self) for the guarantees.
///
/// ```no_run
/// use sea_orm::Database;
/// use seaorm_outbox::publisher::StdoutPublisher;
/// use seaorm_outbox::relay::wal::{LogRelay, LogRelayConfig};
/// use tokio_util::sync::CancellationToken;
///
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// let db = Database::connect("postgres://postgres@127.0.0.1/app").await?;
/// let relay = LogRelay::builder(db, StdoutPublisher::stdout())
///     .config(LogRelayConfig::default().slot("app_outbox"))
///     .build()?;
/// relay.prepare().await?; // refuses wal_level != logical; creates the slot and publication
/// let stop = CancellationToken::new();
/// let stats = relay.run(stop).await; // until cancelled
/// println!("published {}", stats.published);
/// # Ok(()) }
/// ```
pub struct LogRelay<P> {
    db: DatabaseConnection,
    publisher: P,
    config: LogRelayConfig,
    name: String,
    breaker: Mutex<Breaker>,
    state: Mutex<State>,
}

impl<P> std::fmt::Debug for LogRelay<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogRelay")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<P: Publisher> LogRelay<P> {
    /// Starts building a log relay over `db` (a PostgreSQL pool) that publishes through
    /// `publisher`.
    pub fn builder(db: DatabaseConnection, publisher: P) -> LogRelayBuilder<P> {
        LogRelayBuilder {
            db,
            publisher,
            config: LogRelayConfig::default(),
            name: None,
        }
    }

    /// Drops this relay's slot ([`drop_slot`]): the relay must be stopped, here and in every
    /// other process.
    ///
    /// # Errors
    /// As [`drop_slot`].
    pub async fn drop_slot(&self, wait: Duration) -> Result<bool> {
        drop_slot(&self.db, &self.config.slot, wait).await
    }

    /// Waits until this relay's slot is confirmed at or past `position` ([`wait_confirmed`]).
    ///
    /// # Errors
    /// As [`wait_confirmed`].
    pub async fn wait_confirmed(
        &self,
        position: WalPosition,
        timeout: Duration,
    ) -> Result<WalPosition> {
        wait_confirmed(&self.db, &self.config.slot, position, timeout).await
    }

    /// The relay's name in logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The configuration.
    pub fn config(&self) -> &LogRelayConfig {
        &self.config
    }

    /// The publisher.
    pub fn publisher(&self) -> &P {
        &self.publisher
    }

    /// Leader, standby or starting.
    pub fn role(&self) -> LogRole {
        lock(&self.state).role
    }

    /// The circuit breaker's view of the publisher.
    pub fn breaker(&self) -> BreakerStatus {
        lock(&self.breaker).status()
    }

    /// Checks that the server and role can decode ([`Error::LogRelay`] says what is missing
    /// and how to fix it), and creates the publication and the slot when missing.
    ///
    /// Events written before the slot exists are not in its log: prepare the relay before
    /// writers switch to message mode.
    ///
    /// # Errors
    /// [`Error::LogRelay`] when `wal_level` is not `logical`, the role lacks `REPLICATION`, the
    /// server is older than 14, or the slot is of another plugin or database; database errors.
    pub async fn prepare(&self) -> Result<()> {
        let mut conn = self.connect().await?;
        self.set_up(&mut conn).await?;
        Ok(())
    }

    /// The slot as the server shows it; `None` if it does not exist.
    ///
    /// # Errors
    /// Database errors.
    pub async fn slot(&self) -> Result<Option<SlotStatus>> {
        Ok(slots::slots(&self.db, Some(&self.config.slot))
            .await?
            .into_iter()
            .next())
    }

    /// Health: the slot's lag against `thresholds` (degraded past
    /// [`max_slot_lag_bytes`](HealthThresholds::max_slot_lag_bytes) or
    /// [`max_oldest_pending_age`](HealthThresholds::max_oldest_pending_age); unhealthy if the
    /// slot is missing or lost), dead letters, whether the loop is polling, and the publisher's
    /// breaker.
    pub async fn health(&self, thresholds: &HealthThresholds) -> Health {
        let slot = self.slot().await;
        let dead = LogDeadLetters::new(&self.db).count().await;
        let (last_poll, behind_since) = {
            let s = lock(&self.state);
            (s.last_poll, s.behind_since)
        };
        let mut h = Health::for_log_slot(&self.config.slot, slot, dead, behind_since, thresholds);
        h.check_poll(last_poll, thresholds);
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

    /// Runs until `cancel` is cancelled: waits as a standby while another relay holds the
    /// slot, then reads and publishes. Errors never end it: it logs them, backs off (up to
    /// 30 s) and starts again, a refusal ([`prepare`](Self::prepare)'s) included.
    pub async fn run(&self, cancel: CancellationToken) -> LogRelayStats {
        let mut stats = LogRelayStats::default();
        let mut backoff = Duration::ZERO;
        while !cancel.is_cancelled() {
            let started = Instant::now();
            match self.lead(&cancel, &mut stats).await {
                Ok(()) => break,
                Err(e) => {
                    if started.elapsed() > Duration::from_secs(60) {
                        backoff = Duration::ZERO;
                    }
                    backoff =
                        (backoff * 2).clamp(Duration::from_millis(200), Duration::from_secs(30));
                    lock(&self.state).role = LogRole::Starting;
                    tracing::warn!(relay = %self.name, slot = %self.config.slot, error = %e,
                        retry_in = ?backoff, "outbox log relay stopped reading; starting again");
                    tokio::select! {
                        () = cancel.cancelled() => {}
                        () = tokio::time::sleep(backoff) => {}
                    }
                }
            }
        }
        lock(&self.state).role = LogRole::Starting;
        stats
    }

    /// [`Error::PublisherUnavailable`] while the breaker is open.
    pub(super) fn unavailable(&self) -> Result<()> {
        match self.breaker().last_error {
            Some(reason) => Err(Error::PublisherUnavailable {
                publisher: self.publisher.name().to_owned(),
                reason,
            }),
            None => Ok(()),
        }
    }
}
