//! Kafka source (`kafka` feature): a consumer group whose offsets are committed only up to a
//! contiguous per-partition watermark of messages whose transactions committed.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::{Headers, Message as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::error::BoxError;
use crate::error::{Error, Result};
use crate::inbox::Incoming;
use crate::inbox::{Acknowledge, Delivery, Source, SourceContext};

/// A consumer group member with auto-commit off. Handlers finish out of order, so the offset
/// committed for a partition is the lowest offset received and not yet finished (or one past
/// the highest, when all are): committing the highest finished offset would skip one still in
/// flight, and a crash would lose it. Offsets are committed every
/// [`commit_interval`](Self::commit_interval) and once more, synchronously, on shutdown.
///
/// After a rebalance or a crash the next reader starts from the last committed watermark; what
/// was finished past it is redelivered. Each commit carries, as its metadata, one past the
/// highest offset finished, so the next reader flags everything below that
/// [`redelivered`](crate::inbox::Incoming::redelivered): the consumer finds it applied or
/// dead-lettered with one read and acknowledges it without running the handler. A graceful
/// stop applies everything received and commits it, so the next start replays nothing.
pub struct KafkaSource {
    config: ClientConfig,
    topics: Vec<String>,
    commit_interval: Duration,
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource")
            .field("topics", &self.topics)
            .finish_non_exhaustive()
    }
}

impl KafkaSource {
    /// Group `group` at `bootstrap_servers`, subscribed to `topics`, from the earliest offset
    /// when the group has none.
    pub fn new(bootstrap_servers: &str, group: &str, topics: &[&str]) -> Self {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", bootstrap_servers)
            .set("group.id", group)
            .set("auto.offset.reset", "earliest");
        Self::from_config(config, topics)
    }

    /// From your own client config (security, timeouts). Auto-commit and auto offset store are
    /// forced off: the watermark is the only thing that commits.
    pub fn from_config(mut config: ClientConfig, topics: &[&str]) -> Self {
        config
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        Self {
            config,
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            commit_interval: Duration::from_millis(500),
        }
    }

    /// How often the watermarks are committed (default 500 ms).
    #[must_use]
    pub fn commit_interval(mut self, every: Duration) -> Self {
        self.commit_interval = every;
        self
    }
}

/// One partition's offsets in flight.
#[derive(Debug, Default)]
struct Partition {
    unfinished: BTreeSet<i64>,
    /// One past the highest offset received.
    next: i64,
    /// One past the highest offset finished, committed beside the watermark as its metadata:
    /// everything from the watermark up to it may have been finished already.
    finished_next: i64,
    committed: i64,
    /// Offsets below this were possibly finished by the partition's previous reader.
    replay_end: i64,
}

/// The prefix of the offset metadata this source commits.
const METADATA: &str = "seaorm-outbox:finished=";

impl Partition {
    fn watermark(&self) -> i64 {
        self.unfinished.first().copied().unwrap_or(self.next)
    }
}

type Tracker = Arc<Mutex<HashMap<(String, i32), Partition>>>;

fn lock(t: &Tracker) -> MutexGuard<'_, HashMap<(String, i32), Partition>> {
    // Updates are single inserts and removes: a poisoned map is still consistent.
    t.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Notes `offset` as received and not finished: the watermark stops below it.
fn received(tracker: &Tracker, topic: &str, partition: i32, offset: i64) {
    let mut map = lock(tracker);
    let p = map.entry((topic.to_owned(), partition)).or_default();
    p.unfinished.insert(offset);
    p.next = p.next.max(offset + 1);
}

/// `offset` finished (applied, a duplicate, or dead-lettered): the watermark may pass it.
fn finished(tracker: &Tracker, topic: &str, partition: i32, offset: i64) {
    if let Some(p) = lock(tracker).get_mut(&(topic.to_owned(), partition)) {
        p.unfinished.remove(&offset);
        p.finished_next = p.finished_next.max(offset + 1);
    }
}

