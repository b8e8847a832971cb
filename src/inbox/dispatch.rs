//! Per-key queues between a source and the handlers: one message per ordering key at a time,
//! in arrival order; different keys in parallel, up to the consumer's concurrency.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::{MissedTickBehavior, interval};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::handler::Handler;
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

struct Dispatcher<H> {
    shared: Arc<Shared<H>>,
    shutdown: CancellationToken,
    /// Keys with a message running; each holds the messages waiting behind it.
    waiting: HashMap<Key, VecDeque<Delivery>>,
    running: JoinSet<Key>,
    permits: Arc<Semaphore>,
    /// Messages running or waiting.
    held: usize,
    unordered: u64,
}

impl<H: Handler> Dispatcher<H> {
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
        match self.waiting.get_mut(&key) {
            Some(queue) => queue.push_back(d),
            None => {
                self.waiting.insert(key.clone(), VecDeque::new());
                self.start(key, d);
            }
        }
    }

    fn start(&mut self, key: Key, d: Delivery) {
        let shared = Arc::clone(&self.shared);
        let permits = Arc::clone(&self.permits);
        let shutdown = self.shutdown.clone();
        self.running.spawn(async move {
            // The semaphore is never closed, so this only waits.
            let _permit = permits.acquire_owned().await;
            process::handle(&shared, d, &shutdown).await;
            key
        });
    }

    /// `key`'s message finished: start the next behind it, if any.
    fn finished(&mut self, key: Key) {
        self.held = self.held.saturating_sub(1);
        let next = self.waiting.get_mut(&key).and_then(VecDeque::pop_front);
        match next {
            Some(d) if !self.shutdown.is_cancelled() => self.start(key, d),
            _ => {
                self.waiting.remove(&key);
            }
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
        held: 0,
        unordered: 0,
    };
    let mut replays = interval(config.replay_interval);
    replays.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut purges = interval(config.purge_interval);
    purges.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut purging: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(done) = d.running.join_next() => {
                // Tasks catch handler panics and are never aborted, so they always return.
                if let Ok(key) = done {
                    d.finished(key);
                }
            }
            next = rx.recv(), if d.held < config.max_in_flight => match next {
                Some(delivery) => d.accept(delivery),
                None => break,
            },
            _ = replays.tick() => d.take_replays().await,
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
            tokio::select! {
                biased;
                _ = &mut deadline => {
                    tracing::info!(consumer = %d.shared.name, held = d.held, "inbox: drain timed out; the rest stays unacknowledged");
                    break;
                }
                Some(done) = d.running.join_next() => {
                    if let Ok(key) = done {
                        d.finished(key);
                    }
                }
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
    while let Some(done) = d.running.join_next().await {
        if let Ok(key) = done {
            d.waiting.remove(&key);
        }
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
