//! The inbox on every backend: the insert-first record, its transaction semantics, retention,
//! and the consumer core (ordering, retries, dead letters, replay, bad input, shutdown) fed by
//! an in-test source, so each behaviour is shown on all four database setups. The broker
//! sources are exercised end to end in `tests/inbox_e2e.rs`.

mod common;
#[path = "support/consumer.rs"]
mod consumer;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use common::TestDb;
use consumer::{Effects, Harness, create_effects, effects, fast, message};
use sea_orm::TransactionTrait;
use seaorm_outbox::Error;
use seaorm_outbox::inbox::{
    Consumer, ConsumerConfig, DeadLetters, Inbox, Incoming, MessageId, MissingId, Recorded,
};

on_all_backends!(
    record_is_insert_first_and_scoped_to_the_consumer,
    a_rolled_back_record_leaves_no_marker,
    bad_keys_are_refused_before_anything_is_written,
    retention_purges_old_ids_in_batches_and_keeps_recent_ones,
    same_key_runs_in_order_and_different_keys_in_parallel,
    failing_handlers_retry_then_dead_letter_and_replay_applies_them,
    messages_without_an_id_or_with_a_bad_payload_dead_letter_at_once,
    parallel_copies_of_one_message_apply_once,
    a_running_consumer_purges_ids_past_its_retention,
    consumer_processes_report_themselves_in_inbox_consumers,
);

// Not on in-memory SQLite: shutdown cancels a handler mid-transaction, and sqlx may then close
// the pool's only connection, which takes the in-memory database (and the test's tables) with
// it. The file-backed SQLite runs the same test.
on_backends!(
    [sqlite_file: SqliteFile, postgres: Postgres, mysql: MySql] =>
    shutdown_acknowledges_only_what_committed,
);

// ---- the record ----

async fn record_is_insert_first_and_scoped_to_the_consumer(t: &TestDb) {
    let txn = t.db.begin().await.expect("begin");
    let inbox = Inbox::new(&txn);
    assert_eq!(
        inbox.record("billing", "m-1").await.expect("record"),
        Recorded::New
    );
    assert_eq!(
        inbox.record("billing", "m-1").await.expect("record"),
        Recorded::Duplicate
    );
    // Another consumer of the same event has its own scope.
    assert_eq!(
        inbox.record("shipping", "m-1").await.expect("record"),
        Recorded::New
    );
    txn.commit().await.expect("commit");
    let inbox = Inbox::new(&t.db);
    assert!(inbox.is_processed("billing", "m-1").await.expect("lookup"));
    assert!(!inbox.is_processed("billing", "m-2").await.expect("lookup"));
    assert_eq!(inbox.count_processed(None).await.expect("count"), 2);
    assert_eq!(
        inbox.count_processed(Some("billing")).await.expect("count"),
        1
    );
}

async fn a_rolled_back_record_leaves_no_marker(t: &TestDb) {
    let txn = t.db.begin().await.expect("begin");
    assert_eq!(
        Inbox::new(&txn)
            .record("billing", "m-1")
            .await
            .expect("record"),
        Recorded::New
    );
    txn.rollback().await.expect("rollback");
    // The retry after a failed attempt must apply the message, not skip it.
    let txn = t.db.begin().await.expect("begin");
    assert_eq!(
        Inbox::new(&txn)
            .record("billing", "m-1")
            .await
            .expect("record"),
        Recorded::New
    );
    txn.commit().await.expect("commit");
}

async fn bad_keys_are_refused_before_anything_is_written(t: &TestDb) {
    let inbox = Inbox::new(&t.db);
    let long = "x".repeat(256);
    for (consumer, id) in [("", "m"), ("c", " "), ("c", long.as_str()), ("c", "a\0b")] {
        let err = inbox.record(consumer, id).await.expect_err("refused");
        assert!(matches!(err, Error::InvalidInboxKey { .. }), "{err}");
    }
    // 255 characters, multi-byte, fit.
    let fits = "é".repeat(255);
    assert_eq!(
        inbox.record("c", &fits).await.expect("record"),
        Recorded::New
    );
    assert_eq!(inbox.count_processed(None).await.expect("count"), 1);
    assert!(matches!(
        inbox.purge_processed(chrono::Utc::now(), 0).await,
        Err(Error::LimitTooLarge { .. })
    ));
}

