//! The `seaorm-outbox` binary as a subprocess against PostgreSQL: status numbers, dead-letter
//! replay and discard, purge, every bad-input path, and the relay process with its `/metrics`
//! and `/healthz` scraped over HTTP.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use common::TestDb;
use sea_orm::{ConnectionTrait, Statement};
use seaorm_outbox::{NewEvent, Outbox, OutboxRepository, OutboxStatus};
use uuid::Uuid;

on_backends!(
    [postgres: Postgres] =>
    status_reports_the_backlog,
    status_shows_each_relay_and_its_breaker,
    failed_list_show_replay_discard,
    purge_deletes_old_published_events,
    bad_input_is_one_line_and_a_non_zero_exit,
    relay_process_serves_metrics_and_health_and_stops_on_sigterm,
    relay_process_guards_its_admin_api_with_the_token_from_the_environment,
    inbox_dead_letters_list_show_replay_discard_and_purge,
);

on_backends!(
    @each empty [postgres: Postgres, mysql: MySql, sqlite_file: SqliteFile] =>
    migrate_up_down_and_status_on_an_empty_database,
    migrate_adopts_a_database_migrated_by_the_host_migrator,
);

/// The binary on `t`'s database, whatever the backend.
fn cli_on(t: &TestDb) -> Command {
    let env = t.child_env();
    let url = env
        .iter()
        .find(|(k, _)| *k == "OUTBOX_CHILD_URL")
        .map(|(_, v)| v.clone())
        .expect("url");
    let mut c = Command::new(env!("CARGO_BIN_EXE_seaorm-outbox"));
    c.env("OUTBOX_DATABASE_URL", url)
        .env_remove("OUTBOX_DATABASE_SCHEMA")
        .env_remove("RUST_LOG")
        .env_remove("RUST_BACKTRACE");
    if t.backend == common::Backend::Postgres {
        c.env("OUTBOX_DATABASE_SCHEMA", &t.name);
    }
    c
}

fn ok_on(t: &TestDb, args: &[&str]) -> String {
    let o = cli_on(t).args(args).output().expect("run seaorm-outbox");
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    stdout(&o)
}

/// `migrate status --json`: how many of the library's migrations are applied, of how many.
fn migrations_applied(t: &TestDb) -> (usize, usize) {
    let v: serde_json::Value =
        serde_json::from_str(&ok_on(t, &["migrate", "status", "--json"])).expect("json");
    let list = v.as_array().expect("array");
    let applied = list.iter().filter(|m| m["applied"] == true).count();
    (applied, list.len())
}

async fn table_exists(t: &TestDb, table: &str) -> bool {
    let sql = match t.backend {
        common::Backend::Postgres => format!(
            "SELECT COUNT(*) FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_name = '{table}'"
        ),
        common::Backend::MySql => format!(
            "SELECT COUNT(*) FROM information_schema.tables \
             WHERE table_schema = DATABASE() AND table_name = '{table}'"
        ),
        _ => {
            format!("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '{table}'")
        }
    };
    t.scalar(&sql).await == 1
}

async fn column_exists(t: &TestDb, table: &str, column: &str) -> bool {
    let sql = match t.backend {
        common::Backend::Postgres => format!(
            "SELECT COUNT(*) FROM information_schema.columns WHERE \
             table_schema = current_schema() AND table_name = '{table}' \
             AND column_name = '{column}'"
        ),
        common::Backend::MySql => format!(
            "SELECT COUNT(*) FROM information_schema.columns WHERE \
             table_schema = DATABASE() AND table_name = '{table}' AND column_name = '{column}'"
        ),
        _ => format!("SELECT COUNT(*) FROM pragma_table_info('{table}') WHERE name = '{column}'"),
    };
    t.scalar(&sql).await == 1
}

