//! Regressions for the hostile-client review (issue 11): each test here failed before its fix.
//! The SSRF allow rule is tested against the whole IANA registries in `gateway/src/fetch.rs`,
//! and one vote per voter also in `gateway/src/experiments.rs`.

use std::time::{Duration, Instant};

use kleingate_gateway::auth::hash_key;
use kleingate_tests::fake_verda::{fake_jpeg, Mode};
use kleingate_tests::{FakeVerda, Gateway};
use serde_json::{json, Value};

mod common;
use common::*;

const KEY_1: &str = "kg_review_key_one_0123456789abcdef";
const KEY_2: &str = "kg_review_key_two_0123456789abcdef";
const KEY_OPS: &str = "kg_review_key_ops_0123456789abcdef";

/// A `[[auth.keys]]` entry.
fn key(name: &str, secret: &str, extra: &str) -> String {
    format!(
        "[[auth.keys]]\nname = \"{name}\"\nsha256 = \"{}\"\n{extra}\n",
        hash_key(secret)
    )
}

fn bearer(secret: &str) -> String {
    format!("Bearer {secret}")
}

async fn post_as(gw: &Gateway, secret: &str, path: &str, body: Value) -> reqwest::Response {
    let b = bearer(secret);
    post_with(gw, path, body, &[("authorization", &b)]).await
}

async fn get_as(gw: &Gateway, secret: &str, path: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(gw.url(path))
        .header("authorization", bearer(secret))
        .send()
        .await
        .unwrap()
}

