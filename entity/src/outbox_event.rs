//! The `outbox_events` table, in SeaORM 2's dense entity format.

use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// Where an event is in its life: waiting for the relay, delivered, or dead-lettered.
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum, Serialize, Deserialize,
)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::N(16))")]
#[serde(rename_all = "lowercase")]
pub enum OutboxStatus {
    /// Committed and not yet delivered (possibly in backoff or leased by a relay).
    #[sea_orm(string_value = "pending")]
    Pending,
    /// Acknowledged by the broker.
    #[sea_orm(string_value = "published")]
    Published,
    /// Dead letter: retries exhausted, permanently rejected, or failed by hand.
    #[sea_orm(string_value = "failed")]
    Failed,
}

impl OutboxStatus {
    /// The value stored in the `status` column.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Published => "published",
            Self::Failed => "failed",
        }
    }
}

/// One outbox event row.
#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "outbox_events")]
pub struct Model {
    /// UUIDv7, so ids sort by creation time. Sent as the broker message id for deduplication.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// What happened, e.g. `order.created`.
    pub event_type: String,
    /// The kind of entity the event belongs to, e.g. `order`.
    pub aggregate_type: String,
    /// The entity's id; with `aggregate_type` it is the ordering and partition key.
    pub aggregate_id: String,
    /// The event body.
    #[sea_orm(column_type = "JsonBinary")]
    pub payload: Json,
    /// Free-form string headers (correlation id, causation id, trace context), as a JSON object.
    #[sea_orm(column_type = "JsonBinary")]
    pub headers: Json,
    /// When the domain event happened, as told by the writer.
    pub occurred_at: DateTimeUtc,
    /// When the row was written.
    pub created_at: DateTimeUtc,
    /// Pending, published or failed.
    pub status: OutboxStatus,
    /// Failed delivery attempts so far.
    pub attempts: i32,
    /// The most recent delivery error, truncated.
    #[sea_orm(column_type = "Text", nullable)]
    pub last_error: Option<String>,
    /// The earliest time a relay may (re)claim the event: creation, backoff, or lease end.
    pub next_attempt_at: DateTimeUtc,
    /// When the broker acknowledged it.
    pub published_at: Option<DateTimeUtc>,
    /// When it was dead-lettered.
    pub failed_at: Option<DateTimeUtc>,
    /// The lease token of the relay batch that holds the event, if any.
    pub locked_by: Option<String>,
    /// When that lease ends; after it, another relay may claim the event.
    pub locked_until: Option<DateTimeUtc>,
    /// The time it was scheduled for (`NewEvent::deliver_at`), if it was.
    pub deliver_at: Option<DateTimeUtc>,
    /// Whether, scheduled, it holds its aggregate's later events until it is delivered
    /// (`NewEvent::holds_later_events`); otherwise it is ordered by its time.
    pub holds_aggregate: bool,
    /// Not sent after this time (`NewEvent::expires_at`): dead-lettered as expired instead.
    pub expires_at: Option<DateTimeUtc>,
}

impl ActiveModelBehavior for ActiveModel {}
