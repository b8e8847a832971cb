//! PostgreSQL logical decoding: the statements of message mode's write and of the log relay.
//!
//! The relay's own statements (prerequisites, slot, publication, peek, advance, the leader's
//! advisory lock) run on one dedicated sqlx connection, because the lock is a session lock and
//! the slot is used by one session at a time. Dead letters and table mode's write-back go
//! through the app's SeaORM pool like every other statement.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sea_orm::sqlx::{self, PgConnection, PgPool};
use sea_orm::{ConnectionTrait, DbBackend, DbErr, RuntimeErr, Value};
use seaorm_outbox_entity::OutboxStatus;
use uuid::Uuid;

use super::pgoutput::{Lsn, lsn_text};
use super::sql::stmt;
use crate::error::{Error, Result};
use crate::event::{OutboxEvent, headers_from_json, now};

const PG: DbBackend = DbBackend::Postgres;

/// The prefix of the non-transactional message an idle relay writes so that its slot has a
/// record to advance to.
pub(crate) const HEARTBEAT_PREFIX: &str = "seaorm_outbox.heartbeat";

/// The advisory-lock class of the one active relay per slot (the lock's second key is the
/// slot name's hash).
const LEADER_LOCK_CLASS: i32 = 0x6f75_7462; // "outb"

pub(crate) fn sqlx_err(e: sqlx::Error) -> Error {
    Error::Database(DbErr::Query(RuntimeErr::SqlxError(Arc::new(e))))
}

fn refuse(slot: &str, reason: impl Into<String>) -> Error {
    Error::LogRelay {
        slot: slot.to_owned(),
        reason: reason.into(),
        source: None,
    }
}

/// Writes each of `contents` to the log, in order, in the caller's transaction
/// (`transactional = true`: decoded only if the transaction commits). One statement.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn emit(
    db: &impl ConnectionTrait,
    prefix: &str,
    contents: Vec<String>,
) -> Result<()> {
    if db.get_database_backend() != DbBackend::Postgres {
        return Err(Error::Config(
            "message mode writes to PostgreSQL's write-ahead log; this connection is not PostgreSQL"
                .into(),
        ));
    }
    if contents.is_empty() {
        return Ok(());
    }
    let n = contents.len();
    let mut values: Vec<Value> = Vec::with_capacity(n + 1);
    values.push(prefix.into());
    values.extend(contents.into_iter().map(Value::from));
    let sql = if n == 1 {
        "SELECT pg_logical_emit_message(true, ?::text, ?::text)".to_owned()
    } else {
        // A volatile function in the target list runs after the sort: in the given order.
        let rows: Vec<String> = (0..n).map(|i| format!("({i}, ?::text)")).collect();
        format!(
            "SELECT pg_logical_emit_message(true, p.prefix, v.m) FROM (SELECT ?::text AS prefix) p, \
             (VALUES {}) AS v(n, m) ORDER BY v.n",
            rows.join(", ")
        )
    };
    db.execute_raw(stmt(PG, &sql, values)).await?;
    Ok(())
}

/// A connection of the pool's (its search path set), detached so that the pool opens a
/// replacement: the leader's session lock must not take a pooled connection from the app.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn connect(pool: &PgPool) -> Result<PgConnection> {
    Ok(pool.acquire().await.map_err(sqlx_err)?.detach())
}