async fn retention_purges_old_ids_in_batches_and_keeps_recent_ones(t: &TestDb) {
    let inbox = Inbox::new(&t.db);
    for i in 0..25 {
        inbox
            .record("c", &format!("old-{i}"))
            .await
            .expect("record");
    }
    let old = chrono::Utc::now() - chrono::Duration::days(30);
    t.exec(
        "age the old ids",
        "UPDATE inbox_messages SET processed_at = ? WHERE message_id LIKE 'old-%'",
        vec![old.into()],
    )
    .await;
    for i in 0..5 {
        inbox
            .record("c", &format!("new-{i}"))
            .await
            .expect("record");
    }
    let cutoff = chrono::Utc::now() - chrono::Duration::days(7);
    let mut batches = Vec::new();
    loop {
        let n = inbox.purge_processed(cutoff, 10).await.expect("purge");
        batches.push(n);
        if n < 10 {
            break;
        }
    }
    assert_eq!(batches, vec![10, 10, 5]);
    assert_eq!(inbox.count_processed(None).await.expect("count"), 5);
    assert!(inbox.is_processed("c", "new-0").await.expect("lookup"));
    assert!(!inbox.is_processed("c", "old-0").await.expect("lookup"));
}

// ---- the consumer ----

async fn same_key_runs_in_order_and_different_keys_in_parallel(t: &TestDb) {
    create_effects(t).await;
    let handler = Effects {
        delay: Duration::from_millis(3),
        ..Effects::default()
    };
    let h = Harness::start(t, "orders", handler, fast().concurrency(8));
    let n = 400;
    for i in 0..n {
        let agg = format!("a{}", i % 10);
        h.send(message(Some(&format!("m-{i}")), &agg, i as i64, i))
            .await;
    }
    h.wait_acks(n as usize).await;
    let stats = h.stop().await;
    assert_eq!(stats.applied, n);
    let applied = effects(t).await;
    assert_eq!(applied.len(), n as usize);
    let mut last: HashMap<String, i64> = HashMap::new();
    for (_, agg, seq) in &applied {
        let prev = last.insert(agg.clone(), *seq);
        assert!(prev.is_none_or(|p| p < *seq), "{agg}: {prev:?} then {seq}");
    }
}

