//! [`RelayGroup`]: one process serving the outboxes of many tenants (a database, or a
//! PostgreSQL schema, each), with a bounded number of batches in flight.

mod config;
mod run;
mod schedule;
mod tenant;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use sea_orm::DatabaseConnection;
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use config::GroupConfig;
use tenant::{Beat, Tenant, TenantRun, forget, forward_wakes, pg_schema};

use super::breaker::Breaker;
use super::{BreakerStatus, Claiming, Relay, RelayConfig, RelayStats, RelayWaker, lock};
use crate::error::{Error, Result};
use crate::publisher::Publisher;
use crate::stats::{Health, HealthStatus, HealthThresholds};

/// Builds a [`RelayGroup`].
#[derive(Debug)]
pub struct RelayGroupBuilder<P> {
    publisher: P,
    relay: RelayConfig,
    config: GroupConfig,
    listen: Vec<DatabaseConnection>,
    schemas: Option<DatabaseConnection>,
}

impl<P: Publisher + 'static> RelayGroupBuilder<P> {
    /// PostgreSQL schema per tenant: `db` reaches the database that holds the tenants'
    /// schemas (its own `search_path` does not matter). Tenants added with
    /// [`RelayGroup::add_schema`] get small pools of their own made from its settings, which
    /// open no connection while the tenant is idle; one scan on `db` every
    /// [`scan_interval`](GroupConfig::scan_interval) finds which schemas have events due, and
    /// one LISTEN on it wakes a schema's tenant when it commits.
    #[must_use]
    pub fn schemas(mut self, db: DatabaseConnection) -> Self {
        self.listen.push(db.clone());
        self.schemas = Some(db);
        self
    }

    /// The configuration every tenant's relay runs with (its `name`, if set, prefixes the
    /// tenants' relay names). Tenants claim under leases ([`Claiming::Leases`]) whatever it
    /// says, and do not LISTEN each on their own: see [`RelayGroup`].
    #[must_use]
    pub fn relay_config(mut self, config: RelayConfig) -> Self {
        self.relay = config;
        self
    }

    /// Sets how the group shares its process among tenants.
    #[must_use]
    pub fn config(mut self, config: GroupConfig) -> Self {
        self.config = config;
        self
    }

    /// PostgreSQL: LISTEN on `db`'s database (one connection of its pool, for the whole
    /// group), waking every tenant whose schema the insert trigger's notification names. Give
    /// one connection per database that holds tenants; tenants in databases nobody listens on
    /// are polled.
    #[must_use]
    pub fn listen(mut self, db: DatabaseConnection) -> Self {
        self.listen.push(db);
        self
    }

    /// Validates the configuration and builds the group, with no tenants yet.
    ///
    /// # Errors
    /// [`Error::Config`] for a configuration that cannot work.
    pub fn build(self) -> Result<RelayGroup<P>> {
        let mut relay = self.relay;
        relay.claiming = Claiming::Leases;
        relay.listen_notify = false;
        relay.validate()?;
        self.config.validate()?;
        let base = relay.name.clone().unwrap_or_else(|| {
            format!("group-{}-{:04x}", std::process::id(), rand::random::<u16>())
        });
        Ok(RelayGroup {
            shared: Arc::new(Shared {
                publisher: Arc::new(self.publisher),
                relay,
                config: self.config,
                base,
                breaker: Arc::default(),
                tenants: Mutex::default(),
                changes: Mutex::default(),
                changed: Notify::new(),
                listen: self.listen,
                schemas: self.schemas,
                labelled: AtomicUsize::new(0),
                warm: Mutex::default(),
            }),
        })
    }
}

