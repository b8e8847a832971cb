//! A consumer process's heartbeat: its row in `inbox_consumers`, written every
//! [`heartbeat_interval`](super::ConsumerConfig::heartbeat_interval) without holding up the
//! dispatcher, and removed on a graceful stop.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::DatabaseConnection;
use tokio::task::JoinHandle;

use super::state::ConsumerStats;
use crate::event::now;
use crate::store::consumers::{self as store, ConsumerHeartbeat};

/// The longest a stop waits to remove the row: a database that is away must not hold up the
/// stop (the row then ages out).
const FORGET_WITHIN: Duration = Duration::from_secs(2);

/// What the dispatcher knows when a heartbeat is due.
pub(crate) struct Figures {
    pub(crate) stats: ConsumerStats,
    pub(crate) held: usize,
    pub(crate) oldest_waiting: Option<DateTime<Utc>>,
}

pub(crate) struct Heartbeat {
    db: DatabaseConnection,
    row: ConsumerHeartbeat,
    interval: Duration,
    last: Option<(DateTime<Utc>, ConsumerStats)>,
    writing: Option<JoinHandle<()>>,
    /// Whether the last write failed, to warn once and say when it works again.
    failing: Arc<AtomicBool>,
}

/// `host:pid:run`: tells processes apart on one host and across restarts.
fn instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    // A UUIDv7 ends in random bits.
    let run = uuid::Uuid::now_v7().simple().to_string();
    let host: String = host.chars().take(100).collect();
    format!("{host}:{}:{}", std::process::id(), &run[run.len() - 6..])
}

fn per_minute(now: u64, before: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        return 0.0;
    }
    now.saturating_sub(before) as f64 * 60.0 / secs
}

impl Heartbeat {
    pub(crate) fn new(
        db: DatabaseConnection,
        consumer: &str,
        broker: &str,
        interval: Duration,
    ) -> Self {
        let at = now();
        Self {
            db,
            row: ConsumerHeartbeat {
                consumer: consumer.to_owned(),
                instance: instance(),
                broker: broker.to_owned(),
                started_at: at,
                heartbeat_at: at,
                applied: 0,
                duplicates: 0,
                dead_lettered: 0,
                retries: 0,
                applied_per_min: 0.0,
                duplicates_per_min: 0.0,
                dead_lettered_per_min: 0.0,
                held: 0,
                lag_secs: None,
            },
            interval,
            last: None,
            writing: None,
            failing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Writes `f` in the background, unless the previous write is still under way (a slow
    /// database gets one write at a time, and the dispatcher never waits for it).
    pub(crate) fn beat(&mut self, f: Figures) {
        if self.writing.as_ref().is_some_and(|w| !w.is_finished()) {
            return;
        }
        let at = now();
        let (since, before) = self
            .last
            .unwrap_or((self.row.started_at, ConsumerStats::default()));
        let secs = (at - since).num_milliseconds() as f64 / 1000.0;
        let s = &f.stats;
        let row = &mut self.row;
        row.heartbeat_at = at;
        row.applied = s.applied;
        row.duplicates = s.duplicates;
        row.dead_lettered = s.dead_lettered;
        row.retries = s.retries;
        row.applied_per_min = per_minute(s.applied, before.applied, secs);
        row.duplicates_per_min = per_minute(s.duplicates, before.duplicates, secs);
        row.dead_lettered_per_min = per_minute(s.dead_lettered, before.dead_lettered, secs);
        row.held = f.held as u64;
        row.lag_secs = f
            .oldest_waiting
            .map(|t| ((at - t).num_milliseconds().max(0) as f64) / 1000.0);
        self.last = Some((at, f.stats));
        // Rows silent for six intervals (at least a minute) are of processes that are gone.
        let gone = chrono::Duration::from_std((self.interval * 6).max(Duration::from_secs(60)))
            .unwrap_or(chrono::Duration::MAX);
        let forget_before = at
            .checked_sub_signed(gone)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let (db, row, failing) = (self.db.clone(), row.clone(), Arc::clone(&self.failing));
        self.writing = Some(tokio::spawn(async move {
            match store::beat(&db, &row, forget_before).await {
                Ok(()) => {
                    if failing.swap(false, Ordering::Relaxed) {
                        tracing::info!(consumer = %row.consumer, "inbox consumer heartbeat succeeded again");
                    }
                }
                Err(e) => {
                    if !failing.swap(true, Ordering::Relaxed) {
                        tracing::warn!(consumer = %row.consumer, error = %e, "inbox consumer heartbeat failed (is migration inbox_consumers applied?)");
                    }
                }
            }
        }));
    }

    /// Removes the row, after any write under way.
    pub(crate) async fn stop(mut self) {
        if let Some(w) = self.writing.take()
            && tokio::time::timeout(FORGET_WITHIN, w).await.is_err()
        {
            // The database is not answering: the row ages out.
            return;
        }
        let forget = store::forget(&self.db, &self.row.consumer, &self.row.instance);
        match tokio::time::timeout(FORGET_WITHIN, forget).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(consumer = %self.row.consumer, error = %e, "inbox consumer row not removed; it ages out");
            }
            Err(_) => {
                tracing::debug!(consumer = %self.row.consumer, "inbox consumer row not removed in time; it ages out");
            }
        }
    }
}
