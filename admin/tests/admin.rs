//! The admin HTTP API through its router: what it reports on every backend, each write action
//! and its audit line, every refusal of the authorizer, and bad input answered with a JSON 4xx.

#[path = "support/http.rs"]
mod admin_http;
#[path = "../../tests/common/mod.rs"]
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use admin_http::{Call, seed};
use axum::Router;
use axum::http::StatusCode;
use common::TestDb;
use seaorm_outbox::publisher::InMemoryPublisher;
use seaorm_outbox::{NewEvent, Outbox, OutboxRepository, OutboxStatus, Relay, RelayConfig};
use seaorm_outbox_admin::{Admin, BearerTokens, Principal};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

on_all_backends!(
    stats_events_and_history_report_the_outbox,
    dead_letters_replay_discard_and_purge,
    scheduled_events_are_counted_listed_and_cancelled,
    stats_serve_a_database_without_the_consumers_table,
);

const WRITE: &str = "write-token";
const READ: &str = "read-token";

fn router(t: &TestDb) -> Router {
    let tokens = BearerTokens::new()
        .writer("ops", WRITE)
        .reader("viewer", READ);
    Admin::builder(t.db.clone()).authorizer(tokens).build()
}

fn ids(v: &Value, key: &str) -> Vec<String> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} in {v}"))
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_owned())
        .collect()
}

async fn stats_events_and_history_report_the_outbox(t: &TestDb) {
    let s = seed(t).await;
    let r = router(t);

    let (status, stats) = Call::get("/api/stats").token(READ).send(&r).await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    assert_eq!(stats["pending"], 3);
    assert_eq!(stats["pending_due"], 3);
    assert_eq!(stats["failed"], 3);
    assert_eq!(stats["published_last_hour"], 4);
    assert_eq!(stats["inbox"]["dead_letters"], 1);
    assert_eq!(
        stats["health"]["status"], "degraded",
        "dead letters: {stats}"
    );
    assert_eq!(stats["caller"], json!({ "name": "viewer", "role": "read" }));
    let age = stats["oldest_pending_age_secs"].as_f64().expect("age");
    assert!((29.0 * 60.0..31.0 * 60.0).contains(&age), "{age}");

    // Filters: status, type, aggregate, time, order, paging.
    let (_, v) = Call::get("/api/events?status=failed&aggregate_id=o-1&order=oldest")
        .token(READ)
        .send(&r)
        .await;
    let want: Vec<String> = s.failed[..2].iter().map(ToString::to_string).collect();
    assert_eq!(ids(&v, "events"), want);
    assert_eq!(v["next_offset"], Value::Null);
    let (_, v) = Call::get("/api/events?event_type=order.shipped&limit=3")
        .token(READ)
        .send(&r)
        .await;
    let newest: Vec<String> = s
        .published
        .iter()
        .rev()
        .take(3)
        .map(ToString::to_string)
        .collect();
    assert_eq!(ids(&v, "events"), newest);
    assert_eq!(v["next_offset"], 3);
    let (_, v) = Call::get("/api/events?event_type=order.shipped&limit=3&offset=3")
        .token(READ)
        .send(&r)
        .await;
    assert_eq!(ids(&v, "events"), vec![s.published[0].to_string()]);
    let since = (chrono::Utc::now() - chrono::Duration::minutes(30)
        + chrono::Duration::seconds(90))
    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    // Bounds between the seeded minutes, not on one: the seed ran a moment before this
    // `now()` (seconds on a loaded machine), and `until` is cut to whole seconds.
    let until = (chrono::Utc::now() - chrono::Duration::minutes(30)
        + chrono::Duration::seconds(330))
    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (status, v) = Call::get(&format!(
        "/api/events?since={since}&until={until}&order=oldest"
    ))
    .token(READ)
    .send(&r)
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    // Minutes 2 (pending p-2) and 5 (published s-0) fall in [1.5 min, 5.5 min).
    assert_eq!(
        ids(&v, "events"),
        vec![s.pending[2].to_string(), s.published[0].to_string()]
    );

    let (status, e) = Call::get(&format!("/api/events/{}", s.failed[2]))
        .token(READ)
        .send(&r)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(e["status"], "failed");
    assert_eq!(e["payload"], json!({ "kind": "order.paid", "agg": "o-2" }));
    assert!(
        e["last_error"]
            .as_str()
            .expect("error")
            .contains("<script>")
    );

    // History: this minute's publications, and a backlog sample once a relay with gauges ran.
    let (_, h) = Call::get("/api/history?minutes=60")
        .token(READ)
        .send(&r)
        .await;
    let minutes = h["minutes"].as_array().expect("minutes");
    assert_eq!(minutes.len(), 60);
    let published: u64 = minutes
        .iter()
        .map(|m| m["published"].as_u64().expect("n"))
        .sum();
    assert_eq!(published, 4);
    assert!(minutes.iter().all(|m| m["pending"].is_null()), "{h}");
    // A day, the most it serves: one statement within every backend's limits.
    let (status, day) = Call::get("/api/history?minutes=1440")
        .token(READ)
        .send(&r)
        .await;
    assert_eq!(status, StatusCode::OK, "{day}");
    let day = day["minutes"].as_array().expect("minutes");
    assert_eq!(day.len(), 1440);
    let sum: u64 = day
        .iter()
        .map(|m| m["published"].as_u64().expect("n"))
        .sum();
    assert_eq!(sum, 4);
    sample_backlog(t).await;
    let (_, h) = Call::get("/api/history?minutes=5")
        .token(READ)
        .send(&r)
        .await;
    let last = h["minutes"]
        .as_array()
        .expect("minutes")
        .last()
        .expect("now");
    // The relay published the 3 pending events after (or as) it sampled.
    let pending = last["pending"].as_u64().expect("sampled");
    assert!(pending <= 3, "{h}");
    assert_eq!(last["failed"], 3, "{h}");

    let (_, stats) = Call::get("/api/stats").token(READ).send(&r).await;
    let relays = stats["relays"].as_array().expect("relays");
    assert!(
        relays.is_empty(),
        "a stopped relay removes its row: {stats}"
    );
}

