//! A/B experiments: named experiments with weighted variants (a backend and/or a model), sticky
//! assignment by a client key, results and feedback stored in SQLite so they survive restarts.
//!
//! A request joins an experiment by naming it in `X-Kleingate-Experiment`. With the client key
//! header (`key_header`, `X-Kleingate-Client` by default) the variant is a hash of experiment name
//! and key, so a client always sees the same variant; without it the pick is random per request.
//! Each answer is recorded (variant, requested and serving backend, model, seed, latency, cost,
//! whether it came from the cache or a fallback) under its request id; `POST /v1/feedback` adds a
//! score for a request id, and `GET /v1/experiments/{name}` reports per variant. Cache hits and
//! fallbacks are recorded but left out of the comparison: they do not measure the variant.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use kleingate_protocol::Model;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub name: String,
    #[serde(default = "one")]
    pub weight: u32,
    /// Serve this variant from this backend (first choice; fallbacks still apply and are marked).
    #[serde(default)]
    pub backend: Option<String>,
    /// Serve this variant with this model instead of the requested one.
    #[serde(default)]
    pub model: Option<Model>,
}

fn one() -> u32 {
    1
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    pub variants: Vec<Variant>,
    #[serde(default = "default_key_header")]
    pub key_header: String,
    /// Also run every request on a second variant in the background (after the client's
    /// answer, never delaying it) and keep both images, for side-by-side comparison.
    #[serde(default)]
    pub shadow: bool,
}

fn default_key_header() -> String {
    "x-kleingate-client".into()
}

impl ExperimentConfig {
    pub fn validate(&self, name: &str, backends: &[&str]) -> Result<(), String> {
        if self.variants.len() < 2 {
            return Err(format!("experiments.{name}: needs at least two variants"));
        }
        if self.variants.iter().all(|v| v.weight == 0) {
            return Err(format!("experiments.{name}: every variant has weight 0"));
        }
        let mut seen = std::collections::HashSet::new();
        for v in &self.variants {
            if !seen.insert(&v.name) {
                return Err(format!("experiments.{name}: variant `{}` twice", v.name));
            }
            if let Some(b) = &v.backend {
                if !backends.contains(&b.as_str()) {
                    return Err(format!(
                        "experiments.{name}: variant `{}` names backend `{b}`, which is not configured",
                        v.name
                    ));
                }
            }
        }
        if axum::http::HeaderName::from_bytes(self.key_header.as_bytes()).is_err() {
            return Err(format!(
                "experiments.{name}: key_header is not a header name"
            ));
        }
        Ok(())
    }

    /// The variant a shadow run of `assigned` uses: the next one in the list.
    pub fn shadow_of(&self, assigned: &str) -> Option<&Variant> {
        if !self.shadow {
            return None;
        }
        let i = self.variants.iter().position(|v| v.name == assigned)?;
        Some(&self.variants[(i + 1) % self.variants.len()])
    }

    /// The variant for a client key (sticky), or for a random draw without one.
    pub fn assign(&self, experiment: &str, key: Option<&str>) -> &Variant {
        let total: u64 = self.variants.iter().map(|v| u64::from(v.weight)).sum();
        let mut point = match key {
            Some(k) => {
                let mut h = Sha256::new();
                h.update((experiment.len() as u32).to_be_bytes());
                h.update(experiment.as_bytes());
                h.update(k.as_bytes());
                let d = h.finalize();
                u64::from_be_bytes(d[..8].try_into().expect("8 bytes")) % total.max(1)
            }
            None => rand::random_range(0..total.max(1)),
        };
        for v in &self.variants {
            let w = u64::from(v.weight);
            if point < w {
                return v;
            }
            point -= w;
        }
        &self.variants[0]
    }
}

/// A fresh, unguessable id for a stored answer (128 random bits, hex).
pub fn new_result_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

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
    #[error("no experiment request with id `{0}`")]
    UnknownRequest(String),
}

