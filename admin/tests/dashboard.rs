//! The dashboard in a real browser: Debian's Chromium, headless, driven through chromedriver.
//! The admin router is mounted at `/outbox` in a host app on a real TCP port over PostgreSQL,
//! with dead letters, an inbox dead letter and a relay whose broker is down. The test checks
//! the numbers the page shows, that it asks for credentials first, that replay and discard
//! change the database, and that a bulk replay waits for a confirmation.
//!
//! `OUTBOX_SCREENSHOT=docs/dashboard.png` saves the screenshot the README shows.

#[path = "support/http.rs"]
mod admin_http;
#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "../../tests/support/consumer.rs"]
mod consumer;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use admin_http::{Call, seed};
use axum::Router;
use chrono::Utc;
use common::{Backend, TestDb};
use fantoccini::{Client, ClientBuilder, Locator};
use seaorm_outbox::relay::{BreakerConfig, Relay, RelayConfig};
use seaorm_outbox::{
    NewEvent, Outbox, OutboxEvent, OutboxRepository, OutboxStatus, PublishOutcome,
};
use seaorm_outbox_admin::{Admin, BearerTokens};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "dashboard-test-token";
const READER: &str = "dashboard-reader-token";

/// Generous: Chromium on a loaded 2-core machine can take many seconds per step.
const WAIT: Duration = Duration::from_secs(60);

/// A broker that never answers: the relay's breaker opens and nothing is spent.
struct Down;

#[async_trait::async_trait]
impl seaorm_outbox::Publisher for Down {
    async fn publish(
        &self,
        events: &[OutboxEvent],
    ) -> Result<Vec<PublishOutcome>, seaorm_outbox::BoxError> {
        Ok(vec![
            PublishOutcome::Unavailable("connection refused".into());
            events.len()
        ])
    }

    fn name(&self) -> &str {
        "nats"
    }
}

/// chromedriver on a free port, killed on drop.
struct Driver {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

async fn start_driver() -> Driver {
    let port = free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver (Debian's chromium-driver; .ci/run installs it)");
    let started = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(started.elapsed() < WAIT, "chromedriver did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Driver {
        child,
        port,
        _profile: tempfile::tempdir().expect("profile dir"),
    }
}

async fn browser(driver: &Driver) -> Client {
    let profile = driver._profile.path().display().to_string();
    let caps = json!({
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-quic", "--no-first-run",
                "--window-size=1280,1100", format!("--user-data-dir={profile}"),
            ]
        }
    });
    let Value::Object(caps) = caps else {
        unreachable!()
    };
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a Chromium session")
}

