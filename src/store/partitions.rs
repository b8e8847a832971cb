//! Owned partitions: `outbox_partitions`, through which relays divide the [`PARTITIONS`] hash
//! partitions, and the claim and write-back of a relay that owns some.
//!
//! A partition row names its owner (a relay's run token) and an epoch. The ownership's lease
//! is the owner's heartbeat row in `outbox_relays`, whose `claims` column carries the token:
//! one row written per renewal, however many partitions it holds. A partition is free when it
//! has no owner or its owner's heartbeat is older than the lease (by the taker's clock), or was
//! replaced by a later run of the same relay name. A relay takes free partitions and releases
//! what it gives up; each take stamps a new epoch, higher than any in the table, so a
//! write-back fenced on "owner is me, epoch at most the one I claimed under" is refused once
//! the partition has changed hands, even if it came back.
//!
//! The claim is a plain read of the owner's due rows in due order: no lock, no lease written,
//! no per-row proof of order. Only the owner reads those partitions.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Value};
use uuid::Uuid;

use super::claim::DueKey;
use super::rows::{CLAIMED_COLUMNS, ClaimedRow, read_claimed};
use super::sql::{placeholders, stmt};
use super::write_back::{self, Fate, Guard, OnPublish, WriteBack};
use crate::error::Result;
use crate::event::partition_of;

/// A partition held by a relay, and the epoch it was taken at.
pub(crate) type Held = (u16, i64);

/// One owner's claim of due events.
pub(crate) struct OwnedClaim<'a> {
    /// The owner's run token (the claimed events' `locked_by`).
    pub(crate) owner: &'a str,
    pub(crate) now: DateTime<Utc>,
    pub(crate) limit: u32,
    /// The partitions to read; `None` when the owner holds every one.
    pub(crate) partitions: Option<&'a [u16]>,
    /// Aggregates not to read: each one's lane reads it ([`crate::relay`]'s `lanes`).
    pub(crate) skip: &'a [(String, String)],
    /// Read only rows after this key in due order (its own batch still being written back lies
    /// at or before it).
    pub(crate) after: Option<DueKey>,
}

/// An event that makes its aggregate's later events wait: pending with its next attempt moved
/// past its creation (retried or held), or, when dead letters hold, a dead letter.
#[derive(Clone, Debug)]
pub(crate) struct Blocker {
    pub(crate) aggregate_type: String,
    pub(crate) aggregate_id: String,
    /// `(occurred_at, id)`: the aggregate's events after this wait.
    pub(crate) key: (DateTime<Utc>, Uuid),
    /// When it is due again; `None` for a dead letter.
    pub(crate) until: Option<DateTime<Utc>>,
}

/// Where a blocker is now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BlockerState {
    /// Still pending, next due then.
    Pending(DateTime<Utc>),
    Failed,
    /// Published, deleted or discarded.
    Gone,
}

/// `IN (…)` over partition numbers, written inline: they are small integers of our own, and a
/// bound list would need one placeholder each.
fn partition_list(partitions: &[u16]) -> String {
    let list: Vec<String> = partitions.iter().map(u16::to_string).collect();
    format!("IN ({})", list.join(", "))
}

/// A partition number as the `SMALLINT` column holds it (always below 256).
pub(crate) fn column_value(partition: u16) -> i16 {
    i16::try_from(partition).unwrap_or(i16::MAX)
}

fn held(rows: &[sea_orm::QueryResult]) -> Result<Vec<Held>> {
    rows.iter()
        .map(|r| {
            let p: i16 = r.try_get_by_index(0)?;
            let epoch: i64 = r.try_get_by_index(1)?;
            Ok((u16::try_from(p).unwrap_or(u16::MAX), epoch))
        })
        .collect()
}

/// What `owner` holds now (a partition another relay took over is missing).
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn held_by(db: &impl ConnectionTrait, owner: &str) -> Result<Vec<Held>> {
    let b = db.get_database_backend();
    let rows = db
        .query_all_raw(stmt(
            b,
            "SELECT partition_no, epoch FROM outbox_partitions WHERE owner = ? \
             ORDER BY partition_no",
            vec![owner.into()],
        ))
        .await?;
    held(&rows)
}

