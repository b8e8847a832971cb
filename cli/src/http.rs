//! The relay process's HTTP endpoint, through axum: `/metrics` (Prometheus text), `/healthz`
//! (the relay's verdict as JSON, 503 when unhealthy) and the admin API and dashboard under
//! `/admin`. axum brings keep-alive, `HEAD`, 404/405 and body limits; hyper's connection
//! builder the header-read timeout.
//!
//! The admin router takes its tokens from the environment: `OUTBOX_ADMIN_TOKEN` (read and
//! write) and `OUTBOX_ADMIN_READ_TOKEN` (read only). With neither set it serves loopback
//! clients only.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Extension, Router};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use sea_orm::DatabaseConnection;
use seaorm_outbox::Health;
use seaorm_outbox::inbox::Inbox;
use seaorm_outbox_admin::{Admin, BearerTokens};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The environment variable holding the admin writer's token.
pub(crate) const ADMIN_TOKEN_ENV: &str = "OUTBOX_ADMIN_TOKEN";
/// The environment variable holding a read-only admin token.
pub(crate) const ADMIN_READ_TOKEN_ENV: &str = "OUTBOX_ADMIN_READ_TOKEN";

/// How the admin router lets callers in, for the start-up line.
pub(crate) fn admin_access() -> &'static str {
    if token(ADMIN_TOKEN_ENV).is_some() || token(ADMIN_READ_TOKEN_ENV).is_some() {
        "bearer token"
    } else {
        "loopback clients only (no OUTBOX_ADMIN_TOKEN)"
    }
}

fn token(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|t| !t.is_empty())
}

/// The admin router: tokens from the environment, or loopback only. The inbox's dead letters
/// are served when its table exists.
async fn admin(db: DatabaseConnection, thresholds: seaorm_outbox::HealthThresholds) -> Router {
    let inbox = Inbox::new(&db).count_dead_letters(None).await.is_ok();
    let builder = Admin::builder(db).thresholds(thresholds).inbox(inbox);
    match (token(ADMIN_TOKEN_ENV), token(ADMIN_READ_TOKEN_ENV)) {
        (None, None) => builder.allow_unauthenticated().build(),
        (write, read) => builder
            .authorizer(
                BearerTokens::new()
                    .writer("admin-token", write.unwrap_or_default())
                    .reader("read-token", read.unwrap_or_default()),
            )
            .build(),
    }
}

/// A `/healthz` answer: the HTTP status and the JSON body.
pub(crate) type Verdict = (u16, serde_json::Value);

/// One relay's health as a `/healthz` answer.
pub(crate) fn verdict(h: &Health) -> Verdict {
    (h.http_status(), serde_json::to_value(h).unwrap_or_default())
}

/// Serves `/metrics`, `/healthz` (from `health`) and, given a database, `/admin` on
/// `listener` until `stop` is cancelled.
pub(crate) async fn serve<F, Fut>(
    listener: tokio::net::TcpListener,
    stop: CancellationToken,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    admin_db: Option<DatabaseConnection>,
    thresholds: seaorm_outbox::HealthThresholds,
    health: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Verdict> + Send,
{
    let metrics = Arc::new(metrics);
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        metrics.render(),
                    )
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let health = health.clone();
                async move {
                    let (code, body) = health().await;
                    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
                    (status, axum::Json(body)).into_response()
                }
            }),
        );
    let app = match admin_db {
        Some(db) => app.nest("/admin", admin(db, thresholds).await),
        None => app,
    }
    .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") });
    tokio::spawn(accept(listener, stop, app))
}

/// A client must send its whole request head within this, or its connection is closed: an ops
/// port must not fill up with connections that never finish a request.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 256;

/// In-flight requests this long after `stop` are cut off.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The accept loop: hyper's HTTP/1.1 with a header-read timeout (axum's `serve` sets none), a
/// connection limit, each request given its peer address for the admin router's loopback
/// check, and a graceful stop.
async fn accept(listener: tokio::net::TcpListener, stop: CancellationToken, app: Router) {
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                // Out of file descriptors and the like: wait rather than spin.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let service = TowerToHyperService::new(app.clone().layer(Extension(ConnectInfo(peer))));
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await;
}
