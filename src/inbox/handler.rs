//! The application's side of a consumer: [`Handler`] and its error.

use async_trait::async_trait;
use sea_orm::DatabaseTransaction;

use super::message::Incoming;

use crate::publisher::BoxError;

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

/// Why a handler did not apply a message.
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub struct HandlerError {
    permanent: bool,
    #[source]
    source: BoxError,
}

impl HandlerError {
    /// A failure worth retrying: a deadlock, a timeout, a service briefly down.
    pub fn retry(source: impl Into<BoxError>) -> Self {
        Self {
            permanent: false,
            source: source.into(),
        }
    }

    /// A failure that will repeat: dead-letter the message without retrying.
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        Self {
            permanent: true,
            source: source.into(),
        }
    }

    /// Whether this failure dead-letters at once.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }
}

impl From<sea_orm::DbErr> for HandlerError {
    fn from(e: sea_orm::DbErr) -> Self {
        Self::retry(e)
    }
}

impl From<crate::Error> for HandlerError {
    fn from(e: crate::Error) -> Self {
        Self::retry(e)
    }
}
