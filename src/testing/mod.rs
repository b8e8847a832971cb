//! A test kit for apps (feature `testing`): test your own events without a broker and
//! without sleeps.
//!
//! - [`events_written`]: what your code wrote to the outbox, read on the connection or inside
//!   the transaction that wrote it.
//! - [`TestRelay`]: a real [`Relay`](crate::Relay) publishing into memory, with
//!   [`drain_until`](TestRelay::drain_until) and [`await_delivered`](TestRelay::await_delivered),
//!   on an adjustable [`Clock`](crate::Clock): [`advance`](TestRelay::advance) makes an event
//!   scheduled an hour ahead, or a retry's backoff, due at once.
//! - [`MemorySource`]: a [`Source`](crate::inbox::Source) fed by the test, so a consumer's
//!   handler runs through the real [`Consumer`](crate::inbox::Consumer): retries, dead letters,
//!   duplicates, `retry_after`.
//!
//! Each works on every backend; the examples run on SQLite.

mod relay;
mod source;
mod written;

pub use relay::TestRelay;
pub use source::{MemoryFeed, MemorySource};
pub use written::events_written;

use std::time::Duration;

/// `new` as the outbox stores it, pending: an [`OutboxEvent`](crate::OutboxEvent) to hand to
/// [`MemoryFeed::send_event`] or to a publisher under test, without a database.
///
/// # Errors
/// [`InvalidEvent`](crate::InvalidEvent), as [`Outbox::add_event`](crate::OutboxRepository::add_event) would refuse it.
pub fn stored(new: crate::NewEvent) -> Result<crate::OutboxEvent, crate::InvalidEvent> {
    crate::OutboxEvent::pending_from(new)
}

/// What the kit's waits return.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KitError {
    /// What the test waited for did not happen in time.
    #[error("{what} did not happen within {waited:?}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long it waited.
        waited: Duration,
    },
    /// The outbox or inbox failed.
    #[error(transparent)]
    Outbox(#[from] crate::Error),
}

/// Polls `check` every few milliseconds until it returns `Some`, or `timeout` passes.
async fn wait_for<T>(
    what: impl FnOnce() -> String,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T, KitError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(found) = check() {
            return Ok(found);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(KitError::Timeout {
                what: what(),
                waited: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
