//! The routing and encoding state every broker publisher carries, with its setters written once.

use super::{Envelope, Message, Router};
use crate::event::OutboxEvent;

/// Where each event goes ([`Router`]) and how it is wrapped ([`Envelope`]).
#[derive(Clone, Debug, Default)]
pub(crate) struct Wire {
    pub(crate) router: Router,
    pub(crate) envelope: Envelope,
}

impl Wire {
    /// `event`'s destination and message; `ce_prefix` is the CloudEvents header prefix of the
    /// broker's protocol binding.
    pub(crate) fn encode(&self, event: &OutboxEvent, ce_prefix: &str) -> (String, Message) {
        (
            self.router.route(event),
            self.envelope.encode(event, ce_prefix),
        )
    }
}

/// The `router` and `envelope` setters of a publisher with a `wire: Wire` field; `$what` names
/// its destinations.
macro_rules! wire_setters {
    ($what:literal) => {
        #[doc = concat!("Sets how events map to ", $what, " (default: the aggregate type).")]
        #[must_use]
        pub fn router(mut self, router: $crate::wire::Router) -> Self {
            self.wire.router = router;
            self
        }

        /// Sets the envelope (default: [`Envelope::Plain`](crate::wire::Envelope::Plain)).
        #[must_use]
        pub fn envelope(mut self, envelope: $crate::wire::Envelope) -> Self {
            self.wire.envelope = envelope;
            self
        }
    };
}
pub(crate) use wire_setters;
