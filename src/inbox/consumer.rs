//! [`Consumer`]: a broker [`Source`], the inbox and a [`Handler`], run until shutdown.

use std::sync::Arc;

use sea_orm::DatabaseConnection;
use tokio_util::sync::CancellationToken;

use super::config::ConsumerConfig;
use super::handler::Handler;
use super::source::Source;
use super::state::{ConsumerStats, Counters, Shared};
use crate::error::Result;
use crate::store::inbox::check_len;

/// Runs a [`Handler`] on every message of a [`Source`], through the inbox.
///
/// For each message: begin a transaction on the pool, record `(consumer, message_id)` in the
/// inbox, call the handler with the transaction, commit, and only then acknowledge. A
/// duplicate skips the handler and is acknowledged. A failing handler rolls back and is retried
/// with backoff, then dead-lettered into `inbox_dead_letters` (and acknowledged). Messages with
/// the same [`OrderingKey`](super::OrderingKey) run one at a time in arrival order; others run in parallel, up to
/// [`ConsumerConfig::concurrency`].
///
/// ```no_run
/// # #[cfg(feature = "nats")]
/// # async fn example(db: sea_orm::DatabaseConnection) -> seaorm_outbox::Result<()> {
/// use seaorm_outbox::broker::nats::NatsSource;
/// use seaorm_outbox::inbox::{Consumer, Handler, HandlerError, Incoming};
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
    /// Starts a consumer named `name` (the inbox's dedup scope: two consumers of one event
    /// must have different names) on `db`, running `handler`; set its
    /// [`config`](ConsumerBuilder::config), then [`build`](ConsumerBuilder::build). The same
    /// idiom as [`Relay::builder`](crate::Relay::builder).
    #[must_use]
    pub fn builder(
        db: DatabaseConnection,
        name: impl Into<String>,
        handler: H,
    ) -> ConsumerBuilder<H> {
        ConsumerBuilder {
            db,
            name: name.into(),
            handler,
            config: ConsumerConfig::default(),
        }
    }

    /// A consumer with the default config: `Consumer::builder(db, name, handler).build()`.
    ///
    /// # Errors
    /// As [`ConsumerBuilder::build`].
    pub fn new(db: DatabaseConnection, name: impl Into<String>, handler: H) -> Result<Self> {
        Self::builder(db, name, handler).build()
    }

    /// A consumer with `config`.
    ///
    /// # Errors
    /// As [`ConsumerBuilder::build`].
    #[deprecated(
        since = "0.2.0",
        note = "use `Consumer::builder(db, name, handler).config(config).build()`"
    )]
    pub fn with_config(
        db: DatabaseConnection,
        name: impl Into<String>,
        handler: H,
        config: ConsumerConfig,
    ) -> Result<Self> {
        Self::builder(db, name, handler).config(config).build()
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
    ///
    /// # Errors
    /// [`Error::Broker`](crate::Error::Broker) when the source fails for good (a missing stream,
    /// refused credentials); the database being away is retried, not returned.
    pub async fn run<S: Source>(
        &self,
        source: S,
        shutdown: CancellationToken,
    ) -> Result<ConsumerStats> {
        super::dispatch::run(Arc::clone(&self.shared), source, shutdown).await?;
        Ok(self.stats())
    }
}

/// A [`Consumer`] being set up: [`Consumer::builder`].
#[derive(Debug)]
pub struct ConsumerBuilder<H> {
    db: DatabaseConnection,
    name: String,
    handler: H,
    config: ConsumerConfig,
}

impl<H: Handler> ConsumerBuilder<H> {
    /// How it runs (default [`ConsumerConfig::default`]).
    #[must_use]
    pub fn config(mut self, config: ConsumerConfig) -> Self {
        self.config = config;
        self
    }

    /// The consumer.
    ///
    /// # Errors
    /// [`Error::InvalidInboxKey`](crate::Error::InvalidInboxKey) for a bad name;
    /// [`Error::Config`](crate::Error::Config) for a config that cannot work.
    pub fn build(self) -> Result<Consumer<H>> {
        check_len("consumer", &self.name)?;
        self.config.validate()?;
        Ok(Consumer {
            shared: Arc::new(Shared {
                db: self.db,
                name: self.name,
                handler: self.handler,
                config: self.config,
                counters: Counters::default(),
                careful_batches: Default::default(),
                duplicate_met: Default::default(),
            }),
        })
    }
}
