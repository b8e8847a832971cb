//! An in-process no-op sink that counts deliveries and can time them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use seaorm_outbox::BoxError;
use seaorm_outbox::{OutboxEvent, PublishOutcome, Publisher};
use uuid::Uuid;

#[derive(Clone, Default)]
pub(crate) struct Sink {
    pub(crate) count: Arc<AtomicU64>,
    /// When set, each delivery's arrival time by event id.
    pub(crate) arrivals: Option<Arc<Mutex<HashMap<Uuid, Instant>>>>,
}

impl Sink {
    pub(crate) fn timed() -> Self {
        Self {
            count: Arc::default(),
            arrivals: Some(Arc::default()),
        }
    }

    pub(crate) fn delivered(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl Publisher for Sink {
    async fn publish(&self, events: &[OutboxEvent]) -> Result<Vec<PublishOutcome>, BoxError> {
        if let Some(arrivals) = &self.arrivals {
            let now = Instant::now();
            let mut a = arrivals.lock().map_err(|_| "poisoned")?;
            for e in events {
                a.entry(e.id).or_insert(now);
            }
        }
        self.count.fetch_add(events.len() as u64, Ordering::Relaxed);
        Ok(vec![PublishOutcome::Delivered; events.len()])
    }

    fn name(&self) -> &str {
        "noop"
    }
}
