//! A publisher that prints each event.

use std::io::Write;

use async_trait::async_trait;

use super::{BoxError, PublishOutcome, Publisher};
use crate::event::OutboxEvent;

/// Writes one line per event to standard output and reports it delivered.
///
/// For the quick start and for watching what a relay would send; not a broker.
#[derive(Clone, Debug, Default)]
pub struct LogPublisher {
    _private: (),
}

impl LogPublisher {
    /// A publisher that prints to standard output.
    pub fn stdout() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Publisher for LogPublisher {
    async fn publish(&self, events: &[OutboxEvent]) -> Result<Vec<PublishOutcome>, BoxError> {
        let mut out = std::io::stdout().lock();
        for e in events {
            writeln!(
                out,
                "published {} {}/{} id={} payload={}",
                e.event_type, e.aggregate_type, e.aggregate_id, e.id, e.payload
            )?;
        }
        out.flush()?;
        Ok(vec![PublishOutcome::Delivered; events.len()])
    }

    fn name(&self) -> &str {
        "log"
    }
}
