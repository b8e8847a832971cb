//! The `initializers: outbox:` block of a Loco config file.

use std::time::Duration;

use loco_rs::config::Config;
use seaorm_outbox::relay::{OnPublish, Ordering, RelayConfig};
use serde::Deserialize;

/// The outbox's settings, read from `initializers: outbox:` in `config/<env>.yaml`:
///
/// ```yaml
/// initializers:
///   outbox:
///     publisher: nats                # stdout | nats | kafka | rabbitmq | redis
///     broker_url: nats://127.0.0.1:4222
///     route_prefix: "orders."        # destination = prefix + aggregate type
///     batch_size: 100
///     retention: 7d                  # delete published events older than this
///     ordering: per_aggregate        # or unordered
///     admin:
///       path: /outbox                # the dashboard and API, behind Loco's JWT auth
///       writers: ["<user pid>"]      # may replay, discard, purge; others only read
///     tenants:                       # many tenants: one relay group instead of `relays`
///       workers: 4                   # batches in flight at once, across tenants
///       schemas: [acme, globex]      # PostgreSQL schemas of the app's database
///       databases:                   # and/or a database per tenant
///         initech: postgres://app@db/initech
/// ```
///
/// Unknown keys are an error, so a typo fails the boot instead of running on defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct OutboxSettings {
    /// Whether this process runs relays at all (turn off on web-only replicas). Default true.
    #[serde(default = "yes")]
    pub relay: bool,
    /// How many relays the server process runs; they share the work through leases.
    /// Default 1.
    #[serde(default = "one")]
    pub relays: usize,
    /// Where events go.
    pub publisher: PublisherKind,
    /// Kafka bootstrap servers, or the `nats://`, `amqp://` or `redis://` URL.
    pub broker_url: Option<String>,
    /// Destination = this prefix + the aggregate type. Default: the aggregate type.
    #[serde(default)]
    pub route_prefix: String,
    /// Send every event to this one destination instead.
    pub destination: Option<String>,
    /// RabbitMQ exchange (default: the default exchange).
    #[serde(default)]
    pub exchange: String,
    /// Events per claim. Default the relay's (100).
    pub batch_size: Option<u32>,
    /// Attempts before an event is dead-lettered. Default the relay's (10).
    pub max_attempts: Option<u32>,
    /// How long an idle relay waits between polls, e.g. `500ms`. Default the relay's (1 s).
    pub poll_interval: Option<String>,
    /// Delete published events older than this, e.g. `7d`. Default: keep them.
    pub retention: Option<String>,
    /// Per-aggregate order (default) or none.
    #[serde(default)]
    pub ordering: OrderingSetting,
    /// Keep published rows (default) or delete them on publish.
    #[serde(default)]
    pub on_publish: OnPublishSetting,
    /// The admin API and dashboard; absent: not mounted.
    pub admin: Option<AdminSettings>,
    /// Many tenants, relayed by one [`RelayGroup`](seaorm_outbox::relay::RelayGroup) in place
    /// of `relays`; absent: the app's own database only.
    pub tenants: Option<TenantSettings>,
}

/// `tenants:` in the settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TenantSettings {
    /// Batches in flight at once, across tenants. Default the group's (4).
    pub workers: Option<usize>,
    /// PostgreSQL schemas of the app's database, one tenant each, named by its schema.
    #[serde(default)]
    pub schemas: Vec<String>,
    /// A database per tenant: its id and its URL.
    #[serde(default)]
    pub databases: std::collections::BTreeMap<String, String>,
}

/// `publisher:` in the settings: the core's kinds (`stdout`, `nats`, `kafka`, `rabbitmq`,
/// `redis`).
pub use seaorm_outbox::broker::PublisherKind;

/// `ordering:` in the settings.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OrderingSetting {
    /// Events of one aggregate are delivered in order.
    #[default]
    PerAggregate,
    /// No order is kept; faster under contention.
    Unordered,
}