/// Whether this member has read from the partition before.
fn known(tracker: &Tracker, topic: &str, partition: i32) -> bool {
    lock(tracker).contains_key(&(topic.to_owned(), partition))
}

/// Starts tracking a partition whose previous reader committed `metadata`.
fn start(tracker: &Tracker, topic: &str, partition: i32, metadata: &str) {
    let replay_end = metadata
        .strip_prefix(METADATA)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    lock(tracker)
        .entry((topic.to_owned(), partition))
        .or_default()
        .replay_end = replay_end;
}

struct KafkaAck {
    tracker: Tracker,
    topic: String,
    partition: i32,
    offset: i64,
}

#[async_trait]
impl Acknowledge for KafkaAck {
    async fn ack(self: Box<Self>) -> std::result::Result<(), BoxError> {
        finished(&self.tracker, &self.topic, self.partition, self.offset);
        Ok(())
    }
}

/// How often the lag is asked of the brokers.
const LAG_EVERY: Duration = Duration::from_secs(5);

/// Messages on the partitions this member has read from that it has not received yet: each
/// partition's high watermark minus one past the highest offset received.
fn lag(consumer: &StreamConsumer, tracker: &Tracker) -> u64 {
    let positions: Vec<(String, i32, i64)> = lock(tracker)
        .iter()
        .map(|((t, p), part)| (t.clone(), *p, part.next))
        .collect();
    positions
        .into_iter()
        .filter_map(|(topic, partition, next)| {
            let (_, high) = consumer
                .fetch_watermarks(&topic, partition, Duration::from_secs(1))
                .ok()?;
            u64::try_from(high - next).ok()
        })
        .sum()
}

/// The watermarks that moved since the last commit, marked as committed.
fn advanced(tracker: &Tracker) -> Option<TopicPartitionList> {
    let mut map = lock(tracker);
    let mut list = TopicPartitionList::new();
    for ((topic, partition), p) in map.iter_mut() {
        let mark = p.watermark();
        if mark > p.committed
            && list
                .add_partition_offset(topic, *partition, Offset::Offset(mark))
                .is_ok()
        {
            if let Some(mut e) = list.find_partition(topic, *partition) {
                e.set_metadata(format!("{METADATA}{}", p.finished_next.max(mark)));
            }
            p.committed = mark;
        }
    }
    (list.count() > 0).then_some(list)
}

