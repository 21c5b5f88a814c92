//! Experiment storage: the same contract on SQLite and on a real PostgreSQL server, versioned
//! migrations applied once by replicas that start together, three gateway replicas whose votes
//! show on every replica, and a PostgreSQL that stops for a while under traffic (answers go on,
//! the records arrive once it is back).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kleingate_gateway::experiments::Record;
use kleingate_gateway::storage::{ExperimentStore, PostgresStore, SqliteStore, StoreError};
use kleingate_tests::{FakeVerda, Gateway, PostgresServer, RedisServer};
use serde_json::{json, Value};

mod common;
use common::*;

fn rec(id: &str, variant: &str, latency: f64, excluded: bool) -> Record {
    Record {
        request_id: id.into(),
        experiment: "exp".into(),
        variant: variant.into(),
        backend: "verda".into(),
        model: "flux2-klein-4b".into(),
        prompt: "p".into(),
        seed: Some(u64::MAX),
        status: 200,
        latency_ms: latency,
        cost_usd: 0.01,
        excluded,
        pair_of: None,
        image: None,
    }
}

/// What every store must do; `reopen` gives a second handle on the same database (a restart, or
/// another replica); `age` moves every row's creation 400 days back.
async fn contract(
    store: &dyn ExperimentStore,
    reopen: &dyn Fn() -> Box<dyn ExperimentStore>,
    age: &dyn Fn(),
) {
    store.record(&rec("r1", "a", 100.0, false)).await.unwrap();
    store.record(&rec("r2", "a", 300.0, false)).await.unwrap();
    store.record(&rec("r3", "a", 1.0, true)).await.unwrap();
    store.record(&rec("r4", "b", 50.0, false)).await.unwrap();
    // A retried write of a stored record changes nothing.
    store.record(&rec("r1", "a", 999.0, false)).await.unwrap();
    assert_eq!(
        store.feedback("r1", "alice", 4.0).await.unwrap(),
        ("exp".into(), "a".into(), None)
    );
    // The same voter again replaces the vote and says which score it replaced.
    assert_eq!(
        store.feedback("r1", "alice", 5.0).await.unwrap(),
        ("exp".into(), "a".into(), Some(4.0))
    );
    store.feedback("r2", "alice", 2.0).await.unwrap();
    // A vote on a cache hit is kept but does not count for the variant.
    store.feedback("r3", "alice", 1.0).await.unwrap();
    assert!(matches!(
        store.feedback("nope", "alice", 1.0).await,
        Err(StoreError::UnknownRequest(_))
    ));
    // A client's answer and its shadow, both with images.
    let mut left = rec("p1", "a", 10.0, false);
    left.image = Some(("image/png".into(), vec![1, 2, 3]));
    let mut right = rec("p1.shadow", "b", 20.0, false);
    right.image = Some(("image/jpeg".into(), vec![4, 5]));
    right.pair_of = Some("p1".into());
    store.record(&left).await.unwrap();
    store.record(&right).await.unwrap();

    // Read through another handle: nothing lived only in the first.
    let other = reopen();
    let r = other.results("exp").await.unwrap();
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(
        (
            r[0].variant.as_str(),
            r[0].count,
            r[0].recorded,
            r[0].feedback
        ),
        ("a", 3, 4, 2)
    );
    assert_eq!(r[0].mean_score, Some(3.5));
    assert!((r[0].mean_latency_ms.unwrap() - 410.0 / 3.0).abs() < 1e-9);
    assert_eq!((r[1].count, r[1].feedback, r[1].mean_score), (2, 0, None));
    let pairs = other.pairs("exp", 10).await.unwrap();
    assert_eq!(pairs.len(), 1);
    assert_eq!(pairs[0].left, ("p1".to_owned(), "a".to_owned()));
    assert_eq!(pairs[0].right, ("p1.shadow".to_owned(), "b".to_owned()));
    assert_eq!(
        pairs[0].seed,
        Some(u64::MAX),
        "a u64 seed survives the signed column"
    );
    assert_eq!(
        other.image("exp", "p1.shadow").await.unwrap(),
        Some(("image/jpeg".to_owned(), vec![4, 5]))
    );
    assert_eq!(other.image("other-exp", "p1.shadow").await.unwrap(), None);
    assert!(other.results("no-such").await.unwrap().is_empty());

    // Retention: nothing is a day old yet. Aged 400 days: images older than 30 days go first,
    // then results older than a year with their votes.
    let day = Duration::from_secs(86_400);
    assert_eq!(other.prune(day, day).await.unwrap(), (0, 0));
    age();
    assert_eq!(other.prune(day * 30, day * 500).await.unwrap(), (2, 0));
    assert!(
        other.pairs("exp", 10).await.unwrap().is_empty(),
        "no pair without its images"
    );
    assert_eq!(other.results("exp").await.unwrap().len(), 2, "results kept");
    assert_eq!(other.prune(day * 30, day * 365).await.unwrap(), (0, 6));
    assert!(other.results("exp").await.unwrap().is_empty());
    assert!(matches!(
        other.feedback("r1", "bob", 3.0).await,
        Err(StoreError::UnknownRequest(_))
    ));
}

