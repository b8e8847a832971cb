//! A publisher that prints each event.

use std::io::Write;

use async_trait::async_trait;

use super::{PublishOutcome, Publisher};
use crate::error::BoxError;
use crate::event::OutboxEvent;

/// Writes one line per event to standard output and reports it delivered.
///
/// For the quick start and for watching what a relay would send; not a broker.
#[derive(Clone, Debug, Default)]
pub struct StdoutPublisher {
    _private: (),
}

impl StdoutPublisher {
    /// A publisher that prints to standard output.
    pub fn stdout() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Publisher for StdoutPublisher {
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

/// The stdout publisher's old name.
#[deprecated(
    since = "0.2.0",
    note = "renamed `StdoutPublisher`: \"log\" now means the WAL relay only"
)]
pub type LogPublisher = StdoutPublisher;