async fn scheduled_events_are_counted_listed_and_cancelled(t: &TestDb) {
    let r = router(t);
    let outbox = Outbox::new(&t.db);
    let hour = Duration::from_secs(3600);
    let due = outbox
        .add_event(NewEvent::new("order.placed", "order", "1"))
        .await
        .expect("add");
    let later = outbox
        .add_event(NewEvent::new("cart.reminder", "cart", "1").deliver_after(hour * 2))
        .await
        .expect("schedule");
    let sooner = outbox
        .add_event(
            NewEvent::new("cart.reminder", "cart", "2")
                .deliver_after(hour)
                .deliver_within(hour),
        )
        .await
        .expect("schedule");

    // Counted apart from the backlog, with the next one's time; the lag ignores them.
    let (_, stats) = Call::get("/api/stats").token(READ).send(&r).await;
    assert_eq!(stats["pending"], 1, "{stats}");
    assert_eq!(stats["pending_due"], 1, "{stats}");
    assert_eq!(stats["pending_backoff"], 0, "{stats}");
    assert_eq!(stats["scheduled"], 2, "{stats}");
    let next: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(stats["next_scheduled_at"].clone()).expect("next");
    let want = outbox
        .get(sooner)
        .await
        .expect("get")
        .deliver_at
        .expect("at");
    assert_eq!(next, want);
    assert!(stats["oldest_pending_age_secs"].as_f64().expect("age") < 60.0);

    // Listed soonest first, only the scheduled ones.
    let (status, v) = Call::get("/api/events?scheduled=true")
        .token(READ)
        .send(&r)
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        ids(&v, "events"),
        vec![sooner.to_string(), later.to_string()]
    );
    assert!(v["events"][0]["expires_at"].is_string(), "{v}");

    // Cancelling is a write; a reader is refused and nothing changes.
    let path = format!("/api/scheduled/{later}");
    let (status, _) = Call::delete(&path).token(READ).send(&r).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, v) = Call::delete(&path).token(WRITE).send(&r).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["cancelled"], 1);
    let (status, v) = Call::delete(&path).token(WRITE).send(&r).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    // A due event was never scheduled: a conflict, with the reason, and it stays.
    let (status, v) = Call::delete(&format!("/api/scheduled/{due}"))
        .token(WRITE)
        .send(&r)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(
        v["message"]
            .as_str()
            .expect("message")
            .contains("not scheduled"),
        "{v}"
    );
    assert_eq!(outbox.count_unpublished().await.expect("count"), 2);
    let (_, stats) = Call::get("/api/stats").token(READ).send(&r).await;
    assert_eq!(stats["scheduled"], 1, "{stats}");
}

