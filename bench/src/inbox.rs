//! Consumer throughput through the inbox against the same consumer without it, same run, same
//! concurrency: a JetStream stream prefilled with `n` messages, drained by a `Consumer` whose
//! handler writes one domain row per message; with the inbox, each transaction also inserts
//! the `(consumer, message_id)` row first.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use async_trait::async_trait;
use sea_orm::{ConnectionTrait, DatabaseTransaction, TransactionTrait};
use seaorm_outbox::broker::nats::NatsSource;
use seaorm_outbox::inbox::{
    Acknowledge, Consumer, ConsumerConfig, Delivery, Handler, HandlerError, Incoming, Source,
    SourceContext,
};
use tokio_util::sync::CancellationToken;

use crate::db::{BenchDb, Kind};
use crate::report::{Row, Target};

/// Messages per transaction in batch mode: `OUTBOX_BENCH_INBOX_BATCH`, or 100.
fn batch_size() -> usize {
    std::env::var("OUTBOX_BENCH_INBOX_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

/// Handlers in flight, in both modes: the consumer's default, or `OUTBOX_BENCH_INBOX_CONCURRENCY`.
pub(crate) fn concurrency() -> usize {
    std::env::var("OUTBOX_BENCH_INBOX_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ConsumerConfig::default().concurrency)
}

pub(crate) struct WriteRow {
    pub(crate) kind: Kind,
}

#[async_trait]
impl Handler for WriteRow {
    async fn handle(&self, txn: &DatabaseTransaction, msg: &Incoming) -> Result<(), HandlerError> {
        let sql = match self.kind {
            Kind::Postgres => {
                "INSERT INTO bench_effects (message_id, agg, body) VALUES ($1, $2, $3)"
            }
            _ => "INSERT INTO bench_effects (message_id, agg, body) VALUES (?, ?, ?)",
        };
        txn.execute_raw(sea_orm::Statement::from_sql_and_values(
            txn.get_database_backend(),
            sql,
            [
                msg.message_id.clone().into(),
                msg.ordering_key.clone().unwrap_or_default().into(),
                String::from_utf8_lossy(&msg.payload).into_owned().into(),
            ],
        ))
        .await?;
        Ok(())
    }
}

async fn prefill(js: &async_nats::jetstream::Context, stream: &str, n: u64) -> Result<()> {
    js.create_stream(async_nats::jetstream::stream::Config {
        name: stream.to_owned(),
        subjects: vec![format!("{stream}.>")],
        ..Default::default()
    })
    .await?;
    let body = serde_json::json!({
        "order_id": "00000000-0000-0000-0000-000000000000",
        "customer": "customer-000042",
        "lines": [{"sku": "SKU-1234", "qty": 2, "price_cents": 1999}],
        "currency": "EUR",
        "placed_at": "2026-12-01T00:00:00.000000Z",
    })
    .to_string();
    let mut acks = Vec::with_capacity(1000);
    for i in 0..n {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("event-id", uuid::Uuid::now_v7().to_string().as_str());
        headers.insert("aggregate-id", format!("order-{}", i % 1000).as_str());
        acks.push(
            js.publish_with_headers(format!("{stream}.order"), headers, body.clone().into())
                .await?,
        );
        if acks.len() == 1000 {
            for a in acks.drain(..) {
                a.await?;
            }
        }
    }
    for a in acks {
        a.await?;
    }
    Ok(())
}

/// Messages per second for one full drain.
/// Empties the two tables without leaving dead rows behind (a `DELETE` would bloat the inbox's
/// indexes from run to run, and only the inbox runs would pay for it).
pub(crate) async fn empty(db: &BenchDb) -> Result<()> {
    for table in ["bench_effects", "inbox_messages"] {
        match db.kind {
            Kind::Sqlite => db.exec(&format!("DELETE FROM {table}")).await?,
            _ => db.exec(&format!("TRUNCATE TABLE {table}")).await?,
        }
    }
    Ok(())
}

async fn drain(
    db: &BenchDb,
    js: &async_nats::jetstream::Context,
    stream: &str,
    n: u64,
    inbox: bool,
    batch: usize,
) -> Result<f64> {
    empty(db).await?;
    let durable = format!("bench{}", uuid::Uuid::now_v7().simple());
    let config = ConsumerConfig::default()
        .concurrency(concurrency())
        .max_in_flight((concurrency() * batch).max(256))
        .batch_size(batch)
        .deduplicate(inbox);
    let pool = db.pool(concurrency() as u32 + 1).await?;
    let consumer = Arc::new(
        Consumer::builder(pool, "bench", WriteRow { kind: db.kind })
            .config(config)
            .build()?,
    );
    let stop = CancellationToken::new();
    let source = NatsSource::new(js.clone(), stream, durable.clone());
    let start = Instant::now();
    let run = {
        let (c, stop) = (Arc::clone(&consumer), stop.clone());
        tokio::spawn(async move { c.run(source, stop).await })
    };
    while consumer.stats().applied < n {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(600),
            "drain took over 10 min: {:?}",
            consumer.stats()
        );
        anyhow::ensure!(
            !run.is_finished(),
            "consumer stopped: {:?}",
            consumer.stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    stop.cancel();
    run.await??;
    js.get_stream(stream)
        .await?
        .delete_consumer(&durable)
        .await?;
    Ok(rate)
}

/// Transactions per second with no broker at all: `concurrency()` sessions each committing
/// `BEGIN; [inbox record;] INSERT effect; COMMIT` in a loop; what the database alone charges
/// for the record.
async fn database_only(db: &BenchDb, n: u64, inbox: bool) -> Result<f64> {
    empty(db).await?;
    let workers = concurrency() as u64;
    let pool = db.pool(workers as u32).await?;
    let handler = Arc::new(WriteRow { kind: db.kind });
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (pool, handler) = (pool.clone(), Arc::clone(&handler));
        tasks.push(tokio::spawn(async move {
            for i in (w..n).step_by(workers as usize) {
                let mut msg = Incoming::new("bench", Vec::new(), b"{}".to_vec());
                msg.message_id = uuid::Uuid::now_v7().to_string();
                msg.ordering_key = Some(format!("order-{}", i % 1000));
                let txn = pool.begin().await?;
                if inbox {
                    seaorm_outbox::inbox::Inbox::new(&txn)
                        .record("bench", &msg.message_id)
                        .await?;
                }
                handler
                    .handle(&txn, &msg)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                txn.commit().await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Acknowledges nothing: the in-memory source has no broker to tell.
struct NoAck;

#[async_trait]
impl Acknowledge for NoAck {
    async fn ack(self: Box<Self>) -> std::result::Result<(), seaorm_outbox::BoxError> {
        Ok(())
    }
}

/// `n` messages from memory, as fast as the consumer takes them.
struct MemorySource(u64);

#[async_trait]
impl Source for MemorySource {
    fn broker(&self) -> &'static str {
        "memory"
    }

    async fn run(self, ctx: SourceContext) -> seaorm_outbox::Result<()> {
        for i in 0..self.0 {
            let headers = vec![
                ("event-id".to_owned(), uuid::Uuid::now_v7().to_string()),
                ("aggregate-id".to_owned(), format!("order-{}", i % 1000)),
            ];
            let message = Incoming::new("memory", headers, b"{}".to_vec());
            let d = Delivery {
                message,
                ack: Box::new(NoAck),
            };
            tokio::select! {
                sent = ctx.deliveries.send(d) => if sent.is_err() { return Ok(()) },
                _ = ctx.stop.cancelled() => break,
            }
        }
        ctx.handed_over();
        ctx.shutdown.cancelled().await;
        Ok(())
    }
}

/// The consumer's own rate with no broker: `n` messages from memory, batches of `batch`.
async fn no_broker(db: &BenchDb, n: u64, inbox: bool, batch: usize) -> Result<f64> {
    empty(db).await?;
    let config = ConsumerConfig::default()
        .concurrency(concurrency())
        .max_in_flight((concurrency() * batch).max(256))
        .batch_size(batch)
        .deduplicate(inbox);
    let pool = db.pool(concurrency() as u32 + 1).await?;
    let consumer = Arc::new(
        Consumer::builder(pool, "bench", WriteRow { kind: db.kind })
            .config(config)
            .build()?,
    );
    let stop = CancellationToken::new();
    let start = Instant::now();
    let run = {
        let (c, stop) = (Arc::clone(&consumer), stop.clone());
        tokio::spawn(async move { c.run(MemorySource(n), stop).await })
    };
    while consumer.stats().applied < n {
        anyhow::ensure!(
            !run.is_finished(),
            "consumer stopped: {:?}",
            consumer.stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    stop.cancel();
    run.await??;
    Ok(rate)
}

pub(crate) async fn section(
    db: &BenchDb,
    n: u64,
    repeat: usize,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let label = db.kind.label();
    db.exec("DROP TABLE IF EXISTS bench_effects").await?;
    db.exec("CREATE TABLE bench_effects (message_id VARCHAR(255) NOT NULL, agg VARCHAR(64) NOT NULL, body TEXT NOT NULL)").await?;
    let client = async_nats::connect("nats://127.0.0.1:4222").await?;
    let js = async_nats::jetstream::new(client);
    let stream = format!("BENCH_INBOX_{}_{}", std::process::id(), label);
    prefill(&js, &stream, n).await?;
    // One unmeasured drain first: the first run on a fresh table and stream pays for caches.
    drain(db, &js, &stream, n, true, 1).await?;
    let (mut with, mut without) = (Vec::new(), Vec::new());
    let (mut batched_with, mut batched_without) = (Vec::new(), Vec::new());
    let size = batch_size();
    for _ in 0..repeat {
        let plain = drain(db, &js, &stream, n, false, 1).await?;
        let inboxed = drain(db, &js, &stream, n, true, 1).await?;
        let batched_plain = drain(db, &js, &stream, n, false, size).await?;
        let batched = drain(db, &js, &stream, n, true, size).await?;
        eprintln!(
            "{label} consumer x{}: no inbox {plain:.0}/s, inbox {inboxed:.0}/s ({:.2}x); \
             batches of {size}: no inbox {batched_plain:.0}/s, inbox {batched:.0}/s \
             ({:.2}x of the per-message consumer without the inbox)",
            concurrency(),
            inboxed / plain,
            batched / plain,
        );
        without.push(plain);
        with.push(inboxed);
        batched_without.push(batched_plain);
        batched_with.push(batched);
    }
    js.delete_stream(&stream).await?;
    let secs = if n < 5000 { 2 } else { 5 };
    let ((b50, b99), (p50, p99)) = crate::inbox_latency::measure(db, &js, secs, size).await?;
    let (mut mem_with, mut mem_without) = (Vec::new(), Vec::new());
    for _ in 0..repeat {
        mem_without.push(no_broker(db, n, false, size).await?);
        mem_with.push(no_broker(db, n, true, size).await?);
    }
    let (mut db_with, mut db_without) = (Vec::new(), Vec::new());
    for _ in 0..repeat {
        db_without.push(database_only(db, n, false).await?);
        db_with.push(database_only(db, n, true).await?);
    }
    db.exec("DROP TABLE bench_effects").await?;
    rows.push(Row {
        section: "inbox",
        name: format!(
            "consumer with inbox, NATS → {label}, {n} msgs, concurrency {}",
            concurrency()
        ),
        value: crate::median(&mut with),
        unit: "msg/s",
        baseline: Some((
            "same consumer, no inbox".into(),
            crate::median(&mut without),
        )),
        target: (db.kind == Kind::Postgres).then_some(Target::RatioAtLeast(0.8)),
    });
    let per_message_plain = crate::median(&mut without);
    rows.push(Row {
        section: "inbox",
        name: format!(
            "batched consumer with inbox (batches of {size}), NATS → {label}, {n} msgs, \
             concurrency {}",
            concurrency()
        ),
        value: crate::median(&mut batched_with),
        unit: "msg/s",
        baseline: Some(("per-message consumer, no inbox".into(), per_message_plain)),
        target: (db.kind == Kind::Postgres).then_some(Target::RatioAtLeast(2.0)),
    });
    rows.push(Row {
        section: "inbox",
        name: format!(
            "batched consumer with inbox (batches of {size}), NATS → {label}, {n} msgs, \
             concurrency {}",
            concurrency()
        ),
        value: crate::median(&mut batched_with),
        unit: "msg/s",
        baseline: Some((
            "batched consumer, no inbox".into(),
            crate::median(&mut batched_without),
        )),
        target: (db.kind == Kind::Postgres).then_some(Target::RatioAtLeast(0.9)),
    });
    rows.push(Row {
        section: "inbox",
        name: format!(
            "publish→effect p99 at 1,000 msg/s, batched ({label}; p50 {b50:.2} ms, per-message p50 {p50:.2} ms)"
        ),
        value: b99,
        unit: "ms",
        baseline: Some(("per-message consumer, p99".into(), p99)),
        target: Some(Target::RatioAtMost(2.0)),
    });
    rows.push(Row {
        section: "inbox",
        name: format!(
            "batched consumer with inbox (batches of {size}), no broker (in-memory source) → {label}"
        ),
        value: crate::median(&mut mem_with),
        unit: "msg/s",
        baseline: Some((
            "same, no inbox".into(),
            crate::median(&mut mem_without),
        )),
        target: None,
    });
    rows.push(Row {
        section: "inbox",
        name: format!(
            "database alone ({label}, no broker): BEGIN; record; INSERT; COMMIT, {} sessions",
            concurrency()
        ),
        value: crate::median(&mut db_with),
        unit: "tx/s",
        baseline: Some((
            "BEGIN; INSERT; COMMIT".into(),
            crate::median(&mut db_without),
        )),
        target: None,
    });
    Ok(())
}
