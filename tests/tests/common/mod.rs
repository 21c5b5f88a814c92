//! Helpers shared by the integration test files (each file is its own crate and uses a subset).

#![allow(dead_code)]

use kleingate_tests::{FakeVerda, Gateway};
use std::time::{Duration, Instant};

use serde_json::Value;

pub async fn post(gw: &Gateway, path: &str, body: Value) -> reqwest::Response {
    post_with(gw, path, body, &[]).await
}

pub async fn post_with(
    gw: &Gateway,
    path: &str,
    body: Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut rb = reqwest::Client::new().post(gw.url(path)).json(&body);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    rb.send().await.expect("request")
}

pub fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

pub async fn error_of(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let v: Value = r.json().await.expect("JSON error body");
    (status, v["error"].clone())
}

pub async fn metrics(gw: &Gateway) -> String {
    reqwest::get(gw.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of one sample line of the Prometheus text output, 0 when absent.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| {
            let rest = &l[name.len()..];
            (rest.starts_with('{') || rest.starts_with(' '))
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// A `[backends.NAME]` table for a Verda-compatible fake upstream, plus `extra` lines.
pub fn backend(name: &str, fake: &FakeVerda, extra: &str) -> String {
    format!(
        "[backends.{name}]\nkind = \"verda\"\nbase_url = \"{}\"\napi_key_env = \"KLEINGATE_TEST_NO_SUCH_VAR\"\n{extra}\n",
        fake.url()
    )
}

/// GET `path` and parse its JSON.
pub async fn get_json(gw: &Gateway, path: &str) -> Value {
    reqwest::get(gw.url(path))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The tiny reference pipeline (random weights, real layout) the local engine tests run on.
pub const PIPELINE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../backends/local/tests/data/klein-tiny/pipeline"
);
/// Its recorded reference cases (inputs and expected outputs).
pub const CASES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../backends/local/tests/data/klein-tiny/cases"
);

/// A `[backends.local]` table for the tiny pipeline on CPU, plus `extra` lines.
pub fn local(extra: &str) -> String {
    format!(
        "[backends.local]\nkind = \"local\"\nweights = \"{PIPELINE}\"\ndevice = \"cpu\"\nmax_sequence_length = 64\nmodels = [\"flux2-klein-4b\", \"flux2-klein-base-4b\"]\n{extra}\n"
    )
}

/// Wait (up to 2 min) until `backend` is no longer loading; its `/v1/backends` entry.
pub async fn wait_ready(gw: &Gateway, backend: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v = get_json(gw, "/v1/backends").await;
        let b = v["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == backend)
            .unwrap()
            .clone();
        if b["health"]["state"] != "loading" || Instant::now() > deadline {
            return b;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A gateway config with experiment `ab` running shadows: variant `a` on backend `fa` (every
/// client), variant `b` on `fb` (weight 0: only as `a`'s shadow), in a SQLite file in `dir`.
/// `top` goes before the tables, `fb_extra` into `[backends.fb]`.
pub fn shadow_config(
    dir: &std::path::Path,
    fa: &FakeVerda,
    fb: &FakeVerda,
    top: &str,
    fb_extra: &str,
) -> String {
    format!(
        "{top}\n[storage]\npath = \"{}\"\n[experiments.ab]\nshadow = true\nvariants = [{{ name = \"a\", backend = \"fa\" }}, {{ name = \"b\", backend = \"fb\", weight = 0 }}]\n{}{}",
        dir.join("k.db").display(),
        backend("fa", fa, ""),
        backend("fb", fb, fb_extra),
    )
}
