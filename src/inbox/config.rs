//! [`ConsumerConfig`]: how a consumer runs.

use std::time::Duration;

use super::DEFAULT_RETENTION;
use super::message::{MessageId, MissingId, OrderingKey};
use crate::error::{Error, Result};

/// How a [`Consumer`](super::Consumer) runs. `Default` and chained setters.
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
    /// The longest delay a handler's [`retry_after`](super::HandlerError::retry_after) gets
    /// (default 15 min); a longer one is cut to it. It bounds how long a consumer holds a
    /// message unacknowledged, which brokers limit (RabbitMQ's `consumer_timeout`, 30 min by
    /// default, closes the channel).
    pub max_retry_after: Duration,
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
    /// Messages applied in one transaction (default 1: a transaction per message). Over 1 is
    /// batch mode: up to this many ready messages (a key's in its order) share one `BEGIN`,
    /// one multi-row inbox record and one `COMMIT`, and are acknowledged together after the
    /// commit; a handler that fails rolls back only its own message (savepoints), which is
    /// then retried or dead-lettered alone. At most
    /// [`MAX_BATCH_SIZE`](Self::MAX_BATCH_SIZE).
    pub batch_size: usize,
    /// In batch mode, how long a batch may wait to fill once its first message is ready
    /// (default 2 ms), once half the handler slots or more are busy. A batch starts at once
    /// when it is full, or while fewer than half the slots are busy (a light load waits for
    /// nothing); while every slot is busy, batches keep filling, so under load they are full
    /// anyway and a trickle is held back no longer than this.
    pub max_batch_delay: Duration,
    /// How often the consumer writes its row in `inbox_consumers` (default 5 s): its counts,
    /// per-minute rates, what it holds and its oldest waiting message's age, for the admin
    /// dashboard and [`Inbox::consumers`](super::Inbox::consumers). A graceful stop removes
    /// the row; a crashed process's row ages out. `None` writes nothing.
    pub heartbeat_interval: Option<Duration>,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            concurrency: 16,
            max_in_flight: 256,
            max_attempts: 5,
            retry_backoff: Duration::from_millis(200),
            max_retry_backoff: Duration::from_secs(10),
            max_retry_after: Duration::from_secs(15 * 60),
            message_id: MessageId::default(),
            on_missing_id: MissingId::default(),
            ordering: OrderingKey::default(),
            deduplicate: true,
            retention: Some(DEFAULT_RETENTION),
            purge_interval: Duration::from_secs(600),
            purge_batch: 1000,
            replay_interval: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(10),
            batch_size: 1,
            max_batch_delay: Duration::from_millis(2),
            heartbeat_interval: Some(Duration::from_secs(5)),
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
        /// Sets [`max_retry_after`](Self::max_retry_after).
        max_retry_after: Duration,
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
        /// Sets [`batch_size`](Self::batch_size).
        batch_size: usize,
        /// Sets [`max_batch_delay`](Self::max_batch_delay).
        max_batch_delay: Duration,
        /// Sets [`heartbeat_interval`](Self::heartbeat_interval).
        heartbeat_interval: Option<Duration>,
    }

    /// The largest [`batch_size`](Self::batch_size): one multi-row statement's worth.
    pub const MAX_BATCH_SIZE: usize = crate::store::inbox_batch::MAX_BATCH_ROWS;

    pub(crate) fn validate(&self) -> Result<()> {
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
        if self.max_retry_after.is_zero() {
            return bad("max_retry_after must be positive");
        }
        if self.purge_batch == 0 || self.purge_batch > crate::store::MAX_PAGE_SIZE {
            return bad("purge_batch must be between 1 and 10000");
        }
        if self.purge_interval.is_zero() || self.replay_interval.is_zero() {
            return bad("purge_interval and replay_interval must be positive");
        }
        if self.batch_size == 0 || self.batch_size > Self::MAX_BATCH_SIZE {
            return bad("batch_size must be between 1 and 1000");
        }
        if self.batch_size > self.max_in_flight {
            return bad("batch_size must be at most max_in_flight");
        }
        if self.heartbeat_interval.is_some_and(|d| d.is_zero()) {
            return bad("heartbeat_interval must be positive");
        }
        if self.retention.is_some_and(|r| r < Duration::from_secs(60)) {
            return bad("retention under a minute would forget ids of messages still in flight");
        }
        Ok(())
    }
}
