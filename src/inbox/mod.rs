//! The consumer side: a transactional inbox, so each message's effect is applied once.
//!
//! The outbox gets an event to the broker at least once; the inbox makes the consumer apply it
//! once. [`Inbox::record`] inserts `(consumer, message_id)` into `inbox_messages` inside the
//! consumer's own transaction, before its domain writes: the key is new ([`Recorded::New`]:
//! apply it) or already there ([`Recorded::Duplicate`]: skip it). Both commit together, or
//! neither does, so a failed attempt leaves no marker behind and a redelivery is applied.
//!
//! A [`Consumer`] does this around a [`Handler`] for a broker [`Source`]: receive, begin,
//! record, handle, commit, and only then acknowledge. Sources for Kafka, NATS JetStream,
//! RabbitMQ and Redis Streams sit with their publishers in [`crate::broker`], behind their
//! features.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | [`Inbox`]: the record, dead letters, retention, on any `ConnectionTrait` |
//! | `message.rs` | [`Incoming`], and where its id ([`MessageId`]) and key ([`OrderingKey`]) come from |
//! | `handler.rs`, `handler_error.rs` | the [`Handler`] and [`BatchHandler`] traits; [`HandlerError`] |
//! | `source.rs` | the [`Source`] contract brokers implement: [`Delivery`], [`Acknowledge`], [`SourceContext`] |
//! | `config.rs` | [`ConsumerConfig`] |
//! | `state.rs` | what a running consumer shares: counters ([`ConsumerStats`]), handler, config |
//! | `consumer.rs` | [`Consumer`] |
//! | `dispatch.rs` | per-key queues: one message per key at a time, keys in parallel; batches formed |
//! | `process.rs` | one message: attempts, backoff, dead letter, acknowledgement |
//! | `heartbeat.rs` | the process's row in `inbox_consumers` ([`ConsumerHeartbeat`]) |
//! | `batch.rs` | batch mode: many messages in one transaction, a failing one retried alone |
//!
//! ```
//! use seaorm_outbox::inbox::{Inbox, Recorded};
//! use sea_orm::TransactionTrait;
//!
//! # async fn example(db: sea_orm::DatabaseConnection) -> Result<(), Box<dyn std::error::Error>> {
//! let txn = db.begin().await?;
//! if Inbox::new(&txn).record("billing", "0193…-event-id").await? == Recorded::New {
//!     // … apply the message's effect through `txn` …
//! }
//! txn.commit().await?;
//! # Ok(()) }
//! ```

mod batch;
mod config;
mod consumer;
mod dispatch;
mod handler;
mod handler_error;
mod heartbeat;
mod message;
mod process;
mod source;
mod state;

use chrono::{DateTime, Utc};
use sea_orm::ConnectionTrait;

pub use self::config::ConsumerConfig;
pub use self::consumer::{Consumer, ConsumerBuilder};
pub use self::handler::{BatchHandler, Handler, WholeBatch};
pub use self::handler_error::HandlerError;
pub use self::message::{Incoming, MessageId, MissingId, OrderingKey};
pub use self::source::{Acknowledge, Delivery, Source, SourceContext};
#[cfg(any(feature = "nats", feature = "rabbitmq", feature = "redis"))]
pub(crate) use self::source::{RECONNECT_DELAY, pause};
pub use self::state::ConsumerStats;

// The broker sources' old paths; they live in `crate::broker` now.
#[cfg(feature = "kafka")]
#[doc(hidden)]
pub use crate::broker::kafka::KafkaSource;
#[cfg(feature = "nats")]
#[doc(hidden)]
pub use crate::broker::nats::NatsSource;
#[cfg(feature = "rabbitmq")]
#[doc(hidden)]
pub use crate::broker::rabbitmq::RabbitMqSource;
#[cfg(feature = "redis")]
#[doc(hidden)]
pub use crate::broker::redis::RedisSource;
pub use crate::store::consumers::ConsumerHeartbeat;
pub use crate::store::{DeadLetters, InboxDeadLetter, MAX_INBOX_KEY_CHARS};

use crate::error::Result;
use crate::store::inbox as store;

/// The default retention of processed ids: 7 days.
///
/// An id purged from the inbox is a message the inbox no longer recognises: if the same message
/// arrives after its id was purged (a replay from a broker's DLQ, an outbox dead letter
/// replayed days later, a consumer group reset to an old offset), it is applied again. Keep the
/// window longer than the oldest redelivery you can get.
pub const DEFAULT_RETENTION: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// Whether a message was new to its consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// First time: apply its effect in the same transaction.
    New,
    /// Already applied (and committed) by this consumer: skip it. Not an error.
    Duplicate,
}

/// The inbox on a connection: pass the transaction the handler writes through, so the record
/// and the effect commit together.
#[derive(Debug)]
pub struct Inbox<'a, C> {
    db: &'a C,
}

impl<'a, C: ConnectionTrait> Inbox<'a, C> {
    /// The inbox on `db`, a transaction for [`record`](Self::record), anything for the rest.
    pub fn new(db: &'a C) -> Self {
        Self { db }
    }

