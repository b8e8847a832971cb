//! Relay settings: [`RelayConfig`] with `Default` and chained setters.

use std::time::Duration;

pub use crate::backoff::{Backoff, Jitter};
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::store::MAX_PAGE_SIZE;
pub use crate::store::OnPublish;

/// Largest accepted [`RelayConfig::batch_size`]; keeps every write-back statement under each
/// backend's bind-parameter limit.
pub const MAX_BATCH_SIZE: u32 = 5000;

/// How events are ordered on their way to the publisher.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ordering {
    /// Events of one aggregate (`aggregate_type`, `aggregate_id`) reach the publisher in
    /// `occurred_at`, id order, across any number of relays and through retries: a later event
    /// waits while an earlier one is pending, in backoff or in flight.
    #[default]
    PerAggregate,
    /// No ordering: the fastest; events are claimed oldest-due first.
    Unordered,
}

/// How relays divide the events between them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Claiming {
    /// Relays divide the 256 hash partitions of `(aggregate_type, aggregate_id)` among
    /// themselves ([`partition_of`](crate::event::partition_of)); each reads only its own, so it
    /// delivers every aggregate in order with a plain read of due rows, no per-row proof and no
    /// lease written at claim time. Ownership is renewed, rebalanced as relays come and go, and
    /// fenced: a write-back after the partition changed hands changes nothing. See the relay's
    /// module docs for what a pause longer than the lease can still cause.
    #[default]
    OwnedPartitions,
    /// Every relay claims from the whole table under a lease, proving per claimed event that it
    /// is its aggregate's head (the design before 0.2): any relay can take any event, at the
    /// cost of an index probe per event (none when unordered).
    Leases,
}

/// What happens to an aggregate's later events once one of its events is dead-lettered
/// (only with [`Ordering::PerAggregate`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadLetterPolicy {
    /// Carry on with the next event; the dead letter leaves the sequence.
    #[default]
    Continue,
    /// Hold the aggregate's later events until the dead letter is replayed or discarded.
    Hold,
}

/// What a relay does with an event whose [`expires_at`](crate::NewEvent::expires_at) passed
/// before it could be sent. Either way it is not sent, and it is counted in
/// [`RelayStats::expired`](super::RelayStats::expired) and `outbox_events_expired_total`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnExpiry {
    /// Dead-letter it with the error `expired at …`: it can be listed, replayed (which clears
    /// the expiry) or discarded like any dead letter.
    #[default]
    DeadLetter,
    /// Delete its row: for events worth nothing late (a price quote, a one-time code), so
    /// they do not fill the dead letters. It does not hold its aggregate under
    /// [`DeadLetterPolicy::Hold`].
    Discard,
}

/// The circuit breaker (see the relay's docs): how long to stop claiming once the publisher is
/// unavailable, and how much to send when probing it.
///
/// ```
/// use std::time::Duration;
/// use seaorm_outbox::relay::{BreakerConfig, RelayConfig};
///
/// let config = RelayConfig::default().breaker(
///     BreakerConfig::default()
///         .base(Duration::from_millis(500))
///         .cap(Duration::from_secs(30)),
/// );
/// assert_eq!(config.breaker.probe_batch_size, 10);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BreakerConfig {
    /// The first wait after the publisher is found unavailable. Default 1 s.
    pub base: Duration,
    /// The longest wait between probes; each failed probe doubles the wait up to this, with
    /// jitter (between half and all of it) so relays do not probe a returning broker together.
    /// Default 30 s.
    pub cap: Duration,
    /// Events claimed for a probe. Default 10.
    pub probe_batch_size: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(30),
            probe_batch_size: 10,
        }
    }
}

impl BreakerConfig {
    setters! {
        /// Sets [`base`](Self::base).
        base: Duration,
        /// Sets [`cap`](Self::cap).
        cap: Duration,
        /// Sets [`probe_batch_size`](Self::probe_batch_size).
        probe_batch_size: u32,
    }
}

