//! `--tenants FILE`: many tenants' outboxes at once. Each line of the file names one tenant, as
//! `[ID] TARGET`: TARGET is a database URL (database per tenant) or a PostgreSQL schema of the
//! database `--database-url` names (schema per tenant); ID defaults to the schema name or the
//! URL without its password. Blank lines and lines starting with `#` are skipped.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use sea_orm::DatabaseConnection;
use seaorm_outbox::Outbox;
use seaorm_outbox::relay::{GroupConfig, RelayGroup};
use tokio_util::sync::CancellationToken;

use crate::relay::{self, Mode, RelayArgs};
use crate::{CliResult, Failure, http, redact};

/// Tenants read at once by `status` and `purge`.
const CONCURRENCY: usize = 8;

/// One line of a tenants file.
pub(crate) struct Tenant {
    pub(crate) id: String,
    target: Target,
}

enum Target {
    Url(String),
    Schema(String),
}

/// Reads `path`, keeping only `only` when given.
pub(crate) fn read(path: &str, only: Option<&str>) -> CliResult<Vec<Tenant>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::input(format!("cannot read --tenants {path}: {e}")))?;
    let mut tenants: Vec<Tenant> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (id, target) = match fields[..] {
            [target] => (None, target),
            [id, target] => (Some(id), target),
            _ => {
                return Err(Failure::input(format!(
                    "{path} line {}: expected `[ID] URL-or-SCHEMA`",
                    n + 1
                )));
            }
        };
        let target = if target.contains("://") {
            Target::Url(target.to_owned())
        } else {
            Target::Schema(target.to_owned())
        };
        let id = id.map_or_else(
            || match &target {
                Target::Url(u) => redact(u),
                Target::Schema(s) => s.clone(),
            },
            str::to_owned,
        );
        if tenants.iter().any(|t| t.id == id) {
            return Err(Failure::input(format!(
                "{path} line {}: tenant `{id}` named twice",
                n + 1
            )));
        }
        tenants.push(Tenant { id, target });
    }
    if let Some(only) = only {
        tenants.retain(|t| t.id == only);
        if tenants.is_empty() {
            return Err(Failure::input(format!("no tenant `{only}` in {path}")));
        }
    }
    if tenants.is_empty() {
        return Err(Failure::input(format!("{path} names no tenant")));
    }
    Ok(tenants)
}

/// The one tenant a command acts on.
pub(crate) fn one(tenants: Vec<Tenant>) -> CliResult<Tenant> {
    let n = tenants.len();
    let mut it = tenants.into_iter();
    match (it.next(), n) {
        (Some(t), 1) => Ok(t),
        _ => Err(Failure::input(format!(
            "this command acts on one tenant: pick it with --tenant ID (the file names {n})"
        ))),
    }
}

impl Tenant {
    /// Its PostgreSQL schema, for a schema tenant.
    fn schema(&self) -> Option<&str> {
        match &self.target {
            Target::Schema(s) => Some(s),
            Target::Url(_) => None,
        }
    }

    /// Its connection: its own URL, or `base` with its schema.
    pub(crate) async fn connect(&self, base: Option<&str>) -> CliResult<DatabaseConnection> {
        match &self.target {
            Target::Url(url) => crate::connect(Some(url), None).await,
            Target::Schema(schema) => {
                let base = base.ok_or_else(|| {
                    Failure::input(format!(
                        "tenant `{}` is a schema: pass --database-url for its database",
                        self.id
                    ))
                })?;
                crate::connect(Some(base), Some(schema)).await
            }
        }
    }
}

/// `status --tenants`: one row per tenant (or a JSON array); exit 1 if any could not be read.
pub(crate) async fn status(tenants: Vec<Tenant>, base: Option<&str>, json: bool) -> CliResult {
    let read: Vec<(String, Result<seaorm_outbox::OutboxStats, String>)> =
        futures_util::stream::iter(tenants)
            .map(|t| async move {
                let stats = match t.connect(base).await {
                    Ok(db) => {
                        let s = Outbox::new(&db).stats().await.map_err(|e| e.to_string());
                        db.close().await.ok();
                        s
                    }
                    Err(f) => Err(f.message),
                };
                (t.id, stats)
            })
            .buffered(CONCURRENCY)
            .collect()
            .await;
    let failed = read.iter().filter(|(_, s)| s.is_err()).count();
    if json {
        let rows: Vec<serde_json::Value> = read
            .iter()
            .map(|(id, s)| match s {
                Ok(s) => {
                    let mut v = serde_json::to_value(s).unwrap_or_default();
                    v["tenant"] = id.clone().into();
                    v["pending"] = s.pending().into();
                    v["oldest_pending_age_seconds"] =
                        s.oldest_pending_age().map(|d| d.as_secs_f64()).into();
                    v
                }
                Err(e) => serde_json::json!({ "tenant": id, "error": e }),
            })
            .collect();
        out!("{}", serde_json::Value::Array(rows));
    } else {
        let width = read
            .iter()
            .map(|(id, _)| id.len())
            .max()
            .unwrap_or(6)
            .max(6);
        out!(
            "{:<width$}  {:>9}  {:>9}  {:>9}  {:>9}  {:>9}  {:>9}  OLDEST",
            "TENANT",
            "PENDING",
            "DUE",
            "BACKOFF",
            "LEASED",
            "SCHEDULED",
            "FAILED"
        );
        for (id, s) in &read {
            match s {
                Ok(s) => out!(
                    "{id:<width$}  {:>9}  {:>9}  {:>9}  {:>9}  {:>9}  {:>9}  {}",
                    s.pending(),
                    s.pending_due,
                    s.pending_backoff,
                    s.pending_leased,
                    s.scheduled,
                    s.failed,
                    s.oldest_pending_age().map_or_else(
                        || "-".to_owned(),
                        |d| humantime::format_duration(Duration::from_secs(d.as_secs()))
                            .to_string()
                    )
                ),
                Err(e) => out!("{id:<width$}  error: {}", e.replace('\n', " ")),
            }
        }
    }
    match failed {
        0 => Ok(()),
        n => Err(Failure::from(format!(
            "{n} of {} tenants could not be read",
            read.len()
        ))),
    }
}

