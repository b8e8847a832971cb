//! Test support: an isolated, migrated outbox database on each real backend.
//!
//! * SQLite: in memory, or a file in a fresh temporary directory.
//! * PostgreSQL: a fresh schema in `OUTBOX_TEST_POSTGRES_URL`
//!   (default `postgres://postgres@127.0.0.1:5432/test`).
//! * MariaDB/MySQL: a fresh database on `OUTBOX_TEST_MYSQL_URL`
//!   (default `mysql://root@127.0.0.1:3306/test`).
//!
//! A server that cannot be reached fails the test with a message naming it; nothing is skipped.
#![allow(dead_code, unreachable_pub, missing_docs)]

pub mod pg_server;
pub mod proxy;

use std::time::Duration;

use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend};
use sea_orm_migration::MigratorTrait;
use seaorm_outbox_migration::Migrator;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    SqliteMemory,
    SqliteFile,
    Postgres,
    MySql,
}

pub fn postgres_url() -> String {
    std::env::var("OUTBOX_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub fn mysql_url() -> String {
    std::env::var("OUTBOX_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

/// An isolated, migrated database. Call [`TestDb::cleanup`] at the end of a passing test.
pub struct TestDb {
    pub backend: Backend,
    pub db: DatabaseConnection,
    /// The schema (PostgreSQL) or database (MySQL) created for this test.
    pub name: String,
    url: String,
    _dir: Option<tempfile::TempDir>,
    /// SQLite in memory: a connection of the pool's own, held idle, so the shared-cache database
    /// outlives the pool's working connection when sqlx closes it (as it does after a query
    /// cancelled halfway, e.g. a consumer's background task stopped) and opens another.
    _keeper: Option<Box<dyn std::any::Any + Send + Sync>>,
}

fn unique_name() -> String {
    format!("outbox_t_{}", uuid::Uuid::now_v7().simple())
}

async fn connect(what: &str, opts: ConnectOptions) -> DatabaseConnection {
    let url = opts.get_url().to_owned();
    Database::connect(opts).await.unwrap_or_else(|e| {
        panic!("{what} at {url} is not reachable; start it or set its OUTBOX_TEST_* URL: {e}")
    })
}

/// Replaces the database path of a `mysql://…/db` URL.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    format!("{base}/{db}{query}")
}

impl TestDb {
    pub async fn new(backend: Backend) -> Self {
        let t = Self::empty(backend).await;
        Migrator::up(&t.db, None).await.expect("migrations apply");
        t
    }

    /// An isolated database without the outbox migrations applied.
    pub async fn empty(backend: Backend) -> Self {
        let name = unique_name();
        match backend {
            Backend::SqliteMemory => {
                let url = "sqlite::memory:".to_owned();
                // One working connection and a keeper: shared-cache connections lock each
                // other's tables (SQLITE_LOCKED), so the tests get one, as an app would.
                let mut opts = ConnectOptions::new(&url);
                opts.max_connections(2)
                    .min_connections(2)
                    .idle_timeout(None::<Duration>)
                    .max_lifetime(None::<Duration>)
                    .sqlx_logging(false);
                let db = connect("SQLite", opts).await;
                let keeper = db
                    .get_sqlite_connection_pool()
                    .acquire()
                    .await
                    .expect("keeper connection");
                Self {
                    backend,
                    db,
                    name,
                    url,
                    _dir: None,
                    _keeper: Some(Box::new(keeper)),
                }
            }
            Backend::SqliteFile => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!(
                    "sqlite://{}?mode=rwc",
                    dir.path().join("outbox.db").display()
                );
                let db = open(backend, &url, &name).await;
                Self {
                    backend,
                    db,
                    name,
                    url,
                    _dir: Some(dir),
                    _keeper: None,
                }
            }
            Backend::Postgres => Self::empty_postgres_at(&postgres_url()).await,
            Backend::MySql => {
                let admin_url = mysql_url();
                let admin = connect("MariaDB/MySQL", quiet(ConnectOptions::new(&admin_url))).await;
                admin
                    .execute_unprepared(&format!("CREATE DATABASE `{name}`"))
                    .await
                    .expect("create test database");
                admin.close().await.ok();
                let url = with_database(&admin_url, &name);
                Self::on_server(backend, url, name).await
            }
        }
    }

    /// A fresh schema, migrated, on the PostgreSQL server at `url`.
    pub async fn new_postgres_at(url: &str) -> Self {
        let t = Self::empty_postgres_at(url).await;
        Migrator::up(&t.db, None).await.expect("migrations apply");
        t
    }

    async fn empty_postgres_at(url: &str) -> Self {
        let (backend, name, url) = (Backend::Postgres, unique_name(), url.to_owned());
        let admin = connect("PostgreSQL", quiet(ConnectOptions::new(&url))).await;
        admin
            .execute_unprepared(&format!("CREATE SCHEMA \"{name}\""))
            .await
            .expect("create test schema");
        admin.close().await.ok();
        Self::on_server(backend, url, name).await
    }

    /// Opens the isolated database `name` (a schema or database) just created on a server.
    async fn on_server(backend: Backend, url: String, name: String) -> Self {
        let db = open(backend, &url, &name).await;
        Self {
            backend,
            db,
            name,
            url,
            _dir: None,
            _keeper: None,
        }
    }

    /// Another pool on the same isolated database (SQLite memory: the same pool).
    pub async fn connect_again(&self) -> DatabaseConnection {
        match self.backend {
            Backend::SqliteMemory => self.db.clone(),
            other => open(other, &self.url, &self.name).await,
        }
    }

    /// The server's `host:port` (PostgreSQL and MySQL).
    pub fn server_addr(&self) -> String {
        let (_, rest) = self.url.split_once('@').expect("a URL with a user");
        rest.split(['/', '?']).next().expect("host:port").to_owned()
    }

    /// A pool on the same isolated database through `addr` (a proxy in front of the server).
    pub async fn connect_via(&self, addr: std::net::SocketAddr) -> DatabaseConnection {
        let url = self.url.replacen(&self.server_addr(), &addr.to_string(), 1);
        open(self.backend, &url, &self.name).await
    }

    /// Environment for a child process that should open the same database.
    pub fn child_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("OUTBOX_CHILD_BACKEND", format!("{:?}", self.backend)),
            ("OUTBOX_CHILD_URL", self.url.clone()),
            ("OUTBOX_CHILD_NAME", self.name.clone()),
        ]
    }

    /// Opens the database described by [`child_env`](Self::child_env) in a child process.
    pub async fn from_child_env() -> Option<DatabaseConnection> {
        let backend = std::env::var("OUTBOX_CHILD_BACKEND").ok()?;
        let url = std::env::var("OUTBOX_CHILD_URL").ok()?;
        let name = std::env::var("OUTBOX_CHILD_NAME").ok()?;
        let backend = match backend.as_str() {
            "SqliteFile" => Backend::SqliteFile,
            "Postgres" => Backend::Postgres,
            "MySql" => Backend::MySql,
            other => panic!("backend {other} cannot be shared with a child process"),
        };
        Some(open(backend, &url, &name).await)
    }

    pub fn db_backend(&self) -> DbBackend {
        self.db.get_database_backend()
    }

    /// Runs one statement written with `?` placeholders, numbered `$n` for PostgreSQL, so a
    /// test states its raw SQL once for every backend. Panics with `what` on failure.
    pub async fn exec(&self, what: &str, sql: &str, values: Vec<sea_orm::Value>) {
        let backend = self.db_backend();
        let sql = if backend == DbBackend::Postgres {
            let mut n = 0;
            sql.split('?')
                .enumerate()
                .map(|(i, part)| {
                    if i == 0 {
                        part.to_owned()
                    } else {
                        n += 1;
                        format!("${n}{part}")
                    }
                })
                .collect()
        } else {
            sql.to_owned()
        };
        self.db
            .execute_raw(sea_orm::Statement::from_sql_and_values(
                backend, sql, values,
            ))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }

    /// The first column of the first row of `sql`, an integer (a count, say).
    pub async fn scalar(&self, sql: &str) -> i64 {
        let row = self
            .db
            .query_one_raw(sea_orm::Statement::from_string(self.db_backend(), sql))
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .unwrap_or_else(|| panic!("{sql}: no row"));
        row.try_get_by_index::<i64>(0)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Drops the schema or database. Skipped when a test fails, which leaves it for inspection.
    pub async fn cleanup(self) {
        let Self {
            backend,
            db,
            name,
            _keeper,
            ..
        } = self;
        drop(_keeper); // returned to the pool, which close() waits for
        db.close().await.ok();
        match backend {
            Backend::Postgres => {
                let admin = connect("PostgreSQL", quiet(ConnectOptions::new(postgres_url()))).await;
                admin
                    .execute_unprepared(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))
                    .await
                    .expect("drop test schema");
                admin.close().await.ok();
            }
            Backend::MySql => {
                let admin = connect("MariaDB/MySQL", quiet(ConnectOptions::new(mysql_url()))).await;
                admin
                    .execute_unprepared(&format!("DROP DATABASE IF EXISTS `{name}`"))
                    .await
                    .expect("drop test database");
                admin.close().await.ok();
            }
            Backend::SqliteMemory | Backend::SqliteFile => {}
        }
    }
}