#[tokio::test]
async fn the_store_contract_holds_on_sqlite_and_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.db");
    let sqlite = SqliteStore::open(&path).unwrap();
    let p = path.clone();
    let p2 = path.clone();
    let age_sqlite = move || {
        let c = rusqlite::Connection::open(&p2).unwrap();
        c.execute(
            "UPDATE results SET created_at = created_at - 400 * 86400",
            [],
        )
        .unwrap();
    };
    contract(
        &sqlite,
        &move || Box::new(SqliteStore::open(&p).unwrap()),
        &age_sqlite,
    )
    .await;

    let pg = PostgresServer::start().await;
    let url = pg.url();
    let store = PostgresStore::new(&url, 4, Duration::from_secs(5)).unwrap();
    let age_pg = || {
        // Stored as rows in the shared tables, where any replica reads them.
        assert_eq!(pg.sql("SELECT count(*) FROM kleingate_results"), "6");
        assert_eq!(pg.sql("SELECT count(*) FROM kleingate_feedback"), "3");
        pg.sql("UPDATE kleingate_results SET created_at = created_at - 400 * 86400");
    };
    contract(
        &store,
        &move || Box::new(PostgresStore::new(&url, 4, Duration::from_secs(5)).unwrap()),
        &age_pg,
    )
    .await;
    assert_eq!(pg.sql("SELECT count(*) FROM kleingate_feedback"), "0");
}

#[tokio::test]
async fn replicas_starting_together_migrate_once() {
    let pg = PostgresServer::start().await;
    let stores: Vec<Arc<PostgresStore>> = (0..4)
        .map(|_| Arc::new(PostgresStore::new(&pg.url(), 2, Duration::from_secs(5)).unwrap()))
        .collect();
    let applied = futures::future::join_all(stores.iter().map(|s| s.applied_migrations())).await;
    for a in applied {
        assert_eq!(a.unwrap(), vec![1]);
    }
    assert_eq!(pg.sql("SELECT count(*) FROM kleingate_migrations"), "1");
    assert_eq!(
        pg.sql("SELECT string_agg(table_name, ',' ORDER BY table_name) FROM information_schema.tables WHERE table_name LIKE 'kleingate_%'"),
        "kleingate_feedback,kleingate_images,kleingate_migrations,kleingate_results"
    );
}

fn experiment_config(pg: &PostgresServer, fake: &FakeVerda, extra: &str) -> String {
    format!(
        "[storage]\nurl = \"{}\"\n{extra}\n[experiments.ab]\nvariants = [{{ name = \"a\" }}, {{ name = \"b\" }}]\n{}",
        pg.url(),
        backend("verda", fake, "")
    )
}

async fn in_experiment(gw: &Gateway, client: &str) -> reqwest::Response {
    post_with(
        gw,
        "/generate",
        json!({"prompt": "a heron"}),
        &[
            ("x-kleingate-experiment", "ab"),
            ("x-kleingate-client", client),
        ],
    )
    .await
}

async fn results(gw: &Gateway) -> Value {
    get_json(gw, "/v1/experiments/ab").await["results"].clone()
}

fn total(results: &Value, field: &str) -> u64 {
    results
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v[field].as_u64().unwrap())
        .sum()
}

/// Three replicas as deployed: one PostgreSQL for experiments, one Redis for the rest.
#[tokio::test]
async fn votes_cast_on_each_replica_appear_on_all() {
    let pg = PostgresServer::start().await;
    let redis = RedisServer::start().await;
    let fake = FakeVerda::start().await;
    let cfg = format!(
        "[state]\nbackend = \"redis\"\nredis_url = \"{}\"\n{}",
        redis.url(),
        experiment_config(&pg, &fake, "")
    );
    let mut gws = Vec::new();
    for _ in 0..3 {
        gws.push(Gateway::start(&cfg).await);
    }
    for i in 0..3 {
        let r = in_experiment(&gws[i], &format!("client-{i}")).await;
        assert_eq!(r.status(), 200);
        let id = header(&r, "x-kleingate-result-id");
        // Voted on through the next replica.
        let v = post_with(
            &gws[(i + 1) % 3],
            "/v1/feedback",
            json!({"request_id": id, "score": 4}),
            &[("x-kleingate-client", &format!("client-{i}"))],
        )
        .await;
        assert_eq!(v.status(), 200, "{:?}", v.text().await);
    }
    let seen: Vec<Value> = futures::future::join_all(gws.iter().map(results)).await;
    assert_eq!(total(&seen[0], "recorded"), 3);
    assert_eq!(total(&seen[0], "feedback"), 3);
    assert!(seen.iter().all(|r| *r == seen[0]), "{seen:?}");
}

