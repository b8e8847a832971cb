//! `seaorm-outbox`: look after an outbox from the command line, and run the relay as a process.
//!
//! ```text
//! seaorm-outbox status [--json]
//! seaorm-outbox failed list | show ID | replay (ID | --all | --aggregate TYPE:ID) | discard ID
//! seaorm-outbox purge --published-older-than 7d
//! seaorm-outbox relay --publisher stdout|kafka|nats|rabbitmq|redis [--http-addr 127.0.0.1:9751]
//! seaorm-outbox relay --mode log …   (PostgreSQL: read the write-ahead log)
//! seaorm-outbox log failed list | replay (ID | --all) | discard ID
//! seaorm-outbox log slot drop SLOT [--wait 30s]
//! seaorm-outbox migrate up [-n N] | down [-n N] | status [--json]
//! ```
//!
//! The database comes from `--database-url` or `OUTBOX_DATABASE_URL` (and `--schema`); with
//! `--tenants FILE`, `status`, `failed`, `purge`, `relay` and `migrate` act on many tenants, each a URL or a
//! schema (see `tenants`), `--tenant ID` picking one. Every failure is one line
//! on stderr and a non-zero exit: 1 for a runtime failure, 2 for bad input.

/// `println!` for what a command prints: when its reader has gone (`seaorm-outbox … | head`)
/// the command ends quietly with success, as Unix tools do, instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            $crate::stdout_failed(&e);
        }
    }};
}

mod commands;
mod dead_letters;
mod http;
mod inbox;
mod log;
mod logging;
mod migrate;
mod relay;
mod tenants;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use sea_orm::{ConnectOptions, Database, DatabaseConnection};

/// The default address of the relay's `/metrics` and `/healthz`.
pub(crate) const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:9751";

#[derive(Parser)]
#[command(
    name = "seaorm-outbox",
    version,
    about = "Operate a seaorm-outbox table: status, dead letters, purge, relay"
)]
struct Cli {
    /// Database URL, e.g. postgres://user@host/db, mysql://root@host/db, sqlite://outbox.db
    #[arg(
        long,
        env = "OUTBOX_DATABASE_URL",
        global = true,
        hide_env_values = true
    )]
    database_url: Option<String>,
    /// PostgreSQL schema holding the outbox table.
    #[arg(long, env = "OUTBOX_DATABASE_SCHEMA", global = true)]
    schema: Option<String>,
    /// Many tenants: a file with one `[ID] URL-or-SCHEMA` per line (a schema is of the
    /// database --database-url names). For status, failed, purge, relay and migrate.
    #[arg(
        long,
        env = "OUTBOX_TENANTS_FILE",
        global = true,
        value_name = "FILE",
        conflicts_with = "schema"
    )]
    tenants: Option<String>,
    /// With --tenants: act on this tenant only.
    #[arg(long, global = true, value_name = "ID", requires = "tenants")]
    tenant: Option<String>,
    /// Log filter on stderr: warn, info, debug, or directives like info,seaorm_outbox=debug
    /// (RUST_LOG wins). Default: info for `relay`, warn otherwise.
    #[arg(long, env = "OUTBOX_LOG_LEVEL", global = true, value_name = "FILTER")]
    log_level: Option<String>,
    /// Log line format on stderr.
    #[arg(
        long,
        env = "OUTBOX_LOG_FORMAT",
        global = true,
        value_enum,
        default_value_t
    )]
    log_format: logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Backlog, lag and dead letters.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Inspect, replay or discard dead letters.
    #[command(subcommand)]
    Failed(commands::Failed),
    /// Delete published events older than a duration, in bounded batches.
    Purge {
        /// e.g. 7d, 12h, 30m.
        #[arg(long, value_name = "DURATION")]
        published_older_than: String,
        /// Rows per DELETE statement.
        #[arg(long, default_value = "1000", value_name = "N")]
        batch_size: String,
    },
    /// Run the relay until SIGINT or SIGTERM; serve /metrics and /healthz.
    Relay(Box<relay::RelayArgs>),
    /// The consumer side: inbox counts, dead letters and retention.
    #[command(subcommand)]
    Inbox(inbox::InboxCommand),
    /// The log relay (PostgreSQL): its dead letters and its slots.
    #[command(subcommand)]
    Log(log::LogCommand),
    /// Create, upgrade or roll back the library's tables (recorded in
    /// seaorm_outbox_migrations).
    #[command(subcommand)]
    Migrate(migrate::MigrateCommand),
}

/// A failure to report: a message and an exit code.
pub(crate) struct Failure {
    pub(crate) message: String,
    pub(crate) code: u8,
}

impl Failure {
    /// Bad input: exit 2.
    pub(crate) fn input(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: 2,
        }
    }
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Self {
            message: e.to_string(),
            code: 1,
        }
    }
}

pub(crate) type CliResult<T = ()> = Result<T, Failure>;

