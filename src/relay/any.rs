//! [`AnyRelay`]: what the polling relay and the log relay share, for code that runs either one
//! (the CLI's `relay` command, the Loco initializer, a supervisor of your own).

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::{Relay, RelayStats};
use crate::error::Result;
use crate::publisher::Publisher;
use crate::stats::{Health, HealthThresholds};

/// What a relay did between its start and its stop, whichever kind it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayTotals {
    /// Events the broker acknowledged.
    pub published: u64,
    /// Attempts that failed and will be tried again.
    pub retried: u64,
    /// Events given up on.
    pub dead_lettered: u64,
    /// The polling relay: claimed events handed back at a stop. The log relay: records it could
    /// not read.
    pub released_or_unreadable: u64,
}

/// A relay that can be prepared, run until cancelled, and asked for its health: [`Relay`] and
/// [`LogRelay`](super::log::LogRelay) alike.
#[async_trait]
pub trait AnyRelay: Send + Sync {
    /// Its name: the heartbeat row's and the metrics' label.
    fn name(&self) -> &str;

    /// One line saying what it reads and where it publishes, for a start-up message.
    fn describe(&self) -> String;

    /// Checks and creates what it needs before it runs (the log relay's slot and publication);
    /// nothing for the polling relay.
    ///
    /// # Errors
    /// What will not heal by retrying: a server that cannot decode, a role without rights.
    async fn prepare(&self) -> Result<()> {
        Ok(())
    }

    /// Its health verdict against `thresholds`.
    async fn health(&self, thresholds: &HealthThresholds) -> Health;

    /// Runs until `cancel`, then stops gracefully; returns its totals.
    async fn run_until(&self, cancel: CancellationToken) -> RelayTotals;
}

#[async_trait]
impl<P: Publisher> AnyRelay for Relay<P> {
    fn name(&self) -> &str {
        Relay::name(self)
    }

    fn describe(&self) -> String {
        format!(
            "relay {} publishing to {}",
            self.name(),
            self.publisher().name()
        )
    }

    async fn health(&self, thresholds: &HealthThresholds) -> Health {
        Relay::health(self, thresholds).await
    }

    async fn run_until(&self, cancel: CancellationToken) -> RelayTotals {
        let s: RelayStats = self.run(cancel).await;
        RelayTotals {
            published: s.published,
            retried: s.retried,
            dead_lettered: s.dead_lettered,
            released_or_unreadable: s.released,
        }
    }
}

#[cfg(feature = "postgres")]
#[async_trait]
impl<P: Publisher> AnyRelay for super::log::LogRelay<P> {
    fn name(&self) -> &str {
        super::log::LogRelay::name(self)
    }

    fn describe(&self) -> String {
        format!(
            "log relay {} reading slot {} and publishing to {}",
            self.name(),
            self.config().slot,
            self.publisher().name()
        )
    }

    async fn prepare(&self) -> Result<()> {
        super::log::LogRelay::prepare(self).await
    }

    async fn health(&self, thresholds: &HealthThresholds) -> Health {
        super::log::LogRelay::health(self, thresholds).await
    }

    async fn run_until(&self, cancel: CancellationToken) -> RelayTotals {
        let s = self.run(cancel).await;
        RelayTotals {
            published: s.published,
            retried: s.retried,
            dead_lettered: s.dead_lettered,
            released_or_unreadable: s.unreadable,
        }
    }
}
