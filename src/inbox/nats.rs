//! NATS JetStream source (`nats` feature): a durable pull consumer, acknowledged after commit.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::message::Acker;
use async_nats::jetstream::{self, AckKind};
use async_trait::async_trait;
use futures_util::StreamExt;

use super::consumer::{Acknowledge, Delivery, RECONNECT_DELAY, Source, SourceContext, pause};
use super::message::Incoming;
use crate::error::{Error, Result};
use crate::publisher::BoxError;

/// Receives from a durable pull consumer on a JetStream stream, created when missing, with
/// explicit acks. Each ack is a double ack: it waits for the server to confirm it.
///
/// A message not acknowledged within [`ack_wait`](Self::ack_wait) is redelivered, to this or
/// another instance; the inbox sees the duplicate. The consumer tells the server it is still
/// working (`+WPI`) before each retry delay, so long retries don't cause redelivery.
#[derive(Clone, Debug)]
pub struct NatsSource {
    js: jetstream::Context,
    stream: String,
    durable: String,
    filter_subject: String,
    ack_wait: Duration,
    max_ack_pending: i64,
}

impl NatsSource {
    /// The durable consumer `durable` on `stream`.
    pub fn new(js: jetstream::Context, stream: impl Into<String>, durable: impl Into<String>) -> Self {
        Self {
            js,
            stream: stream.into(),
            durable: durable.into(),
            filter_subject: String::new(),
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 1024,
        }
    }

    /// Only subjects matching `subject` (default: the whole stream).
    pub fn filter_subject(mut self, subject: impl Into<String>) -> Self {
        self.filter_subject = subject.into();
        self
    }

    /// How long the server waits for an ack before redelivering (default 30 s). Applies when
    /// the durable consumer is created.
    pub fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }

    /// Messages delivered and not yet acknowledged, at most (default 1024).
    pub fn max_ack_pending(mut self, n: i64) -> Self {
        self.max_ack_pending = n;
        self
    }

    async fn consumer(&self) -> Result<PullConsumer> {
        let fatal = |what: &str, e: &dyn std::fmt::Display| Error::Broker {
            broker: "nats",
            reason: format!("{what} `{}`: {e}", self.stream),
        };
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| fatal("stream", &e))?;
        stream
            .get_or_create_consumer(
                &self.durable,
                pull::Config {
                    durable_name: Some(self.durable.clone()),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: self.ack_wait,
                    max_ack_pending: self.max_ack_pending,
                    filter_subject: self.filter_subject.clone(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| fatal("consumer on stream", &e))
    }
}

struct NatsAck(Acker);

#[async_trait]
impl Acknowledge for NatsAck {
    async fn ack(self: Box<Self>) -> std::result::Result<(), BoxError> {
        self.0.double_ack().await
    }

    async fn in_progress(&self) {
        let _ = self.0.ack_with(AckKind::Progress).await;
    }
}

fn delivery(msg: jetstream::Message, ctx: &SourceContext) -> Delivery {
    let (sequence, pending) = match msg.info() {
        Ok(info) => (Some(info.stream_sequence), Some(info.pending)),
        Err(_) => (None, None),
    };
    if let Some(pending) = pending {
        ctx.report_lag(pending);
    }
    let (m, acker) = msg.split();
    let mut headers = Vec::new();
    if let Some(map) = &m.headers {
        for (name, values) in map.iter() {
            for v in values {
                headers.push((name.to_string(), v.as_str().to_owned()));
            }
        }
    }
    let message = Incoming::new(m.subject.as_str(), headers, m.payload.to_vec());
    let broker_id = message.header("Nats-Msg-Id").map(str::to_owned);
    Delivery {
        message: message
            .position(sequence.map(|s| s.to_string()))
            .broker_id(broker_id),
        ack: Box::new(NatsAck(acker)),
    }
}

#[async_trait]
impl Source for NatsSource {
    fn broker(&self) -> &'static str {
        "nats"
    }

    async fn run(self, ctx: SourceContext) -> Result<()> {
        let consumer = self.consumer().await?;
        loop {
            let mut messages = match consumer.messages().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(stream = %self.stream, error = %e, "nats source: subscribe failed; retrying");
                    if !pause(&ctx.shutdown, RECONNECT_DELAY).await {
                        return Ok(());
                    }
                    continue;
                }
            };
            loop {
                let next = tokio::select! {
                    _ = ctx.shutdown.cancelled() => return Ok(()),
                    next = messages.next() => next,
                };
                match next {
                    Some(Ok(msg)) => {
                        if ctx.deliveries.send(delivery(msg, &ctx)).await.is_err() {
                            return Ok(());
                        }
                    }
                    // Missed heartbeats and the like: the stream recovers by itself.
                    Some(Err(e)) => {
                        tracing::debug!(stream = %self.stream, error = %e, "nats source: pull error");
                    }
                    None => break,
                }
            }
        }
    }
}
