//! The API's one error type and its JSON rendering. The codes and their statuses are
//! [`ErrorCode`] (in the protocol crate: they are the client contract); this adds the message,
//! the field to blame and `Retry-After`.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
pub use kleingate_protocol::ErrorCode;
use kleingate_protocol::{ErrorBody, ErrorDetail, ValidationError};

#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub field: Option<String>,
    pub retry_after: Option<Duration>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }

    /// The HTTP status: always the code's.
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn with_retry_after(mut self, d: Option<Duration>) -> Self {
        self.retry_after = d;
        self
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::NotFound, message)
    }

    /// The experiment store failed: the cause goes to the log (it can name the database file),
    /// the client gets `what`.
    pub fn storage_failed(what: &str, cause: impl std::fmt::Debug) -> Self {
        tracing::error!(cause = ?cause, "{what}");
        ApiError::new(ErrorCode::StorageFailed, what)
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        ApiError {
            code: e.code,
            message: e.message,
            field: e.field,
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.as_str().to_owned(),
                message: self.message,
                field: self.field,
            },
        };
        let mut resp = (status, axum::Json(body)).into_response();
        // For the request's span (its status names the code).
        resp.extensions_mut().insert(self.code);
        if let Some(d) = self.retry_after {
            // Round up: "retry after 0 s" would invite an immediate retry into the same wall.
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            resp.headers_mut()
                .insert("retry-after", HeaderValue::from(secs.max(1)));
        }
        resp
    }
}
