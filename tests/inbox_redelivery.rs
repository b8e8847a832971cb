//! What a consumer's restarts replay, on each real broker, with the consumer in a child process:
//! - **a graceful stop** (SIGTERM) replays nothing: no message it acknowledged comes again;
//! - **a crash** (SIGKILL, six times, twice right after a dead letter) replays only what was
//!   in flight (NATS: the messages from the oldest one the killed run left unacknowledged on;
//!   RabbitMQ and Redis: nothing acknowledged at all; Kafka: what finished since the last
//!   offset commit), and a replayed message never runs the handler again;
//! - two bad messages (one without an `event-id`, one whose body is not JSON) leave exactly one
//!   dead letter each, beside exactly one effect per good message, in per-aggregate order.
//!
//! Each run prints its figures.
#![cfg(all(
    feature = "kafka",
    feature = "nats",
    feature = "rabbitmq",
    feature = "redis"
))]

mod common;
#[path = "support/scratch.rs"]
mod scratch;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::{Backend, TestDb};
use scratch::{Broker, Scratch, env_or, unique};
use sea_orm::{ConnectionTrait, DatabaseTransaction, Statement};
use seaorm_outbox::broker::kafka::KafkaSource;
use seaorm_outbox::broker::nats::NatsSource;
use seaorm_outbox::broker::rabbitmq::RabbitMqSource;
use seaorm_outbox::broker::redis::RedisSource;
use seaorm_outbox::inbox::{Consumer, ConsumerConfig, Handler, HandlerError, Incoming};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const CONSUMER: &str = "redelivery";
const AGGREGATES: usize = 20;
/// Messages before the graceful-stop phase's SIGTERM and after it.
const GRACEFUL: usize = 400;
/// Messages of the crash phase, with the two bad ones among them.
const CRASHING: usize = 1000;
const KILLS: usize = 6;
/// The consumer's and the sources' windows, so the crash bound is small against the stream.
const CONCURRENCY: usize = 8;
const MAX_IN_FLIGHT: usize = 64;
const PREFETCH: usize = 64;
const KAFKA_COMMIT_EVERY: Duration = Duration::from_millis(200);

impl Broker {
    /// Sends `count` messages, `bad` among them at their positions: good ones carry an
    /// `event-id` and an `aggregate-id` and a JSON body with their sequence in the aggregate.
    async fn send(&self, first: usize, count: usize, bad: &[(usize, Bad)]) -> Vec<String> {
        let mut good = Vec::new();
        let mut messages = Vec::new();
        for i in first..first + count {
            if let Some((_, b)) = bad.iter().find(|(at, _)| *at == i) {
                let aggregate = format!("a{}", i % AGGREGATES);
                messages.push(match b {
                    Bad::NoId => (vec![("aggregate-id".to_owned(), aggregate)], b"{}".to_vec()),
                    Bad::NotJson => (
                        vec![
                            ("event-id".to_owned(), Uuid::now_v7().to_string()),
                            ("aggregate-id".to_owned(), aggregate),
                        ],
                        b"not json".to_vec(),
                    ),
                });
                continue;
            }
            let id = Uuid::now_v7().to_string();
            let aggregate = format!("a{}", i % AGGREGATES);
            let body = serde_json::json!({ "aggregate": aggregate, "seq": i }).to_string();
            good.push(id.clone());
            messages.push((
                vec![
                    ("event-id".to_owned(), id),
                    ("aggregate-id".to_owned(), aggregate),
                ],
                body.into_bytes(),
            ));
        }
        self.send_raw(messages).await;
        good
    }

