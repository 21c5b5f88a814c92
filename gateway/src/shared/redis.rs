//! The Redis side of [`super::SharedState`]: every operation is one round trip (a command, a
//! pipeline or a Lua script), bounded by `state.timeout_secs`.
//!
//! Keys (all under `state.key_prefix`):
//! - `rate:{client}`: a token bucket (hash `t` tokens, `at` last refill), expiring once it would
//!   be full again;
//! - `budget:{day}:{client}`: USD spent on that UTC day (`INCRBYFLOAT`), expiring a day after it;
//! - `img:{cache key}`: an encoded [`CachedImage`] with the cache's TTL;
//! - `lock:{cache key}`: who generates that image now, expiring 3 s after its leader last renewed it.
//!
//! Client names are hashed into keys: a client chooses its header, and must not choose key sizes
//! or characters.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use kleingate_protocol::CacheKey;
use prometheus::{IntCounterVec, IntGauge};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisResult, Script};
use sha2::{Digest, Sha256};

use super::codec;
use super::lease::{Leases, Local};
use super::{StateConfig, Turn};
use crate::cache::CachedImage;
use crate::metrics::Metrics;

/// Up to `ARGV[3]` tokens (at least one, or none) from a bucket refilled at `ARGV[1]`/s up to
/// `ARGV[2]`, on Redis' own clock (the replicas' clocks need not agree). Returns "TAKEN WAIT":
/// the tokens taken, and when none could be, the seconds until the next one (as text: Lua
/// numbers would be truncated to integers on the way out).
const TAKE_TOKENS: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 't', 'at')
local tokens = tonumber(b[1])
local at = tonumber(b[2])
if tokens == nil or at == nil then
  tokens = burst
  at = now
end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local taken = 0
local wait = 0
if tokens >= 1 then
  taken = math.min(want, math.floor(tokens))
  tokens = tokens - taken
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return tostring(taken) .. ' ' .. tostring(wait)
";

/// What a call is for: the `op` label of `kleingate_state_store_errors_total`, and which
/// connection it takes.
#[derive(Clone, Copy)]
enum Op {
    RateLimit,
    Budget,
    CacheGet,
    CachePut,
    /// An entry that did not decode (no call of its own: counted where it is read).
    CacheDecode,
    Coalesce,
}

impl Op {
    const ALL: [Op; 6] = [
        Op::RateLimit,
        Op::Budget,
        Op::CacheGet,
        Op::CachePut,
        Op::CacheDecode,
        Op::Coalesce,
    ];

    fn label(self) -> &'static str {
        match self {
            Op::RateLimit => "rate_limit",
            Op::Budget => "budget",
            Op::CacheGet => "cache_get",
            Op::CachePut => "cache_put",
            Op::CacheDecode => "cache_decode",
            Op::Coalesce => "coalesce",
        }
    }

    /// Image bytes go on their own connection.
    fn is_bulk(self) -> bool {
        matches!(self, Op::CacheGet | Op::CachePut)
    }
}

/// How long a coalescing lock lives unless its leader renews it (every [`LOCK_RENEW`] while it
/// generates): a leader that died, or lost Redis, holds the others up this long at most.
const LOCK_TTL: Duration = Duration::from_secs(3);
const LOCK_RENEW: Duration = Duration::from_secs(1);

/// Extend a lock only while it is still ours.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Delete a lock only while it is still ours (it may have expired and been taken by another).
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// `redis://` URLs only (no TLS in this build); the error never repeats the URL, which may hold
/// a password.
pub(super) fn parse_url(url: &str) -> Result<redis::Client, String> {
    if url.is_empty() {
        return Err("state.redis_url is required with state.backend = \"redis\" (or set KLEINGATE_STATE__REDIS_URL)".into());
    }
    if !url.starts_with("redis://") {
        return Err("state.redis_url must start with redis://".into());
    }
    redis::Client::open(url)
        .map_err(|_| "state.redis_url is not a valid redis:// URL (host, port, database)".into())
}

pub(crate) struct RedisStore {
    /// Small, per-request calls (token buckets, spend, locks).
    conn: ConnectionManager,
    /// Image bytes (the cache level): on their own connection, so a large value in transit never
    /// holds up another request's admission call queued behind it on a multiplexed connection.
    bulk: ConnectionManager,
    prefix: String,
    timeout: Duration,
    retry: Duration,
    poll: Duration,
    cache_ttl: Duration,
    up: AtomicBool,
    up_gauge: IntGauge,
    errors: IntCounterVec,
    take_tokens: Script,
    leases: Leases,
    release: Script,
    renew: Script,
}