/// The SQLite store. WAL with `synchronous = FULL`: a committed result or score survives a crash
/// or `kill -9` of the gateway.
pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS results (
                request_id TEXT PRIMARY KEY,
                experiment TEXT NOT NULL,
                variant TEXT NOT NULL,
                backend TEXT NOT NULL,
                model TEXT NOT NULL,
                prompt TEXT NOT NULL,
                seed INTEGER,
                status INTEGER NOT NULL,
                latency_ms REAL NOT NULL,
                cost_usd REAL NOT NULL,
                excluded INTEGER NOT NULL,
                pair_of TEXT,
                created_at INTEGER NOT NULL DEFAULT (unixepoch())
            );
            CREATE TABLE IF NOT EXISTS images (
                request_id TEXT PRIMARY KEY REFERENCES results (request_id),
                content_type TEXT NOT NULL,
                bytes BLOB NOT NULL
            );
            CREATE INDEX IF NOT EXISTS results_by_experiment ON results (experiment, variant);
            CREATE TABLE IF NOT EXISTS feedback (
                id INTEGER PRIMARY KEY,
                request_id TEXT NOT NULL REFERENCES results (request_id),
                score REAL NOT NULL,
                created_at INTEGER NOT NULL DEFAULT (unixepoch())
            );",
        )?;
        migrate(&conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn record(&self, r: &Record) -> Result<(), StoreError> {
        let mut conn = self.conn();
        // One transaction: a result never exists without the image it was stored with.
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO results (request_id, experiment, variant, backend, model,
                prompt, seed, status, latency_ms, cost_usd, excluded, pair_of)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                r.request_id,
                r.experiment,
                r.variant,
                r.backend,
                r.model,
                r.prompt,
                r.seed.map(|s| s as i64),
                r.status,
                r.latency_ms,
                r.cost_usd,
                r.excluded,
                r.pair_of
            ],
        )?;
        if let Some((content_type, bytes)) = &r.image {
            tx.execute(
                "INSERT INTO images (request_id, content_type, bytes) VALUES (?1, ?2, ?3)",
                params![r.request_id, content_type, bytes],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn image(
        &self,
        experiment: &str,
        request_id: &str,
    ) -> Result<Option<(String, Vec<u8>)>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT i.content_type, i.bytes FROM images i JOIN results r ON r.request_id = i.request_id
                 WHERE i.request_id = ?1 AND r.experiment = ?2",
                [request_id, experiment],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?)
    }

    /// The newest pairs (client answer + shadow, both with images) of an experiment.
    pub fn pairs(&self, experiment: &str, limit: usize) -> Result<Vec<Pair>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT p.prompt, p.seed, p.request_id, p.variant, s.request_id, s.variant
             FROM results s JOIN results p ON s.pair_of = p.request_id
             JOIN images ip ON ip.request_id = p.request_id
             JOIN images isx ON isx.request_id = s.request_id
             WHERE s.experiment = ?1 AND s.status = 200 AND p.status = 200
               AND s.excluded = 0 AND p.excluded = 0
             ORDER BY s.created_at DESC, s.rowid DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![experiment, limit as i64], |row| {
            Ok(Pair {
                prompt: row.get(0)?,
                seed: row.get::<_, Option<i64>>(1)?.map(|s| s as u64),
                left: (row.get(2)?, row.get(3)?),
                right: (row.get(4)?, row.get(5)?),
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Store `voter`'s score for a recorded request, replacing that voter's earlier score for it
    /// (one vote per result and voter); returns the (experiment, variant) it belongs to and the
    /// score it replaced, if any.
    pub fn feedback(
        &self,
        request_id: &str,
        voter: &str,
        score: f64,
    ) -> Result<(String, String, Option<f64>), StoreError> {
        let conn = self.conn();
        let found: Option<(String, String)> = conn
            .query_row(
                "SELECT experiment, variant FROM results WHERE request_id = ?1",
                [request_id],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        let Some((experiment, variant)) = found else {
            return Err(StoreError::UnknownRequest(request_id.to_owned()));
        };
        let previous: Option<f64> = conn
            .query_row(
                "SELECT score FROM feedback WHERE request_id = ?1 AND voter = ?2",
                params![request_id, voter],
                |row| row.get(0),
            )
            .optional()?;
        conn.execute(
            "INSERT INTO feedback (request_id, voter, score) VALUES (?1, ?2, ?3)
             ON CONFLICT (request_id, voter)
             DO UPDATE SET score = excluded.score, created_at = unixepoch()",
            params![request_id, voter, score],
        )?;
        Ok((experiment, variant, previous))
    }

    /// Delete images stored longer ago than `images`, and results (with their images and
    /// feedback) older than `results`, in batches of [`PRUNE_BATCH`] rows, each its own short
    /// transaction: answers waiting to store a record are held up by one batch at most. Returns
    /// (images, results) deleted.
    pub fn prune(
        &self,
        images: std::time::Duration,
        results: std::time::Duration,
    ) -> Result<(u64, u64), StoreError> {
        let before = |d: std::time::Duration| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |n| n.as_secs());
            now.saturating_sub(d.as_secs()) as i64
        };
        let (img_cut, res_cut) = (before(images), before(results));
        let mut pruned = (0u64, 0u64);
        // Images of results older than the image retention.
        loop {
            let n = self.conn().execute(
                "DELETE FROM images WHERE request_id IN
                   (SELECT i.request_id FROM images i JOIN results r ON r.request_id = i.request_id
                    WHERE r.created_at < ?1 LIMIT ?2)",
                params![img_cut, PRUNE_BATCH],
            )? as u64;
            pruned.0 += n;
            if n < PRUNE_BATCH as u64 {
                break;
            }
        }
        // Results older than the result retention, with whatever still refers to them.
        loop {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            let batch = "SELECT request_id FROM results WHERE created_at < ?1 LIMIT ?2";
            tx.execute(
                "CREATE TEMP TABLE IF NOT EXISTS prune_ids (id TEXT PRIMARY KEY)",
                [],
            )?;
            tx.execute("DELETE FROM prune_ids", [])?;
            tx.execute(
                &format!("INSERT INTO prune_ids {batch}"),
                params![res_cut, PRUNE_BATCH],
            )?;
            pruned.0 += tx.execute(
                "DELETE FROM images WHERE request_id IN (SELECT id FROM prune_ids)",
                [],
            )? as u64;
            tx.execute(
                "DELETE FROM feedback WHERE request_id IN (SELECT id FROM prune_ids)",
                [],
            )?;
            let n = tx.execute(
                "DELETE FROM results WHERE request_id IN (SELECT id FROM prune_ids)",
                [],
            )? as u64;
            tx.commit()?;
            pruned.1 += n;
            if n < PRUNE_BATCH as u64 {
                break;
            }
        }
        Ok(pruned)
    }

    pub fn results(&self, experiment: &str) -> Result<Vec<VariantResult>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT r.variant,
                    SUM(CASE WHEN r.excluded = 0 AND r.status = 200 THEN 1 ELSE 0 END),
                    COUNT(*),
                    (SELECT COUNT(*) FROM feedback f JOIN results x ON f.request_id = x.request_id
                      WHERE x.experiment = r.experiment AND x.variant = r.variant AND x.excluded = 0),
                    (SELECT AVG(f.score) FROM feedback f JOIN results x ON f.request_id = x.request_id
                      WHERE x.experiment = r.experiment AND x.variant = r.variant AND x.excluded = 0),
                    AVG(CASE WHEN r.excluded = 0 AND r.status = 200 THEN r.latency_ms END),
                    AVG(CASE WHEN r.excluded = 0 AND r.status = 200 THEN r.cost_usd END)
             FROM results r WHERE r.experiment = ?1 GROUP BY r.variant ORDER BY r.variant",
        )?;
        let rows = stmt.query_map([experiment], |row| {
            Ok(VariantResult {
                variant: row.get(0)?,
                count: row.get::<_, i64>(1)? as u64,
                recorded: row.get::<_, i64>(2)? as u64,
                feedback: row.get::<_, i64>(3)? as u64,
                mean_score: row.get(4)?,
                mean_latency_ms: row.get(5)?,
                mean_cost_usd: row.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}

/// Rows deleted per pruning transaction.
const PRUNE_BATCH: i64 = 500;

/// Schema changes after the first version, by SQLite's `user_version`.
fn migrate(conn: &Connection) -> Result<(), StoreError> {
    // The version is read inside a write transaction: two processes opening one database at once
    // (a rolling update) migrate it once.
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let version: i64 = match conn.pragma_query_value(None, "user_version", |r| r.get(0)) {
        Ok(v) => v,
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e.into());
        }
    };
    if version >= 1 {
        conn.execute_batch("COMMIT")?;
        return Ok(());
    }
    {
        // One vote per result and voter: votes get a voter, older ones each their own (they
        // were cast before voters were told apart, so none replaces another).
        let done = conn.execute_batch(
            "ALTER TABLE feedback ADD COLUMN voter TEXT;
             UPDATE feedback SET voter = 'before-voters:' || id WHERE voter IS NULL;
             CREATE UNIQUE INDEX feedback_one_per_voter ON feedback (request_id, voter);
             CREATE INDEX IF NOT EXISTS results_by_time ON results (created_at);
             PRAGMA user_version = 1;
             COMMIT;",
        );
        if let Err(e) = done {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e.into());
        }
    }
    Ok(())
}

/// The configured experiments and their store.
pub struct Experiments {
    pub configs: BTreeMap<String, ExperimentConfig>,
    pub store: Option<Store>,
}

/// Apply `storage.image_retention_days` and `result_retention_days` now and then for as long as
/// the server runs: at start, then every tenth of the image retention (at least a second, at
/// most an hour), so what requests leave behind does not grow without bound.
pub async fn prune_periodically(state: std::sync::Arc<crate::AppState>) {
    if state.experiments.store.is_none() {
        return;
    }
    let day = 86_400.0;
    let images =
        std::time::Duration::from_secs_f64(state.config.storage.image_retention_days * day);
    let results =
        std::time::Duration::from_secs_f64(state.config.storage.result_retention_days * day);
    let every = (images / 10).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(3600),
    );
    loop {
        let st = state.clone();
        let done = tokio::task::spawn_blocking(move || {
            st.experiments
                .store
                .as_ref()
                .map(|s| s.prune(images, results))
        })
        .await;
        match done {
            Ok(Some(Ok((i, r)))) => {
                let m = &state.metrics.storage_pruned;
                m.with_label_values(&["image"]).inc_by(i);
                m.with_label_values(&["result"]).inc_by(r);
                if i + r > 0 {
                    tracing::info!(images = i, results = r, "pruned old experiment records");
                }
            }
            _ => tracing::error!("pruning old experiment records failed"),
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ExperimentConfig {
        ExperimentConfig {
            variants: vec![
                Variant {
                    name: "a".into(),
                    weight: 3,
                    backend: None,
                    model: None,
                },
                Variant {
                    name: "b".into(),
                    weight: 1,
                    backend: None,
                    model: None,
                },
            ],
            key_header: default_key_header(),
            shadow: false,
        }
    }

    #[test]
    fn assignment_is_sticky_per_key_and_follows_the_weights() {
        let c = cfg();
        let mut counts = BTreeMap::new();
        for i in 0..4000 {
            let key = format!("client-{i}");
            let v = &c.assign("exp", Some(&key)).name;
            assert_eq!(v, &c.assign("exp", Some(&key)).name, "not sticky");
            *counts.entry(v.clone()).or_insert(0) += 1;
        }
        let a = f64::from(counts["a"]) / 4000.0;
        assert!((a - 0.75).abs() < 0.03, "share of a: {a}");
        // Another experiment hashes the same keys differently.
        let moved = (0..200)
            .filter(|i| {
                let k = format!("client-{i}");
                c.assign("exp", Some(&k)).name != c.assign("other", Some(&k)).name
            })
            .count();
        assert!(moved > 20);
    }

    #[test]
    fn results_and_feedback_survive_reopening_and_exclude_cache_and_fallback() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        let rec = |id: &str, variant: &str, latency: f64, excluded: bool| Record {
            request_id: id.into(),
            experiment: "exp".into(),
            variant: variant.into(),
            backend: "verda".into(),
            model: "flux2-klein-4b".into(),
            prompt: "p".into(),
            seed: Some(1),
            status: 200,
            latency_ms: latency,
            cost_usd: 0.01,
            excluded,
            pair_of: None,
            image: None,
        };
        {
            let s = Store::open(&path).unwrap();
            s.record(&rec("r1", "a", 100.0, false)).unwrap();
            s.record(&rec("r2", "a", 300.0, false)).unwrap();
            s.record(&rec("r3", "a", 1.0, true)).unwrap();
            s.record(&rec("r4", "b", 50.0, false)).unwrap();
            assert_eq!(
                s.feedback("r1", "alice", 4.0).unwrap(),
                ("exp".into(), "a".into(), None)
            );
            // The same voter again: replaces the vote, and says which score it replaced.
            assert_eq!(
                s.feedback("r1", "alice", 5.0).unwrap(),
                ("exp".into(), "a".into(), Some(4.0))
            );
            s.feedback("r2", "alice", 2.0).unwrap();
            // A score for a cache hit is kept but does not count for the variant.
            s.feedback("r3", "alice", 1.0).unwrap();
            assert!(matches!(
                s.feedback("nope", "alice", 1.0),
                Err(StoreError::UnknownRequest(_))
            ));
        }
        let s = Store::open(&path).unwrap();
        let r = s.results("exp").unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].count, r[0].recorded, r[0].feedback), (2, 3, 2));
        assert_eq!(r[0].mean_score, Some(3.5));
        assert_eq!(r[0].mean_latency_ms, Some(200.0));
        assert_eq!((r[1].count, r[1].feedback, r[1].mean_score), (1, 0, None));
    }
}
