//! The metrics the relay records, through the [`metrics`] facade so any installed recorder
//! gets them; their names are in [`names`](super::names).
//!
//! When a write-back touched fewer rows than it carried (a lost lease), the per-type split of
//! that kind is unknown, so its count is recorded with `event_type="unknown"`.

use std::time::Duration;

use super::names;
use crate::event::OutboxEvent;
use crate::stats::OutboxStats;
use crate::store::{Fate, WriteBack};

const KINDS: [&str; 3] = [names::PUBLISHED, names::RETRIED, names::DEAD_LETTERED];

/// Records one batch's counters and histograms, labelled with `publisher` and, for a relay
/// group's tenant, `tenant`.
pub(crate) fn record_batch(
    publisher: &str,
    tenant: Option<&str>,
    events: &[OutboxEvent],
    fates: &[Fate],
    written: Option<&WriteBack>,
    elapsed: Duration,
) {
    let mut base = vec![::metrics::Label::new("publisher", publisher.to_owned())];
    if let Some(t) = tenant {
        base.push(::metrics::Label::new("tenant", t.to_owned()));
    }
    let by_type = |event_type: &str| {
        let mut l = base.clone();
        l.push(::metrics::Label::new("event_type", event_type.to_owned()));
        l
    };
    ::metrics::histogram!(names::BATCH_DURATION, base.clone()).record(elapsed.as_secs_f64());
    ::metrics::histogram!(names::BATCH_SIZE, base.clone()).record(events.len() as f64);
    let Some(w) = written else { return };

    // Per event type and kind, counted from the fates; a batch has few event types.
    let mut types: Vec<(&str, [u64; 3])> = Vec::new();
    let mut planned = [0u64; 3];
    let ack_latency = ::metrics::histogram!(names::COMMIT_TO_ACK, base.clone());
    let now = chrono::Utc::now();
    for (e, fate) in events.iter().zip(fates) {
        let kind = match fate {
            Fate::Published => {
                if let Ok(d) = (now - e.created_at).to_std() {
                    ack_latency.record(d.as_secs_f64());
                }
                0
            }
            Fate::Retry { .. } => 1,
            Fate::Dead { .. } => 2,
            Fate::Release { .. } | Fate::Discard => continue,
        };
        planned[kind] += 1;
        match types.iter_mut().find(|(t, _)| *t == e.event_type) {
            Some((_, counts)) => counts[kind] += 1,
            None => {
                let mut counts = [0; 3];
                counts[kind] = 1;
                types.push((&e.event_type, counts));
            }
        }
    }
    let applied = [w.published, w.retried, w.dead];
    for kind in 0..3 {
        if applied[kind] == planned[kind] {
            for (event_type, counts) in &types {
                if counts[kind] > 0 {
                    ::metrics::counter!(KINDS[kind], by_type(event_type)).increment(counts[kind]);
                }
            }
        } else if applied[kind] > 0 {
            ::metrics::counter!(KINDS[kind], by_type("unknown")).increment(applied[kind]);
        }
    }
    let discards = fates.iter().filter(|f| **f == Fate::Discard).count() as u64;
    if applied[2] == planned[2] && w.discarded == discards {
        for (e, _) in events.iter().zip(fates).filter(|(_, f)| f.is_expiry()) {
            ::metrics::counter!(names::EXPIRED, by_type(&e.event_type)).increment(1);
        }
    }
    let lost = w.lost();
    if lost > 0 {
        ::metrics::counter!(names::LOST_LEASES, base).increment(lost);
    }
}

/// Sets the backlog gauges from a stats snapshot.
pub(crate) fn record_gauges(stats: &OutboxStats) {
    ::metrics::gauge!(names::BACKLOG).set(stats.pending() as f64);
    ::metrics::gauge!(names::DEAD_LETTERS).set(stats.failed as f64);
    ::metrics::gauge!(names::OLDEST_PENDING_AGE)
        .set(stats.oldest_pending_age().map_or(0.0, |d| d.as_secs_f64()));
    ::metrics::gauge!(names::SCHEDULED).set(stats.scheduled as f64);
    let next = stats
        .next_scheduled_at
        .and_then(|t| (t - stats.at).to_std().ok());
    ::metrics::gauge!(names::NEXT_SCHEDULED).set(next.map_or(0.0, |d| d.as_secs_f64()));
}

