//! The dashboard: one HTML page with its CSS and JS inlined, embedded in the binary (no CDN,
//! no build step). It holds no data; it calls `/api` from the browser with the host's cookie
//! or the bearer token the operator gives it.

use std::sync::LazyLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};

static PAGE: LazyLock<String> = LazyLock::new(|| {
    include_str!("assets/index.html")
        .replacen("/*STYLE*/", include_str!("assets/style.css"), 1)
        .replacen("/*SCRIPT*/", include_str!("assets/app.js"), 1)
});

/// Inline code only, fetches to this origin only, never framed (its buttons replay and
/// discard, so no clickjacking).
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// `GET /`: the page.
pub(crate) async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        PAGE.as_str(),
    )
        .into_response()
}
