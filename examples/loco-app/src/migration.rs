//! The app's migrator: its `orders` table, then the outbox's (and inbox's) tables.

use sea_orm::Schema;
use sea_orm_migration::prelude::*;

use crate::models::orders;

/// The app's migrator.
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut all: Vec<Box<dyn MigrationTrait>> = vec![Box::new(CreateOrders)];
        all.extend(seaorm_outbox_migration::migrations());
        all
    }
}

struct CreateOrders;

impl MigrationName for CreateOrders {
    fn name(&self) -> &str {
        "m20261202_000001_create_orders"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateOrders {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let schema = Schema::new(manager.get_database_backend());
        let mut table = schema.create_table_from_entity(orders::Entity);
        manager.create_table(table.if_not_exists().to_owned()).await
    }
}