/// Relay settings. Start from `RelayConfig::default()` and chain setters.
///
/// ```
/// use std::time::Duration;
/// use seaorm_outbox::relay::{Backoff, OnPublish, RelayConfig};
///
/// let config = RelayConfig::default()
///     .batch_size(500)
///     .max_attempts(8)
///     .backoff(Backoff::new(Duration::from_millis(200), Duration::from_secs(60)))
///     .retention(Some(Duration::from_secs(7 * 24 * 3600)));
/// assert_eq!(config.batch_size, 500);
///
/// // Nothing reads published events back: delete them in the write-back instead.
/// let draining = RelayConfig::default().on_publish(OnPublish::Delete);
/// assert_eq!(draining.on_publish, OnPublish::Delete);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RelayConfig {
    /// Events claimed per batch, 1 to [`MAX_BATCH_SIZE`]. Default 100.
    pub batch_size: u32,
    /// How long to sleep when there is nothing to do (push wake-ups cut it short). Default 1 s.
    pub idle_poll_interval: Duration,
    /// How long a claim is exclusive. A relay that dies mid-batch loses its events to another
    /// relay after this. Must exceed `publish_timeout`. Default 30 s.
    pub lease_duration: Duration,
    /// Longest wait for a publisher call before the whole call counts as a retryable failure.
    /// Default 10 s.
    pub publish_timeout: Duration,
    /// Failed attempts after which an event is dead-lettered. Default 10.
    pub max_attempts: u32,
    /// Delay between attempts.
    pub backoff: Backoff,
    /// What the relay does while the publisher is unavailable: no attempt is spent.
    pub breaker: BreakerConfig,
    /// Per-aggregate order (default) or none.
    pub ordering: Ordering,
    /// Owned partitions (default) or leases, ordered or not. Every relay on one table must
    /// claim the same way.
    pub claiming: Claiming,
    /// Owned partitions: how long a relay's hold on its partitions lasts without renewal,
    /// which is how long a dead relay's partitions wait before others take them over. Renewed
    /// every tenth of it; must exceed `publish_timeout` by half again. Default 20 s.
    pub partition_lease: Duration,
    /// What follows a dead letter under per-aggregate order. Default continue.
    pub dead_letter_policy: DeadLetterPolicy,
    /// What becomes of an event that expired unsent. Default [`OnExpiry::DeadLetter`].
    pub on_expiry: OnExpiry,
    /// Per-aggregate order on PostgreSQL: how many consecutive events of one aggregate a batch
    /// takes while enough aggregates are due to fill it. Each such run is published in as many
    /// waves (one event per aggregate per publisher call). When too few aggregates are due, a
    /// relay takes longer runs to fill its batch, easing back once they are no longer needed.
    /// Longer runs cost fewer ordering checks per event and leave more aggregates to other
    /// relays; shorter ones mean fewer waves per batch. MySQL and SQLite split each batch
    /// evenly between the aggregates they find. Default 8.
    pub events_per_aggregate: u32,
    /// What the write-back does with a published event's row: keep it marked `published`
    /// (default) or delete it. See [`OnPublish`] for when to choose which.
    pub on_publish: OnPublish,
    /// Delete published events older than this, in the background. Default `None` (keep all).
    pub retention: Option<Duration>,
    /// How often the retention purge runs. Default 5 min.
    pub purge_interval: Duration,
    /// Rows deleted per purge statement. Default 1000.
    pub purge_batch_size: u64,
    /// LISTEN for the insert trigger's NOTIFY on PostgreSQL (needs the `postgres` feature).
    /// Turn it off behind PgBouncer in transaction pooling mode. Default on.
    pub listen_notify: bool,
    /// On shutdown, how long an in-flight publish may still finish and be written back before
    /// its events are released unmarked. Default 5 s.
    pub shutdown_grace: Duration,
    /// Prefix of this relay's lease tokens (`locked_by` on MySQL/SQLite, `outbox_leases.token`
    /// on PostgreSQL); default `relay-<pid>-<random>`.
    pub name: Option<String>,
    /// How often the relay refreshes the backlog gauges (`outbox_backlog`, …) with one
    /// statistics query, and writes that snapshot to its minute's row of
    /// `outbox_backlog_samples` for the admin dashboard's chart. `None` turns both off.
    /// Default 15 s.
    pub metrics_interval: Option<Duration>,
    /// How often the relay refreshes its row in `outbox_relays` (name, publisher, breaker
    /// state), which `seaorm-outbox status` and [`Outbox::relays`](crate::Outbox::relays) read;
    /// it also writes at once when its breaker opens or closes, and removes the row when it
    /// stops. `None` keeps the relay out of the table. Default 10 s. A relay on owned
    /// partitions writes its row every `partition_lease / 10` instead, whatever this says: the
    /// rows are how relays count each other to divide the partitions.
    pub heartbeat_interval: Option<Duration>,
    /// The time its decisions go by: when an event is due, a backoff over, an event expired.
    /// Default [`Clock::system`]; a test gives it a [`Clock::adjustable`] to move it forward.
    pub clock: Clock,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 100,
            idle_poll_interval: Duration::from_secs(1),
            lease_duration: Duration::from_secs(30),
            publish_timeout: Duration::from_secs(10),
            max_attempts: 10,
            backoff: Backoff::default(),
            breaker: BreakerConfig::default(),
            ordering: Ordering::default(),
            claiming: Claiming::default(),
            partition_lease: Duration::from_secs(20),
            dead_letter_policy: DeadLetterPolicy::default(),
            on_expiry: OnExpiry::default(),
            events_per_aggregate: 8,
            on_publish: OnPublish::default(),
            retention: None,
            purge_interval: Duration::from_secs(300),
            purge_batch_size: 1000,
            listen_notify: true,
            shutdown_grace: Duration::from_secs(5),
            name: None,
            metrics_interval: Some(Duration::from_secs(15)),
            heartbeat_interval: Some(Duration::from_secs(10)),
            clock: Clock::system(),
        }
    }
}

