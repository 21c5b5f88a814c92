//! A `verda` backend with several endpoints (GPU workers): the load goes to the healthy ones, a
//! busy or dead worker hands its request to another worker before the gateway pays for another
//! backend, and the endpoints show in `/v1/backends` and the metrics. All real HTTP on 127.0.0.1.

use std::collections::HashMap;
use std::sync::Arc;

use kleingate_tests::fake_verda::fake_jpeg;
use kleingate_tests::{FakeVerda, Gateway, Mode};
use serde_json::{json, Value};

mod common;
use common::*;

const NO_KEY: &str = "api_key_env = \"KLEINGATE_TEST_NO_SUCH_VAR\"";

/// `[backends.gpu]` over `workers`, then `[backends.paid]`, tried in that order.
fn pool_then_paid(workers: &[&FakeVerda], paid: &FakeVerda) -> String {
    let urls: Vec<String> = workers.iter().map(|w| format!("\"{}\"", w.url())).collect();
    format!(
        "[routing]\norder = [\"gpu\", \"paid\"]\n\
         [backends.gpu]\nkind = \"verda\"\nendpoints = [{}]\n{NO_KEY}\n{}",
        urls.join(", "),
        backend("paid", paid, "")
    )
}

fn endpoints_of(list: &Value, backend: &str) -> HashMap<String, Value> {
    list["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == backend)
        .unwrap()["endpoints"]
        .as_array()
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .map(|e| (e["address"].as_str().unwrap().to_owned(), e.clone()))
        .collect()
}

#[tokio::test]
async fn the_load_spreads_over_healthy_workers_and_nothing_is_paid_while_one_has_room() {
    let (w1, w2) = (FakeVerda::start().await, FakeVerda::start().await);
    let busy = FakeVerda::start().await;
    busy.set_mode(Mode::Unavailable {
        retry_after: Some(60),
    });
    let dead = FakeVerda::start().await;
    dead.kill();
    let paid = FakeVerda::start().await;
    let gw = Arc::new(Gateway::start(&pool_then_paid(&[&w1, &w2, &busy, &dead], &paid)).await);

    // 40 unseeded requests, 8 at a time: every one reaches a worker.
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let gw = gw.clone();
        tasks.push(tokio::spawn(async move {
            let mut backends = Vec::new();
            for i in 0..5 {
                let r = post(
                    &gw,
                    "/generate",
                    json!({"prompt": format!("fox {worker} {i}")}),
                )
                .await;
                assert_eq!(r.status(), 200);
                backends.push(header(&r, "x-kleingate-backend"));
            }
            backends
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap().iter().all(|b| b == "gpu"));
    }
    assert_eq!(paid.calls(), 0, "a request went to the paid backend");
    assert!(
        w1.calls() > 0 && w2.calls() > 0,
        "{} {}",
        w1.calls(),
        w2.calls()
    );
    assert_eq!(w1.calls() + w2.calls(), 40);
    // The busy worker is asked again only after its Retry-After (60 s): at most the requests
    // already on their way when it first said so.
    assert!((1..=8).contains(&busy.calls()), "{}", busy.calls());

    let list = get_json(&gw, "/v1/backends").await;
    let eps = endpoints_of(&list, "gpu");
    assert_eq!(eps.len(), 4, "{eps:?}");
    let at = |f: &FakeVerda| &eps[&f.addr.to_string()];
    assert_eq!(at(&w1)["state"], "ready");
    assert_eq!(at(&busy)["state"], "busy");
    assert!(at(&busy)["retry_in_secs"].as_f64().unwrap() > 50.0);
    assert_eq!(at(&dead)["state"], "ejected");
    assert!(at(&dead)["consecutive_failures"].as_u64().unwrap() >= 3);
    assert!(at(&dead)["last_error"]
        .as_str()
        .unwrap()
        .contains("connect"));
    // A single base_url is a pool of one.
    assert_eq!(endpoints_of(&list, "paid").len(), 1);
    // The pool as a whole never failed: no fallback, circuit closed.
    assert_eq!(list["backends"][0]["circuit"], "closed");

    let m = metrics(&gw).await;
    let ready = |f: &FakeVerda| {
        sample(
            &m,
            "kleingate_backend_endpoint_ready",
            &[("backend", "gpu"), ("endpoint", &f.addr.to_string())],
        )
    };
    assert_eq!(
        (ready(&w1), ready(&w2), ready(&busy), ready(&dead)),
        (1.0, 1.0, 0.0, 0.0)
    );
    assert!(m.contains("kleingate_backend_endpoint_inflight_requests{backend=\"gpu\""));
    assert_eq!(
        sample(&m, "kleingate_fallbacks_total", &[("from", "gpu")]),
        0.0
    );
}

#[tokio::test]
async fn a_pool_whose_workers_are_all_busy_hands_over_to_the_next_backend() {
    let (w1, w2) = (FakeVerda::start().await, FakeVerda::start().await);
    for w in [&w1, &w2] {
        w.set_mode(Mode::Unavailable {
            retry_after: Some(30),
        });
    }
    let paid = FakeVerda::start().await;
    let gw = Gateway::start(&pool_then_paid(&[&w1, &w2], &paid)).await;
    let r = post(&gw, "/generate", json!({"prompt": "a fox"})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-kleingate-backend"), "paid");
    // Both workers were asked within the one attempt on the pool.
    assert_eq!((w1.calls(), w2.calls()), (1, 1));
    // The pool told the gateway when its first worker is back: until then it is skipped.
    let r = post(&gw, "/generate", json!({"prompt": "a second fox"})).await;
    assert_eq!(header(&r, "x-kleingate-backend"), "paid");
    assert_eq!((w1.calls(), w2.calls()), (1, 1));
    let list = get_json(&gw, "/v1/backends").await;
    assert!(list["backends"][0]["busy_for_secs"].as_f64().unwrap() > 25.0);
    let m = metrics(&gw).await;
    assert_eq!(
        sample(
            &m,
            "kleingate_fallbacks_total",
            &[("from", "gpu"), ("to", "paid"), ("reason", "unavailable")]
        ),
        1.0
    );
}

#[tokio::test]
async fn a_dns_name_is_resolved_to_the_pools_endpoints() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let worker = FakeVerda::serve_on(listener, fake_jpeg(2048), None);
    let gw = Gateway::start(&format!(
        "[backends.gpu]\nkind = \"verda\"\nbase_url = \"http://localhost:{port}\"\n\
         discovery = \"dns\"\ndiscovery_interval_secs = 1\n{NO_KEY}\n"
    ))
    .await;
    // The first resolution runs in the background.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let eps = loop {
        let eps = endpoints_of(&get_json(&gw, "/v1/backends").await, "gpu");
        if !eps.is_empty() {
            break eps;
        }
        assert!(std::time::Instant::now() < deadline, "never resolved");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    // `localhost` is 127.0.0.1 (and ::1 where the machine has IPv6 loopback, where nothing
    // listens: that endpoint fails and hands over).
    assert!(eps.contains_key(&format!("127.0.0.1:{port}")), "{eps:?}");
    assert!(eps.keys().all(|a| a.ends_with(&format!(":{port}"))));
    for i in 0..6 {
        let r = post(&gw, "/generate", json!({"prompt": format!("fox {i}")})).await;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(worker.calls(), 6);
    // Re-resolved (every second): the same endpoints.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let again = endpoints_of(&get_json(&gw, "/v1/backends").await, "gpu");
    let mut a: Vec<&String> = again.keys().collect();
    let mut b: Vec<&String> = eps.keys().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
}

#[tokio::test]
async fn pool_settings_are_checked_at_start_up() {
    for (table, needle) in [
        (
            "endpoints = [\"http://a:1\"]\nbase_url = \"http://b:1\"",
            "not both",
        ),
        ("endpoints = [\"ftp://a:1\"]", "not an http"),
        (
            "base_url = \"http://10.0.0.1:8080\"\ndiscovery = \"dns\"",
            "DNS name",
        ),
        (
            "base_url = \"http://w:8080\"\neject_after_failures = 0",
            "eject_after_failures",
        ),
        (
            "base_url = \"http://w:8080\"\ndiscovery_interval_secs = 0.01",
            "discovery_interval_secs",
        ),
        ("discovery = \"dns\"", "base_url"),
    ] {
        let cfg = format!("[backends.gpu]\nkind = \"verda\"\n{table}\n");
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, cfg.as_bytes()).unwrap();
        let e = kleingate_gateway::Config::load_with_env(Some(f.path()), Some(HashMap::new()))
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{table}: {e}");
    }
}
