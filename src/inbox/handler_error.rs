//! [`HandlerError`]: why a handler did not apply a message, and whether and when to retry it.

use std::time::Duration;

use crate::error::BoxError;

/// Why a handler did not apply a message.
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub struct HandlerError {
    permanent: bool,
    after: Option<Duration>,
    #[source]
    source: BoxError,
}

impl HandlerError {
    /// A failure worth retrying: a deadlock, a timeout, a service briefly down. The next
    /// attempt waits the consumer's backoff.
    pub fn retry(source: impl Into<BoxError>) -> Self {
        Self {
            permanent: false,
            after: None,
            source: source.into(),
        }
    }

    /// Apply this message later, not before `delay`: what it needs is not there yet (the
    /// order it refers to has not arrived), or it must wait on purpose. Nothing of this attempt
    /// is kept, and it counts towards [`max_attempts`](super::ConsumerConfig::max_attempts).
    /// Where the message waits depends on the source and on its ordering key: see
    /// [`Acknowledge::defer`](super::Acknowledge::defer).
    ///
    /// ```
    /// use std::time::Duration;
    /// use seaorm_outbox::inbox::HandlerError;
    ///
    /// let e = HandlerError::retry_after(Duration::from_secs(30));
    /// assert_eq!(e.retry_delay(), Some(Duration::from_secs(30)));
    /// let e = HandlerError::retry("the order is not there yet").after(Duration::from_secs(5));
    /// assert_eq!(e.retry_delay(), Some(Duration::from_secs(5)));
    /// ```
    pub fn retry_after(delay: Duration) -> Self {
        Self::retry(format!("the handler asked to retry after {delay:?}")).after(delay)
    }

    /// This retryable failure's next attempt waits `delay` instead of the backoff. A
    /// permanent failure stays permanent.
    #[must_use]
    pub fn after(mut self, delay: Duration) -> Self {
        self.after = Some(delay);
        self
    }

    /// A failure that will repeat: dead-letter the message without retrying.
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        Self {
            permanent: true,
            after: None,
            source: source.into(),
        }
    }

    /// Whether this failure dead-letters at once.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }

    /// The delay the handler asked for before the next attempt, if it asked.
    pub fn retry_delay(&self) -> Option<Duration> {
        self.after.filter(|_| !self.permanent)
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
