//! Admission control, as two tower layers with one concern each (both a [`GateLayer`] around a
//! [`Gate`] that lets a request in or answers it at once):
//!
//! * [`RateLimiter`]: a token bucket per client (the authenticated key's name, else the budget
//!   header, else the peer address); an empty bucket answers 429 with `Retry-After` = the time
//!   until the next token. With shared state (Redis) the bucket is one across replicas; while
//!   Redis is down, each replica's own bucket takes over.
//! * [`Shedder`]: at most `max_inflight` generate requests inside the gateway; one more is
//!   answered 503 `overloaded` at once instead of joining an unbounded queue, so a client (or the
//!   load balancer) can go elsewhere while the answer is still cheap.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request};
use axum::response::{IntoResponse, Response};
use prometheus::IntCounterVec;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tower::{Layer, Service};

use crate::auth::Principal;
use crate::error::{ApiError, ErrorCode};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdmissionConfig {
    /// Sustained requests per second per client; 0 turns rate limiting off. A key's own
    /// `requests_per_sec` overrides it.
    pub requests_per_sec: f64,
    /// Requests a client may send at once after being idle (the bucket's size).
    pub burst: u32,
    /// Generate requests the gateway holds at once (waiting on backends, cache or queue); the
    /// next is refused with 503. 0 = no limit.
    pub max_inflight: usize,
    /// Open client connections at once; past it the gateway stops accepting until one closes.
    pub max_connections: usize,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            requests_per_sec: 0.0,
            burst: 20,
            max_inflight: 1024,
            max_connections: 16_384,
        }
    }
}

impl AdmissionConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.requests_per_sec >= 0.0 && self.requests_per_sec.is_finite()) {
            return Err("admission.requests_per_sec must be 0 (off) or positive".into());
        }
        if self.burst == 0 {
            return Err("admission.burst must be at least 1".into());
        }
        if self.max_connections == 0 {
            return Err("admission.max_connections must be at least 1".into());
        }
        Ok(())
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

/// Buckets are dropped once full again (a full bucket is the same as a new one) when the table
/// reaches this size, and again only once it has doubled since (amortised O(1) per request).
const PRUNE_AT: usize = 10_000;
/// Past this many live buckets, new clients share one bucket: clients that invent a new identity
/// per request (without auth, a header value) cannot grow the table without bound.
const MAX_BUCKETS: usize = 100_000;
const OVERFLOW: &str = "overflow";

struct Bucket {
    tokens: f64,
    at: Instant,
    rate: f64,
    burst: f64,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.at = now;
    }
}

pub struct RateLimiter {
    rate: f64,
    /// Without auth, the header that names the client (`budget.header`).
    client_header: String,
    burst: u32,
    buckets: Mutex<Buckets>,
    rejected: IntCounterVec,
    shared: crate::shared::SharedState,
}

struct Buckets {
    map: HashMap<String, Bucket>,
    prune_at: usize,
    last_prune: Option<Instant>,
}

impl RateLimiter {
    pub fn new(
        cfg: &AdmissionConfig,
        client_header: &str,
        rejected: IntCounterVec,
        shared: crate::shared::SharedState,
    ) -> Self {
        RateLimiter {
            shared,
            rate: cfg.requests_per_sec,
            client_header: client_header.to_owned(),
            burst: cfg.burst,
            buckets: Mutex::new(Buckets {
                map: HashMap::new(),
                prune_at: PRUNE_AT,
                last_prune: None,
            }),
            rejected,
        }
    }

    /// Take a token for `client` at `rate`/`burst`; the wait until the next token otherwise.
    pub fn take(&self, client: &str, rate: f64, burst: u32, now: Instant) -> Result<(), Duration> {
        if rate <= 0.0 {
            return Ok(());
        }
        let burst = f64::from(burst.max(1));
        let mut guard = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let buckets = &mut *guard;
        let mut client = client;
        if !buckets.map.contains_key(client) {
            // At the cap, prune at most once a second: enough for buckets to fill up again and
            // make room, never a scan per request.
            let at_cap = buckets.map.len() >= MAX_BUCKETS;
            let rested = buckets
                .last_prune
                .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1));
            if buckets.map.len() >= buckets.prune_at && (!at_cap || rested) {
                buckets.map.retain(|_, b| {
                    b.refill(now);
                    b.tokens < b.burst
                });
                buckets.prune_at = (2 * buckets.map.len()).clamp(PRUNE_AT, MAX_BUCKETS);
                buckets.last_prune = Some(now);
            }
            if buckets.map.len() >= MAX_BUCKETS {
                client = OVERFLOW;
            }
        }
        let b = buckets.map.entry(client.to_owned()).or_insert(Bucket {
            tokens: burst,
            at: now,
            rate,
            burst,
        });
        // A key's limits may have been changed by a restart with a new config; follow them.
        b.rate = rate;
        b.burst = burst;
        b.refill(now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            // A tiny configured rate could overflow a Duration: a day is "much later" enough.
            Err(Duration::try_from_secs_f64((1.0 - b.tokens) / rate)
                .unwrap_or(Duration::from_secs(86_400))
                .min(Duration::from_secs(86_400)))
        }
    }

    pub fn tracked(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .len()
    }
}

