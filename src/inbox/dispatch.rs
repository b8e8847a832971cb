//! Per-key queues between a source and the handlers: one message per ordering key at a time,
//! in arrival order; different keys in parallel, up to the consumer's concurrency.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, interval, sleep_until};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::batch::{self, Leftover};
use super::handler::Handler;
use super::heartbeat::{Figures, Heartbeat};
use super::message::Incoming;
use super::process;
use super::source::{Acknowledge, Delivery, Source, SourceContext};
use super::state::Shared;
use crate::error::BoxError;
use crate::error::{Error, Result};
use crate::store::inbox as store;

/// Replay requests taken per look.
const REPLAY_BATCH: u64 = 100;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Ordered(String),
    /// A message without a key runs alone under a key of its own.
    Unordered(u64),
}

/// What a task hands back when it ends.
enum Done {
    /// A message run alone finished.
    One(Key),
    /// A batch ended: its keys, how many of its messages finished, and what left it to run
    /// alone.
    Batch(Vec<Key>, usize, Vec<Leftover<Key>>),
}

struct Dispatcher<H> {
    shared: Arc<Shared<H>>,
    shutdown: CancellationToken,
    /// Keys with a message running; each holds the messages waiting behind it.
    waiting: HashMap<Key, VecDeque<Delivery>>,
    running: JoinSet<Done>,
    permits: Arc<Semaphore>,
    /// Batch mode: ready messages (no message of their key runs) gathering into a batch, and
    /// when the first of them became ready.
    forming: Vec<(Key, Delivery)>,
    forming_since: Option<Instant>,
    /// Messages running, waiting or forming.
    held: usize,
    unordered: u64,
}

impl<H: Handler> Dispatcher<H> {
    /// What a heartbeat reports: the counts, what is held, and when the oldest message
    /// waiting for a handler (queued behind its key, or forming a batch) arrived.
    fn figures(&self) -> Figures {
        let queued = self.waiting.values().filter_map(|q| q.front());
        let forming = self.forming.iter().map(|(_, d)| d);
        Figures {
            stats: self.shared.counters.snapshot(),
            held: self.held,
            oldest_waiting: queued.chain(forming).map(|d| d.message.received_at).min(),
        }
    }

    fn batched(&self) -> bool {
        self.shared.config.batch_size > 1
    }

    fn accept(&mut self, mut d: Delivery) {
        self.held += 1;
        d.message.ordering_key = self.shared.config.ordering.of(&d.message);
        let key = match &d.message.ordering_key {
            Some(k) => Key::Ordered(k.clone()),
            None => {
                self.unordered += 1;
                Key::Unordered(self.unordered)
            }
        };
        let batched = self.batched();
        match self.waiting.get_mut(&key) {
            Some(queue) => queue.push_back(d),
            None if batched => self.ready(key, d),
            None => {
                self.waiting.insert(key.clone(), VecDeque::new());
                self.start(key, d, process::Earlier::default());
            }
        }
    }

    /// Batch mode: nothing of `d`'s key runs, so it joins the forming batch (behind its key's
    /// messages already there).
    fn ready(&mut self, key: Key, d: Delivery) {
        if self.forming.is_empty() {
            self.forming_since = Some(Instant::now());
        }
        self.forming.push((key, d));
    }

    fn start(&mut self, key: Key, d: Delivery, earlier: process::Earlier) {
        let shared = Arc::clone(&self.shared);
        let permits = Arc::clone(&self.permits);
        let shutdown = self.shutdown.clone();
        self.running.spawn(async move {
            // The semaphore is never closed, so this only waits.
            let _permit = permits.acquire_owned().await;
            process::handle(&shared, d, earlier, &shutdown).await;
            Done::One(key)
        });
    }

    /// When the forming batch may start: now if it is full or fewer than half the handler
    /// slots are busy, else once its first message has waited `max_batch_delay`. `None` while
    /// nothing forms. With slots to spare, waiting to fill would only add latency; it pays
    /// once transactions queue for slots (PostgreSQL's `commit_delay` waits only while
    /// `commit_siblings` transactions are active, for the same reason).
    fn batch_due(&self) -> Option<Instant> {
        let since = self.forming_since?;
        let config = &self.shared.config;
        let busy = config
            .concurrency
            .saturating_sub(self.permits.available_permits());
        if self.forming.len() >= config.batch_size || busy < config.concurrency / 2 {
            return Some(since);
        }
        Some(since + config.max_batch_delay)
    }