/// The outboxes of many tenants, relayed by one process through one publisher.
///
/// Each tenant is a [`DatabaseConnection`]: its own database (any backend), or a PostgreSQL
/// schema reached through a connection whose `search_path` names it. Each has its own relay
/// state (leases, claim cursor, backoff, heartbeat row named `<group>/<tenant>`); the
/// publisher and its circuit breaker are shared, so a broker outage is one outage. A batch
/// never mixes tenants: each is claimed from, published for, and written back to one tenant.
///
/// * **Bounded.** At most [`workers`](GroupConfig::workers) batches are in flight at once, one
///   per tenant at most; idle tenants hold no task that polls and no connection. Their polls
///   space out up to [`idle_poll_max`](GroupConfig::idle_poll_max), and a wake-up ([`listen`],
///   [`RelayWaker`]) brings one at once.
/// * **Fair.** Tenants with work take turns, one batch each: a tenant with a million events
///   waits its turn like one with ten, so a small tenant waits at most one batch of each busy
///   tenant, divided among the workers.
/// * **Isolated.** A tenant whose database fails is taken out of turn: it is checked with a
///   ping outside the workers, with backoff, and rejoins when it answers. A batch that hangs
///   (a database that stops answering) frees its worker after
///   [`stall_after`](GroupConfig::stall_after).
///
/// Tenants claim under leases ([`Claiming::Leases`]), which need no rounds beside the claims:
/// owned partitions would write every tenant's heartbeat every two seconds, idle or not.
/// Per-aggregate order holds as for any leased relay. Events that fall due later (retries,
/// scheduled events) wait up to `idle_poll_max` past their time in an idle tenant.
///
/// [`listen`]: RelayGroupBuilder::listen
///
/// ```no_run
/// use sea_orm::Database;
/// use seaorm_outbox::publisher::StdoutPublisher;
/// use seaorm_outbox::relay::{GroupConfig, RelayGroup};
/// use tokio_util::sync::CancellationToken;
///
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// let group = RelayGroup::builder(StdoutPublisher::stdout())
///     .config(GroupConfig::default().workers(8))
///     .build()?;
/// for tenant in ["acme", "globex"] {
///     let db = Database::connect(format!("sqlite://{tenant}.db?mode=rwc")).await?;
///     group.add_tenant(tenant, db).await?;
/// }
/// let stop = CancellationToken::new();
/// let running = tokio::spawn({
///     let (group, stop) = (group.clone(), stop.clone());
///     async move { group.run(stop).await }
/// });
/// // Tenants come and go while it runs:
/// let stats = group.remove_tenant("globex").await?;
/// println!("globex: {} published", stats.published);
/// stop.cancel();
/// running.await?;
/// # Ok(()) }
/// ```
pub struct RelayGroup<P> {
    shared: Arc<Shared<P>>,
}

impl<P> Clone for RelayGroup<P> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<P> std::fmt::Debug for RelayGroup<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayGroup")
            .field("name", &self.shared.base)
            .field("tenants", &lock(&self.shared.tenants).len())
            .finish_non_exhaustive()
    }
}

pub(super) struct Shared<P> {
    publisher: Arc<P>,
    relay: RelayConfig,
    config: GroupConfig,
    base: String,
    breaker: Arc<Mutex<Breaker>>,
    tenants: Mutex<BTreeMap<String, Arc<Tenant<P>>>>,
    /// Tenants woken or removed since the loop last looked.
    changes: Mutex<Vec<Change>>,
    changed: Notify,
    listen: Vec<DatabaseConnection>,
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    schemas: Option<DatabaseConnection>,
    /// Tenants given their own `tenant` label so far.
    labelled: AtomicUsize,
    /// Schema tenants that parked most recently, newest first: they keep their connections.
    warm: Mutex<std::collections::VecDeque<String>>,
}

pub(super) enum Change {
    Wake(String),
    Removed(String),
}

impl<P> Shared<P> {
    fn tell(&self, change: Change) {
        lock(&self.changes).push(change);
        self.changed.notify_one();
    }

    fn tenant(&self, id: &str) -> Option<Arc<Tenant<P>>> {
        lock(&self.tenants).get(id).cloned()
    }
}

/// A group's health: each tenant's, and the worst of them.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct GroupHealth {
    /// The worst tenant's verdict (healthy with no tenants).
    pub status: HealthStatus,
    /// Each tenant's, by id.
    pub tenants: BTreeMap<String, Health>,
}

impl GroupHealth {
    /// The HTTP status to serve: 503 when any tenant is unhealthy.
    pub fn http_status(&self) -> u16 {
        match self.status {
            HealthStatus::Unhealthy => 503,
            _ => 200,
        }
    }
}

