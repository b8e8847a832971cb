//! The consumer side: `inbox_messages` (one row per message a consumer applied, keyed by
//! `(consumer, message_id)`) and `inbox_dead_letters` (messages a consumer gave up on).
//!
//! Independent of the outbox tables: a consuming service can run [`crate::inbox_migrations`]
//! alone. Two new, empty tables: creating them locks nothing that exists.

use sea_orm_migration::prelude::*;

use crate::timestamp;

/// Creates `inbox_messages` and `inbox_dead_letters` on every backend.
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "seaorm_outbox_m20261202_000008_inbox"
    }
}

#[derive(DeriveIden, Clone, Copy)]
enum InboxMessages {
    Table,
    Consumer,
    MessageId,
    Source,
    Position,
    ReceivedAt,
    ProcessedAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum InboxDeadLetters {
    Table,
    Id,
    Consumer,
    MessageId,
    OrderingKey,
    Source,
    Position,
    Headers,
    Payload,
    Error,
    Attempts,
    ReceivedAt,
    FailedAt,
    ReplayRequestedAt,
}

/// Up to 4 GB on MySQL, whose `BLOB` stops at 64 KB; `bytea`/`BLOB` elsewhere.
fn bytes(manager: &SchemaManager, col: impl IntoIden) -> ColumnDef {
    let mut def = ColumnDef::new(col);
    match manager.get_database_backend() {
        sea_orm::DatabaseBackend::MySql => def.custom(Alias::new("LONGBLOB")),
        _ => def.blob(),
    };
    def
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        use InboxDeadLetters as D;
        use InboxMessages as M;
        // 255 + 255 characters keep the key under InnoDB's 3072-byte index limit in utf8mb4.
        manager
            .create_table(
                Table::create()
                    .table(M::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(M::Consumer).string_len(255).not_null())
                    .col(ColumnDef::new(M::MessageId).string_len(255).not_null())
                    .col(ColumnDef::new(M::Source).string_len(255).null())
                    .col(ColumnDef::new(M::Position).string_len(255).null())
                    .col(timestamp(manager, M::ReceivedAt).not_null())
                    .col(timestamp(manager, M::ProcessedAt).not_null())
                    .primary_key(Index::create().col(M::Consumer).col(M::MessageId))
                    .to_owned(),
            )
            .await?;
        // The retention purge deletes oldest first through this index, in bounded batches.
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("idx_inbox_messages_processed_at")
                    .table(M::Table)
                    .col(M::ProcessedAt)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(D::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(D::Id).uuid().not_null().primary_key())
                    .col(ColumnDef::new(D::Consumer).string_len(255).not_null())
                    .col(ColumnDef::new(D::MessageId).string_len(255).null())
                    .col(ColumnDef::new(D::OrderingKey).string_len(255).null())
                    .col(ColumnDef::new(D::Source).string_len(255).null())
                    .col(ColumnDef::new(D::Position).string_len(255).null())
                    .col(ColumnDef::new(D::Headers).text().not_null())
                    .col(bytes(manager, D::Payload).not_null())
                    .col(ColumnDef::new(D::Error).text().not_null())
                    .col(ColumnDef::new(D::Attempts).integer().not_null())
                    .col(timestamp(manager, D::ReceivedAt).not_null())
                    .col(timestamp(manager, D::FailedAt).not_null())
                    .col(timestamp(manager, D::ReplayRequestedAt).null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("idx_inbox_dead_letters_consumer")
                    .table(D::Table)
                    .col(D::Consumer)
                    .col(D::FailedAt)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            InboxDeadLetters::Table.into_iden(),
            InboxMessages::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