/// Refuses, with the reason, a server or role that cannot decode: `wal_level` below
/// `logical`, a role without `REPLICATION`, or a server older than 14 (no `messages` option).
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn check_prerequisites(conn: &mut PgConnection, slot: &str) -> Result<()> {
    let (wal_level, version, may): (String, i32, bool) = sqlx::query_as(
        "SELECT current_setting('wal_level'), current_setting('server_version_num')::int, \
         (SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user)",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(sqlx_err)?;
    if wal_level != "logical" {
        return Err(refuse(
            slot,
            format!(
                "wal_level is `{wal_level}`; the log relay needs `logical` (ALTER SYSTEM SET \
                 wal_level = logical, then restart PostgreSQL; on RDS set \
                 rds.logical_replication = 1)"
            ),
        ));
    }
    if version < 140_000 {
        return Err(refuse(
            slot,
            format!("PostgreSQL {version} has no pgoutput `messages` option; 14 or later needed"),
        ));
    }
    if !may {
        return Err(refuse(
            slot,
            "the role has neither REPLICATION nor superuser (ALTER ROLE … REPLICATION)",
        ));
    }
    Ok(())
}

/// Takes the slot's leader lock if it is free; held until this session ends.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn try_lead(conn: &mut PgConnection, slot: &str) -> Result<bool> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
        .bind(LEADER_LOCK_CLASS)
        .bind(slot)
        .fetch_one(&mut *conn)
        .await
        .map_err(sqlx_err)
}

/// Gives the leader lock up now (closing the connection frees it too, but only once the
/// server process has exited).
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn stop_leading(conn: &mut PgConnection, slot: &str) -> Result<()> {
    sqlx::query("SELECT pg_advisory_unlock($1, hashtext($2))")
        .bind(LEADER_LOCK_CLASS)
        .bind(slot)
        .execute(&mut *conn)
        .await
        .map_err(sqlx_err)?;
    Ok(())
}

/// Creates the publication if it is missing; with `table`, makes sure it publishes the outbox
/// table's inserts (only inserts: the relay's own write-back must not come back to it).
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn ensure_publication(
    conn: &mut PgConnection,
    slot: &str,
    publication: &str,
    table: bool,
) -> Result<()> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
            .bind(publication)
            .fetch_one(&mut *conn)
            .await
            .map_err(sqlx_err)?;
    let name = quote_ident(publication);
    if !exists {
        let sql = if table {
            format!("CREATE PUBLICATION {name} FOR TABLE outbox_events WITH (publish = 'insert')")
        } else {
            format!("CREATE PUBLICATION {name} WITH (publish = 'insert')")
        };
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut *conn)
            .await
            .map_err(sqlx_err)?;
        tracing::info!(
            slot,
            publication,
            table,
            "outbox log relay created its publication"
        );
        return Ok(());
    }
    if table {
        let has: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication p \
             ON p.oid = r.prpubid WHERE p.pubname = $1 AND r.prrelid = 'outbox_events'::regclass)",
        )
        .bind(publication)
        .fetch_one(&mut *conn)
        .await
        .map_err(sqlx_err)?;
        if !has {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "ALTER PUBLICATION {name} ADD TABLE outbox_events"
            )))
            .execute(&mut *conn)
            .await
            .map_err(sqlx_err)?;
        }
    }
    Ok(())
}

/// Creates the slot if it is missing, and refuses one that belongs to another database or
/// plugin. Creating waits for the transactions running at that moment to end.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn ensure_slot(conn: &mut PgConnection, slot: &str) -> Result<bool> {
    let found: Option<(Option<String>, Option<String>, String)> = sqlx::query_as(
        "SELECT plugin::text, database::text, current_database()::text \
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(&mut *conn)
    .await
    .map_err(sqlx_err)?;
    match found {
        None => {
            sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
                .bind(slot)
                .execute(&mut *conn)
                .await
                .map_err(sqlx_err)?;
            tracing::info!(slot, "outbox log relay created its replication slot");
            Ok(true)
        }
        Some((Some(plugin), Some(db), current)) if plugin == "pgoutput" && db == current => {
            Ok(false)
        }
        Some((plugin, db, _)) => Err(refuse(
            slot,
            format!(
                "a slot of this name exists for plugin {plugin:?} in database {db:?}; \
                 the log relay needs a pgoutput slot in this database"
            ),
        )),
    }
}

