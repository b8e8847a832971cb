//! The brokers, one folder each, with both directions side by side: the [`Publisher`] the relay
//! sends through and the [`Source`] a consumer receives from, plus what the two share (header
//! names, ids, body fields) and a re-export of the broker's client crate, so an app names the
//! exact version whose types these take.
//!
//! | folder | feature | client | publisher | source |
//! |---|---|---|---|---|
//! | `kafka/` | `kafka` | rdkafka | [`kafka::KafkaPublisher`] | [`kafka::KafkaSource`] |
//! | `nats/` | `nats` | async-nats | [`nats::NatsPublisher`] | [`nats::NatsSource`] |
//! | `rabbitmq/` | `rabbitmq` | lapin | [`rabbitmq::RabbitMqPublisher`] | [`rabbitmq::RabbitMqSource`] |
//! | `redis/` | `redis` | redis | [`redis::RedisPublisher`] | [`redis::RedisSource`] |
//!
//! [`PublisherSpec`] connects whichever one a configuration names.
//!
//! Every publisher encodes through the shared wire format ([`crate::wire`]). Each folder uses
//! the core's layers below it only, so it could become a crate of its own unchanged.
//!
//! [`Publisher`]: crate::Publisher
//! [`Source`]: crate::inbox::Source

mod spec;

pub use self::spec::{PublisherKind, PublisherSpec};

#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub mod kafka;
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub mod nats;
#[cfg(feature = "rabbitmq")]
#[cfg_attr(docsrs, doc(cfg(feature = "rabbitmq")))]
pub mod rabbitmq;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
