//! The [`OutboxInitializer`]: relays in the server process, the admin router at its path.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use axum::Router as AxumRouter;
use loco_rs::app::{AppContext, Initializer};
use seaorm_outbox::relay::{GroupConfig, RelayGroup};
use seaorm_outbox::{Publisher, Relay, RelayStats, RelayWaker};
use seaorm_outbox_admin::Admin;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::auth::LocoJwt;
use crate::settings::OutboxSettings;

/// The outbox in a Loco app. Add it in `Hooks::initializers`, configure it under
/// `initializers: outbox:`, and call [`shutdown`](crate::shutdown) from `Hooks::on_shutdown`.
///
/// Relays start in `after_routes`, which Loco runs only when it builds the web server's
/// routes: `cargo loco start` runs them, `cargo loco task`, `db` and worker-only processes
/// never do.
#[derive(Default)]
pub struct OutboxInitializer {
    publisher: Option<Arc<dyn Publisher>>,
}

impl std::fmt::Debug for OutboxInitializer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxInitializer")
            .field(
                "publisher",
                &self.publisher.as_ref().map(|p| p.name().to_owned()),
            )
            .finish()
    }
}

impl OutboxInitializer {
    /// Reads everything from the settings, the publisher included.
    pub fn new() -> Self {
        Self::default()
    }

    /// Publishes through `publisher` instead of the one `publisher:` names (a custom broker,
    /// or a test double).
    pub fn with_publisher(publisher: impl Publisher + 'static) -> Self {
        Self {
            publisher: Some(Arc::new(publisher)),
        }
    }
}

/// The running relays, in the app's shared store.
pub(crate) struct RunningRelays {
    pub(crate) stop: CancellationToken,
    pub(crate) tasks: Mutex<Vec<JoinHandle<RelayStats>>>,
}

/// The initializer's relay group, in the app's shared store.
pub(crate) struct SharedGroup(pub(crate) RelayGroup<Arc<dyn Publisher>>);

/// The waker of the initializer's relays, in the app's shared store (a type of our own, so an
/// app's own `RelayWaker` entry cannot collide with it).
pub(crate) struct SharedWaker(pub(crate) RelayWaker);

fn loco_error(e: impl std::fmt::Display) -> loco_rs::Error {
    loco_rs::Error::Message(format!("outbox: {e}"))
}

#[async_trait]
impl Initializer for OutboxInitializer {
    fn name(&self) -> String {
        crate::NAME.to_owned()
    }

    async fn after_routes(
        &self,
        router: AxumRouter,
        ctx: &AppContext,
    ) -> loco_rs::Result<AxumRouter> {
        let settings = OutboxSettings::from_config(&ctx.config).map_err(loco_error)?;
        let group = match (&settings.tenants, settings.relay) {
            (Some(_), true) => Some(start_group(&self.publisher, &settings, ctx).await?),
            (None, true) => {
                start_relays(&self.publisher, &settings, ctx).await?;
                None
            }
            (_, false) => None,
        };
        let Some(admin) = &settings.admin else {
            return Ok(router);
        };
        let mut api = Admin::builder(ctx.db.clone());
        if let Some(group) = &group {
            for id in group.tenants() {
                if let Some(db) = group.database(&id) {
                    api = api.tenant(id, db);
                }
            }
        }
        let api = api.authorizer(LocoJwt::new(ctx.clone(), admin)).build();
        tracing::info!(path = %admin.path, "outbox admin mounted behind Loco's JWT auth");
        Ok(router.nest(&admin.path, api))
    }

    async fn check(&self, ctx: &AppContext) -> loco_rs::Result<Option<loco_rs::doctor::Check>> {
        use loco_rs::doctor::{Check, CheckStatus};
        let check = match (
            OutboxSettings::from_config(&ctx.config),
            seaorm_outbox::Outbox::new(&ctx.db).stats().await,
        ) {
            (Err(e), _) => Check {
                status: CheckStatus::NotOk,
                message: "outbox settings".into(),
                description: Some(e.to_string()),
            },
            (Ok(_), Err(e)) => Check {
                status: CheckStatus::NotOk,
                message: "outbox table unreadable".into(),
                description: Some(format!("{e}; run the outbox migrations")),
            },
            (Ok(_), Ok(s)) => Check {
                status: CheckStatus::Ok,
                message: format!("outbox: {} pending, {} dead letters", s.pending(), s.failed),
                description: None,
            },
        };
        Ok(Some(check))
    }
}

