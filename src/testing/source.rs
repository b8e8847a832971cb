//! [`MemorySource`]: a source the test feeds, so a handler runs through the real consumer.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{KitError, wait_for};
use crate::error::{BoxError, Result};
use crate::event::OutboxEvent;
use crate::inbox::{Acknowledge, Delivery, Incoming, Source, SourceContext};
use crate::wire::Envelope;

/// A [`Source`] fed through its [`MemoryFeed`], for testing a consumer's handler through the
/// real [`Consumer`](crate::inbox::Consumer) without a broker. Messages are delivered in the
/// order sent; the feed records what the consumer acknowledged. A message the handler hands
/// back with [`retry_after`](crate::inbox::HandlerError::retry_after) and no ordering key comes
/// again after the delay, as from NATS JetStream. What is unacknowledged when the consumer
/// stops is not delivered again.
///
/// ```
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use async_trait::async_trait;
/// use sea_orm::{Database, DatabaseTransaction};
/// use sea_orm_migration::MigratorTrait;
/// use seaorm_outbox::inbox::{Consumer, ConsumerConfig, Handler, HandlerError, Incoming};
/// use seaorm_outbox::NewEvent;
/// use seaorm_outbox::testing::{MemorySource, stored};
/// use tokio_util::sync::CancellationToken;
///
/// struct Billing;
/// #[async_trait]
/// impl Handler for Billing {
///     async fn handle(&self, _txn: &DatabaseTransaction, msg: &Incoming) -> Result<(), HandlerError> {
///         match msg.header("event-type") {
///             Some("order.placed") => Ok(()),
///             _ => Err(HandlerError::permanent("unknown event")),
///         }
///     }
/// }
///
/// let db = Database::connect("sqlite::memory:").await?;
/// seaorm_outbox_migration::Migrator::up(&db, None).await?;
/// let consumer = Consumer::builder(db.clone(), "billing", Billing)
///     .config(ConsumerConfig::default().max_retry_backoff(Duration::from_millis(10)))
///     .build()?;
/// let (source, feed) = MemorySource::new();
///
/// let placed = stored(NewEvent::new("order.placed", "order", "42"))?;
/// feed.send_event(&placed);
/// feed.send_event(&placed); // the broker delivers it twice
/// feed.send_event(&stored(NewEvent::new("order.lost", "order", "43"))?);
///
/// let stop = CancellationToken::new();
/// let run = tokio::spawn({
///     let stop = stop.clone();
///     async move { consumer.run(source, stop).await }
/// });
/// feed.wait_acked(3, Duration::from_secs(5)).await?;
/// stop.cancel();
/// let stats = run.await??;
/// assert_eq!((stats.applied, stats.duplicates, stats.dead_lettered), (1, 1, 1));
/// # Ok(()) }
/// # tokio::runtime::Runtime::new().unwrap().block_on(f()).unwrap();
/// ```
#[derive(Debug)]
pub struct MemorySource {
    rx: mpsc::UnboundedReceiver<Incoming>,
    feed: MemoryFeed,
}

/// The test's end of a [`MemorySource`]: sends messages, tells what was acknowledged. Cheap to
/// clone.
#[derive(Clone, Debug)]
pub struct MemoryFeed {
    tx: mpsc::UnboundedSender<Incoming>,
    acked: Arc<Mutex<Vec<Incoming>>>,
}

impl MemorySource {
    /// A source and the feed that sends into it.
    pub fn new() -> (Self, MemoryFeed) {
        let (tx, rx) = mpsc::unbounded_channel();
        let feed = MemoryFeed {
            tx,
            acked: Arc::default(),
        };
        (
            Self {
                rx,
                feed: feed.clone(),
            },
            feed,
        )
    }
}

impl MemoryFeed {
    /// Delivers `message` (a first delivery unless it says otherwise).
    pub fn send(&self, message: Incoming) {
        let message = if message.deliveries == 0 {
            message.deliveries(1)
        } else {
            message
        };
        // A closed channel means the source is gone: nothing would read it.
        let _ = self.tx.send(message);
    }

    /// Delivers `event` as a publisher would put it on the wire (the plain envelope: the
    /// payload as the body, `event-id`, `event-type`, `aggregate-id`… as headers).
    pub fn send_event(&self, event: &OutboxEvent) {
        let m = Envelope::Plain.encode(event, "ce-");
        self.send(Incoming::new("memory", m.headers, m.body).broker_key(Some(m.key)));
    }

    /// What the consumer acknowledged so far, in order.
    pub fn acked(&self) -> Vec<Incoming> {
        self.acked
            .lock()
            .map(|a| a.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    /// Waits until the consumer acknowledged `n` messages in all (applied, duplicates and dead
    /// letters each count).
    ///
    /// # Errors
    /// [`KitError::Timeout`] after `timeout`.
    pub async fn wait_acked(
        &self,
        n: usize,
        timeout: Duration,
    ) -> std::result::Result<(), KitError> {
        wait_for(
            || format!("{n} acknowledgements"),
            timeout,
            || (self.acked().len() >= n).then_some(()),
        )
        .await
    }
}

struct MemoryAck {
    message: Incoming,
    feed: MemoryFeed,
}

#[async_trait]
impl Acknowledge for MemoryAck {
    async fn ack(self: Box<Self>) -> std::result::Result<(), BoxError> {
        let mut acked = self.feed.acked.lock().map_err(|_| "acks lock poisoned")?;
        acked.push(self.message);
        Ok(())
    }

    fn can_defer(&self) -> bool {
        true
    }

    async fn defer(self: Box<Self>, delay: Duration) -> std::result::Result<(), BoxError> {
        let next = self.message.deliveries + 1;
        let again = self.message.deliveries(next).redelivered(true);
        let feed = self.feed;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            feed.send(again);
        });
        Ok(())
    }
}

#[async_trait]
impl Source for MemorySource {
    fn broker(&self) -> &'static str {
        "memory"
    }

    async fn run(mut self, ctx: SourceContext) -> Result<()> {
        loop {
            let message = tokio::select! {
                _ = ctx.stop.cancelled() => break,
                m = self.rx.recv() => match m {
                    Some(m) => m,
                    None => break,
                },
            };
            let ack = Box::new(MemoryAck {
                message: message.clone(),
                feed: self.feed.clone(),
            });
            if ctx
                .deliveries
                .send(Delivery { message, ack })
                .await
                .is_err()
            {
                return Ok(());
            }
        }
        ctx.handed_over();
        ctx.shutdown.cancelled().await;
        Ok(())
    }
}
