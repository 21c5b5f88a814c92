//! Gateway overhead benchmark: one run, one machine, loopback only.
//!
//! Starts a fake Verda upstream and a gateway in this process, and nginx (Debian's package, as a
//! reference proxy, when it is installed) in front of the same upstream, then measures with the
//! same load generator (HTTP/1.1 keep-alive connections, hyper):
//!   1. pass-through at a fixed request rate: direct to the upstream, then through the gateway
//!      (unseeded requests, so every one goes to the backend), then through nginx;
//!   2. maximum throughput, closed loop: the upstream directly, nginx proxying, then cache hits
//!      from the gateway;
//!   3. with `--telemetry`, last: pass-through without tracing, then with OpenTelemetry trace
//!      export on (`--telemetry-ratio` of the requests sampled, spans sent to an OTLP sink in
//!      this process), each paired with a direct run;
//!   4. with `--redis`: the shared state on a real `redis-server` (started here, loopback) beside
//!      the memory state, both with a rate limit on (so every request has its bucket taken):
//!      pass-through of each, paired with direct runs, and cache-hit throughput from the shared
//!      level (a replica whose own cache holds nothing) against hits from moka; as ratios to the
//!      memory state.
//!
//! It prints requests/s, p50/p99/p99.9 and the ratios / added latency. The body size is stated with
//! every figure because image bodies, not request handling, dominate the cost.
//!
//! `cargo run --release -p kleingate-tests --bin bench-gateway -- --help`

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use kleingate_tests::fake_verda::fake_jpeg;
use kleingate_tests::{FakeVerda, Gateway, RedisServer};

#[derive(Parser, Clone)]
struct Args {
    /// Size of the image the fake upstream returns.
    #[arg(long, default_value_t = 100_000)]
    image_bytes: usize,
    /// Target rate of the pass-through phase, requests/s.
    #[arg(long, default_value_t = 2000)]
    rate: u32,
    /// Seconds per measured phase (after a 1 s warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Connections for the fixed-rate phase.
    #[arg(long, default_value_t = 32)]
    rate_connections: usize,
    /// Pass-through pairs (direct, then gateway) to run; the summary takes the median.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Connections for the closed-loop (max throughput) phase.
    #[arg(long, default_value_t = 16)]
    max_connections: usize,
    /// The nginx binary to measure as the reference proxy (skipped when it cannot be run).
    #[arg(long, default_value = "nginx")]
    nginx: String,
    /// Also measure pass-through with trace export on (installs the process's tracing subscriber,
    /// so it runs last).
    #[arg(long)]
    telemetry: bool,
    /// The sampling ratio of that phase (1 = every request's spans are exported).
    #[arg(long, default_value_t = 1.0)]
    telemetry_ratio: f64,
    /// Also measure the Redis shared state against the memory state (needs `redis-server`).
    #[arg(long)]
    redis: bool,
}

