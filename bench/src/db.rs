//! A fresh, migrated outbox database per backend, with fast seeding and raw SQL baselines.

use std::time::Duration;

use anyhow::{Context, Result};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement,
};
use sea_orm_migration::MigratorTrait;
use seaorm_outbox::{NewEvent, Outbox, OutboxRepository};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Postgres,
    MySql,
    Sqlite,
}

impl Kind {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Kind::Postgres => "PostgreSQL",
            Kind::MySql => "MariaDB",
            Kind::Sqlite => "SQLite",
        }
    }
}

/// Time-ordered ids for event `g` at time `t`, as `add_event` writes (UUIDv7): random v4 ids
/// would scatter the primary key's inserts over the whole index and overstate the cost of a
/// large table.
pub(crate) const UUID_V7: &str = "(lpad(to_hex((extract(epoch FROM t) * 1000)::bigint), 12, '0') \
    || '7' || substr(md5(g::text), 1, 3) || '8' || substr(md5(g::text), 4, 15))::uuid";

/// What a drain's backlog looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Workload {
    /// Spread over this many aggregates, each with a long backlog; ~100-byte payloads.
    Spread { aggregates: u64 },
    /// Every event its own aggregate (one order, one event), ~230-byte payloads: issue 16's.
    PerEvent,
}

impl Workload {
    pub(crate) fn label(self) -> String {
        match self {
            Workload::Spread { aggregates } => format!("{aggregates} aggregates"),
            Workload::PerEvent => "one event per aggregate, 230 B".to_owned(),
        }
    }

    /// The aggregate id of event `g`.
    fn aggregate(self, g: u64) -> String {
        match self {
            Workload::Spread { aggregates } => (g % aggregates.max(1)).to_string(),
            Workload::PerEvent => g.to_string(),
        }
    }

    /// The payload of event `g`; [`payload_sql`](Self::payload_sql) builds the same server-side.
    fn payload(self, g: u64) -> serde_json::Value {
        match self {
            Workload::Spread { .. } => serde_json::json!({ "n": g, "body": "x".repeat(64) }),
            Workload::PerEvent => serde_json::json!({
                "order_id": g,
                "customer_id": format!("c-{}", g % 9973),
                "total_cents": g % 100_000,
                "currency": "EUR",
                "note": "x".repeat(120),
            }),
        }
    }

    fn aggregate_sql(self) -> String {
        match self {
            Workload::Spread { aggregates } => format!("(g % {})::text", aggregates.max(1)),
            Workload::PerEvent => "g::text".to_owned(),
        }
    }

    fn payload_sql(self) -> &'static str {
        match self {
            Workload::Spread { .. } => "jsonb_build_object('n', g, 'body', repeat('x', 64))",
            Workload::PerEvent => {
                "jsonb_build_object('order_id', g, 'customer_id', 'c-' || (g % 9973), \
                 'total_cents', g % 100000, 'currency', 'EUR', 'note', repeat('x', 120))"
            }
        }
    }
}

pub(crate) struct BenchDb {
    pub(crate) kind: Kind,
    pub(crate) db: DatabaseConnection,
    url: String,
    name: String,
    _dir: Option<tempfile::TempDir>,
}

