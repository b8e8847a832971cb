//! [`PublisherSpec`]: a publisher named by configuration (a flag, a settings file) and
//! connected, the one place that turns a kind and a URL into a broker publisher.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::publisher::{Publisher, StdoutPublisher};
use crate::wire::Router;

/// Which publisher.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum PublisherKind {
    /// One line per event on standard output (development).
    #[default]
    Stdout,
    /// Kafka (feature `kafka`).
    Kafka,
    /// NATS JetStream (feature `nats`).
    Nats,
    /// RabbitMQ (feature `rabbitmq`).
    Rabbitmq,
    /// Redis Streams (feature `redis`).
    Redis,
}

impl PublisherKind {
    /// Its name, also the cargo feature it needs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Kafka => "kafka",
            Self::Nats => "nats",
            Self::Rabbitmq => "rabbitmq",
            Self::Redis => "redis",
        }
    }
}

/// A publisher as configuration names it. `Default` and setters.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct PublisherSpec {
    /// Which broker (default stdout).
    pub kind: PublisherKind,
    /// The broker's URL or bootstrap servers; every kind but stdout needs one.
    pub url: Option<String>,
    /// Send every event here (a topic, subject, queue or stream), instead of routing.
    pub destination: Option<String>,
    /// Route to this prefix plus the aggregate type (empty: the aggregate type alone).
    pub route_prefix: String,
    /// RabbitMQ's exchange (empty: the default exchange).
    pub exchange: String,
}

impl PublisherSpec {
    setters! {
        /// Sets [`kind`](Self::kind).
        kind: PublisherKind,
        /// Sets [`url`](Self::url).
        url: Option<String>,
        /// Sets [`destination`](Self::destination).
        destination: Option<String>,
        /// Sets [`route_prefix`](Self::route_prefix).
        route_prefix: String,
        /// Sets [`exchange`](Self::exchange).
        exchange: String,
    }

    /// The router this spec describes.
    pub fn router(&self) -> Router {
        match &self.destination {
            Some(d) => Router::fixed(d.clone()),
            None if self.route_prefix.is_empty() => Router::aggregate_type(),
            None => Router::prefixed(self.route_prefix.clone()),
        }
    }

    /// Connects the publisher.
    ///
    /// # Errors
    /// [`Error::Config`] without a URL where one is needed, or for a broker whose feature this
    /// build lacks; [`Error::Broker`] (`cannot connect …`, with the client's error as its
    /// source) when the broker cannot be reached.
    // Without a broker feature only stdout is left: the URL, error and router go unused.
    #[cfg_attr(
        not(any(
            feature = "kafka",
            feature = "nats",
            feature = "rabbitmq",
            feature = "redis"
        )),
        allow(unused_variables)
    )]
    pub async fn connect(&self) -> Result<Arc<dyn Publisher>> {
        let kind = self.kind;
        if kind == PublisherKind::Stdout {
            return Ok(Arc::new(StdoutPublisher::stdout()));
        }
        let url = self.url.clone().ok_or_else(|| {
            Error::Config(format!("the {} publisher needs a broker URL", kind.name()))
        })?;
        let unreachable = |e: crate::error::BoxError| Error::Broker {
            broker: kind.name(),
            reason: format!("cannot connect to {url}: {e}"),
            source: Some(e),
        };
        let router = self.router();
        match kind {
            #[cfg(feature = "kafka")]
            PublisherKind::Kafka => Ok(Arc::new(
                super::kafka::KafkaPublisher::new(&url)
                    .map_err(|e| unreachable(e.into()))?
                    .router(router),
            )),
            #[cfg(feature = "nats")]
            PublisherKind::Nats => Ok(Arc::new(
                super::nats::NatsPublisher::connect(&url)
                    .await
                    .map_err(unreachable)?
                    .router(router),
            )),
            #[cfg(feature = "rabbitmq")]
            PublisherKind::Rabbitmq => Ok(Arc::new(
                super::rabbitmq::RabbitMqPublisher::new(url.clone())
                    .exchange(self.exchange.clone())
                    .router(router)
                    .connect()
                    .await
                    .map_err(unreachable)?,
            )),
            #[cfg(feature = "redis")]
            PublisherKind::Redis => Ok(Arc::new(
                super::redis::RedisPublisher::connect(&url)
                    .await
                    .map_err(unreachable)?
                    .router(router),
            )),
            #[allow(unreachable_patterns)]
            other => Err(Error::Config(format!(
                "this build lacks the `{}` feature its publisher needs",
                other.name()
            ))),
        }
    }
}
