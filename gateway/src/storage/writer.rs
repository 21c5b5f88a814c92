//! Experiment records on their way to the database. An answer waits at most
//! `storage.timeout_secs` for its record to be written; a record the database did not take (down,
//! slow, failing) goes to a bounded buffer that a background task retries every
//! `storage.retry_secs`, oldest first. While records wait there, new ones queue behind them
//! (nothing waits on a database known to be failing, and order is kept). Nothing is dropped
//! silently: a full buffer drops its oldest record with an error log line giving the count, and
//! `kleingate_storage_*` metrics show failures, pending and dropped records. A record the
//! database refuses for what it holds (invalid data: it would fail for ever) is dropped at once,
//! counted and logged with the reason, instead of blocking the records behind it. Shutdown tries
//! once more for a bounded time and logs the count of what is still pending.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};

use super::Record;
use super::{ExperimentStore, StorageConfig};
use crate::metrics::Metrics;

/// How long shutdown spends writing pending records.
const FINISH_WITHIN: Duration = Duration::from_secs(10);

enum Failure {
    /// Down, slow, or failing for now: retry.
    Later(String),
    /// Refused for its content: a retry cannot succeed.
    Refused(String),
}

pub struct RecordWriter {
    store: Arc<dyn ExperimentStore>,
    timeout: Duration,
    retry: Duration,
    capacity: usize,
    pending: Mutex<VecDeque<Record>>,
    /// One flush at a time (the background task, or shutdown's).
    flushing: tokio::sync::Mutex<()>,
    pending_gauge: IntGauge,
    failures: IntCounter,
    dropped: IntCounter,
}

impl RecordWriter {
    pub fn new(
        store: Arc<dyn ExperimentStore>,
        cfg: &StorageConfig,
        metrics: &Metrics,
    ) -> RecordWriter {
        RecordWriter {
            store,
            timeout: Duration::from_secs_f64(cfg.timeout_secs),
            retry: Duration::from_secs_f64(cfg.retry_secs),
            capacity: cfg.retry_buffer,
            pending: Mutex::new(VecDeque::new()),
            flushing: tokio::sync::Mutex::new(()),
            pending_gauge: metrics.storage_pending_records.clone(),
            failures: metrics.storage_write_failures.clone(),
            dropped: metrics.storage_dropped_records.clone(),
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Record>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn pending(&self) -> usize {
        self.queue().len()
    }

    async fn try_write(&self, r: &Record) -> Result<(), Failure> {
        match tokio::time::timeout(self.timeout, self.store.record(r)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) if e.is_permanent() => Err(Failure::Refused(e.to_string())),
            Ok(Err(e)) => Err(Failure::Later(e.to_string())),
            Err(_) => Err(Failure::Later(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        }
    }

    fn refused(&self, r: &Record, why: &str) {
        self.failures.inc();
        self.dropped.inc();
        tracing::error!(
            experiment = %r.experiment,
            error = why,
            dropped_total = self.dropped.get(),
            "the database refused an experiment record for what it holds: dropped (a retry cannot succeed)"
        );
    }

    /// Write `r` now, or keep it for retry.
    pub async fn write(&self, r: Record) {
        if self.pending() == 0 {
            match self.try_write(&r).await {
                Ok(()) => return,
                Err(Failure::Refused(e)) => return self.refused(&r, &e),
                Err(Failure::Later(e)) => {
                    self.failures.inc();
                    tracing::warn!(experiment = %r.experiment, error = %e, "experiment record not stored now; kept for retry");
                }
            }
        }
        self.keep(r);
    }

    fn keep(&self, r: Record) {
        let mut q = self.queue();
        if q.len() >= self.capacity {
            q.pop_front();
            self.dropped.inc();
            tracing::error!(
                dropped_total = self.dropped.get(),
                capacity = self.capacity,
                "experiment retry buffer full: dropped its oldest record"
            );
        }
        q.push_back(r);
        self.pending_gauge.set(q.len() as i64);
    }

    /// Write what is pending, oldest first, until the database fails again; returns how many
    /// were written.
    pub async fn flush(&self) -> usize {
        let _one = self.flushing.lock().await;
        let mut written = 0;
        loop {
            let Some(next) = self.queue().front().cloned() else {
                break;
            };
            match self.try_write(&next).await {
                Ok(()) => written += 1,
                Err(Failure::Refused(e)) => self.refused(&next, &e),
                Err(Failure::Later(e)) => {
                    self.failures.inc();
                    tracing::debug!(error = %e, pending = self.pending(), "experiment records still waiting for the database");
                    break;
                }
            }
            let mut q = self.queue();
            // Idempotent writes make a record written twice harmless; still, take off only the
            // one written (a full buffer may have dropped it meanwhile).
            if q.front().is_some_and(|f| f.request_id == next.request_id) {
                q.pop_front();
            }
            self.pending_gauge.set(q.len() as i64);
        }
        if written > 0 {
            tracing::info!(
                records = written,
                pending = self.pending(),
                "stored experiment records that had waited for the database"
            );
        }
        written
    }

    /// Retry pending records for as long as the server runs.
    pub async fn run(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.retry).await;
            if self.pending() > 0 {
                self.flush().await;
            }
        }
    }

    /// At shutdown: one last try (for at most [`FINISH_WITHIN`]), then say what could not be
    /// stored.
    pub async fn finish(&self) {
        if self.pending() == 0 {
            return;
        }
        let _ = tokio::time::timeout(FINISH_WITHIN, self.flush()).await;
        let left = self.pending();
        if left > 0 {
            tracing::error!(
                records = left,
                "experiment records not stored at shutdown: the database did not take them"
            );
        }
    }
}
