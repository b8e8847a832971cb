//! [`HandlerError`]: why a handler did not apply a message, and whether to retry it.

use crate::error::BoxError;

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
