//! Experiment storage on PostgreSQL (`[storage] url = "postgres://..."`): every replica writes to
//! and reads from the same tables, so results and votes cast through any replica show on all.
//!
//! Connections come from a pool that replaces broken ones (a database restart). The schema is
//! versioned: [`MIGRATIONS`] in order, each applied once in its own transaction and recorded in
//! `kleingate_migrations`, under an advisory lock so replicas starting together migrate once. It
//! is applied on first use (and retried until it succeeds), so a database that is down when the
//! gateway starts holds records back, not the gateway. Plain TCP (`NoTls`): run it on a private
//! network, or through a TLS-terminating proxy.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use super::{ExperimentStore, StoreError};
use super::{Pair, Record, VariantResult};

/// The schema, version by version. Never edit one that has shipped: add the next.
const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    "CREATE TABLE kleingate_results (
        seq BIGSERIAL UNIQUE,
        request_id TEXT PRIMARY KEY,
        experiment TEXT NOT NULL,
        variant TEXT NOT NULL,
        backend TEXT NOT NULL,
        model TEXT NOT NULL,
        prompt TEXT NOT NULL,
        seed BIGINT,
        status INTEGER NOT NULL,
        latency_ms DOUBLE PRECISION NOT NULL,
        cost_usd DOUBLE PRECISION NOT NULL,
        excluded BOOLEAN NOT NULL,
        pair_of TEXT,
        created_at BIGINT NOT NULL DEFAULT (extract(epoch FROM now())::bigint)
    );
    CREATE INDEX kleingate_results_by_experiment ON kleingate_results (experiment, variant);
    CREATE INDEX kleingate_results_by_time ON kleingate_results (created_at);
    CREATE INDEX kleingate_results_by_pair ON kleingate_results (pair_of);
    CREATE TABLE kleingate_images (
        request_id TEXT PRIMARY KEY REFERENCES kleingate_results (request_id),
        content_type TEXT NOT NULL,
        bytes BYTEA NOT NULL
    );
    CREATE TABLE kleingate_feedback (
        id BIGSERIAL PRIMARY KEY,
        request_id TEXT NOT NULL REFERENCES kleingate_results (request_id),
        voter TEXT NOT NULL,
        score DOUBLE PRECISION NOT NULL,
        created_at BIGINT NOT NULL DEFAULT (extract(epoch FROM now())::bigint),
        UNIQUE (request_id, voter)
    );",
)];

/// `pg_advisory_xact_lock` key of the migration (any constant every replica agrees on).
const MIGRATION_LOCK: i64 = 0x6b6c_6569_6e67_6174; // "kleingat"

/// Rows deleted per pruning transaction.
const PRUNE_BATCH: i64 = 500;

/// Parse without ever repeating the URL (it holds a password).
pub(super) fn parse_url(url: &str) -> Result<tokio_postgres::Config, String> {
    url.parse::<tokio_postgres::Config>().map_err(|_| {
        "storage.url is not a valid postgres:// URL (postgres://user:password@host:port/database)"
            .to_owned()
    })
}

pub struct PostgresStore {
    pool: Pool,
    /// Set once the migrations are applied; until then every call tries to apply them first.
    migrated: tokio::sync::OnceCell<()>,
}

fn failed(e: impl std::fmt::Display) -> StoreError {
    StoreError::Failed(e.to_string())
}

impl PostgresStore {
    /// A pool of at most `pool_size` connections; none is made until the first call.
    pub fn new(url: &str, pool_size: usize, timeout: Duration) -> Result<PostgresStore, String> {
        let mut pg = parse_url(url)?;
        pg.connect_timeout(timeout);
        pg.application_name("kleingate");
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .build()
            .map_err(|e| format!("storage: cannot set up the PostgreSQL pool: {e}"))?;
        Ok(PostgresStore {
            pool,
            migrated: tokio::sync::OnceCell::new(),
        })
    }

