//! Where a relay's next claim may start its scan of the due index, and what such a claim may
//! take.
//!
//! On PostgreSQL a published row's entry stays in the due index until VACUUM, and a claim's
//! scan starts at the oldest end: while a relay drains a backlog with VACUUM behind (or off),
//! every claim steps over everything already published, and slows down as the drain goes on
//! (BENCHMARKS.md, backlog section). So after a full batch, the next claim starts at the
//! batch's key in `(next_attempt_at, id)` order instead:
//!
//! * unordered, its newest key: everything before it was, when claimed, either this batch,
//!   another relay's lease, or already done;
//! * per-aggregate order, its oldest key: an event of a busy aggregate may follow any head.
//!
//! Owned partitions take no lease, so their claim made while a batch is written back starts
//! after that batch's newest key, on every backend.
//!
//! That skips only rows that were not claimable then. What can still become claimable behind
//! the start: a row whose transaction committed after the claim that passed its key (a
//! writer's transaction outlasting a batch, or an event back-dated by its `occurred_at`), a
//! crashed relay's expired lease, and, under per-aggregate order, an event the window passed
//! over because an earlier event of its aggregate was still in flight. None is lost: a claim
//! that comes back short, and any claim [`SWEEP_EVERY`] after the last full scan, scans from
//! the start again.
//!
//! Under owned partitions, which prove no aggregate's head per row, such a row must not be
//! overtaken by its aggregate's next event. That event was written after the row committed
//! (writers of one aggregate take turns), so after the claim that passed the row, and after
//! the last full scan, which came no later. So a claim that starts past a key takes only
//! events created before the last full scan began ([`Cursor::horizon`], less
//! [`WRITER_CLOCK_SKEW`] for writers whose clocks run behind the relay's), and stops at the
//! first one that is not: the rest wait for the next full scan, which reads the row first.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::config::Ordering;
use crate::event::OutboxEvent;
use crate::store::DueKey;

/// How long a cursor is trusted before a claim scans the due index from its start again.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// How far behind the relay's clock a writer's clock may run: an event's `created_at` is the
/// writer's time, the horizon the relay's.
pub(crate) const WRITER_CLOCK_SKEW: Duration = Duration::from_secs(1);

/// One relay's cursor.
#[derive(Debug, Default)]
pub(crate) struct Cursor {
    after: Option<DueKey>,
    /// When the last claim without a cursor (a full scan) was made, and the wall-clock time
    /// taken just before it.
    swept: Option<(Instant, DateTime<Utc>)>,
    /// Under owned partitions, the generation of what was held when it was set: partitions
    /// taken since may hold due rows anywhere behind it.
    generation: u64,
}

impl Cursor {
    /// The key the next claim made at `now`, reading what generation `generation` holds, may
    /// start at; `None` for a full scan.
    pub(crate) fn start(&self, now: Instant, generation: u64) -> Option<DueKey> {
        self.after
            .filter(|_| self.horizon(now, generation).is_some())
    }

    /// What a claim made at `now` on generation `generation` may take if it starts past a key:
    /// events created before this, stopping at the first that is not. `None` when no full
    /// scan of that generation was made within [`SWEEP_EVERY`]: the claim must scan from the
    /// start.
    pub(crate) fn horizon(&self, now: Instant, generation: u64) -> Option<DateTime<Utc>> {
        let (at, wall) = self.swept?;
        let fresh = now.saturating_duration_since(at) < SWEEP_EVERY;
        let skew = chrono::Duration::from_std(WRITER_CLOCK_SKEW).unwrap_or_default();
        (fresh && generation == self.generation).then(|| wall - skew)
    }

