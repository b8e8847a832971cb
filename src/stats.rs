//! Backlog statistics and health checks: what `count_unpublished` is for — health checks, lag
//! alerts and capacity planning — with the backlog's age and the dead letters alongside.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend};
use serde::Serialize;

use crate::error::Result;
use crate::sql::stmt;

/// A snapshot of the outbox.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct OutboxStats {
    /// When the snapshot was taken.
    pub at: DateTime<Utc>,
    /// Pending and due now (including claims whose lease has run out).
    pub pending_due: u64,
    /// Pending, waiting out a retry backoff.
    pub pending_backoff: u64,
    /// Pending, claimed by a relay under a live lease.
    pub pending_leased: u64,
    /// Dead letters.
    pub failed: u64,
    /// The `occurred_at` of the oldest pending event.
    pub oldest_pending_at: Option<DateTime<Utc>>,
    /// Events published in the hour before `at`.
    pub published_last_hour: u64,
}

impl OutboxStats {
    /// All pending events: due, in backoff or leased.
    pub fn pending(&self) -> u64 {
        self.pending_due + self.pending_backoff + self.pending_leased
    }

    /// How old the oldest pending event is.
    pub fn oldest_pending_age(&self) -> Option<Duration> {
        self.oldest_pending_at
            .map(|t| (self.at - t).to_std().unwrap_or_default())
    }

    /// Reads a snapshot with three indexed queries (pending rows, dead letters, the last hour of
    /// published rows); published history is never scanned.
    pub(crate) async fn read(db: &impl ConnectionTrait) -> Result<Self> {
        let backend = db.get_database_backend();
        let at = crate::event::now();
        // A row is leased when it carries a live row lease (MySQL, SQLite) or, on PostgreSQL,
        // when a live batch lease holds its id.
        let pending_sql = if backend == DbBackend::Postgres {
            format!(
                "WITH leased AS (SELECT DISTINCT id FROM ({}) l), \
             p AS (SELECT e.next_attempt_at, e.occurred_at, \
                     (l.id IS NOT NULL OR (e.next_attempt_at > ? AND e.locked_by IS NOT NULL)) AS leased \
                   FROM outbox_events e LEFT JOIN leased l ON l.id = e.id \
                   WHERE e.status = 'pending') \
             SELECT \
               COUNT(CASE WHEN NOT leased AND next_attempt_at <= ? THEN 1 END) AS due, \
               COUNT(CASE WHEN NOT leased AND next_attempt_at > ? THEN 1 END) AS backoff, \
               COUNT(CASE WHEN leased THEN 1 END) AS leased, \
               MIN(occurred_at) AS oldest \
             FROM p",
                crate::relay::store::LIVE_LEASED_IDS
            )
        } else {
            "SELECT \
               COUNT(CASE WHEN next_attempt_at <= ? THEN 1 END) AS due, \
               COUNT(CASE WHEN next_attempt_at > ? AND locked_by IS NULL THEN 1 END) AS backoff, \
               COUNT(CASE WHEN next_attempt_at > ? AND locked_by IS NOT NULL THEN 1 END) AS leased, \
               MIN(occurred_at) AS oldest \
             FROM outbox_events WHERE status = 'pending'"
                .to_owned()
        };
        let mut values: Vec<sea_orm::Value> = vec![at.into(), at.into(), at.into()];
        if backend == DbBackend::Postgres {
            values.push(at.into());
        }
        let pending = db
            .query_one_raw(stmt(backend, &pending_sql, values))
            .await?;
        let counts = db
            .query_one_raw(stmt(
                backend,
                "SELECT \
                   (SELECT COUNT(*) FROM outbox_events WHERE status = 'failed') AS failed, \
                   (SELECT COUNT(*) FROM outbox_events WHERE status = 'published' AND published_at >= ?) AS recent",
                vec![(at - chrono::Duration::hours(1)).into()],
            ))
            .await?;
        let int = |row: &Option<sea_orm::QueryResult>, col: &str| -> Result<u64> {
            Ok(match row {
                Some(r) => u64::try_from(r.try_get::<i64>("", col)?).unwrap_or(0),
                None => 0,
            })
        };
        let oldest_pending_at = match &pending {
            Some(r) => oldest(r, backend)?,
            None => None,
        };
        Ok(Self {
            at,
            pending_due: int(&pending, "due")?,
            pending_backoff: int(&pending, "backoff")?,
            pending_leased: int(&pending, "leased")?,
            failed: int(&counts, "failed")?,
            oldest_pending_at,
            published_last_hour: int(&counts, "recent")?,
        })
    }
}

/// `MIN(occurred_at)`: SQLite returns the stored text, the others a timestamp.
fn oldest(row: &sea_orm::QueryResult, backend: DbBackend) -> Result<Option<DateTime<Utc>>> {
    if backend == DbBackend::Sqlite {
        let text: Option<String> = row.try_get("", "oldest")?;
        return Ok(text.and_then(|t| {
            DateTime::parse_from_rfc3339(&t)
                .ok()
                .map(|d| d.with_timezone(&Utc))
        }));
    }
    Ok(row.try_get("", "oldest")?)
}

