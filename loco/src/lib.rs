//! The outbox in a [Loco](https://loco.rs) app: a few lines of config and code.
//!
//! * [`OutboxInitializer`] runs the relays in the server process only (never in
//!   `cargo loco task`), and mounts the admin API and dashboard behind Loco's JWT auth.
//! * [`register_tasks`] adds `outbox:status`, `outbox:replay` and `outbox:purge`.
//! * [`shutdown`], from `Hooks::on_shutdown`, stops the relays after their in-flight batch.
//! * [`waker`] wakes those relays right after a controller's commit (on MySQL and SQLite the
//!   only push; PostgreSQL also has NOTIFY).
//! * [`OutboxSettings`] is the `initializers: outbox:` block of the config.
//!
//! ```no_run
//! use loco_rs::app::{AppContext, Initializer};
//! use loco_rs::task::Tasks;
//!
//! // In your `impl Hooks for App`:
//! async fn initializers(_ctx: &AppContext) -> loco_rs::Result<Vec<Box<dyn Initializer>>> {
//!     Ok(vec![Box::new(seaorm_outbox_loco::OutboxInitializer::new())])
//! }
//! fn register_tasks(tasks: &mut Tasks) {
//!     seaorm_outbox_loco::register_tasks(tasks);
//! }
//! async fn on_shutdown(ctx: &AppContext) {
//!     seaorm_outbox_loco::shutdown(ctx).await;
//! }
//! ```
//!
//! Writing an event beside the domain rows is the core crate's `Outbox::new(&txn)` inside the
//! controller's transaction on `ctx.db`; add `seaorm_outbox_migration::migrations()` to the
//! app's migrator.

mod auth;
mod initializer;
mod publisher;
mod settings;
mod tasks;

use loco_rs::app::AppContext;

pub use self::auth::LocoJwt;
pub use self::initializer::OutboxInitializer;
pub use self::settings::{
    AdminSettings, OnPublishSetting, OrderingSetting, OutboxSettings, PublisherKind, SettingsError,
};
pub use self::tasks::register as register_tasks;

/// The initializer's name and its config key under `initializers:`.
pub const NAME: &str = "outbox";

/// The [`RelayWaker`](seaorm_outbox::RelayWaker) of the relays the initializer started, to
/// commit a controller's transaction with (`waker.commit(txn)`) so they claim its events at once
/// rather than at their next poll. `None` where no relay runs in this process (`relay: false`,
/// a task, or after [`shutdown`]).
pub fn waker(ctx: &AppContext) -> Option<seaorm_outbox::RelayWaker> {
    ctx.shared_store
        .get_ref::<initializer::SharedWaker>()
        .map(|w| w.0.clone())
}

/// The relay group the initializer started from `tenants:`, to add and remove tenants while
/// the app runs; `None` without that block or before the server started it.
pub fn group(
    ctx: &AppContext,
) -> Option<seaorm_outbox::relay::RelayGroup<std::sync::Arc<dyn seaorm_outbox::Publisher>>> {
    ctx.shared_store
        .get_ref::<initializer::SharedGroup>()
        .map(|g| g.0.clone())
}

/// Stops the relays the initializer started and waits for each to finish its in-flight batch
/// (bounded by its `shutdown_grace`). Call it from `Hooks::on_shutdown`; a no-op when none run.
pub async fn shutdown(ctx: &AppContext) {
    let Some(running) = ctx.shared_store.remove::<initializer::RunningRelays>() else {
        return;
    };
    let _ = ctx.shared_store.remove::<initializer::SharedWaker>();
    let _ = ctx.shared_store.remove::<initializer::SharedGroup>();
    running.stop.cancel();
    let tasks = std::mem::take(&mut *running.tasks.lock().unwrap_or_else(|p| p.into_inner()));
    for task in tasks {
        match task.await {
            Ok(stats) => tracing::info!(published = stats.published, "outbox relay stopped"),
            Err(e) => tracing::warn!(error = %e, "outbox relay task failed"),
        }
    }
}
