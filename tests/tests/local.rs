//! The local engine behind the gateway, over HTTP, on the tiny reference pipeline on CPU.

use std::time::{Duration, Instant};

use base64::Engine as _;
use kleingate_tests::{FakeVerda, Gateway};
use serde_json::{json, Value};

mod common;
use common::*;

#[tokio::test]
async fn local_engine_serves_text_to_image_and_editing_over_http() {
    let gw = Gateway::start(&local("")).await;
    assert_eq!(wait_ready(&gw, "local").await["health"]["state"], "ready");
    let body = json!({"prompt": "a red fox", "seed": 5, "width": 80, "height": 64, "output_format": "png", "enable_safety_checker": false});
    let r = post_with(
        &gw,
        "/flux2-klein-4b/generate",
        body.clone(),
        &[("x-kleingate-backend", "local")],
    )
    .await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    assert_eq!(
        (header(&r, "content-type"), header(&r, "x-seed")),
        ("image/png".into(), "5".into())
    );
    assert_eq!(
        (
            header(&r, "x-kleingate-backend"),
            header(&r, "x-has-nsfw-content")
        ),
        ("local".into(), "false".into())
    );
    let png = r.bytes().await.unwrap();
    let img = image::load_from_memory(&png).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (80, 64));
    // Deterministic: the same seed again (bypassing the cache) gives the same image.
    let again = post_with(
        &gw,
        "/flux2-klein-4b/generate",
        body.clone(),
        &[
            ("x-kleingate-backend", "local"),
            ("cache-control", "no-cache"),
        ],
    )
    .await;
    assert_eq!(again.bytes().await.unwrap(), png);
    // Another seed, or the base model (CFG, 3 steps), gives another image.
    let other = post_with(&gw, "/generate", json!({"prompt": "a red fox", "seed": 6, "width": 80, "height": 64, "output_format": "png", "enable_safety_checker": false}), &[]).await;
    assert_ne!(other.bytes().await.unwrap(), png);
    let base = post_with(&gw, "/flux2-klein-base-4b/generate", json!({"prompt": "a red fox", "seed": 5, "width": 80, "height": 64, "output_format": "png", "num_steps": 3, "guidance": 3.0, "enable_safety_checker": false}), &[]).await;
    assert_eq!(base.status(), 200);
    assert_ne!(base.bytes().await.unwrap(), png);

    // JSON answer, jpeg at a given quality.
    let r = post_with(&gw, "/generate", json!({"prompt": "x", "seed": 1, "width": 64, "height": 64, "enable_base64_output": true, "output_quality": 50, "enable_safety_checker": false}), &[]).await;
    let v: Value = r.json().await.unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v["image"].as_str().unwrap())
        .unwrap();
    assert_eq!(&bytes[..3], &[0xFF, 0xD8, 0xFF]);
    assert_eq!(
        (v["seed"].clone(), v["output_format"].clone()),
        (json!(1), json!("jpeg"))
    );

    // Editing with a base64 reference.
    let reference = base64::engine::general_purpose::STANDARD
        .encode(std::fs::read(format!("{CASES}/edit_1ref.ref0.png")).unwrap());
    let r = post_with(&gw, "/generate", json!({"prompt": "an oil painting", "seed": 3, "width": 80, "height": 64, "output_format": "png", "input_images": [reference], "enable_safety_checker": false}), &[]).await;
    assert_eq!(r.status(), 200);
    let edited = r.bytes().await.unwrap();
    assert_eq!(
        image::load_from_memory(&edited)
            .unwrap()
            .to_rgb8()
            .dimensions(),
        (80, 64)
    );
    // Size left open: the first reference (80 x 72) decides it, floored to the latent grid
    // (multiples of 16 for this VAE), so this is the same image as the explicit 80 x 64 one.
    let r = post_with(&gw, "/generate", json!({"prompt": "an oil painting", "seed": 3, "output_format": "png", "input_images": [reference], "enable_safety_checker": false}), &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-kleingate-cache"), "miss");
    assert_eq!(r.bytes().await.unwrap(), edited);
    // A size taken from a reference is held to the same bounds as a given one: this 362 x 2896
    // reference (aspect 8, 1 MP) would make the height 2896, over max_side.
    let tall = {
        let img = image::RgbImage::new(362, 2896);
        let mut out = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        base64::engine::general_purpose::STANDARD.encode(out)
    };
    let r = post_with(
        &gw,
        "/generate",
        json!({"prompt": "x", "width": 64, "input_images": [tall], "enable_safety_checker": false}),
        &[],
    )
    .await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["field"], "height", "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("2896"),
        "{e}"
    );
    // A reference the engine refuses is a 400 naming it.
    let tiny = {
        let img = image::RgbImage::new(32, 32);
        let mut out = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        base64::engine::general_purpose::STANDARD.encode(out)
    };
    let r = post_with(&gw, "/generate", json!({"prompt": "x", "width": 64, "height": 64, "input_images": [reference, tiny], "enable_safety_checker": false}), &[]).await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["field"], "input_images[1]", "{e}");

    let m = metrics(&gw).await;
    assert!(
        sample(
            &m,
            "kleingate_local_images_total",
            &[("backend", "local"), ("model", "flux2-klein-4b")]
        ) >= 4.0,
        "{m}"
    );
    assert!(
        sample(
            &m,
            "kleingate_local_stage_seconds_count",
            &[("stage", "step")]
        ) >= 15.0
    );
    assert!(
        sample(
            &m,
            "kleingate_local_stage_seconds_count",
            &[("stage", "text_encoder")]
        ) >= 5.0
    );
    assert!(
        sample(
            &m,
            "kleingate_local_stage_seconds_count",
            &[("stage", "vae_decode")]
        ) >= 5.0
    );
    assert_eq!(
        sample(
            &m,
            "kleingate_local_stage_seconds_count",
            &[("stage", "vae_encode")]
        ),
        2.0
    );
    assert!(sample(&m, "kleingate_local_batch_size_count", &[]) >= 5.0);
    assert_eq!(
        sample(&m, "kleingate_local_queue_depth", &[("backend", "local")]),
        0.0
    );
}

