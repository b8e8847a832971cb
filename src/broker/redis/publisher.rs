//! Redis Streams publisher (`redis` feature), on the `redis` crate.

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisResult, Value};
use std::time::Duration;

use super::BODY_FIELD;
use crate::error::BoxError;
use crate::event::OutboxEvent;
use crate::publisher::{PublishOutcome, Publisher};
use crate::wire::state::{Wire, wire_setters};

/// `XADD`s each event to a stream whose key comes from the [`Router`](crate::wire::Router) (default: the aggregate
/// type), with the body in the [`BODY_FIELD`] field and every header as a field, since streams
/// have no headers. A whole batch goes out as one pipeline: one round trip.
///
/// The [`ConnectionManager`] reconnects by itself after a dropped connection.
///
/// Errors: an I/O failure, a refused or dropped connection, a timeout or a transient server
/// state (`LOADING`, `BUSY`, `OOM`, `READONLY`, `TRYAGAIN`, `MASTERDOWN`, …) means the server is
/// unavailable ([`PublishOutcome::Unavailable`]); any other server error for a command (e.g.
/// `WRONGTYPE`: the key holds something that is not a stream) is permanent.
#[derive(Clone)]
pub struct RedisPublisher {
    conn: ConnectionManager,
    wire: Wire,
    max_len: Option<usize>,
}

impl std::fmt::Debug for RedisPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPublisher")
            .field("wire", &self.wire)
            .field("max_len", &self.max_len)
            .finish_non_exhaustive()
    }
}

impl RedisPublisher {
    /// A publisher on an existing connection manager.
    pub fn new(conn: ConnectionManager) -> Self {
        Self {
            conn,
            wire: Wire::default(),
            max_len: None,
        }
    }

    /// Connects to `url` (e.g. `redis://127.0.0.1:6379`), with 5 s connection and response
    /// timeouts so an unreachable server fails fast and the relay retries.
    ///
    /// # Errors
    /// The client's, when `url` is invalid or the first connection fails.
    pub async fn connect(url: &str) -> Result<Self, BoxError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(1);
        Ok(Self::new(
            ConnectionManager::new_with_config(client, config).await?,
        ))
    }

    wire_setters!("stream keys");

    /// Caps each stream at about `max_len` entries (`XADD … MAXLEN ~ n`). Default: no cap.
    #[must_use]
    pub fn max_len(mut self, max_len: Option<usize>) -> Self {
        self.max_len = max_len;
        self
    }
}

const TRANSIENT: &[&str] = &[
    "LOADING",
    "BUSY",
    "OOM",
    "READONLY",
    "TRYAGAIN",
    "MASTERDOWN",
    "CLUSTERDOWN",
    "NOREPLICAS",
];

fn classify(err: &redis::RedisError) -> PublishOutcome {
    let text = err.to_string();
    let code = err.code().unwrap_or_default();
    if err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || TRANSIENT.contains(&code)
    {
        PublishOutcome::Unavailable(text)
    } else {
        PublishOutcome::Reject(text)
    }
}

#[async_trait]
impl Publisher for RedisPublisher {
    async fn publish(&self, events: &[OutboxEvent]) -> Result<Vec<PublishOutcome>, BoxError> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for event in events {
            let (key, msg) = self.wire.encode(event, "ce-");
            let mut cmd = redis::cmd("XADD");
            cmd.arg(key);
            if let Some(n) = self.max_len {
                cmd.arg("MAXLEN").arg("~").arg(n);
            }
            cmd.arg("*").arg(BODY_FIELD).arg(msg.body);
            for (k, v) in &msg.headers {
                cmd.arg(k).arg(v);
            }
            pipe.add_command(cmd);
        }
        let mut conn = self.conn.clone();
        let results: Vec<RedisResult<Value>> = pipe.query_async(&mut conn).await?;
        let mut outcomes: Vec<PublishOutcome> = results
            .iter()
            .map(|r| match r {
                Ok(_) => PublishOutcome::Delivered,
                Err(e) => classify(e),
            })
            .collect();
        // A short reply means the connection broke mid-pipeline: the rest is unknown, retry it.
        outcomes.resize(
            events.len(),
            PublishOutcome::Unavailable("pipeline reply was cut short".into()),
        );
        Ok(outcomes)
    }

    fn name(&self) -> &str {
        "redis"
    }
}
