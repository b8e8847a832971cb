//! `relay`: the relay as a process, with graceful shutdown on SIGINT/SIGTERM and an HTTP
//! endpoint for Prometheus and health probes.

use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use sea_orm::DatabaseConnection;
use seaorm_outbox::broker::{PublisherKind as BrokerKind, PublisherSpec};
use seaorm_outbox::relay::wal::{LogRelay, LogRelayConfig, Transport};
use seaorm_outbox::relay::{AnyRelay, OnPublish, Ordering, Relay, RelayConfig};
use seaorm_outbox::{HealthThresholds, Publisher};
use tokio_util::sync::CancellationToken;

use crate::http;
use crate::{CliResult, DEFAULT_HTTP_ADDR, Failure, parse_count, parse_duration};

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum PublisherKind {
    Stdout,
    Kafka,
    Nats,
    Rabbitmq,
    Redis,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Mode {
    /// Claim events from the outbox table.
    Poll,
    /// PostgreSQL: read events from the write-ahead log through a logical replication slot.
    Log,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum TransportKind {
    Stream,
    Sql,
}

#[derive(Args)]
pub(crate) struct RelayArgs {
    /// How events are found: polled from the table, or read from PostgreSQL's WAL.
    #[arg(long, value_enum, default_value = "poll")]
    pub(crate) mode: Mode,
    /// --mode log: the replication slot (created when missing).
    #[arg(long, default_value = "seaorm_outbox")]
    slot: String,
    /// --mode log: the publication (created when missing).
    #[arg(long, default_value = "seaorm_outbox")]
    publication: String,
    /// --mode log: also deliver rows inserted into outbox_events (table mode), not only
    /// messages written by Outbox::emit.
    #[arg(long)]
    table_mode: bool,
    /// --mode log: the prefix of the messages Outbox::emit writes (OutboxConfig::message_prefix).
    #[arg(long, default_value = seaorm_outbox::repository::MESSAGE_PREFIX)]
    message_prefix: String,
    /// --mode log: read the slot over the replication protocol (stream), or by polling SQL
    /// functions on an ordinary connection (sql: for poolers that pass no replication
    /// connection; slower).
    #[arg(long, value_enum, default_value = "stream")]
    transport: TransportKind,
    /// --mode log: records per read of the slot; bounds what a crash can send twice.
    #[arg(long, default_value = "10000")]
    max_changes: String,
    /// Where events go.
    #[arg(long, value_enum)]
    publisher: PublisherKind,
    /// Broker address: Kafka bootstrap servers, nats://, amqp:// or redis:// URL.
    #[arg(long, env = "OUTBOX_BROKER_URL", hide_env_values = true)]
    broker_url: Option<String>,
    /// Destination = this prefix + the aggregate type (topic, subject, routing key, stream key).
    #[arg(long, default_value = "")]
    route_prefix: String,
    /// Send every event to this one destination instead.
    #[arg(long, conflicts_with = "route_prefix")]
    destination: Option<String>,
    /// RabbitMQ exchange (default: the default exchange).
    #[arg(long, default_value = "")]
    exchange: String,
    /// Where /metrics, /healthz and the admin dashboard (/admin) are served.
    #[arg(long, env = "OUTBOX_HTTP_ADDR", default_value = DEFAULT_HTTP_ADDR)]
    pub(crate) http_addr: String,
    #[arg(long, default_value = "100")]
    batch_size: String,
    #[arg(long, default_value = "10")]
    max_attempts: String,
    #[arg(long, default_value = "1s")]
    poll_interval: String,
    /// Delete published events older than this (e.g. 7d). Default: keep.
    #[arg(long)]
    retention: Option<String>,
    /// Do not keep per-aggregate order.
    #[arg(long)]
    unordered: bool,
    /// Delete each event's row once the broker acknowledged it, instead of marking it
    /// published (faster; published events can no longer be looked up).
    #[arg(long)]
    delete_on_publish: bool,
    /// Do not LISTEN for NOTIFY (PgBouncer in transaction pooling mode).
    #[arg(long)]
    no_listen: bool,
    /// /healthz: degraded above this many pending events.
    #[arg(long, default_value = "10000")]
    health_max_backlog: String,
    /// /healthz: degraded when the oldest pending event is older than this.
    #[arg(long, default_value = "5m")]
    health_max_age: String,
    /// /healthz: degraded above this many dead letters.
    #[arg(long, default_value = "0")]
    health_max_dead_letters: String,
    /// /healthz: unhealthy (503) when the relay loop has not polled for this long.
    #[arg(long, default_value = "60s")]
    health_max_poll_gap: String,
    /// /healthz: unhealthy (503) once the broker has been unavailable this long (degraded
    /// before that).
    #[arg(long, default_value = "5m")]
    health_max_broker_outage: String,
}

pub(crate) async fn publisher(args: &RelayArgs) -> CliResult<Arc<dyn Publisher>> {
    let kind = match args.publisher {
        PublisherKind::Stdout => BrokerKind::Stdout,
        PublisherKind::Kafka => BrokerKind::Kafka,
        PublisherKind::Nats => BrokerKind::Nats,
        PublisherKind::Rabbitmq => BrokerKind::Rabbitmq,
        PublisherKind::Redis => BrokerKind::Redis,
    };
    if kind != BrokerKind::Stdout && args.broker_url.is_none() {
        return Err(Failure::input(format!(
            "--publisher {} needs --broker-url (or OUTBOX_BROKER_URL)",
            kind.name()
        )));
    }
    let spec = PublisherSpec::default()
        .kind(kind)
        .url(args.broker_url.clone())
        .destination(args.destination.clone())
        .route_prefix(args.route_prefix.clone())
        .exchange(args.exchange.clone());
    spec.connect().await.map_err(|e| match e {
        // A broker this binary was built without is the caller's input.
        seaorm_outbox::Error::Config(m) => Failure::input(m),
        other => Failure::from(other),
    })
}

pub(crate) fn thresholds(args: &RelayArgs) -> CliResult<HealthThresholds> {
    Ok(HealthThresholds::default()
        .max_backlog(parse_count(
            "--health-max-backlog",
            &args.health_max_backlog,
        )?)
        .max_oldest_pending_age(parse_duration("--health-max-age", &args.health_max_age)?)
        .max_dead_letters(args.health_max_dead_letters.parse().map_err(|_| {
            Failure::input(format!(
                "invalid number `{}` for --health-max-dead-letters",
                args.health_max_dead_letters
            ))
        })?)
        .max_poll_gap(parse_duration(
            "--health-max-poll-gap",
            &args.health_max_poll_gap,
        )?)
        .max_publisher_outage(parse_duration(
            "--health-max-broker-outage",
            &args.health_max_broker_outage,
        )?))
}

fn count_u32(flag: &str, value: &str) -> CliResult<u32> {
    Ok(u32::try_from(parse_count(flag, value)?).unwrap_or(u32::MAX))
}

pub(crate) fn poll_config(args: &RelayArgs) -> CliResult<RelayConfig> {
    let mut config = RelayConfig::default()
        .batch_size(count_u32("--batch-size", &args.batch_size)?)
        .max_attempts(count_u32("--max-attempts", &args.max_attempts)?)
        .idle_poll_interval(parse_duration("--poll-interval", &args.poll_interval)?)
        .listen_notify(!args.no_listen)
        .metrics_interval(Some(Duration::from_secs(5)));
    if let Some(r) = &args.retention {
        config = config.retention(Some(parse_duration("--retention", r)?));
    }
    if args.unordered {
        config = config.ordering(Ordering::Unordered);
    }
    if args.delete_on_publish {
        config = config.on_publish(OnPublish::Delete);
    }
    Ok(config)
}

fn log_config(args: &RelayArgs, url: Option<String>) -> CliResult<LogRelayConfig> {
    for (set, flag) in [
        (args.retention.is_some(), "--retention"),
        (args.unordered, "--unordered"),
        (args.no_listen, "--no-listen"),
    ] {
        if set {
            return Err(Failure::input(format!(
                "{flag} does not apply to --mode log (it delivers in commit order, without polling)"
            )));
        }
    }
    if args.delete_on_publish && !args.table_mode {
        return Err(Failure::input(
            "--delete-on-publish with --mode log needs --table-mode (messages have no row)",
        ));
    }
    let on_publish = if args.delete_on_publish {
        OnPublish::Delete
    } else {
        OnPublish::Retain
    };
    let transport = match args.transport {
        TransportKind::Stream => Transport::Stream,
        TransportKind::Sql => Transport::Sql,
    };
    let mut config = LogRelayConfig::default().transport(transport);
    // The stream's own connection uses the same URL, password included.
    if let Some(url) = url {
        config = config.replication_url(url);
    }
    Ok(config
        .slot(args.slot.clone())
        .publication(args.publication.clone())
        .message_prefix(args.message_prefix.clone())
        .table(args.table_mode)
        .on_publish(on_publish)
        .batch_size(count_u32("--batch-size", &args.batch_size)?)
        .max_changes(count_u32("--max-changes", &args.max_changes)?)
        .max_attempts(count_u32("--max-attempts", &args.max_attempts)?)
        .idle_poll_interval(parse_duration("--poll-interval", &args.poll_interval)?)
        .metrics_interval(Some(Duration::from_secs(5))))
}

pub(crate) async fn run(db: DatabaseConnection, url: Option<String>, args: RelayArgs) -> CliResult {
    let thresholds = Arc::new(thresholds(&args)?);
    let (poll, log) = match args.mode {
        Mode::Poll => (Some(poll_config(&args)?), None),
        Mode::Log => (None, Some(log_config(&args, url)?)),
    };
    let (listener, metrics) = http_setup(&args).await?;
    let publisher = publisher(&args).await?;
    let stop = CancellationToken::new();
    let http_stop = CancellationToken::new();
    let addr = &args.http_addr;
    // The admin API shares the pool: its reads are a few indexed queries per refresh.
    let admin_db = db.clone();

    let relay: Arc<dyn AnyRelay> = match log {
        Some(config) => Arc::new(
            LogRelay::builder(db, publisher)
                .config(config)
                .build()
                .map_err(|e| Failure::input(e.to_string()))?,
        ),
        None => Arc::new(
            Relay::builder(db, publisher)
                .config(poll.unwrap_or_default())
                .build()
                .map_err(|e| Failure::input(e.to_string()))?,
        ),
    };
    // A server or role that cannot decode the log is refused here, with the fix, not retried.
    relay.prepare().await?;
    let server = http::serve(
        listener,
        http_stop.clone(),
        metrics,
        Some(admin_db),
        (*thresholds).clone(),
        {
            let relay = relay.clone();
            move || {
                let (relay, thresholds) = (relay.clone(), thresholds.clone());
                async move { http::verdict(&relay.health(&thresholds).await) }
            }
        },
    )
    .await;
    tokio::spawn(shutdown_on_signal(stop.clone()));
    eprintln!(
        "{}; /metrics, /healthz and /admin ({}) on http://{addr}",
        relay.describe(),
        http::admin_access(),
    );
    let t = relay.run_until(stop).await;
    http_stop.cancel();
    let _ = server.await;
    let last = match args.mode {
        Mode::Poll => "released",
        Mode::Log => "unreadable",
    };
    eprintln!(
        "{} stopped: published={} retried={} dead_lettered={} {last}={}",
        match args.mode {
            Mode::Poll => "relay",
            Mode::Log => "log relay",
        },
        t.published,
        t.retried,
        t.dead_lettered,
        t.released_or_unreadable
    );
    Ok(())
}

/// The HTTP listener on `--http-addr` and the Prometheus recorder.
pub(crate) async fn http_setup(
    args: &RelayArgs,
) -> CliResult<(
    tokio::net::TcpListener,
    metrics_exporter_prometheus::PrometheusHandle,
)> {
    let listener = tokio::net::TcpListener::bind(&args.http_addr)
        .await
        .map_err(|e| {
            Failure::input(format!(
                "cannot listen on --http-addr {}: {e}",
                args.http_addr
            ))
        })?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    Ok((listener, metrics))
}

pub(crate) async fn shutdown_on_signal(stop: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    eprintln!("shutting down: finishing the in-flight batch");
    stop.cancel();
}
