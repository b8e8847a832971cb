//! One batch's life up to its write-back: claimed (under a lease, or from owned partitions)
//! and offered to the publisher; [`write_back`](super::write_back) does the rest.

use std::sync::atomic::Ordering as AtomicOrdering;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use super::breaker::Permit;
use super::config::{DeadLetterPolicy, Ordering};
use super::{Relay, lock};
use crate::error::{Error, Result};
use crate::event::OutboxEvent;
use crate::publisher::Publisher;
use crate::store::{self, Claim, Fate};

/// A batch that was claimed and offered to the publisher, awaiting its write-back.
pub(super) struct Offered {
    /// The lease token, or under owned partitions the owner token.
    pub(super) token: String,
    /// Owned partitions: the highest epoch held at the claim (the write-back's fence).
    pub(super) epoch: Option<i64>,
    /// Owned partitions: the generation of what was held at the claim (0 for leases).
    pub(super) generation: u64,
    pub(super) lease_end: DateTime<Utc>,
    pub(super) started: Instant,
    pub(super) events: Vec<OutboxEvent>,
    pub(super) fates: Vec<Fate>,
    /// Every claimed id with its fate, unreadable rows included.
    pub(super) by_id: Vec<(Uuid, Fate)>,
    /// The claim loop's batches count from 1, in claim order; 0 for a lane's.
    pub(super) seq: u64,
}

/// What the claim-and-publish stage produced.
pub(super) struct Round {
    /// How many events the claim asked for: a batch, or a probe's few.
    pub(super) limit: u32,
    pub(super) claimed: usize,
    /// The claim started at the cursor rather than scanning every due row.
    pub(super) partial: bool,
    /// How long the claim statement took.
    pub(super) claim_cost: Duration,
    /// The claim searched the whole due backlog (see `store::Claimed::walked`).
    pub(super) walked: bool,
    pub(super) next_retry: Option<DateTime<Utc>>,
    pub(super) offered: Option<Offered>,
    /// The breaker is open: nothing was claimed, and nothing may be before then.
    pub(super) paused_until: Option<tokio::time::Instant>,
}

/// Where the batch being written back ends, for the claim made meanwhile.
#[derive(Clone, Copy, Debug)]
pub(super) struct InFlight {
    key: store::DueKey,
    generation: u64,
}

/// What a claim got, either way.
struct Claimed {
    token: String,
    epoch: Option<i64>,
    generation: u64,
    lease_end: DateTime<Utc>,
    /// Where its scan started (a cursor), if not at the oldest due row.
    from: Option<store::DueKey>,
    rows: Vec<store::ClaimedRow>,
    walked: bool,
}

impl Round {
    /// Nothing claimed of `limit`.
    fn empty(limit: u32) -> Self {
        Self {
            limit,
            claimed: 0,
            partial: false,
            claim_cost: Duration::ZERO,
            walked: false,
            next_retry: None,
            offered: None,
            paused_until: None,
        }
    }
}

impl Offered {
    /// A lane's batch ([`lanes`](super::lanes)), under owned partitions.
    pub(super) fn new(
        token: String,
        epoch: i64,
        generation: u64,
        lease_end: DateTime<Utc>,
        started: Instant,
        events: Vec<OutboxEvent>,
        fates: Vec<Fate>,
    ) -> Self {
        let by_id = events
            .iter()
            .map(|e| e.id)
            .zip(fates.iter().cloned())
            .collect();
        Self {
            token,
            epoch: Some(epoch),
            generation,
            lease_end,
            started,
            events,
            fates,
            by_id,
            seq: 0,
        }
    }

    /// The batch's last key in due order, and the generation it was claimed under: a claim
    /// made while it is written back starts after it (owned partitions take no lease, so
    /// nothing else keeps the claim off its rows).
    pub(super) fn last_key(&self) -> Option<InFlight> {
        let key = self
            .events
            .iter()
            .map(|e| (e.next_attempt_at, e.id))
            .max()?;
        Some(InFlight {
            key,
            generation: self.generation,
        })
    }
}

