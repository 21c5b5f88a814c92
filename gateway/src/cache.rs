//! The image cache (moka, bounded by encoded bytes, with a TTL) and request coalescing.
//!
//! Coalescing rides on moka's per-key initialisation: of N concurrent callers with the same key,
//! one runs the backend call and the others wait for its result. An error reaches every waiter and
//! is not cached; if the leading caller is cancelled (its client went away), a waiter takes over.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kleingate_backend::GeneratedImage;
use kleingate_protocol::CacheKey;
use moka::notification::RemovalCause;
use prometheus::IntCounter;

/// A finished image and who made it.
#[derive(Clone, Debug)]
pub struct CachedImage {
    pub image: GeneratedImage,
    pub backend: Arc<str>,
    /// Time spent waiting on backends to produce it (for the overhead metric).
    pub backend_time: Duration,
    /// What producing it cost (measured by the backend, else its estimate; 0 when unknown).
    pub cost_usd: f64,
}

/// Per-entry bookkeeping charged on top of the image bytes, so that many tiny images cannot
/// exceed the bound by much.
const ENTRY_OVERHEAD: usize = 128;

#[derive(Clone)]
pub struct ImageCache {
    inner: moka::future::Cache<CacheKey, CachedImage>,
}

pub enum Lookup {
    /// This caller ran the backend call.
    Generated(CachedImage),
    /// This caller waited for an identical request's result.
    Coalesced(CachedImage),
}

impl ImageCache {
    pub fn new(max_bytes: u64, ttl: Duration, evictions: IntCounter) -> Self {
        let inner = moka::future::Cache::builder()
            .max_capacity(max_bytes)
            .time_to_live(ttl)
            .weigher(|_k: &CacheKey, v: &CachedImage| {
                u32::try_from(v.image.bytes.len() + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
            })
            .eviction_listener(move |_k, _v, cause| {
                if matches!(cause, RemovalCause::Size | RemovalCause::Expired) {
                    evictions.inc();
                }
            })
            .build();
        ImageCache { inner }
    }

    pub async fn get(&self, key: &CacheKey) -> Option<CachedImage> {
        self.inner.get(key).await
    }

    pub async fn insert(&self, key: CacheKey, value: CachedImage) {
        self.inner.insert(key, value).await;
    }

    pub async fn invalidate(&self, key: &CacheKey) {
        self.inner.invalidate(key).await;
    }

    /// Return the cached value, or run `make` once for all concurrent callers of this key.
    /// An error reaches every waiter (shared: `Arc<E>`) and is not cached.
    pub async fn get_or_generate<F, E>(&self, key: CacheKey, make: F) -> Result<Lookup, Arc<E>>
    where
        F: Future<Output = Result<CachedImage, E>>,
        E: Send + Sync + 'static,
    {
        let entry = self.inner.entry(key).or_try_insert_with(make).await?;
        let fresh = entry.is_fresh();
        let value = entry.into_value();
        Ok(if fresh {
            Lookup::Generated(value)
        } else {
            Lookup::Coalesced(value)
        })
    }

    /// (entries, weighted bytes) after pending maintenance has run.
    pub async fn usage(&self) -> (u64, u64) {
        self.inner.run_pending_tasks().await;
        (self.inner.entry_count(), self.inner.weighted_size())
    }
}
