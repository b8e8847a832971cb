//! The outbox repository: the five-operation contract plus batches and dead-letter handling,
//! generic over any [`ConnectionTrait`] so the same calls work on a pool or inside the caller's
//! transaction. It validates and explains; every statement it sends is in the private `store` module.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sea_orm::ConnectionTrait;
use seaorm_outbox_entity::OutboxStatus;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::event::{DomainEvent, NewEvent, OutboxEvent, now};
use crate::stats::{Health, HealthThresholds, OutboxStats, RelayHeartbeat};
use crate::store::{self, Requeue};

#[cfg(feature = "postgres")]
mod message;
mod schedule;

pub use crate::error::InvalidEventCursor;
pub use crate::store::{
    EventCursor, EventOrder, EventPage, EventQuery, INSERT_CHUNK, MAX_ERROR_BYTES, MAX_PAGE_SIZE,
    MinuteStats, SCHEDULE_MARGIN,
};

/// Repository settings.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct OutboxConfig {
    /// Largest serialised payload accepted, in bytes. Default 1 MiB.
    pub max_payload_bytes: usize,
    /// Where `add_event` writes: the outbox table (default) or, on PostgreSQL, the
    /// write-ahead log for the [log relay](crate::relay::wal).
    pub write_mode: WriteMode,
    /// The logical-message prefix that message mode writes under and the log relay reads.
    /// Default [`MESSAGE_PREFIX`].
    pub message_prefix: String,
    /// How far ahead an event may be scheduled ([`NewEvent::deliver_at`]). Default 365 days.
    pub max_delay: std::time::Duration,
}

/// The default logical-message prefix of message mode.
pub const MESSAGE_PREFIX: &str = "seaorm_outbox";

/// Where [`OutboxRepository::add_event`] writes an event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum WriteMode {
    /// A row in `outbox_events`, for the polling relay (or the log relay in table mode).
    #[default]
    Table,
    /// PostgreSQL only: a transactional logical message (`pg_logical_emit_message`), no row
    /// at all, for the [log relay](crate::relay::wal). Needs the `postgres` feature.
    Message,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: 1024 * 1024,
            write_mode: WriteMode::Table,
            message_prefix: MESSAGE_PREFIX.to_owned(),
            max_delay: std::time::Duration::from_secs(365 * 24 * 3600),
        }
    }
}

impl OutboxConfig {
    setters! {
        /// Sets [`max_payload_bytes`](Self::max_payload_bytes).
        max_payload_bytes: usize,
        /// Sets [`write_mode`](Self::write_mode).
        write_mode: WriteMode,
        /// Sets [`max_delay`](Self::max_delay).
        max_delay: std::time::Duration,
    }

    /// Sets [`message_prefix`](Self::message_prefix).
    #[must_use]
    pub fn message_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.message_prefix = prefix.into();
        self
    }
}

/// The outbox contract.
///
/// Nothing here begins, commits or rolls back a transaction: run it on the caller's
/// [`DatabaseTransaction`](sea_orm::DatabaseTransaction) and the event shares that
/// transaction's fate.
#[async_trait]
pub trait OutboxRepository: Send + Sync {
    /// Stores one event as pending. Never commits. Returns its id.
    async fn add_event(&self, event: NewEvent) -> Result<Uuid>;

    /// Stores many events with one `INSERT` per [`INSERT_CHUNK`] events. All are validated
    /// before any is written. Never commits.
    async fn add_events(&self, events: Vec<NewEvent>) -> Result<Vec<Uuid>>;

    /// Pending events, oldest `occurred_at` first, id breaking ties. Dead letters are excluded.
    /// `limit` above [`MAX_PAGE_SIZE`] is [`Error::LimitTooLarge`].
    async fn get_unpublished(&self, limit: u64, offset: u64) -> Result<Vec<OutboxEvent>>;

    /// Marks a pending event published. Idempotent on a published event; an unknown id is
    /// [`Error::NotFound`]; a dead letter is [`Error::InvalidState`] (replay it first).
    async fn mark_published(&self, id: Uuid) -> Result<()>;

    /// Marks many pending events published in one statement and returns how many changed.
    /// Already-published ids are skipped. If any id is unknown ([`Error::NotFound`]) or a dead
    /// letter ([`Error::InvalidState`]) the error is returned after the others were marked; run it
    /// in a transaction to make that all-or-nothing.
    async fn mark_published_many(&self, ids: &[Uuid]) -> Result<u64>;