    /// The most a crash may replay of what the consumer had acknowledged, where that is a
    /// count (NATS is bounded by stream position and Kafka by time instead: see `redelivery`).
    fn crash_bound(&self) -> Option<usize> {
        match self {
            // Only unacknowledged messages come again.
            Self::RabbitMq { .. } | Self::Redis { .. } => Some(0),
            Self::Nats { .. } | Self::Kafka { .. } => None,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Bad {
    NoId,
    NotJson,
}

// ---- the child ----

/// Writes one effect row per message, logging each call.
struct Effects {
    log: Log,
}

#[async_trait]
impl Handler for Effects {
    async fn handle(&self, txn: &DatabaseTransaction, msg: &Incoming) -> Result<(), HandlerError> {
        self.log.line('H', &msg.message_id);
        let body: serde_json::Value = msg.json()?;
        txn.execute_raw(Statement::from_sql_and_values(
            txn.get_database_backend(),
            "INSERT INTO effects (event_id, aggregate, seq) VALUES ($1, $2, $3)",
            [
                msg.message_id.clone().into(),
                body["aggregate"].as_str().unwrap_or_default().into(),
                body["seq"].as_i64().unwrap_or_default().into(),
            ],
        ))
        .await
        .map_err(HandlerError::retry)?;
        Ok(())
    }
}

/// A line per event: `D` delivered to the consumer, `H` handler called, `A` acknowledged, with
/// milliseconds since the epoch (and, on `D`, the broker's position when it gives one).
#[derive(Clone)]
struct Log(std::sync::Arc<std::sync::Mutex<std::fs::File>>);

impl Log {
    fn open(path: &Path) -> Self {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("log");
        Self(std::sync::Arc::new(std::sync::Mutex::new(f)))
    }

    fn line(&self, kind: char, id: &str) {
        self.line_at(kind, id, None);
    }

    fn line_at(&self, kind: char, id: &str, position: Option<&str>) {
        let ms = chrono::Utc::now().timestamp_millis();
        let mut f = self.0.lock().expect("log lock");
        match position {
            Some(p) => writeln!(f, "{kind} {id} {ms} {p}"),
            None => writeln!(f, "{kind} {id} {ms}"),
        }
        .expect("log line");
    }
}

mod logged {
    //! A source wrapper that logs deliveries and acknowledgements.
    use super::Log;
    use async_trait::async_trait;
    use seaorm_outbox::BoxError;
    use seaorm_outbox::inbox::{Acknowledge, Delivery, Source, SourceContext};

    pub(super) struct Logged<S> {
        pub(super) inner: S,
        pub(super) log: Log,
    }

    struct LoggedAck {
        inner: Box<dyn Acknowledge>,
        log: Log,
        id: String,
    }

    #[async_trait]
    impl Acknowledge for LoggedAck {
        async fn ack(self: Box<Self>) -> Result<(), BoxError> {
            self.inner.ack().await?;
            self.log.line('A', &self.id);
            Ok(())
        }

        async fn in_progress(&self) {
            self.inner.in_progress().await;
        }
    }

    #[async_trait]
    impl<S: Source> Source for Logged<S> {
        fn broker(&self) -> &'static str {
            self.inner.broker()
        }

        async fn run(self, ctx: SourceContext) -> seaorm_outbox::Result<()> {
            let log = self.log;
            ctx.run_inner(self.inner, move |d| {
                let id = d.message.header("event-id").unwrap_or("-").to_owned();
                log.line_at('D', &id, d.message.position.as_deref());
                let ack = Box::new(LoggedAck {
                    inner: d.ack,
                    log: log.clone(),
                    id,
                });
                Delivery {
                    message: d.message,
                    ack,
                }
            })
            .await
        }
    }
}

/// Not a test on its own: the consumer process. SIGTERM stops it gracefully.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of the redelivery tests"]
async fn redelivery_consumer_child() {
    let Some(db) = TestDb::from_child_env().await else {
        return;
    };
    let broker: Broker =
        serde_json::from_str(&std::env::var("REDELIVERY_BROKER").expect("broker")).expect("json");
    let log = Log::open(Path::new(&std::env::var("REDELIVERY_LOG").expect("log")));
    let config = ConsumerConfig::default()
        .concurrency(CONCURRENCY)
        .max_in_flight(MAX_IN_FLIGHT)
        .retry_backoff(Duration::from_millis(5))
        .max_retry_backoff(Duration::from_millis(50));
    let consumer = Consumer::builder(db, CONSUMER, Effects { log: log.clone() })
        .config(config)
        .build()
        .expect("consumer");
    let stop = CancellationToken::new();
    let on_term = stop.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal");
        term.recv().await;
        on_term.cancel();
    });
    fn logged<S>(inner: S, log: &Log) -> logged::Logged<S> {
        logged::Logged {
            inner,
            log: log.clone(),
        }
    }
    let result = match broker {
        Broker::Nats { url, stream } => {
            let js = async_nats::jetstream::new(async_nats::connect(url).await.expect("nats"));
            let source = NatsSource::new(js, stream, CONSUMER).batch(PREFETCH);
            consumer.run(logged(source, &log), stop).await
        }
        Broker::RabbitMq { uri, queue } => {
            let source = RabbitMqSource::new(uri, queue).prefetch(PREFETCH as u16);
            consumer.run(logged(source, &log), stop).await
        }
        Broker::Redis { url, stream } => {
            let client = redis::Client::open(url).expect("redis");
            let source = RedisSource::new(client, stream, CONSUMER)
                .instance("only")
                .count(PREFETCH);
            consumer.run(logged(source, &log), stop).await
        }
        Broker::Kafka { bootstrap, topic } => {
            let mut config = rdkafka::ClientConfig::new();
            config
                .set("bootstrap.servers", &bootstrap)
                .set("group.id", CONSUMER)
                .set("auto.offset.reset", "earliest")
                .set("session.timeout.ms", "6000")
                .set("heartbeat.interval.ms", "500");
            let source =
                KafkaSource::from_config(config, &[&topic]).commit_interval(KAFKA_COMMIT_EVERY);
            consumer.run(logged(source, &log), stop).await
        }
    };
    result.expect("consumer ran");
}

