//! Load and fault test: the real `kleingate` binary under sustained load while its upstreams
//! misbehave. Loopback only, bounded in requests and time.
//!
//! Two chaos upstreams (raw TCP, so they can do what no well-behaved server does) answer each
//! request at random: an image, 503, a hang, a connection reset, garbage bytes, or a slow image.
//! The gateway runs as a child process (so its RSS can be read from /proc) with admission limits
//! low enough that some requests are shed. Clients send a mix of seeded (cacheable) and unseeded
//! requests through a fixed number of connections, in rounds.
//!
//! It checks, and exits non-zero otherwise:
//! * no accepted request is lost: every request gets an HTTP answer (no reset, no client timeout);
//! * the gateway keeps serving: /healthz answers after every round and the process is alive;
//! * the metrics add up: `kleingate_http_responses_total` for the generate route equals, status
//!   by status, what the clients received;
//! * memory stays bounded: RSS after the last round is within `--max-rss-growth-mib` of RSS after
//!   the first (the first round fills the cache and pools; later rounds must not keep growing).
//!
//! `cargo build -p kleingate-gateway -p kleingate-tests --bins && target/debug/load-faults`

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
struct Args {
    /// Rounds of load; memory is compared between the first and the last.
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    /// Requests per round.
    #[arg(long, default_value_t = 1500)]
    requests: usize,
    /// Concurrent client connections (more than `max_inflight`, so some requests are shed).
    #[arg(long, default_value_t = 48)]
    connections: usize,
    /// The gateway's admission.max_inflight.
    #[arg(long, default_value_t = 32)]
    max_inflight: usize,
    /// Allowed RSS growth from the end of round 1 to the end of the last round.
    #[arg(long, default_value_t = 48)]
    max_rss_growth_mib: u64,
    /// The gateway binary (default: `kleingate` next to this one).
    #[arg(long)]
    gateway: Option<std::path::PathBuf>,
}

/// What a chaos upstream does with one request.
#[derive(Clone, Copy, Debug)]
enum Fault {
    Image,
    Unavailable,
    Hang,
    Reset,
    Garbage,
    Slow,
}

fn pick(rng: &mut impl Rng, fault_rate: f64) -> Fault {
    if rng.random::<f64>() >= fault_rate {
        return Fault::Image;
    }
    match rng.random_range(0..5) {
        0 => Fault::Unavailable,
        1 => Fault::Hang,
        2 => Fault::Reset,
        3 => Fault::Garbage,
        _ => Fault::Slow,
    }
}

/// Read one HTTP/1.1 request (head and Content-Length body); None when the peer went away.
async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let mut chunk = [0u8; 8192];
                let n = s.read(&mut chunk).await.ok().filter(|n| *n > 0)?;
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf[end + 4..end + 4 + len].to_vec();
            buf.drain(..end + 4 + len);
            return Some(body);
        }
        let mut chunk = [0u8; 8192];
        let n = s.read(&mut chunk).await.ok().filter(|n| *n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn jpeg(seed: u64) -> Vec<u8> {
    let mut v = vec![0xFF, 0xD8, 0xFF, 0xE0];
    let mut x = seed | 1;
    for _ in 0..20_000 {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        v.push((x >> 56) as u8);
    }
    v.extend([0xFF, 0xD9]);
    v
}

async fn serve_conn(mut s: TcpStream, fault_rate: f64, counts: Arc<[AtomicU64; 6]>) {
    let mut buf = Vec::new();
    while let Some(body) = read_request(&mut s, &mut buf).await {
        let fault = pick(&mut rand::rng(), fault_rate);
        counts[fault as usize].fetch_add(1, Ordering::Relaxed);
        let seed = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["seed"].as_u64())
            .unwrap_or(7);
        match fault {
            Fault::Image | Fault::Slow => {
                if matches!(fault, Fault::Slow) {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                }
                let img = jpeg(seed);
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: image/jpeg\r\nx-seed: {seed}\r\nx-has-nsfw-content: false\r\ncontent-length: {}\r\n\r\n",
                    img.len()
                );
                if s.write_all(head.as_bytes()).await.is_err() || s.write_all(&img).await.is_err() {
                    return;
                }
            }
            Fault::Unavailable => {
                let body = br#"{"error":{"code":"unavailable","message":"model not loaded"}}"#;
                let head = format!(
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                if s.write_all(head.as_bytes()).await.is_err() || s.write_all(body).await.is_err() {
                    return;
                }
            }
            Fault::Hang => {
                // Hold the connection and say nothing, past any sane timeout.
                tokio::time::sleep(Duration::from_secs(60)).await;
                return;
            }
            Fault::Reset => {
                // SO_LINGER 0: close() sends RST instead of FIN.
                let _ = s.set_zero_linger();
                return;
            }
            Fault::Garbage => {
                let junk: Vec<u8> = (0..512).map(|_| rand::random::<u8>()).collect();
                let _ = s.write_all(&junk).await;
                return;
            }
        }
    }
}

