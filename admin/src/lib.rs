//! The admin HTTP API and dashboard of [seaorm-outbox](seaorm_outbox): an axum 0.8 [`Router`]
//! the host app mounts under a prefix of its choosing. A crate of its own, so axum stays out of
//! the core's semver; it uses the core's public API only.
//!
//! Building it takes an authorization decision, and the router fails closed: without an
//! [`Authorizer`] it does not build, unless [`AdminBuilder::allow_unauthenticated`] is called,
//! and then only loopback clients that reached the server directly are served. Read and write
//! are separate [`Role`]s. `GET /health` stays outside auth, so probes keep working.
//!
//! | route | role | what |
//! |---|---|---|
//! | `GET /` | none | the dashboard: one page, no data in it, everything embedded |
//! | `GET /health` | none | the outbox's health verdict; 503 when unhealthy |
//! | `GET /api/stats` | read | backlog split, scheduled events (count, next due), oldest pending age, dead letters, health, relays and breakers |
//! | `GET /api/history?minutes=` | read | per minute: published, sampled backlog |
//! | `GET /api/events?status=&event_type=&aggregate_type=&aggregate_id=&since=&until=&order=newest\|oldest&sort=written\|occurred&limit=&after=` | read | events by filter, a page and the `next` cursor (keyset; `offset=` still works, capped) |
//! | `GET /api/events?scheduled=true&limit=&after=` | read | events still scheduled for later, soonest first |
//! | `GET /api/events/{id}` | read | one event in full |
//! | `DELETE /api/scheduled/{id}` | write | cancel a scheduled event (`Outbox::cancel`); 409 once it can no longer be taken back |
//! | `GET /api/dead-letters` | read | dead letters, most recent first |
//! | `POST /api/dead-letters/{id}/replay` | write | back to pending |
//! | `POST /api/dead-letters/replay` | write | `{"all": true}` or `{"aggregate_type", "aggregate_id"}` |
//! | `DELETE /api/dead-letters/{id}` | write | discard |
//! | `POST /api/purge` | write | `{"older_than_secs": N}`: delete published events older than that |
//! | `GET /api/tenants` | read | the tenants [`AdminBuilder::tenant`] added: every route takes `?tenant=ID` |
//! | `GET /api/inbox/dead-letters?consumer=` | read | the inbox's dead letters |
//! | `POST /api/inbox/dead-letters/{id}/replay`, `POST /api/inbox/dead-letters/replay` | write | ask the consumer to apply them again |
//! | `DELETE /api/inbox/dead-letters/{id}` | write | discard |
//! | `GET /api/log/dead-letters`, `POST /api/log/dead-letters/{id}/replay`, `POST /api/log/dead-letters/replay`, `DELETE /api/log/dead-letters/{id}` | read / write | the log relay's dead letters (feature `log-relay`, PostgreSQL); a replay writes the event to the log again |
//!
//! With the `log-relay` feature on PostgreSQL, `/api/stats` also carries `log`: each logical
//! slot (lag, retained WAL, `wal_status`, whether a relay reads it, confirmed position) and the
//! log dead letters' count; a lost slot makes the health unhealthy.
//!
//! Write actions take `Content-Type: application/json` (so a cross-site form cannot trigger
//! them with an operator's cookie) and are logged through `tracing` with who, what and how many
//! rows. Bad input is a JSON `{"error", "message"}` with a 4xx status.
//!
//! ```no_run
//! use std::net::SocketAddr;
//!
//! use axum::Router;
//! use seaorm_outbox_admin::{Admin, BearerTokens};
//!
//! # async fn example(db: sea_orm::DatabaseConnection) -> Result<(), Box<dyn std::error::Error>> {
//! let tokens = BearerTokens::new()
//!     .writer("ops", std::env::var("OUTBOX_ADMIN_TOKEN")?)        // replay, discard, purge
//!     .reader("viewer", std::env::var("OUTBOX_VIEW_TOKEN")?);     // read only
//! let app = Router::new()
//!     // … your routes …
//!     .nest("/outbox", Admin::builder(db).authorizer(tokens).build());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! // Connect info lets allow_unauthenticated() check for loopback clients.
//! axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await?;
//! # Ok(()) }
//! ```

