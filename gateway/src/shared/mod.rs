//! State that gateway replicas share (`[state] backend = "redis"`): the rate-limit buckets, the
//! daily budgets' spend, a second cache level behind moka, and the coalescing of identical seeded
//! requests across replicas. With `backend = "memory"` (the default) there is nothing to share and
//! every call here answers "not shared" at once, so one process works exactly as it always did.
//!
//! Redis is a helper, never a dependency of an answer: each call has a short timeout
//! (`state.timeout_secs`); the first failure marks the store down and the callers fall back to
//! the replica's own state (its token buckets, its spend counters, its moka cache). While down,
//! no request waits on Redis; a background probe (`state.retry_secs`) brings it back, and the
//! `kleingate_state_store_up` gauge and a log line say each change.

mod codec;
mod lease;
mod redis;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kleingate_protocol::CacheKey;
use serde::{Deserialize, Serialize};

use crate::cache::CachedImage;
use crate::metrics::Metrics;

pub use self::redis::LockGuard;
use self::redis::RedisStore;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StateBackend {
    /// Each process keeps its own state (one gateway, or replicas that need not agree).
    #[default]
    Memory,
    /// Replicas share rate limits, budgets, the cache and coalescing through one Redis.
    Redis,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StateConfig {
    pub backend: StateBackend,
    /// `redis://[user:password@]host:port[/db]`; usually from the environment
    /// (`KLEINGATE_STATE__REDIS_URL`, a Kubernetes Secret) rather than the file.
    pub redis_url: crate::secret_url::SecretUrl,
    /// Prefix of every key the gateway writes, so several deployments can share one Redis.
    pub key_prefix: String,
    /// The longest one Redis call may take before the gateway gives up on it and uses its own
    /// state (and considers Redis down until a probe succeeds).
    pub timeout_secs: f64,
    /// How often a down Redis is probed.
    pub retry_secs: f64,
    /// How often a request waiting for an identical request on another replica looks for its
    /// result.
    pub coalesce_poll_secs: f64,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            backend: StateBackend::Memory,
            redis_url: crate::secret_url::SecretUrl::default(),
            key_prefix: "kleingate:".into(),
            timeout_secs: 0.25,
            retry_secs: 1.0,
            coalesce_poll_secs: 0.025,
        }
    }
}

impl StateConfig {
    pub fn validate(&self) -> Result<(), String> {
        for (k, v, min) in [
            ("timeout_secs", self.timeout_secs, 0.001),
            ("retry_secs", self.retry_secs, 0.01),
            ("coalesce_poll_secs", self.coalesce_poll_secs, 0.001),
        ] {
            if !(v.is_finite() && v >= min && v <= 3600.0) {
                return Err(format!("state.{k} must be between {min} and 3600; got {v}"));
            }
        }
        if self.key_prefix.len() > 64 {
            return Err("state.key_prefix: at most 64 bytes".into());
        }
        match self.backend {
            StateBackend::Memory => Ok(()),
            StateBackend::Redis => redis::parse_url(self.redis_url.expose()).map(drop),
        }
    }
}

/// A cheap handle (clone freely) on the shared state, or on nothing when it is per replica.
#[derive(Clone, Default)]
pub struct SharedState(Option<Arc<RedisStore>>);

/// What a request that would generate an image should do about identical requests elsewhere.
pub enum Turn {
    /// Generate it; hold the guard until the result is stored, then release it.
    Lead(LockGuard),
    /// Another replica made it meanwhile.
    Found(CachedImage),
    /// Nothing is shared now (memory state, or Redis down): generate it.
    Alone,
    /// The request's deadline passed while another replica was still generating.
    Late,
}

impl SharedState {
    /// Per-replica state: every call answers "not shared".
    pub fn memory() -> SharedState {
        SharedState(None)
    }

    /// The state `cfg` names. Connects lazily: a Redis that is down at start is retried by
    /// [`SharedState::monitor`] while the gateway serves on its own state.
    pub fn new(
        cfg: &StateConfig,
        cache_ttl: Duration,
        metrics: &Metrics,
    ) -> Result<SharedState, String> {
        match cfg.backend {
            StateBackend::Memory => Ok(SharedState(None)),
            StateBackend::Redis => Ok(SharedState(Some(Arc::new(RedisStore::new(
                cfg, cache_ttl, metrics,
            )?)))),
        }
    }

    /// Redis is configured and reachable by the last call or probe.
    pub fn is_shared(&self) -> bool {
        self.0.as_ref().is_some_and(|s| s.is_up())
    }

    /// Probe a down store until it answers again; runs for the server's lifetime (returns at
    /// once for memory state).
    pub async fn monitor(self) {
        let Some(store) = self.0 else { return };
        let weak = Arc::downgrade(&store);
        drop(store);
        RedisStore::monitor(weak).await;
    }

    /// Take one token from `client`'s shared bucket (leased a few at a time: `lease.rs`):
    /// `Some(Ok)` in, `Some(Err(wait))` over the rate, `None` not shared now (use the replica's
    /// own bucket).
    pub async fn take_token(
        &self,
        client: &str,
        rate: f64,
        burst: u32,
    ) -> Option<Result<(), Duration>> {
        self.0.as_ref()?.take_token(client, rate, burst).await
    }

    /// What `key` spent on UTC day `day` across replicas; `None` not shared now.
    pub async fn spent(&self, key: &str, day: u64) -> Option<f64> {
        self.0.as_ref()?.spent(key, day).await
    }

    /// Add `usd` to `key`'s spend of `day`; `false` when it could not be shared.
    pub async fn charge(&self, key: &str, usd: f64, day: u64) -> bool {
        match &self.0 {
            Some(s) => s.charge(key, usd, day).await,
            None => false,
        }
    }

    /// The shared cache level.
    pub async fn cache_get(&self, key: &CacheKey) -> Option<CachedImage> {
        self.0.as_ref()?.cache_get(key).await
    }

    pub async fn cache_put(&self, key: &CacheKey, value: &CachedImage) {
        if let Some(s) = &self.0 {
            s.cache_put(key, value).await;
        }
    }

    /// Lead the generation of `key`, or wait (until `deadline`) for the replica that does.
    pub async fn lead_or_wait(&self, key: &CacheKey, deadline: Instant) -> Turn {
        match &self.0 {
            Some(s) => s.lead_or_wait(key, deadline).await,
            None => Turn::Alone,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redis(url: &str) -> StateConfig {
        StateConfig {
            backend: StateBackend::Redis,
            redis_url: crate::secret_url::SecretUrl::new(url),
            ..StateConfig::default()
        }
    }

    #[test]
    fn a_redis_state_needs_a_redis_url_and_never_repeats_it() {
        assert!(
            StateConfig::default().validate().is_ok(),
            "memory needs nothing"
        );
        assert!(redis("redis://127.0.0.1:6379/0").validate().is_ok());
        assert!(redis("redis://:pw@redis.internal:6379").validate().is_ok());
        let e = redis("").validate().unwrap_err();
        assert!(e.contains("KLEINGATE_STATE__REDIS_URL"), "{e}");
        for bad in [
            "rediss://:hunter2@host:6380",
            "http://:hunter2@host",
            "redis://:hunter2@host:notaport",
        ] {
            let e = redis(bad).validate().unwrap_err();
            assert!(
                !e.contains("hunter2") && e.contains("state.redis_url"),
                "{e}"
            );
        }
        let mut c = redis("redis://h");
        c.timeout_secs = 0.0;
        assert!(c.validate().unwrap_err().contains("timeout_secs"));
        c.timeout_secs = f64::NAN;
        assert!(c.validate().is_err());
    }
}
