//! Gateway overhead benchmark: one run, one machine, loopback only.
//!
//! Starts a fake Verda upstream and a gateway in this process, then measures with the same load
//! generator (HTTP/1.1 keep-alive connections, hyper):
//!   1. pass-through at a fixed request rate: direct to the upstream, then through the gateway
//!      (unseeded requests, so every one goes to the backend);
//!   2. maximum throughput, closed loop: the upstream directly, then cache hits from the gateway.
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
use kleingate_tests::{FakeVerda, Gateway};

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
    let ok = match send.send_request(req).await {
        Ok(resp) => {
            let status = resp.status();
            match resp.into_body().collect().await {
                Ok(b) => status == 200 && b.to_bytes().len() == expect_len,
                Err(_) => false,
            }
        }
        Err(_) => false,
    };
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
    let gw = Gateway::start(&format!(
        "[backends.verda]\nkind = \"verda\"\nbase_url = \"{}\"\napi_key_env = \"KLEINGATE_BENCH_NO_KEY\"\nmax_concurrency = 256\nmax_response_bytes = {}\n",
        fake.url(),
        a.image_bytes * 2
    ))
    .await;
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
    let r = Some(a.rate);
    let (mut added_p50, mut added_p99) = (Vec::new(), Vec::new());
    for _ in 0..a.repeat.max(1) {
        let direct = load(
            fake.addr,
            "/flux2-klein-4b/generate",
            unseeded.clone(),
            n,
            a.rate_connections,
            r,
            a.seconds,
        )
        .await;
        row(&format!("direct to upstream @ {}/s", a.rate), &direct);
        let via = load(
            gw.addr,
            "/flux2-klein-4b/generate",
            unseeded.clone(),
            n,
            a.rate_connections,
            r,
            a.seconds,
        )
        .await;
        row(&format!("through gateway @ {}/s", a.rate), &via);
        added_p50.push(via.pct(0.5) - direct.pct(0.5));
        added_p99.push(via.pct(0.99) - direct.pct(0.99));
    }

    let direct_max = load(
        fake.addr,
        "/flux2-klein-4b/generate",
        seeded.clone(),
        n,
        a.max_connections,
        None,
        a.seconds,
    )
    .await;
    row("direct to upstream, max", &direct_max);
    // Prime the cache, then every request is a hit.
    let _ = load(
        gw.addr,
        "/flux2-klein-4b/generate",
        seeded.clone(),
        n,
        1,
        Some(10),
        0,
    )
    .await;
    let hits = load(
        gw.addr,
        "/flux2-klein-4b/generate",
        seeded,
        n,
        a.max_connections,
        None,
        a.seconds,
    )
    .await;
    row("gateway cache hits, max", &hits);

    println!();
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
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
    let m = gw.state.metrics.overhead.clone();
    println!(
        "gateway_overhead_seconds (from the gateway's own metric): mean {:.3} ms over {} requests",
        m.get_sample_sum() / m.get_sample_count().max(1) as f64 * 1000.0,
        m.get_sample_count()
    );
}