#[tokio::test]
async fn requests_asking_for_the_safety_checker_avoid_a_backend_that_cannot_check() {
    let fake = FakeVerda::start().await;
    let gw = Gateway::start(&format!(
        "[routing]\norder = [\"local\", \"verda\"]\n{}{}",
        local(""),
        backend("verda", &fake, "")
    ))
    .await;
    wait_ready(&gw, "local").await;
    // Default enable_safety_checker = true: the local engine cannot check, so Verda serves it.
    let r = post_with(
        &gw,
        "/generate",
        json!({"prompt": "x", "width": 64, "height": 64}),
        &[],
    )
    .await;
    assert_eq!(header(&r, "x-kleingate-backend"), "verda");
    let r = post_with(
        &gw,
        "/generate",
        json!({"prompt": "x", "width": 64, "height": 64}),
        &[("x-kleingate-backend", "local")],
    )
    .await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "safety_checker_unavailable"
    );
    // Without the check the first backend in order, the local engine, serves it.
    let r = post_with(
        &gw,
        "/generate",
        json!({"prompt": "x", "width": 64, "height": 64, "enable_safety_checker": false}),
        &[],
    )
    .await;
    assert_eq!(header(&r, "x-kleingate-backend"), "local");

    // routing.safety = "skip": the local engine serves them too.
    let gw = Gateway::start(&format!("[routing]\nsafety = \"skip\"\n{}", local(""))).await;
    wait_ready(&gw, "local").await;
    let r = post_with(
        &gw,
        "/generate",
        json!({"prompt": "x", "width": 64, "height": 64}),
        &[],
    )
    .await;
    assert_eq!(
        (r.status().as_u16(), header(&r, "x-kleingate-backend")),
        (200, "local".into())
    );
}

#[tokio::test]
async fn a_full_local_queue_falls_back_to_verda_without_tripping_the_circuit() {
    let fake = FakeVerda::start().await;
    let gw = Gateway::start(&format!(
        "[routing]\norder = [\"local\", \"verda\"]\n[circuit]\nfailure_threshold = 1\n{}{}",
        local("max_queue = 1\nmax_batch = 1"),
        backend("verda", &fake, "")
    ))
    .await;
    wait_ready(&gw, "local").await;
    let gw = &gw;
    let answers = futures::future::join_all((0..6).map(|i| async move {
        let r = post_with(gw, "/generate", json!({"prompt": format!("p{i}"), "seed": i, "width": 64, "height": 64, "enable_safety_checker": false}), &[]).await;
        (r.status().as_u16(), header(&r, "x-kleingate-backend"))
    }))
    .await;
    assert!(answers.iter().all(|(s, _)| *s == 200), "{answers:?}");
    assert!(answers.iter().any(|(_, b)| b == "local"), "{answers:?}");
    assert!(answers.iter().any(|(_, b)| b == "verda"), "{answers:?}");
    let m = metrics(gw).await;
    assert!(
        sample(
            &m,
            "kleingate_fallbacks_total",
            &[
                ("from", "local"),
                ("to", "verda"),
                ("reason", "unavailable")
            ]
        ) >= 1.0,
        "{m}"
    );
    // Busy is not broken: the local circuit stays closed even with a threshold of 1.
    assert_eq!(
        sample(
            &m,
            "kleingate_backend_circuit_state",
            &[("backend", "local")]
        ),
        0.0
    );
}

