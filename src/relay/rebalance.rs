//! The rounds that keep a relay's partitions: see [`ownership`](super::ownership) for what a
//! round does and why it runs beside the claim loop.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::ownership::{ADOPT_BATCH, fair_share};
use super::run::Beat;
use super::{Relay, lock};
use crate::event::{PARTITIONS, now, partition_of};
use crate::publisher::Publisher;
use crate::store;

impl<P: Publisher> Relay<P> {
    /// A round every tenth of the partition lease until `stop` (after [`Self::first_round`]).
    pub(super) async fn keep_partitions(&self, stop: &CancellationToken, beat: &mut Beat) {
        let every = self.config.partition_lease / 10;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            self.ownership_round(beat, false).await;
        }
    }

    /// The first heartbeat and round, before the claim loop starts, so its first claim has
    /// partitions to read.
    pub(super) async fn first_round(&self, beat: &mut Beat) {
        self.ownership_round(beat, false).await;
    }

    /// One round. `greedy` (a drain) takes every free partition rather than a fair share.
    pub(super) async fn ownership_round(&self, beat: &mut Beat, greedy: bool) {
        let lease = self.config.partition_lease;
        if !lock(&self.ownership).strays_checked {
            match store::partitions::adopt_strays(&self.db, ADOPT_BATCH).await {
                Ok(n) if n < ADOPT_BATCH => lock(&self.ownership).strays_checked = true,
                Ok(n) => tracing::info!(relay = %self.name, rows = n,
                    "outbox rows given their partition; taking partitions once all have one"),
                Err(e) => {
                    tracing::warn!(relay = %self.name, error = %e,
                        "outbox partition assignment failed");
                    return;
                }
            }
        }
        let token = lock(&self.ownership).token.clone();
        // The heartbeat is the renewal: its send time starts the ownership's validity.
        let sent = Instant::now();
        if !self.beat_now(beat).await {
            lock(&self.ownership).failed_renewals += 1;
            tracing::warn!(relay = %self.name, "outbox partition renewal (heartbeat) failed");
            return;
        }
        let failed = std::mem::take(&mut lock(&self.ownership).failed_renewals);
        if failed > 0 {
            tracing::info!(relay = %self.name, failed,
                "outbox partition renewal (heartbeat) succeeded again");
        }
        let at = now();
        match store::partitions::held_by(&self.db, &token).await {
            Ok(still) => {
                let usable = self.config.usable_partition_lease();
                let lost = lock(&self.ownership).renewed(&still, sent, usable);
                if !lost.is_empty() {
                    tracing::warn!(relay = %self.name, partitions = lost.len(),
                        "outbox partitions taken over by another relay");
                    lock(&self.holds).forget_partitions(&lost);
                }
            }
            Err(e) => {
                tracing::warn!(relay = %self.name, error = %e, "outbox partitions not read");
                return;
            }
        }
        if !lock(&self.ownership).strays_checked {
            return;
        }
        let since = at - chrono::Duration::from_std(lease).unwrap_or_default();
        let share = if greedy {
            usize::from(PARTITIONS)
        } else {
            match self.live_relays(since).await {
                Some(n) => fair_share(n),
                None => return,
            }
        };
        let have = lock(&self.ownership).count();
        if have < share {
            self.take(&token, share - have, since).await;
        } else if have > share {
            lock(&self.ownership).trim_to(share);
            // The loop releases them once its batch is written back: now, not at its next poll,
            // or the relay that joined waits for an idle relay's poll.
            self.wake.notify_one();
        }
        self.refresh_holds(lease).await;
    }

    /// Gives every row without a partition its own, a thousand per statement, before a drain
    /// takes partitions.
    pub(super) async fn adopt_all_strays(&self) -> crate::error::Result<()> {
        while !lock(&self.ownership).strays_checked {
            if store::partitions::adopt_strays(&self.db, ADOPT_BATCH).await? < ADOPT_BATCH {
                lock(&self.ownership).strays_checked = true;
            }
        }
        Ok(())
    }

    /// Relays sharing the partitions heard from since `since`, this one included (relays that
    /// claim under leases have heartbeats too, but take no share).
    async fn live_relays(&self, since: chrono::DateTime<chrono::Utc>) -> Option<u64> {
        match store::partition_relays_since(&self.db, since).await {
            Ok(names) => {
                let me = names.contains(&self.name);
                Some(names.len() as u64 + u64::from(!me))
            }
            Err(e) => {
                tracing::warn!(relay = %self.name, error = %e, "outbox relays not counted");
                None
            }
        }
    }

    /// Takes up to `want` partitions and learns their blocked aggregates before claiming there.
    async fn take(&self, token: &str, want: usize, since: chrono::DateTime<chrono::Utc>) {
        let want = u16::try_from(want).unwrap_or(PARTITIONS);
        let taken = match store::partitions::take(&self.db, token, since, want).await {
            Ok(t) if t.is_empty() => return,
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(relay = %self.name, error = %e, "outbox partitions not taken");
                return;
            }
        };
        let parts: Vec<u16> = taken.iter().map(|(p, _)| *p).collect();
        let hold_dead = self.config.dead_letter_policy == super::DeadLetterPolicy::Hold;
        match store::partitions::blockers(&self.db, &parts, hold_dead).await {
            Ok(blockers) => {
                lock(&self.holds).learn(blockers);
                lock(&self.ownership).took(&taken);
                tracing::info!(relay = %self.name, partitions = parts.len(), "outbox partitions taken");
                // Their due events wait for no poll.
                self.wake.notify_one();
            }
            Err(e) => {
                // Claiming without knowing what is blocked could overtake: give them back.
                tracing::warn!(relay = %self.name, error = %e,
                    "outbox partitions' blocked aggregates unknown; releasing them");
                let _ = store::partitions::release(&self.db, token, Some(&parts)).await;
            }
        }
    }

    /// Looks up blockers that have not come back when expected.
    async fn refresh_holds(&self, lease: Duration) {
        let grace = chrono::Duration::from_std(lease).unwrap_or_default();
        let stale = lock(&self.holds).stale(now(), grace);
        if stale.is_empty() {
            return;
        }
        match store::partitions::blocker_states(&self.db, &stale).await {
            Ok(states) => {
                let hold_dead = self.config.dead_letter_policy == super::DeadLetterPolicy::Hold;
                lock(&self.holds).refresh(&states, hold_dead);
            }
            Err(e) => tracing::debug!(relay = %self.name, error = %e, "outbox holds not refreshed"),
        }
    }

    /// Gives up the partitions marked for release; the caller has written back its batch.
    pub(super) async fn release_surplus(&self) {
        let (token, releasing) = {
            let o = lock(&self.ownership);
            (o.token.clone(), o.releasing())
        };
        if releasing.is_empty() {
            return;
        }
        self.close_lanes_in(&releasing).await;
        match store::partitions::release(&self.db, &token, Some(&releasing)).await {
            Ok(()) => {
                lock(&self.ownership).released(&releasing);
                lock(&self.holds).forget_partitions(&releasing);
                tracing::info!(relay = %self.name, partitions = releasing.len(),
                    "outbox partitions released to other relays");
            }
            Err(e) => {
                tracing::warn!(relay = %self.name, error = %e, "outbox partitions not released")
            }
        }
    }

    /// Gives up every partition, at a stop.
    pub(super) async fn release_all(&self) {
        let token = lock(&self.ownership).token.clone();
        if let Err(e) = store::partitions::release(&self.db, &token, None).await {
            tracing::warn!(relay = %self.name, error = %e,
                "outbox partitions not released; others take them when the lease ends");
        }
        lock(&self.ownership).clear();
        *lock(&self.holds) = super::holds::Holds::default();
    }

    /// Whether a publish of `events` may start now: the relay still holds their partitions,
    /// with time left. Always true for leases (the lease was checked at claim).
    pub(super) fn may_publish(&self, events: &[crate::event::OutboxEvent]) -> bool {
        if !self.config.owns_partitions() {
            return true;
        }
        let o = lock(&self.ownership);
        o.valid(Instant::now())
            && events
                .iter()
                .all(|e| o.holds_partition(partition_of(&e.aggregate_type, &e.aggregate_id)))
    }
}
