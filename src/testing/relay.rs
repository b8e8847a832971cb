//! [`TestRelay`]: a real relay publishing into memory, on a clock the test moves.

use std::time::Duration;

use sea_orm::DatabaseConnection;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{KitError, wait_for};
use crate::clock::Clock;
use crate::error::Result;
use crate::event::OutboxEvent;
use crate::publisher::InMemoryPublisher;
use crate::relay::{Relay, RelayConfig, RelayStats, RelayWaker};

/// A [`Relay`] with its default configuration (per-aggregate order included), publishing into
/// an [`InMemoryPublisher`], polling every 10 ms, on a [`Clock::adjustable`]. It runs until
/// [`stop`](Self::stop)ped or dropped.
///
/// ```
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use sea_orm::Database;
/// use sea_orm_migration::MigratorTrait;
/// use seaorm_outbox::testing::TestRelay;
/// use seaorm_outbox::{NewEvent, Outbox, OutboxRepository};
///
/// let db = Database::connect("sqlite::memory:").await?;
/// seaorm_outbox_migration::Migrator::up(&db, None).await?;
/// let relay = TestRelay::start(&db)?;
///
/// // The code under test schedules a reminder an hour ahead.
/// let outbox = Outbox::new(&db);
/// let reminder = outbox
///     .add_event(NewEvent::new("cart.reminder", "cart", "7").deliver_after(Duration::from_secs(3600)))
///     .await?;
/// let placed = outbox.add_event(NewEvent::new("order.placed", "order", "42")).await?;
///
/// relay.await_delivered(placed, Duration::from_secs(5)).await?;
/// assert!(relay.published().iter().all(|e| e.id != reminder), "not due yet");
///
/// relay.advance(Duration::from_secs(3600)); // an hour, in no time
/// let sent = relay.await_delivered(reminder, Duration::from_secs(5)).await?;
/// assert_eq!(sent.event_type, "cart.reminder");
/// let stats = relay.stop().await;
/// assert_eq!(stats.published, 2);
/// # Ok(()) }
/// # tokio::runtime::Runtime::new().unwrap().block_on(f()).unwrap();
/// ```
#[derive(Debug)]
pub struct TestRelay {
    publisher: InMemoryPublisher,
    clock: Clock,
    waker: RelayWaker,
    stop: CancellationToken,
    task: Option<JoinHandle<RelayStats>>,
}

impl TestRelay {
    /// Starts the relay on `db`. Call it inside a Tokio runtime.
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config), as [`Relay`]'s builder.
    pub fn start(db: &DatabaseConnection) -> Result<Self> {
        Self::start_with(db, RelayConfig::default())
    }

    /// Starts the relay on `db` with `config`, whose clock and poll interval the kit sets.
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) for a config that cannot work.
    pub fn start_with(db: &DatabaseConnection, config: RelayConfig) -> Result<Self> {
        let clock = Clock::adjustable();
        let publisher = InMemoryPublisher::new();
        let waker = RelayWaker::new();
        let relay = Relay::builder(db.clone(), publisher.clone())
            .config(
                config
                    .clock(clock.clone())
                    .idle_poll_interval(Duration::from_millis(10)),
            )
            .waker(&waker)
            .build()?;
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move { relay.run(token).await });
        Ok(Self {
            publisher,
            clock,
            waker,
            stop,
            task: Some(task),
        })
    }

    /// Every event published so far, in order, duplicates included.
    pub fn published(&self) -> Vec<OutboxEvent> {
        self.publisher.deliveries()
    }

    /// The relay's clock.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Moves the relay's clock forward by `by` and wakes it: what was scheduled, backing off
    /// or due to expire within `by` is handled now.
    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
        self.waker.wake();
    }

    /// Waits until `done` holds for what was published so far, and returns that; wakes the
    /// relay first, so events just committed go at once.
    ///
    /// # Errors
    /// [`KitError::Timeout`] after `timeout`.
    pub async fn drain_until(
        &self,
        mut done: impl FnMut(&[OutboxEvent]) -> bool,
        timeout: Duration,
    ) -> std::result::Result<Vec<OutboxEvent>, KitError> {
        self.waker.wake();
        wait_for(
            || "the condition on the published events".to_owned(),
            timeout,
            || {
                let published = self.published();
                done(&published).then_some(published)
            },
        )
        .await
    }

    /// Waits until the event `id` is published, and returns it as published.
    ///
    /// # Errors
    /// [`KitError::Timeout`] after `timeout`.
    pub async fn await_delivered(
        &self,
        id: Uuid,
        timeout: Duration,
    ) -> std::result::Result<OutboxEvent, KitError> {
        self.waker.wake();
        wait_for(
            || format!("the delivery of event {id}"),
            timeout,
            || self.published().into_iter().find(|e| e.id == id),
        )
        .await
    }

    /// Stops the relay (gracefully: an in-flight batch is written back) and returns its
    /// counts.
    pub async fn stop(mut self) -> RelayStats {
        self.stop.cancel();
        match self.task.take() {
            Some(task) => task.await.unwrap_or_default(),
            None => RelayStats::default(),
        }
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