/// A pool on an existing isolated database: `name` is the PostgreSQL schema.
pub async fn open(backend: Backend, url: &str, name: &str) -> DatabaseConnection {
    match backend {
        Backend::SqliteMemory | Backend::SqliteFile => {
            connect("SQLite", sqlite_file_opts(url)).await
        }
        Backend::Postgres => {
            let mut opts = quiet(ConnectOptions::new(url));
            opts.set_schema_search_path(name.to_owned());
            connect("PostgreSQL", opts).await
        }
        Backend::MySql => connect("MariaDB/MySQL", quiet(ConnectOptions::new(url))).await,
    }
}

fn quiet(mut opts: ConnectOptions) -> ConnectOptions {
    opts.max_connections(8)
        .connect_timeout(Duration::from_secs(5))
        .sqlx_logging(false);
    opts
}

fn sqlite_file_opts(url: &str) -> ConnectOptions {
    let mut opts = quiet(ConnectOptions::new(url));
    opts.map_sqlx_sqlite_opts(|o| {
        o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(30))
    });
    opts
}

/// Runs one async test body per backend: `on_all_backends!(body_fn, …)` makes a module per body
/// with one `#[tokio::test]` per backend. Each body is `async fn(&TestDb)` on a migrated
/// database; `on_all_backends!(unmigrated: body_fn, …)` gives it an empty one.
#[macro_export]
macro_rules! on_all_backends {
    (unmigrated: $($body:ident),* $(,)?) => {
        $crate::on_backends!(@each empty [sqlite_memory: SqliteMemory, sqlite_file: SqliteFile, postgres: Postgres, mysql: MySql] => $($body),*);
    };
    ($($body:ident),* $(,)?) => {
        $crate::on_backends!(@each new [sqlite_memory: SqliteMemory, sqlite_file: SqliteFile, postgres: Postgres, mysql: MySql] => $($body),*);
    };
}

/// Like [`on_all_backends!`] for a chosen list: `on_backends!([postgres: Postgres] => body)`.
#[macro_export]
macro_rules! on_backends {
    ($backends:tt => $($body:ident),* $(,)?) => {
        $crate::on_backends!(@each new $backends => $($body),*);
    };
    (@each $ctor:ident $backends:tt => $($body:ident),* $(,)?) => {$(
        $crate::on_backends!(@one $ctor $backends $body);
    )*};
    (@one $ctor:ident [$($test:ident: $backend:ident),* $(,)?] $body:ident) => {
        mod $body {
            use super::common::{Backend, TestDb};
            async fn run(backend: Backend) {
                let t = TestDb::$ctor(backend).await;
                super::$body(&t).await;
                t.cleanup().await;
            }
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() { run(Backend::$backend).await }
            )*
        }
    };
}
