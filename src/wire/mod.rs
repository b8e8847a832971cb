//! How an outbox event becomes a broker message: routing, headers, body and the optional
//! CloudEvents 1.0 envelope. Shared by every broker publisher so they all agree on the format,
//! and by the inbox, which reads the same header names back.

#[cfg(any(
    feature = "kafka",
    feature = "nats",
    feature = "rabbitmq",
    feature = "redis"
))]
pub(crate) mod state;

use std::fmt;
use std::sync::Arc;

use chrono::SecondsFormat;
use serde_json::{Map, Value};

use crate::event::OutboxEvent;

/// Header names carried by every message in the plain envelope.
pub mod header {
    /// The event id (UUIDv7); consumers deduplicate on it.
    pub const EVENT_ID: &str = "event-id";
    /// The event type.
    pub const EVENT_TYPE: &str = "event-type";
    /// The aggregate type.
    pub const AGGREGATE_TYPE: &str = "aggregate-type";
    /// The aggregate id.
    pub const AGGREGATE_ID: &str = "aggregate-id";
    /// When the event occurred, RFC 3339 with microseconds.
    pub const OCCURRED_AT: &str = "occurred-at";
    /// The body's media type.
    pub const CONTENT_TYPE: &str = "content-type";
    /// When the event expires (`NewEvent::expires_at`), RFC 3339 with microseconds; only on
    /// events that have one. A consumer may drop a message that arrives after it.
    pub const EXPIRES_AT: &str = "expires-at";
}

/// The CloudEvents extension attribute carrying `expires-at` (extension names are lowercase
/// alphanumerics).
const CE_EXPIRES_AT: &str = "expiresat";

/// Maps an event to its destination: a topic, subject, routing key or stream key.
#[derive(Clone)]
pub struct Router(Arc<dyn Fn(&OutboxEvent) -> String + Send + Sync>);

impl Router {
    /// Routes with `f`.
    pub fn new(f: impl Fn(&OutboxEvent) -> String + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// The default: the event's `aggregate_type`.
    pub fn aggregate_type() -> Self {
        Self::new(|e| e.aggregate_type.clone())
    }

    /// `prefix` followed by the aggregate type, e.g. `outbox.order`.
    pub fn prefixed(prefix: impl Into<String>) -> Self {
        let prefix = prefix.into();
        Self::new(move |e| format!("{prefix}{}", e.aggregate_type))
    }

    /// Every event to the same destination.
    pub fn fixed(name: impl Into<String>) -> Self {
        let name = name.into();
        Self::new(move |_| name.clone())
    }

    /// The destination of `event`.
    pub fn route(&self, event: &OutboxEvent) -> String {
        (self.0)(event)
    }
}

impl Default for Router {
    fn default() -> Self {
        Self::aggregate_type()
    }
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Router(..)")
    }
}

/// How the event is wrapped on the wire.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Envelope {
    /// The payload JSON as the body; event metadata in headers named in [`header`].
    #[default]
    Plain,
    /// CloudEvents 1.0 binary mode: the payload as the body, attributes as `ce-*` headers
    /// (`ce_*` on Kafka, as its protocol binding says).
    CloudEventsBinary {
        /// The `source` attribute, e.g. `/orders-service`.
        source: String,
    },
    /// CloudEvents 1.0 structured mode: the whole event as a JSON body,
    /// `application/cloudevents+json`.
    CloudEventsStructured {
        /// The `source` attribute.
        source: String,
    },
}

/// A broker-neutral message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The partition/ordering key: the aggregate id.
    pub key: String,
    /// Headers, in order; the event's own headers come last and never replace ours.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
    /// The body's media type.
    pub content_type: &'static str,
}

impl Envelope {
    /// Encodes `event`. `ce_prefix` is the CloudEvents header prefix of the broker's binding
    /// (`ce-` for NATS, AMQP and Redis, `ce_` for Kafka).
    pub fn encode(&self, event: &OutboxEvent, ce_prefix: &str) -> Message {
        let occurred_at = event
            .occurred_at
            .to_rfc3339_opts(SecondsFormat::Micros, true);
        let id = event.id.to_string();
        let mut headers: Vec<(String, String)> = Vec::with_capacity(event.headers.len() + 8);
        let (body, content_type) = match self {
            Self::Plain => {
                plain_headers(&mut headers, event, &id, &occurred_at);
                (payload_bytes(&event.payload), "application/json")
            }
            Self::CloudEventsBinary { source } => {
                for (name, value) in ce_attributes(event, &id, source, &occurred_at) {
                    headers.push((format!("{ce_prefix}{name}"), value.to_owned()));
                }
                (payload_bytes(&event.payload), "application/json")
            }
            Self::CloudEventsStructured { source } => {
                plain_headers(&mut headers, event, &id, &occurred_at);
                let mut ce: Map<String, Value> = ce_attributes(event, &id, source, &occurred_at)
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), Value::String(v.to_owned())))
                    .collect();
                ce.insert(
                    "datacontenttype".to_owned(),
                    Value::String("application/json".to_owned()),
                );
                if let Some(at) = event.expires_at {
                    ce.insert(
                        CE_EXPIRES_AT.to_owned(),
                        Value::String(at.to_rfc3339_opts(SecondsFormat::Micros, true)),
                    );
                }
                ce.insert("data".to_owned(), event.payload.clone());
                (
                    payload_bytes(&Value::Object(ce)),
                    "application/cloudevents+json",
                )
            }
        };
        if let Some(at) = event.expires_at {
            let at = at.to_rfc3339_opts(SecondsFormat::Micros, true);
            let name = match self {
                Self::CloudEventsBinary { .. } => format!("{ce_prefix}{CE_EXPIRES_AT}"),
                _ => header::EXPIRES_AT.to_owned(),
            };
            headers.push((name, at));
        }
        headers.push((header::CONTENT_TYPE.to_owned(), content_type.to_owned()));
        for (k, v) in &event.headers {
            if !headers.iter().any(|(h, _)| h.eq_ignore_ascii_case(k)) {
                headers.push((k.clone(), v.clone()));
            }
        }
        Message {
            key: event.aggregate_id.clone(),
            headers,
            body,
            content_type,
        }
    }
}

