//! NATS JetStream source (`nats` feature): a durable pull consumer, acknowledged after commit.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
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
///
/// **Order across a crash.** JetStream redelivers a dead instance's unacknowledged messages
/// only after `ack_wait`, by which time newer messages of the same key may have gone to the
/// next instance. So on start, when the durable holds messages delivered and never
/// acknowledged, this source recreates it from its ack floor: they come again first, in stream
/// order, and what was applied after the floor returns as duplicates the inbox skips. That
/// assumes one instance per durable, the only way JetStream keeps per-key order at all
/// (instances sharing a durable each get messages of every key). With several instances,
/// turn it off with [`resume_in_order(false)`](Self::resume_in_order).
#[derive(Clone, Debug)]
pub struct NatsSource {
    js: jetstream::Context,
    stream: String,
    durable: String,
    filter_subject: String,
    ack_wait: Duration,
    max_ack_pending: i64,
    resume_in_order: bool,
}

impl NatsSource {
    /// The durable consumer `durable` on `stream`.
    pub fn new(
        js: jetstream::Context,
        stream: impl Into<String>,
        durable: impl Into<String>,
    ) -> Self {
        Self {
            js,
            stream: stream.into(),
            durable: durable.into(),
            filter_subject: String::new(),
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 1024,
            resume_in_order: true,
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

    /// Whether a start after a crash recreates the durable from its ack floor (default `true`;
    /// see the type's docs).
    pub fn resume_in_order(mut self, yes: bool) -> Self {
        self.resume_in_order = yes;
        self
    }

    fn config(&self, deliver_policy: DeliverPolicy) -> pull::Config {
        pull::Config {
            durable_name: Some(self.durable.clone()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            max_ack_pending: self.max_ack_pending,
            filter_subject: self.filter_subject.clone(),
            deliver_policy,
            ..Default::default()
        }
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
        let mut consumer: PullConsumer = stream
            .get_or_create_consumer(&self.durable, self.config(DeliverPolicy::All))
            .await
            .map_err(|e| fatal("consumer on stream", &e))?;
        if !self.resume_in_order {
            return Ok(consumer);
        }
        let info = consumer
            .info()
            .await
            .map_err(|e| fatal("consumer info on stream", &e))?;
        if info.num_ack_pending == 0 {
            return Ok(consumer);
        }
        let start_sequence = info.ack_floor.stream_sequence + 1;
        tracing::info!(stream = %self.stream, durable = %self.durable, unacked = info.num_ack_pending, start_sequence, "nats source: recreating the durable from its ack floor");
        stream
            .delete_consumer(&self.durable)
            .await
            .map_err(|e| fatal("deleting consumer on stream", &e))?;
        stream
            .create_consumer(self.config(DeliverPolicy::ByStartSequence { start_sequence }))
            .await
            .map_err(|e| fatal("recreating consumer on stream", &e))
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