impl RelayConfig {
    setters! {
        /// Sets [`batch_size`](Self::batch_size).
        batch_size: u32,
        /// Sets [`idle_poll_interval`](Self::idle_poll_interval).
        idle_poll_interval: Duration,
        /// Sets [`lease_duration`](Self::lease_duration).
        lease_duration: Duration,
        /// Sets [`publish_timeout`](Self::publish_timeout).
        publish_timeout: Duration,
        /// Sets [`max_attempts`](Self::max_attempts).
        max_attempts: u32,
        /// Sets [`backoff`](Self::backoff).
        backoff: Backoff,
        /// Sets [`breaker`](Self::breaker).
        breaker: BreakerConfig,
        /// Sets [`ordering`](Self::ordering).
        ordering: Ordering,
        /// Sets [`claiming`](Self::claiming).
        claiming: Claiming,
        /// Sets [`partition_lease`](Self::partition_lease).
        partition_lease: Duration,
        /// Sets [`dead_letter_policy`](Self::dead_letter_policy).
        dead_letter_policy: DeadLetterPolicy,
        /// Sets [`on_expiry`](Self::on_expiry).
        on_expiry: OnExpiry,
        /// Sets [`events_per_aggregate`](Self::events_per_aggregate).
        events_per_aggregate: u32,
        /// Sets [`on_publish`](Self::on_publish).
        on_publish: OnPublish,
        /// Sets [`retention`](Self::retention).
        retention: Option<Duration>,
        /// Sets [`purge_interval`](Self::purge_interval).
        purge_interval: Duration,
        /// Sets [`purge_batch_size`](Self::purge_batch_size).
        purge_batch_size: u64,
        /// Sets [`listen_notify`](Self::listen_notify).
        listen_notify: bool,
        /// Sets [`shutdown_grace`](Self::shutdown_grace).
        shutdown_grace: Duration,
        /// Sets [`metrics_interval`](Self::metrics_interval).
        metrics_interval: Option<Duration>,
        /// Sets [`clock`](Self::clock).
        clock: Clock,
        /// Sets [`heartbeat_interval`](Self::heartbeat_interval).
        heartbeat_interval: Option<Duration>,
    }