/// Polls `script` (a JS expression) until it is truthy; returns its value.
async fn wait_for(c: &Client, what: &str, script: &str) -> Value {
    let started = Instant::now();
    loop {
        let v = c
            .execute(&format!("return ({script});"), vec![])
            .await
            .expect("script");
        if !(v.is_null() || v == json!(false) || v == json!("") || v == json!(0)) {
            return v;
        }
        if started.elapsed() > WAIT {
            // What the page said, to tell a slow machine from a broken page.
            let script = "return document.body ? document.body.innerText.slice(0, 2000) : '';";
            let page = c.execute(script, vec![]).await.unwrap_or_default();
            panic!(
                "timed out waiting for {what}; the page shows:\n{}",
                page.as_str().unwrap_or("")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether the confirmation dialog is showing.
const DIALOG_OPEN: &str = "document.getElementById('confirm').classList.contains('open')";

/// Finds and clicks `css`. The page re-renders its tables on every refresh, so an element
/// found just before one goes stale: find it again, a few times.
async fn click(c: &Client, css: &str) {
    let mut last = String::new();
    for _ in 0..5 {
        match c.find(Locator::Css(css)).await {
            Ok(el) => match el.click().await {
                Ok(()) => return,
                Err(e) => last = format!("click {css}: {e}"),
            },
            Err(e) => last = format!("no {css}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{last}");
}

/// Waits for the confirmation dialog and confirms.
async fn confirm(c: &Client) {
    wait_for(c, "the confirmation", DIALOG_OPEN).await;
    click(c, "#confirm-ok").await;
}

async fn text(c: &Client, css: &str) -> String {
    let v = c
        .execute(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
            vec![json!(css)],
        )
        .await
        .expect("script");
    v.as_str().unwrap_or_else(|| panic!("no {css}")).to_owned()
}

/// Saves what the page shows to the path in `env`, else to `name` under the target's temp dir.
async fn save_screenshot(c: &Client, env: &str, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    let shot = std::env::var(env)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name));
    std::fs::write(&shot, &png).expect("save screenshot");
}

/// Opens the page at `url` and gives it `token` at its prompt.
async fn sign_in(c: &Client, url: &str, token: &str) {
    c.goto(url).await.expect("open the dashboard");
    wait_for(
        c,
        "the token prompt",
        "document.getElementById('login').classList.contains('open')",
    )
    .await;
    c.find(Locator::Css("#token"))
        .await
        .expect("token field")
        .send_keys(token)
        .await
        .expect("type");
    click(c, "#login-form button").await;
}

/// The ids the event browser lists now.
async fn found(c: &Client) -> Vec<String> {
    let v = c
        .execute(
            "return Array.from(document.querySelectorAll('#found tr[data-id]')).map((tr) => tr.dataset.id);",
            vec![],
        )
        .await
        .expect("script");
    serde_json::from_value(v).expect("ids")
}

/// Sets the browser's filter fields (id: value; absent fields emptied) and submits.
async fn find(c: &Client, fields: &[(&str, &str)]) {
    c.execute(
        "for (const id of ['f-id','f-aggregate-type','f-aggregate-id','f-type','f-status','f-since','f-until']) \
           document.getElementById(id).value = ''; \
         for (const [id, v] of arguments[0]) document.getElementById(id).value = v;",
        vec![json!(fields)],
    )
    .await
    .expect("fill the filter");
    click(c, "#find button[type=submit]").await;
}

/// The host app: its own route, and the admin router nested at `/outbox`.
async fn serve(t: &TestDb) -> (SocketAddr, CancellationToken) {
    serve_admin(Admin::builder(t.db.clone())).await
}

async fn serve_admin(
    admin: seaorm_outbox_admin::AdminBuilder<seaorm_outbox_admin::NoAuth>,
) -> (SocketAddr, CancellationToken) {
    let admin = admin
        .authorizer(
            BearerTokens::new()
                .writer("ops", TOKEN)
                .reader("viewer", READER),
        )
        .refresh_interval(Duration::from_secs(1))
        .build();
    let app = Router::new()
        .route("/", axum::routing::get(|| async { "host app" }))
        .nest("/outbox", admin);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let shutdown = stop.clone();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .expect("serve");
    });
    (addr, stop)
}

/// Published events spread over the last hour, so the chart has a shape.
async fn seed_history(t: &TestDb) {
    let outbox = Outbox::new(&t.db);
    for i in 0..60_i64 {
        let n = 1 + (i * 7 % 11);
        for _ in 0..n {
            let id = outbox
                .add_event(NewEvent::new("order.shipped", "order", format!("h-{i}")))
                .await
                .expect("add");
            outbox.mark_published(id).await.expect("publish");
            let at = Utc::now() - chrono::Duration::minutes(59 - i);
            t.exec(
                "backdate",
                "UPDATE outbox_events SET published_at = ? WHERE id = ?",
                vec![at.into(), id.into()],
            )
            .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_shows_the_outbox_and_replays_from_the_browser() {
    let t = TestDb::new(Backend::Postgres).await;
    let s = seed(&t).await;
    seed_history(&t).await;
    // Two events scheduled for later: counted apart from the backlog, listed, one cancelled.
    let scheduled: Vec<uuid::Uuid> = {
        let outbox = Outbox::new(&t.db);
        let mut ids = Vec::new();
        for hours in [1, 2] {
            let e = NewEvent::new("cart.reminder", "cart", format!("c-{hours}"))
                .deliver_after(Duration::from_secs(3600 * hours));
            ids.push(outbox.add_event(e).await.expect("schedule"));
        }
        ids
    };
    let published: u64 = (0..60_i64).map(|i| 1 + (i * 7 % 11) as u64).sum::<u64>() + 4;

    // A relay whose broker is down: its breaker opens, it samples the backlog each 200 ms.
    let relay = Relay::builder(t.connect_again().await, Down)
        .config(
            RelayConfig::default()
                .name("orders-relay")
                .metrics_interval(Some(Duration::from_millis(200)))
                .breaker(BreakerConfig::default().base(Duration::from_secs(30)))
                .idle_poll_interval(Duration::from_millis(50)),
        )
        .build()
        .expect("relay");
    let relay_stop = CancellationToken::new();
    let relay_task = tokio::spawn({
        let stop = relay_stop.clone();
        async move { relay.run(stop).await }
    });

    let (addr, server_stop) = serve(&t).await;
    let url = format!("http://{addr}/outbox");

    // Without credentials the API refuses, and the page asks for a token.
    let unauthenticated = raw_get(addr, "/outbox/api/stats").await;
    assert!(
        unauthenticated.starts_with("HTTP/1.1 401"),
        "{unauthenticated}"
    );

    let driver = start_driver().await;
    let c = browser(&driver).await;
    c.goto(&url).await.expect("open the dashboard");
    wait_for(
        &c,
        "the token prompt",
        "document.getElementById('login').classList.contains('open')",
    )
    .await;
    assert_eq!(
        wait_for(
            &c,
            "content hidden",
            "String(document.getElementById('content').hidden)"
        )
        .await,
        json!("true")
    );
    c.find(Locator::Css("#token"))
        .await
        .expect("token field")
        .send_keys(TOKEN)
        .await
        .expect("type");
    c.find(Locator::Css("#login-form button"))
        .await
        .expect("submit")
        .click()
        .await
        .expect("click");

    // The numbers, once the relay's open breaker shows.
    wait_for(
        &c,
        "the relay's open breaker",
        "document.querySelector('tr[data-relay=\"orders-relay\"] .badge.open')",
    )
    .await;
    assert_eq!(text(&c, "#pending").await, "3");
    assert_eq!(text(&c, "#failed").await, "3");
    assert_eq!(text(&c, "#inbox-failed").await, "1");
    assert_eq!(text(&c, "#published").await, published.to_string());
    assert_eq!(text(&c, "#oldest").await, "30m");
    assert_eq!(text(&c, "#health").await, "degraded");
    assert_eq!(text(&c, "#caller").await, "ops (write)");
    let relay_row = text(&c, "tr[data-relay=\"orders-relay\"]").await;
    assert!(
        relay_row.contains("nats") && relay_row.contains("connection refused"),
        "{relay_row}"
    );
    // The only relay owns every partition (the database says so too).
    assert!(relay_row.contains("256 / 256"), "{relay_row}");
    let owned = t
        .scalar("SELECT COUNT(*) FROM outbox_partitions WHERE owner LIKE 'orders-relay:%'")
        .await;
    assert_eq!(owned, 256);
    let reasons = text(&c, "#reasons").await;
    assert!(reasons.contains("3 dead letters"), "{reasons}");
    assert!(reasons.contains("relay orders-relay"), "{reasons}");
    let rows = wait_for(
        &c,
        "3 dead letters",
        "document.querySelectorAll('#dead-letters tr[data-id]').length === 3",
    )
    .await;
    assert_eq!(rows, json!(true));
    // The broker's error is shown as text, never run as markup.
    let err = text(&c, &format!("tr[data-id=\"{}\"] td.err", s.failed[0])).await;
    assert_eq!(err, "broker said no: <script>alert(1)</script>");
    let bars = wait_for(
        &c,
        "chart bars",
        "document.querySelectorAll('#chart rect').length",
    )
    .await;
    assert!(
        bars.as_u64().expect("n") >= 59,
        "a bar per minute with publications: {bars}"
    );
    wait_for(
        &c,
        "the backlog line",
        "document.getElementById('backlog-line')",
    )
    .await;

    assert_eq!(text(&c, "#scheduled").await, "2");
    wait_for(
        &c,
        "2 scheduled rows",
        "document.querySelectorAll('#scheduled-events tr[data-id]').length === 2",
    )
    .await;

    save_screenshot(&c, "OUTBOX_SCREENSHOT", "dashboard.png").await;

    // Cancel the later scheduled event, confirmed: gone from the page and the table.
    click(
        &c,
        &format!("tr[data-id=\"{}\"] button.cancel", scheduled[1]),
    )
    .await;
    confirm(&c).await;
    wait_for(
        &c,
        "one scheduled event",
        "document.getElementById('scheduled').textContent === '1'",
    )
    .await;
    let left = Outbox::new(&t.db).get(scheduled[1]).await;
    assert!(
        matches!(left, Err(seaorm_outbox::Error::NotFound { .. })),
        "{left:?}"
    );
    assert!(Outbox::new(&t.db).get(scheduled[0]).await.is_ok());

    // Replay one: the row leaves the page and the dead letter leaves the database.
    let outbox = Outbox::new(&t.db);
    click(
        &c,
        &format!("tr[data-id=\"{}\"] button.replay", s.failed[2]),
    )
    .await;
    wait_for(
        &c,
        "the replayed row to go",
        &format!("!document.querySelector('tr[data-id=\"{}\"]')", s.failed[2]),
    )
    .await;
    assert_eq!(
        outbox.get(s.failed[2]).await.expect("get").status,
        OutboxStatus::Pending
    );
    assert_eq!(outbox.count_failed().await.expect("count"), 2);

    // A bulk replay asks first; cancel changes nothing.
    click(&c, "#replay-all").await;
    let question = wait_for(
        &c,
        "the confirmation",
        &format!("{DIALOG_OPEN} && document.getElementById('confirm-text').textContent"),
    )
    .await;
    assert_eq!(question, json!("Replay all 2 dead letters?"));
    click(&c, "#confirm-cancel").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(outbox.count_failed().await.expect("count"), 2, "cancelled");
    click(&c, "#replay-all").await;
    confirm(&c).await;
    wait_for(
        &c,
        "no dead letters",
        "document.getElementById('failed').textContent === '0'",
    )
    .await;
    assert_eq!(outbox.count_failed().await.expect("count"), 0);

    // Discard the inbox's dead letter, confirmed.
    click(
        &c,
        &format!("tr[data-id=\"{}\"] button.discard", s.inbox_dead_letter),
    )
    .await;
    confirm(&c).await;
    wait_for(
        &c,
        "no inbox dead letters",
        "document.getElementById('inbox-failed').textContent === '0'",
    )
    .await;
    let (_, v) = Call::get("/api/inbox/dead-letters")
        .token(TOKEN)
        .send(
            &Admin::builder(t.db.clone())
                .authorizer(BearerTokens::new().reader("check", TOKEN))
                .build(),
        )
        .await;
    assert_eq!(v["total"], 0, "{v}");

    c.close().await.expect("close the browser");
    relay_stop.cancel();
    relay_task.await.expect("relay");
    server_stop.cancel();
    t.cleanup().await;
}

/// One plain HTTP/1.1 GET, the raw response.
async fn raw_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

/// The log relay's panel on a PostgreSQL of the test's own with `wal_level=logical` and
/// `max_slot_wal_keep_size=1MB`: a slot the server gave up on shows as lost (and the health as
/// unhealthy), a fresh one as reserved; the log dead letters are listed, one replayed (written
/// to the log again) and an unreadable one discarded, each checked in the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_log_relay_panel_shows_a_lost_slot_and_handles_log_dead_letters() {
    use common::pg_server::PgServer;
    use sea_orm::ConnectionTrait;

    let server = PgServer::start_with(&[
        "wal_level=logical",
        "max_replication_slots=8",
        "max_wal_senders=4",
        "max_slot_wal_keep_size=1MB",
    ]);
    let t = TestDb::new_postgres_at(&server.url()).await;
    let sql = |s: String| {
        let db = t.db.clone();
        async move {
            db.execute_unprepared(&s)
                .await
                .unwrap_or_else(|e| panic!("{s}: {e}"));
        }
    };
    // A slot left behind while WAL is written past the server's limit: lost.
    sql("SELECT pg_create_logical_replication_slot('behind_slot', 'pgoutput')".into()).await;
    sql("CREATE TABLE filler (x int)".into()).await;
    let started = Instant::now();
    loop {
        sql("INSERT INTO filler SELECT generate_series(1, 200000)".into()).await;
        sql("SELECT pg_switch_wal()".into()).await;
        sql("CHECKPOINT".into()).await;
        let lost = t
            .scalar(
                "SELECT COUNT(*) FROM pg_replication_slots \
                 WHERE slot_name = 'behind_slot' AND wal_status = 'lost'",
            )
            .await;
        if lost == 1 {
            break;
        }
        assert!(started.elapsed() < WAIT, "the slot never became lost");
    }
    sql("SELECT pg_create_logical_replication_slot('live_slot', 'pgoutput')".into()).await;
    // pgoutput needs a publication to decode with; the messages need no table in it.
    sql("CREATE PUBLICATION dash_pub".into()).await;
    // Two log dead letters: an event the broker refused, and a record nobody could read.
    let event_id = uuid::Uuid::now_v7();
    let raw_id = uuid::Uuid::now_v7();
    sql(format!(
        "INSERT INTO outbox_log_dead_letters (id, slot, event_type, aggregate_type, aggregate_id, \
         payload, headers, occurred_at, committed_at, error, attempts, failed_at) VALUES \
         ('{event_id}', 'live_slot', 'order.placed', 'order', 'o-9', '{{\"total\": 9}}', '{{}}', \
         now(), now(), 'rejected by the broker', 3, now())"
    ))
    .await;
    sql(format!(
        "INSERT INTO outbox_log_dead_letters (id, slot, raw, error, attempts, failed_at) VALUES \
         ('{raw_id}', 'live_slot', 'not an envelope', 'unreadable record', 1, now())"
    ))
    .await;

    let (addr, server_stop) = serve(&t).await;
    let driver = start_driver().await;
    let c = browser(&driver).await;
    sign_in(&c, &format!("http://{addr}/outbox"), TOKEN).await;

    wait_for(
        &c,
        "the lost slot, marked",
        "document.querySelector('#log-slots tr[data-slot=\"behind_slot\"].lost')",
    )
    .await;
    let lost = text(&c, "#log-slots tr[data-slot=\"behind_slot\"]").await;
    assert!(lost.contains("LOST: events after"), "{lost}");
    let live = text(&c, "#log-slots tr[data-slot=\"live_slot\"]").await;
    assert!(
        live.contains("reserved") && live.contains("none (idle)"),
        "{live}"
    );
    assert!(text(&c, "#log-summary").await.contains("1 LOST"));
    assert_eq!(text(&c, "#health").await, "unhealthy");
    assert!(text(&c, "#reasons").await.contains("behind_slot is lost"));
    wait_for(
        &c,
        "both log dead letters",
        "document.getElementById('ldl-total').textContent === '(2)'",
    )
    .await;
    assert!(
        text(&c, &format!("#log-dead-letters tr[data-id=\"{raw_id}\"]"))
            .await
            .contains("unreadable record")
    );
    assert_eq!(
        c.execute(
            "return document.querySelectorAll(arguments[0]).length;",
            vec![json!(format!("tr[data-id=\"{raw_id}\"] button.replay"))],
        )
        .await
        .expect("script"),
        json!(0),
        "an unreadable record has nothing to replay"
    );

    save_screenshot(&c, "OUTBOX_SCREENSHOT_LOG", "dashboard-log.png").await;

    let dead = |id: uuid::Uuid| {
        let t = &t;
        async move {
            t.scalar(&format!(
                "SELECT COUNT(*) FROM outbox_log_dead_letters WHERE id = '{id}'"
            ))
            .await
        }
    };
    let emitted = || {
        let t = &t;
        async move {
            t.scalar(&format!(
                "SELECT COUNT(*) FROM pg_logical_slot_peek_binary_changes('live_slot', NULL, \
                 NULL, 'proto_version', '1', 'publication_names', 'dash_pub', 'messages', 'true') \
                 WHERE position('{event_id}' in encode(data, 'escape')) > 0"
            ))
            .await
        }
    };
    assert_eq!(emitted().await, 0);
    // Replay the event: it leaves the table and is in the log again, under its id.
    click(&c, &format!("tr[data-id=\"{event_id}\"] button.replay")).await;
    wait_for(
        &c,
        "the replayed row to go",
        &format!("!document.querySelector('tr[data-id=\"{event_id}\"]')"),
    )
    .await;
    assert_eq!(dead(event_id).await, 0);
    assert_eq!(emitted().await, 1, "written to the log again");
    // Discard the unreadable one, confirmed.
    click(&c, &format!("tr[data-id=\"{raw_id}\"] button.discard")).await;
    confirm(&c).await;
    wait_for(
        &c,
        "no log dead letters",
        "document.getElementById('ldl-total').textContent === '(0)'",
    )
    .await;
    assert_eq!(dead(raw_id).await, 0);

    c.close().await.expect("close the browser");
    server_stop.cancel();
    drop(server);
}

/// The event browser over PostgreSQL: the first page shows on load; a type filter pages
/// through 120 events by cursor, forwards and back, each exactly once and in the database's
/// order; an aggregate and status filter finds its dead letters; an event opens in full (its
/// numbers checked against the table), is replayed from there (checked in the table), and
/// one found by id is discarded after a confirmation. A reader sees no action, and the API
/// refuses the reader's replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_event_browser_finds_pages_opens_and_acts_on_events() {
    let t = TestDb::new(Backend::Postgres).await;
    let s = seed(&t).await;
    let outbox = Outbox::new(&t.db);
    let mut bulk = Vec::new();
    for i in 0..120 {
        let e = NewEvent::new("bulk.event", "bulk", format!("b-{i}"))
            .payload(&json!({ "n": i }))
            .header("trace", format!("t-{i}"));
        bulk.push(outbox.add_event(e).await.expect("add"));
    }
    outbox.mark_published_many(&bulk).await.expect("publish");

    let (addr, server_stop) = serve(&t).await;
    let url = format!("http://{addr}/outbox");
    let driver = start_driver().await;
    let c = browser(&driver).await;
    sign_in(&c, &url, TOKEN).await;

    // The first page on load: the 50 newest written.
    wait_for(
        &c,
        "the first page",
        "document.querySelectorAll('#found tr[data-id]').length === 50",
    )
    .await;
    let newest: Vec<String> = bulk
        .iter()
        .rev()
        .take(50)
        .map(ToString::to_string)
        .collect();
    assert_eq!(found(&c).await, newest);

    // Paging through one type: 50, 50, 20, newest first, each once.
    find(&c, &[("f-type", "bulk.event")]).await;
    let mut pages = Vec::new();
    for (n, want) in [(1, 50), (2, 50), (3, 20)] {
        wait_for(
            &c,
            &format!("page {n}"),
            &format!(
                "document.getElementById('page-no').textContent === 'page {n}' && \
                 document.querySelectorAll('#found tr[data-id]').length === {want}"
            ),
        )
        .await;
        pages.push(found(&c).await);
        let last = n == 3;
        assert_eq!(
            c.execute(
                "return document.getElementById('next-page').disabled;",
                vec![]
            )
            .await
            .expect("script"),
            json!(last),
            "page {n}: Older is enabled until the last page"
        );
        if !last {
            click(&c, "#next-page").await;
        }
    }
    let walked: Vec<String> = pages.concat();
    let all: Vec<String> = bulk.iter().rev().map(ToString::to_string).collect();
    assert_eq!(walked, all, "each event once, newest written first");
    click(&c, "#prev-page").await;
    wait_for(
        &c,
        "back to page 2",
        "document.getElementById('page-no').textContent === 'page 2'",
    )
    .await;
    assert_eq!(found(&c).await, pages[1]);

    // A time range, in the browser's own time zone: minutes 1.5 to 5.5 of the seed hold p-2
    // and s-0, newest first.
    let local = |minutes: f64| {
        let at = Utc::now() - chrono::Duration::minutes(30)
            + chrono::Duration::milliseconds((minutes * 60_000.0) as i64);
        at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    let (since, until): (Value, Value) = (json!(local(1.5)), json!(local(5.5)));
    c.execute(
        "const toLocal = (iso) => { const d = new Date(iso); \
           return new Date(d.getTime() - d.getTimezoneOffset() * 60000).toISOString().slice(0, 19); }; \
         for (const id of ['f-id','f-aggregate-type','f-aggregate-id','f-type','f-status']) \
           document.getElementById(id).value = ''; \
         document.getElementById('f-since').value = toLocal(arguments[0]); \
         document.getElementById('f-until').value = toLocal(arguments[1]);",
        vec![since, until],
    )
    .await
    .expect("fill the range");
    click(&c, "#find button[type=submit]").await;
    wait_for(
        &c,
        "the events in the range",
        &format!(
            "document.querySelector('#found tr[data-id=\"{}\"]') && \
             document.querySelectorAll('#found tr[data-id]').length === 2",
            s.pending[2]
        ),
    )
    .await;
    assert_eq!(
        found(&c).await,
        vec![s.published[0].to_string(), s.pending[2].to_string()]
    );

    // One aggregate's dead letters.
    find(&c, &[("f-aggregate-id", "o-1"), ("f-status", "failed")]).await;
    let want = vec![s.failed[1].to_string(), s.failed[0].to_string()];
    wait_for(
        &c,
        "o-1's two dead letters",
        &format!(
            "document.querySelector('#found tr[data-id=\"{}\"]') && \
             document.querySelectorAll('#found tr[data-id]').length === 2",
            s.failed[0]
        ),
    )
    .await;
    assert_eq!(found(&c).await, want);

    // Opened in full: what the table holds.
    click(&c, &format!("#found tr[data-id=\"{}\"]", s.failed[0])).await;
    wait_for(
        &c,
        "the event opened",
        &format!(
            "document.getElementById('event-detail').dataset.id === '{}' && \
             !document.getElementById('event-detail').hidden",
            s.failed[0]
        ),
    )
    .await;
    let stored = outbox.get(s.failed[0]).await.expect("get");
    assert_eq!(
        text(&c, "#d-fields dd[data-field=Attempts]").await,
        stored.attempts.to_string()
    );
    assert_eq!(
        text(&c, "#d-fields dd[data-field='Last error']").await,
        stored.last_error.clone().expect("an error")
    );
    assert_eq!(
        text(&c, "#d-fields dd[data-field=Status]").await,
        "dead letter"
    );
    let shown: Value = serde_json::from_str(&text(&c, "#d-payload").await).expect("payload");
    assert_eq!(shown, stored.payload);

    // Replayed from there: pending again in the table, and on the page.
    click(&c, "#d-actions button.replay").await;
    wait_for(
        &c,
        "the replayed event, pending",
        "document.getElementById('event-detail').dataset.status === 'pending'",
    )
    .await;
    assert_eq!(
        outbox.get(s.failed[0]).await.expect("get").status,
        OutboxStatus::Pending
    );

    // Found by id, then discarded after the confirmation.
    find(&c, &[("f-id", &s.failed[1].to_string())]).await;
    wait_for(
        &c,
        "the event found by id",
        &format!(
            "document.getElementById('event-detail').dataset.id === '{}'",
            s.failed[1]
        ),
    )
    .await;
    assert_eq!(found(&c).await, vec![s.failed[1].to_string()]);
    save_screenshot(&c, "OUTBOX_SCREENSHOT_EVENTS", "dashboard-events.png").await;
    click(&c, "#d-actions button.discard").await;
    confirm(&c).await;
    wait_for(
        &c,
        "the detail closed",
        "document.getElementById('event-detail').hidden",
    )
    .await;
    let gone = outbox.get(s.failed[1]).await;
    assert!(
        matches!(gone, Err(seaorm_outbox::Error::NotFound { .. })),
        "{gone:?}"
    );

    // A reader: the same dead letter opens with no action, and the API refuses a replay.
    c.execute("sessionStorage.clear();", vec![])
        .await
        .expect("sign out");
    sign_in(&c, &url, READER).await;
    wait_for(
        &c,
        "signed in as a reader",
        "document.getElementById('caller').textContent === 'viewer (read)'",
    )
    .await;
    find(&c, &[("f-id", &s.failed[2].to_string())]).await;
    wait_for(
        &c,
        "the dead letter opened for the reader",
        &format!(
            "document.getElementById('event-detail').dataset.id === '{}'",
            s.failed[2]
        ),
    )
    .await;
    assert_eq!(
        c.execute(
            "return document.querySelectorAll('#d-actions button').length;",
            vec![]
        )
        .await
        .expect("script"),
        json!(0)
    );
    let status = c
        .execute_async(
            "const done = arguments[arguments.length - 1]; \
             fetch(arguments[0], { method: 'POST', headers: { 'Authorization': 'Bearer ' + arguments[1], \
               'Content-Type': 'application/json' }, body: '{}' }).then((r) => done(r.status));",
            vec![
                json!(format!("{url}/api/dead-letters/{}/replay", s.failed[2])),
                json!(READER),
            ],
        )
        .await
        .expect("fetch");
    assert_eq!(status, json!(403));
    assert_eq!(
        outbox.get(s.failed[2]).await.expect("get").status,
        OutboxStatus::Failed
    );

    c.close().await.expect("close the browser");
    server_stop.cancel();
    t.cleanup().await;
}

/// The inbox consumers' panel over PostgreSQL: a consumer process running here and one that
/// reported from another host are both listed, the other's figures exactly as its row holds
/// them and marked as behind (its oldest message waited 150 s); the live one's row is the one
/// its process wrote, and leaves the page when the process stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_inbox_consumers_panel_lists_every_consumer_process() {
    use consumer::{Effects, Harness, create_effects, fast, message};
    use seaorm_outbox::inbox::Inbox;

    let t = TestDb::new(Backend::Postgres).await;
    create_effects(&t).await;
    // A process elsewhere, as its heartbeat left its row.
    t.exec(
        "a consumer row",
        "INSERT INTO inbox_consumers (consumer, instance, broker, started_at, heartbeat_at, \
         applied, duplicates, dead_lettered, retries, applied_per_min, duplicates_per_min, \
         dead_lettered_per_min, held, lag_secs) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        vec![
            "ledger".into(),
            "other-host:202:bbbbbb".into(),
            "kafka".into(),
            (Utc::now() - chrono::Duration::hours(1)).into(),
            // Ahead, so it stays "recent" however slow the browser is.
            (Utc::now() + chrono::Duration::minutes(10)).into(),
            5000_i64.into(),
            12_i64.into(),
            1_i64.into(),
            3_i64.into(),
            1234.5_f64.into(),
            12.0_f64.into(),
            0.5_f64.into(),
            7_i64.into(),
            150.0_f64.into(),
        ],
    )
    .await;
    let live = Harness::start(
        &t,
        "billing",
        Effects::default(),
        fast().heartbeat_interval(Some(Duration::from_millis(200))),
    );
    for i in 0..20 {
        live.send(message(
            Some(&format!("m-{i}")),
            &format!("k{i}"),
            i,
            i as u64,
        ))
        .await;
    }
    live.wait_acks(20).await;
    // Its row, once its counts are in.
    let inbox = Inbox::new(&t.db);
    let started = Instant::now();
    let mine = loop {
        let rows = inbox
            .consumers(Duration::from_secs(60))
            .await
            .expect("rows");
        if let Some(r) = rows
            .iter()
            .find(|r| r.consumer == "billing" && r.applied == 20)
        {
            break r.clone();
        }
        assert!(started.elapsed() < WAIT, "no heartbeat row: {rows:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let (addr, server_stop) = serve(&t).await;
    let driver = start_driver().await;
    let c = browser(&driver).await;
    sign_in(&c, &format!("http://{addr}/outbox"), TOKEN).await;
    wait_for(
        &c,
        "both consumer processes",
        "document.querySelectorAll('#consumers tr[data-instance]').length === 2",
    )
    .await;
    assert_eq!(
        text(&c, "#consumers-summary").await,
        "(2 consumers, 2 processes)"
    );
    let other = "#consumers tr[data-instance=\"other-host:202:bbbbbb\"]";
    for (cell, want) in [
        ("td.applied", "1235"),
        ("td.duplicates", "12"),
        ("td.dead", "0.5"),
        ("td.held", "7"),
        ("td.lag", "3m"),
    ] {
        assert_eq!(text(&c, &format!("{other} {cell}")).await, want, "{cell}");
    }
    assert_eq!(
        c.execute(
            "return document.querySelector(arguments[0]).className;",
            vec![json!(other)]
        )
        .await
        .expect("script"),
        json!("behind")
    );
    let row = text(&c, other).await;
    assert!(row.contains("ledger") && row.contains("kafka"), "{row}");
    let live_row = format!("#consumers tr[data-instance=\"{}\"]", mine.instance);
    let shown = text(&c, &live_row).await;
    assert!(
        shown.contains("billing") && shown.contains("test"),
        "{shown}"
    );
    wait_for(
        &c,
        "the live process idle",
        &format!(
            "document.querySelector('{} td.held') && \
             document.querySelector('{} td.held').textContent === '0' && \
             document.querySelector('{} td.lag').textContent === 'none waiting'",
            live_row.replace('\'', "\\'"),
            live_row.replace('\'', "\\'"),
            live_row.replace('\'', "\\'")
        ),
    )
    .await;
    c.execute(
        "document.getElementById('inbox-section').scrollIntoView();",
        vec![],
    )
    .await
    .expect("scroll");
    save_screenshot(&c, "OUTBOX_SCREENSHOT_CONSUMERS", "dashboard-consumers.png").await;

    // A graceful stop removes its row: gone from the table and the page.
    let stats = live.stop().await;
    assert_eq!(stats.applied, 20);
    wait_for(
        &c,
        "the stopped process gone",
        "document.querySelectorAll('#consumers tr[data-instance]').length === 1",
    )
    .await;
    let rows = inbox
        .consumers(Duration::from_secs(60))
        .await
        .expect("rows");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].instance, "other-host:202:bbbbbb");

    c.close().await.expect("close the browser");
    server_stop.cancel();
    t.cleanup().await;
}

/// One dashboard over two tenants: the selector switches every number to the tenant chosen,
/// keeps it in the URL across a reload, and a replay from the page changes that tenant's
/// database and not the default one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_tenant_selector_switches_the_page_and_acts_on_that_tenant() {
    let default = TestDb::new(Backend::Postgres).await;
    let acme = TestDb::new(Backend::Postgres).await;
    let add = |t: &TestDb, n: usize| {
        let db = t.db.clone();
        async move {
            Outbox::new(&db)
                .add_events(
                    (0..n)
                        .map(|i| NewEvent::new("order.placed", "order", i.to_string()))
                        .collect(),
                )
                .await
                .expect("seed")
        }
    };
    let d_ids = add(&default, 2).await;
    let a_ids = add(&acme, 5).await;
    Outbox::new(&default.db)
        .mark_failed(d_ids[0], "no route")
        .await
        .expect("fail");
    Outbox::new(&acme.db)
        .mark_failed(a_ids[0], "no route")
        .await
        .expect("fail");
    let (addr, stop) =
        serve_admin(Admin::builder(default.db.clone()).tenant("acme", acme.db.clone())).await;
    let driver = start_driver().await;
    let c = browser(&driver).await;
    let url = format!("http://{addr}/outbox");
    sign_in(&c, &url, TOKEN).await;
    wait_for(
        &c,
        "the selector",
        "!document.getElementById('tenant').hidden && document.getElementById('tenant').options.length === 2",
    )
    .await;
    wait_for(
        &c,
        "the default tenant's backlog",
        "document.getElementById('pending').textContent === '1'",
    )
    .await;

    c.execute(
        "const s = document.getElementById('tenant'); s.value = 'acme'; s.dispatchEvent(new Event('change'));",
        vec![],
    )
    .await
    .expect("select acme");
    wait_for(
        &c,
        "acme's backlog",
        "document.getElementById('pending').textContent === '4'",
    )
    .await;
    assert!(
        c.current_url()
            .await
            .expect("url")
            .as_str()
            .contains("tenant=acme")
    );
    wait_for(
        &c,
        "acme's dead letter",
        &format!(
            "document.querySelector('#dead-letters tr[data-id=\"{}\"]')",
            a_ids[0]
        ),
    )
    .await;
    click(
        &c,
        &format!("#dead-letters tr[data-id=\"{}\"] button.replay", a_ids[0]),
    )
    .await;
    wait_for(
        &c,
        "the replayed row to go",
        &format!(
            "!document.querySelector('#dead-letters tr[data-id=\"{}\"]')",
            a_ids[0]
        ),
    )
    .await;
    assert_eq!(
        Outbox::new(&acme.db)
            .get(a_ids[0])
            .await
            .expect("get")
            .status,
        OutboxStatus::Pending
    );
    assert_eq!(
        Outbox::new(&default.db)
            .get(d_ids[0])
            .await
            .expect("get")
            .status,
        OutboxStatus::Failed,
        "a replay for acme touched the default tenant"
    );
    // A reload keeps the tenant.
    c.refresh().await.expect("reload");
    wait_for(
        &c,
        "acme again after a reload",
        "document.getElementById('tenant').value === 'acme' && document.getElementById('pending').textContent === '5'",
    )
    .await;
    c.close().await.expect("close");
    stop.cancel();
    default.cleanup().await;
    acme.cleanup().await;
}
