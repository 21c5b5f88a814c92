//! The `kleingate` binary itself: start-up from a config file, `--listen`, readiness, SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

fn get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn serves_from_a_config_file_and_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("k.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:1\"\n[backends.verda]\nkind = \"verda\"\nbase_url = \"http://127.0.0.1:9\"\napi_key_env = \"KLEINGATE_CLI_TEST_KEY\"\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kleingate"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .args(["--listen", "127.0.0.1:0"])
        .env("KLEINGATE_CLI_TEST_KEY", "sk-very-secret-token")
        .env("RUST_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("kleingate listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_owned();
    assert!(get(&addr, "/healthz").starts_with("HTTP/1.1 200"));
    let models = get(&addr, "/v1/models");
    assert!(models.contains("flux2-klein-base-9b"), "{models}");
    // The backend is unreachable, but passive health does not know that until a request fails.
    assert!(get(&addr, "/readyz").starts_with("HTTP/1.1 200"));

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "exit status {:?}", out.status);
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(logs.contains("draining"), "{logs}");
    assert!(
        !logs.contains("sk-very-secret-token"),
        "the token leaked into the logs"
    );
}

#[test]
fn a_bad_config_fails_at_start_up_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("k.toml");
    std::fs::write(
        &cfg,
        "[backends.verda]\nkind = \"verda\"\nbase_ur = \"http://x\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kleingate"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("base_ur"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_kleingate"))
        .args([
            "check-config",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/kleingate.example.toml"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"policy\": \"priority\""));
}
