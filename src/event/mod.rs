//! Events going in ([`NewEvent`], [`DomainEvent`]) and coming out ([`OutboxEvent`]).

use std::collections::BTreeMap;
use std::io;

use chrono::{DateTime, SubsecRound, Utc};
use seaorm_outbox_entity::OutboxStatus;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use uuid::Uuid;

use crate::error::InvalidEvent;

#[cfg(feature = "postgres")]
mod envelope;
mod partition;
mod schedule;

pub use partition::{PARTITIONS, partition_of};

/// Free-form string headers: correlation id, causation id, W3C trace context, …
pub type Headers = BTreeMap<String, String>;

/// Longest `event_type`, `aggregate_type` or `aggregate_id`, in bytes (the column is
/// `varchar(255)`).
pub const MAX_KEY_BYTES: usize = 255;

/// A typed domain event that can be written to the outbox.
///
/// The payload is the event itself, serialised with serde.
///
/// ```
/// use seaorm_outbox::DomainEvent;
/// use serde::Serialize;
///
/// #[derive(Serialize)]
/// struct OrderPlaced {
///     order_id: u64,
///     total_cents: i64,
/// }
///
/// impl DomainEvent for OrderPlaced {
///     fn event_type(&self) -> &str {
///         "order.placed"
///     }
///     fn aggregate_type(&self) -> &str {
///         "order"
///     }
///     fn aggregate_id(&self) -> String {
///         self.order_id.to_string()
///     }
/// }
/// ```
pub trait DomainEvent: Serialize {
    /// What happened, e.g. `order.placed`.
    fn event_type(&self) -> &str;
    /// The kind of entity it happened to, e.g. `order`.
    fn aggregate_type(&self) -> &str;
    /// Which entity; with the aggregate type, the ordering and partition key.
    fn aggregate_id(&self) -> String;
    /// Headers to store with the event. None by default.
    fn headers(&self) -> Headers {
        Headers::new()
    }
}

/// An event to be written with [`OutboxRepository::add_event`](crate::OutboxRepository::add_event).
///
/// Problems found while building (a payload that fails to serialise, headers that are not a
/// string map) are kept and reported by `add_event` as [`InvalidEvent`], before anything is
/// written, so the builder chains without `?` at every step.
///
/// ```
/// use seaorm_outbox::NewEvent;
///
/// let event = NewEvent::new("order.placed", "order", "42")
///     .payload(&serde_json::json!({ "total_cents": 1999 }))
///     .header("correlation-id", "req-7");
/// assert_eq!(event.aggregate_id(), "42");
/// ```
#[derive(Debug)]
pub struct NewEvent {
    pub(crate) id: Uuid,
    pub(crate) event_type: String,
    pub(crate) aggregate_type: String,
    pub(crate) aggregate_id: String,
    pub(crate) payload: std::result::Result<Value, InvalidEvent>,
    pub(crate) headers: std::result::Result<Headers, InvalidEvent>,
    pub(crate) occurred_at: DateTime<Utc>,
    pub(crate) deliver_at: Option<DateTime<Utc>>,
    pub(crate) holds_aggregate: bool,
    pub(crate) expires_at: Option<DateTime<Utc>>,
}

impl NewEvent {
    /// A new event with a fresh UUIDv7 id, a `null` payload, no headers, occurring now.
    pub fn new(
        event_type: impl Into<String>,
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
    ) -> Self {
        Self {
            id: Uuid::now_v7(),
            event_type: event_type.into(),
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            payload: Ok(Value::Null),
            headers: Ok(Headers::new()),
            occurred_at: now(),
            deliver_at: None,
            holds_aggregate: false,
            expires_at: None,
        }
    }

    /// An event whose type, aggregate, headers and payload come from a [`DomainEvent`].
    pub fn from_domain<E: DomainEvent + ?Sized>(event: &E) -> Self {
        Self::new(
            event.event_type(),
            event.aggregate_type(),
            event.aggregate_id(),
        )
        .payload(event)
        .headers(event.headers())
    }

    /// Sets the payload by serialising `value` to JSON.
    #[must_use]
    pub fn payload<T: Serialize + ?Sized>(mut self, value: &T) -> Self {
        self.payload = serde_json::to_value(value).map_err(InvalidEvent::Payload);
        self
    }

    /// Sets an already-built JSON payload.
    #[must_use]
    pub fn json_payload(mut self, value: Value) -> Self {
        self.payload = Ok(value);
        self
    }

