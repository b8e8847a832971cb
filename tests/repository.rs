//! The repository contract, run against SQLite (memory and file), PostgreSQL and MariaDB.

mod common;

use std::collections::HashMap;

use chrono::{Duration, TimeZone, Utc};
use common::TestDb;
use sea_orm::{ConnectionTrait, EntityTrait, PaginatorTrait, TransactionTrait};
use seaorm_outbox::repository::{MAX_ERROR_BYTES, MAX_PAGE_SIZE};
use seaorm_outbox::{
    DomainEvent, Error, InvalidEvent, NewEvent, Outbox, OutboxConfig, OutboxRepository,
    OutboxStatus,
};
use seaorm_outbox_entity::OutboxEvents;
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

on_all_backends!(
    commit_and_rollback_share_the_domain_transaction,
    unpublished_are_oldest_first_and_paginate,
    limit_above_maximum_is_an_error,
    mark_published_is_idempotent_and_checks_state,
    mark_published_many_uses_one_statement_and_reports_unknown_ids,
    dead_letter_round_trip_with_replay_and_discard,
    huge_error_message_is_truncated,
    unicode_and_large_payloads_round_trip,
    every_invalid_event_is_rejected_before_writing,
    typed_domain_events_round_trip,
    eight_concurrent_writers_are_all_counted,
    purge_removes_only_old_published_events,
    migrations_roll_back_and_apply_again,
    scheduled_events_are_validated_cancelled_and_rescheduled_with_typed_errors,
);

async fn total_rows(db: &impl ConnectionTrait) -> u64 {
    OutboxEvents::find().count(db).await.expect("count rows")
}

async fn create_orders_table(t: &TestDb) {
    t.db.execute_unprepared(
        "CREATE TABLE orders (id VARCHAR(64) NOT NULL PRIMARY KEY, total INTEGER NOT NULL)",
    )
    .await
    .expect("create orders");
}

async fn insert_order(db: &impl ConnectionTrait, id: &str) {
    db.execute_unprepared(&format!(
        "INSERT INTO orders (id, total) VALUES ('{id}', 100)"
    ))
    .await
    .expect("insert order");
}

async fn count_orders(db: &impl ConnectionTrait) -> i64 {
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT COUNT(*) AS n FROM orders",
        ))
        .await
        .expect("count orders")
        .expect("a row");
    row.try_get::<i64>("", "n").expect("n")
}

fn event(aggregate_id: &str) -> NewEvent {
    NewEvent::new("order.placed", "order", aggregate_id).payload(&json!({ "id": aggregate_id }))
}

async fn commit_and_rollback_share_the_domain_transaction(t: &TestDb) {
    create_orders_table(t).await;

    let txn = t.db.begin().await.expect("begin");
    insert_order(&txn, "kept").await;
    let kept = Outbox::new(&txn)
        .add_event(event("kept"))
        .await
        .expect("add");
    // Not visible outside the transaction before commit (SQLite memory has one connection).
    txn.commit().await.expect("commit");

    let txn = t.db.begin().await.expect("begin");
    insert_order(&txn, "dropped").await;
    Outbox::new(&txn)
        .add_event(event("dropped"))
        .await
        .expect("add");
    txn.rollback().await.expect("rollback");

    // A transaction dropped without commit rolls back too.
    {
        let txn = t.db.begin().await.expect("begin");
        insert_order(&txn, "abandoned").await;
        Outbox::new(&txn)
            .add_event(event("abandoned"))
            .await
            .expect("add");
    }

    let outbox = Outbox::new(&t.db);
    assert_eq!(count_orders(&t.db).await, 1);
    assert_eq!(outbox.count_unpublished().await.expect("count"), 1);
    let pending = outbox.get_unpublished(10, 0).await.expect("list");
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].id, kept);
    assert_eq!(pending[0].aggregate_id, "kept");
    assert_eq!(pending[0].status, OutboxStatus::Pending);
}