async fn failing_handlers_retry_then_dead_letter_and_replay_applies_them(t: &TestDb) {
    create_effects(t).await;
    let handler = Effects::default();
    let failing = Arc::clone(&handler.fail_first);
    // m-1 fails twice then succeeds; m-2 fails more often than max_attempts allows.
    failing.lock().expect("fail_first").insert("m-1".into(), 2);
    failing.lock().expect("fail_first").insert("m-2".into(), 3);
    let h = Harness::start(t, "billing", handler, fast().max_attempts(3));
    for i in 0..4 {
        h.send(message(Some(&format!("m-{i}")), "a", i, i as u64))
            .await;
    }
    h.wait_acks(4).await;
    let inbox = Inbox::new(&t.db);
    let dead = inbox
        .dead_letters(DeadLetters::Consumer("billing"), 10, 0)
        .await
        .expect("list");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].message_id.as_deref(), Some("m-2"));
    assert_eq!(dead[0].attempts, 3);
    assert!(
        dead[0].error.contains("injected failure"),
        "{}",
        dead[0].error
    );
    assert_eq!(dead[0].source.as_deref(), Some("test-stream"));
    assert!(!inbox.is_processed("billing", "m-2").await.expect("lookup"));
    assert_eq!(effects(t).await.len(), 3);

    // Replayed while the bug persists, it fails again and stays, with its attempts added up.
    assert_eq!(
        inbox
            .replay(DeadLetters::Consumer("billing"))
            .await
            .expect("replay"),
        1
    );
    let limit = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let d = inbox
            .dead_letters(DeadLetters::Id(dead[0].id), 1, 0)
            .await
            .expect("list");
        if d.first()
            .is_some_and(|d| d.attempts == 6 && d.replay_requested_at.is_none())
        {
            break;
        }
        assert!(
            std::time::Instant::now() < limit,
            "replay never retried: {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Fixed, replayed: the running consumer applies it and drops the dead letter.
    failing.lock().expect("fail_first").clear();
    assert_eq!(
        inbox
            .replay(DeadLetters::Id(dead[0].id))
            .await
            .expect("replay"),
        1
    );
    let limit = std::time::Instant::now() + Duration::from_secs(20);
    while inbox.count_dead_letters(None).await.expect("count") > 0 {
        assert!(std::time::Instant::now() < limit, "replay never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(inbox.is_processed("billing", "m-2").await.expect("lookup"));
    let stats = h.stop().await;
    assert_eq!(stats.dead_lettered, 2, "first failure and failed replay");
    assert_eq!(stats.applied, 4);
    assert!(stats.retries >= 4, "{stats:?}");
    let ids: Vec<String> = effects(t).await.into_iter().map(|e| e.0).collect();
    assert_eq!(ids.iter().filter(|i| *i == "m-2").count(), 1);
    assert_eq!(ids.len(), 4);
}

async fn messages_without_an_id_or_with_a_bad_payload_dead_letter_at_once(t: &TestDb) {
    create_effects(t).await;
    let h = Harness::start(t, "strict", Effects::default(), fast());
    h.send(message(None, "a", 1, 1)).await;
    let bad = Incoming::new(
        "test-stream",
        vec![("event-id".into(), "bad-json".into())],
        b"{not json".to_vec(),
    );
    h.send(bad).await;
    h.send(message(Some("ok"), "a", 2, 3)).await;
    h.wait_acks(3).await;
    let stats = h.stop().await;
    assert_eq!(
        (stats.applied, stats.dead_lettered, stats.retries),
        (1, 2, 0)
    );
    let dead = Inbox::new(&t.db)
        .dead_letters(DeadLetters::All, 10, 0)
        .await
        .expect("list");
    let no_id = dead.iter().find(|d| d.message_id.is_none()).expect("no-id");
    assert_eq!(no_id.attempts, 0, "never reached the handler");
    assert!(no_id.error.contains("no id"), "{}", no_id.error);
    let bad = dead
        .iter()
        .find(|d| d.message_id.as_deref() == Some("bad-json"))
        .expect("bad payload");
    assert_eq!(bad.attempts, 1, "a permanent error is not retried");
    assert_eq!(bad.payload, b"{not json");

    // The fallback policy keys on the source position instead, stable across redeliveries.
    let config = fast()
        .message_id(MessageId::header("x-id"))
        .on_missing_id(MissingId::SourcePosition);
    let h = Harness::start(t, "lenient", Effects::default(), config);
    h.send(message(None, "a", 1, 7)).await;
    h.send(message(None, "a", 1, 7)).await;
    h.wait_acks(2).await;
    let stats = h.stop().await;
    assert_eq!((stats.applied, stats.duplicates), (1, 1));
    assert!(
        Inbox::new(&t.db)
            .is_processed("lenient", "test-stream@7")
            .await
            .expect("lookup")
    );
}

async fn parallel_copies_of_one_message_apply_once(t: &TestDb) {
    create_effects(t).await;
    // Two consumer instances of one logical consumer, each handed every message at once.
    let slow = || Effects {
        delay: Duration::from_millis(20),
        ..Effects::default()
    };
    let a = Harness::start(t, "ledger", slow(), fast());
    let b = Harness::start(t, "ledger", slow(), fast());
    let n = 30u64;
    for i in 0..n {
        let agg = format!("a{i}");
        a.send(message(Some(&format!("m-{i}")), &agg, 1, i)).await;
        b.send(message(Some(&format!("m-{i}")), &agg, 1, i)).await;
    }
    a.wait_acks(n as usize).await;
    b.wait_acks(n as usize).await;
    let (sa, sb) = (a.stop().await, b.stop().await);
    assert_eq!(sa.applied + sb.applied, n, "{sa:?} {sb:?}");
    assert_eq!(sa.duplicates + sb.duplicates, n, "{sa:?} {sb:?}");
    assert_eq!(effects(t).await.len(), n as usize);
}

async fn shutdown_acknowledges_only_what_committed(t: &TestDb) {
    create_effects(t).await;
    let handler = || Effects {
        delay: Duration::from_millis(100),
        ..Effects::default()
    };
    // One key: one message runs, the rest wait behind it.
    let run = |name: &'static str, config: ConsumerConfig, first: usize| {
        let h = Harness::start(t, name, handler(), config);
        async move {
            for i in first..first + 20 {
                h.send(message(Some(&format!("m-{i}")), "a", i as i64, i as u64))
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            let acks = Arc::clone(&h.acks);
            let stats = h.stop().await;
            let acked = acks.lock().expect("acks").clone();
            (stats, acked)
        }
    };
    // No drain: the stop waits only for the running attempt; the queue stays unacknowledged.
    let (stats, acked) = run("abrupt", fast().drain_timeout(Duration::ZERO), 0).await;
    let applied: Vec<String> = effects(t).await.into_iter().map(|e| e.0).collect();
    assert!(acked.len() < 20, "shutdown waited for the whole queue");
    assert_eq!(
        acked, applied,
        "acknowledged exactly what committed, in order"
    );
    assert_eq!(stats.applied as usize, applied.len());
    assert!(!applied.is_empty());

    // A drain long enough: everything received is applied and acknowledged before it returns.
    let (stats, acked) = run("graceful", fast(), 100).await;
    let drained: Vec<String> = effects(t)
        .await
        .into_iter()
        .map(|e| e.0)
        .filter(|id| !applied.contains(id))
        .collect();
    assert_eq!(acked.len(), 20, "a graceful stop drains what it received");
    assert_eq!(
        acked, drained,
        "acknowledged exactly what committed, in order"
    );
    assert_eq!(stats.applied, 20);

    // A drain shorter than the queue: what it reached is acknowledged, the rest is not.
    let (stats, acked) = run(
        "hurried",
        fast().drain_timeout(Duration::from_millis(400)),
        200,
    )
    .await;
    assert!(acked.len() < 20, "the drain is bounded by drain_timeout");
    assert!(
        acked.len() > 3,
        "the drain went on past the running attempt"
    );
    assert_eq!(stats.applied as usize, acked.len());
}

async fn a_running_consumer_purges_ids_past_its_retention(t: &TestDb) {
    create_effects(t).await;
    let inbox = Inbox::new(&t.db);
    for i in 0..7 {
        inbox
            .record("keeper", &format!("old-{i}"))
            .await
            .expect("record");
    }
    t.exec(
        "age them past a day",
        "UPDATE inbox_messages SET processed_at = ?",
        vec![(chrono::Utc::now() - chrono::Duration::hours(25)).into()],
    )
    .await;
    let config = fast()
        .retention(Some(Duration::from_secs(24 * 3600)))
        .purge_interval(Duration::from_millis(100))
        .purge_batch(3);
    let h = Harness::start(t, "keeper", Effects::default(), config);
    h.send(message(Some("fresh"), "a", 1, 1)).await;
    h.wait_acks(1).await;
    let limit = std::time::Instant::now() + Duration::from_secs(20);
    while inbox.count_processed(None).await.expect("count") > 1 {
        assert!(
            std::time::Instant::now() < limit,
            "the consumer never purged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.stop().await;
    assert!(inbox.is_processed("keeper", "fresh").await.expect("lookup"));
    assert!(!inbox.is_processed("keeper", "old-0").await.expect("lookup"));
    // A retention that would forget messages still in flight is refused.
    let err = Consumer::builder(t.db.clone(), "keeper", Effects::default())
        .config(fast().retention(Some(Duration::from_secs(5))))
        .build()
        .expect_err("refused");
    assert!(matches!(err, Error::Config(_)), "{err}");
}

// ---- heartbeats ----

/// Polls `inbox_consumers` until `ok` holds for what it lists.
async fn consumers_until(
    t: &TestDb,
    what: &str,
    ok: impl Fn(&[seaorm_outbox::inbox::ConsumerHeartbeat]) -> bool,
) -> Vec<seaorm_outbox::inbox::ConsumerHeartbeat> {
    let limit = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let rows = Inbox::new(&t.db)
            .consumers(Duration::from_secs(60))
            .await
            .expect("consumers");
        if ok(&rows) {
            return rows;
        }
        assert!(std::time::Instant::now() < limit, "{what}: {rows:#?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Three consumer processes (two of `billing`, one of `ledger`) write their rows: each
/// process's counts as its own stats say, the held messages and the lag of a process whose
/// key queue backs up, a rate per minute; a graceful stop removes its row, a crashed process's
/// row stops moving and drops out of a short window.
async fn consumer_processes_report_themselves_in_inbox_consumers(t: &TestDb) {
    create_effects(t).await;
    let beat = fast().heartbeat_interval(Some(Duration::from_millis(100)));
    // A: 80 messages of one key, the first retried until the test lets it go, while a message
    // of another key reaches A every 40 ms or so: A applies steadily with a key backed up.
    let hot = Arc::new(AtomicBool::new(true));
    let held = Effects {
        hold: Some(("hot".into(), Arc::clone(&hot))),
        ..Effects::default()
    };
    let a = Harness::start(t, "billing", held, beat.clone().max_attempts(u32::MAX));
    // B: 10 messages, 3 of them twice.
    let b = Harness::start(t, "billing", Effects::default(), beat.clone());
    // C: one message that always fails, dead-lettered after 2 attempts.
    let failing = Effects::default();
    failing
        .fail_first
        .lock()
        .expect("fail_first")
        .insert("bad-1".into(), u32::MAX);
    let c = Harness::start(t, "ledger", failing, beat.clone().max_attempts(2));

    for i in 0..80 {
        a.send(message(Some(&format!("a-{i}")), "hot", i, i as u64))
            .await;
    }
    for i in 0..13_i64 {
        let n = if i < 10 { i } else { i - 10 };
        b.send(message(
            Some(&format!("b-{n}")),
            &format!("k{n}"),
            n,
            i as u64,
        ))
        .await;
    }
    c.send(message(Some("bad-1"), "x", 0, 0)).await;

    // A's row shows its held messages, how long the oldest has waited, and a rate.
    let mut steady = 0_i64;
    let limit = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        a.send(message(
            Some(&format!("s-{steady}")),
            &format!("s{steady}"),
            0,
            100 + steady as u64,
        ))
        .await;
        steady += 1;
        let rows = Inbox::new(&t.db)
            .consumers(Duration::from_secs(60))
            .await
            .expect("consumers");
        if rows.iter().any(|r| {
            r.consumer == "billing"
                && r.held >= 80
                && r.lag_secs.is_some_and(|l| l > 0.1)
                && r.applied_per_min > 0.0
        }) {
            break;
        }
        assert!(
            std::time::Instant::now() < limit,
            "A holding a backed-up key: {rows:#?}"
        );
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    hot.store(false, std::sync::atomic::Ordering::SeqCst);
    let a_total = 80 + steady as u64;

    b.wait_acks(13).await;
    c.wait_acks(1).await;
    a.wait_acks(a_total as usize).await;
    // Every process's final counts reach its row.
    let rows = consumers_until(t, "final counts", |rows| {
        rows.len() == 3
            && rows
                .iter()
                .filter(|r| r.consumer == "billing")
                .any(|r| r.applied == a_total && r.held == 0)
            && rows
                .iter()
                .any(|r| r.consumer == "billing" && r.applied == 10 && r.duplicates == 3)
            && rows
                .iter()
                .any(|r| r.consumer == "ledger" && r.dead_lettered == 1 && r.retries >= 1)
    })
    .await;
    let a_instance = rows
        .iter()
        .find(|r| r.consumer == "billing" && r.applied == a_total)
        .map(|r| r.instance.clone())
        .expect("A's row");
    let mut instances: Vec<&str> = rows.iter().map(|r| r.instance.as_str()).collect();
    instances.sort_unstable();
    instances.dedup();
    assert_eq!(
        instances.len(),
        3,
        "each process its own instance: {rows:#?}"
    );
    assert!(
        rows.iter()
            .all(|r| r.broker == "test" && r.started_at <= r.heartbeat_at)
    );
    assert!(
        rows.iter().all(|r| r.lag_secs.is_none()),
        "nothing waits once all is applied: {rows:#?}"
    );

    // A graceful stop removes A's row and only A's.
    let stats = a.stop().await;
    assert_eq!(stats.applied, a_total);
    let rows = consumers_until(t, "A's row removed", |rows| rows.len() == 2).await;
    assert!(rows.iter().all(|r| r.instance != a_instance), "{rows:#?}");

    // A crash: C's row stays but stops moving, so a short window leaves it out.
    c.run.abort();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let recent = Inbox::new(&t.db)
        .consumers(Duration::from_millis(500))
        .await
        .expect("consumers");
    assert_eq!(
        recent
            .iter()
            .map(|r| r.consumer.as_str())
            .collect::<Vec<_>>(),
        vec!["billing"],
        "{recent:#?}"
    );
    let all = Inbox::new(&t.db)
        .consumers(Duration::from_secs(60))
        .await
        .expect("consumers");
    assert_eq!(
        all.len(),
        2,
        "the crashed process's row ages out later: {all:#?}"
    );
    b.stop().await;
}
