//! What a consumer receives ([`Incoming`]) and how its id and ordering key are found.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::handler_error::HandlerError;
use crate::wire::header;

/// One message as the handler sees it.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Incoming {
    /// The id the inbox deduplicates on ([`MessageId`]); empty until the consumer resolved it.
    pub message_id: String,
    /// Messages with the same key are handled one at a time, in arrival order ([`OrderingKey`]).
    pub ordering_key: Option<String>,
    /// Where it came from: topic, subject, queue or stream key.
    pub source: String,
    /// Its position there, where the broker has one: `partition/offset`, a stream sequence, an
    /// entry id.
    pub position: Option<String>,
    /// Headers (stream fields on Redis), in order.
    pub headers: Vec<(String, String)>,
    /// The body, as received.
    pub payload: Vec<u8>,
    /// The broker's own message id, where the protocol has one (AMQP `message-id`,
    /// `Nats-Msg-Id`).
    pub broker_id: Option<String>,
    /// The broker's own key, where the protocol has one (the Kafka record key).
    pub broker_key: Option<String>,
    /// Which handler attempt this is, from 1.
    pub attempt: u32,
    /// When this consumer first received it.
    pub received_at: DateTime<Utc>,
    /// Set when this is a replay of an inbox dead letter: that dead letter's id.
    pub replay_of: Option<Uuid>,
    /// The source knows this message was delivered before (NATS's delivery count, AMQP's
    /// `redelivered`, a Redis entry read from the pending list, a NATS message inside the
    /// window replayed after a crash). The consumer then first checks, with one read, whether
    /// it finished the message already, so a redelivery never runs the handler or stores a
    /// dead letter again.
    pub redelivered: bool,
    /// How many times the broker delivered it, this time included, where it counts them (NATS
    /// JetStream); 0 where it does not. Attempts made before, in earlier deliveries, count
    /// towards [`max_attempts`](super::ConsumerConfig::max_attempts), so a message handed back
    /// by [`retry_after`](super::HandlerError::retry_after) is not retried forever.
    pub deliveries: u32,
}

impl Incoming {
    /// A message from `source` with these headers and body; for [`Source`](super::Source)
    /// implementations.
    pub fn new(
        source: impl Into<String>,
        headers: Vec<(String, String)>,
        payload: Vec<u8>,
    ) -> Self {
        Self {
            message_id: String::new(),
            ordering_key: None,
            source: source.into(),
            position: None,
            headers,
            payload,
            broker_id: None,
            broker_key: None,
            attempt: 0,
            received_at: Utc::now(),
            replay_of: None,
            redelivered: false,
            deliveries: 0,
        }
    }

    setters! {
        /// Sets the position in the source.
        position: Option<String>,
        /// Sets the broker's own message id.
        broker_id: Option<String>,
        /// Sets the broker's own key.
        broker_key: Option<String>,
        /// Sets [`redelivered`](Self::redelivered).
        redelivered: bool,
        /// Sets [`deliveries`](Self::deliveries).
        deliveries: u32,
    }

    /// The first header named `name`, ignoring ASCII case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The event type, from the plain or the CloudEvents binary envelope.
    pub fn event_type(&self) -> Option<&str> {
        self.header(header::EVENT_TYPE)
            .or_else(|| self.header("ce-type"))
            .or_else(|| self.header("ce_type"))
    }

    /// The body deserialised as JSON into `T`. A body that does not fit `T` will never fit, so
    /// the error is permanent: the message is dead-lettered at once, not retried.
    ///
    /// # Errors
    /// A permanent [`HandlerError`] when the body does not fit `T`: it will never fit.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_slice(&self.payload).map_err(|e| {
            HandlerError::permanent(format!(
                "payload does not deserialise into {}: {e}",
                std::any::type_name::<T>()
            ))
        })
    }
}

type Extract = Arc<dyn Fn(&Incoming) -> Option<String> + Send + Sync>;

/// Where the inbox's dedup id comes from.
#[derive(Clone)]
pub struct MessageId(Extract);

