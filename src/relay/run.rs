//! The relay's lifecycle: the polling loop with its pipelining, wake-ups, throttling and
//! database backoff; `drain`; and the periodic jobs beside it (backlog gauges, retention).

use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::batch::Round;
use super::{Relay, RelayStats, lock, wake};
use crate::error::Result;
use crate::event::now;
use crate::publisher::Publisher;
use crate::repository::Outbox;
use crate::{store, telemetry};

/// The state of a relay's heartbeat.
pub(super) struct Beat {
    started_at: chrono::DateTime<chrono::Utc>,
    next: Instant,
    /// The breaker state at the last write; `None` before the first.
    state: Option<crate::stats::BreakerState>,
    /// A write has succeeded, so there is a row to remove at the end.
    wrote: bool,
}

/// The result of one claim-publish-write-back cycle.
pub(super) struct Cycle {
    pub(super) stats: RelayStats,
    pub(super) claimed: usize,
    /// The claim started at a cursor, so an empty one does not mean nothing is due.
    pub(super) partial: bool,
    /// How many events the claim asked for (a full claim suggests there is more).
    pub(super) limit: u32,
    /// The earliest retry among the batch's failures.
    pub(super) next_retry: Option<chrono::DateTime<chrono::Utc>>,
}

/// What the loop does after a round.
struct Next {
    /// How long to wait for a wake-up before claiming again.
    pause: Duration,
    /// Write back the batch in flight before claiming again.
    settle: bool,
    /// Sleep until then, deaf to wake-ups (see [`Relay::after`]).
    throttle_until: Option<Instant>,
}

impl Beat {
    /// A heartbeat row was written, so there is one to remove at the end.
    pub(super) fn wrote(&self) -> bool {
        self.wrote
    }

    pub(super) fn new() -> Self {
        Self {
            started_at: now(),
            next: Instant::now(),
            state: None,
            wrote: false,
        }
    }
}

impl<P: Publisher> Relay<P> {
    /// One claim → publish → write-back round.
    pub(super) async fn cycle(&self, cancel: &CancellationToken) -> Result<Cycle> {
        let round = self.claim_and_publish(cancel, false, None).await?;
        Ok(Cycle {
            stats: self.finish(round.offered).await,
            claimed: round.claimed,
            partial: round.partial,
            limit: round.limit,
            next_retry: round.next_retry,
        })
    }

    /// Runs until `cancel` is cancelled, then finishes (within
    /// [`shutdown_grace`](super::RelayConfig::shutdown_grace)) or releases its in-flight batch
    /// and returns what it did.
    ///
    /// Database errors never end the loop: it logs them, backs off and carries on, so the relay
    /// survives a database outage.
    pub async fn run(&self, cancel: CancellationToken) -> RelayStats {
        let wake = self.wake.clone();
        let listener_stop = cancel.child_token();
        let listener = if self.config.listen_notify {
            wake::spawn_listener(&self.db, wake.clone(), listener_stop.clone())
        } else {
            None
        };
        let owned = self.config.owns_partitions();
        // Owned partitions: the heartbeat and the ownership rounds run beside the loop, never
        // starved by a slow publish; the loop only reads what they decided.
        let side_stop = CancellationToken::new();
        let mut side_beat = Beat::new();
        if owned {
            self.first_round(&mut side_beat).await;
        }
        let side = async {
            if owned {
                self.keep_partitions(&side_stop, &mut side_beat).await;
            }
        };
        let mut beat = Beat::new();
        let main = async {
            let stats = self.poll_loop(&cancel, &wake, &mut beat, owned).await;
            side_stop.cancel();
            stats
        };
        let lanes = async {
            if owned {
                self.run_lanes(&cancel).await
            } else {
                RelayStats::default()
            }
        };
        let (mut stats, (), in_lanes) = tokio::join!(main, side, lanes);
        stats += in_lanes;
        if owned {
            self.release_all().await;
        }
        if (beat.wrote || side_beat.wrote)
            && let Err(e) = store::forget(&self.db, &self.name).await
        {
            tracing::debug!(relay = %self.name, error = %e, "outbox relay row not removed");
        }
        listener_stop.cancel();
        if let Some(listener) = listener {
            let _ = listener.await;
        }
        stats
    }

