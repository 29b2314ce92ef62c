//! `batch-layer recover`: the one command that brings the lake and every
//! batch and serving table back after a loss, from what survives.
//!
//! 1. The lake is brought up to Kafka: the ingest reads every partition to
//!    its end from the lake's own positions. An empty lake location (the
//!    lake was lost) is rebuilt from the start of each partition; records
//!    Kafka no longer holds are stepped over as gaps and reported as lost
//!    (the recovery point is what Kafka still had).
//! 2. A full run recomputes every view and batch table from the lake and
//!    publishes them with their cut in one transaction; the lake's
//!    reconciliation with Kafka gates it like any run.
//! 3. The speed layer, started after it (or still running, if PostgreSQL
//!    survived), holds or takes its positions at the cut: it has nothing to
//!    rebuild by hand.
//!
//! The report says what was read, what was lost, and how long each step
//! took: the recovery time of this deployment at its size.

use std::time::Instant;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::ingest::{self, IngestConfig, IngestSummary};
use crate::lake::EVENTS_TABLE;
use crate::recompute::{self, RunConfig, RunOutcome};

#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("bringing the lake up to Kafka: {0}")]
    Ingest(#[from] ingest::IngestError),
    #[error(transparent)]
    Lake(#[from] crate::lake::LakeError),
    #[error("recomputing from the lake: {0}")]
    Run(#[from] recompute::RunError),
    #[error(
        "the full run published nothing: {0}; see OPERATIONS.md \"Data quality\" (a lake that misses records Kafka no longer has: --accept-lake-loss)"
    )]
    Rejected(String),
    #[error("another batch run holds the lock: stop `batch-layer schedule` (and any `run`) while recovering")]
    Busy,
    #[error("stopped before the lake was caught up; nothing published")]
    Stopped,
}

/// What a recovery did.
#[derive(Debug, Clone, Serialize)]
pub struct RecoverReport {
    /// The lake held no events when it started (rebuilt from Kafka).
    pub lake_rebuilt: bool,
    /// Kafka was not read (`--skip-ingest`).
    pub ingest_skipped: bool,
    pub records_read: u64,
    /// Offsets Kafka no longer held (or that never held a record): their
    /// records, if any, are lost.
    pub offsets_stepped_over: u64,
    pub ingest_seconds: f64,
    pub run_id: i64,
    pub rows_published: u64,
    pub run_seconds: f64,
    pub total_seconds: f64,
}

impl RecoverReport {
    pub fn summary(&self) -> String {
        let lake = if self.ingest_skipped {
            "lake taken as it is (Kafka not read)".to_string()
        } else {
            format!(
                "lake {} ({} records read in {:.1} s, {} offsets stepped over)",
                if self.lake_rebuilt { "rebuilt from Kafka" } else { "brought up to Kafka" },
                self.records_read,
                self.ingest_seconds,
                self.offsets_stepped_over
            )
        };
        format!(
            "recovered: {lake}, full run {} published {} rows in {:.1} s; {:.1} s in all. Start (or restart) the speed layer and the services now.",
            self.run_id, self.rows_published, self.run_seconds, self.total_seconds
        )
    }
}

/// Runs the recovery: `ingest` reads until caught up (`None`: the lake is
/// taken as it is), then a full `run`.
pub async fn recover(
    ingest: Option<IngestConfig>,
    run: RunConfig,
    shutdown: CancellationToken,
) -> Result<RecoverReport, RecoverError> {
    let started = Instant::now();
    let lake_rebuilt = match run.lake.open(EVENTS_TABLE).await? {
        Some(t) => t.version().is_none(),
        None => true,
    };
    let ingest_skipped = ingest.is_none();
    let summary = match ingest {
        Some(ingest) => {
            tracing::info!(lake = %ingest.lake.root(), lake_rebuilt, "recovery: bringing the lake up to Kafka");
            let config = IngestConfig { until_caught_up: true, ..ingest };
            let summary = ingest::run(config, shutdown.clone()).await?;
            if shutdown.is_cancelled() {
                return Err(RecoverError::Stopped);
            }
            summary
        }
        None => IngestSummary::default(),
    };
    let ingest_seconds = started.elapsed().as_secs_f64();
    tracing::info!(records = summary.records, gaps = summary.gap_records, "recovery: recomputing every view");
    let run_started = Instant::now();
    let outcome = recompute::run(&RunConfig { full: true, ..run }).await?;
    let (run_id, rows) = match outcome {
        RunOutcome::Published { run_id, rows, .. } => (run_id, rows),
        RunOutcome::Rejected { report, .. } => return Err(RecoverError::Rejected(report.summary())),
        RunOutcome::Busy => return Err(RecoverError::Busy),
        // A full run always runs.
        RunOutcome::Unchanged { .. } => (0, Default::default()),
    };
    Ok(RecoverReport {
        lake_rebuilt,
        ingest_skipped,
        records_read: summary.records,
        offsets_stepped_over: summary.gap_records,
        ingest_seconds,
        run_id,
        rows_published: rows.values().sum(),
        run_seconds: run_started.elapsed().as_secs_f64(),
        total_seconds: started.elapsed().as_secs_f64(),
    })
}