impl RateLimiter {
    fn refuse(&self, rate: f64, burst: u32, wait: Duration) -> Response {
        self.rejected.with_label_values(&["rate_limited"]).inc();
        ApiError::new(
            ErrorCode::RateLimited,
            format!(
                "rate limit of {rate} requests/s (burst {burst}) reached; retry in {:.1} s",
                wait.as_secs_f64()
            ),
        )
        .with_retry_after(Some(wait))
        .into_response()
    }
}

impl Gate for RateLimiter {
    type Pass = ();

    /// In, unless the client is over its rate: then 429 with the wait for the next token. With
    /// shared state up, the bucket in Redis decides (one round trip); otherwise this replica's.
    fn admit(self: &Arc<Self>, req: &Request) -> Admission<()> {
        let principal = req.extensions().get::<Arc<Principal>>();
        let rate = principal
            .and_then(|p| p.requests_per_sec)
            .unwrap_or(self.rate);
        let burst = principal.and_then(|p| p.burst).unwrap_or(self.burst);
        if rate <= 0.0 {
            return Admission::In(());
        }
        let client = client_identity(req, &self.client_header);
        if self.shared.is_shared() {
            let this = self.clone();
            return Admission::Pending(Box::pin(async move {
                let taken = match this.shared.take_token(&client, rate, burst).await {
                    Some(taken) => taken,
                    None => this.take(&client, rate, burst, Instant::now()),
                };
                taken.map_err(|wait| this.refuse(rate, burst, wait))
            }));
        }
        match self.take(&client, rate, burst, Instant::now()) {
            Ok(()) => Admission::In(()),
            Err(wait) => Admission::Refused(self.refuse(rate, burst, wait)),
        }
    }
}

/// Who a request is counted against: the authenticated key, else the client header, else the
/// peer address.
fn client_identity(req: &Request, client_header: &str) -> String {
    if let Some(p) = req.extensions().get::<Arc<Principal>>() {
        return format!("key:{}", p.name);
    }
    if let Some(c) = crate::headers::header_text(req.headers(), client_header) {
        return format!("client:{c}");
    }
    match req.extensions().get::<ConnectInfo<SocketAddr>>() {
        Some(ConnectInfo(a)) => format!("ip:{}", a.ip()),
        None => "ip:unknown".into(),
    }
}

/// What a [`Gate`] decides for one request.
pub enum Admission<P> {
    /// Let it through; `P` is held until its response is ready (a permit, say).
    In(P),
    /// Answer at once with this.
    Refused(Response),
    /// The decision needs a round trip (shared state): in with `P`, or answered with the error.
    Pending(Pin<Box<dyn Future<Output = Result<P, Response>> + Send>>),
}

/// One admission decision per request, made before the rest of the stack sees it.
pub trait Gate: Send + Sync + 'static {
    type Pass: Send + 'static;
    fn admit(self: &Arc<Self>, req: &Request) -> Admission<Self::Pass>;
}

/// The tower layer around a [`Gate`].
pub struct GateLayer<G>(pub Arc<G>);

impl<G> Clone for GateLayer<G> {
    fn clone(&self) -> Self {
        GateLayer(self.0.clone())
    }
}

impl<G, S> Layer<S> for GateLayer<G> {
    type Service = Gated<G, S>;
    fn layer(&self, inner: S) -> Gated<G, S> {
        Gated {
            inner,
            gate: self.0.clone(),
        }
    }
}

pub struct Gated<G, S> {
    inner: S,
    gate: Arc<G>,
}

impl<G, S: Clone> Clone for Gated<G, S> {
    fn clone(&self) -> Self {
        Gated {
            inner: self.inner.clone(),
            gate: self.gate.clone(),
        }
    }
}

impl<G, S> Service<Request> for Gated<G, S>
where
    G: Gate,
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> BoxFuture {
        match self.gate.admit(&req) {
            Admission::In(pass) => {
                let fut = self.inner.call(req);
                Box::pin(async move {
                    let resp = fut.await;
                    drop(pass);
                    resp
                })
            }
            Admission::Refused(resp) => Box::pin(std::future::ready(Ok(resp))),
            Admission::Pending(decide) => {
                // The service that was polled ready goes with the request; a clone stays for
                // the next call (tower's usual hand-over).
                let fresh = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, fresh);
                Box::pin(async move {
                    match decide.await {
                        Ok(pass) => {
                            let resp = inner.call(req).await;
                            drop(pass);
                            resp
                        }
                        Err(resp) => Ok(resp),
                    }
                })
            }
        }
    }
}