/// Standard output failed: a closed pipe ends the process with success, anything else with a
/// one-line error.
pub(crate) fn stdout_failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("error: cannot write to standard output: {e}");
    std::process::exit(1);
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                use std::io::Write as _;
                if let Err(w) = write!(std::io::stdout(), "{e}") {
                    stdout_failed(&w);
                }
                return ExitCode::SUCCESS;
            }
            // clap's own message, folded onto one line (its usage hint follows a blank line).
            let msg = e.to_string();
            let first: Vec<&str> = msg
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            eprintln!("{}", first.join(" "));
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            let one_line = f.message.replace('\n', " ");
            eprintln!("error: {one_line}");
            ExitCode::from(f.code)
        }
    }
}

async fn run(cli: Cli) -> CliResult {
    let runs = matches!(cli.command, Command::Relay(_));
    logging::init(
        cli.log_level.as_deref(),
        cli.log_format,
        if runs { "info" } else { "warn" },
    )?;
    let base = cli.database_url.as_deref();
    if let Some(file) = &cli.tenants {
        let tenants = tenants::read(file, cli.tenant.as_deref())?;
        return match cli.command {
            Command::Status { json } => tenants::status(tenants, base, json).await,
            Command::Failed(cmd) => {
                let db = tenants::one(tenants)?.connect(base).await?;
                commands::failed(&db, cmd).await
            }
            Command::Purge {
                published_older_than,
                batch_size,
            } => {
                let age = parse_duration("--published-older-than", &published_older_than)?;
                let batch = parse_count("--batch-size", &batch_size)?;
                tenants::purge(tenants, base, age, batch).await
            }
            Command::Relay(args) => tenants::relay(tenants, base, *args).await,
            Command::Migrate(cmd) => tenants::migrate(tenants, base, cmd).await,
            Command::Inbox(_) | Command::Log(_) => Err(Failure::input(
                "--tenants applies to status, failed, purge, relay and migrate",
            )),
        };
    }
    let db = || connect(cli.database_url.as_deref(), cli.schema.as_deref());
    match cli.command {
        Command::Status { json } => commands::status(&db().await?, json).await,
        Command::Failed(cmd) => commands::failed(&db().await?, cmd).await,
        Command::Purge {
            published_older_than,
            batch_size,
        } => {
            let age = parse_duration("--published-older-than", &published_older_than)?;
            let batch = parse_count("--batch-size", &batch_size)?;
            commands::purge(&db().await?, age, batch).await
        }
        Command::Relay(args) => relay::run(db().await?, cli.database_url.clone(), *args).await,
        Command::Inbox(cmd) => inbox::run(&db().await?, cmd).await,
        Command::Log(cmd) => log::run(&db().await?, cmd).await,
        Command::Migrate(cmd) => migrate::run(&db().await?, cli.schema.as_deref(), cmd).await,
    }
}

async fn connect(url: Option<&str>, schema: Option<&str>) -> CliResult<DatabaseConnection> {
    let url = url.ok_or_else(|| {
        Failure::input("no database: pass --database-url or set OUTBOX_DATABASE_URL")
    })?;
    let mut opts = options(url)?;
    if let Some(schema) = schema {
        opts.set_schema_search_path(schema);
    }
    Database::connect(opts)
        .await
        .map_err(|e| Failure::from(format!("cannot connect to {}: {e}", redact(url))))
}

/// A pool that connects on first use, so a database that is down at start is no failure.
async fn connect_lazy(url: &str) -> CliResult<DatabaseConnection> {
    let mut opts = options(url)?;
    opts.connect_lazy(true);
    Database::connect(opts)
        .await
        .map_err(|e| Failure::from(format!("cannot connect to {}: {e}", redact(url))))
}

fn options(url: &str) -> CliResult<ConnectOptions> {
    let scheme = url.split("://").next().unwrap_or_default();
    if !url.contains(':')
        || !["postgres", "postgresql", "mysql", "mariadb", "sqlite"].contains(&scheme)
    {
        return Err(Failure::input(format!(
            "malformed database URL `{}`: expected postgres://, mysql:// or sqlite://",
            redact(url)
        )));
    }
    let mut opts = ConnectOptions::new(url);
    opts.connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(10))
        .sqlx_logging(false);
    Ok(opts)
}

/// The URL without its password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{}:***{}", &url[..s + 3], user, &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

pub(crate) fn parse_duration(flag: &str, value: &str) -> CliResult<Duration> {
    humantime::parse_duration(value).map_err(|e| {
        Failure::input(format!(
            "invalid duration `{value}` for {flag}: {e} (try 7d, 12h, 30m)"
        ))
    })
}

pub(crate) fn parse_count(flag: &str, value: &str) -> CliResult<u64> {
    match value.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(Failure::input(format!(
            "invalid number `{value}` for {flag}: expected a positive integer"
        ))),
    }
}

/// A page offset: any non-negative integer.
pub(crate) fn parse_offset(value: &str) -> CliResult<u64> {
    value
        .parse()
        .map_err(|_| Failure::input(format!("invalid number `{value}` for --offset")))
}

pub(crate) fn parse_id(value: &str) -> CliResult<uuid::Uuid> {
    value
        .parse()
        .map_err(|_| Failure::input(format!("invalid event id `{value}`: expected a UUID")))
}
