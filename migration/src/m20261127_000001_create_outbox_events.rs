//! The `outbox_events` table and the indexes behind each hot query.

use sea_orm::DatabaseBackend;
use sea_orm_migration::prelude::*;

use crate::{OutboxEvents as T, timestamp};

/// Creates `outbox_events`.
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "seaorm_outbox_m20261127_000001_create_outbox_events"
    }
}

/// `(name, columns, partial-index predicate)`. PostgreSQL and SQLite index only the rows the
/// predicate selects, so published history never bloats the hot indexes. MySQL rejects partial
/// indexes, so there the status column leads the index instead.
const INDEXES: &[(&str, &[T], Option<&str>)] = &[
    // The relay's claim: pending rows due now, oldest due first.
    (
        "outbox_events_due_idx",
        &[T::NextAttemptAt, T::Id],
        Some("pending"),
    ),
    // get_unpublished: pending rows by occurred_at, id.
    (
        "outbox_events_pending_idx",
        &[T::OccurredAt, T::Id],
        Some("pending"),
    ),
    // Retention: published rows by age.
    (
        "outbox_events_published_idx",
        &[T::PublishedAt],
        Some("published"),
    ),
    // Dead letters by age.
    (
        "outbox_events_failed_idx",
        &[T::FailedAt, T::Id],
        Some("failed"),
    ),
    // Per-aggregate order checks and replay by aggregate, over every status.
    (
        "outbox_events_aggregate_idx",
        &[
            T::AggregateType,
            T::AggregateId,
            T::Status,
            T::OccurredAt,
            T::Id,
        ],
        None,
    ),
];

/// A required varchar(255) compared byte for byte: MySQL's default collation is
/// case-insensitive, which would merge aggregates `A1` and `a1`.
fn key(manager: &SchemaManager, col: T) -> ColumnDef {
    let mut def = ColumnDef::new(col);
    def.string_len(255).not_null();
    if manager.get_database_backend() == DatabaseBackend::MySql {
        def.extra("COLLATE utf8mb4_bin");
    }
    def
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        manager
            .create_table(
                Table::create()
                    .table(T::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(T::Id).uuid().not_null().primary_key())
                    .col(key(manager, T::EventType))
                    .col(key(manager, T::AggregateType))
                    .col(key(manager, T::AggregateId))
                    .col(ColumnDef::new(T::Payload).json_binary().not_null())
                    .col(ColumnDef::new(T::Headers).json_binary().not_null())
                    .col(timestamp(manager, T::OccurredAt).not_null())
                    .col(timestamp(manager, T::CreatedAt).not_null())
                    .col(ColumnDef::new(T::Status).string_len(16).not_null())
                    .col(ColumnDef::new(T::Attempts).integer().not_null().default(0))
                    .col(ColumnDef::new(T::LastError).text().null())
                    .col(timestamp(manager, T::NextAttemptAt).not_null())
                    .col(timestamp(manager, T::PublishedAt).null())
                    .col(timestamp(manager, T::FailedAt).null())
                    .to_owned(),
            )
            .await?;

        for (name, cols, status) in INDEXES {
            let mut index = Index::create();
            index.name(*name).table(T::Table).if_not_exists();
            match (backend, status) {
                (DatabaseBackend::MySql, Some(_)) => {
                    index.col(T::Status);
                }
                (_, Some(status)) => {
                    index.and_where(Expr::col(T::Status).eq(*status));
                }
                (_, None) => {}
            }
            for col in *cols {
                index.col(*col);
            }
            manager.create_index(index.to_owned()).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(T::Table).if_exists().to_owned())
            .await
    }
}
