//! Kafka, through rdkafka (librdkafka bundled): an idempotent producer keyed by aggregate, and a
//! consumer group committing a contiguous watermark.

mod publisher;
mod source;

pub use self::publisher::KafkaPublisher;
pub use self::source::KafkaSource;
/// The client crate, at the version these types are built on.
pub use rdkafka;
