//! `batch-layer schedule`: `run` on a fixed period aligned to the clock, or
//! at the times of a cron expression.
//!
//! With a period, runs start at the next multiple of the period since the
//! Unix epoch (an hourly schedule runs at :00); with a cron expression, at
//! its next match in UTC. Runs happen one after another, never two at once (and
//! the run lock also keeps a manual run from overlapping). SIGTERM or
//! SIGINT stops the schedule between runs; a run in progress finishes
//! first, since a run publishes atomically or not at all.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::recompute::{self, RunConfig, RunOutcome};

/// The next start strictly after `now` for `period`.
pub fn next_start(now: DateTime<Utc>, period: Duration) -> DateTime<Utc> {
    let period_ms = period.as_millis().max(1) as i64;
    let now_ms = now.timestamp_millis();
    let next = (now_ms.div_euclid(period_ms) + 1) * period_ms;
    DateTime::from_timestamp_millis(next).unwrap_or(now)
}

/// When runs start.
#[derive(Debug, Clone)]
pub enum Timing {
    /// Every period, aligned to the clock.
    Every(Duration),
    /// At each match of a cron expression, in UTC.
    Cron(Box<croner::Cron>),
}

impl Timing {
    /// The next start strictly after `now`.
    pub fn next(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Timing::Every(period) => next_start(now, *period),
            // An expression that never matches again leaves the schedule idle
            // for a year rather than spinning.
            Timing::Cron(cron) => cron.find_next_occurrence(&now, false).unwrap_or(now + chrono::TimeDelta::days(366)),
        }
    }
}

impl std::fmt::Display for Timing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Timing::Every(period) => write!(f, "every {}", humantime::format_duration(*period)),
            Timing::Cron(cron) => write!(f, "cron \"{}\" (UTC)", cron.pattern),
        }
    }
}

/// Runs until `shutdown`. `ready` (its `/readyz`) is set once the last
/// published state is known and after every run that did not fail, and
/// cleared by a failed run; the metrics are the batch layer's:
/// `batch_runs_total{outcome}`, `batch_run_seconds{phase}`,
/// `batch_rows_published{table}`, `batch_cut_offset{partition}`,
/// `batch_fold_pending{view}` (1 while a view's new records are left to the
/// speed layer, see [`RunConfig::fold_every`]) and
/// `batch_last_success_timestamp_seconds`; after runs, at most once per
/// `maintenance.every`, the lake's maintenance (`batch_maintain_runs_total`,
/// `batch_maintain_seconds`, `batch_lake_files{table}`).
pub async fn run(
    config: RunConfig,
    timing: Timing,
    maintenance: Option<Maintenance>,
    pool: &sqlx::PgPool,
    ready: platform::ops_http::Readiness,
    shutdown: CancellationToken,
) {
    tracing::info!(schedule = %timing, "batch schedule started");
    record_last_published(pool).await;
    ready.set(true);
    let mut maintained: Option<std::time::Instant> = None;
    loop {
        let start = timing.next(Utc::now());
        tracing::info!(next_run = %start.to_rfc3339(), "waiting for the next batch run");
        let wait = (start - Utc::now()).to_std().unwrap_or_default();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
        let began = std::time::Instant::now();
        let outcome = recompute::run(&config).await;
        record(&outcome);
        ready.set(!matches!(outcome, Err(_) | Ok(RunOutcome::Rejected { .. })));
        match outcome {
            Ok(RunOutcome::Published { run_id, delta_version, rows, .. }) => {
                tracing::info!(
                    run_id,
                    delta_version,
                    ?rows,
                    secs = began.elapsed().as_secs_f64(),
                    "batch run published"
                );
            }
            Ok(RunOutcome::Unchanged { delta_version }) => {
                tracing::info!(delta_version, "batch run: lake unchanged, nothing published");
            }
            Ok(RunOutcome::Rejected { run_id, report }) => {
                tracing::error!(run_id, failures = %report.summary(), "batch run failed its quality checks; last good views keep serving");
            }
            Ok(RunOutcome::Busy) => tracing::warn!("batch run skipped: another run holds the lock"),
            Err(e) => tracing::error!(error = %e, "batch run failed; last good views keep serving"),
        }
        let due = maintenance.as_ref().filter(|m| maintained.is_none_or(|at| at.elapsed() >= m.every));
        if let Some(m) = due.filter(|_| !shutdown.is_cancelled()) {
            maintain(&m.config, pool).await;
            maintained = Some(std::time::Instant::now());
        }
        if shutdown.is_cancelled() {
            break;
        }
    }
    tracing::info!("batch schedule stopped");
}

/// The lake maintenance `schedule` runs after a run, at most once per
/// `every`.
#[derive(Debug, Clone)]
pub struct Maintenance {
    pub config: crate::maintain::MaintainConfig,
    pub every: std::time::Duration,
}

