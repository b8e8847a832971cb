//! Redis Streams, through the redis crate: `XADD` per event, and a consumer group.

mod publisher;
mod source;

pub use self::publisher::RedisPublisher;
pub use self::source::RedisSource;
/// The client crate, at the version these types are built on.
pub use redis;

/// The stream field that holds the body. Headers become fields of their own.
pub const BODY_FIELD: &str = "payload";
