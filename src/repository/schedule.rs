//! Validation with delivery times and expiry, and taking back or moving a scheduled event.

use chrono::{DateTime, Utc};
use sea_orm::ConnectionTrait;
use uuid::Uuid;

use super::Outbox;
use crate::error::{InvalidEvent, Result};
use crate::event::{NewEvent, ValidEvent, now};
use crate::store;
use crate::telemetry;

impl<C: ConnectionTrait> Outbox<'_, C> {
    /// The latest time an event may be scheduled for, [`OutboxConfig::max_delay`](crate::OutboxConfig::max_delay) after `now`.
    fn latest(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        chrono::Duration::from_std(self.config.max_delay)
            .ok()
            .and_then(|d| now.checked_add_signed(d))
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    /// Validates every event, and resolves its delivery time against `now`: a past time is
    /// none, one beyond [`OutboxConfig::max_delay`](crate::OutboxConfig::max_delay) is refused.
    pub(super) fn validate(
        &self,
        events: Vec<NewEvent>,
        now: DateTime<Utc>,
    ) -> Result<Vec<ValidEvent>> {
        let max = self.config.max_payload_bytes;
        let latest = self.latest(now);
        let mut valid = Vec::with_capacity(events.len());
        for e in events {
            let mut v = e.with_headers(telemetry::trace::capture).validate(max)?;
            v.deliver_at = match v.deliver_at {
                Some(at) if at > latest => {
                    return Err(InvalidEvent::DeliverTooLate {
                        at,
                        max_delay: self.config.max_delay,
                    }
                    .into());
                }
                Some(at) if at > now => Some(at),
                _ => None,
            };
            v.holds_aggregate &= v.deliver_at.is_some();
            let from = v.deliver_at.unwrap_or(now);
            if let Some(expires_at) = v.expires_at.filter(|x| *x <= from) {
                return Err(InvalidEvent::ExpiresBeforeDelivery {
                    expires_at,
                    deliver_at: from,
                }
                .into());
            }
            valid.push(v);
        }
        Ok(valid)
    }

    /// Cancels a scheduled event ([`NewEvent::deliver_at`]) that no relay can have read yet:
    /// deletes it, inside the caller's transaction like [`add_event`](crate::OutboxRepository::add_event).
    ///
    /// Its time must be more than [`SCHEDULE_MARGIN`](super::SCHEDULE_MARGIN) (2 s) ahead when
    /// the statement runs, since relays read due rows without locking them; and the caller's
    /// transaction should commit before that time, or a relay may read the committed row first
    /// and send it.
    ///
    /// # Errors
    /// [`Error::NotFound`](crate::Error::NotFound); [`Error::InvalidState`](crate::Error::InvalidState) for a published event or a dead letter;
    /// [`Error::NotScheduled`](crate::Error::NotScheduled) for an event that was not scheduled, is due (or within the
    /// margin), or was already attempted; database errors. Never a silent no-op.
    pub async fn cancel(&self, id: Uuid) -> Result<()> {
        store::schedule::cancel(self.db, id, now()).await
    }

    /// Moves a scheduled event to `at` (a past time means now), under the same conditions as
    /// [`cancel`](Self::cancel). Inside the caller's transaction.
    ///
    /// # Errors
    /// As [`cancel`](Self::cancel); [`InvalidEvent::DeliverTooLate`] beyond
    /// [`OutboxConfig::max_delay`](crate::OutboxConfig::max_delay).
    pub async fn reschedule(&self, id: Uuid, at: DateTime<Utc>) -> Result<()> {
        let now = now();
        if at > self.latest(now) {
            return Err(InvalidEvent::DeliverTooLate {
                at,
                max_delay: self.config.max_delay,
            }
            .into());
        }
        store::schedule::reschedule(self.db, id, chrono::SubsecRound::trunc_subsecs(at, 6), now)
            .await
    }
}
