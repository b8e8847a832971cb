//! Rows into events: the entity model for reads through SeaQuery, and claimed rows read by
//! position on the relay's hot path (PostgreSQL's faster sqlx decoder is in
//! `decode` below and builds events with the same [`claimed_event!`] macro).

use sea_orm::QueryResult;
use seaorm_outbox_entity::OutboxEventModel;
use serde_json::Value;
use uuid::Uuid;

use crate::error::Error;
use crate::event::{OutboxEvent, headers_from_json};

/// A claimed row: the event, or (its id if readable, why not) for a row this library cannot read.
pub(crate) type ClaimedRow = std::result::Result<OutboxEvent, (Option<Uuid>, String)>;

/// The columns a claim returns, in the order [`from_claimed_row`] reads them.
pub(crate) const CLAIMED_COLUMNS: &str = "id, event_type, aggregate_type, aggregate_id, payload, \
     headers, occurred_at, created_at, attempts, last_error, next_attempt_at, deliver_at, expires_at";

/// An event leased to `$locked_by` from a row of [`CLAIMED_COLUMNS`], given its `id` (column 0)
/// and `headers` (column 5): `$col!(n)` decodes the column at position `n`, returning early on
/// an error. Both claimed-row decoders (sea-orm's and PostgreSQL's sqlx one) build events here,
/// so the columns' positions are written once.
macro_rules! claimed_event {
    ($id:expr, $headers:expr, $locked_by:expr, $col:ident) => {{
        let attempts: i32 = $col!(8usize);
        $crate::event::OutboxEvent {
            id: $id,
            event_type: $col!(1usize),
            aggregate_type: $col!(2usize),
            aggregate_id: $col!(3usize),
            payload: $col!(4usize),
            headers: $headers,
            occurred_at: $col!(6usize),
            created_at: $col!(7usize),
            status: ::seaorm_outbox_entity::OutboxStatus::Pending,
            attempts: u32::try_from(attempts).unwrap_or(0),
            last_error: $col!(9usize),
            next_attempt_at: $col!(10usize),
            published_at: None,
            failed_at: None,
            locked_by: Some($locked_by.to_owned()),
            deliver_at: $col!(11usize),
            expires_at: $col!(12usize),
        }
    }};
}

/// Reads claimed rows into events leased to `token`, through PostgreSQL's sqlx decoder where
/// the rows are PostgreSQL's and of the expected types, by position through sea-orm otherwise.
pub(crate) fn read_claimed(rows: &[QueryResult], token: &str) -> Vec<ClaimedRow> {
    #[cfg(feature = "postgres")]
    if let Some(first) = rows.first().and_then(QueryResult::try_as_pg_row)
        && decode::claimed_types_match(first)
    {
        return rows
            .iter()
            .map(|r| match r.try_as_pg_row() {
                Some(pg) => decode::from_claimed_row(pg, token),
                None => from_claimed_row(r, token),
            })
            .collect();
    }
    rows.iter().map(|r| from_claimed_row(r, token)).collect()
}

/// Reads a row of [`CLAIMED_COLUMNS`] by position, straight into an event leased to
/// `locked_by`. By name through the entity model, decoding cost a third of the relay's own CPU
/// (BENCHMARKS.md). A row it cannot read yields its id, if that much is readable, and the reason.
fn from_claimed_row(row: &QueryResult, locked_by: &str) -> ClaimedRow {
    let id: Uuid = row.try_get_by_index(0).map_err(|e| (None, e.to_string()))?;
    let corrupt = |e: &dyn std::fmt::Display| (Some(id), e.to_string());
    let get_err = |e: sea_orm::DbErr| corrupt(&e);
    let headers: Value = row.try_get_by_index(5).map_err(get_err)?;
    let headers = headers_from_json(headers).map_err(|e| corrupt(&e))?;
    macro_rules! col {
        ($n:expr) => {
            row.try_get_by_index($n).map_err(get_err)?
        };
    }
    Ok(claimed_event!(id, headers, locked_by, col))
}

