//! The relay: claims due events under a lease, hands them to a [`Publisher`], and writes the
//! outcomes back — published, retried with backoff, dead-lettered, or released.
//!
//! # Guarantees
//!
//! * **At least once.** An event is marked published only after the publisher reported it
//!   delivered. A relay that dies between the broker's ack and the write-back leaves the event
//!   leased; after the lease it is claimed and sent again. Duplicates are bounded by what was in
//!   flight; consumers deduplicate on the event id, which publishers send as the message id.
//! * **No double publish without a crash.** Claims use `FOR UPDATE SKIP LOCKED` (PostgreSQL,
//!   MySQL 8, MariaDB 10.6+) or SQLite's single writer, and every write-back is conditional on
//!   still holding the lease, so a relay whose lease expired cannot overwrite the new owner.
//! * **Per-aggregate order** ([`Ordering::PerAggregate`], the default): see [`Ordering`].
//! * **Bounded delay behind a drain (PostgreSQL).** While a relay drains full batches, each claim
//!   scans the due rows from where the previous batch ended, skipping the index entries that
//!   published rows leave until VACUUM. An event that becomes claimable behind that point (a
//!   writer's transaction that outlasted a batch, an expired lease, or under per-aggregate order
//!   an event whose predecessor was in flight when the scan passed it) is found by the next
//!   full scan: a short claim, or at most a second later.

mod config;
mod cursor;
pub(crate) mod store;
mod wake;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering as AtomicOrdering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::DatabaseConnection;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

pub use config::{Backoff, DeadLetterPolicy, Jitter, MAX_BATCH_SIZE, Ordering, RelayConfig};
pub use wake::NOTIFY_CHANNEL;

use crate::error::{Error, Result};
use crate::event::{OutboxEvent, now};
use crate::publisher::{PublishOutcome, Publisher};
use crate::repository::{Outbox, truncate_error};
use crate::telemetry;
use store::{Claim, Fate};

/// What a relay did, summed over its run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayStats {
    /// Events marked published.
    pub published: u64,
    /// Failed attempts scheduled for a retry.
    pub retried: u64,
    /// Events moved to the dead letter.
    pub dead_lettered: u64,
    /// Events handed back unattempted (blocked behind a failure, or at shutdown).
    pub released: u64,
    /// Batches claimed (empty polls are not counted).
    pub batches: u64,
    /// Events whose lease had expired and been taken over before the write-back.
    pub lost_leases: u64,
    /// Published events deleted by retention.
    pub purged: u64,
}

impl std::ops::AddAssign for RelayStats {
    fn add_assign(&mut self, o: Self) {
        self.published += o.published;
        self.retried += o.retried;
        self.dead_lettered += o.dead_lettered;
        self.released += o.released;
        self.batches += o.batches;
        self.lost_leases += o.lost_leases;
        self.purged += o.purged;
    }
}

/// Builds a [`Relay`].
#[derive(Debug)]
pub struct RelayBuilder<P> {
    db: DatabaseConnection,
    publisher: P,
    config: RelayConfig,
}

impl<P: Publisher> RelayBuilder<P> {
    /// Sets the configuration.
    pub fn config(mut self, config: RelayConfig) -> Self {
        self.config = config;
        self
    }

    /// Validates the configuration and builds the relay.
    pub fn build(self) -> Result<Relay<P>> {
        self.config.validate()?;
        let name = self.config.name.clone().unwrap_or_else(|| {
            format!("relay-{}-{:04x}", std::process::id(), rand::random::<u16>())
        });
        Ok(Relay {
            db: self.db,
            publisher: self.publisher,
            // Leave room for `:` and a 32-character batch id within the 64-character token.
            name: name.chars().take(31).collect(),
            share: AtomicU32::new(self.config.events_per_aggregate),
            cursor: std::sync::Mutex::default(),
            config: self.config,
            last_poll: Arc::new(AtomicI64::new(0)),
        })
    }
}

