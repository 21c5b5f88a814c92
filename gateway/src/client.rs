//! Who sent a request: the authenticated key, if auth is on, and the name budgets, rate limits,
//! experiment assignment and votes are kept by.

use std::sync::Arc;

use axum::http::HeaderMap;

use crate::auth::Principal;
use crate::headers::header_text;
use crate::state::AppState;

pub(crate) struct Client {
    pub(crate) principal: Option<Arc<Principal>>,
    /// The key's name, else (auth off) the client header (`budget.header`) the request carries.
    pub(crate) key: Option<String>,
}

impl Client {
    pub(crate) fn identify(
        state: &AppState,
        principal: Option<Arc<Principal>>,
        headers: &HeaderMap,
    ) -> Client {
        let key = match &principal {
            Some(p) => Some(p.name.to_string()),
            None => header_text(headers, state.budgets.header()).map(str::to_owned),
        };
        Client { principal, key }
    }
}
