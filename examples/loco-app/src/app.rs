//! The app's hooks: the outbox initializer, its tasks, and its shutdown.

use std::path::Path;

use async_trait::async_trait;
use loco_rs::app::{AppContext, Hooks, Initializer};
use loco_rs::bgworker::Queue;
use loco_rs::boot::{BootResult, StartMode, create_app};
use loco_rs::config::Config;
use loco_rs::controller::AppRoutes;
use loco_rs::environment::Environment;
use loco_rs::task::Tasks;

use crate::controllers;
use crate::migration::Migrator;

/// The app.
pub struct App;

#[async_trait]
impl Hooks for App {
    fn app_name() -> &'static str {
        env!("CARGO_CRATE_NAME")
    }

    async fn boot(
        mode: StartMode,
        environment: &Environment,
        config: Config,
    ) -> loco_rs::Result<BootResult> {
        create_app::<Self, Migrator>(mode, environment, config).await
    }

    async fn initializers(_ctx: &AppContext) -> loco_rs::Result<Vec<Box<dyn Initializer>>> {
        Ok(vec![Box::new(seaorm_outbox_loco::OutboxInitializer::new())])
    }

    fn routes(_ctx: &AppContext) -> AppRoutes {
        AppRoutes::with_default_routes().add_route(controllers::orders::routes())
    }

    async fn connect_workers(_ctx: &AppContext, _queue: &Queue) -> loco_rs::Result<()> {
        Ok(())
    }

    fn register_tasks(tasks: &mut Tasks) {
        seaorm_outbox_loco::register_tasks(tasks);
    }

    async fn truncate(_ctx: &AppContext) -> loco_rs::Result<()> {
        Ok(())
    }

    async fn seed(_ctx: &AppContext, _base: &Path) -> loco_rs::Result<()> {
        Ok(())
    }

    async fn on_shutdown(ctx: &AppContext) {
        seaorm_outbox_loco::shutdown(ctx).await;
    }
}
