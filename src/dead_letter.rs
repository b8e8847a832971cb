//! One interface over the three kinds of dead letters: the outbox's failed events, the inbox's
//! messages a consumer gave up on, and the log relay's records (PostgreSQL). The CLI and the
//! admin API list, show, count, replay and discard each kind through [`DeadLetterStore`], so a
//! new kind is one implementation, not a copy of every command and endpoint.
//!
//! ```
//! use seaorm_outbox::dead_letter::{DeadLetterStore, OutboxDeadLetters, Selection};
//!
//! # async fn example(db: sea_orm::DatabaseConnection) -> seaorm_outbox::Result<()> {
//! let dead = OutboxDeadLetters::new(&db);
//! for d in dead.list(Selection::All, 50, 0).await? {
//!     println!("{} {} after {} attempts: {}", d.id, d.summary, d.attempts, d.error);
//! }
//! dead.replay(Selection::Aggregate("order", "o-1")).await?;
//! # Ok(()) }
//! ```

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sea_orm::ConnectionTrait;
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::event::OutboxEvent;
use crate::inbox::{DeadLetters, Inbox, InboxDeadLetter};
use crate::repository::Outbox;

/// Which kind of dead letter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DeadLetterKind {
    /// An outbox event the relay gave up on (`outbox_events`, status `failed`).
    Outbox,
    /// A message a consumer gave up on (`inbox_dead_letters`).
    Inbox,
    /// A record the log relay gave up on (`outbox_log_dead_letters`, PostgreSQL).
    Log,
}

impl DeadLetterKind {
    /// Its name in messages: `dead letter`, `inbox dead letter`, `log dead letter`.
    pub fn noun(self) -> &'static str {
        match self {
            Self::Outbox => "dead letter",
            Self::Inbox => "inbox dead letter",
            Self::Log => "log dead letter",
        }
    }
}

/// Which dead letters an operation covers. Not every kind has every group: see each store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Selection<'a> {
    /// One, by id.
    One(Uuid),
    /// The outbox's: every one of this aggregate (type, id).
    Aggregate(&'a str, &'a str),
    /// The inbox's: every one of this consumer.
    Consumer(&'a str),
    /// Every one.
    All,
}

/// One dead letter of any kind, as the CLI and the admin API show it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Its kind.
    pub kind: DeadLetterKind,
    /// Its id (the event's id for the outbox and the log relay).
    pub id: Uuid,
    /// When it was given up.
    pub failed_at: Option<DateTime<Utc>>,
    /// Attempts spent.
    pub attempts: u32,
    /// The last error.
    pub error: String,
    /// One line saying what it is: `order.placed order/o-1`, `billing 0193… (orders)`.
    pub summary: String,
    /// Whether a replay was asked for and not yet done (the inbox's replays wait for the
    /// consumer).
    pub replay_pending: bool,
    /// The whole record as JSON: the event, or the inbox message with its payload as
    /// `{"text": …}` (UTF-8) or `{"bytes": […]}`, or the log record.
    pub detail: Value,
}

/// List, show, count, replay and discard one kind of dead letters.
#[async_trait]
pub trait DeadLetterStore: Send + Sync {
    /// The kind this store holds.
    fn kind(&self) -> DeadLetterKind;

