//! One admin router over several tenants' databases: `?tenant=ID` picks the database every
//! route reads and writes, an action on one tenant never touches another (the default one
//! included), an unknown tenant is a 404 after authorization, and each route's own parameters
//! stay strict.

#[path = "support/http.rs"]
mod admin_http;
#[path = "../../tests/common/mod.rs"]
mod common;

use admin_http::Call;
use axum::http::StatusCode;
use common::{Backend, TestDb};
use seaorm_outbox::{HealthThresholds, NewEvent, Outbox, OutboxRepository, OutboxStatus};
use seaorm_outbox_admin::{Admin, BearerTokens};
use serde_json::json;
use uuid::Uuid;

const WRITE: &str = "write-token";
const READ: &str = "read-token";

/// Three pending events, one of them then dead-lettered; the dead letter's id.
async fn seed(t: &TestDb, aggregate: &str) -> Uuid {
    let ids = Outbox::new(&t.db)
        .add_events(
            (0..3)
                .map(|i| NewEvent::new("order.placed", aggregate, i.to_string()))
                .collect(),
        )
        .await
        .expect("seed");
    Outbox::new(&t.db)
        .mark_failed(ids[0], "no route")
        .await
        .expect("fail");
    ids[0]
}

async fn status(t: &TestDb, id: Uuid) -> OutboxStatus {
    Outbox::new(&t.db).get(id).await.expect("get").status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_action_acts_on_the_tenant_named_and_no_other() {
    let default = TestDb::new(Backend::Postgres).await;
    let acme = TestDb::new(Backend::Postgres).await;
    let file = TestDb::new(Backend::SqliteFile).await;
    let maria = TestDb::new(Backend::MySql).await;
    let (d_dead, a_dead, f_dead, m_dead) = (
        seed(&default, "default").await,
        seed(&acme, "acme").await,
        seed(&file, "file").await,
        seed(&maria, "maria").await,
    );
    Outbox::new(&acme.db)
        .add_event(NewEvent::new("order.placed", "acme", "extra"))
        .await
        .expect("add");
    let r = Admin::builder(default.db.clone())
        .tenant("acme", acme.db.clone())
        .tenant("file", file.db.clone())
        .tenant("maria", maria.db.clone())
        // Acme's backlog (4 by the end) crosses it, the default database's (2) does not.
        .thresholds(HealthThresholds::default().max_backlog(3))
        .authorizer(
            BearerTokens::new()
                .writer("ops", WRITE)
                .reader("viewer", READ),
        )
        .build();

    let (s, v) = Call::get("/api/tenants").token(READ).send(&r).await;
    assert_eq!(
        (s, v),
        (
            StatusCode::OK,
            json!({ "tenants": ["acme", "file", "maria"] })
        )
    );

    // Reads: each tenant's own numbers; strict parameters still refused.
    let (s, v) = Call::get("/api/stats?tenant=acme")
        .token(READ)
        .send(&r)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (v["pending"].clone(), v["failed"].clone()),
        (json!(3), json!(1))
    );
    let (_, v) = Call::get("/api/stats").token(READ).send(&r).await;
    assert_eq!(v["pending"], 2, "the default database: {v}");
    let (s, v) = Call::get("/api/dead-letters?limit=10&tenant=file")
        .token(READ)
        .send(&r)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["dead_letters"][0]["id"], f_dead.to_string(), "{v}");
    let (s, _) = Call::get("/api/events?tenant=acme&bogus=1")
        .token(READ)
        .send(&r)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, v) = Call::get(&format!("/api/events/{a_dead}?tenant=acme"))
        .token(READ)
        .send(&r)
        .await;
    assert_eq!((s, v["status"].clone()), (StatusCode::OK, json!("failed")));
    let (s, _) = Call::get(&format!("/api/events/{a_dead}"))
        .token(READ)
        .send(&r)
        .await;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "acme's event is not in the default database"
    );

    // An unknown tenant: 404, but only once the caller is let in.
    let (s, v) = Call::get("/api/stats?tenant=nobody")
        .token(READ)
        .send(&r)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert!(
        v["message"].as_str().is_some_and(|m| m.contains("nobody")),
        "{v}"
    );
    let (s, _) = Call::get("/api/stats?tenant=nobody").send(&r).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = Call::get("/api/stats?tenant=acme&tenant=file")
        .token(READ)
        .send(&r)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // Writes: a replay for acme changes acme only.
    let (s, _) = Call::post(
        &format!("/api/dead-letters/{a_dead}/replay?tenant=acme"),
        json!({}),
    )
    .token(READ)
    .send(&r)
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "a reader");
    let (s, v) = Call::post(
        &format!("/api/dead-letters/{a_dead}/replay?tenant=acme"),
        json!({}),
    )
    .token(WRITE)
    .send(&r)
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(status(&acme, a_dead).await, OutboxStatus::Pending);
    assert_eq!(status(&default, d_dead).await, OutboxStatus::Failed);
    assert_eq!(status(&file, f_dead).await, OutboxStatus::Failed);
    // The default tenant's dead letter, asked of acme: not found there, and left alone.
    let (s, _) = Call::post(
        &format!("/api/dead-letters/{d_dead}/replay?tenant=acme"),
        json!({}),
    )
    .token(WRITE)
    .send(&r)
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(status(&default, d_dead).await, OutboxStatus::Failed);
    // Replay all, and discard, for `file`.
    let (s, v) = Call::post(
        "/api/dead-letters/replay?tenant=file",
        json!({ "all": true }),
    )
    .token(WRITE)
    .send(&r)
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(status(&file, f_dead).await, OutboxStatus::Pending);
    assert_eq!(status(&default, d_dead).await, OutboxStatus::Failed);
    let (s, _) = Call::delete(&format!("/api/dead-letters/{d_dead}?tenant=file"))
        .token(WRITE)
        .send(&r)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = Call::delete(&format!("/api/dead-letters/{d_dead}"))
        .token(WRITE)
        .send(&r)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(Outbox::new(&default.db).count_failed().await.expect("n"), 0);
    assert_eq!(
        Outbox::new(&acme.db).count_unpublished().await.expect("n"),
        4
    );

    // The MariaDB tenant: its dead letter replayed, discarded elsewhere not at all.
    let (s, _) = Call::delete(&format!("/api/dead-letters/{m_dead}?tenant=acme"))
        .token(WRITE)
        .send(&r)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = Call::post(
        &format!("/api/dead-letters/{m_dead}/replay?tenant=maria"),
        json!({}),
    )
    .token(WRITE)
    .send(&r)
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(status(&maria, m_dead).await, OutboxStatus::Pending);
    let (s, v) = Call::get("/api/stats?tenant=maria")
        .token(READ)
        .send(&r)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (v["pending"].clone(), v["failed"].clone()),
        (json!(3), json!(0))
    );

    // The log relay's dead letters are PostgreSQL's: a MariaDB tenant has none to serve.
    if cfg!(feature = "log-relay") {
        let (s, _) = Call::get("/api/log/dead-letters?tenant=maria")
            .token(READ)
            .send(&r)
            .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (s, _) = Call::get("/api/log/dead-letters?tenant=acme")
            .token(READ)
            .send(&r)
            .await;
        assert_eq!(s, StatusCode::OK);
    }

    // Purge and health take the tenant too.
    let (s, v) = Call::post("/api/purge?tenant=acme", json!({ "older_than_secs": 0 }))
        .token(WRITE)
        .send(&r)
        .await;
    assert_eq!((s, v), (StatusCode::OK, json!({ "purged": 0 })));
    // A purge for maria deletes maria's published events only.
    let published = Outbox::new(&maria.db)
        .add_event(NewEvent::new("order.placed", "maria", "p"))
        .await
        .expect("add");
    Outbox::new(&maria.db)
        .mark_published(published)
        .await
        .expect("publish");
    let kept = Outbox::new(&default.db)
        .add_event(NewEvent::new("order.placed", "default", "p"))
        .await
        .expect("add");
    Outbox::new(&default.db)
        .mark_published(kept)
        .await
        .expect("publish");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let (s, v) = Call::post("/api/purge?tenant=maria", json!({ "older_than_secs": 1 }))
        .token(WRITE)
        .send(&r)
        .await;
    assert_eq!((s, v), (StatusCode::OK, json!({ "purged": 1 })));
    assert!(
        Outbox::new(&default.db).get(kept).await.is_ok(),
        "the default tenant's row stays"
    );
    let (s, v) = Call::get("/health?tenant=acme").send(&r).await;
    assert_eq!(
        (s, v["status"].clone()),
        (StatusCode::OK, json!("degraded")),
        "{v}"
    );
    let (_, v) = Call::get("/health").send(&r).await;
    assert_eq!(v["status"], "healthy", "{v}");
    let (s, _) = Call::get("/health?tenant=nobody").send(&r).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    default.cleanup().await;
    acme.cleanup().await;
    file.cleanup().await;
    maria.cleanup().await;
}
