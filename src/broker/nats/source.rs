//! NATS JetStream source (`nats` feature): a durable pull consumer, acknowledged after commit.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::message::Acker;
use async_nats::jetstream::{self, AckKind};
use async_trait::async_trait;
use futures_util::StreamExt;

use crate::error::BoxError;
use crate::error::{Error, Result};
use crate::inbox::Incoming;
use crate::inbox::{Acknowledge, Delivery, RECONNECT_DELAY, Source, SourceContext, pause};

/// Receives from a durable pull consumer on a JetStream stream, created when missing, with
/// explicit acks. Each ack is a double ack: it waits for the server to confirm it.
///
/// Messages are pulled in batches of [`batch`](Self::batch), so what this process holds is
/// known: a graceful stop finishes the batch in hand, the consumer applies and acknowledges it,
/// and the durable is left with nothing pending, so the next start replays nothing.
///
/// A message not acknowledged within [`ack_wait`](Self::ack_wait) is redelivered, to this or
/// another instance; the inbox sees the duplicate. The consumer tells the server it is still
/// working (`+WPI`) before each retry delay, so long retries don't cause redelivery.
///
/// **Order across a crash.** JetStream redelivers a dead instance's unacknowledged messages
/// only after `ack_wait`, by which time newer messages of the same key may have gone to the
/// next instance. So on start, when the durable holds messages delivered and never
/// acknowledged, this source recreates it from its ack floor: they come again first, in stream
/// order. What was acknowledged after the floor comes again too, flagged
/// [`redelivered`](crate::inbox::Incoming::redelivered): the consumer finds it applied or
/// dead-lettered with one read and acknowledges it without running the handler. The replayed
/// window is the messages delivered since the oldest one left unacknowledged, which is what was
/// in flight unless one key's message was held in retries while others went on.
///
/// The recreation is safe against a crash at any step: before deleting the durable it leaves
/// a bookmark (a second durable, `<durable>-resume`, that nobody reads) holding the start
/// sequence, and a start that finds the durable missing and the bookmark present resumes
/// there, not from the stream's beginning. Recreating resets the server's redelivery count
/// (`num_redelivered`).
///
/// That assumes one instance per durable, the only way JetStream keeps per-key order at all
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
    batch: usize,
    resume_in_order: bool,
}

/// How long one pull waits for its batch to fill: also the longest a graceful stop waits for
/// the batch in hand.
const PULL_WAIT: Duration = Duration::from_secs(1);

