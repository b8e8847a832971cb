//! One leadership: the leader's connection and lock, the standby's wait, and what every read
//! does whatever the transport: deliver, keep dead letters, mark rows, beat, record lag.

use std::time::Duration;

use sea_orm::sqlx::PgConnection;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::read::{Assembler, Read};
use super::{LogRelay, LogRelayStats, LogRole, Transport};
use crate::error::{Error, Result};
use crate::event::now;
use crate::publisher::Publisher;
use crate::relay::lock;
use crate::store::{self, Lsn, logical};
use crate::telemetry::metrics;

/// The leader's session: its connection, and where the slot stands.
pub(super) struct Session {
    /// Holds the leader lock; runs the slot's SQL.
    pub(super) conn: PgConnection,
    /// What the slot has been told is settled.
    pub(super) confirmed: Lsn,
    pub(super) asm: Assembler,
    pub(super) last_event: Instant,
    pub(super) next_metrics: Instant,
}

impl Session {
    /// Ends the session cleanly, so its leader lock is free at once for a standby (a dropped
    /// connection frees it too, once the server notices).
    pub(super) async fn end(mut self, slot: &str) {
        use sea_orm::sqlx::Connection as _;
        let _ = logical::stop_leading(&mut self.conn, slot).await;
        let _ = self.conn.close().await;
    }
}

/// What a delivered read leaves to write before the slot may move past it: its dead letters
/// and, in table mode, its delivered rows to mark published or delete.
#[derive(Default)]
pub(super) struct Keep {
    dead: Vec<store::LogDeadLetter>,
    rows: Vec<uuid::Uuid>,
    delete: bool,
}

impl Keep {
    /// Adds a later read's write-back to this one.
    pub(super) fn absorb(&mut self, later: Keep) {
        self.dead.extend(later.dead);
        self.rows.extend(later.rows);
        self.delete = later.delete;
    }

    /// Rows and dead letters to write.
    pub(super) fn len(&self) -> usize {
        self.rows.len() + self.dead.len()
    }

    pub(super) async fn run(self, db: &sea_orm::DatabaseConnection) -> Result<()> {
        for d in &self.dead {
            store::log_dead_letters::dead_letter(db, d).await?;
        }
        logical::settle_rows(db, &self.rows, self.delete).await?;
        Ok(())
    }
}

/// What became of one read.
pub(super) struct Settled {
    pub(super) events: usize,
    /// How far the read is wholly settled: its last transaction's end, or, when the relay
    /// stopped part-way, the end of the last transaction wholly settled.
    pub(super) target: Option<Lsn>,
    /// The relay is stopping (or, draining, the publisher is unavailable).
    pub(super) stopped: bool,
}

impl<P: Publisher> LogRelay<P> {
    /// Reads and publishes until the slot has caught up with the server's position at the
    /// time of each read, then returns. Fails at once if another relay holds the slot. For
    /// tests, scripts and benchmarks.
    ///
    /// # Errors
    /// [`Error::LogRelay`] when another relay holds the slot or the server cannot decode;
    /// [`Error::PublisherUnavailable`] while the broker is down; database errors.
    pub async fn drain(&self) -> Result<LogRelayStats> {
        let never = CancellationToken::new();
        let mut conn = self.connect().await?;
        self.set_up(&mut conn).await?;
        if !logical::try_lead(&mut conn, &self.config.slot).await? {
            return Err(Error::LogRelay {
                slot: self.config.slot.clone(),
                reason: "another relay holds the slot".into(),
                source: None,
            });
        }
        let mut session = self.session(conn).await?;
        let mut stats = LogRelayStats::default();
        let until = logical::current_lsn(&mut session.conn).await?;
        match self.config.transport {
            Transport::Sql => loop {
                let step = self
                    .sql_step(&mut session, &never, &mut stats, true)
                    .await?;
                self.unavailable()?;
                if step.events == 0 && !step.full {
                    break;
                }
            },
            _ => {
                self.stream(&mut session, &never, &mut stats, Some(until))
                    .await?;
                self.unavailable()?;
            }
        }
        session.end(&self.config.slot).await;
        Ok(stats)
    }

    pub(super) async fn connect(&self) -> Result<PgConnection> {
        let pool = store::pg_pool(&self.db)
            .ok_or_else(|| Error::Config("the log relay needs a PostgreSQL pool".into()))?;
        logical::connect(pool).await
    }

    pub(super) async fn set_up(&self, conn: &mut PgConnection) -> Result<()> {
        let c = &self.config;
        logical::check_prerequisites(conn, &c.slot).await?;
        logical::ensure_publication(conn, &c.slot, &c.publication, c.table).await?;
        logical::ensure_slot(conn, &c.slot).await?;
        Ok(())
    }

    pub(super) async fn session(&self, mut conn: PgConnection) -> Result<Session> {
        let schema = if self.config.table {
            Some(store::logical::current_schema(&mut conn).await?)
        } else {
            None
        };
        let confirmed = logical::confirmed_lsn(&mut conn, &self.config.slot).await?;
        let c = &self.config;
        Ok(Session {
            conn,
            confirmed,
            asm: Assembler::new(&c.slot, &c.message_prefix, schema),
            last_event: Instant::now(),
            next_metrics: Instant::now(),
        })
    }