/// An OTLP/HTTP endpoint that takes every export and discards it (the cost measured is the
/// gateway's: making, batching and sending the spans).
async fn otlp_sink() -> SocketAddr {
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(|_: Bytes| async { [("content-type", "application/x-protobuf")] }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    addr
}

/// nginx in the foreground, proxying to one upstream over kept-alive connections, with image
/// bodies buffered in memory (as the gateway holds them), one worker per core, no access log.
struct Nginx {
    addr: SocketAddr,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Nginx {
    async fn start(binary: &str, upstream: SocketAddr) -> Option<Nginx> {
        let dir = tempfile::tempdir().ok()?;
        // Workers may run as another user than the master: they must reach the temp paths.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .ok()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let d = dir.path().display();
        let conf = format!(
            "worker_processes auto;\ndaemon off;\npid {d}/nginx.pid;\nerror_log stderr warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               upstream verda {{ server {upstream}; keepalive 256; }}\n\
               server {{\n    listen 127.0.0.1:{port};\n    client_body_buffer_size 64k;\n\
                 location / {{\n      proxy_pass http://verda;\n      proxy_http_version 1.1;\n\
                   proxy_set_header Connection \"\";\n      proxy_buffer_size 16k;\n      proxy_buffers 64 16k;\n    }}\n  }}\n}}\n"
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).ok()?;
        let child = std::process::Command::new(binary)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg("stderr")
            .arg("-c")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().ok()?;
        let mut n = Nginx {
            addr,
            child,
            _dir: dir,
        };
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Some(n);
            }
            if n.child.try_wait().ok().flatten().is_some() {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}

impl Drop for Nginx {
    /// SIGTERM to the master, which stops its workers (SIGKILL would orphan them); SIGKILL only
    /// if it is still there after 5 s.
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Stats {
    ok: usize,
    errors: usize,
    elapsed: Duration,
    lat_us: Vec<u32>,
}

impl Stats {
    fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
    fn pct(&self, p: f64) -> f64 {
        if self.lat_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.lat_us.len() as f64 - 1.0) * p).round() as usize;
        f64::from(self.lat_us[i]) / 1000.0
    }
}

async fn connect(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    send
}

static FAILURES_SHOWN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One request on a kept-alive connection; returns (ok, latency).
async fn one(
    send: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    path: &str,
    body: &Bytes,
    expect_len: usize,
) -> (bool, Duration) {
    let req = Request::post(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(body.clone()))
        .expect("request");
    let t = Instant::now();
    let (ok, why) = match send.send_request(req).await {
        Ok(resp) => {
            let status = resp.status();
            match resp.into_body().collect().await {
                Ok(b) => {
                    let b = b.to_bytes();
                    let good = status == 200 && b.len() == expect_len;
                    let why = format!(
                        "{status}, {} bytes: {}",
                        b.len(),
                        String::from_utf8_lossy(&b[..b.len().min(200)])
                    );
                    (good, why)
                }
                Err(e) => (false, format!("{status}, body: {e}")),
            }
        }
        Err(e) => (false, format!("exchange: {e}")),
    };
    // The first few failures of a run say what they were (a count alone hides the cause).
    if !ok && FAILURES_SHOWN.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 5 {
        eprintln!("failed exchange with {addr}: {why}");
    }
    (ok, t.elapsed())
}

/// `rate` = None: closed loop as fast as each connection goes. Some(r): r requests/s in total,
/// spread evenly over the connections.
async fn load(
    addr: SocketAddr,
    path: &'static str,
    body: Bytes,
    expect_len: usize,
    conns: usize,
    rate: Option<u32>,
    secs: u64,
) -> Stats {
    let mut tasks = Vec::new();
    let warmup = Duration::from_secs(1);
    let measure = Duration::from_secs(secs);
    let begin = Instant::now() + Duration::from_millis(50);
    for c in 0..conns {
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut send = connect(addr).await;
            let interval = rate.map(|r| Duration::from_secs_f64(conns as f64 / f64::from(r)));
            let offset = interval.map_or(Duration::ZERO, |i| i.mul_f64(c as f64 / conns as f64));
            let (mut ok, mut errors, mut lat) = (0usize, 0usize, Vec::new());
            let mut k: u32 = 0;
            loop {
                let at = begin + offset + interval.map_or(Duration::ZERO, |i| i * k);
                k += 1;
                if interval.is_some() {
                    tokio::time::sleep_until(at.into()).await;
                }
                let now = Instant::now();
                if now >= begin + warmup + measure {
                    break;
                }
                let (good, took) = one(&mut send, addr, path, &body, expect_len).await;
                if !good {
                    // Reconnect: a failed exchange may have left the connection unusable.
                    send = connect(addr).await;
                }
                if now >= begin + warmup {
                    if good {
                        ok += 1;
                        lat.push(took.as_micros().min(u128::from(u32::MAX)) as u32);
                    } else {
                        errors += 1;
                    }
                }
            }
            (ok, errors, lat)
        }));
    }
    let mut s = Stats {
        ok: 0,
        errors: 0,
        elapsed: measure,
        lat_us: Vec::new(),
    };
    for t in tasks {
        let (ok, errors, lat) = t.await.expect("load task");
        s.ok += ok;
        s.errors += errors;
        s.lat_us.extend(lat);
    }
    s.lat_us.sort_unstable();
    s
}

fn row(name: &str, s: &Stats) {
    println!(
        "| {name:<34} | {:>9.0} | {:>7.3} | {:>7.3} | {:>7.3} | {:>6} |",
        s.rps(),
        s.pct(0.5),
        s.pct(0.99),
        s.pct(0.999),
        s.errors
    );
}