impl TryFrom<OutboxEventModel> for OutboxEvent {
    type Error = Error;

    fn try_from(m: OutboxEventModel) -> Result<Self, Error> {
        let headers = headers_from_json(m.headers).map_err(|e| Error::CorruptRow {
            id: m.id,
            reason: e.to_string(),
            source: Some(Box::new(e)),
        })?;
        Ok(Self {
            id: m.id,
            event_type: m.event_type,
            aggregate_type: m.aggregate_type,
            aggregate_id: m.aggregate_id,
            payload: m.payload,
            headers,
            occurred_at: m.occurred_at,
            created_at: m.created_at,
            status: m.status,
            attempts: u32::try_from(m.attempts).unwrap_or(0),
            last_error: m.last_error,
            next_attempt_at: m.next_attempt_at,
            published_at: m.published_at,
            failed_at: m.failed_at,
            locked_by: m.locked_by,
            deliver_at: m.deliver_at,
            expires_at: m.expires_at,
        })
    }
}

/// Claimed rows read straight from sqlx. Every row of one result shares its column types, so
/// [`claimed_types_match`] checks them once per batch and each value is then decoded
/// unchecked; headers go straight into [`Headers`](crate::Headers) without a JSON tree. Through
/// sea-orm (a type check per value, a `format!` per NULL, headers via a `Value`), reading rows
/// was about half of the relay's client-side CPU; this reads them with a third less work
/// (BENCHMARKS.md). Rows of any other shape take the portable path.
#[cfg(feature = "postgres")]
mod decode {
    use chrono::{DateTime, Utc};
    use sea_orm::sqlx::postgres::{PgColumn, PgRow, Postgres};
    use sea_orm::sqlx::types::Json;
    use sea_orm::sqlx::{Column, Row, Type};
    use serde_json::Value;
    use uuid::Uuid;

    use super::ClaimedRow;
    use crate::event::{Headers, headers_from_json};

    /// Whether `row`'s columns are [`CLAIMED_COLUMNS`](super::CLAIMED_COLUMNS) with the types
    /// [`from_claimed_row`] decodes.
    pub(crate) fn claimed_types_match(row: &PgRow) -> bool {
        fn is<T: Type<Postgres>>(c: &PgColumn) -> bool {
            T::compatible(c.type_info())
        }
        let c = row.columns();
        c.len() == 13
            && is::<Uuid>(&c[0])
            && c[1..4].iter().all(is::<String>)
            && c[4..6].iter().all(is::<Value>)
            && c[6..8].iter().all(is::<DateTime<Utc>>)
            && is::<i32>(&c[8])
            && is::<String>(&c[9])
            && c[10..13].iter().all(is::<DateTime<Utc>>)
    }

    /// An event leased to `locked_by` from a row whose types [`claimed_types_match`] passed.
    pub(crate) fn from_claimed_row(row: &PgRow, locked_by: &str) -> ClaimedRow {
        let id: Uuid = row
            .try_get_unchecked(0)
            .map_err(|e| (None, e.to_string()))?;
        let corrupt = |e: &dyn std::fmt::Display| (Some(id), e.to_string());
        let get_err = |e: sea_orm::sqlx::Error| corrupt(&e);
        let headers = match row.try_get_unchecked::<Json<Headers>, _>(5) {
            Ok(Json(h)) => h,
            // Say which header is wrong, as the portable path does.
            Err(e) => {
                return Err(match row.try_get_unchecked::<Value, _>(5) {
                    Ok(v) => headers_from_json(v).map_or_else(|h| corrupt(&h), |_| corrupt(&e)),
                    Err(e) => corrupt(&e),
                });
            }
        };
        macro_rules! col {
            ($n:expr) => {
                row.try_get_unchecked($n).map_err(get_err)?
            };
        }
        Ok(claimed_event!(id, headers, locked_by, col))
    }
}
