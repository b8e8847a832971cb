//! Lanes: a hot aggregate's events delivered beside the claim loop, so it never holds up the
//! others (owned partitions only).
//!
//! Per-aggregate order sends an aggregate's events one publisher call after another. An
//! aggregate written faster than one broker round trip per event would otherwise fill every
//! batch with a long chain of waves ([`delivery`](super::delivery)), and every other aggregate
//! of every partition would wait for it: one hot key collapsing the relay to parallelism 1.
//!
//! So a chain longer than [`events_per_aggregate`](super::RelayConfig::events_per_aggregate)
//! in a batch opens a *lane* for its aggregate instead of being sent:
//!
//! * the batch leaves that aggregate's events untouched (still pending, in their place), and
//!   the claim loop's claims stop reading the aggregate;
//! * once every batch claimed before is written back, the lane reads the aggregate itself,
//!   oldest first, [`LANE_READ`] at a time, sends them one call each, and writes them back
//!   under the same ownership fence as a batch;
//! * an event that must be retried pauses the lane until it is due (the holds know it, as for
//!   a batch), so the aggregate's backlog is not handed back claim after claim;
//! * it closes when the aggregate has nothing due, at a dead letter, when its write-back is
//!   refused, when its partition is no longer read, while the broker is out (the circuit
//!   breaker is not closed), or at a stop. The claim loop then reads the aggregate again, from a full scan (a new
//!   generation, [`cursor`](super::cursor)), so nothing of it behind the claim position is
//!   overtaken.
//!
//! At most [`MAX_LANES`] are open at once; a further hot aggregate is sent in waves as before.
//! A lane is one more reader of its partition inside the owner, never another owner: a
//! partition is released only once its lanes are closed and their step is over.

use std::collections::HashMap;

use tokio_util::sync::CancellationToken;

use super::batch::Offered;
use super::{Relay, RelayStats, lock};
use crate::event::{OutboxEvent, partition_of};
use crate::publisher::Publisher;
use crate::store::{self, Fate};

/// Most lanes open at once in one relay.
pub(crate) const MAX_LANES: usize = 4;

/// Events a lane reads per step.
pub(crate) const LANE_READ: u32 = 64;

/// `(aggregate_type, aggregate_id)`.
type Aggregate = (String, String);

/// One relay's lanes.
#[derive(Debug, Default)]
pub(crate) struct Lanes {
    /// Lanes run only beside [`Relay::run`]'s loop (not in `drain`).
    enabled: bool,
    open: HashMap<Aggregate, Lane>,
}