/// Moves events from the outbox table to a [`Publisher`].
///
/// Run as many relays as you like, in one process or many: they share the table safely.
///
/// ```no_run
/// use sea_orm::Database;
/// use seaorm_outbox::publisher::LogPublisher;
/// use seaorm_outbox::relay::{Relay, RelayConfig};
/// use tokio_util::sync::CancellationToken;
///
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// let db = Database::connect("sqlite://outbox.db?mode=rwc").await?;
/// let relay = Relay::builder(db, LogPublisher::stdout())
///     .config(RelayConfig::default().batch_size(200))
///     .build()?;
/// let stop = CancellationToken::new();
/// let task = tokio::spawn({
///     let stop = stop.clone();
///     async move { relay.run(stop).await }
/// });
/// // ... on shutdown:
/// stop.cancel();
/// let stats = task.await?;
/// println!("published {}", stats.published);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Relay<P> {
    db: DatabaseConnection,
    publisher: P,
    config: RelayConfig,
    name: String,
    last_poll: Arc<AtomicI64>,
    /// The next ordered claim's run per aggregate ([`store::next_share`]).
    share: AtomicU32,
    /// Where the next claim's scan of due rows starts ([`cursor`]).
    cursor: std::sync::Mutex<cursor::Cursor>,
}

/// The result of one claim-publish-write-back cycle.
struct Cycle {
    stats: RelayStats,
    claimed: usize,
    /// The claim started at a cursor, so an empty one does not mean nothing is due.
    partial: bool,
}

/// A batch that was claimed and offered to the publisher, awaiting its write-back.
struct Offered {
    token: String,
    lease_end: DateTime<Utc>,
    started: std::time::Instant,
    events: Vec<OutboxEvent>,
    fates: Vec<Fate>,
    /// Every claimed id with its fate, unreadable rows included.
    by_id: Vec<(Uuid, Fate)>,
}

/// What the claim-and-publish stage produced.
struct Round {
    claimed: usize,
    /// The claim started at the cursor rather than scanning every due row.
    partial: bool,
    /// How long the claim statement took.
    claim_cost: Duration,
    /// The claim searched the whole due backlog (see `store::Claimed::walked`).
    walked: bool,
    next_retry: Option<DateTime<Utc>>,
    offered: Option<Offered>,
}

impl<P: Publisher> Relay<P> {
    /// Starts building a relay over `db` that publishes through `publisher`.
    pub fn builder(db: DatabaseConnection, publisher: P) -> RelayBuilder<P> {
        RelayBuilder {
            db,
            publisher,
            config: RelayConfig::default(),
        }
    }

    /// This relay's name, the prefix of its lease tokens.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The publisher.
    pub fn publisher(&self) -> &P {
        &self.publisher
    }

    /// The configuration.
    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// When the relay last polled the table, successfully or not; `None` before the first poll.
    pub fn last_poll(&self) -> Option<DateTime<Utc>> {
        match self.last_poll.load(AtomicOrdering::Relaxed) {
            0 => None,
            ms => DateTime::from_timestamp_millis(ms),
        }
    }

    /// Health: the outbox's backlog, lag and dead letters against `thresholds`, plus whether
    /// this relay's loop is still polling.
    pub async fn health(
        &self,
        thresholds: &crate::stats::HealthThresholds,
    ) -> crate::stats::Health {
        let mut h = Outbox::new(&self.db).health(thresholds).await;
        h.check_poll(self.last_poll(), thresholds);
        h
    }

