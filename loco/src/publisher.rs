//! The publisher the settings name, connected.

use std::sync::Arc;

use seaorm_outbox::Publisher;
use seaorm_outbox::publisher::StdoutPublisher;

use crate::settings::{OutboxSettings, PublisherKind, SettingsError};

/// Connects the broker `settings` names; a broker whose feature is off is refused by name.
// Without a broker feature only `stdout` is left, and the router and URL go unused.
#[cfg_attr(
    not(any(
        feature = "nats",
        feature = "kafka",
        feature = "rabbitmq",
        feature = "redis"
    )),
    allow(unused_variables)
)]
pub(crate) async fn connect(
    settings: &OutboxSettings,
) -> Result<Arc<dyn Publisher>, SettingsError> {
    let router = match &settings.destination {
        Some(d) => seaorm_outbox::wire::Router::fixed(d.clone()),
        None if settings.route_prefix.is_empty() => seaorm_outbox::wire::Router::aggregate_type(),
        None => seaorm_outbox::wire::Router::prefixed(settings.route_prefix.clone()),
    };
    let url = || {
        settings.broker_url.clone().ok_or(SettingsError::Invalid {
            key: "broker_url",
            reason: "this publisher needs a broker URL".into(),
        })
    };
    let unreachable = |e: &dyn std::fmt::Display| SettingsError::Invalid {
        key: "broker_url",
        reason: format!("cannot connect: {e}"),
    };
    Ok(match settings.publisher {
        PublisherKind::Stdout => Arc::new(StdoutPublisher::stdout()),
        #[cfg(feature = "nats")]
        PublisherKind::Nats => {
            let p = seaorm_outbox::broker::nats::NatsPublisher::connect(&url()?)
                .await
                .map_err(|e| unreachable(&e))?;
            Arc::new(p.router(router))
        }
        #[cfg(feature = "kafka")]
        PublisherKind::Kafka => {
            let p = seaorm_outbox::broker::kafka::KafkaPublisher::new(&url()?)
                .map_err(|e| unreachable(&e))?;
            Arc::new(p.router(router))
        }
        #[cfg(feature = "rabbitmq")]
        PublisherKind::Rabbitmq => {
            let p = seaorm_outbox::broker::rabbitmq::RabbitMqPublisher::new(url()?)
                .exchange(settings.exchange.clone())
                .router(router)
                .connect()
                .await
                .map_err(|e| unreachable(&e))?;
            Arc::new(p)
        }
        #[cfg(feature = "redis")]
        PublisherKind::Redis => {
            let p = seaorm_outbox::broker::redis::RedisPublisher::connect(&url()?)
                .await
                .map_err(|e| unreachable(&e))?;
            Arc::new(p.router(router))
        }
        #[allow(unreachable_patterns)]
        other => {
            return Err(SettingsError::Invalid {
                key: "publisher",
                reason: format!(
                    "{other:?} needs seaorm-outbox-loco's `{}` feature",
                    format!("{other:?}").to_lowercase()
                ),
            });
        }
    })
}
