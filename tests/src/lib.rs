//! Test support shared by the integration tests and the load benchmark: a fake Verda upstream
//! that is a real HTTP server on 127.0.0.1, a harness that runs a gateway in-process, and a real
//! `redis-server` and PostgreSQL started per test.

pub mod fake_verda;
pub mod harness;
pub mod postgres_server;
pub mod redis_server;

pub use fake_verda::{FakeVerda, Mode};
pub use harness::Gateway;
pub use postgres_server::PostgresServer;
pub use redis_server::RedisServer;
