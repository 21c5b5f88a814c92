//! Hardening over HTTP: client API keys and permissions, per-client rate limits, load shedding,
//! and safe fetching of `input_images` URLs for the local engine.

use std::time::{Duration, Instant};

use axum::response::{IntoResponse, Redirect};
use axum::routing::get;
use base64::Engine as _;
use kleingate_gateway::auth::hash_key;
use kleingate_tests::fake_verda::Mode;
use kleingate_tests::{FakeVerda, Gateway};
use serde_json::{json, Value};

mod common;
use common::*;

const KEY_A: &str = "kg_test_key_for_team_a_0123456789";
const KEY_B: &str = "kg_test_key_for_team_b_9876543210";

fn keys(extra_b: &str) -> String {
    format!(
        "[[auth.keys]]\nname = \"team-a\"\nsha256 = \"{}\"\nbackend_header = true\nexperiments = true\n\n\
         [[auth.keys]]\nname = \"team-b\"\nsha256 = \"{}\"\nmodels = [\"flux2-klein-9b\"]\nbackends = [\"second\"]\n{extra_b}\n",
        hash_key(KEY_A),
        hash_key(KEY_B)
    )
}

fn bearer(key: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer {key}"))
}

async fn post_key(gw: &Gateway, path: &str, body: Value, key: &str) -> reqwest::Response {
    let (h, v) = bearer(key);
    post_with(gw, path, body, &[(h, &v)]).await
}

