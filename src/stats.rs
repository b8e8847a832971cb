//! Backlog statistics and health checks: what `count_unpublished` is for — health checks, lag
//! alerts and capacity planning — with the backlog's age and the dead letters alongside.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::ConnectionTrait;
use serde::Serialize;

use crate::error::Result;
use crate::event::now;
use crate::store;

/// A snapshot of the outbox.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct OutboxStats {
    /// When the snapshot was taken.
    pub at: DateTime<Utc>,
    /// Pending and due now (including claims whose lease has run out).
    pub pending_due: u64,
    /// Pending, waiting out a retry backoff.
    pub pending_backoff: u64,
    /// Pending, claimed by a relay under a live lease.
    pub pending_leased: u64,
    /// Dead letters.
    pub failed: u64,
    /// When the oldest pending event became due: its `occurred_at`, or its `deliver_at` if it
    /// was scheduled; events still scheduled for later do not count.
    pub oldest_pending_at: Option<DateTime<Utc>>,
    /// Pending, scheduled for later ([`NewEvent::deliver_at`](crate::NewEvent::deliver_at)):
    /// not part of the backlog, the due count or the lag.
    pub scheduled: u64,
    /// The earliest `deliver_at` of the scheduled events.
    pub next_scheduled_at: Option<DateTime<Utc>>,
    /// Events published in the hour before `at`: rows marked published since then, plus, for
    /// relays that delete on publish ([`OnPublish::Delete`](crate::relay::OnPublish)), their
    /// per-minute tally (to the minute).
    pub published_last_hour: u64,
}

impl OutboxStats {
    /// The backlog: pending events due, in backoff or leased; not those
    /// [`scheduled`](Self::scheduled) for later (`count_unpublished` counts both).
    pub fn pending(&self) -> u64 {
        self.pending_due + self.pending_backoff + self.pending_leased
    }

    /// How old the oldest pending event is.
    pub fn oldest_pending_age(&self) -> Option<Duration> {
        self.oldest_pending_at
            .map(|t| (self.at - t).to_std().unwrap_or_default())
    }

    /// Reads a snapshot with three indexed queries (pending rows, dead letters, the last hour of
    /// published rows); published history is never scanned.
    pub(crate) async fn read(db: &impl ConnectionTrait) -> Result<Self> {
        let at = now();
        let c = store::counts(db, at, at - chrono::Duration::hours(1)).await?;
        Ok(Self {
            at,
            pending_due: c.due,
            pending_backoff: c.backoff,
            pending_leased: c.leased,
            failed: c.failed,
            oldest_pending_at: c.oldest_pending_at,
            scheduled: c.scheduled,
            next_scheduled_at: c.next_scheduled_at,
            published_last_hour: c.published_since,
        })
    }
}

/// Whether the relay is sending to its publisher.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum BreakerState {
    /// The broker answers: batches go out as usual.
    #[default]
    Closed,
    /// The broker was unavailable: no claims until the next probe.
    Open,
    /// Probing with one small batch.
    HalfOpen,
}

impl BreakerState {
    /// The value of the `outbox_breaker_state` gauge: 0 closed, 1 open, 2 half-open.
    pub fn gauge(self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::Open => 1.0,
            Self::HalfOpen => 2.0,
        }
    }
}

impl BreakerState {
    /// As stored in `outbox_relays.breaker`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }

    /// From `outbox_relays.breaker`; anything unknown reads as closed.
    pub(crate) fn parse(s: &str) -> Self {
        match s {
            "open" => Self::Open,
            "half_open" => Self::HalfOpen,
            _ => Self::Closed,
        }
    }
}

/// A running relay as its last heartbeat recorded it in `outbox_relays`
/// ([`Outbox::relays`](crate::Outbox::relays)).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RelayHeartbeat {
    /// The relay's name ([`RelayConfig::name`](crate::RelayConfig::name)).
    pub name: String,
    /// Its publisher's name, e.g. `nats`.
    pub publisher: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it last wrote its row.
    pub heartbeat_at: DateTime<Utc>,
    /// Its circuit breaker.
    pub breaker: BreakerState,
    /// Since when its publisher has been unavailable.
    pub unavailable_since: Option<DateTime<Utc>>,
    /// What its publisher said last while unavailable.
    pub last_error: Option<String>,
    /// How many of the 256 hash partitions it owns (per-aggregate order on owned partitions;
    /// 0 for a relay claiming under leases, or one that holds none yet).
    pub partitions: u64,
}