    /// Sets [`name`](Self::name).
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Whether this relay claims through owned partitions.
    pub(crate) fn owns_partitions(&self) -> bool {
        self.claiming == Claiming::OwnedPartitions
    }

    /// Owned partitions: how long after a renewal is sent the relay may still start a publish
    /// (see [`ownership`](super::ownership)).
    pub(crate) fn usable_partition_lease(&self) -> Duration {
        self.partition_lease
            .saturating_sub(self.partition_lease / 5)
            .saturating_sub(self.publish_timeout)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let fail = |msg: String| Err(Error::Config(msg));
        if self.batch_size == 0 || self.batch_size > MAX_BATCH_SIZE {
            return fail(format!(
                "batch_size must be 1..={MAX_BATCH_SIZE}, got {}",
                self.batch_size
            ));
        }
        if self.events_per_aggregate == 0 {
            return fail("events_per_aggregate must be at least 1".into());
        }
        if self.max_attempts == 0 {
            return fail("max_attempts must be at least 1".into());
        }
        if self.idle_poll_interval.is_zero() {
            return fail("idle_poll_interval must be positive".into());
        }
        if self.lease_duration <= self.publish_timeout {
            return fail(format!(
                "lease_duration ({:?}) must exceed publish_timeout ({:?}), or a slow publish \
                 would let a second relay claim the same events",
                self.lease_duration, self.publish_timeout
            ));
        }
        if self.owns_partitions() && self.partition_lease.mul_f64(0.7) <= self.publish_timeout {
            return fail(format!(
                "partition_lease ({:?}) must exceed publish_timeout ({:?}) by half again: a \
                 publish must end before the lease it started under",
                self.partition_lease, self.publish_timeout
            ));
        }
        if self.backoff.base > self.backoff.cap {
            return fail("backoff base must not exceed its cap".into());
        }
        if self.breaker.base.is_zero() || self.breaker.base > self.breaker.cap {
            return fail("breaker base must be positive and not exceed its cap".into());
        }
        if self.breaker.probe_batch_size == 0 {
            return fail("breaker probe_batch_size must be at least 1".into());
        }
        if self.purge_batch_size == 0 || self.purge_batch_size > MAX_PAGE_SIZE {
            return fail(format!("purge_batch_size must be 1..={MAX_PAGE_SIZE}"));
        }
        if self.metrics_interval.is_some_and(|d| d.is_zero()) {
            return fail("metrics_interval must be positive".into());
        }
        if self.heartbeat_interval.is_some_and(|d| d.is_zero()) {
            return fail("heartbeat_interval must be positive".into());
        }
        if self.retention.is_some() && self.purge_interval.is_zero() {
            return fail("purge_interval must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_rejects_unsafe_settings() {
        assert!(RelayConfig::default().validate().is_ok());
        assert!(RelayConfig::default().batch_size(0).validate().is_err());
        assert!(
            RelayConfig::default()
                .batch_size(MAX_BATCH_SIZE + 1)
                .validate()
                .is_err()
        );
        assert!(RelayConfig::default().max_attempts(0).validate().is_err());
        assert!(
            RelayConfig::default()
                .events_per_aggregate(0)
                .validate()
                .is_err()
        );
        assert!(
            RelayConfig::default()
                .breaker(BreakerConfig::default().base(Duration::ZERO))
                .validate()
                .is_err()
        );
        assert!(
            RelayConfig::default()
                .breaker(BreakerConfig::default().probe_batch_size(0))
                .validate()
                .is_err()
        );
        let slow = RelayConfig::default()
            .lease_duration(Duration::from_secs(5))
            .publish_timeout(Duration::from_secs(5));
        assert!(matches!(slow.validate(), Err(Error::Config(_))));
    }
}