async fn migrate_up_down_and_status_on_an_empty_database(t: &TestDb) {
    let total = seaorm_outbox_migration_count();
    assert_eq!(migrations_applied(t), (0, total), "nothing applied yet");
    assert!(!table_exists(t, "outbox_events").await);

    let out = ok_on(t, &["migrate", "up", "-n", "2"]);
    assert_eq!(
        out.lines().filter(|l| l.starts_with("applied ")).count(),
        2,
        "{out}"
    );
    assert_eq!(migrations_applied(t), (2, total));

    ok_on(t, &["migrate", "up"]);
    assert_eq!(migrations_applied(t), (total, total));
    assert!(table_exists(t, "outbox_partitions").await);
    assert!(column_exists(t, "outbox_events", "deliver_at").await);
    let out = ok_on(t, &["migrate", "up"]);
    assert!(out.starts_with("nothing applied"), "{out}");
    // The tables work: an event in, counted, and given its partition.
    let id = Outbox::new(&t.db)
        .add_event(NewEvent::new("order.placed", "order", "42"))
        .await
        .expect("add");
    assert_eq!(
        Outbox::new(&t.db).count_unpublished().await.expect("count"),
        1
    );

    // Down one step: PostgreSQL's BRIN index on occurred_at goes (a no-op elsewhere).
    let out = ok_on(t, &["migrate", "down"]);
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("rolled back "))
            .count(),
        1,
        "{out}"
    );
    assert_eq!(migrations_applied(t), (total - 1, total));
    assert!(table_exists(t, "inbox_consumers").await, "only one step");
    // Then the consumers' heartbeat table, and nothing else.
    ok_on(t, &["migrate", "down"]);
    assert_eq!(migrations_applied(t), (total - 2, total));
    assert!(!table_exists(t, "inbox_consumers").await);
    assert!(table_exists(t, "inbox_messages").await);
    // Then MySQL's displaced-partition column (a no-op elsewhere).
    ok_on(t, &["migrate", "down"]);
    assert_eq!(migrations_applied(t), (total - 3, total));
    assert!(!column_exists(t, "outbox_events", "displaced_partition").await);
    assert!(
        column_exists(t, "outbox_events", "deliver_at").await,
        "one step at a time"
    );
    // And the scheduled-delivery migration, whose columns go.
    ok_on(t, &["migrate", "down"]);
    assert_eq!(migrations_applied(t), (total - 4, total));
    for column in ["deliver_at", "holds_aggregate", "expires_at"] {
        assert!(!column_exists(t, "outbox_events", column).await, "{column}");
    }
    assert!(
        table_exists(t, "outbox_partitions").await,
        "four steps only"
    );
    ok_on(t, &["migrate", "up"]);
    assert_eq!(migrations_applied(t), (total, total));
    let event = Outbox::new(&t.db).get(id).await.expect("kept");
    assert_eq!(event.aggregate_id, "42", "down and up again kept the row");

    // All the way down and up again.
    ok_on(t, &["migrate", "down", "-n", &total.to_string()]);
    assert_eq!(migrations_applied(t), (0, total));
    assert!(!table_exists(t, "outbox_events").await);
    ok_on(t, &["migrate", "up"]);
    assert_eq!(migrations_applied(t), (total, total));

    // Bad input is refused before anything runs.
    let o = cli_on(t)
        .args(["migrate", "down", "-n", "0"])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(migrations_applied(t), (total, total));
}

fn seaorm_outbox_migration_count() -> usize {
    use sea_orm_migration::MigratorTrait;
    seaorm_outbox_migration::Migrator::migrations().len()
}

async fn migrate_adopts_a_database_migrated_by_the_host_migrator(t: &TestDb) {
    use sea_orm_migration::MigratorTrait;
    let total = seaorm_outbox_migration_count();
    // The host app's way: the library's migrations in its own Migrator, in seaql_migrations
    // beside one of the app's own versions, which must not trouble the binary.
    struct HostMigrator;
    impl MigratorTrait for HostMigrator {
        fn migrations() -> Vec<Box<dyn sea_orm_migration::MigrationTrait>> {
            seaorm_outbox_migration::migrations()
        }
    }
    HostMigrator::up(&t.db, None)
        .await
        .expect("host migrations");
    t.db.execute_unprepared(
        "INSERT INTO seaql_migrations (version, applied_at) VALUES ('m20990101_000001_app', 0)",
    )
    .await
    .expect("an app migration");
    assert_eq!(
        migrations_applied(t),
        (total, total),
        "read from seaql_migrations"
    );
    let out = ok_on(t, &["migrate", "up"]);
    assert!(out.starts_with("nothing applied"), "{out}");
    assert!(table_exists(t, "seaorm_outbox_migrations").await);
    assert_eq!(
        t.scalar("SELECT COUNT(*) FROM seaorm_outbox_migrations")
            .await,
        total as i64,
        "adopted, under the same versions"
    );
    assert_eq!(migrations_applied(t), (total, total));
}

