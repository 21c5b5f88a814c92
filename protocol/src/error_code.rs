//! Every error code the API answers with, and the HTTP status each one has: the client contract in
//! one place. `docs/api.md` lists the same codes in its error table; a test keeps the two equal.

use std::fmt;

macro_rules! error_codes {
    ($($(#[$doc:meta])* $variant:ident = ($status:literal, $code:literal),)*) => {
        /// An API error code (`{"error": {"code": ...}}`) with its one HTTP status.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($(#[$doc])* $variant,)*
        }

        impl ErrorCode {
            /// Every code, in the order of `docs/api.md`'s table.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The code as it appears on the wire.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $code,)*
                }
            }

            /// The HTTP status every answer with this code has.
            pub const fn status(self) -> u16 {
                match self {
                    $(ErrorCode::$variant => $status,)*
                }
            }
        }
    };
}

error_codes! {
    /// A field breaks a rule, or a backend refused the request (its words passed on).
    InvalidRequest = (400, "invalid_request"),
    /// The body is not a JSON object.
    InvalidJson = (400, "invalid_json"),
    /// `X-Kleingate-Backend` names no configured backend.
    UnknownBackend = (400, "unknown_backend"),
    /// `X-Kleingate-Backend` names a backend that does not serve the model.
    BackendCannotServe = (400, "backend_cannot_serve"),
    /// The forced backend cannot run the safety checker the request asks for.
    SafetyCheckerUnavailable = (400, "safety_checker_unavailable"),
    /// `X-Kleingate-Experiment` names no configured experiment.
    UnknownExperiment = (400, "unknown_experiment"),
    /// No valid API key.
    Unauthorized = (401, "unauthorized"),
    /// The client may not choose a backend.
    BackendHeaderNotAllowed = (403, "backend_header_not_allowed"),
    /// The key may not use this model.
    ModelNotAllowed = (403, "model_not_allowed"),
    /// The key may not use this backend.
    BackendNotAllowed = (403, "backend_not_allowed"),
    /// The key may not read experiment data.
    ExperimentsNotAllowed = (403, "experiments_not_allowed"),
    /// A sign-in form posted from another site.
    CrossSiteLogin = (403, "cross_site_login"),
    /// The URL or the `model` field names no klein model.
    UnknownModel = (404, "unknown_model"),
    /// No such route, experiment, result or image.
    NotFound = (404, "not_found"),
    /// The route does not take this method.
    MethodNotAllowed = (405, "method_not_allowed"),
    /// The body did not arrive in time.
    BodyTimeout = (408, "body_timeout"),
    /// The body, or an image in it, is over its size limit.
    TooLarge = (413, "too_large"),
    /// A JSON route was sent something that is not `application/json`.
    UnsupportedMediaType = (415, "unsupported_media_type"),
    /// The client's daily budget is spent.
    BudgetExceeded = (429, "budget_exceeded"),
    /// The client's rate limit is reached.
    RateLimited = (429, "rate_limited"),
    /// A backend's generation failed.
    GenerationFailed = (500, "generation_failed"),
    /// The experiment store could not be read or written.
    StorageFailed = (500, "storage_failed"),
    /// A backend answered an error or nonsense.
    BadGateway = (502, "bad_gateway"),
    /// The gateway is at its limit of requests in flight.
    Overloaded = (503, "overloaded"),
    /// No configured backend serves the model.
    NoBackend = (503, "no_backend"),
    /// Every backend that serves the model is unavailable now.
    NoBackendAvailable = (503, "no_backend_available"),
    /// The gateway is not ready (no backend available, or shutting down).
    NotReady = (503, "not_ready"),
    /// The request deadline passed.
    Timeout = (504, "timeout"),
}

impl ErrorCode {
    /// The code with this wire name.
    pub fn from_wire(code: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|c| c.as_str() == code)
    }
}

#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for ErrorCode {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .enum_values(Some(ErrorCode::ALL.iter().map(|c| c.as_str())))
            .description(Some("An API error code (docs/api.md, errors)"))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for ErrorCode {}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(c.as_str()), "{c} listed twice");
            assert!(c
                .as_str()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_'));
            assert_eq!(ErrorCode::from_wire(c.as_str()), Some(*c));
            assert!((400..600).contains(&c.status()), "{c}: {}", c.status());
        }
        assert_eq!(ErrorCode::from_wire("no_such_code"), None);
    }
}
