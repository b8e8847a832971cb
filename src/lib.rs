//! A transactional outbox for SeaORM 2.
//!
//! Write your domain rows and an outbox event in **one database transaction**; a [`Relay`]
//! later delivers the event to a broker, at least once, and marks it published. If the
//! transaction rolls back, the event never existed.
//!
//! # Layout
//!
//! The modules form layers, lowest first; each uses only those above it in this list, and
//! `tests/layout.rs` fails the build's tests if an import points the other way:
//!
//! ```text
//! error        the one Error type
//! backoff      exponential backoff with jitter (re-exported as relay::Backoff)
//! event        what goes in and comes out, and its validation; no SQL, no telemetry
//! store        every SQL statement, one file per backend, and row decoding
//! publisher    the Publisher trait and the brokers (uses event only)
//! stats        backlog snapshots, health verdicts, relay heartbeats
//! telemetry    metrics the relay records; trace context the repository captures
//! repository   the OutboxRepository contract on any ConnectionTrait
//! inbox        the consumer side: the inbox record, consumers for each broker
//! relay        claim → publish → write-back: its lifecycle, delivery, breaker and config;
//!              relay::log reads a logical replication slot instead
//! admin        the HTTP API and dashboard an axum app mounts (feature `admin`)
//! ```
//!
//! * [`event`]: what goes in ([`NewEvent`], [`DomainEvent`]) and what comes out ([`OutboxEvent`]).
//! * `store` (private): the statements for PostgreSQL, MySQL/MariaDB and SQLite behind one
//!   backend-neutral interface: insert, list, claim, write-back, dead letters, stats, purge.
//! * [`repository`]: the [`OutboxRepository`] contract and its SeaORM implementation, [`Outbox`],
//!   which works on any `ConnectionTrait`, pool or transaction alike.
//! * [`stats`]: backlog snapshots, health checks and the relays' heartbeats.
//! * [`publisher`]: the [`Publisher`] trait the relay delivers through, with an in-memory and a
//!   logging publisher and, behind features, Kafka, NATS JetStream, RabbitMQ and Redis Streams.
//! * [`relay`]: the [`Relay`]: claim under a lease, publish, write back, retry with backoff,
//!   dead-letter, keep per-aggregate order, purge old rows. On PostgreSQL (feature `postgres`)
//!   `relay::log` reads events from the write-ahead log instead, in commit order.
//! * [`inbox`]: the consumer side. [`inbox::Inbox::record`] deduplicates a message inside the
//!   consumer's transaction; [`inbox::Consumer`] runs a handler per message from a broker
//!   source, committing before it acknowledges.
//! * [`telemetry`]: metric names; the metrics themselves and trace-context capture.
//! * `admin` (feature `admin`): an axum router with the JSON admin API and the dashboard,
//!   behind an authorizer that fails closed.
//! * [`error`]: the one [`Error`] type.
//!
//! The table lives in the `seaorm-outbox-entity` crate and is created by the
//! `seaorm-outbox-migration` crate.

/// Chained setters for a config struct's public fields: `self.field = value; self`.
macro_rules! setters {
    ($($(#[$doc:meta])* $field:ident: $ty:ty),* $(,)?) => {$(
        $(#[$doc])*
        pub fn $field(mut self, value: $ty) -> Self {
            self.$field = value;
            self
        }
    )*};
}

#[cfg(feature = "admin")]
pub mod admin;
mod backoff;
pub mod broker;
pub mod error;
pub mod event;
pub mod inbox;
pub mod publisher;
pub mod relay;
pub mod repository;
pub mod stats;
mod store;
pub mod telemetry;
pub mod wire;

pub use error::{BoxError, Error, InvalidEvent, Result};
pub use event::{DomainEvent, Headers, NewEvent, OutboxEvent};
pub use publisher::{PublishOutcome, Publisher};
pub use relay::{Relay, RelayConfig, RelayStats};
pub use repository::{Outbox, OutboxConfig, OutboxRepository, WriteMode};
pub use seaorm_outbox_entity::OutboxStatus;
pub use stats::{Health, HealthStatus, HealthThresholds, OutboxStats, RelayHeartbeat};

/// The README's code blocks, compiled as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