fn cli(t: &TestDb) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_seaorm-outbox"));
    c.env("OUTBOX_DATABASE_URL", common::postgres_url())
        .env("OUTBOX_DATABASE_SCHEMA", &t.name)
        .env_remove("RUST_BACKTRACE");
    c
}

fn run(t: &TestDb, args: &[&str]) -> Output {
    cli(t).args(args).output().expect("run seaorm-outbox")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ok(t: &TestDb, args: &[&str]) -> String {
    let o = run(t, args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    stdout(&o)
}

async fn seed(t: &TestDb, n: usize) -> Vec<Uuid> {
    Outbox::new(&t.db)
        .add_events(
            (0..n)
                .map(|i| NewEvent::new("order.placed", "order", i.to_string()))
                .collect(),
        )
        .await
        .expect("seed")
}

async fn status_reports_the_backlog(t: &TestDb) {
    let ids = seed(t, 10).await;
    let outbox = Outbox::new(&t.db);
    outbox
        .mark_published_many(&ids[..3])
        .await
        .expect("publish");
    outbox.mark_failed(ids[3], "boom").await.expect("fail");
    let at = chrono::Utc::now() + chrono::Duration::hours(3);
    outbox
        .add_event(NewEvent::new("cart.reminder", "cart", "1").deliver_at(at))
        .await
        .expect("schedule");
    let v: serde_json::Value = serde_json::from_str(&ok(t, &["status", "--json"])).expect("json");
    assert_eq!(v["pending"], 6);
    assert_eq!(v["pending_due"], 6);
    assert_eq!(v["scheduled"], 1);
    assert!(v["next_scheduled_at"].is_string(), "{v}");
    assert_eq!(v["failed"], 1);
    assert_eq!(v["published_last_hour"], 3);
    assert!(v["oldest_pending_age_seconds"].as_f64().is_some());
    let table = ok(t, &["status"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("pending") && l.trim_end().ends_with(" 6")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("failed") && l.trim_end().ends_with(" 1")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("scheduled") && l.trim_end().ends_with(" 1")),
        "{table}"
    );
    assert!(table.contains("next due at"), "{table}");
}

/// A publisher whose broker never answers.
struct Down;

#[async_trait::async_trait]
impl seaorm_outbox::Publisher for Down {
    async fn publish(
        &self,
        events: &[seaorm_outbox::OutboxEvent],
    ) -> Result<Vec<seaorm_outbox::PublishOutcome>, seaorm_outbox::BoxError> {
        Ok(vec![
            seaorm_outbox::PublishOutcome::Unavailable(
                "connection refused".into()
            );
            events.len()
        ])
    }

    fn name(&self) -> &str {
        "down"
    }
}

/// `status` reads each running relay's heartbeat: a relay whose broker is down shows as
/// unavailable, with the error, and a stopped relay is gone.
async fn status_shows_each_relay_and_its_breaker(t: &TestDb) {
    use seaorm_outbox::relay::{BreakerConfig, Relay, RelayConfig};
    seed(t, 3).await;
    let relay = Relay::builder(t.connect_again().await, Down)
        .config(
            RelayConfig::default()
                .name("cli-test-relay")
                .breaker(BreakerConfig::default().base(Duration::from_secs(5)))
                .idle_poll_interval(Duration::from_millis(50)),
        )
        .build()
        .expect("relay");
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });
    let started = Instant::now();
    let v = loop {
        let v: serde_json::Value =
            serde_json::from_str(&ok(t, &["status", "--json"])).expect("json");
        if v["relays"][0]["breaker"] == "open" {
            break v;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the relay's open breaker never showed: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let r = &v["relays"][0];
    assert_eq!(r["name"], "cli-test-relay");
    assert_eq!(r["publisher"], "down");
    assert_eq!(r["last_error"], "connection refused");
    assert!(r["unavailable_since"].is_string(), "{r}");
    assert_eq!(v["pending"], 3, "nothing spent or lost meanwhile");
    let table = ok(t, &["status"]);
    assert!(
        table.lines().any(|l| l.contains("cli-test-relay")
            && l.contains("UNAVAILABLE")
            && l.contains("connection refused")),
        "{table}"
    );
    stop.cancel();
    task.await.expect("relay");
    let v: serde_json::Value = serde_json::from_str(&ok(t, &["status", "--json"])).expect("json");
    assert_eq!(
        v["relays"],
        serde_json::json!([]),
        "a stopped relay removes its row"
    );
}

async fn failed_list_show_replay_discard(t: &TestDb) {
    let ids = seed(t, 5).await;
    let outbox = Outbox::new(&t.db);
    for id in &ids[..4] {
        outbox
            .mark_failed(*id, "broker rejected it")
            .await
            .expect("fail");
    }
    let list = ok(t, &["failed", "list"]);
    assert!(
        list.contains(&ids[0].to_string()) && list.contains("broker rejected it"),
        "{list}"
    );
    assert!(list.contains("4 dead letters shown of 4"), "{list}");
    let shown: serde_json::Value =
        serde_json::from_str(&ok(t, &["failed", "show", &ids[0].to_string(), "--json"]))
            .expect("json");
    assert_eq!(shown["status"], "failed");
    assert_eq!(shown["last_error"], "broker rejected it");

    assert_eq!(
        ok(t, &["failed", "replay", &ids[0].to_string()]).trim(),
        "replayed 1 dead letter"
    );
    assert_eq!(
        outbox.get(ids[0]).await.expect("get").status,
        OutboxStatus::Pending
    );
    assert_eq!(
        ok(t, &["failed", "replay", "--aggregate", "order:1"]).trim(),
        "replayed 1 dead letter"
    );
    assert_eq!(
        ok(t, &["failed", "discard", &ids[2].to_string()]).trim(),
        "discarded 1 dead letter"
    );
    assert!(outbox.get(ids[2]).await.is_err());
    assert_eq!(
        ok(t, &["failed", "replay", "--all"]).trim(),
        "replayed 1 dead letter"
    );
    assert_eq!(outbox.count_failed().await.expect("count"), 0);
    assert_eq!(outbox.count_unpublished().await.expect("count"), 4);
}

async fn purge_deletes_old_published_events(t: &TestDb) {
    let ids = seed(t, 30).await;
    let outbox = Outbox::new(&t.db);
    outbox
        .mark_published_many(&ids[..25])
        .await
        .expect("publish");
    // 20 of them were published ten days ago.
    let old = Utc::now() - chrono::Duration::days(10);
    let list: Vec<String> = ids[..20].iter().map(|id| format!("'{id}'")).collect();
    t.db.execute_raw(Statement::from_sql_and_values(
        t.db.get_database_backend(),
        format!(
            "UPDATE outbox_events SET published_at = $1 WHERE id IN ({})",
            list.join(",")
        ),
        vec![old.into()],
    ))
    .await
    .expect("age rows");
    let out = ok(
        t,
        &["purge", "--published-older-than", "7d", "--batch-size", "6"],
    );
    assert_eq!(out.trim(), "purged 20 published events older than 7days");
    let left = outbox.stats().await.expect("stats");
    assert_eq!(left.published_last_hour, 5);
    assert_eq!(left.pending(), 5);
}

/// Asserts a failure: the exit code, one line on stderr starting with `error:` and mentioning
/// `needle`, no panic, no backtrace.
fn fails(t: &TestDb, env: &[(&str, &str)], args: &[&str], code: i32, needle: &str) {
    let o = cli(t)
        .envs(env.iter().copied())
        .args(args)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
    assert_eq!(
        err.lines().count(),
        1,
        "{args:?}: one line expected, got {err:?}"
    );
    assert!(err.starts_with("error:"), "{err}");
    assert!(err.contains(needle), "{args:?}: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

async fn bad_input_is_one_line_and_a_non_zero_exit(t: &TestDb) {
    fails(
        t,
        &[("OUTBOX_DATABASE_URL", "not a url")],
        &["status"],
        2,
        "malformed database URL",
    );
    fails(
        t,
        &[(
            "OUTBOX_DATABASE_URL",
            "postgres://postgres@127.0.0.1:1/none",
        )],
        &["status"],
        1,
        "cannot connect",
    );
    fails(
        t,
        &[],
        &["purge", "--published-older-than", "seven days"],
        2,
        "invalid duration",
    );
    fails(
        t,
        &[],
        &["purge", "--published-older-than", "7d", "--batch-size", "0"],
        2,
        "invalid number",
    );
    fails(
        t,
        &[],
        &["failed", "show", "not-a-uuid"],
        2,
        "invalid event id",
    );
    fails(
        t,
        &[],
        &["failed", "show", &Uuid::now_v7().to_string()],
        1,
        "not found",
    );
    fails(t, &[], &["failed", "replay"], 2, "required");
    fails(
        t,
        &[],
        &["failed", "replay", "--aggregate", "nocolon"],
        2,
        "TYPE:ID",
    );
    fails(t, &[], &["relay", "--publisher", "nats"], 2, "--broker-url");
    fails(
        t,
        &[],
        &[
            "relay",
            "--publisher",
            "stdout",
            "--http-addr",
            "not-an-addr",
        ],
        2,
        "--http-addr",
    );
    fails(t, &[], &["bogus"], 2, "unrecognized subcommand");
    // A pending event cannot be discarded: a clear state error, exit 1.
    let id = seed(t, 1).await[0];
    fails(
        t,
        &[],
        &["failed", "discard", &id.to_string()],
        1,
        "cannot discard",
    );
}

fn http_get(addr: &str, path: &str) -> (u16, String) {
    http(addr, "GET", path, &[])
}

/// One request on its own connection; the status and the body.
fn http(addr: &str, method: &str, path: &str, headers: &[&str]) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the relay's HTTP port");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    if !headers.iter().any(|h| h.starts_with("host:")) {
        extra.push_str("host: x\r\n");
    }
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nconnection: close\r\n{extra}\r\n"
    )
    .expect("request");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("response");
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Sums every sample of `metric` in a Prometheus text page.
fn metric_sum(page: &str, metric: &str) -> f64 {
    page.lines()
        .filter(|l| {
            l.starts_with(metric)
                && (l[metric.len()..].starts_with('{') || l[metric.len()..].starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn relay_process_serves_metrics_and_health_and_stops_on_sigterm(t: &TestDb) {
    seed(t, 40).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = cli(t)
        .args([
            "relay",
            "--publisher",
            "stdout",
            "--http-addr",
            &addr,
            "--poll-interval",
            "100ms",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn relay");
    let start = Instant::now();
    let page = loop {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "relay never published 40 events"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        if std::net::TcpStream::connect(&addr).is_err() {
            continue;
        }
        let (status, page) = http_get(&addr, "/metrics");
        assert_eq!(status, 200);
        if metric_sum(&page, "outbox_events_published_total") >= 40.0
            && page.contains("outbox_backlog")
        {
            break page;
        }
    };
    assert_eq!(
        metric_sum(&page, "outbox_events_published_total"),
        40.0,
        "{page}"
    );
    assert!(
        page.contains(
            r#"outbox_events_published_total{publisher="log",event_type="order.placed"} 40"#
        ),
        "{page}"
    );
    assert!(page.contains("outbox_commit_to_ack_seconds"), "{page}");
    assert!(page.contains("outbox_batch_size"), "{page}");
    assert_eq!(
        Outbox::new(&t.db).count_unpublished().await.expect("count"),
        0
    );

    let (status, body) = http_get(&addr, "/healthz");
    assert_eq!(status, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(health["status"], "healthy", "{body}");
    assert_eq!(http_get(&addr, "/nope").0, 404);
    // axum's HTTP: HEAD, 405, and the admin router with its dashboard.
    let (status, body) = http(&addr, "HEAD", "/metrics", &[]);
    assert_eq!((status, body.as_str()), (200, ""));
    assert_eq!(http(&addr, "POST", "/metrics", &[]).0, 405);
    let (status, page) = http_get(&addr, "/admin");
    assert_eq!(status, 200);
    assert!(page.contains("<title>Outbox</title>"), "{page}");
    // No OUTBOX_ADMIN_TOKEN: loopback only, and a non-loopback Host is refused.
    let (status, body) = http_get(&addr, "/admin/api/stats");
    assert_eq!(status, 403, "{body}");
    let (status, body) = http(&addr, "GET", "/admin/api/stats", &["host: 127.0.0.1"]);
    assert_eq!(status, 200, "{body}");
    let stats: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(stats["caller"]["name"], "loopback");
    assert_eq!(http_get(&addr, "/admin/health").0, 200);

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "relay did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "graceful exit");
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("stderr");
    assert!(err.contains("relay stopped: published=40"), "{err}");
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("stdout");
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("published order.placed"))
            .count(),
        40
    );
}

async fn relay_process_guards_its_admin_api_with_the_token_from_the_environment(t: &TestDb) {
    let ids = seed(t, 2).await;
    Outbox::new(&t.db)
        .mark_failed(ids[0], "no route")
        .await
        .expect("fail");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = cli(t)
        .args(["relay", "--publisher", "stdout", "--http-addr", &addr])
        .env("OUTBOX_ADMIN_TOKEN", "s3cret")
        .env("OUTBOX_ADMIN_READ_TOKEN", "look")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn relay");
    let start = Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "relay never listened"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let local = "host: 127.0.0.1";
    assert_eq!(
        http(&addr, "GET", "/admin/api/stats", &[local]).0,
        401,
        "a token is set"
    );
    let (status, body) = http(
        &addr,
        "GET",
        "/admin/api/stats",
        &["authorization: Bearer look"],
    );
    assert_eq!(status, 200, "{body}");
    let replay = format!("/admin/api/dead-letters/{}/replay", ids[0]);
    let json = "content-type: application/json";
    let (status, body) = http(
        &addr,
        "POST",
        &replay,
        &["authorization: Bearer look", json],
    );
    assert_eq!(status, 403, "read-only token: {body}");
    let (status, body) = http(
        &addr,
        "POST",
        &replay,
        &["authorization: Bearer s3cret", json],
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(Outbox::new(&t.db).count_failed().await.expect("count"), 0);
    // A client that never finishes its request head is cut off after the header-read
    // timeout (10 s), not held open.
    let started = Instant::now();
    let mut slow = std::net::TcpStream::connect(&addr).expect("connect");
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(slow, "GET /metrics HTTP/1.1\r\nhost: x\r\n").expect("a partial head");
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(8) && waited < Duration::from_secs(25),
        "closed after {waited:?}"
    );
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    let status = child.wait().expect("wait");
    assert!(status.success());
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("stderr");
    assert!(err.contains("/admin (bearer token)"), "{err}");
}

/// Inserts an inbox dead letter for `consumer`, as a consumer would.
async fn inbox_dead_letter(t: &TestDb, consumer: &str, message_id: &str) -> Uuid {
    let id = Uuid::now_v7();
    t.db.execute_raw(Statement::from_sql_and_values(
        t.db.get_database_backend(),
        "INSERT INTO inbox_dead_letters (id, consumer, message_id, headers, payload, error, \
         attempts, received_at, failed_at) VALUES ($1, $2, $3, '[[\"event-id\",\"x\"]]', \
         $4, 'handler said no', 5, now(), now())",
        [
            id.into(),
            consumer.into(),
            message_id.into(),
            b"{\"total\":5}".to_vec().into(),
        ],
    ))
    .await
    .expect("insert dead letter");
    id
}

async fn inbox_dead_letters_list_show_replay_discard_and_purge(t: &TestDb) {
    let a = inbox_dead_letter(t, "billing", "m-1").await;
    let b = inbox_dead_letter(t, "billing", "m-2").await;
    let c = inbox_dead_letter(t, "shipping", "m-1").await;
    let list = ok(t, &["inbox", "failed", "list", "--consumer", "billing"]);
    assert!(
        list.contains(&a.to_string()) && list.contains(&b.to_string()),
        "{list}"
    );
    assert!(!list.contains(&c.to_string()), "{list}");
    assert!(list.contains("handler said no"), "{list}");
    assert!(list.contains("2 inbox dead letters shown of 2"), "{list}");
    let all: serde_json::Value =
        serde_json::from_str(&ok(t, &["inbox", "failed", "list", "--json"])).expect("json");
    assert_eq!(all.as_array().map(Vec::len), Some(3));
    let shown: serde_json::Value =
        serde_json::from_str(&ok(t, &["inbox", "failed", "show", &a.to_string()])).expect("json");
    assert_eq!(shown["payload"]["text"], r#"{"total":5}"#);
    assert_eq!(shown["headers"][0][1], "x");
    assert_eq!(
        ok(t, &["inbox", "failed", "replay", "--consumer", "billing"]).trim(),
        "replay requested for 2 inbox dead letters"
    );
    let requested = ok(t, &["inbox", "failed", "list"]);
    assert_eq!(
        requested.matches("[replay requested]").count(),
        2,
        "{requested}"
    );
    assert_eq!(
        ok(t, &["inbox", "failed", "discard", &c.to_string()]).trim(),
        "discarded 1 inbox dead letter"
    );
    assert_eq!(
        ok(t, &["inbox", "failed", "discard", "--all"]).trim(),
        "discarded 2 inbox dead letters"
    );
    let status = ok(t, &["inbox", "status"]);
    assert!(status.contains("dead letters                0"), "{status}");

    let inbox = seaorm_outbox::inbox::Inbox::new(&t.db);
    for i in 0..3 {
        inbox
            .record("billing", &format!("old-{i}"))
            .await
            .expect("record");
    }
    inbox.record("billing", "new").await.expect("record");
    t.db.execute_unprepared(
        "UPDATE inbox_messages SET processed_at = now() - interval '10 days' \
         WHERE message_id LIKE 'old-%'",
    )
    .await
    .expect("age");
    assert_eq!(
        ok(
            t,
            &[
                "inbox",
                "purge",
                "--processed-older-than",
                "7d",
                "--batch-size",
                "2"
            ]
        )
        .trim(),
        "purged 3 processed ids older than 7days"
    );
    fails(
        t,
        &[],
        &["inbox", "purge", "--processed-older-than", "soon"],
        2,
        "invalid duration",
    );
    fails(
        t,
        &[],
        &["inbox", "failed", "replay", "not-a-uuid"],
        2,
        "invalid event id",
    );
    assert!(
        ok(t, &["inbox", "status", "--consumer", "billing"])
            .contains("processed ids               1")
    );
}

/// A PostgreSQL restarted under a running relay process: its stderr, as JSON lines, warns of
/// the outage and then says it is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_process_logs_a_database_restart_and_its_recovery() {
    let server = common::pg_server::PgServer::start();
    let t = TestDb::new_postgres_at(&server.url()).await;
    seed(&t, 10).await;
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("stderr.log");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_seaorm-outbox"))
        .env("OUTBOX_DATABASE_URL", server.url())
        .env("OUTBOX_DATABASE_SCHEMA", &t.name)
        .env_remove("RUST_LOG")
        .args(["relay", "--publisher", "stdout", "--poll-interval", "100ms"])
        .args([
            "--http-addr",
            &format!("127.0.0.1:{port}"),
            "--log-format",
            "json",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn relay");
    let drained = Instant::now();
    while Outbox::new(&t.db).count_unpublished().await.ok() != Some(0) {
        assert!(drained.elapsed() < Duration::from_secs(30), "never drained");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let server = tokio::task::spawn_blocking(move || {
        server.restart(Duration::from_secs(3));
        server
    })
    .await
    .expect("restart");
    // JSON log lines, in order (the binary's own start line is plain text).
    let lines = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let is = |l: &serde_json::Value, level: &str, needle: &str| {
        l["level"] == level && l["message"].as_str().is_some_and(|m| m.contains(needle))
    };
    let recovered = Instant::now();
    let (warned, resumed) = loop {
        let all = lines();
        let warned = all.iter().position(|l| {
            l["level"] == "WARN"
                && l["target"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("seaorm_outbox"))
        });
        // The claim loop, the partitions' renewal or the LISTEN connection: whichever noticed.
        let resumed = all
            .iter()
            .rposition(|l| is(l, "INFO", "succeeded again") || is(l, "INFO", "re-established"));
        if let (Some(w), Some(r)) = (warned, resumed)
            && r > w
        {
            break (all[w].clone(), all[r].clone());
        }
        assert!(
            recovered.elapsed() < Duration::from_secs(60),
            "no warning followed by a recovery line: {all:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("outage: {warned}\nrecovery: {resumed}");
    // It delivers again after the restart.
    seed(&t, 5).await;
    let again = Instant::now();
    while Outbox::new(&t.db).count_unpublished().await.ok() != Some(0) {
        assert!(
            again.elapsed() < Duration::from_secs(30),
            "no delivery after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.kill().expect("kill");
    child.wait().expect("reap");
    drop(server);
}

/// A reader that goes away (`seaorm-outbox … | head`) ends the command quietly with success:
/// no panic, no error line. Standard output here is a pipe whose read end is already closed,
/// so the first write fails.
#[test]
fn a_closed_stdout_is_not_a_panic() {
    let db = tempfile::tempdir().expect("dir");
    let url = format!("sqlite://{}?mode=rwc", db.path().join("o.db").display());
    for args in [
        vec!["--help"],
        vec!["migrate", "up"],
        vec!["migrate", "status"],
    ] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = Command::new(env!("CARGO_BIN_EXE_seaorm-outbox"))
            .args(&args)
            .env("OUTBOX_DATABASE_URL", &url)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
