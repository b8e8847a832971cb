//! Batch mode: many messages through the inbox in one transaction.
//!
//! One attempt is: begin; one multi-row inbox record tells which messages are new; each new
//! message's handler runs under its own savepoint, in arrival order (or the whole batch goes
//! to a [`BatchHandler`](super::BatchHandler) under one savepoint); the records of messages
//! whose handler failed are deleted; commit; then every acknowledgement at once. A message
//! whose handler failed, and the messages of its key behind it, leave the batch and run alone
//! (a retry with backoff, or the dead letter), so the rest of the batch is not held back and
//! a key's order holds. A crash anywhere before the commit leaves nothing; after it, only
//! acknowledgements are missing, and the redeliveries are duplicates.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::time::Instant;

use chrono::Utc;
use futures_util::FutureExt;
use sea_orm::{DatabaseTransaction, TransactionTrait};
use tokio_util::sync::CancellationToken;

use super::handler::Handler;
use super::handler_error::HandlerError;
use super::message::Incoming;
use super::process;
use super::source::{Acknowledge, Delivery};
use super::state::{Counters, Shared};
use crate::error::Result;
use crate::store::inbox::{self as store, Received};
use crate::store::inbox_batch::{self, Batch};
use crate::telemetry::metrics as m;

/// What became of one message in an attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Fate {
    Applied,
    /// In the inbox already, or the same id earlier in this batch.
    Duplicate,
    Failed(String, bool),
    /// Behind a failed message of its key: not tried.
    Skipped,
}

/// A message that leaves the batch to run alone, with the attempts it already failed.
pub(crate) struct Leftover<K> {
    pub(crate) key: K,
    pub(crate) delivery: Delivery,
    pub(crate) failures: u32,
}

