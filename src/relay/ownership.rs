//! Owned partitions ([`Claiming::OwnedPartitions`](super::Claiming)): which partitions this relay
//! holds, for how long by its own clock, and the rounds that renew, take and give them up.
//!
//! Every [`partition_lease`](super::RelayConfig::partition_lease) / 10 a round, beside the
//! claim loop (so a slow publish never starves it):
//!
//! 1. gives partitions to rows that have none (rows older than the partitions migration), a
//!    thousand per round; nothing is taken until none are left;
//! 2. writes the relay's heartbeat row with its owner token: the renewal of everything it
//!    holds (one row, however many partitions), and how relays count each other;
//! 3. reads what it holds; a partition another relay took over is dropped, with its holds;
//! 4. takes free partitions (no owner, or an owner whose heartbeat is older than the lease)
//!    up to its fair share, `ceil(256 / live relays)`, learning
//!    each one's blocked aggregates from the table before it claims there;
//! 5. marks what it holds beyond its share for release: the claim loop stops reading those at
//!    once and releases them once its batch in flight is written back;
//! 6. looks up blockers that have not come back when expected.
//!
//! A relay may publish only while its ownership is valid by its own clock: until the renewal
//! that last succeeded was sent, plus the lease, less a fifth of the lease for clock drift
//! between relays, and less the publish timeout (a publish started then still ends before the
//! lease does). Another relay takes a partition over only once the lease has run out by its
//! clock.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::event::PARTITIONS;
use crate::store::partitions::Held;

/// Rows given a partition per round.
pub(crate) const ADOPT_BATCH: u64 = 1000;

/// What this relay holds.
#[derive(Debug)]
pub(crate) struct Ownership {
    /// The owner token written to `outbox_partitions.owner`: the name and a per-run id, so two
    /// relays given one name never share partitions.
    pub(crate) token: String,
    held: BTreeMap<u16, i64>,
    /// Held, but to be given up: no longer read.
    releasing: BTreeSet<u16>,
    /// Until when this relay may publish from its partitions.
    valid_until: Option<Instant>,
    /// Rows without a partition may remain: take nothing until they have one.
    pub(crate) strays_checked: bool,
    /// Renewals that failed in a row (logged once they succeed again).
    pub(crate) failed_renewals: u32,
    /// Bumped by every take: a claim position found under an earlier generation says nothing
    /// about the rows of partitions taken since.
    generation: u64,
}

/// What a claim may read, taken under the lock.
#[derive(Clone, Debug)]
pub(crate) struct Snapshot {
    /// The partitions to read; `None` for all of them.
    pub(crate) partitions: Option<Vec<u16>>,
    /// The highest epoch held: the write-back's fence.
    pub(crate) epoch: i64,
    /// What was held when it was taken ([`Ownership`]'s `generation`).
    pub(crate) generation: u64,
}

impl Ownership {
    pub(crate) fn new(name: &str) -> Self {
        Self {
            token: format!("{name}:{}", uuid::Uuid::now_v7().simple()),
            held: BTreeMap::new(),
            releasing: BTreeSet::new(),
            valid_until: None,
            strays_checked: false,
            failed_renewals: 0,
            generation: 0,
        }
    }

    /// How many partitions it holds.
    pub(crate) fn count(&self) -> usize {
        self.held.len()
    }

    /// Whether it holds `partition`.
    pub(crate) fn holds_partition(&self, partition: u16) -> bool {
        self.held.contains_key(&partition)
    }

    /// Whether its ownership ends within `margin` of `now` (or has ended): time for a round.
    pub(crate) fn ends_within(&self, now: Instant, margin: Duration) -> bool {
        !self.valid(now + margin)
    }

    /// Whether it may publish at `now` from what it holds.
    pub(crate) fn valid(&self, now: Instant) -> bool {
        self.valid_until.is_some_and(|until| now < until)
    }

    /// Whether a write-back may still start at `now`: a publish started while [`Self::valid`]
    /// ends within `publish_timeout`, and until then no other relay takes its partitions over.
    pub(crate) fn writable(&self, now: Instant, publish_timeout: Duration) -> bool {
        self.valid_until
            .is_some_and(|until| now < until + publish_timeout)
    }