async fn unpublished_are_oldest_first_and_paginate(t: &TestDb) {
    let outbox = Outbox::new(&t.db);
    let base = Utc
        .with_ymd_and_hms(2026, 1, 1, 12, 0, 0)
        .single()
        .expect("time");
    // Written out of order; two share an occurred_at so the id must break the tie.
    let specs = [(5, "e"), (1, "a"), (3, "c"), (3, "d"), (2, "b")];
    let mut written = Vec::new();
    for (secs, name) in specs {
        let e = event(name).occurred_at(base + Duration::seconds(secs));
        written.push((base + Duration::seconds(secs), e.event_id(), name));
        outbox.add_event(e).await.expect("add");
    }
    written.sort_by_key(|(at, id, _)| (*at, *id));
    let expected: Vec<Uuid> = written.iter().map(|(_, id, _)| *id).collect();

    let all = outbox.get_unpublished(100, 0).await.expect("all");
    assert_eq!(all.iter().map(|e| e.id).collect::<Vec<_>>(), expected);
    assert_eq!(all[0].occurred_at, base + Duration::seconds(1));

    let mut paged = Vec::new();
    for page in 0..3 {
        paged.extend(outbox.get_unpublished(2, page * 2).await.expect("page"));
    }
    assert_eq!(paged.iter().map(|e| e.id).collect::<Vec<_>>(), expected);
    assert!(
        outbox
            .get_unpublished(2, 10)
            .await
            .expect("past end")
            .is_empty()
    );
    assert!(outbox.get_unpublished(0, 0).await.expect("zero").is_empty());
}

async fn limit_above_maximum_is_an_error(t: &TestDb) {
    let outbox = Outbox::new(&t.db);
    let err = outbox
        .get_unpublished(MAX_PAGE_SIZE + 1, 0)
        .await
        .expect_err("must fail");
    assert!(
        matches!(err, Error::LimitTooLarge { requested, max } if requested == MAX_PAGE_SIZE + 1 && max == MAX_PAGE_SIZE),
        "{err:?}"
    );
    assert!(outbox.get_unpublished(MAX_PAGE_SIZE, 0).await.is_ok());
    assert!(matches!(
        outbox.list_failed(u64::MAX, 0).await,
        Err(Error::LimitTooLarge { .. })
    ));
}

async fn mark_published_is_idempotent_and_checks_state(t: &TestDb) {
    let outbox = Outbox::new(&t.db);
    let a = outbox.add_event(event("a")).await.expect("add");
    let b = outbox.add_event(event("b")).await.expect("add");

    outbox.mark_published(a).await.expect("publish");
    let first = outbox.get(a).await.expect("get");
    assert_eq!(first.status, OutboxStatus::Published);
    assert!(first.published_at.is_some());

    // Again: fine, and published_at does not move.
    outbox.mark_published(a).await.expect("idempotent");
    assert_eq!(
        outbox.get(a).await.expect("get").published_at,
        first.published_at
    );
    assert_eq!(outbox.count_unpublished().await.expect("count"), 1);

    let unknown = Uuid::now_v7();
    assert!(
        matches!(outbox.mark_published(unknown).await, Err(Error::NotFound { id }) if id == unknown)
    );

    // A dead letter cannot be published behind the operator's back: requeue it first.
    outbox.mark_failed(b, "broker said no").await.expect("fail");
    let err = outbox.mark_published(b).await.expect_err("must fail");
    assert!(
        matches!(err, Error::InvalidState { id, status: OutboxStatus::Failed, .. } if id == b),
        "{err:?}"
    );
    assert_eq!(
        outbox.get(b).await.expect("get").status,
        OutboxStatus::Failed
    );
}