/// Runs a relay with its gauges on until it has sampled the backlog.
async fn sample_backlog(t: &TestDb) {
    let config = RelayConfig::default()
        .metrics_interval(Some(Duration::from_millis(20)))
        .name("sampler");
    let relay = Relay::builder(t.db.clone(), InMemoryPublisher::new())
        .config(config)
        .build()
        .expect("relay");
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    run.await.expect("relay task");
}

async fn dead_letters_replay_discard_and_purge(t: &TestDb) {
    let s = seed(t).await;
    let r = router(t);
    let outbox = Outbox::new(&t.db);

    let (status, v) = Call::get("/api/dead-letters?limit=2")
        .token(READ)
        .send(&r)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["total"], 3);
    assert_eq!(v["next_offset"], 2);

    let (status, v) = Call::post(
        &format!("/api/dead-letters/{}/replay", s.failed[2]),
        json!({}),
    )
    .token(WRITE)
    .send(&r)
    .await;
    assert_eq!((status, v), (StatusCode::OK, json!({ "replayed": 1 })));
    assert_eq!(
        outbox.get(s.failed[2]).await.expect("get").status,
        OutboxStatus::Pending
    );

    // Replaying it again: it is no dead letter now.
    let (status, v) = Call::post(
        &format!("/api/dead-letters/{}/replay", s.failed[2]),
        json!({}),
    )
    .token(WRITE)
    .send(&r)
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"], "conflict");

    let (_, v) = Call::post(
        "/api/dead-letters/replay",
        json!({ "aggregate_type": "order", "aggregate_id": "o-1" }),
    )
    .token(WRITE)
    .send(&r)
    .await;
    assert_eq!(v, json!({ "replayed": 2 }));
    outbox
        .mark_failed(s.failed[0], "again")
        .await
        .expect("fail");

    let (status, v) = Call::delete(&format!("/api/dead-letters/{}", s.failed[0]))
        .token(WRITE)
        .send(&r)
        .await;
    assert_eq!((status, v), (StatusCode::OK, json!({ "discarded": 1 })));
    let (status, v) = Call::get(&format!("/api/events/{}", s.failed[0]))
        .token(READ)
        .send(&r)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["error"], "not_found");

    outbox.mark_failed(s.pending[0], "x").await.expect("fail");
    let (_, v) = Call::post("/api/dead-letters/replay", json!({ "all": true }))
        .token(WRITE)
        .send(&r)
        .await;
    assert_eq!(v, json!({ "replayed": 1 }));

    // Purge: nothing is an hour old; everything published is older than 0 s.
    let (_, v) = Call::post("/api/purge", json!({ "older_than_secs": 3600 }))
        .token(WRITE)
        .send(&r)
        .await;
    assert_eq!(v, json!({ "purged": 0 }));
    let (_, v) = Call::post("/api/purge", json!({ "older_than_secs": 0 }))
        .token(WRITE)
        .send(&r)
        .await;
    assert_eq!(v, json!({ "purged": 4 }));

    // The inbox's dead letter: listed, replay requested, discarded.
    let (_, v) = Call::get("/api/inbox/dead-letters?consumer=billing")
        .token(READ)
        .send(&r)
        .await;
    assert_eq!(v["total"], 1, "{v}");
    assert_eq!(v["dead_letters"][0]["payload"]["text"], "{\"total\":5}");
    let path = format!("/api/inbox/dead-letters/{}", s.inbox_dead_letter);
    let (_, v) = Call::post(&format!("{path}/replay"), json!({}))
        .token(WRITE)
        .send(&r)
        .await;
    assert_eq!(v, json!({ "replay_requested": 1 }));
    let (_, v) = Call::post(
        "/api/inbox/dead-letters/replay",
        json!({ "consumer": "billing" }),
    )
    .token(WRITE)
    .send(&r)
    .await;
    assert_eq!(v, json!({ "replay_requested": 1 }));
    let (_, v) = Call::delete(&path).token(WRITE).send(&r).await;
    assert_eq!(v, json!({ "discarded": 1 }));
    let (status, v) = Call::delete(&path).token(WRITE).send(&r).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
}

