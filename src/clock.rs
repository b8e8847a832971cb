//! [`Clock`]: where a relay reads the time, so a test can move it.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};

/// The time a relay goes by: when an event is due, when a retry's backoff ends, when an event
/// has expired.
///
/// [`Clock::system`] (the default) is the host's clock. [`Clock::adjustable`] runs with it
/// plus an offset that [`advance`](Self::advance) moves forward, so a test of "deliver in an
/// hour" or of a 10-minute backoff takes milliseconds: give it to the relay with
/// [`RelayConfig::clock`](crate::RelayConfig::clock) (the `testing` feature's
/// `TestRelay` does). Clones share the offset.
///
/// ```
/// use std::time::Duration;
/// use seaorm_outbox::Clock;
///
/// let clock = Clock::adjustable();
/// let before = clock.now();
/// clock.advance(Duration::from_secs(3600));
/// assert!(clock.now() - before >= chrono::Duration::hours(1));
/// assert!(Clock::system().now() < clock.now());
/// ```
///
/// Only the relay's decisions follow it. The time an event was written, its `deliver_after`
/// and the database's own timestamps stay on the host's clock; the log relay reads the host's.
#[derive(Clone, Default)]
pub struct Clock {
    /// Microseconds ahead of the host's clock; `None` for the system clock.
    offset: Option<Arc<AtomicI64>>,
}

impl Clock {
    /// The host's clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// The host's clock plus an offset, zero until [`advance`](Self::advance)d.
    pub fn adjustable() -> Self {
        Self {
            offset: Some(Arc::default()),
        }
    }

    /// Now, to the microsecond (what every backend stores).
    pub fn now(&self) -> DateTime<Utc> {
        let now = crate::event::now();
        match &self.offset {
            Some(offset) => now + chrono::Duration::microseconds(offset.load(Ordering::Relaxed)),
            None => now,
        }
    }

    /// Moves an [`adjustable`](Self::adjustable) clock forward by `by`; the system clock can't
    /// be moved, so there it does nothing.
    pub fn advance(&self, by: Duration) {
        if let Some(offset) = &self.offset {
            let us = i64::try_from(by.as_micros()).unwrap_or(i64::MAX);
            offset.fetch_add(us, Ordering::Relaxed);
        }
    }

    /// How far ahead of the host's clock it is.
    pub fn offset(&self) -> Duration {
        self.offset.as_ref().map_or(Duration::ZERO, |o| {
            Duration::from_micros(u64::try_from(o.load(Ordering::Relaxed)).unwrap_or(0))
        })
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.offset {
            None => f.write_str("Clock::system"),
            Some(_) => f
                .debug_struct("Clock::adjustable")
                .field("offset", &self.offset())
                .finish(),
        }
    }
}