async fn chaos_upstream(fault_rate: f64) -> anyhow::Result<(SocketAddr, Arc<[AtomicU64; 6]>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let counts: Arc<[AtomicU64; 6]> = Arc::new(Default::default());
    let c = counts.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(serve_conn(s, fault_rate, c.clone()));
        }
    });
    Ok((addr, counts))
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

fn start_gateway(
    bin: &std::path::Path,
    config: &std::path::Path,
) -> anyhow::Result<(Child, String)> {
    let mut child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let url = line
        .trim()
        .strip_prefix("kleingate listening on ")
        .with_context(|| format!("unexpected first line {line:?}"))?
        .to_owned();
    Ok((child, url))
}

/// Generate responses by status, from the gateway's own counter.
async fn server_counts(http: &reqwest::Client, url: &str) -> anyhow::Result<BTreeMap<u16, u64>> {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let mut out = BTreeMap::new();
    for l in text
        .lines()
        .filter(|l| l.starts_with("kleingate_http_responses_total{"))
    {
        if !l.contains("route=\"/generate\"") {
            continue;
        }
        let status = l
            .split("status=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .and_then(|s| s.parse().ok())
            .context("status label")?;
        let v: f64 = l.rsplit(' ').next().unwrap_or("0").parse()?;
        out.insert(status, v as u64);
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = match &args.gateway {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("kleingate"),
    };
    let (flaky, flaky_counts) = chaos_upstream(0.5).await?;
    let (steady, steady_counts) = chaos_upstream(0.1).await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("kleingate.toml");
    std::fs::write(
        &config,
        format!(
            r#"listen = "127.0.0.1:0"
request_timeout_secs = 3.0
[admission]
max_inflight = {max_inflight}
[cache]
max_bytes = 8388608
[circuit]
failure_threshold = 5
cooldown_secs = 0.5
[routing]
order = ["flaky", "steady"]
[backends.flaky]
kind = "verda"
base_url = "http://{flaky}"
api_key_env = "KLEINGATE_LOAD_NO_KEY"
models = ["flux2-klein-4b"]
timeout_secs = 1.0
max_concurrency = 16
[backends.steady]
kind = "verda"
base_url = "http://{steady}"
api_key_env = "KLEINGATE_LOAD_NO_KEY"
models = ["flux2-klein-4b"]
timeout_secs = 1.0
max_concurrency = 16
"#,
            max_inflight = args.max_inflight
        ),
    )?;
    let (mut child, url) = start_gateway(&bin, &config)?;
    let pid = child.id();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        // Well past the gateway's own 3 s deadline: a client timeout means a lost request.
        .timeout(Duration::from_secs(15))
        .build()?;
    let rss_start = rss_kib(pid)?;
    let mut client_counts: BTreeMap<u16, u64> = BTreeMap::new();
    let mut lost = 0u64;
    let mut error_codes: BTreeMap<String, u64> = BTreeMap::new();
    let mut rss_rounds = Vec::new();
    let started = Instant::now();
    for round in 0..args.rounds {
        let next = Arc::new(AtomicU64::new(0));
        let total = args.requests as u64;
        let tasks: Vec<_> = (0..args.connections)
            .map(|_| {
                let (http, url, next) = (http.clone(), url.clone(), next.clone());
                tokio::spawn(async move {
                    let mut seen: BTreeMap<u16, u64> = BTreeMap::new();
                    let mut codes: BTreeMap<String, u64> = BTreeMap::new();
                    let mut lost = 0u64;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= total {
                            break;
                        }
                        // A third seeded from a small set (cache hits and coalescing), the rest
                        // unseeded (always to a backend).
                        let body = if i % 3 == 0 {
                            serde_json::json!({"prompt": "load", "seed": i % 50})
                        } else {
                            serde_json::json!({"prompt": format!("load {round} {i}")})
                        };
                        match http
                            .post(format!("{url}/generate"))
                            .json(&body)
                            .send()
                            .await
                        {
                            Ok(r) => {
                                let status = r.status().as_u16();
                                // Read the whole body: a cut-off body is a lost answer too.
                                match r.bytes().await {
                                    Ok(b) => {
                                        *seen.entry(status).or_default() += 1;
                                        if status != 200 {
                                            let code =
                                                serde_json::from_slice::<serde_json::Value>(&b)
                                                    .ok()
                                                    .and_then(|v| {
                                                        v["error"]["code"]
                                                            .as_str()
                                                            .map(str::to_owned)
                                                    })
                                                    .unwrap_or_else(|| "(no JSON error)".into());
                                            *codes
                                                .entry(format!("{status} {code}"))
                                                .or_default() += 1;
                                        }
                                        // Shed: back off a little, as a client that reads
                                        // Retry-After would (scaled down to keep this short).
                                        if status == 503 {
                                            tokio::time::sleep(Duration::from_millis(50)).await;
                                        }
                                    }
                                    Err(_) => lost += 1,
                                }
                            }
                            Err(_) => lost += 1,
                        }
                    }
                    (seen, codes, lost)
                })
            })
            .collect();
        for t in tasks {
            let (seen, codes, l) = t.await?;
            lost += l;
            for (c, n) in codes {
                *error_codes.entry(c).or_default() += n;
            }
            for (s, n) in seen {
                *client_counts.entry(s).or_default() += n;
            }
        }
        let health = http.get(format!("{url}/healthz")).send().await?;
        if health.status() != 200 {
            bail!("round {round}: /healthz answered {}", health.status());
        }
        if let Some(status) = child.try_wait()? {
            bail!("round {round}: the gateway exited: {status}");
        }
        rss_rounds.push(rss_kib(pid)?);
    }
    let elapsed = started.elapsed();
    let server = server_counts(&http, &url).await?;
    child.kill()?;
    child.wait()?;

    let names = ["image", "503", "hang", "reset", "garbage", "slow"];
    let faults = |c: &Arc<[AtomicU64; 6]>| {
        names
            .iter()
            .zip(c.iter())
            .map(|(n, v)| format!("{n} {}", v.load(Ordering::Relaxed)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let sent = (args.rounds * args.requests) as u64;
    println!(
        "load-faults: {} rounds x {} requests, {} connections, max_inflight {}, {:.1} s",
        args.rounds,
        args.requests,
        args.connections,
        args.max_inflight,
        elapsed.as_secs_f64()
    );
    println!("  upstream flaky (50% faults): {}", faults(&flaky_counts));
    println!("  upstream steady (10% faults): {}", faults(&steady_counts));
    println!("  client saw by status: {client_counts:?}; lost (no answer): {lost}");
    println!("  gateway counted by status: {server:?}");
    println!("  errors by code: {error_codes:?}");
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "  RSS MiB: start {:.1}, after each round {:?}",
        mib(rss_start),
        rss_rounds
            .iter()
            .map(|k| format!("{:.1}", mib(*k)))
            .collect::<Vec<_>>()
    );
    let mut failed = Vec::new();
    if lost > 0 {
        failed.push(format!("{lost} requests got no answer"));
    }
    if client_counts.values().sum::<u64>() + lost != sent {
        failed.push("the client's own count does not add up".into());
    }
    if server != client_counts {
        failed.push("the gateway's response counter differs from what clients received".into());
    }
    let growth = rss_rounds
        .last()
        .copied()
        .unwrap_or(0)
        .saturating_sub(rss_rounds[0]);
    if growth > args.max_rss_growth_mib * 1024 {
        failed.push(format!(
            "RSS grew {:.1} MiB after round 1 (limit {} MiB)",
            mib(growth),
            args.max_rss_growth_mib
        ));
    }
    if client_counts.get(&200).copied().unwrap_or(0) < sent / 2 {
        failed.push("fewer than half the requests were served".into());
    }
    if failed.is_empty() {
        println!("  OK");
        Ok(())
    } else {
        bail!("{}", failed.join("; "))
    }
}
