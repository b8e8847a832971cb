//! [`Transport::Stream`](super::Transport::Stream): the slot streamed over the replication
//! protocol by pgwire-replication, on a connection of its own.
//!
//! Changes arrive as the server decodes them, once. Whole transactions that have arrived are
//! delivered together; the settled position is reported back (every `confirm_interval`). A
//! stop waits for the last report to reach the slot, so a graceful stop or hand-over sends
//! nothing twice; only when it does not arrive is the position written with
//! `pg_replication_slot_advance`, which decodes the slot again from its restart position
//! ([`LogRelayStats::stop_advances`](super::LogRelayStats::stop_advances)).

use futures_util::FutureExt;
use pgwire_replication::{
    FeedbackObserver, Lsn as WireLsn, ReplicationClient, ReplicationConfig, ReplicationEvent,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::session::{Keep, Session};
use super::{LogRelay, LogRelayStats};
use crate::error::{Error, Result};
use crate::publisher::Publisher;
use crate::store::{self, Lsn, Record, logical};

/// How long past `confirm_interval` a stop waits for its last position to reach the slot.
const STOP_REPORT_MARGIN: std::time::Duration = std::time::Duration::from_secs(1);

/// PostgreSQL's timestamps: microseconds since 2000-01-01 UTC.
fn pg_time(micros: i64) -> chrono::DateTime<chrono::Utc> {
    const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
    chrono::DateTime::from_timestamp_micros(micros.saturating_add(PG_EPOCH_MICROS))
        .unwrap_or_else(crate::event::now)
}

impl<P: Publisher> LogRelay<P> {
    fn stream_error(&self, what: &str, e: impl Into<crate::error::BoxError>) -> Error {
        let e = e.into();
        Error::LogRelay {
            slot: self.config.slot.clone(),
            reason: format!("replication stream {what}: {e}"),
            source: Some(e),
        }
    }

    /// The replication connection's settings: from `replication_url`, or the pool's.
    fn replication_config(&self) -> Result<ReplicationConfig> {
        let c = &self.config;
        let (host, port, user, password, database, tls) = match &c.replication_url {
            Some(u) => {
                let url = url::Url::parse(u)
                    .map_err(|e| Error::Config(format!("replication_url: {e}")))?;
                let decode = |s: &str| {
                    percent_encoding::percent_decode_str(s)
                        .decode_utf8_lossy()
                        .into_owned()
                };
                let query = |k: &str| {
                    url.query_pairs()
                        .find(|(key, _)| key == k)
                        .map(|(_, v)| v.into_owned())
                };
                let tls = match query("sslmode").as_deref() {
                    None | Some("disable" | "prefer" | "allow") => {
                        pgwire_replication::TlsConfig::disabled()
                    }
                    Some("verify-ca") => pgwire_replication::TlsConfig::verify_ca(None),
                    Some("verify-full") => pgwire_replication::TlsConfig::verify_full(None),
                    Some(_) => pgwire_replication::TlsConfig::require(),
                };
                (
                    url.host_str().unwrap_or("127.0.0.1").to_owned(),
                    url.port().unwrap_or(5432),
                    decode(url.username()),
                    url.password().map(decode).unwrap_or_default(),
                    decode(url.path().trim_start_matches('/')),
                    tls,
                )
            }
            None => {
                let pool = store::pg_pool(&self.db)
                    .ok_or_else(|| Error::Config("the log relay needs a PostgreSQL pool".into()))?;
                let o = pool.connect_options();
                let host = match o.get_socket() {
                    Some(dir) => dir.display().to_string(),
                    None => o.get_host().to_owned(),
                };
                (
                    host,
                    o.get_port(),
                    o.get_username().to_owned(),
                    std::env::var("PGPASSWORD").unwrap_or_default(),
                    o.get_database().unwrap_or("postgres").to_owned(),
                    pgwire_replication::TlsConfig::disabled(),
                )
            }
        };
        let cfg = ReplicationConfig::new(
            host,
            user,
            password,
            database,
            c.slot.clone(),
            format!("\"{}\"", c.publication.replace('"', "\"\"")),
        )
        .with_port(port)
        .with_tls(tls)
        .with_start_lsn(WireLsn::ZERO)
        .with_status_interval(c.confirm_interval)
        .with_wakeup_interval(c.heartbeat_interval)
        .with_application_name(self.name.clone())
        // Only so that the client tracks whether its last position reached the server
        // (`feedback_pending_since`), which a stop waits for.
        .with_feedback_observer(FeedbackObserver::new(|_| {}));
        Ok(cfg)
    }

    /// Streams until `cancel` (or, with `until`, once everything before it is confirmed).
    pub(super) async fn stream(
        &self,
        s: &mut Session,
        cancel: &CancellationToken,
        stats: &mut LogRelayStats,
        until: Option<Lsn>,
    ) -> Result<()> {
        let mut client = ReplicationClient::connect(self.replication_config()?)
            .await
            .map_err(|e| self.stream_error("could not connect", e))?;
        let result = self.pump(&mut client, s, cancel, stats, until).await;
        // Let the stream report the last position itself (within `confirm_interval`): an
        // advance by SQL afterwards decodes the slot again from its restart position, which
        // on a busy slot is hundreds of megabytes.
        let reported_by = Instant::now() + self.config.confirm_interval + STOP_REPORT_MARGIN;
        while result.is_ok()
            && client.is_running()
            && client.feedback_pending_since().is_some()
            && Instant::now() < reported_by
        {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // Ended without `CopyDone`: pgwire-replication 0.5 closes its socket right after one,
        // without reading the server's reply, and the server then logs `FATAL: connection to
        // client lost`. A closed socket after the last report is an EOF to the server: a LOG
        // line, and the report before it still applies.
        client.abort();
        let _ = client.shutdown().await;
        // The server applies the report when its process reads it, a moment after the client
        // wrote it; only a position it never got is written to the slot here.
        let mut stored = logical::confirmed_lsn(&mut s.conn, &self.config.slot).await?;
        let applied_by = Instant::now() + STOP_REPORT_MARGIN;
        while s.confirmed > stored && Instant::now() < applied_by {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            stored = logical::confirmed_lsn(&mut s.conn, &self.config.slot).await?;
        }
        if s.confirmed > stored {
            logical::advance(&mut s.conn, &self.config.slot, s.confirmed).await?;
            stats.stop_advances += 1;
        }
        result
    }

    async fn pump(
        &self,
        client: &mut ReplicationClient,
        s: &mut Session,
        cancel: &CancellationToken,
        stats: &mut LogRelayStats,
        until: Option<Lsn>,
    ) -> Result<()> {
        let c = &self.config;
        // The server's position as of its last keepalive: everything before it was sent.
        let mut sent_upto: Lsn = 0;
        // Write-backs go one at a time, in read order; the reads delivered while one runs
        // are queued and written together when it ends (a group commit: at any read size,
        // one commit per write-back, not per read).
        let mut keeping: Option<Keeping> = None;
        let mut queued: Option<Keeping> = None;
        loop {
            self.touch();
            if let Some(until) = until
                && s.confirmed >= until
                && keeping.is_none()
                && queued.is_none()
            {
                return Ok(());
            }
            let beat_at = s.last_event + c.heartbeat_interval;
            let first = tokio::select! {
                () = cancel.cancelled() => {
                    return self.keep_all(client, s, &mut keeping, &mut queued).await;
                }
                kept = wait(&mut keeping) => {
                    self.confirm(client, s, keeping.take(), kept)?;
                    keeping = queued.take().map(|q| self.start(q));
                    continue;
                }
                ev = client.recv() => ev,
                () = tokio::time::sleep_until(beat_at) => {
                    self.beat(s, stats).await?;
                    self.record_lag(s, sent_upto.max(s.confirmed)).await;
                    continue;
                }
            };
            let mut next = Some(first);
            // Take what has already arrived, up to `max_changes` events, as one read.
            while let Some(ev) = next.take() {
                match ev.map_err(|e| self.stream_error("failed", e))? {
                    None => return Err(self.stream_error("ended", "the server closed it")),
                    Some(ev) => self.record(s, ev, &mut sent_upto),
                }
                if s.asm.events() >= c.max_changes as usize {
                    break;
                }
                next = client.recv().now_or_never();
            }
            if !s.asm.is_empty() {
                let read = s.asm.take();
                let (keep, settled) = self
                    .deliver_read(s, read, cancel, stats, until.is_some())
                    .await;
                let q = queued.get_or_insert_with(Keeping::queued);
                q.keep.absorb(keep);
                q.target = q.target.max(settled.target);
                if keeping.is_none() {
                    keeping = queued.take().map(|q| self.start(q));
                } else if q.keep.len() >= c.max_changes as usize {
                    // Delivered but unwritten (what a crash sends again) stays bounded: the
                    // queue waits for the write-back in flight.
                    self.kept(client, s, keeping.take()).await?;
                    keeping = queued.take().map(|q| self.start(q));
                }
                if settled.stopped {
                    return self.keep_all(client, s, &mut keeping, &mut queued).await;
                }
            }
            // Caught up between transactions, with nothing left to keep: everything the
            // server sent is settled.
            if keeping.is_none()
                && queued.is_none()
                && !s.asm.in_transaction()
                && sent_upto > s.confirmed
            {
                client.update_applied_lsn(WireLsn::from_u64(sent_upto));
                s.confirmed = sent_upto;
            }
            if Instant::now() >= s.next_metrics {
                self.record_lag(s, sent_upto.max(s.confirmed)).await;
            }
        }
    }

    /// Starts a queued write-back.
    fn start(&self, mut q: Keeping) -> Keeping {
        let (db, keep) = (self.db.clone(), std::mem::take(&mut q.keep));
        q.task = Some(tokio::spawn(async move { keep.run(&db).await }));
        q
    }

    /// Finishes the write-back in flight and then the queued one, reporting their positions.
    async fn keep_all(
        &self,
        client: &mut ReplicationClient,
        s: &mut Session,
        keeping: &mut Option<Keeping>,
        queued: &mut Option<Keeping>,
    ) -> Result<()> {
        self.kept(client, s, keeping.take()).await?;
        let q = queued.take().map(|q| self.start(q));
        self.kept(client, s, q).await
    }

    /// Waits for `keeping` to finish, then reports its position.
    async fn kept(
        &self,
        client: &mut ReplicationClient,
        s: &mut Session,
        mut keeping: Option<Keeping>,
    ) -> Result<()> {
        if keeping.is_none() {
            return Ok(());
        }
        let kept = wait(&mut keeping).await;
        self.confirm(client, s, keeping, kept)
    }

    /// Reports a finished write-back's position; a failed one ends the stream unreported, so
    /// its read is delivered again.
    fn confirm(
        &self,
        client: &mut ReplicationClient,
        s: &mut Session,
        keeping: Option<Keeping>,
        kept: std::result::Result<Result<()>, tokio::task::JoinError>,
    ) -> Result<()> {
        let Some(k) = keeping else { return Ok(()) };
        kept.map_err(|e| self.stream_error("write-back task failed", e))??;
        if let Some(t) = k.target
            && t > s.confirmed
        {
            client.update_applied_lsn(WireLsn::from_u64(t));
            s.confirmed = t;
        }
        Ok(())
    }

    fn record(&self, s: &mut Session, ev: ReplicationEvent, sent_upto: &mut Lsn) {
        match ev {
            ReplicationEvent::Begin {
                commit_time_micros, ..
            } => s.asm.push(
                0,
                Record::Begin {
                    commit_at: pg_time(commit_time_micros),
                },
                &[],
            ),
            ReplicationEvent::Commit { end_lsn, .. } => s.asm.push(
                0,
                Record::Commit {
                    end_lsn: end_lsn.as_u64(),
                },
                &[],
            ),
            ReplicationEvent::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => s.asm.push(
                lsn.as_u64(),
                Record::Message {
                    transactional,
                    prefix,
                    content: content.to_vec(),
                },
                &[],
            ),
            ReplicationEvent::XLogData {
                wal_start, data, ..
            } => s.asm.push_raw(wal_start.as_u64(), &data),
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                *sent_upto = (*sent_upto).max(wal_end.as_u64());
            }
            _ => {}
        }
    }
}

/// Reads' write-back: queued (no task yet), or in flight; and how far the slot may move once
/// it is done.
struct Keeping {
    keep: Keep,
    task: Option<tokio::task::JoinHandle<Result<()>>>,
    target: Option<Lsn>,
}

impl Keeping {
    fn queued() -> Self {
        Self {
            keep: Keep::default(),
            task: None,
            target: None,
        }
    }
}

/// The write-back's result; never ready when none is in flight.
async fn wait(
    keeping: &mut Option<Keeping>,
) -> std::result::Result<Result<()>, tokio::task::JoinError> {
    match keeping.as_mut().and_then(|k| k.task.as_mut()) {
        Some(task) => task.await,
        None => std::future::pending().await,
    }
}