#[derive(Clone, Debug)]
struct Lane {
    partition: u16,
    /// The batch that opened it: it may read once every batch before that one is written back.
    opened_by: u64,
    /// The aggregate's last key the lane published: it reads after it.
    after: Option<(chrono::DateTime<chrono::Utc>, uuid::Uuid)>,
    /// After an event of it failed: when that one is due again.
    resume_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl Lanes {
    /// The aggregates the claim loop must not read.
    pub(crate) fn skipped(&self) -> Vec<Aggregate> {
        self.open.keys().cloned().collect()
    }

    /// Lanes that may read at `now`, `written` being the last batch written back.
    fn ready(&self, written: u64, now: chrono::DateTime<chrono::Utc>) -> Vec<(Aggregate, Lane)> {
        self.open
            .iter()
            .filter(|(_, l)| written + 1 >= l.opened_by && l.resume_at.is_none_or(|r| r <= now))
            .map(|(a, l)| (a.clone(), l.clone()))
            .collect()
    }
}

fn aggregate_of(e: &OutboxEvent) -> Aggregate {
    (e.aggregate_type.clone(), e.aggregate_id.clone())
}

impl<P: Publisher> Relay<P> {
    /// Opens lanes for the aggregates with more than `events_per_aggregate` events in batch
    /// `seq` (while lanes are free, and none held by a dead letter) and takes their events out
    /// of `events`, untouched. A lane for an aggregate waiting on a retry starts once that is
    /// due, so the aggregate's backlog is not handed back claim after claim meanwhile.
    pub(super) fn open_lanes(&self, events: &mut Vec<OutboxEvent>, seq: u64) {
        let mut lanes = lock(&self.lanes);
        if !lanes.enabled || lanes.open.len() >= MAX_LANES {
            return;
        }
        let mut counts: HashMap<(&str, &str), usize> = HashMap::new();
        for e in events.iter() {
            *counts
                .entry((&e.aggregate_type, &e.aggregate_id))
                .or_default() += 1;
        }
        let floor = self.config.events_per_aggregate as usize;
        let holds = lock(&self.holds);
        let mut hot: Vec<(Aggregate, Option<chrono::DateTime<chrono::Utc>>)> = counts
            .into_iter()
            .filter(|(_, n)| *n > floor)
            .filter_map(|((t, i), _)| {
                let from = holds.lane_from(t, i)?;
                Some(((t.to_owned(), i.to_owned()), from))
            })
            .collect();
        drop(holds);
        hot.truncate(MAX_LANES - lanes.open.len());
        if hot.is_empty() {
            return;
        }
        for (a, resume_at) in &hot {
            let lane = Lane {
                partition: partition_of(&a.0, &a.1),
                opened_by: seq,
                after: None,
                resume_at: *resume_at,
            };
            tracing::debug!(relay = %self.name, aggregate_type = %a.0, aggregate_id = %a.1,
                "outbox lane opened for a hot aggregate");
            lanes.open.insert(a.clone(), lane);
        }
        let hot: Vec<Aggregate> = hot.into_iter().map(|(a, _)| a).collect();
        events.retain(|e| !hot.contains(&aggregate_of(e)));
        drop(lanes);
        self.lane_wake.notify_one();
    }

    /// Closes `aggregate`'s lane: the claim loop reads it again, from a full scan.
    fn close_lane(&self, aggregate: &Aggregate) {
        if lock(&self.lanes).open.remove(aggregate).is_some() {
            lock(&self.ownership).rescan();
            self.wake.notify_one();
        }
    }

    /// Closes the lanes of `partitions` and waits for any lane step in progress; before they
    /// are released.
    pub(super) async fn close_lanes_in(&self, partitions: &[u16]) {
        let closing: Vec<Aggregate> = lock(&self.lanes)
            .open
            .iter()
            .filter(|(_, l)| partitions.contains(&l.partition))
            .map(|(a, _)| a.clone())
            .collect();
        for a in &closing {
            self.close_lane(a);
        }
        drop(self.lane_gate.write().await);
    }

    /// Runs the open lanes until `stop`; what they did.
    pub(super) async fn run_lanes(&self, stop: &CancellationToken) -> RelayStats {
        lock(&self.lanes).enabled = true;
        let mut stats = RelayStats::default();
        while !stop.is_cancelled() {
            let written = self.written.load(std::sync::atomic::Ordering::Acquire);
            let (ready, open) = {
                let lanes = lock(&self.lanes);
                (lanes.ready(written, self.now()), !lanes.open.is_empty())
            };
            if ready.is_empty() {
                // A lane waiting on a write-back or a retry is woken by nothing else; with none
                // open, only an opening wakes this.
                let tick = if open {
                    std::time::Duration::from_millis(5)
                } else {
                    std::time::Duration::from_secs(3600)
                };
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = self.lane_wake.notified() => {}
                    () = tokio::time::sleep(tick) => {}
                }
                continue;
            }
            let steps = ready
                .into_iter()
                .map(|(aggregate, lane)| self.lane_step(aggregate, lane, stop));
            for s in futures_util::future::join_all(steps).await {
                stats += s;
            }
        }
        let mut lanes = lock(&self.lanes);
        lanes.enabled = false;
        lanes.open.clear();
        stats
    }

