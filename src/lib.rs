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
//! clock        the time a relay goes by (the host's, or one a test moves)
//! store        every SQL statement, one file per backend, and row decoding
//! wire         the broker message format: routing, headers, CloudEvents envelope
//! publisher    the Publisher trait, the in-memory and stdout publishers
//! stats        backlog snapshots, health verdicts, relay heartbeats
//! telemetry    metrics the relay records; trace context the repository captures
//! repository   the OutboxRepository contract on any ConnectionTrait
//! inbox        the consumer side: the inbox record, consumers for each broker
//! relay        claim → publish → write-back: its lifecycle, delivery, breaker and config;
//!              relay::wal reads a logical replication slot instead
//! broker       each broker's publisher and source, side by side (a feature each)
//! testing      the kit for apps' tests (feature `testing`): TestRelay, MemorySource, …
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
//!   `relay::wal` reads events from the write-ahead log instead, in commit order.
//! * [`inbox`]: the consumer side. [`inbox::Inbox::record`] deduplicates a message inside the
//!   consumer's transaction; [`inbox::Consumer`] runs a handler per message from a broker
//!   source, committing before it acknowledges.
//! * [`telemetry`]: metric names; the metrics themselves and trace-context capture.
//! * [`broker`]: one folder per broker (Kafka, NATS JetStream, RabbitMQ, Redis Streams), each
//!   with its publisher, its inbox source and what the two share, behind its feature.
//! * [`wire`]: the wire format every broker publisher encodes with (routing, headers,
//!   CloudEvents).
//!
//! The admin HTTP API and dashboard are the `seaorm-outbox-admin` crate, and the
//! `seaorm-outbox` binary is the `seaorm-outbox-cli` crate: both use this crate's public API only.
//! * [`error`]: the one [`Error`] type.
//! * `testing` (feature `testing`): what an app's own tests need: [`Clock`], a relay into
//!   memory with waits instead of sleeps, a consumer source fed from memory.
//!
//! The table lives in the `seaorm-outbox-entity` crate and is created by the
//! `seaorm-outbox-migration` crate.

#![cfg_attr(docsrs, feature(doc_cfg))]

/// Chained setters for a config struct's public fields: `self.field = value; self`.
macro_rules! setters {
    ($($(#[$doc:meta])* $field:ident: $ty:ty),* $(,)?) => {$(
        $(#[$doc])*
        #[must_use]
        pub fn $field(mut self, value: $ty) -> Self {
            self.$field = value;
            self
        }
    )*};
}

mod backoff;
pub mod broker;
mod clock;
pub mod dead_letter;
pub mod error;
pub mod event;
pub mod inbox;
pub mod publisher;
pub mod relay;
pub mod repository;
pub mod stats;
mod store;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod wire;

pub use clock::Clock;
pub use error::{BoxError, Error, InvalidEvent, Result};
pub use event::{DomainEvent, Headers, NewEvent, OutboxEvent};
pub use publisher::{PublishOutcome, Publisher};
pub use relay::{Relay, RelayConfig, RelayStats, RelayWaker};
pub use repository::{Outbox, OutboxConfig, OutboxRepository, WriteMode};
pub use seaorm_outbox_entity::OutboxStatus;
pub use stats::{Health, HealthStatus, HealthThresholds, OutboxStats, RelayHeartbeat};

/// The README's code blocks, compiled as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
