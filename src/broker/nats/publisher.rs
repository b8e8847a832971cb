//! NATS JetStream publisher (`nats` feature), on the `async-nats` client.

use std::str::FromStr;

use async_nats::HeaderMap;
use async_nats::header::{HeaderName, HeaderValue};
use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use async_trait::async_trait;

use crate::error::BoxError;
use crate::event::OutboxEvent;
use crate::publisher::{PublishOutcome, Publisher};
use crate::wire::state::{Wire, wire_setters};

/// Publishes to JetStream with the event id as `Nats-Msg-Id`, so the server drops a
/// redelivered event within the stream's duplicate window.
///
/// Every event of a batch is sent before any acknowledgement is awaited. The subject comes from
/// the [`Router`](crate::wire::Router) (default: the aggregate type) and must be covered by a stream you created.
/// The client reconnects by itself; sends during an outage time out and are retried by the relay.
///
/// Errors: a message over the server's `max_payload`, an invalid subject or header are
/// permanent ([`PublishOutcome::Reject`]); a missing stream or a sequence conflict is retryable
/// ([`PublishOutcome::Retry`]); an ack timeout or a lost connection means the server is
/// unavailable ([`PublishOutcome::Unavailable`]). A message sent while disconnected waits in the
/// client's buffer and may still reach the stream after its ack timed out: the relay sends it
/// again later, and the server drops the copy if it comes within the duplicate window.
#[derive(Clone, Debug)]
pub struct NatsPublisher {
    js: jetstream::Context,
    wire: Wire,
}

impl NatsPublisher {
    /// A publisher on an existing client.
    pub fn new(client: async_nats::Client) -> Self {
        Self::from_context(jetstream::new(client))
    }

    /// A publisher on a configured JetStream context (timeouts, domain, max acks in flight).
    pub fn from_context(js: jetstream::Context) -> Self {
        Self {
            js,
            wire: Wire::default(),
        }
    }

    /// Connects to `url` with the client's defaults.
    ///
    /// # Errors
    /// The client's, when the first connection to `url` fails.
    pub async fn connect(url: &str) -> Result<Self, BoxError> {
        Ok(Self::new(async_nats::connect(url).await?))
    }

    wire_setters!("subjects");

    fn message(&self, event: &OutboxEvent) -> Result<(String, PublishMessage), String> {
        let (subject, msg) = self.wire.encode(event, "ce-");
        if !valid_subject(&subject) {
            return Err(format!("invalid NATS subject `{subject}`"));
        }
        let mut headers = HeaderMap::new();
        for (k, v) in &msg.headers {
            let name =
                HeaderName::from_str(k).map_err(|_| format!("invalid NATS header name `{k}`"))?;
            let value = HeaderValue::from_str(v)
                .map_err(|_| format!("invalid NATS header value for `{k}`"))?;
            headers.insert(name, value);
        }
        let publish = PublishMessage::build()
            .payload(msg.body.into())
            .headers(headers)
            .message_id(event.id.to_string());
        Ok((subject, publish))
    }
}

/// A publishable subject: dot-separated non-empty tokens, no whitespace, no wildcards.
fn valid_subject(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|t| {
            !t.is_empty()
                && t != "*"
                && t != ">"
                && !t.contains(|c: char| c.is_whitespace() || c == '*' || c == '>')
        })
}

fn classify(kind: PublishErrorKind, err: String) -> PublishOutcome {
    match kind {
        PublishErrorKind::MaxPayloadExceeded => PublishOutcome::Reject(err),
        // No ack in time (the client buffers while disconnected), a dropped connection, or the
        // client's own in-flight limit: the server is not answering.
        PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::MaxAckPending => PublishOutcome::Unavailable(err),
        _ => PublishOutcome::Retry(err),
    }
}

#[async_trait]
impl Publisher for NatsPublisher {
    async fn publish(&self, events: &[OutboxEvent]) -> Result<Vec<PublishOutcome>, BoxError> {
        let mut outcomes = vec![PublishOutcome::Delivered; events.len()];
        let mut acks = Vec::with_capacity(events.len());
        for (i, event) in events.iter().enumerate() {
            let (subject, publish) = match self.message(event) {
                Ok(m) => m,
                Err(e) => {
                    outcomes[i] = PublishOutcome::Reject(e);
                    continue;
                }
            };
            match self.js.send_publish(subject, publish).await {
                Ok(ack) => acks.push((i, ack)),
                Err(e) => outcomes[i] = classify(e.kind(), e.to_string()),
            }
        }
        let results = futures_util::future::join_all(
            acks.into_iter()
                .map(|(i, ack)| async move { (i, ack.await) }),
        )
        .await;
        for (i, result) in results {
            if let Err(e) = result {
                outcomes[i] = classify(e.kind(), e.to_string());
            }
        }
        Ok(outcomes)
    }

    fn name(&self) -> &str {
        "nats"
    }
}

#[cfg(test)]
mod tests {
    use super::valid_subject;

    #[test]
    fn subjects() {
        assert!(valid_subject("orders"));
        assert!(valid_subject("outbox.order.placed"));
        for bad in ["", "a..b", ".a", "a.", "a b", "a.*", "a.>", "a*"] {
            assert!(!valid_subject(bad), "{bad}");
        }
    }
}