    /// Records `message_id` as applied by `consumer`, insert-first: [`Recorded::New`] or
    /// [`Recorded::Duplicate`]. Never commits. On PostgreSQL and MySQL a concurrent transaction
    /// recording the same key waits for this one, then sees a duplicate if it committed.
    ///
    /// Errors: [`Error::InvalidInboxKey`](crate::Error::InvalidInboxKey) for an empty key, one
    /// over [`MAX_INBOX_KEY_CHARS`] or one holding NUL; database errors.
    ///
    /// # Errors
    /// [`Error::InvalidInboxKey`](crate::Error::InvalidInboxKey) for a bad key; database errors.
    pub async fn record(&self, consumer: &str, message_id: &str) -> Result<Recorded> {
        let now = Utc::now();
        self.record_from(consumer, message_id, None, None, now)
            .await
    }

    /// [`record`](Self::record) with where the message came from and when it was received.
    ///
    /// # Errors
    /// As [`record`](Self::record).
    pub async fn record_from(
        &self,
        consumer: &str,
        message_id: &str,
        source: Option<&str>,
        position: Option<&str>,
        received_at: DateTime<Utc>,
    ) -> Result<Recorded> {
        let row = store::Received {
            consumer,
            message_id,
            source,
            position,
            received_at,
            processed_at: Utc::now(),
        };
        Ok(if store::record(self.db, &row).await? {
            Recorded::New
        } else {
            Recorded::Duplicate
        })
    }

    /// Whether `consumer` has applied (and committed) `message_id`.
    ///
    /// # Errors
    /// Database errors.
    pub async fn is_processed(&self, consumer: &str, message_id: &str) -> Result<bool> {
        store::processed(self.db, consumer, message_id).await
    }

    /// Deletes at most `batch` (≤ [`MAX_PAGE_SIZE`](crate::repository::MAX_PAGE_SIZE)) ids
    /// processed before `older_than`, oldest first, in one short statement on an index; returns
    /// how many. Call it in a loop until it returns less than `batch`; a running [`Consumer`]
    /// does so by itself ([`ConsumerConfig::retention`]).
    ///
    /// # Errors
    /// [`Error::LimitTooLarge`](crate::Error::LimitTooLarge) for a `batch` over the page size;
    /// database errors.
    pub async fn purge_processed(&self, older_than: DateTime<Utc>, batch: u64) -> Result<u64> {
        store::purge_processed(self.db, older_than, batch).await
    }

    /// How many ids `consumer` (or every consumer) has recorded.
    ///
    /// # Errors
    /// Database errors.
    pub async fn count_processed(&self, consumer: Option<&str>) -> Result<u64> {
        store::count_processed(self.db, consumer).await
    }

    /// Dead letters, oldest failure first, at most `limit` (≤ `MAX_PAGE_SIZE`).
    ///
    /// # Errors
    /// [`Error::LimitTooLarge`](crate::Error::LimitTooLarge); database errors; a stored row whose
    /// headers are not readable is [`Error::CorruptRow`](crate::Error::CorruptRow).
    pub async fn dead_letters(
        &self,
        which: DeadLetters<'_>,
        limit: u64,
        offset: u64,
    ) -> Result<Vec<InboxDeadLetter>> {
        store::dead_letters(self.db, which, limit, offset).await
    }

    /// How many dead letters `consumer` (or every consumer) has.
    ///
    /// # Errors
    /// Database errors.
    pub async fn count_dead_letters(&self, consumer: Option<&str>) -> Result<u64> {
        store::count_dead_letters(self.db, consumer).await
    }

    /// Every consumer process heard from within `within`, by consumer name then instance:
    /// counts, per-minute rates, what each holds and its lag, as each last wrote them (every
    /// [`ConsumerConfig::heartbeat_interval`]). A stopped process removes its row; a crashed
    /// one's ages out.
    ///
    /// # Errors
    /// Database errors (a missing table when migration `inbox_consumers` is not applied).
    pub async fn consumers(&self, within: std::time::Duration) -> Result<Vec<ConsumerHeartbeat>> {
        let since = chrono::Duration::from_std(within)
            .ok()
            .and_then(|d| crate::event::now().checked_sub_signed(d))
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        crate::store::consumers::heard_since(self.db, since).await
    }

    /// Asks the running consumer to apply these dead letters again; returns how many. The
    /// consumer picks them up within [`ConsumerConfig::replay_interval`], runs each through the
    /// inbox and its handler like a new delivery, and deletes the dead letter once applied (or
    /// found a duplicate). One that fails again stays, with the new error.
    ///
    /// # Errors
    /// Database errors.
    pub async fn replay(&self, which: DeadLetters<'_>) -> Result<u64> {
        store::request_replay(self.db, which, Utc::now()).await
    }

    /// Deletes these dead letters without applying them; returns how many.
    ///
    /// # Errors
    /// Database errors.
    pub async fn discard(&self, which: DeadLetters<'_>) -> Result<u64> {
        store::discard(self.db, which).await
    }
}
