//! A real PostgreSQL server (Debian package `postgresql`) in a temporary data directory on a
//! loopback port, started, stopped and restarted by a test; stopped when dropped. PostgreSQL
//! refuses to run as root, so under root it runs as the `postgres` user (the package makes it).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct PostgresServer {
    port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
    /// (uid, gid) to run as, when this process is root.
    user: Option<(u32, u32)>,
    child: Option<Child>,
}

/// `initdb` on the PATH, else in the newest `/usr/lib/postgresql/<version>/bin` (Debian keeps
/// the server binaries there).
fn bin_dir() -> PathBuf {
    // Through a symlink (as /usr/local/bin/initdb may be) to the directory that also holds
    // pg_isready and psql.
    let found = crate::in_path("initdb").and_then(|p| std::fs::canonicalize(p).ok());
    if let Some(d) = found.as_deref().and_then(Path::parent) {
        if d.join("postgres").is_file() && d.join("pg_isready").is_file() {
            return d.to_path_buf();
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|r| {
            r.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    versions.retain(|d| d.join("initdb").is_file());
    versions.sort();
    versions.pop().expect(
        "PostgreSQL is not installed: these tests need a real server (Debian: apt-get install postgresql; .ci/run installs it)",
    )
}

/// The uid and gid of `name` from /etc/passwd.
fn user(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name) && f.len() > 3)
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .flatten()
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl PostgresServer {
    /// initdb, then start on a free loopback port and wait until it accepts connections.
    pub async fn start() -> PostgresServer {
        let port = crate::free_port();
        let user = if is_root() {
            Some(
                user("postgres")
                    .or_else(|| user("nobody"))
                    .expect("a user to run PostgreSQL as"),
            )
        } else {
            None
        };
        let dir = tempfile::tempdir().expect("temp dir");
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown data dir");
        }
        let mut s = PostgresServer {
            port,
            bin: bin_dir(),
            dir,
            user,
            child: None,
        };
        let out = s
            .command("initdb")
            .arg("-D")
            .arg(s.data())
            .args(["-U", "kleingate", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        s.restart().await;
        s
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.user {
            c.uid(uid).gid(gid);
        }
        c.env("LC_ALL", "C").stdin(Stdio::null());
        c
    }

    /// `postgres://kleingate@127.0.0.1:PORT/postgres` (trust authentication on loopback).
    pub fn url(&self) -> String {
        format!("postgres://kleingate@127.0.0.1:{}/postgres", self.port)
    }

    /// Stop it (fast shutdown: connections are cut, as a restart or failover cuts them).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            let start = Instant::now();
            while c.try_wait().ok().flatten().is_none() {
                if start.elapsed() > Duration::from_secs(20) {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Start it again on the same port with the same data, and wait until it accepts.
    pub async fn restart(&mut self) {
        self.stop();
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data())
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            .args(["-c", "fsync=off"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
        let start = Instant::now();
        while !self.ready() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "PostgreSQL did not accept connections within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn ready(&self) -> bool {
        self.command("pg_isready")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// One SQL statement through `psql`; its unaligned output.
    pub fn sql(&self, statement: &str) -> String {
        let psql = if self.bin.join("psql").is_file() {
            self.bin.join("psql")
        } else {
            Path::new("psql").to_path_buf()
        };
        let out = Command::new(psql)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "kleingate", "-d", "postgres", "-At", "-c", statement])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
    }
}