    /// At most `limit` dead letters of `which` (a group or [`Selection::All`]), from `offset`.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for a selection this kind has no such group for; database errors.
    async fn list(&self, which: Selection<'_>, limit: u64, offset: u64) -> Result<Vec<DeadLetter>>;

    /// How many dead letters `which` covers.
    ///
    /// # Errors
    /// As [`list`](Self::list).
    async fn count(&self, which: Selection<'_>) -> Result<u64>;

    /// One dead letter, or `None`.
    ///
    /// # Errors
    /// Database errors.
    async fn show(&self, id: Uuid) -> Result<Option<DeadLetter>> {
        Ok(self
            .list(Selection::One(id), 1, 0)
            .await?
            .into_iter()
            .next())
    }

    /// Sends these dead letters to be delivered or applied again; returns how many.
    ///
    /// # Errors
    /// [`Error::NotFound`] / [`Error::InvalidState`] for a [`Selection::One`] that is not a dead
    /// letter of this kind; [`Error::Unsupported`]; database errors.
    async fn replay(&self, which: Selection<'_>) -> Result<u64>;

    /// Deletes these dead letters without delivering them; returns how many.
    ///
    /// # Errors
    /// As [`replay`](Self::replay).
    async fn discard(&self, which: Selection<'_>) -> Result<u64>;
}

fn unsupported(kind: DeadLetterKind, op: &str, which: Selection<'_>) -> Error {
    Error::Unsupported {
        what: format!("{op} of {}s by {which:?}", kind.noun()),
    }
}

/// The outbox's dead letters: failed events. Lists [`Selection::All`] or one; replays one, an
/// aggregate or all (back to pending, attempts reset); discards one.
#[derive(Debug)]
pub struct OutboxDeadLetters<'a, C> {
    db: &'a C,
}

impl<'a, C: ConnectionTrait> OutboxDeadLetters<'a, C> {
    /// The outbox's dead letters on `db`.
    pub fn new(db: &'a C) -> Self {
        Self { db }
    }
}

fn from_event(e: OutboxEvent) -> DeadLetter {
    DeadLetter {
        kind: DeadLetterKind::Outbox,
        id: e.id,
        failed_at: e.failed_at,
        attempts: e.attempts,
        error: e.last_error.clone().unwrap_or_default(),
        summary: format!("{} {}/{}", e.event_type, e.aggregate_type, e.aggregate_id),
        replay_pending: false,
        detail: serde_json::to_value(&e).unwrap_or(Value::Null),
    }
}

#[async_trait]
impl<C: ConnectionTrait + Send + Sync> DeadLetterStore for OutboxDeadLetters<'_, C> {
    fn kind(&self) -> DeadLetterKind {
        DeadLetterKind::Outbox
    }

    async fn list(&self, which: Selection<'_>, limit: u64, offset: u64) -> Result<Vec<DeadLetter>> {
        let outbox = Outbox::new(self.db);
        match which {
            Selection::All => Ok(outbox
                .list_failed(limit, offset)
                .await?
                .into_iter()
                .map(from_event)
                .collect()),
            Selection::One(id) => match outbox.get(id).await {
                Ok(e) if e.status == crate::OutboxStatus::Failed => Ok(vec![from_event(e)]),
                Ok(_) | Err(Error::NotFound { .. }) => Ok(vec![]),
                Err(e) => Err(e),
            },
            other => Err(unsupported(self.kind(), "listing", other)),
        }
    }

    async fn count(&self, which: Selection<'_>) -> Result<u64> {
        match which {
            Selection::All => Outbox::new(self.db).count_failed().await,
            other => Err(unsupported(self.kind(), "counting", other)),
        }
    }

    async fn replay(&self, which: Selection<'_>) -> Result<u64> {
        let outbox = Outbox::new(self.db);
        match which {
            Selection::One(id) => outbox.replay(id).await.map(|()| 1),
            Selection::Aggregate(t, id) => outbox.replay_aggregate(t, id).await,
            Selection::All => outbox.replay_all().await,
            other => Err(unsupported(self.kind(), "replay", other)),
        }
    }

    async fn discard(&self, which: Selection<'_>) -> Result<u64> {
        match which {
            Selection::One(id) => Outbox::new(self.db).discard(id).await.map(|()| 1),
            other => Err(unsupported(self.kind(), "discarding", other)),
        }
    }
}

/// The inbox's dead letters. Every operation takes one, a consumer's or all; a replay asks
/// the running consumer to apply them again (within its `replay_interval`).
#[derive(Debug)]
pub struct InboxDeadLetters<'a, C> {
    db: &'a C,
}

impl<'a, C: ConnectionTrait> InboxDeadLetters<'a, C> {
    /// The inbox's dead letters on `db`.
    pub fn new(db: &'a C) -> Self {
        Self { db }
    }

    fn select<'s>(&self, op: &str, which: Selection<'s>) -> Result<DeadLetters<'s>> {
        Ok(match which {
            Selection::One(id) => DeadLetters::Id(id),
            Selection::Consumer(c) => DeadLetters::Consumer(c),
            Selection::All => DeadLetters::All,
            other => return Err(unsupported(DeadLetterKind::Inbox, op, other)),
        })
    }
}

/// An inbox dead letter as JSON: the payload as text when it is UTF-8, else as bytes.
fn inbox_detail(d: &InboxDeadLetter) -> Value {
    let payload = match std::str::from_utf8(&d.payload) {
        Ok(text) => json!({ "text": text }),
        Err(_) => json!({ "bytes": d.payload }),
    };
    json!({
        "id": d.id,
        "consumer": d.consumer,
        "message_id": d.message_id,
        "ordering_key": d.ordering_key,
        "source": d.source,
        "position": d.position,
        "headers": d.headers,
        "payload": payload,
        "error": d.error,
        "attempts": d.attempts,
        "received_at": d.received_at,
        "failed_at": d.failed_at,
        "replay_requested_at": d.replay_requested_at,
    })
}

