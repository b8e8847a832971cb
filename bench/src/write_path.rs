//! The write path: a one-row domain transaction, alone, with a raw outbox `INSERT` of the same
//! row, and with `add_event`, at 1 and 8 concurrent clients. Rounds alternate the variants so
//! drift hits them alike; each figure is the median round.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use sea_orm::{ConnectionTrait, DatabaseConnection, TransactionTrait, Value};
use seaorm_outbox::{NewEvent, Outbox, OutboxRepository};
use uuid::Uuid;

use crate::db::{BenchDb, Kind};
use crate::report::{Row, Target};

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    DomainOnly,
    /// Issue 16's minimal outbox: one `INSERT` into `raw_outbox` (a primary key and one partial
    /// index), PostgreSQL only.
    MinimalInsert,
    RawInsert,
    AddEvent,
    /// The floor of any outbox that adds one statement.
    SelectOne,
    /// Message mode: `Outbox::emit`, a transactional logical message and no row.
    Emit,
    /// The same message written by hand: one prepared `pg_logical_emit_message` with a
    /// ready-made JSON text, no validation or serialisation (what the library adds, isolated).
    RawEmit,
}

const ROUNDS: usize = 5;

fn payload(n: i64) -> serde_json::Value {
    serde_json::json!({ "order_id": n, "total_cents": 1999, "currency": "EUR", "lines": [{ "sku": "tea", "qty": 2 }] })
}

async fn one_tx(db: &BenchDb, conn: &DatabaseConnection, v: Variant, n: i64) -> Result<()> {
    let txn = conn.begin().await?;
    txn.execute_raw(db.stmt(
        "INSERT INTO bench_orders (id, total) VALUES (?, ?)",
        vec![n.into(), 1999i64.into()],
    ))
    .await?;
    match v {
        Variant::DomainOnly => {}
        Variant::MinimalInsert => {
            txn.execute_raw(db.stmt(
                "INSERT INTO raw_outbox (id, aggregate_type, aggregate_id, event_type, payload, occurred_at) \
                 VALUES (?, ?, ?, ?, ?, ?)",
                vec![
                    Uuid::now_v7().into(),
                    "order".into(),
                    n.to_string().into(),
                    "order.placed".into(),
                    Value::Json(Some(Box::new(payload(n)))),
                    chrono::Utc::now().into(),
                ],
            ))
            .await?;
        }
        Variant::RawInsert => {
            let now = chrono::Utc::now();
            let headers = serde_json::json!({ "correlation-id": "bench" });
            txn.execute_raw(db.stmt(
                "INSERT INTO outbox_events (id, event_type, aggregate_type, aggregate_id, payload, headers, \
                 occurred_at, created_at, status, attempts, next_attempt_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending', 0, ?)",
                vec![
                    Uuid::now_v7().into(),
                    "order.placed".into(),
                    "order".into(),
                    n.to_string().into(),
                    Value::Json(Some(Box::new(payload(n)))),
                    Value::Json(Some(Box::new(headers))),
                    now.into(),
                    now.into(),
                    now.into(),
                ],
            ))
            .await?;
        }
        Variant::SelectOne => {
            txn.execute_unprepared("SELECT 1").await?;
        }
        Variant::Emit => {
            Outbox::new(&txn)
                .emit(
                    NewEvent::new("order.placed", "order", n.to_string())
                        .json_payload(payload(n))
                        .header("correlation-id", "bench"),
                )
                .await?;
        }
        Variant::RawEmit => {
            let body = format!(
                r#"{{"v":1,"id":"{}","event_type":"order.placed","aggregate_type":"order","aggregate_id":"{n}","payload":{},"headers":{{"correlation-id":"bench"}},"occurred_at":"{}"}}"#,
                Uuid::now_v7(),
                payload(n),
                chrono::Utc::now().to_rfc3339()
            );
            txn.execute_raw(db.stmt(
                "SELECT pg_logical_emit_message(true, ?::text, ?::text)",
                vec!["seaorm_outbox".into(), body.into()],
            ))
            .await?;
        }
        Variant::AddEvent => {
            Outbox::new(&txn)
                .add_event(
                    NewEvent::new("order.placed", "order", n.to_string())
                        .json_payload(payload(n))
                        .header("correlation-id", "bench"),
                )
                .await?;
        }
    }
    txn.commit().await?;
    Ok(())
}