    /// How many events are pending (due, in backoff or leased). Dead letters are not counted.
    async fn count_unpublished(&self) -> Result<u64>;

    /// Dead-letters a pending event: status failed, `failed_at` set, the message kept (cut to
    /// [`MAX_ERROR_BYTES`]). Idempotent on a dead letter; a published event is
    /// [`Error::InvalidState`]; an unknown id is [`Error::NotFound`].
    async fn mark_failed(&self, id: Uuid, error_message: &str) -> Result<()>;
}

/// The SeaORM implementation of [`OutboxRepository`], borrowing a connection or transaction.
///
/// ```no_run
/// use sea_orm::{DatabaseConnection, TransactionTrait, TransactionSession};
/// use seaorm_outbox::{NewEvent, Outbox, OutboxRepository};
///
/// # async fn f(db: DatabaseConnection) -> Result<(), Box<dyn std::error::Error>> {
/// let txn = db.begin().await?;
/// // ... your domain writes on &txn ...
/// Outbox::new(&txn)
///     .add_event(NewEvent::new("order.placed", "order", "42").payload(&serde_json::json!({"total": 5})))
///     .await?;
/// txn.commit().await?; // the order row and its event become visible together
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Outbox<'c, C> {
    db: &'c C,
    config: OutboxConfig,
}

impl<'c, C: ConnectionTrait> Outbox<'c, C> {
    /// A repository on `db` with the default [`OutboxConfig`].
    pub fn new(db: &'c C) -> Self {
        Self::with_config(db, OutboxConfig::default())
    }

    /// A repository on `db` with `config`.
    pub fn with_config(db: &'c C, config: OutboxConfig) -> Self {
        Self { db, config }
    }

    /// Stores a typed [`DomainEvent`]. Never commits.
    ///
    /// # Errors
    /// As [`add_event`](OutboxRepository::add_event).
    pub async fn add<E: DomainEvent + Sync>(&self, event: &E) -> Result<Uuid> {
        self.add_event(NewEvent::from_domain(event)).await
    }

    /// A snapshot of the backlog: pending split into due / backoff / leased, dead letters, the
    /// oldest pending event, and what was published in the last hour.
    ///
    /// # Errors
    /// Database errors.
    pub async fn stats(&self) -> Result<OutboxStats> {
        OutboxStats::read(self.db).await
    }

    /// Health against `thresholds`; never fails: an unreadable database is
    /// [`HealthStatus::Unhealthy`](crate::HealthStatus::Unhealthy).
    pub async fn health(&self, thresholds: &HealthThresholds) -> Health {
        Health::from_stats(self.stats().await, thresholds)
    }

    /// The relays heard from within `within` (their heartbeats: name, publisher, circuit
    /// breaker), by name. A relay refreshes its row every
    /// [`heartbeat_interval`](crate::RelayConfig::heartbeat_interval) and removes it when it
    /// stops; a crashed relay's row ages out.
    ///
    /// # Errors
    /// Database errors.
    pub async fn relays(&self, within: std::time::Duration) -> Result<Vec<RelayHeartbeat>> {
        let since = chrono::Duration::from_std(within)
            .ok()
            .and_then(|d| now().checked_sub_signed(d))
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let owners = store::partitions::owners(self.db, since).await?;
        let beats = store::heard_since(self.db, since).await?;
        Ok(RelayHeartbeat::with_partitions(beats, &owners))
    }

    /// One event by id, in any status.
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown id; [`Error::CorruptRow`]; database errors.
    pub async fn get(&self, id: Uuid) -> Result<OutboxEvent> {
        store::get(self.db, id).await?.ok_or(Error::NotFound { id })
    }

    /// The events `query` picks, in any status, a page of them: what an operator browses.
    /// A `limit` over [`MAX_PAGE_SIZE`] is [`Error::LimitTooLarge`].
    ///
    /// # Errors
    /// [`Error::LimitTooLarge`]; database errors.
    pub async fn events(&self, query: &EventQuery) -> Result<Vec<OutboxEvent>> {
        store::events(self.db, query).await
    }

