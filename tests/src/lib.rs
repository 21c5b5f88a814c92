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

/// A loopback port free now, for a server this process starts (it binds it a moment later).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `name` in a directory of `PATH`.
pub(crate) fn in_path(name: &str) -> Option<std::path::PathBuf> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|dir| std::path::Path::new(dir).join(name))
        .find(|p| p.is_file())
}
