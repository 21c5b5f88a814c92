//! End-to-end behaviour of the gateway against fake Verda upstreams, all real HTTP on 127.0.0.1.

use std::time::Duration;

use base64::Engine as _;
use kleingate_tests::fake_verda::fake_jpeg;
use kleingate_tests::{FakeVerda, Gateway, Mode};
use serde_json::{json, Value};

mod common;
use common::*;

fn two_backends(a: &FakeVerda, b: &FakeVerda, extra: &str) -> String {
    format!(
        "{extra}\n[routing]\norder = [\"primary\", \"secondary\"]\n[circuit]\nfailure_threshold = 2\ncooldown_secs = 0.4\n{}{}",
        backend("primary", a, "timeout_secs = 0.5"),
        backend("secondary", b, "")
    )
}

#[tokio::test]
async fn passes_image_and_headers_through_exactly() {
    std::env::set_var("KLEINGATE_TEST_TOKEN_A", "sk-test-123");
    let fake = FakeVerda::start_with(fake_jpeg(100_000), Some("sk-test-123")).await;
    let gw = Gateway::start(&format!(
        "[backends.verda]\nkind = \"verda\"\nbase_url = \"{}\"\napi_key_env = \"KLEINGATE_TEST_TOKEN_A\"\n",
        fake.url()
    ))
    .await;
    let r = post(
        &gw,
        "/flux2-klein-4b/generate",
        json!({"prompt": "a lighthouse, nsfw", "seed": 77}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), "image/jpeg");
    assert_eq!(header(&r, "x-seed"), "77");
    assert_eq!(header(&r, "x-has-nsfw-content"), "true");
    assert_eq!(header(&r, "x-kleingate-backend"), "verda");
    assert_eq!(header(&r, "x-kleingate-cache"), "miss");
    assert!(!header(&r, "x-request-id").is_empty());
    assert_eq!(r.bytes().await.unwrap(), fake.image());
    // The upstream saw our token and an explicit, canonical body.
    assert_eq!(fake.last_auth().as_deref(), Some("Bearer sk-test-123"));
    let body = fake.last_body().unwrap();
    assert_eq!(body["prompt"], "a lighthouse, nsfw");
    assert_eq!(
        (
            body["width"].clone(),
            body["height"].clone(),
            body["num_steps"].clone()
        ),
        (json!(1024), json!(768), json!(4))
    );
    assert!(body.get("model").is_none());
    // A client-supplied request id is kept.
    let r = post_with(
        &gw,
        "/generate",
        json!({"prompt": "x"}),
        &[("x-request-id", "req-abc")],
    )
    .await;
    assert_eq!(header(&r, "x-request-id"), "req-abc");
}