/// A partition nobody holds: no owner, or one without a heartbeat since `?` (it lapsed, or a
/// later run of its name replaced the token).
const FREE: &str = "(owner IS NULL OR owner NOT IN (SELECT claims FROM outbox_relays \
     WHERE claims IS NOT NULL AND heartbeat_at >= ?))";

/// Takes up to `want` free partitions (see [`FREE`], live since `since`) for `owner`; returns
/// the ones it got. Two relays taking at once never both get one: the update re-checks that
/// each is still free.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn take(
    db: &impl ConnectionTrait,
    owner: &str,
    since: DateTime<Utc>,
    want: u16,
) -> Result<Vec<Held>> {
    if want == 0 {
        return Ok(Vec::new());
    }
    let b = db.get_database_backend();
    let candidates = db
        .query_all_raw(stmt(
            b,
            &format!(
                "SELECT partition_no FROM outbox_partitions WHERE {FREE} \
                 ORDER BY partition_no LIMIT ?"
            ),
            vec![since.into(), i64::from(want).into()],
        ))
        .await?;
    let candidates: Vec<u16> = candidates
        .iter()
        .map(|r| r.try_get_by_index::<i16>(0))
        .collect::<std::result::Result<Vec<_>, _>>()?
        .into_iter()
        .filter_map(|p| u16::try_from(p).ok())
        .collect();
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    let top = db
        .query_one_raw(stmt(
            b,
            "SELECT MAX(epoch) FROM outbox_partitions",
            Vec::new(),
        ))
        .await?;
    let epoch = match top {
        Some(r) => r.try_get_by_index::<Option<i64>>(0)?.unwrap_or(0) + 1,
        None => 1,
    };
    db.execute_raw(stmt(
        b,
        &format!(
            "UPDATE outbox_partitions SET owner = ?, epoch = ? \
             WHERE partition_no {} AND {FREE}",
            partition_list(&candidates)
        ),
        vec![owner.into(), epoch.into(), since.into()],
    ))
    .await?;
    let rows = db
        .query_all_raw(stmt(
            b,
            "SELECT partition_no, epoch FROM outbox_partitions WHERE owner = ? AND epoch = ? \
             ORDER BY partition_no",
            vec![owner.into(), epoch.into()],
        ))
        .await?;
    held(&rows)
}

/// Gives `partitions` up, if `owner` still holds them.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn release(
    db: &impl ConnectionTrait,
    owner: &str,
    partitions: Option<&[u16]>,
) -> Result<()> {
    let which = match partitions {
        Some([]) => return Ok(()),
        Some(p) => format!(" AND partition_no {}", partition_list(p)),
        None => String::new(),
    };
    let b = db.get_database_backend();
    db.execute_raw(stmt(
        b,
        &format!("UPDATE outbox_partitions SET owner = NULL WHERE owner = ?{which}"),
        vec![owner.into()],
    ))
    .await?;
    Ok(())
}

/// How many partitions each owner with a heartbeat since `since` holds, by owner token.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn owners(
    db: &impl ConnectionTrait,
    since: DateTime<Utc>,
) -> Result<Vec<(String, u64)>> {
    let b = db.get_database_backend();
    let rows = db
        .query_all_raw(stmt(
            b,
            "SELECT owner, COUNT(*) AS n FROM outbox_partitions WHERE owner IN \
             (SELECT claims FROM outbox_relays WHERE claims IS NOT NULL AND heartbeat_at >= ?) \
             GROUP BY owner ORDER BY owner",
            vec![since.into()],
        ))
        .await?;
    rows.iter()
        .map(|r| {
            let n: i64 = r.try_get("", "n")?;
            Ok((r.try_get("", "owner")?, u64::try_from(n).unwrap_or(0)))
        })
        .collect()
}

