//! A transactional outbox for SeaORM 2.
//!
//! Write your domain rows and an outbox event in **one database transaction**; a [`Relay`]
//! later delivers the event to a broker, at least once, and marks it published. If the
//! transaction rolls back, the event never existed.
//!
//! # Layout
//!
//! * [`event`]: what goes in ([`NewEvent`], [`DomainEvent`]) and what comes out ([`OutboxEvent`]).
//! * [`repository`]: the [`OutboxRepository`] contract and its SeaORM implementation, [`Outbox`],
//!   which works on any `ConnectionTrait`, pool or transaction alike.
//! * [`publisher`]: the [`Publisher`] trait the relay delivers through,
//!   with an in-memory and a logging publisher.
//! * [`relay`]: the [`Relay`] loop: claim under a lease, publish, write back,
//!   retry with backoff, dead-letter, keep per-aggregate order, purge old rows.
//! * [`stats`]: backlog snapshots and health checks; [`telemetry`]: metric names and trace
//!   context capture.
//! * [`error`]: the one [`Error`] type.
//!
//! The table lives in the `seaorm-outbox-entity` crate and is created by the
//! `seaorm-outbox-migration` crate.

pub mod error;
pub mod event;
pub mod publisher;
pub mod relay;
pub mod repository;
mod sql;
pub mod stats;
pub mod telemetry;

pub use error::{Error, InvalidEvent, Result};
pub use event::{DomainEvent, Headers, NewEvent, OutboxEvent};
pub use publisher::{PublishOutcome, Publisher};
pub use relay::{Relay, RelayConfig, RelayStats};
pub use repository::{Outbox, OutboxConfig, OutboxRepository};
pub use seaorm_outbox_entity::OutboxStatus;
pub use stats::{Health, HealthStatus, HealthThresholds, OutboxStats};
