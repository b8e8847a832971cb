//! Delivery: handing a claimed batch to the publisher, whole or in per-aggregate waves, and
//! turning each outcome into a [`Fate`] (published, retry with backoff, dead letter, release).

use std::sync::atomic::Ordering as AtomicOrdering;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::config::{DeadLetterPolicy, OnExpiry};
use super::{Relay, lock};
use crate::event::OutboxEvent;
use crate::publisher::{PublishOutcome, Publisher};
use crate::store::{Fate, truncate_error};

impl<P: Publisher> Relay<P> {
    /// Unordered: the whole batch in one publisher call. Fates align with `events`.
    pub(super) async fn deliver_all(
        &self,
        events: &mut [OutboxEvent],
        cancel: &CancellationToken,
    ) -> Vec<Fate> {
        events.sort_by_key(|e| (e.occurred_at, e.id));
        let start = self.now();
        if events
            .iter()
            .any(|e| held_back(e, start, self.config.on_expiry).is_some())
        {
            return self.deliver_due(events, start, cancel).await;
        }
        let outcomes = self.publish(events, cancel).await;
        let done = self.now();
        match outcomes {
            Some(outcomes) if !self.observe(&outcomes) => events
                .iter()
                .zip(outcomes)
                .map(|(e, o)| self.fate(e, o, done))
                .collect(),
            _ => vec![Fate::Release { at: done }; events.len()],
        }
    }

    /// Unordered, with events scheduled for later or expired among them: those are handed back
    /// until their time or dead-lettered, the rest published in one call.
    async fn deliver_due(
        &self,
        events: &[OutboxEvent],
        start: DateTime<Utc>,
        cancel: &CancellationToken,
    ) -> Vec<Fate> {
        let mut fates: Vec<Option<Fate>> = events
            .iter()
            .map(|e| held_back(e, start, self.config.on_expiry))
            .collect();
        let due: Vec<usize> = (0..events.len()).filter(|&i| fates[i].is_none()).collect();
        let subset: Vec<OutboxEvent> = due.iter().map(|&i| events[i].clone()).collect();
        let outcomes = if subset.is_empty() {
            None
        } else {
            self.publish(&subset, cancel).await
        };
        let done = self.now();
        if let Some(outcomes) = outcomes.filter(|o| !self.observe(o)) {
            for (&i, o) in due.iter().zip(outcomes) {
                fates[i] = Some(self.fate(&events[i], o, done));
            }
        }
        fates
            .into_iter()
            .map(|f| f.unwrap_or(Fate::Release { at: done }))
            .collect()
    }

    /// Per-aggregate order: "waves". Wave k holds the k-th event of every aggregate in the batch,
    /// so one call never carries two events of one aggregate, and an aggregate's next event is
    /// only sent once the previous one was acknowledged. An aggregate whose event must be retried
    /// (or, under [`DeadLetterPolicy::Hold`], was dead-lettered) stops; its remaining events are
    /// released to wait for it. Other aggregates carry on.
    ///
    /// Reorders `events` (by wave); the fates align with the new order. Also sets the next
    /// claim's run per aggregate from this batch's shape, as claimed with run `claimed_with`.
    pub(super) async fn deliver_in_order(
        &self,
        events: &mut Vec<OutboxEvent>,
        claimed_with: u32,
        cancel: &CancellationToken,
    ) -> Vec<Fate> {
        let waves = Waves::sort(events);
        let share = next_share(
            claimed_with,
            self.config.events_per_aggregate,
            self.config.batch_size,
            events.len(),
            waves.chains,
            waves.longest,
        );
        self.share.store(share, AtomicOrdering::Relaxed);
        self.deliver_waves(events, &waves, cancel).await
    }

    /// One aggregate's events, one call each, in order, stopping at the first not published
    /// (a lane's step, [`lanes`](super::lanes)). Reorders `events`; the fates align.
    pub(super) async fn deliver_chain(
        &self,
        events: &mut Vec<OutboxEvent>,
        cancel: &CancellationToken,
    ) -> Vec<Fate> {
        let waves = Waves::sort(events);
        self.deliver_waves(events, &waves, cancel).await
    }

