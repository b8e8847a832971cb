//! Tenants: the same API over other databases (a relay group's tenants), picked per request
//! by `?tenant=ID`; without it, the database the router was built with.

use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::Uri;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sea_orm::DatabaseConnection;
use serde_json::json;

use crate::AdminState;
use crate::error::ApiError;

/// The database a request acts on, and the tenant it was picked by.
#[derive(Clone)]
pub(crate) struct Db {
    pub(crate) db: DatabaseConnection,
    pub(crate) tenant: Option<String>,
}

impl Db {
    /// `what` with the tenant named, for the audit line.
    pub(crate) fn audited(&self, what: &str) -> String {
        match &self.tenant {
            Some(t) => format!("tenant {t}: {what}"),
            None => what.to_owned(),
        }
    }
}

impl FromRequestParts<Arc<AdminState>> for Db {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AdminState>,
    ) -> Result<Self, Self::Rejection> {
        if let Some(db) = parts.extensions.get::<Db>() {
            return Ok(db.clone());
        }
        pick(parts, state)
    }
}

/// Middleware: picks the request's database from `tenant=` and takes the parameter off the
/// query, so each route's own parameters stay strict.
pub(crate) async fn select(
    State(state): State<Arc<AdminState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let (mut parts, body) = request.into_parts();
    let db = pick(&mut parts, &state)?;
    parts.extensions.insert(db);
    Ok(next.run(Request::from_parts(parts, body)).await)
}

fn pick(parts: &mut Parts, state: &AdminState) -> Result<Db, ApiError> {
    let Some(query) = parts.uri.query() else {
        return Ok(Db {
            db: state.db.clone(),
            tenant: None,
        });
    };
    let mut tenant = None;
    let mut rest = form_urlencoded::Serializer::new(String::new());
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if k == "tenant" {
            if tenant.replace(v.into_owned()).is_some() {
                return Err(ApiError::bad_request("tenant given twice"));
            }
        } else {
            rest.append_pair(&k, &v);
        }
    }
    let Some(tenant) = tenant else {
        return Ok(Db {
            db: state.db.clone(),
            tenant: None,
        });
    };
    let db = state
        .tenants
        .get(&tenant)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("no tenant `{tenant}`")))?;
    let rest = rest.finish();
    let path = parts.uri.path();
    let pq = if rest.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{rest}")
    };
    let mut uri = Uri::builder().path_and_query(pq);
    if let Some(scheme) = parts.uri.scheme() {
        uri = uri.scheme(scheme.clone());
    }
    if let Some(authority) = parts.uri.authority() {
        uri = uri.authority(authority.clone());
    }
    parts.uri = uri
        .build()
        .map_err(|e| ApiError::bad_request(format!("bad query: {e}")))?;
    Ok(Db {
        db,
        tenant: Some(tenant),
    })
}

/// `GET /api/tenants`: the ids `tenant=` takes.
pub(crate) async fn list(State(s): State<Arc<AdminState>>) -> Response {
    let ids: Vec<&String> = s.tenants.keys().collect();
    Json(json!({ "tenants": ids })).into_response()
}
