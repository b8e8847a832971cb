//! `inbox_consumers`: one row per running consumer process, refreshed by its heartbeat, so an
//! operator sees every consumer (applied, duplicates and dead letters per minute, what it
//! holds and how long its oldest waiting message has waited) from the database alone, as
//! `outbox_relays` does for relays.
//!
//! A new, empty table: creating it locks nothing that exists.

use sea_orm_migration::prelude::*;

use crate::timestamp;

/// Creates `inbox_consumers` on every backend.
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "seaorm_outbox_m20261205_000015_inbox_consumers"
    }
}

#[derive(DeriveIden, Clone, Copy)]
enum InboxConsumers {
    Table,
    Consumer,
    Instance,
    Broker,
    StartedAt,
    HeartbeatAt,
    Applied,
    Duplicates,
    DeadLettered,
    Retries,
    AppliedPerMin,
    DuplicatesPerMin,
    DeadLetteredPerMin,
    Held,
    LagSecs,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        use InboxConsumers as C;
        let count = |c: C| {
            ColumnDef::new(c)
                .big_integer()
                .not_null()
                .default(0)
                .to_owned()
        };
        let rate = |c: C| {
            ColumnDef::new(c)
                .double()
                .not_null()
                .default(0.0)
                .to_owned()
        };
        manager
            .create_table(
                Table::create()
                    .table(C::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(C::Consumer).string_len(255).not_null())
                    .col(ColumnDef::new(C::Instance).string_len(128).not_null())
                    .col(ColumnDef::new(C::Broker).string_len(64).not_null())
                    .col(timestamp(manager, C::StartedAt).not_null())
                    .col(timestamp(manager, C::HeartbeatAt).not_null())
                    .col(count(C::Applied))
                    .col(count(C::Duplicates))
                    .col(count(C::DeadLettered))
                    .col(count(C::Retries))
                    .col(rate(C::AppliedPerMin))
                    .col(rate(C::DuplicatesPerMin))
                    .col(rate(C::DeadLetteredPerMin))
                    .col(count(C::Held))
                    .col(ColumnDef::new(C::LagSecs).double().null())
                    .primary_key(Index::create().col(C::Consumer).col(C::Instance))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table(InboxConsumers::Table)
                    .if_exists()
                    .to_owned(),
            )
            .await
    }
}