    /// Sends `events`, sorted into `waves`, wave by wave.
    async fn deliver_waves(
        &self,
        events: &[OutboxEvent],
        waves: &Waves,
        cancel: &CancellationToken,
    ) -> Vec<Fate> {
        let mut fates: Vec<Option<Fate>> = vec![None; events.len()];
        // Per chain: None while going; Some(at) once stopped, with when its rest may go again.
        let mut stopped: Vec<Option<DateTime<Utc>>> = vec![None; waves.chains];
        // Once a call finds the publisher unavailable, the rest of the batch goes back unsent.
        let mut outage = false;
        for (start, end) in waves.bounds() {
            // Not sent at all: an event scheduled to hold its aggregate, read before its time
            // (handed back until then with its chain, no attempt spent), or an expired one.
            let at_start = self.now();
            for i in start..end {
                let chain = waves.chain_of[i];
                let expiry = self.config.on_expiry;
                match held_back(&events[i], at_start, expiry).filter(|_| stopped[chain].is_none()) {
                    Some(Fate::Release { at }) => stopped[chain] = Some(at),
                    Some(gone) => {
                        // A discarded event is gone: nothing to wait for.
                        let dead = matches!(gone, Fate::Dead { .. });
                        if dead && self.config.dead_letter_policy == DeadLetterPolicy::Hold {
                            stopped[chain] = Some(at_start);
                        }
                        fates[i] = Some(gone);
                    }
                    None => {}
                }
            }
            let live: Vec<usize> = (start..end)
                .filter(|&i| stopped[waves.chain_of[i]].is_none() && fates[i].is_none())
                .collect();
            for i in start..end {
                if let Some(at) = stopped[waves.chain_of[i]]
                    && fates[i].is_none()
                {
                    fates[i] = Some(Fate::Release { at });
                }
            }
            if live.is_empty() {
                continue;
            }
            let outcomes = if cancel.is_cancelled() || outage {
                None
            } else if live.len() == end - start {
                self.publish(&events[start..end], cancel).await
            } else {
                let subset: Vec<OutboxEvent> = live.iter().map(|&i| events[i].clone()).collect();
                self.publish(&subset, cancel).await
            };
            let done = self.now();
            outage = outage || outcomes.as_ref().is_some_and(|o| self.observe(o));
            let Some(outcomes) = outcomes.filter(|_| !outage) else {
                for &i in &live {
                    stopped[waves.chain_of[i]] = Some(done);
                    fates[i] = Some(Fate::Release { at: done });
                }
                continue;
            };
            for (&i, o) in live.iter().zip(outcomes) {
                let fate = self.fate(&events[i], o, done);
                let stop = match &fate {
                    Fate::Retry { at, .. } | Fate::Release { at } => Some(*at),
                    Fate::Dead { .. }
                        if self.config.dead_letter_policy == DeadLetterPolicy::Hold =>
                    {
                        Some(done)
                    }
                    _ => None,
                };
                if stop.is_some() {
                    stopped[waves.chain_of[i]] = stop;
                }
                fates[i] = Some(fate);
            }
        }
        let done = self.now();
        fates
            .into_iter()
            .map(|f| f.unwrap_or(Fate::Release { at: done }))
            .collect()
    }

    /// Tells the breaker what a call found. Returns whether the publisher was unavailable for the
    /// whole call, which then goes back unattempted.
    fn observe(&self, outcomes: &[PublishOutcome]) -> bool {
        let mut breaker = lock(&self.breaker);
        match outcomes.first() {
            Some(PublishOutcome::Unavailable(reason))
                if outcomes.iter().all(PublishOutcome::is_unavailable) =>
            {
                breaker.unavailable(
                    &self.config.breaker,
                    reason,
                    &self.name,
                    self.publisher.name(),
                );
                true
            }
            _ => {
                breaker.answered(&self.name, self.publisher.name());
                false
            }
        }
    }

