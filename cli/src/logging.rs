//! The process's log: the library's own warnings (a cycle failing while the database restarts,
//! the breaker opening, a lost lease) and the binary's, on stderr, as text or JSON lines.

use std::str::FromStr;

use clap::ValueEnum;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::{CliResult, Failure};

/// How each log line is written.
#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Installs the subscriber. `RUST_LOG` (directives such as `info,seaorm_outbox=debug`) wins over
/// `level`; without either, `default` (`info` for processes that run, `warn` for one-shot
/// commands, whose stdout is their answer).
pub(crate) fn init(level: Option<&str>, format: LogFormat, default: &str) -> CliResult {
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty());
    let (directives, flag) = match (from_env, level) {
        (Some(env), _) => (env, "RUST_LOG"),
        (None, Some(level)) => (level.to_owned(), "--log-level"),
        (None, None) => (default.to_owned(), "the default"),
    };
    let filter = Targets::from_str(&directives).map_err(|e| {
        Failure::input(format!(
            "invalid log filter `{directives}` in {flag}: {e} (try warn, info, debug or \
             info,seaorm_outbox=debug)"
        ))
    })?;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Text => registry.with(fmt).try_init(),
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).try_init(),
    };
    installed.map_err(|e| Failure::from(format!("cannot install the log subscriber: {e}")))
}
