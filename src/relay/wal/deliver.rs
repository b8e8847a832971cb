//! Sending one read's events: publisher calls of up to `batch_size`, each event's outcome
//! honoured without breaking its aggregate's order.
//!
//! The slot moves only past what is settled, so an event cannot be skipped: it is delivered,
//! dead-lettered, or still here. Calls carry consecutive events in commit order; an event in a
//! retry's backoff holds its aggregate's later events while other aggregates go on. A call
//! that finds the broker unavailable opens the circuit breaker, and no attempt is spent while
//! it is open.

use std::collections::HashSet;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::LogRelay;
use super::read::Item;
use crate::event::{OutboxEvent, now};
use crate::publisher::{PublishOutcome, Publisher};
use crate::relay::breaker::Permit;
use crate::relay::delivery::call_publisher;
use crate::relay::lock;
use crate::store::LogDeadLetter;
use crate::store::truncate_error;
use crate::telemetry::metrics::{self, LogKind};

/// What became of a read's events.
#[derive(Default)]
pub(super) struct Delivery {
    pub(super) delivered: Vec<uuid::Uuid>,
    pub(super) dead: Vec<LogDeadLetter>,
    pub(super) retried: u64,
    /// Of `dead`, events that expired undelivered.
    pub(super) expired: u64,
    /// The first transaction with an event not settled, when the relay stopped before the end.
    pub(super) unsettled_from: Option<usize>,
}

/// An unsettled event; `event` is out while a call carries it.
struct Slot {
    event: Option<OutboxEvent>,
    txn: usize,
    attempts: u32,
    /// Not to be sent again before then (a retry's backoff).
    not_before: Option<Instant>,
}

impl<P: Publisher> LogRelay<P> {
    pub(super) async fn deliver(
        &self,
        items: Vec<Item>,
        cancel: &CancellationToken,
        stop_when_unavailable: bool,
    ) -> Delivery {
        let mut slots: Vec<Slot> = items
            .into_iter()
            .map(|i| Slot {
                event: Some(i.event),
                txn: i.txn,
                attempts: i.attempts,
                not_before: None,
            })
            .collect();
        let mut out = Delivery::default();
        let publisher = self.publisher.name().to_owned();
        let cfg = &self.config;
        while !slots.is_empty() && !cancel.is_cancelled() {
            let permit = lock(&self.breaker).permit(&cfg.breaker, cfg.batch_size, &publisher);
            let n = match permit {
                Permit::Claim(n) => n as usize,
                Permit::Wait(until) => {
                    if !self.pause_until(until, cancel).await {
                        break;
                    }
                    continue;
                }
            };
            let (taken, wake) = self.take(&slots, n);
            if taken.is_empty() {
                // Everything left waits for a retry's backoff.
                let until = wake.unwrap_or_else(|| Instant::now() + cfg.poll_interval);
                if !self.pause_until(until, cancel).await {
                    break;
                }
                continue;
            }
            let (taken, events) = self.expire(&mut slots, taken, &mut out, &publisher);
            if events.is_empty() {
                slots.retain(|s| s.event.is_some());
                continue;
            }
            // On shutdown an unfinished call's events stay unsettled: sent again by whoever
            // reads the slot next.
            let outcomes = call_publisher(
                &self.publisher,
                &events,
                cfg.publish_timeout,
                cfg.publish_timeout,
                cancel,
            )
            .await;
            let Some(outcomes) = outcomes else {
                put_back(&mut slots, &taken, events);
                break;
            };
            if outcomes.iter().all(PublishOutcome::is_unavailable) {
                let why = match outcomes.first() {
                    Some(PublishOutcome::Unavailable(r)) => r.clone(),
                    _ => String::new(),
                };
                put_back(&mut slots, &taken, events);
                lock(&self.breaker).unavailable(&cfg.breaker, &why, &self.name, &publisher);
                if stop_when_unavailable {
                    break;
                }
                continue;
            }
            lock(&self.breaker).answered(&self.name, &publisher);
            self.apply(&mut slots, &taken, events, outcomes, &mut out, &publisher);
            slots.retain(|s| s.event.is_some());
        }
        out.unsettled_from = slots.first().map(|s| s.txn);
        out
    }

    /// Waits until `until`; false if the relay is stopping.
    async fn pause_until(&self, until: Instant, cancel: &CancellationToken) -> bool {
        tokio::select! {
            () = cancel.cancelled() => false,
            () = tokio::time::sleep_until(until) => true,
        }
    }

