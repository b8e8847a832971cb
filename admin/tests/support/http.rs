//! Admin API helpers: a seeded outbox with every kind of row, and one request through the
//! router. The admin tests include it with `#[path]`, outside `common/mod.rs`, which the
//! migration crate's tests include without the `admin` feature.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::net::SocketAddr;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request, StatusCode};
use chrono::{Duration, Utc};
use seaorm_outbox::{NewEvent, Outbox, OutboxRepository};
use serde_json::{Value, json};
use tower::ServiceExt;
use uuid::Uuid;

use crate::common::TestDb;

/// What [`seed`] wrote.
pub struct Seeded {
    pub pending: Vec<Uuid>,
    pub published: Vec<Uuid>,
    /// Dead letters: two of aggregate `order/o-1`, one of `order/o-2`.
    pub failed: Vec<Uuid>,
    pub inbox_dead_letter: Uuid,
}

/// 3 pending, 4 published, 3 dead letters and one inbox dead letter.
pub async fn seed(t: &TestDb) -> Seeded {
    let outbox = Outbox::new(&t.db);
    let base = Utc::now() - Duration::minutes(30);
    let add = async |kind: &str, agg: &str, minutes: i64| {
        let e = NewEvent::new(kind, "order", agg)
            .payload(&json!({ "kind": kind, "agg": agg }))
            .occurred_at(base + Duration::minutes(minutes));
        outbox.add_event(e).await.expect("add")
    };
    let mut pending = Vec::new();
    for i in 0..3 {
        pending.push(add("order.created", &format!("p-{i}"), i).await);
    }
    let mut published = Vec::new();
    for i in 0..4 {
        published.push(add("order.shipped", &format!("s-{i}"), 5 + i).await);
    }
    for id in &published {
        outbox.mark_published(*id).await.expect("publish");
    }
    let mut failed = Vec::new();
    for (agg, m) in [("o-1", 10), ("o-1", 11), ("o-2", 12)] {
        failed.push(add("order.paid", agg, m).await);
    }
    for id in &failed {
        outbox
            .mark_failed(*id, "broker said no: <script>alert(1)</script>")
            .await
            .expect("fail");
    }
    let inbox_dead_letter = Uuid::now_v7();
    t.exec(
        "inbox dead letter",
        "INSERT INTO inbox_dead_letters (id, consumer, message_id, headers, payload, error, \
         attempts, received_at, failed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        vec![
            inbox_dead_letter.into(),
            "billing".into(),
            "msg-1".into(),
            "[]".into(),
            b"{\"total\":5}".to_vec().into(),
            "handler said no".into(),
            5.into(),
            Utc::now().into(),
            Utc::now().into(),
        ],
    )
    .await;
    Seeded {
        pending,
        published,
        failed,
        inbox_dead_letter,
    }
}

/// A request to `router`, as from `peer`.
pub struct Call<'a> {
    method: Method,
    path: String,
    headers: Vec<(&'a str, String)>,
    body: Option<String>,
    peer: Option<SocketAddr>,
}

impl<'a> Call<'a> {
    pub fn get(path: &str) -> Self {
        Self::new(Method::GET, path)
    }

    pub fn post(path: &str, body: Value) -> Self {
        Self::new(Method::POST, path)
            .header("content-type", "application/json")
            .raw_body(body.to_string())
    }

    pub fn delete(path: &str) -> Self {
        Self::new(Method::DELETE, path).header("content-type", "application/json")
    }

    pub fn new(method: Method, path: &str) -> Self {
        Self {
            method,
            path: path.to_owned(),
            headers: vec![("host", "localhost".to_owned())],
            body: None,
            peer: None,
        }
    }

    pub fn header(mut self, name: &'a str, value: impl Into<String>) -> Self {
        self.headers.retain(|(n, _)| *n != name);
        self.headers.push((name, value.into()));
        self
    }

    pub fn token(self, token: &str) -> Self {
        self.header("authorization", format!("Bearer {token}"))
    }

    pub fn raw_body(mut self, body: String) -> Self {
        self.body = Some(body);
        self
    }

    pub fn from(mut self, peer: &str) -> Self {
        self.peer = Some(peer.parse().expect("socket address"));
        self
    }

    pub fn describe(&self) -> String {
        format!("{} {}", self.method, self.path)
    }

    /// The status and the JSON body (`Value::Null` when it is not JSON).
    pub async fn send(self, router: &Router) -> (StatusCode, Value) {
        let (status, _, body) = self.send_raw(router).await;
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    pub async fn send_raw(self, router: &Router) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        let mut req = Request::builder().method(self.method).uri(&self.path);
        for (n, v) in &self.headers {
            req = req.header(*n, v);
        }
        let mut req = req
            .body(self.body.map_or_else(Body::empty, Body::from))
            .expect("request");
        if let Some(peer) = self.peer {
            req.extensions_mut().insert(ConnectInfo(peer));
        }
        let res = router.clone().oneshot(req).await.expect("infallible");
        let status = res.status();
        let headers = res.headers().clone();
        let body = axum::body::to_bytes(res.into_body(), 1 << 24)
            .await
            .expect("body");
        (status, headers, body.to_vec())
    }
}