#[tokio::test]
async fn base64_output_and_json_upstreams() {
    let fake = FakeVerda::start().await;
    let gw = Gateway::start(&backend("verda", &fake, "")).await;
    let r = post(
        &gw,
        "/generate",
        json!({"model": "flux2-klein-9b", "prompt": "x", "seed": 5, "enable_base64_output": true}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-seed"), "5");
    let v: Value = r.json().await.unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v["image"].as_str().unwrap())
        .unwrap();
    assert_eq!(bytes, fake.image());
    assert_eq!(
        (
            v["seed"].clone(),
            v["output_format"].clone(),
            v["has_nsfw_content"].clone()
        ),
        (json!(5), json!("jpeg"), json!(false))
    );
    // The upstream answering in its JSON form is read just as well.
    fake.set_mode(Mode::Json);
    let r = post(
        &gw,
        "/flux2-klein-4b/generate",
        json!({"prompt": "y", "seed": 6}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-seed"), "6");
    assert_eq!(r.bytes().await.unwrap(), fake.image());
    // Image editing: references are forwarded verbatim.
    fake.set_mode(Mode::Image);
    let png = base64::engine::general_purpose::STANDARD.encode(b"\x89PNG\r\n\x1a\n....");
    let refs = json!([
        "https://example.com/cat.png",
        format!("data:image/png;base64,{png}")
    ]);
    let r = post(
        &gw,
        "/flux2-klein-4b/generate",
        json!({"prompt": "make it blue", "input_images": refs}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(fake.last_body().unwrap()["input_images"], refs);
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_never_reach_a_backend() {
    let fake = FakeVerda::start().await;
    let gw = Gateway::start(&format!(
        "max_body_bytes = 2048\n{}",
        backend("verda", &fake, "")
    ))
    .await;
    let cases = [
        (
            "/flux2-klein-4b/generate",
            json!({"prompt": "x", "num_steps": 8}),
            400,
            Some("num_steps"),
        ),
        (
            "/flux2-klein-4b/generate",
            json!({"prompt": "x", "guidance": 2.0}),
            400,
            Some("guidance"),
        ),
        (
            "/flux2-klein-4b/generate",
            json!({"prompt": ""}),
            400,
            Some("prompt"),
        ),
        (
            "/flux2-klein-4b/generate",
            json!({"prompt": "x", "width": 1000}),
            400,
            Some("width"),
        ),
        (
            "/flux2-klein-4b/generate",
            json!({"prompt": "x", "colour": "red"}),
            400,
            Some("colour"),
        ),
        (
            "/flux2-klein-4b/generate",
            json!({"prompt": "x", "seed": "1"}),
            400,
            Some("seed"),
        ),
        (
            "/flux2-klein-4b/generate",
            json!({"prompt": "x", "input_images": ["file:///etc/passwd"]}),
            400,
            Some("input_images[0]"),
        ),
        (
            "/flux2-klein-7b/generate",
            json!({"prompt": "x"}),
            404,
            None,
        ),
        (
            "/generate",
            json!({"model": "dall-e", "prompt": "x"}),
            404,
            Some("model"),
        ),
        (
            "/flux2-klein-4b/generate",
            json!({"prompt": "x".repeat(3000)}),
            413,
            None,
        ),
    ];
    for (path, body, status, field) in cases {
        let (s, e) = error_of(post(&gw, path, body.clone()).await).await;
        assert_eq!(s, status, "{path} {body}: {e}");
        assert_eq!(e["field"].as_str(), field, "{body}: {e}");
        assert!(!e["message"].as_str().unwrap().is_empty());
    }
    let r = reqwest::Client::new()
        .post(gw.url("/generate"))
        .header("content-type", "application/json")
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await.1["code"], "invalid_json");
    // A body that does not say it is JSON is refused before it is read (review finding 5).
    let r = reqwest::Client::new()
        .post(gw.url("/generate"))
        .body("{\"prompt\": \"x\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(r).await,
        (
            415,
            json!({"code": "unsupported_media_type", "message": "send the request body as JSON with `Content-Type: application/json`"})
        )
    );
    let (s, e) = error_of(reqwest::get(gw.url("/nope")).await.unwrap()).await;
    assert_eq!((s, e["code"].as_str()), (404, Some("not_found")));
    let (s, _) = error_of(reqwest::get(gw.url("/generate")).await.unwrap()).await;
    assert_eq!(s, 405);
    assert_eq!(fake.calls(), 0);
    // The unknown path model is counted without minting a label from the client's string.
    let m = metrics(&gw).await;
    assert!(!m.contains("flux2-klein-7b"));
    assert_eq!(
        sample(
            &m,
            "kleingate_requests_total",
            &[("model", "unknown"), ("status", "404")]
        ),
        2.0
    );
}

#[tokio::test]
async fn seeded_requests_are_cached_and_unseeded_are_not() {
    let fake = FakeVerda::start().await;
    let gw = Gateway::start(&backend("verda", &fake, "")).await;
    let first = post(
        &gw,
        "/flux2-klein-4b/generate",
        json!({"prompt": "fox", "seed": 1}),
    )
    .await;
    assert_eq!(header(&first, "x-kleingate-cache"), "miss");
    let first = first.bytes().await.unwrap();
    // Same request spelled differently (key order, explicit defaults, other route): a hit.
    let second = post(
        &gw,
        "/generate",
        json!({"seed": 1, "num_steps": 4, "prompt": "fox", "width": 1024}),
    )
    .await;
    assert_eq!(header(&second, "x-kleingate-cache"), "hit");
    assert_eq!(header(&second, "x-seed"), "1");
    assert_eq!(second.bytes().await.unwrap(), first);
    assert_eq!(fake.calls(), 1, "a hit must not call the upstream");
    // Cache-Control: no-cache goes to the backend.
    let r = post_with(
        &gw,
        "/generate",
        json!({"prompt": "fox", "seed": 1}),
        &[("cache-control", "no-cache")],
    )
    .await;
    assert_eq!(header(&r, "x-kleingate-cache"), "bypass");
    assert_eq!(fake.calls(), 2);
    // no-store: generated and not kept, so the next plain request is still a miss.
    let r = post_with(
        &gw,
        "/generate",
        json!({"prompt": "kept out", "seed": 9}),
        &[("cache-control", "max-age=0, no-store")],
    )
    .await;
    assert_eq!(header(&r, "x-kleingate-cache"), "bypass");
    let r = post(&gw, "/generate", json!({"prompt": "kept out", "seed": 9})).await;
    assert_eq!(header(&r, "x-kleingate-cache"), "miss");
    assert_eq!(fake.calls(), 4);
    // Different parameters are a different entry.
    post(
        &gw,
        "/generate",
        json!({"prompt": "fox", "seed": 1, "output_format": "png"}),
    )
    .await;
    assert_eq!(fake.calls(), 5);

    // Without a seed every request is generated anew...
    let a = post(&gw, "/generate", json!({"prompt": "owl"})).await;
    let b = post(&gw, "/generate", json!({"prompt": "owl"})).await;
    assert_eq!(
        (
            header(&a, "x-kleingate-cache"),
            header(&b, "x-kleingate-cache")
        ),
        ("bypass".into(), "bypass".into())
    );
    assert_eq!(fake.calls(), 7);
    // ...but stored under the seed it got, so asking for that seed again is a hit.
    let seed: u64 = header(&a, "x-seed").parse().unwrap();
    let again = post(&gw, "/generate", json!({"prompt": "owl", "seed": seed})).await;
    assert_eq!(header(&again, "x-kleingate-cache"), "hit");
    assert_eq!(fake.calls(), 7);

    let m = metrics(&gw).await;
    assert_eq!(sample(&m, "kleingate_cache_hits_total", &[]), 2.0);
    assert_eq!(sample(&m, "kleingate_cache_misses_total", &[]), 3.0);
    assert!(sample(&m, "kleingate_cache_bytes", &[]) >= 4.0 * 4096.0);
    assert_eq!(
        sample(
            &m,
            "kleingate_requests_total",
            &[("cache", "hit"), ("status", "200")]
        ),
        2.0
    );
}

#[tokio::test]
async fn cache_is_bounded_by_bytes() {
    let fake = FakeVerda::start_with(fake_jpeg(10_000), None).await;
    let gw = Gateway::start(&format!(
        "[cache]\nmax_bytes = 35000\n{}",
        backend("verda", &fake, "")
    ))
    .await;
    for seed in 0..10 {
        post(&gw, "/generate", json!({"prompt": "p", "seed": seed})).await;
    }
    let m = metrics(&gw).await;
    assert!(sample(&m, "kleingate_cache_bytes", &[]) <= 35000.0, "{m}");
    assert!(sample(&m, "kleingate_cache_evictions_total", &[]) >= 6.0);
}

#[tokio::test]
async fn identical_concurrent_requests_share_one_backend_call() {
    let fake = FakeVerda::start().await;
    fake.set_mode(Mode::Slow(Duration::from_millis(400)));
    let gw = Gateway::start(&backend("verda", &fake, "")).await;
    let gw = &gw;
    let answers = futures::future::join_all((0..8).map(|_| async move {
        let r = post(gw, "/generate", json!({"prompt": "stampede", "seed": 3})).await;
        (
            r.status().as_u16(),
            header(&r, "x-kleingate-cache"),
            r.bytes().await.unwrap(),
        )
    }))
    .await;
    assert_eq!(fake.calls(), 1);
    assert!(answers
        .iter()
        .all(|(s, _, b)| *s == 200 && *b == fake.image()));
    assert_eq!(answers.iter().filter(|(_, c, _)| c == "miss").count(), 1);
    assert_eq!(
        answers.iter().filter(|(_, c, _)| c == "coalesced").count(),
        7
    );
    assert_eq!(
        sample(
            &metrics(gw).await,
            "kleingate_singleflight_coalesced_total",
            &[]
        ),
        7.0
    );

    // Errors reach every waiter and are not cached.
    fake.set_mode(Mode::ServerError);
    let answers = futures::future::join_all((0..4).map(|_| async move {
        post(gw, "/generate", json!({"prompt": "fail", "seed": 4}))
            .await
            .status()
            .as_u16()
    }))
    .await;
    assert!(answers.iter().all(|s| *s == 502), "{answers:?}");
    fake.set_mode(Mode::Image);
    let r = post(gw, "/generate", json!({"prompt": "fail", "seed": 4})).await;
    assert_eq!(
        (r.status().as_u16(), header(&r, "x-kleingate-cache")),
        (200, "miss".into())
    );
}

#[tokio::test]
async fn falls_back_on_503_and_dead_upstream_but_not_on_400() {
    let a = FakeVerda::start_with(fake_jpeg(1000), None).await;
    let b = FakeVerda::start_with(fake_jpeg(2000), None).await;
    let gw = Gateway::start(&two_backends(&a, &b, "")).await;

    let r = post(&gw, "/generate", json!({"prompt": "x"})).await;
    assert_eq!(header(&r, "x-kleingate-backend"), "primary");

    a.set_mode(Mode::Unavailable { retry_after: None });
    let r = post(&gw, "/generate", json!({"prompt": "x"})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-kleingate-backend"), "secondary");
    assert_eq!(r.bytes().await.unwrap(), b.image());

    a.set_mode(Mode::BadRequest);
    let (s, e) = error_of(post(&gw, "/generate", json!({"prompt": "x"})).await).await;
    assert_eq!((s, e["message"].as_str()), (400, Some("upstream says no")));
    assert_eq!(b.calls(), 1, "a 400 must not fall back");

    a.set_mode(Mode::Unauthorized);
    let r = post(&gw, "/generate", json!({"prompt": "x"})).await;
    assert_eq!(header(&r, "x-kleingate-backend"), "secondary");

    a.kill();
    let r = post(&gw, "/generate", json!({"prompt": "x"})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-kleingate-backend"), "secondary");

    let m = metrics(&gw).await;
    for reason in ["unavailable", "unauthorized", "connect"] {
        assert_eq!(
            sample(
                &m,
                "kleingate_fallbacks_total",
                &[("from", "primary"), ("to", "secondary"), ("reason", reason)]
            ),
            1.0,
            "{reason}\n{m}"
        );
    }
}

#[tokio::test]
async fn falls_back_on_timeout_and_answers_504_when_the_deadline_is_gone() {
    let a = FakeVerda::start().await;
    let b = FakeVerda::start().await;
    a.set_mode(Mode::Hang);
    let gw = Gateway::start(&two_backends(&a, &b, "")).await;
    let r = post(&gw, "/generate", json!({"prompt": "x"})).await;
    assert_eq!(header(&r, "x-kleingate-backend"), "secondary");
    assert_eq!(
        sample(
            &metrics(&gw).await,
            "kleingate_fallbacks_total",
            &[("reason", "timeout")]
        ),
        1.0
    );

    let gw = Gateway::start(&format!(
        "request_timeout_secs = 0.3\n{}",
        backend("only", &a, "")
    ))
    .await;
    let t = std::time::Instant::now();
    let (s, e) = error_of(post(&gw, "/generate", json!({"prompt": "x"})).await).await;
    assert_eq!((s, e["code"].as_str()), (504, Some("timeout")));
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn upstream_nonsense_is_a_502_and_all_busy_is_a_503() {
    let a = FakeVerda::start().await;
    let gw = Gateway::start(&backend("only", &a, "max_response_bytes = 50000")).await;
    a.set_mode(Mode::Malformed);
    let (s, e) = error_of(post(&gw, "/generate", json!({"prompt": "x"})).await).await;
    assert_eq!((s, e["code"].as_str()), (502, Some("bad_gateway")));
    a.set_mode(Mode::Huge(60_000));
    let (s, e) = error_of(post(&gw, "/generate", json!({"prompt": "x"})).await).await;
    assert_eq!(s, 502);
    // The client is told which backend failed; the detail is the operators' (/v1/backends).
    assert!(e["message"].as_str().unwrap().contains("`only`"), "{e}");
    let v = get_json(&gw, "/v1/backends").await;
    assert!(
        v["backends"][0]["last_error"]
            .as_str()
            .unwrap()
            .contains("limit"),
        "{v}"
    );
    a.set_mode(Mode::Unavailable {
        retry_after: Some(7),
    });
    let r = post(&gw, "/generate", json!({"prompt": "x"})).await;
    assert_eq!(r.status(), 503);
    assert_eq!(header(&r, "retry-after"), "7");
    // Retry-After is honoured: the next request does not hit the upstream at all.
    let calls = a.calls();
    let r = post(&gw, "/generate", json!({"prompt": "x"})).await;
    assert_eq!(r.status(), 503);
    assert_eq!(a.calls(), calls);
}

#[tokio::test]
async fn circuit_opens_after_failures_and_recovers() {
    let a = FakeVerda::start().await;
    let b = FakeVerda::start().await;
    a.set_mode(Mode::ServerError);
    let gw = Gateway::start(&two_backends(&a, &b, "")).await;
    for _ in 0..2 {
        let r = post(&gw, "/generate", json!({"prompt": "x"})).await;
        assert_eq!(header(&r, "x-kleingate-backend"), "secondary");
    }
    assert_eq!(a.calls(), 2);
    // Open: the primary is skipped without being called.
    for _ in 0..3 {
        post(&gw, "/generate", json!({"prompt": "x"})).await;
    }
    assert_eq!(a.calls(), 2);
    let v = get_json(&gw, "/v1/backends").await;
    assert_eq!(v["backends"][0]["name"], "primary");
    assert_eq!(v["backends"][0]["circuit"], "open");
    assert!(v["backends"][0]["last_error"]
        .as_str()
        .unwrap()
        .contains("500"));
    let m = metrics(&gw).await;
    assert_eq!(
        sample(
            &m,
            "kleingate_backend_circuit_state",
            &[("backend", "primary")]
        ),
        2.0
    );
    assert_eq!(
        sample(
            &m,
            "kleingate_fallbacks_total",
            &[("reason", "circuit_open")]
        ),
        3.0
    );

    // After the cool-down one probe goes through; it succeeds and the circuit closes.
    a.set_mode(Mode::Image);
    tokio::time::sleep(Duration::from_millis(450)).await;
    let r = post(&gw, "/generate", json!({"prompt": "x"})).await;
    assert_eq!(header(&r, "x-kleingate-backend"), "primary");
    assert_eq!(
        sample(
            &metrics(&gw).await,
            "kleingate_backend_circuit_state",
            &[("backend", "primary")]
        ),
        0.0
    );

    // When every candidate is open the client gets a quick 503 with Retry-After.
    let gw = Gateway::start(&format!(
        "[circuit]\nfailure_threshold = 1\ncooldown_secs = 60\n{}",
        backend("only", &b, "")
    ))
    .await;
    b.set_mode(Mode::ServerError);
    assert_eq!(
        post(&gw, "/generate", json!({"prompt": "x"}))
            .await
            .status(),
        502
    );
    let r = post(&gw, "/generate", json!({"prompt": "x"})).await;
    assert_eq!(r.status(), 503);
    assert!(header(&r, "retry-after").parse::<u64>().unwrap() >= 59);
    let ready = reqwest::get(gw.url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503, "no backend available means not ready");
}

#[tokio::test]
async fn backend_header_forces_a_backend_when_allowed() {
    let a = FakeVerda::start().await;
    let b = FakeVerda::start().await;
    let gw = Gateway::start(&two_backends(&a, &b, "")).await;
    let r = post_with(
        &gw,
        "/generate",
        json!({"prompt": "x", "seed": 1}),
        &[("x-kleingate-backend", "secondary")],
    )
    .await;
    assert_eq!(header(&r, "x-kleingate-backend"), "secondary");
    assert_eq!((a.calls(), b.calls()), (0, 1));
    // The forced backend's image is cached apart from the unforced one.
    let r = post(&gw, "/generate", json!({"prompt": "x", "seed": 1})).await;
    assert_eq!(
        (
            header(&r, "x-kleingate-cache"),
            header(&r, "x-kleingate-backend")
        ),
        ("miss".into(), "primary".into())
    );
    // A forced backend gets no fallback.
    b.set_mode(Mode::Unavailable { retry_after: None });
    let r = post_with(
        &gw,
        "/generate",
        json!({"prompt": "y"}),
        &[("x-kleingate-backend", "secondary")],
    )
    .await;
    assert_eq!(r.status(), 503);
    let (s, e) = error_of(
        post_with(
            &gw,
            "/generate",
            json!({"prompt": "x"}),
            &[("x-kleingate-backend", "nope")],
        )
        .await,
    )
    .await;
    assert_eq!((s, e["code"].as_str()), (400, Some("unknown_backend")));

    let gw = Gateway::start(&format!(
        "[routing]\nallow_backend_header = false\n{}",
        backend("v", &a, "")
    ))
    .await;
    let (s, _) = error_of(
        post_with(
            &gw,
            "/generate",
            json!({"prompt": "x"}),
            &[("x-kleingate-backend", "v")],
        )
        .await,
    )
    .await;
    assert_eq!(s, 403);
}

#[tokio::test]
async fn concurrency_limit_sends_overflow_to_the_next_backend() {
    let a = FakeVerda::start().await;
    let b = FakeVerda::start().await;
    a.set_mode(Mode::Slow(Duration::from_millis(300)));
    let gw = Gateway::start(&format!(
        "[routing]\norder = [\"primary\", \"secondary\"]\n{}{}",
        backend("primary", &a, "max_concurrency = 1"),
        backend("secondary", &b, "")
    ))
    .await;
    let gw = &gw;
    let backends = futures::future::join_all((0..2).map(|i| async move {
        tokio::time::sleep(Duration::from_millis(50 * i)).await;
        header(
            &post(gw, "/generate", json!({"prompt": "x"})).await,
            "x-kleingate-backend",
        )
    }))
    .await;
    assert_eq!(backends, ["primary", "secondary"]);
    assert_eq!(
        sample(
            &metrics(gw).await,
            "kleingate_fallbacks_total",
            &[("reason", "concurrency_limit")]
        ),
        1.0
    );
}

#[tokio::test]
async fn weighted_policy_splits_traffic_by_weight() {
    let a = FakeVerda::start().await;
    let b = FakeVerda::start().await;
    let gw = Gateway::start(&format!(
        "[routing]\npolicy = \"weighted\"\n[cache]\nenabled = false\n{}{}",
        backend("heavy", &a, "weight = 3"),
        backend("light", &b, "weight = 1")
    ))
    .await;
    for _ in 0..400 {
        post(&gw, "/generate", json!({"prompt": "x"})).await;
    }
    // Expected 300 / 100; binomial sd is 8.7, so +-50 fails only on a real bias.
    assert!((250..=350).contains(&a.calls()), "heavy got {}", a.calls());
    assert_eq!(a.calls() + b.calls(), 400);
}

#[tokio::test]
async fn talks_to_another_kleingate() {
    let fake = FakeVerda::start_with(fake_jpeg(50_000), None).await;
    // The inner gateway has a tighter prompt limit, so it can refuse what the outer accepts.
    let inner = Gateway::start(&format!(
        "[limits]\nmax_prompt_bytes = 16\n{}",
        backend("verda", &fake, "")
    ))
    .await;
    let outer = Gateway::start(&format!(
        "[backends.gpu]\nkind = \"verda\"\nbase_url = \"http://{}\"\napi_key_env = \"KLEINGATE_TEST_NO_SUCH_VAR\"\n",
        inner.addr
    ))
    .await;
    let r = post(
        &outer,
        "/flux2-klein-base-4b/generate",
        json!({"prompt": "x", "seed": 11, "num_steps": 20, "guidance": 3.0}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        (header(&r, "x-seed"), header(&r, "x-kleingate-backend")),
        ("11".into(), "gpu".into())
    );
    assert_eq!(r.bytes().await.unwrap(), fake.image());
    assert_eq!(fake.last_body().unwrap()["num_steps"], 20);
    // The inner gateway's 400 comes back as a 400 with its message and field, without fallback.
    let (s, e) = error_of(
        post(
            &outer,
            "/flux2-klein-4b/generate",
            json!({"prompt": "a prompt over sixteen bytes"}),
        )
        .await,
    )
    .await;
    assert_eq!((s, e["field"].as_str()), (400, Some("prompt")), "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("at most 16 bytes"),
        "{e}"
    );
}

#[tokio::test]
async fn metrics_move_with_traffic() {
    let a = FakeVerda::start().await;
    let b = FakeVerda::start().await;
    a.set_mode(Mode::Unavailable { retry_after: None });
    let gw = Gateway::start(&two_backends(&a, &b, "")).await;
    for i in 0..3 {
        post(
            &gw,
            "/flux2-klein-9b/generate",
            json!({"prompt": "x", "seed": i}),
        )
        .await;
    }
    post(
        &gw,
        "/flux2-klein-9b/generate",
        json!({"prompt": "x", "seed": 0}),
    )
    .await;
    post(&gw, "/flux2-klein-9b/generate", json!({"prompt": ""})).await;
    let m = metrics(&gw).await;
    let r = |labels: &[(&str, &str)]| sample(&m, "kleingate_requests_total", labels);
    assert_eq!(
        r(&[
            ("model", "flux2-klein-9b"),
            ("backend", "secondary"),
            ("status", "200"),
            ("cache", "miss")
        ]),
        3.0
    );
    assert_eq!(
        r(&[
            ("model", "flux2-klein-9b"),
            ("backend", "secondary"),
            ("status", "200"),
            ("cache", "hit")
        ]),
        1.0
    );
    assert_eq!(r(&[("model", "flux2-klein-9b"), ("status", "400")]), 1.0);
    assert_eq!(
        sample(
            &m,
            "kleingate_request_duration_seconds_count",
            &[("model", "flux2-klein-9b")]
        ),
        5.0
    );
    assert_eq!(
        sample(
            &m,
            "kleingate_backend_request_duration_seconds_count",
            &[("backend", "primary"), ("outcome", "unavailable")]
        ),
        3.0
    );
    assert_eq!(
        sample(
            &m,
            "kleingate_backend_request_duration_seconds_count",
            &[("backend", "secondary"), ("outcome", "ok")]
        ),
        3.0
    );
    assert_eq!(
        sample(&m, "kleingate_gateway_overhead_seconds_count", &[]),
        4.0
    );
    assert_eq!(
        sample(
            &m,
            "kleingate_fallbacks_total",
            &[
                ("from", "primary"),
                ("to", "secondary"),
                ("reason", "unavailable")
            ]
        ),
        3.0
    );
    assert_eq!(sample(&m, "kleingate_inflight_requests", &[]), 0.0);
    assert_eq!(sample(&m, "kleingate_cache_entries", &[]), 3.0);
    assert!(m.contains("kleingate_backend_circuit_state{backend=\"primary\"} 0"));
}

#[tokio::test]
async fn info_and_health_endpoints() {
    let a = FakeVerda::start().await;
    let gw = Gateway::start(&backend("verda", &a, "models = [\"flux2-klein-4b\"]")).await;
    let v = get_json(&gw, "/v1/models").await;
    let models = v["models"].as_array().unwrap();
    assert_eq!(models.len(), 4);
    assert_eq!(models[0]["id"], "flux2-klein-4b");
    assert_eq!(models[0]["backends"], json!(["verda"]));
    assert_eq!(models[2]["default_steps"], 50);
    assert_eq!(models[2]["backends"], json!([]));
    let (s, e) =
        error_of(post(&gw, "/flux2-klein-9b/generate", json!({"prompt": "x"})).await).await;
    assert_eq!((s, e["code"].as_str()), (503, Some("no_backend")));
    let v = get_json(&gw, "/v1/backends").await;
    assert_eq!(v["backends"][0]["kind"], "verda");
    assert_eq!(v["backends"][0]["in_flight"], 0);
    assert_eq!(v["backends"][0]["health"]["state"], "ready");
    assert_eq!(
        reqwest::get(gw.url("/healthz")).await.unwrap().status(),
        200
    );
    assert_eq!(reqwest::get(gw.url("/readyz")).await.unwrap().status(), 200);
}

#[tokio::test]
async fn graceful_shutdown_drains_in_flight_requests() {
    let a = FakeVerda::start().await;
    a.set_mode(Mode::Slow(Duration::from_millis(600)));
    let mut gw = Gateway::start(&backend("verda", &a, "")).await;
    let url = gw.url("/generate");
    let in_flight = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .json(&json!({"prompt": "x"}))
            .send()
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let state = gw.state.clone();
    let server = gw.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(state.is_draining() && !state.is_ready());
    let r = in_flight
        .await
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), a.image());
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server exits")
        .unwrap()
        .unwrap();
    assert!(
        reqwest::get(gw.url("/healthz")).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn every_answer_carries_its_cost_and_the_counter_adds_up() {
    let fake = FakeVerda::start().await;
    // Example prices (USD): a default price and a per-model one for 9B.
    let priced = backend(
        "verda",
        &fake,
        "[backends.verda.cost]\nper_image_usd = 0.002\nper_megapixel_step_usd = 0.0005\n[backends.verda.cost.models.flux2-klein-9b]\nper_image_usd = 0.01\n",
    );
    let gw = Gateway::start(&priced).await;
    let cost = |r: &reqwest::Response| header(r, "x-kleingate-cost").parse::<f64>().unwrap();
    // 1024 x 768 = 0.786432 MP, 4 steps: 0.002 + 0.0005 * 0.786432 * 4.
    let want_4b = 0.002 + 0.0005 * 0.786_432 * 4.0;
    let r = post(
        &gw,
        "/flux2-klein-4b/generate",
        json!({"prompt": "x", "seed": 1}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!((cost(&r) - want_4b).abs() < 1e-6, "{}", cost(&r));
    let r = post(
        &gw,
        "/flux2-klein-9b/generate",
        json!({"prompt": "x", "seed": 1}),
    )
    .await;
    assert!((cost(&r) - 0.01).abs() < 1e-9);
    // A cache hit and an error cost nothing, and say so.
    let r = post(
        &gw,
        "/flux2-klein-4b/generate",
        json!({"prompt": "x", "seed": 1}),
    )
    .await;
    assert_eq!(header(&r, "x-kleingate-cache"), "hit");
    assert_eq!(cost(&r), 0.0);
    let r = post(&gw, "/generate", json!({"prompt": ""})).await;
    assert_eq!((r.status().as_u16(), cost(&r)), (400, 0.0));
    let m = metrics(&gw).await;
    let spent = |m: &str, backend: &str, model: &str| {
        sample(
            m,
            "kleingate_cost_usd_total",
            &[("backend", backend), ("model", model)],
        )
    };
    assert!((spent(&m, "verda", "flux2-klein-4b") - want_4b).abs() < 1e-9);
    assert!((spent(&m, "verda", "flux2-klein-9b") - 0.01).abs() < 1e-9);

    // A gateway in front of this one, without prices of its own, takes the cost the inner
    // kleingate reports (a GPU worker's measured cost reaches the front).
    let outer = Gateway::start(&format!(
        "[backends.gpu]\nkind = \"verda\"\nbase_url = \"http://{}\"\napi_key_env = \"KLEINGATE_TEST_NO_SUCH_VAR\"\n",
        gw.addr
    ))
    .await;
    let r = post(
        &outer,
        "/flux2-klein-4b/generate",
        json!({"prompt": "y", "seed": 2}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!((cost(&r) - want_4b).abs() < 1e-6, "{}", cost(&r));
    let m = metrics(&outer).await;
    assert!((spent(&m, "gpu", "flux2-klein-4b") - want_4b).abs() < 1e-6);

    // Prices are checked at start-up.
    for bad in ["per_image_usd = -1.0", "gpu_hour_usd = 2.0"] {
        let f = format!(
            "{}[backends.verda.cost]\n{bad}\n",
            backend("verda", &fake, "")
        );
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut file, f.as_bytes()).unwrap();
        let e =
            kleingate_gateway::Config::load_with_env(Some(file.path()), Some(Default::default()));
        assert!(e.is_err(), "{bad} was accepted");
    }
}

#[tokio::test]
async fn cost_policy_picks_the_cheapest_backend_within_its_latency_objective() {
    let (cheap, pricey, unpriced) = (
        FakeVerda::start().await,
        FakeVerda::start().await,
        FakeVerda::start().await,
    );
    // The configured order is the reverse of the prices: the policy, not the order, decides.
    let gw = Gateway::start(&format!(
        "[routing]\npolicy = \"cost\"\norder = [\"unpriced\", \"pricey\", \"cheap\"]\n{}{}{}",
        backend(
            "cheap",
            &cheap,
            "latency_objective_secs = 0.2\n[backends.cheap.cost]\nper_image_usd = 0.001"
        ),
        backend(
            "pricey",
            &pricey,
            "[backends.pricey.cost]\nper_image_usd = 0.01"
        ),
        backend("unpriced", &unpriced, ""),
    ))
    .await;
    let ask = |seed: u64| post(&gw, "/generate", json!({"prompt": "x", "seed": seed}));
    let r = ask(1).await;
    assert_eq!(
        (
            header(&r, "x-kleingate-backend"),
            header(&r, "x-kleingate-cost")
        ),
        ("cheap".into(), "0.001000".into())
    );
    // The cheap one gets slow: once its observed p95 is over its 0.2 s objective, the next
    // cheapest takes the traffic (the slow answer itself still arrives).
    cheap.set_mode(Mode::Slow(Duration::from_millis(400)));
    assert_eq!(header(&ask(2).await, "x-kleingate-backend"), "cheap");
    assert_eq!(header(&ask(3).await, "x-kleingate-backend"), "pricey");
    // An unpriced backend is never preferred over priced ones, but is still a fallback.
    pricey.kill();
    cheap.kill();
    let r = ask(4).await;
    assert_eq!(
        (r.status().as_u16(), header(&r, "x-kleingate-backend")),
        (200, "unpriced".into())
    );
    assert_eq!(unpriced.calls(), 1);
}

#[tokio::test]
async fn daily_budgets_per_client_key_reject_or_route_to_the_cheapest() {
    let fake = FakeVerda::start().await;
    let gw = Gateway::start(&format!(
        "[budget]\n[budget.keys]\nteam-a = 0.025\n{}",
        backend(
            "verda",
            &fake,
            "[backends.verda.cost]\nper_image_usd = 0.01"
        )
    ))
    .await;
    let ask = |key: Option<&'static str>| {
        let headers: Vec<(&str, &str)> =
            key.map(|k| ("x-kleingate-client", k)).into_iter().collect();
        let gw = &gw;
        async move { post_with(gw, "/generate", json!({"prompt": "x"}), &headers).await }
    };
    // 0.01 per image: the third request starts at 0.02 < 0.025 and is served; the fourth is not.
    for _ in 0..3 {
        assert_eq!(ask(Some("team-a")).await.status(), 200);
    }
    let r = ask(Some("team-a")).await;
    let retry: u64 = header(&r, "retry-after").parse().unwrap();
    assert!(retry > 0 && retry <= 86_400);
    let (s, e) = error_of(r).await;
    assert_eq!((s, e["code"].as_str()), (429, Some("budget_exceeded")));
    assert!(e["message"].as_str().unwrap().contains("0.0300 USD"), "{e}");
    assert_eq!(fake.calls(), 3, "a refused request never reaches a backend");
    // Keys without a budget, and requests without a key, are not limited.
    assert_eq!(ask(Some("team-b")).await.status(), 200);
    assert_eq!(ask(None).await.status(), 200);

    // on_exceed = "cheapest": an exhausted key is served by the cheapest backend only, here
    // against the priority order, and without the dearer one as a fallback.
    let (cheap, pricey) = (FakeVerda::start().await, FakeVerda::start().await);
    let gw = Gateway::start(&format!(
        "[routing]\norder = [\"pricey\", \"cheap\"]\n[budget]\non_exceed = \"cheapest\"\n[budget.keys]\nbroke = 0.0\n{}{}",
        backend("cheap", &cheap, "[backends.cheap.cost]\nper_image_usd = 0.001"),
        backend("pricey", &pricey, "[backends.pricey.cost]\nper_image_usd = 0.05"),
    ))
    .await;
    let broke = [("x-kleingate-client", "broke")];
    let r = post_with(&gw, "/generate", json!({"prompt": "x"}), &broke).await;
    assert_eq!(header(&r, "x-kleingate-backend"), "cheap");
    assert_eq!(
        header(
            &post(&gw, "/generate", json!({"prompt": "x"})).await,
            "x-kleingate-backend"
        ),
        "pricey"
    );
    cheap.kill();
    let r = post_with(&gw, "/generate", json!({"prompt": "x"}), &broke).await;
    assert_eq!(r.status(), 503);
    assert_eq!(pricey.calls(), 1);
}

#[tokio::test]
async fn experiments_assign_sticky_variants_and_keep_results_and_feedback_across_restarts() {
    let (fa, fb) = (FakeVerda::start().await, FakeVerda::start().await);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kleingate.db");
    let config = format!(
        "[storage]\npath = \"{}\"\n[experiments.ab]\nvariants = [{{ name = \"a\", backend = \"fa\" }}, {{ name = \"b\", backend = \"fb\" }}]\n{}{}",
        db.display(),
        backend("fa", &fa, "[backends.fa.cost]\nper_image_usd = 0.01"),
        backend("fb", &fb, "[backends.fb.cost]\nper_image_usd = 0.02"),
    );
    let gw = Gateway::start(&config).await;
    let ask = |client: String, seed: u64| {
        let gw = &gw;
        async move {
            post_with(
                gw,
                "/generate",
                json!({"prompt": "a fox", "seed": seed}),
                &[
                    ("x-kleingate-experiment", "ab"),
                    ("x-kleingate-client", &client),
                ],
            )
            .await
        }
    };
    // Sticky: one client always gets the same variant, served by that variant's backend.
    let first = ask("alice".into(), 1).await;
    let variant = header(&first, "x-kleingate-variant");
    for seed in 2..6 {
        let r = ask("alice".into(), seed).await;
        assert_eq!(header(&r, "x-kleingate-variant"), variant);
        assert_eq!(header(&r, "x-kleingate-backend"), format!("f{variant}"));
    }
    // Across clients both variants are used.
    let mut ids = std::collections::BTreeMap::<String, Vec<String>>::new();
    for i in 0..20 {
        let r = ask(format!("client-{i}"), 100 + i).await;
        assert_eq!(r.status(), 200);
        ids.entry(header(&r, "x-kleingate-variant"))
            .or_default()
            .push(header(&r, "x-kleingate-result-id"));
    }
    assert_eq!(ids.len(), 2, "{ids:?}");
    // Feedback by request id: a score, thumbs, and the refusals.
    let fb_post = |body: Value| {
        let gw = &gw;
        async move { post(gw, "/v1/feedback", body).await }
    };
    let a_id = ids["a"][0].clone();
    assert_eq!(
        fb_post(json!({"request_id": a_id, "score": 4}))
            .await
            .status(),
        200
    );
    assert_eq!(
        fb_post(json!({"request_id": ids["a"][1], "thumbs": "down"}))
            .await
            .status(),
        200
    );
    assert_eq!(
        fb_post(json!({"request_id": ids["b"][0], "thumbs": "up"}))
            .await
            .status(),
        200
    );
    assert_eq!(
        fb_post(json!({"request_id": "nope", "score": 3}))
            .await
            .status(),
        404
    );
    let (s, e) = error_of(fb_post(json!({"request_id": a_id, "score": 7})).await).await;
    assert_eq!((s, e["field"].as_str()), (400, Some("score")));
    // A repeated request is a cache hit: recorded, but not counted as a measurement.
    let hit = ask("alice".into(), 1).await;
    assert_eq!(header(&hit, "x-kleingate-cache"), "hit");
    // Unknown experiments are refused.
    let r = post_with(
        &gw,
        "/generate",
        json!({"prompt": "x"}),
        &[("x-kleingate-experiment", "zz")],
    )
    .await;
    assert_eq!(error_of(r).await.1["code"], "unknown_experiment");

    let results = |gw: &Gateway| {
        let url = gw.url("/v1/experiments/ab");
        async move {
            reqwest::get(url)
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let check = |v: &Value| {
        let by: std::collections::BTreeMap<&str, &Value> = v["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["variant"].as_str().unwrap(), r))
            .collect();
        // Alice's five generated answers count for her variant; her cache hit does not.
        let alice = if variant == "a" { 5 } else { 0 };
        assert_eq!(by["a"]["count"], json!(ids["a"].len() + alice));
        assert_eq!(by["a"]["feedback"], 2);
        assert_eq!(by["a"]["mean_score"], 2.5);
        assert_eq!(by["b"]["mean_score"], 5.0);
        assert!((by["a"]["mean_cost_usd"].as_f64().unwrap() - 0.01).abs() < 1e-9);
        assert!((by["b"]["mean_cost_usd"].as_f64().unwrap() - 0.02).abs() < 1e-9);
        let recorded: u64 = by.values().map(|r| r["recorded"].as_u64().unwrap()).sum();
        assert_eq!(recorded, 26, "5 from alice, 20 others, the hit");
    };
    check(&results(&gw).await);
    let m = metrics(&gw).await;
    assert_eq!(
        sample(
            &m,
            "kleingate_experiment_assignments_total",
            &[("experiment", "ab")]
        ),
        26.0
    );
    assert_eq!(
        sample(
            &m,
            "kleingate_experiment_feedback_total",
            &[("variant", "a")]
        ),
        2.0
    );
    // Latency and cost per variant count only the measuring answers (not alice's cache hit).
    let measured_a = (ids["a"].len() + if variant == "a" { 5 } else { 0 }) as f64;
    assert_eq!(
        sample(
            &m,
            "kleingate_experiment_latency_seconds_count",
            &[("variant", "a")]
        ),
        measured_a
    );
    assert!(
        (sample(
            &m,
            "kleingate_experiment_cost_usd_total",
            &[("variant", "a")]
        ) - 0.01 * measured_a)
            .abs()
            < 1e-9
    );

    // A restart keeps everything (SQLite file).
    drop(gw);
    let gw = Gateway::start(&config).await;
    check(&results(&gw).await);
    assert_eq!(
        reqwest::get(gw.url("/v1/experiments/zz"))
            .await
            .unwrap()
            .status(),
        404
    );
}

#[tokio::test]
async fn shadow_experiments_store_pairs_without_delaying_the_client() {
    let (fa, fb) = (FakeVerda::start().await, FakeVerda::start().await);
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&shadow_config(
        dir.path(),
        &fa,
        &fb,
        "",
        "timeout_secs = 30",
    ))
    .await;
    // The shadow's backend never answers: the client still gets its answer (nothing waits on
    // the shadow).
    fb.set_mode(Mode::Hang);
    // (A bound, not a speed measurement: a gateway that waited for the shadow would answer only
    // after fb's 30 s timeout.)
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        post_with(
            &gw,
            "/generate",
            json!({"prompt": "a fox"}),
            &[("x-kleingate-experiment", "ab")],
        ),
    )
    .await
    .expect("the client's answer waited for the shadow");
    assert_eq!(
        (r.status().as_u16(), header(&r, "x-kleingate-variant")),
        (200, "a".into())
    );
    // The shadow starts once the answer is out: wait until it hangs on fb before fb recovers.
    for _ in 0..200 {
        if fb.calls() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(fb.calls(), 1);
    // Now a pair that completes: the shadow runs variant b with the same prompt and seed (a seed
    // is chosen for unseeded requests so that the pair is comparable).
    fb.set_mode(Mode::Image);
    let r = post_with(
        &gw,
        "/generate",
        json!({"prompt": "a cat"}),
        &[("x-kleingate-experiment", "ab")],
    )
    .await;
    let id = header(&r, "x-kleingate-result-id");
    let seed = header(&r, "x-seed");
    assert!(!seed.is_empty());
    let image = r.bytes().await.unwrap();
    let shadow_image = gw.url(&format!("/v1/experiments/ab/images/{id}.shadow"));
    let mut tries = 0;
    let shadow = loop {
        let s = reqwest::get(&shadow_image).await.unwrap();
        if s.status() == 200 || tries == 100 {
            break s;
        }
        tries += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(shadow.status(), 200);
    assert_eq!(shadow.bytes().await.unwrap(), fb.image());
    assert_eq!(fb.last_body().unwrap()["seed"].to_string(), seed);
    assert_eq!(fb.last_body().unwrap()["prompt"], "a cat");
    let own = reqwest::get(gw.url(&format!("/v1/experiments/ab/images/{id}")))
        .await
        .unwrap();
    assert_eq!(own.bytes().await.unwrap(), image);
    // The page shows the pair, with the prompt escaped and a vote button per side.
    let page = reqwest::get(gw.url("/ui/experiments/ab"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("a cat") && page.contains(&format!("data-win=\"{id}.shadow\"")),
        "{page}"
    );
    assert_eq!(
        page.matches("class=\"vote\"").count(),
        2,
        "one pair: the hung shadow has no image"
    );
    let r = post_with(
        &gw,
        "/generate",
        json!({"prompt": "<script>x</script>", "seed": 5}),
        &[("x-kleingate-experiment", "ab")],
    )
    .await;
    assert_eq!(r.status(), 200);
    let mut page = String::new();
    for _ in 0..100 {
        page = reqwest::get(gw.url("/ui/experiments/ab"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if page.contains("&lt;script&gt;") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(page.contains("&lt;script&gt;x&lt;/script&gt;") && !page.contains("<script>x"));
}

/// `GET /openapi.json` describes every route the gateway serves (each documented path and method
/// reaches a handler, not the router's 404/405), names every error code, and states the limits
/// this gateway is configured with.
#[tokio::test]
async fn the_openapi_document_matches_the_routes_and_the_config() {
    let a = FakeVerda::start().await;
    let gw = Gateway::start(&format!(
        "[limits]\nmax_side = 512\n{}",
        backend("verda", &a, "")
    ))
    .await;
    let doc = get_json(&gw, "/openapi.json").await;
    assert_eq!(doc["openapi"], "3.1.0");
    let body = &doc["components"]["schemas"]["GenerateBody"]["properties"];
    assert_eq!(body["width"]["maximum"], 512.0);
    assert_eq!(body["height"]["minimum"], 64.0);
    let text = doc.to_string();
    for code in kleingate_protocol::ErrorCode::ALL {
        assert!(
            text.contains(&format!("`{code}`")),
            "{code} is not documented"
        );
    }
    // The answer itself, not where a redirect leads.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 12, "{:?}", paths.keys());
    for (path, item) in paths {
        let url = path
            .replace("{model}", "flux2-klein-4b")
            .replace("{name}", "none")
            .replace("{id}", "none");
        for method in item.as_object().unwrap().keys() {
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let resp = client.request(m, gw.url(&url)).send().await.unwrap();
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap();
            assert!(
                status != 405 && !text.contains("no such route"),
                "{method} {path}: {status} {text}"
            );
            // Every status answered is one the document lists for the operation.
            assert!(
                item[method]["responses"][status.to_string()].is_object(),
                "{method} {path}: {status} is not documented"
            );
        }
    }
}

/// A feedback or sign-in body over axum's 2 MB limit is refused in the API's own error shape
/// (JSON `too_large`), not the extractor's plain-text answer.
#[tokio::test]
async fn oversized_small_bodies_get_the_apis_error_shape() {
    let a = FakeVerda::start().await;
    let gw = Gateway::start(&backend("verda", &a, "")).await;
    let big = format!("{{\"request_id\": \"{}\"}}", "x".repeat(3 << 20));
    let client = reqwest::Client::new();
    for (path, ct) in [
        ("/v1/feedback", "application/json"),
        ("/ui/login", "application/x-www-form-urlencoded"),
    ] {
        let resp = client
            .post(gw.url(path))
            .header("content-type", ct)
            .body(big.clone())
            .send()
            .await
            .unwrap();
        let (s, e) = error_of(resp).await;
        assert_eq!((s, e["code"].as_str()), (413, Some("too_large")), "{path}");
    }
}

/// Path segments that are not valid UTF-8 once decoded get the API's JSON errors, not axum's
/// plain-text rejection.
#[tokio::test]
async fn undecodable_paths_get_the_apis_error_shape() {
    let a = FakeVerda::start().await;
    let gw = Gateway::start(&backend("verda", &a, "")).await;
    let r = reqwest::Client::new()
        .post(gw.url("/%FF/generate"))
        .header("content-type", "application/json")
        .body("{\"prompt\": \"x\"}")
        .send()
        .await
        .unwrap();
    let (s, e) = error_of(r).await;
    assert_eq!((s, e["code"].as_str()), (404, Some("unknown_model")));
    for path in ["/v1/experiments/%FF", "/v1/experiments/x/images/%FF"] {
        let (s, e) = error_of(reqwest::get(gw.url(path)).await.unwrap()).await;
        assert_eq!((s, e["code"].as_str()), (404, Some("not_found")), "{path}");
    }
}
