//! `--tenants FILE`: the binary over two PostgreSQL schemas and a SQLite file at once — a
//! per-tenant `status` (and one tenant that cannot be reached, reported, not fatal), dead
//! letters acted on in the tenant named and no other, `purge` per tenant, and `relay` as one
//! relay group with a per-tenant `/healthz`.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Backend, TestDb};
use sea_orm_migration::MigratorTrait;
use seaorm_outbox::{NewEvent, Outbox, OutboxRepository, OutboxStatus};

fn cli(file: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_seaorm-outbox"));
    c.env("OUTBOX_DATABASE_URL", common::postgres_url())
        .env("OUTBOX_TENANTS_FILE", file)
        .env_remove("OUTBOX_DATABASE_SCHEMA")
        .env_remove("RUST_BACKTRACE");
    c
}

fn run(file: &std::path::Path, args: &[&str]) -> Output {
    cli(file).args(args).output().expect("run seaorm-outbox")
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

async fn seed(t: &TestDb, aggregate: &str, n: usize) -> Vec<uuid::Uuid> {
    Outbox::new(&t.db)
        .add_events(
            (0..n)
                .map(|i| NewEvent::new("order.placed", aggregate, i.to_string()))
                .collect(),
        )
        .await
        .expect("seed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_failed_purge_and_relay_over_a_tenants_file() {
    let acme = TestDb::new(Backend::Postgres).await;
    let globex = TestDb::new(Backend::Postgres).await;
    let file_db = TestDb::new(Backend::SqliteFile).await;
    let sqlite_url = file_db
        .child_env()
        .into_iter()
        .find(|(k, _)| *k == "OUTBOX_CHILD_URL")
        .map(|(_, v)| v)
        .expect("url");
    let acme_ids = seed(&acme, "acme", 3).await;
    let globex_ids = seed(&globex, "globex", 5).await;
    seed(&file_db, "file", 7).await;
    Outbox::new(&acme.db)
        .mark_failed(acme_ids[0], "no route")
        .await
        .expect("fail");
    Outbox::new(&globex.db)
        .mark_failed(globex_ids[0], "no route")
        .await
        .expect("fail");

    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("tenants");
    std::fs::write(
        &file,
        format!(
            "# id target\nacme {}\n\nglobex {}\nfile {sqlite_url}\n",
            acme.name, globex.name
        ),
    )
    .expect("write");

    // A per-tenant table, and the same as JSON.
    let o = run(&file, &["status"]);
    assert!(o.status.success(), "{}", err(&o));
    let table = out(&o);
    let row = |id: &str| {
        table
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("{id} in {table}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    // TENANT PENDING DUE BACKOFF LEASED SCHEDULED FAILED
    assert_eq!(row("acme")[1..7], ["2", "2", "0", "0", "0", "1"], "{table}");
    assert_eq!(
        row("globex")[1..7],
        ["4", "4", "0", "0", "0", "1"],
        "{table}"
    );
    assert_eq!(row("file")[1..7], ["7", "7", "0", "0", "0", "0"], "{table}");
    let o = run(&file, &["status", "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&out(&o)).expect("json");
    assert_eq!(rows[1]["tenant"], "globex");
    assert_eq!(rows[1]["pending"], 4);
    assert_eq!(rows[2]["failed"], 0);

    // A tenant that cannot be reached is a row and exit 1; the others are still reported.
    let broken = dir.path().join("with-broken");
    std::fs::write(
        &broken,
        format!(
            "acme {}\ngone postgres://postgres@127.0.0.1:1/none\n",
            acme.name
        ),
    )
    .expect("write");
    let o = run(&broken, &["status"]);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert!(
        out(&o).contains("gone") && out(&o).contains("error:"),
        "{}",
        out(&o)
    );
    assert!(
        err(&o).contains("1 of 2 tenants could not be read"),
        "{}",
        err(&o)
    );

    // Dead letters: one tenant at a time, and only the one named.
    let o = run(&file, &["failed", "list"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(err(&o).contains("--tenant ID"), "{}", err(&o));
    let o = run(&file, &["--tenant", "acme", "failed", "replay", "--all"]);
    assert!(o.status.success(), "{}", err(&o));
    let status = |db, id| async move { Outbox::new(db).get(id).await.expect("get").status };
    assert_eq!(status(&acme.db, acme_ids[0]).await, OutboxStatus::Pending);
    assert_eq!(
        status(&globex.db, globex_ids[0]).await,
        OutboxStatus::Failed,
        "a replay for acme touched globex"
    );
    let o = run(&file, &["--tenant", "nobody", "status"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(err(&o).contains("no tenant `nobody`"), "{}", err(&o));

    // The relay as one group over all three.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = cli(&file)
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
    let started = Instant::now();
    loop {
        let pending = [&acme, &globex, &file_db].map(|t| &t.db);
        let mut left = 0;
        for db in pending {
            left += Outbox::new(db).count_unpublished().await.expect("count");
        }
        if left == 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{left} left");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let health = loop {
        if let Ok(mut s) = std::net::TcpStream::connect(&addr) {
            use std::io::Write;
            write!(
                s,
                "GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
            )
            .expect("request");
            let mut resp = String::new();
            s.read_to_string(&mut resp).expect("response");
            break resp;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let body = health.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let h: serde_json::Value = serde_json::from_str(body).expect("json");
    for id in ["acme", "globex", "file"] {
        assert!(h["tenants"][id]["status"].is_string(), "{body}");
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let exit = child.wait().expect("wait");
    assert!(exit.success());
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("stderr");
    // acme: 2 pending + 1 replayed; globex: 4; file: 7.
    assert!(
        stderr.contains("relay group stopped: published=14"),
        "{stderr}"
    );

    // Purge, per tenant.
    let o = run(&file, &["purge", "--published-older-than", "0s"]);
    assert!(o.status.success(), "{}", err(&o));
    let text = out(&o);
    for (id, n) in [("acme", 3), ("globex", 4), ("file", 7)] {
        assert!(
            text.contains(&format!("{id}: purged {n} published events")),
            "{text}"
        );
    }
    acme.cleanup().await;
    globex.cleanup().await;
    file_db.cleanup().await;
}

/// `migrate --tenants`: every tenant migrated, each reported under its id, a schema created
/// where missing; a second run applies nothing; a tenant that cannot be reached is reported
/// and the exit code says so, the others migrated all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_every_tenant_of_a_tenants_file() {
    let maria = TestDb::empty(Backend::MySql).await;
    let maria_url = maria
        .child_env()
        .into_iter()
        .find(|(k, _)| *k == "OUTBOX_CHILD_URL")
        .map(|(_, v)| v)
        .expect("url");
    let maria_url = format!(
        "{}/{}",
        &maria_url[..maria_url.rfind('/').expect("/")],
        maria.name
    );
    let dir = tempfile::tempdir().expect("dir");
    let sqlite = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
    let schema = format!("outbox_t_{}", uuid::Uuid::now_v7().simple());
    let file = dir.path().join("tenants");
    std::fs::write(
        &file,
        format!("pg {schema}\nmaria {maria_url}\nlite {sqlite}\n"),
    )
    .expect("write");
    let o = run(&file, &["migrate", "up"]);
    assert!(o.status.success(), "{}", err(&o));
    let text = out(&o);
    for id in ["pg", "maria", "lite"] {
        assert!(text.contains(&format!("tenant {id}:")), "{text}");
    }
    assert_eq!(
        text.matches("\napplied seaorm_outbox_m2026").count(),
        3 * seaorm_outbox_migration::Migrator::migrations().len(),
        "{text}"
    );
    let o = run(&file, &["migrate", "up"]);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(out(&o).matches("nothing applied").count(), 3, "{}", out(&o));
    // Each tenant's outbox works.
    for target in [None, Some(maria_url.as_str()), Some(sqlite.as_str())] {
        let db = match target {
            None => common::open(Backend::Postgres, &common::postgres_url(), &schema).await,
            Some(url) => sea_orm::Database::connect(url).await.expect("connect"),
        };
        Outbox::new(&db)
            .add_event(NewEvent::new("t", "a", "1"))
            .await
            .expect("an outbox to write to");
    }
    let o = run(&file, &["migrate", "status", "--json"]);
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
    let broken = dir.path().join("broken");
    std::fs::write(
        &broken,
        format!("gone postgres://postgres@127.0.0.1:1/none\nlite {sqlite}\n"),
    )
    .expect("write");
    let o = run(&broken, &["migrate", "up"]);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert!(out(&o).contains("tenant gone:\n  error:"), "{}", out(&o));
    assert!(
        out(&o).contains("tenant lite:\nnothing applied"),
        "{}",
        out(&o)
    );
    let admin = common::open(Backend::Postgres, &common::postgres_url(), "public").await;
    sea_orm::ConnectionTrait::execute_unprepared(
        &admin,
        &format!("DROP SCHEMA \"{schema}\" CASCADE"),
    )
    .await
    .expect("drop");
    maria.cleanup().await;
}