    /// A connection with the schema in place.
    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        let mut client = self.pool.get().await.map_err(failed)?;
        if self.migrated.get().is_none() {
            let c = &mut client;
            self.migrated
                .get_or_try_init(|| async move { migrate(c).await })
                .await?;
        }
        Ok(client)
    }

    /// The schema versions applied (for tests and operators).
    pub async fn applied_migrations(&self) -> Result<Vec<i32>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT version FROM kleingate_migrations ORDER BY version",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

async fn migrate(client: &mut deadpool_postgres::Object) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS kleingate_migrations (
            version INTEGER PRIMARY KEY,
            applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
        )",
    )
    .await?;
    let applied: Vec<i32> = tx
        .query("SELECT version FROM kleingate_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (version, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO kleingate_migrations (version) VALUES ($1)",
            &[version],
        )
        .await?;
        tracing::info!(version, "applied PostgreSQL migration");
    }
    tx.commit().await?;
    Ok(())
}

fn cutoff(d: Duration) -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |n| n.as_secs());
    i64::try_from(now.saturating_sub(d.as_secs())).unwrap_or(0)
}

#[async_trait::async_trait]
impl ExperimentStore for PostgresStore {
    async fn record(&self, r: &Record) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        // One transaction: a result never exists without the image it was stored with.
        let tx = c.transaction().await?;
        let seed = r.seed.map(|s| s as i64);
        let status = i32::from(r.status);
        tx.execute(
            "INSERT INTO kleingate_results (request_id, experiment, variant, backend, model,
                prompt, seed, status, latency_ms, cost_usd, excluded, pair_of)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
             ON CONFLICT (request_id) DO NOTHING",
            &[
                &r.request_id,
                &r.experiment,
                &r.variant,
                &r.backend,
                &r.model,
                &r.prompt,
                &seed,
                &status,
                &r.latency_ms,
                &r.cost_usd,
                &r.excluded,
                &r.pair_of,
            ],
        )
        .await?;
        if let Some((content_type, bytes)) = &r.image {
            tx.execute(
                "INSERT INTO kleingate_images (request_id, content_type, bytes) VALUES ($1, $2, $3)
                 ON CONFLICT (request_id) DO NOTHING",
                &[&r.request_id, content_type, bytes],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn image(
        &self,
        experiment: &str,
        request_id: &str,
    ) -> Result<Option<(String, Vec<u8>)>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                "SELECT i.content_type, i.bytes FROM kleingate_images i
                 JOIN kleingate_results r ON r.request_id = i.request_id
                 WHERE i.request_id = $1 AND r.experiment = $2",
                &[&request_id, &experiment],
            )
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    async fn pairs(&self, experiment: &str, limit: usize) -> Result<Vec<Pair>, StoreError> {
        let c = self.client().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = c
            .query(
                "SELECT p.prompt, p.seed, p.request_id, p.variant, s.request_id, s.variant
                 FROM kleingate_results s JOIN kleingate_results p ON s.pair_of = p.request_id
                 JOIN kleingate_images ip ON ip.request_id = p.request_id
                 JOIN kleingate_images isx ON isx.request_id = s.request_id
                 WHERE s.experiment = $1 AND s.status = 200 AND p.status = 200
                   AND NOT s.excluded AND NOT p.excluded
                 ORDER BY s.created_at DESC, s.seq DESC LIMIT $2",
                &[&experiment, &limit],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| Pair {
                prompt: row.get(0),
                seed: row.get::<_, Option<i64>>(1).map(|s| s as u64),
                left: (row.get(2), row.get(3)),
                right: (row.get(4), row.get(5)),
            })
            .collect())
    }

    async fn feedback(
        &self,
        request_id: &str,
        voter: &str,
        score: f64,
    ) -> Result<(String, String, Option<f64>), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let Some(found) = tx
            .query_opt(
                "SELECT experiment, variant FROM kleingate_results WHERE request_id = $1",
                &[&request_id],
            )
            .await?
        else {
            return Err(StoreError::UnknownRequest(request_id.to_owned()));
        };
        // The score replaced and the upsert in one statement: they see the same snapshot.
        let row = tx
            .query_one(
                "WITH prev AS (
                    SELECT score FROM kleingate_feedback WHERE request_id = $1 AND voter = $2
                 ), up AS (
                    INSERT INTO kleingate_feedback (request_id, voter, score) VALUES ($1, $2, $3)
                    ON CONFLICT (request_id, voter) DO UPDATE
                      SET score = EXCLUDED.score,
                          created_at = extract(epoch FROM now())::bigint
                    RETURNING 1
                 )
                 SELECT (SELECT score FROM prev), (SELECT count(*) FROM up)",
                &[&request_id, &voter, &score],
            )
            .await?;
        tx.commit().await?;
        Ok((found.get(0), found.get(1), row.get(0)))
    }

    async fn prune(&self, images: Duration, results: Duration) -> Result<(u64, u64), StoreError> {
        let (img_cut, res_cut) = (cutoff(images), cutoff(results));
        let mut pruned = (0u64, 0u64);
        // Images of results older than the image retention, a batch per statement.
        loop {
            let c = self.client().await?;
            let n = c
                .execute(
                    "DELETE FROM kleingate_images WHERE request_id IN
                       (SELECT i.request_id FROM kleingate_images i
                        JOIN kleingate_results r ON r.request_id = i.request_id
                        WHERE r.created_at < $1 LIMIT $2)",
                    &[&img_cut, &PRUNE_BATCH],
                )
                .await?;
            pruned.0 += n;
            if n < PRUNE_BATCH as u64 {
                break;
            }
        }
        // Results older than the result retention, with their images and votes: one statement
        // per batch (the deletes see one snapshot; the foreign keys are checked at its end).
        loop {
            let c = self.client().await?;
            let row = c
                .query_one(
                    "WITH ids AS (
                        SELECT request_id FROM kleingate_results WHERE created_at < $1 LIMIT $2
                     ), di AS (
                        DELETE FROM kleingate_images WHERE request_id IN (SELECT request_id FROM ids)
                        RETURNING 1
                     ), df AS (
                        DELETE FROM kleingate_feedback WHERE request_id IN (SELECT request_id FROM ids)
                        RETURNING 1
                     ), dr AS (
                        DELETE FROM kleingate_results WHERE request_id IN (SELECT request_id FROM ids)
                        RETURNING 1
                     )
                     SELECT (SELECT count(*) FROM di), (SELECT count(*) FROM df), (SELECT count(*) FROM dr)",
                    &[&res_cut, &PRUNE_BATCH],
                )
                .await?;
            let (i, r): (i64, i64) = (row.get(0), row.get(2));
            pruned.0 += i as u64;
            pruned.1 += r as u64;
            if r < PRUNE_BATCH {
                break;
            }
        }
        Ok(pruned)
    }

    async fn results(&self, experiment: &str) -> Result<Vec<VariantResult>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT r.variant,
                        SUM(CASE WHEN NOT r.excluded AND r.status = 200 THEN 1 ELSE 0 END)::bigint,
                        COUNT(*)::bigint,
                        (SELECT COUNT(*) FROM kleingate_feedback f
                           JOIN kleingate_results x ON f.request_id = x.request_id
                          WHERE x.experiment = r.experiment AND x.variant = r.variant
                            AND NOT x.excluded)::bigint,
                        (SELECT AVG(f.score) FROM kleingate_feedback f
                           JOIN kleingate_results x ON f.request_id = x.request_id
                          WHERE x.experiment = r.experiment AND x.variant = r.variant
                            AND NOT x.excluded)::double precision,
                        AVG(CASE WHEN NOT r.excluded AND r.status = 200 THEN r.latency_ms END)::double precision,
                        AVG(CASE WHEN NOT r.excluded AND r.status = 200 THEN r.cost_usd END)::double precision
                 FROM kleingate_results r WHERE r.experiment = $1
                 GROUP BY r.experiment, r.variant ORDER BY r.variant",
                &[&experiment],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| VariantResult {
                variant: row.get(0),
                count: row.get::<_, i64>(1) as u64,
                recorded: row.get::<_, i64>(2) as u64,
                feedback: row.get::<_, i64>(3) as u64,
                mean_score: row.get(4),
                mean_latency_ms: row.get(5),
                mean_cost_usd: row.get(6),
            })
            .collect())
    }
}