fn from_inbox(d: InboxDeadLetter) -> DeadLetter {
    DeadLetter {
        kind: DeadLetterKind::Inbox,
        id: d.id,
        failed_at: Some(d.failed_at),
        attempts: d.attempts,
        error: d.error.clone(),
        summary: format!(
            "{:<16} {}",
            d.consumer,
            d.message_id.as_deref().unwrap_or("(no id)")
        ),
        replay_pending: d.replay_requested_at.is_some(),
        detail: inbox_detail(&d),
    }
}

#[async_trait]
impl<C: ConnectionTrait + Send + Sync> DeadLetterStore for InboxDeadLetters<'_, C> {
    fn kind(&self) -> DeadLetterKind {
        DeadLetterKind::Inbox
    }

    async fn list(&self, which: Selection<'_>, limit: u64, offset: u64) -> Result<Vec<DeadLetter>> {
        let which = self.select("listing", which)?;
        let rows = Inbox::new(self.db)
            .dead_letters(which, limit, offset)
            .await?;
        Ok(rows.into_iter().map(from_inbox).collect())
    }

    async fn count(&self, which: Selection<'_>) -> Result<u64> {
        let inbox = Inbox::new(self.db);
        match self.select("counting", which)? {
            DeadLetters::Consumer(c) => inbox.count_dead_letters(Some(c)).await,
            DeadLetters::All => inbox.count_dead_letters(None).await,
            _ => Ok(self.list(which, 1, 0).await?.len() as u64),
        }
    }

    async fn replay(&self, which: Selection<'_>) -> Result<u64> {
        Inbox::new(self.db)
            .replay(self.select("replay", which)?)
            .await
    }

    async fn discard(&self, which: Selection<'_>) -> Result<u64> {
        Inbox::new(self.db)
            .discard(self.select("discarding", which)?)
            .await
    }
}

#[cfg(feature = "postgres")]
mod log {
    //! The log relay's dead letters, through [`LogDeadLetters`].

    use async_trait::async_trait;
    use sea_orm::{ConnectionTrait, TransactionTrait};
    use serde_json::Value;

    use super::{DeadLetter, DeadLetterKind, DeadLetterStore, Selection, unsupported};
    use crate::error::Result;
    use crate::relay::wal::{LogDeadLetter, LogDeadLetters};

    fn from_log(d: LogDeadLetter) -> DeadLetter {
        let summary = match &d.event {
            Some(e) => format!("{} {}/{}", e.event_type, e.aggregate_type, e.aggregate_id),
            None => "(unreadable record)".to_owned(),
        };
        DeadLetter {
            kind: DeadLetterKind::Log,
            id: d.id,
            failed_at: Some(d.failed_at),
            attempts: d.attempts,
            error: d.error.clone(),
            summary,
            replay_pending: false,
            detail: serde_json::to_value(&d).unwrap_or(Value::Null),
        }
    }

    /// Lists all or one; replays one or all (the event written to the log again, same id);
    /// discards one.
    #[async_trait]
    impl<C: ConnectionTrait + TransactionTrait + Send + Sync> DeadLetterStore
        for LogDeadLetters<'_, C>
    {
        fn kind(&self) -> DeadLetterKind {
            DeadLetterKind::Log
        }

        async fn list(
            &self,
            which: Selection<'_>,
            limit: u64,
            offset: u64,
        ) -> Result<Vec<DeadLetter>> {
            match which {
                Selection::All => Ok(LogDeadLetters::list(self, limit, offset)
                    .await?
                    .into_iter()
                    .map(from_log)
                    .collect()),
                Selection::One(id) => Ok(self.get(id).await?.map(from_log).into_iter().collect()),
                other => Err(unsupported(self.kind(), "listing", other)),
            }
        }

        async fn count(&self, which: Selection<'_>) -> Result<u64> {
            match which {
                Selection::All => LogDeadLetters::count(self).await,
                other => Err(unsupported(self.kind(), "counting", other)),
            }
        }

        async fn replay(&self, which: Selection<'_>) -> Result<u64> {
            match which {
                Selection::One(id) => LogDeadLetters::replay(self, id).await.map(|()| 1),
                Selection::All => self.replay_all().await,
                other => Err(unsupported(self.kind(), "replay", other)),
            }
        }

        async fn discard(&self, which: Selection<'_>) -> Result<u64> {
            match which {
                Selection::One(id) => LogDeadLetters::discard(self, id).await.map(|()| 1),
                other => Err(unsupported(self.kind(), "discarding", other)),
            }
        }
    }
}