/// The publisher to start relays with: the initializer's own, or the one `publisher:` names;
/// refused when this app already runs them.
async fn publisher_for(
    publisher: &Option<Arc<dyn Publisher>>,
    settings: &OutboxSettings,
    ctx: &AppContext,
) -> loco_rs::Result<Arc<dyn Publisher>> {
    if ctx.shared_store.contains::<RunningRelays>() {
        return Err(loco_error("the relays are already running in this app"));
    }
    match publisher {
        Some(p) => Ok(p.clone()),
        None => crate::publisher::connect(settings)
            .await
            .map_err(loco_error),
    }
}

/// The relays stop with the server even where `on_shutdown` does not call `shutdown`; that
/// call is what waits for their in-flight batch.
fn stop_with_server(stop: &CancellationToken) {
    let stop = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = loco_rs::boot::shutdown_signal() => stop.cancel(),
            () = stop.cancelled() => {}
        }
    });
}

async fn start_relays(
    publisher: &Option<Arc<dyn Publisher>>,
    settings: &OutboxSettings,
    ctx: &AppContext,
) -> loco_rs::Result<()> {
    let publisher = publisher_for(publisher, settings, ctx).await?;
    let config = settings.relay_config().map_err(loco_error)?;
    let stop = CancellationToken::new();
    let waker = RelayWaker::new();
    let mut tasks = Vec::with_capacity(settings.relays);
    for _ in 0..settings.relays {
        let relay = Relay::builder(ctx.db.clone(), publisher.clone())
            .config(config.clone())
            .waker(&waker)
            .build()
            .map_err(loco_error)?;
        tracing::info!(
            relay = relay.name(),
            publisher = publisher.name(),
            "outbox relay started"
        );
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move { relay.run(stop).await }));
    }
    stop_with_server(&stop);
    ctx.shared_store.insert(SharedWaker(waker));
    ctx.shared_store.insert(RunningRelays {
        stop,
        tasks: Mutex::new(tasks),
    });
    Ok(())
}

/// `tenants:`: one relay group over the schemas and databases named, started like the relays.
async fn start_group(
    publisher: &Option<Arc<dyn Publisher>>,
    settings: &OutboxSettings,
    ctx: &AppContext,
) -> loco_rs::Result<RelayGroup<Arc<dyn Publisher>>> {
    let Some(tenants) = &settings.tenants else {
        return Err(loco_error("no tenants: block"));
    };
    let publisher = publisher_for(publisher, settings, ctx).await?;
    let mut config = GroupConfig::default();
    if let Some(w) = tenants.workers {
        config = config.workers(w);
    }
    let mut builder = RelayGroup::builder(publisher)
        .relay_config(settings.relay_config().map_err(loco_error)?)
        .config(config);
    if !tenants.schemas.is_empty() {
        builder = builder.schemas(ctx.db.clone());
    }
    let group = builder.build().map_err(loco_error)?;
    for schema in &tenants.schemas {
        group.add_schema(schema, schema).await.map_err(loco_error)?;
    }
    for (id, url) in &tenants.databases {
        // Connected on first use: a tenant whose database is down does not fail the boot.
        let mut opts = sea_orm::ConnectOptions::new(url);
        opts.connect_lazy(true).sqlx_logging(false);
        let db = sea_orm::Database::connect(opts)
            .await
            .map_err(|e| loco_error(format!("tenant {id}: {e}")))?;
        group.add_tenant(id, db).await.map_err(loco_error)?;
    }
    tracing::info!(
        tenants = group.tenants().len(),
        "outbox relay group started"
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (group, stop) = (group.clone(), stop.clone());
        async move { group.run(stop).await }
    });
    stop_with_server(&stop);
    ctx.shared_store.insert(SharedGroup(group.clone()));
    ctx.shared_store.insert(RunningRelays {
        stop,
        tasks: Mutex::new(vec![task]),
    });
    Ok(group)
}
