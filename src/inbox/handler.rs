//! The application's side of a consumer: [`Handler`].

use async_trait::async_trait;
use sea_orm::DatabaseTransaction;

use super::handler_error::HandlerError;
use super::message::Incoming;

/// Applies one message inside the consumer's transaction.
///
/// The inbox row is already written in `txn`; whatever the handler writes through `txn`
/// commits with it, or not at all. Return an error to roll both back:
/// [`HandlerError::retry`] (the default for database errors) is tried again with backoff, up to
/// the consumer's `max_attempts`; [`HandlerError::permanent`] (a payload that will never
/// deserialise, a business rule that will never pass) dead-letters the message at once.
///
/// Don't commit `txn`, and don't write outside it: the consumer commits, then acknowledges.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Applies `msg`.
    async fn handle(&self, txn: &DatabaseTransaction, msg: &Incoming) -> Result<(), HandlerError>;
}
