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

/// Starts the listener if `db` is PostgreSQL and the `postgres` feature is on.
#[cfg(feature = "postgres")]
pub(crate) fn spawn_listener(
    db: &DatabaseConnection,
    wake: Arc<Notify>,
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
        let mut delay = Duration::from_millis(100);
        loop {
            match listen(&pool, &wake, &cancel).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox LISTEN connection failed; reconnecting")
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

#[cfg(feature = "postgres")]
async fn listen(
    pool: &sea_orm::sqlx::PgPool,
    wake: &Notify,
    cancel: &CancellationToken,
) -> Result<(), sea_orm::sqlx::Error> {
    use sea_orm::sqlx::postgres::PgListener;

    // The trigger's payload is the table's schema; only our own schema's inserts concern us.
    let schema = crate::store::pg_current_schema(pool).await?;
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(NOTIFY_CHANNEL).await?;
    tracing::debug!(%schema, "outbox relay listening for NOTIFY");
    wake.notify_one();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            n = listener.try_recv() => match n? {
                Some(n) if n.payload() == schema => wake.notify_one(),
                Some(_) => {}
                // The connection dropped; the next `try_recv` reconnects. Anything sent in
                // between is lost, so look at the table now.
                None => wake.notify_one(),
            },
        }
    }
}

/// Without the `postgres` feature there is nothing to listen with: polling only.
#[cfg(not(feature = "postgres"))]
pub(crate) fn spawn_listener(
    _db: &DatabaseConnection,
    _wake: Arc<Notify>,
    _cancel: CancellationToken,
) -> Option<JoinHandle<()>> {
    None
}
