//! What a running consumer shares between its messages: the database, the handler, the config
//! and the counters behind [`ConsumerStats`].

use std::sync::atomic::{AtomicU64, Ordering};

use sea_orm::DatabaseConnection;

use super::config::ConsumerConfig;

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
    /// Handler attempts that failed and were retried (those that asked to be retried later
    /// included).
    pub retries: u64,
    /// Messages handed back to the broker to come again later
    /// ([`retry_after`](super::HandlerError::retry_after) on a source that defers).
    pub deferred: u64,
    /// Acknowledgements the broker refused or lost.
    pub ack_failures: u64,
    /// Batch transactions committed (batch mode).
    pub batches: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) applied: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) deferred: AtomicU64,
    pub(crate) ack_failures: AtomicU64,
    pub(crate) batches: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> ConsumerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ConsumerStats {
            applied: get(&self.applied),
            duplicates: get(&self.duplicates),
            dead_lettered: get(&self.dead_lettered),
            retries: get(&self.retries),
            deferred: get(&self.deferred),
            ack_failures: get(&self.ack_failures),
            batches: get(&self.batches),
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
    /// Batch mode: batches left to run with a savepoint per handler since one failed.
    pub(crate) careful_batches: std::sync::atomic::AtomicU32,
    /// Batch mode, PostgreSQL: when a batch's plain inbox record last met an id recorded
    /// before.
    pub(crate) duplicate_met: std::sync::Mutex<Option<std::time::Instant>>,
}