/// Load shedding: a permit per request in the gateway, none left = 503 now.
pub struct Shedder {
    permits: Option<Arc<Semaphore>>,
    rejected: IntCounterVec,
}

impl Shedder {
    pub fn new(max_inflight: usize, rejected: IntCounterVec) -> Self {
        Shedder {
            permits: (max_inflight > 0).then(|| Arc::new(Semaphore::new(max_inflight))),
            rejected,
        }
    }
}

impl Shedder {
    /// A place for background work, if one is free now and another stays free for clients:
    /// `Some(None)` when there is no limit.
    pub fn try_place(&self) -> Option<Option<tokio::sync::OwnedSemaphorePermit>> {
        match &self.permits {
            None => Some(None),
            Some(p) if p.available_permits() < 2 => None,
            Some(p) => p.clone().try_acquire_owned().ok().map(Some),
        }
    }
}

impl Gate for Shedder {
    type Pass = Option<tokio::sync::OwnedSemaphorePermit>;

    fn admit(self: &Arc<Self>, _: &Request) -> Admission<Self::Pass> {
        let Some(permits) = &self.permits else {
            return Admission::In(None);
        };
        match permits.clone().try_acquire_owned() {
            Ok(permit) => Admission::In(Some(permit)),
            Err(_) => {
                self.rejected.with_label_values(&["overloaded"]).inc();
                Admission::Refused(
                    ApiError::new(ErrorCode::Overloaded,
                        "the gateway is at its limit of requests in flight (admission.max_inflight); retry shortly",
                    )
                    .with_retry_after(Some(Duration::from_secs(1)))
                    .into_response(),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter() -> RateLimiter {
        let m = IntCounterVec::new(prometheus::Opts::new("x", "x"), &["reason"]).expect("metric");
        RateLimiter::new(
            &AdmissionConfig::default(),
            "x-client",
            m,
            crate::shared::SharedState::memory(),
        )
    }

    #[test]
    fn token_bucket_allows_the_burst_then_the_rate() {
        let l = limiter();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.take("a", 2.0, 3, t0).is_ok());
        }
        let wait = l.take("a", 2.0, 3, t0).expect_err("bucket empty");
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-9, "{wait:?}");
        // Another client has its own bucket.
        assert!(l.take("b", 2.0, 3, t0).is_ok());
        // Half a second later one token is back, and only one.
        let t1 = t0 + Duration::from_millis(500);
        assert!(l.take("a", 2.0, 3, t1).is_ok());
        assert!(l.take("a", 2.0, 3, t1).is_err());
        // Idle for long: the bucket fills to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(l.take("a", 2.0, 3, t2).is_ok());
        }
        assert!(l.take("a", 2.0, 3, t2).is_err());
    }

    #[test]
    fn the_table_of_buckets_stays_bounded() {
        let l = limiter();
        let t0 = Instant::now();
        for i in 0..PRUNE_AT {
            l.take(&format!("c{i}"), 1.0, 2, t0).expect("first request");
        }
        assert_eq!(l.tracked(), PRUNE_AT);
        // Ten seconds on, every bucket is full again: one more client prunes them all.
        l.take("new", 1.0, 2, t0 + Duration::from_secs(10))
            .expect("first request");
        assert_eq!(l.tracked(), 1);
    }

    #[test]
    fn past_the_cap_new_clients_share_one_bucket() {
        let l = limiter();
        let t0 = Instant::now();
        for i in 0..MAX_BUCKETS {
            l.take(&format!("c{i}"), 1.0, 2, t0).expect("first request");
        }
        // None is full again (no time passed): nothing to prune, so newcomers share a bucket.
        for who in ["new1", "new2"] {
            l.take(who, 1.0, 2, t0).expect("the shared bucket's burst");
        }
        assert!(l.take("new3", 1.0, 2, t0).is_err());
        assert_eq!(l.tracked(), MAX_BUCKETS + 1);
        // Known clients keep their own.
        assert!(l.take("c7", 1.0, 2, t0).is_ok());
        // Once the old buckets have filled up again, newcomers get their own bucket again.
        let later = t0 + Duration::from_secs(10);
        l.take("new4", 1.0, 2, later).expect("own bucket");
        l.take("new4", 1.0, 2, later).expect("own bucket");
        assert!(l.take("new4", 1.0, 2, later).is_err());
        assert!(l.tracked() < 10);
    }
}
