//! The kleingate gateway: one Verda-compatible `generate` API in front of several image backends,
//! with routing, fallback, circuit breaking, a cache with request coalescing, and metrics.
//!
//! Request path: [`auth`] (API key) → [`admission`] (rate limit, load shedding) → [`http`]
//! (parse, validate, permissions) → [`cache`] (lookup / coalesce) → [`routing`]
//! (candidates in order) → [`dispatch`] (attempts with breaker, limits, deadline) → backend.

pub mod admission;
pub mod auth;
pub mod budget;
pub mod cache;
pub mod circuit;
pub mod config;
pub mod dispatch;
pub mod error;
pub mod experiments;
pub mod fetch;
pub mod http;
pub mod metrics;
pub mod routing;
pub mod server;
mod shadow;
pub mod state;
pub mod ui;

pub use config::Config;
pub use state::AppState;