/// Gives up to `limit` pending or dead-lettered rows without a partition theirs (rows written
/// before the partitions migration, or by a writer that left the column out where no trigger
/// fills it); returns how many. MySQL computes the column itself.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn adopt_strays(db: &impl ConnectionTrait, limit: u64) -> Result<u64> {
    let b = db.get_database_backend();
    if b == DbBackend::MySql {
        return Ok(0);
    }
    let rows = db
        .query_all_raw(stmt(
            b,
            "SELECT id, aggregate_type, aggregate_id FROM outbox_events \
             WHERE partition_no IS NULL AND status IN ('pending', 'failed') LIMIT ?",
            vec![i64::try_from(limit).unwrap_or(i64::MAX).into()],
        ))
        .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut values: Vec<Value> = Vec::with_capacity(rows.len() * 3);
    let mut ids = Vec::with_capacity(rows.len());
    let mut case = String::from("CASE id");
    for r in &rows {
        let id: Uuid = r.try_get_by_index(0)?;
        let t: String = r.try_get_by_index(1)?;
        let a: String = r.try_get_by_index(2)?;
        case.push_str(" WHEN ? THEN ?");
        values.extend([id.into(), column_value(partition_of(&t, &a)).into()]);
        ids.push(id);
    }
    case.push_str(" END");
    let n = ids.len();
    values.extend(ids.into_iter().map(Value::from));
    let res = db
        .execute_raw(stmt(
            b,
            &format!(
                "UPDATE outbox_events SET partition_no = {case} \
                 WHERE partition_no IS NULL AND id IN ({})",
                placeholders(n)
            ),
            values,
        ))
        .await?;
    Ok(res.rows_affected())
}

/// Reads the owner's due events, oldest due first.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn claim(db: &DatabaseConnection, c: &OwnedClaim<'_>) -> Result<Vec<ClaimedRow>> {
    let b = db.get_database_backend();
    let mut values: Vec<Value> = vec![c.now.into()];
    let after = match c.after {
        None => String::new(),
        Some((at, id)) => {
            if b == DbBackend::MySql {
                // MariaDB ranges an OR of bounds, not a row comparison.
                values.extend([at.into(), at.into(), id.into()]);
                " AND (next_attempt_at > ? OR (next_attempt_at = ? AND id > ?))".to_owned()
            } else {
                values.extend([at.into(), id.into()]);
                " AND (next_attempt_at, id) > (?, ?)".to_owned()
            }
        }
    };
    let partitions = match c.partitions {
        Some(p) => partition_list(p),
        None => "IS NOT NULL".to_owned(),
    };
    let mut skip = String::new();
    for (kind, id) in c.skip {
        skip.push_str(" AND NOT (aggregate_type = ? AND aggregate_id = ?)");
        values.extend([kind.as_str().into(), id.as_str().into()]);
    }
    values.push(i64::from(c.limit).into());
    // The due index ends in `partition_no`, so the partition test is made on index entries.
    let sql = format!(
        "SELECT {CLAIMED_COLUMNS} FROM outbox_events \
         WHERE status = 'pending' AND next_attempt_at <= ?{after} AND partition_no {partitions}\
         {skip} ORDER BY next_attempt_at, id LIMIT ?"
    );
    let rows = db.query_all_raw(stmt(b, &sql, values)).await?;
    Ok(read_claimed(&rows, c.owner))
}

/// Reads one aggregate's due events in its order, after `after` (its last published key), for
/// its lane; `partition` is the aggregate's, so a row moved to another owner is not read.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn claim_aggregate(
    db: &DatabaseConnection,
    owner: &str,
    (kind, id): (&str, &str),
    partition: u16,
    after: Option<(DateTime<Utc>, Uuid)>,
    now: DateTime<Utc>,
    limit: u32,
) -> Result<Vec<ClaimedRow>> {
    let b = db.get_database_backend();
    let mut values: Vec<Value> = vec![
        kind.into(),
        id.into(),
        now.into(),
        column_value(partition).into(),
    ];
    let after = match after {
        None => String::new(),
        Some((at, id)) if b == DbBackend::MySql => {
            values.extend([at.into(), at.into(), id.into()]);
            " AND (occurred_at > ? OR (occurred_at = ? AND id > ?))".to_owned()
        }
        Some((at, id)) => {
            values.extend([at.into(), id.into()]);
            " AND (occurred_at, id) > (?, ?)".to_owned()
        }
    };
    values.push(i64::from(limit).into());
    // The aggregate index, `(aggregate_type, aggregate_id, status, occurred_at, id)` (SQLite's
    // without `status`), gives the rows in this order.
    let sql = format!(
        "SELECT {CLAIMED_COLUMNS} FROM outbox_events \
         WHERE aggregate_type = ? AND aggregate_id = ? AND status = 'pending' \
         AND next_attempt_at <= ? AND partition_no = ?{after} ORDER BY occurred_at, id LIMIT ?"
    );
    let rows = db.query_all_raw(stmt(b, &sql, values)).await?;
    Ok(read_claimed(&rows, owner))
}

