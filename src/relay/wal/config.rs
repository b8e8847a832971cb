//! [`LogRelayConfig`]: the log relay's settings, with `Default` and chained setters.

use std::time::Duration;

use crate::backoff::Backoff;
use crate::error::{Error, Result};
use crate::relay::config::{BreakerConfig, MAX_BATCH_SIZE, OnPublish};
use crate::repository::MESSAGE_PREFIX;

/// How the log relay reads its slot (BENCHMARKS.md measures both).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Transport {
    /// The streaming replication protocol (`START_REPLICATION … LOGICAL`, through
    /// pgwire-replication) on a connection of its own: the server decodes each change once and
    /// pushes it as it commits. The default.
    #[default]
    Stream,
    /// `pg_logical_slot_peek_binary_changes` and `pg_replication_slot_advance` polled over an
    /// ordinary connection. No replication connection needed (some poolers and proxies pass
    /// none), but every read decodes again from the slot's restart position, which trails by
    /// up to one snapshot of running transactions (15 s of WAL): slower, and latency grows
    /// with the write rate.
    Sql,
}

/// The log relay's settings.
///
/// ```
/// use std::time::Duration;
/// use seaorm_outbox::relay::wal::LogRelayConfig;
///
/// let config = LogRelayConfig::default()
///     .slot("orders_outbox")
///     .table(true) // also deliver rows that `add_event` inserts
///     .idle_poll_interval(Duration::from_millis(50));
/// assert_eq!(config.publication, "seaorm_outbox");
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct LogRelayConfig {
    /// The logical replication slot (cluster-wide name; one per outbox). Created when
    /// missing. Default `seaorm_outbox`.
    pub slot: String,
    /// The publication pgoutput filters by (per database). Created when missing. Default
    /// `seaorm_outbox`.
    pub publication: String,
    /// The message prefix of message mode's events ([`OutboxConfig::message_prefix`]).
    ///
    /// [`OutboxConfig::message_prefix`]: crate::OutboxConfig::message_prefix
    pub message_prefix: String,
    /// How the slot is read. Default [`Transport::Stream`].
    pub transport: Transport,
    /// [`Transport::Stream`]: the replication connection's URL
    /// (`postgres://user:password@host:port/db?sslmode=require`). Default: the pool's host,
    /// port, user and database, with the password from `PGPASSWORD`.
    pub replication_url: Option<String>,
    /// [`Transport::Stream`]: how often the confirmed position is reported to the server.
    /// Default 100 ms.
    pub confirm_interval: Duration,
    /// Table mode: also deliver the rows inserted into `outbox_events` (by `add_event`), through
    /// the publication. Off by default: message mode only.
    pub table: bool,
    /// Table mode: what happens to a delivered row; marked published (default) or deleted.
    pub on_publish: OnPublish,
    /// Events per publisher call. Default 500.
    pub batch_size: u32,
    /// Records read from the slot per read (a read ends at a transaction's end, so one large
    /// transaction may exceed it). Bounds what a crash can send twice. Default 10,000.
    pub max_changes: u32,
    /// The first pause after a read that found nothing; it doubles while reads stay empty, up
    /// to `idle_poll_interval`. Default 2 ms.
    pub poll_interval: Duration,
    /// The longest pause between reads on an idle database. Default 100 ms.
    pub idle_poll_interval: Duration,
    /// How often a standby tries to take the slot over. Default 1 s.
    pub standby_interval: Duration,
    /// After this long without an event, the relay writes a heartbeat message so its slot keeps
    /// moving (and WAL is recycled) however idle the database is. Default 10 s.
    pub heartbeat_interval: Duration,
    /// Attempts before an event the broker keeps refusing is dead-lettered. Default 10.
    pub max_attempts: u32,
    /// The delay between attempts.
    pub backoff: Backoff,
    /// A publisher call that takes longer counts as the broker being unavailable. Default 30 s.
    pub publish_timeout: Duration,
    /// The circuit breaker, as for the polling relay.
    pub breaker: BreakerConfig,
    /// How often the slot's retained WAL is read for the metrics; `None` never. Default 10 s.
    pub metrics_interval: Option<Duration>,
}