impl NatsSource {
    /// The durable consumer `durable` on `stream`. `js` is the JetStream context of a
    /// connected client: `async_nats::jetstream::new(async_nats::connect(url).await?)`.
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
            batch: 128,
            resume_in_order: true,
        }
    }

    /// Only subjects matching `subject` (default: the whole stream).
    #[must_use]
    pub fn filter_subject(mut self, subject: impl Into<String>) -> Self {
        self.filter_subject = subject.into();
        self
    }

    /// How long the server waits for an ack before redelivering (default 30 s). Applies when
    /// the durable consumer is created.
    #[must_use]
    pub fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }

    /// Messages delivered and not yet acknowledged, at most (default 1024).
    #[must_use]
    pub fn max_ack_pending(mut self, n: i64) -> Self {
        self.max_ack_pending = n;
        self
    }

    /// Messages asked for per pull (default 128).
    #[must_use]
    pub fn batch(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }

    /// Whether a start after a crash recreates the durable from its ack floor (default `true`;
    /// see the type's docs).
    #[must_use]
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

    /// The bookmark's name: the durable's with a suffix no durable of ours uses.
    fn bookmark(&self) -> String {
        format!("{}-resume", self.durable)
    }

    fn fatal(&self, what: &str, e: impl Into<BoxError>) -> Error {
        let e = e.into();
        Error::Broker {
            broker: "nats",
            reason: format!("{what} `{}` / durable `{}`: {e}", self.stream, self.durable),
            source: Some(e),
        }
    }

    /// The durable, recreated from its ack floor when it holds unacknowledged messages; with
    /// the last stream sequence that start replays (0: none).
    async fn consumer(&self) -> Result<(PullConsumer, u64)> {
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| self.fatal("stream", e))?;
        let bookmark = match stream.consumer_info(self.bookmark()).await {
            Ok(info) => Some(info.config),
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => None,
            Err(e) => return Err(self.fatal("bookmark info on stream", e)),
        };
        let existing = match stream.consumer_info(&self.durable).await {
            Ok(info) => Some(info),
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => None,
            Err(e) => return Err(self.fatal("consumer info on stream", e)),
        };
        let Some(info) = existing else {
            // First start, or a crash between deleting and recreating the durable: the
            // bookmark says where it was to start again.
            let (policy, replay_end) = match &bookmark {
                Some(b) => {
                    let end = b
                        .description
                        .as_deref()
                        .and_then(|d| d.rsplit(' ').next())
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                    tracing::warn!(stream = %self.stream, durable = %self.durable, ?b.deliver_policy, "nats source: the durable is missing and its resume bookmark is present; resuming from the bookmark");
                    (b.deliver_policy, end)
                }
                None => (DeliverPolicy::All, 0),
            };
            let consumer = stream
                .create_consumer(self.config(policy))
                .await
                .map_err(|e| self.fatal("creating consumer on stream", e))?;
            self.drop_bookmark(&stream, bookmark.is_some()).await;
            return Ok((consumer, replay_end));
        };
        // A bookmark beside a live durable is left from a crash after the recreation.
        self.drop_bookmark(&stream, bookmark.is_some()).await;
        let consumer: PullConsumer = stream
            .get_consumer(&self.durable)
            .await
            .map_err(|e| self.fatal("consumer on stream", e))?;
        if !self.resume_in_order || info.num_ack_pending == 0 {
            return Ok((consumer, 0));
        }
        let start_sequence = info.ack_floor.stream_sequence + 1;
        let replay_end = info.delivered.stream_sequence;
        let from = DeliverPolicy::ByStartSequence { start_sequence };
        tracing::info!(stream = %self.stream, durable = %self.durable, unacked = info.num_ack_pending, start_sequence, replay_end, "nats source: recreating the durable from its ack floor");
        let mark = pull::Config {
            durable_name: Some(self.bookmark()),
            description: Some(format!(
                "seaorm-outbox: resume bookmark of durable {}; replays up to {replay_end}",
                self.durable
            )),
            ..self.config(from)
        };
        stream
            .create_consumer(mark)
            .await
            .map_err(|e| self.fatal("creating the resume bookmark on stream", e))?;
        stream
            .delete_consumer(&self.durable)
            .await
            .map_err(|e| self.fatal("deleting consumer on stream", e))?;
        let consumer = stream
            .create_consumer(self.config(from))
            .await
            .map_err(|e| self.fatal("recreating consumer on stream", e))?;
        self.drop_bookmark(&stream, true).await;
        Ok((consumer, replay_end))
    }

    /// Deletes the bookmark; a failure only leaves it for the next start to delete.
    async fn drop_bookmark(&self, stream: &jetstream::stream::Stream, exists: bool) {
        if exists && let Err(e) = stream.delete_consumer(&self.bookmark()).await {
            tracing::warn!(stream = %self.stream, durable = %self.durable, error = %e, "nats source: deleting the resume bookmark failed");
        }
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

    fn can_defer(&self) -> bool {
        true
    }

    async fn defer(self: Box<Self>, delay: Duration) -> std::result::Result<(), BoxError> {
        self.0.ack_with(AckKind::Nak(Some(delay))).await
    }
}

fn delivery(msg: jetstream::Message, ctx: &SourceContext, replay_end: u64) -> Delivery {
    let (sequence, pending, redelivered, deliveries) = match msg.info() {
        Ok(info) => (
            Some(info.stream_sequence),
            Some(info.pending),
            info.delivered > 1 || info.stream_sequence <= replay_end,
            u32::try_from(info.delivered).unwrap_or(0),
        ),
        Err(_) => (None, None, false, 0),
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
    let broker_id = message.header(super::MSG_ID_HEADER).map(str::to_owned);
    Delivery {
        message: message
            .position(sequence.map(|s| s.to_string()))
            .broker_id(broker_id)
            .redelivered(redelivered)
            .deliveries(deliveries),
        ack: Box::new(NatsAck(acker)),
    }
}

#[async_trait]
impl Source for NatsSource {
    fn broker(&self) -> &'static str {
        "nats"
    }

    async fn run(self, ctx: SourceContext) -> Result<()> {
        let (consumer, replay_end) = self.consumer().await?;
        while !ctx.stop.is_cancelled() {
            let pull = consumer
                .batch()
                .max_messages(self.batch)
                .expires(PULL_WAIT)
                .messages();
            let mut batch = match pull.await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(stream = %self.stream, error = %e, "nats source: pull failed; retrying");
                    if !pause(&ctx.stop, RECONNECT_DELAY).await {
                        break;
                    }
                    continue;
                }
            };
            // The whole batch is read even once `stop` is set: what the server delivered is
            // handed over, applied and acknowledged, not left pending for the next start.
            loop {
                let next = tokio::select! {
                    _ = ctx.shutdown.cancelled() => return Ok(()),
                    next = batch.next() => next,
                };
                match next {
                    Some(Ok(msg)) => {
                        if ctx
                            .deliveries
                            .send(delivery(msg, &ctx, replay_end))
                            .await
                            .is_err()
                        {
                            return Ok(());
                        }
                    }
                    Some(Err(e)) => {
                        tracing::debug!(stream = %self.stream, error = %e, "nats source: pull error");
                    }
                    None => break,
                }
            }
        }
        ctx.handed_over();
        ctx.shutdown.cancelled().await;
        Ok(())
    }
}
