//! The application's side of a consumer: [`Handler`], one message at a time, or
//! [`BatchHandler`], a whole batch at once.

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
/// In batch mode ([`ConsumerConfig::batch_size`](super::ConsumerConfig::batch_size) over 1),
/// `txn` is the batch's transaction, or a savepoint inside it once a handler of the batch
/// failed: an error then rolls back this message's effect and inbox row only, the rest of the
/// batch commits, and this message is retried alone. A handler may so run twice for one
/// attempt, which is harmless as long as it writes only through `txn`.
///
/// Don't commit `txn`, and don't write outside it: the consumer commits, then acknowledges.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Applies `msg`.
    async fn handle(&self, txn: &DatabaseTransaction, msg: &Incoming) -> Result<(), HandlerError>;

    /// The batch handler behind this one, for [`WholeBatch`]; `None` runs batches a message
    /// at a time under savepoints.
    #[doc(hidden)]
    fn whole_batches(&self) -> Option<&dyn BatchHandler> {
        None
    }
}

/// Applies a batch of messages at once inside the consumer's transaction: one multi-row insert
/// for the whole batch, say. Run it with [`WholeBatch`] and a
/// [`batch_size`](super::ConsumerConfig::batch_size) over 1.
///
/// `msgs` are the batch's new messages (duplicates are already left out), in arrival order,
/// a key's messages in its order. An error rolls back the whole call; the consumer then finds
/// the failing message by calling again with one message at a time, each under a savepoint,
/// so one poison message is retried or dead-lettered alone and the rest commit.
#[async_trait]
pub trait BatchHandler: Send + Sync + 'static {
    /// Applies `msgs`.
    async fn handle_batch(
        &self,
        txn: &DatabaseTransaction,
        msgs: &[Incoming],
    ) -> Result<(), HandlerError>;
}

/// A [`BatchHandler`] as a consumer's handler: `Consumer::builder(db, name, WholeBatch(h))`.
/// In per-message mode it gets batches of one.
#[derive(Clone, Debug, Default)]
pub struct WholeBatch<B>(pub B);

#[async_trait]
impl<B: BatchHandler> Handler for WholeBatch<B> {
    async fn handle(&self, txn: &DatabaseTransaction, msg: &Incoming) -> Result<(), HandlerError> {
        self.0.handle_batch(txn, std::slice::from_ref(msg)).await
    }

    fn whole_batches(&self) -> Option<&dyn BatchHandler> {
        Some(&self.0)
    }
}
