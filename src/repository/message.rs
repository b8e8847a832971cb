//! Message mode's writes (PostgreSQL): events as logical messages in the write-ahead log.

use sea_orm::ConnectionTrait;
use uuid::Uuid;

use super::Outbox;
use crate::error::{Error, Result};
use crate::event::{NewEvent, now};
use crate::store;

impl<C: ConnectionTrait> Outbox<'_, C> {
    /// Message mode, whatever [`OutboxConfig::write_mode`](crate::OutboxConfig::write_mode) says: writes the event to
    /// PostgreSQL's write-ahead log as a transactional logical message, in the caller's
    /// transaction, and no table row. The [log relay](crate::relay::wal) delivers it once the
    /// transaction commits; a rolled-back transaction's message is never seen. Validated exactly
    /// like [`add_event`](crate::OutboxRepository::add_event). Never commits.
    ///
    /// ```no_run
    /// use sea_orm::{DatabaseConnection, TransactionSession, TransactionTrait};
    /// use seaorm_outbox::{NewEvent, Outbox};
    ///
    /// # async fn f(db: DatabaseConnection) -> Result<(), Box<dyn std::error::Error>> {
    /// let txn = db.begin().await?;
    /// // ... your domain writes on &txn ...
    /// Outbox::new(&txn).emit(NewEvent::new("order.placed", "order", "42")).await?;
    /// txn.commit().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidEvent`] before anything is written; [`Error::Config`] off PostgreSQL;
    /// database errors.
    #[cfg(feature = "postgres")]
    pub async fn emit(&self, event: NewEvent) -> Result<Uuid> {
        let mut ids = self.emit_events(vec![event]).await?;
        Ok(ids.pop().unwrap_or_default())
    }

    /// [`emit`](Self::emit) for many events, in order; all are validated before any is written.
    ///
    /// # Errors
    /// As [`emit`](Self::emit); one invalid event writes none.
    #[cfg(feature = "postgres")]
    pub async fn emit_events(&self, events: Vec<NewEvent>) -> Result<Vec<Uuid>> {
        let valid = self.validate(events, now())?;
        if let Some(e) = valid.iter().find(|e| e.deliver_at.is_some()) {
            // A logical message is delivered when it is decoded: there is no row to hold.
            return Err(Error::Unsupported {
                what: format!(
                    "event {}: deliver_at in message mode (a logical message has no row to hold \
                     until then; write it in table mode)",
                    e.id
                ),
            });
        }
        let mut ids = Vec::with_capacity(valid.len());
        let mut envelopes = Vec::with_capacity(valid.len());
        for e in &valid {
            ids.push(e.id);
            envelopes.push(e.to_envelope()?);
        }
        store::logical::emit(self.db, &self.config.message_prefix, envelopes).await?;
        Ok(ids)
    }
}
