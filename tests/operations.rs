//! Operating the outbox: backlog statistics and health, on every backend; trace context
//! capture with the `otel` feature.

mod common;

use std::time::Duration;

use chrono::Utc;
use common::TestDb;
use seaorm_outbox::publisher::InMemoryPublisher;
use seaorm_outbox::{HealthStatus, HealthThresholds, NewEvent, Outbox, OutboxRepository, Relay};
use uuid::Uuid;

on_all_backends!(
    stats_split_the_backlog_and_health_follows_thresholds,
    relay_health_needs_a_polling_loop
);

/// Sets `next_attempt_at` (and optionally a lease holder) on one event.
async fn park(t: &TestDb, id: Uuid, secs_ahead: i64, locked_by: Option<&str>) {
    let at = Utc::now() + chrono::Duration::seconds(secs_ahead);
    t.exec(
        "park event",
        "UPDATE outbox_events SET next_attempt_at = ?, locked_by = ? WHERE id = ?",
        vec![at.into(), locked_by.map(str::to_owned).into(), id.into()],
    )
    .await;
}

async fn stats_split_the_backlog_and_health_follows_thresholds(t: &TestDb) {
    let outbox = Outbox::new(&t.db);
    let lenient = HealthThresholds::default().max_dead_letters(10);

    let empty = outbox.stats().await.expect("stats");
    assert_eq!(
        (empty.pending(), empty.failed, empty.published_last_hour),
        (0, 0, 0)
    );
    assert!(empty.oldest_pending_at.is_none());
    assert_eq!(outbox.health(&lenient).await.status, HealthStatus::Healthy);

    let ten_min_ago = Utc::now() - chrono::Duration::minutes(10);
    let mut ids = Vec::new();
    for i in 0..6 {
        let at = ten_min_ago + chrono::Duration::seconds(i);
        ids.push(
            outbox
                .add_event(NewEvent::new("t", "agg", i.to_string()).occurred_at(at))
                .await
                .expect("add"),
        );
    }
    park(t, ids[0], 60, Some("relay-x:lease")).await; // leased
    park(t, ids[1], 60, None).await; // in backoff
    outbox.mark_failed(ids[2], "bad").await.expect("fail");
    outbox
        .mark_published_many(&ids[3..5])
        .await
        .expect("publish");

    let s = outbox.stats().await.expect("stats");
    assert_eq!(s.pending_leased, 1, "{s:?}");
    assert_eq!(s.pending_backoff, 1, "{s:?}");
    assert_eq!(s.pending_due, 1, "{s:?}");
    assert_eq!(
        s.pending(),
        outbox.count_unpublished().await.expect("count")
    );
    assert_eq!(s.failed, 1);
    assert_eq!(s.published_last_hour, 2);
    assert_eq!(s.oldest_pending_at, Some(ten_min_ago.trunc_subsecs_micro()));
    let age = s.oldest_pending_age().expect("age");
    assert!(
        age >= Duration::from_secs(599) && age < Duration::from_secs(700),
        "{age:?}"
    );

    // Each threshold crossed in turn moves Healthy → Degraded, with its reason.
    let roomy = HealthThresholds::default()
        .max_dead_letters(1)
        .max_oldest_pending_age(Duration::from_secs(3600));
    assert_eq!(outbox.health(&roomy).await.status, HealthStatus::Healthy);
    let h = outbox.health(&roomy.clone().max_backlog(2)).await;
    assert_eq!(h.status, HealthStatus::Degraded);
    assert!(
        h.reasons.iter().any(|r| r.contains("backlog 3 over 2")),
        "{:?}",
        h.reasons
    );
    let h = outbox
        .health(
            &roomy
                .clone()
                .max_oldest_pending_age(Duration::from_secs(60)),
        )
        .await;
    assert_eq!(h.status, HealthStatus::Degraded);
    assert!(
        h.reasons.iter().any(|r| r.contains("oldest pending")),
        "{:?}",
        h.reasons
    );
    let h = outbox
        .health(&HealthThresholds::default().max_oldest_pending_age(Duration::from_secs(3600)))
        .await;
    assert_eq!(
        h.status,
        HealthStatus::Degraded,
        "the default allows no dead letters"
    );
    assert!(
        h.reasons.iter().any(|r| r.contains("dead letters")),
        "{:?}",
        h.reasons
    );
    assert_eq!(h.http_status(), 200);
    assert!(h.stats.is_some());
}

trait Micros {
    fn trunc_subsecs_micro(self) -> Self;
}

impl Micros for chrono::DateTime<Utc> {
    fn trunc_subsecs_micro(self) -> Self {
        chrono::SubsecRound::trunc_subsecs(self, 6)
    }
}

