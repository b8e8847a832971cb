//! The Loco app booted as its server: an HTTP request's order and event commit together and
//! the event arrives on NATS JetStream; the dashboard is behind Loco's JWT auth with read and
//! write roles; the tasks run without starting a relay; shutdown stops the relays.
//!
//! Each test has its own SQLite file and its own subject prefix and stream on the shared NATS.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use loco_outbox_example::app::App;
use loco_rs::app::{AppContext, Hooks};
use loco_rs::boot::StartMode;
use loco_rs::environment::Environment;
use seaorm_outbox::Outbox;
use seaorm_outbox::repository::EventQuery;
use serde_json::{Value, json};
use tower::ServiceExt;

struct TestApp {
    router: Router,
    ctx: AppContext,
    stream: jetstream::stream::Stream,
    js: jetstream::Context,
    stream_name: String,
    _dir: tempfile::TempDir,
}

fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// The test config with this test's database and subject prefix.
async fn config(dir: &tempfile::TempDir, prefix: &str) -> loco_rs::config::Config {
    let mut config = App::load_config(&Environment::Test)
        .await
        .expect("config/test.yaml");
    config.database.uri = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("app.sqlite").display()
    );
    let outbox = config
        .initializers
        .as_mut()
        .and_then(|i| i.get_mut("outbox"))
        .expect("initializers: outbox:");
    outbox["route_prefix"] = json!(prefix);
    // SQLite has no NOTIFY: only the controller's commit through the initializer's waker can
    // bring its event out before this poll.
    outbox["poll_interval"] = json!("30s");
    config
}

async fn boot() -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let prefix = format!("loco_example_{tag}.");
    let client = async_nats::connect(nats_url()).await.expect("NATS");
    let js = jetstream::new(client);
    let stream_name = format!("LOCO_EXAMPLE_{tag}");
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: stream_name.clone(),
            subjects: vec![format!("{prefix}>")],
            ..Default::default()
        })
        .await
        .expect("stream");
    let config = config(&dir, &prefix).await;
    let boot = App::boot(StartMode::ServerOnly, &Environment::Test, config)
        .await
        .expect("boot the app");
    TestApp {
        router: boot.router.expect("a server has routes"),
        ctx: boot.app_context,
        stream,
        js,
        stream_name,
        _dir: dir,
    }
}

impl TestApp {
    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Value,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req.body(Body::from(body.to_string())).expect("request");
        let res = self.router.clone().oneshot(req).await.expect("infallible");
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .expect("body");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    fn token(&self, pid: &str) -> String {
        let jwt = self
            .ctx
            .config
            .auth
            .as_ref()
            .and_then(|a| a.jwt.as_ref())
            .expect("auth: jwt:");
        loco_rs::auth::jwt::JWT::new(&jwt.secret)
            .generate_token(600, pid.to_owned(), serde_json::Map::new())
            .expect("token")
    }