    /// One publisher call, bounded by `publish_timeout` ([`call_publisher`]); `None`, with
    /// nothing sent, once this relay may no longer publish these events (owned partitions
    /// lapsed or taken over).
    async fn publish(
        &self,
        events: &[OutboxEvent],
        cancel: &CancellationToken,
    ) -> Option<Vec<PublishOutcome>> {
        if !self.may_publish(events) {
            tracing::warn!(relay = %self.name, events = events.len(),
                "outbox partitions no longer held; events handed back unsent");
            return None;
        }
        call_publisher(
            &self.publisher,
            events,
            self.config.publish_timeout,
            self.config.shutdown_grace,
            cancel,
        )
        .await
    }

    fn fate(&self, event: &OutboxEvent, outcome: PublishOutcome, at: DateTime<Utc>) -> Fate {
        match outcome {
            PublishOutcome::Delivered => Fate::Published,
            // Only some of a call's events were unavailable (a partition without a leader, say):
            // hand them back for a while, spending nothing.
            PublishOutcome::Unavailable(_) => Fate::Release {
                at: at
                    + chrono::Duration::from_std(self.config.breaker.base)
                        .unwrap_or(chrono::Duration::MAX),
            },
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
}

/// A batch sorted into waves: by rank within its aggregate (its *chain*), so every wave is a
/// contiguous run of `events`.
struct Waves {
    /// The chain of the event at each position.
    chain_of: Vec<usize>,
    /// The rank within its chain of the event at each position.
    ranks: Vec<usize>,
    chains: usize,
    /// The longest chain's length.
    longest: usize,
}

impl Waves {
    /// Reorders `events` into waves.
    fn sort(events: &mut Vec<OutboxEvent>) -> Self {
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
        let mut slots: Vec<Option<OutboxEvent>> =
            std::mem::take(events).into_iter().map(Some).collect();
        *events = ranked
            .iter()
            .filter_map(|&(_, i)| slots[i].take())
            .collect();
        Self {
            chain_of: ranked.iter().map(|&(_, i)| chain_of[i]).collect(),
            ranks: ranked.iter().map(|&(r, _)| r).collect(),
            chains: chain + 1,
            longest,
        }
    }

    /// Each wave's `(start, end)` positions.
    fn bounds(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let mut start = 0;
        std::iter::from_fn(move || {
            let rank = *self.ranks.get(start)?;
            let end = start
                + self.ranks[start..]
                    .iter()
                    .take_while(|r| **r == rank)
                    .count();
            let wave = (start, end);
            start = end;
            Some(wave)
        })
    }
}

/// The run per aggregate for a relay's next ordered claim on PostgreSQL, from what its last
/// claim (made with `current`) got: `claimed` events from `aggregates` aggregates, the longest
/// run being `longest`.
///
/// * A full batch: ease back by an eighth towards `floor`, so that once many aggregates are due
///   again, batches spread over them and need fewer waves.
/// * A short batch with a run cut at `current`: too few aggregates are due to fill a batch, so
///   give each an even split of it.
/// * A short batch with every run complete: the backlog is shallow; back to `floor`.
pub(crate) fn next_share(
    current: u32,
    floor: u32,
    limit: u32,
    claimed: usize,
    aggregates: usize,
    longest: usize,
) -> u32 {
    let current = current.max(floor);
    let reached = |n: usize, of: u32| u64::try_from(n).unwrap_or(u64::MAX) >= u64::from(of);
    if reached(claimed, limit) {
        (current - current / 8).max(floor)
    } else if aggregates > 0 && reached(longest, current) {
        let aggregates = u32::try_from(aggregates).unwrap_or(u32::MAX);
        limit.div_ceil(aggregates).max(floor)
    } else {
        floor
    }
}

/// One publisher call, bounded by `timeout`. `None` when the relay is stopping and the call did
/// not finish within `grace`: the events' fate is unknown. A call that failed as a whole or
/// timed out found the publisher unavailable; one that returned the wrong number of outcomes is
/// a publisher bug, retried (it must not stall the relay for good).
pub(super) async fn call_publisher<P: Publisher>(
    publisher: &P,
    events: &[OutboxEvent],
    timeout: std::time::Duration,
    grace: std::time::Duration,
    cancel: &CancellationToken,
) -> Option<Vec<PublishOutcome>> {
    let call = tokio::time::timeout(timeout, publisher.publish(events));
    tokio::pin!(call);
    let result = tokio::select! {
        r = &mut call => r,
        () = cancel.cancelled() => tokio::time::timeout(grace, call).await.ok()?,
    };
    let all = |o: PublishOutcome| vec![o; events.len()];
    Some(match result {
        Ok(Ok(outcomes)) if outcomes.len() == events.len() => outcomes,
        Ok(Ok(outcomes)) => all(PublishOutcome::Retry(format!(
            "publisher `{}` returned {} outcomes for {} events",
            publisher.name(),
            outcomes.len(),
            events.len()
        ))),
        Ok(Err(e)) => all(PublishOutcome::Unavailable(e.to_string())),
        Err(_) => all(PublishOutcome::Unavailable(format!(
            "publish timed out after {timeout:?}"
        ))),
    })
}

/// The fate of a claimed event that must not be sent by `now`: expired (dead-lettered), or
/// scheduled for later (handed back until then; [`NewEvent::holds_later_events`] is claimed
/// at once).
///
/// [`NewEvent::holds_later_events`]: crate::NewEvent::holds_later_events
fn held_back(event: &OutboxEvent, now: DateTime<Utc>, on_expiry: OnExpiry) -> Option<Fate> {
    if let Some(at) = event.expires_at.filter(|at| *at <= now) {
        return Some(match on_expiry {
            OnExpiry::Discard => Fate::Discard,
            _ => Fate::expired(at),
        });
    }
    event
        .deliver_at
        .filter(|at| *at > now)
        .map(|at| Fate::Release { at })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::NewEvent;

    #[test]
    fn share_deepens_only_when_runs_were_cut_and_eases_back_when_full() {
        // 1,000 aggregates with long backlogs: 63 runs of 8 fill the batch; it stays at 8.
        assert_eq!(next_share(8, 8, 500, 500, 63, 8), 8);
        // Ten hot aggregates: runs of 8 were cut, batch short → an even split of 500.
        assert_eq!(next_share(8, 8, 500, 80, 10, 8), 50);
        // Full at 50: ease back by an eighth, then refill from the short batch that follows.
        assert_eq!(next_share(50, 8, 500, 500, 10, 50), 44);
        assert_eq!(next_share(44, 8, 500, 440, 10, 44), 50);
        // Shallow backlog (every run complete): back to the floor at once.
        assert_eq!(next_share(50, 8, 500, 30, 20, 3), 8);
        // Never below the floor, nor an empty batch's division by zero.
        assert_eq!(next_share(8, 8, 500, 500, 500, 1), 8);
        assert_eq!(next_share(1, 8, 500, 0, 0, 0), 8);
        assert_eq!(next_share(8, 8, 500, 8, 1, 8), 500);
    }

    #[test]
    fn waves_hold_one_event_per_aggregate_in_order() {
        let at =
            |s: i64| chrono::DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap_or_default();
        let ev = |agg: &str, s| {
            OutboxEvent::pending_for_test(NewEvent::new("t", "a", agg).occurred_at(at(s)))
        };
        let mut events = vec![ev("x", 2), ev("y", 5), ev("x", 1), ev("x", 3), ev("y", 4)];
        let waves = Waves::sort(&mut events);
        assert_eq!((waves.chains, waves.longest), (2, 3));
        let got: Vec<Vec<(String, i64)>> = waves
            .bounds()
            .map(|(s, e)| {
                events[s..e]
                    .iter()
                    .map(|e| {
                        (
                            e.aggregate_id.clone(),
                            e.occurred_at.timestamp() - 1_700_000_000,
                        )
                    })
                    .collect()
            })
            .collect();
        let want = vec![
            vec![("x".to_owned(), 1), ("y".to_owned(), 4)],
            vec![("x".to_owned(), 2), ("y".to_owned(), 5)],
            vec![("x".to_owned(), 3)],
        ];
        assert_eq!(got, want);
    }
}
