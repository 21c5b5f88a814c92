//! Starting the real `kleingate` binary for the tests that need a separate process (kill -9,
//! captured logs).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use axum::http::HeaderMap;
use axum::response::IntoResponse;

/// Start `kleingate serve --config config` with `RUST_LOG=log`; its first stdout line names the
/// address. stderr (the logs) goes to `stderr` when given, else nowhere.
pub fn start(
    config: &std::path::Path,
    log: &str,
    stderr: Option<std::fs::File>,
) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kleingate"))
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", log)
        .stdout(Stdio::piped())
        .stderr(stderr.map_or_else(Stdio::null, Stdio::from))
        .spawn()
        .expect("start kleingate");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read the listening line");
    let url = line
        .trim()
        .strip_prefix("kleingate listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line}"))
        .to_owned();
    (child, url)
}

/// A minimal Verda-compatible upstream: every request gets a small JPEG and its seed back.
pub async fn upstream() -> std::net::SocketAddr {
    let app = axum::Router::new().route(
        "/{model}/generate",
        axum::routing::post(|body: axum::body::Bytes| async move {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let seed = v["seed"].as_u64().unwrap_or(1);
            let mut jpeg = vec![0xFF, 0xD8, 0xFF, 0xE0];
            jpeg.extend((0..2048u32).map(|i| (i.wrapping_mul(seed as u32 | 1) >> 3) as u8));
            jpeg.extend([0xFF, 0xD9]);
            let mut h = HeaderMap::new();
            h.insert("content-type", "image/jpeg".parse().expect("header"));
            h.insert("x-seed", seed.to_string().parse().expect("header"));
            h.insert("x-has-nsfw-content", "false".parse().expect("header"));
            (h, jpeg).into_response()
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    addr
}
