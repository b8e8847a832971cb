//! `outbox_relays`: one row per running relay, refreshed by its heartbeat, so operators (the
//! `status` command, health checks, a dashboard) can see every relay and whether its broker
//! answers, from the database alone.
//!
//! A new, empty table: creating it takes no lock on `outbox_events`, so it is safe on a live
//! outbox.

use sea_orm_migration::prelude::*;

use crate::timestamp;

/// Creates `outbox_relays` on every backend.
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "seaorm_outbox_m20261201_000007_relay_heartbeats"
    }
}

#[derive(DeriveIden, Clone, Copy)]
enum OutboxRelays {
    Table,
    Name,
    Publisher,
    StartedAt,
    HeartbeatAt,
    Breaker,
    UnavailableSince,
    LastError,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        use OutboxRelays as R;
        manager
            .create_table(
                Table::create()
                    .table(R::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(R::Name)
                            .string_len(64)
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(R::Publisher).string_len(64).not_null())
                    .col(timestamp(manager, R::StartedAt).not_null())
                    .col(timestamp(manager, R::HeartbeatAt).not_null())
                    .col(ColumnDef::new(R::Breaker).string_len(16).not_null())
                    .col(timestamp(manager, R::UnavailableSince).null())
                    .col(ColumnDef::new(R::LastError).text().null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table(OutboxRelays::Table)
                    .if_exists()
                    .to_owned(),
            )
            .await
    }
}
