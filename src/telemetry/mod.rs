//! Telemetry: the metrics the relay records (`metrics`, through the
//! [`metrics`](::metrics) facade, so any installed recorder gets them) and the W3C trace context
//! the repository captures into each event at write time (`trace`, with the `otel` feature).
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `outbox_events_published_total` | counter | `publisher`, `event_type` | events marked published |
//! | `outbox_events_retried_total` | counter | `publisher`, `event_type` | failed attempts scheduled for retry |
//! | `outbox_events_dead_lettered_total` | counter | `publisher`, `event_type` | events moved to the dead letter |
//! | `outbox_events_expired_total` | counter | `publisher`, `event_type` | events dead-lettered because they expired undelivered (also in `dead_lettered`) |
//! | `outbox_lost_leases_total` | counter | `publisher` | write-backs refused because the lease had passed to another relay |
//! | `outbox_backlog` | gauge | | pending events (due, in backoff or leased; not scheduled for later) |
//! | `outbox_oldest_pending_age_seconds` | gauge | | age of the oldest pending event, since it became due (`occurred_at`, or `deliver_at` if scheduled) |
//! | `outbox_scheduled` | gauge | | pending events scheduled for later |
//! | `outbox_next_scheduled_seconds` | gauge | | seconds until the earliest scheduled event is due; 0 when none |
//! | `outbox_dead_letters` | gauge | | dead-lettered events |
//! | `outbox_commit_to_ack_seconds` | histogram | `publisher` | broker ack time minus the row's `created_at` |
//! | `outbox_batch_duration_seconds` | histogram | `publisher` | claim → publish → write-back of one batch |
//! | `outbox_batch_size` | histogram | `publisher` | events per claimed batch |
//! | `outbox_breaker_state` | gauge | `publisher` | the relay's circuit breaker: 0 closed, 1 open, 2 half-open |
//! | `outbox_publisher_unavailable_seconds` | gauge | `publisher` | how long the publisher has been unavailable; 0 while it answers |
//! | `outbox_slot_lag_bytes` | gauge | `slot` | log relay: WAL written since its slot's confirmed position |
//! | `outbox_slot_lag_seconds` | gauge | `slot` | log relay: age of the oldest committed event not yet confirmed; 0 when caught up |
//! | `outbox_slot_retained_bytes` | gauge | `slot` | log relay: WAL the server keeps for its slot |
//! | `outbox_inbox_messages_total` | counter | `consumer`, `outcome` | inbox messages by outcome: `applied`, `duplicate`, `dead_lettered`, `retried`, `deferred` (handed back to the broker for later), `ack_failed` |
//! | `outbox_inbox_handler_seconds` | histogram | `consumer` | one attempt: begin → record → handler → commit |
//! | `outbox_inbox_consumer_lag` | gauge | `consumer` | messages the broker holds for the consumer and has not delivered, where it says |

pub(crate) mod metrics;
pub(crate) mod trace;

/// Metric names.
pub mod names {
    /// Counter: events marked published.
    pub const PUBLISHED: &str = "outbox_events_published_total";
    /// Counter: failed attempts scheduled for a retry.
    pub const RETRIED: &str = "outbox_events_retried_total";
    /// Counter: events dead-lettered.
    pub const DEAD_LETTERED: &str = "outbox_events_dead_lettered_total";
    /// Counter: events dead-lettered because they expired undelivered.
    pub const EXPIRED: &str = "outbox_events_expired_total";
    /// Counter: write-backs refused because the lease had passed to another relay.
    pub const LOST_LEASES: &str = "outbox_lost_leases_total";
    /// Gauge: pending events, not counting those scheduled for later.
    pub const BACKLOG: &str = "outbox_backlog";
    /// Gauge: age of the oldest pending event in seconds.
    pub const OLDEST_PENDING_AGE: &str = "outbox_oldest_pending_age_seconds";
    /// Gauge: dead letters.
    pub const DEAD_LETTERS: &str = "outbox_dead_letters";
    /// Gauge: pending events scheduled for later.
    pub const SCHEDULED: &str = "outbox_scheduled";
    /// Gauge: seconds until the earliest scheduled event is due; 0 when none is scheduled.
    pub const NEXT_SCHEDULED: &str = "outbox_next_scheduled_seconds";
    /// Histogram: broker ack time minus `created_at`, in seconds.
    pub const COMMIT_TO_ACK: &str = "outbox_commit_to_ack_seconds";
    /// Histogram: one batch's claim → publish → write-back, in seconds.
    pub const BATCH_DURATION: &str = "outbox_batch_duration_seconds";
    /// Histogram: events per batch.
    pub const BATCH_SIZE: &str = "outbox_batch_size";
    /// Gauge: the circuit breaker's state, 0 closed, 1 open, 2 half-open.
    pub const BREAKER_STATE: &str = "outbox_breaker_state";
    /// Gauge: seconds the publisher has been unavailable; 0 while it answers.
    pub const PUBLISHER_UNAVAILABLE: &str = "outbox_publisher_unavailable_seconds";
    /// Gauge: bytes of WAL since the log relay's confirmed position.
    pub const SLOT_LAG_BYTES: &str = "outbox_slot_lag_bytes";
    /// Gauge: seconds since the oldest committed event the log relay has not confirmed.
    pub const SLOT_LAG_SECONDS: &str = "outbox_slot_lag_seconds";
    /// Gauge: bytes of WAL the server retains for the log relay's slot.
    pub const SLOT_RETAINED_BYTES: &str = "outbox_slot_retained_bytes";
    /// Counter: inbox messages by `outcome`.
    pub const INBOX_MESSAGES: &str = "outbox_inbox_messages_total";
    /// Histogram: one inbox attempt, begin to commit, in seconds.
    pub const INBOX_HANDLER: &str = "outbox_inbox_handler_seconds";
    /// Gauge: messages waiting at the broker for the consumer.
    pub const INBOX_LAG: &str = "outbox_inbox_consumer_lag";
}