    async fn finish(self) {
        seaorm_outbox_loco::shutdown(&self.ctx).await;
        self.js
            .delete_stream(&self.stream_name)
            .await
            .expect("delete stream");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orders_event_arrives_on_nats_and_the_dashboard_is_behind_loco_auth() {
    let mut app = boot().await;
    // The relay is up and has found the table empty: from here only a wake-up or its 30 s poll
    // makes it look again.
    let up = Instant::now();
    while Outbox::new(&app.ctx.db)
        .relays(Duration::from_secs(60))
        .await
        .expect("relays")
        .is_empty()
    {
        assert!(up.elapsed() < Duration::from_secs(10), "no relay started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (status, order) = app
        .call(
            "POST",
            "/api/orders",
            None,
            json!({ "customer": "ada", "total_cents": 4200 }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    let order_id = order["id"].as_str().expect("order id").to_owned();
    let events = Outbox::new(&app.ctx.db)
        .events(&EventQuery::default())
        .await
        .expect("events");
    assert_eq!(
        events.len(),
        1,
        "the order's event, in the same transaction"
    );
    assert_eq!(events[0].aggregate_id, order_id);

    // The server process's relay delivers it, woken by the commit (its poll is 30 s).
    let started = Instant::now();
    let message = loop {
        let (messages, first) = {
            let info = app.stream.info().await.expect("stream info");
            (info.state.messages, info.state.first_sequence)
        };
        if messages > 0 {
            break app.stream.get_raw_message(first).await.expect("message");
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the event did not reach NATS before the relay's 30 s poll"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(message.subject.ends_with(".order"), "{}", message.subject);
    let msg_id = message
        .headers
        .get("Nats-Msg-Id")
        .map(|v| v.as_str().to_owned());
    assert_eq!(msg_id.as_deref(), Some(events[0].id.to_string().as_str()));
    let payload: Value = serde_json::from_slice(&message.payload).expect("json payload");
    assert_eq!(payload["customer"], "ada", "{payload}");

    // The admin router: Loco's JWT, read for everyone signed in, write for `writers`.
    let (status, v) = app
        .call("GET", "/outbox/api/stats", None, Value::Null)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
    let (status, v) = app
        .call("GET", "/outbox/api/stats", Some("not-a-jwt"), Value::Null)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
    let viewer = app.token("viewer");
    let (status, v) = app
        .call("GET", "/outbox/api/stats", Some(&viewer), Value::Null)
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["caller"], json!({ "name": "viewer", "role": "read" }));
    let relays = v["relays"].as_array().expect("relays");
    assert_eq!(relays.len(), 1, "one relay in the server process: {v}");
    let all = json!({ "all": true });
    let (status, _) = app
        .call(
            "POST",
            "/outbox/api/dead-letters/replay",
            Some(&viewer),
            all.clone(),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let ops = app.token("ops");
    let (status, v) = app
        .call("POST", "/outbox/api/dead-letters/replay", Some(&ops), all)
        .await;
    assert_eq!((status, v), (StatusCode::OK, json!({ "replayed": 0 })));
    let (status, _) = app.call("GET", "/outbox/health", None, Value::Null).await;
    assert_eq!(status, StatusCode::OK, "health stays outside auth");

    // Graceful shutdown: the relay stops and removes its heartbeat.
    let db = app.ctx.db.clone();
    tokio::time::timeout(
        Duration::from_secs(15),
        seaorm_outbox_loco::shutdown(&app.ctx),
    )
    .await
    .expect("the relays stop with the server");
    let relays = Outbox::new(&db)
        .relays(Duration::from_secs(60))
        .await
        .expect("relays");
    assert!(relays.is_empty(), "{relays:?}");
    app.router = Router::new();
    app.finish().await;
}

/// The app's own binary, as `cargo loco` runs it, in a directory with this test's config and
/// database, with a broker nobody can reach.
fn loco(dir: &tempfile::TempDir, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_main"))
        .args(args)
        .current_dir(dir.path())
        .env("LOCO_ENV", "test")
        .env("NATS_URL", "nats://127.0.0.1:1")
        .output()
        .expect("run the app's binary")
}

/// `task` runs without a relay (its broker is unreachable, and the tasks still work), while
/// `start` runs one (and so fails to boot on that broker): relays start in the server only.
#[test]
fn tasks_run_without_a_relay_and_the_server_starts_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(dir.path().join("config")).expect("config dir");
    std::fs::copy("config/test.yaml", dir.path().join("config/test.yaml")).expect("config");
    let ok = |args: &[&str]| {
        let out = loco(&dir, args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    ok(&["db", "migrate"]);
    let tasks = ok(&["task"]);
    for t in ["outbox:status", "outbox:replay", "outbox:purge"] {
        assert!(tasks.contains(t), "{tasks}");
    }
    assert!(ok(&["task", "outbox:status"]).contains("pending=0"));
    assert!(ok(&["task", "outbox:replay", "all:true"]).contains("replayed 0"));
    assert!(ok(&["task", "outbox:purge", "older_than:7d"]).contains("purged 0"));
    for (args, why) in [
        (&["task", "outbox:replay", "id:nope"][..], "not a UUID"),
        (&["task", "outbox:replay"][..], "give id:<uuid>"),
        (
            &["task", "outbox:purge", "older_than:soon"][..],
            "older_than:soon",
        ),
    ] {
        let out = loco(&dir, args);
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{args:?}: {all}");
        assert!(all.contains(why), "{args:?}: {all}");
    }
    let out = loco(&dir, &["start", "--no-banner"]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "the server's relay needs its broker: {all}"
    );
    assert!(all.contains("cannot connect"), "{all}");
}

/// A typo in the settings fails the boot, naming the key.
#[tokio::test]
async fn malformed_settings_fail_the_boot() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = config(&dir, "loco_example_bad.").await;
    config
        .initializers
        .as_mut()
        .and_then(|i| i.get_mut("outbox"))
        .expect("outbox")["batch_sise"] = json!(5);
    let err = App::boot(StartMode::ServerOnly, &Environment::Test, config)
        .await
        .err()
        .expect("a typo is refused");
    assert!(err.to_string().contains("batch_sise"), "{err}");
}

/// `tenants:`: the server runs one relay group over two tenant databases (SQLite files here),
/// each tenant's events reach NATS, the app can reach the group, and the dashboard's API
/// answers for the tenant named, behind Loco's auth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_block_relays_every_tenant_through_one_group() {
    use sea_orm_migration::MigratorTrait;
    use seaorm_outbox::{NewEvent, OutboxRepository};

    let dir = tempfile::tempdir().expect("temp dir");
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let prefix = format!("loco_tenants_{tag}.");
    let js = jetstream::new(async_nats::connect(nats_url()).await.expect("NATS"));
    let stream_name = format!("LOCO_TENANTS_{tag}");
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: stream_name.clone(),
            subjects: vec![format!("{prefix}>")],
            ..Default::default()
        })
        .await
        .expect("stream");
    let mut databases = serde_json::Map::new();
    for (id, n) in [("acme", 2), ("globex", 3)] {
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join(format!("{id}.sqlite")).display()
        );
        let db = sea_orm::Database::connect(&url).await.expect("tenant db");
        seaorm_outbox_migration::Migrator::up(&db, None)
            .await
            .expect("migrate");
        Outbox::new(&db)
            .add_events(
                (0..n)
                    .map(|i| NewEvent::new("order.placed", id, i.to_string()))
                    .collect(),
            )
            .await
            .expect("seed");
        db.close().await.expect("close");
        databases.insert(id.to_owned(), json!(url));
    }
    let mut config = config(&dir, &prefix).await;
    config
        .initializers
        .as_mut()
        .and_then(|i| i.get_mut("outbox"))
        .expect("outbox")["tenants"] = json!({ "workers": 2, "databases": databases });
    let boot = App::boot(StartMode::ServerOnly, &Environment::Test, config)
        .await
        .expect("boot the app");
    let app = TestApp {
        router: boot.router.expect("a server has routes"),
        ctx: boot.app_context,
        stream,
        js,
        stream_name,
        _dir: dir,
    };
    let group = seaorm_outbox_loco::group(&app.ctx).expect("the initializer's group");
    assert_eq!(group.tenants(), ["acme", "globex"]);
    let started = Instant::now();
    loop {
        let info = app
            .stream
            .clone()
            .info()
            .await
            .expect("stream info")
            .clone();
        if info.state.messages == 5 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{} of 5 events on NATS",
            info.state.messages
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut subjects = Vec::new();
    for seq in 1..=5 {
        let m = app.stream.get_raw_message(seq).await.expect("message");
        subjects.push(m.subject.to_string());
    }
    subjects.sort();
    assert_eq!(
        subjects,
        [
            format!("{prefix}acme"),
            format!("{prefix}acme"),
            format!("{prefix}globex"),
            format!("{prefix}globex"),
            format!("{prefix}globex"),
        ]
    );
    let token = app.token("ops");
    let (status, v) = app
        .call(
            "GET",
            "/outbox/api/stats?tenant=globex",
            Some(&token),
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        (v["pending"].clone(), v["published_last_hour"].clone()),
        (json!(0), json!(3))
    );
    let (status, v) = app
        .call("GET", "/outbox/api/tenants", Some(&token), Value::Null)
        .await;
    assert_eq!(
        (status, v),
        (StatusCode::OK, json!({ "tenants": ["acme", "globex"] }))
    );
    let ctx = app.ctx.clone();
    app.finish().await;
    assert!(
        seaorm_outbox_loco::group(&ctx).is_none(),
        "shutdown stops and forgets the group"
    );
}
