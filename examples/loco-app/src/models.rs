//! The domain entity.

/// `orders`.
pub mod orders {
    use sea_orm::entity::prelude::*;
    use serde::Serialize;

    /// An order.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize)]
    #[sea_orm(table_name = "orders")]
    pub struct Model {
        /// Its id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        /// Who placed it.
        pub customer: String,
        /// Its total.
        pub total_cents: i64,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
