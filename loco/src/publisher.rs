//! The publisher the settings name, connected through the core's `PublisherSpec`.

use std::sync::Arc;

use seaorm_outbox::Publisher;
use seaorm_outbox::broker::PublisherSpec;

use crate::settings::{OutboxSettings, SettingsError};

/// Connects the broker `settings` names; a broker whose feature is off, or a missing URL, is
/// refused naming the setting.
pub(crate) async fn connect(
    settings: &OutboxSettings,
) -> Result<Arc<dyn Publisher>, SettingsError> {
    let spec = PublisherSpec::default()
        .kind(settings.publisher)
        .url(settings.broker_url.clone())
        .destination(settings.destination.clone())
        .route_prefix(settings.route_prefix.clone())
        .exchange(settings.exchange.clone());
    spec.connect().await.map_err(|e| match e {
        seaorm_outbox::Error::Config(reason) => SettingsError::Invalid {
            key: if settings.broker_url.is_none() {
                "broker_url"
            } else {
                "publisher"
            },
            reason,
        },
        other => SettingsError::Invalid {
            key: "broker_url",
            reason: other.to_string(),
        },
    })
}
