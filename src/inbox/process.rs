//! One message through the inbox: resolve its id, then attempts of begin → record → handle →
//! commit, with backoff, until it is applied, found a duplicate, or dead-lettered; then the
//! acknowledgement.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::FutureExt;
use sea_orm::TransactionTrait;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::handler::Handler;
use super::handler_error::HandlerError;
use super::message::{Incoming, MissingId};
use super::source::Delivery;
use super::state::{Counters, Shared};
use super::{Inbox, Recorded};
use crate::backoff::{Backoff, Jitter};
use crate::error::Error;
use crate::store::inbox::{self as store, InboxDeadLetter, check_len};
use crate::telemetry::metrics as m;

enum Applied {
    New,
    Duplicate,
}

enum Failure {
    /// The handler's own error: counts as an attempt.
    Handler(HandlerError),
    /// The inbox's statements failed (the database is away): retried without counting.
    Inbox(Error),
}

/// The delay after the `n`-th failure: `min(cap, base × 2^(n-1))`, between half and all of it.
pub(super) fn backoff(base: Duration, cap: Duration, n: u32) -> Duration {
    Backoff::new(base, cap).jitter(Jitter::Equal).delay(n)
}

pub(super) fn message_id<H>(s: &Shared<H>, msg: &Incoming) -> Result<String, String> {
    let id = s
        .config
        .message_id
        .of(msg)
        .or_else(|| match s.config.on_missing_id {
            MissingId::SourcePosition => {
                msg.position.as_ref().map(|p| format!("{}@{p}", msg.source))
            }
            _ => None,
        });
    let id = id.ok_or_else(|| {
        "message has no id (no event-id header, and no fallback configured)".to_owned()
    })?;
    check_len("message_id", &id).map_err(|e| e.to_string())?;
    Ok(id)
}

/// The id of the dead letter this message would become (a replay keeps its own).
fn dead_letter_key<H>(s: &Shared<H>, m: &Incoming) -> Uuid {
    m.replay_of.unwrap_or_else(|| {
        store::dead_letter_id(
            &s.name,
            (!m.message_id.is_empty()).then_some(m.message_id.as_str()),
            &m.source,
            m.position.as_deref(),
            &m.headers,
            &m.payload,
        )
    })
}

/// A redelivery of a message this consumer already finished (applied, or dead-lettered):
/// one indexed read instead of a transaction, and no handler attempts or dead letter again.
/// Only redeliveries pay it; an error reads as "not finished", and the normal path decides.
pub(super) async fn finished_before<H>(s: &Shared<H>, m: &Incoming) -> bool {
    if m.replay_of.is_some() {
        return false;
    }
    if s.config.deduplicate
        && !m.message_id.is_empty()
        && Inbox::new(&s.db)
            .is_processed(&s.name, &m.message_id)
            .await
            .unwrap_or(false)
    {
        return true;
    }
    store::dead_letter_exists(&s.db, dead_letter_key(s, m))
        .await
        .unwrap_or(false)
}

/// What earlier attempts of a message (in a batch) left: how many failed, and the delay the
/// last one's handler asked for.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Earlier {
    pub(crate) failures: u32,
    pub(crate) after: Option<Duration>,
}

/// Attempts of earlier deliveries, where the broker counts deliveries; each delivery still
/// gets one attempt.
pub(super) fn failed_before<H>(s: &Shared<H>, m: &Incoming) -> u32 {
    m.deliveries
        .saturating_sub(1)
        .min(s.config.max_attempts.saturating_sub(1))
}

/// How a retry waits.
enum Wait {
    /// Here, telling the broker the message is in progress.
    Hold(Duration),
    /// At the broker, the message handed back.
    Defer(Duration),
}

/// The wait before the attempt after `failures` failed ones, the last asking for `asked`.
fn wait<H>(s: &Shared<H>, d: &Delivery, failures: u32, asked: Option<Duration>) -> Wait {
    match asked {
        // Handing back a message with a key would let its key's later messages overtake it.
        Some(asked) if d.message.ordering_key.is_none() && d.ack.can_defer() => {
            Wait::Defer(asked.min(s.config.max_retry_after))
        }
        Some(asked) => Wait::Hold(asked.min(s.config.max_retry_after)),
        None => Wait::Hold(backoff(
            s.config.retry_backoff,
            s.config.max_retry_backoff,
            failures,
        )),
    }
}