impl<P: Publisher> Relay<P> {
    /// Claims a batch and offers it to the publisher; the write-back is left to [`Self::finish`],
    /// so [`Self::run`] can overlap it with the next claim, whose scan then starts after
    /// `in_flight`, the batch still being written back.
    pub(super) async fn claim_and_publish(
        &self,
        cancel: &CancellationToken,
        opportunistic: bool,
        in_flight: Option<InFlight>,
    ) -> Result<Round> {
        let started = Instant::now();
        let claimed_at = self.now();
        // A relay waiting out an outage is still alive: it counts as polling.
        self.last_poll
            .store(claimed_at.timestamp_millis(), AtomicOrdering::Relaxed);
        let limit = match lock(&self.breaker).permit(
            &self.config.breaker,
            self.config.batch_size,
            self.publisher.name(),
        ) {
            Permit::Claim(limit) => limit,
            Permit::Wait(until) => {
                let mut round = Round::empty(0);
                round.paused_until = Some(until);
                return Ok(round);
            }
        };
        // The run this batch is claimed with is what its outcome adjusts: a pipelined claim
        // may have moved `self.share` meanwhile.
        let share = self.share.load(AtomicOrdering::Relaxed);
        let owned = self.config.owns_partitions();
        let claim = if owned {
            match self
                .claim_owned(claimed_at, started, limit, in_flight)
                .await?
            {
                Some(c) => c,
                None => return Ok(Round::empty(limit)),
            }
        } else {
            self.claim_leased(claimed_at, started, limit, opportunistic, share)
                .await?
        };
        let claim_cost = started.elapsed();
        let claimed = claim.rows.len();
        let mut corrupt = Vec::new();
        let mut events = Vec::with_capacity(claimed);
        for row in claim.rows {
            match row {
                Ok(e) => events.push(e),
                // A row this library cannot read would fail forever: dead-letter it now.
                Err((Some(id), reason)) => corrupt.push((
                    id,
                    Fate::Dead {
                        error: Error::CorruptRow {
                            id,
                            reason,
                            source: None,
                        }
                        .to_string(),
                    },
                )),
                // Without its id there is nothing to write back; its lease runs out.
                Err((None, reason)) => {
                    tracing::error!(relay = %self.name, %reason, "outbox row without a readable id")
                }
            }
        }
        // Owned partitions scan on like an unordered claim: everything before the batch's last
        // key was taken, held back or not due.
        let cursor_order = if owned {
            Ordering::Unordered
        } else {
            self.config.ordering
        };
        self.cursor().claimed(
            (started, claimed_at),
            claim.generation,
            claim.from,
            cursor_order,
            &events,
            limit as usize,
        );
        let mut round = Round {
            limit,
            claimed,
            partial: claim.from.is_some(),
            claim_cost,
            walked: claim.walked,
            next_retry: None,
            offered: None,
            paused_until: None,
        };
        if claimed == 0 {
            return Ok(round);
        }
        let seq = self.batch_seq.fetch_add(1, AtomicOrdering::AcqRel) + 1;
        let publish_span =
            tracing::debug_span!("outbox.publish", relay = %self.name, events = events.len());
        let (events, fates) = match self.config.ordering {
            Ordering::Unordered => {
                let fates = self
                    .deliver_all(&mut events, cancel)
                    .instrument(publish_span)
                    .await;
                (events, fates)
            }
            Ordering::PerAggregate if owned => {
                self.deliver_owned(events, share, seq, cancel)
                    .instrument(publish_span)
                    .await
            }
            Ordering::PerAggregate => {
                let fates = self
                    .deliver_in_order(&mut events, share, cancel)
                    .instrument(publish_span)
                    .await;
                (events, fates)
            }
        };
        round.next_retry = fates
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
        round.offered = Some(Offered {
            token: claim.token,
            epoch: claim.epoch,
            generation: claim.generation,
            lease_end: claim.lease_end,
            started,
            events,
            fates,
            by_id,
            seq,
        });
        Ok(round)
    }

