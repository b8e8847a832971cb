//! PostgreSQL schema-per-tenant: a tenant's pool made from the group's, and the scan that tells
//! which of many schemas have events due, in a few statements rather than a claim each.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::sqlx::postgres::{PgPool, PgPoolOptions};
use sea_orm::{DatabaseConnection, SqlxPostgresConnector};

/// Schemas per scan statement: keeps each statement's text and plan small.
const SCAN_CHUNK: usize = 250;

/// `name` as a quoted identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A pool on `base`'s database whose connections write to `schema`: opened lazily, at most
/// `max` at once, an unused one closed after `idle`, and every one closed as it comes back
/// while `parked` is set (see [`release_idle`]).
pub(crate) fn schema_pool(
    base: &PgPool,
    schema: &str,
    max: u32,
    idle: Duration,
    parked: Arc<AtomicBool>,
) -> DatabaseConnection {
    // The connection's name says whose it is, in `pg_stat_activity`.
    let name: String = format!("outbox/{schema}").chars().take(63).collect();
    let options = (*base.connect_options())
        .clone()
        .application_name(&name)
        .options([("search_path", ident(schema))]);
    let pool = PgPoolOptions::new()
        .max_connections(max)
        .min_connections(0)
        .idle_timeout(idle)
        .acquire_timeout(base.options().get_acquire_timeout())
        // A connection comes back to the pool after its statement, in a task of its own: one
        // that comes back once the tenant has parked is closed then.
        .after_release(move |_, _| {
            let keep = !parked.load(Ordering::Relaxed);
            Box::pin(std::future::ready(Ok(keep)))
        })
        .connect_lazy_with(options);
    SqlxPostgresConnector::from_sqlx_postgres_pool(pool)
}

/// Closes the idle connections of a schema tenant's pool (one [`schema_pool`] made), its
/// `parked` flag set so those still coming back are closed too: a tenant with nothing to do
/// holds none, so connections stay bounded by the tenants at work, not by the tenants the last
/// few seconds touched.
pub(crate) fn release_idle(db: &DatabaseConnection) {
    if let Some(pool) = super::pg_pool(db) {
        for _ in 0..pool.num_idle() {
            match pool.try_acquire() {
                Some(mut conn) => conn.close_on_drop(),
                None => break,
            }
        }
    }
}

/// Which of `schemas` hold a pending event due by `now` (indexes into `schemas`). Each test is
/// one probe of the outbox's partial due index. A schema without the table fails its chunk's
/// statement; its chunk is then tested schema by schema, and a schema that fails alone counts
/// as due, so its tenant's own batch reports the error.
#[tracing::instrument(level = "debug", skip_all, fields(schemas = schemas.len()), err(level = "debug"))]
pub(crate) async fn due(
    pool: &PgPool,
    schemas: &[String],
    now: DateTime<Utc>,
) -> Result<Vec<usize>, sea_orm::sqlx::Error> {
    let mut found = Vec::new();
    for (c, chunk) in schemas.chunks(SCAN_CHUNK).enumerate() {
        let at = |i: i32| usize::try_from(i).ok().map(|i| c * SCAN_CHUNK + i);
        match scan(pool, statement(chunk.iter().enumerate()), now).await {
            Ok(hits) => found.extend(hits.into_iter().filter_map(at)),
            Err(e) if chunk.len() == 1 || is_connection(&e) => return Err(e),
            Err(_) => {
                for (i, s) in chunk.iter().enumerate() {
                    let alone = statement(std::iter::once((i, s)));
                    if scan(pool, alone, now).await.map_or(true, |h| !h.is_empty()) {
                        found.push(c * SCAN_CHUNK + i);
                    }
                }
            }
        }
    }
    Ok(found)
}

/// One scan statement: each schema's test, selecting its index when it has an event due.
fn statement<'a>(schemas: impl Iterator<Item = (usize, &'a String)>) -> String {
    schemas
        .map(|(i, s)| {
            format!(
                "SELECT {i} WHERE EXISTS (SELECT 1 FROM {}.outbox_events \
                 WHERE status = 'pending' AND next_attempt_at <= $1)",
                ident(s)
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ")
}

async fn scan(
    pool: &PgPool,
    sql: String,
    now: DateTime<Utc>,
) -> Result<Vec<i32>, sea_orm::sqlx::Error> {
    // Safe: schema names are quoted identifiers, the rest is ours.
    sea_orm::sqlx::query_scalar(sea_orm::sqlx::AssertSqlSafe(sql))
        .bind(now)
        .fetch_all(pool)
        .await
}

/// The server could not be reached, as opposed to a statement it refused.
fn is_connection(e: &sea_orm::sqlx::Error) -> bool {
    !matches!(e, sea_orm::sqlx::Error::Database(_))
}