/// Writes a batch's fates back, each statement conditional on `owner` still holding the row's
/// partition at an epoch no later than `epoch`.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn write_back(
    db: &DatabaseConnection,
    owner: &str,
    epoch: i64,
    now: DateTime<Utc>,
    fates: &[(Uuid, Fate)],
    on_publish: OnPublish,
) -> Result<WriteBack> {
    let guard = Guard::Owned { owner, epoch };
    write_back::guarded(db, guard, now, fates, on_publish).await
}

/// The events in `partitions` that make their aggregates' later events wait: displaced pending
/// events, and dead letters when `dead_letters_hold`.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn blockers(
    db: &impl ConnectionTrait,
    partitions: &[u16],
    dead_letters_hold: bool,
) -> Result<Vec<Blocker>> {
    if partitions.is_empty() {
        return Ok(Vec::new());
    }
    let b = db.get_database_backend();
    let list = partition_list(partitions);
    let mut out = Vec::new();
    // Displaced rows, as `outbox_events_displaced_idx` lists them: not a scheduled event nobody
    // has touched, which is ordered by its time and holds nothing, unless written to hold.
    // MySQL has no partial index: its indexed virtual column says the same. Forced, as past
    // 200 values MariaDB estimates an `IN` list from statistics that count the NULLs, and reads
    // the whole table instead.
    let displaced = if b == DbBackend::MySql {
        format!("displaced_partition {list}")
    } else {
        format!(
            "status = 'pending' AND next_attempt_at > created_at \
             AND (deliver_at IS NULL OR attempts > 0 OR next_attempt_at <> deliver_at \
             OR holds_aggregate) AND partition_no {list}"
        )
    };
    let forced = if b == DbBackend::MySql {
        " FORCE INDEX (outbox_events_displaced_partition_idx)"
    } else {
        ""
    };
    let mut kinds = vec![(displaced, forced)];
    if dead_letters_hold {
        kinds.push((format!("status = 'failed' AND partition_no {list}"), ""));
    }
    for (kind, hint) in kinds {
        let rows = db
            .query_all_raw(stmt(
                b,
                &format!(
                    "SELECT aggregate_type, aggregate_id, occurred_at, id, next_attempt_at, \
                     status FROM outbox_events{hint} WHERE {kind}"
                ),
                Vec::new(),
            ))
            .await?;
        for r in &rows {
            let status: String = r.try_get_by_index(5)?;
            out.push(Blocker {
                aggregate_type: r.try_get_by_index(0)?,
                aggregate_id: r.try_get_by_index(1)?,
                key: (r.try_get_by_index(2)?, r.try_get_by_index(3)?),
                until: (status == "pending")
                    .then(|| r.try_get_by_index(4))
                    .transpose()?,
            });
        }
    }
    Ok(out)
}

/// Where each of `ids` is now.
#[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
pub(crate) async fn blocker_states(
    db: &impl ConnectionTrait,
    ids: &[Uuid],
) -> Result<Vec<(Uuid, BlockerState)>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let b = db.get_database_backend();
    let rows = db
        .query_all_raw(stmt(
            b,
            &format!(
                "SELECT id, status, next_attempt_at FROM outbox_events WHERE id IN ({})",
                placeholders(ids.len())
            ),
            ids.iter().map(|id| Value::from(*id)).collect(),
        ))
        .await?;
    let mut found = std::collections::HashMap::new();
    for r in &rows {
        let id: Uuid = r.try_get_by_index(0)?;
        let status: String = r.try_get_by_index(1)?;
        let state = match status.as_str() {
            "pending" => BlockerState::Pending(r.try_get_by_index(2)?),
            "failed" => BlockerState::Failed,
            _ => BlockerState::Gone,
        };
        found.insert(id, state);
    }
    Ok(ids
        .iter()
        .map(|id| (*id, found.get(id).copied().unwrap_or(BlockerState::Gone)))
        .collect())
}
