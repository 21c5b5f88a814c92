//! Three gateway replicas (each its own `AppState`: its own moka cache, buckets and counters) on
//! one real `redis-server`: budgets and rate limits hold in total, a cache hit and the coalescing
//! of identical requests span replicas, and a Redis that dies under load costs no answer (the
//! replicas fall back to their own state and share again once it is back).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kleingate_tests::{FakeVerda, Gateway, Mode, RedisServer};
use serde_json::{json, Value};

mod common;
use common::*;

/// `[state]` on `redis`, a fake upstream priced at 0.01 USD an image, and `extra` config.
fn config(redis: &RedisServer, fake: &FakeVerda, extra: &str) -> String {
    format!(
        "{extra}\n[state]\nbackend = \"redis\"\nredis_url = \"{}\"\nretry_secs = 0.1\n{}[backends.verda.cost]\nper_image_usd = 0.01\n",
        redis.url(),
        backend("verda", fake, "")
    )
}

async fn replicas(toml: &str) -> Vec<Arc<Gateway>> {
    let mut out = Vec::new();
    for _ in 0..3 {
        out.push(Arc::new(Gateway::start(toml).await));
    }
    wait_up(&out, 1.0).await;
    out
}

/// Until every replica's `kleingate_state_store_up` reads `want`.
async fn wait_up(gws: &[Arc<Gateway>], want: f64) {
    let start = Instant::now();
    for gw in gws {
        while sample(&metrics(gw).await, "kleingate_state_store_up", &[]) != want {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "state store never read {want}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn body(seed: Option<u64>) -> Value {
    let mut b = json!({"prompt": "a lighthouse at dusk"});
    if let Some(s) = seed {
        b["seed"] = json!(s);
    }
    b
}

async fn generate(gw: &Gateway, seed: Option<u64>, client: &str) -> reqwest::Response {
    post_with(
        gw,
        "/generate",
        body(seed),
        &[("x-kleingate-client", client)],
    )
    .await
}

#[tokio::test]
async fn a_budget_of_three_images_is_three_across_all_replicas() {
    let redis = RedisServer::start().await;
    let fake = FakeVerda::start().await;
    let gws = replicas(&config(
        &redis,
        &fake,
        "[budget]\n[budget.keys]\nteam-a = 0.025",
    ))
    .await;
    let mut codes = Vec::new();
    for i in 0..9 {
        let r = generate(&gws[i % 3], None, "team-a").await;
        let status = r.status().as_u16();
        let code = if status == 200 {
            String::new()
        } else {
            error_of(r).await.1["code"].as_str().unwrap().to_owned()
        };
        codes.push((status, code));
    }
    // 0.01 + 0.01 + 0.01 crosses 0.025 with the third image, whichever replica made it; each
    // replica alone has counted at most one.
    let ok = codes.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(ok, 3, "{codes:?}");
    assert!(codes[3..]
        .iter()
        .all(|(s, c)| *s == 429 && c == "budget_exceeded"));
    assert_eq!(fake.calls(), 3);
}

#[tokio::test]
async fn a_rate_limit_holds_in_total_across_replicas() {
    let redis = RedisServer::start().await;
    let fake = FakeVerda::start().await;
    let gws = replicas(&config(
        &redis,
        &fake,
        "[admission]\nrequests_per_sec = 0.01\nburst = 4",
    ))
    .await;
    let mut statuses = Vec::new();
    for i in 0..12 {
        let r = generate(&gws[i % 3], None, "one-client").await;
        statuses.push(r.status().as_u16());
        if r.status() == 429 {
            assert!(!header(&r, "retry-after").is_empty());
        }
    }
    // A bucket of 4 refilled at one token per 100 s: 4 in total, not 4 per replica.
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        4,
        "{statuses:?}"
    );
    // Another client has its own bucket.
    assert_eq!(generate(&gws[2], None, "another").await.status(), 200);
}

/// A fast client: replicas take its tokens a few at a time (`shared/lease.rs`), and together
/// still never admit more than the one bucket gave out.
#[tokio::test]
async fn leased_tokens_never_admit_more_than_the_shared_bucket() {
    let redis = RedisServer::start().await;
    let fake = FakeVerda::start().await;
    // 40/s, burst 60: leases of 2 tokens.
    let gws = replicas(&config(
        &redis,
        &fake,
        "[admission]\nrequests_per_sec = 40\nburst = 60",
    ))
    .await;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..6 {
        let gw = gws[i % 3].clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            for _ in 0..40 {
                ok += usize::from(generate(&gw, None, "fast").await.status() == 200);
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    // The bucket holds 60 and refills 40 a second: that many at most, whatever the leasing.
    let bound = 60.0 + 40.0 * elapsed;
    assert!((ok as f64) <= bound, "{ok} admitted, bound {bound:.1}");
    assert!(ok >= 60, "the burst was usable: {ok}");
}

#[tokio::test]
async fn a_cache_hit_and_coalescing_span_replicas() {
    let redis = RedisServer::start().await;
    let fake = FakeVerda::start().await;
    let gws = replicas(&config(&redis, &fake, "")).await;

    // Made through replica 1, a hit on replica 3.
    let r = generate(&gws[0], Some(7), "c").await;
    assert_eq!(
        (r.status().as_u16(), header(&r, "x-kleingate-cache")),
        (200, "miss".into())
    );
    let first = r.bytes().await.unwrap();
    let r = generate(&gws[2], Some(7), "c").await;
    assert_eq!(
        (r.status().as_u16(), header(&r, "x-kleingate-cache")),
        (200, "hit".into())
    );
    assert_eq!(r.bytes().await.unwrap(), first);
    assert_eq!(fake.calls(), 1);
    assert_eq!(
        sample(
            &metrics(&gws[2]).await,
            "kleingate_cache_shared_hits_total",
            &[]
        ),
        1.0
    );

    // An unseeded request is kept under the seed it got in its own replica's cache only.
    let r = generate(&gws[1], None, "c").await;
    let seed: u64 = header(&r, "x-seed").parse().unwrap();
    assert_eq!(
        header(
            &generate(&gws[1], Some(seed), "c").await,
            "x-kleingate-cache"
        ),
        "hit"
    );
    assert_eq!(
        redis
            .cli(&["KEYS", "kleingate:img:*"])
            .unwrap()
            .lines()
            .count(),
        1,
        "only the seeded request's image is shared"
    );
    let calls = fake.calls();

    // 8 identical seeded requests at once, spread over the three: one upstream call.
    fake.set_mode(Mode::Slow(Duration::from_millis(600)));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let gw = gws[i % 3].clone();
        tasks.push(tokio::spawn(async move {
            let r = generate(&gw, Some(99), "c").await;
            let cache = header(&r, "x-kleingate-cache");
            (r.status().as_u16(), cache, r.bytes().await.unwrap())
        }));
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    assert_eq!(fake.calls(), calls + 1, "{outcomes:?}");
    assert!(outcomes
        .iter()
        .all(|(s, _, b)| *s == 200 && *b == outcomes[0].2));
    let misses = outcomes.iter().filter(|(_, c, _)| c == "miss").count();
    assert_eq!(misses, 1, "one request generated, the others waited");
    let remote: f64 = futures::future::join_all(gws.iter().map(|g| metrics(g)))
        .await
        .iter()
        .map(|m| sample(m, "kleingate_singleflight_remote_total", &[]))
        .sum();
    assert!(
        remote >= 2.0,
        "the other two replicas waited on the first: {remote}"
    );
}

#[tokio::test]
async fn a_dead_holder_frees_its_lock_by_expiry_and_no_waiter_outlives_its_deadline() {
    let redis = RedisServer::start().await;
    let fake = FakeVerda::start().await;
    let gws = replicas(&config(&redis, &fake, "request_timeout_secs = 2.0")).await;

    // Find the lock's key: it exists while a (slow) generation holds it.
    fake.set_mode(Mode::Slow(Duration::from_millis(800)));
    let gw = gws[0].clone();
    let leader = tokio::spawn(async move { generate(&gw, Some(5), "c").await.status() });
    let start = Instant::now();
    let lock = loop {
        let keys = redis.cli(&["KEYS", "kleingate:lock:*"]).unwrap_or_default();
        if !keys.is_empty() {
            break keys;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "no lock taken");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(leader.await.unwrap(), 200);
    assert_eq!(
        redis.cli(&["EXISTS", &lock]).as_deref(),
        Some("0"),
        "released when done"
    );
    let image = lock.replace(":lock:", ":img:");
    assert_eq!(redis.cli(&["EXISTS", &image]).as_deref(), Some("1"));
    fake.set_mode(Mode::Image);

    // A replica died holding the lock (a token that is no one's, 700 ms left): the next request
    // waits for it to expire, then generates itself.
    redis.cli(&["DEL", &image]).unwrap();
    redis
        .cli(&["SET", &lock, "dead-replica", "PX", "700"])
        .unwrap();
    let calls = fake.calls();
    let r = generate(&gws[1], Some(5), "c").await;
    assert_eq!(
        (r.status().as_u16(), header(&r, "x-kleingate-cache")),
        (200, "miss".into())
    );
    assert_eq!(fake.calls(), calls + 1);

    // A holder that keeps it past the request's deadline: 504 at the deadline, not a hang.
    redis.cli(&["DEL", &image]).unwrap();
    redis
        .cli(&["SET", &lock, "dead-replica", "PX", "60000"])
        .unwrap();
    let t = Instant::now();
    let (status, e) = error_of(generate(&gws[2], Some(5), "c").await).await;
    assert_eq!((status, e["code"].as_str()), (504, Some("timeout")));
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(fake.calls(), calls + 1);
}

/// A leader slower than the lock's 3 s lifetime keeps it by renewing it: the other replica
/// still waits for its image instead of generating a second one.
#[tokio::test]
async fn a_leader_slower_than_the_lock_keeps_it_by_renewal() {
    let redis = RedisServer::start().await;
    let fake = FakeVerda::start().await;
    let gws = replicas(&config(&redis, &fake, "")).await;
    fake.set_mode(Mode::Slow(Duration::from_millis(4500)));
    let leader = {
        let gw = gws[0].clone();
        tokio::spawn(async move { generate(&gw, Some(11), "c").await })
    };
    // The other arrives once the leader holds the lock.
    let start = Instant::now();
    while redis
        .cli(&["KEYS", "kleingate:lock:*"])
        .unwrap_or_default()
        .is_empty()
    {
        assert!(start.elapsed() < Duration::from_secs(5), "no lock taken");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let waiter = generate(&gws[1], Some(11), "c").await;
    let leader = leader.await.unwrap();
    assert_eq!(
        (
            leader.status().as_u16(),
            header(&leader, "x-kleingate-cache")
        ),
        (200, "miss".into())
    );
    assert_eq!(
        (
            waiter.status().as_u16(),
            header(&waiter, "x-kleingate-cache")
        ),
        (200, "coalesced".into())
    );
    assert_eq!(fake.calls(), 1);
}

#[tokio::test]
async fn redis_killed_under_load_costs_no_answer_and_sharing_resumes_after() {
    let mut redis = RedisServer::start().await;
    let fake = FakeVerda::start().await;
    let gws = replicas(&config(
        &redis,
        &fake,
        "[admission]\nrequests_per_sec = 0.01\nburst = 2",
    ))
    .await;

    // Load from many clients (one bucket each) on all three replicas while Redis dies.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for (i, gw) in gws.iter().enumerate() {
        let (gw, stop) = (gw.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let r = generate(&gw, Some(1000 * i as u64 + n), &format!("load-{i}-{n}")).await;
                statuses.push(r.status().as_u16());
            }
            statuses
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill();
    wait_up(&gws, 0.0).await;

    // Meanwhile each replica enforces its own bucket: 2 per replica.
    let mut ok = 0;
    for i in 0..9 {
        ok += usize::from(generate(&gws[i % 3], None, "limited").await.status() == 200);
    }
    assert_eq!(ok, 6, "per-replica limits while Redis is down");

    // Back (empty), found by the replicas' probes: one bucket again.
    redis.restart().await;
    wait_up(&gws, 1.0).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answered = Vec::new();
    for t in load {
        answered.extend(t.await.unwrap());
    }
    assert!(answered.len() > 10, "the load ran: {}", answered.len());
    assert!(
        answered.iter().all(|s| *s == 200),
        "every request was answered with an image: {answered:?}"
    );
    let mut ok = 0;
    for i in 0..9 {
        ok += usize::from(generate(&gws[i % 3], None, "limited-again").await.status() == 200);
    }
    assert_eq!(ok, 2, "shared again");
    let errors: f64 = futures::future::join_all(gws.iter().map(|g| metrics(g)))
        .await
        .iter()
        .map(|m| sample(m, "kleingate_state_store_errors_total", &[]))
        .sum();
    assert!(errors >= 1.0, "the failures were counted");
}

#[tokio::test]
async fn a_gateway_starts_and_serves_while_redis_is_down() {
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    redis.kill();
    let fake = FakeVerda::start().await;
    let gw = Gateway::start(&format!(
        "[state]\nbackend = \"redis\"\nredis_url = \"{url}\"\nretry_secs = 0.1\n{}",
        backend("verda", &fake, "")
    ))
    .await;
    let r = generate(&gw, Some(3), "c").await;
    assert_eq!(r.status(), 200);
    let r = generate(&gw, Some(3), "c").await;
    assert_eq!(
        header(&r, "x-kleingate-cache"),
        "hit",
        "its own cache still works"
    );
    assert_eq!(
        sample(&metrics(&gw).await, "kleingate_state_store_up", &[]),
        0.0
    );
    redis.restart().await;
    let gw = Arc::new(gw);
    wait_up(std::slice::from_ref(&gw), 1.0).await;
}