mod api;
mod auth;
mod dashboard;
mod dead_letters;
mod error;
mod tenants;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post};
use sea_orm::DatabaseConnection;

use self::auth::Gate;
pub use self::auth::{Authorizer, BearerTokens, Principal, Role};
use self::error::ApiError;
use seaorm_outbox::stats::HealthThresholds;

/// Request bodies are small JSON objects; anything bigger is refused (413).
const MAX_BODY_BYTES: usize = 16 * 1024;

/// What the handlers share.
pub(crate) struct AdminState {
    pub(crate) db: DatabaseConnection,
    pub(crate) gate: Gate,
    pub(crate) thresholds: HealthThresholds,
    pub(crate) relays_within: Duration,
    pub(crate) inbox: bool,
    /// Serve the log relay's slots and dead letters (PostgreSQL, feature `log-relay`).
    #[cfg_attr(not(feature = "log-relay"), allow(dead_code))]
    pub(crate) log_relay: bool,
    pub(crate) refresh: Duration,
    /// Other databases, picked by `?tenant=ID`.
    pub(crate) tenants: std::collections::BTreeMap<String, DatabaseConnection>,
}

/// The admin router's entry point: [`Admin::builder`].
#[derive(Debug)]
pub struct Admin;

impl Admin {
    /// Starts a router on `db`. It needs an authorization decision before it builds:
    /// [`AdminBuilder::authorizer`] or [`AdminBuilder::allow_unauthenticated`].
    pub fn builder(db: DatabaseConnection) -> AdminBuilder<NoAuth> {
        AdminBuilder {
            db,
            auth: NoAuth(()),
            thresholds: HealthThresholds::default(),
            relays_within: Duration::from_secs(60),
            inbox: true,
            log_relay: true,
            refresh: Duration::from_secs(5),
            tenants: std::collections::BTreeMap::new(),
        }
    }
}

/// A builder that has no authorization decision yet, so it cannot build.
#[derive(Debug)]
pub struct NoAuth(());

/// A builder with its authorization decided.
pub struct WithAuth(Gate);

impl std::fmt::Debug for WithAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Gate::Authorizer(_) => "WithAuth(authorizer)",
            Gate::LoopbackOnly => "WithAuth(loopback only)",
        })
    }
}

/// Settings for the admin router; `A` is whether authorization is decided.
#[derive(Debug)]
pub struct AdminBuilder<A> {
    db: DatabaseConnection,
    auth: A,
    thresholds: HealthThresholds,
    relays_within: Duration,
    inbox: bool,
    log_relay: bool,
    refresh: Duration,
    tenants: std::collections::BTreeMap<String, DatabaseConnection>,
}

impl<A> AdminBuilder<A> {
    /// Serves `db` too, as tenant `id`: every route takes `?tenant=ID` to act on that
    /// database instead of the one the router was built with (a relay group's tenants, one
    /// dashboard). `GET /api/tenants` lists the ids; the dashboard shows a selector.
    #[must_use]
    pub fn tenant(mut self, id: impl Into<String>, db: DatabaseConnection) -> Self {
        self.tenants.insert(id.into(), db);
        self
    }

    /// The thresholds behind the health colour and `/health`. Default
    /// [`HealthThresholds::default`].
    #[must_use]
    pub fn thresholds(mut self, thresholds: HealthThresholds) -> Self {
        self.thresholds = thresholds;
        self
    }

    /// Relays whose last heartbeat is older than this are not shown. Default 60 s.
    #[must_use]
    pub fn relays_within(mut self, within: Duration) -> Self {
        self.relays_within = within;
        self
    }

    /// Whether to serve the inbox's dead letters (`inbox_dead_letters` must exist). Default
    /// on; turn it off in a producer that ran only the outbox's migrations.
    #[must_use]
    pub fn inbox(mut self, on: bool) -> Self {
        self.inbox = on;
        self
    }

