//! The relay's lease columns and, on PostgreSQL, the insert trigger that wakes relays.

use sea_orm::DatabaseBackend;
use sea_orm_migration::prelude::*;

use crate::{NOTIFY_CHANNEL, OutboxEvents as T, timestamp};

/// Adds `locked_by` / `locked_until` and the PostgreSQL `NOTIFY` trigger.
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "seaorm_outbox_m20261127_000002_relay_lease_and_notify"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // SQLite takes one ADD COLUMN per statement.
        manager
            .alter_table(
                Table::alter()
                    .table(T::Table)
                    .add_column(ColumnDef::new(T::LockedBy).string_len(64).null())
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(T::Table)
                    .add_column(timestamp(manager, T::LockedUntil).null())
                    .to_owned(),
            )
            .await?;

        if manager.get_database_backend() == DatabaseBackend::Postgres {
            // A statement-level trigger: one NOTIFY per INSERT statement (a batch insert sends
            // one), queued inside the writer's transaction, so it is delivered only on commit and
            // never for a rollback. The payload names the schema, so tenants on one server don't
            // wake each other's relays.
            let db = manager.get_connection();
            db.execute_unprepared(&format!(
                "CREATE OR REPLACE FUNCTION outbox_events_notify() RETURNS trigger \
                 LANGUAGE plpgsql AS $$ BEGIN \
                 PERFORM pg_notify('{NOTIFY_CHANNEL}', TG_TABLE_SCHEMA); RETURN NULL; END $$"
            ))
            .await?;
            db.execute_unprepared(
                "CREATE TRIGGER outbox_events_notify AFTER INSERT ON outbox_events \
                 FOR EACH STATEMENT EXECUTE FUNCTION outbox_events_notify()",
            )
            .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DatabaseBackend::Postgres {
            let db = manager.get_connection();
            db.execute_unprepared("DROP TRIGGER IF EXISTS outbox_events_notify ON outbox_events")
                .await?;
            db.execute_unprepared("DROP FUNCTION IF EXISTS outbox_events_notify()")
                .await?;
        }
        for col in [T::LockedUntil, T::LockedBy] {
            manager
                .alter_table(Table::alter().table(T::Table).drop_column(col).to_owned())
                .await?;
        }
        Ok(())
    }
}