/// Overall health.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// Within every threshold.
    Healthy,
    /// Working, but a backlog, lag or dead-letter threshold is crossed.
    Degraded,
    /// The database cannot be read, or the relay loop has stopped polling.
    Unhealthy,
}

/// Limits for [`Outbox::health`](crate::Outbox::health) and
/// [`Relay::health`](crate::Relay::health). Crossing any of the first three is
/// [`HealthStatus::Degraded`]; a relay not polling for `max_poll_gap` is
/// [`HealthStatus::Unhealthy`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct HealthThresholds {
    /// Pending events above this. Default 10,000.
    pub max_backlog: u64,
    /// Oldest pending event older than this. Default 5 min.
    pub max_oldest_pending_age: Duration,
    /// Dead letters above this. Default 0: any dead letter needs a look.
    pub max_dead_letters: u64,
    /// Relay loop silent for longer than this. Default 60 s.
    pub max_poll_gap: Duration,
}

impl Default for HealthThresholds {
    fn default() -> Self {
        Self {
            max_backlog: 10_000,
            max_oldest_pending_age: Duration::from_secs(300),
            max_dead_letters: 0,
            max_poll_gap: Duration::from_secs(60),
        }
    }
}

impl HealthThresholds {
    /// Sets [`max_backlog`](Self::max_backlog).
    pub fn max_backlog(mut self, n: u64) -> Self {
        self.max_backlog = n;
        self
    }
    /// Sets [`max_oldest_pending_age`](Self::max_oldest_pending_age).
    pub fn max_oldest_pending_age(mut self, d: Duration) -> Self {
        self.max_oldest_pending_age = d;
        self
    }
    /// Sets [`max_dead_letters`](Self::max_dead_letters).
    pub fn max_dead_letters(mut self, n: u64) -> Self {
        self.max_dead_letters = n;
        self
    }
    /// Sets [`max_poll_gap`](Self::max_poll_gap).
    pub fn max_poll_gap(mut self, d: Duration) -> Self {
        self.max_poll_gap = d;
        self
    }
}

/// A health verdict with its reasons and the numbers behind it.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct Health {
    /// The verdict.
    pub status: HealthStatus,
    /// Why it is not healthy; empty when healthy.
    pub reasons: Vec<String>,
    /// The snapshot, if the database could be read.
    pub stats: Option<OutboxStats>,
    /// The relay's last poll, for a relay's health.
    pub last_poll: Option<DateTime<Utc>>,
}

impl Health {
    /// The HTTP status to serve: 200 when healthy or degraded (the body says which), 503 when
    /// unhealthy.
    pub fn http_status(&self) -> u16 {
        match self.status {
            HealthStatus::Healthy | HealthStatus::Degraded => 200,
            HealthStatus::Unhealthy => 503,
        }
    }

    pub(crate) fn from_stats(stats: Result<OutboxStats>, t: &HealthThresholds) -> Self {
        let mut h = Self {
            status: HealthStatus::Healthy,
            reasons: Vec::new(),
            stats: None,
            last_poll: None,
        };
        match stats {
            Err(e) => h.unhealthy(format!("database unreadable: {e}")),
            Ok(s) => {
                if s.pending() > t.max_backlog {
                    h.degraded(format!("backlog {} over {}", s.pending(), t.max_backlog));
                }
                if let Some(age) = s.oldest_pending_age()
                    && age > t.max_oldest_pending_age
                {
                    h.degraded(format!(
                        "oldest pending event is {}s old, over {}s",
                        age.as_secs(),
                        t.max_oldest_pending_age.as_secs()
                    ));
                }
                if s.failed > t.max_dead_letters {
                    h.degraded(format!(
                        "{} dead letters, over {}",
                        s.failed, t.max_dead_letters
                    ));
                }
                h.stats = Some(s);
            }
        }
        h
    }

    pub(crate) fn check_poll(&mut self, last_poll: Option<DateTime<Utc>>, t: &HealthThresholds) {
        self.last_poll = last_poll;
        match last_poll {
            None => self.unhealthy("relay has not polled yet".into()),
            Some(at) => {
                let gap = (crate::event::now() - at).to_std().unwrap_or_default();
                if gap > t.max_poll_gap {
                    self.unhealthy(format!(
                        "relay has not polled for {}s, over {}s",
                        gap.as_secs(),
                        t.max_poll_gap.as_secs()
                    ));
                }
            }
        }
    }

    fn degraded(&mut self, reason: String) {
        if self.status == HealthStatus::Healthy {
            self.status = HealthStatus::Degraded;
        }
        self.reasons.push(reason);
    }

    fn unhealthy(&mut self, reason: String) {
        self.status = HealthStatus::Unhealthy;
        self.reasons.push(reason);
    }
}