/// The schema `outbox_events` resolves to on this connection: table mode's events are the
/// inserts into that one table.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn current_schema(conn: &mut PgConnection) -> Result<String> {
    sqlx::query_scalar(
        "SELECT n.nspname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.oid = 'outbox_events'::regclass",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(sqlx_err)
}

/// The server's flushed write position: a read up to it decodes every commit before it.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn current_lsn(conn: &mut PgConnection) -> Result<Lsn> {
    let n: i64 = sqlx::query_scalar("SELECT (pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::int8")
        .fetch_one(&mut *conn)
        .await
        .map_err(sqlx_err)?;
    Ok(n as Lsn)
}

/// The slot's confirmed position: where its next read starts.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn confirmed_lsn(conn: &mut PgConnection, slot: &str) -> Result<Lsn> {
    let n: Option<i64> = sqlx::query_scalar(
        "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::int8 FROM pg_replication_slots \
         WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(&mut *conn)
    .await
    .map_err(sqlx_err)?
    .flatten();
    n.map(|n| n as Lsn)
        .ok_or_else(|| refuse(slot, "the replication slot is gone (dropped, or lost)"))
}

/// The committed changes after the slot's position and before `upto`, stopping at the first
/// transaction end after `max_changes` records; nothing is consumed.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn peek(
    conn: &mut PgConnection,
    slot: &str,
    publication: &str,
    upto: Lsn,
    max_changes: u32,
) -> Result<Vec<(Lsn, Vec<u8>)>> {
    let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
        "SELECT (lsn - '0/0'::pg_lsn)::int8, data FROM pg_logical_slot_peek_binary_changes($1, $2::pg_lsn, $3, \
         'proto_version', '1', 'publication_names', $4, 'messages', 'true')",
    )
    .bind(slot)
    .bind(lsn_text(upto))
    .bind(i32::try_from(max_changes).unwrap_or(i32::MAX))
    .bind(quote_ident(publication))
    .fetch_all(&mut *conn)
    .await
    .map_err(sqlx_err)?;
    Ok(rows.into_iter().map(|(l, d)| (l as Lsn, d)).collect())
}

/// Confirms everything before `lsn`: the slot's next read starts there and the server may
/// recycle the WAL before it.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn advance(conn: &mut PgConnection, slot: &str, lsn: Lsn) -> Result<()> {
    // A replication stream that just ended may hold the slot for a moment longer
    // (`object_in_use`, 55006) while its server process exits.
    let mut tries = 0;
    loop {
        let r = sqlx::query("SELECT pg_replication_slot_advance($1, $2::pg_lsn)")
            .bind(slot)
            .bind(lsn_text(lsn))
            .execute(&mut *conn)
            .await;
        match r {
            Ok(_) => return Ok(()),
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("55006") && tries < 100 =>
            {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => return Err(sqlx_err(e)),
        }
    }
}

/// A non-transactional message, so that an idle database's slot has a record to move to.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn heartbeat(conn: &mut PgConnection) -> Result<()> {
    sqlx::query("SELECT pg_logical_emit_message(false, $1::text, ''::text)")
        .bind(HEARTBEAT_PREFIX)
        .execute(&mut *conn)
        .await
        .map_err(sqlx_err)?;
    Ok(())
}