// ---- the parent ----

/// One run of the child: its log and how it ended.
struct Run {
    log: PathBuf,
    ended_at_ms: i64,
    graceful: bool,
}

#[derive(Default)]
struct Seen {
    delivered: Vec<String>,
    /// Each delivered message's broker position (NATS: its stream sequence), first delivery.
    positions: HashMap<String, u64>,
    handled: HashSet<String>,
    acked: HashMap<String, i64>,
}

fn read_run(path: &Path) -> Seen {
    let mut seen = Seen::default();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        let mut parts = line.split(' ');
        let (Some(kind), Some(id), Some(ms)) = (parts.next(), parts.next(), parts.next()) else {
            continue; // a line cut by SIGKILL
        };
        let ms: i64 = ms.parse().unwrap_or(0);
        match kind {
            "D" => {
                seen.delivered.push(id.to_owned());
                if let Some(p) = parts.next().and_then(|p| p.parse().ok()) {
                    seen.positions.entry(id.to_owned()).or_insert(p);
                }
            }
            "H" => {
                seen.handled.insert(id.to_owned());
            }
            "A" => {
                seen.acked.insert(id.to_owned(), ms);
            }
            _ => {}
        }
    }
    seen
}

struct Harness {
    t: TestDb,
    broker: Broker,
    dir: tempfile::TempDir,
    runs: Vec<Run>,
}