    /// Adds one header, replacing any earlier value for the key.
    #[must_use]
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        if let Ok(headers) = &mut self.headers {
            headers.insert(key.into(), value.into());
        }
        self
    }

    /// Adds headers, replacing earlier values for the same keys.
    #[must_use]
    pub fn headers(mut self, more: Headers) -> Self {
        if let Ok(headers) = &mut self.headers {
            headers.extend(more);
        }
        self
    }

    /// Adds headers from untyped JSON, which must be an object whose values are all strings.
    #[must_use]
    pub fn headers_json(mut self, value: Value) -> Self {
        let parsed = headers_from_json(value);
        match (&mut self.headers, parsed) {
            (Ok(headers), Ok(more)) => headers.extend(more),
            (Ok(_), Err(e)) => self.headers = Err(e),
            (Err(_), _) => {}
        }
        self
    }

    /// Overrides the generated id, e.g. to make a retried request write the same event id.
    #[must_use]
    pub fn id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }

    /// Sets when the event happened (default: when it was built). Stored to the microsecond.
    #[must_use]
    pub fn occurred_at(mut self, at: DateTime<Utc>) -> Self {
        self.occurred_at = at.trunc_subsecs(6);
        self
    }

    /// The event id, which is also the broker message id.
    pub fn event_id(&self) -> Uuid {
        self.id
    }

    /// The event type.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// The aggregate type.
    pub fn aggregate_type(&self) -> &str {
        &self.aggregate_type
    }

    /// The aggregate id.
    pub fn aggregate_id(&self) -> &str {
        &self.aggregate_id
    }

    /// Lets `f` add to the headers (trace context at write time); nothing if they are invalid.
    pub(crate) fn with_headers(mut self, f: impl FnOnce(&mut Headers)) -> Self {
        if let Ok(headers) = &mut self.headers {
            f(headers);
        }
        self
    }

    /// Checks every rule and returns the parts ready to insert.
    pub(crate) fn validate(self, max_payload_bytes: usize) -> Result<ValidEvent, InvalidEvent> {
        for (field, value) in [
            ("event_type", &self.event_type),
            ("aggregate_type", &self.aggregate_type),
            ("aggregate_id", &self.aggregate_id),
        ] {
            if value.trim().is_empty() {
                return Err(InvalidEvent::Empty { field });
            }
            if value.len() > MAX_KEY_BYTES {
                return Err(InvalidEvent::TooLong {
                    field,
                    len: value.len(),
                    max: MAX_KEY_BYTES,
                });
            }
        }
        let payload = self.payload?;
        let headers = self.headers?;
        if has_nul(&payload)
            || headers
                .iter()
                .any(|(k, v)| k.contains('\0') || v.contains('\0'))
            || [&self.event_type, &self.aggregate_type, &self.aggregate_id]
                .iter()
                .any(|s| s.contains('\0'))
        {
            return Err(InvalidEvent::NulCharacter);
        }
        let size = json_len(&payload);
        if size > max_payload_bytes {
            return Err(InvalidEvent::PayloadTooLarge {
                size,
                limit: max_payload_bytes,
            });
        }
        Ok(ValidEvent {
            id: self.id,
            event_type: self.event_type,
            aggregate_type: self.aggregate_type,
            aggregate_id: self.aggregate_id,
            payload,
            headers: Value::Object(
                headers
                    .into_iter()
                    .map(|(k, v)| (k, Value::String(v)))
                    .collect(),
            ),
            occurred_at: self.occurred_at,
            deliver_at: self.deliver_at,
            holds_aggregate: self.holds_aggregate,
            expires_at: self.expires_at,
        })
    }
}

/// A validated event, ready to insert.
pub(crate) struct ValidEvent {
    pub(crate) id: Uuid,
    pub(crate) event_type: String,
    pub(crate) aggregate_type: String,
    pub(crate) aggregate_id: String,
    pub(crate) payload: Value,
    pub(crate) headers: Value,
    pub(crate) occurred_at: DateTime<Utc>,
    /// The time it is scheduled for; `None` for at once.
    pub(crate) deliver_at: Option<DateTime<Utc>>,
    /// Scheduled, it holds its aggregate's later events ([`NewEvent::holds_later_events`]).
    pub(crate) holds_aggregate: bool,
    /// Not sent after this time.
    pub(crate) expires_at: Option<DateTime<Utc>>,
}

