//! RabbitMQ source (`rabbitmq` feature): a queue consumed with manual acks, bounded prefetch.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Connection, ConnectionProperties};

use crate::error::BoxError;
use crate::error::Result;
use crate::inbox::Incoming;
use crate::inbox::{Acknowledge, Delivery, RECONNECT_DELAY, Source, SourceContext, pause};

use super::acks::ChannelAcks;

/// Consumes an existing queue with manual acknowledgements and at most
/// [`prefetch`](Self::prefetch) unacknowledged messages, acking each after its transaction
/// committed. Declare and bind the queue yourself (durable, for an outbox's events).
///
/// After a lost connection or a crash the broker requeues whatever was unacknowledged on the
/// old channel, flagged `redelivered`: the consumer checks those against the inbox and the dead
/// letters with one read each, and applies only what it had not finished. Nothing acknowledged
/// comes again. A graceful stop cancels the subscription and applies what was already sent.
///
/// In batch mode a batch is acknowledged with one `multiple` ack where no other unacknowledged
/// message of the channel lies below its tags (those of a batch still running or retrying
/// would be acknowledged with it), and one by one past such a message.
///
/// AMQP gives a message no stable position, so a message with no id that is dead-lettered is
/// recognised on redelivery by its bytes (source, headers and body).
#[derive(Clone, Debug)]
pub struct RabbitMqSource {
    uri: String,
    queue: String,
    prefetch: u16,
}

impl RabbitMqSource {
    /// Consumes `queue` at `uri` (e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`).
    pub fn new(uri: impl Into<String>, queue: impl Into<String>) -> Self {
        Self {
            uri: uri.into(),
            queue: queue.into(),
            prefetch: 256,
        }
    }

    /// Unacknowledged messages the broker may send ahead (default 256).
    #[must_use]
    pub fn prefetch(mut self, n: u16) -> Self {
        self.prefetch = n.max(1);
        self
    }

    async fn consume(&self, ctx: &SourceContext) -> std::result::Result<bool, lapin::Error> {
        let conn = Connection::connect(&self.uri, ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await?;
        let tag = ShortString::from(format!("{}-{}", ctx.consumer, std::process::id()));
        let mut deliveries = channel
            .basic_consume(
                ShortString::from(self.queue.clone()),
                tag.clone(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let acks = Arc::new(ChannelAcks::default());
        let mut lags = tokio::time::interval(LAG_EVERY);
        let mut stopping = false;
        loop {
            let next = tokio::select! {
                _ = ctx.shutdown.cancelled() => return Ok(false),
                // A graceful stop: the broker sends nothing new after the cancel, and what it
                // already sent (up to the prefetch) is handed over to be applied and acked.
                _ = ctx.stop.cancelled(), if !stopping => {
                    stopping = true;
                    if channel.basic_cancel(tag.clone(), BasicCancelOptions::default()).await.is_err() {
                        break;
                    }
                    continue;
                }
                _ = lags.tick() => {
                    // A passive declare reports the messages ready in the queue.
                    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
                    if let Ok(q) = channel
                        .queue_declare(ShortString::from(self.queue.clone()), passive, FieldTable::default())
                        .await
                    {
                        ctx.report_lag(u64::from(q.message_count()));
                    }
                    continue;
                }
                next = deliveries.next() => next,
            };
            let d = match (next, stopping) {
                (Some(Ok(d)), _) => d,
                (Some(Err(e)), false) => return Err(e),
                (None, false) => return Ok(true),
                (Some(Err(_)) | None, true) => break,
            };
            let redelivered = d.redelivered;
            let headers = d
                .properties
                .headers()
                .as_ref()
                .map(|t| {
                    t.inner()
                        .iter()
                        .filter_map(|(k, v)| text(v).map(|v| (k.to_string(), v)))
                        .collect()
                })
                .unwrap_or_default();
            let broker_id = d.properties.message_id().as_ref().map(|s| s.to_string());
            let message = Incoming::new(self.queue.clone(), headers, d.data)
                .broker_id(broker_id)
                .redelivered(redelivered);
            let tag = d.delivery_tag;
            acks.delivered(tag, d.acker).await;
            let delivery = Delivery {
                message,
                ack: Box::new(RabbitAck {
                    acks: Arc::clone(&acks),
                    tags: BTreeSet::from([tag]),
                }),
            };
            if ctx.deliveries.send(delivery).await.is_err() {
                return Ok(false);
            }
        }
        // The channel stays open until shutdown: the acknowledgements go over it.
        ctx.handed_over();
        ctx.shutdown.cancelled().await;
        Ok(false)
    }
}

fn text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// How often the queue's depth is asked for.
const LAG_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Deliveries of one channel to acknowledge together.
struct RabbitAck {
    acks: Arc<ChannelAcks>,
    tags: BTreeSet<u64>,
}

#[async_trait]
impl Acknowledge for RabbitAck {
    async fn ack(self: Box<Self>) -> std::result::Result<(), BoxError> {
        self.acks.ack(&self.tags).await?;
        Ok(())
    }

    fn merge(
        &mut self,
        other: Box<dyn Acknowledge>,
    ) -> std::result::Result<(), Box<dyn Acknowledge>> {
        // Only deliveries of the same channel: tags are numbered per channel.
        let same = (&*other as &dyn std::any::Any)
            .downcast_ref::<RabbitAck>()
            .is_some_and(|o| Arc::ptr_eq(&o.acks, &self.acks));
        if !same {
            return Err(other);
        }
        let other: Box<dyn std::any::Any> = other;
        if let Ok(o) = other.downcast::<RabbitAck>() {
            self.tags.extend(o.tags);
        }
        Ok(())
    }
}

#[async_trait]
impl Source for RabbitMqSource {
    fn broker(&self) -> &'static str {
        "rabbitmq"
    }

    async fn run(self, ctx: SourceContext) -> Result<()> {
        loop {
            match self.consume(&ctx).await {
                Ok(false) => return Ok(()),
                Ok(true) => {
                    tracing::warn!(queue = %self.queue, "rabbitmq source: consumer cancelled; reconnecting")
                }
                Err(e) => {
                    tracing::warn!(queue = %self.queue, error = %e, "rabbitmq source: connection failed; reconnecting")
                }
            }
            if !pause(&ctx.stop, RECONNECT_DELAY).await {
                return Ok(());
            }
        }
    }
}
