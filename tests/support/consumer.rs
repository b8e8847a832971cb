//! The consumer tests' harness: a domain table the handlers write, a handler that fails on
//! demand, and a source fed by the test.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, Statement};
use seaorm_outbox::inbox::{
    Acknowledge, Consumer, ConsumerConfig, Delivery, Handler, HandlerError, Incoming, Source,
    SourceContext,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::common::TestDb;

pub async fn create_effects(t: &TestDb) {
    t.db.execute_unprepared(
        "CREATE TABLE effects (message_id VARCHAR(255) NOT NULL, agg VARCHAR(64) NOT NULL, \
         seq BIGINT NOT NULL, ord BIGINT NOT NULL)",
    )
    .await
    .expect("create effects");
}

/// `(message_id, agg, seq)` in the order they were applied.
pub async fn effects(t: &TestDb) -> Vec<(String, String, i64)> {
    let rows =
        t.db.query_all_raw(Statement::from_string(
            t.db.get_database_backend(),
            "SELECT message_id, agg, seq FROM effects ORDER BY ord",
        ))
        .await
        .expect("read effects");
    rows.iter()
        .map(|r| {
            (
                r.try_get("", "message_id").expect("id"),
                r.try_get("", "agg").expect("agg"),
                r.try_get("", "seq").expect("seq"),
            )
        })
        .collect()
}

pub fn insert_effect(backend: DbBackend, id: &str, agg: &str, seq: i64, ord: u64) -> Statement {
    let sql = match backend {
        DbBackend::Postgres => "INSERT INTO effects VALUES ($1, $2, $3, $4)",
        _ => "INSERT INTO effects VALUES (?, ?, ?, ?)",
    };
    Statement::from_sql_and_values(
        backend,
        sql,
        [id.into(), agg.into(), seq.into(), (ord as i64).into()],
    )
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct Payload {
    pub agg: String,
    pub seq: i64,
}

/// Writes an effect row per message; fails on chosen attempts; tracks concurrency.
#[derive(Default)]
pub struct Effects {
    pub ord: AtomicU64,
    pub running: AtomicUsize,
    pub max_running: AtomicUsize,
    /// Fail while `attempt <= fail_first[message_id]`; shared so a test can "fix the bug".
    pub fail_first: Arc<Mutex<HashMap<String, u32>>>,
    pub delay: Duration,
    /// Messages of this aggregate fail (a retry) while the flag is set: a key that backs up for
    /// as long as a test needs, however slow the machine, without holding a transaction open
    /// (on SQLite that would hold the one write lock).
    pub hold: Option<(String, Arc<AtomicBool>)>,
}

#[async_trait]
impl Handler for Effects {
    async fn handle(&self, txn: &DatabaseTransaction, msg: &Incoming) -> Result<(), HandlerError> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        let result = async {
            let p: Payload = msg.json()?;
            if self
                .fail_first
                .lock()
                .expect("fail_first")
                .get(&msg.message_id)
                .is_some_and(|n| msg.attempt <= *n)
            {
                return Err(HandlerError::retry("injected failure"));
            }
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            if let Some((agg, held)) = &self.hold
                && p.agg == *agg
                && held.load(Ordering::SeqCst)
            {
                return Err(HandlerError::retry("held by the test"));
            }
            let ord = self.ord.fetch_add(1, Ordering::SeqCst);
            txn.execute_raw(insert_effect(
                txn.get_database_backend(),
                &msg.message_id,
                &p.agg,
                p.seq,
                ord,
            ))
            .await?;
            Ok(())
        }
        .await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

/// Acknowledgements, by message id, in order.
pub type Acks = Arc<Mutex<Vec<String>>>;

pub struct RecordAck {
    pub id: String,
    pub acks: Acks,
}

#[async_trait]
impl Acknowledge for RecordAck {
    async fn ack(self: Box<Self>) -> Result<(), seaorm_outbox::BoxError> {
        self.acks.lock().expect("acks").push(self.id);
        Ok(())
    }
}

/// Forwards what the test sends.
pub struct TestSource(pub mpsc::Receiver<Delivery>);

#[async_trait]
impl Source for TestSource {
    fn broker(&self) -> &'static str {
        "test"
    }

    async fn run(mut self, ctx: SourceContext) -> seaorm_outbox::Result<()> {
        loop {
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return Ok(()),
                // A graceful stop: hand over what was already "received".
                _ = ctx.stop.cancelled() => {
                    while let Ok(d) = self.0.try_recv() {
                        if ctx.deliveries.send(d).await.is_err() {
                            return Ok(());
                        }
                    }
                    ctx.handed_over();
                    ctx.shutdown.cancelled().await;
                    return Ok(());
                }
                d = self.0.recv() => match d {
                    Some(d) => if ctx.deliveries.send(d).await.is_err() { return Ok(()) },
                    None => { ctx.shutdown.cancelled().await; return Ok(()) }
                },
            }
        }
    }
}

pub fn message(id: Option<&str>, agg: &str, seq: i64, position: u64) -> Incoming {
    let mut headers = vec![("aggregate-id".to_owned(), agg.to_owned())];
    if let Some(id) = id {
        headers.push(("event-id".to_owned(), id.to_owned()));
    }
    let body = serde_json::to_vec(&Payload {
        agg: agg.to_owned(),
        seq,
    })
    .expect("json");
    Incoming::new("test-stream", headers, body).position(Some(position.to_string()))
}

pub struct Harness {
    pub tx: mpsc::Sender<Delivery>,
    pub acks: Acks,
    pub stop: CancellationToken,
    pub run: tokio::task::JoinHandle<seaorm_outbox::Result<seaorm_outbox::inbox::ConsumerStats>>,
}

impl Harness {
    pub fn start<H: Handler>(t: &TestDb, name: &str, handler: H, config: ConsumerConfig) -> Self {
        let (tx, rx) = mpsc::channel(1024);
        let consumer = Consumer::builder(t.db.clone(), name, handler)
            .config(config)
            .build()
            .expect("consumer");
        let stop = CancellationToken::new();
        let token = stop.clone();
        let run = tokio::spawn(async move { consumer.run(TestSource(rx), token).await });
        Self {
            tx,
            acks: Acks::default(),
            stop,
            run,
        }
    }

    pub async fn send(&self, m: Incoming) {
        let id = m.header("event-id").unwrap_or("-").to_owned();
        let ack = Box::new(RecordAck {
            id,
            acks: Arc::clone(&self.acks),
        });
        self.tx
            .send(Delivery { message: m, ack })
            .await
            .expect("consumer is running");
    }

    pub async fn wait_acks(&self, n: usize) {
        let limit = std::time::Instant::now() + Duration::from_secs(60);
        while self.acks.lock().expect("acks").len() < n {
            assert!(
                std::time::Instant::now() < limit,
                "only {} of {n} acks",
                self.acks.lock().expect("acks").len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(self) -> seaorm_outbox::inbox::ConsumerStats {
        self.stop.cancel();
        self.run.await.expect("join").expect("consumer ran")
    }
}

pub fn fast() -> ConsumerConfig {
    ConsumerConfig::default()
        .retry_backoff(Duration::from_millis(5))
        .max_retry_backoff(Duration::from_millis(20))
        .replay_interval(Duration::from_millis(100))
}
