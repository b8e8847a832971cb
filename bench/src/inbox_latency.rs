//! Publish → effect committed, p99, for the consumer with the inbox at 1,000 msg/s: batched
//! against per-message, same run. Each message carries its publish time; the consumer's
//! acknowledgement (made right after its transaction committed) takes the sample.

use std::future::IntoFuture;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use async_trait::async_trait;
use seaorm_outbox::BoxError;
use seaorm_outbox::broker::nats::NatsSource;
use seaorm_outbox::inbox::{
    Acknowledge, Consumer, ConsumerConfig, Delivery, Source, SourceContext,
};
use tokio_util::sync::CancellationToken;

use crate::db::BenchDb;
use crate::inbox::{WriteRow, concurrency, empty};

const RATE: u64 = 1000;
/// Messages sent in the first second are left out: connections and caches warm up.
const WARM_UP: u64 = RATE;

type Samples = Arc<Mutex<Vec<f64>>>;

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

struct TimedAck {
    inner: Box<dyn Acknowledge>,
    sent: Option<u64>,
    samples: Samples,
}

#[async_trait]
impl Acknowledge for TimedAck {
    async fn ack(self: Box<Self>) -> std::result::Result<(), BoxError> {
        if let Some(sent) = self.sent {
            let ms = now_micros().saturating_sub(sent) as f64 / 1000.0;
            self.samples.lock().map_err(|e| e.to_string())?.push(ms);
        }
        self.inner.ack().await
    }

    async fn in_progress(&self) {
        self.inner.in_progress().await;
    }
}

struct Timed {
    inner: NatsSource,
    samples: Samples,
}

#[async_trait]
impl Source for Timed {
    fn broker(&self) -> &'static str {
        "nats"
    }

    async fn run(self, ctx: SourceContext) -> seaorm_outbox::Result<()> {
        let samples = self.samples;
        ctx.run_inner(self.inner, move |d| {
            let seq: u64 = d
                .message
                .header("seq")
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let sent = d
                .message
                .header("sent-at")
                .and_then(|s| s.parse().ok())
                .filter(|_| seq >= WARM_UP);
            Delivery {
                message: d.message,
                ack: Box::new(TimedAck {
                    inner: d.ack,
                    sent,
                    samples: Arc::clone(&samples),
                }),
            }
        })
        .await
    }
}

/// (p50, p99) in ms for `secs` seconds of `RATE` msg/s after the warm-up.
async fn run(
    db: &BenchDb,
    js: &async_nats::jetstream::Context,
    secs: u64,
    batch: usize,
) -> Result<(f64, f64)> {
    empty(db).await?;
    let stream = format!("BENCH_INBOX_LAT_{}_{}", std::process::id(), batch);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("{stream}.>")],
        ..Default::default()
    })
    .await?;
    let samples = Samples::default();
    let config = ConsumerConfig::default()
        .concurrency(concurrency())
        .max_in_flight(256)
        .batch_size(batch);
    let pool = db.pool(concurrency() as u32 + 1).await?;
    let consumer = Arc::new(
        Consumer::builder(pool, "bench-latency", WriteRow { kind: db.kind })
            .config(config)
            .build()?,
    );
    let source = Timed {
        inner: NatsSource::new(js.clone(), &stream, "latency"),
        samples: Arc::clone(&samples),
    };
    let stop = CancellationToken::new();
    let running = {
        let (c, stop) = (Arc::clone(&consumer), stop.clone());
        tokio::spawn(async move { c.run(source, stop).await })
    };
    let total = RATE * (secs + 1);
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut acks = Vec::new();
    for seq in 0..total {
        tick.tick().await;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("event-id", uuid::Uuid::now_v7().to_string().as_str());
        headers.insert("aggregate-id", format!("order-{}", seq % 1000).as_str());
        headers.insert("seq", seq.to_string().as_str());
        headers.insert("sent-at", now_micros().to_string().as_str());
        let ack = js
            .publish_with_headers(format!("{stream}.order"), headers, "{}".into())
            .await?;
        // Awaited as they come: the client holds back publishes while too many are unconfirmed.
        acks.push(tokio::spawn(ack.into_future()));
    }
    for a in acks {
        a.await??;
    }
    let limit = Instant::now() + Duration::from_secs(60);
    while consumer.stats().applied < total {
        anyhow::ensure!(
            Instant::now() < limit,
            "latency run stalled: {:?}",
            consumer.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    running.await??;
    js.delete_stream(&stream).await?;
    let mut xs = samples.lock().map_err(|e| anyhow::anyhow!("{e}"))?.clone();
    xs.sort_by(f64::total_cmp);
    anyhow::ensure!(!xs.is_empty(), "no samples");
    let pct = |p: f64| xs[((xs.len() as f64 - 1.0) * p).round() as usize];
    Ok((pct(0.5), pct(0.99)))
}

/// (batched p50, p99), (per-message p50, p99).
pub(crate) async fn measure(
    db: &BenchDb,
    js: &async_nats::jetstream::Context,
    secs: u64,
    batch: usize,
) -> Result<((f64, f64), (f64, f64))> {
    let per_message = run(db, js, secs, 1).await?;
    let batched = run(db, js, secs, batch).await?;
    eprintln!(
        "{} publish→effect at {RATE} msg/s: per-message p50 {:.2} p99 {:.2} ms; batches of {batch}: p50 {:.2} p99 {:.2} ms",
        db.kind.label(),
        per_message.0,
        per_message.1,
        batched.0,
        batched.1
    );
    Ok((batched, per_message))
}