impl MessageId {
    /// The default: the outbox's event id, in whichever envelope it came: the `event-id`
    /// header, else CloudEvents' `ce-id` / `ce_id`, else the broker's own message id.
    pub fn event_id() -> Self {
        Self::with(|m| {
            m.header(header::EVENT_ID)
                .or_else(|| m.header("ce-id"))
                .or_else(|| m.header("ce_id"))
                .map(str::to_owned)
                .or_else(|| m.broker_id.clone())
        })
    }

    /// The header `name`, and nothing else.
    pub fn header(name: impl Into<String>) -> Self {
        let name = name.into();
        Self::with(move |m| m.header(&name).map(str::to_owned))
    }

    /// Computed by `f`, e.g. a business key (an order number, an idempotency key) read from
    /// the payload. `None` means the message has no id ([`MissingId`] decides).
    pub fn with(f: impl Fn(&Incoming) -> Option<String> + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    pub(crate) fn of(&self, m: &Incoming) -> Option<String> {
        (self.0)(m).filter(|id| !id.trim().is_empty())
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::event_id()
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MessageId(..)")
    }
}

/// What to do with a message that has no id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum MissingId {
    /// Dead-letter it without calling the handler (the default): without an id the inbox
    /// cannot tell a redelivery from a new message.
    #[default]
    DeadLetter,
    /// Use its position in the source (`source@position`), which is stable across
    /// redeliveries on Kafka, NATS JetStream and Redis Streams. RabbitMQ has no position, so
    /// there it still dead-letters. Broker-side duplicates (a relay that sent twice) are
    /// different positions and are **not** caught this way.
    SourcePosition,
}

/// Which key serialises handling.
#[derive(Clone)]
pub struct OrderingKey(Option<Extract>);

impl OrderingKey {
    /// The default: the aggregate id (`aggregate-id`, `ce-aggregateid` / `ce_aggregateid`),
    /// else the broker's key.
    pub fn aggregate_id() -> Self {
        Self::with(|m| {
            m.header(header::AGGREGATE_ID)
                .or_else(|| m.header("ce-aggregateid"))
                .or_else(|| m.header("ce_aggregateid"))
                .map(str::to_owned)
                .or_else(|| m.broker_key.clone())
        })
    }

    /// Computed by `f`; messages for which it returns `None` are not ordered.
    pub fn with(f: impl Fn(&Incoming) -> Option<String> + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(f)))
    }

    /// No ordering: every message may run concurrently with every other.
    pub fn none() -> Self {
        Self(None)
    }

    pub(crate) fn of(&self, m: &Incoming) -> Option<String> {
        self.0.as_ref().and_then(|f| f(m))
    }
}

impl Default for OrderingKey {
    fn default() -> Self {
        Self::aggregate_id()
    }
}

impl fmt::Debug for OrderingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "OrderingKey(..)"
        } else {
            "OrderingKey::none()"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(headers: &[(&str, &str)]) -> Incoming {
        Incoming::new(
            "orders",
            headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            b"{}".to_vec(),
        )
    }

    #[test]
    fn ids_from_every_envelope() {
        let id = MessageId::default();
        assert_eq!(id.of(&msg(&[("Event-Id", "a")])).as_deref(), Some("a"));
        assert_eq!(id.of(&msg(&[("ce_id", "b")])).as_deref(), Some("b"));
        let m = msg(&[]).broker_id(Some("c".into()));
        assert_eq!(id.of(&m).as_deref(), Some("c"));
        assert_eq!(id.of(&msg(&[("event-id", "  ")])), None);
        assert_eq!(MessageId::header("x").of(&msg(&[("event-id", "a")])), None);
    }

    #[test]
    fn keys_and_payloads() {
        let k = OrderingKey::default();
        assert_eq!(k.of(&msg(&[("aggregate-id", "7")])).as_deref(), Some("7"));
        assert_eq!(OrderingKey::none().of(&msg(&[("aggregate-id", "7")])), None);
        #[derive(serde::Deserialize)]
        struct T {
            #[allow(dead_code)]
            n: u32,
        }
        let err = msg(&[]).json::<T>().err().expect("bad payload");
        assert!(err.is_permanent());
    }
}