    /// Runs until `cancel` is cancelled, then finishes (within
    /// [`shutdown_grace`](RelayConfig::shutdown_grace)) or releases its in-flight batch and
    /// returns what it did.
    ///
    /// Database errors never end the loop: it logs them, backs off and carries on, so the relay
    /// survives a database outage.
    pub async fn run(&self, cancel: CancellationToken) -> RelayStats {
        let wake = Arc::new(Notify::new());
        let listener_stop = cancel.child_token();
        let listener = if self.config.listen_notify {
            wake::spawn_listener(&self.db, wake.clone(), listener_stop.clone())
        } else {
            None
        };
        let mut stats = RelayStats::default();
        let mut db_backoff = Duration::ZERO;
        let mut next_purge = tokio::time::Instant::now();
        let mut next_gauges = tokio::time::Instant::now();
        let mut offered: Option<Offered> = None;

        while !cancel.is_cancelled() {
            if let Some(every) = self.config.metrics_interval
                && tokio::time::Instant::now() >= next_gauges
            {
                match Outbox::new(&self.db).stats().await {
                    Ok(s) => telemetry::record_gauges(&s),
                    Err(e) => {
                        tracing::debug!(relay = %self.name, error = %e, "outbox stats query failed")
                    }
                }
                next_gauges = tokio::time::Instant::now() + every;
            }
            if self.config.retention.is_some() && tokio::time::Instant::now() >= next_purge {
                stats.purged += self.purge().await;
                next_purge = tokio::time::Instant::now() + self.config.purge_interval;
            }
            let mut throttle_until = None;
            // Pipelined: the previous batch's write-back runs while this batch is claimed and
            // published, so the database works on both at once (at most one write-back in
            // flight; a claim never sees the previous batch's rows as free, as its lease holds
            // until the write-back commits).
            let previous = offered.take();
            let overlapped = previous.is_some();
            let mut settle = false;
            let (written, round) = tokio::join!(
                self.finish(previous),
                self.claim_and_publish(&cancel, overlapped)
            );
            stats += written;
            let pause = match round {
                Ok(round) => {
                    db_backoff = Duration::ZERO;
                    offered = round.offered;
                    if round.claimed >= self.config.batch_size as usize {
                        // A full batch: there is probably more, poll again at once.
                        Duration::ZERO
                    } else if overlapped || round.partial {
                        // Short, but made while our previous batch was still leased, or from the
                        // cursor (what is left may lie behind it): write that back, then claim
                        // again at once (a full claim, as a short claim resets the cursor).
                        settle = true;
                        Duration::ZERO
                    } else {
                        // An empty claim that walked a backlog it could not take (every aggregate
                        // busy with other relays): scan again no sooner than 4× its cost, even
                        // when woken, so surplus relays cannot crowd the database. Only then: a
                        // cheap claim that was merely slow on a busy server must not make the
                        // relay deaf to NOTIFY (it cost the latency p99, BENCHMARKS.md).
                        if round.claimed == 0
                            && round.walked
                            && round.claim_cost > Duration::from_millis(2)
                        {
                            throttle_until =
                                Some(tokio::time::Instant::now() + round.claim_cost * 4);
                        }
                        let until_retry = round
                            .next_retry
                            .and_then(|at| (at - now()).to_std().ok())
                            .unwrap_or(self.config.idle_poll_interval);
                        self.config.idle_poll_interval.min(until_retry)
                    }
                }
                Err(e) => {
                    db_backoff =
                        (db_backoff * 2).clamp(Duration::from_millis(100), Duration::from_secs(30));
                    tracing::warn!(relay = %self.name, error = %e, retry_in = ?db_backoff,
                        "outbox relay cycle failed; backing off");
                    db_backoff
                }
            };
            if settle || !pause.is_zero() || throttle_until.is_some() {
                // Never idle on a batch that is not written back: its lease would run down.
                stats += self.finish(offered.take()).await;
            }
            if !pause.is_zero() {
                tokio::select! {
                    () = cancel.cancelled() => {}
                    () = wake.notified() => {}
                    () = tokio::time::sleep(pause) => {}
                }
            }
            if let Some(until) = throttle_until {
                tokio::select! {
                    () = cancel.cancelled() => {}
                    () = tokio::time::sleep_until(until) => {}
                }
            }
        }
        stats += self.finish(offered.take()).await;
        listener_stop.cancel();
        if let Some(listener) = listener {
            let _ = listener.await;
        }
        stats
    }

    /// Claims and processes batches until nothing is due, then returns. Events in backoff are
    /// left for later. Useful in tests, scripts and cron-style jobs.
    pub async fn drain(&self) -> Result<RelayStats> {
        let never = CancellationToken::new();
        let mut stats = RelayStats::default();
        loop {
            let cycle = self.cycle(&never).await?;
            stats += cycle.stats;
            if cycle.claimed == 0 && !cycle.partial {
                return Ok(stats);
            }
        }
    }

