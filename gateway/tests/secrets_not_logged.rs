//! Keys never reach the logs: the real binary at the most verbose log level, requests with a valid
//! key, a wrong key, a cookie and a sign-in form, an upstream token it sends on, and the passwords
//! in the Redis and PostgreSQL URLs of stores it cannot reach (so it logs about them); none of the
//! secrets appears anywhere in what it logged.

use std::time::Duration;

mod common;

const CLIENT_KEY: &str = "kg_client_secret_5b8e0f1d2c3a4b6e";
const WRONG_KEY: &str = "kg_wrong_secret_9d7c5b3a1f0e2d4c";
const UPSTREAM_TOKEN: &str = "upstream_secret_token_71a2b3c4d5";
const REDIS_PASSWORD: &str = "redis_secret_pw_3e4f5a6b";
const POSTGRES_PASSWORD: &str = "pg_secret_pw_8c9d0e1f";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_or_token_appears_in_the_logs() {
    let up = common::upstream().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("kleingate.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\n\
             [state]\nbackend = \"redis\"\n\
             [storage]\ntimeout_secs = 0.5\n\
             [experiments.ab]\nvariants = [{{ name = \"a\" }}, {{ name = \"b\" }}]\n\
             [[auth.keys]]\nname = \"team-a\"\nsha256 = \"{}\"\n\
             [backends.up]\nkind = \"verda\"\nbase_url = \"http://{up}\"\napi_key_env = \"KLEINGATE_TEST_UPSTREAM_TOKEN\"\nmodels = [\"flux2-klein-4b\"]\n",
            kleingate_gateway::auth::hash_key(CLIENT_KEY)
        ),
    )
    .expect("write config");
    let log_path = dir.path().join("stderr.log");
    std::env::set_var("KLEINGATE_TEST_UPSTREAM_TOKEN", UPSTREAM_TOKEN);
    // Stores on a port nothing listens on: the gateway serves on its own state and logs that it
    // could not reach them.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    std::env::set_var(
        "KLEINGATE_STATE__REDIS_URL",
        format!("redis://:{REDIS_PASSWORD}@127.0.0.1:{dead}/0"),
    );
    std::env::set_var(
        "KLEINGATE_STORAGE__URL",
        format!("postgres://kg:{POSTGRES_PASSWORD}@127.0.0.1:{dead}/kg"),
    );
    let log = std::fs::File::create(&log_path).expect("log file");
    let (mut child, url) = common::start(&config, "trace", Some(log));
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let body = serde_json::json!({"prompt": "a fox", "seed": 1});
    for (auth, want) in [
        (format!("Bearer {CLIENT_KEY}"), 200),
        (format!("Bearer {WRONG_KEY}"), 401),
        (CLIENT_KEY.to_owned(), 401),
    ] {
        let r = http
            .post(format!("{url}/generate"))
            .header("authorization", auth)
            .header("x-kleingate-experiment", "ab")
            .json(&body)
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), want);
    }
    let r = http
        .get(format!("{url}/v1/models"))
        .header("cookie", format!("kleingate_key={CLIENT_KEY}"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    for key in [CLIENT_KEY, WRONG_KEY] {
        let r = http
            .post(format!("{url}/ui/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("key={key}&next=%2Fui%2Fexperiments%2Fx"))
            .send()
            .await
            .expect("request");
        assert!(r.status() == 303 || r.status() == 401);
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    let logs = std::fs::read_to_string(&log_path).expect("read logs");
    // The access log names the client by its key's name; so the logs do speak about these
    // requests, and their silence about the secrets means something.
    let access: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("kleingate::access"))
        .collect();
    assert_eq!(access.len(), 6, "{logs}");
    assert_eq!(
        access
            .iter()
            .filter(|l| l.contains("client=\"team-a\"") || l.contains("client=team-a"))
            .count(),
        2,
        "{logs}"
    );
    assert!(
        logs.contains("experiment record not stored now"),
        "the unreachable database was logged: {logs}"
    );
    for secret in [
        CLIENT_KEY,
        WRONG_KEY,
        UPSTREAM_TOKEN,
        REDIS_PASSWORD,
        POSTGRES_PASSWORD,
    ] {
        assert!(!logs.contains(secret), "{secret} was logged");
    }
}
