//! The admin router behind Loco's JWT auth: a valid token (where `auth: jwt: location:` says,
//! bearer header by default) of a listed user.

use async_trait::async_trait;
use axum::http::request::Parts;
use loco_rs::app::AppContext;
use loco_rs::controller::extractor::auth::extract_jwt_from_request_parts;
use seaorm_outbox_admin::{Authorizer, Principal};

use crate::settings::AdminSettings;

/// Lets in the JWT users the `admin:` settings name: `writers` may write, `readers` (or, when
/// absent, every authenticated user) may read.
#[derive(Clone)]
pub struct LocoJwt {
    ctx: AppContext,
    writers: Vec<String>,
    readers: Option<Vec<String>>,
}

impl std::fmt::Debug for LocoJwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocoJwt")
            .field("writers", &self.writers)
            .field("readers", &self.readers)
            .finish_non_exhaustive()
    }
}

impl LocoJwt {
    /// An authorizer on `ctx`'s JWT configuration with `settings`' lists.
    pub fn new(ctx: AppContext, settings: &AdminSettings) -> Self {
        Self {
            ctx,
            writers: settings.writers.clone(),
            readers: settings.readers.clone(),
        }
    }
}

#[async_trait]
impl Authorizer for LocoJwt {
    async fn authorize(&self, request: &Parts) -> Option<Principal> {
        let jwt = extract_jwt_from_request_parts(request, &self.ctx).ok()?;
        let pid = jwt.claims.pid;
        if self.writers.contains(&pid) {
            return Some(Principal::writer(pid));
        }
        match &self.readers {
            Some(readers) if !readers.contains(&pid) => None,
            _ => Some(Principal::reader(pid)),
        }
    }
}