    /// Starts batches while one is due and a handler slot is free; what is already received
    /// tops a batch up first.
    fn start_batches(&mut self, rx: &mut mpsc::Receiver<Delivery>) {
        let (size, max) = (
            self.shared.config.batch_size,
            self.shared.config.max_in_flight,
        );
        while self.batch_due().is_some_and(|at| at <= Instant::now())
            && !self.shutdown.is_cancelled()
        {
            let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
                return;
            };
            while self.forming.len() < size && self.held < max {
                match rx.try_recv() {
                    Ok(d) => self.accept(d),
                    Err(_) => break,
                }
            }
            let all = std::mem::take(&mut self.forming);
            self.forming_since = None;
            let (mut batch, mut keys) = (Vec::with_capacity(size), Vec::new());
            for (key, d) in all {
                if batch.len() < size {
                    if !self.waiting.contains_key(&key) {
                        self.waiting.insert(key.clone(), VecDeque::new());
                        keys.push(key.clone());
                    }
                    batch.push((key, d));
                } else if let Some(queue) = self.waiting.get_mut(&key) {
                    // A key cut in two by the batch's end waits behind it.
                    queue.push_back(d);
                } else {
                    self.ready(key, d);
                }
            }
            let shared = Arc::clone(&self.shared);
            let shutdown = self.shutdown.clone();
            self.running.spawn(async move {
                let _permit = permit;
                let n = batch.len();
                let leftovers = batch::apply(&shared, batch, &shutdown).await;
                Done::Batch(keys, n - leftovers.len(), leftovers)
            });
        }
    }

    /// Batch mode: starts what can start, and says when the forming batch is next due (only
    /// while a handler slot is free; otherwise a task ending wakes the loop).
    fn due(&mut self, rx: &mut mpsc::Receiver<Delivery>) -> Option<Instant> {
        if !self.batched() {
            return None;
        }
        self.start_batches(rx);
        self.batch_due()
            .filter(|_| self.permits.available_permits() > 0)
    }

    fn done(&mut self, done: Done) {
        let (keys, finished, leftovers) = match done {
            Done::One(key) => return self.finished(key),
            Done::Batch(keys, finished, leftovers) => (keys, finished, leftovers),
        };
        self.held = self.held.saturating_sub(finished);
        let mut alone: HashMap<Key, VecDeque<Leftover<Key>>> = HashMap::new();
        for l in leftovers {
            alone.entry(l.key.clone()).or_default().push_back(l);
        }
        for key in keys {
            let mut mine = alone.remove(&key).unwrap_or_default();
            let Some(head) = mine.pop_front() else {
                self.release(&key);
                continue;
            };
            if self.shutdown.is_cancelled() {
                self.held = self.held.saturating_sub(mine.len() + 1);
                self.release(&key);
                continue;
            }
            if let Some(queue) = self.waiting.get_mut(&key) {
                for l in mine.into_iter().rev() {
                    queue.push_front(l.delivery);
                }
            }
            self.start(key, head.delivery, head.earlier);
        }
    }

    /// `key`'s message finished: start the next behind it, if any (in batch mode, what waits
    /// behind it becomes ready).
    fn finished(&mut self, key: Key) {
        self.held = self.held.saturating_sub(1);
        if self.batched() {
            return self.release(&key);
        }
        let next = self.waiting.get_mut(&key).and_then(VecDeque::pop_front);
        match next {
            Some(d) if !self.shutdown.is_cancelled() => {
                self.start(key, d, process::Earlier::default())
            }
            _ => {
                self.waiting.remove(&key);
            }
        }
    }

    /// Batch mode: nothing of `key` runs any more; what waited behind it is ready (or, once
    /// stopping, is let go unacknowledged).
    fn release(&mut self, key: &Key) {
        let queue = self.waiting.remove(key).unwrap_or_default();
        if self.shutdown.is_cancelled() {
            self.held = self.held.saturating_sub(queue.len());
            return;
        }
        for d in queue {
            self.ready(key.clone(), d);
        }
    }

    /// Replay requests for this consumer's dead letters, as deliveries whose acknowledgement
    /// deletes the dead letter.
    async fn take_replays(&mut self) {
        let room = (self.shared.config.max_in_flight - self.held) as u64;
        if room == 0 {
            return;
        }
        let shared = Arc::clone(&self.shared);
        match store::take_replays(&shared.db, &shared.name, room.min(REPLAY_BATCH)).await {
            Ok(taken) => {
                for dl in taken {
                    let mut message = Incoming::new(
                        dl.source.clone().unwrap_or_default(),
                        dl.headers,
                        dl.payload,
                    )
                    .position(dl.position);
                    message.received_at = dl.received_at;
                    message.replay_of = Some(dl.id);
                    let ack = Box::new(DeleteDeadLetter {
                        db: shared.db.clone(),
                        id: dl.id,
                    });
                    self.accept(Delivery { message, ack });
                }
            }
            Err(e) => {
                tracing::warn!(consumer = %shared.name, error = %e, "inbox: taking replays failed")
            }
        }
    }
}

/// A replayed dead letter was applied (or found applied already): it is no longer dead.
struct DeleteDeadLetter {
    db: sea_orm::DatabaseConnection,
    id: Uuid,
}

#[async_trait]
impl Acknowledge for DeleteDeadLetter {
    async fn ack(self: Box<Self>) -> std::result::Result<(), BoxError> {
        store::discard(&self.db, store::DeadLetters::Id(self.id)).await?;
        Ok(())
    }
}

