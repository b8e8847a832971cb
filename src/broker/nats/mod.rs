//! NATS JetStream, through async-nats: a publisher deduplicated by `Nats-Msg-Id`, and a durable
//! pull consumer.

mod publisher;
mod source;

pub use self::publisher::NatsPublisher;
pub use self::source::NatsSource;
/// The client crate, at the version these types are built on.
pub use async_nats;

/// The header JetStream deduplicates on: the publisher sets it to the event id
/// (`PublishMessage::message_id`), the source reads it back as the broker's id.
pub(crate) const MSG_ID_HEADER: &str = "Nats-Msg-Id";
