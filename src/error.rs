//! The crate's one error type.

use seaorm_outbox_entity::OutboxStatus;
use uuid::Uuid;

/// A `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A boxed error from a broker client, a publisher or a handler: what crosses the
/// [`Publisher`](crate::Publisher), [`Acknowledge`](crate::inbox::Acknowledge) and
/// [`Handler`](crate::inbox::Handler) boundaries, keeping its source chain.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Everything the repository and the relay can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database rejected or could not run a statement.
    #[error("database error: {0}")]
    Database(#[from] sea_orm::DbErr),

    /// No outbox event has this id.
    #[error("outbox event {id} not found")]
    NotFound {
        /// The id that was looked up.
        id: Uuid,
    },

    /// The event was rejected before anything was written.
    #[error("invalid outbox event: {0}")]
    InvalidEvent(#[from] InvalidEvent),

    /// The operation does not apply to an event in this state, e.g. publishing a dead letter.
    #[error("outbox event {id} is {status:?}; cannot {operation}")]
    InvalidState {
        /// The event.
        id: Uuid,
        /// Its current status.
        status: OutboxStatus,
        /// What was attempted.
        operation: &'static str,
    },

    /// The event cannot be cancelled or rescheduled: it was never scheduled, or it is due (or
    /// about to be) and a relay may already hold it.
    #[error("outbox event {id} cannot be {operation}: {reason}")]
    NotScheduled {
        /// The event.
        id: Uuid,
        /// `cancelled` or `rescheduled`.
        operation: &'static str,
        /// Why.
        reason: &'static str,
    },

    /// A page size above the documented maximum was asked for.
    #[error("limit {requested} exceeds the maximum of {max}")]
    LimitTooLarge {
        /// The limit passed in.
        requested: u64,
        /// The largest limit accepted.
        max: u64,
    },

    /// A stored row could not be read back as an event (written outside this library?).
    #[error("outbox event {id} is corrupt: {reason}")]
    CorruptRow {
        /// The row's id.
        id: Uuid,
        /// What is wrong with it.
        reason: String,
        /// The decoding error behind it, when there is one.
        #[source]
        source: Option<BoxError>,
    },

    /// The relay's publisher could not reach its broker ([`Relay::drain`](crate::Relay::drain));
    /// the batch was handed back unattempted, with no attempt spent.
    #[error("publisher `{publisher}` is unavailable: {reason}")]
    PublisherUnavailable {
        /// The publisher's name.
        publisher: String,
        /// What it said last.
        reason: String,
    },

    /// An inbox key (consumer name or message id) is empty, too long or not storable.
    #[error("inbox {field} {reason}")]
    InvalidInboxKey {
        /// `consumer` or `message_id`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// A consumer could not connect to, subscribe at or keep receiving from its broker.
    #[error("{broker} consumer: {reason}")]
    Broker {
        /// The broker: `kafka`, `nats`, `rabbitmq` or `redis`.
        broker: &'static str,
        /// What failed.
        reason: String,
        /// The client's own error, when there is one.
        #[source]
        source: Option<BoxError>,
    },

    /// The log relay cannot read its replication slot: the server or role cannot decode
    /// (`wal_level`, `REPLICATION`), or the slot is missing or of another kind.
    #[error("log relay (slot `{slot}`): {reason}")]
    LogRelay {
        /// The replication slot.
        slot: String,
        /// What is missing, and how to fix it.
        reason: String,
        /// The error behind it, when there is one.
        #[source]
        source: Option<BoxError>,
    },

    /// A log relay's slot was not confirmed past a position in time
    /// ([`wait_confirmed`](crate::relay::wal::wait_confirmed)): the relay is stopped, behind,
    /// or retrying an event that holds the slot.
    #[error(
        "log relay slot `{slot}` not confirmed past {position} within {waited:?} (confirmed at \
         {confirmed})"
    )]
    NotConfirmed {
        /// The replication slot.
        slot: String,
        /// The position waited for, as `X/Y`.
        position: String,
        /// The slot's confirmed position when the wait ended, as `X/Y`.
        confirmed: String,
        /// How long it waited.
        waited: std::time::Duration,
    },

    /// The relay or repository was configured with values that cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A listing's [`after`](crate::repository::EventQuery::after) is not a position in its
    /// order.
    #[error(transparent)]
    InvalidCursor(#[from] InvalidEventCursor),

    /// An operation this kind of thing does not offer, e.g. discarding the inbox's dead letters
    /// by aggregate.
    #[error("not supported: {what}")]
    Unsupported {
        /// What was asked.
        what: String,
    },

    /// A [`RelayGroup`](crate::relay::RelayGroup) has no tenant by this id, or already has one
    /// (`exists`).
    #[error("relay group tenant `{tenant}` {}", if *.exists { "already exists" } else { "not found" })]
    Tenant {
        /// The tenant id given.
        tenant: String,
        /// It was being added and is already there.
        exists: bool,
    },
}

/// A text that is not an [`EventCursor`](crate::repository::EventCursor), or a cursor of
/// another listing's order.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid event cursor `{text}`: {reason}")]
pub struct InvalidEventCursor {
    pub(crate) text: String,
    pub(crate) reason: &'static str,
}

/// Why an event was rejected. Nothing is written when any of these is returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidEvent {
    /// A required text field was empty or only whitespace.
    #[error("{field} must not be empty")]
    Empty {
        /// `event_type`, `aggregate_type` or `aggregate_id`.
        field: &'static str,
    },

    /// A text field is longer than its column.
    #[error("{field} is {len} bytes; the maximum is {max}")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The column's limit in bytes.
        max: usize,
    },

    /// The payload could not be serialised to JSON.
    #[error("payload failed to serialise: {0}")]
    Payload(#[source] serde_json::Error),

    /// The serialised payload is larger than the configured limit.
    #[error("payload is {size} bytes; the limit is {limit}")]
    PayloadTooLarge {
        /// Serialised size in bytes.
        size: usize,
        /// The configured limit ([`OutboxConfig::max_payload_bytes`](crate::OutboxConfig)).
        limit: usize,
    },

    /// A text field, header or payload string contains U+0000, which PostgreSQL cannot store.
    #[error("text must not contain the NUL character (U+0000)")]
    NulCharacter,

    /// The event was scheduled further ahead than
    /// [`OutboxConfig::max_delay`](crate::OutboxConfig) allows.
    #[error("deliver_at {at} is more than {max_delay:?} ahead")]
    DeliverTooLate {
        /// The time asked for.
        at: chrono::DateTime<chrono::Utc>,
        /// The configured limit.
        max_delay: std::time::Duration,
    },

    /// The event would expire before it may be delivered: `expires_at` is not after its
    /// delivery time (now, or [`deliver_at`](crate::NewEvent::deliver_at)).
    #[error("expires_at {expires_at} is not after the event's delivery time {deliver_at}")]
    ExpiresBeforeDelivery {
        /// The expiry asked for.
        expires_at: chrono::DateTime<chrono::Utc>,
        /// The earliest time it may be delivered.
        deliver_at: chrono::DateTime<chrono::Utc>,
    },

    /// Headers must be a JSON object whose values are all strings.
    #[error("headers must be a map of strings: {reason}")]
    Headers {
        /// What was found instead.
        reason: String,
    },
}
