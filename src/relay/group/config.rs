//! [`GroupConfig`]: how a relay group shares its process among tenants.

use std::time::Duration;

use crate::error::{Error, Result};
#[cfg(doc)]
use crate::relay::{RelayGroup, RelayWaker};

/// How a [`RelayGroup`] shares its process among tenants.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct GroupConfig {
    /// How many tenants may have a batch in flight at once (one batch per tenant at most).
    /// This, not the number of tenants, bounds the group's busy tasks and the connections it
    /// uses at a time. Default 4.
    pub workers: usize,
    /// The longest an idle tenant goes between polls: after each empty poll its interval
    /// doubles from the relay's `idle_poll_interval` up to this (or to `idle_poll_interval`,
    /// if that is longer). A wake-up (NOTIFY, a [`RelayWaker`]) polls it at once. Default 5 s.
    pub idle_poll_max: Duration,
    /// A batch in flight longer than this (a tenant whose database hangs, a slow publish)
    /// stops counting against `workers`, so another tenant's batch can start; at most
    /// `workers` such batches run besides. Default 2 s.
    pub stall_after: Duration,
    /// How long after its database failed a tenant is checked again (a ping outside the
    /// workers); doubles with each failed check up to `failure_backoff_max`. Default 100 ms.
    pub failure_backoff: Duration,
    /// The longest wait between checks of a failing tenant's database. Default 30 s.
    pub failure_backoff_max: Duration,
    /// How long a check of a failing tenant's database may take. Default 5 s.
    pub probe_timeout: Duration,
    /// Tenants whose health is read at once by [`RelayGroup::health`]. Default 8.
    pub health_concurrency: usize,
    /// Schema tenants ([`RelayGroup::add_schema`]): how often one scan of all their schemas
    /// looks for events due. Default 1 s.
    pub scan_interval: Duration,
    /// Schema tenants: the most connections each tenant's pool opens. Default 2.
    pub schema_pool_size: u32,
    /// Schema tenants: how long a tenant's pool keeps an unused connection. Default 10 s.
    pub schema_idle_timeout: Duration,
    /// Schema tenants: how many of those that ran out of work most recently keep their
    /// connections (up to `schema_idle_timeout`), so one that writes again soon pays no new
    /// connection (about 0.1 s on the benchmark machine); the others hold none. Default 8.
    pub warm_schemas: usize,
    /// How many tenants' ids the relay metrics carry as their `tenant` label; tenants added
    /// beyond that are labelled `other`, so a group of thousands does not make thousands of
    /// series per metric. `0` leaves the label off. Default 100.
    pub tenant_labels: usize,
}

impl Default for GroupConfig {
    fn default() -> Self {
        Self {
            workers: 4,
            idle_poll_max: Duration::from_secs(5),
            stall_after: Duration::from_secs(2),
            failure_backoff: Duration::from_millis(100),
            failure_backoff_max: Duration::from_secs(30),
            probe_timeout: Duration::from_secs(5),
            health_concurrency: 8,
            scan_interval: Duration::from_secs(1),
            schema_pool_size: 2,
            schema_idle_timeout: Duration::from_secs(10),
            warm_schemas: 8,
            tenant_labels: 100,
        }
    }
}

impl GroupConfig {
    setters! {
        /// Sets [`workers`](Self::workers).
        workers: usize,
        /// Sets [`idle_poll_max`](Self::idle_poll_max).
        idle_poll_max: Duration,
        /// Sets [`stall_after`](Self::stall_after).
        stall_after: Duration,
        /// Sets [`failure_backoff`](Self::failure_backoff).
        failure_backoff: Duration,
        /// Sets [`failure_backoff_max`](Self::failure_backoff_max).
        failure_backoff_max: Duration,
        /// Sets [`probe_timeout`](Self::probe_timeout).
        probe_timeout: Duration,
        /// Sets [`health_concurrency`](Self::health_concurrency).
        health_concurrency: usize,
        /// Sets [`scan_interval`](Self::scan_interval).
        scan_interval: Duration,
        /// Sets [`schema_pool_size`](Self::schema_pool_size).
        schema_pool_size: u32,
        /// Sets [`schema_idle_timeout`](Self::schema_idle_timeout).
        schema_idle_timeout: Duration,
        /// Sets [`warm_schemas`](Self::warm_schemas).
        warm_schemas: usize,
        /// Sets [`tenant_labels`](Self::tenant_labels).
        tenant_labels: usize,
    }

    pub(super) fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(format!("relay group: {m}")));
        if self.workers == 0 || self.health_concurrency == 0 {
            return bad("workers and health_concurrency must be at least 1");
        }
        if self.failure_backoff.is_zero() || self.failure_backoff > self.failure_backoff_max {
            return bad("failure_backoff must be positive and not exceed failure_backoff_max");
        }
        if [self.probe_timeout, self.stall_after, self.scan_interval]
            .iter()
            .any(Duration::is_zero)
        {
            return bad("probe_timeout, stall_after and scan_interval must be positive");
        }
        if self.schema_pool_size == 0 {
            return bad("schema_pool_size must be at least 1");
        }
        Ok(())
    }
}
