//! Writing a batch's outcomes back: at most one statement per kind of outcome, each
//! conditional on the lease. Where rows carry the lease (MySQL, SQLite) each statement checks
//! `locked_by = token` and clears it; PostgreSQL holds one lease row per batch instead and
//! builds the same statements without that guard ([`postgres`](super::postgres)).

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, TransactionTrait, Value};
use uuid::Uuid;

use super::mysql;
use super::sql::{placeholders, stmt};
use crate::error::Result;

/// What a relay's write-back does with the row of an event its broker acknowledged.
///
/// Set with [`RelayConfig::on_publish`](crate::relay::RelayConfig::on_publish). Either way a
/// published event is never sent again, dead letters stay rows (to list, replay or discard),
/// and the statistics count it among the last hour's published events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnPublish {
    /// Mark it `published` and keep it, until the retention purge deletes it. The default: it
    /// can still be looked up by id and inspected after delivery.
    #[default]
    Retain,
    /// Delete it in the write-back, and add one to its minute's count in
    /// `outbox_published_tally`, in the same transaction. The row's delete writes no index
    /// entry where an update writes at least one, so a PostgreSQL relay drains faster
    /// (BENCHMARKS.md), the table stays as small as its backlog, and there is nothing to
    /// purge. Published events can no longer be looked up.
    Delete,
}

/// What the relay decided for one claimed event.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Fate {
    Published,
    Retry {
        error: String,
        at: DateTime<Utc>,
    },
    Dead {
        error: String,
    },
    /// Not attempted (its aggregate is blocked, or the relay is stopping): hand it back.
    Release {
        at: DateTime<Utc>,
    },
    /// Expired unsent, and deleted (`OnExpiry::Discard`).
    Discard,
}

/// How the error of an event dead-lettered for its expiry begins.
const EXPIRED: &str = "expired at ";

impl Fate {
    /// Dead-lettered, unsent, because the event expired at `at`.
    pub(crate) fn expired(at: DateTime<Utc>) -> Self {
        Self::Dead {
            error: format!("{EXPIRED}{at}"),
        }
    }

    /// Whether this is [`expired`](Self::expired), or its discard.
    pub(crate) fn is_expiry(&self) -> bool {
        match self {
            Self::Dead { error } => error.starts_with(EXPIRED),
            Self::Discard => true,
            _ => false,
        }
    }
}

/// How many rows each write-back touched; fewer than asked means the lease was lost.
#[derive(Debug, Default)]
pub(crate) struct WriteBack {
    pub(crate) published: u64,
    pub(crate) retried: u64,
    pub(crate) dead: u64,
    pub(crate) released: u64,
    pub(crate) discarded: u64,
    pub(crate) expected: u64,
}

impl WriteBack {
    /// Nothing written yet, of `fates`.
    pub(super) fn expecting(fates: &[(Uuid, Fate)]) -> Self {
        Self {
            expected: fates.len() as u64,
            ..Self::default()
        }
    }

    /// Events whose write-back changed nothing: their lease had passed to another relay.
    pub(crate) fn lost(&self) -> u64 {
        self.expected.saturating_sub(
            self.published + self.retried + self.dead + self.released + self.discarded,
        )
    }

    pub(super) fn slot(&mut self, kind: Kind) -> &mut u64 {
        match kind {
            Kind::Published => &mut self.published,
            Kind::Retried => &mut self.retried,
            Kind::Dead => &mut self.dead,
            Kind::Released => &mut self.released,
            Kind::Discarded => &mut self.discarded,
        }
    }
}

/// The kind of outcome one statement writes.
#[derive(Clone, Copy)]
pub(super) enum Kind {
    Published,
    Retried,
    Dead,
    Released,
    Discarded,
}