    /// The claim loop of [`Self::run`], until `cancel`; its batch in flight written back.
    async fn poll_loop(
        &self,
        cancel: &CancellationToken,
        wake: &Notify,
        beat: &mut Beat,
        owned: bool,
    ) -> RelayStats {
        let mut stats = RelayStats::default();
        let mut db_backoff = Duration::ZERO;
        let mut next_purge = Instant::now();
        let mut next_gauges = Instant::now();
        let mut offered: Option<super::batch::Offered> = None;

        while !cancel.is_cancelled() {
            if let Some(every) = self.config.metrics_interval
                && Instant::now() >= next_gauges
            {
                self.refresh_gauges().await;
                next_gauges = Instant::now() + every;
            }
            if owned {
                if !lock(&self.ownership).releasing().is_empty() {
                    // Released partitions must have nothing of ours in flight.
                    stats += self.finish(offered.take()).await;
                    self.release_surplus().await;
                }
            } else {
                self.heartbeat(beat, self.config.heartbeat_interval).await;
            }
            if self.config.retention.is_some() && Instant::now() >= next_purge {
                stats.purged += self.purge().await;
                next_purge = Instant::now() + self.config.purge_interval;
            }
            // Pipelined: the previous batch's write-back runs while this batch is claimed and
            // published, so the database works on both at once (at most one write-back in
            // flight; a claim never sees the previous batch's rows as free, as its lease holds
            // until the write-back commits).
            let previous = offered.take();
            let overlapped = previous.is_some();
            let in_flight = previous.as_ref().and_then(super::batch::Offered::last_key);
            let (written, round) = tokio::join!(
                self.finish(previous),
                self.claim_and_publish(cancel, overlapped, in_flight)
            );
            stats += written;
            let next = match round {
                Ok(mut round) => {
                    if !db_backoff.is_zero() {
                        // Said once, so an operator reading the warnings knows it is over.
                        tracing::info!(relay = %self.name, "outbox relay cycle succeeded again; resuming");
                    }
                    db_backoff = Duration::ZERO;
                    offered = round.offered.take();
                    self.after(&round, overlapped)
                }
                Err(e) => {
                    db_backoff =
                        (db_backoff * 2).clamp(Duration::from_millis(100), Duration::from_secs(30));
                    tracing::warn!(relay = %self.name, error = %e, retry_in = ?db_backoff,
                        "outbox relay cycle failed; backing off");
                    Next {
                        pause: db_backoff,
                        settle: false,
                        throttle_until: None,
                    }
                }
            };
            if next.settle || !next.pause.is_zero() || next.throttle_until.is_some() {
                // Never idle on a batch that is not written back: its lease would run down.
                stats += self.finish(offered.take()).await;
            }
            if !next.pause.is_zero() {
                tokio::select! {
                    () = cancel.cancelled() => {}
                    () = wake.notified() => {}
                    () = tokio::time::sleep(next.pause) => {}
                }
            }
            if let Some(until) = next.throttle_until {
                tokio::select! {
                    () = cancel.cancelled() => {}
                    () = tokio::time::sleep_until(until) => {}
                }
            }
        }
        stats += self.finish(offered.take()).await;
        stats
    }

    /// What follows a successful round, `overlapped` with the previous batch's write-back.
    fn after(&self, round: &Round, overlapped: bool) -> Next {
        let go = |settle| Next {
            pause: Duration::ZERO,
            settle,
            throttle_until: None,
        };
        if let Some(until) = round.paused_until {
            // The publisher is unavailable: wait for the breaker's probe, deaf to wake-ups
            // (more events only mean more that cannot be sent).
            return Next {
                pause: Duration::ZERO,
                settle: true,
                throttle_until: Some(until),
            };
        }
        if round.claimed >= round.limit as usize {
            // A full batch (or a probe that was answered): there is probably more, poll again
            // at once.
            return go(false);
        }
        if overlapped || round.partial {
            // Short, but made while our previous batch was still leased, or from the cursor
            // (what is left may lie behind it): write that back, then claim again at once (a
            // full claim, as a short claim resets the cursor).
            return go(true);
        }
        // An empty claim that walked a backlog it could not take (every aggregate busy with
        // other relays): scan again no sooner than 4× its cost, even when woken, so surplus
        // relays cannot crowd the database. Only then: a cheap claim that was merely slow on a
        // busy server must not make the relay deaf to NOTIFY (it cost the latency p99,
        // BENCHMARKS.md).
        let throttle_until =
            (round.claimed == 0 && round.walked && round.claim_cost > Duration::from_millis(2))
                .then(|| Instant::now() + round.claim_cost * 4);
        let until_retry = round
            .next_retry
            .and_then(|at| (at - self.now()).to_std().ok())
            .unwrap_or(self.config.idle_poll_interval);
        Next {
            pause: self.config.idle_poll_interval.min(until_retry),
            settle: false,
            throttle_until,
        }
    }