impl Harness {
    fn start(&mut self) -> Child {
        let log = self.dir.path().join(format!("run{}.log", self.runs.len()));
        let mut env = self.t.child_env();
        env.push((
            "REDELIVERY_BROKER",
            serde_json::to_string(&self.broker).expect("json"),
        ));
        env.push(("REDELIVERY_LOG", log.display().to_string()));
        let stderr = std::fs::File::create(self.dir.path().join("stderr.log")).expect("stderr");
        let child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "redelivery_consumer_child",
                "--ignored",
                "--nocapture",
            ])
            .envs(env)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn child");
        self.runs.push(Run {
            log,
            ended_at_ms: 0,
            graceful: false,
        });
        child
    }

    fn end(&mut self, mut child: Child, graceful: bool) {
        if graceful {
            // SIGTERM, through the shell's kill: std has no portable signal call.
            let status = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .expect("kill -TERM");
            assert!(status.success());
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().expect("wait").is_none() {
                assert!(Instant::now() < deadline, "graceful stop took over 30 s");
                std::thread::sleep(Duration::from_millis(20));
            }
        } else {
            let _ = child.kill();
            let _ = child.wait();
        }
        let run = self.runs.last_mut().expect("a run");
        run.ended_at_ms = chrono::Utc::now().timestamp_millis();
        run.graceful = graceful;
    }

    async fn count(&self, sql: &str) -> i64 {
        let row = self
            .t
            .db
            .query_one_raw(Statement::from_string(
                self.t.db.get_database_backend(),
                sql,
            ))
            .await
            .expect("query")
            .expect("row");
        row.try_get_by_index(0).expect("value")
    }

    async fn effects(&self) -> usize {
        self.count("SELECT COUNT(*) FROM effects").await as usize
    }

    async fn dead_letters(&self) -> usize {
        self.count("SELECT COUNT(*) FROM inbox_dead_letters").await as usize
    }

    /// Waits until `effects` reach `n` (and the dead letters `dead`), or fails with the child's
    /// stderr.
    async fn wait_for(&self, child: &mut Child, n: usize, dead: usize) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if self.effects().await >= n && self.dead_letters().await >= dead {
                return;
            }
            assert!(
                child.try_wait().expect("status").is_none(),
                "{}: the consumer exited: {}",
                self.broker.name(),
                std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
            );
            assert!(
                Instant::now() < deadline,
                "{}: {} of {n} effects after 120 s",
                self.broker.name(),
                self.effects().await
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

async fn redelivery(broker: Broker) {
    let t = TestDb::new(Backend::Postgres).await;
    t.exec(
        "effects table",
        "CREATE TABLE effects (n BIGSERIAL, event_id VARCHAR(64) PRIMARY KEY, \
         aggregate VARCHAR(32) NOT NULL, seq BIGINT NOT NULL)",
        vec![],
    )
    .await;
    let name = broker.name();
    let mut h = Harness {
        t,
        broker,
        dir: tempfile::tempdir().expect("temp dir"),
        runs: Vec::new(),
    };

    // Phase 1: a graceful stop part way, then a second run to the end.
    let mut good = h.broker.send(0, GRACEFUL, &[]).await;
    let mut c = h.start();
    h.wait_for(&mut c, GRACEFUL / 3, 0).await;
    h.end(c, true);
    let stopped_at = h.effects().await;
    let mut c = h.start();
    h.wait_for(&mut c, GRACEFUL, 0).await;

    // Phase 2: more messages with two bad ones, and SIGKILLs: every 120 effects, and as soon
    // as a dead letter appears (the redelivered-dead-letter case).
    let bad = [
        (GRACEFUL + CRASHING / 3, Bad::NoId),
        (GRACEFUL + 2 * CRASHING / 3, Bad::NotJson),
    ];
    good.extend(h.broker.send(GRACEFUL, CRASHING, &bad).await);
    let mut kills = 0;
    let mut last_dead = 0;
    let mut mark = h.effects().await;
    let deadline = Instant::now() + Duration::from_secs(240);
    while kills < KILLS {
        assert!(Instant::now() < deadline, "{name}: kills not done in time");
        tokio::time::sleep(Duration::from_millis(10)).await;
        let (effects, dead) = (h.effects().await, h.dead_letters().await);
        let done = effects >= good.len() && dead >= bad.len();
        if dead > last_dead || effects >= mark + 120 || (done && kills < KILLS) {
            h.end(c, false);
            kills += 1;
            last_dead = dead;
            mark = effects;
            c = h.start();
            if done {
                // Nothing left to interrupt: let this run see what the last crash left.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    h.wait_for(&mut c, good.len(), bad.len()).await;
    h.end(c, true);

    // Every good message applied once, in per-aggregate order; one dead letter per bad one.
    let effects = h.effects().await;
    let dead = h.dead_letters().await;
    let rows =
        h.t.db
            .query_all_raw(Statement::from_string(
                h.t.db.get_database_backend(),
                "SELECT aggregate, seq FROM effects ORDER BY n",
            ))
            .await
            .expect("effects");
    let mut last: HashMap<String, i64> = HashMap::new();
    for r in rows {
        let (agg, seq): (String, i64) = (
            r.try_get("", "aggregate").expect("a"),
            r.try_get("", "seq").expect("s"),
        );
        let prev = last.insert(agg.clone(), seq);
        assert!(
            prev.is_none_or(|p| p < seq),
            "{name}: aggregate {agg} applied {seq} after {prev:?}"
        );
    }
    assert_eq!(effects, good.len(), "{name}: one effect per good message");
    assert_eq!(dead, bad.len(), "{name}: one dead letter per bad message");

    // What each restart replayed: deliveries of messages an earlier run had acknowledged.
    let seen: Vec<Seen> = h.runs.iter().map(|r| read_run(&r.log)).collect();
    let mut acked_before: HashMap<String, i64> = HashMap::new();
    let mut figures = Vec::new();
    let mut nats_from = 0;
    for (k, run) in seen.iter().enumerate() {
        if k > 0 {
            let prev = &h.runs[k - 1];
            let replayed: Vec<&String> = run
                .delivered
                .iter()
                .filter(|id| acked_before.contains_key(*id))
                .collect();
            // Kafka flags what finished up to its last commit, so a message dead-lettered after
            // that commit may run its handler once more (its dead letter is still not doubled).
            let kafka_window = KAFKA_COMMIT_EVERY.as_millis() as i64 + 800;
            let rerun = replayed
                .iter()
                .filter(|id| run.handled.contains(**id))
                .filter(|id| {
                    !(matches!(h.broker, Broker::Kafka { .. })
                        && acked_before[**id] > prev.ended_at_ms - kafka_window)
                })
                .count();
            assert_eq!(
                rerun, 0,
                "{name}: run {k} ran the handler again for a replayed message"
            );
            if prev.graceful {
                assert!(
                    replayed.is_empty(),
                    "{name}: run {k} replayed {} acknowledged messages after a graceful stop",
                    replayed.len()
                );
            } else if let Some(bound) = h.broker.crash_bound() {
                assert!(
                    replayed.len() <= bound,
                    "{name}: run {k} replayed {} acknowledged messages after a crash (bound {bound})",
                    replayed.len()
                );
            } else if matches!(h.broker, Broker::Nats { .. }) {
                // Recreated from the ack floor: nothing before the oldest message the killed
                // run left unacknowledged (or, if it left none, before all it was given).
                let killed = &seen[k - 1];
                let unacked = killed
                    .positions
                    .iter()
                    .filter(|(id, _)| id.as_str() != "-" && !killed.acked.contains_key(*id))
                    .map(|(_, p)| *p)
                    .min();
                nats_from = unacked
                    .or_else(|| killed.positions.values().max().map(|p| p + 1))
                    .unwrap_or(nats_from);
                for id in &replayed {
                    let at = run
                        .positions
                        .get(*id)
                        .copied()
                        .expect("NATS gives positions");
                    assert!(
                        at >= nats_from,
                        "{name}: run {k} replayed {id} at stream sequence {at}, before {nats_from}, the oldest the killed run left unacknowledged"
                    );
                }
            } else {
                // Kafka: only what finished after the last commit before the kill.
                for id in &replayed {
                    let acked = acked_before[*id];
                    assert!(
                        acked > prev.ended_at_ms - kafka_window,
                        "{name}: run {k} replayed {id}, acknowledged {} ms before the kill",
                        prev.ended_at_ms - acked
                    );
                }
            }
            figures.push(format!(
                "{}{}",
                if prev.graceful { "stop→" } else { "kill→" },
                replayed.len()
            ));
        }
        acked_before.extend(run.acked.iter().map(|(k, v)| (k.clone(), *v)));
    }
    println!(
        "{name}: {effects} effects, {dead} dead letters; stopped gracefully at {stopped_at}; acknowledged messages replayed per restart: {}",
        figures.join(" ")
    );
    h.t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarts_replay_only_what_was_in_flight() {
    let (broker, scratch) = Scratch::nats("redeliv_").await;
    redelivery(broker).await;
    scratch.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_restarts_replay_only_what_was_in_flight() {
    let (broker, scratch) = Scratch::rabbitmq("redeliv_").await;
    redelivery(broker).await;
    scratch.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarts_replay_only_what_was_in_flight() {
    let (broker, scratch) = Scratch::redis("redeliv_");
    redelivery(broker).await;
    scratch.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_restarts_replay_only_what_finished_since_the_last_commit() {
    // One partition, so per-aggregate order holds across the restarts.
    let (broker, scratch) = Scratch::kafka(1, "redelivery", 1);
    redelivery(broker).await;
    scratch.remove().await;
}

/// Records each message's stream position and whether the source flagged it redelivered.
#[derive(Clone, Default)]
struct Positions(std::sync::Arc<std::sync::Mutex<Vec<(u64, bool)>>>);

#[async_trait]
impl Handler for Positions {
    async fn handle(&self, _: &DatabaseTransaction, msg: &Incoming) -> Result<(), HandlerError> {
        let at = msg
            .position
            .as_deref()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        self.0
            .lock()
            .expect("positions")
            .push((at, msg.redelivered));
        Ok(())
    }
}

/// The NATS source's recreation from the ack floor deletes the durable and creates it again. A
/// crash between the two must not leave the next start reading the whole stream: the bookmark
/// written before the delete says where to resume. Also: a bookmark left beside a live durable
/// (a crash after the recreation) is removed and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_recreation_survives_a_crash_between_delete_and_create() {
    use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
    let t = TestDb::new(Backend::Postgres).await;
    let url = format!(
        "nats://{}",
        env_or("OUTBOX_TEST_NATS_ADDR", "127.0.0.1:4222")
    );
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.expect("nats"));
    let name = unique("bookmark_");
    let stream = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("{name}.>")],
            ..Default::default()
        })
        .await
        .expect("stream");
    let broker = Broker::Nats {
        url,
        stream: name.clone(),
    };
    broker.send(0, 50, &[]).await;
    // The state a crash leaves between the delete and the create: no durable, a bookmark that
    // resumes at 31 and replays up to 40.
    stream
        .create_consumer(pull::Config {
            durable_name: Some("billing-resume".into()),
            description: Some(
                "seaorm-outbox: resume bookmark of durable billing; replays up to 40".into(),
            ),
            ack_policy: AckPolicy::Explicit,
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: 31 },
            ..Default::default()
        })
        .await
        .expect("bookmark");

    let run = |handler: Positions| {
        let (db, js, name) = (t.db.clone(), js.clone(), name.clone());
        async move {
            let consumer = Consumer::new(db, "billing", handler).expect("consumer");
            let stop = CancellationToken::new();
            let source = NatsSource::new(js, name, "billing");
            let task = tokio::spawn({
                let stop = stop.clone();
                async move { consumer.run(source, stop).await }
            });
            (stop, task)
        }
    };
    let seen = Positions::default();
    let (stop, task) = run(seen.clone()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.0.lock().expect("positions").len() < 20 {
        assert!(Instant::now() < deadline, "not resumed in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    task.await.expect("join").expect("consumer");
    // Keys run in parallel: compare the set.
    let mut got = seen.0.lock().expect("positions").clone();
    got.sort_unstable();
    let positions: Vec<u64> = got.iter().map(|(p, _)| *p).collect();
    assert_eq!(
        positions,
        (31..=50).collect::<Vec<_>>(),
        "resumed at the bookmark"
    );
    for (p, redelivered) in &got {
        assert_eq!(
            *redelivered,
            *p <= 40,
            "position {p}: flagged up to the bookmark's end"
        );
    }
    let info = |n: &'static str| {
        let stream = stream.clone();
        async move { stream.consumer_info(n).await.is_ok() }
    };
    assert!(
        !info("billing-resume").await,
        "the bookmark is removed once used"
    );
    assert!(info("billing").await, "the durable exists again");

    // A stale bookmark beside a live, fully acknowledged durable: removed, and nothing replays.
    stream
        .create_consumer(pull::Config {
            durable_name: Some("billing-resume".into()),
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: 1 },
            ack_policy: AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .expect("stale bookmark");
    broker.send(50, 5, &[]).await;
    let seen = Positions::default();
    let (stop, task) = run(seen.clone()).await;
    while seen.0.lock().expect("positions").len() < 5 {
        assert!(
            Instant::now() < deadline,
            "new messages not received in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    task.await.expect("join").expect("consumer");
    let mut got = seen.0.lock().expect("positions").clone();
    got.sort_unstable();
    assert_eq!(got, (51..=55).map(|p| (p, false)).collect::<Vec<_>>());
    assert!(!info("billing-resume").await, "a stale bookmark is removed");
    js.delete_stream(&name).await.expect("delete stream");
    t.cleanup().await;
}