impl RelayHeartbeat {
    /// Each relay's row with how many partitions it owns, from `owners` (owner token, count).
    /// Owner tokens are `<name>:<run id>`; a name reused by two runs adds up.
    pub(crate) fn with_partitions(
        beats: Vec<store::Heartbeat>,
        owners: &[(String, u64)],
    ) -> Vec<Self> {
        beats
            .into_iter()
            .map(|h| {
                let prefix = format!("{}:", h.name);
                let partitions = owners
                    .iter()
                    .filter(|(owner, _)| owner.starts_with(&prefix))
                    .map(|(_, n)| n)
                    .sum();
                Self {
                    partitions,
                    ..Self::from(h)
                }
            })
            .collect()
    }
}

impl From<store::Heartbeat> for RelayHeartbeat {
    fn from(h: store::Heartbeat) -> Self {
        Self {
            name: h.name,
            publisher: h.publisher,
            started_at: h.started_at,
            heartbeat_at: h.heartbeat_at,
            breaker: BreakerState::parse(&h.breaker),
            unavailable_since: h.unavailable_since,
            last_error: h.last_error,
            partitions: 0,
        }
    }
}

/// Overall health.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// Within every threshold.
    Healthy,
    /// Working, but a backlog, lag or dead-letter threshold is crossed, or the publisher is
    /// unavailable.
    Degraded,
    /// The database cannot be read, the relay loop has stopped polling, or its publisher has
    /// been unavailable for too long.
    Unhealthy,
}

/// Limits for [`Outbox::health`](crate::Outbox::health) and
/// [`Relay::health`](crate::Relay::health). Crossing any of the first three is
/// [`HealthStatus::Degraded`]; a relay not polling for `max_poll_gap` is
/// [`HealthStatus::Unhealthy`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct HealthThresholds {
    /// Pending events above this. Default 10,000.
    pub max_backlog: u64,
    /// Oldest pending event older than this. Default 5 min.
    pub max_oldest_pending_age: Duration,
    /// Dead letters above this. Default 0: any dead letter needs a look.
    pub max_dead_letters: u64,
    /// Relay loop silent for longer than this. Default 60 s.
    pub max_poll_gap: Duration,
    /// A relay's publisher unavailable for longer than this is unhealthy; before that it is
    /// degraded. Default 5 min.
    pub max_publisher_outage: Duration,
    /// The log relay: WAL not yet confirmed by its slot above this many bytes is degraded.
    /// Default 1 GiB.
    pub max_slot_lag_bytes: u64,
}

impl Default for HealthThresholds {
    fn default() -> Self {
        Self {
            max_backlog: 10_000,
            max_oldest_pending_age: Duration::from_secs(300),
            max_dead_letters: 0,
            max_poll_gap: Duration::from_secs(60),
            max_publisher_outage: Duration::from_secs(300),
            max_slot_lag_bytes: 1 << 30,
        }
    }
}

impl HealthThresholds {
    setters! {
        /// Sets [`max_backlog`](Self::max_backlog).
        max_backlog: u64,
        /// Sets [`max_oldest_pending_age`](Self::max_oldest_pending_age).
        max_oldest_pending_age: Duration,
        /// Sets [`max_dead_letters`](Self::max_dead_letters).
        max_dead_letters: u64,
        /// Sets [`max_poll_gap`](Self::max_poll_gap).
        max_poll_gap: Duration,
        /// Sets [`max_publisher_outage`](Self::max_publisher_outage).
        max_publisher_outage: Duration,
        /// Sets [`max_slot_lag_bytes`](Self::max_slot_lag_bytes).
        max_slot_lag_bytes: u64,
    }
}

/// A health verdict with its reasons and the numbers behind it.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct Health {
    /// The verdict.
    pub status: HealthStatus,
    /// Why it is not healthy; empty when healthy.
    pub reasons: Vec<String>,
    /// The snapshot, if the database could be read.
    pub stats: Option<OutboxStats>,
    /// The relay's last poll, for a relay's health.
    pub last_poll: Option<DateTime<Utc>>,
}

impl Health {
    /// The HTTP status to serve: 200 when healthy or degraded (the body says which), 503 when
    /// unhealthy.
    pub fn http_status(&self) -> u16 {
        match self.status {
            HealthStatus::Healthy | HealthStatus::Degraded => 200,
            HealthStatus::Unhealthy => 503,
        }
    }

