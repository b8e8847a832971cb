//! One tenant of a relay group: its relay, its run state, and the helpers that add it.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::DatabaseConnection;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub(super) use super::super::run::Beat;
use super::{Change, Shared};
use crate::publisher::Publisher;
use crate::relay::{Relay, RelayStats};

/// One tenant: its relay, and what the group knows of it.
pub(super) struct Tenant<P> {
    pub(super) id: String,
    pub(super) relay: Relay<Arc<P>>,
    /// PostgreSQL: the schema its NOTIFYs name.
    pub(super) schema: Option<String>,
    /// A schema tenant's pool closes its connections while this is set (it has parked).
    pub(super) parked: Option<Arc<AtomicBool>>,
    /// Cancelled when it is removed.
    pub(super) stop: CancellationToken,
    /// Held while its batch is in flight, so a removal waits for the write-back.
    pub(super) running: tokio::sync::Mutex<TenantRun>,
    pub(super) stats: Mutex<RelayStats>,
    /// Since when, and why, its database has been failing.
    pub(super) failing: Mutex<Option<(DateTime<Utc>, String)>>,
    pub(super) forward: JoinHandle<()>,
}

impl<P> Tenant<P> {
    /// Added by [`RelayGroup::add_schema`](super::RelayGroup::add_schema): found by the
    /// group's scan, not polled.
    pub(super) fn scanned(&self) -> bool {
        self.parked.is_some()
    }
}

impl<P> Drop for Tenant<P> {
    fn drop(&mut self) {
        self.forward.abort();
    }
}

/// What a tenant's batches carry from one to the next.
pub(super) struct TenantRun {
    pub(super) beat: Beat,
    /// Empty polls in a row.
    pub(super) idle: u32,
    /// The wait before the next check of its failing database.
    pub(super) backoff: Duration,
    pub(super) next_purge: tokio::time::Instant,
}

/// Removes the tenant's heartbeat row, if its relay wrote one.
pub(super) async fn forget<P: Publisher>(tenant: &Tenant<P>, run: &TenantRun) {
    if run.beat.wrote()
        && let Err(e) = crate::store::forget(&tenant.relay.db, &tenant.relay.name).await
    {
        tracing::debug!(tenant = %tenant.id, error = %e, "outbox relay row not removed");
    }
}

/// Passes the tenant relay's wake-ups (its [`RelayWaker`]s) on to the group's loop.
pub(super) fn forward_wakes<P: Publisher + 'static>(
    relay: &Relay<Arc<P>>,
    id: &str,
    shared: Weak<Shared<P>>,
) -> JoinHandle<()> {
    let wake = relay.wake.clone();
    let id = id.to_owned();
    tokio::spawn(async move {
        loop {
            wake.notified().await;
            let Some(shared) = shared.upgrade() else {
                return;
            };
            shared.tell(Change::Wake(id.clone()));
        }
    })
}

/// A PostgreSQL connection's schema, for routing NOTIFYs; `None` elsewhere or if unreadable.
pub(super) async fn pg_schema(db: &DatabaseConnection, within: Duration) -> Option<String> {
    #[cfg(feature = "postgres")]
    if db.get_database_backend() == sea_orm::DbBackend::Postgres {
        let pool = crate::store::pg_pool(db)?;
        let read = tokio::time::timeout(within, crate::store::pg_current_schema(pool)).await;
        return match read {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "relay group: tenant schema unreadable; it is polled, not woken by NOTIFY");
                None
            }
            Err(_) => {
                tracing::warn!(
                    "relay group: tenant schema unreadable in time; it is polled, not woken by NOTIFY"
                );
                None
            }
        };
    }
    let _ = (db, within);
    None
}