    /// A page of the events `query` picks, and the cursor of the next page: keyset paging, so
    /// a deep page costs what the first does. Pass [`EventPage::next`] back as
    /// [`EventQuery::after`].
    ///
    /// ```
    /// # async fn f(db: &sea_orm::DatabaseConnection) -> seaorm_outbox::Result<()> {
    /// use seaorm_outbox::repository::{EventQuery, Outbox};
    /// use seaorm_outbox::OutboxStatus;
    ///
    /// let outbox = Outbox::new(db);
    /// let mut query = EventQuery::default().status(Some(OutboxStatus::Failed)).limit(100);
    /// loop {
    ///     let page = outbox.events_page(&query).await?;
    ///     for event in &page.events {
    ///         println!("{} {}", event.id, event.last_error.as_deref().unwrap_or(""));
    ///     }
    ///     match page.next {
    ///         Some(next) => query = query.after(Some(next)),
    ///         None => break,
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::LimitTooLarge`]; [`Error::InvalidCursor`] for a cursor of another order;
    /// database errors.
    pub async fn events_page(&self, query: &EventQuery) -> Result<EventPage> {
        store::events_page(self.db, query).await
    }

    /// The last `minutes` minutes (at most a day), oldest first: events published each minute,
    /// and the backlog a relay sampled then (see
    /// [`RelayConfig::metrics_interval`](crate::RelayConfig::metrics_interval)).
    ///
    /// # Errors
    /// Database errors.
    pub async fn history(&self, minutes: u32) -> Result<Vec<MinuteStats>> {
        store::history(self.db, now(), minutes.clamp(1, 24 * 60)).await
    }

    /// Dead letters, most recently failed first.
    ///
    /// # Errors
    /// [`Error::LimitTooLarge`]; database errors.
    pub async fn list_failed(&self, limit: u64, offset: u64) -> Result<Vec<OutboxEvent>> {
        store::check_page(limit)?;
        store::failed(self.db, limit, offset).await
    }

    /// How many dead letters there are.
    ///
    /// # Errors
    /// Database errors.
    pub async fn count_failed(&self) -> Result<u64> {
        store::count(self.db, OutboxStatus::Failed).await
    }

    /// Replays a dead letter: back to pending with attempts reset. The last error is kept for
    /// the record.
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown id; [`Error::InvalidState`] for a pending or
    /// published event; database errors.
    pub async fn replay(&self, id: Uuid) -> Result<()> {
        let n = store::requeue(self.db, Requeue::Id(id), now()).await?;
        self.expect_one(n, id, "replay", &[OutboxStatus::Failed])
            .await
    }

    /// Replays every dead letter; returns how many.
    ///
    /// # Errors
    /// Database errors.
    pub async fn replay_all(&self) -> Result<u64> {
        store::requeue(self.db, Requeue::All, now()).await
    }

    /// Replays the dead letters of one aggregate; returns how many.
    ///
    /// # Errors
    /// Database errors.
    pub async fn replay_aggregate(&self, aggregate_type: &str, aggregate_id: &str) -> Result<u64> {
        let which = Requeue::Aggregate(aggregate_type, aggregate_id);
        store::requeue(self.db, which, now()).await
    }

    /// The old name of [`replay`](Self::replay).
    ///
    /// # Errors
    /// As [`replay`](Self::replay).
    #[deprecated(
        since = "0.2.0",
        note = "renamed `replay`: one verb for every kind of dead letter"
    )]
    pub async fn requeue(&self, id: Uuid) -> Result<()> {
        self.replay(id).await
    }

    /// The old name of [`replay_all`](Self::replay_all).
    ///
    /// # Errors
    /// As [`replay_all`](Self::replay_all).
    #[deprecated(since = "0.2.0", note = "renamed `replay_all`")]
    pub async fn requeue_all(&self) -> Result<u64> {
        self.replay_all().await
    }

    /// The old name of [`replay_aggregate`](Self::replay_aggregate).
    ///
    /// # Errors
    /// As [`replay_aggregate`](Self::replay_aggregate).
    #[deprecated(since = "0.2.0", note = "renamed `replay_aggregate`")]
    pub async fn requeue_aggregate(&self, aggregate_type: &str, aggregate_id: &str) -> Result<u64> {
        self.replay_aggregate(aggregate_type, aggregate_id).await
    }

    /// Deletes a dead letter for good. Only dead letters can be discarded.
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::InvalidState`] for an event that is not a dead letter;
    /// database errors.
    pub async fn discard(&self, id: Uuid) -> Result<()> {
        let n = store::discard(self.db, id).await?;
        self.expect_one(n, id, "discard", &[]).await
    }

    /// Deletes published events whose `published_at` is older than `older_than`, at most
    /// `batch_size` rows per statement, until none are left. Returns how many were deleted.
    ///
    /// Run it on a connection, not inside a transaction: each batch then commits on its own,
    /// so a purge of millions of rows never holds one huge transaction or long locks.
    ///
    /// # Errors
    /// [`Error::LimitTooLarge`] for a batch over the page size; database errors.
    pub async fn purge_published(&self, older_than: DateTime<Utc>, batch_size: u64) -> Result<u64> {
        let mut total = 0;
        loop {
            let n = self.purge_published_batch(older_than, batch_size).await?;
            total += n;
            if n < batch_size {
                return Ok(total);
            }
        }
    }

    /// One statement of [`purge_published`](Self::purge_published): deletes at most
    /// `batch_size` published events older than `older_than`, oldest first, and returns how many.
    /// A `batch_size` of 0 or above [`MAX_PAGE_SIZE`] is [`Error::LimitTooLarge`].
    ///
    /// # Errors
    /// As [`purge_published`](Self::purge_published).
    pub async fn purge_published_batch(
        &self,
        older_than: DateTime<Utc>,
        batch_size: u64,
    ) -> Result<u64> {
        store::purge_published_batch(self.db, older_than, batch_size).await
    }

    /// How many published events are older than `older_than` (what a purge would delete).
    ///
    /// # Errors
    /// Database errors.
    pub async fn count_published_before(&self, older_than: DateTime<Utc>) -> Result<u64> {
        store::count_published_before(self.db, older_than).await
    }

    /// After a conditional single-row change touched `n` rows: `Ok` if it touched one or the row
    /// is already in one of the `ok_if` states; otherwise why not.
    async fn expect_one(
        &self,
        n: u64,
        id: Uuid,
        operation: &'static str,
        ok_if: &[OutboxStatus],
    ) -> Result<()> {
        if n > 0 {
            return Ok(());
        }
        let status = store::statuses(self.db, &[id])
            .await?
            .pop()
            .map(|(_, s)| s)
            .ok_or(Error::NotFound { id })?;
        if ok_if.contains(&status) {
            Ok(())
        } else {
            Err(Error::InvalidState {
                id,
                status,
                operation,
            })
        }
    }
}

