//! A publisher that keeps deliveries in memory.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{PublishOutcome, Publisher};
use crate::error::BoxError;
use crate::event::OutboxEvent;

/// Records every delivered event, in delivery order; optionally forwards each to a channel.
///
/// Clones share the same record, so a test can keep one clone and give another to the relay.
///
/// ```
/// use seaorm_outbox::publisher::InMemoryPublisher;
///
/// let (publisher, mut rx) = InMemoryPublisher::channel();
/// assert!(publisher.deliveries().is_empty());
/// # drop(rx);
/// ```
#[derive(Clone, Debug, Default)]
pub struct InMemoryPublisher {
    delivered: Arc<Mutex<Vec<OutboxEvent>>>,
    tx: Option<mpsc::UnboundedSender<OutboxEvent>>,
}

impl InMemoryPublisher {
    /// A publisher that only records.
    pub fn new() -> Self {
        Self::default()
    }

    /// A publisher that records and also sends each delivered event to the returned receiver.
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<OutboxEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Self {
                delivered: Arc::default(),
                tx: Some(tx),
            },
            rx,
        )
    }

    /// Every delivery so far, duplicates included, in order.
    pub fn deliveries(&self) -> Vec<OutboxEvent> {
        self.delivered
            .lock()
            .map(|d| d.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    /// How many deliveries so far, duplicates included.
    pub fn len(&self) -> usize {
        self.delivered.lock().map_or(0, |d| d.len())
    }

    /// Whether nothing was delivered yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl Publisher for InMemoryPublisher {
    async fn publish(&self, events: &[OutboxEvent]) -> Result<Vec<PublishOutcome>, BoxError> {
        let mut delivered = self
            .delivered
            .lock()
            .map_err(|_| "in-memory publisher lock poisoned")?;
        delivered.extend_from_slice(events);
        if let Some(tx) = &self.tx {
            for e in events {
                // A dropped receiver only means nobody listens any more; the record stays.
                let _ = tx.send(e.clone());
            }
        }
        Ok(vec![PublishOutcome::Delivered; events.len()])
    }

    fn name(&self) -> &str {
        "memory"
    }
}
