//! Which aggregates of its owned partitions a relay must hold back, in memory.
//!
//! An owner reads its partitions' due events in due order without asking, row by row, whether
//! each is its aggregate's head. What it must know instead is which aggregates have an earlier
//! event that is not done: one in backoff, one handed back unattempted, or, when dead letters
//! hold, a dead letter. That event is the aggregate's *blocker*; later events of the aggregate
//! that show up without it are handed back to go after it. A blocker is learnt from the
//! relay's own fates, and, for a partition it takes over, from the table (the displaced and
//! dead-lettered rows: [`store::partitions::blockers`]). A blocker that is not seen again in
//! time (marked failed by hand, discarded, or replayed elsewhere) is looked up in the table.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::event::{OutboxEvent, partition_of};
use crate::store::Fate;
use crate::store::partitions::{Blocker, BlockerState};

/// `(aggregate_type, aggregate_id)`.
type Aggregate = (String, String);

/// `(occurred_at, id)`: an event's place in its aggregate's order.
type Key = (DateTime<Utc>, Uuid);

/// One relay's holds: per aggregate, its events that are not done and were moved out of
/// their place in due order (tried again later, handed back, or dead letters that hold), each
/// with when it is due again (`None` for a dead letter). The earliest is the aggregate's
/// blocker, but all of them count: once the blocker is published, the next one still holds
/// the events after it.
#[derive(Debug, Default)]
pub(crate) struct Holds {
    by_aggregate: HashMap<Aggregate, BTreeMap<Key, Option<DateTime<Utc>>>>,
}

fn key_of(e: &OutboxEvent) -> Key {
    (e.occurred_at, e.id)
}

fn aggregate_of(e: &OutboxEvent) -> Aggregate {
    (e.aggregate_type.clone(), e.aggregate_id.clone())
}

