//! Where experiment results, their images and the votes on them are kept: one
//! [`ExperimentStore`] trait with two implementations, a SQLite file (one process; the default)
//! and PostgreSQL (every replica reads and writes the same results and votes), and a
//! [`Storage`] in front that bounds how long a request waits on either and keeps the records a
//! database could not take in a bounded retry buffer ([`writer`]).

mod postgres;
mod sqlite;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;
use crate::secret_url::SecretUrl;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;
pub use writer::RecordWriter;

/// One answered experiment request.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub request_id: String,
    pub experiment: String,
    pub variant: String,
    pub backend: String,
    pub model: String,
    pub prompt: String,
    pub seed: Option<u64>,
    pub status: u16,
    pub latency_ms: f64,
    pub cost_usd: f64,
    /// Served from the cache or by a fallback backend: not a measurement of the variant.
    pub excluded: bool,
    /// For a shadow run: the request id of the client's request it pairs with.
    pub pair_of: Option<String>,
    /// The image, kept for the side-by-side page when the experiment runs shadows.
    pub image: Option<(String, Vec<u8>)>,
}

/// A client's answer and its shadow, for the side-by-side page.
#[derive(Clone, Debug, Serialize)]
pub struct Pair {
    pub prompt: String,
    pub seed: Option<u64>,
    /// (request id, variant) of the client's answer, then of the shadow.
    pub left: (String, String),
    pub right: (String, String),
}

#[derive(Clone, Debug, Serialize, PartialEq, utoipa::ToSchema)]
pub struct VariantResult {
    pub variant: String,
    /// Requests answered 200 that measure the variant (not cached, no fallback).
    pub count: u64,
    /// All recorded requests, excluded ones included.
    pub recorded: u64,
    pub feedback: u64,
    pub mean_score: Option<f64>,
    pub mean_latency_ms: Option<f64>,
    pub mean_cost_usd: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("storage: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// No connection (the database is down or unreachable), or another failure around it.
    #[error("storage: {0}")]
    Failed(String),
    #[error("storage: no answer within {0:?}")]
    Timeout(Duration),
    #[error("no experiment request with id `{0}`")]
    UnknownRequest(String),
}

impl StoreError {
    /// A record the database refuses for what it is (invalid data, a broken constraint: SQLSTATE
    /// classes 22 and 23), so that retrying it can never succeed.
    pub fn is_permanent(&self) -> bool {
        match self {
            StoreError::Postgres(e) => e
                .code()
                .is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("23")),
            StoreError::Sql(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::ConstraintViolation
            }
            _ => false,
        }
    }
}

/// What experiments need from a database. Every call is one transaction; `record` is idempotent
/// by request id, so a write retried after a timeout cannot store a result twice.
#[async_trait::async_trait]
pub trait ExperimentStore: Send + Sync {
    async fn record(&self, r: &Record) -> Result<(), StoreError>;
    /// A stored image of `experiment`'s request `request_id`: (content type, bytes).
    async fn image(
        &self,
        experiment: &str,
        request_id: &str,
    ) -> Result<Option<(String, Vec<u8>)>, StoreError>;
    /// The newest pairs (client answer + shadow, both with images) of an experiment.
    async fn pairs(&self, experiment: &str, limit: usize) -> Result<Vec<Pair>, StoreError>;
    /// Store `voter`'s score for a recorded request, replacing that voter's earlier score for it
    /// (one vote per result and voter); returns the (experiment, variant) it belongs to and the
    /// score it replaced, if any.
    async fn feedback(
        &self,
        request_id: &str,
        voter: &str,
        score: f64,
    ) -> Result<(String, String, Option<f64>), StoreError>;
    /// Delete images older than `images` and results (with their images and votes) older than
    /// `results`, in short batches; returns (images, results) deleted.
    async fn prune(&self, images: Duration, results: Duration) -> Result<(u64, u64), StoreError>;
    async fn results(&self, experiment: &str) -> Result<Vec<VariantResult>, StoreError>;
}

/// Where experiment results and feedback are kept.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// `sqlite://PATH` or `postgres://user:password@host:port/database`; empty = SQLite at
    /// `path`. Usually from the environment (`KLEINGATE_STORAGE__URL`, a Secret) when it holds a
    /// password.
    pub url: SecretUrl,
    /// SQLite file when `url` is empty; created when missing. Only opened when experiments are
    /// configured.
    pub path: String,
    /// Stored experiment images (for the side-by-side page) older than this are deleted.
    pub image_retention_days: f64,
    /// Experiment results and their feedback older than this are deleted.
    pub result_retention_days: f64,
    /// The longest a request waits on the database: writing its record (then it is kept for
    /// retry), a vote, a report.
    pub timeout_secs: f64,
    /// Records kept for retry while the database cannot take them; past it the oldest is dropped
    /// (counted and logged).
    pub retry_buffer: usize,
    /// How often kept records are retried.
    pub retry_secs: f64,
    /// PostgreSQL connections per gateway process.
    pub pool_size: usize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            url: SecretUrl::default(),
            path: "kleingate.db".into(),
            image_retention_days: 30.0,
            result_retention_days: 365.0,
            timeout_secs: 2.0,
            retry_buffer: 10_000,
            retry_secs: 1.0,
            pool_size: 8,
        }
    }
}

/// Which database a [`StorageConfig`] names.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    Sqlite(String),
    Postgres(String),
}