impl RedisStore {
    pub(super) fn new(
        cfg: &StateConfig,
        cache_ttl: Duration,
        metrics: &Metrics,
    ) -> Result<RedisStore, String> {
        let client = parse_url(cfg.redis_url.expose())?;
        let timeout = Duration::from_secs_f64(cfg.timeout_secs);
        // One quick reconnect attempt per command: the store's own probe does the retrying, so
        // a request never sits in the manager's back-off.
        let manager_cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(timeout);
        let manager = |cfg| {
            ConnectionManager::new_lazy_with_config(client.clone(), cfg)
                .map_err(|_| "state.redis_url: cannot set up a Redis client".to_owned())
        };
        let conn = manager(manager_cfg.clone())?;
        let bulk = manager(manager_cfg)?;
        let up_gauge = metrics.state_store_up.with_label_values(&["redis"]);
        up_gauge.set(0);
        // Every operation's error series exists from the start (at 0), so a rate over it is
        // data, not absence, on a healthy gateway.
        for op in Op::ALL {
            metrics.state_store_errors.with_label_values(&[op.label()]);
        }
        Ok(RedisStore {
            conn,
            bulk,
            prefix: cfg.key_prefix.clone(),
            timeout,
            retry: Duration::from_secs_f64(cfg.retry_secs),
            poll: Duration::from_secs_f64(cfg.coalesce_poll_secs),
            cache_ttl,
            // Down until the first probe answers (it runs at once when the server starts).
            up: AtomicBool::new(false),
            up_gauge,
            errors: metrics.state_store_errors.clone(),
            take_tokens: Script::new(TAKE_TOKENS),
            leases: Leases::default(),
            release: Script::new(RELEASE),
            renew: Script::new(RENEW),
        })
    }

    pub(super) fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Run one call if the store is up; a failure marks it down (see [`RedisStore::run`]).
    async fn call<T, F>(&self, op: Op, f: impl FnOnce(ConnectionManager) -> F) -> Option<T>
    where
        F: Future<Output = RedisResult<T>>,
    {
        if !self.is_up() {
            return None;
        }
        self.run(op, f, true).await
    }

    /// A leader's own lock and image: tried even while the store is marked down (that may be
    /// only a moment's view, and a lock left behind would hold other replicas' waiters), never
    /// marking it down.
    async fn best_effort<T, F>(&self, op: Op, f: impl FnOnce(ConnectionManager) -> F) -> Option<T>
    where
        F: Future<Output = RedisResult<T>>,
    {
        self.run(op, f, false).await
    }

    /// One call within the timeout. A failure is counted; it marks the store down when
    /// `may_mark_down`, except a slow image transfer (a large value on the image connection is
    /// not a sign that Redis is gone, and must not switch rate limits to per replica).
    async fn run<T, F>(
        &self,
        op: Op,
        f: impl FnOnce(ConnectionManager) -> F,
        may_mark_down: bool,
    ) -> Option<T>
    where
        F: Future<Output = RedisResult<T>>,
    {
        let bulk = op.is_bulk();
        let conn = if bulk {
            self.bulk.clone()
        } else {
            self.conn.clone()
        };
        let (why, timed_out) = match tokio::time::timeout(self.timeout, f(conn)).await {
            Ok(Ok(v)) => return Some(v),
            Ok(Err(e)) => (e.to_string(), e.is_timeout()),
            Err(_) => ("timed out".to_owned(), true),
        };
        self.failed(op, &why, may_mark_down && !(bulk && timed_out));
        None
    }

    fn failed(&self, op: Op, why: &str, mark_down: bool) {
        self.errors.with_label_values(&[op.label()]).inc();
        if !mark_down {
            tracing::debug!(op = op.label(), error = why, "Redis call failed");
            return;
        }
        if self.up.swap(false, Ordering::Relaxed) {
            self.up_gauge.set(0);
            tracing::warn!(
                op = op.label(),
                error = why,
                "Redis state store unreachable: rate limits, budgets, cache and coalescing are per replica until it answers again"
            );
        }
    }

