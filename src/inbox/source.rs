//! The contract between a broker and a consumer: a [`Source`] feeds [`Delivery`]s, each with its
//! [`Acknowledge`], and takes part in the two-step stop through its [`SourceContext`].

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::message::Incoming;
use crate::error::{BoxError, Result};

/// Acknowledges one delivery to its broker: the ack, `XACK`, or Kafka offset. Called only after
/// the message's transaction committed (or it was dead-lettered, or found a duplicate).
#[async_trait]
pub trait Acknowledge: std::any::Any + Send + Sync {
    /// Acknowledges. A failure is logged and counted; the broker redelivers, and the inbox
    /// sees a duplicate.
    async fn ack(self: Box<Self>) -> std::result::Result<(), BoxError>;

    /// Tells the broker the message is still being worked on (NATS `+WPI`), before each retry
    /// delay. Default: nothing.
    async fn in_progress(&self) {}

    /// Whether [`defer`](Self::defer) hands messages back to the broker. Default: no.
    fn can_defer(&self) -> bool {
        false
    }

    /// Hands the message back unacknowledged, for the broker to deliver again after `delay`:
    /// what a handler's [`HandlerError::retry_after`](super::HandlerError::retry_after) becomes
    /// where the broker has a delayed redelivery (NATS JetStream's `NakWithDelay`). Called only
    /// when [`can_defer`](Self::can_defer), and only for a message without an ordering key: the
    /// consumer holds one with a key itself, so its key's later messages stay behind it. Held
    /// messages stay unacknowledged at the broker, which [`in_progress`](Self::in_progress)
    /// keeps from redelivering them (NATS `+WPI`, a Redis entry's idle time reset).
    ///
    /// # Errors
    /// The broker's; the message is then redelivered when its acknowledgement times out.
    async fn defer(
        self: Box<Self>,
        delay: std::time::Duration,
    ) -> std::result::Result<(), BoxError> {
        let _ = delay;
        Err("this source does not defer messages at the broker".into())
    }

    /// Takes `other` into this acknowledgement when one call to the broker can acknowledge
    /// both (one `XACK` with many ids), so a batch is acknowledged in few calls; gives it back
    /// when not. Default: never.
    ///
    /// # Errors
    /// `other`, given back, when it can't be merged.
    fn merge(
        &mut self,
        other: Box<dyn Acknowledge>,
    ) -> std::result::Result<(), Box<dyn Acknowledge>> {
        Err(other)
    }
}

/// A received message and how to acknowledge it.
pub struct Delivery {
    /// The message.
    pub message: Incoming,
    /// Its acknowledgement.
    pub ack: Box<dyn Acknowledge>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .finish_non_exhaustive()
    }
}

/// What a [`Source`] gets to run with.
///
/// A graceful stop comes in two steps: [`stop`](Self::stop) (take no new messages, hand over
/// what was received, then call [`handed_over`](Self::handed_over)), and once the consumer
/// has applied and acknowledged what it holds, [`shutdown`](Self::shutdown) (flush, return).
#[derive(Debug)]
pub struct SourceContext {
    /// Push each received message here; the bound is the consumer's backpressure. A send error
    /// means the consumer stopped: return.
    pub deliveries: mpsc::Sender<Delivery>,
    /// Cancelled when a graceful stop begins: fetch nothing new, send what was already
    /// received from the broker (it is applied and acknowledged before the stop completes),
    /// then call [`handed_over`](Self::handed_over) and wait for `shutdown`. A source that
    /// ignores it is stopped all the same, after [`ConsumerConfig::drain_timeout`](super::ConsumerConfig::drain_timeout).
    pub stop: CancellationToken,
    /// Cancelled when the source should stop, after every acknowledgement the consumer will
    /// make has been made: flush (e.g. commit Kafka offsets) and return.
    pub shutdown: CancellationToken,
    /// The consumer's name.
    pub consumer: String,
    /// Cancelled by [`handed_over`](Self::handed_over).
    pub handed: CancellationToken,
}

