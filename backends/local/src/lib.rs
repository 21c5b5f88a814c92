//! The local FLUX.2 [klein] engine, in burn. One file per model part; every shape comes from the
//! checkpoint's own `config.json` files.

pub mod backend;
pub mod bench;
pub mod config;
mod cpu;
pub mod device;
pub mod error;
pub mod hub;
pub mod image_io;
mod nn;
pub mod pipeline;
pub mod precision;
pub mod reference;
pub mod safety;
pub mod sampler;
pub mod schedule;
pub mod text_encoder;
pub mod tokenizer;
pub mod trace;
pub mod transformer;
pub mod vae;
pub mod weights;
mod worker;

pub use error::EngineError;