/// Runs `d` to its end. `earlier` says what attempts in a batch left: the next attempt waits
/// first.
pub(crate) async fn handle<H: Handler>(
    s: &Shared<H>,
    mut d: Delivery,
    earlier: Earlier,
    shutdown: &CancellationToken,
) {
    if earlier.failures > 0 {
        match wait(s, &d, earlier.failures, earlier.after) {
            Wait::Defer(delay) => return defer(s, d, delay).await,
            Wait::Hold(delay) => {
                if !hold(&d, delay, shutdown).await {
                    return;
                }
            }
        }
    }
    let missing = match message_id(s, &d.message) {
        Ok(id) => {
            d.message.message_id = id;
            None
        }
        Err(reason) => Some(reason),
    };
    if earlier.failures == 0 && d.message.redelivered && finished_before(s, &d.message).await {
        Counters::bump(&s.counters.duplicates);
        m::inbox_outcome(&s.name, "duplicate");
        return ack(s, d).await;
    }
    if let Some(reason) = missing {
        return dead_letter(s, d, 0, reason, shutdown).await;
    }
    let mut failures = earlier.failures.max(failed_before(s, &d.message));
    let mut outages = 0u32;
    loop {
        d.message.attempt = failures + 1;
        let started = Instant::now();
        let result = attempt(s, &d.message).await;
        m::inbox_handler_time(&s.name, started.elapsed());
        let delay = match result {
            Ok(Applied::New) => {
                Counters::bump(&s.counters.applied);
                m::inbox_outcome(&s.name, "applied");
                return ack(s, d).await;
            }
            Ok(Applied::Duplicate) => {
                Counters::bump(&s.counters.duplicates);
                m::inbox_outcome(&s.name, "duplicate");
                return ack(s, d).await;
            }
            Err(Failure::Handler(e)) => {
                failures += 1;
                if e.is_permanent() || failures >= s.config.max_attempts {
                    return dead_letter(s, d, failures, e.to_string(), shutdown).await;
                }
                Counters::bump(&s.counters.retries);
                m::inbox_outcome(&s.name, "retried");
                tracing::debug!(consumer = %s.name, id = %d.message.message_id, attempt = failures, error = %e, "inbox: handler failed; retrying");
                match wait(s, &d, failures, e.retry_delay()) {
                    Wait::Defer(delay) => return defer(s, d, delay).await,
                    Wait::Hold(delay) => delay,
                }
            }
            Err(Failure::Inbox(e)) => {
                outages += 1;
                tracing::warn!(consumer = %s.name, id = %d.message.message_id, error = %e, "inbox: database unavailable; retrying");
                backoff(s.config.retry_backoff, s.config.max_retry_backoff, outages)
            }
        };
        // Unacknowledged on a stop: the broker redelivers it to whoever runs next.
        if !hold(&d, delay, shutdown).await {
            return;
        }
    }
}

/// How often a held message tells its broker it is still being worked on: well inside NATS's
/// `ack_wait` and a Redis source's `claim_idle` (30 s and 60 s by default).
const IN_PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Holds `d` for `delay`, telling the broker it is in progress until then; `false` on a stop.
async fn hold(d: &Delivery, delay: Duration, shutdown: &CancellationToken) -> bool {
    let until = tokio::time::Instant::now() + delay;
    loop {
        d.ack.in_progress().await;
        let next = until.min(tokio::time::Instant::now() + IN_PROGRESS_EVERY);
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep_until(next) => {}
        }
        if next >= until {
            return true;
        }
    }
}

/// Hands `d` back to its broker to come again after `delay`.
async fn defer<H>(s: &Shared<H>, d: Delivery, delay: Duration) {
    let id = d.message.message_id.clone();
    match d.ack.defer(delay).await {
        Ok(()) => {
            Counters::bump(&s.counters.deferred);
            m::inbox_outcome(&s.name, "deferred");
            tracing::debug!(consumer = %s.name, id = %id, ?delay, "inbox: handed back to the broker for later");
        }
        Err(e) => {
            Counters::bump(&s.counters.ack_failures);
            m::inbox_outcome(&s.name, "ack_failed");
            tracing::warn!(consumer = %s.name, id = %id, error = %e, "inbox: handing a message back failed; the broker will redeliver it when its acknowledgement times out");
        }
    }
}