    async fn ping(&self) -> bool {
        let mut c = self.conn.clone();
        let pinged = tokio::time::timeout(
            self.timeout,
            redis::cmd("PING").query_async::<String>(&mut c),
        )
        .await;
        matches!(pinged, Ok(Ok(_)))
    }

    /// Probe while down; ends when the store is dropped (the server stopped).
    pub(super) async fn monitor(weak: Weak<RedisStore>) {
        loop {
            let Some(store) = weak.upgrade() else { return };
            if !store.is_up() && store.ping().await {
                // What was leased or refused before the outage is stale.
                store.leases.clear();
                store.up.store(true, Ordering::Relaxed);
                store.up_gauge.set(1);
                tracing::info!("Redis state store reachable: state is shared across replicas");
            }
            let retry = store.retry;
            drop(store);
            tokio::time::sleep(retry).await;
        }
    }

    fn client_key(&self, kind: &str, client: &str) -> String {
        let h = Sha256::digest(client.as_bytes());
        let mut hex = String::with_capacity(32);
        for b in &h[..16] {
            hex.push_str(&format!("{b:02x}"));
        }
        format!("{}{kind}{hex}", self.prefix)
    }

    fn image_key(&self, key: &CacheKey) -> String {
        format!("{}img:{key}", self.prefix)
    }

    fn lock_key(&self, key: &CacheKey) -> String {
        format!("{}lock:{key}", self.prefix)
    }

    /// One token for `client`: a leased one, a remembered refusal, or from the shared bucket
    /// (with a lease of more); `None` not shared now.
    pub(super) async fn take_token(
        &self,
        client: &str,
        rate: f64,
        burst: u32,
    ) -> Option<Result<(), Duration>> {
        let want = match self.leases.local(client, rate, burst, Instant::now()) {
            Local::Taken => return Some(Ok(())),
            Local::Refused(wait) => return Some(Err(wait)),
            Local::Ask(n) => n,
        };
        // If this request goes away mid-call, dropping `asking` frees the next ask.
        let asking = self.leases.asking(client, want);
        let answer = self.take_tokens(client, rate, burst, want).await;
        asking.answered(answer, Instant::now());
        Some(answer?.map(drop))
    }