    /// Records a claim made at `at` (`wall` by the clock) on generation `generation`, from
    /// `from` (what [`Self::start`] gave it), that got `events` of the `limit` it asked for.
    pub(crate) fn claimed(
        &mut self,
        (at, wall): (Instant, DateTime<Utc>),
        generation: u64,
        from: Option<DueKey>,
        ordering: Ordering,
        events: &[OutboxEvent],
        limit: usize,
    ) {
        if generation != self.generation {
            // Its scan started no earlier than the new partitions' oldest rows only if it was
            // a full one; either way the next claim of the new generation scans from the start.
            self.generation = generation;
            self.after = None;
            self.swept = None;
            if from.is_some() {
                return;
            }
        }
        if from.is_none() {
            self.swept = Some((at, wall));
        }
        let keys = events.iter().map(|e| (e.next_attempt_at, e.id));
        self.after = if events.len() < limit {
            // Short: maybe all that is left lies behind the cursor; look from the start.
            None
        } else {
            match ordering {
                Ordering::Unordered => keys.max(),
                Ordering::PerAggregate => keys.min(),
            }
            // Never backwards within one sweep: a key behind the cursor was skipped already.
            .map(|k| from.map_or(k, |f| k.max(f)))
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wall() -> DateTime<Utc> {
        chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default()
    }

    fn event(secs: i64) -> OutboxEvent {
        let at = chrono::DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap_or_default();
        OutboxEvent::pending_for_test(crate::event::NewEvent::new("t", "a", "1").occurred_at(at))
    }

    #[test]
    fn full_batches_move_it_short_ones_and_time_reset_it() {
        let t0 = Instant::now();
        let mut c = Cursor::default();
        assert_eq!(c.start(t0, 0), None, "the first claim is a full scan");
        let batch = [event(3), event(1), event(2), event(0), event(5)];
        c.claimed((t0, wall()), 0, None, Ordering::Unordered, &batch[..3], 3);
        assert_eq!(
            c.start(t0, 0),
            Some((batch[0].next_attempt_at, batch[0].id))
        );
        c.claimed(
            (t0, wall()),
            0,
            None,
            Ordering::PerAggregate,
            &batch[..3],
            3,
        );
        assert_eq!(
            c.start(t0, 0),
            Some((batch[1].next_attempt_at, batch[1].id))
        );

        let from = c.start(t0, 0);
        c.claimed(
            (t0, wall()),
            0,
            from,
            Ordering::PerAggregate,
            &batch[3..],
            2,
        );
        assert_eq!(c.start(t0, 0), from, "never moves backwards within a sweep");

        assert_eq!(c.start(t0 + SWEEP_EVERY, 0), None, "a sweep is due");
        c.claimed((t0, wall()), 0, from, Ordering::Unordered, &batch[..2], 3);
        assert_eq!(c.start(t0, 0), None, "a short claim resets it");
    }

    #[test]
    fn partitions_taken_since_it_was_set_void_it() {
        let t0 = Instant::now();
        let mut c = Cursor::default();
        let batch = [event(1), event(2), event(3)];
        c.claimed((t0, wall()), 0, None, Ordering::Unordered, &batch, 3);
        assert!(c.start(t0, 0).is_some());
        assert_eq!(
            c.start(t0, 1),
            None,
            "a claim after a take scans from the start"
        );
        // A claim snapshotted before the take, recorded after it, sets nothing for the new one.
        let from = c.start(t0, 0);
        c.claimed((t0, wall()), 0, from, Ordering::Unordered, &batch, 3);
        assert_eq!(c.start(t0, 1), None);
        c.claimed((t0, wall()), 1, None, Ordering::Unordered, &batch, 3);
        assert!(
            c.start(t0, 1).is_some(),
            "a full scan of the new generation sets it"
        );
    }

    #[test]
    fn the_horizon_is_the_last_full_scan_less_the_writers_skew_while_fresh() {
        let t0 = Instant::now();
        let mut c = Cursor::default();
        assert_eq!(c.horizon(t0, 0), None, "no full scan yet");
        let batch = [event(1), event(2), event(3)];
        c.claimed((t0, wall()), 0, None, Ordering::Unordered, &batch, 3);
        let skew = chrono::Duration::from_std(WRITER_CLOCK_SKEW).unwrap_or_default();
        assert_eq!(c.horizon(t0, 0), Some(wall() - skew));
        // A claim from the cursor leaves the horizon at the full scan's.
        let from = c.start(t0, 0);
        let later = wall() + chrono::Duration::seconds(5);
        c.claimed((t0, later), 0, from, Ordering::Unordered, &batch, 3);
        assert_eq!(c.horizon(t0, 0), Some(wall() - skew));
        assert_eq!(c.horizon(t0 + SWEEP_EVERY, 0), None, "stale");
        assert_eq!(c.horizon(t0, 1), None, "another generation");
    }
}