/// Fates grouped by kind, each group one statement.
#[derive(Default)]
pub(super) struct Sorted<'a> {
    published: Vec<Uuid>,
    retried: Vec<(Uuid, &'a String, DateTime<Utc>)>,
    dead: Vec<(Uuid, &'a String)>,
    released: Vec<(Uuid, DateTime<Utc>)>,
    discarded: Vec<Uuid>,
}

pub(super) fn sort_fates<'a>(fates: impl IntoIterator<Item = &'a (Uuid, Fate)>) -> Sorted<'a> {
    let mut s = Sorted::default();
    for (id, fate) in fates {
        match fate {
            Fate::Published => s.published.push(*id),
            Fate::Retry { error, at } => s.retried.push((*id, error, *at)),
            Fate::Dead { error } => s.dead.push((*id, error)),
            Fate::Release { at } => s.released.push((*id, *at)),
            Fate::Discard => s.discarded.push(*id),
        }
    }
    s
}

/// Every fate in at most one statement per kind, each conditional on `guard`, in one
/// transaction when there is more than one: MySQL's and SQLite's row leases, and owned
/// partitions on every backend. Under owned partitions every event handed back is written,
/// even one due again at once: its new time puts it behind the event it waits for, and the
/// claim after this one may start past its old place.
pub(super) async fn guarded(
    db: &DatabaseConnection,
    guard: Guard<'_>,
    now: DateTime<Utc>,
    fates: &[(Uuid, Fate)],
    on_publish: OnPublish,
) -> Result<WriteBack> {
    let mut out = WriteBack::expecting(fates);
    let backend = db.get_database_backend();
    let sorted = sort_fates(fates);
    let statements = statements(backend, guard, now, &sorted, on_publish);
    if statements.len() <= 1 && on_publish == OnPublish::Retain {
        for (kind, s) in statements {
            *out.slot(kind) += db.execute_raw(s).await?.rows_affected();
        }
    } else {
        let txn = db.begin().await?;
        for (kind, s) in statements {
            *out.slot(kind) += txn.execute_raw(s).await?.rows_affected();
        }
        if on_publish == OnPublish::Delete && out.published > 0 {
            txn.execute_raw(tally(backend, now, out.published)).await?;
        }
        txn.commit().await?;
    }
    Ok(out)
}

/// The minute `at` falls in: the key of its `outbox_published_tally` row.
pub(super) fn minute(at: DateTime<Utc>) -> DateTime<Utc> {
    at.duration_trunc(TimeDelta::minutes(1)).unwrap_or(at)
}

/// Adds `n` deleted-on-publish events to the tally of `now`'s minute.
pub(super) fn tally(backend: DbBackend, now: DateTime<Utc>, n: u64) -> Statement {
    let sql = match backend {
        DbBackend::MySql => mysql::UPSERT_TALLY,
        _ => TALLY_UPSERT,
    };
    let n = i64::try_from(n).unwrap_or(i64::MAX);
    stmt(backend, sql, vec![minute(now).into(), n.into()])
}

/// PostgreSQL and SQLite: adds `?` events to minute `?`'s row.
const TALLY_UPSERT: &str = "INSERT INTO outbox_published_tally (minute, events) VALUES (?, ?) \
     ON CONFLICT (minute) DO UPDATE SET events = outbox_published_tally.events + excluded.events";