/// Poll `f` until it is true or 10 s pass; whether it became true.
async fn eventually<F, Fut>(mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Finding 1: two keys limited to different backends never share cache entries: not as a hit,
/// not as a coalesced wait, and one key's `no-cache` does not replace the other's entry.
#[tokio::test]
async fn the_cache_never_crosses_key_scopes() {
    let up1 = FakeVerda::start_with(fake_jpeg(3001), None).await;
    let up2 = FakeVerda::start_with(fake_jpeg(3002), None).await;
    let gw = Gateway::start(&format!(
        "{}{}{}{}",
        backend("up1", &up1, ""),
        backend("up2", &up2, ""),
        key("one", KEY_1, "backends = [\"up1\"]"),
        key("two", KEY_2, "backends = [\"up2\"]"),
    ))
    .await;
    let body = json!({"prompt": "a fox", "seed": 7});
    let r = post_as(&gw, KEY_1, "/generate", body.clone()).await;
    assert_eq!(
        (
            header(&r, "x-kleingate-backend"),
            header(&r, "x-kleingate-cache")
        ),
        ("up1".into(), "miss".into())
    );
    let r = post_as(&gw, KEY_2, "/generate", body.clone()).await;
    assert_eq!(
        (
            header(&r, "x-kleingate-backend"),
            header(&r, "x-kleingate-cache")
        ),
        ("up2".into(), "miss".into()),
        "key two must not get key one's image"
    );
    assert_eq!(r.bytes().await.unwrap(), up2.image());
    // Within a scope the cache works as before.
    let r = post_as(&gw, KEY_1, "/generate", body.clone()).await;
    assert_eq!(header(&r, "x-kleingate-cache"), "hit");
    assert_eq!(r.bytes().await.unwrap(), up1.image());

    // no-cache from key one replaces its own entry only.
    let b = bearer(KEY_1);
    let r = post_with(
        &gw,
        "/generate",
        body.clone(),
        &[("authorization", &b), ("cache-control", "no-cache")],
    )
    .await;
    assert_eq!(header(&r, "x-kleingate-backend"), "up1");
    let r = post_as(&gw, KEY_2, "/generate", body.clone()).await;
    assert_eq!(
        (
            header(&r, "x-kleingate-backend"),
            header(&r, "x-kleingate-cache")
        ),
        ("up2".into(), "hit".into())
    );

    // Concurrent identical requests of the two keys: one backend call each, no coalescing
    // across the scopes.
    up1.set_mode(Mode::Slow(Duration::from_millis(300)));
    up2.set_mode(Mode::Slow(Duration::from_millis(300)));
    let (c1, c2) = (up1.calls(), up2.calls());
    let fresh = json!({"prompt": "a hen", "seed": 8});
    let (a, b) = tokio::join!(
        post_as(&gw, KEY_1, "/generate", fresh.clone()),
        post_as(&gw, KEY_2, "/generate", fresh.clone())
    );
    assert_eq!(
        (
            header(&a, "x-kleingate-backend"),
            header(&b, "x-kleingate-backend")
        ),
        ("up1".into(), "up2".into())
    );
    assert_ne!(header(&b, "x-kleingate-cache"), "coalesced");
    assert_eq!((up1.calls() - c1, up2.calls() - c2), (1, 1));
}

/// Finding 2: clients get a stable code and a plain message naming the backend; the upstream's
/// address and the loader's path go to the log and to `/v1/backends`, where only keys with
/// `operations` see them, and only for the backends they may use. Unknown names are answered
/// without listing what the key may not see.
#[tokio::test]
async fn internal_details_stay_with_the_operators() {
    let dead = FakeVerda::start().await;
    let alive = FakeVerda::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&format!(
        "{}{}{}{}{}[storage]\npath = \"{}\"\n\
         [experiments.secret9b]\nvariants = [{{ name = \"a\", model = \"flux2-klein-9b\" }}, {{ name = \"b\" }}]\n\
         [experiments.open]\nvariants = [{{ name = \"a\" }}, {{ name = \"b\" }}]\n",
        backend("dead", &dead, ""),
        backend("alive", &alive, "models = [\"flux2-klein-9b\"]"),
        key("one", KEY_1, "backends = [\"dead\"]\nbackend_header = true\nmodels = [\"flux2-klein-4b\"]"),
        key("two", KEY_2, "backend_header = true"),
        key("ops", KEY_OPS, "operations = true"),
        dir.path().join("k.db").display(),
    ))
    .await;
    dead.kill();
    let (s, e) = error_of(post_as(&gw, KEY_1, "/generate", json!({"prompt": "x"})).await).await;
    let msg = e["message"].as_str().unwrap();
    assert_eq!((s, e["code"].as_str()), (503, Some("no_backend_available")));
    assert!(msg.contains("`dead`"), "{msg}");
    let port = dead.addr.port().to_string();
    for leak in [
        "127.0.0.1",
        port.as_str(),
        "http://",
        "error sending",
        "tcp",
    ] {
        assert!(!msg.contains(leak), "`{leak}` reached the client: {msg}");
    }

    // /v1/backends: key one sees only `dead`, without the detail; ops sees both, with it.
    let v: Value = get_as(&gw, KEY_1, "/v1/backends")
        .await
        .json()
        .await
        .unwrap();
    let list = v["backends"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{v}");
    assert_eq!(list[0]["name"], "dead");
    assert!(list[0]["last_error"].is_null(), "{v}");
    let v: Value = get_as(&gw, KEY_OPS, "/v1/backends")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["backends"].as_array().unwrap().len(), 2);
    let detail = v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "dead")
        .unwrap()["last_error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(detail.contains("127.0.0.1"), "{detail}");
    // /v1/models lists only the backends a key may use.
    let v: Value = get_as(&gw, KEY_1, "/v1/models").await.json().await.unwrap();
    assert_eq!(v["models"][1]["backends"], json!(["dead"]), "{v}");
    let v: Value = get_as(&gw, KEY_OPS, "/v1/models")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["models"][1]["backends"], json!(["alive", "dead"]), "{v}");

    // A forced backend the key may not use is refused without saying whether it exists; an
    // unknown one lists only what the key may use.
    let b = bearer(KEY_1);
    let (s, e) = error_of(
        post_with(
            &gw,
            "/generate",
            json!({"prompt": "x"}),
            &[("authorization", &b), ("x-kleingate-backend", "alive")],
        )
        .await,
    )
    .await;
    assert_eq!((s, e["code"].as_str()), (403, Some("backend_not_allowed")));
    let b2 = bearer(KEY_2);
    let (s, e) = error_of(
        post_with(
            &gw,
            "/generate",
            json!({"prompt": "x"}),
            &[("authorization", &b2), ("x-kleingate-backend", "nope")],
        )
        .await,
    )
    .await;
    assert_eq!((s, e["code"].as_str()), (400, Some("unknown_backend")));
    assert!(e["message"].as_str().unwrap().contains("alive"), "{e}");
    // Key one may not use 9B: the experiment that runs it is not named to it.
    let (s, e) = error_of(
        post_with(
            &gw,
            "/generate",
            json!({"prompt": "x"}),
            &[("authorization", &b), ("x-kleingate-experiment", "nope")],
        )
        .await,
    )
    .await;
    let msg = e["message"].as_str().unwrap();
    assert_eq!((s, e["code"].as_str()), (400, Some("unknown_experiment")));
    assert!(msg.contains("open") && !msg.contains("secret9b"), "{msg}");
}

