//! Metrics (through the [`metrics`] facade, so any installed recorder gets them) and W3C trace
//! context capture.
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `outbox_events_published_total` | counter | `publisher`, `event_type` | events marked published |
//! | `outbox_events_retried_total` | counter | `publisher`, `event_type` | failed attempts scheduled for retry |
//! | `outbox_events_dead_lettered_total` | counter | `publisher`, `event_type` | events moved to the dead letter |
//! | `outbox_lost_leases_total` | counter | `publisher` | write-backs refused because the lease had passed to another relay |
//! | `outbox_backlog` | gauge | | pending events (due, in backoff or leased) |
//! | `outbox_oldest_pending_age_seconds` | gauge | | age of the oldest pending event, by `occurred_at` |
//! | `outbox_dead_letters` | gauge | | dead-lettered events |
//! | `outbox_commit_to_ack_seconds` | histogram | `publisher` | broker ack time minus the row's `created_at` |
//! | `outbox_batch_duration_seconds` | histogram | `publisher` | claim → publish → write-back of one batch |
//! | `outbox_batch_size` | histogram | `publisher` | events per claimed batch |
//!
//! When a write-back touched fewer rows than it carried (a lost lease), the per-type split of
//! that kind is unknown, so its count is recorded with `event_type="unknown"`.

use std::time::Duration;

use crate::event::OutboxEvent;
use crate::relay::store::{Fate, WriteBack};
use crate::stats::OutboxStats;

/// Metric names.
pub mod names {
    /// Counter: events marked published.
    pub const PUBLISHED: &str = "outbox_events_published_total";
    /// Counter: failed attempts scheduled for a retry.
    pub const RETRIED: &str = "outbox_events_retried_total";
    /// Counter: events dead-lettered.
    pub const DEAD_LETTERED: &str = "outbox_events_dead_lettered_total";
    /// Counter: write-backs refused because the lease had passed to another relay.
    pub const LOST_LEASES: &str = "outbox_lost_leases_total";
    /// Gauge: pending events.
    pub const BACKLOG: &str = "outbox_backlog";
    /// Gauge: age of the oldest pending event in seconds.
    pub const OLDEST_PENDING_AGE: &str = "outbox_oldest_pending_age_seconds";
    /// Gauge: dead letters.
    pub const DEAD_LETTERS: &str = "outbox_dead_letters";
    /// Histogram: broker ack time minus `created_at`, in seconds.
    pub const COMMIT_TO_ACK: &str = "outbox_commit_to_ack_seconds";
    /// Histogram: one batch's claim → publish → write-back, in seconds.
    pub const BATCH_DURATION: &str = "outbox_batch_duration_seconds";
    /// Histogram: events per batch.
    pub const BATCH_SIZE: &str = "outbox_batch_size";
}

const KINDS: [&str; 3] = [names::PUBLISHED, names::RETRIED, names::DEAD_LETTERED];

/// Records one batch's counters and histograms.
pub(crate) fn record_batch(
    publisher: &str,
    events: &[OutboxEvent],
    fates: &[Fate],
    written: Option<&WriteBack>,
    elapsed: Duration,
) {
    let publisher = publisher.to_owned();
    metrics::histogram!(names::BATCH_DURATION, "publisher" => publisher.clone())
        .record(elapsed.as_secs_f64());
    metrics::histogram!(names::BATCH_SIZE, "publisher" => publisher.clone())
        .record(events.len() as f64);
    let Some(w) = written else { return };

    // Per event type and kind, counted from the fates; a batch has few event types.
    let mut by_type: Vec<(&str, [u64; 3])> = Vec::new();
    let mut planned = [0u64; 3];
    let ack_latency = metrics::histogram!(names::COMMIT_TO_ACK, "publisher" => publisher.clone());
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
            Fate::Release { .. } => continue,
        };
        planned[kind] += 1;
        match by_type.iter_mut().find(|(t, _)| *t == e.event_type) {
            Some((_, counts)) => counts[kind] += 1,
            None => {
                let mut counts = [0; 3];
                counts[kind] = 1;
                by_type.push((&e.event_type, counts));
            }
        }
    }
    let applied = [w.published, w.retried, w.dead];
    for kind in 0..3 {
        if applied[kind] == planned[kind] {
            for (event_type, counts) in &by_type {
                if counts[kind] > 0 {
                    metrics::counter!(KINDS[kind], "publisher" => publisher.clone(), "event_type" => (*event_type).to_owned())
                        .increment(counts[kind]);
                }
            }
        } else if applied[kind] > 0 {
            metrics::counter!(KINDS[kind], "publisher" => publisher.clone(), "event_type" => "unknown")
                .increment(applied[kind]);
        }
    }
    let lost = w.expected - (w.published + w.retried + w.dead + w.released);
    if lost > 0 {
        metrics::counter!(names::LOST_LEASES, "publisher" => publisher).increment(lost);
    }
}

/// Sets the backlog gauges from a stats snapshot.
pub(crate) fn record_gauges(stats: &OutboxStats) {
    metrics::gauge!(names::BACKLOG).set(stats.pending() as f64);
    metrics::gauge!(names::DEAD_LETTERS).set(stats.failed as f64);
    metrics::gauge!(names::OLDEST_PENDING_AGE)
        .set(stats.oldest_pending_age().map_or(0.0, |d| d.as_secs_f64()));
}

/// Adds the current OpenTelemetry span's W3C `traceparent` (and `tracestate`) to `headers`,
/// unless `traceparent` is already there.
#[cfg(feature = "otel")]
pub(crate) fn capture_trace_context(headers: &mut crate::event::Headers) {
    use opentelemetry::trace::TraceContextExt;

    if headers.contains_key("traceparent") {
        return;
    }
    let cx = opentelemetry::Context::current();
    let span = cx.span();
    let sc = span.span_context();
    if !sc.is_valid() {
        return;
    }
    headers.insert(
        "traceparent".to_owned(),
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        ),
    );
    let state = sc.trace_state().header();
    if !state.is_empty() {
        headers.insert("tracestate".to_owned(), state);
    }
}