/// `purge --tenants`: each tenant in turn; exit 1 if any failed.
pub(crate) async fn purge(
    tenants: Vec<Tenant>,
    base: Option<&str>,
    age: Duration,
    batch: u64,
) -> CliResult {
    let cutoff = chrono::Utc::now()
        - chrono::Duration::from_std(age).map_err(|_| Failure::input("duration too large"))?;
    let mut failed = 0;
    for t in tenants {
        let result = async {
            let db = t.connect(base).await?;
            let outbox = Outbox::new(&db);
            let mut deleted = 0;
            loop {
                let n = outbox.purge_published_batch(cutoff, batch).await?;
                deleted += n;
                if n < batch {
                    break;
                }
            }
            CliResult::Ok(deleted)
        }
        .await;
        match result {
            Ok(n) => out!("{}: purged {n} published events", t.id),
            Err(f) => {
                failed += 1;
                out!("{}: error: {}", t.id, f.message.replace('\n', " "));
            }
        }
    }
    match failed {
        0 => Ok(()),
        n => Err(Failure::from(format!("{n} tenants could not be purged"))),
    }
}

/// `migrate … --tenants`: each tenant in turn, its report under its id (a schema is created
/// if missing); exit 1 if any failed. Running it again applies nothing twice.
pub(crate) async fn migrate(
    tenants: Vec<Tenant>,
    base: Option<&str>,
    cmd: crate::migrate::MigrateCommand,
) -> CliResult {
    if matches!(cmd, crate::migrate::MigrateCommand::Status { json: true }) && tenants.len() > 1 {
        return Err(Failure::input(
            "migrate status --json reads one tenant: pick it with --tenant ID",
        ));
    }
    let mut failed = 0;
    for t in &tenants {
        out!("tenant {}:", t.id);
        let result = async {
            let db = t.connect(base).await?;
            crate::migrate::run(&db, t.schema(), cmd.clone()).await
        }
        .await;
        if let Err(f) = result {
            failed += 1;
            out!("  error: {}", f.message.replace('\n', " "));
        }
    }
    match failed {
        0 => Ok(()),
        n => Err(Failure::from(format!(
            "{n} of {} tenants could not be migrated",
            tenants.len()
        ))),
    }
}

/// `relay --tenants`: one relay group over them all; `/healthz` reports each tenant.
pub(crate) async fn relay(tenants: Vec<Tenant>, base: Option<&str>, args: RelayArgs) -> CliResult {
    if args.mode == Mode::Log {
        return Err(Failure::input(
            "--tenants runs the polling relay; --mode log reads one database's log",
        ));
    }
    let thresholds = Arc::new(relay::thresholds(&args)?);
    let config = relay::poll_config(&args)?;
    let (listener, metrics) = relay::http_setup(&args).await?;
    let publisher = relay::publisher(&args).await?;
    let mut builder = RelayGroup::builder(publisher)
        .relay_config(config)
        .config(GroupConfig::default());
    if tenants
        .iter()
        .any(|t| matches!(t.target, Target::Schema(_)))
    {
        let base = base.ok_or_else(|| {
            Failure::input("schema tenants need --database-url for their database")
        })?;
        builder = builder.schemas(crate::connect(Some(base), None).await?);
    }
    let group = builder.build().map_err(|e| Failure::input(e.to_string()))?;
    let count = tenants.len();
    for t in tenants {
        match &t.target {
            // A tenant whose database is down at start is added anyway: the group checks it
            // until it answers.
            Target::Url(url) => {
                let db = crate::connect_lazy(url).await?;
                group.add_tenant(t.id, db).await?;
            }
            Target::Schema(schema) => {
                group.add_schema(t.id, schema).await?;
            }
        }
    }
    let stop = CancellationToken::new();
    let http_stop = CancellationToken::new();
    let server = http::serve(
        listener,
        http_stop.clone(),
        metrics,
        None,
        (*thresholds).clone(),
        {
            let group = group.clone();
            move || {
                let (group, thresholds) = (group.clone(), thresholds.clone());
                async move {
                    let h = group.health(&thresholds).await;
                    (
                        h.http_status(),
                        serde_json::to_value(&h).unwrap_or_default(),
                    )
                }
            }
        },
    )
    .await;
    tokio::spawn(relay::shutdown_on_signal(stop.clone()));
    eprintln!(
        "relay group over {count} tenants; /metrics and /healthz (per tenant) on http://{} (no /admin: the dashboard serves one database)",
        args.http_addr
    );
    let t = group.run(stop).await;
    http_stop.cancel();
    let _ = server.await;
    eprintln!(
        "relay group stopped: published={} retried={} dead_lettered={} released={}",
        t.published, t.retried, t.dead_lettered, t.released
    );
    Ok(())
}