#[tokio::test]
async fn api_keys_gate_every_client_route_and_scope_models_and_backends() {
    let first = FakeVerda::start().await;
    let second = FakeVerda::start().await;
    let cfg = format!(
        "{}{}{}",
        backend(
            "first",
            &first,
            "models = [\"flux2-klein-4b\", \"flux2-klein-9b\"]"
        ),
        backend(
            "second",
            &second,
            "models = [\"flux2-klein-4b\", \"flux2-klein-9b\"]"
        ),
        keys("")
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{cfg}[storage]\npath = \"{}\"\n[experiments.only4b]\nvariants = [{{ name = \"a\", model = \"flux2-klein-4b\" }}, {{ name = \"b\", model = \"flux2-klein-base-4b\", weight = 0 }}]\n",
        dir.path().join("k.db").display()
    );
    let gw = Gateway::start(&cfg).await;
    let body = json!({"prompt": "a fox", "seed": 1});

    // No key, a wrong key, a key in the wrong scheme: 401 with a challenge; the key is not echoed.
    let r = post(&gw, "/generate", body.clone()).await;
    assert_eq!(r.status(), 401);
    assert_eq!(header(&r, "www-authenticate"), "Bearer realm=\"kleingate\"");
    let r = post_key(&gw, "/generate", body.clone(), "kg_wrong_secret_value").await;
    let text = r.text().await.unwrap();
    assert!(
        text.contains("unauthorized") && !text.contains("kg_wrong"),
        "{text}"
    );
    let r = post_with(&gw, "/generate", body.clone(), &[("authorization", KEY_A)]).await;
    assert_eq!(r.status(), 401);
    for path in ["/v1/models", "/v1/backends", "/v1/experiments/x"] {
        let r = reqwest::get(gw.url(path)).await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    // The vote page sends a browser to the sign-in form instead.
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(gw.url("/ui/experiments/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(
        header(&r, "location"),
        "/ui/login?next=%2Fui%2Fexperiments%2Fx"
    );
    // Probes and the scraper need no key.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = reqwest::get(gw.url(path)).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    assert_eq!((first.calls(), second.calls()), (0, 0));

    // team-a may do anything, including choosing a backend.
    let r = post_key(&gw, "/flux2-klein-4b/generate", body.clone(), KEY_A).await;
    assert_eq!(r.status(), 200);
    let (h, v) = bearer(KEY_A);
    let r = post_with(
        &gw,
        "/generate",
        json!({"prompt": "a fox", "seed": 2}),
        &[(h, &v), ("x-kleingate-backend", "second")],
    )
    .await;
    assert_eq!(header(&r, "x-kleingate-backend"), "second");

    // team-b: only klein-9b, only on `second`, no backend header.
    let (status, e) =
        error_of(post_key(&gw, "/flux2-klein-4b/generate", body.clone(), KEY_B).await).await;
    assert_eq!(
        (status, e["code"].as_str(), e["field"].as_str()),
        (403, Some("model_not_allowed"), Some("model"))
    );
    let (h, v) = bearer(KEY_B);
    let (status, e) = error_of(
        post_with(
            &gw,
            "/flux2-klein-9b/generate",
            body.clone(),
            &[(h, &v), ("x-kleingate-backend", "second")],
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, e["code"].as_str()),
        (403, Some("backend_header_not_allowed"))
    );
    // An experiment cannot hand team-b a model it may not use.
    let (status, e) = error_of(
        post_with(
            &gw,
            "/flux2-klein-9b/generate",
            body.clone(),
            &[(h, &v), ("x-kleingate-experiment", "only4b")],
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, e["code"].as_str(), e["field"].as_str()),
        (
            403,
            Some("model_not_allowed"),
            Some("X-Kleingate-Experiment")
        )
    );
    // Experiment data (other clients' prompts and images) needs `experiments = true`.
    let get_as = |key: &'static str| {
        let url = gw.url("/v1/experiments/only4b");
        async move {
            reqwest::Client::new()
                .get(url)
                .header("authorization", format!("Bearer {key}"))
                .send()
                .await
                .unwrap()
        }
    };
    let (status, e) = error_of(get_as(KEY_B).await).await;
    assert_eq!(
        (status, e["code"].as_str()),
        (403, Some("experiments_not_allowed"))
    );
    assert_eq!(get_as(KEY_A).await.status(), 200);
    let before = (first.calls(), second.calls());
    let r = post_key(
        &gw,
        "/flux2-klein-9b/generate",
        json!({"prompt": "b", "seed": 9}),
        KEY_B,
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-kleingate-backend"), "second");
    // Even with `second` down, team-b's requests do not fall back to a backend it may not use.
    second.set_mode(Mode::ServerError);
    let r = post_key(
        &gw,
        "/flux2-klein-9b/generate",
        json!({"prompt": "b", "seed": 10}),
        KEY_B,
    )
    .await;
    assert_eq!(r.status(), 502, "{:?}", r.text().await);
    assert_eq!(first.calls(), before.0);

    let m = metrics(&gw).await;
    // Three generate calls and three /v1 reads; the UI redirect is not a refusal.
    assert_eq!(
        sample(
            &m,
            "kleingate_rejected_total",
            &[("reason", "unauthorized")]
        ),
        6.0
    );
    assert_eq!(
        sample(&m, "kleingate_rejected_total", &[("reason", "forbidden")]),
        4.0
    );
    assert_eq!(
        sample(
            &m,
            "kleingate_http_responses_total",
            &[("route", "/generate"), ("status", "401")]
        ),
        3.0
    );
}

/// POST the sign-in form `body` to `/ui/login` with `headers`, without following the redirect.
async fn sign_in(gw: &Gateway, body: String, headers: &[(&str, String)]) -> reqwest::Response {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut rb = client
        .post(gw.url("/ui/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body);
    for (k, v) in headers {
        rb = rb.header(*k, v);
    }
    rb.send().await.unwrap()
}

#[tokio::test]
async fn auth_can_be_switched_off_and_the_sign_in_cookie_works() {
    let fake = FakeVerda::start().await;
    let off = Gateway::start(&format!(
        "{}{}[auth]\nenabled = false\n",
        backend("v", &fake, "models = [\"flux2-klein-4b\"]"),
        keys("").replace("backends = [\"second\"]\n", "")
    ))
    .await;
    assert_eq!(
        post(&off, "/generate", json!({"prompt": "x"}))
            .await
            .status(),
        200
    );

    let on = Gateway::start(&format!(
        "{}{}",
        backend("second", &fake, "models = [\"flux2-klein-4b\"]"),
        keys("")
    ))
    .await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let bad = sign_in(&on, "key=nope&next=%2Fui%2Fexperiments%2Fx".into(), &[]).await;
    assert_eq!(bad.status(), 401);
    let good = sign_in(
        &on,
        format!("key={KEY_A}&next=https%3A%2F%2Fevil.example%2F"),
        &[],
    )
    .await;
    assert_eq!(good.status(), 303);
    // Never an open redirect, and the cookie is out of scripts' and other sites' reach.
    assert_eq!(header(&good, "location"), "/ui/login");
    let cookie = header(&good, "set-cookie");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(!cookie.contains("Secure"), "{cookie}");
    // Nor a header-splitting one; and behind TLS the cookie is Secure.
    let r = sign_in(
        &on,
        format!("key={KEY_A}&next=%2Fui%2F%0D%0Ax"),
        &[("x-forwarded-proto", "https".into())],
    )
    .await;
    assert_eq!(
        (r.status().as_u16(), header(&r, "location")),
        (303, "/ui/login".into())
    );
    assert!(header(&r, "set-cookie").contains("; Secure"));
    // A sign-in form on another site cannot plant its key in this browser.
    for (h, v) in [
        ("sec-fetch-site", "cross-site"),
        ("origin", "https://evil.example"),
    ] {
        let r = sign_in(&on, format!("key={KEY_A}"), &[(h, v.into())]).await;
        assert_eq!(r.status(), 403, "{h}");
    }
    // A stale cookie on a page sends the browser back to the form, not to a JSON error.
    let r = client
        .get(on.url("/ui/experiments/x"))
        .header("cookie", "kleingate_key=revoked")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    // A same-origin post from a browser that sends Origin but not Sec-Fetch-Site is fine.
    let r = sign_in(
        &on,
        format!("key={KEY_A}"),
        &[("origin", format!("http://{}", on.addr))],
    )
    .await;
    assert_eq!(r.status(), 303);
    let pair = cookie.split(';').next().unwrap().to_owned();
    let r = client
        .get(on.url("/v1/models"))
        .header("cookie", pair)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn rate_limits_are_per_client_and_say_when_to_retry() {
    let fake = FakeVerda::start().await;
    // One token per 100 s, a burst of 2; team-b has its own, larger allowance.
    let gw = Gateway::start(&format!(
        "{}{}[admission]\nrequests_per_sec = 0.01\nburst = 2\n",
        backend(
            "second",
            &fake,
            "models = [\"flux2-klein-4b\", \"flux2-klein-9b\"]"
        ),
        keys("requests_per_sec = 0.01\nburst = 3")
    ))
    .await;
    let body = json!({"prompt": "x", "seed": 1});
    for _ in 0..2 {
        assert_eq!(
            post_key(&gw, "/generate", body.clone(), KEY_A)
                .await
                .status(),
            200
        );
    }
    let r = post_key(&gw, "/generate", body.clone(), KEY_A).await;
    let retry: u64 = header(&r, "retry-after").parse().unwrap();
    assert!((95..=100).contains(&retry), "{retry}");
    let (status, e) = error_of(r).await;
    assert_eq!((status, e["code"].as_str()), (429, Some("rate_limited")));
    // Feedback writes share the client's bucket; cheap reads are not limited.
    let (h, v) = bearer(KEY_A);
    let r = reqwest::Client::new()
        .post(gw.url("/v1/feedback"))
        .header(h, &v)
        .json(&json!({"request_id": "x", "score": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let r = reqwest::Client::new()
        .get(gw.url("/v1/models"))
        .header(h, v)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // team-b is not held back by team-a, and has its own burst of 3.
    for i in 0..3 {
        let r = post_key(
            &gw,
            "/flux2-klein-9b/generate",
            json!({"prompt": "x", "seed": i}),
            KEY_B,
        )
        .await;
        assert_eq!(r.status(), 200, "request {i}");
    }
    assert_eq!(
        post_key(&gw, "/flux2-klein-9b/generate", body.clone(), KEY_B)
            .await
            .status(),
        429
    );
    // Rate-limited requests never reached the backend (team-a's second request was a cache hit).
    assert_eq!(fake.calls(), 4);
    let m = metrics(&gw).await;
    assert_eq!(
        sample(
            &m,
            "kleingate_rejected_total",
            &[("reason", "rate_limited")]
        ),
        3.0
    );

    // Without auth, clients are told apart by the client header, else by address.
    let open = Gateway::start(&format!(
        "{}[admission]\nrequests_per_sec = 0.01\nburst = 1\n",
        backend("v", &fake, "models = [\"flux2-klein-4b\"]"),
    ))
    .await;
    assert_eq!(post(&open, "/generate", body.clone()).await.status(), 200);
    assert_eq!(post(&open, "/generate", body.clone()).await.status(), 429);
    let r = post_with(
        &open,
        "/generate",
        body.clone(),
        &[("x-kleingate-client", "c1")],
    )
    .await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn over_capacity_requests_are_shed_at_once_not_queued() {
    let fake = FakeVerda::start().await;
    fake.set_mode(Mode::Slow(Duration::from_millis(1500)));
    let gw = Gateway::start(&format!(
        "{}[admission]\nmax_inflight = 2\n",
        backend("v", &fake, "models = [\"flux2-klein-4b\"]"),
    ))
    .await;
    let url = gw.url("/generate");
    let slow: Vec<_> = (0..2)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                reqwest::Client::new()
                    .post(url)
                    .json(&json!({"prompt": "x", "seed": i}))
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    // Wait until both are inside the gateway.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake.calls() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = post(&gw, "/generate", json!({"prompt": "x", "seed": 7})).await;
    assert_eq!(header(&r, "retry-after"), "1");
    let (status, e) = error_of(r).await;
    assert_eq!((status, e["code"].as_str()), (503, Some("overloaded")));
    // Health and metrics are not held up by a full gateway.
    assert_eq!(
        reqwest::get(gw.url("/healthz")).await.unwrap().status(),
        200
    );
    for t in slow {
        assert_eq!(t.await.unwrap(), 200);
    }
    // The places are given back once the slow requests are answered.
    fake.set_mode(Mode::Image);
    assert_eq!(
        post(&gw, "/generate", json!({"prompt": "x", "seed": 8}))
            .await
            .status(),
        200
    );
    assert_eq!(fake.calls(), 3);
    let m = metrics(&gw).await;
    assert_eq!(
        sample(&m, "kleingate_rejected_total", &[("reason", "overloaded")]),
        1.0
    );
}

fn reference() -> Vec<u8> {
    std::fs::read(format!("{CASES}/edit_1ref.ref0.png")).unwrap()
}

/// An image host on 127.0.0.1 with the ways a URL can go wrong.
async fn image_host() -> std::net::SocketAddr {
    let png = reference();
    let app = axum::Router::new()
        .route("/ref.png", get(move || async move { png.clone() }))
        .route("/to-ref", get(|| async { Redirect::temporary("/ref.png") }))
        .route(
            "/to-metadata",
            get(|| async { Redirect::temporary("http://169.254.169.254/latest/meta-data/") }),
        )
        .route(
            "/to-private",
            get(|| async { Redirect::temporary("http://10.0.0.1/x.png") }),
        )
        .route("/loop", get(|| async { Redirect::temporary("/loop") }))
        .route(
            "/html",
            get(|| async { "<html><body>not an image</body></html>" }),
        )
        .route("/big", get(|| async { vec![0xFFu8; 300_000] }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late".into_response()
            }),
        )
        .route(
            "/missing",
            get(|| async { (axum::http::StatusCode::NOT_FOUND, "no") }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn local_cfg(fetch: &str) -> String {
    format!("{}[fetch]\n{fetch}\n", local(""))
}

async fn wait_loaded(gw: &Gateway) {
    assert_eq!(wait_ready(gw, "local").await["health"]["state"], "ready");
}

fn edit(url: &str) -> Value {
    json!({"prompt": "an oil painting", "seed": 3, "width": 80, "height": 64, "output_format": "png",
           "input_images": [url], "enable_safety_checker": false})
}

#[tokio::test]
async fn input_image_urls_are_fetched_safely_for_the_local_engine() {
    let host = image_host().await;
    let url = |p: &str| format!("http://{host}{p}");

    // By default the gateway fetches nothing from loopback (nor any other internal range).
    let strict = Gateway::start(&local_cfg("")).await;
    wait_loaded(&strict).await;
    let (status, e) = error_of(post(&strict, "/generate", edit(&url("/ref.png"))).await).await;
    assert_eq!(
        (status, e["field"].as_str()),
        (400, Some("input_images[0]")),
        "{e}"
    );
    assert!(e["message"].as_str().unwrap().contains("loopback"), "{e}");

    // With this host's network allowed, everything else still holds.
    let gw = Gateway::start(&local_cfg(
        "allow_networks = [\"127.0.0.1/32\"]\nmax_bytes = 200000\ntimeout_secs = 1.0\nmax_redirects = 2",
    ))
    .await;
    wait_loaded(&gw).await;
    let r = post(&gw, "/generate", edit(&url("/ref.png"))).await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let by_url = r.bytes().await.unwrap();
    // The same image as sending the reference inline.
    let inline = base64::engine::general_purpose::STANDARD.encode(reference());
    let r = post(&gw, "/generate", edit(&inline)).await;
    assert_eq!(r.bytes().await.unwrap(), by_url);
    // A redirect to an allowed place is followed.
    let r = post(&gw, "/generate", edit(&url("/to-ref"))).await;
    assert_eq!(r.status(), 200);

    for (path, why) in [
        ("/to-metadata", "169.254.169.254 is a link-local address"),
        ("/to-private", "private"),
        ("/loop", "more than 2 redirects"),
        ("/html", "not an image"),
        ("/big", "over the limit of 200000 bytes"),
        ("/slow", "within 1 s"),
        ("/missing", "404"),
    ] {
        let started = Instant::now();
        let mut body = edit(&inline);
        body["input_images"] = json!([inline, url(path)]);
        let (status, e) = error_of(post(&gw, "/generate", body).await).await;
        assert_eq!(
            (status, e["field"].as_str()),
            (400, Some("input_images[1]")),
            "{path}: {e}"
        );
        let msg = e["message"].as_str().unwrap();
        assert!(msg.contains(why), "{path}: {msg}");
        assert!(started.elapsed() < Duration::from_secs(10), "{path}");
    }
    // A port that refuses connections, and a scheme other than http(s).
    let (status, e) =
        error_of(post(&gw, "/generate", edit("http://127.0.0.1:1/x.png")).await).await;
    assert_eq!(
        (status, e["field"].as_str()),
        (400, Some("input_images[0]")),
        "{e}"
    );
}

#[tokio::test]
async fn shadow_runs_stay_within_the_keys_backends() {
    let first = FakeVerda::start().await;
    let second = FakeVerda::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&format!(
        "{}{}{}[storage]\npath = \"{}\"\n[experiments.ab]\nshadow = true\nvariants = [{{ name = \"a\", backend = \"second\" }}, {{ name = \"b\", backend = \"first\", weight = 0 }}]\n\
         [experiments.onfirst]\nvariants = [{{ name = \"x\", backend = \"first\" }}, {{ name = \"y\", backend = \"first\" }}]\n\
         [experiments.half]\nvariants = [{{ name = \"p\" }}, {{ name = \"q\" }}]\n",
        backend("first", &first, "models = [\"flux2-klein-9b\"]"),
        backend("second", &second, "models = [\"flux2-klein-9b\"]"),
        keys(""),
        dir.path().join("k.db").display()
    ))
    .await;
    let (h, v) = bearer(KEY_B);
    let r = post_with(
        &gw,
        "/flux2-klein-9b/generate",
        json!({"prompt": "x", "seed": 4}),
        &[(h, &v), ("x-kleingate-experiment", "ab")],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-kleingate-variant"), "a");
    // The shadow (variant b runs on `first`) cannot run within team-b's scope (`second` only):
    // it is skipped, not run elsewhere (where it would measure nothing, at the client's cost).
    let deadline = Instant::now() + Duration::from_secs(10);
    let skipped = || async {
        sample(
            &metrics(&gw).await,
            "kleingate_shadow_runs_total",
            &[("experiment", "ab"), ("outcome", "scope")],
        )
    };
    while skipped().await < 1.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(skipped().await, 1.0);
    assert_eq!((first.calls(), second.calls()), (0, 1));

    // A variant on a backend the key may not use is refused, not quietly served elsewhere.
    let r = post_with(
        &gw,
        "/flux2-klein-9b/generate",
        json!({"prompt": "x", "seed": 5}),
        &[(h, &v), ("x-kleingate-experiment", "onfirst")],
    )
    .await;
    let (status, e) = error_of(r).await;
    assert_eq!(
        (status, e["code"].as_str()),
        (403, Some("backend_not_allowed"))
    );
    // Under auth the variant follows the key's name: varying the client header changes nothing.
    let mut variants = std::collections::BTreeSet::new();
    for i in 0..8 {
        let client = format!("client-{i}");
        let r = post_with(
            &gw,
            "/flux2-klein-9b/generate",
            json!({"prompt": "x", "seed": 10 + i}),
            &[
                (h, &v),
                ("x-kleingate-experiment", "half"),
                ("x-kleingate-client", &client),
            ],
        )
        .await;
        assert_eq!(r.status(), 200);
        variants.insert(header(&r, "x-kleingate-variant"));
    }
    assert_eq!(variants.len(), 1, "{variants:?}");
}

#[tokio::test]
async fn a_client_trickling_its_body_gets_408_and_frees_its_place() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fake = FakeVerda::start().await;
    let gw = Gateway::start(&format!(
        "body_timeout_secs = 0.5\n{}[admission]\nmax_inflight = 1\n",
        backend("v", &fake, "models = [\"flux2-klein-4b\"]"),
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"prompt\"")
        .await
        .unwrap();
    // While it holds the one place, others are shed...
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, e) = error_of(post(&gw, "/generate", json!({"prompt": "x"})).await).await;
    assert_eq!((status, e["code"].as_str()), (503, Some("overloaded")));
    // ...until its time is up: 408, and the place is free again.
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).await.unwrap_or(0);
            answer.extend_from_slice(&buf[..n]);
            if n == 0 || answer.windows(12).any(|w| w == b"body_timeout") {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer to the trickling client");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert_eq!(
        post(&gw, "/generate", json!({"prompt": "x"}))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn with_auth_budgets_follow_the_key_not_the_client_header() {
    let fake = FakeVerda::start().await;
    let gw = Gateway::start(&format!(
        "{}{}[budget]\non_exceed = \"reject\"\n[budget.keys]\nteam-a = 0.015\n",
        backend(
            "second",
            &fake,
            "models = [\"flux2-klein-4b\"]\n[backends.second.cost]\nper_image_usd = 0.01"
        ),
        keys("")
    ))
    .await;
    let (h, v) = bearer(KEY_A);
    for (i, client) in ["x", "y"].iter().enumerate() {
        let r = post_with(
            &gw,
            "/generate",
            json!({"prompt": "x", "seed": i}),
            &[(h, &v), ("x-kleingate-client", client)],
        )
        .await;
        assert_eq!(r.status(), 200, "request {i}");
    }
    // 0.02 USD spent by team-a, whatever the header said: over its 0.015.
    let r = post_with(
        &gw,
        "/generate",
        json!({"prompt": "x", "seed": 9}),
        &[(h, &v), ("x-kleingate-client", "someone-else")],
    )
    .await;
    let (status, e) = error_of(r).await;
    assert_eq!((status, e["code"].as_str()), (429, Some("budget_exceeded")));
    assert!(e["message"].as_str().unwrap().contains("team-a"), "{e}");
}

#[tokio::test]
async fn a_client_trickling_its_headers_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fake = FakeVerda::start().await;
    let gw = Gateway::start(&format!(
        "header_timeout_secs = 0.5\n{}",
        backend("v", &fake, "models = [\"flux2-klein-4b\"]"),
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"POST /generate HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection was not closed");
    assert!(started.elapsed() >= Duration::from_millis(400));
    // Well-behaved clients are served as before.
    assert_eq!(
        post(&gw, "/generate", json!({"prompt": "x"}))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn keys_are_added_and_revoked_without_a_restart() {
    let fake = FakeVerda::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.toml");
    let entry = |name: &str, key: &str| {
        format!(
            "[[keys]]\nname = \"{name}\"\nsha256 = \"{}\"\n",
            hash_key(key)
        )
    };
    std::fs::write(&file, entry("team-a", KEY_A)).unwrap();
    let gw = Gateway::start(&format!(
        "{}[auth]\nkeys_file = \"{}\"\nreload_secs = 0.1\n",
        backend("v", &fake, "models = [\"flux2-klein-4b\"]"),
        file.display()
    ))
    .await;
    let status = |key: &'static str| {
        let url = gw.url("/v1/models");
        async move {
            reqwest::Client::new()
                .get(url)
                .header("authorization", format!("Bearer {key}"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let wait_for = |key: &'static str, want: u16| {
        let status = &status;
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while status(key).await != want {
                assert!(Instant::now() < deadline, "{key} never answered {want}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!((status(KEY_A).await, status(KEY_B).await), (200, 401));
    // Revoke team-a, add team-b: no restart.
    std::fs::write(&file, entry("team-b", KEY_B)).unwrap();
    wait_for(KEY_B, 200).await;
    assert_eq!(status(KEY_A).await, 401);
    // A broken file leaves the keys in force.
    std::fs::write(&file, "[[keys]]\nname = \"x\"\nsha256 = \"not-a-digest\"\n").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!((status(KEY_A).await, status(KEY_B).await), (401, 200));
}

#[tokio::test]
async fn an_upstreams_absurd_retry_after_is_bounded_not_a_crash() {
    let fake = FakeVerda::start().await;
    fake.set_mode(Mode::Unavailable {
        retry_after: Some(u64::MAX),
    });
    let gw = Gateway::start(&backend("v", &fake, "models = [\"flux2-klein-4b\"]")).await;
    let r = post(&gw, "/generate", json!({"prompt": "x", "seed": 1})).await;
    assert_eq!(r.status(), 503);
    let retry: u64 = header(&r, "retry-after").parse().unwrap();
    assert!((1..=3600).contains(&retry), "{retry}");
    // And the gateway is still serving.
    assert_eq!(
        reqwest::get(gw.url("/healthz")).await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn open_connections_are_capped() {
    let fake = FakeVerda::start().await;
    let gw = Gateway::start(&format!(
        "{}[admission]\nmax_connections = 1\n",
        backend("v", &fake, "models = [\"flux2-klein-4b\"]"),
    ))
    .await;
    // One client holds the only connection...
    let hog = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // ...so another is not served (the kernel queues its connection, the gateway does not take it)...
    let quick = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    assert!(quick.get(gw.url("/healthz")).send().await.is_err());
    // ...until it goes.
    drop(hog);
    let r = reqwest::Client::new()
        .get(gw.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