/// What makes a write-back statement the batch owner's.
#[derive(Clone, Copy)]
pub(super) enum Guard<'a> {
    /// Rows carry the lease (MySQL, SQLite): each statement is conditional on it and clears it.
    RowLease(&'a str),
    /// PostgreSQL's batch lease row, held by the caller's transaction: rows need only still be
    /// pending.
    Pending,
    /// Owned partitions: the row's partition is still `owner`'s, taken no later than `epoch`
    /// (a partition lost and taken back since has a higher epoch, and refuses).
    Owned { owner: &'a str, epoch: i64 },
}

/// One statement per non-empty kind, each conditional on `guard`.
pub(super) fn statements(
    backend: DbBackend,
    guard: Guard<'_>,
    now: DateTime<Utc>,
    sorted: &Sorted<'_>,
    on_publish: OnPublish,
) -> Vec<(Kind, Statement)> {
    let Sorted {
        published,
        retried,
        dead,
        released,
        discarded,
    } = sorted;
    let mut out = Vec::new();
    // `… WHERE <lease> AND id IN (…)`, the guard's values and the ids appended to `values`.
    // `set` marks an `UPDATE … SET`, which also clears the row lease; a `DELETE` has no
    // columns to clear.
    let finish = |sql: String, set: bool, mut values: Vec<Value>, ids: Vec<Uuid>| {
        let ids_in = placeholders(ids.len());
        let sql = match guard {
            Guard::RowLease(token) => {
                let clear = if set {
                    ", locked_by = NULL, locked_until = NULL"
                } else {
                    ""
                };
                values.push(token.into());
                format!("{sql}{clear} WHERE locked_by = ? AND id IN ({ids_in})")
            }
            Guard::Pending => format!("{sql} WHERE status = 'pending' AND id IN ({ids_in})"),
            Guard::Owned { owner, epoch } => {
                values.extend([owner.into(), epoch.into()]);
                // PostgreSQL joined `IN (subquery)` to every id of the batch per partition (300
                // ms for 500 events); as an array it is read once.
                let held = match backend {
                    DbBackend::Postgres => "= ANY(ARRAY(SELECT partition_no",
                    _ => "IN (SELECT partition_no",
                };
                let close = if backend == DbBackend::Postgres {
                    "))"
                } else {
                    ")"
                };
                format!(
                    "{sql} WHERE status = 'pending' AND partition_no {held} \
                     FROM outbox_partitions WHERE owner = ? AND epoch <= ?{close} \
                     AND id IN ({ids_in})"
                )
            }
        };
        values.extend(ids.into_iter().map(Value::from));
        stmt(backend, &sql, values)
    };
    // `CASE id WHEN ? THEN ? … END` over `pairs`.
    fn case(pairs: impl Iterator<Item = (Uuid, Value)>, values: &mut Vec<Value>) -> String {
        let mut sql = String::from("CASE id");
        for (id, v) in pairs {
            sql.push_str(" WHEN ? THEN ?");
            values.push(id.into());
            values.push(v);
        }
        sql.push_str(" END");
        sql
    }
    if !published.is_empty() {
        let (sql, set, values) = match on_publish {
            OnPublish::Retain => (
                "UPDATE outbox_events SET status = 'published', published_at = ?",
                true,
                vec![now.into()],
            ),
            OnPublish::Delete => ("DELETE FROM outbox_events", false, Vec::new()),
        };
        out.push((
            Kind::Published,
            finish(sql.to_owned(), set, values, published.to_vec()),
        ));
    }
    if !retried.is_empty() {
        let mut values = Vec::new();
        let errors = case(
            retried.iter().map(|(id, e, _)| (*id, (*e).clone().into())),
            &mut values,
        );
        let ats = case(
            retried.iter().map(|(id, _, at)| (*id, (*at).into())),
            &mut values,
        );
        out.push((
            Kind::Retried,
            finish(
                format!(
                    "UPDATE outbox_events SET attempts = attempts + 1, last_error = {errors}, \
                     next_attempt_at = {ats}"
                ),
                true,
                values,
                retried.iter().map(|(id, _, _)| *id).collect(),
            ),
        ));
    }
    if !dead.is_empty() {
        let mut values = vec![now.into()];
        let errors = case(
            dead.iter().map(|(id, e)| (*id, (*e).clone().into())),
            &mut values,
        );
        out.push((
            Kind::Dead,
            finish(
                format!(
                    "UPDATE outbox_events SET status = 'failed', failed_at = ?, \
                     attempts = attempts + 1, last_error = {errors}"
                ),
                true,
                values,
                dead.iter().map(|(id, _)| *id).collect(),
            ),
        ));
    }
    if !discarded.is_empty() {
        let sql = "DELETE FROM outbox_events".to_owned();
        out.push((
            Kind::Discarded,
            finish(sql, false, Vec::new(), discarded.to_vec()),
        ));
    }
    if !released.is_empty() {
        let mut values = Vec::new();
        let ats = case(
            released.iter().map(|(id, at)| (*id, (*at).into())),
            &mut values,
        );
        out.push((
            Kind::Released,
            finish(
                format!("UPDATE outbox_events SET next_attempt_at = {ats}"),
                true,
                values,
                released.iter().map(|(id, _)| *id).collect(),
            ),
        ));
    }
    out
}