    /// What a claim at `now` may read; `None` when it holds nothing readable or its lease may
    /// have run out.
    pub(crate) fn snapshot(&self, now: Instant) -> Option<Snapshot> {
        if !self.valid(now) {
            return None;
        }
        let readable: Vec<u16> = self
            .held
            .keys()
            .filter(|p| !self.releasing.contains(p))
            .copied()
            .collect();
        if readable.is_empty() {
            return None;
        }
        let epoch = self.held.values().copied().max().unwrap_or(0);
        let partitions = (readable.len() < usize::from(PARTITIONS)).then_some(readable);
        Some(Snapshot {
            partitions,
            epoch,
            generation: self.generation,
        })
    }

    /// Records a renewal sent at `sent` for `lease` (`margin` short of it): what it still holds.
    /// Returns the partitions it lost.
    pub(crate) fn renewed(&mut self, still: &[Held], sent: Instant, usable: Duration) -> Vec<u16> {
        let still: BTreeMap<u16, i64> = still.iter().copied().collect();
        let lost: Vec<u16> = self
            .held
            .iter()
            .filter(|(p, e)| still.get(p) != Some(e))
            .map(|(p, _)| *p)
            .collect();
        for p in &lost {
            self.held.remove(p);
            self.releasing.remove(p);
        }
        self.valid_until = Some(sent + usable);
        lost
    }

    /// Starts a new generation without a take: rows the claims skipped (a closed lane's
    /// aggregate) may lie behind any claim position.
    pub(crate) fn rescan(&mut self) {
        self.generation += 1;
    }

    /// Adds partitions just taken.
    pub(crate) fn took(&mut self, taken: &[Held]) {
        if !taken.is_empty() {
            self.generation += 1;
        }
        self.held.extend(taken.iter().copied());
    }

    /// Marks the highest partitions beyond `share` for release.
    pub(crate) fn trim_to(&mut self, share: usize) {
        let surplus = self.held.len().saturating_sub(share);
        let highest: Vec<u16> = self.held.keys().rev().take(surplus).copied().collect();
        self.releasing.extend(highest);
    }

    /// The partitions marked for release.
    pub(crate) fn releasing(&self) -> Vec<u16> {
        self.releasing.iter().copied().collect()
    }

    /// Forgets partitions that were released (or lost).
    pub(crate) fn released(&mut self, partitions: &[u16]) {
        for p in partitions {
            self.held.remove(p);
            self.releasing.remove(p);
        }
    }

    /// Forgets everything, after releasing all.
    pub(crate) fn clear(&mut self) {
        self.held.clear();
        self.releasing.clear();
        self.valid_until = None;
    }
}

/// The fair share of partitions among `relays` live relays.
pub(crate) fn fair_share(relays: u64) -> usize {
    let relays = usize::try_from(relays.max(1)).unwrap_or(usize::MAX);
    usize::from(PARTITIONS).div_ceil(relays)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_reads_what_is_held_and_valid() {
        let t0 = Instant::now();
        let mut o = Ownership::new("r");
        assert!(o.snapshot(t0).is_none(), "nothing held");
        let all: Vec<Held> = (0..PARTITIONS).map(|p| (p, 1)).collect();
        o.took(&all);
        o.renewed(&all, t0, Duration::from_secs(10));
        let s = o.snapshot(t0).expect("valid");
        assert_eq!((s.partitions, s.epoch), (None, 1), "all: no filter");
        assert!(o.snapshot(t0 + Duration::from_secs(10)).is_none(), "lapsed");

        o.trim_to(fair_share(2));
        let s = o.snapshot(t0).expect("valid");
        assert_eq!(s.partitions.as_ref().map(Vec::len), Some(128));
        assert_eq!(o.releasing().len(), 128);
        assert_eq!(o.releasing()[0], 128, "the highest go");

        // A renewal that misses one (taken over) loses it.
        let lost = o.renewed(&all[1..], t0, Duration::from_secs(10));
        assert_eq!(lost, vec![0]);
        assert_eq!(fair_share(3), 86);
        assert_eq!(fair_share(0), 256);
    }
}