impl StorageConfig {
    pub fn target(&self) -> Result<Target, String> {
        let url = self.url.expose();
        if url.is_empty() {
            return Ok(Target::Sqlite(self.path.clone()));
        }
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(
                    "storage.url: sqlite:// needs a file path (sqlite://kleingate.db)".into(),
                );
            }
            return Ok(Target::Sqlite(path.to_owned()));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Target::Postgres(url.to_owned()));
        }
        Err("storage.url must start with sqlite:// or postgres://".into())
    }

    pub fn validate(&self) -> Result<(), String> {
        for (k, v) in [
            ("timeout_secs", self.timeout_secs),
            ("retry_secs", self.retry_secs),
        ] {
            if !(v.is_finite() && (0.01..=3600.0).contains(&v)) {
                return Err(format!(
                    "storage.{k} must be between 0.01 and 3600; got {v}"
                ));
            }
        }
        if !(1..=1024).contains(&self.pool_size) {
            return Err("storage.pool_size must be between 1 and 1024".into());
        }
        if self.retry_buffer == 0 {
            return Err("storage.retry_buffer must be at least 1".into());
        }
        if let Target::Postgres(url) = self.target()? {
            postgres::parse_url(&url)?;
        }
        Ok(())
    }
}

/// The store with the bounds requests need: every call is cut at `storage.timeout_secs`, and
/// records go through the [`RecordWriter`].
pub struct Storage {
    store: Arc<dyn ExperimentStore>,
    timeout: Duration,
    pub writer: Arc<RecordWriter>,
}

impl Storage {
    /// Open the configured store. SQLite is opened (and migrated) now; PostgreSQL connects and
    /// migrates on first use, so a database that is down at start delays records, not the
    /// gateway.
    pub fn open(cfg: &StorageConfig, metrics: &Metrics) -> Result<Storage, String> {
        let timeout = Duration::from_secs_f64(cfg.timeout_secs);
        let store: Arc<dyn ExperimentStore> = match cfg.target()? {
            Target::Sqlite(path) => Arc::new(
                SqliteStore::open(std::path::Path::new(&path))
                    .map_err(|e| format!("storage {path}: {e}"))?,
            ),
            Target::Postgres(url) => Arc::new(PostgresStore::new(&url, cfg.pool_size, timeout)?),
        };
        Ok(Storage::with_store(store, cfg, metrics))
    }

    pub fn with_store(
        store: Arc<dyn ExperimentStore>,
        cfg: &StorageConfig,
        metrics: &Metrics,
    ) -> Storage {
        let timeout = Duration::from_secs_f64(cfg.timeout_secs);
        Storage {
            writer: Arc::new(RecordWriter::new(store.clone(), cfg, metrics)),
            store,
            timeout,
        }
    }

    async fn bounded<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.timeout, f)
            .await
            .unwrap_or(Err(StoreError::Timeout(self.timeout)))
    }

    /// Store a record now if the database takes it within the timeout, else keep it for retry:
    /// the caller never waits longer, and the record is not lost, even when the caller goes
    /// away meanwhile (the write runs as its own task).
    pub async fn record(&self, r: Record) {
        let writer = self.writer.clone();
        let _ = tokio::spawn(async move { writer.write(r).await }).await;
    }

    pub async fn image(
        &self,
        experiment: &str,
        request_id: &str,
    ) -> Result<Option<(String, Vec<u8>)>, StoreError> {
        self.bounded(self.store.image(experiment, request_id)).await
    }

    pub async fn pairs(&self, experiment: &str, limit: usize) -> Result<Vec<Pair>, StoreError> {
        self.bounded(self.store.pairs(experiment, limit)).await
    }

    pub async fn feedback(
        &self,
        request_id: &str,
        voter: &str,
        score: f64,
    ) -> Result<(String, String, Option<f64>), StoreError> {
        self.bounded(self.store.feedback(request_id, voter, score))
            .await
    }

    pub async fn results(&self, experiment: &str) -> Result<Vec<VariantResult>, StoreError> {
        self.bounded(self.store.results(experiment)).await
    }

    /// Pruning runs in the background: no request waits on it, so it is not cut short.
    pub async fn prune(
        &self,
        images: Duration,
        results: Duration,
    ) -> Result<(u64, u64), StoreError> {
        self.store.prune(images, results).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_storage_url_names_the_database_and_is_never_repeated() {
        let with = |url: &str| StorageConfig {
            url: SecretUrl::new(url),
            ..StorageConfig::default()
        };
        assert_eq!(
            StorageConfig::default().target(),
            Ok(Target::Sqlite("kleingate.db".into()))
        );
        assert_eq!(
            with("sqlite:///var/lib/kg.db").target(),
            Ok(Target::Sqlite("/var/lib/kg.db".into()))
        );
        assert!(with("postgres://kg:pw@db:5432/kleingate")
            .validate()
            .is_ok());
        assert!(with("postgresql://kg@db/kleingate").validate().is_ok());
        for bad in [
            "mysql://kg:hunter2@db/x",
            "sqlite://",
            "postgres://kg:hunter2@db:notaport/x",
        ] {
            let e = with(bad).validate().unwrap_err();
            assert!(e.contains("storage.url") && !e.contains("hunter2"), "{e}");
        }
        let c = StorageConfig {
            timeout_secs: 0.0,
            ..StorageConfig::default()
        };
        assert!(c.validate().is_err());
    }
}
