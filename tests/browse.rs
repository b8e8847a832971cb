//! Browsing the outbox page by page (keyset cursors), against SQLite (memory and file),
//! PostgreSQL and MariaDB: every order walks every matching event exactly once, ties on the
//! sort key included, and a cursor is checked against the listing it is used in.

mod common;

use std::time::Duration;

use chrono::Utc;
use common::TestDb;
use seaorm_outbox::repository::{EventCursor, EventOrder, EventQuery};
use seaorm_outbox::{Error, NewEvent, Outbox, OutboxEvent, OutboxRepository, OutboxStatus};
use uuid::Uuid;

on_all_backends!(
    every_order_pages_through_each_event_once,
    cursors_are_checked_against_their_listing,
);

/// Walks `q` page by page, `size` at a time.
async fn walk(outbox: &Outbox<'_, sea_orm::DatabaseConnection>, q: &EventQuery) -> Vec<Uuid> {
    let mut q = q.clone();
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let page = outbox.events_page(&q).await.expect("page");
        assert!(
            page.events.len() as u64 <= q.limit,
            "a page is at most limit"
        );
        seen.extend(page.events.iter().map(|e| e.id));
        pages += 1;
        assert!(pages < 1000, "paging does not end");
        match page.next {
            // Cursors survive their text form, as the admin API hands them out.
            Some(next) => {
                let again: EventCursor = next.to_string().parse().expect("parse");
                assert_eq!(again, next);
                q = q.after(Some(again));
            }
            None => return seen,
        }
    }
}

fn ids(events: &[OutboxEvent]) -> Vec<Uuid> {
    events.iter().map(|e| e.id).collect()
}

async fn every_order_pages_through_each_event_once(t: &TestDb) {
    let outbox = Outbox::new(&t.db);
    // 30 events whose occurred_at runs backwards in blocks of 4 equal times: the written order
    // and the occurred order differ, and a page boundary falls inside ties.
    let base = Utc::now() - chrono::Duration::hours(1);
    let mut written = Vec::new();
    for i in 0..30_i64 {
        let at = base - chrono::Duration::minutes(i / 4);
        let e = NewEvent::new("order.placed", "order", format!("o-{}", i % 3)).occurred_at(at);
        written.push(outbox.add_event(e).await.expect("add"));
    }
    for id in written.iter().step_by(5) {
        outbox
            .mark_failed(*id, "broker said no")
            .await
            .expect("fail");
    }
    // Scheduled: three sharing one delivery time, two later.
    let soon = Utc::now() + chrono::Duration::hours(2);
    let mut scheduled = Vec::new();
    for i in 0..5_i64 {
        let at = soon + chrono::Duration::minutes(i.saturating_sub(2).max(0));
        let e = NewEvent::new("cart.reminder", "cart", format!("c-{i}")).deliver_at(at);
        scheduled.push(outbox.add_event(e).await.expect("schedule"));
    }

    // Newest written first, the default: the reverse of the writes.
    let all = EventQuery::default().limit(7);
    let mut expect: Vec<Uuid> = written.iter().chain(&scheduled).copied().collect();
    expect.reverse();
    assert_eq!(walk(&outbox, &all).await, expect);
    expect.reverse();
    assert_eq!(walk(&outbox, &all.clone().oldest_first(true)).await, expect);

    // By occurrence, both ways, against one unpaged read.
    for oldest_first in [false, true] {
        let q = EventQuery::default()
            .order(EventOrder::Occurred)
            .oldest_first(oldest_first);
        let whole = outbox.events(&q.clone().limit(100)).await.expect("whole");
        assert_eq!(whole.len(), 35);
        let paged = walk(&outbox, &q.limit(3)).await;
        assert_eq!(paged, ids(&whole), "occurred, oldest first: {oldest_first}");
        let times: Vec<_> = whole.iter().map(|e| e.occurred_at).collect();
        let mut sorted = times.clone();
        sorted.sort();
        if !oldest_first {
            sorted.reverse();
        }
        assert_eq!(times, sorted);
    }

    // Filters hold across pages: one aggregate's dead letters.
    let q = EventQuery::default()
        .status(Some(OutboxStatus::Failed))
        .aggregate_id(Some("o-0".into()))
        .limit(1);
    let want: Vec<Uuid> = written
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 5 == 0 && i % 3 == 0)
        .map(|(_, id)| *id)
        .rev()
        .collect();
    assert_eq!(want.len(), 2);
    assert_eq!(walk(&outbox, &q).await, want);

    // Scheduled events, soonest first, ties by id.
    let q = EventQuery::default().scheduled(true).limit(2);
    assert_eq!(walk(&outbox, &q).await, scheduled);

    // Deep pages cost what the first does: no page may be asked past the end.
    let last = outbox
        .events_page(&EventQuery::default().limit(35))
        .await
        .expect("all at once");
    assert_eq!(last.events.len(), 35);
    assert_eq!(last.next, None, "no next page after the last event");
}

async fn cursors_are_checked_against_their_listing(t: &TestDb) {
    let outbox = Outbox::new(&t.db);
    for i in 0..3 {
        outbox
            .add_event(
                NewEvent::new("order.placed", "order", format!("o-{i}"))
                    .deliver_after(Duration::from_secs(3600)),
            )
            .await
            .expect("add");
    }
    let written = outbox
        .events_page(&EventQuery::default().limit(1))
        .await
        .expect("page");
    let cursor = written.next.expect("a next page");
    assert!(cursor.to_string().starts_with("w."), "{cursor}");

    // A written-order cursor in an occurred-order or scheduled listing is refused, typed.
    for q in [
        EventQuery::default().order(EventOrder::Occurred),
        EventQuery::default().scheduled(true),
    ] {
        let err = outbox
            .events_page(&q.after(Some(cursor)))
            .await
            .expect_err("a cursor of another order");
        assert!(matches!(err, Error::InvalidCursor(_)), "{err:?}");
    }

    // Text that is no cursor: typed parse errors, never a panic.
    for bad in [
        "",
        "w",
        "x.0190a1b2-0000-7000-8000-000000000000",
        "w.not-a-uuid",
        "o.12.0190a1b2-0000-7000-8000-000000000000.extra",
        "o.soon.0190a1b2-0000-7000-8000-000000000000",
        "o.99999999999999999999.0190a1b2-0000-7000-8000-000000000000",
        "s.0190a1b2-0000-7000-8000-000000000000",
    ] {
        let parsed = bad.parse::<EventCursor>();
        assert!(parsed.is_err(), "{bad:?} parsed as {parsed:?}");
    }

    // A page of nothing is empty and has no next.
    let none = outbox
        .events_page(&EventQuery::default().limit(0))
        .await
        .expect("empty page");
    assert!(none.events.is_empty() && none.next.is_none(), "{none:?}");

    // Too large a page is refused before reading.
    let err = outbox
        .events_page(&EventQuery::default().limit(seaorm_outbox::repository::MAX_PAGE_SIZE + 1))
        .await
        .expect_err("too large");
    assert!(matches!(err, Error::LimitTooLarge { .. }), "{err:?}");
}