/// `on_publish:` in the settings.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OnPublishSetting {
    /// Mark the row published (it can still be looked up until retention removes it).
    #[default]
    Retain,
    /// Delete the row once the broker acknowledged it.
    Delete,
}

/// `admin:` in the settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct AdminSettings {
    /// Where the router is mounted. Default `/outbox`.
    #[serde(default = "default_path")]
    pub path: String,
    /// The JWT `pid`s that may write (replay, discard, purge). Default none.
    #[serde(default)]
    pub writers: Vec<String>,
    /// The JWT `pid`s that may read; absent: every authenticated user.
    pub readers: Option<Vec<String>>,
}

fn yes() -> bool {
    true
}

fn one() -> usize {
    1
}

fn default_path() -> String {
    "/outbox".to_owned()
}

/// Why the settings cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// There is no `initializers: outbox:` block.
    #[error("no `initializers: outbox:` block in the Loco config")]
    Missing,
    /// The block does not parse.
    #[error("`initializers: outbox:` is malformed: {0}")]
    Malformed(#[from] serde_json::Error),
    /// A value is out of range or unparseable.
    #[error("`initializers: outbox: {key}`: {reason}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl OutboxSettings {
    /// Reads `initializers: outbox:` from `config`.
    ///
    /// # Errors
    /// [`SettingsError::Missing`] without the block; an unknown key, a bad value or a setting
    /// that cannot work, naming it.
    pub fn from_config(config: &Config) -> Result<Self, SettingsError> {
        let block = config
            .initializers
            .as_ref()
            .and_then(|i| i.get(crate::NAME))
            .ok_or(SettingsError::Missing)?;
        let settings: Self = serde_json::from_value(block.clone())?;
        settings.relay_config()?;
        if settings.relays == 0 && settings.relay {
            return Err(invalid(
                "relays",
                "must be at least 1 (or set relay: false)",
            ));
        }
        if let Some(admin) = &settings.admin
            && !admin.path.starts_with('/')
        {
            return Err(invalid("admin.path", "must start with /"));
        }
        if let Some(t) = &settings.tenants {
            if t.schemas.is_empty() && t.databases.is_empty() {
                return Err(invalid("tenants", "names no schema and no database"));
            }
            if t.workers == Some(0) {
                return Err(invalid("tenants.workers", "must be at least 1"));
            }
            if let Some(s) = t.schemas.iter().find(|s| t.databases.contains_key(*s)) {
                return Err(invalid(
                    "tenants",
                    format!("`{s}` is both a schema and a database"),
                ));
            }
        }
        Ok(settings)
    }

    /// The relay's configuration these settings describe.
    ///
    /// # Errors
    /// A setting that cannot work (a zero batch, an unparsable duration), naming it.
    pub fn relay_config(&self) -> Result<RelayConfig, SettingsError> {
        let mut c = RelayConfig::default().metrics_interval(Some(Duration::from_secs(15)));
        if let Some(n) = self.batch_size {
            c = c.batch_size(n);
        }
        if let Some(n) = self.max_attempts {
            c = c.max_attempts(n);
        }
        if let Some(p) = &self.poll_interval {
            c = c.idle_poll_interval(duration("poll_interval", p)?);
        }
        if let Some(r) = &self.retention {
            c = c.retention(Some(duration("retention", r)?));
        }
        if self.ordering == OrderingSetting::Unordered {
            c = c.ordering(Ordering::Unordered);
        }
        if self.on_publish == OnPublishSetting::Delete {
            c = c.on_publish(OnPublish::Delete);
        }
        Ok(c)
    }
}

fn duration(key: &'static str, text: &str) -> Result<Duration, SettingsError> {
    humantime::parse_duration(text).map_err(|e| invalid(key, format!("{text:?}: {e}")))
}

fn invalid(key: &'static str, reason: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        key,
        reason: reason.into(),
    }
}