    /// Owned partitions: reads this relay's due events; `None` when it holds nothing it may
    /// read now.
    async fn claim_owned(
        &self,
        claimed_at: DateTime<Utc>,
        started: Instant,
        limit: u32,
        in_flight: Option<InFlight>,
    ) -> Result<Option<Claimed>> {
        let (snapshot, token) = {
            let o = lock(&self.ownership);
            (o.snapshot(tokio::time::Instant::now()), o.token.clone())
        };
        let Some(snapshot) = snapshot else {
            return Ok(None);
        };
        // After the batch in flight, whatever the backend (no lease keeps this claim off its
        // rows), or where PostgreSQL's dead index entries make a cursor worth it; either way
        // only up to the horizon (the cursor module says why).
        let horizon = self.cursor().horizon(started, snapshot.generation);
        let from = match in_flight {
            Some(f) if f.generation == snapshot.generation && horizon.is_some() => Some(f.key),
            // Partitions taken since that batch was claimed may have due rows anywhere before
            // its key, or the last full scan is too old to start past anything; a scan from
            // the start would read the batch again: claim once it is written back.
            Some(_) => return Ok(None),
            None => match self.db.get_database_backend() {
                sea_orm::DbBackend::Postgres => self.cursor().start(started, snapshot.generation),
                _ => None,
            },
        };
        let horizon = from.and(horizon);
        let skip = lock(&self.lanes).skipped();
        let mut rows = store::partitions::claim(
            &self.db,
            &store::partitions::OwnedClaim {
                owner: &token,
                // A new event is due no later than it was created, so the scan ends at the
                // horizon rather than read rows the cut below drops (a retry due since then
                // waits for the next full scan).
                now: horizon.map_or(claimed_at, |h| h.min(claimed_at)),
                limit,
                partitions: snapshot.partitions.as_deref(),
                skip: &skip,
                after: from,
            },
        )
        .instrument(tracing::debug_span!("outbox.claim", relay = %self.name))
        .await?;
        if let Some(horizon) = horizon {
            // An unreadable row has no creation time to go by: it waits for a full scan too.
            let past = rows
                .iter()
                .position(|r| !r.as_ref().is_ok_and(|e| e.created_at < horizon));
            if let Some(past) = past {
                rows.truncate(past);
            }
        }
        let lease = chrono::Duration::from_std(self.config.partition_lease)
            .unwrap_or(chrono::Duration::MAX);
        Ok(Some(Claimed {
            token,
            epoch: Some(snapshot.epoch),
            generation: snapshot.generation,
            lease_end: claimed_at + lease,
            from,
            rows,
            walked: false,
        }))
    }

    /// Leases: claims due events under a new lease token.
    async fn claim_leased(
        &self,
        claimed_at: DateTime<Utc>,
        started: Instant,
        limit: u32,
        opportunistic: bool,
        share: u32,
    ) -> Result<Claimed> {
        let token = format!("{}:{}", self.name, Uuid::now_v7().simple());
        let lease_end = claimed_at
            + chrono::Duration::from_std(self.config.lease_duration)
                .unwrap_or(chrono::Duration::MAX);
        // Only PostgreSQL leaves published rows' entries in the due index (MySQL purges them,
        // SQLite deletes them at once), so elsewhere every claim is a full scan.
        let from = match self.db.get_database_backend() {
            sea_orm::DbBackend::Postgres => self.cursor().start(started, 0),
            _ => None,
        };
        let store::Claimed { rows, walked } = store::claim(
            &self.db,
            &Claim {
                token: &token,
                now: claimed_at,
                lease_end,
                limit,
                ordered: self.config.ordering == Ordering::PerAggregate,
                hold_dead_letters: self.config.dead_letter_policy == DeadLetterPolicy::Hold,
                opportunistic,
                share,
                from,
            },
        )
        .instrument(tracing::debug_span!("outbox.claim", relay = %self.name))
        .await?;
        Ok(Claimed {
            token,
            epoch: None,
            generation: 0,
            lease_end,
            from,
            rows,
            walked,
        })
    }

    /// Owned partitions: holds back the events of aggregates waiting on an earlier one, delivers
    /// the rest in per-aggregate waves, and learns from the fates which aggregates now wait.
    async fn deliver_owned(
        &self,
        mut events: Vec<OutboxEvent>,
        share: u32,
        seq: u64,
        cancel: &CancellationToken,
    ) -> (Vec<OutboxEvent>, Vec<Fate>) {
        let recheck = chrono::Duration::from_std(self.config.partition_lease)
            .unwrap_or(chrono::Duration::MAX);
        // A hot aggregate's chain goes to a lane of its own rather than hold the batch.
        self.open_lanes(&mut events, seq);
        let (mut go, held) = lock(&self.holds).split(events, self.now(), recheck);
        let mut fates = if go.is_empty() {
            Vec::new()
        } else {
            self.deliver_in_order(&mut go, share, cancel).await
        };
        for (e, fate) in held {
            go.push(e);
            fates.push(fate);
        }
        // Held events count too: written back behind their blocker, they hold what follows.
        let hold_dead = self.config.dead_letter_policy == DeadLetterPolicy::Hold;
        lock(&self.holds).record(&go, &fates, hold_dead);
        (go, fates)
    }
}