/// The generate route every phase posts to.
const PATH: &str = "/flux2-klein-4b/generate";

/// One fixed-rate pass-through run against `addr`, printed as a row.
async fn at_rate(a: &Args, addr: SocketAddr, body: &Bytes, label: &str) -> Stats {
    let s = load(
        addr,
        PATH,
        body.clone(),
        a.image_bytes,
        a.rate_connections,
        Some(a.rate),
        a.seconds,
    )
    .await;
    row(&format!("{label} @ {}/s", a.rate), &s);
    s
}

/// One closed-loop (maximum throughput) run against `addr`, printed as a row.
async fn at_max(a: &Args, addr: SocketAddr, body: &Bytes, label: &str) -> Stats {
    let s = load(
        addr,
        PATH,
        body.clone(),
        a.image_bytes,
        a.max_connections,
        None,
        a.seconds,
    )
    .await;
    row(label, &s);
    s
}

/// A few requests (10/s, not measured) so that `body`'s image is in `addr`'s cache.
async fn prime(a: &Args, addr: SocketAddr, body: &Bytes) {
    let _ = load(addr, PATH, body.clone(), a.image_bytes, 1, Some(10), 0).await;
}

/// Added latency at p50 and p99 (ms) of `via` over `direct`.
fn added(via: &Stats, direct: &Stats) -> (f64, f64) {
    (
        via.pct(0.5) - direct.pct(0.5),
        via.pct(0.99) - direct.pct(0.99),
    )
}

/// `--repeat` pairs of a direct run and a run against `target`: the medians of the added p50
/// and p99.
async fn medians_over_pairs(
    a: &Args,
    upstream: SocketAddr,
    target: SocketAddr,
    body: &Bytes,
    label: &str,
) -> (f64, f64) {
    let (mut p50, mut p99) = (Vec::new(), Vec::new());
    for _ in 0..a.repeat.max(1) {
        let direct = at_rate(a, upstream, body, "direct to upstream").await;
        let via = at_rate(a, target, body, label).await;
        let (d50, d99) = added(&via, &direct);
        p50.push(d50);
        p99.push(d99);
    }
    (median(&mut p50), median(&mut p99))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A gateway config with one verda backend at `upstream`.
fn gateway_config(upstream: &str, image_bytes: usize) -> String {
    format!(
        "[backends.verda]\nkind = \"verda\"\nbase_url = \"{upstream}\"\napi_key_env = \"KLEINGATE_BENCH_NO_KEY\"\nmax_concurrency = 256\nmax_response_bytes = {}\n",
        image_bytes * 2
    )
}

fn main() {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(args));
}