/// Sets `publisher`'s breaker gauges: its state (0 closed, 1 open, 2 half-open) and how long it
/// has been unavailable.
pub(crate) fn record_breaker(publisher: &str, state: f64, unavailable_for: Duration) {
    ::metrics::gauge!(names::BREAKER_STATE, "publisher" => publisher.to_owned()).set(state);
    ::metrics::gauge!(names::PUBLISHER_UNAVAILABLE, "publisher" => publisher.to_owned())
        .set(unavailable_for.as_secs_f64());
}

/// Counts one inbox message's outcome.
pub(crate) fn inbox_outcome(consumer: &str, outcome: &'static str) {
    ::metrics::counter!(names::INBOX_MESSAGES, "consumer" => consumer.to_owned(), "outcome" => outcome)
        .increment(1);
}

/// Records one inbox attempt's duration.
pub(crate) fn inbox_handler_time(consumer: &str, elapsed: Duration) {
    ::metrics::histogram!(names::INBOX_HANDLER, "consumer" => consumer.to_owned())
        .record(elapsed.as_secs_f64());
}

/// Sets a consumer's lag as its broker reports it.
pub(crate) fn inbox_lag(consumer: &str, messages: u64) {
    ::metrics::gauge!(names::INBOX_LAG, "consumer" => consumer.to_owned()).set(messages as f64);
}

/// The log relay's counts for one publisher call, per event type of the events it settled.
#[cfg(feature = "postgres")]
pub(crate) fn log_settled(publisher: &str, kind: LogKind, events: &[OutboxEvent]) {
    if events.is_empty() {
        return;
    }
    let name = match kind {
        LogKind::Published => names::PUBLISHED,
        LogKind::Retried => names::RETRIED,
        LogKind::DeadLettered => names::DEAD_LETTERED,
        LogKind::Expired => names::EXPIRED,
    };
    // A call has few event types: count per type, then one increment each.
    let mut by_type: Vec<(&str, u64)> = Vec::new();
    for e in events {
        match by_type.iter_mut().find(|(t, _)| *t == e.event_type) {
            Some((_, n)) => *n += 1,
            None => by_type.push((&e.event_type, 1)),
        }
    }
    for (event_type, n) in by_type {
        ::metrics::counter!(name, "publisher" => publisher.to_owned(), "event_type" => event_type.to_owned())
            .increment(n);
    }
    if kind == LogKind::Published {
        let latency =
            ::metrics::histogram!(names::COMMIT_TO_ACK, "publisher" => publisher.to_owned());
        let now = chrono::Utc::now();
        for e in events {
            if let Ok(d) = (now - e.created_at).to_std() {
                latency.record(d.as_secs_f64());
            }
        }
    }
}

/// What happened to an event the log relay sent.
#[cfg(feature = "postgres")]
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogKind {
    Published,
    Retried,
    DeadLettered,
    Expired,
}

/// Sets a log relay's slot gauges; `retained` only when it was read.
#[cfg(feature = "postgres")]
pub(crate) fn slot_lag(slot: &str, bytes: u64, age: Duration, retained: Option<u64>) {
    ::metrics::gauge!(names::SLOT_LAG_BYTES, "slot" => slot.to_owned()).set(bytes as f64);
    ::metrics::gauge!(names::SLOT_LAG_SECONDS, "slot" => slot.to_owned()).set(age.as_secs_f64());
    if let Some(r) = retained {
        ::metrics::gauge!(names::SLOT_RETAINED_BYTES, "slot" => slot.to_owned()).set(r as f64);
    }
}
