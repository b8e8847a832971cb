//! The canonical plain-axum service: `POST /orders` writes an order and its event in one
//! transaction, a relay runs beside the server, and the admin API and dashboard are mounted at
//! `/outbox` behind a bearer token.
//!
//! ```text
//! cargo run --example axum_service --features admin
//! curl -s -XPOST localhost:3000/orders -H 'content-type: application/json' \
//!      -d '{"customer":"ada","total_cents":4200}'
//! open http://localhost:3000/outbox          # paste the token it printed
//! ```
//!
//! `DATABASE_URL` picks the database (default: `sqlite://axum_service.db?mode=rwc`, no server
//! needed), `OUTBOX_ADMIN_TOKEN` the admin token (default: a random one, printed), `ADDR` the
//! address (default `127.0.0.1:3000`). The relay prints each event; swap `StdoutPublisher` for
//! `NatsPublisher`, `KafkaPublisher`, … in a real service.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use sea_orm::entity::prelude::*;
use sea_orm::{ActiveValue::Set, Database, DatabaseConnection, Schema, TransactionTrait};
use sea_orm_migration::prelude::*;
use seaorm_outbox::publisher::StdoutPublisher;
use seaorm_outbox::relay::{Relay, RelayConfig};
use seaorm_outbox::{NewEvent, Outbox, OutboxRepository};
use seaorm_outbox_admin::{Admin, BearerTokens};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// The domain table.
mod order {
    use sea_orm::entity::prelude::*;
    use serde::Serialize;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize)]
    #[sea_orm(table_name = "orders")]
    pub(crate) struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub customer: String,
        pub total_cents: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub(crate) enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The app's migration for its own table.
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
        let mut table = schema.create_table_from_entity(order::Entity);
        manager.create_table(table.if_not_exists().to_owned()).await
    }
}

/// The host app's migrator: its own migrations, then the outbox's.
struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut all: Vec<Box<dyn MigrationTrait>> = vec![Box::new(CreateOrders)];
        all.extend(seaorm_outbox_migration::migrations());
        all
    }
}

#[derive(Clone)]
struct AppState {
    db: DatabaseConnection,
}

#[derive(Deserialize)]
struct PlaceOrder {
    customer: String,
    total_cents: i64,
}

/// The order row and its event commit together, or neither does.
async fn place_order(
    State(state): State<AppState>,
    Json(input): Json<PlaceOrder>,
) -> Result<(StatusCode, Json<order::Model>), (StatusCode, String)> {
    let fail = |e: &dyn std::fmt::Display| (StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    let txn = state.db.begin().await.map_err(|e| fail(&e))?;
    let order = order::ActiveModel {
        id: Set(Uuid::now_v7()),
        customer: Set(input.customer),
        total_cents: Set(input.total_cents),
    }
    .insert(&txn)
    .await
    .map_err(|e| fail(&e))?;
    let event = NewEvent::new("order.placed", "order", order.id.to_string()).payload(&order);
    // Bad input (an empty type, a huge payload) is the caller's fault, not the database's.
    Outbox::new(&txn)
        .add_event(event)
        .await
        .map_err(|e| (StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    txn.commit().await.map_err(|e| fail(&e))?;
    Ok((StatusCode::CREATED, Json(order)))
}

/// The whole app: the domain routes and the admin router at `/outbox`.
fn app(db: DatabaseConnection, admin_token: &str) -> Router {
    let admin = Admin::builder(db.clone())
        .authorizer(BearerTokens::new().writer("ops", admin_token))
        .build();
    Router::new()
        .route("/orders", post(place_order))
        .with_state(AppState { db })
        .nest("/outbox", admin)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "sqlite://axum_service.db?mode=rwc".into());
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let token = std::env::var("OUTBOX_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));

    let db = Database::connect(&url).await?;
    Migrator::up(&db, None).await?;

    let stop = CancellationToken::new();
    let relay = Relay::builder(db.clone(), StdoutPublisher::stdout())
        .config(RelayConfig::default().idle_poll_interval(Duration::from_millis(200)))
        .build()?;
    let relay_task = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{addr}; dashboard at http://{addr}/outbox, token {token}");
    let shutdown = stop.clone();
    axum::serve(
        listener,
        app(db, &token).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        let _ = tokio::signal::ctrl_c().await;
        shutdown.cancel();
    })
    .await?;
    // The relay finishes its in-flight batch before the process exits.
    let stats = relay_task.await?;
    println!("relay stopped: published {}", stats.published);
    Ok(())
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use seaorm_outbox::publisher::InMemoryPublisher;
    use tower::ServiceExt;

    use super::*;

    async fn call(app: &Router, method: &str, path: &str, body: &str) -> (StatusCode, String) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .header("authorization", "Bearer t0ken")
            .body(Body::from(body.to_owned()))
            .expect("request");
        let res = app.clone().oneshot(req).await.expect("infallible");
        let status = res.status();
        let body = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .expect("body");
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn an_order_and_its_event_commit_together_and_the_relay_delivers_it() {
        let dir = tempfile::tempdir().expect("dir");
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("app.db").display());
        let db = Database::connect(&url).await.expect("connect");
        Migrator::up(&db, None).await.expect("migrate");
        let app = app(db.clone(), "t0ken");

        let (status, body) = call(
            &app,
            "POST",
            "/orders",
            r#"{"customer":"ada","total_cents":4200}"#,
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let order: serde_json::Value = serde_json::from_str(&body).expect("json");
        let (status, _) = call(&app, "POST", "/orders", r#"{"customer":"ada"}"#).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad input, nothing written"
        );

        let (_, stats) = call(&app, "GET", "/outbox/api/stats", "").await;
        let stats: serde_json::Value = serde_json::from_str(&stats).expect("json");
        assert_eq!(stats["pending"], 1, "{stats}");

        let publisher = InMemoryPublisher::new();
        Relay::builder(db.clone(), publisher.clone())
            .build()
            .expect("relay")
            .drain()
            .await
            .expect("drain");
        let sent = publisher.deliveries();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].aggregate_id, order["id"].as_str().expect("id"));
        assert_eq!(sent[0].payload["customer"], "ada");
        assert_eq!(
            Outbox::new(&db).count_unpublished().await.expect("count"),
            0
        );
    }
}