/// An event as stored in the outbox.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct OutboxEvent {
    /// UUIDv7; consumers deduplicate on it.
    pub id: Uuid,
    /// What happened.
    pub event_type: String,
    /// The kind of entity.
    pub aggregate_type: String,
    /// Which entity.
    pub aggregate_id: String,
    /// The body.
    pub payload: Value,
    /// String headers.
    pub headers: Headers,
    /// When it happened.
    pub occurred_at: DateTime<Utc>,
    /// When it was written.
    pub created_at: DateTime<Utc>,
    /// Pending, published or failed.
    pub status: OutboxStatus,
    /// Failed delivery attempts so far.
    pub attempts: u32,
    /// The last delivery error.
    pub last_error: Option<String>,
    /// Earliest time a relay may (re)claim it.
    pub next_attempt_at: DateTime<Utc>,
    /// When the broker acknowledged it.
    pub published_at: Option<DateTime<Utc>>,
    /// When it was dead-lettered.
    pub failed_at: Option<DateTime<Utc>>,
    /// The lease holder, while a relay is publishing it. Set on the events a relay hands its
    /// publisher; read back from the table it is only set on MySQL and SQLite, which lease
    /// row by row (PostgreSQL keeps one `outbox_leases` row per batch instead).
    pub locked_by: Option<String>,
    /// The time it was scheduled for ([`NewEvent::deliver_at`]), if it was.
    pub deliver_at: Option<DateTime<Utc>>,
    /// Not sent after this time ([`NewEvent::expires_at`]).
    pub expires_at: Option<DateTime<Utc>>,
}

impl OutboxEvent {
    /// Deserialises the payload into a typed value.
    ///
    /// # Errors
    /// serde's, when the payload does not deserialise into `T`.
    pub fn payload_as<T: DeserializeOwned>(&self) -> serde_json::Result<T> {
        T::deserialize(&self.payload)
    }
}

#[cfg(any(test, feature = "testing"))]
impl OutboxEvent {
    /// `new` as a claim would return it: pending, never attempted, due when it occurred.
    pub(crate) fn pending_from(new: NewEvent) -> Result<Self, InvalidEvent> {
        let v = new.validate(usize::MAX)?;
        let headers = headers_from_json(v.headers)?;
        Ok(Self {
            id: v.id,
            event_type: v.event_type,
            aggregate_type: v.aggregate_type,
            aggregate_id: v.aggregate_id,
            payload: v.payload,
            headers,
            occurred_at: v.occurred_at,
            created_at: v.occurred_at,
            status: OutboxStatus::Pending,
            attempts: 0,
            last_error: None,
            next_attempt_at: v.occurred_at,
            published_at: None,
            failed_at: None,
            locked_by: None,
            deliver_at: v.deliver_at,
            expires_at: v.expires_at,
        })
    }
}

#[cfg(test)]
impl OutboxEvent {
    pub(crate) fn pending_for_test(new: NewEvent) -> Self {
        Self::pending_from(new).expect("a valid test event")
    }
}

/// Now, to the microsecond: every backend stores microseconds, so values round-trip exactly.
pub(crate) fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// `value` as string headers, or why it is not a map of strings.
pub(crate) fn headers_from_json(value: Value) -> Result<Headers, InvalidEvent> {
    let Value::Object(map) = value else {
        return Err(InvalidEvent::Headers {
            reason: format!("expected an object, found {}", json_kind(&value)),
        });
    };
    map.into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k, s)),
            other => Err(InvalidEvent::Headers {
                reason: format!("header `{k}` is {}, not a string", json_kind(&other)),
            }),
        })
        .collect()
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Whether any string or key in `value` holds U+0000, which PostgreSQL cannot store in `jsonb`
/// or text; rejected everywhere so that every backend accepts the same events.
fn has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// The serialised size of `value`, counted without building the string.
fn json_len(value: &Value) -> usize {
    struct Counter(usize);
    impl io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Writing a `Value` into an infallible writer cannot fail.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_len_matches_serialised_length() {
        let v = serde_json::json!({"a": [1, 2, "ü"], "b": null});
        assert_eq!(
            json_len(&v),
            serde_json::to_string(&v).map(|s| s.len()).unwrap_or(0)
        );
    }

    #[test]
    fn header_errors_are_kept_until_validation() {
        let e = NewEvent::new("t", "a", "1")
            .headers_json(serde_json::json!({"k": 1}))
            .header("later", "ignored");
        assert!(matches!(
            e.validate(1024),
            Err(InvalidEvent::Headers { .. })
        ));
    }
}