fn rank(s: HealthStatus) -> u8 {
    match s {
        HealthStatus::Healthy => 0,
        HealthStatus::Degraded => 1,
        HealthStatus::Unhealthy => 2,
    }
}

impl<P: Publisher + 'static> RelayGroup<P> {
    /// Starts building a group that publishes every tenant's events through `publisher`.
    pub fn builder(publisher: P) -> RelayGroupBuilder<P> {
        RelayGroupBuilder {
            publisher,
            relay: RelayConfig::default(),
            config: GroupConfig::default(),
            listen: Vec::new(),
            schemas: None,
        }
    }

    /// Adds a tenant, polled at once if the group is running. Returns a [`RelayWaker`] that
    /// wakes this tenant after the app commits its events.
    ///
    /// # Errors
    /// [`Error::Tenant`] if the id is taken; [`Error::Config`] for an empty id.
    pub async fn add_tenant(
        &self,
        id: impl Into<String>,
        db: DatabaseConnection,
    ) -> Result<RelayWaker> {
        let id = self.free_id(id.into())?;
        let schema = pg_schema(&db, self.shared.config.probe_timeout).await;
        self.insert(id, db, schema, None)
    }

    /// Adds a tenant whose outbox is the PostgreSQL schema `schema` of the database given to
    /// [`RelayGroupBuilder::schemas`], on a pool of its own that opens no connection until
    /// used; its migrations must have run. It is found by the group's scan, not polled.
    ///
    /// # Errors
    /// [`Error::Tenant`] if the id is taken; [`Error::Config`] for an empty id or schema, or a
    /// group built without [`schemas`](RelayGroupBuilder::schemas) (or without the `postgres`
    /// feature).
    pub async fn add_schema(&self, id: impl Into<String>, schema: &str) -> Result<RelayWaker> {
        let id = self.free_id(id.into())?;
        if schema.is_empty() {
            return Err(Error::Config(
                "relay group: a schema name cannot be empty".into(),
            ));
        }
        let parked = Arc::new(AtomicBool::new(false));
        let db = self.schema_pool(schema, parked.clone())?;
        self.insert(id, db, Some(schema.to_owned()), Some(parked))
    }

    #[cfg(feature = "postgres")]
    fn schema_pool(&self, schema: &str, parked: Arc<AtomicBool>) -> Result<DatabaseConnection> {
        let base = self
            .shared
            .schemas
            .as_ref()
            .and_then(crate::store::pg_pool)
            .ok_or_else(|| {
                Error::Config(
                    "relay group: add_schema needs a PostgreSQL connection given to schemas()"
                        .into(),
                )
            })?;
        let c = &self.shared.config;
        Ok(crate::store::schemas::schema_pool(
            base,
            schema,
            c.schema_pool_size,
            c.schema_idle_timeout,
            parked,
        ))
    }

    #[cfg(not(feature = "postgres"))]
    fn schema_pool(&self, _schema: &str, _parked: Arc<AtomicBool>) -> Result<DatabaseConnection> {
        Err(Error::Config(
            "relay group: add_schema needs the `postgres` feature".into(),
        ))
    }

    fn free_id(&self, id: String) -> Result<String> {
        if id.is_empty() {
            return Err(Error::Config(
                "relay group: a tenant id cannot be empty".into(),
            ));
        }
        if lock(&self.shared.tenants).contains_key(&id) {
            return Err(Error::Tenant {
                tenant: id,
                exists: true,
            });
        }
        Ok(id)
    }

    fn insert(
        &self,
        id: String,
        db: DatabaseConnection,
        schema: Option<String>,
        parked: Option<Arc<AtomicBool>>,
    ) -> Result<RelayWaker> {
        let config = RelayConfig {
            name: Some(format!("{}/{id}", self.shared.base)),
            ..self.shared.relay.clone()
        };
        let label = match self.shared.config.tenant_labels {
            0 => None,
            cap if self.shared.labelled.fetch_add(1, AtomicOrdering::Relaxed) < cap => {
                Some(id.clone())
            }
            _ => Some("other".to_owned()),
        };
        let relay = Relay::builder(db, self.shared.publisher.clone())
            .config(config)
            .shared_breaker(self.shared.breaker.clone())
            .tenant_label(label)
            .build()?;
        let forward = forward_wakes(&relay, &id, Arc::downgrade(&self.shared));
        let waker = relay.waker();
        let scanned = parked.is_some();
        let tenant = Arc::new(Tenant {
            id: id.clone(),
            relay,
            schema,
            parked,
            stop: CancellationToken::new(),
            running: tokio::sync::Mutex::new(TenantRun {
                beat: Beat::new(),
                idle: 0,
                backoff: Duration::ZERO,
                next_purge: tokio::time::Instant::now(),
            }),
            stats: Mutex::default(),
            failing: Mutex::default(),
            forward,
        });
        {
            let mut tenants = lock(&self.shared.tenants);
            if tenants.contains_key(&id) {
                return Err(Error::Tenant {
                    tenant: id,
                    exists: true,
                });
            }
            tenants.insert(id.clone(), tenant);
        }
        if !scanned {
            // A schema tenant is found by the next scan instead.
            self.shared.tell(Change::Wake(id));
        }
        Ok(waker)
    }

    /// Removes a tenant gracefully: its batch in flight finishes (within the relay's
    /// `shutdown_grace`) and is written back, its heartbeat row goes, and nothing of it is
    /// claimed again. Returns what its relay did in this group.
    ///
    /// # Errors
    /// [`Error::Tenant`] if there is no such tenant.
    pub async fn remove_tenant(&self, id: &str) -> Result<RelayStats> {
        let tenant = lock(&self.shared.tenants)
            .remove(id)
            .ok_or_else(|| Error::Tenant {
                tenant: id.to_owned(),
                exists: false,
            })?;
        tenant.stop.cancel();
        self.shared.tell(Change::Removed(id.to_owned()));
        let run = tenant.running.lock().await;
        forget(&tenant, &run).await;
        Ok(*lock(&tenant.stats))
    }

    /// The tenants' ids, in order.
    pub fn tenants(&self) -> Vec<String> {
        lock(&self.shared.tenants).keys().cloned().collect()
    }

    /// A tenant's database connection (for its `Outbox`, or an admin router's
    /// [`tenant`](https://docs.rs/seaorm-outbox-admin)), if it is in the group.
    pub fn database(&self, id: &str) -> Option<DatabaseConnection> {
        self.shared.tenant(id).map(|t| t.relay.db.clone())
    }

    /// A new [`RelayWaker`] for a tenant, if it is in the group.
    pub fn waker(&self, id: &str) -> Option<RelayWaker> {
        self.shared.tenant(id).map(|t| t.relay.waker())
    }

    /// What each tenant's relay has done in this group, by id.
    pub fn stats(&self) -> BTreeMap<String, RelayStats> {
        lock(&self.shared.tenants)
            .iter()
            .map(|(id, t)| (id.clone(), *lock(&t.stats)))
            .collect()
    }

    /// The shared publisher's circuit breaker.
    pub fn breaker(&self) -> BreakerStatus {
        lock(&self.shared.breaker).status()
    }

    /// Each tenant's health against `thresholds` (its backlog, lag and dead letters, its
    /// polling, the shared publisher's state; unhealthy while its database fails), and the
    /// worst of them. Reads [`health_concurrency`](GroupConfig::health_concurrency) tenants at
    /// a time.
    pub async fn health(&self, thresholds: &HealthThresholds) -> GroupHealth {
        let tenants: Vec<_> = lock(&self.shared.tenants).values().cloned().collect();
        let tenants: BTreeMap<String, Health> = futures_util::stream::iter(tenants)
            .map(|t| async move {
                let mut h = t.relay.health(thresholds).await;
                if let Some((since, error)) = lock(&t.failing).clone() {
                    h.status = HealthStatus::Unhealthy;
                    h.reasons
                        .push(format!("tenant database failing since {since}: {error}"));
                }
                (t.id.clone(), h)
            })
            .buffer_unordered(self.shared.config.health_concurrency)
            .collect()
            .await;
        let status = tenants
            .values()
            .map(|h| h.status)
            .max_by_key(|s| rank(*s))
            .unwrap_or(HealthStatus::Healthy);
        GroupHealth { status, tenants }
    }
}
