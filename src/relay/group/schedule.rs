//! Which tenant runs next: a round-robin queue of tenants with work, timers for the rest.
//!
//! A tenant is in exactly one place: ready (queued for a worker), busy (its batch in flight),
//! or waiting for a timer. A tenant that claimed a full batch goes to the back of the queue, so
//! every tenant with work gets one batch per turn, whatever its backlog: a tenant with a
//! million events waits its turn like one with ten.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};

use tokio::time::Instant;

/// What comes after a tenant's batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum After {
    /// Another batch, after the other tenants' turns.
    Again,
    /// A timer.
    At(Instant, Timer),
    /// Nothing until a wake-up (a schema tenant: the group's scan finds when it has work).
    Park,
}

/// What a timer does when it fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Timer {
    /// Queue the tenant for a batch.
    Poll,
    /// The tenant's database failed: check it outside the workers before queueing it.
    Probe,
}

#[derive(Default)]
pub(super) struct Schedule {
    ready: VecDeque<String>,
    queued: HashSet<String>,
    busy: HashSet<String>,
    /// Woken while busy: queue again when its batch is done, whatever it found.
    rewoken: HashSet<String>,
    /// Each waiting tenant's timer; heap entries that no longer match it are stale.
    timers: HashMap<String, (Instant, Timer)>,
    heap: BinaryHeap<Reverse<(Instant, String)>>,
}

impl Schedule {
    /// A new tenant, or one woken (a NOTIFY, a [`RelayWaker`](crate::relay::RelayWaker)): poll
    /// it as soon as a worker is free. A tenant whose database is failing keeps its probe: a
    /// wake-up says there are events, not that its database is back.
    pub(super) fn wake(&mut self, id: &str) {
        if self.busy.contains(id) {
            self.rewoken.insert(id.to_owned());
            return;
        }
        if matches!(self.timers.get(id), Some((_, Timer::Probe))) {
            return;
        }
        self.timers.remove(id);
        self.enqueue(id);
    }

    fn enqueue(&mut self, id: &str) {
        if self.queued.insert(id.to_owned()) {
            self.ready.push_back(id.to_owned());
        }
    }

    /// The next tenant for a worker, now marked busy.
    pub(super) fn next_ready(&mut self) -> Option<String> {
        let id = self.ready.pop_front()?;
        self.queued.remove(&id);
        self.busy.insert(id.clone());
        Some(id)
    }

    /// `id`'s batch is done: what comes next for it.
    pub(super) fn done(&mut self, id: &str, next: After) {
        self.busy.remove(id);
        let rewoken = self.rewoken.remove(id);
        match next {
            After::At(_, Timer::Poll) | After::Park if rewoken => self.enqueue(id),
            After::At(at, timer) => self.set_timer(id, at, timer),
            After::Park => {}
            After::Again => self.enqueue(id),
        }
    }

    /// Arms `id`'s timer, replacing any other.
    pub(super) fn set_timer(&mut self, id: &str, at: Instant, timer: Timer) {
        self.timers.insert(id.to_owned(), (at, timer));
        self.heap.push(Reverse((at, id.to_owned())));
    }

    /// The timers that are due, removed: what each asks for.
    pub(super) fn due(&mut self, now: Instant) -> Vec<(String, Timer)> {
        let mut fired = Vec::new();
        while let Some(Reverse((at, _))) = self.heap.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, id))) = self.heap.pop() else {
                break;
            };
            // Stale unless it is the tenant's current timer.
            if let Some(&(current, timer)) = self.timers.get(&id)
                && current == at
            {
                self.timers.remove(&id);
                match timer {
                    Timer::Poll => self.enqueue(&id),
                    Timer::Probe => fired.push((id, timer)),
                }
            }
        }
        fired
    }

    /// When the next timer fires.
    pub(super) fn next_timer(&mut self) -> Option<Instant> {
        // Drop stale entries so a long-gone timer does not wake the loop for nothing.
        while let Some(Reverse((at, id))) = self.heap.peek() {
            if self
                .timers
                .get(id)
                .is_some_and(|(current, _)| current == at)
            {
                return Some(*at);
            }
            self.heap.pop();
        }
        None
    }

    /// Forgets `id` (removed from the group); a batch in flight is the caller's to wait for.
    pub(super) fn remove(&mut self, id: &str) {
        self.ready.retain(|r| r != id);
        self.queued.remove(id);
        self.busy.remove(id);
        self.rewoken.remove(id);
        self.timers.remove(id);
    }

    #[cfg(test)]
    fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn round_robin_gives_each_tenant_one_batch_per_turn() {
        let mut s = Schedule::default();
        for id in ["big", "small", "other"] {
            s.wake(id);
        }
        let mut order = Vec::new();
        for _ in 0..6 {
            let id = s.next_ready().expect("ready");
            order.push(id.clone());
            // `big` always has more; the others finish after one batch.
            let next = if id == "big" {
                After::Again
            } else {
                After::At(Instant::now() + Duration::from_secs(60), Timer::Poll)
            };
            s.done(&id, next);
        }
        assert_eq!(order, ["big", "small", "other", "big", "big", "big"]);
    }

    #[test]
    fn a_wake_while_busy_queues_again_after_the_batch() {
        let mut s = Schedule::default();
        s.wake("a");
        assert_eq!(s.next_ready().as_deref(), Some("a"));
        s.wake("a");
        assert!(!s.has_ready(), "never two batches of one tenant at once");
        s.done(
            "a",
            After::At(Instant::now() + Duration::from_secs(60), Timer::Poll),
        );
        assert_eq!(s.next_ready().as_deref(), Some("a"));
        s.wake("a");
        s.done("a", After::Park);
        assert_eq!(s.next_ready().as_deref(), Some("a"), "woken while busy");
        s.done("a", After::Park);
        assert!(!s.has_ready() && s.next_timer().is_none(), "parked");
        s.wake("a");
        assert_eq!(s.next_ready().as_deref(), Some("a"));
    }

    #[test]
    fn a_failing_tenant_is_probed_not_polled_and_a_wake_does_not_skip_its_probe() {
        let mut s = Schedule::default();
        let now = Instant::now();
        s.wake("down");
        s.next_ready();
        s.done(
            "down",
            After::At(now + Duration::from_millis(100), Timer::Probe),
        );
        s.wake("down");
        assert!(!s.has_ready());
        assert!(s.due(now).is_empty());
        assert_eq!(s.next_timer(), Some(now + Duration::from_millis(100)));
        let fired = s.due(now + Duration::from_millis(100));
        assert_eq!(fired, [("down".to_owned(), Timer::Probe)]);
        assert!(!s.has_ready(), "a probe runs before the tenant is queued");
        assert_eq!(s.next_timer(), None);
    }

    #[test]
    fn a_replaced_or_removed_timer_never_fires() {
        let mut s = Schedule::default();
        let now = Instant::now();
        s.set_timer("a", now + Duration::from_secs(1), Timer::Poll);
        s.wake("a");
        assert_eq!(s.next_ready().as_deref(), Some("a"));
        s.done("a", After::At(now + Duration::from_secs(5), Timer::Poll));
        s.due(now + Duration::from_secs(2));
        assert!(!s.has_ready(), "the first timer was replaced");
        s.remove("a");
        s.due(now + Duration::from_secs(10));
        assert!(!s.has_ready() && s.next_timer().is_none());
    }
}
