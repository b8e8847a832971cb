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
use std::time::{Duration, Instant};

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
use crate::store::inbox_batch::{self, Batch, Check};
use crate::telemetry::metrics as m;

/// What became of one message in an attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Fate {
    Applied,
    /// In the inbox already, or the same id earlier in this batch.
    Duplicate,
    /// The handler refused it: `last` when it goes to the dead letters now (permanent, or its
    /// attempts are spent), `after` the delay it asked for before the next attempt.
    Failed {
        error: String,
        last: bool,
        after: Option<Duration>,
    },
    /// Behind a failed message of its key: not tried.
    Skipped,
}

/// A message that leaves the batch to run alone, with the attempts it already failed and the
/// delay its handler asked for before the next.
pub(crate) struct Leftover<K> {
    pub(crate) key: K,
    pub(crate) delivery: Delivery,
    pub(crate) earlier: process::Earlier,
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
        // Attempts of earlier deliveries count, where the broker counts deliveries.
        for (_, d) in &mut work {
            d.message.attempt = process::failed_before(s, &d.message) + 1;
        }
        let started = Instant::now();
        // Handlers run straight in the transaction while batches succeed; one failing rolls
        // the attempt back, and the next few batches put each handler under a savepoint. The
        // handler that refused is not called again in the rerun: that was its attempt.
        let careful = s.careful_batches.load(Ordering::Relaxed) > 0;
        let result = match attempt(s, &work, careful, None).await {
            Ok(Attempted::Refused(refusal)) => {
                s.careful_batches.store(CAREFUL_BATCHES, Ordering::Relaxed);
                attempt(s, &work, true, Some(refusal)).await
            }
            other => other,
        };
        if careful {
            let _ = s
                .careful_batches
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
        match result {
            // Only an attempt without savepoints comes back refused; the retry above had
            // them. Run the batch again rather than guess.
            Ok(Attempted::Refused(_)) => continue,
            Ok(Attempted::Done(fates)) => {
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
            Fate::Failed {
                error, last: true, ..
            } => {
                let attempts = d.message.attempt;
                dead.push((d, attempts, error));
            }
            Fate::Failed { error, after, .. } => {
                tracing::debug!(consumer = %s.name, id = %d.message.message_id, error = %error, "inbox: handler failed in a batch; retrying it alone");
                let failures = d.message.attempt;
                leftovers.push(Leftover {
                    key,
                    delivery: d,
                    earlier: process::Earlier { failures, after },
                });
            }
            Fate::Skipped => leftovers.push(Leftover {
                key,
                delivery: d,
                earlier: process::Earlier::default(),
            }),
        }
    }
    acknowledge(s, acks).await;
    // Dead letters go before the messages of their key behind them run.
    for (d, attempts, error) in dead {
        process::dead_letter(s, d, attempts, error, shutdown).await;
    }
    leftovers
}

fn count<H>(s: &Shared<H>, fate: &Fate) {
    let (counter, outcome) = match fate {
        Fate::Applied => (&s.counters.applied, "applied"),
        Fate::Duplicate => (&s.counters.duplicates, "duplicate"),
        Fate::Failed { last: true, .. } => return,
        Fate::Failed { .. } => (&s.counters.retries, "retried"),
        Fate::Skipped => return,
    };
    Counters::bump(counter);
    m::inbox_outcome(&s.name, outcome);
}

/// Batches run with a savepoint per handler after one failed: until this many in a row did not.
const CAREFUL_BATCHES: u32 = 16;

/// A handler's refusal in a run without savepoints: which message (`None` for a batch
/// handler) and why.
struct Refusal {
    index: Option<usize>,
    error: HandlerError,
}

enum Attempted {
    Done(Vec<Fate>),
    /// A run without savepoints met a refusal: the transaction was rolled back.
    Refused(Refusal),
}

/// The fate of `d` when its handler returned `e`.
fn refused<H>(s: &Shared<H>, d: &Delivery, e: &HandlerError) -> Fate {
    Fate::Failed {
        error: e.to_string(),
        last: e.is_permanent() || d.message.attempt >= s.config.max_attempts,
        after: e.retry_delay(),
    }
}

/// One transaction over the batch: each message's fate, or the inbox's own error (the database
/// is away), after which nothing of the attempt stands. Without `savepoints`, `Refused` when a
/// handler failed: run it again with them, passing the refusal, which stands for that
/// message's attempt (its handler is not called again).
async fn attempt<H: Handler, K: Eq + Hash>(
    s: &Shared<H>,
    work: &[(K, Delivery)],
    savepoints: bool,
    refusal: Option<Refusal>,
) -> Result<Attempted> {
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
        let check = check(s);
        let mut found = record(s, &txn, work, &fates, check).await?;
        if found.is_none() && check == Check::Optimistic {
            met_duplicate(s);
            txn.rollback().await?;
            txn = s.db.begin().await?;
            found = record(s, &txn, work, &fates, Check::Exact).await?;
        }
        let new = match found {
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
        if let Err(refusal) = run_direct(s, &txn, work, &fates).await {
            txn.rollback().await?;
            return Ok(Attempted::Refused(refusal));
        }
    } else {
        // Unless the message was found a duplicate meanwhile (another consumer applied it).
        if let Some(Refusal {
            index: Some(i),
            error,
        }) = &refusal
            && fates[*i] == Fate::Applied
        {
            fates[*i] = refused(s, &work[*i].1, error);
        }
        run_handlers(s, &txn, work, &mut fates).await?;
    }
    if s.config.deduplicate {
        let undo: Vec<&str> = work
            .iter()
            .zip(&fates)
            .filter(|(_, f)| matches!(f, Fate::Failed { .. } | Fate::Skipped))
            .map(|((_, d), _)| d.message.message_id.as_str())
            .collect();
        if !undo.is_empty() {
            inbox_batch::unrecord(&txn, &s.name, &undo).await?;
        }
    }
    // A commit that failed may still have committed: the retry then finds every record and
    // counts duplicates, which is the truth.
    txn.commit().await?;
    Ok(Attempted::Done(fates))
}

/// Every handler straight in `txn`, the batch handler if there is one; the first refusal (the
/// transaction must then be rolled back).
async fn run_direct<H: Handler, K>(
    s: &Shared<H>,
    txn: &DatabaseTransaction,
    work: &[(K, Delivery)],
    fates: &[Fate],
) -> std::result::Result<(), Refusal> {
    let new = work
        .iter()
        .enumerate()
        .filter(|(i, _)| fates[*i] == Fate::Applied);
    if let Some(whole) = s.handler.whole_batches() {
        let msgs: Vec<Incoming> = new.map(|(_, (_, d))| d.message.clone()).collect();
        if msgs.is_empty() {
            return Ok(());
        }
        return guarded(whole.handle_batch(txn, &msgs))
            .await
            .map_err(|error| Refusal { index: None, error });
    }
    for (i, (_, d)) in new {
        if let Err(error) = guarded(s.handler.handle(txn, &d.message)).await {
            return Err(Refusal {
                index: Some(i),
                error,
            });
        }
    }
    Ok(())
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

/// After a plain record met an id recorded before, batches check each id for this long:
/// redeliveries come in runs (a restart, lost acks), and each plain record that meets one is
/// a rolled-back attempt and an `ERROR` line in PostgreSQL's log.
const EXACT_AFTER_DUPLICATE: Duration = Duration::from_secs(60);

/// On PostgreSQL, a plain record while no duplicate was met lately.
fn check<H>(s: &Shared<H>) -> Check {
    if s.db.get_database_backend() != sea_orm::DbBackend::Postgres {
        return Check::Exact;
    }
    let met = *s.duplicate_met.lock().unwrap_or_else(|e| e.into_inner());
    if met.is_some_and(|at| at.elapsed() < EXACT_AFTER_DUPLICATE) {
        Check::Exact
    } else {
        Check::Optimistic
    }
}

fn met_duplicate<H>(s: &Shared<H>) {
    *s.duplicate_met.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
}

/// The ids the batch's multi-row record found new, or `None` where the backend can't say.
async fn record<H, K>(
    s: &Shared<H>,
    txn: &DatabaseTransaction,
    work: &[(K, Delivery)],
    fates: &[Fate],
    check: Check,
) -> Result<Option<HashSet<String>>> {
    let now = Utc::now();
    let rows: Vec<Received<'_>> = work
        .iter()
        .zip(fates)
        .filter(|(_, f)| **f == Fate::Applied)
        .map(|((_, d), _)| received(s, d, now))
        .collect();
    Ok(match inbox_batch::record_many(txn, &rows, check).await? {
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
        if matches!(fates[i], Fate::Failed { .. }) {
            // Refused in the run without savepoints.
            failed_keys.insert(key, ());
            continue;
        }
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
                fates[i] = refused(s, d, &e);
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