async fn mark_published_many_uses_one_statement_and_reports_unknown_ids(t: &TestDb) {
    let outbox = Outbox::new(&t.db);
    let ids = outbox
        .add_events((0..5).map(|i| event(&i.to_string())).collect())
        .await
        .expect("add");
    assert_eq!(
        outbox.mark_published_many(&ids[..3]).await.expect("mark"),
        3
    );
    // Already-published ids are skipped, not errors.
    assert_eq!(
        outbox.mark_published_many(&ids[..4]).await.expect("mark"),
        1
    );
    assert_eq!(outbox.count_unpublished().await.expect("count"), 1);
    assert_eq!(outbox.mark_published_many(&[]).await.expect("empty"), 0);

    let unknown = Uuid::now_v7();
    let err = outbox
        .mark_published_many(&[ids[4], unknown])
        .await
        .expect_err("must fail");
    assert!(
        matches!(err, Error::NotFound { id } if id == unknown),
        "{err:?}"
    );
}

async fn dead_letter_round_trip_with_replay_and_discard(t: &TestDb) {
    let outbox = Outbox::new(&t.db);
    let a = outbox.add_event(event("a")).await.expect("add");
    let b = outbox.add_event(event("b")).await.expect("add");
    let c = outbox.add_event(event("c")).await.expect("add");

    outbox
        .mark_failed(a, "payload rejected")
        .await
        .expect("fail a");
    outbox
        .mark_failed(b, "retries exhausted")
        .await
        .expect("fail b");
    // Idempotent: the first error stays.
    outbox.mark_failed(a, "again").await.expect("fail a again");

    assert_eq!(outbox.count_unpublished().await.expect("count"), 1);
    let pending = outbox.get_unpublished(10, 0).await.expect("list");
    assert_eq!(pending.iter().map(|e| e.id).collect::<Vec<_>>(), vec![c]);
    assert_eq!(outbox.count_failed().await.expect("failed"), 2);
    let failed = outbox.list_failed(10, 0).await.expect("list failed");
    assert_eq!(failed.len(), 2);
    let fa = failed.iter().find(|e| e.id == a).expect("a is dead");
    assert_eq!(fa.status, OutboxStatus::Failed);
    assert_eq!(fa.last_error.as_deref(), Some("payload rejected"));
    assert!(fa.failed_at.is_some());

    // Published events cannot be dead-lettered; unknown ids are NotFound.
    outbox.mark_published(c).await.expect("publish c");
    assert!(matches!(
        outbox.mark_failed(c, "late").await,
        Err(Error::InvalidState {
            status: OutboxStatus::Published,
            ..
        })
    ));
    assert!(matches!(
        outbox.mark_failed(Uuid::now_v7(), "x").await,
        Err(Error::NotFound { .. })
    ));

    // Replay a: back to pending, attempts reset, failed_at cleared, error kept for the record.
    outbox.replay(a).await.expect("requeue");
    let ra = outbox.get(a).await.expect("get");
    assert_eq!(ra.status, OutboxStatus::Pending);
    assert_eq!(ra.attempts, 0);
    assert!(ra.failed_at.is_none());
    assert_eq!(outbox.count_unpublished().await.expect("count"), 1);
    // Only dead letters can be requeued or discarded.
    assert!(matches!(
        outbox.replay(a).await,
        Err(Error::InvalidState { .. })
    ));
    assert!(matches!(
        outbox.discard(a).await,
        Err(Error::InvalidState { .. })
    ));
    assert!(matches!(
        outbox.replay(Uuid::now_v7()).await,
        Err(Error::NotFound { .. })
    ));

    // Discard b for good.
    outbox.discard(b).await.expect("discard");
    assert!(matches!(outbox.get(b).await, Err(Error::NotFound { .. })));
    assert_eq!(outbox.count_failed().await.expect("failed"), 0);

    // Bulk replay by aggregate and all.
    let d = outbox.add_event(event("d")).await.expect("add");
    let e = outbox.add_event(event("e")).await.expect("add");
    outbox.mark_failed(d, "x").await.expect("fail");
    outbox.mark_failed(e, "x").await.expect("fail");
    assert_eq!(
        outbox
            .replay_aggregate("order", "d")
            .await
            .expect("by aggregate"),
        1
    );
    assert_eq!(
        outbox
            .replay_aggregate("order", "D")
            .await
            .expect("case matters"),
        0
    );
    assert_eq!(outbox.replay_all().await.expect("all"), 1);
    assert_eq!(outbox.count_unpublished().await.expect("count"), 3);
}

