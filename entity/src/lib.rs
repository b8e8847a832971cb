//! SeaORM entity of the `outbox_events` table used by [`seaorm-outbox`].
//!
//! The schema itself is created by the `seaorm-outbox-migration` crate; this crate only
//! describes it so that the library and host applications can query it with SeaORM.
//!
//! [`seaorm-outbox`]: https://docs.rs/seaorm-outbox

pub mod outbox_event;

pub use outbox_event::{
    ActiveModel as OutboxEventActiveModel, Column as OutboxEventColumn, Entity as OutboxEvents,
    Model as OutboxEventModel, OutboxStatus,
};
