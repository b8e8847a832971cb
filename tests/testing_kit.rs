//! The `testing` feature's kit on every backend, used the way an app's tests would: what a
//! transaction wrote, a relay on a moved clock (scheduled events, backoff, expiry without
//! waiting), and a consumer fed from memory (`retry_after` held and handed back).
#![cfg(feature = "testing")]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::TestDb;
use sea_orm::{DatabaseTransaction, TransactionTrait};
use seaorm_outbox::inbox::{
    Consumer, ConsumerConfig, Handler, HandlerError, Incoming, OrderingKey,
};
use seaorm_outbox::relay::{DeadLetterPolicy, OnExpiry, RelayConfig};
use seaorm_outbox::testing::{MemorySource, TestRelay, events_written, stored};
use seaorm_outbox::{Error, NewEvent, Outbox, OutboxRepository, OutboxStatus};
use tokio_util::sync::CancellationToken;

on_all_backends!(
    a_transaction_sees_what_it_wrote_and_a_rollback_leaves_nothing,
    an_hour_ahead_is_delivered_when_the_clock_is_moved_not_before,
    a_consumer_fed_from_memory_holds_keyed_messages_and_hands_back_the_rest,
    an_expired_event_is_discarded_when_the_relay_is_told_so,
);

const WAIT: Duration = Duration::from_secs(10);

async fn a_transaction_sees_what_it_wrote_and_a_rollback_leaves_nothing(t: &TestDb) {
    let before = Outbox::new(&t.db)
        .add_event(NewEvent::new("user.created", "user", "1"))
        .await
        .expect("add");
    let txn = t.db.begin().await.expect("begin");
    let outbox = Outbox::new(&txn);
    for id in ["2", "3"] {
        outbox
            .add_event(NewEvent::new("user.created", "user", id))
            .await
            .expect("add");
    }
    let written = events_written(&txn).await.expect("written");
    let ids: Vec<&str> = written.iter().map(|e| e.aggregate_id.as_str()).collect();
    assert_eq!(ids, ["1", "2", "3"], "committed and this transaction's own");
    txn.rollback().await.expect("rollback");
    let written = events_written(&t.db).await.expect("written");
    assert_eq!(written.len(), 1);
    assert_eq!(written[0].id, before);
}

async fn an_hour_ahead_is_delivered_when_the_clock_is_moved_not_before(t: &TestDb) {
    let relay = TestRelay::start(&t.db).expect("relay");
    let outbox = Outbox::new(&t.db);
    let hour = Duration::from_secs(3600);
    let reminder = outbox
        .add_event(NewEvent::new("cart.reminder", "cart", "7").deliver_after(hour))
        .await
        .expect("add");
    let stale = outbox
        .add_event(
            NewEvent::new("price.quote", "cart", "8")
                .deliver_after(hour)
                .deliver_within(Duration::from_secs(1800)),
        )
        .await
        .expect("add");
    let now = outbox
        .add_event(NewEvent::new("order.placed", "order", "42"))
        .await
        .expect("add");
    relay.await_delivered(now, WAIT).await.expect("due now");
    // Another round of the relay, then nothing more: the hour has not passed.
    let round = relay.published().len();
    relay
        .drain_until(|p| p.len() >= round, WAIT)
        .await
        .expect("drain");
    assert_eq!(relay.published().len(), 1, "nothing scheduled went early");

    let started = Instant::now();
    relay.advance(2 * hour);
    let sent = relay
        .await_delivered(reminder, WAIT)
        .await
        .expect("after an hour");
    assert_eq!(sent.event_type, "cart.reminder");
    assert!(
        started.elapsed() < WAIT,
        "two hours in {:?}",
        started.elapsed()
    );
    // Two hours on, the quote's expiry (30 min after its time) has passed: dead-lettered
    // unsent.
    let deadline = Instant::now() + WAIT;
    while Outbox::new(&t.db).get(stale).await.expect("get").status != OutboxStatus::Failed {
        assert!(
            Instant::now() < deadline,
            "the expired event was not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stats = relay.stop().await;
    assert_eq!((stats.published, stats.expired), (2, 1));
    assert!(
        Outbox::new(&t.db)
            .get(stale)
            .await
            .expect("get")
            .last_error
            .is_some_and(|e| e.contains("expired")),
    );
}

/// Asks for a later retry on each message's first call; counts calls.
#[derive(Clone, Default)]
struct NotYet {
    calls: Arc<AtomicU32>,
    refusals: Arc<AtomicU32>,
}

#[async_trait]
impl Handler for NotYet {
    async fn handle(&self, _txn: &DatabaseTransaction, msg: &Incoming) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if msg.attempt == 1 {
            self.refusals.fetch_add(1, Ordering::Relaxed);
            return Err(HandlerError::retry_after(Duration::from_millis(200)));
        }
        Ok(())
    }
}

async fn run_consumer(
    t: &TestDb,
    config: ConsumerConfig,
    events: Vec<NewEvent>,
) -> (NotYet, Vec<Incoming>, seaorm_outbox::inbox::ConsumerStats) {
    let handler = NotYet::default();
    let consumer = Consumer::builder(t.db.clone(), "kit", handler.clone())
        .config(config)
        .build()
        .expect("consumer");
    let (source, feed) = MemorySource::new();
    let n = events.len();
    for e in events {
        feed.send_event(&stored(e).expect("valid"));
    }
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let stop = stop.clone();
        async move { consumer.run(source, stop).await }
    });
    let started = Instant::now();
    feed.wait_acked(n, WAIT).await.expect("acked");
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "applied before the delay"
    );
    stop.cancel();
    let stats = run.await.expect("task").expect("ran");
    (handler, feed.acked(), stats)
}