async fn huge_error_message_is_truncated(t: &TestDb) {
    let outbox = Outbox::new(&t.db);
    let id = outbox.add_event(event("a")).await.expect("add");
    let huge = "x".repeat(10 * 1024 * 1024);
    outbox
        .mark_failed(id, &huge)
        .await
        .expect("fail with 10 MB message");
    let stored = outbox
        .get(id)
        .await
        .expect("get")
        .last_error
        .expect("error kept");
    assert!(
        stored.len() <= MAX_ERROR_BYTES + 64,
        "{} bytes stored",
        stored.len()
    );
    assert!(stored.starts_with("xxxx"));
    assert!(stored.ends_with(&format!("{} bytes in all]", huge.len())));
}

async fn unicode_and_large_payloads_round_trip(t: &TestDb) {
    let outbox = Outbox::new(&t.db);
    let text = "Grüße, 世界! 🚀 \u{1} \"quotes\" \\ back\nslash";
    let payload = json!({ "text": text, "nested": { "emoji": "👩‍👩‍👧", "n": 1.5 } });
    let id = outbox
        .add_event(
            NewEvent::new("café.commandé", "客户", "ключ-1")
                .json_payload(payload.clone())
                .header("note", "ünïcödé ✓"),
        )
        .await
        .expect("add unicode");
    let got = outbox.get(id).await.expect("get");
    assert_eq!(got.payload, payload);
    assert_eq!(got.event_type, "café.commandé");
    assert_eq!(got.aggregate_type, "客户");
    assert_eq!(got.aggregate_id, "ключ-1");
    assert_eq!(
        got.headers.get("note").map(String::as_str),
        Some("ünïcödé ✓")
    );

    // Just under the default 1 MiB limit.
    let big = "ab".repeat(500_000);
    let id = outbox
        .add_event(event("big").payload(&json!({ "blob": big })))
        .await
        .expect("add large");
    assert_eq!(
        outbox.get(id).await.expect("get").payload["blob"].as_str(),
        Some(big.as_str())
    );
}

