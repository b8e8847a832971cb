//! A new event's delivery time and expiry: when it may go, what it holds, when it may no longer.

use chrono::{DateTime, SubsecRound, Utc};

use super::{NewEvent, now};

impl NewEvent {
    /// Publishes the event no earlier than `at`, by the clock of the process that writes it
    /// (a relay claims it once its own clock reaches `at`, so a relay running ahead of the
    /// writer by `d` sends it up to `d` early). It is stored now, in the caller's transaction;
    /// a past time means now. Beyond [`OutboxConfig::max_delay`](crate::OutboxConfig) it is
    /// [`InvalidEvent::DeliverTooLate`](crate::InvalidEvent::DeliverTooLate), with nothing written.
    ///
    /// A scheduled event is ordered by its delivery time: its aggregate's events written after
    /// it are not held back, and go out before it if they are due first. To keep its place in
    /// its aggregate's order instead, add [`holds_later_events`](Self::holds_later_events).
    #[must_use]
    pub fn deliver_at(mut self, at: DateTime<Utc>) -> Self {
        self.deliver_at = Some(at.trunc_subsecs(6));
        self
    }

    /// [`deliver_at`](Self::deliver_at) now plus `delay`.
    #[must_use]
    pub fn deliver_after(self, delay: std::time::Duration) -> Self {
        // An overflowing delay is the latest time there is, which `max_delay` then refuses.
        let at = chrono::Duration::from_std(delay)
            .ok()
            .and_then(|d| now().checked_add_signed(d))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        self.deliver_at(at)
    }

    /// A scheduled event keeps its place in its aggregate's order: the aggregate's events
    /// written after it wait until it is delivered (a reminder that a later "cancelled" must
    /// not overtake). Without a delivery time it changes nothing.
    ///
    /// It costs one read more: the event is written due now, a relay reads it at once and
    /// hands it back until its time (no attempt spent), which is how the relay learns to hold
    /// the aggregate.
    #[must_use]
    pub fn holds_later_events(mut self) -> Self {
        self.holds_aggregate = true;
        self
    }

    /// Not sent after `at`: an event still undelivered then (a broker outage, retries, a
    /// backlog) is dead-lettered with the error `expired at …` instead, and counted
    /// ([`RelayStats::expired`](crate::relay::RelayStats), `outbox_events_expired_total`).
    /// Judged by the relay's clock when it is about to send. An expiry not after the event's
    /// delivery time is [`InvalidEvent::ExpiresBeforeDelivery`](crate::InvalidEvent::ExpiresBeforeDelivery), with nothing written.
    #[must_use]
    pub fn expires_at(mut self, at: DateTime<Utc>) -> Self {
        self.expires_at = Some(at.trunc_subsecs(6));
        self
    }

    /// [`expires_at`](Self::expires_at) `within` after the event's delivery time (now, or its
    /// [`deliver_at`](Self::deliver_at) if set before this call).
    #[must_use]
    pub fn deliver_within(self, within: std::time::Duration) -> Self {
        let from = self.deliver_at.unwrap_or_else(now).max(now());
        let at = chrono::Duration::from_std(within)
            .ok()
            .and_then(|d| from.checked_add_signed(d))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        self.expires_at(at)
    }

    /// When the event was scheduled for, if it was.
    pub fn scheduled_for(&self) -> Option<DateTime<Utc>> {
        self.deliver_at
    }
}