    /// Take up to `want` tokens (at least one) from `client`'s shared bucket: `Some(Ok(n))` took
    /// n, `Some(Err(wait))` none until then, `None` not shared now.
    async fn take_tokens(
        &self,
        client: &str,
        rate: f64,
        burst: u32,
        want: u32,
    ) -> Option<Result<u32, Duration>> {
        let key = self.client_key("rate:", client);
        let answer: String = self
            .call(Op::RateLimit, |mut c| async move {
                self.take_tokens
                    .key(key)
                    .arg(rate)
                    .arg(burst)
                    .arg(want.max(1))
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        let (taken, wait) = answer.split_once(' ')?;
        let taken: f64 = taken.parse().ok()?;
        let wait: f64 = wait.parse().ok()?;
        Some(if taken >= 1.0 {
            Ok(taken as u32)
        } else {
            Err(Duration::try_from_secs_f64(wait)
                .unwrap_or(Duration::from_secs(86_400))
                .clamp(Duration::from_millis(1), Duration::from_secs(86_400)))
        })
    }

    pub(super) async fn spent(&self, client: &str, day: u64) -> Option<f64> {
        let key = self.client_key(&format!("budget:{day}:"), client);
        let v: Option<String> = self
            .call(Op::Budget, |mut c| async move {
                redis::cmd("GET").arg(key).query_async(&mut c).await
            })
            .await?;
        Some(v.and_then(|s| s.parse().ok()).unwrap_or(0.0))
    }

    pub(super) async fn charge(&self, client: &str, usd: f64, day: u64) -> bool {
        let key = self.client_key(&format!("budget:{day}:"), client);
        // Kept one day past its own, so a late charge near midnight is not lost.
        let expire_at = (day + 2) * 86_400;
        self.call(Op::Budget, |mut c| async move {
            redis::pipe()
                .cmd("INCRBYFLOAT")
                .arg(&key)
                .arg(usd)
                .ignore()
                .cmd("EXPIREAT")
                .arg(&key)
                .arg(expire_at)
                .ignore()
                .query_async::<()>(&mut c)
                .await
        })
        .await
        .is_some()
    }

    pub(super) async fn cache_get(&self, key: &CacheKey) -> Option<CachedImage> {
        let k = self.image_key(key);
        let raw: Option<Vec<u8>> = self
            .call(Op::CacheGet, |mut c| async move {
                redis::cmd("GET").arg(k).query_async(&mut c).await
            })
            .await?;
        let raw = raw?;
        let decoded = codec::decode(&raw);
        if decoded.is_none() {
            // Written by another version, or damaged: a miss, and counted.
            self.errors
                .with_label_values(&[Op::CacheDecode.label()])
                .inc();
        }
        decoded
    }

    pub(super) async fn cache_put(&self, key: &CacheKey, value: &CachedImage) {
        let k = self.image_key(key);
        let bytes = codec::encode(value);
        let ttl_ms = u64::try_from(self.cache_ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.best_effort(Op::CachePut, |mut c| async move {
            redis::cmd("SET")
                .arg(k)
                .arg(bytes)
                .arg("PX")
                .arg(ttl_ms)
                .query_async::<()>(&mut c)
                .await
        })
        .await;
    }

    async fn try_lock(&self, lock: &str, token: &str) -> Option<bool> {
        let ttl_ms = LOCK_TTL.as_millis() as u64;
        let set: Option<String> = self
            .call(Op::Coalesce, |mut c| async move {
                redis::cmd("SET")
                    .arg(lock)
                    .arg(token)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Some(set.is_some())
    }

    async fn unlock(&self, lock: &str, token: &str) {
        self.best_effort(Op::Coalesce, |mut c| async move {
            self.release
                .key(lock)
                .arg(token)
                .invoke_async::<i64>(&mut c)
                .await
        })
        .await;
    }

    async fn renew_lock(&self, lock: &str, token: &str) {
        let ttl_ms = LOCK_TTL.as_millis() as u64;
        self.best_effort(Op::Coalesce, |mut c| async move {
            self.renew
                .key(lock)
                .arg(token)
                .arg(ttl_ms)
                .invoke_async::<i64>(&mut c)
                .await
        })
        .await;
    }

    /// The image if another replica stored it; else the lock if free; else wait a poll interval
    /// and look again, never past `deadline`. A holder that died frees the lock by expiry
    /// ([`LOCK_TTL`]): a waiter then takes over.
    pub(super) async fn lead_or_wait(self: &Arc<Self>, key: &CacheKey, deadline: Instant) -> Turn {
        tokio::time::timeout_at(deadline.into(), self.lead_or_wait_now(key, deadline))
            .await
            .unwrap_or(Turn::Late)
    }

    async fn lead_or_wait_now(self: &Arc<Self>, key: &CacheKey, deadline: Instant) -> Turn {
        let lock = self.lock_key(key);
        let token = format!("{:032x}", rand::random::<u128>());
        loop {
            if !self.is_up() {
                return Turn::Alone;
            }
            if let Some(v) = self.cache_get(key).await {
                return Turn::Found(v);
            }
            match self.try_lock(&lock, &token).await {
                None => return Turn::Alone,
                Some(true) => {
                    let guard = LockGuard::new(self.clone(), lock, token);
                    // The holder before us may have stored the image just before it let go.
                    if let Some(v) = self.cache_get(key).await {
                        guard.release().await;
                        return Turn::Found(v);
                    }
                    return Turn::Lead(guard);
                }
                Some(false) => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(self.poll.min(left)).await;
        }
    }
}

/// The coalescing lock of one image: renewed while its leader generates, released when it is
/// done (or dropped: a cancelled leader frees it at once instead of by expiry).
pub struct LockGuard {
    store: Arc<RedisStore>,
    lock: String,
    token: String,
    held: bool,
    renewal: tokio::task::JoinHandle<()>,
}

impl LockGuard {
    fn new(store: Arc<RedisStore>, lock: String, token: String) -> LockGuard {
        let renewal = {
            let (store, lock, token) = (store.clone(), lock.clone(), token.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(LOCK_RENEW).await;
                    store.renew_lock(&lock, &token).await;
                }
            })
        };
        LockGuard {
            store,
            lock,
            token,
            held: true,
            renewal,
        }
    }

    pub async fn release(mut self) {
        self.held = false;
        self.renewal.abort();
        self.store.unlock(&self.lock, &self.token).await;
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.renewal.abort();
        if !self.held {
            return;
        }
        let (store, lock, token) = (
            self.store.clone(),
            std::mem::take(&mut self.lock),
            std::mem::take(&mut self.token),
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { store.unlock(&lock, &token).await });
        }
    }
}
