//! Who may use the admin API: the [`Authorizer`] the host gives, or loopback clients only when
//! it explicitly chose none. Every `/api` request passes through [`authorize`] first.

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::Response;

use super::AdminState;
use super::error::ApiError;

/// What a caller may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Role {
    /// Read statistics, events and dead letters.
    Read,
    /// Read, and replay, discard and purge.
    Write,
}

/// An authorized caller: a name for the audit log and a role.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Principal {
    /// Who it is, as the write actions' log lines name it (a user, a token's label).
    pub name: String,
    /// What it may do.
    pub role: Role,
}

impl Principal {
    /// A caller who may read only.
    pub fn reader(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            role: Role::Read,
        }
    }

    /// A caller who may also replay, discard and purge.
    pub fn writer(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            role: Role::Write,
        }
    }
}

/// Decides who a request comes from. `None` refuses it (401).
///
/// Any `Fn(&Parts) -> Option<Principal>` is one, for a check of a header or a cookie the host
/// app set; implement the trait for a check that awaits (a session store, a token service).
#[async_trait]
pub trait Authorizer: Send + Sync + 'static {
    /// The caller of the request with these parts (method, URI, headers, extensions), or
    /// `None` if it is not allowed in.
    async fn authorize(&self, request: &Parts) -> Option<Principal>;
}

#[async_trait]
impl<F> Authorizer for F
where
    F: Fn(&Parts) -> Option<Principal> + Send + Sync + 'static,
{
    async fn authorize(&self, request: &Parts) -> Option<Principal> {
        self(request)
    }
}

/// Bearer tokens (`Authorization: Bearer <token>`), each for a role, compared in constant
/// time. The dashboard asks for a token when the API answers 401 and sends it from then on.
#[derive(Clone, Default)]
pub struct BearerTokens {
    tokens: Vec<(Vec<u8>, Principal)>,
}

impl std::fmt::Debug for BearerTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the tokens themselves.
        f.debug_struct("BearerTokens")
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

impl BearerTokens {
    /// No tokens yet: refuses everyone.
    pub fn new() -> Self {
        Self::default()
    }

    /// Accepts `token` for a reader named `name`. An empty token is ignored.
    #[must_use]
    pub fn reader(self, name: impl Into<String>, token: impl Into<String>) -> Self {
        self.with(token.into(), Principal::reader(name))
    }

    /// Accepts `token` for a writer named `name`. An empty token is ignored.
    #[must_use]
    pub fn writer(self, name: impl Into<String>, token: impl Into<String>) -> Self {
        self.with(token.into(), Principal::writer(name))
    }

    fn with(mut self, token: String, principal: Principal) -> Self {
        if !token.is_empty() {
            self.tokens.push((token.into_bytes(), principal));
        }
        self
    }
}

#[async_trait]
impl Authorizer for BearerTokens {
    async fn authorize(&self, request: &Parts) -> Option<Principal> {
        let given = bearer(&request.headers)?;
        // Every token is compared, so the time taken says nothing about which matched.
        let mut found = None;
        for (token, principal) in &self.tokens {
            if constant_time_eq(token, given) && found.is_none() {
                found = Some(principal.clone());
            }
        }
        found
    }
}

/// The token of an `Authorization: Bearer …` header.
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, token) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then_some(token)
        .filter(|t| !t.is_empty())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// How the router lets callers in.
#[derive(Clone)]
pub(crate) enum Gate {
    /// The host's authorizer decides.
    Authorizer(Arc<dyn Authorizer>),
    /// No authorizer: loopback clients only, each a writer named `loopback`.
    LoopbackOnly,
}

/// Middleware on every `/api` route: finds the caller, or refuses the request, and leaves the
/// [`Principal`] in the request's extensions for the handlers.
pub(crate) async fn authorize(
    State(state): State<Arc<AdminState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let (mut parts, body) = request.into_parts();
    let principal = match &state.gate {
        Gate::Authorizer(a) => a.authorize(&parts).await.ok_or_else(|| {
            ApiError::unauthorized("credentials missing or not accepted by the authorizer")
        })?,
        Gate::LoopbackOnly => loopback(&parts)?,
    };
    if is_write(&parts.method) && principal.role < Role::Write {
        return Err(ApiError::forbidden(format!(
            "{} may only read; this action needs the write role",
            principal.name
        )));
    }
    if is_write(&parts.method) && !is_json(&parts.headers) {
        // A cross-site form cannot send this content type without a CORS preflight, so a
        // cookie-authenticated operator's browser cannot be made to replay or purge.
        return Err(ApiError::unsupported_media_type(
            "write actions take Content-Type: application/json",
        ));
    }
    parts.extensions.insert(principal);
    Ok(next.run(Request::from_parts(parts, body)).await)
}

/// With no authorizer: a client on a loopback address that reached us directly.
fn loopback(parts: &Parts) -> Result<Principal, ApiError> {
    let Some(ConnectInfo(peer)) = parts.extensions.get::<ConnectInfo<SocketAddr>>() else {
        return Err(ApiError::forbidden(
            "allow_unauthenticated() serves loopback clients only, and this server does not say \
             who the client is: serve the app with into_make_service_with_connect_info::<SocketAddr>()",
        ));
    };
    if !peer.ip().to_canonical().is_loopback() {
        return Err(ApiError::forbidden(format!(
            "unauthenticated access is for loopback clients only; {} is not one",
            peer.ip()
        )));
    }
    // A reverse proxy on this host makes every client look local: refuse what it forwarded.
    let forwarded = ["forwarded", "x-forwarded-for", "x-real-ip"];
    if forwarded.iter().any(|h| parts.headers.contains_key(*h)) {
        return Err(ApiError::forbidden(
            "unauthenticated access refuses proxied requests: configure an authorizer",
        ));
    }
    // A page on another site that rebinds its name to 127.0.0.1 still sends its own Host.
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !is_loopback_host(host) {
        return Err(ApiError::forbidden(format!(
            "unauthenticated access needs a loopback Host header, not {host:?}"
        )));
    }
    Ok(Principal::writer("loopback"))
}

fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn is_write(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

/// The caller, in a handler behind [`authorize`].
pub(crate) struct Caller(pub(crate) Principal);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .map(Caller)
            .ok_or_else(|| ApiError::unauthorized("no caller"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:1",
            "[::1]:80",
            "[::1]",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "",
            "evil.example",
            "evil.example:80",
            "10.0.0.1",
            "127.0.0.1.evil.io",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }

    #[test]
    fn bearer_header() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().expect("value"));
        assert_eq!(bearer(&h), Some(&b"abc"[..]));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().expect("value"));
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer ".parse().expect("value"));
        assert_eq!(bearer(&h), None);
    }
}