/// A one-colour 16-bit RGBA PNG from tests/data (made by make_png16.py there), as base64: tiny
/// to send, 8 bytes a pixel to decode.
fn png16(name: &str) -> String {
    use base64::Engine as _;
    let path = format!("{}/data/{name}", env!("CARGO_MANIFEST_DIR"));
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap())
}

/// Finding 4: what a reference costs is bounded before decoding (per image and per request),
/// decoding has a deadline, and it runs off the engine's thread: a 64x64 request sent while
/// another request's large reference decodes is answered first.
#[tokio::test]
async fn image_bombs_are_refused_and_never_hold_up_other_clients() {
    let gw = Gateway::start(&format!(
        "[routing]\nsafety = \"skip\"\n{}",
        local("max_reference_decode_mib = 100\n")
    ))
    .await;
    wait_ready(&gw, "local").await;
    let edit = |images: Vec<String>| json!({"prompt": "a fox", "seed": 1, "width": 64, "height": 64, "input_images": images});
    // 8192 x 8192 at 16 bits: over the 16 MP per image, refused on its header at once.
    let bomb = png16("bomb-8192x8192-rgba16.png");
    let (s, e) = error_of(post(&gw, "/generate", edit(vec![bomb])).await).await;
    assert_eq!(
        (s, e["field"].as_str()),
        (400, Some("input_images[0]")),
        "{e}"
    );
    assert!(e["message"].as_str().unwrap().contains("8192x8192"), "{e}");
    // Four 2048 x 2048 at 16 bits are 32 MiB each: within the per-image limit, over the
    // 100 MiB this backend allows a request.
    let big = png16("flat-2048x2048-rgba16.png");
    let (s, e) = error_of(post(&gw, "/generate", edit(vec![big; 4])).await).await;
    assert_eq!(
        (s, e["field"].as_str()),
        (400, Some("input_images[3]")),
        "{e}"
    );
    assert!(e["message"].as_str().unwrap().contains("100 MiB"), "{e}");

    // A reference that takes a while to decode (a 4096 x 2048 16-bit PNG, every row filtered,
    // cut short at the end so that it is refused only after decoding) is decoded off the
    // engine's thread: a small text-to-image request sent just after it is answered first.
    let cut = png16("slow-cut-4096x2048-rgba16.png");
    let url = gw.url("/generate");
    let started = Instant::now();
    let slow = tokio::spawn(async move {
        let r = reqwest::Client::new()
            .post(url)
            .json(&json!({"prompt": "a fox", "seed": 2, "width": 64, "height": 64, "input_images": [cut]}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = post(
        &gw,
        "/generate",
        json!({"prompt": "a hen", "seed": 3, "width": 64, "height": 64}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let small_done = Instant::now();
    let (status, slow_done) = slow.await.unwrap();
    eprintln!(
        "64x64 answered after {:?}, the broken reference refused after {:?}",
        small_done - started,
        slow_done - started
    );
    assert_eq!(status, 400);
    assert!(
        small_done < slow_done,
        "the 64x64 request waited for the other request's reference"
    );
}

/// Finding 4, the deadline: decoding past `reference_timeout_secs` is refused.
#[tokio::test]
async fn reference_decoding_has_a_deadline() {
    let gw = Gateway::start(&format!(
        "[routing]\nsafety = \"skip\"\n{}",
        local("reference_timeout_secs = 0.001\n")
    ))
    .await;
    wait_ready(&gw, "local").await;
    let (s, e) = error_of(
        post(
            &gw,
            "/generate",
            json!({"prompt": "a fox", "seed": 1, "input_images": [png16("flat-2048x2048-rgba16.png")]}),
        )
        .await,
    )
    .await;
    assert_eq!((s, e["field"].as_str()), (400, Some("input_images")), "{e}");
    assert!(e["message"].as_str().unwrap().contains("to decode"), "{e}");
}

/// Finding 5: the sign-in cookie authenticates API calls only from this gateway's own pages,
/// and JSON routes take JSON only.
#[tokio::test]
async fn the_cookie_works_only_same_origin_and_json_routes_take_json() {
    let up = FakeVerda::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&format!(
        "{}{}[storage]\npath = \"{}\"\n[experiments.ab]\nvariants = [{{ name = \"a\" }}, {{ name = \"b\" }}]\n",
        backend("up", &up, ""),
        key("one", KEY_1, "experiments = true"),
        dir.path().join("k.db").display(),
    ))
    .await;
    let cookie = format!("kleingate_key={KEY_1}");
    let host = gw.addr.to_string();
    let same_origin = format!("http://{host}");
    let send = |headers: Vec<(&'static str, String)>| {
        let mut rb = reqwest::Client::new()
            .post(gw.url("/generate"))
            .header("content-type", "application/json")
            .header("cookie", &cookie)
            .body(r#"{"prompt": "x", "seed": 1}"#);
        for (k, v) in headers {
            rb = rb.header(k, v);
        }
        async move { rb.send().await.unwrap().status().as_u16() }
    };
    // No sign of where it comes from, another site, a sibling site: refused.
    assert_eq!(send(vec![]).await, 401);
    assert_eq!(
        send(vec![("sec-fetch-site", "cross-site".into())]).await,
        401
    );
    assert_eq!(
        send(vec![("sec-fetch-site", "same-site".into())]).await,
        401
    );
    assert_eq!(
        send(vec![("origin", "http://evil.example".into())]).await,
        401
    );
    assert_eq!(up.calls(), 0);
    // From this gateway's own page: accepted.
    assert_eq!(
        send(vec![("sec-fetch-site", "same-origin".into())]).await,
        200
    );
    assert_eq!(send(vec![("origin", same_origin.clone())]).await, 200);
    // A read (an <img> load in an old browser) needs no header; the vote page loads.
    let r = reqwest::Client::new()
        .get(gw.url("/v1/experiments/ab"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // JSON routes: a form or text body is 415, whoever sends it.
    for path in ["/generate", "/v1/feedback"] {
        for ct in ["text/plain", "application/x-www-form-urlencoded"] {
            let r = reqwest::Client::new()
                .post(gw.url(path))
                .header("authorization", bearer(KEY_1))
                .header("content-type", ct)
                .body(r#"{"prompt": "x", "request_id": "x", "score": 5}"#)
                .send()
                .await
                .unwrap();
            let (s, e) = error_of(r).await;
            assert_eq!(
                (s, e["code"].as_str()),
                (415, Some("unsupported_media_type")),
                "{path} {ct}"
            );
        }
    }
    let r = reqwest::Client::new()
        .post(gw.url("/generate"))
        .header("authorization", bearer(KEY_1))
        .header("content-type", "application/json; charset=utf-8")
        .body(r#"{"prompt": "x", "seed": 1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Finding 6: one vote per result and voter; a later vote replaces the earlier one.
#[tokio::test]
async fn votes_count_once_per_result_and_key() {
    let up = FakeVerda::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&format!(
        "{}{}{}[storage]\npath = \"{}\"\n[experiments.ab]\nvariants = [{{ name = \"a\" }}, {{ name = \"b\", weight = 0 }}]\n",
        backend("up", &up, ""),
        key("one", KEY_1, "experiments = true"),
        key("two", KEY_2, ""),
        dir.path().join("k.db").display(),
    ))
    .await;
    let b = bearer(KEY_1);
    let r = post_with(
        &gw,
        "/generate",
        json!({"prompt": "x"}),
        &[("authorization", &b), ("x-kleingate-experiment", "ab")],
    )
    .await;
    let id = header(&r, "x-kleingate-result-id");
    for i in 0..21 {
        let score = if i == 20 { 2 } else { 5 };
        let r = post_as(
            &gw,
            KEY_1,
            "/v1/feedback",
            json!({"request_id": id, "score": score}),
        )
        .await;
        assert_eq!(r.status(), 200);
    }
    // Variant a's (vote count, mean score), as the results API reports them.
    let votes = || async {
        let v: Value = get_as(&gw, KEY_1, "/v1/experiments/ab")
            .await
            .json()
            .await
            .unwrap();
        let a = &v["results"][0];
        (a["feedback"].as_u64(), a["mean_score"].as_f64())
    };
    assert_eq!(votes().await, (Some(1), Some(2.0)));
    // Prometheus counts each voter's first vote only.
    let counted = || async {
        sample(
            &metrics(&gw).await,
            "kleingate_experiment_feedback_total",
            &[("experiment", "ab"), ("variant", "a")],
        )
    };
    assert_eq!(counted().await, 1.0);
    let r = post_as(
        &gw,
        KEY_2,
        "/v1/feedback",
        json!({"request_id": id, "thumbs": "up"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(votes().await, (Some(2), Some(3.5)));
    assert_eq!(counted().await, 2.0);
}

async fn shadow_runs(gw: &Gateway, outcome: &str) -> f64 {
    sample(
        &metrics(gw).await,
        "kleingate_shadow_runs_total",
        &[("experiment", "ab"), ("outcome", outcome)],
    )
}

/// Finding 7: a shadow starts after the client's answer, never for a cache hit, never past the
/// budget, leaves the last free slot of a backend and of `max_inflight` to clients, and is part
/// of the graceful drain.
#[tokio::test]
async fn shadows_never_slow_the_client() {
    let (fa, fb) = (FakeVerda::start().await, FakeVerda::start().await);
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&shadow_config(
        dir.path(),
        &fa,
        &fb,
        "shutdown_delay_secs = 0\n[budget]\ndefault_daily_usd = 0.015\non_exceed = \"cheapest\"",
        "",
    ))
    .await;
    let exp = ("x-kleingate-experiment", "ab");
    // After the answer: while the client's request is in flight, the shadow's backend is idle.
    fa.set_mode(Mode::Slow(Duration::from_millis(400)));
    let url = gw.url("/generate");
    let client = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .header("x-kleingate-experiment", "ab")
            .header("x-kleingate-client", "c1")
            .json(&json!({"prompt": "a fox", "seed": 1}))
            .send()
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        (fa.calls(), fb.calls()),
        (1, 0),
        "the shadow started before the answer"
    );
    assert_eq!(client.await.unwrap().status(), 200);
    assert!(eventually(|| async { fb.calls() == 1 }).await);
    fa.set_mode(Mode::Image);

    // A cache hit has no shadow.
    let r = post_with(
        &gw,
        "/generate",
        json!({"prompt": "a fox", "seed": 1}),
        &[exp, ("x-kleingate-client", "c1")],
    )
    .await;
    assert_eq!(header(&r, "x-kleingate-cache"), "hit");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fb.calls(), 1);

    // Past the budget (served by the cheapest backend): no shadow.
    let priced = |v: f64| format!("[backends.fa.cost]\nper_image_usd = {v}\n");
    drop(gw);
    let mut gw2 = Gateway::start(&format!(
        "{}\n{}[backends.fb.cost]\nper_image_usd = 0.01\n",
        shadow_config(dir.path(), &fa, &fb, "shutdown_delay_secs = 0\n[budget]\ndefault_daily_usd = 0.015\non_exceed = \"cheapest\"", ""),
        priced(0.01)
    ))
    .await;
    let calls_b = fb.calls();
    let r = post_with(
        &gw2,
        "/generate",
        json!({"prompt": "one", "seed": 2}),
        &[exp, ("x-kleingate-client", "c2")],
    )
    .await;
    assert_eq!(r.status(), 200);
    // Its shadow ran and was charged: 0.02 spent of 0.015.
    assert!(eventually(|| async { fb.calls() == calls_b + 1 }).await);
    assert!(eventually(|| async { shadow_runs(&gw2, "ran").await == 1.0 }).await);
    let r = post_with(
        &gw2,
        "/generate",
        json!({"prompt": "two", "seed": 3}),
        &[exp, ("x-kleingate-client", "c2")],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(eventually(|| async { shadow_runs(&gw2, "budget").await == 1.0 }).await);
    assert_eq!(fb.calls(), calls_b + 1);

    // The drain waits for a running shadow, and no new one starts while draining.
    fb.set_mode(Mode::Slow(Duration::from_millis(600)));
    let r = post_with(
        &gw2,
        "/generate",
        json!({"prompt": "three", "seed": 4}),
        &[exp, ("x-kleingate-client", "c3")],
    )
    .await;
    let id = header(&r, "x-kleingate-result-id");
    assert!(eventually(|| async { fb.calls() == calls_b + 2 }).await);
    let state = gw2.state.clone();
    tokio::time::timeout(Duration::from_secs(10), gw2.begin_shutdown())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let stored = state
        .experiments
        .store
        .as_ref()
        .unwrap()
        .image("ab", &format!("{id}.shadow"))
        .await
        .unwrap();
    assert_eq!(
        stored.map(|(_, b)| b),
        Some(fb.image().to_vec()),
        "the drain cut the shadow short"
    );
}

/// Finding 7: shadows take only idle capacity: never the last free slot of a backend nor the
/// last place under `max_inflight`.
#[tokio::test]
async fn shadows_leave_the_last_slot_to_clients() {
    let (fa, fb) = (FakeVerda::start().await, FakeVerda::start().await);
    let dir = tempfile::tempdir().unwrap();
    let cfg = shadow_config(dir.path(), &fa, &fb, "", "")
        .replace("[backends.fb]\n", "[backends.fb]\nmax_concurrency = 1\n");
    let gw = Gateway::start(&cfg).await;
    let exp = ("x-kleingate-experiment", "ab");
    let r = post_with(&gw, "/generate", json!({"prompt": "x", "seed": 1}), &[exp]).await;
    assert_eq!(r.status(), 200);
    assert!(eventually(|| async { shadow_runs(&gw, "no_capacity").await == 1.0 }).await);
    assert_eq!(fb.calls(), 0);

    let gw = Gateway::start(&format!(
        "{}\n[admission]\nmax_inflight = 1\n",
        shadow_config(dir.path(), &fa, &fb, "", "")
    ))
    .await;
    let r = post_with(&gw, "/generate", json!({"prompt": "y", "seed": 1}), &[exp]).await;
    assert_eq!(r.status(), 200);
    assert!(eventually(|| async { shadow_runs(&gw, "no_capacity").await == 1.0 }).await);
    assert_eq!(fb.calls(), 0);
}

/// Finding 7: the shadow of a variant without a model runs the client's model, not the model
/// of the variant that served the client.
#[tokio::test]
async fn a_shadow_runs_the_clients_model() {
    let (fa, fb) = (FakeVerda::start().await, FakeVerda::start().await);
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&format!(
        "[storage]\npath = \"{}\"\n[experiments.ab]\nshadow = true\nvariants = [{{ name = \"a\", backend = \"fa\", model = \"flux2-klein-9b\" }}, {{ name = \"b\", backend = \"fb\", weight = 0 }}]\n{}{}",
        dir.path().join("k.db").display(),
        backend("fa", &fa, "models = [\"flux2-klein-4b\", \"flux2-klein-9b\"]"),
        backend("fb", &fb, "models = [\"flux2-klein-4b\", \"flux2-klein-9b\"]"),
    ))
    .await;
    let r = post_with(
        &gw,
        "/flux2-klein-4b/generate",
        json!({"prompt": "x", "seed": 1}),
        &[("x-kleingate-experiment", "ab")],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(eventually(|| async { fb.calls() == 1 }).await);
    let m = metrics(&gw).await;
    let runs = |backend: &str, model: &str| {
        sample(
            &m,
            "kleingate_backend_request_duration_seconds_count",
            &[("backend", backend), ("model", model)],
        )
    };
    assert_eq!(runs("fa", "flux2-klein-9b"), 1.0, "{m}");
    assert_eq!(
        runs("fb", "flux2-klein-4b"),
        1.0,
        "the shadow ran the variant's model: {m}"
    );
    assert_eq!(runs("fb", "flux2-klein-9b"), 0.0);
}

/// Finding 8: a cache hit is served before routing and budgets: a client past its budget still
/// gets the images it already paid for.
#[tokio::test]
async fn a_cache_hit_is_served_past_the_budget() {
    let up = FakeVerda::start().await;
    let gw = Gateway::start(&format!(
        "[budget]\ndefault_daily_usd = 0.01\n{}[backends.up.cost]\nper_image_usd = 0.02\n",
        backend("up", &up, "")
    ))
    .await;
    let c = ("x-kleingate-client", "c1");
    let body = json!({"prompt": "x", "seed": 1});
    assert_eq!(
        post_with(&gw, "/generate", body.clone(), &[c])
            .await
            .status(),
        200
    );
    let (s, e) =
        error_of(post_with(&gw, "/generate", json!({"prompt": "y", "seed": 1}), &[c]).await).await;
    assert_eq!((s, e["code"].as_str()), (429, Some("budget_exceeded")));
    let r = post_with(&gw, "/generate", body, &[c]).await;
    assert_eq!(
        (r.status().as_u16(), header(&r, "x-kleingate-cache")),
        (200, "hit".into())
    );
    assert_eq!(up.calls(), 1);
}

/// Finding 9: however long an upstream's Retry-After, the back-off is at most
/// `max_retry_after_secs`, and a probe every `busy_probe_secs` brings a recovered backend back.
#[tokio::test]
async fn a_503_with_an_absurd_retry_after_does_not_park_a_backend() {
    let (a, b) = (FakeVerda::start().await, FakeVerda::start().await);
    let gw = Gateway::start(&format!(
        "[routing]\nmax_retry_after_secs = 30\nbusy_probe_secs = 0.3\n{}{}",
        backend("a", &a, ""),
        backend("b", &b, "")
    ))
    .await;
    a.set_mode(Mode::Unavailable {
        retry_after: Some(3600),
    });
    let r = post(&gw, "/generate", json!({"prompt": "x"})).await;
    assert_eq!(header(&r, "x-kleingate-backend"), "b");
    let v = get_json(&gw, "/v1/backends").await;
    let busy = v["backends"][0]["busy_for_secs"].as_f64().unwrap();
    assert!(busy > 0.0 && busy <= 30.0, "{v}");
    // `a` recovers long before the hour: once the probe interval has passed, it is used again.
    a.set_mode(Mode::Image);
    let r = post(&gw, "/generate", json!({"prompt": "y"})).await;
    assert_eq!(header(&r, "x-kleingate-backend"), "b", "still backing off");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = post(&gw, "/generate", json!({"prompt": "z"})).await;
    assert_eq!(header(&r, "x-kleingate-backend"), "a");
    let v = get_json(&gw, "/v1/backends").await;
    assert!(v["backends"][0]["busy_for_secs"].is_null(), "{v}");
}

/// Finding 10: on SIGTERM the gateway keeps serving for `shutdown_delay_secs` with `/readyz`
/// at 503 and `Connection: close` on every answer, then stops accepting.
#[tokio::test]
async fn shutdown_keeps_serving_while_readiness_turns_503() {
    let up = FakeVerda::start().await;
    let mut gw = Gateway::start(&format!(
        "shutdown_delay_secs = 1\n{}",
        backend("up", &up, "")
    ))
    .await;
    // A keep-alive connection, open before the signal.
    let client = reqwest::Client::new();
    assert_eq!(
        client.get(gw.url("/readyz")).send().await.unwrap().status(),
        200
    );
    let server = gw.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = client.get(gw.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let r = client
        .post(gw.url("/generate"))
        .json(&json!({"prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "still serving during the delay");
    assert_eq!(header(&r, "connection"), "close");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        reqwest::get(gw.url("/healthz")).await.is_err(),
        "no longer accepting"
    );
}

/// Finding 11: stored experiment images are deleted after `image_retention_days`.
#[tokio::test]
async fn stored_experiment_images_are_pruned() {
    let (fa, fb) = (FakeVerda::start().await, FakeVerda::start().await);
    let dir = tempfile::tempdir().unwrap();
    // Two seconds, in days.
    let cfg = shadow_config(dir.path(), &fa, &fb, "", "").replace(
        "[storage]\n",
        "[storage]\nimage_retention_days = 0.0000232\n",
    );
    let gw = Gateway::start(&cfg).await;
    let r = post_with(
        &gw,
        "/generate",
        json!({"prompt": "x", "seed": 1}),
        &[("x-kleingate-experiment", "ab")],
    )
    .await;
    let id = header(&r, "x-kleingate-result-id");
    let image = gw.url(&format!("/v1/experiments/ab/images/{id}"));
    assert_eq!(reqwest::get(&image).await.unwrap().status(), 200);
    assert!(
        eventually(|| async { reqwest::get(&image).await.unwrap().status() == 404 }).await,
        "the image outlived its retention"
    );
    assert!(
        sample(
            &metrics(&gw).await,
            "kleingate_storage_pruned_total",
            &[("kind", "image")]
        ) >= 1.0
    );
    // The result itself stays (results have their own, longer retention).
    let v = get_json(&gw, "/v1/experiments/ab").await;
    assert_eq!(v["results"][0]["recorded"], 1, "{v}");
}