    pub(crate) fn from_stats(stats: Result<OutboxStats>, t: &HealthThresholds) -> Self {
        let mut h = Self {
            status: HealthStatus::Healthy,
            reasons: Vec::new(),
            stats: None,
            last_poll: None,
        };
        match stats {
            Err(e) => h.unhealthy(format!("database unreadable: {e}")),
            Ok(s) => {
                if s.pending() > t.max_backlog {
                    h.degraded(format!("backlog {} over {}", s.pending(), t.max_backlog));
                }
                if let Some(age) = s.oldest_pending_age()
                    && age > t.max_oldest_pending_age
                {
                    h.degraded(format!(
                        "oldest pending event is {}s old, over {}s",
                        age.as_secs(),
                        t.max_oldest_pending_age.as_secs()
                    ));
                }
                if s.failed > t.max_dead_letters {
                    h.degraded(format!(
                        "{} dead letters, over {}",
                        s.failed, t.max_dead_letters
                    ));
                }
                h.stats = Some(s);
            }
        }
        h
    }

    /// A log relay's verdict: its slot (`Ok(None)`: missing), its dead letters, and the oldest
    /// commit it has not confirmed.
    #[cfg(feature = "postgres")]
    pub(crate) fn for_log_slot(
        name: &str,
        slot: Result<Option<crate::store::SlotStatus>>,
        dead_letters: Result<u64>,
        behind_since: Option<DateTime<Utc>>,
        t: &HealthThresholds,
    ) -> Self {
        let mut h = Self {
            status: HealthStatus::Healthy,
            reasons: Vec::new(),
            stats: None,
            last_poll: None,
        };
        match slot {
            Err(e) => h.unhealthy(format!("database unreadable: {e}")),
            Ok(None) => h.unhealthy(format!("replication slot `{name}` does not exist")),
            Ok(Some(s)) if s.wal_status == "lost" => h.unhealthy(format!(
                "replication slot `{name}` is lost: the WAL it needed was removed \
                 (max_slot_wal_keep_size); events written since may be lost"
            )),
            Ok(Some(s)) if s.lag_bytes > t.max_slot_lag_bytes => h.degraded(format!(
                "slot `{name}` is {} bytes of WAL behind, over {}",
                s.lag_bytes, t.max_slot_lag_bytes
            )),
            Ok(Some(_)) => {}
        }
        if let Some(age) = behind_since.and_then(|at| (now() - at).to_std().ok())
            && age > t.max_oldest_pending_age
        {
            h.degraded(format!(
                "oldest unconfirmed commit is {}s old, over {}s",
                age.as_secs(),
                t.max_oldest_pending_age.as_secs()
            ));
        }
        match dead_letters {
            Ok(n) if n > t.max_dead_letters => {
                h.degraded(format!("{n} log dead letters, over {}", t.max_dead_letters))
            }
            Ok(_) => {}
            Err(e) => h.degraded(format!("log dead letters unreadable: {e}")),
        }
        h
    }

    pub(crate) fn check_poll(&mut self, last_poll: Option<DateTime<Utc>>, t: &HealthThresholds) {
        self.last_poll = last_poll;
        match last_poll {
            None => self.unhealthy("relay has not polled yet".into()),
            Some(at) => {
                let gap = (now() - at).to_std().unwrap_or_default();
                if gap > t.max_poll_gap {
                    self.unhealthy(format!(
                        "relay has not polled for {}s, over {}s",
                        gap.as_secs(),
                        t.max_poll_gap.as_secs()
                    ));
                }
            }
        }
    }

    /// A relay's publisher has been unavailable since `since`: degraded, and unhealthy past
    /// `max_publisher_outage`.
    pub(crate) fn check_publisher(
        &mut self,
        publisher: &str,
        since: DateTime<Utc>,
        last_error: Option<&str>,
        t: &HealthThresholds,
    ) {
        let down = (now() - since).to_std().unwrap_or_default();
        let reason = format!(
            "publisher `{publisher}` unavailable for {}s: {}",
            down.as_secs(),
            last_error.unwrap_or("no answer")
        );
        if down > t.max_publisher_outage {
            self.unhealthy(format!(
                "{reason} (over {}s)",
                t.max_publisher_outage.as_secs()
            ));
        } else {
            self.degraded(reason);
        }
    }

    /// Lowers a healthy verdict to degraded and adds `reason`: for a caller that knows more
    /// than the table shows (the admin API, seeing a relay's open breaker in its heartbeat).
    pub fn degraded(&mut self, reason: String) {
        if self.status == HealthStatus::Healthy {
            self.status = HealthStatus::Degraded;
        }
        self.reasons.push(reason);
    }

    /// Raises the verdict to unhealthy and adds `reason`: for a caller that knows more than the
    /// table shows (the admin API, seeing a log relay's slot lost).
    pub fn unhealthy(&mut self, reason: String) {
        self.status = HealthStatus::Unhealthy;
        self.reasons.push(reason);
    }
}