/// The CloudEvents 1.0 attributes both modes carry (structured mode adds `datacontenttype`).
fn ce_attributes<'a>(
    e: &'a OutboxEvent,
    id: &'a str,
    source: &'a str,
    time: &'a str,
) -> [(&'static str, &'a str); 8] {
    [
        ("specversion", "1.0"),
        ("id", id),
        ("source", source),
        ("type", e.event_type.as_str()),
        ("subject", e.aggregate_id.as_str()),
        ("time", time),
        ("aggregatetype", e.aggregate_type.as_str()),
        ("aggregateid", e.aggregate_id.as_str()),
    ]
}

fn plain_headers(out: &mut Vec<(String, String)>, e: &OutboxEvent, id: &str, occurred_at: &str) {
    for (name, value) in [
        (header::EVENT_ID, id),
        (header::EVENT_TYPE, e.event_type.as_str()),
        (header::AGGREGATE_TYPE, e.aggregate_type.as_str()),
        (header::AGGREGATE_ID, e.aggregate_id.as_str()),
        (header::OCCURRED_AT, occurred_at),
    ] {
        out.push((name.to_owned(), value.to_owned()));
    }
}

fn payload_bytes(v: &Value) -> Vec<u8> {
    // Serialising a `Value` cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::NewEvent;

    fn sample() -> OutboxEvent {
        OutboxEvent::pending_for_test(
            NewEvent::new("order.placed", "order", "42")
                .payload(&serde_json::json!({"total": 5}))
                .header("traceparent", "00-abc-def-01")
                .header("event-id", "spoofed"),
        )
    }

    fn get<'a>(m: &'a Message, name: &str) -> Option<&'a str> {
        m.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn plain_carries_metadata_and_user_headers_without_spoofing() {
        let e = sample();
        let m = Envelope::Plain.encode(&e, "ce-");
        assert_eq!(m.key, "42");
        assert_eq!(m.body, br#"{"total":5}"#);
        assert_eq!(get(&m, header::EVENT_ID), Some(e.id.to_string().as_str()));
        assert_eq!(get(&m, "traceparent"), Some("00-abc-def-01"));
        assert_eq!(m.headers.iter().filter(|(k, _)| k == "event-id").count(), 1);
    }

    #[test]
    fn cloudevents_binary_and_structured() {
        let e = sample();
        let b = Envelope::CloudEventsBinary {
            source: "/svc".into(),
        }
        .encode(&e, "ce_");
        assert_eq!(get(&b, "ce_specversion"), Some("1.0"));
        assert_eq!(get(&b, "ce_type"), Some("order.placed"));
        assert_eq!(b.body, br#"{"total":5}"#);
        let s = Envelope::CloudEventsStructured {
            source: "/svc".into(),
        }
        .encode(&e, "ce-");
        let v: Value = serde_json::from_slice(&s.body).expect("json");
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["id"], e.id.to_string());
        assert_eq!(v["data"]["total"], 5);
        assert_eq!(s.content_type, "application/cloudevents+json");
    }

    #[test]
    fn the_expiry_travels_only_when_the_event_has_one() {
        let at = chrono::DateTime::parse_from_rfc3339("2030-01-02T03:04:05.000006Z")
            .expect("time")
            .with_timezone(&chrono::Utc);
        let e =
            OutboxEvent::pending_for_test(NewEvent::new("code.sent", "user", "7").expires_at(at));
        let want = Some("2030-01-02T03:04:05.000006Z");
        assert_eq!(
            get(&Envelope::Plain.encode(&e, "ce-"), header::EXPIRES_AT),
            want
        );
        let ce = Envelope::CloudEventsBinary {
            source: "/s".into(),
        };
        assert_eq!(get(&ce.encode(&e, "ce_"), "ce_expiresat"), want);
        let s = Envelope::CloudEventsStructured {
            source: "/s".into(),
        }
        .encode(&e, "ce-");
        let v: Value = serde_json::from_slice(&s.body).expect("json");
        assert_eq!(v["expiresat"], "2030-01-02T03:04:05.000006Z");
        assert_eq!(
            get(
                &Envelope::Plain.encode(&sample(), "ce-"),
                header::EXPIRES_AT
            ),
            None
        );
    }
}