#[tokio::test]
async fn compatible_queued_requests_run_as_one_batch_with_unchanged_images() {
    let gw = Gateway::start(&local("max_batch = 4")).await;
    wait_ready(&gw, "local").await;
    let body = |seed: u64| json!({"prompt": "a fox", "seed": seed, "width": 64, "height": 64, "output_format": "png", "enable_safety_checker": false});
    // Alone first, for comparison.
    let alone = post_with(&gw, "/generate", body(11), &[])
        .await
        .bytes()
        .await
        .unwrap();
    let gw = &gw;
    // A slow request (base model, 30 CFG steps: seconds on this pipeline) occupies the engine;
    // the four sent 300 ms later queue up behind it and share one batch. The margins are wide
    // (the slow one is taken within a millisecond and runs for seconds), so this does not hang
    // on timing.
    let slow = async move {
        let r = post_with(gw, "/flux2-klein-base-4b/generate", json!({"prompt": "slow", "seed": 1, "width": 64, "height": 64, "num_steps": 30, "guidance": 3.0, "enable_safety_checker": false}), &[]).await;
        assert_eq!(r.status(), 200);
    };
    let queued = async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        futures::future::join_all((1..5u64).map(|i| async move {
            let r = post_with(
                gw,
                "/generate",
                body(10 + i),
                &[("cache-control", "no-cache")],
            )
            .await;
            (r.status().as_u16(), r.bytes().await.unwrap())
        }))
        .await
    };
    let ((), answers) = futures::future::join(slow, queued).await;
    assert!(answers.iter().all(|(s, _)| *s == 200));
    let m = metrics(gw).await;
    // Batches: the one alone (1), the slow one (1), the four queued ones (4).
    assert_eq!(
        (
            sample(&m, "kleingate_local_batch_size_sum", &[]),
            sample(&m, "kleingate_local_batch_size_count", &[]),
        ),
        (6.0, 3.0)
    );
    // Each request keeps its own seed's noise, so batching does not change its image.
    let batched = &answers[0].1;
    let (a, b) = (
        image::load_from_memory(&alone).unwrap().to_rgb8(),
        image::load_from_memory(batched).unwrap().to_rgb8(),
    );
    let worst = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap();
    assert!(worst <= 1, "batching changed the image by {worst}/255");
}

#[tokio::test]
async fn an_engine_that_cannot_load_is_down_and_answers_503() {
    let gw = Gateway::start(
        "[routing]\nsafety = \"skip\"\n[backends.local]\nkind = \"local\"\nweights = \"/nonexistent/klein\"\nmodels = [\"flux2-klein-4b\"]\n",
    )
    .await;
    let b = wait_ready(&gw, "local").await;
    assert_eq!(b["health"]["state"], "down");
    assert!(b["health"]["message"]
        .as_str()
        .unwrap()
        .contains("/nonexistent/klein"));
    let r = post_with(&gw, "/generate", json!({"prompt": "x"}), &[]).await;
    assert_eq!(r.status(), 503);
    // The client hears that the backend is unavailable, never the weights' path (review
    // finding 2); the operators see it in /v1/backends and the log.
    let text = r.text().await.unwrap();
    assert!(
        text.contains("backend `local` is unavailable") && !text.contains("/nonexistent"),
        "{text}"
    );
    assert!(wait_ready(&gw, "local").await["last_error"]
        .as_str()
        .unwrap()
        .contains("/nonexistent/klein"));
    assert_eq!(reqwest::get(gw.url("/readyz")).await.unwrap().status(), 503);
}

const NSFW_TINY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../backends/local/tests/data/nsfw-tiny"
);