/// Each refusal of the gate, and that `/health` and the page stay outside it.
#[tokio::test]
async fn the_router_fails_closed() {
    let t = TestDb::new(common::Backend::SqliteMemory).await;
    let s = seed(&t).await;
    let r = router(&t);
    let replay = format!("/api/dead-letters/{}/replay", s.failed[0]);

    let (status, v) = Call::get("/api/stats").send(&r).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(v["error"], "unauthorized");
    let (status, _) = Call::get("/api/stats").token("wrong").send(&r).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = Call::get("/api/stats")
        .header("authorization", WRITE)
        .send(&r)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "no Bearer scheme");
    let (status, v) = Call::post(&replay, json!({})).token(READ).send(&r).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "a reader cannot write: {v}");
    let (status, v) = Call::new(axum::http::Method::POST, &replay)
        .token(WRITE)
        .send(&r)
        .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{v}");
    let (status, v) = Call::post(&replay, json!({}))
        .token(WRITE)
        .header("content-type", "application/x-www-form-urlencoded")
        .send(&r)
        .await;
    assert_eq!(
        status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "a form post: {v}"
    );
    assert_eq!(
        Outbox::new(&t.db).count_failed().await.expect("count"),
        3,
        "no refused request changed anything"
    );

    let (status, v) = Call::get("/health").send(&r).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["status"], "degraded");
    let (status, headers, page) = Call::get("/").send_raw(&r).await;
    assert_eq!(status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&page).contains("<title>Outbox</title>"));
    assert_eq!(headers["x-frame-options"], "DENY");
    assert!(
        headers["content-security-policy"]
            .to_str()
            .expect("csp")
            .contains("frame-ancestors 'none'")
    );

    // A closure authorizer: a cookie the host app set.
    let cookie = Admin::builder(t.db.clone())
        .authorizer(|parts: &axum::http::request::Parts| {
            let cookie = parts.headers.get("cookie")?.to_str().ok()?;
            cookie
                .split("; ")
                .any(|c| c == "session=admin")
                .then(|| Principal::writer("admin"))
        })
        .build();
    let (status, _) = Call::get("/api/stats").send(&cookie).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, v) = Call::get("/api/stats")
        .header("cookie", "a=b; session=admin")
        .send(&cookie)
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["caller"]["name"], "admin");

    // Unauthenticated: loopback peers that connected directly, with a loopback Host.
    let open = Admin::builder(t.db.clone()).allow_unauthenticated().build();
    let refusals = [
        (Call::get("/api/stats"), "no connect info"),
        (
            Call::get("/api/stats").from("10.1.2.3:5000"),
            "a remote peer",
        ),
        (
            Call::get("/api/stats")
                .from("127.0.0.1:5000")
                .header("x-forwarded-for", "10.1.2.3"),
            "proxied",
        ),
        (
            Call::get("/api/stats")
                .from("127.0.0.1:5000")
                .header("forwarded", "for=10.1.2.3"),
            "proxied",
        ),
        (
            Call::get("/api/stats")
                .from("127.0.0.1:5000")
                .header("host", "evil.example:8080"),
            "DNS rebinding",
        ),
    ];
    for (call, why) in refusals {
        let (status, v) = call.send(&open).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{why}: {v}");
        assert_eq!(v["error"], "forbidden", "{why}");
    }
    for peer in ["127.0.0.1:5000", "[::1]:5000", "[::ffff:127.0.0.1]:5000"] {
        let (status, v) = Call::get("/api/stats")
            .from(peer)
            .header("host", "127.0.0.1:8080")
            .send(&open)
            .await;
        assert_eq!(status, StatusCode::OK, "{peer}: {v}");
        assert_eq!(v["caller"], json!({ "name": "loopback", "role": "write" }));
    }
}