    /// The slots the next call carries, in commit order, and when the first one in backoff is
    /// due. An aggregate with an event in backoff sends none of its later ones.
    fn take(&self, slots: &[Slot], n: usize) -> (Vec<usize>, Option<Instant>) {
        let now = Instant::now();
        let mut held: HashSet<(&str, &str)> = HashSet::new();
        let mut taken = Vec::with_capacity(n.min(slots.len()));
        let mut wake: Option<Instant> = None;
        for (i, s) in slots.iter().enumerate() {
            if taken.len() >= n {
                break;
            }
            let Some(e) = &s.event else { continue };
            let key = (e.aggregate_type.as_str(), e.aggregate_id.as_str());
            match s.not_before {
                Some(t) if t > now => {
                    wake = Some(wake.map_or(t, |w| w.min(t)));
                    held.insert(key);
                }
                _ if held.is_empty() || !held.contains(&key) => taken.push(i),
                _ => {}
            }
        }
        (taken, wake)
    }

    /// Takes the events of `taken` out of their slots; those expired by now are dead-lettered
    /// unsent, the others returned with their slots for the call.
    fn expire(
        &self,
        slots: &mut [Slot],
        taken: Vec<usize>,
        out: &mut Delivery,
        publisher: &str,
    ) -> (Vec<usize>, Vec<OutboxEvent>) {
        let now = now();
        let (mut live, mut events, mut expired) = (Vec::new(), Vec::new(), Vec::new());
        for i in taken {
            let Some(event) = slots[i].event.take() else {
                continue;
            };
            match event.expires_at.filter(|at| *at <= now) {
                Some(at) => {
                    out.dead.push(self.give_up(
                        &event,
                        slots[i].attempts,
                        &format!("expired at {at}"),
                    ));
                    expired.push(event);
                }
                None => {
                    live.push(i);
                    events.push(event);
                }
            }
        }
        out.expired += expired.len() as u64;
        metrics::log_settled(publisher, LogKind::DeadLettered, &expired);
        metrics::log_settled(publisher, LogKind::Expired, &expired);
        (live, events)
    }

    /// A dead letter for `event` after `attempts`, for `why`.
    fn give_up(&self, event: &OutboxEvent, attempts: u32, why: &str) -> LogDeadLetter {
        LogDeadLetter {
            id: event.id,
            event: Some(event.clone()),
            raw: None,
            slot: self.config.slot.clone(),
            error: truncate_error(why),
            attempts,
            failed_at: now(),
        }
    }

    /// Applies one call's outcomes to the slots it carried.
    fn apply(
        &self,
        slots: &mut [Slot],
        taken: &[usize],
        events: Vec<OutboxEvent>,
        outcomes: Vec<PublishOutcome>,
        out: &mut Delivery,
        publisher: &str,
    ) {
        let cfg = &self.config;
        let (mut sent, mut dead, mut retried) = (Vec::new(), Vec::new(), Vec::new());
        let give_up =
            |event: &OutboxEvent, attempts: u32, why: &str| self.give_up(event, attempts, why);
        for ((&i, event), outcome) in taken.iter().zip(events).zip(outcomes) {
            let s = &mut slots[i];
            match outcome {
                PublishOutcome::Delivered => {
                    out.delivered.push(event.id);
                    sent.push(event);
                }
                PublishOutcome::Reject(why) => {
                    out.dead.push(give_up(&event, s.attempts + 1, &why));
                    dead.push(event);
                }
                PublishOutcome::Retry(why) if s.attempts + 1 >= cfg.max_attempts => {
                    out.dead.push(give_up(&event, s.attempts + 1, &why));
                    dead.push(event);
                }
                PublishOutcome::Retry(why) => {
                    s.attempts += 1;
                    tracing::debug!(slot = %cfg.slot, event = %event.id, attempt = s.attempts,
                        error = %why, "outbox event refused; retrying");
                    s.not_before = Some(Instant::now() + cfg.backoff.delay(s.attempts));
                    out.retried += 1;
                    retried.push(event.clone());
                    s.event = Some(event);
                }
                // Unavailable for this event only: sent again, no attempt spent.
                _ => {
                    s.not_before = Some(Instant::now() + cfg.breaker.base);
                    s.event = Some(event);
                }
            }
        }
        metrics::log_settled(publisher, LogKind::Published, &sent);
        metrics::log_settled(publisher, LogKind::Retried, &retried);
        metrics::log_settled(publisher, LogKind::DeadLettered, &dead);
    }
}

/// Returns a call's events, unsettled, to their slots.
fn put_back(slots: &mut [Slot], taken: &[usize], events: Vec<OutboxEvent>) {
    for (&i, e) in taken.iter().zip(events) {
        slots[i].event = Some(e);
    }
}
