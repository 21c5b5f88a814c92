//! Restart safety of the experiment store: the real `kleingate` binary is killed with SIGKILL
//! while clients write results and feedback; after a restart, everything the gateway had answered
//! 2xx for is still there and the database passes SQLite's integrity check.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;
use axum::response::IntoResponse;

/// A minimal Verda-compatible upstream: every request gets a small JPEG and its seed back.
async fn upstream() -> std::net::SocketAddr {
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

/// Start the gateway binary; its first stdout line names the address it listens on.
fn start(config: &std::path::Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kleingate"))
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
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

#[derive(Default)]
struct Acked {
    results: Vec<String>,
    feedback: Vec<String>,
}

async fn writer(url: String, client: usize, stop: Arc<AtomicBool>, acked: Arc<Mutex<Acked>>) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let Ok(r) = http
            .post(format!("{url}/generate"))
            .header("x-kleingate-experiment", "ab")
            .header("x-kleingate-client", format!("c{client}"))
            .json(&serde_json::json!({"prompt": format!("p{client}-{n}"), "seed": n}))
            .send()
            .await
        else {
            continue;
        };
        if r.status() != 200 {
            continue;
        }
        let Some(id) = r
            .headers()
            .get("x-kleingate-result-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
        else {
            panic!("an experiment answer without a result id");
        };
        acked.lock().expect("lock").results.push(id.clone());
        let fb = http
            .post(format!("{url}/v1/feedback"))
            .json(&serde_json::json!({"request_id": id, "score": 4}))
            .send()
            .await;
        if fb.is_ok_and(|r| r.status() == 200) {
            acked.lock().expect("lock").feedback.push(id);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_and_feedback_survive_kill_9_during_writes() {
    let up = upstream().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("experiments.db");
    let config = dir.path().join("kleingate.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\n[storage]\npath = \"{}\"\n\
             [experiments.ab]\nshadow = true\nvariants = [{{ name = \"a\", model = \"flux2-klein-4b\" }}, {{ name = \"b\", model = \"flux2-klein-9b\" }}]\n\
             [backends.up]\nkind = \"verda\"\nbase_url = \"http://{up}\"\napi_key_env = \"KLEINGATE_TEST_NO_SUCH_VAR\"\nmodels = [\"flux2-klein-4b\", \"flux2-klein-9b\"]\n",
            db.display()
        ),
    )
    .expect("write config");

    let acked = Arc::new(Mutex::new(Acked::default()));
    for round in 0..3u64 {
        let (mut child, url) = start(&config);
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..8)
            .map(|c| tokio::spawn(writer(url.clone(), c, stop.clone(), acked.clone())))
            .collect();
        let before = acked.lock().expect("lock").results.len();
        // Different moments in each round, so the kill lands in different places of a write.
        tokio::time::sleep(Duration::from_millis(400 + 250 * round)).await;
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        stop.store(true, Ordering::SeqCst);
        for w in writers {
            w.await.expect("writer");
        }
        let during = acked.lock().expect("lock").results.len() - before;
        assert!(
            during >= 10,
            "round {round}: only {during} answers before the kill"
        );
    }

    // After the last kill: every answered write is there, and the file is sound.
    let (mut child, url) = start(&config);
    let summary = reqwest::get(format!("{url}/v1/experiments/ab"))
        .await
        .expect("get");
    assert_eq!(summary.status(), 200);
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");

    let conn = rusqlite::Connection::open(&db).expect("open");
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity check");
    assert_eq!(check, "ok");
    let acked = acked.lock().expect("lock");
    let mut missing = 0;
    for id in &acked.results {
        let n: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM results WHERE request_id = ?1",
                [id],
                |r| r.get(0),
            )
            .expect("query");
        missing += usize::from(n != 1);
    }
    assert_eq!(missing, 0, "of {} answered results", acked.results.len());
    for id in &acked.feedback {
        let n: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM feedback WHERE request_id = ?1",
                [id],
                |r| r.get(0),
            )
            .expect("query");
        assert_eq!(n, 1, "feedback for {id}");
    }
    eprintln!(
        "restart safety: {} results and {} feedback answered over 3 kills, all present",
        acked.results.len(),
        acked.feedback.len()
    );
}