/// Applies `batch` (arrival order; `K` is the dispatcher's ordering key) and acknowledges what
/// it finished; returns what must run alone, in arrival order. On shutdown during an outage,
/// returns nothing and acknowledges nothing: the broker redelivers.
pub(crate) async fn apply<H: Handler, K: Clone + Eq + Hash>(
    s: &Shared<H>,
    batch: Vec<(K, Delivery)>,
    shutdown: &CancellationToken,
) -> Vec<Leftover<K>> {
    let mut work: Vec<(K, Delivery)> = Vec::with_capacity(batch.len());
    for (key, mut d) in batch {
        match process::message_id(s, &d.message) {
            Ok(id) => d.message.message_id = id,
            Err(reason) => {
                process::dead_letter(s, d, 0, reason, shutdown).await;
                continue;
            }
        }
        if d.message.redelivered && process::finished_before(s, &d.message).await {
            count(s, &Fate::Duplicate);
            process::ack(s, d).await;
            continue;
        }
        work.push((key, d));
    }
    if work.is_empty() {
        return Vec::new();
    }
    let mut outages = 0u32;
    let fates = loop {
        for (_, d) in &mut work {
            d.message.attempt = 1;
        }
        let started = Instant::now();
        // Handlers run straight in the transaction while batches succeed; one failing rolls
        // the attempt back, and the next few batches put each handler under a savepoint.
        let careful = s.careful_batches.load(Ordering::Relaxed) > 0;
        let result = match attempt(s, &work, careful).await {
            Ok(None) => {
                s.careful_batches.store(CAREFUL_BATCHES, Ordering::Relaxed);
                attempt(s, &work, true).await
            }
            other => other,
        };
        if careful {
            let _ = s
                .careful_batches
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
        match result {
            // Only an attempt without savepoints comes back without fates; the retry above
            // had them. Run the batch again rather than guess.
            Ok(None) => continue,
            Ok(Some(fates)) => {
                Counters::bump(&s.counters.batches);
                m::inbox_handler_time(&s.name, started.elapsed());
                break fates;
            }
            Err(e) => {
                outages += 1;
                tracing::warn!(consumer = %s.name, messages = work.len(), error = %e, "inbox: database unavailable; retrying the batch");
                for (_, d) in &work {
                    d.ack.in_progress().await;
                }
                let delay =
                    process::backoff(s.config.retry_backoff, s.config.max_retry_backoff, outages);
                tokio::select! {
                    _ = shutdown.cancelled() => return Vec::new(),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    };
    let mut acks: Vec<Box<dyn Acknowledge>> = Vec::new();
    let mut leftovers = Vec::new();
    let mut dead = Vec::new();
    for ((key, d), fate) in work.into_iter().zip(fates) {
        count(s, &fate);
        match fate {
            Fate::Applied | Fate::Duplicate => acks.push(d.ack),
            Fate::Failed(error, permanent) if permanent || s.config.max_attempts <= 1 => {
                dead.push((d, error));
            }
            Fate::Failed(error, _) => {
                tracing::debug!(consumer = %s.name, id = %d.message.message_id, error = %error, "inbox: handler failed in a batch; retrying it alone");
                leftovers.push(Leftover {
                    key,
                    delivery: d,
                    failures: 1,
                });
            }
            Fate::Skipped => leftovers.push(Leftover {
                key,
                delivery: d,
                failures: 0,
            }),
        }
    }
    acknowledge(s, acks).await;
    // Dead letters go before the messages of their key behind them run.
    for (d, error) in dead {
        process::dead_letter(s, d, 1, error, shutdown).await;
    }
    leftovers
}

fn count<H>(s: &Shared<H>, fate: &Fate) {
    let (counter, outcome) = match fate {
        Fate::Applied => (&s.counters.applied, "applied"),
        Fate::Duplicate => (&s.counters.duplicates, "duplicate"),
        Fate::Failed(_, permanent) if *permanent || s.config.max_attempts <= 1 => return,
        Fate::Failed(..) => (&s.counters.retries, "retried"),
        Fate::Skipped => return,
    };
    Counters::bump(counter);
    m::inbox_outcome(&s.name, outcome);
}

/// Batches run with a savepoint per handler after one failed: until this many in a row did not.
const CAREFUL_BATCHES: u32 = 16;

/// One transaction over the batch: each message's fate, or the inbox's own error (the database
/// is away), after which nothing of the attempt stands. Without `savepoints`, `None` when a
/// handler failed: the transaction was rolled back, run it again with them.
async fn attempt<H: Handler, K: Eq + Hash>(
    s: &Shared<H>,
    work: &[(K, Delivery)],
    savepoints: bool,
) -> Result<Option<Vec<Fate>>> {
    let mut fates = vec![Fate::Applied; work.len()];
    // The same id twice in one batch: only its first delivery is applied.
    let mut first = HashSet::with_capacity(work.len());
    for (i, (_, d)) in work.iter().enumerate() {
        if !first.insert(d.message.message_id.as_str()) && s.config.deduplicate {
            fates[i] = Fate::Duplicate;
        }
    }
    let mut txn = s.db.begin().await?;
    if s.config.deduplicate {
        let new = match record(s, &txn, work, &fates).await? {
            Some(new) => new,
            None => {
                txn.rollback().await?;
                txn = s.db.begin().await?;
                record_each(s, &txn, work, &fates).await?
            }
        };
        for (i, (_, d)) in work.iter().enumerate() {
            if fates[i] == Fate::Applied && !new.contains(&d.message.message_id) {
                fates[i] = Fate::Duplicate;
            }
        }
    }
    if !savepoints {
        if !run_direct(s, &txn, work, &fates).await {
            txn.rollback().await?;
            return Ok(None);
        }
    } else {
        run_handlers(s, &txn, work, &mut fates).await?;
    }
    if s.config.deduplicate {
        let undo: Vec<&str> = work
            .iter()
            .zip(&fates)
            .filter(|(_, f)| matches!(f, Fate::Failed(..) | Fate::Skipped))
            .map(|((_, d), _)| d.message.message_id.as_str())
            .collect();
        if !undo.is_empty() {
            inbox_batch::unrecord(&txn, &s.name, &undo).await?;
        }
    }
    // A commit that failed may still have committed: the retry then finds every record and
    // counts duplicates, which is the truth.
    txn.commit().await?;
    Ok(Some(fates))
}

/// Every handler straight in `txn`, the batch handler if there is one; `false` at the first
/// failure (the transaction must then be rolled back).
async fn run_direct<H: Handler, K>(
    s: &Shared<H>,
    txn: &DatabaseTransaction,
    work: &[(K, Delivery)],
    fates: &[Fate],
) -> bool {
    let new = work.iter().zip(fates).filter(|(_, f)| **f == Fate::Applied);
    if let Some(whole) = s.handler.whole_batches() {
        let msgs: Vec<Incoming> = new.map(|((_, d), _)| d.message.clone()).collect();
        return msgs.is_empty() || guarded(whole.handle_batch(txn, &msgs)).await.is_ok();
    }
    for ((_, d), _) in new {
        if guarded(s.handler.handle(txn, &d.message)).await.is_err() {
            return false;
        }
    }
    true
}

fn received<'a, H>(s: &'a Shared<H>, d: &'a Delivery, now: chrono::DateTime<Utc>) -> Received<'a> {
    Received {
        consumer: &s.name,
        message_id: &d.message.message_id,
        source: Some(&d.message.source),
        position: d.message.position.as_deref(),
        received_at: d.message.received_at,
        processed_at: now,
    }
}

/// The ids the batch's multi-row record found new, or `None` where the backend can't say.
async fn record<H, K>(
    s: &Shared<H>,
    txn: &DatabaseTransaction,
    work: &[(K, Delivery)],
    fates: &[Fate],
) -> Result<Option<HashSet<String>>> {
    let now = Utc::now();
    let rows: Vec<Received<'_>> = work
        .iter()
        .zip(fates)
        .filter(|(_, f)| **f == Fate::Applied)
        .map(|((_, d), _)| received(s, d, now))
        .collect();
    Ok(match inbox_batch::record_many(txn, &rows).await? {
        Batch::New(new) => Some(new),
        Batch::Unknown => None,
    })
}

/// Row by row, each count exact: MySQL's way when its multi-row record can't say.
async fn record_each<H, K>(
    s: &Shared<H>,
    txn: &DatabaseTransaction,
    work: &[(K, Delivery)],
    fates: &[Fate],
) -> Result<HashSet<String>> {
    let now = Utc::now();
    let mut new = HashSet::new();
    for ((_, d), fate) in work.iter().zip(fates) {
        if *fate == Fate::Applied && store::record(txn, &received(s, d, now)).await? {
            new.insert(d.message.message_id.clone());
        }
    }
    Ok(new)
}

/// Runs the handler on every message still `Applied`, in order: the whole batch under one
/// savepoint for a batch handler, else (or when that fails) each under its own. A failure
/// marks the messages of its key behind it `Skipped`. Errors are the savepoints' own.
async fn run_handlers<H: Handler, K: Eq + Hash>(
    s: &Shared<H>,
    txn: &DatabaseTransaction,
    work: &[(K, Delivery)],
    fates: &mut [Fate],
) -> Result<()> {
    if let Some(whole) = s.handler.whole_batches() {
        let msgs: Vec<Incoming> = work
            .iter()
            .zip(fates.iter())
            .filter(|(_, f)| **f == Fate::Applied)
            .map(|((_, d), _)| d.message.clone())
            .collect();
        if msgs.is_empty() {
            return Ok(());
        }
        let sp = txn.begin().await?;
        match guarded(whole.handle_batch(&sp, &msgs)).await {
            Ok(()) => return Ok(sp.commit().await?),
            Err(e) => {
                sp.rollback().await?;
                tracing::debug!(consumer = %s.name, error = %e, "inbox: batch handler failed; applying the batch one message at a time");
            }
        }
    }
    let mut failed_keys: HashMap<&K, ()> = HashMap::new();
    for (i, (key, d)) in work.iter().enumerate() {
        if fates[i] != Fate::Applied {
            continue;
        }
        if d.message.ordering_key.is_some() && failed_keys.contains_key(key) {
            fates[i] = Fate::Skipped;
            continue;
        }
        let sp = txn.begin().await?;
        match guarded(s.handler.handle(&sp, &d.message)).await {
            Ok(()) => sp.commit().await?,
            Err(e) => {
                sp.rollback().await?;
                fates[i] = Fate::Failed(e.to_string(), e.is_permanent());
                failed_keys.insert(key, ());
            }
        }
    }
    Ok(())
}

/// A handler's result, a panic read as a retryable failure.
async fn guarded(
    f: impl std::future::Future<Output = std::result::Result<(), HandlerError>>,
) -> std::result::Result<(), HandlerError> {
    match AssertUnwindSafe(f).catch_unwind().await {
        Ok(r) => r,
        Err(_) => Err(HandlerError::retry("handler panicked")),
    }
}

/// Acknowledges a committed batch: acknowledgements that go to the broker together are merged
/// ([`Acknowledge::merge`]), and the rest are sent concurrently.
async fn acknowledge<H>(s: &Shared<H>, acks: Vec<Box<dyn Acknowledge>>) {
    let mut merged: Vec<(Box<dyn Acknowledge>, u64)> = Vec::new();
    'next: for mut ack in acks {
        for (into, n) in &mut merged {
            match into.merge(ack) {
                Ok(()) => {
                    *n += 1;
                    continue 'next;
                }
                Err(back) => ack = back,
            }
        }
        merged.push((ack, 1));
    }
    let sent = merged
        .into_iter()
        .map(|(ack, n)| async move { (ack.ack().await, n) });
    for (result, n) in futures_util::future::join_all(sent).await {
        if let Err(e) = result {
            for _ in 0..n {
                Counters::bump(&s.counters.ack_failures);
                m::inbox_outcome(&s.name, "ack_failed");
            }
            tracing::warn!(consumer = %s.name, messages = n, error = %e, "inbox: acknowledgement failed; the broker will redeliver");
        }
    }
}