async fn every_invalid_event_is_rejected_before_writing(t: &TestDb) {
    let outbox = Outbox::with_config(&t.db, OutboxConfig::default().max_payload_bytes(1000));
    let non_string_keys: HashMap<(i32, i32), i32> = [((1, 2), 3)].into_iter().collect();
    type Case = (&'static str, NewEvent, fn(&InvalidEvent) -> bool);
    let cases: Vec<Case> = vec![
        ("empty type", NewEvent::new("", "order", "1"), |e| {
            matches!(
                e,
                InvalidEvent::Empty {
                    field: "event_type"
                }
            )
        }),
        ("blank aggregate type", NewEvent::new("t", "  ", "1"), |e| {
            matches!(
                e,
                InvalidEvent::Empty {
                    field: "aggregate_type"
                }
            )
        }),
        ("empty aggregate id", NewEvent::new("t", "order", ""), |e| {
            matches!(
                e,
                InvalidEvent::Empty {
                    field: "aggregate_id"
                }
            )
        }),
        (
            "too long type",
            NewEvent::new("t".repeat(256), "order", "1"),
            |e| {
                matches!(
                    e,
                    InvalidEvent::TooLong {
                        field: "event_type",
                        len: 256,
                        max: 255
                    }
                )
            },
        ),
        (
            "payload fails to serialise",
            event("1").payload(&non_string_keys),
            |e| matches!(e, InvalidEvent::Payload(_)),
        ),
        (
            "payload too large",
            event("1").payload(&"x".repeat(2000)),
            |e| matches!(e, InvalidEvent::PayloadTooLarge { limit: 1000, .. }),
        ),
        (
            "NUL in payload",
            event("1").payload(&json!({ "deep": ["ok", "a\u{0}b"] })),
            |e| matches!(e, InvalidEvent::NulCharacter),
        ),
        (
            "NUL in aggregate id",
            NewEvent::new("t", "order", "a\u{0}"),
            |e| matches!(e, InvalidEvent::NulCharacter),
        ),
        (
            "headers not an object",
            event("1").headers_json(json!(["a", "b"])),
            |e| matches!(e, InvalidEvent::Headers { .. }),
        ),
        (
            "header value not a string",
            event("1").headers_json(json!({ "retries": 3 })),
            |e| matches!(e, InvalidEvent::Headers { .. }),
        ),
    ];
    for (what, bad, is_expected) in cases {
        match outbox.add_event(bad).await {
            Err(Error::InvalidEvent(e)) => assert!(is_expected(&e), "{what}: got {e:?}"),
            other => panic!("{what}: expected InvalidEvent, got {other:?}"),
        }
        assert_eq!(total_rows(&t.db).await, 0, "{what}: nothing may be written");
    }

    // One bad event in a batch rejects the whole batch.
    let err = outbox
        .add_events(vec![
            event("ok"),
            NewEvent::new("", "order", "2"),
            event("ok2"),
        ])
        .await
        .expect_err("must fail");
    assert!(matches!(
        err,
        Error::InvalidEvent(InvalidEvent::Empty { .. })
    ));
    assert_eq!(total_rows(&t.db).await, 0);

    // Exactly at the limit is accepted.
    let at_limit = "y".repeat(998); // 998 + 2 quotes = 1000 bytes of JSON
    outbox
        .add_event(event("1").payload(&at_limit))
        .await
        .expect("at limit");
    assert_eq!(total_rows(&t.db).await, 1);
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct OrderPlaced {
    order_id: u64,
    lines: Vec<String>,
}

impl DomainEvent for OrderPlaced {
    fn event_type(&self) -> &str {
        "order.placed"
    }
    fn aggregate_type(&self) -> &str {
        "order"
    }
    fn aggregate_id(&self) -> String {
        self.order_id.to_string()
    }
    fn headers(&self) -> seaorm_outbox::Headers {
        [("schema".to_owned(), "v1".to_owned())]
            .into_iter()
            .collect()
    }
}

async fn typed_domain_events_round_trip(t: &TestDb) {
    let txn = t.db.begin().await.expect("begin");
    let placed = OrderPlaced {
        order_id: 7,
        lines: vec!["tea".into()],
    };
    let id = Outbox::new(&txn).add(&placed).await.expect("add typed");
    txn.commit().await.expect("commit");

    let got = Outbox::new(&t.db).get(id).await.expect("get");
    assert_eq!(got.event_type, "order.placed");
    assert_eq!(got.aggregate_id, "7");
    assert_eq!(got.headers.get("schema").map(String::as_str), Some("v1"));
    assert_eq!(got.payload_as::<OrderPlaced>().expect("decode"), placed);
    assert_eq!(id.get_version_num(), 7, "ids are UUIDv7");
}

async fn eight_concurrent_writers_are_all_counted(t: &TestDb) {
    create_orders_table(t).await;
    let mut tasks = Vec::new();
    for w in 0..8 {
        let db = t.db.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                let txn = db.begin().await.expect("begin");
                let id = format!("{w}-{i}");
                insert_order(&txn, &id).await;
                Outbox::new(&txn).add_event(event(&id)).await.expect("add");
                txn.commit().await.expect("commit");
            }
            // And one batch per writer.
            let batch = (0..10).map(|i| event(&format!("{w}-batch-{i}"))).collect();
            Outbox::new(&db).add_events(batch).await.expect("batch")
        }));
    }
    for task in tasks {
        assert_eq!(task.await.expect("writer").len(), 10);
    }
    assert_eq!(
        Outbox::new(&t.db).count_unpublished().await.expect("count"),
        8 * 35
    );
    assert_eq!(count_orders(&t.db).await, 8 * 25);
}