#[tokio::test]
async fn the_safety_checker_sets_the_nsfw_header_from_its_verdict() {
    let body = json!({"prompt": "a red fox", "seed": 5, "width": 64, "height": 64, "output_format": "png"});
    let checker = kleingate_local::safety::SafetyChecker::load(
        std::path::Path::new(NSFW_TINY),
        0.5,
        &kleingate_local::device::by_name("cpu").unwrap(),
    )
    .unwrap();
    for (threshold, expected) in [
        ("0.5", None),
        ("0.000001", Some(true)),
        ("1.0", Some(false)),
    ] {
        let gw = Gateway::start(&local(&format!(
            "safety_weights = \"{NSFW_TINY}\"\nsafety_threshold = {threshold}"
        )))
        .await;
        assert_eq!(wait_ready(&gw, "local").await["health"]["state"], "ready");
        // With a safety model the local engine takes requests that ask for the check.
        let r = post_with(&gw, "/generate", body.clone(), &[]).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-kleingate-backend"), "local");
        let flag = header(&r, "x-has-nsfw-content");
        let img = image::load_from_memory(&r.bytes().await.unwrap())
            .unwrap()
            .to_rgb8();
        let verdict = checker
            .check(&[&kleingate_local::image_io::Rgb8 {
                width: img.width() as usize,
                height: img.height() as usize,
                data: img.into_raw(),
            }])
            .unwrap()[0]
            .clone();
        let want = expected.unwrap_or(verdict.nsfw);
        assert_eq!(flag, want.to_string(), "threshold {threshold}: {verdict:?}");
        // Not asked: not checked, and not flagged.
        let mut off = body.clone();
        off["enable_safety_checker"] = json!(false);
        let r = post_with(&gw, "/generate", off, &[]).await;
        assert_eq!(header(&r, "x-has-nsfw-content"), "false");
        let m = metrics(&gw).await;
        assert_eq!(
            sample(
                &m,
                "kleingate_local_stage_seconds_count",
                &[("stage", "safety")]
            ),
            1.0,
            "{m}"
        );
    }
}

#[tokio::test]
async fn the_local_engine_charges_its_measured_device_time() {
    // 3600 USD per device-hour = 1 USD per device-second: the header is the seconds per image.
    let gw = Gateway::start(&local("[backends.local.cost]\ngpu_hour_usd = 3600.0")).await;
    wait_ready(&gw, "local").await;
    let body = |seed: u64| json!({"prompt": "a fox", "seed": seed, "width": 64, "height": 64, "enable_safety_checker": false});
    let started = Instant::now();
    let r = post_with(&gw, "/generate", body(1), &[]).await;
    let wall = started.elapsed().as_secs_f64();
    assert_eq!(r.status(), 200);
    let cost: f64 = header(&r, "x-kleingate-cost").parse().unwrap();
    // Device time is part of the request's wall time, and not nothing.
    assert!(
        cost > 0.0 && cost <= wall,
        "cost {cost} for a {wall} s request"
    );
    let m = metrics(&gw).await;
    let spent = sample(
        &m,
        "kleingate_cost_usd_total",
        &[("backend", "local"), ("model", "flux2-klein-4b")],
    );
    assert!((spent - cost).abs() < 1e-5, "{spent} vs {cost}");
}

/// `dtype` and `text_encoder` in a local backend's config reach the engine: the gateway serves
/// exactly the image the engine makes in bf16 with its text encoder offloaded, which is not the
/// f32 image.
#[tokio::test]
async fn a_local_backend_computes_in_its_configured_dtype() {
    use kleingate_local::pipeline::{LoadOptions, Pipeline, Request, TextEncoderMode};
    use kleingate_local::precision::Precision;
    let gw = Gateway::start(&local("dtype = \"bf16\"\ntext_encoder = \"offload\"")).await;
    assert_eq!(wait_ready(&gw, "local").await["health"]["state"], "ready");
    let r = post_with(
        &gw,
        "/flux2-klein-4b/generate",
        json!({"prompt": "a red fox", "seed": 5, "width": 80, "height": 64, "output_format": "png", "enable_safety_checker": false}),
        &[("x-kleingate-backend", "local")],
    )
    .await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let served = image::load_from_memory(&r.bytes().await.unwrap())
        .unwrap()
        .to_rgb8()
        .into_raw();
    let device = kleingate_local::device::by_name("cpu").unwrap();
    let engine = |precision| {
        let opts = LoadOptions {
            precision,
            text_encoder: TextEncoderMode::Offload,
        };
        let pipe = Pipeline::load_with(std::path::Path::new(PIPELINE), &device, opts).unwrap();
        let req = Request {
            prompts: vec!["a red fox".into()],
            width: 80,
            height: 64,
            steps: 4,
            guidance: 1.0,
            cfg: false,
            max_sequence_length: 64,
            seed: 5,
            init_noise: None,
            references: vec![],
        };
        let out = pipe.generate(&req, &mut |_| true).unwrap();
        let v = out.images.into_data().try_to_vec::<f32>().unwrap();
        kleingate_local::image_io::Rgb8::from_unit_floats(&v, 80, 64).data
    };
    assert_eq!(served, engine(Precision::Bf16));
    assert_ne!(served, engine(Precision::F32));
}