#[tokio::test]
async fn postgres_stopped_for_a_while_costs_no_answer_and_the_records_arrive_after() {
    let mut pg = PostgresServer::start().await;
    let fake = FakeVerda::start().await;
    let cfg = experiment_config(&pg, &fake, "timeout_secs = 0.5\nretry_secs = 0.1");
    let gws = [Gateway::start(&cfg).await, Gateway::start(&cfg).await];
    assert_eq!(in_experiment(&gws[0], "before").await.status(), 200);

    pg.stop();
    for i in 0..6 {
        let t = Instant::now();
        let r = in_experiment(&gws[i % 2], &format!("during-{i}")).await;
        assert_eq!(r.status(), 200, "generation goes on without the database");
        // (A bound, not a speed measurement: a gateway that waited on the database would hang
        // until its connect attempts gave up, tens of seconds.)
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }
    let pending: f64 = futures::future::join_all(gws.iter().map(metrics))
        .await
        .iter()
        .map(|m| sample(m, "kleingate_storage_pending_records", &[]))
        .sum();
    assert_eq!(
        pending, 6.0,
        "each record waits in its replica's retry buffer"
    );
    // Reads and votes need the database: a bounded, clear error meanwhile.
    let r = reqwest::get(gws[0].url("/v1/experiments/ab"))
        .await
        .unwrap();
    let (status, e) = error_of(r).await;
    assert_eq!((status, e["code"].as_str()), (500, Some("storage_failed")));

    pg.restart().await;
    let start = Instant::now();
    loop {
        let pending: f64 = futures::future::join_all(gws.iter().map(metrics))
            .await
            .iter()
            .map(|m| sample(m, "kleingate_storage_pending_records", &[]))
            .sum();
        if pending == 0.0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "records never written"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(total(&results(&gws[1]).await, "recorded"), 7);
    let m = metrics(&gws[0]).await;
    assert!(sample(&m, "kleingate_storage_write_failures_total", &[]) >= 1.0);
    assert_eq!(
        sample(&m, "kleingate_storage_dropped_records_total", &[]),
        0.0
    );
}

#[tokio::test]
async fn a_full_retry_buffer_drops_its_oldest_and_counts_it() {
    let mut pg = PostgresServer::start().await;
    let fake = FakeVerda::start().await;
    let cfg = experiment_config(&pg, &fake, "timeout_secs = 0.3\nretry_buffer = 2");
    let gw = Gateway::start(&cfg).await;
    pg.stop();
    for i in 0..4 {
        assert_eq!(in_experiment(&gw, &format!("c{i}")).await.status(), 200);
    }
    let m = metrics(&gw).await;
    assert_eq!(sample(&m, "kleingate_storage_pending_records", &[]), 2.0);
    assert_eq!(
        sample(&m, "kleingate_storage_dropped_records_total", &[]),
        2.0
    );
}

/// A record PostgreSQL refuses for what it holds (a NUL byte in the prompt, which TEXT cannot
/// hold) would fail on every retry: it is dropped at once, counted, and does not hold up the
/// records behind it.
#[tokio::test]
async fn a_record_the_database_refuses_is_dropped_and_holds_nothing_up() {
    let pg = PostgresServer::start().await;
    let fake = FakeVerda::start().await;
    let gw = Gateway::start(&experiment_config(&pg, &fake, "retry_secs = 0.1")).await;
    let r = post_with(
        &gw,
        "/generate",
        json!({"prompt": "a heron\u{0}"}),
        &[
            ("x-kleingate-experiment", "ab"),
            ("x-kleingate-client", "nul"),
        ],
    )
    .await;
    assert_eq!(
        r.status(),
        200,
        "the client's answer does not depend on its record"
    );
    assert_eq!(in_experiment(&gw, "after").await.status(), 200);
    let m = metrics(&gw).await;
    assert_eq!(
        sample(&m, "kleingate_storage_dropped_records_total", &[]),
        1.0
    );
    assert_eq!(sample(&m, "kleingate_storage_pending_records", &[]), 0.0);
    assert_eq!(
        total(&results(&gw).await, "recorded"),
        1,
        "the next record was stored"
    );
}