    /// One leadership: connect, wait as a standby for the slot's lock, then read until
    /// cancelled (`Ok`) or an error.
    pub(super) async fn lead(
        &self,
        cancel: &CancellationToken,
        stats: &mut LogRelayStats,
    ) -> Result<()> {
        let mut conn = self.connect().await?;
        self.set_up(&mut conn).await?;
        loop {
            self.touch();
            if logical::try_lead(&mut conn, &self.config.slot).await? {
                break;
            }
            if lock(&self.state).role != LogRole::Standby {
                lock(&self.state).role = LogRole::Standby;
                tracing::info!(relay = %self.name, slot = %self.config.slot,
                    "another relay holds the outbox slot; standing by");
            }
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                () = tokio::time::sleep(self.config.standby_interval) => {}
            }
        }
        lock(&self.state).role = LogRole::Leader;
        stats.took_lead += 1;
        tracing::info!(relay = %self.name, slot = %self.config.slot, "outbox log relay leads its slot");
        let mut session = self.session(conn).await?;
        if self.config.transport != Transport::Sql {
            self.stream(&mut session, cancel, stats, None).await?;
            session.end(&self.config.slot).await;
            return Ok(());
        }
        let mut pause = Duration::ZERO;
        while !cancel.is_cancelled() {
            let step = self.sql_step(&mut session, cancel, stats, false).await?;
            if step.stopped {
                break;
            }
            pause = if step.events > 0 || step.full {
                Duration::ZERO
            } else if pause.is_zero() {
                self.config.poll_interval
            } else {
                (pause * 2).min(self.config.idle_poll_interval)
            };
            if !pause.is_zero() {
                tokio::select! {
                    () = cancel.cancelled() => {}
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
        session.end(&self.config.slot).await;
        Ok(())
    }

    pub(super) fn touch(&self) {
        lock(&self.state).last_poll = Some(now());
    }

    /// Delivers a read, and keeps its dead letters (and, in table mode, marks its rows) before
    /// the slot may move past it; if keeping fails, the read is delivered again.
    pub(super) async fn settle(
        &self,
        s: &mut Session,
        read: Read,
        cancel: &CancellationToken,
        stats: &mut LogRelayStats,
        stop_when_unavailable: bool,
    ) -> Result<Settled> {
        let (keep, settled) = self
            .deliver_read(s, read, cancel, stats, stop_when_unavailable)
            .await;
        keep.run(&self.db).await?;
        Ok(settled)
    }

    /// Delivers a read; what must be kept before the slot may move past it is returned, for
    /// the caller to [`Keep::run`] first.
    pub(super) async fn deliver_read(
        &self,
        s: &mut Session,
        read: Read,
        cancel: &CancellationToken,
        stats: &mut LogRelayStats,
        stop_when_unavailable: bool,
    ) -> (Keep, Settled) {
        let c = &self.config;
        stats.reads += 1;
        stats.transactions += read.ends.len() as u64;
        let events = read.items.len();
        if read.oldest_commit.is_some() {
            lock(&self.state).behind_since = read.oldest_commit;
        }
        let delivery = self
            .deliver(read.items, cancel, stop_when_unavailable)
            .await;
        stats.published += delivery.delivered.len() as u64;
        stats.dead_lettered += delivery.dead.len() as u64;
        stats.expired += delivery.expired;
        stats.unreadable += read.unreadable.len() as u64;
        stats.retried += delivery.retried;
        if events > 0 {
            s.last_event = Instant::now();
        }
        let target = match delivery.unsettled_from {
            Some(txn) => txn.checked_sub(1).and_then(|i| read.ends.get(i).copied()),
            None => read.ends.last().copied(),
        };
        if delivery.unsettled_from.is_none() {
            lock(&self.state).behind_since = None;
        }
        let mut dead = read.unreadable;
        dead.extend(delivery.dead);
        let keep = Keep {
            dead,
            rows: if c.table {
                delivery.delivered
            } else {
                Vec::new()
            },
            delete: c.on_publish == crate::relay::OnPublish::Delete,
        };
        let settled = Settled {
            events,
            target,
            stopped: delivery.unsettled_from.is_some(),
        };
        (keep, settled)
    }

    /// On an idle database: a heartbeat message once `heartbeat_interval` has passed without an
    /// event, so the slot has a record to move to.
    pub(super) async fn beat(&self, s: &mut Session, stats: &mut LogRelayStats) -> Result<()> {
        if s.last_event.elapsed() >= self.config.heartbeat_interval {
            logical::heartbeat(&mut s.conn).await?;
            s.last_event = Instant::now();
            stats.heartbeats += 1;
        }
        Ok(())
    }

    pub(super) async fn record_lag(&self, s: &mut Session, upto: Lsn) {
        let age = lock(&self.state)
            .behind_since
            .and_then(|t| (now() - t).to_std().ok())
            .unwrap_or_default();
        let mut retained = None;
        if let Some(every) = self.config.metrics_interval
            && Instant::now() >= s.next_metrics
        {
            s.next_metrics = Instant::now() + every;
            match self.slot().await {
                Ok(Some(slot)) => retained = Some(slot.retained_bytes),
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(slot = %self.config.slot, error = %e, "slot status unreadable")
                }
            }
        }
        metrics::slot_lag(
            &self.config.slot,
            upto.saturating_sub(s.confirmed),
            age,
            retained,
        );
    }
}