#[async_trait]
impl<C: ConnectionTrait> OutboxRepository for Outbox<'_, C> {
    async fn add_event(&self, event: NewEvent) -> Result<Uuid> {
        let mut ids = self.add_events(vec![event]).await?;
        Ok(ids.pop().unwrap_or_default())
    }

    async fn add_events(&self, events: Vec<NewEvent>) -> Result<Vec<Uuid>> {
        if self.config.write_mode == WriteMode::Message {
            #[cfg(feature = "postgres")]
            return self.emit_events(events).await;
            #[cfg(not(feature = "postgres"))]
            return Err(Error::Config(
                "WriteMode::Message needs the `postgres` feature".into(),
            ));
        }
        let at = now();
        let valid = self.validate(events, at)?;
        let ids: Vec<Uuid> = valid.iter().map(|e| e.id).collect();
        store::insert(self.db, valid, at).await?;
        Ok(ids)
    }

    async fn get_unpublished(&self, limit: u64, offset: u64) -> Result<Vec<OutboxEvent>> {
        store::check_page(limit)?;
        store::pending(self.db, limit, offset).await
    }

    async fn mark_published(&self, id: Uuid) -> Result<()> {
        let n = self.mark_published_many(&[id]).await?;
        debug_assert!(n <= 1);
        Ok(())
    }

    async fn mark_published_many(&self, ids: &[Uuid]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let marked = store::mark_published(self.db, ids, now()).await?;
        if marked as usize == ids.len() {
            return Ok(marked);
        }
        // Some ids were not pending: find out whether each is fine (already published) or not.
        let found = store::statuses(self.db, ids).await?;
        for id in ids {
            match found.iter().find(|(f, _)| f == id) {
                None => return Err(Error::NotFound { id: *id }),
                Some((_, OutboxStatus::Failed)) => {
                    return Err(Error::InvalidState {
                        id: *id,
                        status: OutboxStatus::Failed,
                        operation: "mark published",
                    });
                }
                Some(_) => {}
            }
        }
        Ok(marked)
    }

    async fn count_unpublished(&self) -> Result<u64> {
        store::count(self.db, OutboxStatus::Pending).await
    }

    async fn mark_failed(&self, id: Uuid, error_message: &str) -> Result<()> {
        let error = store::truncate_error(error_message);
        let n = store::mark_failed(self.db, id, error, now()).await?;
        self.expect_one(n, id, "mark failed", &[OutboxStatus::Failed])
            .await
    }
}
