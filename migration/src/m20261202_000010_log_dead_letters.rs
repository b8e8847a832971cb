//! `outbox_log_dead_letters`: what the log relay (PostgreSQL's logical decoding) gave up on.
//! A message-mode event has no row in `outbox_events` to mark, so its dead letter is kept here.
//!
//! PostgreSQL only: the log relay exists nowhere else, so on MySQL and SQLite this migration
//! records itself and creates nothing. A new, empty table: creating it locks nothing that
//! exists.

use sea_orm_migration::prelude::*;

/// Creates `outbox_log_dead_letters` on PostgreSQL.
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "seaorm_outbox_m20261202_000010_log_dead_letters"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != sea_orm::DatabaseBackend::Postgres {
            return Ok(());
        }
        // Event columns are NULL for a record that could not be read (`raw` keeps it).
        manager
            .get_connection()
            .execute_unprepared(
                "CREATE TABLE IF NOT EXISTS outbox_log_dead_letters (
                    id uuid PRIMARY KEY,
                    slot varchar(63) NOT NULL,
                    event_type varchar(255),
                    aggregate_type varchar(255),
                    aggregate_id varchar(255),
                    payload jsonb,
                    headers jsonb,
                    occurred_at timestamptz,
                    committed_at timestamptz,
                    raw text,
                    error text NOT NULL,
                    attempts integer NOT NULL,
                    failed_at timestamptz NOT NULL
                );
                CREATE INDEX IF NOT EXISTS idx_outbox_log_dead_letters_failed_at
                    ON outbox_log_dead_letters (failed_at, id);",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table(Alias::new("outbox_log_dead_letters"))
                    .if_exists()
                    .to_owned(),
            )
            .await
    }
}
