//! The kleingate gateway: one Verda-compatible `generate` API in front of several image backends,
//! with routing, fallback, circuit breaking, a cache with request coalescing, and metrics.
//!
//! Request path (docs/architecture.md): [`routes`] (paths and layers) → [`auth`] (API key) →
//! [`admission`] (rate limit, load shedding) → `routes::generate` → `generate` (read and
//! validate, the key's scope, an experiment's variant, then [`cache`] lookup / coalescing,
//! [`routing`] candidates in order, the budget, [`dispatch`]: attempts with breaker, limits,
//! deadline) → backend; the answer comes back as data and `routes::generate` writes the HTTP
//! answer, its headers and metrics.

mod access;
pub mod admission;
pub mod auth;
pub mod budget;
pub mod cache;
pub mod circuit;
mod client;
pub mod config;
pub mod dispatch;
pub mod error;
pub mod experiments;
pub mod fetch;
pub(crate) mod generate;
pub mod headers;
pub mod metrics;
pub mod routes;
pub mod routing;
pub mod secret_url;
pub mod server;
pub mod shared;
pub mod state;
pub mod storage;
pub mod telemetry;

pub use config::Config;
pub use state::AppState;
