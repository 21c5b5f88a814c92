//! The wire protocol of kleingate: what a client may send to `POST /{model}/generate`, how it is
//! validated (Verda's rules plus our configurable bounds), the JSON shapes we answer with, the
//! model catalogue, and the one canonical cache key.
//!
//! Everything here is plain data and pure functions so that the gateway, the backends, the fake
//! upstream used in tests and the fuzz targets all share exactly one definition of a valid request.

mod cache_key;
mod error;
mod error_code;
#[cfg(feature = "fuzzing")]
pub mod fuzz_checks;
pub mod image_check;
mod model;
mod request;
mod response;
#[cfg(feature = "openapi")]
pub mod schema;

pub use cache_key::{CacheKey, CACHE_KEY_VERSION};
pub use error::{ErrorBody, ErrorDetail, ValidationError};
pub use error_code::ErrorCode;
pub use model::Model;
pub use request::{GenerateRequest, InputImage, Limits, OutputFormat};
pub use response::ImageJson;