async fn relay_health_needs_a_polling_loop(t: &TestDb) {
    let relay = Relay::builder(t.db.clone(), InMemoryPublisher::new())
        .build()
        .expect("relay");
    let thresholds = HealthThresholds::default().max_poll_gap(Duration::from_secs(2));
    let h = relay.health(&thresholds).await;
    assert_eq!(h.status, HealthStatus::Unhealthy);
    assert_eq!(h.http_status(), 503);
    assert!(h.reasons.iter().any(|r| r.contains("not polled yet")));

    relay.drain().await.expect("drain");
    let h = relay.health(&thresholds).await;
    assert_eq!(h.status, HealthStatus::Healthy, "{:?}", h.reasons);
    assert!(h.last_poll.is_some());

    tokio::time::sleep(Duration::from_millis(2200)).await;
    let h = relay.health(&thresholds).await;
    assert_eq!(
        h.status,
        HealthStatus::Unhealthy,
        "a stalled loop is unhealthy"
    );
    assert!(
        h.reasons.iter().any(|r| r.contains("has not polled for")),
        "{:?}",
        h.reasons
    );
}

#[cfg(feature = "otel")]
mod otel {
    use super::*;
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };

    on_backends!([postgres: Postgres, sqlite_memory: SqliteMemory] => add_event_captures_the_current_trace);

    pub(super) fn traced() -> (opentelemetry::Context, TraceId) {
        let trace_id = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("trace id");
        let span = SpanContext::new(
            trace_id,
            SpanId::from_hex("00f067aa0ba902b7").expect("span id"),
            TraceFlags::SAMPLED,
            true,
            TraceState::from_key_value([("vendor", "x")]).expect("state"),
        );
        (
            opentelemetry::Context::new().with_remote_span_context(span),
            trace_id,
        )
    }

    async fn add_event_captures_the_current_trace(t: &TestDb) {
        let (cx, trace_id) = traced();
        let outbox = Outbox::new(&t.db);
        let traced_id = {
            let _attached = cx.clone().attach();
            outbox
                .add_event(NewEvent::new("t", "agg", "1"))
                .await
                .expect("add")
        };
        let got = outbox.get(traced_id).await.expect("get");
        let parent = got
            .headers
            .get("traceparent")
            .expect("traceparent captured");
        assert_eq!(parent, &format!("00-{trace_id}-00f067aa0ba902b7-01"));
        assert_eq!(
            got.headers.get("tracestate").map(String::as_str),
            Some("vendor=x")
        );

        // An explicit traceparent wins; no active span adds nothing.
        let own = {
            let _attached = cx.attach();
            outbox
                .add_event(NewEvent::new("t", "agg", "2").header(
                    "traceparent",
                    "00-11111111111111111111111111111111-2222222222222222-01",
                ))
                .await
                .expect("add")
        };
        assert!(outbox.get(own).await.expect("get").headers["traceparent"].starts_with("00-1111"));
        let plain = outbox
            .add_event(NewEvent::new("t", "agg", "3"))
            .await
            .expect("add");
        assert!(
            !outbox
                .get(plain)
                .await
                .expect("get")
                .headers
                .contains_key("traceparent")
        );
    }

    #[cfg(feature = "nats")]
    mod through_nats {
        use super::super::*;
        use async_nats::jetstream;
        use seaorm_outbox::broker::nats::NatsPublisher;
        use seaorm_outbox::wire::Router;

        on_backends!([postgres: Postgres] => the_trace_id_reaches_the_broker_headers);

        async fn the_trace_id_reaches_the_broker_headers(t: &TestDb) {
            let (cx, trace_id) = super::traced();
            {
                let _attached = cx.attach();
                Outbox::new(&t.db)
                    .add_event(NewEvent::new("t", "agg", "1"))
                    .await
                    .expect("add");
            }
            let client = async_nats::connect("nats://127.0.0.1:4222")
                .await
                .expect("NATS at 127.0.0.1:4222");
            let name = format!("outbox_{}", Uuid::now_v7().simple());
            let js = jetstream::new(client.clone());
            let stream = js
                .create_stream(jetstream::stream::Config {
                    name: name.clone(),
                    subjects: vec![format!("{name}.>")],
                    ..Default::default()
                })
                .await
                .expect("stream");
            let relay = Relay::builder(
                t.db.clone(),
                NatsPublisher::new(client).router(Router::prefixed(format!("{name}."))),
            )
            .build()
            .expect("relay");
            assert_eq!(relay.drain().await.expect("drain").published, 1);
            let m = stream.get_raw_message(1).await.expect("message");
            let parent = m
                .headers
                .get("traceparent")
                .expect("traceparent header")
                .as_str()
                .to_owned();
            assert!(parent.contains(&trace_id.to_string()), "{parent}");
            js.delete_stream(&name).await.expect("delete");
        }
    }
}
