//! PostgreSQL schema-per-tenant: a tenant's pool made from the group's, and the scan that tells
//! which of many schemas have events due, in a few statements rather than a claim each.

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

/// A pool on `base`'s database whose connections write to `schema`: opened lazily, holding no
/// connection while idle for `idle`, at most `max` at once.
pub(crate) fn schema_pool(
    base: &PgPool,
    schema: &str,
    max: u32,
    idle: Duration,
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
        .connect_lazy_with(options);
    SqlxPostgresConnector::from_sqlx_postgres_pool(pool)
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