/// Table mode's write-back: the delivered rows marked published, or deleted.
///
/// A transaction's commit is in the WAL, and so decoded and delivered, a moment before other
/// sessions see it: a row not found yet is looked for again, for up to a second.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn settle_rows(
    db: &impl ConnectionTrait,
    ids: &[Uuid],
    delete: bool,
) -> Result<u64> {
    let want = ids.len() as u64;
    if want == 0 {
        return Ok(0);
    }
    let mut settled = 0;
    for _ in 0..100 {
        settled += settle_once(db, ids, delete).await?;
        if settled >= want {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    if settled < ids.len() as u64 {
        tracing::warn!(
            missing = ids.len() as u64 - settled,
            "outbox rows delivered by the log relay were not found pending to mark \
             (deleted or marked by someone else?)"
        );
    }
    Ok(settled)
}

/// One statement whatever the number of rows: the ids go as one `uuid[]` literal, so the
/// text is the same every time (one prepared statement) and a transaction of more events than
/// PostgreSQL's 65,535 bind parameters still settles. `IN (SELECT unnest(…))`, not `= ANY(…)`:
/// with stale statistics (a table just truncated and refilled) the planner scanned the table
/// testing every row against the whole array, 12.7 s for 2,800 ids of 200,000 rows.
async fn settle_once(db: &impl ConnectionTrait, ids: &[Uuid], delete: bool) -> Result<u64> {
    let mut list = String::with_capacity(ids.len() * 37 + 2);
    list.push('{');
    let mut buf = Uuid::encode_buffer();
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            list.push(',');
        }
        list.push_str(id.hyphenated().encode_lower(&mut buf));
    }
    list.push('}');
    if delete {
        // Tallied, as the polling relay's delete is: the statistics count these among the
        // last hour's published events.
        let test = "IN (SELECT unnest(?::uuid[]))";
        return super::postgres::delete_tallied(db, "", test, vec![list.into()], now()).await;
    }
    let update = stmt(
        PG,
        "UPDATE outbox_events SET status = 'published', published_at = ?, \
         locked_by = NULL, locked_until = NULL WHERE status = 'pending' AND id IN (SELECT unnest(?::uuid[]))",
        vec![now().into(), list.into()],
    );
    Ok(db.execute_raw(update).await?.rows_affected())
}

/// The columns of an inserted `outbox_events` row, as an event; the reason if they are not.
pub(crate) fn event_from_row(
    columns: &[String],
    values: &[Option<String>],
    committed_at: DateTime<Utc>,
) -> std::result::Result<OutboxEvent, String> {
    let get = |name: &str| -> std::result::Result<&str, String> {
        columns
            .iter()
            .position(|c| c == name)
            .and_then(|i| values.get(i))
            .and_then(|v| v.as_deref())
            .ok_or_else(|| format!("column `{name}` missing or NULL"))
    };
    let time = |name: &str| -> std::result::Result<DateTime<Utc>, String> {
        let text = get(name)?;
        DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z")
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| format!("column `{name}` = {text:?}: {e}"))
    };
    let json = |name: &str| -> std::result::Result<serde_json::Value, String> {
        serde_json::from_str(get(name)?).map_err(|e| format!("column `{name}`: {e}"))
    };
    let id = get("id")?;
    Ok(OutboxEvent {
        id: Uuid::parse_str(id).map_err(|e| format!("column `id` = {id:?}: {e}"))?,
        event_type: get("event_type")?.to_owned(),
        aggregate_type: get("aggregate_type")?.to_owned(),
        aggregate_id: get("aggregate_id")?.to_owned(),
        payload: json("payload")?,
        headers: headers_from_json(json("headers")?).map_err(|e| e.to_string())?,
        occurred_at: time("occurred_at")?,
        created_at: committed_at,
        status: OutboxStatus::Pending,
        attempts: 0,
        last_error: None,
        next_attempt_at: committed_at,
        published_at: None,
        failed_at: None,
        locked_by: None,
        deliver_at: time_or_null(columns, values, "deliver_at"),
        expires_at: time_or_null(columns, values, "expires_at"),
    })
}

/// A nullable time column of a decoded outbox row (`None` when NULL, or on a table that
/// predates the column).
fn time_or_null(
    columns: &[String],
    values: &[Option<String>],
    name: &str,
) -> Option<DateTime<Utc>> {
    let text = columns
        .iter()
        .position(|c| c == name)
        .and_then(|i| values.get(i))
        .and_then(|v| v.as_deref())?;
    DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z")
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// `name` as a double-quoted SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
