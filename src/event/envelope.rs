//! Message mode's envelope (PostgreSQL): an event's fields in one versioned JSON object, written
//! with `pg_logical_emit_message` and read back by the WAL relay.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use seaorm_outbox_entity::OutboxStatus;

use super::{Headers, OutboxEvent, ValidEvent};
use crate::error::InvalidEvent;

/// A message-mode event as written to the log: the event's fields in one JSON object, with a
/// version so the format can grow. Written borrowed (`&str`, `&Value`, the headers as a
/// validated object or [`Headers`]), read back owned.
#[derive(serde::Serialize, serde::Deserialize)]
struct Envelope<S, P, H> {
    v: u32,
    id: Uuid,
    event_type: S,
    aggregate_type: S,
    aggregate_id: S,
    payload: P,
    headers: H,
    occurred_at: DateTime<Utc>,
    /// Absent from envelopes written before expiry existed, and from events without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<DateTime<Utc>>,
}

/// The envelope version this library writes and reads.
const ENVELOPE_VERSION: u32 = 1;

impl ValidEvent {
    /// The event as the JSON text that message mode writes.
    pub(crate) fn to_envelope(&self) -> Result<String, InvalidEvent> {
        let e = Envelope {
            v: ENVELOPE_VERSION,
            id: self.id,
            event_type: &self.event_type,
            aggregate_type: &self.aggregate_type,
            aggregate_id: &self.aggregate_id,
            payload: &self.payload,
            headers: &self.headers,
            occurred_at: self.occurred_at,
            expires_at: self.expires_at,
        };
        serde_json::to_string(&e).map_err(InvalidEvent::Payload)
    }
}

impl OutboxEvent {
    /// The event as message mode writes it (to replay a log dead letter).
    pub(crate) fn to_envelope(&self) -> serde_json::Result<String> {
        serde_json::to_string(&Envelope {
            v: ENVELOPE_VERSION,
            id: self.id,
            event_type: &self.event_type,
            aggregate_type: &self.aggregate_type,
            aggregate_id: &self.aggregate_id,
            payload: &self.payload,
            headers: &self.headers,
            occurred_at: self.occurred_at,
            // A replay is an operator's decision to send, expired or not.
            expires_at: None,
        })
    }

    /// Reads a message-mode envelope back, committed at `created_at`; the reason if it is not
    /// one this library wrote.
    pub(crate) fn from_envelope(content: &[u8], created_at: DateTime<Utc>) -> Result<Self, String> {
        let e: Envelope<String, Value, Headers> =
            serde_json::from_slice(content).map_err(|e| format!("not an outbox envelope: {e}"))?;
        if e.v != ENVELOPE_VERSION {
            return Err(format!(
                "envelope version {} (this build reads {ENVELOPE_VERSION})",
                e.v
            ));
        }
        Ok(Self {
            id: e.id,
            event_type: e.event_type,
            aggregate_type: e.aggregate_type,
            aggregate_id: e.aggregate_id,
            payload: e.payload,
            headers: e.headers,
            occurred_at: e.occurred_at,
            created_at,
            status: OutboxStatus::Pending,
            attempts: 0,
            last_error: None,
            next_attempt_at: created_at,
            published_at: None,
            failed_at: None,
            locked_by: None,
            deliver_at: None,
            expires_at: e.expires_at,
        })
    }
}
