//! A Loco app with the outbox: `POST /api/orders` writes an order and its `order.placed` event
//! in one transaction; the outbox initializer relays it to NATS from the server process and
//! serves the dashboard at `/outbox` behind Loco's JWT auth.

pub mod app;
pub mod controllers;
pub mod migration;
pub mod models;
