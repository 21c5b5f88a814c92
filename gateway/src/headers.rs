//! The HTTP headers the API reads and writes, and the small rules about them.

use axum::http::{header, HeaderMap, HeaderName};

use crate::error::{ApiError, ErrorCode};

/// The backend that made the image (answer), or the one a client asks for (request).
pub const BACKEND_HEADER: &str = "x-kleingate-backend";
/// `hit`, `miss`, `coalesced`, `bypass` or `none`.
pub const CACHE_HEADER: &str = "x-kleingate-cache";
/// What this request made a backend spend, USD.
pub const COST_HEADER: &str = "x-kleingate-cost";
/// The experiment a request joins.
pub const EXPERIMENT_HEADER: &str = "x-kleingate-experiment";
/// The variant an experiment request was served by.
pub const VARIANT_HEADER: &str = "x-kleingate-variant";
/// The id of an experiment answer's record, what feedback names.
pub const RESULT_ID_HEADER: &str = "x-kleingate-result-id";
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A header's trimmed, non-empty text.
pub(crate) fn header_text<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

/// JSON routes take JSON only: `Content-Type: application/json` (parameters such as a charset
/// allowed), else 415. A form or `text/plain` post, which a page on another site can send
/// without asking the browser's permission, never reaches a handler.
pub(crate) fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let essence = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::trim);
    match essence {
        Some(t) if t.eq_ignore_ascii_case("application/json") => Ok(()),
        _ => Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "send the request body as JSON with `Content-Type: application/json`",
        )),
    }
}

/// `Cache-Control` directives a client sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CacheDirectives {
    /// Skip the lookup: a fresh image, which then replaces the stored one.
    pub(crate) no_cache: bool,
    /// Also keep the answer out of the cache.
    pub(crate) no_store: bool,
}

impl CacheDirectives {
    pub(crate) fn of(headers: &HeaderMap) -> CacheDirectives {
        let mut out = CacheDirectives::default();
        for d in headers
            .get_all(header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
        {
            match d.trim().to_ascii_lowercase().as_str() {
                "no-cache" => out.no_cache = true,
                "no-store" => {
                    out.no_cache = true;
                    out.no_store = true;
                }
                _ => {}
            }
        }
        out
    }
}

/// A sign-in posted from another site (a form there planting its own key in this browser) is
/// refused: browsers say where a request comes from in `Sec-Fetch-Site` and `Origin`.
pub(crate) fn cross_site(headers: &HeaderMap) -> bool {
    let text = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    if let Some(site) = text("sec-fetch-site") {
        return !matches!(site, "same-origin" | "none");
    }
    // Without Sec-Fetch-Site (plain http to a non-local host): the Origin must name this host,
    // as the client saw it (a proxy may have rewritten Host and kept it in X-Forwarded-Host).
    let Some(origin) = text("origin") else {
        return false;
    };
    let origin_host = origin.split_once("://").map(|(_, h)| h);
    let ours = [text("x-forwarded-host"), text("host")];
    !ours.iter().flatten().any(|h| Some(*h) == origin_host)
}

/// A small JSON or form body (axum's 2 MB limit) as bytes, its rejection as one of our errors: the
/// extractor's own answer would be `text/plain`, outside the API's one error shape.
pub(crate) fn read_body(
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<axum::body::Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                ErrorCode::TooLarge,
                "the request body is over the 2 MB limit",
            )
        } else {
            ApiError::new(
                ErrorCode::InvalidRequest,
                "the request body could not be read",
            )
        }
    })
}
