//! Kafka publisher (`kafka` feature), on `rdkafka`.

use std::time::Duration;

use async_trait::async_trait;
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::error::BoxError;
use crate::event::OutboxEvent;
use crate::publisher::{PublishOutcome, Publisher};
use crate::wire::state::{Wire, wire_setters};

/// Publishes with an idempotent producer (`enable.idempotence=true`, `acks=all`), keyed by the
/// aggregate id so each aggregate stays on one partition, in order. Every event of a batch is
/// enqueued before any delivery report is awaited, so `linger.ms` defaults to 0 here: the
/// relay hands over a whole call at once and waits for it, and lingering only added 5 ms to
/// each call (per-aggregate order sends a batch in several calls; BENCHMARKS.md).
///
/// The topic comes from the [`Router`](crate::wire::Router) (default: the aggregate type). librdkafka reconnects and
/// retries by itself within `message.timeout.ms` (default here 8 s: keep it below the relay's
/// `publish_timeout`); after that the event is retried by the relay.
///
/// Errors: a message too large, an invalid message or topic, or missing authorisation is
/// permanent ([`PublishOutcome::Reject`]); delivery timeouts, brokers down, no partition leader
/// and transport errors mean the cluster is unavailable ([`PublishOutcome::Unavailable`]); any
/// other broker error is retryable ([`PublishOutcome::Retry`]).
pub struct KafkaPublisher {
    producer: FutureProducer,
    wire: Wire,
}

impl std::fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaPublisher")
            .field("wire", &self.wire)
            .finish_non_exhaustive()
    }
}

impl KafkaPublisher {
    /// A publisher for `bootstrap_servers` with the defaults above.
    ///
    /// # Errors
    /// librdkafka's, when the producer cannot be created from the config (a bad setting).
    pub fn new(bootstrap_servers: &str) -> Result<Self, KafkaError> {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", bootstrap_servers);
        Self::from_config(config)
    }

    /// A publisher from your own config. Idempotence and `acks=all` are set unless you set them;
    /// `message.timeout.ms` defaults to 8000 and `linger.ms` to 0.
    ///
    /// # Errors
    /// librdkafka's, when the producer cannot be created from `config`.
    pub fn from_config(mut config: ClientConfig) -> Result<Self, KafkaError> {
        for (k, v) in [
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("message.timeout.ms", "8000"),
            ("linger.ms", "0"),
        ] {
            if config.get(k).is_none() {
                config.set(k, v);
            }
        }
        Ok(Self {
            producer: config.create()?,
            wire: Wire::default(),
        })
    }

    wire_setters!("topics");

    /// The underlying producer, e.g. to flush on shutdown.
    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }
}

fn classify(err: &KafkaError) -> PublishOutcome {
    use RDKafkaErrorCode as C;
    match err.rdkafka_error_code() {
        Some(
            C::MessageSizeTooLarge
            | C::InvalidMessage
            | C::InvalidMessageSize
            | C::InvalidTopic
            | C::InvalidRecord
            | C::TopicAuthorizationFailed,
        ) => PublishOutcome::Reject(err.to_string()),
        // The cluster is not answering or has no leader to take the write. librdkafka retries
        // within `message.timeout.ms` before it reports these, so the message may also have
        // been written: the relay's later resend is a duplicate, never a dead letter.
        Some(
            C::MessageTimedOut
            | C::AllBrokersDown
            | C::BrokerTransportFailure
            | C::Resolve
            | C::OperationTimedOut
            | C::RequestTimedOut
            | C::NetworkException
            | C::BrokerNotAvailable
            | C::LeaderNotAvailable
            | C::NotLeaderForPartition
            | C::PreferredLeaderNotAvailable
            | C::NotEnoughReplicas
            | C::NotEnoughReplicasAfterAppend
            | C::KafkaStorageError
            | C::BrokerDestroy
            | C::QueueFull,
        ) => PublishOutcome::Unavailable(err.to_string()),
        _ => PublishOutcome::Retry(err.to_string()),
    }
}

#[async_trait]
impl Publisher for KafkaPublisher {
    async fn publish(&self, events: &[OutboxEvent]) -> Result<Vec<PublishOutcome>, BoxError> {
        let mut outcomes = vec![PublishOutcome::Delivered; events.len()];
        let mut deliveries = Vec::with_capacity(events.len());
        for (i, event) in events.iter().enumerate() {
            let (topic, msg) = self.wire.encode(event, "ce_");
            let headers = msg.headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
                h.insert(Header {
                    key: k,
                    value: Some(v.as_bytes()),
                })
            });
            let mut record = FutureRecord::to(&topic)
                .key(msg.key.as_bytes())
                .payload(&msg.body)
                .headers(headers);
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        deliveries.push((i, delivery));
                        break;
                    }
                    // The local queue is full: let librdkafka drain it, then enqueue again.
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => {
                        outcomes[i] = classify(&e);
                        break;
                    }
                }
            }
        }
        let results = futures_util::future::join_all(
            deliveries
                .into_iter()
                .map(|(i, d)| async move { (i, d.await) }),
        )
        .await;
        for (i, result) in results {
            outcomes[i] = match result {
                Ok(Ok(_)) => PublishOutcome::Delivered,
                Ok(Err((e, _))) => classify(&e),
                Err(_) => {
                    PublishOutcome::Unavailable("the producer dropped the delivery report".into())
                }
            };
        }
        Ok(outcomes)
    }

    fn name(&self) -> &str {
        "kafka"
    }
}
