//! Test support shared by the integration tests and the load benchmark: a fake Verda upstream
//! that is a real HTTP server on 127.0.0.1, and a harness that runs a gateway in-process.

pub mod fake_verda;
pub mod harness;

pub use fake_verda::{FakeVerda, Mode};
pub use harness::Gateway;