impl SourceContext {
    /// A context for a source that feeds `deliveries` on behalf of `consumer`, with fresh
    /// tokens; for wrappers that run an inner source (link its tokens to the outer ones).
    pub fn new(deliveries: mpsc::Sender<Delivery>, consumer: impl Into<String>) -> Self {
        Self {
            deliveries,
            stop: CancellationToken::new(),
            shutdown: CancellationToken::new(),
            consumer: consumer.into(),
            handed: CancellationToken::new(),
        }
    }

    /// Reports the consumer's lag (messages not yet delivered to it) where the broker says.
    pub fn report_lag(&self, messages: u64) {
        crate::telemetry::metrics::inbox_lag(&self.consumer, messages);
    }

    /// After [`stop`](Self::stop): everything received has been sent to
    /// [`deliveries`](Self::deliveries).
    pub fn handed_over(&self) {
        self.handed.cancel();
    }

    /// Runs `inner` as this context's source, passing each of its deliveries through `map` on
    /// the way (to log, count, delay or wrap its acknowledgement): the body of a [`Source`]
    /// that wraps another. The two-step stop goes through: `inner` is told to stop, and what it
    /// handed over is forwarded before this context is handed over in turn.
    ///
    /// # Errors
    /// `inner`'s own, or [`Error::Broker`](crate::Error::Broker) if its task panicked.
    pub async fn run_inner<S: Source>(
        self,
        inner: S,
        mut map: impl FnMut(Delivery) -> Delivery + Send,
    ) -> Result<()> {
        let broker = inner.broker();
        let (tx, mut rx) = mpsc::channel(self.deliveries.max_capacity());
        let mut inner_ctx = SourceContext::new(tx, self.consumer.clone());
        inner_ctx.stop = self.stop.clone();
        inner_ctx.shutdown = self.shutdown.clone();
        let inner_handed = inner_ctx.handed.clone();
        let task = tokio::spawn(inner.run(inner_ctx));
        loop {
            let next = tokio::select! {
                biased;
                d = rx.recv() => d,
                // Once the inner source has handed over, what it sent is all in `rx`.
                _ = inner_handed.cancelled(), if !self.handed.is_cancelled() => match rx.try_recv() {
                    Ok(d) => Some(d),
                    Err(_) => {
                        self.handed_over();
                        continue;
                    }
                },
            };
            let Some(d) = next else { break };
            if self.deliveries.send(map(d)).await.is_err() {
                break;
            }
        }
        drop(rx);
        match task.await {
            Ok(r) => r,
            Err(e) => Err(crate::error::Error::Broker {
                broker,
                reason: format!("source task failed: {e}"),
                source: Some(Box::new(e)),
            }),
        }
    }
}

/// A broker subscription that feeds a [`Consumer`](super::Consumer). Implemented for Kafka, NATS JetStream,
/// RabbitMQ and Redis Streams behind their features; implement it for anything else.
#[async_trait]
pub trait Source: Send + 'static {
    /// The broker's name, for logs and metrics.
    fn broker(&self) -> &'static str;

    /// Receives until `ctx.shutdown`, reconnecting on its own after transient failures;
    /// returns `Err` only for what will not heal (a missing stream, refused credentials).
    async fn run(self, ctx: SourceContext) -> Result<()>
    where
        Self: Sized;
}

/// Waits `delay`, or until `shutdown`; `false` when shut down. For sources' reconnect loops.
#[cfg(any(feature = "nats", feature = "rabbitmq", feature = "redis"))]
pub(crate) async fn pause(shutdown: &CancellationToken, delay: std::time::Duration) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// How long a source waits before reconnecting after a broken subscription.
#[cfg(any(feature = "nats", feature = "rabbitmq", feature = "redis"))]
pub(crate) const RECONNECT_DELAY: std::time::Duration = std::time::Duration::from_secs(1);
