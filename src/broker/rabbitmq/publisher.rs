//! RabbitMQ publisher (`rabbitmq` feature), on `lapin` with publisher confirms.

use async_trait::async_trait;
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use crate::error::BoxError;
use crate::event::OutboxEvent;
use crate::publisher::{PublishOutcome, Publisher};
use crate::wire::state::{Wire, wire_setters};

/// Publishes persistent messages (`delivery_mode` 2) with `message_id` set to the event id,
/// `mandatory` set, and publisher confirms on. Every event of a batch is published before any
/// confirm is awaited.
///
/// The exchange is fixed per publisher (default `""`, the default exchange); the routing key
/// comes from the [`Router`](crate::wire::Router) (default: the aggregate type). If the connection or channel fails,
/// the next batch reconnects.
///
/// Errors: a message returned as unroutable, one over [`max_message_bytes`](Self::max_message_bytes)
/// or with a header or routing key over AMQP's 255-byte short-string limit is permanent; a nack
/// is retryable; a refused or lost connection or a closed channel means the broker is
/// unavailable ([`PublishOutcome::Unavailable`]).
#[derive(Debug)]
pub struct RabbitMqPublisher {
    uri: String,
    exchange: String,
    wire: Wire,
    max_message_bytes: usize,
    channel: Mutex<Option<(Connection, Channel)>>,
}

impl RabbitMqPublisher {
    /// A publisher for `uri` (e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`). Connects lazily, on
    /// the first batch, and again after any connection failure.
    pub fn new(uri: impl Into<String>) -> Self {
        Self {
            uri: uri.into(),
            exchange: String::new(),
            wire: Wire::default(),
            max_message_bytes: 16 * 1024 * 1024,
            channel: Mutex::new(None),
        }
    }

    /// Publishes to `exchange` instead of the default exchange.
    #[must_use]
    pub fn exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = exchange.into();
        self
    }

    wire_setters!("routing keys");

    /// Bodies larger than this are rejected before sending, matching the broker's
    /// `max_message_size` (RabbitMQ 4's default, 16 MiB, unless set).
    #[must_use]
    pub fn max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    /// Connects now, so a bad URI or unreachable broker shows at start-up.
    ///
    /// # Errors
    /// lapin's, when the connection or its confirming channel cannot be opened.
    pub async fn connect(self) -> Result<Self, BoxError> {
        let mut slot = self.channel.lock().await;
        *slot = Some(open(&self.uri).await?);
        drop(slot);
        Ok(self)
    }

    fn message(
        &self,
        event: &OutboxEvent,
    ) -> Result<(ShortString, Vec<u8>, BasicProperties), String> {
        let (key, msg) = self.wire.encode(event, "ce-");
        if key.len() > 255 {
            return Err(format!(
                "routing key is {} bytes; AMQP allows 255",
                key.len()
            ));
        }
        if msg.body.len() > self.max_message_bytes {
            return Err(format!(
                "message is {} bytes; the limit is {}",
                msg.body.len(),
                self.max_message_bytes
            ));
        }
        let mut headers = FieldTable::default();
        for (k, v) in &msg.headers {
            if k.len() > 255 {
                return Err(format!("header name `{k}` is over AMQP's 255 bytes"));
            }
            headers.insert(
                ShortString::from(k.clone()),
                AMQPValue::LongString(LongString::from(v.clone())),
            );
        }
        let props = BasicProperties::default()
            .with_message_id(ShortString::from(event.id.to_string()))
            .with_delivery_mode(2)
            .with_content_type(ShortString::from(msg.content_type.to_owned()))
            .with_type(ShortString::from(event.event_type.clone()))
            .with_timestamp(u64::try_from(event.occurred_at.timestamp()).unwrap_or(0))
            .with_headers(headers);
        Ok((ShortString::from(key), msg.body, props))
    }
}

async fn open(uri: &str) -> Result<(Connection, Channel), lapin::Error> {
    let conn = Connection::connect(uri, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok((conn, channel))
}

#[async_trait]
impl Publisher for RabbitMqPublisher {
    async fn publish(&self, events: &[OutboxEvent]) -> Result<Vec<PublishOutcome>, BoxError> {
        // One batch at a time per publisher: confirms are per channel.
        let mut slot = self.channel.lock().await;
        let channel = match &*slot {
            Some((conn, ch)) if conn.status().connected() && ch.status().connected() => ch.clone(),
            _ => {
                *slot = None;
                let opened = open(&self.uri).await?;
                let ch = opened.1.clone();
                *slot = Some(opened);
                ch
            }
        };
        let exchange = ShortString::from(self.exchange.clone());
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let mut outcomes = vec![PublishOutcome::Delivered; events.len()];
        let mut confirms = Vec::with_capacity(events.len());
        let mut broken = false;
        for (i, event) in events.iter().enumerate() {
            let (key, body, props) = match self.message(event) {
                Ok(m) => m,
                Err(e) => {
                    outcomes[i] = PublishOutcome::Reject(e);
                    continue;
                }
            };
            match channel
                .basic_publish(exchange.clone(), key, options, &body, props)
                .await
            {
                Ok(confirm) => confirms.push((i, confirm)),
                Err(e) => {
                    broken = true;
                    outcomes[i] = PublishOutcome::Unavailable(e.to_string());
                }
            }
        }
        let results = futures_util::future::join_all(
            confirms
                .into_iter()
                .map(|(i, c)| async move { (i, c.await) }),
        )
        .await;
        // lapin hands a returned message to whichever confirm of the same (multiple) ack it
        // resolves first, not necessarily the returned message's own, so a return is matched
        // to its event by `message_id` (the event id). The broker sends a message's return
        // before its ack, so every return of this batch comes with one of its confirms.
        let mut returned = std::collections::HashMap::new();
        let mut acked = Vec::with_capacity(results.len());
        for (i, result) in results {
            match result {
                Ok(Confirmation::Ack(r)) => {
                    acked.push(i);
                    if let Some(r) = r {
                        returned.insert(r.delivery.properties.message_id().clone(), r);
                    }
                }
                Ok(Confirmation::Nack(r)) => {
                    if let Some(r) = r {
                        returned.insert(r.delivery.properties.message_id().clone(), r);
                    }
                    outcomes[i] = PublishOutcome::Retry("nacked by the broker".into());
                }
                Ok(Confirmation::NotRequested) => {
                    outcomes[i] = PublishOutcome::Retry("confirms were not enabled".into());
                }
                Err(e) => {
                    broken = true;
                    outcomes[i] = PublishOutcome::Unavailable(e.to_string());
                }
            }
        }
        for i in acked {
            let id = Some(ShortString::from(events[i].id.to_string()));
            outcomes[i] = match returned.remove(&id) {
                Some(r) => PublishOutcome::Reject(format!(
                    "unroutable: returned by the broker ({} {})",
                    r.reply_code, r.reply_text
                )),
                None => PublishOutcome::Delivered,
            };
        }
        // What is left was nacked too (retried anyway), or is not of this batch.
        let strays = returned
            .keys()
            .filter(|id| {
                !events
                    .iter()
                    .any(|e| Some(ShortString::from(e.id.to_string())) == **id)
            })
            .count();
        if strays > 0 {
            tracing::warn!(
                count = strays,
                "rabbitmq: returned messages matched no event of the batch"
            );
        }
        if broken {
            // Reconnect on the next batch.
            *slot = None;
        }
        Ok(outcomes)
    }

    fn name(&self) -> &str {
        "rabbitmq"
    }
}