/// One maintenance; a failure is logged and counted, and the next one
/// tries again (a compaction that met a concurrent commit, for one).
async fn maintain(config: &crate::maintain::MaintainConfig, pool: &sqlx::PgPool) {
    let began = std::time::Instant::now();
    let outcome = crate::maintain::maintain(config, pool, Utc::now()).await;
    metrics::histogram!("batch_maintain_seconds").record(began.elapsed().as_secs_f64());
    let label = if outcome.is_ok() { "done" } else { "failed" };
    metrics::counter!("batch_maintain_runs_total", "outcome" => label).increment(1);
    if let Err(e) = outcome {
        tracing::error!(error = %e, "lake maintenance failed; the next one tries again");
    }
}

/// The metrics of one run's outcome.
fn record(outcome: &Result<RunOutcome, recompute::RunError>) {
    let label = match outcome {
        Ok(RunOutcome::Published { .. }) => "published",
        Ok(RunOutcome::Unchanged { .. }) => "unchanged",
        Ok(RunOutcome::Rejected { .. }) => "rejected",
        Ok(RunOutcome::Busy) => "busy",
        Err(_) => "failed",
    };
    metrics::counter!("batch_runs_total", "outcome" => label).increment(1);
    let now = Utc::now().timestamp_millis() as f64 / 1000.0;
    match outcome {
        Ok(RunOutcome::Published {
            cut,
            rows,
            deferred,
            prepare_ms,
            compute_ms,
            check_ms,
            publish_ms,
            total_ms,
            ..
        }) => {
            let phases = [
                ("prepare", prepare_ms),
                ("compute", compute_ms),
                ("check", check_ms),
                ("publish", publish_ms),
                ("total", total_ms),
            ];
            for (phase, ms) in phases {
                metrics::histogram!("batch_run_seconds", "phase" => phase).record(*ms as f64 / 1000.0);
            }
            for (table, n) in rows {
                metrics::gauge!("batch_rows_published", "table" => table.clone()).set(*n as f64);
            }
            for (p, o) in cut.iter() {
                metrics::gauge!("batch_cut_offset", "partition" => p.0.to_string()).set(o.0 as f64);
            }
            record_pending_folds(deferred);
            metrics::gauge!("batch_last_success_timestamp_seconds").set(now);
        }
        Ok(RunOutcome::Unchanged { .. }) => metrics::gauge!("batch_last_success_timestamp_seconds").set(now),
        _ => {}
    }
}

/// At start, the last successful run's time and the published cut, so a
/// restarted scheduler does not report "never" until its first run.
async fn record_last_published(pool: &sqlx::PgPool) {
    let last: Option<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM max(finished_at))::float8 FROM ops.batch_runs WHERE status IN ('published', 'unchanged')",
    )
    .fetch_one(pool)
    .await
    .ok()
    .flatten();
    if let Some(at) = last {
        metrics::gauge!("batch_last_success_timestamp_seconds").set(at);
    }
    let cut: Vec<(i32, i64)> =
        sqlx::query_as("SELECT kafka_partition, cut_offset FROM ops.cut").fetch_all(pool).await.unwrap_or_default();
    for (p, o) in cut {
        metrics::gauge!("batch_cut_offset", "partition" => p.to_string()).set(o as f64);
    }
    let pending: Vec<String> =
        sqlx::query_scalar("SELECT view_name FROM ops.view_folds").fetch_all(pool).await.unwrap_or_default();
    record_pending_folds(&pending);
}

/// `batch_fold_pending{view}` of every view whose fold may wait: 1 for
/// those in `pending`, 0 for the others.
fn record_pending_folds(pending: &[impl AsRef<str>]) {
    for view in shared_schema::views::all().iter().filter(|v| v.mergeable_by_upsert()) {
        let waits = pending.iter().any(|p| p.as_ref() == view.name);
        metrics::gauge!("batch_fold_pending", "view" => view.name).set(if waits { 1.0 } else { 0.0 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn starts_align_to_the_clock() {
        let t = Utc.with_ymd_and_hms(2026, 11, 26, 13, 20, 5).unwrap();
        assert_eq!(next_start(t, Duration::from_secs(3600)), Utc.with_ymd_and_hms(2026, 11, 26, 14, 0, 0).unwrap());
        assert_eq!(next_start(t, Duration::from_secs(900)), Utc.with_ymd_and_hms(2026, 11, 26, 13, 30, 0).unwrap());
        let on_the_hour = Utc.with_ymd_and_hms(2026, 11, 26, 14, 0, 0).unwrap();
        assert_eq!(next_start(on_the_hour, Duration::from_secs(3600)), on_the_hour + chrono::TimeDelta::hours(1));
    }

    #[test]
    fn cron_expressions_give_their_next_match_in_utc() {
        let t = Utc.with_ymd_and_hms(2026, 11, 26, 13, 20, 5).unwrap();
        let at = |expr: &str| Timing::Cron(Box::new(expr.parse().unwrap())).next(t);
        assert_eq!(at("5 * * * *"), Utc.with_ymd_and_hms(2026, 11, 26, 14, 5, 0).unwrap());
        assert_eq!(at("*/15 * * * *"), Utc.with_ymd_and_hms(2026, 11, 26, 13, 30, 0).unwrap());
        assert_eq!(at("0 2 * * *"), Utc.with_ymd_and_hms(2026, 11, 27, 2, 0, 0).unwrap());
        assert!("61 * * * *".parse::<croner::Cron>().is_err());
    }
}