    /// Claims and processes batches until nothing is due, then returns. Events in backoff are
    /// left for later. Useful in tests, scripts and cron-style jobs.
    ///
    /// If the publisher is unavailable, the batch goes back unattempted and this returns
    /// [`Error::PublisherUnavailable`](crate::Error::PublisherUnavailable).
    ///
    /// # Errors
    /// [`Error::PublisherUnavailable`](crate::Error::PublisherUnavailable) while the broker is down (the batch is handed back with
    /// no attempt spent); database errors.
    pub async fn drain(&self) -> Result<RelayStats> {
        let result = self.drain_owned().await;
        if self.config.owns_partitions() {
            self.release_all().await;
            // The heartbeat row was only the ownership's lease.
            if let Err(e) = store::forget(&self.db, &self.name).await {
                tracing::debug!(relay = %self.name, error = %e, "outbox relay row not removed");
            }
        }
        result
    }

    async fn drain_owned(&self) -> Result<RelayStats> {
        let never = CancellationToken::new();
        let mut stats = RelayStats::default();
        let owned = self.config.owns_partitions();
        let margin = self.config.usable_partition_lease() / 2;
        if owned {
            self.adopt_all_strays().await?;
        }
        let mut beat = Beat::new();
        loop {
            if owned && lock(&self.ownership).ends_within(Instant::now(), margin) {
                self.ownership_round(&mut beat, true).await;
            }
            let cycle = self.cycle(&never).await?;
            stats += cycle.stats;
            let breaker = self.breaker();
            if breaker.unavailable_since.is_some() {
                return Err(crate::Error::PublisherUnavailable {
                    publisher: self.publisher.name().to_owned(),
                    reason: breaker.last_error.unwrap_or_default(),
                });
            }
            if cycle.claimed == 0 && !cycle.partial {
                return Ok(stats);
            }
        }
    }

    /// Refreshes this relay's `outbox_relays` row when it is due or the breaker has changed.
    pub(super) async fn heartbeat(&self, beat: &mut Beat, every: Option<Duration>) {
        let Some(every) = every else {
            return;
        };
        let breaker = self.breaker();
        if Instant::now() < beat.next && beat.state == Some(breaker.state) {
            return;
        }
        // Once per interval or change, whether or not the write succeeds: a missing table
        // (migrations not run) must not turn into a statement per loop.
        beat.next = Instant::now() + every;
        self.beat_now(beat).await;
    }

    /// Writes this relay's `outbox_relays` row now; returns whether it was written. Under owned
    /// partitions the row carries the run's owner token, and it is the ownership's lease.
    pub(super) async fn beat_now(&self, beat: &mut Beat) -> bool {
        let breaker = self.breaker();
        beat.state = Some(breaker.state);
        let at = now();
        let claims = self
            .config
            .owns_partitions()
            .then(|| lock(&self.ownership).token.clone());
        let row = store::Heartbeat {
            name: self.name.clone(),
            publisher: self.publisher.name().to_owned(),
            started_at: beat.started_at,
            heartbeat_at: at,
            breaker: breaker.state.as_str().to_owned(),
            unavailable_since: breaker.unavailable_since,
            last_error: breaker.last_error,
            claims,
        };
        // Rows of relays that died without removing theirs age out after a day.
        let forget_before = at - chrono::Duration::days(1);
        match store::beat(&self.db, &row, forget_before).await {
            Ok(()) => {
                beat.wrote = true;
                true
            }
            Err(e) => {
                tracing::debug!(relay = %self.name, error = %e, "outbox relay heartbeat failed");
                false
            }
        }
    }

    async fn refresh_gauges(&self) {
        match Outbox::new(&self.db).stats().await {
            Ok(s) => {
                telemetry::metrics::record_gauges(&s);
                // The dashboard's backlog chart; samples older than a day age out.
                let forget_before = s.at - chrono::Duration::days(1);
                if let Err(e) =
                    store::record_sample(&self.db, s.at, s.pending(), s.failed, forget_before).await
                {
                    tracing::debug!(relay = %self.name, error = %e, "outbox backlog sample failed");
                }
            }
            Err(e) => tracing::debug!(relay = %self.name, error = %e, "outbox stats query failed"),
        }
    }

    pub(super) async fn purge(&self) -> u64 {
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
}