async fn purge_removes_only_old_published_events(t: &TestDb) {
    let outbox = Outbox::new(&t.db);
    let ids = outbox
        .add_events((0..25).map(|i| event(&i.to_string())).collect())
        .await
        .expect("add");
    outbox
        .mark_published_many(&ids[..20])
        .await
        .expect("publish");
    outbox.mark_failed(ids[20], "dead").await.expect("fail");

    // Nothing is older than an hour ago.
    let hour_ago = Utc::now() - Duration::hours(1);
    assert_eq!(outbox.purge_published(hour_ago, 7).await.expect("purge"), 0);

    // Everything published so far is older than a moment from now; batches of 7 take 3 rounds.
    let cutoff = Utc::now() + Duration::seconds(1);
    assert_eq!(outbox.purge_published(cutoff, 7).await.expect("purge"), 20);
    assert_eq!(total_rows(&t.db).await, 5, "pending and failed rows stay");
    assert_eq!(outbox.count_unpublished().await.expect("count"), 4);
    assert_eq!(outbox.count_failed().await.expect("failed"), 1);
    assert!(matches!(
        outbox.purge_published(cutoff, 0).await,
        Err(Error::LimitTooLarge { .. })
    ));
}

/// A host app rolls the outbox migrations back and forth with its own; afterwards the outbox
/// works, and on PostgreSQL the lease ids are stored without a compression attempt (m0006).
async fn migrations_roll_back_and_apply_again(t: &TestDb) {
    use sea_orm_migration::MigratorTrait;
    use seaorm_outbox_migration::Migrator;

    let outbox = Outbox::new(&t.db);
    outbox.add_event(event("before")).await.expect("add");
    Migrator::down(&t.db, None)
        .await
        .expect("every migration rolls back");
    assert!(
        outbox.count_unpublished().await.is_err(),
        "rolled back, the outbox table is gone"
    );
    Migrator::up(&t.db, None).await.expect("and applies again");
    outbox.add_event(event("after")).await.expect("add again");
    assert_eq!(outbox.count_unpublished().await.expect("count"), 1);

    if t.db_backend() == sea_orm::DbBackend::Postgres {
        let row =
            t.db.query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT attstorage::text AS s FROM pg_attribute \
                 WHERE attrelid = 'outbox_leases'::regclass AND attname = 'ids'",
            ))
            .await
            .expect("catalog")
            .expect("outbox_leases.ids exists");
        assert_eq!(row.try_get::<String>("", "s").expect("storage"), "e");
    }
}

/// The row's `(next_attempt_at, deliver_at)`.
async fn schedule_of(
    db: &impl ConnectionTrait,
    id: Uuid,
) -> Option<(chrono::DateTime<Utc>, Option<chrono::DateTime<Utc>>)> {
    OutboxEvents::find_by_id(id)
        .one(db)
        .await
        .expect("row")
        .map(|m| (m.next_attempt_at, m.deliver_at))
}