async fn a_consumer_fed_from_memory_holds_keyed_messages_and_hands_back_the_rest(t: &TestDb) {
    let events = vec![
        NewEvent::new("order.placed", "order", "1"),
        NewEvent::new("order.paid", "order", "1"),
    ];
    // Keyed (the aggregate id): held in the consumer, in order, never handed back.
    let (h, acked, stats) = run_consumer(t, ConsumerConfig::default(), events).await;
    let types: Vec<_> = acked
        .iter()
        .map(|m| m.header("event-type").unwrap_or(""))
        .collect();
    assert_eq!(types, ["order.placed", "order.paid"]);
    assert_eq!(h.calls.load(Ordering::Relaxed), 4);
    assert_eq!((stats.applied, stats.deferred, stats.retries), (2, 0, 2));
    assert!(
        acked.iter().all(|m| m.deliveries == 1),
        "never delivered again"
    );

    // Without keys: handed back to the source, which delivers them again after the delay.
    let config = ConsumerConfig::default().ordering(OrderingKey::none());
    let again = vec![
        NewEvent::new("order.placed", "order", "2"),
        NewEvent::new("order.paid", "order", "2"),
    ];
    let (_, acked, stats) = run_consumer(t, config, again).await;
    assert_eq!((stats.applied, stats.deferred), (2, 2));
    assert!(
        acked.iter().all(|m| m.deliveries == 2 && m.redelivered),
        "came again"
    );
}

/// `OnExpiry::Discard`: the expired event's row goes, it is counted, and (gone, not a dead
/// letter) it does not hold its aggregate even under `DeadLetterPolicy::Hold`.
async fn an_expired_event_is_discarded_when_the_relay_is_told_so(t: &TestDb) {
    let config = RelayConfig::default()
        .on_expiry(OnExpiry::Discard)
        .dead_letter_policy(DeadLetterPolicy::Hold);
    let relay = TestRelay::start_with(&t.db, config).expect("relay");
    let outbox = Outbox::new(&t.db);
    let hour = Duration::from_secs(3600);
    let quote = outbox
        .add_event(
            NewEvent::new("price.quote", "cart", "9")
                .deliver_after(hour)
                .deliver_within(Duration::from_secs(600)),
        )
        .await
        .expect("add");
    let after = outbox
        .add_event(NewEvent::new("cart.closed", "cart", "9").deliver_after(2 * hour))
        .await
        .expect("add");
    relay.advance(3 * hour);
    relay
        .await_delivered(after, WAIT)
        .await
        .expect("not held by the discarded one");
    let stats = relay.stop().await;
    assert_eq!(
        (stats.published, stats.expired, stats.dead_lettered),
        (1, 1, 0)
    );
    assert!(matches!(
        outbox.get(quote).await,
        Err(Error::NotFound { .. })
    ));
    assert_eq!(outbox.count_failed().await.expect("count"), 0);
}
