//! [`LogDeadLetters`]: what the log relay gave up on, listed, replayed and discarded.

use sea_orm::{ConnectionTrait, TransactionTrait};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::repository::MESSAGE_PREFIX;
use crate::store::{self, LogDeadLetter, log_dead_letters};

/// The log relay's dead letters, in `outbox_log_dead_letters`: events the broker rejected (or
/// refused until their last attempt), and records the relay could not read.
///
/// Replaying deletes the row and writes its event to the log again as a message, in one
/// transaction, so the relay delivers it as a new event (with the same id). A record that was
/// never readable has no event: it can be read here and discarded, not replayed.
///
/// ```no_run
/// use seaorm_outbox::relay::wal::LogDeadLetters;
///
/// # async fn f(db: sea_orm::DatabaseConnection) -> seaorm_outbox::Result<()> {
/// let dead = LogDeadLetters::new(&db);
/// for d in dead.list(50, 0).await? {
///     println!("{} {}", d.id, d.error);
/// }
/// dead.replay_all().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct LogDeadLetters<'c, C> {
    db: &'c C,
    prefix: String,
}

impl<'c, C: ConnectionTrait> LogDeadLetters<'c, C> {
    /// The dead letters on `db`; replays write under the default message prefix.
    pub fn new(db: &'c C) -> Self {
        Self {
            db,
            prefix: MESSAGE_PREFIX.to_owned(),
        }
    }

    /// Replays write under `prefix` (the relay's [`message_prefix`]).
    ///
    /// [`message_prefix`]: super::LogRelayConfig::message_prefix
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Oldest first. `limit` above [`MAX_PAGE_SIZE`](crate::repository::MAX_PAGE_SIZE) is
    /// [`Error::LimitTooLarge`].
    ///
    /// # Errors
    /// [`Error::LimitTooLarge`]; database errors.
    pub async fn list(&self, limit: u64, offset: u64) -> Result<Vec<LogDeadLetter>> {
        store::check_page(limit)?;
        log_dead_letters::dead_letters(self.db, limit, offset).await
    }

    /// One, or `None`.
    ///
    /// # Errors
    /// Database errors.
    pub async fn get(&self, id: Uuid) -> Result<Option<LogDeadLetter>> {
        log_dead_letters::dead_letter_by_id(self.db, id).await
    }

    /// How many there are.
    ///
    /// # Errors
    /// Database errors.
    pub async fn count(&self) -> Result<u64> {
        log_dead_letters::count_dead_letters(self.db).await
    }

    /// Deletes one; an unknown id is [`Error::NotFound`].
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown id; database errors.
    pub async fn discard(&self, id: Uuid) -> Result<()> {
        if log_dead_letters::discard_dead_letter(self.db, id).await? {
            Ok(())
        } else {
            Err(Error::NotFound { id })
        }
    }
}

impl<C: ConnectionTrait + TransactionTrait> LogDeadLetters<'_, C> {
    /// Sends one back through the log. [`Error::NotFound`] for an unknown id;
    /// [`Error::CorruptRow`] for a record that was never readable.
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::CorruptRow`] for a record that was never readable; database
    /// errors.
    pub async fn replay(&self, id: Uuid) -> Result<()> {
        log_dead_letters::replay_dead_letters(self.db, &self.prefix, Some(id)).await?;
        Ok(())
    }

    /// Sends every readable one back through the log, oldest first; how many.
    ///
    /// # Errors
    /// Database errors.
    pub async fn replay_all(&self) -> Result<u64> {
        log_dead_letters::replay_dead_letters(self.db, &self.prefix, None).await
    }
}
