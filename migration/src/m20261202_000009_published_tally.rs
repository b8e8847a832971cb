//! `outbox_published_tally`: how many events were published each minute, for relays that
//! delete published rows instead of keeping them (`OnPublish::Delete`).
//!
//! A relay in that mode adds each batch's count to its minute's row in the same transaction as
//! the delete, so the backlog statistics ("published in the last hour") and the retention purge
//! stay right with no published row left to count. Relays that keep rows write nothing here.
//!
//! A new, empty table: creating it takes no lock on `outbox_events`, so it is safe on a live
//! outbox.

use sea_orm_migration::prelude::*;

use crate::timestamp;

/// Creates `outbox_published_tally` on every backend.
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "seaorm_outbox_m20261202_000009_published_tally"
    }
}

#[derive(DeriveIden, Clone, Copy)]
enum OutboxPublishedTally {
    Table,
    Minute,
    Events,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        use OutboxPublishedTally as T;
        manager
            .create_table(
                Table::create()
                    .table(T::Table)
                    .if_not_exists()
                    .col(timestamp(manager, T::Minute).not_null().primary_key())
                    .col(ColumnDef::new(T::Events).big_integer().not_null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table(OutboxPublishedTally::Table)
                    .if_exists()
                    .to_owned(),
            )
            .await
    }
}
