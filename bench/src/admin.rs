//! Issue 31: the admin API's endpoints on a large retained table (10M rows on PostgreSQL), each
//! called through the admin router in process (no socket), the median of several calls. The
//! dashboard's refresh calls the first three; the rest are the event browser's lookups.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use sea_orm::ConnectionTrait;
use seaorm_outbox_admin::{Admin, BearerTokens};
use tower::ServiceExt;

use crate::db::BenchDb;
use crate::report::{Row, Target};

const TOKEN: &str = "bench-reader";

/// Calls per endpoint; the median is reported.
const CALLS: usize = 7;

/// `n` events over the last ten days, oldest first, as a retaining outbox holds them: 0.5%
/// pending (the newest), 1 in 10,000 dead-lettered, the rest published; 10 events per
/// aggregate; four common event types and one rare one (1 in 1,000). Ids are UUIDv7 of each
/// event's time, as the library writes them.
async fn seed(db: &BenchDb, n: u64) -> Result<()> {
    let pending_from = n - n / 200;
    let step_ms = (10 * 86_400_000 / n).max(1);
    db.exec(&format!(
        "INSERT INTO outbox_events (id, event_type, aggregate_type, aggregate_id, payload, headers, \
         occurred_at, created_at, status, attempts, last_error, next_attempt_at, published_at, \
         failed_at, partition_no) \
         SELECT (lpad(to_hex((extract(epoch from ts) * 1000)::bigint), 12, '0') || '7' \
                 || substr(h, 1, 3) || '8' || substr(h, 4, 15))::uuid, \
           CASE WHEN i % 1000 = 7 THEN 'order.refunded' \
                ELSE (ARRAY['order.placed','order.paid','order.shipped','order.delivered'])[1 + i % 4] END, \
           'order', 'order-' || (i % {aggregates}), \
           jsonb_build_object('order', i, 'amount', i % 997, 'note', 'a payload of a realistic size'), \
           '{{\"trace\":\"abc\"}}'::jsonb, ts, ts, \
           CASE WHEN i > {pending_from} THEN 'pending' WHEN i % 10000 = 3 THEN 'failed' ELSE 'published' END, \
           CASE WHEN i % 10000 = 3 THEN 5 ELSE 1 END, \
           CASE WHEN i % 10000 = 3 THEN 'broker said no' END, \
           ts, \
           CASE WHEN i <= {pending_from} AND i % 10000 <> 3 THEN ts + interval '20 ms' END, \
           CASE WHEN i % 10000 = 3 THEN ts + interval '1 s' END, \
           (i % 256)::smallint \
         FROM (SELECT i, now() - interval '10 days' + i * interval '{step_ms} ms' AS ts, \
                      md5(i::text) AS h FROM generate_series(1, {n}) i) s",
        aggregates = (n / 10).max(1),
    ))
    .await?;
    db.exec("VACUUM ANALYZE outbox_events").await?;
    db.exec("CHECKPOINT").await
}

/// One GET through the router: its status checked, its time taken.
async fn call(router: &axum::Router, path: &str) -> Result<Duration> {
    let req = Request::get(path)
        .header("host", "localhost")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Body::empty())?;
    let started = Instant::now();
    let res = router.clone().oneshot(req).await?;
    let status = res.status();
    let body = axum::body::to_bytes(res.into_body(), usize::MAX).await?;
    let took = started.elapsed();
    ensure!(
        status == StatusCode::OK,
        "{path}: {status} {}",
        String::from_utf8_lossy(&body)
    );
    Ok(took)
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

async fn one_id(db: &BenchDb, sql: &str) -> Result<String> {
    let row = db
        .db
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            sql,
        ))
        .await?
        .context("no row")?;
    let id: uuid::Uuid = row.try_get("", "id")?;
    Ok(id.to_string())
}

pub(crate) async fn section(pg: &BenchDb, n: u64, rows: &mut Vec<Row>) -> Result<()> {
    let db = BenchDb::new_second(pg.kind).await?;
    let started = Instant::now();
    seed(&db, n).await?;
    eprintln!(
        "admin: seeded {n} events in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let router = axum::Router::new().nest(
        "/outbox",
        Admin::builder(db.db.clone())
            .authorizer(BearerTokens::new().reader("bench", TOKEN))
            .build(),
    );
    // Half way down the table, for a deep page and a lookup by id.
    let middle = one_id(
        &db,
        &format!(
            "SELECT id FROM outbox_events ORDER BY id LIMIT 1 OFFSET {}",
            n / 2
        ),
    )
    .await?;
    let day = |days_ago: i64| {
        (chrono::Utc::now() - chrono::Duration::days(days_ago))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    let aggregate = format!("order-{}", n / 20);
    let endpoints: Vec<(&str, String)> = vec![
        ("stats (each refresh)", "/outbox/api/stats".into()),
        (
            "history, 60 min (chart)",
            "/outbox/api/history?minutes=60".into(),
        ),
        (
            "dead letters, first 100",
            "/outbox/api/dead-letters?limit=100".into(),
        ),
        ("events, first page", "/outbox/api/events?limit=50".into()),
        (
            "events, a page half way down (after=)",
            format!("/outbox/api/events?limit=50&after=w.{middle}"),
        ),
        (
            "events, page 2,001 by offset (the old way)",
            "/outbox/api/events?limit=50&offset=100000".into(),
        ),
        (
            "events by status failed",
            "/outbox/api/events?status=failed&limit=50".into(),
        ),
        (
            "events by status pending, oldest first",
            "/outbox/api/events?status=pending&order=oldest&sort=occurred&limit=50".into(),
        ),
        (
            "events by aggregate (10 in the table)",
            format!("/outbox/api/events?aggregate_type=order&aggregate_id={aggregate}&limit=50"),
        ),
        (
            "events by a rare type (1 in 1,000)",
            "/outbox/api/events?event_type=order.refunded&limit=50".into(),
        ),
        (
            "events in one hour five days ago",
            format!(
                "/outbox/api/events?since={}&until={}&sort=occurred&limit=50",
                day(5),
                (chrono::Utc::now() - chrono::Duration::days(5) + chrono::Duration::hours(1))
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
        ),
        ("one event by id", format!("/outbox/api/events/{middle}")),
    ];
    for (name, path) in &endpoints {
        rows.push(measure(&router, n, name, path).await?);
    }
    // The optional index the README offers for lookups by aggregate on a large retained table.
    let started = Instant::now();
    db.exec(
        "CREATE INDEX outbox_events_browse_aggregate_idx ON outbox_events \
         (aggregate_type, aggregate_id, id)",
    )
    .await?;
    eprintln!(
        "admin: the optional aggregate index built in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let (name, path) = &endpoints[8];
    rows.push(
        measure(
            &router,
            n,
            &format!("{name}, with the optional index"),
            path,
        )
        .await?,
    );
    db.drop().await
}

/// The median of [`CALLS`] calls of `path`, after one to warm the cache as a second click
/// would.
async fn measure(router: &axum::Router, n: u64, name: &str, path: &str) -> Result<Row> {
    call(router, path).await?;
    let mut times = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        times.push(call(router, path).await?);
    }
    let ms = median(times);
    eprintln!("admin {name}: {ms:.1} ms ({path})");
    Ok(Row {
        section: "admin",
        name: format!("PostgreSQL, {n} rows: {name}"),
        value: ms,
        unit: "ms",
        baseline: None,
        target: Some(Target::AtMost(200.0)),
    })
}
