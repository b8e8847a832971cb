//! The circuit breaker: a broker that is down is not a bad event.
//!
//! A publisher call whose every event came back [`PublishOutcome::Unavailable`] (or that failed
//! as a whole, or timed out) opens the breaker: the batch is handed back unattempted, and the
//! relay stops claiming. After a capped, jittered exponential delay it claims one small batch
//! (half-open); the first call the broker answers closes it again. While it is open no attempt
//! is spent and nothing is dead-lettered, however long the outage lasts.
//!
//! [`PublishOutcome::Unavailable`]: crate::PublishOutcome::Unavailable

use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use serde::Serialize;
use tokio::time::Instant;

use super::config::BreakerConfig;
#[doc(hidden)]
pub use crate::stats::BreakerState;
use crate::telemetry::metrics;

/// A relay's view of its publisher, for health checks and operators.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct BreakerStatus {
    /// Open, half-open or closed.
    pub state: BreakerState,
    /// When the current outage began; `None` while closed.
    pub unavailable_since: Option<DateTime<Utc>>,
    /// What the publisher said last while unavailable.
    pub last_error: Option<String>,
}

impl BreakerStatus {
    /// How long the publisher has been unavailable, as of `now`; zero while closed.
    pub fn unavailable_for(&self, now: DateTime<Utc>) -> Duration {
        self.unavailable_since
            .and_then(|since| (now - since).to_std().ok())
            .unwrap_or_default()
    }
}

/// What the relay may do next.
pub(super) enum Permit {
    /// Claim up to this many events.
    Claim(u32),
    /// Claim nothing before then.
    Wait(Instant),
}

/// One relay's breaker.
#[derive(Debug, Default)]
pub(super) struct Breaker {
    status: BreakerStatus,
    /// The open interval before jitter: doubles with each failed probe, up to the cap.
    delay: Duration,
    reopen_at: Option<Instant>,
}

impl Breaker {
    pub(super) fn status(&self) -> BreakerStatus {
        self.status.clone()
    }

    /// While open: when the next probe may go.
    pub(super) fn reopen_at(&self) -> Option<Instant> {
        match self.status.state {
            BreakerState::Closed => None,
            _ => self.reopen_at,
        }
    }

    fn record(&self, publisher: &str) {
        let down = self.status.unavailable_for(crate::event::now());
        metrics::record_breaker(publisher, self.status.state.gauge(), down);
    }

    /// Whether to claim now, and how much: a whole batch while closed, a probe once an open
    /// breaker's delay has passed.
    pub(super) fn permit(&mut self, cfg: &BreakerConfig, batch: u32, publisher: &str) -> Permit {
        if self.status.state == BreakerState::Closed {
            return Permit::Claim(batch);
        }
        self.record(publisher);
        match self.reopen_at {
            Some(at) if Instant::now() < at => Permit::Wait(at),
            _ => {
                self.status.state = BreakerState::HalfOpen;
                Permit::Claim(cfg.probe_batch_size.min(batch))
            }
        }
    }

    /// A call found the publisher unavailable: open, or stay open for longer.
    pub(super) fn unavailable(
        &mut self,
        cfg: &BreakerConfig,
        error: &str,
        relay: &str,
        publisher: &str,
    ) {
        let now = crate::event::now();
        if self.status.state == BreakerState::Closed {
            self.delay = cfg.base;
            self.status.unavailable_since = Some(now);
            tracing::warn!(relay, publisher, error, retry_in = ?cfg.base,
                "outbox publisher unavailable; circuit breaker open, batches are handed back unattempted");
        } else {
            self.delay = self.delay.saturating_mul(2).min(cfg.cap);
            tracing::debug!(relay, publisher, error, retry_in = ?self.delay, "outbox publisher still unavailable");
        }
        self.status.state = BreakerState::Open;
        self.status.last_error = Some(error.to_owned());
        self.reopen_at = Some(Instant::now() + jittered(self.delay));
        self.record(publisher);
    }

    /// The publisher answered a call (whatever it said of each event): close.
    pub(super) fn answered(&mut self, relay: &str, publisher: &str) {
        if self.status.state == BreakerState::Closed {
            return;
        }
        let down = self.status.unavailable_for(crate::event::now());
        tracing::info!(relay, publisher, unavailable_for = ?down, "outbox publisher answers again; circuit breaker closed");
        *self = Self::default();
        self.record(publisher);
    }
}

/// "Equal jitter": between half the delay and all of it, so relays that saw the same outage
/// do not probe together, and none probes at once.
fn jittered(delay: Duration) -> Duration {
    let half = delay / 2;
    let spread = u64::try_from(half.as_micros()).unwrap_or(u64::MAX);
    half + Duration::from_micros(rand::rng().random_range(0..=spread))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig::default()
            .base(Duration::from_millis(100))
            .cap(Duration::from_millis(400))
            .probe_batch_size(5)
    }

    #[tokio::test(start_paused = true)]
    async fn opens_waits_probes_backs_off_and_closes() {
        let (cfg, mut b) = (cfg(), Breaker::default());
        assert!(matches!(b.permit(&cfg, 100, "p"), Permit::Claim(100)));
        b.unavailable(&cfg, "refused", "r", "p");
        assert_eq!(b.status().state, BreakerState::Open);
        assert!(b.status().unavailable_since.is_some());
        let Permit::Wait(until) = b.permit(&cfg, 100, "p") else {
            panic!("an open breaker waits");
        };
        let wait = until - Instant::now();
        assert!(wait >= Duration::from_millis(50) && wait <= Duration::from_millis(100));
        tokio::time::advance(wait).await;
        assert!(
            matches!(b.permit(&cfg, 100, "p"), Permit::Claim(5)),
            "a probe"
        );
        assert_eq!(b.status().state, BreakerState::HalfOpen);
        // Failed probes double the delay up to the cap.
        for want in [200, 400, 400] {
            b.unavailable(&cfg, "refused", "r", "p");
            let Permit::Wait(until) = b.permit(&cfg, 100, "p") else {
                panic!("still open");
            };
            let wait = until - Instant::now();
            assert!(wait >= Duration::from_millis(want / 2) && wait <= Duration::from_millis(want));
            tokio::time::advance(wait).await;
            assert!(matches!(b.permit(&cfg, 100, "p"), Permit::Claim(5)));
        }
        b.answered("r", "p");
        assert_eq!(b.status(), BreakerStatus::default());
        assert!(matches!(b.permit(&cfg, 100, "p"), Permit::Claim(100)));
    }
}