/// Purges processed ids older than the retention, a batch per statement, until none is left.
async fn purge(
    db: sea_orm::DatabaseConnection,
    consumer: String,
    keep: std::time::Duration,
    batch: u64,
) {
    let Ok(keep) = chrono::Duration::from_std(keep) else {
        return;
    };
    let older_than = chrono::Utc::now() - keep;
    let mut total = 0u64;
    loop {
        match store::purge_processed(&db, older_than, batch).await {
            Ok(n) => {
                total += n;
                if n < batch {
                    break;
                }
                // Short statements with a pause between: never one long delete.
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => {
                tracing::warn!(consumer = %consumer, error = %e, "inbox: retention purge failed");
                break;
            }
        }
    }
    if total > 0 {
        tracing::info!(consumer = %consumer, purged = total, "inbox: purged processed ids");
    }
}

pub(crate) async fn run<H: Handler, S: Source>(
    shared: Arc<Shared<H>>,
    source: S,
    shutdown: CancellationToken,
) -> Result<()> {
    let config = shared.config.clone();
    let broker = source.broker();
    let (tx, mut rx) = mpsc::channel(config.concurrency);
    let ctx = SourceContext::new(tx, shared.name.clone());
    let (source_stop, source_flush, handed) =
        (ctx.stop.clone(), ctx.shutdown.clone(), ctx.handed.clone());
    let mut source_task = tokio::spawn(source.run(ctx));
    let mut source_result = None;
    // Cancelled when the drain is over: retries under way give up, nothing new starts.
    let hard_stop = CancellationToken::new();
    let mut d = Dispatcher {
        permits: Arc::new(Semaphore::new(config.concurrency)),
        shared,
        shutdown: hard_stop.clone(),
        waiting: HashMap::new(),
        running: JoinSet::new(),
        forming: Vec::new(),
        forming_since: None,
        held: 0,
        unordered: 0,
    };
    let mut replays = interval(config.replay_interval);
    replays.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut purges = interval(config.purge_interval);
    purges.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut purging: Option<tokio::task::JoinHandle<()>> = None;
    let mut heartbeat = config
        .heartbeat_interval
        .map(|every| Heartbeat::new(d.shared.db.clone(), &d.shared.name, broker, every));
    let mut beats = interval(
        config
            .heartbeat_interval
            .unwrap_or(Duration::from_secs(3600)),
    );
    beats.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let due = d.due(&mut rx);
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(done) = d.running.join_next() => {
                // Tasks catch handler panics and are never aborted, so they always return.
                if let Ok(done) = done {
                    d.done(done);
                }
            }
            _ = sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {}
            next = rx.recv(), if d.held < config.max_in_flight => match next {
                Some(delivery) => d.accept(delivery),
                None => break,
            },
            _ = replays.tick() => d.take_replays().await,
            _ = beats.tick(), if heartbeat.is_some() => {
                if let Some(h) = heartbeat.as_mut() {
                    h.beat(d.figures());
                }
            }
            _ = purges.tick(), if config.retention.is_some() => {
                if purging.as_ref().is_none_or(|p| p.is_finished()) {
                    purging = Some(tokio::spawn(purge(
                        d.shared.db.clone(),
                        d.shared.name.clone(),
                        config.retention.unwrap_or_default(),
                        config.purge_batch,
                    )));
                }
            }
            ended = &mut source_task, if source_result.is_none() => source_result = Some(ended),
        }
    }
    // The drain: the source hands over what it received, and everything held is applied and
    // acknowledged, so the broker keeps nothing pending for the next start to replay.
    source_stop.cancel();
    if !config.drain_timeout.is_zero() {
        let deadline = tokio::time::sleep(config.drain_timeout);
        tokio::pin!(deadline);
        let mut source_done = source_result.is_some();
        loop {
            if (source_done || handed.is_cancelled()) && d.held == 0 && rx.is_empty() {
                break;
            }
            let due = d.due(&mut rx);
            tokio::select! {
                biased;
                _ = &mut deadline => {
                    tracing::info!(consumer = %d.shared.name, held = d.held, "inbox: drain timed out; the rest stays unacknowledged");
                    break;
                }
                Some(done) = d.running.join_next() => {
                    if let Ok(done) = done {
                        d.done(done);
                    }
                }
                _ = sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {}
                next = rx.recv(), if d.held < config.max_in_flight => match next {
                    Some(delivery) => d.accept(delivery),
                    None => source_done = true,
                },
                _ = handed.cancelled(), if !handed.is_cancelled() => {}
                ended = &mut source_task, if source_result.is_none() => {
                    source_result = Some(ended);
                    source_done = true;
                }
            }
        }
    }
    // Running messages finish their attempt; whatever waits behind them stays unacknowledged
    // for the broker to redeliver.
    hard_stop.cancel();
    while d.running.join_next().await.is_some() {}
    if let Some(h) = heartbeat {
        h.stop().await;
    }
    drop(d);
    drop(rx);
    source_flush.cancel();
    if let Some(p) = purging {
        p.abort();
    }
    let ended = match source_result {
        Some(r) => r,
        None => source_task.await,
    };
    match ended {
        Ok(r) => r,
        Err(e) => Err(Error::Broker {
            broker,
            reason: format!("source task failed: {e}"),
            source: Some(Box::new(e)),
        }),
    }
}