impl Default for LogRelayConfig {
    fn default() -> Self {
        Self {
            slot: "seaorm_outbox".into(),
            publication: "seaorm_outbox".into(),
            message_prefix: MESSAGE_PREFIX.into(),
            transport: Transport::Stream,
            replication_url: None,
            confirm_interval: Duration::from_millis(100),
            table: false,
            on_publish: OnPublish::Retain,
            batch_size: 500,
            max_changes: 10_000,
            poll_interval: Duration::from_millis(2),
            idle_poll_interval: Duration::from_millis(100),
            standby_interval: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(10),
            max_attempts: 10,
            backoff: Backoff::default(),
            publish_timeout: Duration::from_secs(30),
            breaker: BreakerConfig::default(),
            metrics_interval: Some(Duration::from_secs(10)),
        }
    }
}

impl LogRelayConfig {
    setters! {
        /// Sets [`transport`](Self::transport).
        transport: Transport,
        /// Sets [`confirm_interval`](Self::confirm_interval).
        confirm_interval: Duration,
        /// Sets [`table`](Self::table).
        table: bool,
        /// Sets [`on_publish`](Self::on_publish).
        on_publish: OnPublish,
        /// Sets [`batch_size`](Self::batch_size).
        batch_size: u32,
        /// Sets [`max_changes`](Self::max_changes).
        max_changes: u32,
        /// Sets [`poll_interval`](Self::poll_interval).
        poll_interval: Duration,
        /// Sets [`idle_poll_interval`](Self::idle_poll_interval).
        idle_poll_interval: Duration,
        /// Sets [`standby_interval`](Self::standby_interval).
        standby_interval: Duration,
        /// Sets [`heartbeat_interval`](Self::heartbeat_interval).
        heartbeat_interval: Duration,
        /// Sets [`max_attempts`](Self::max_attempts).
        max_attempts: u32,
        /// Sets [`backoff`](Self::backoff).
        backoff: Backoff,
        /// Sets [`publish_timeout`](Self::publish_timeout).
        publish_timeout: Duration,
        /// Sets [`breaker`](Self::breaker).
        breaker: BreakerConfig,
        /// Sets [`metrics_interval`](Self::metrics_interval).
        metrics_interval: Option<Duration>,
    }

    /// Sets [`slot`](Self::slot).
    #[must_use]
    pub fn slot(mut self, name: impl Into<String>) -> Self {
        self.slot = name.into();
        self
    }

    /// Sets [`publication`](Self::publication).
    #[must_use]
    pub fn publication(mut self, name: impl Into<String>) -> Self {
        self.publication = name.into();
        self
    }

    /// Sets [`replication_url`](Self::replication_url).
    #[must_use]
    pub fn replication_url(mut self, url: impl Into<String>) -> Self {
        self.replication_url = Some(url.into());
        self
    }

    /// Sets [`message_prefix`](Self::message_prefix).
    #[must_use]
    pub fn message_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.message_prefix = prefix.into();
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        // Slot names: lower-case letters, digits and underscores, at most NAMEDATALEN - 1.
        if self.slot.is_empty()
            || self.slot.len() > 63
            || !self
                .slot
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return bad(format!(
                "slot `{}`: 1 to 63 lower-case letters, digits or underscores",
                self.slot
            ));
        }
        if self.publication.is_empty() || self.publication.len() > 63 {
            return bad(format!("publication `{}`: 1 to 63 bytes", self.publication));
        }
        if self.message_prefix.is_empty() || self.message_prefix.contains('\0') {
            return bad("message_prefix must be non-empty text".into());
        }
        if self.batch_size == 0 || self.batch_size > MAX_BATCH_SIZE {
            return bad(format!("batch_size must be 1..={MAX_BATCH_SIZE}"));
        }
        if self.max_changes == 0 || self.max_changes > i32::MAX as u32 {
            return bad("max_changes must be positive".into());
        }
        if self.max_attempts == 0 {
            return bad("max_attempts must be at least 1".into());
        }
        if self.poll_interval.is_zero() || self.idle_poll_interval < self.poll_interval {
            return bad("poll_interval must be positive and at most idle_poll_interval".into());
        }
        if self.standby_interval.is_zero() || self.heartbeat_interval.is_zero() {
            return bad("standby_interval and heartbeat_interval must be positive".into());
        }
        if self.confirm_interval.is_zero() {
            return bad("confirm_interval must be positive".into());
        }
        if self.publish_timeout.is_zero() {
            return bad("publish_timeout must be positive".into());
        }
        Ok(())
    }
}
