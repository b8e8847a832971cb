//! `outbox_backlog_samples`: the backlog once a minute, for the admin dashboard's chart.
//!
//! A relay that refreshes its backlog gauges (`RelayConfig::metrics_interval`) also writes the
//! snapshot into its minute's row, last writer wins, and drops rows older than a day. Several
//! relays share the rows; the chart reads at most a few hundred. Throughput needs no samples:
//! it is counted from the published rows and `outbox_published_tally`.
//!
//! A new, empty table: creating it takes no lock on `outbox_events`.

use sea_orm_migration::prelude::*;

use crate::timestamp;

/// Creates `outbox_backlog_samples` on every backend.
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "seaorm_outbox_m20261202_000011_backlog_samples"
    }
}

#[derive(DeriveIden, Clone, Copy)]
enum OutboxBacklogSamples {
    Table,
    Minute,
    Pending,
    Failed,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        use OutboxBacklogSamples as T;
        manager
            .create_table(
                Table::create()
                    .table(T::Table)
                    .if_not_exists()
                    .col(timestamp(manager, T::Minute).not_null().primary_key())
                    .col(ColumnDef::new(T::Pending).big_integer().not_null())
                    .col(ColumnDef::new(T::Failed).big_integer().not_null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table(OutboxBacklogSamples::Table)
                    .if_exists()
                    .to_owned(),
            )
            .await
    }
}