/// Bad input of every kind: a JSON 4xx that names the problem, never a 5xx, nothing changed.
#[tokio::test]
async fn bad_input_is_a_json_4xx() {
    let t = TestDb::new(common::Backend::SqliteMemory).await;
    seed(&t).await;
    let r = router(&t);
    let big = "x".repeat(64 * 1024);
    let cases = vec![
        (Call::get("/api/events/not-a-uuid"), StatusCode::BAD_REQUEST),
        (
            Call::get("/api/events?status=lost"),
            StatusCode::BAD_REQUEST,
        ),
        (
            Call::get("/api/events?order=sideways"),
            StatusCode::BAD_REQUEST,
        ),
        (Call::get("/api/events?limit=501"), StatusCode::BAD_REQUEST),
        (Call::get("/api/events?limit=0"), StatusCode::BAD_REQUEST),
        (Call::get("/api/events?limit=-1"), StatusCode::BAD_REQUEST),
        (
            Call::get("/api/events?offset=100001"),
            StatusCode::BAD_REQUEST,
        ),
        (
            Call::get("/api/events?since=yesterday"),
            StatusCode::BAD_REQUEST,
        ),
        (
            Call::get("/api/events?since=2026-12-02T10:00:00Z&until=2026-12-01T10:00:00Z"),
            StatusCode::BAD_REQUEST,
        ),
        (
            Call::get("/api/events?stauts=failed"),
            StatusCode::BAD_REQUEST,
        ),
        (
            Call::get("/api/dead-letters?limit=100000"),
            StatusCode::BAD_REQUEST,
        ),
        (Call::get("/api/history?minutes=0"), StatusCode::BAD_REQUEST),
        (
            Call::get("/api/history?minutes=99999999999"),
            StatusCode::BAD_REQUEST,
        ),
        (
            Call::get("/api/inbox/dead-letters?limit=x"),
            StatusCode::BAD_REQUEST,
        ),
        (
            Call::get(&format!("/api/events/{}", uuid::Uuid::now_v7())),
            StatusCode::NOT_FOUND,
        ),
        (
            Call::post("/api/dead-letters/123/replay", json!({})),
            StatusCode::BAD_REQUEST,
        ),
        (
            Call::delete("/api/dead-letters/zzz"),
            StatusCode::BAD_REQUEST,
        ),
        (
            Call::post(
                &format!("/api/dead-letters/{}/replay", uuid::Uuid::now_v7()),
                json!({}),
            ),
            StatusCode::NOT_FOUND,
        ),
        (
            Call::post("/api/dead-letters/replay", json!({})),
            StatusCode::BAD_REQUEST,
        ),
        (
            Call::post(
                "/api/dead-letters/replay",
                json!({ "all": true, "aggregate_id": "o-1" }),
            ),
            StatusCode::BAD_REQUEST,
        ),
        (
            Call::post(
                "/api/dead-letters/replay",
                json!({ "aggregate_type": "order" }),
            ),
            StatusCode::BAD_REQUEST,
        ),
        (
            Call::post("/api/purge", json!({ "older_than_secs": -5 })),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            Call::post("/api/purge", json!({ "older_than_secs": "7d" })),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            Call::post("/api/purge", json!({})),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            Call::post("/api/purge", json!({ "older_than_secs": u64::MAX })),
            StatusCode::BAD_REQUEST,
        ),
        (
            Call::post("/api/purge", json!(null)).raw_body("{not json".into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            Call::post("/api/purge", json!(null)).raw_body(format!("{{\"pad\":\"{big}\"}}")),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            Call::post("/api/inbox/dead-letters/replay", json!({})),
            StatusCode::BAD_REQUEST,
        ),
        (Call::get("/api/nope"), StatusCode::NOT_FOUND),
        (Call::get("/nope"), StatusCode::NOT_FOUND),
        (Call::delete("/api/stats"), StatusCode::METHOD_NOT_ALLOWED),
        (
            Call::post("/api/events", json!({})),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            Call::post("/health", json!({})),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
    ];
    for (call, want) in cases {
        let what = call.describe();
        let (status, v) = call.token(WRITE).send(&r).await;
        assert_eq!(status, want, "{what}: {v}");
        assert!(v["error"].is_string(), "{what}: JSON error body, got {v}");
        assert!(
            v["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {v}"
        );
    }
    let outbox = Outbox::new(&t.db);
    assert_eq!(outbox.count_failed().await.expect("count"), 3);
    assert_eq!(outbox.stats().await.expect("stats").pending(), 3);
}

/// Every write action leaves one `tracing` line with who, what and how many rows.
#[tokio::test(flavor = "current_thread")]
async fn write_actions_are_audited() {
    use tracing_subscriber::layer::SubscriberExt;
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let subscriber = tracing_subscriber::registry().with(Capture(lines.clone()));
    let _guard = tracing::subscriber::set_default(subscriber);

    let t = TestDb::new(common::Backend::SqliteMemory).await;
    let s = seed(&t).await;
    let r = router(&t);
    let (status, _) = Call::post("/api/dead-letters/replay", json!({ "all": true }))
        .token(WRITE)
        .send(&r)
        .await;
    assert_eq!(status, StatusCode::OK);
    Outbox::new(&t.db)
        .mark_failed(s.pending[0], "x")
        .await
        .expect("fail");
    Call::delete(&format!("/api/dead-letters/{}", s.pending[0]))
        .token(WRITE)
        .send(&r)
        .await;
    Call::post("/api/purge", json!({ "older_than_secs": 0 }))
        .token(WRITE)
        .send(&r)
        .await;
    // Refused and read-only requests log nothing.
    Call::post("/api/purge", json!({ "older_than_secs": 0 }))
        .token(READ)
        .send(&r)
        .await;
    Call::get("/api/stats").token(WRITE).send(&r).await;

    let lines = lines.lock().expect("lines").clone();
    assert_eq!(lines.len(), 3, "{lines:#?}");
    assert!(lines[0].contains("who=ops") && lines[0].contains("action=replay"));
    assert!(
        lines[0].contains("what=all") && lines[0].contains("rows=3"),
        "{}",
        lines[0]
    );
    assert!(lines[1].contains("action=discard") && lines[1].contains(&s.pending[0].to_string()));
    assert!(lines[1].contains("rows=1"), "{}", lines[1]);
    assert!(
        lines[2].contains("action=purge") && lines[2].contains("rows=4"),
        "{}",
        lines[2]
    );
}

/// Records each `seaorm_outbox::admin` event as `field=value …`.
struct Capture(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() != "seaorm_outbox::admin" {
            return;
        }
        struct Fields(String);
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                self.0
                    .push_str(&format!("{}={:?} ", f.name(), v).replace('"', ""));
            }
        }
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        self.0.lock().expect("lines").push(fields.0);
    }
}

/// A database an app has not migrated to `inbox_consumers` yet (migration 15) still gets its
/// statistics: the consumers are `null`, everything else as before.
async fn stats_serve_a_database_without_the_consumers_table(t: &TestDb) {
    let r = router(t);
    t.exec("drop the table", "DROP TABLE inbox_consumers", vec![])
        .await;
    let (status, stats) = Call::get("/api/stats").token(READ).send(&r).await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    assert_eq!(stats["inbox"]["consumers"], Value::Null, "{stats}");
    assert_eq!(stats["inbox"]["dead_letters"], 0, "{stats}");
}