pub(crate) fn pg_url() -> String {
    std::env::var("OUTBOX_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn mysql_url() -> String {
    std::env::var("OUTBOX_BENCH_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

pub(crate) fn opts(url: &str, max: u32) -> ConnectOptions {
    let mut o = ConnectOptions::new(url);
    o.max_connections(max)
        .min_connections(1)
        .connect_timeout(Duration::from_secs(5))
        .sqlx_logging(false);
    o
}

impl BenchDb {
    pub(crate) async fn new(kind: Kind) -> Result<Self> {
        Self::new_at(kind, pg_url()).await
    }

    /// A fresh outbox; on PostgreSQL, on the server at `pg`.
    pub(crate) async fn new_at(kind: Kind, pg: String) -> Result<Self> {
        Self::create(kind, pg, format!("outbox_bench_{}", std::process::id())).await
    }

    /// A second fresh outbox of `kind`, beside the one [`new`](Self::new) makes.
    pub(crate) async fn new_second(kind: Kind) -> Result<Self> {
        Self::create(
            kind,
            pg_url(),
            format!("outbox_bench_{}_2", std::process::id()),
        )
        .await
    }

    async fn create(kind: Kind, pg: String, name: String) -> Result<Self> {
        let (db, url, dir) = match kind {
            Kind::Postgres => {
                let admin = Database::connect(opts(&pg, 1))
                    .await
                    .context("PostgreSQL")?;
                admin
                    .execute_unprepared(&format!(
                        "DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}"
                    ))
                    .await?;
                admin.close().await?;
                let mut o = opts(&pg, 20);
                o.set_schema_search_path(name.clone());
                (Database::connect(o).await?, pg, None)
            }
            Kind::MySql => {
                let admin = Database::connect(opts(&mysql_url(), 1))
                    .await
                    .context("MariaDB")?;
                admin
                    .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name}"))
                    .await?;
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await?;
                admin.close().await?;
                let base = mysql_url();
                let url = format!("{}/{name}", &base[..base.rfind('/').unwrap_or(base.len())]);
                (Database::connect(opts(&url, 20)).await?, url, None)
            }
            Kind::Sqlite => {
                let dir = tempfile::tempdir()?;
                let url = format!(
                    "sqlite://{}?mode=rwc",
                    dir.path().join("bench.db").display()
                );
                (
                    Database::connect(sqlite_opts(&url, 4)).await?,
                    url,
                    Some(dir),
                )
            }
        };
        seaorm_outbox_migration::Migrator::up(&db, None).await?;
        db.execute_unprepared(
            "CREATE TABLE bench_orders (id BIGINT NOT NULL PRIMARY KEY, total BIGINT NOT NULL)",
        )
        .await?;
        Ok(Self {
            kind,
            db,
            url,
            name,
            _dir: dir,
        })
    }

    /// A second handle on the same database (for sharing across tasks).
    pub(crate) async fn new_view(other: &BenchDb) -> Result<Self> {
        Ok(Self {
            kind: other.kind,
            db: other.pool(2).await?,
            url: other.url.clone(),
            name: other.name.clone(),
            _dir: None,
        })
    }

    /// Another pool on the same database.
    pub(crate) async fn pool(&self, max: u32) -> Result<DatabaseConnection> {
        Ok(match self.kind {
            Kind::Postgres => {
                let mut o = opts(&self.url, max);
                o.set_schema_search_path(self.name.clone());
                Database::connect(o).await?
            }
            Kind::MySql => Database::connect(opts(&self.url, max)).await?,
            Kind::Sqlite => Database::connect(sqlite_opts(&self.url, max)).await?,
        })
    }

    /// A PostgreSQL pool whose sessions have the insert trigger's NOTIFY switched off.
    pub(crate) async fn pool_without_notify(&self, max: u32) -> Result<DatabaseConnection> {
        let mut o = opts(&self.url, max);
        o.set_schema_search_path(self.name.clone());
        o.map_sqlx_postgres_opts(|p| p.options([("seaorm_outbox.notify", "off")]));
        Ok(Database::connect(o).await?)
    }

    pub(crate) fn backend(&self) -> DbBackend {
        self.db.get_database_backend()
    }

    pub(crate) async fn exec(&self, sql: &str) -> Result<()> {
        self.db.execute_unprepared(sql).await?;
        Ok(())
    }

    /// Empties the tables and refreshes planner statistics.
    pub(crate) async fn reset(&self) -> Result<()> {
        match self.kind {
            Kind::Sqlite => {
                self.exec("DELETE FROM outbox_events").await?;
                self.exec("DELETE FROM bench_orders").await?;
            }
            _ => {
                self.exec("TRUNCATE TABLE outbox_events").await?;
                self.exec("TRUNCATE TABLE bench_orders").await?;
            }
        }
        Ok(())
    }

    /// Seeds `n` pending events over `aggregates` aggregates with a ~100-byte payload.
    pub(crate) async fn seed_pending(&self, n: u64, aggregates: u64) -> Result<()> {
        self.seed(n, Workload::Spread { aggregates }, "pending")
            .await
    }

    /// Seeds `n` pending events of `workload`, then (PostgreSQL) `VACUUM ANALYZE` and
    /// `CHECKPOINT`, so every drain starts from the same clean table and no checkpoint of the
    /// seeding lands inside it.
    pub(crate) async fn seed_workload(&self, n: u64, workload: Workload) -> Result<()> {
        self.seed(n, workload, "pending").await?;
        self.settle("outbox_events").await
    }

    /// Seeds `n` events already published an hour ago.
    pub(crate) async fn seed_published(&self, n: u64) -> Result<()> {
        self.seed(n, Workload::Spread { aggregates: 1000 }, "published")
            .await
    }

    /// `VACUUM ANALYZE table` and a `CHECKPOINT` on PostgreSQL; `ANALYZE` elsewhere.
    async fn settle(&self, table: &str) -> Result<()> {
        match self.kind {
            Kind::Postgres => {
                self.exec(&format!("VACUUM ANALYZE {table}")).await?;
                self.exec("CHECKPOINT").await
            }
            Kind::MySql => self.exec(&format!("ANALYZE TABLE {table}")).await,
            Kind::Sqlite => self.exec("ANALYZE").await,
        }
    }

    /// The issue-16 minimal outbox (PostgreSQL only): `raw_outbox` with one partial index,
    /// emptied and seeded with the same `n` events as [`seed_workload`](Self::seed_workload).
    pub(crate) async fn seed_minimal(&self, n: u64, workload: Workload) -> Result<()> {
        self.create_minimal().await?;
        self.exec(&format!(
            "INSERT INTO raw_outbox (id, aggregate_type, aggregate_id, event_type, payload, occurred_at) \
             SELECT {UUID_V7}, 'agg', {agg}, 'bench.event', {payload}, t \
             FROM (SELECT g, now() - interval '2 hours' + g * interval '1 microsecond' AS t \
                   FROM generate_series(1, {n}) g) s",
            agg = workload.aggregate_sql(),
            payload = workload.payload_sql(),
        ))
        .await?;
        self.settle("raw_outbox").await
    }

    /// Creates the minimal outbox's empty `raw_outbox` table (PostgreSQL only).
    pub(crate) async fn create_minimal(&self) -> Result<()> {
        anyhow::ensure!(
            self.kind == Kind::Postgres,
            "the minimal outbox is PostgreSQL's"
        );
        self.exec(
            "CREATE TABLE IF NOT EXISTS raw_outbox (id uuid PRIMARY KEY, aggregate_type text, \
             aggregate_id text, event_type text, payload jsonb, occurred_at timestamptz, \
             published_at timestamptz NULL); \
             CREATE INDEX IF NOT EXISTS raw_outbox_pending ON raw_outbox (occurred_at) \
             WHERE published_at IS NULL; TRUNCATE raw_outbox",
        )
        .await
    }

    async fn seed(&self, n: u64, workload: Workload, status: &str) -> Result<()> {
        if self.kind == Kind::Postgres {
            // Server-side: a million rows in seconds.
            let published = if status == "published" { "t" } else { "NULL" };
            let chunk = 500_000;
            let mut from = 1;
            while from <= n {
                let to = (from + chunk - 1).min(n);
                self.exec(&format!(
                    "INSERT INTO outbox_events (id, event_type, aggregate_type, aggregate_id, payload, headers, \
                       occurred_at, created_at, status, attempts, next_attempt_at, published_at) \
                     SELECT {UUID_V7}, 'bench.event', 'agg', {agg}, \
                       {payload}, '{{\"correlation-id\": \"bench\"}}'::jsonb, \
                       t, t, '{status}', 0, t, {published} \
                     FROM (SELECT g, now() - interval '2 hours' + g * interval '1 microsecond' AS t \
                           FROM generate_series({from}, {to}) g) s",
                    agg = workload.aggregate_sql(),
                    payload = workload.payload_sql(),
                ))
                .await?;
                from = to + 1;
            }
            self.exec("ANALYZE outbox_events").await?;
            return Ok(());
        }
        let outbox = Outbox::new(&self.db);
        let mut i = 0;
        while i < n {
            let batch: Vec<NewEvent> = (i..(i + 1000).min(n))
                .map(|g| {
                    NewEvent::new("bench.event", "agg", workload.aggregate(g))
                        .json_payload(workload.payload(g))
                        .header("correlation-id", "bench")
                })
                .collect();
            let ids = outbox.add_events(batch).await?;
            if status == "published" {
                outbox.mark_published_many(&ids).await?;
            }
            i += 1000;
        }
        if self.kind == Kind::MySql {
            self.exec("ANALYZE TABLE outbox_events").await?;
        } else {
            self.exec("ANALYZE").await?;
        }
        Ok(())
    }

    pub(crate) async fn count_pending(&self) -> Result<u64> {
        Ok(Outbox::new(&self.db).count_unpublished().await?)
    }

    /// Pending events due by now: a range of the due index, so it stays cheap beside a
    /// million rows scheduled for later (which `count_pending` would read each time).
    pub(crate) async fn count_due(&self) -> Result<u64> {
        let row = self
            .db
            .query_one_raw(self.stmt(
                "SELECT COUNT(*) FROM outbox_events WHERE status = 'pending' \
                 AND next_attempt_at <= ?",
                vec![chrono::Utc::now().into()],
            ))
            .await?
            .context("no count row")?;
        Ok(u64::try_from(row.try_get_by_index::<i64>(0)?).unwrap_or(0))
    }

    pub(crate) async fn drop(self) -> Result<()> {
        self.db.close().await?;
        // For EXPLAIN afterwards: `OUTBOX_BENCH_KEEP=1` leaves the schema or database in place.
        if std::env::var_os("OUTBOX_BENCH_KEEP").is_some() {
            eprintln!("kept {}", self.name);
            return Ok(());
        }
        match self.kind {
            Kind::Postgres => {
                let admin = Database::connect(opts(&self.url, 1)).await?;
                admin
                    .execute_unprepared(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name))
                    .await?;
                admin.close().await?;
            }
            Kind::MySql => {
                let admin = Database::connect(opts(&mysql_url(), 1)).await?;
                admin
                    .execute_unprepared(&format!("DROP DATABASE IF EXISTS {}", self.name))
                    .await?;
                admin.close().await?;
            }
            Kind::Sqlite => {}
        }
        Ok(())
    }

    pub(crate) fn stmt(&self, sql: &str, values: Vec<sea_orm::Value>) -> Statement {
        let sql = if self.kind == Kind::Postgres {
            let mut out = String::new();
            let mut k = 0;
            for c in sql.chars() {
                if c == '?' {
                    k += 1;
                    out.push_str(&format!("${k}"));
                } else {
                    out.push(c);
                }
            }
            out
        } else {
            sql.to_owned()
        };
        Statement::from_sql_and_values(self.backend(), sql, values)
    }
}

fn sqlite_opts(url: &str, max: u32) -> ConnectOptions {
    let mut o = opts(url, max);
    // `OUTBOX_BENCH_SQLITE_CACHE_MB=N`: each connection's page cache (SQLite's default is 2 MB).
    let cache_mb: Option<u64> = std::env::var("OUTBOX_BENCH_SQLITE_CACHE_MB")
        .ok()
        .and_then(|v| v.parse().ok());
    o.map_sqlx_sqlite_opts(move |s| {
        let s = s
            .journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
            .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(30));
        match cache_mb {
            Some(mb) => s.pragma("cache_size", format!("-{}", mb * 1024)),
            None => s,
        }
    });
    o
}
