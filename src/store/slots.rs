//! Replication slots as an operator sees them: their state (lag, retained WAL, `wal_status`,
//! confirmed position), WAL positions, waiting for a confirmation, and dropping a slot.

use sea_orm::sqlx::{self, PgPool};
use sea_orm::{ConnectionTrait, DbBackend, Statement};

use super::logical::sqlx_err;
use super::pgoutput::lsn_text;
use crate::error::{Error, Result};

const PG: DbBackend = DbBackend::Postgres;

/// A position in PostgreSQL's write-ahead log (`pg_lsn`): ordered, and written and parsed as
/// `X/Y` (two hexadecimal numbers), as PostgreSQL shows it.
///
/// ```
/// use seaorm_outbox::relay::wal::WalPosition;
///
/// let p: WalPosition = "16/B374D848".parse().unwrap();
/// assert_eq!(p.to_string(), "16/B374D848");
/// assert!(p < "17/0".parse().unwrap());
/// assert!("16".parse::<WalPosition>().is_err());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WalPosition(pub u64);

impl std::fmt::Display for WalPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&lsn_text(self.0))
    }
}

/// A text that is not a WAL position (`X/Y`, hexadecimal).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid WAL position `{0}`: expected X/Y, two hexadecimal numbers")]
pub struct InvalidWalPosition(String);

impl std::str::FromStr for WalPosition {
    type Err = InvalidWalPosition;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let bad = || InvalidWalPosition(s.to_owned());
        let (hi, lo) = s.split_once('/').ok_or_else(bad)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Self((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl serde::Serialize for WalPosition {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The server's current WAL position.
pub(crate) async fn current_position(db: &impl ConnectionTrait) -> Result<WalPosition> {
    let row = db
        .query_one_raw(Statement::from_string(
            PG,
            "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8 AS p",
        ))
        .await?;
    let p: i64 = match row {
        Some(r) => r.try_get("", "p")?,
        None => 0,
    };
    Ok(WalPosition(p.max(0) as u64))
}

/// `slot`'s confirmed position, `None` if this database has no such slot.
pub(crate) async fn confirmed_position(
    db: &impl ConnectionTrait,
    slot: &str,
) -> Result<Option<WalPosition>> {
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            PG,
            "SELECT COALESCE((confirmed_flush_lsn - '0/0'::pg_lsn)::int8, 0) AS p \
             FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()",
            [slot.into()],
        ))
        .await?;
    match row {
        Some(r) => Ok(Some(WalPosition(r.try_get::<i64>("", "p")?.max(0) as u64))),
        None => Ok(None),
    }
}

/// A replication slot as `pg_replication_slots` shows it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct SlotStatus {
    /// The slot's name.
    pub name: String,
    /// Whether a session is reading it right now.
    pub active: bool,
    /// The `application_name` of the session reading it: a streaming log relay's name
    /// ([`LogRelayBuilder::name`](crate::relay::wal::LogRelayBuilder::name)); `None` when none
    /// reads it.
    pub reader: Option<String>,
    /// Seconds between the server flushing WAL and the reading relay confirming it
    /// (`pg_stat_replication.flush_lag`), while a stream reads the slot and the server has
    /// measured it recently; `None` otherwise (no stream, or caught up and idle).
    pub lag_seconds: Option<f64>,
    /// Bytes of WAL written since the slot's confirmed position: what a relay has still to
    /// read.
    pub lag_bytes: u64,
    /// Bytes of WAL the server keeps for this slot (since its restart position).
    pub retained_bytes: u64,
    /// `reserved`, `extended`, `unreserved` or `lost` (past `max_slot_wal_keep_size`).
    pub wal_status: String,
    /// The confirmed position: every transaction that committed before it was delivered or
    /// dead-lettered. Serialised as `X/Y`.
    pub confirmed_lsn: WalPosition,
}

/// The logical pgoutput slots of the current database, or just `only`.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn slots(
    db: &impl ConnectionTrait,
    only: Option<&str>,
) -> Result<Vec<SlotStatus>> {
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            PG,
            "SELECT s.slot_name::text AS name, s.active, \
             NULLIF(a.application_name, '')::text AS reader, \
             EXTRACT(EPOCH FROM r.flush_lag)::float8 AS lag_seconds, \
             COALESCE((pg_current_wal_lsn() - s.confirmed_flush_lsn)::int8, 0) AS lag, \
             COALESCE((pg_current_wal_lsn() - s.restart_lsn)::int8, 0) AS retained, \
             COALESCE(s.wal_status, '') AS wal_status, \
             COALESCE((s.confirmed_flush_lsn - '0/0'::pg_lsn)::int8, 0) AS confirmed \
             FROM pg_replication_slots s \
             LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid \
             LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid \
             WHERE s.slot_type = 'logical' AND s.plugin = 'pgoutput' \
             AND s.database = current_database() AND ($1::text IS NULL OR s.slot_name = $1) \
             ORDER BY s.slot_name",
            [only.map(str::to_owned).into()],
        ))
        .await?;
    rows.iter()
        .map(|r| {
            Ok(SlotStatus {
                name: r.try_get("", "name")?,
                active: r.try_get("", "active")?,
                reader: r.try_get("", "reader")?,
                lag_seconds: r.try_get("", "lag_seconds")?,
                lag_bytes: r.try_get::<i64>("", "lag")?.max(0) as u64,
                retained_bytes: r.try_get::<i64>("", "retained")?.max(0) as u64,
                wal_status: r.try_get("", "wal_status")?,
                confirmed_lsn: WalPosition(r.try_get::<i64>("", "confirmed")?.max(0) as u64),
            })
        })
        .collect()
}

/// Drops `slot` if this database has it; `Ok(false)` if not. A slot still held by a stream that
/// just ended (`object_in_use`, 55006, while its server process exits) is tried again until
/// `wait` has passed; one still read after that is refused, naming the process.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn drop_slot(
    pool: &PgPool,
    slot: &str,
    wait: std::time::Duration,
) -> Result<bool> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let r = sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = $1 AND database = current_database()",
        )
        .bind(slot)
        .fetch_all(pool)
        .await;
        match r {
            Ok(rows) => return Ok(!rows.is_empty()),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55006") => {
                if tokio::time::Instant::now() >= deadline {
                    let pid: Option<i32> = sqlx::query_scalar(
                        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                    )
                    .bind(slot)
                    .fetch_optional(pool)
                    .await
                    .ok()
                    .flatten()
                    .flatten();
                    let by = pid
                        .map(|p| format!(" by server process {p}"))
                        .unwrap_or_default();
                    return Err(Error::LogRelay {
                        slot: slot.to_owned(),
                        reason: format!(
                            "still read{by} after {wait:?}: stop the log relay reading it first"
                        ),
                        source: Some(sqlx::Error::Database(e).into()),
                    });
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => return Err(sqlx_err(e)),
        }
    }
}
