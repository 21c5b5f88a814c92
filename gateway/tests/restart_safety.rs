//! Restart safety of the experiment store: the real `kleingate` binary is killed with SIGKILL
//! while clients write results and feedback; after a restart, everything the gateway had answered
//! 2xx for is still there and the database passes SQLite's integrity check.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;

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
    let up = common::upstream().await;
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
        let (mut child, url) = common::start(&config, "warn", None);
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
    let (mut child, url) = common::start(&config, "warn", None);
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