    async fn purge(&self) -> u64 {
        let Some(retention) = self.config.retention else {
            return 0;
        };
        let cutoff = now() - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
        match Outbox::new(&self.db)
            .purge_published(cutoff, self.config.purge_batch_size)
            .await
        {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(relay = %self.name, error = %e, "outbox retention purge failed");
                0
            }
        }
    }

    fn cursor(&self) -> std::sync::MutexGuard<'_, cursor::Cursor> {
        // Holds plain data only; a panic elsewhere while holding it cannot leave it torn.
        self.cursor
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One claim → publish → write-back round.
    async fn cycle(&self, cancel: &CancellationToken) -> Result<Cycle> {
        let round = self.claim_and_publish(cancel, false).await?;
        Ok(Cycle {
            stats: self.finish(round.offered).await,
            claimed: round.claimed,
            partial: round.partial,
        })
    }

    /// Claims a batch and offers it to the publisher; the write-back is left to [`Self::finish`],
    /// so [`Self::run`] can overlap it with the next claim.
    async fn claim_and_publish(
        &self,
        cancel: &CancellationToken,
        opportunistic: bool,
    ) -> Result<Round> {
        let started = std::time::Instant::now();
        let token = format!("{}:{}", self.name, Uuid::now_v7().simple());
        let claimed_at = now();
        let lease_end = claimed_at
            + chrono::Duration::from_std(self.config.lease_duration)
                .unwrap_or(chrono::Duration::MAX);
        self.last_poll
            .store(claimed_at.timestamp_millis(), AtomicOrdering::Relaxed);
        // The run this batch is claimed with is what its outcome adjusts: a pipelined claim
        // may have moved `self.share` meanwhile.
        let share = self.share.load(AtomicOrdering::Relaxed);
        // Only PostgreSQL leaves published rows' entries in the due index (MySQL purges them,
        // SQLite deletes them at once), so elsewhere every claim is a full scan.
        let from = match self.db.get_database_backend() {
            sea_orm::DbBackend::Postgres => self.cursor().start(started),
            _ => None,
        };
        let store::Claimed { rows, walked } = store::claim(
            &self.db,
            &Claim {
                token: &token,
                now: claimed_at,
                lease_end,
                limit: self.config.batch_size,
                ordering: self.config.ordering,
                policy: self.config.dead_letter_policy,
                opportunistic,
                share,
                from,
            },
        )
        .instrument(tracing::debug_span!("outbox.claim", relay = %self.name))
        .await?;
        let claim_cost = started.elapsed();
        let claimed = rows.len();
        let mut corrupt = Vec::new();
        let mut events = Vec::with_capacity(claimed);
        for row in rows {
            match row {
                Ok(e) => events.push(e),
                // A row this library cannot read would fail forever: dead-letter it now.
                Err((Some(id), reason)) => corrupt.push((
                    id,
                    Fate::Dead {
                        error: Error::CorruptRow { id, reason }.to_string(),
                    },
                )),
                // Without its id there is nothing to write back; its lease runs out.
                Err((None, reason)) => {
                    tracing::error!(relay = %self.name, %reason, "outbox row without a readable id")
                }
            }
        }
        self.cursor().claimed(
            started,
            from,
            self.config.ordering,
            &events,
            self.config.batch_size as usize,
        );
        if claimed == 0 {
            return Ok(Round {
                claimed,
                partial: from.is_some(),
                claim_cost,
                walked,
                next_retry: None,
                offered: None,
            });
        }
        let publish_span =
            tracing::debug_span!("outbox.publish", relay = %self.name, events = events.len());
        let fates = match self.config.ordering {
            Ordering::Unordered => {
                self.deliver_all(&mut events, cancel)
                    .instrument(publish_span)
                    .await
            }
            Ordering::PerAggregate => {
                self.deliver_in_order(&mut events, share, cancel)
                    .instrument(publish_span)
                    .await
            }
        };

        let next_retry = fates
            .iter()
            .filter_map(|f| match f {
                Fate::Retry { at, .. } => Some(*at),
                _ => None,
            })
            .min();
        let by_id: Vec<(Uuid, Fate)> = events
            .iter()
            .map(|e| e.id)
            .zip(fates.iter().cloned())
            .chain(corrupt)
            .collect();
        Ok(Round {
            claimed,
            partial: from.is_some(),
            claim_cost,
            walked,
            next_retry,
            offered: Some(Offered {
                token,
                lease_end,
                started,
                events,
                fates,
                by_id,
            }),
        })
    }

    /// Writes an offered batch's fates back and accounts for them; nothing without a batch.
    async fn finish(&self, offered: Option<Offered>) -> RelayStats {
        let Some(o) = offered else {
            return RelayStats::default();
        };
        let mut stats = RelayStats {
            batches: 1,
            ..RelayStats::default()
        };
        let written = self
            .write_back(&o.token, &o.by_id, o.lease_end)
            .instrument(
                tracing::debug_span!("outbox.write_back", relay = %self.name, events = o.by_id.len()),
            )
            .await;
        if let Some(w) = &written {
            stats.published = w.published;
            stats.retried = w.retried;
            stats.dead_lettered = w.dead;
            stats.released = w.released;
            stats.lost_leases = w.expected - (w.published + w.retried + w.dead + w.released);
            if stats.lost_leases > 0 {
                tracing::warn!(relay = %self.name, lost = stats.lost_leases,
                    "outbox lease expired before write-back; another relay owns those events");
            }
        }
        telemetry::record_batch(
            self.publisher.name(),
            &o.events,
            &o.fates,
            written.as_ref(),
            o.started.elapsed(),
        );
        stats
    }

    /// Unordered: the whole batch in one publisher call. Fates align with `events`.
    async fn deliver_all(
        &self,
        events: &mut [OutboxEvent],
        cancel: &CancellationToken,
    ) -> Vec<Fate> {
        events.sort_by_key(|e| (e.occurred_at, e.id));
        let outcomes = self.publish(events, cancel).await;
        let done = now();
        match outcomes {
            Some(outcomes) => events
                .iter()
                .zip(outcomes)
                .map(|(e, o)| self.fate(e, o, done))
                .collect(),
            None => vec![Fate::Release { at: done }; events.len()],
        }
    }

    /// Per-aggregate order: "waves". Wave k holds the k-th event of every aggregate in the batch,
    /// so one call never carries two events of one aggregate, and an aggregate's next event is
    /// only sent once the previous one was acknowledged. An aggregate whose event must be retried
    /// (or, under [`DeadLetterPolicy::Hold`], was dead-lettered) stops; its remaining events are
    /// released to wait for it. Other aggregates carry on.
    ///
    /// Reorders `events` (by wave); the fates align with the new order. Also sets the next
    /// claim's run per aggregate from this batch's shape, as claimed with run `claimed_with`.
    async fn deliver_in_order(
        &self,
        events: &mut Vec<OutboxEvent>,
        claimed_with: u32,
        cancel: &CancellationToken,
    ) -> Vec<Fate> {
        // Rank each event within its aggregate, then sort by rank so every wave is contiguous.
        events.sort_by(|a, b| {
            (&a.aggregate_type, &a.aggregate_id, a.occurred_at, a.id).cmp(&(
                &b.aggregate_type,
                &b.aggregate_id,
                b.occurred_at,
                b.id,
            ))
        });
        let mut chain_of = Vec::with_capacity(events.len());
        let mut ranked = Vec::with_capacity(events.len());
        let (mut chain, mut rank) = (0usize, 0usize);
        for (i, e) in events.iter().enumerate() {
            if i > 0 {
                let p = &events[i - 1];
                if p.aggregate_type == e.aggregate_type && p.aggregate_id == e.aggregate_id {
                    rank += 1;
                } else {
                    chain += 1;
                    rank = 0;
                }
            }
            ranked.push((rank, i));
            chain_of.push(chain);
        }
        ranked.sort_unstable();
        let longest = ranked.last().map_or(0, |&(r, _)| r + 1);
        let share = store::next_share(
            claimed_with,
            self.config.events_per_aggregate,
            self.config.batch_size,
            events.len(),
            chain + 1,
            longest,
        );
        self.share.store(share, AtomicOrdering::Relaxed);
        let chain_of: Vec<usize> = ranked.iter().map(|&(_, i)| chain_of[i]).collect();
        let ranks: Vec<usize> = ranked.iter().map(|(r, _)| *r).collect();
        let mut slots: Vec<Option<OutboxEvent>> =
            std::mem::take(events).into_iter().map(Some).collect();
        *events = ranked
            .iter()
            .filter_map(|&(_, i)| slots[i].take())
            .collect();

        let mut fates: Vec<Option<Fate>> = vec![None; events.len()];
        // Per chain: None while going; Some(at) once stopped, with when its rest may go again.
        let mut stopped: Vec<Option<DateTime<Utc>>> = vec![None; chain + 1];
        let mut start = 0;
        while start < events.len() {
            let end = start
                + ranks[start..]
                    .iter()
                    .take_while(|r| **r == ranks[start])
                    .count();
            let live: Vec<usize> = (start..end)
                .filter(|&i| stopped[chain_of[i]].is_none())
                .collect();
            for i in start..end {
                if let Some(at) = stopped[chain_of[i]] {
                    fates[i] = Some(Fate::Release { at });
                }
            }
            if !live.is_empty() {
                let outcomes = if cancel.is_cancelled() {
                    None
                } else if live.len() == end - start {
                    self.publish(&events[start..end], cancel).await
                } else {
                    let subset: Vec<OutboxEvent> =
                        live.iter().map(|&i| events[i].clone()).collect();
                    self.publish(&subset, cancel).await
                };
                let done = now();
                match outcomes {
                    Some(outcomes) => {
                        for (&i, o) in live.iter().zip(outcomes) {
                            let fate = self.fate(&events[i], o, done);
                            let stop = match &fate {
                                Fate::Retry { at, .. } => Some(*at),
                                Fate::Dead { .. }
                                    if self.config.dead_letter_policy == DeadLetterPolicy::Hold =>
                                {
                                    Some(done)
                                }
                                _ => None,
                            };
                            if stop.is_some() {
                                stopped[chain_of[i]] = stop;
                            }
                            fates[i] = Some(fate);
                        }
                    }
                    None => {
                        for &i in &live {
                            stopped[chain_of[i]] = Some(done);
                            fates[i] = Some(Fate::Release { at: done });
                        }
                    }
                }
            }
            start = end;
        }
        let done = now();
        fates
            .into_iter()
            .map(|f| f.unwrap_or(Fate::Release { at: done }))
            .collect()
    }

    /// One publisher call, bounded by `publish_timeout`. `None` when the relay is stopping and
    /// the call did not finish within `shutdown_grace`: the events' fate is unknown.
    async fn publish(
        &self,
        events: &[OutboxEvent],
        cancel: &CancellationToken,
    ) -> Option<Vec<PublishOutcome>> {
        let call =
            tokio::time::timeout(self.config.publish_timeout, self.publisher.publish(events));
        tokio::pin!(call);
        let result = tokio::select! {
            r = &mut call => r,
            () = cancel.cancelled() => {
                tokio::time::timeout(self.config.shutdown_grace, call).await.ok()?
            }
        };
        let retry_all = |msg: String| vec![PublishOutcome::Retry(msg); events.len()];
        Some(match result {
            Ok(Ok(outcomes)) if outcomes.len() == events.len() => outcomes,
            Ok(Ok(outcomes)) => retry_all(format!(
                "publisher `{}` returned {} outcomes for {} events",
                self.publisher.name(),
                outcomes.len(),
                events.len()
            )),
            Ok(Err(e)) => retry_all(e.to_string()),
            Err(_) => retry_all(format!(
                "publish timed out after {:?}",
                self.config.publish_timeout
            )),
        })
    }

    fn fate(&self, event: &OutboxEvent, outcome: PublishOutcome, at: DateTime<Utc>) -> Fate {
        match outcome {
            PublishOutcome::Delivered => Fate::Published,
            PublishOutcome::Reject(error) => Fate::Dead {
                error: truncate_error(&error),
            },
            PublishOutcome::Retry(error) => {
                let attempt = event.attempts.saturating_add(1);
                if attempt >= self.config.max_attempts {
                    Fate::Dead {
                        error: truncate_error(&format!(
                            "{error} (gave up after {attempt} attempts)"
                        )),
                    }
                } else {
                    let delay = self.config.backoff.delay(attempt);
                    Fate::Retry {
                        error: truncate_error(&error),
                        at: at + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX),
                    }
                }
            }
        }
    }

    /// Writes the batch's fates back, retrying database errors while the lease lasts. Giving up
    /// is safe: the events stay leased and are retried after the lease ends.
    async fn write_back(
        &self,
        token: &str,
        fates: &[(Uuid, Fate)],
        lease_end: DateTime<Utc>,
    ) -> Option<store::WriteBack> {
        let mut delay = Duration::from_millis(50);
        loop {
            match store::write_back(&self.db, token, now(), fates).await {
                Ok(w) => return Some(w),
                Err(e) => {
                    let retry_at = now() + chrono::Duration::from_std(delay).unwrap_or_default();
                    if retry_at >= lease_end {
                        tracing::error!(relay = %self.name, error = %e,
                            "outbox write-back failed until the lease ended; the batch will be redelivered");
                        return None;
                    }
                    tracing::warn!(relay = %self.name, error = %e, "outbox write-back failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}
