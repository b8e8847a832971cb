//! The [`Publisher`] trait the relay delivers through, and the built-in publishers.
//!
//! * [`InMemoryPublisher`]: records every delivery (and can stream them to a channel), for tests
//!   and for apps that consume in-process.
//! * [`StdoutPublisher`]: prints each event as a line, for the quick start and for debugging.
//! * The brokers' publishers live with their sources in [`crate::broker`], each behind its
//!   feature; they share one wire format, [`crate::wire`].

mod memory;
mod stdout;

use std::sync::Arc;

use async_trait::async_trait;

#[doc(hidden)]
pub use crate::error::BoxError;
use crate::event::OutboxEvent;

pub use self::memory::InMemoryPublisher;
#[allow(deprecated)]
pub use self::stdout::{LogPublisher, StdoutPublisher};

/// The wire format's old home: now [`crate::wire`].
#[doc(hidden)]
pub mod message {
    #[doc(hidden)]
    pub use crate::wire::{Envelope, Message, Router, header};
}
#[doc(hidden)]
pub use crate::wire::{Envelope, Message, Router};

// The broker publishers' old paths; they live in `crate::broker` now.
#[cfg(feature = "kafka")]
#[doc(hidden)]
pub use crate::broker::kafka::KafkaPublisher;
#[cfg(feature = "nats")]
#[doc(hidden)]
pub use crate::broker::nats::NatsPublisher;
#[cfg(feature = "rabbitmq")]
#[doc(hidden)]
pub use crate::broker::rabbitmq::RabbitMqPublisher;
#[cfg(feature = "redis")]
#[doc(hidden)]
pub use crate::broker::redis::RedisPublisher;
/// The Redis publisher's old module: now [`crate::broker::redis`].
#[cfg(feature = "redis")]
#[doc(hidden)]
pub mod redis {
    #[doc(hidden)]
    pub use crate::broker::redis::{BODY_FIELD, RedisPublisher};
}

/// What happened to one event of a batch.
///
/// The relay tells a bad event from a broker that is down: [`Retry`](Self::Retry) and
/// [`Reject`](Self::Reject) are about the event and spend its attempts;
/// [`Unavailable`](Self::Unavailable) is about the broker and spends nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PublishOutcome {
    /// The broker acknowledged it. It will be marked published.
    Delivered,
    /// The broker answered, but could not take this event now (a nack, a missing stream, a
    /// conflict): retried with backoff until `max_attempts`, then dead-lettered.
    Retry(String),
    /// A permanent failure (oversized, invalid subject, unroutable): dead-lettered at once.
    Reject(String),
    /// The broker could not be reached for it: connection refused or lost, no answer in time,
    /// no partition leader, the broker overloaded or read-only. Not the event's fault: it is
    /// handed back without spending an attempt. When every event of a call is unavailable the
    /// relay's circuit breaker opens and it stops claiming until a probe succeeds.
    Unavailable(String),
}

impl PublishOutcome {
    /// Whether the broker could not be reached for this event.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// Delivers claimed events to a broker.
///
/// `publish` gets a whole batch and must return one outcome per event, in the same order.
/// Implementations should pipeline: send every event, then await the acknowledgements, rather
/// than one blocking round trip per event.
///
/// **Writing your own.** Classify each failure by whose fault it is: the event's
/// ([`PublishOutcome::Retry`] when it may succeed later, [`PublishOutcome::Reject`] when it never
/// will) or the broker's ([`PublishOutcome::Unavailable`]: transport errors, timeouts, no
/// leader). Returning `Err` says the whole call failed for want of a broker, the same as every
/// event being unavailable, and so does a call that outlasts the relay's `publish_timeout`. A
/// call the relay counted as unavailable may still have been delivered (a client that buffers
/// and sends on reconnect): the relay sends those events again later, so consumers see a
/// duplicate with the same event id, never a dead letter.
///
/// When the relay runs in per-aggregate order it never puts two events of the same aggregate in
/// one call; otherwise events of one aggregate in a call are in order, and a publisher that
/// preserves order per key (Kafka partitions, one NATS connection) keeps it.
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Publishes `events` and reports an outcome for each, in order.
    async fn publish(&self, events: &[OutboxEvent]) -> Result<Vec<PublishOutcome>, BoxError>;

    /// A short name for logs and metric labels, such as `kafka`.
    fn name(&self) -> &str {
        "custom"
    }
}

/// A shared or boxed publisher publishes through the one it holds.
macro_rules! forward_publisher {
    ($($ptr:ident),*) => {$(
        #[async_trait]
        impl<P: Publisher + ?Sized> Publisher for $ptr<P> {
            async fn publish(&self, events: &[OutboxEvent]) -> Result<Vec<PublishOutcome>, BoxError> {
                (**self).publish(events).await
            }

            fn name(&self) -> &str {
                (**self).name()
            }
        }
    )*};
}

forward_publisher!(Arc, Box);
