//! `POST /api/orders`: the order row and its event, one transaction.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use loco_rs::app::AppContext;
use loco_rs::controller::Routes;
use sea_orm::{ActiveModelTrait, ActiveValue::Set, TransactionTrait};
use seaorm_outbox::{NewEvent, Outbox, OutboxRepository};
use serde::Deserialize;

use crate::models::orders;

/// The request body.
#[derive(Debug, Deserialize)]
pub struct PlaceOrder {
    /// Who places it.
    pub customer: String,
    /// Its total.
    pub total_cents: i64,
}

/// Writes the order and its `order.placed` event; both commit or neither does.
async fn create(
    State(ctx): State<AppContext>,
    Json(input): Json<PlaceOrder>,
) -> loco_rs::Result<Response> {
    let txn = ctx.db.begin().await?;
    let order = orders::ActiveModel {
        id: Set(uuid::Uuid::now_v7()),
        customer: Set(input.customer),
        total_cents: Set(input.total_cents),
    }
    .insert(&txn)
    .await?;
    let event = NewEvent::new("order.placed", "order", order.id.to_string()).payload(&order);
    Outbox::new(&txn)
        .add_event(event)
        .await
        .map_err(|e| loco_rs::Error::BadRequest(e.to_string()))?;
    // Through the relays' waker, so they claim the event now rather than at their next poll.
    match seaorm_outbox_loco::waker(&ctx) {
        Some(waker) => waker.commit(txn).await?,
        None => txn.commit().await?,
    }
    Ok((StatusCode::CREATED, Json(order)).into_response())
}

/// The routes.
pub fn routes() -> Routes {
    Routes::new()
        .prefix("/api/orders")
        .add("/", axum::routing::post(create))
}
