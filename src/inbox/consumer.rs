//! [`Consumer`]: a broker [`Source`], the inbox and a [`Handler`], run until shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sea_orm::DatabaseConnection;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::DEFAULT_RETENTION;
use super::handler::Handler;
use super::message::{Incoming, MessageId, MissingId, OrderingKey};
use crate::error::{Error, Result};
use crate::publisher::BoxError;
use crate::store::inbox::check_len;

/// How a [`Consumer`] runs. `Default` and chained setters.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ConsumerConfig {
    /// Handlers running at once, each in its own transaction (default 16).
    pub concurrency: usize,
    /// Messages held (running or queued behind their key) before receiving pauses (default 256).
    pub max_in_flight: usize,
    /// Handler attempts before a message is dead-lettered (default 5). A duplicate never counts,
    /// nor does a failure of the inbox's own statements (begin, record, commit): those are the
    /// database being away, and are retried until it is back.
    pub max_attempts: u32,
    /// Delay before the first retry, doubled per attempt, jittered (default 200 ms).
    pub retry_backoff: Duration,
    /// The longest retry delay (default 10 s).
    pub max_retry_backoff: Duration,
    /// Where the dedup id comes from (default: the outbox's event id).
    pub message_id: MessageId,
    /// What to do with a message without an id (default: dead-letter it).
    pub on_missing_id: MissingId,
    /// What serialises handling (default: the aggregate id).
    pub ordering: OrderingKey,
    /// Record each message in the inbox (default `true`). `false` runs the handler on every
    /// delivery, duplicates included: only for handlers that are idempotent by themselves.
    pub deduplicate: bool,
    /// Purge processed ids older than this (default [`DEFAULT_RETENTION`], 7 days); `None`
    /// keeps them forever.
    pub retention: Option<Duration>,
    /// How often the retention purge runs (default 10 min).
    pub purge_interval: Duration,
    /// Rows per purge statement (default 1000).
    pub purge_batch: u64,
    /// How often replay requests for this consumer's dead letters are looked for (default 5 s).
    pub replay_interval: Duration,
    /// How long a graceful stop may take to apply and acknowledge what was already received
    /// (default 10 s): the source's batch in hand, the messages queued behind their keys, and
    /// retries under way. What is left after it stays unacknowledged for the broker to
    /// redeliver. Zero stops at once, as a crash would, but without losing anything.
    pub drain_timeout: Duration,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            concurrency: 16,
            max_in_flight: 256,
            max_attempts: 5,
            retry_backoff: Duration::from_millis(200),
            max_retry_backoff: Duration::from_secs(10),
            message_id: MessageId::default(),
            on_missing_id: MissingId::default(),
            ordering: OrderingKey::default(),
            deduplicate: true,
            retention: Some(DEFAULT_RETENTION),
            purge_interval: Duration::from_secs(600),
            purge_batch: 1000,
            replay_interval: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

impl ConsumerConfig {
    setters! {
        /// Sets [`concurrency`](Self::concurrency).
        concurrency: usize,
        /// Sets [`max_in_flight`](Self::max_in_flight).
        max_in_flight: usize,
        /// Sets [`max_attempts`](Self::max_attempts).
        max_attempts: u32,
        /// Sets [`retry_backoff`](Self::retry_backoff).
        retry_backoff: Duration,
        /// Sets [`max_retry_backoff`](Self::max_retry_backoff).
        max_retry_backoff: Duration,
        /// Sets [`message_id`](Self::message_id).
        message_id: MessageId,
        /// Sets [`on_missing_id`](Self::on_missing_id).
        on_missing_id: MissingId,
        /// Sets [`ordering`](Self::ordering).
        ordering: OrderingKey,
        /// Sets [`deduplicate`](Self::deduplicate).
        deduplicate: bool,
        /// Sets [`retention`](Self::retention).
        retention: Option<Duration>,
        /// Sets [`purge_interval`](Self::purge_interval).
        purge_interval: Duration,
        /// Sets [`purge_batch`](Self::purge_batch).
        purge_batch: u64,
        /// Sets [`replay_interval`](Self::replay_interval).
        replay_interval: Duration,
        /// Sets [`drain_timeout`](Self::drain_timeout).
        drain_timeout: Duration,
    }

    fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::Config(what.to_owned()));
        if self.concurrency == 0 {
            return bad("concurrency must be at least 1");
        }
        if self.max_in_flight < self.concurrency {
            return bad("max_in_flight must be at least concurrency");
        }
        if self.max_attempts == 0 {
            return bad("max_attempts must be at least 1");
        }
        if self.purge_batch == 0 || self.purge_batch > crate::store::MAX_PAGE_SIZE {
            return bad("purge_batch must be between 1 and 10000");
        }
        if self.purge_interval.is_zero() || self.replay_interval.is_zero() {
            return bad("purge_interval and replay_interval must be positive");
        }
        if self.retention.is_some_and(|r| r < Duration::from_secs(60)) {
            return bad("retention under a minute would forget ids of messages still in flight");
        }
        Ok(())
    }
}

/// Acknowledges one delivery to its broker: the ack, `XACK`, or Kafka offset. Called only after
/// the message's transaction committed (or it was dead-lettered, or found a duplicate).
#[async_trait]
pub trait Acknowledge: Send + Sync + 'static {
    /// Acknowledges. A failure is logged and counted; the broker redelivers, and the inbox
    /// sees a duplicate.
    async fn ack(self: Box<Self>) -> std::result::Result<(), BoxError>;

    /// Tells the broker the message is still being worked on (NATS `+WPI`), before each retry
    /// delay. Default: nothing.
    async fn in_progress(&self) {}
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
    /// ignores it is stopped all the same, after [`ConsumerConfig::drain_timeout`].
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
}