/// Transactions per second of `clients` concurrent clients for `secs` seconds.
async fn round(
    db: &Arc<BenchDb>,
    conn: &DatabaseConnection,
    v: Variant,
    clients: usize,
    secs: f64,
    ids: &Arc<AtomicI64>,
) -> Result<f64> {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (db, conn, ids) = (db.clone(), conn.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            while Instant::now() < deadline {
                one_tx(&db, &conn, v, ids.fetch_add(1, Ordering::Relaxed)).await?;
                done += 1;
            }
            anyhow::Ok(done)
        }));
    }
    let start = Instant::now();
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub(crate) async fn section(db: &BenchDb, secs: f64, rows: &mut Vec<Row>) -> Result<()> {
    db.reset().await?;
    let pg = db.kind == Kind::Postgres;
    if pg {
        db.create_minimal().await?;
    }
    // The write path runs against a shared handle; BenchDb is only read.
    let shared = Arc::new(BenchDb::new_view(db).await?);
    let ids = Arc::new(AtomicI64::new(1));
    let notify_modes: &[bool] = if db.kind == Kind::Postgres {
        &[true, false]
    } else {
        &[true]
    };
    for &notify in notify_modes {
        for clients in [1usize, 8] {
            let conn = if notify {
                db.pool(clients as u32 + 2).await?
            } else {
                // The documented off switch for the insert trigger's NOTIFY.
                db.pool_without_notify(clients as u32 + 2).await?
            };
            let tag = if db.kind != Kind::Postgres {
                ""
            } else if notify {
                " (NOTIFY on)"
            } else {
                " (NOTIFY off)"
            };
            let mut results = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
            // Warm up prepared statements and the pool.
            round(&shared, &conn, Variant::AddEvent, clients, 0.2, &ids).await?;
            let variants = [
                Variant::DomainOnly,
                Variant::MinimalInsert,
                Variant::RawInsert,
                Variant::AddEvent,
            ];
            for _ in 0..ROUNDS {
                for (i, &v) in variants.iter().enumerate() {
                    if v == Variant::MinimalInsert && !pg {
                        results[i].push(0.0);
                        continue;
                    }
                    results[i]
                        .push(round(&shared, &conn, v, clients, secs / ROUNDS as f64, &ids).await?);
                }
            }
            let [domain, minimal, raw, add] = results.map(median);
            eprintln!(
                "{}{tag} write path x{clients}: domain {domain:.0}/s minimal {minimal:.0}/s raw {raw:.0}/s add_event {add:.0}/s",
                db.kind.label()
            );
            // Time per transaction, so "at most 1.05×" reads directly.
            let ms = |tps: f64| 1000.0 * clients as f64 / tps;
            rows.push(Row {
                section: "write path",
                name: format!(
                    "{}{tag} tx with add_event, {clients} client{}",
                    db.kind.label(),
                    if clients == 1 { "" } else { "s" }
                ),
                value: ms(add),
                unit: "ms/tx",
                baseline: Some(("same tx, raw INSERT".into(), ms(raw))),
                target: (db.kind == Kind::Postgres).then_some(Target::RatioAtMost(1.05)),
            });
            rows.push(Row {
                section: "write path",
                name: format!(
                    "{}{tag} tx with add_event vs domain-only, {clients} client{}",
                    db.kind.label(),
                    if clients == 1 { "" } else { "s" }
                ),
                value: ms(add),
                unit: "ms/tx",
                baseline: Some(("domain-only tx".into(), ms(domain))),
                // Issue 16: no more than the minimal outbox's INSERT costs, plus 0.05.
                target: pg.then(|| Target::RatioAtMost(domain / minimal + 0.05)),
            });
            if pg {
                rows.push(Row {
                    section: "write path",
                    name: format!(
                        "{}{tag} tx with the minimal raw_outbox INSERT vs domain-only, {clients} client{}",
                        db.kind.label(),
                        if clients == 1 { "" } else { "s" }
                    ),
                    value: ms(minimal),
                    unit: "ms/tx",
                    baseline: Some(("domain-only tx".into(), ms(domain))),
                    target: None,
                });
            }
            conn.close().await?;
        }
    }
    Ok(())
}

/// Issue 18's write path on a server with `wal_level=logical`: message mode against the same
/// transaction with `SELECT 1` in its place, at 1 and 8 clients, beside domain-only and the
/// minimal table outbox's `INSERT`.
pub(crate) async fn log_section(db: &BenchDb, secs: f64, rows: &mut Vec<Row>) -> Result<()> {
    db.reset().await?;
    db.create_minimal().await?;
    let shared = Arc::new(BenchDb::new_view(db).await?);
    let ids = Arc::new(AtomicI64::new(1));
    for clients in [1usize, 8] {
        let conn = db.pool_without_notify(clients as u32 + 2).await?;
        round(&shared, &conn, Variant::Emit, clients, 0.2, &ids).await?;
        let variants = [
            Variant::DomainOnly,
            Variant::SelectOne,
            Variant::Emit,
            Variant::MinimalInsert,
            Variant::RawEmit,
        ];
        let mut results = [Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..ROUNDS {
            for (i, &v) in variants.iter().enumerate() {
                results[i]
                    .push(round(&shared, &conn, v, clients, secs / ROUNDS as f64, &ids).await?);
            }
        }
        let [domain, select1, emit, minimal, raw_emit] = results.map(median);
        eprintln!(
            "log write path x{clients}: domain {domain:.0}/s select1 {select1:.0}/s emit {emit:.0}/s \
             raw emit {raw_emit:.0}/s minimal insert {minimal:.0}/s"
        );
        let ms = |tps: f64| 1000.0 * clients as f64 / tps;
        let plural = if clients == 1 { "" } else { "s" };
        rows.push(Row {
            section: "log relay",
            name: format!("tx with Outbox::emit (message mode), {clients} client{plural}"),
            value: ms(emit),
            unit: "ms/tx",
            baseline: Some(("same tx with SELECT 1".into(), ms(select1))),
            target: Some(Target::RatioAtMost(1.10)),
        });
        rows.push(Row {
            section: "log relay",
            name: format!("tx with Outbox::emit vs domain-only, {clients} client{plural}"),
            value: ms(emit),
            unit: "ms/tx",
            baseline: Some(("domain-only tx".into(), ms(domain))),
            target: None,
        });
        rows.push(Row {
            section: "log relay",
            name: format!(
                "tx with a hand-written pg_logical_emit_message vs SELECT 1, {clients} client{plural}"
            ),
            value: ms(raw_emit),
            unit: "ms/tx",
            baseline: Some(("same tx with SELECT 1".into(), ms(select1))),
            target: None,
        });
        rows.push(Row {
            section: "log relay",
            name: format!("tx with the minimal table INSERT vs SELECT 1, {clients} client{plural}"),
            value: ms(minimal),
            unit: "ms/tx",
            baseline: Some(("same tx with SELECT 1".into(), ms(select1))),
            target: None,
        });
        conn.close().await?;
    }
    Ok(())
}