impl Holds {
    /// How many aggregates are held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_aggregate.len()
    }

    /// Whether a lane may take the aggregate, and from when: at once when nothing of it is
    /// held, once every held event of it is due again, never while a dead letter holds it.
    pub(crate) fn lane_from(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Option<Option<DateTime<Utc>>> {
        match self
            .by_aggregate
            .get(&(aggregate_type.to_owned(), aggregate_id.to_owned()))
        {
            None => Some(None),
            Some(held) => held
                .values()
                .copied()
                .collect::<Option<Vec<_>>>()
                .map(|due| due.into_iter().max()),
        }
    }

    /// Adds blockers read from the table.
    pub(crate) fn learn(&mut self, blockers: Vec<Blocker>) {
        for b in blockers {
            self.block((b.aggregate_type, b.aggregate_id), b.key, b.until);
        }
    }

    fn block(&mut self, aggregate: Aggregate, key: Key, until: Option<DateTime<Utc>>) {
        self.by_aggregate
            .entry(aggregate)
            .or_default()
            .insert(key, until);
    }

    fn done(&mut self, aggregate: &Aggregate, key: Key) {
        if let Some(held) = self.by_aggregate.get_mut(aggregate) {
            held.remove(&key);
            if held.is_empty() {
                self.by_aggregate.remove(aggregate);
            }
        }
    }

    /// Splits a claimed batch into what may go and what must wait. An event of a held
    /// aggregate may go only if every held event of its aggregate before it is in the batch
    /// too (the batch's waves then keep the order, and stop the aggregate again if one fails).
    /// A waiting event is handed back to be due after the first held event missing from the
    /// batch: at that one's next attempt, or a moment from now if that has passed (so it no
    /// longer sorts ahead of it), or after `recheck` behind a dead letter.
    pub(crate) fn split(
        &self,
        events: Vec<OutboxEvent>,
        now: DateTime<Utc>,
        recheck: chrono::Duration,
    ) -> (Vec<OutboxEvent>, Vec<(OutboxEvent, Fate)>) {
        if self.by_aggregate.is_empty() {
            return (events, Vec::new());
        }
        let present: HashSet<Uuid> = events.iter().map(|e| e.id).collect();
        let mut go = Vec::with_capacity(events.len());
        let mut wait = Vec::new();
        for e in events {
            let missing = self.by_aggregate.get(&aggregate_of(&e)).and_then(|held| {
                held.iter()
                    .find(|(k, _)| !present.contains(&k.1))
                    .filter(|(k, _)| key_of(&e) > **k)
            });
            match missing {
                Some((_, until)) => {
                    let soon = now + chrono::Duration::milliseconds(1);
                    let at = match until {
                        Some(until) => (*until).max(soon),
                        None => now + recheck,
                    };
                    wait.push((e, Fate::Release { at }));
                }
                None => go.push(e),
            }
        }
        (go, wait)
    }

    /// Learns from a batch's fates: an event that will be tried again (or was handed back)
    /// holds its aggregate; one published, or dead-lettered while dead letters do not hold, no
    /// longer does.
    pub(crate) fn record(
        &mut self,
        events: &[OutboxEvent],
        fates: &[Fate],
        dead_letters_hold: bool,
    ) {
        for (e, fate) in events.iter().zip(fates) {
            let aggregate = aggregate_of(e);
            match fate {
                Fate::Retry { at, .. } | Fate::Release { at } => {
                    self.block(aggregate, key_of(e), Some(*at));
                }
                Fate::Dead { .. } if dead_letters_hold => self.block(aggregate, key_of(e), None),
                Fate::Published | Fate::Dead { .. } | Fate::Discard => {
                    self.done(&aggregate, key_of(e))
                }
            }
        }
    }

    /// Forgets the holds of aggregates in partitions this relay no longer owns.
    pub(crate) fn forget_partitions(&mut self, lost: &[u16]) {
        if lost.is_empty() {
            return;
        }
        self.by_aggregate
            .retain(|(t, a), _| !lost.contains(&partition_of(t, a)));
    }

    /// Held events worth looking up: dead letters (replayed or discarded by an operator), and
    /// events overdue by more than `grace` (marked failed or deleted by hand).
    pub(crate) fn stale(&self, now: DateTime<Utc>, grace: chrono::Duration) -> Vec<Uuid> {
        self.by_aggregate
            .values()
            .flat_map(|held| held.iter())
            .filter(|(_, until)| until.is_none_or(|u| u + grace < now))
            .map(|(k, _)| k.1)
            .take(1000)
            .collect()
    }

    /// Applies what the table says about events looked up with [`Self::stale`].
    pub(crate) fn refresh(&mut self, states: &[(Uuid, BlockerState)], dead_letters_hold: bool) {
        let states: HashMap<Uuid, BlockerState> = states.iter().copied().collect();
        for held in self.by_aggregate.values_mut() {
            held.retain(|k, until| match states.get(&k.1) {
                None => true,
                Some(BlockerState::Gone) => false,
                Some(BlockerState::Failed) => dead_letters_hold,
                Some(BlockerState::Pending(at)) => {
                    *until = Some(*at);
                    true
                }
            });
        }
        self.by_aggregate.retain(|_, held| !held.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::NewEvent;

    fn ev(agg: &str, secs: i64) -> OutboxEvent {
        let at = DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap_or_default();
        OutboxEvent::pending_for_test(NewEvent::new("t", "a", agg).occurred_at(at))
    }

    #[test]
    fn a_retry_holds_later_events_until_its_blocker_is_published() {
        let now = Utc::now();
        let later = now + chrono::Duration::seconds(5);
        let recheck = chrono::Duration::seconds(10);
        let mut holds = Holds::default();
        let (e1, e2, other) = (ev("x", 1), ev("x", 2), ev("y", 3));
        holds.record(
            std::slice::from_ref(&e1),
            &[Fate::Retry {
                error: "down".into(),
                at: later,
            }],
            false,
        );
        let (go, wait) = holds.split(vec![e2.clone(), other.clone()], now, recheck);
        assert_eq!(go, vec![other.clone()], "other aggregates go on");
        assert_eq!(wait.len(), 1);
        assert_eq!(
            wait[0].1,
            Fate::Release { at: later },
            "held until the blocker's retry"
        );

        // With its blocker in the batch, the aggregate goes (the waves keep it in order).
        let (go, wait) = holds.split(vec![e1.clone(), e2.clone()], now, recheck);
        assert_eq!((go.len(), wait.len()), (2, 0));

        // Past the blocker's time but without it: pushed just behind now, never sent early.
        let (_, wait) = holds.split(vec![e2.clone()], later + recheck, recheck);
        assert!(matches!(wait[0].1, Fate::Release { at } if at > later + recheck));

        holds.record(std::slice::from_ref(&e1), &[Fate::Published], false);
        assert_eq!(holds.len(), 0);
        let (go, _) = holds.split(vec![e2], now, recheck);
        assert_eq!(go.len(), 1);
    }

    #[test]
    fn every_displaced_event_holds_what_follows_it_not_only_the_first() {
        let now = Utc::now();
        let later = now + chrono::Duration::seconds(5);
        let recheck = chrono::Duration::seconds(10);
        let mut holds = Holds::default();
        let (e1, e2, e3) = (ev("x", 1), ev("x", 2), ev("x", 3));
        // e1 fails; e2, in the same batch, is handed back behind it.
        holds.record(
            &[e1.clone(), e2.clone()],
            &[
                Fate::Retry {
                    error: "down".into(),
                    at: later,
                },
                Fate::Release { at: later },
            ],
            false,
        );
        // e1 and e3 come back without e2: e1 goes, e3 still waits for e2.
        let (go, wait) = holds.split(vec![e1.clone(), e3.clone()], later, recheck);
        assert_eq!(go, vec![e1.clone()]);
        assert_eq!(wait.len(), 1);
        holds.record(std::slice::from_ref(&e1), &[Fate::Published], false);
        let (go, wait) = holds.split(vec![e3.clone()], later, recheck);
        assert!(go.is_empty() && wait.len() == 1, "e2 is not done yet");
        let (go, _) = holds.split(vec![e2.clone(), e3.clone()], later, recheck);
        assert_eq!(
            go.len(),
            2,
            "with e2 in the batch, the waves keep the order"
        );
        holds.record(std::slice::from_ref(&e2), &[Fate::Published], false);
        assert_eq!(holds.len(), 0);
    }

    #[test]
    fn dead_letters_hold_only_when_asked_and_refresh_drops_what_is_gone() {
        let now = Utc::now();
        let mut holds = Holds::default();
        let (e1, e2) = (ev("x", 1), ev("x", 2));
        let dead = [Fate::Dead {
            error: "bad".into(),
        }];
        holds.record(std::slice::from_ref(&e1), &dead, false);
        assert_eq!(
            holds.len(),
            0,
            "continue: the dead letter leaves the sequence"
        );
        holds.record(std::slice::from_ref(&e1), &dead, true);
        let (go, wait) = holds.split(vec![e2], now, chrono::Duration::seconds(10));
        assert!(go.is_empty());
        assert_eq!(
            wait[0].1,
            Fate::Release {
                at: now + chrono::Duration::seconds(10)
            }
        );
        assert_eq!(holds.stale(now, chrono::Duration::seconds(1)), vec![e1.id]);
        holds.refresh(&[(e1.id, BlockerState::Failed)], true);
        assert_eq!(holds.len(), 1, "still a dead letter");
        holds.refresh(&[(e1.id, BlockerState::Gone)], true);
        assert_eq!(holds.len(), 0, "discarded");
    }
}
