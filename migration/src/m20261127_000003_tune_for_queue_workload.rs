//! PostgreSQL tuning for a queue-shaped table, and an off switch for the insert NOTIFY.
//!
//! * `NOTIFY` costs every writing transaction a global commit-time lock (about 0.4 ms per
//!   transaction measured on PostgreSQL 15, see BENCHMARKS.md). The trigger now skips it when the
//!   setting `seaorm_outbox.notify` is `off`, e.g. `ALTER DATABASE app SET seaorm_outbox.notify
//!   = off` for deployments that poll (or sit behind PgBouncer in transaction pooling mode).
//! * `fillfactor = 90` leaves room on each page for the relay's lease updates.
//! * Aggressive autovacuum thresholds: rows are updated twice and then purged, so dead index
//!   entries must be cleaned promptly or the claim scan slows down.

use sea_orm_migration::prelude::*;

use crate::{NOTIFY_CHANNEL, on_postgres};

/// Tunes the table for PostgreSQL; a no-op elsewhere.
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "seaorm_outbox_m20261127_000003_tune_for_queue_workload"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let notify = format!(
            "CREATE OR REPLACE FUNCTION outbox_events_notify() RETURNS trigger \
             LANGUAGE plpgsql AS $$ BEGIN \
             IF coalesce(current_setting('seaorm_outbox.notify', true), '') <> 'off' THEN \
               PERFORM pg_notify('{NOTIFY_CHANNEL}', TG_TABLE_SCHEMA); \
             END IF; \
             RETURN NULL; END $$"
        );
        on_postgres(
            manager,
            &[
                &notify,
                "ALTER TABLE outbox_events SET (fillfactor = 90, \
                 autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_insert_scale_factor = 0.05, \
                 autovacuum_analyze_scale_factor = 0.02)",
            ],
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let notify = format!(
            "CREATE OR REPLACE FUNCTION outbox_events_notify() RETURNS trigger \
             LANGUAGE plpgsql AS $$ BEGIN \
             PERFORM pg_notify('{NOTIFY_CHANNEL}', TG_TABLE_SCHEMA); RETURN NULL; END $$"
        );
        on_postgres(
            manager,
            &[
                "ALTER TABLE outbox_events RESET (fillfactor, autovacuum_vacuum_scale_factor, \
                 autovacuum_vacuum_insert_scale_factor, autovacuum_analyze_scale_factor)",
                &notify,
            ],
        )
        .await
    }
}