fn delivery(m: &impl rdkafka::message::Message, tracker: &Tracker) -> Delivery {
    let topic = m.topic().to_owned();
    let (partition, offset) = (m.partition(), m.offset());
    received(tracker, &topic, partition, offset);
    let redelivered = lock(tracker)
        .get(&(topic.clone(), partition))
        .is_some_and(|p| offset < p.replay_end);
    let headers = m
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| {
                    let v = h.value.map(String::from_utf8_lossy).unwrap_or_default();
                    (h.key.to_owned(), v.into_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
    let message = Incoming::new(
        topic.clone(),
        headers,
        m.payload().unwrap_or_default().to_vec(),
    )
    .position(Some(format!("{partition}/{offset}")))
    .broker_key(key)
    .redelivered(redelivered);
    Delivery {
        message,
        ack: Box::new(KafkaAck {
            tracker: Arc::clone(tracker),
            topic,
            partition,
            offset,
        }),
    }
}

#[async_trait]
impl Source for KafkaSource {
    fn broker(&self) -> &'static str {
        "kafka"
    }

    async fn run(self, ctx: SourceContext) -> Result<()> {
        let fatal = |e: rdkafka::error::KafkaError| Error::Broker {
            broker: "kafka",
            reason: e.to_string(),
            source: Some(Box::new(e)),
        };
        let consumer: Arc<StreamConsumer> = Arc::new(self.config.create().map_err(fatal)?);
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(fatal)?;
        let tracker: Tracker = Arc::default();
        let mut commits = tokio::time::interval(self.commit_interval);
        let mut lags = tokio::time::interval(LAG_EVERY);
        loop {
            tokio::select! {
                _ = ctx.stop.cancelled() => break,
                _ = lags.tick() => {
                    let (c, t) = (Arc::clone(&consumer), Arc::clone(&tracker));
                    if let Ok(n) = tokio::task::spawn_blocking(move || lag(&c, &t)).await {
                        ctx.report_lag(n);
                    }
                }
                _ = commits.tick() => {
                    if let Some(list) = advanced(&tracker)
                        && let Err(e) = consumer.commit(&list, CommitMode::Async)
                    {
                        tracing::warn!(error = %e, "kafka source: offset commit failed");
                    }
                }
                received = consumer.recv() => match received {
                    Ok(m) if !known(&tracker, m.topic(), m.partition()) => {
                        // A partition new to this member: what did its previous reader finish
                        // past the committed offset? (Asked once, off the runtime's threads.)
                        let m = m.detach();
                        let (c, topic, partition) = (Arc::clone(&consumer), m.topic().to_owned(), m.partition());
                        let metadata = tokio::task::spawn_blocking(move || {
                            let mut tpl = TopicPartitionList::new();
                            tpl.add_partition(&topic, partition);
                            c.committed_offsets(tpl, Duration::from_secs(5))
                                .ok()
                                .and_then(|l| l.find_partition(&topic, partition).map(|e| e.metadata().to_owned()))
                        })
                        .await
                        .ok()
                        .flatten()
                        .unwrap_or_default();
                        start(&tracker, m.topic(), m.partition(), &metadata);
                        if ctx.deliveries.send(delivery(&m, &tracker)).await.is_err() {
                            break;
                        }
                    }
                    Ok(m) => {
                        let d = delivery(&m, &tracker);
                        drop(m);
                        if ctx.deliveries.send(d).await.is_err() {
                            break;
                        }
                    }
                    // librdkafka reconnects by itself; these are reports, not the end.
                    Err(e) => {
                        tracing::warn!(error = %e, "kafka source: receive error");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        // Nothing is received past this point; the consumer applies what it holds.
        ctx.handed_over();
        loop {
            tokio::select! {
                _ = ctx.shutdown.cancelled() => break,
                _ = commits.tick() => {
                    if let Some(list) = advanced(&tracker)
                        && let Err(e) = consumer.commit(&list, CommitMode::Async)
                    {
                        tracing::warn!(error = %e, "kafka source: offset commit failed");
                    }
                }
            }
        }
        // The consumer has made every acknowledgement it will: commit the final watermarks.
        if let Some(list) = advanced(&tracker) {
            let c = Arc::clone(&consumer);
            let done = tokio::task::spawn_blocking(move || c.commit(&list, CommitMode::Sync)).await;
            if let Ok(Err(e)) = done {
                tracing::warn!(error = %e, "kafka source: final offset commit failed");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed(t: &Tracker) -> Option<i64> {
        advanced(t).and_then(|l| l.elements().first().and_then(|e| e.offset().to_raw()))
    }

    #[test]
    fn the_commit_never_passes_an_unfinished_offset() {
        let t = Tracker::default();
        for o in 0..6 {
            received(&t, "t", 0, o);
        }
        assert_eq!(committed(&t), None, "nothing finished, nothing to commit");
        for o in [0, 1, 3, 4, 5] {
            finished(&t, "t", 0, o);
        }
        // 2 is still in flight: 3..5 finished early must wait behind it.
        assert_eq!(committed(&t), Some(2));
        assert_eq!(
            committed(&t),
            None,
            "unchanged watermark is not committed again"
        );
        finished(&t, "t", 0, 2);
        assert_eq!(committed(&t), Some(6), "all finished: one past the highest");
    }
}