async fn attempt<H: Handler>(s: &Shared<H>, msg: &Incoming) -> Result<Applied, Failure> {
    let txn = s.db.begin().await.map_err(|e| Failure::Inbox(e.into()))?;
    if s.config.deduplicate {
        let recorded = Inbox::new(&txn)
            .record_from(
                &s.name,
                &msg.message_id,
                Some(&msg.source),
                msg.position.as_deref(),
                msg.received_at,
            )
            .await;
        match recorded {
            Ok(Recorded::New) => {}
            Ok(Recorded::Duplicate) => {
                let _ = txn.rollback().await;
                return Ok(Applied::Duplicate);
            }
            Err(e) => return Err(Failure::Inbox(e)),
        }
    }
    match AssertUnwindSafe(s.handler.handle(&txn, msg))
        .catch_unwind()
        .await
    {
        Ok(Ok(())) => {
            // A commit that failed may still have committed: the next attempt then finds the
            // inbox row and counts a duplicate, which is the truth.
            txn.commit().await.map_err(|e| Failure::Inbox(e.into()))?;
            Ok(Applied::New)
        }
        Ok(Err(e)) => {
            let _ = txn.rollback().await;
            Err(Failure::Handler(e))
        }
        Err(_) => {
            let _ = txn.rollback().await;
            Err(Failure::Handler(HandlerError::retry("handler panicked")))
        }
    }
}

pub(super) async fn ack<H>(s: &Shared<H>, d: Delivery) {
    if let Err(e) = d.ack.ack().await {
        Counters::bump(&s.counters.ack_failures);
        m::inbox_outcome(&s.name, "ack_failed");
        tracing::warn!(consumer = %s.name, id = %d.message.message_id, error = %e, "inbox: acknowledgement failed; the broker will redeliver");
    }
}

/// Keeps the message in `inbox_dead_letters`, then acknowledges it. A replayed dead letter that
/// fails again keeps its row (with the new error) and is not acknowledged: its
/// acknowledgement would delete that row.
pub(super) async fn dead_letter<H>(
    s: &Shared<H>,
    d: Delivery,
    attempts: u32,
    error: String,
    shutdown: &CancellationToken,
) {
    let m = &d.message;
    let now = Utc::now();
    let row = InboxDeadLetter {
        id: dead_letter_key(s, m),
        consumer: s.name.clone(),
        message_id: (!m.message_id.is_empty()).then(|| m.message_id.clone()),
        ordering_key: m.ordering_key.clone(),
        source: Some(m.source.clone()),
        position: m.position.clone(),
        headers: m.headers.clone(),
        payload: m.payload.clone(),
        error,
        attempts,
        received_at: m.received_at,
        failed_at: now,
        replay_requested_at: None,
    };
    let mut tries = 0u32;
    let new = loop {
        let written = match m.replay_of {
            Some(id) => store::refail_dead_letter(&s.db, id, &row.error, attempts, now)
                .await
                .map(|()| true),
            None => store::insert_dead_letter(&s.db, &row).await,
        };
        match written {
            Ok(new) => break new,
            Err(e) => {
                tries += 1;
                tracing::warn!(consumer = %s.name, error = %e, "inbox: writing a dead letter failed; retrying");
                let delay = backoff(s.config.retry_backoff, s.config.max_retry_backoff, tries);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    };
    if new {
        Counters::bump(&s.counters.dead_lettered);
        m::inbox_outcome(&s.name, "dead_lettered");
        tracing::warn!(consumer = %s.name, id = %row.message_id.as_deref().unwrap_or("-"), attempts, error = %row.error, "inbox: message dead-lettered");
    } else {
        // A redelivery of a message dead-lettered before: its dead letter stands as it was.
        Counters::bump(&s.counters.duplicates);
        m::inbox_outcome(&s.name, "duplicate");
        tracing::debug!(consumer = %s.name, id = %row.message_id.as_deref().unwrap_or("-"), "inbox: redelivered message was dead-lettered already");
    }
    if m.replay_of.is_none() {
        ack(s, d).await;
    }
}