/// A broker subscription that feeds a [`Consumer`]. Implemented for Kafka, NATS JetStream,
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

/// Counts since the consumer started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerStats {
    /// Messages whose effect was applied and committed.
    pub applied: u64,
    /// Messages skipped because the inbox had them.
    pub duplicates: u64,
    /// Messages moved to the inbox dead letter.
    pub dead_lettered: u64,
    /// Handler attempts that failed and were retried.
    pub retries: u64,
    /// Acknowledgements the broker refused or lost.
    pub ack_failures: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) applied: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) ack_failures: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> ConsumerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ConsumerStats {
            applied: get(&self.applied),
            duplicates: get(&self.duplicates),
            dead_lettered: get(&self.dead_lettered),
            retries: get(&self.retries),
            ack_failures: get(&self.ack_failures),
        }
    }
}

/// What every message's task shares.
pub(crate) struct Shared<H> {
    pub(crate) db: DatabaseConnection,
    pub(crate) name: String,
    pub(crate) handler: H,
    pub(crate) config: ConsumerConfig,
    pub(crate) counters: Counters,
}

/// Runs a [`Handler`] on every message of a [`Source`], through the inbox.
///
/// For each message: begin a transaction on the pool, record `(consumer, message_id)` in the
/// inbox, call the handler with the transaction, commit, and only then acknowledge. A
/// duplicate skips the handler and is acknowledged. A failing handler rolls back and is retried
/// with backoff, then dead-lettered into `inbox_dead_letters` (and acknowledged). Messages with
/// the same [`OrderingKey`] run one at a time in arrival order; others run in parallel, up to
/// [`ConsumerConfig::concurrency`].
///
/// ```no_run
/// # #[cfg(feature = "nats")]
/// # async fn example(db: sea_orm::DatabaseConnection) -> seaorm_outbox::Result<()> {
/// use seaorm_outbox::inbox::{Consumer, Handler, HandlerError, Incoming, NatsSource};
/// use sea_orm::DatabaseTransaction;
///
/// struct Billing;
///
/// #[async_trait::async_trait]
/// impl Handler for Billing {
///     async fn handle(&self, txn: &DatabaseTransaction, msg: &Incoming) -> Result<(), HandlerError> {
///         let order: serde_json::Value = msg.json()?; // a bad payload dead-letters at once
///         // … write the effect through `txn` …
///         Ok(())
///     }
/// }
///
/// let client = async_nats::connect("127.0.0.1:4222").await.expect("nats");
/// let source = NatsSource::new(async_nats::jetstream::new(client), "ORDERS", "billing");
/// let consumer = Consumer::new(db, "billing", Billing)?;
/// consumer.run(source, tokio_util::sync::CancellationToken::new()).await?;
/// # Ok(()) }
/// ```
pub struct Consumer<H> {
    shared: Arc<Shared<H>>,
}

impl<H> std::fmt::Debug for Consumer<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("name", &self.shared.name)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl<H: Handler> Consumer<H> {
    /// A consumer named `name` (the inbox's dedup scope: two consumers of one event must have
    /// different names) with the default config.
    pub fn new(db: DatabaseConnection, name: impl Into<String>, handler: H) -> Result<Self> {
        Self::with_config(db, name, handler, ConsumerConfig::default())
    }

    /// A consumer with `config`.
    pub fn with_config(
        db: DatabaseConnection,
        name: impl Into<String>,
        handler: H,
        config: ConsumerConfig,
    ) -> Result<Self> {
        let name = name.into();
        check_len("consumer", &name)?;
        config.validate()?;
        Ok(Self {
            shared: Arc::new(Shared {
                db,
                name,
                handler,
                config,
                counters: Counters::default(),
            }),
        })
    }

    /// The consumer's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Counts so far.
    pub fn stats(&self) -> ConsumerStats {
        self.shared.counters.snapshot()
    }

    /// Receives from `source` and handles until `shutdown` is cancelled or the source fails
    /// for good; returns the final counts.
    ///
    /// On shutdown it drains: the source stops fetching and hands over what it received, and
    /// every message held is applied (or dead-lettered) and acknowledged, for at most
    /// [`ConsumerConfig::drain_timeout`]. Then running handlers finish their current attempt,
    /// whatever is left stays unacknowledged (the broker redelivers it), and the source
    /// flushes. Nothing is acknowledged that was not committed.
    pub async fn run<S: Source>(
        &self,
        source: S,
        shutdown: CancellationToken,
    ) -> Result<ConsumerStats> {
        super::dispatch::run(Arc::clone(&self.shared), source, shutdown).await?;
        Ok(self.stats())
    }
}

/// Waits `delay`, or until `shutdown`; `false` when shut down. For sources' reconnect loops.
#[cfg(any(
    feature = "kafka",
    feature = "nats",
    feature = "rabbitmq",
    feature = "redis"
))]
pub(crate) async fn pause(shutdown: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// How long a source waits before reconnecting after a broken subscription.
#[cfg(any(
    feature = "kafka",
    feature = "nats",
    feature = "rabbitmq",
    feature = "redis"
))]
pub(crate) const RECONNECT_DELAY: Duration = Duration::from_secs(1);