async fn run(a: Args) {
    let fake = FakeVerda::start_with(fake_jpeg(a.image_bytes), None).await;
    let gw = Gateway::start(&gateway_config(&fake.url(), a.image_bytes)).await;
    let nginx = Nginx::start(&a.nginx, fake.addr).await;
    if nginx.is_none() {
        eprintln!("(nginx `{}` could not be started: measuring without the reference proxy; apt-get install nginx)", a.nginx);
    }
    let n = a.image_bytes;
    let unseeded = Bytes::from_static(br#"{"prompt":"a lighthouse at dusk"}"#);
    let seeded = Bytes::from_static(br#"{"prompt":"a lighthouse at dusk","seed":42}"#);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "kleingate bench-gateway: {n}-byte image, {}s per phase, {cores} cores, gateway + upstream + load generator in one process\n",
        a.seconds
    );
    println!("| phase                              |     req/s | p50 ms  | p99 ms  | p99.9 ms | errors |");
    println!(
        "|------------------------------------|-----------|---------|---------|---------|--------|"
    );
    let (mut added_p50, mut added_p99) = (Vec::new(), Vec::new());
    let (mut nginx_p50, mut nginx_p99) = (Vec::new(), Vec::new());
    for _ in 0..a.repeat.max(1) {
        let direct = at_rate(&a, fake.addr, &unseeded, "direct to upstream").await;
        let via = at_rate(&a, gw.addr, &unseeded, "through gateway").await;
        let (p50, p99) = added(&via, &direct);
        added_p50.push(p50);
        added_p99.push(p99);
        if let Some(ng) = &nginx {
            let proxied = at_rate(&a, ng.addr, &unseeded, "through nginx").await;
            let (p50, p99) = added(&proxied, &direct);
            nginx_p50.push(p50);
            nginx_p99.push(p99);
        }
    }

    let direct_max = at_max(&a, fake.addr, &seeded, "direct to upstream, max").await;
    let nginx_max = match &nginx {
        Some(ng) => Some(at_max(&a, ng.addr, &seeded, "nginx proxying, max").await),
        None => None,
    };
    // Prime the cache, then every request is a hit.
    prime(&a, gw.addr, &seeded).await;
    let hits = at_max(&a, gw.addr, &seeded, "gateway cache hits, max").await;

    println!();
    println!(
        "pass-through added latency (gateway minus direct, same rate, same run; median of {} pairs, each: {}): p50 {:+.3} ms, p99 {:+.3} ms",
        added_p99.len(),
        added_p99.iter().map(|x| format!("{x:+.3}")).collect::<Vec<_>>().join(" "),
        median(&mut added_p50),
        median(&mut added_p99)
    );
    println!(
        "cache hits: {:.0} req/s = {:.2}x the upstream's own maximum ({:.0} req/s), {:.2} GB/s of image bytes",
        hits.rps(),
        hits.rps() / direct_max.rps(),
        direct_max.rps(),
        hits.rps() * n as f64 / 1e9
    );
    if let Some(nm) = &nginx_max {
        let (g50, g99) = (median(&mut added_p50), median(&mut added_p99));
        let (n50, n99) = (median(&mut nginx_p50), median(&mut nginx_p99));
        println!(
            "against nginx (same upstream, rate and load generator): nginx adds p50 {n50:+.3} ms, p99 {n99:+.3} ms; kleingate's added p99 = {:.2}x nginx's, p50 = {:.2}x",
            g99 / n99,
            g50 / n50
        );
        println!(
            "cache hits vs nginx proxying at full speed: {:.0} vs {:.0} req/s = {:.2}x",
            hits.rps(),
            nm.rps(),
            hits.rps() / nm.rps()
        );
    }
    let m = gw.state.metrics.overhead.clone();
    println!(
        "gateway_overhead_seconds (from the gateway's own metric): mean {:.3} ms over {} requests",
        m.get_sample_sum() / m.get_sample_count().max(1) as f64 * 1000.0,
        m.get_sample_count()
    );
    if a.redis {
        redis_phase(&a, fake.addr).await;
    }
    if a.telemetry {
        telemetry_phase(&a, fake.addr, gw.addr, unseeded).await;
    }
}

/// Memory state against Redis state: the same gateway config with a rate limit high enough never
/// to refuse, so each request takes a token: in-process; from Redis leased 50 ms of the rate at a
/// time (`shared/lease.rs`: the usual case for a fast client); and from Redis with a burst of 10,
/// which makes every lease one token (one Lua call per request: the worst case). Pass-through of
/// each paired with direct runs; then cache hits from moka against hits from Redis (a replica with
/// a cache too small for any entry, so every lookup reaches the shared level).
async fn redis_phase(a: &Args, upstream: SocketAddr) {
    let redis = RedisServer::start().await;
    let backend = gateway_config(&format!("http://{upstream}"), a.image_bytes);
    let limits = "[admission]\nrequests_per_sec = 1000000\nburst = 1000000\n";
    let shared = format!(
        "[state]\nbackend = \"redis\"\nredis_url = \"{}\"\n",
        redis.url()
    );
    let memory_gw = Gateway::start(&format!("{limits}{backend}")).await;
    let redis_gw = Gateway::start(&format!("{limits}{shared}{backend}")).await;
    let per_request = "[admission]\nrequests_per_sec = 1000000\nburst = 10\n";
    let redis_each = Gateway::start(&format!("{per_request}{shared}{backend}")).await;
    let reader = Gateway::start(&format!(
        "{limits}{shared}[cache]\nmax_bytes = 1\n{backend}"
    ))
    .await;
    for gw in [&redis_gw, &redis_each, &reader] {
        let start = Instant::now();
        while !gw.state.shared.is_shared() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "Redis not reached"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let unseeded = Bytes::from_static(br#"{"prompt":"a lighthouse at dusk"}"#);
    let seeded = Bytes::from_static(br#"{"prompt":"a lighthouse at dusk","seed":7}"#);
    println!();
    let (m50, m99) =
        medians_over_pairs(a, upstream, memory_gw.addr, &unseeded, "memory state").await;
    let (r50, r99) = medians_over_pairs(a, upstream, redis_gw.addr, &unseeded, "redis state").await;
    let (e50, e99) = medians_over_pairs(
        a,
        upstream,
        redis_each.addr,
        &unseeded,
        "redis, a call per request",
    )
    .await;
    // Made once through the Redis gateway: in Redis (and that gateway's moka); the memory
    // gateway primes its own moka.
    prime(a, redis_gw.addr, &seeded).await;
    prime(a, memory_gw.addr, &seeded).await;
    let moka = at_max(a, memory_gw.addr, &seeded, "cache hits from moka, max").await;
    let shared_hits = at_max(a, reader.addr, &seeded, "cache hits from Redis, max").await;
    let store = &reader.state.metrics;
    println!(
        "\nshared state on Redis (same run, median of {} pairs each): pass-through adds p50 {r50:+.3} ms, p99 {r99:+.3} ms; memory state p50 {m50:+.3} ms, p99 {m99:+.3} ms: p99 {:.2}x, p50 {:.2}x the memory state's",
        a.repeat.max(1),
        r99 / m99,
        r50 / m50
    );
    println!(
        "with one Redis call per request (no leasing): p50 {e50:+.3} ms, p99 {e99:+.3} ms: p99 {:.2}x, p50 {:.2}x the memory state's",
        e99 / m99,
        e50 / m50
    );
    println!(
        "cache hits from the shared level: {:.0} req/s vs {:.0} from moka = {:.2}x ({} shared hits, {} Redis errors)",
        shared_hits.rps(),
        moka.rps(),
        shared_hits.rps() / moka.rps(),
        store.cache_shared_hits.get(),
        ["cache_get", "rate_limit"]
            .iter()
            .map(|op| store.state_store_errors.with_label_values(&[op]).get())
            .sum::<u64>()
    );
}

/// Pass-through with traces exported: first the gateway as it is (no subscriber installed), then
/// the process's subscriber with the trace exporter (spans to an OTLP sink here) and a gateway
/// started after it, each paired with a direct run. The subscriber is global, so the second half
/// cannot be undone: the ratio is between the two halves of this one phase. Logs are at `warn`
/// (no access log lines) in the second half, none in the first: the difference is the spans'.
async fn telemetry_phase(a: &Args, upstream: SocketAddr, plain: SocketAddr, body: Bytes) {
    let (p50, p99) = medians_over_pairs(a, upstream, plain, &body, "gateway, no tracing").await;
    let sink = otlp_sink().await;
    let cfg = kleingate_gateway::telemetry::TelemetryConfig {
        endpoint: Some(format!("http://{sink}")),
        sampling_ratio: a.telemetry_ratio,
        ..Default::default()
    };
    // Only the subscriber installed below reads RUST_LOG.
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "warn");
    }
    let telemetry = kleingate_gateway::telemetry::install(&cfg, &tokio::runtime::Handle::current())
        .expect("installing the trace exporter");
    let traced = Gateway::start(&gateway_config(
        &format!("http://{upstream}"),
        a.image_bytes,
    ))
    .await;
    let traced_label = format!("gateway, traced ({})", a.telemetry_ratio);
    let (t50, t99) = medians_over_pairs(a, upstream, traced.addr, &body, &traced_label).await;
    println!(
        "\ntraces exported (sampling ratio {}): pass-through adds p50 {t50:+.3} ms, p99 {t99:+.3} ms; without tracing p50 {p50:+.3} ms, p99 {p99:+.3} ms (median of {} pairs each): p99 {:.2}x, p50 {:.2}x",
        a.telemetry_ratio,
        a.repeat.max(1),
        t99 / p99,
        t50 / p50
    );
    // The last spans are sent on this runtime: block a thread of its blocking pool, not a worker.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
}
