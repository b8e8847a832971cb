//! RabbitMQ, through lapin: a publisher with confirms, and a queue consumer with manual acks.

mod acks;
mod publisher;
mod source;

pub use self::publisher::RabbitMqPublisher;
pub use self::source::RabbitMqSource;
/// The client crate, at the version these types are built on.
pub use lapin;