    /// Whether to serve the log relay's slots and dead letters. Default on; it takes effect
    /// only with the `log-relay` feature on a PostgreSQL database.
    #[must_use]
    pub fn log_relay(mut self, on: bool) -> Self {
        self.log_relay = on;
        self
    }

    /// How often the dashboard refreshes itself. Default 5 s.
    #[must_use]
    pub fn refresh_interval(mut self, every: Duration) -> Self {
        self.refresh = every;
        self
    }

    fn with_gate(self, gate: Gate) -> AdminBuilder<WithAuth> {
        AdminBuilder {
            db: self.db,
            auth: WithAuth(gate),
            thresholds: self.thresholds,
            relays_within: self.relays_within,
            inbox: self.inbox,
            log_relay: self.log_relay,
            refresh: self.refresh,
            tenants: self.tenants,
        }
    }
}

impl AdminBuilder<NoAuth> {
    /// Every `/api` request is let in as the [`Principal`] this returns, or refused (401).
    pub fn authorizer(self, authorizer: impl Authorizer) -> AdminBuilder<WithAuth> {
        self.with_gate(Gate::Authorizer(Arc::new(authorizer)))
    }

    /// No authorizer: serves only clients on a loopback address that connected directly (no
    /// `Forwarded`/`X-Forwarded-For` header, a loopback `Host`), each as a writer. Serve the
    /// app with `into_make_service_with_connect_info::<SocketAddr>()`, or every request is
    /// refused.
    pub fn allow_unauthenticated(self) -> AdminBuilder<WithAuth> {
        self.with_gate(Gate::LoopbackOnly)
    }
}

/// The four routes of one kind of dead letter under `at`.
fn dead_letter_routes<K: dead_letters::Kind>(
    api: Router<Arc<AdminState>>,
    at: &str,
) -> Router<Arc<AdminState>> {
    api.route(at, get(dead_letters::list::<K>))
        .route(
            &format!("{at}/replay"),
            post(dead_letters::replay_many::<K>),
        )
        .route(
            &format!("{at}/{{id}}/replay"),
            post(dead_letters::replay_one::<K>),
        )
        .route(&format!("{at}/{{id}}"), delete(dead_letters::discard::<K>))
}

impl AdminBuilder<WithAuth> {
    /// The router, to [`nest`](Router::nest) under a prefix.
    pub fn build(self) -> Router {
        let postgres = self.db.get_database_backend() == sea_orm::DbBackend::Postgres;
        let state = Arc::new(AdminState {
            db: self.db,
            gate: self.auth.0,
            thresholds: self.thresholds,
            relays_within: self.relays_within,
            inbox: self.inbox,
            log_relay: self.log_relay && cfg!(feature = "log-relay") && postgres,
            refresh: self.refresh,
            tenants: self.tenants,
        });
        let mut api = Router::new()
            .route("/stats", get(api::stats))
            .route("/history", get(api::history))
            .route("/events", get(api::events))
            .route("/events/{id}", get(api::event))
            .route("/scheduled/{id}", delete(api::cancel_scheduled))
            .route("/purge", post(api::purge))
            .route("/tenants", get(tenants::list));
        api = dead_letter_routes::<dead_letters::Outbox>(api, "/dead-letters");
        if state.inbox {
            api = dead_letter_routes::<dead_letters::Inbox>(api, "/inbox/dead-letters");
        }
        #[cfg(feature = "log-relay")]
        if state.log_relay {
            api = dead_letter_routes::<dead_letters::Log>(api, "/log/dead-letters");
        }
        // Layers run last-added first: the caller is authorized before the tenant is looked up.
        let api = api
            .route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                tenants::select,
            ))
            .route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                auth::authorize,
            ))
            .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() });
        Router::new()
            .route("/", get(dashboard::page))
            .route("/health", get(api::health))
            .nest("/api", api)
            .fallback(|| async { ApiError::not_found("no such admin route") })
            .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(state)
    }
}