async fn scheduled_events_are_validated_cancelled_and_rescheduled_with_typed_errors(t: &TestDb) {
    let outbox = Outbox::new(&t.db);
    let event = |id: &str| NewEvent::new("reminder.due", "order", id);

    // Beyond `max_delay`: refused, and one such event in a batch writes none of it.
    let short = Outbox::with_config(
        &t.db,
        OutboxConfig::default().max_delay(std::time::Duration::from_secs(3600)),
    );
    let err = short
        .add_events(vec![
            event("a"),
            event("b").deliver_after(std::time::Duration::from_secs(7200)),
        ])
        .await
        .expect_err("two hours is past a one-hour max_delay");
    assert!(
        matches!(
            err,
            Error::InvalidEvent(InvalidEvent::DeliverTooLate { .. })
        ),
        "{err:?}"
    );
    let err = outbox
        .add_event(event("c").deliver_after(std::time::Duration::MAX))
        .await
        .expect_err("an overflowing delay");
    assert!(
        matches!(
            err,
            Error::InvalidEvent(InvalidEvent::DeliverTooLate { .. })
        ),
        "{err:?}"
    );
    assert_eq!(total_rows(&t.db).await, 0, "nothing written");

    // A past time means now: due at once, and not a scheduled event.
    let past = outbox
        .add_event(event("past").deliver_at(Utc::now() - Duration::hours(1)))
        .await
        .expect("past");
    let (next, deliver_at) = schedule_of(&t.db, past).await.expect("row");
    assert!(next <= Utc::now());
    assert_eq!(deliver_at, None);
    // A future time: due then, and not counted as due before.
    let at = Utc::now() + Duration::hours(1);
    let later = outbox
        .add_event(event("later").deliver_at(at))
        .await
        .expect("later");
    let (next, deliver_at) = schedule_of(&t.db, later).await.expect("row");
    assert!((next - at).num_milliseconds().abs() < 1, "{next} vs {at}");
    assert_eq!(deliver_at, Some(next));
    assert_eq!(outbox.stats().await.expect("stats").pending_due, 1);

    // Reschedule: later, to the past (due now), and beyond max_delay (refused, unchanged).
    let two_hours = Utc::now() + Duration::hours(2);
    outbox
        .reschedule(later, two_hours)
        .await
        .expect("reschedule");
    let (next, _) = schedule_of(&t.db, later).await.expect("row");
    assert!((next - two_hours).num_milliseconds().abs() < 1);
    let err = short
        .reschedule(later, Utc::now() + Duration::days(2))
        .await
        .expect_err("past max_delay");
    assert!(
        matches!(
            err,
            Error::InvalidEvent(InvalidEvent::DeliverTooLate { .. })
        ),
        "{err:?}"
    );
    let soon = outbox
        .add_event(event("soon").deliver_after(std::time::Duration::from_secs(3600)))
        .await
        .expect("soon");
    outbox
        .reschedule(soon, Utc::now() - Duration::minutes(5))
        .await
        .expect("to now");
    let (next, _) = schedule_of(&t.db, soon).await.expect("row");
    assert!(next <= Utc::now(), "due now");
    // Now due: too late to take back.
    let err = outbox.cancel(soon).await.expect_err("due");
    assert!(
        matches!(
            err,
            Error::NotScheduled {
                operation: "cancelled",
                ..
            }
        ),
        "{err:?}"
    );

    // Cancel inside a transaction that rolls back: still there; committed: gone, then NotFound.
    let txn = t.db.begin().await.expect("begin");
    Outbox::new(&txn).cancel(later).await.expect("cancel");
    txn.rollback().await.expect("rollback");
    assert!(
        schedule_of(&t.db, later).await.is_some(),
        "a rollback keeps it"
    );
    let txn = t.db.begin().await.expect("begin");
    Outbox::new(&txn).cancel(later).await.expect("cancel");
    txn.commit().await.expect("commit");
    assert!(schedule_of(&t.db, later).await.is_none());
    let err = outbox.cancel(later).await.expect_err("gone");
    assert!(
        matches!(err, Error::NotFound { id } if id == later),
        "{err:?}"
    );

    // Within the margin of its time: a relay may already hold it.
    let edge = outbox
        .add_event(event("edge").deliver_after(std::time::Duration::from_millis(1500)))
        .await
        .expect("edge");
    let err = outbox.cancel(edge).await.expect_err("within the margin");
    assert!(
        matches!(err, Error::NotScheduled { reason, .. } if reason.contains("due")),
        "{err:?}"
    );
    // Never scheduled; published; dead-lettered; attempted.
    let plain = outbox.add_event(event("plain")).await.expect("plain");
    let err = outbox.cancel(plain).await.expect_err("not scheduled");
    assert!(
        matches!(err, Error::NotScheduled { reason, .. } if reason.contains("not scheduled")),
        "{err:?}"
    );
    outbox.mark_published(plain).await.expect("publish");
    let err = outbox
        .reschedule(plain, two_hours)
        .await
        .expect_err("published");
    assert!(
        matches!(
            err,
            Error::InvalidState {
                status: OutboxStatus::Published,
                operation: "reschedule",
                ..
            }
        ),
        "{err:?}"
    );
    let dead = outbox
        .add_event(event("dead").deliver_after(std::time::Duration::from_secs(3600)))
        .await
        .expect("dead");
    outbox
        .mark_failed(dead, "poison")
        .await
        .expect("dead-letter");
    let err = outbox.cancel(dead).await.expect_err("dead letter");
    assert!(
        matches!(
            err,
            Error::InvalidState {
                status: OutboxStatus::Failed,
                ..
            }
        ),
        "{err:?}"
    );
    // Holding its aggregate: due at once (a relay must read it to hold), still cancellable
    // and reschedulable while its time is ahead, and never made due later by a reschedule.
    let holds = |id: &str| event(id).deliver_at(at).holds_later_events();
    let held = outbox.add_event(holds("held")).await.expect("held");
    let (next, deliver_at) = schedule_of(&t.db, held).await.expect("row");
    assert!(next <= Utc::now(), "due at once");
    assert_eq!(
        deliver_at.map(|d| (d - at).num_milliseconds().abs() < 1),
        Some(true)
    );
    outbox
        .reschedule(held, two_hours)
        .await
        .expect("reschedule");
    let (after, deliver_at) = schedule_of(&t.db, held).await.expect("row");
    assert_eq!(after, next, "not made due later");
    assert_eq!(
        deliver_at.map(|d| (d - two_hours).num_milliseconds().abs() < 1),
        Some(true)
    );
    let dropped = outbox.add_event(holds("dropped")).await.expect("held");
    outbox.cancel(dropped).await.expect("cancel");
    assert!(schedule_of(&t.db, dropped).await.is_none());
    // Without a time, or with a past one, it is a plain event.
    let plain_holds = outbox
        .add_event(event("plain-holds").holds_later_events())
        .await
        .expect("plain");
    let err = outbox.cancel(plain_holds).await.expect_err("not scheduled");
    assert!(matches!(err, Error::NotScheduled { .. }), "{err:?}");

    // Expiry: not after the delivery time (now, or its scheduled time) is refused, unwritten.
    for refused in [
        event("x").deliver_within(std::time::Duration::ZERO),
        event("x").expires_at(Utc::now() - Duration::seconds(1)),
        event("x")
            .deliver_at(at)
            .expires_at(at - Duration::minutes(1)),
    ] {
        let err = outbox.add_event(refused).await.expect_err("expires first");
        assert!(
            matches!(
                err,
                Error::InvalidEvent(InvalidEvent::ExpiresBeforeDelivery { .. })
            ),
            "{err:?}"
        );
    }
    // deliver_within counts from the delivery time.
    let expiring = outbox
        .add_event(
            event("expiring")
                .deliver_at(at)
                .deliver_within(std::time::Duration::from_secs(60)),
        )
        .await
        .expect("expiring");
    let got = outbox.get(expiring).await.expect("get");
    let expires = got.expires_at.expect("expiry");
    assert!(
        ((expires - at) - Duration::seconds(60))
            .num_milliseconds()
            .abs()
            < 2
    );

    // What is left: past, soon, edge, plain (published), dead (failed), held, plain-holds,
    // expiring.
    assert_eq!(total_rows(&t.db).await, 8);
}