    /// One lane read → publish → write-back.
    async fn lane_step(
        &self,
        aggregate: Aggregate,
        lane: Lane,
        stop: &CancellationToken,
    ) -> RelayStats {
        let _step = self.lane_gate.read().await;
        let (snapshot, token) = {
            let o = lock(&self.ownership);
            (o.snapshot(tokio::time::Instant::now()), o.token.clone())
        };
        let readable = snapshot.filter(|s| {
            s.partitions
                .as_ref()
                .is_none_or(|p| p.contains(&lane.partition))
        });
        // Its partition is going, the ownership may have lapsed, or the broker is out: the
        // claim loop decides (and waits for the breaker's probe).
        let broker_up = self.breaker().state == crate::stats::BreakerState::Closed;
        let Some(snapshot) =
            readable.filter(|_| broker_up && lock(&self.lanes).open.contains_key(&aggregate))
        else {
            self.close_lane(&aggregate);
            return RelayStats::default();
        };
        let started = std::time::Instant::now();
        let now = self.now();
        let rows = store::partitions::claim_aggregate(
            &self.db,
            &token,
            (&aggregate.0, &aggregate.1),
            lane.partition,
            lane.after,
            now,
            LANE_READ,
        )
        .await;
        // A database error, or a row this relay cannot read (the claim loop dead-letters it):
        // the claim loop takes the aggregate back.
        let events: Option<Vec<OutboxEvent>> = match rows {
            Ok(rows) => rows.into_iter().map(Result::ok).collect(),
            Err(e) => {
                tracing::warn!(relay = %self.name, error = %e, "outbox lane read failed");
                None
            }
        };
        let Some(events) = events.filter(|e| !e.is_empty()) else {
            self.close_lane(&aggregate);
            return RelayStats::default();
        };
        let recheck = chrono::Duration::from_std(self.config.partition_lease)
            .unwrap_or(chrono::Duration::MAX);
        let (mut go, held) = lock(&self.holds).split(events, now, recheck);
        let mut fates = self.deliver_chain(&mut go, stop).await;
        for (e, fate) in held {
            go.push(e);
            fates.push(fate);
        }
        let hold_dead = self.config.dead_letter_policy == super::DeadLetterPolicy::Hold;
        lock(&self.holds).record(&go, &fates, hold_dead);
        // A retry keeps the lane, paused until it is due; a dead letter ends it (under `Hold`
        // it holds the aggregate until replayed, which the claim loop looks after).
        let resume_at = fates
            .iter()
            .filter_map(|f| match f {
                Fate::Retry { at, .. } | Fate::Release { at } => Some(*at),
                _ => None,
            })
            .min();
        let dead = fates.iter().any(|f| matches!(f, Fate::Dead { .. }));
        let last = go
            .iter()
            .zip(&fates)
            .take_while(|(_, f)| **f == Fate::Published)
            .map(|(e, _)| (e.occurred_at, e.id))
            .last();
        let published = fates.iter().filter(|f| **f == Fate::Published).count() as u64;
        let lease = chrono::Duration::from_std(self.config.partition_lease)
            .unwrap_or(chrono::Duration::MAX);
        let offered = Offered::new(
            token,
            snapshot.epoch,
            snapshot.generation,
            now + lease,
            started,
            go,
            fates,
        );
        let stats = self.finish(Some(offered)).await;
        // Written back as sent, or the claim loop takes the aggregate back (a write-back lost
        // to a hand-over, or a dead letter).
        let broker_up = self.breaker().state == crate::stats::BreakerState::Closed;
        if stats.published == published && !dead && broker_up && !stop.is_cancelled() {
            if let Some(open) = lock(&self.lanes).open.get_mut(&aggregate) {
                open.after = last.or(open.after);
                open.resume_at = resume_at;
            }
        } else {
            self.close_lane(&aggregate);
        }
        stats
    }
}
