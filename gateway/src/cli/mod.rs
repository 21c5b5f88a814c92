//! The commands that are not the server: each builds on the gateway library or the local engine
//! and exits.

#[cfg(feature = "local")]
pub mod bench_engine;
pub mod check_config;
#[cfg(feature = "local")]
pub mod generate;
pub mod keys;
pub mod openapi;
