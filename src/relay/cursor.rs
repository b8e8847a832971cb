//! Where a relay's next claim may start its scan of the due index while it drains a backlog.
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
//! That skips only rows that were not claimable then. What can still become claimable behind
//! the cursor: a row whose transaction committed after the claim with an earlier timestamp (a
//! writer's transaction outlasting a batch), a crashed relay's expired lease, and, under
//! per-aggregate order, an event the window passed over because an earlier event of its
//! aggregate was still in flight. None is lost: a claim that comes back short, and any claim
//! [`SWEEP_EVERY`] after the last full scan, scans from the start again. So such an event waits
//! at most that much longer, and only while a backlog is draining, when everything else waits
//! too. At low rates every claim comes back short, so every claim is a full scan, as without
//! the cursor.

use std::time::{Duration, Instant};

use super::config::Ordering;
use crate::event::OutboxEvent;
use crate::store::DueKey;

/// How long a cursor is trusted before a claim scans the due index from its start again.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// One relay's cursor.
#[derive(Debug, Default)]
pub(crate) struct Cursor {
    after: Option<DueKey>,
    /// When the last claim without a cursor (a full scan) was made.
    swept: Option<Instant>,
    /// Under owned partitions, the generation of what was held when it was set: partitions
    /// taken since may hold due rows anywhere behind it.
    generation: u64,
}

impl Cursor {
    /// The key the next claim made at `now`, reading what generation `generation` holds, may
    /// start at; `None` for a full scan.
    pub(crate) fn start(&self, now: Instant, generation: u64) -> Option<DueKey> {
        let fresh = self
            .swept
            .is_some_and(|at| now.saturating_duration_since(at) < SWEEP_EVERY);
        self.after
            .filter(|_| fresh && generation == self.generation)
    }

    /// Records a claim made at `at` on generation `generation`, from `from` (what
    /// [`Self::start`] gave it), that got `events` of the `limit` it asked for.
    pub(crate) fn claimed(
        &mut self,
        at: Instant,
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
            self.swept = Some(at);
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
        c.claimed(t0, 0, None, Ordering::Unordered, &batch[..3], 3);
        assert_eq!(
            c.start(t0, 0),
            Some((batch[0].next_attempt_at, batch[0].id))
        );
        c.claimed(t0, 0, None, Ordering::PerAggregate, &batch[..3], 3);
        assert_eq!(
            c.start(t0, 0),
            Some((batch[1].next_attempt_at, batch[1].id))
        );

        let from = c.start(t0, 0);
        c.claimed(t0, 0, from, Ordering::PerAggregate, &batch[3..], 2);
        assert_eq!(c.start(t0, 0), from, "never moves backwards within a sweep");

        assert_eq!(c.start(t0 + SWEEP_EVERY, 0), None, "a sweep is due");
        c.claimed(t0, 0, from, Ordering::Unordered, &batch[..2], 3);
        assert_eq!(c.start(t0, 0), None, "a short claim resets it");
    }

    #[test]
    fn partitions_taken_since_it_was_set_void_it() {
        let t0 = Instant::now();
        let mut c = Cursor::default();
        let batch = [event(1), event(2), event(3)];
        c.claimed(t0, 0, None, Ordering::Unordered, &batch, 3);
        assert!(c.start(t0, 0).is_some());
        assert_eq!(
            c.start(t0, 1),
            None,
            "a claim after a take scans from the start"
        );
        // A claim snapshotted before the take, recorded after it, sets nothing for the new one.
        let from = c.start(t0, 0);
        c.claimed(t0, 0, from, Ordering::Unordered, &batch, 3);
        assert_eq!(c.start(t0, 1), None);
        c.claimed(t0, 1, None, Ordering::Unordered, &batch, 3);
        assert!(
            c.start(t0, 1).is_some(),
            "a full scan of the new generation sets it"
        );
    }
}
