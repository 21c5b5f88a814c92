//! Experiment storage in one SQLite file (`[storage] path`, or `url = "sqlite://PATH"`): the
//! default, for one gateway process.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use super::{ExperimentStore, StoreError};
use super::{Pair, Record, VariantResult};

/// The SQLite store. WAL with `synchronous = FULL`: a committed result or score survives a crash
/// or `kill -9` of the gateway. Its calls block (fsync), so each runs on the blocking pool.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
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
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record_now(&self, r: &Record) -> Result<(), StoreError> {
        let mut conn = self.conn();
        // One transaction: a result never exists without the image it was stored with.
        let tx = conn.transaction()?;
        tx.execute(
            // Idempotent: a write retried after a timeout may find its first try committed.
            "INSERT INTO results (request_id, experiment, variant, backend, model,
                prompt, seed, status, latency_ms, cost_usd, excluded, pair_of)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
             ON CONFLICT (request_id) DO NOTHING",
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
                "INSERT INTO images (request_id, content_type, bytes) VALUES (?1, ?2, ?3)
                 ON CONFLICT (request_id) DO NOTHING",
                params![r.request_id, content_type, bytes],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn image_now(
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
    fn pairs_now(&self, experiment: &str, limit: usize) -> Result<Vec<Pair>, StoreError> {
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
    fn feedback_now(
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
    fn prune_now(
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

    fn results_now(&self, experiment: &str) -> Result<Vec<VariantResult>, StoreError> {
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

impl SqliteStore {
    /// Run `f` on the blocking pool with the connection.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&SqliteStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this))
            .await
            .map_err(|e| StoreError::Failed(format!("storage task: {e}")))?
    }
}

#[async_trait::async_trait]
impl ExperimentStore for SqliteStore {
    async fn record(&self, r: &Record) -> Result<(), StoreError> {
        let r = r.clone();
        self.blocking(move |s| s.record_now(&r)).await
    }

    async fn image(
        &self,
        experiment: &str,
        request_id: &str,
    ) -> Result<Option<(String, Vec<u8>)>, StoreError> {
        let (e, id) = (experiment.to_owned(), request_id.to_owned());
        self.blocking(move |s| s.image_now(&e, &id)).await
    }

    async fn pairs(&self, experiment: &str, limit: usize) -> Result<Vec<Pair>, StoreError> {
        let e = experiment.to_owned();
        self.blocking(move |s| s.pairs_now(&e, limit)).await
    }

    async fn feedback(
        &self,
        request_id: &str,
        voter: &str,
        score: f64,
    ) -> Result<(String, String, Option<f64>), StoreError> {
        let (id, v) = (request_id.to_owned(), voter.to_owned());
        self.blocking(move |s| s.feedback_now(&id, &v, score)).await
    }

    async fn prune(&self, images: Duration, results: Duration) -> Result<(u64, u64), StoreError> {
        self.blocking(move |s| s.prune_now(images, results)).await
    }

    async fn results(&self, experiment: &str) -> Result<Vec<VariantResult>, StoreError> {
        let e = experiment.to_owned();
        self.blocking(move |s| s.results_now(&e)).await
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
