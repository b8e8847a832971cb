//! Push wake-up: on PostgreSQL the relay LISTENs for the NOTIFY that the outbox insert trigger
//! sends on commit, so a committed event is picked up at once instead of at the next poll.
//!
//! The listener has a dedicated connection, reconnects with backoff when it drops, and wakes the
//! relay after every (re)connect, since notifications sent while disconnected are lost. Polling
//! continues underneath, so a missed notification only costs latency, never an event.

use std::sync::Arc;

use sea_orm::DatabaseConnection;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The channel the migration's trigger notifies on (`seaorm_outbox_migration::NOTIFY_CHANNEL`).
pub const NOTIFY_CHANNEL: &str = "seaorm_outbox";

/// Starts a listener that wakes `wake` for inserts into `db`'s own outbox table, if `db` is
/// PostgreSQL and the `postgres` feature is on.
pub(crate) fn spawn_listener(
    db: &DatabaseConnection,
    wake: Arc<Notify>,
    cancel: CancellationToken,
) -> Option<JoinHandle<()>> {
    // The trigger's payload is the table's schema; only our own schema's inserts concern us.
    let route: Route = Arc::new(move |heard: Option<&str>, own: &str| {
        if heard.is_none_or(|schema| schema == own) {
            wake.notify_one();
        }
    });
    spawn_router(db, route, cancel)
}

/// What a listener does with what it hears: `(Some(schema), own)` for a notification from
/// `schema`'s outbox table, `(None, own)` after a (re)connect, when anything may have been
/// missed; `own` is the listening connection's own schema.
pub(crate) type Route = Arc<dyn Fn(Option<&str>, &str) + Send + Sync>;

/// Starts a listener that hands what it hears to `route`, if `db` is PostgreSQL and the
/// `postgres` feature is on.
#[cfg(feature = "postgres")]
pub(crate) fn spawn_router(
    db: &DatabaseConnection,
    route: Route,
    cancel: CancellationToken,
) -> Option<JoinHandle<()>> {
    use sea_orm::DbBackend;
    use std::time::Duration;

    if db.get_database_backend() != DbBackend::Postgres {
        return None;
    }
    // A mock or proxy connection has no pool to listen on.
    let pool = crate::store::pg_pool(db)?.clone();
    Some(tokio::spawn(async move {
        const FIRST_RETRY: Duration = Duration::from_millis(100);
        let mut delay = FIRST_RETRY;
        let mut failed = false;
        loop {
            match listen(&pool, route.as_ref(), &cancel, failed).await {
                Ok(()) => return,
                Err(Lost { listened, error }) => {
                    if listened {
                        delay = FIRST_RETRY;
                    }
                    failed = true;
                    tracing::warn!(error = %error, "outbox LISTEN connection lost; reconnecting");
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }))
}

/// Why [`listen`] returned before its cancellation.
#[cfg(feature = "postgres")]
struct Lost {
    /// It was listening before it lost the connection (else it never got that far).
    listened: bool,
    error: String,
}

/// Listens until `cancel`, or until the connection is lost: reconnecting is left to the caller,
/// so it is seen and logged (sqlx's listener would reconnect silently, and a database restart
/// would leave no trace in the relay's log).
#[cfg(feature = "postgres")]
async fn listen(
    pool: &sea_orm::sqlx::PgPool,
    route: &(dyn Fn(Option<&str>, &str) + Send + Sync),
    cancel: &CancellationToken,
    after_failure: bool,
) -> Result<(), Lost> {
    use sea_orm::sqlx::postgres::PgListener;

    let not_yet = |e: sea_orm::sqlx::Error| Lost {
        listened: false,
        error: e.to_string(),
    };
    let schema = crate::store::pg_current_schema(pool)
        .await
        .map_err(not_yet)?;
    let mut listener = PgListener::connect_with(pool).await.map_err(not_yet)?;
    listener.listen(NOTIFY_CHANNEL).await.map_err(not_yet)?;
    if after_failure {
        // Said once, so an operator reading the warnings knows it is over.
        tracing::info!(%schema, "outbox LISTEN connection re-established");
    } else {
        tracing::debug!(%schema, "outbox relay listening for NOTIFY");
    }
    route(None, &schema);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            n = listener.try_recv() => match n {
                Ok(Some(n)) => route(Some(n.payload()), &schema),
                // Anything sent while it is down is lost, so look at the table now.
                Ok(None) => {
                    route(None, &schema);
                    return Err(Lost { listened: true, error: "connection closed".to_owned() });
                }
                Err(e) => {
                    route(None, &schema);
                    return Err(Lost { listened: true, error: e.to_string() });
                }
            },
        }
    }
}

/// Without the `postgres` feature there is nothing to listen with: polling only.
#[cfg(not(feature = "postgres"))]
pub(crate) fn spawn_router(
    _db: &DatabaseConnection,
    _route: Route,
    _cancel: CancellationToken,
) -> Option<JoinHandle<()>> {
    None
}
