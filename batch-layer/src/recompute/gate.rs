//! The quality gate between computing and publishing: the lake must be
//! reconciled with Kafka ([`crate::reconcile`]), and every relation a run
//! computed is checked ([`crate::quality`]) against the last published
//! run; a failure is recorded on the run and nothing is published.

use std::collections::BTreeMap;

use sqlx::PgPool;

use super::RunError;
use super::compute::{Computed, Relation};
use crate::quality::{self, Failure, QualityReport, Target};
use crate::reconcile::{self, Reconciliation};

/// Checks what the run computed. `Ok(report)` whether it passed or not; a
/// failed report has already been recorded on run `run_id`.
pub(crate) async fn check(
    pool: &PgPool,
    run_id: i64,
    computed: &[Computed],
    max_shrink: f64,
) -> Result<QualityReport, RunError> {
    let previous = previous_rows(pool).await?;
    let targets: Vec<Target<'_>> = computed
        .iter()
        .map(|c| match c.relation {
            Relation::View(v) => Target::view(v, &c.batches),
            Relation::Table(t) => Target::table(t, &c.batches),
        })
        .collect();
    // The row-count check compares whole tables, so only replaced ones take part.
    let whole: BTreeMap<String, u64> =
        previous.into_iter().filter(|(name, _)| computed.iter().any(|c| c.name == name && c.replaces_all())).collect();
    let report = quality::check(&targets, &whole, max_shrink, chrono::Utc::now());
    reject(pool, run_id, &report).await?;
    Ok(report)
}

/// Records a failed `report` on run `run_id` (nothing for a passed one).
async fn reject(pool: &PgPool, run_id: i64, report: &QualityReport) -> Result<(), RunError> {
    if !report.passed() {
        sqlx::query(
            "UPDATE ops.batch_runs SET status = 'rejected', finished_at = now(), message = $2 WHERE run_id = $1",
        )
        .bind(run_id)
        .bind(report.summary())
        .execute(pool)
        .await?;
        tracing::error!(run_id, failures = %report.summary(), "quality checks failed; nothing published");
    }
    Ok(())
}

/// Judges the lake's account against what the deployment accepts as
/// missing, records it, and fails the run when the lake misses more (or
/// holds a row twice). `accept` raises what is accepted to what is missing
/// now; a lake that misses less than accepted lowers it.
pub(crate) async fn reconciled(
    pool: &PgPool,
    run_id: i64,
    account: &Reconciliation,
    accept: Option<&str>,
) -> Result<QualityReport, RunError> {
    let unaccounted = account.unaccounted();
    metrics::gauge!("batch_lake_unaccounted_records").set(unaccounted as f64);
    let stored: Option<i64> =
        sqlx::query_scalar("SELECT accepted FROM ops.lake_reconciliation").fetch_optional(pool).await?;
    let mut accepted = match stored {
        Some(a) => a,
        None => {
            // The first account. A deployment that published before kept
            // no ledger then: what its lake misses now is where it starts.
            let older: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM ops.batch_runs WHERE status = 'published')")
                    .fetch_one(pool)
                    .await?;
            let (start, reason) = if older {
                (unaccounted.max(0), "what the lake missed when reconciliation began")
            } else {
                (0, "a lake reconciled from its start")
            };
            sqlx::query(
                "INSERT INTO ops.lake_reconciliation (accepted, reason) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .bind(start)
            .bind(reason)
            .execute(pool)
            .await?;
            if start > 0 {
                tracing::warn!(missing = start, "the lake misses records from before reconciliation began; accepted");
            }
            start
        }
    };
    let raise = accept.filter(|_| unaccounted > accepted);
    if let Some(reason) = raise {
        tracing::warn!(missing = unaccounted, accepted, %reason, "the lake's loss accepted by the operator");
        accepted = unaccounted;
    } else if (0..accepted).contains(&unaccounted) {
        tracing::info!(missing = unaccounted, accepted, "the lake misses fewer records than accepted");
        accepted = unaccounted;
    }
    sqlx::query(
        "UPDATE ops.lake_reconciliation SET
             accepted = $1,
             accepted_at = CASE WHEN accepted = $1 THEN accepted_at ELSE now() END,
             reason = COALESCE($2, CASE WHEN accepted = $1 THEN reason ELSE 'the lake misses fewer records' END),
             checked_at = now(), delta_version = $3, unaccounted = $4, account = $5",
    )
    .bind(accepted)
    .bind(raise)
    .bind(account.delta_version)
    .bind(unaccounted)
    .bind(serde_json::to_value(account).unwrap_or_default())
    .execute(pool)
    .await?;
    let mut report = QualityReport::default();
    if reconcile::judge(unaccounted, accepted) == reconcile::Verdict::Broken {
        report.failures.push(Failure {
            view: "events",
            check: "lake_reconciliation",
            detail: format!(
                "{}{}; repair the lake (OPERATIONS.md, \"Recovery\") or, if the records are gone for good, \
                 `batch-layer run --accept-lake-loss REASON`",
                account.detail(),
                if accepted > 0 { format!(" ({accepted} accepted as lost before)") } else { String::new() }
            ),
        });
    }
    reject(pool, run_id, &report).await?;
    Ok(report)
}

/// Rows per relation after the last published run.
async fn previous_rows(pool: &PgPool) -> Result<BTreeMap<String, u64>, RunError> {
    let rows: Option<serde_json::Value> = sqlx::query_scalar(
        "SELECT rows_per_view FROM ops.batch_runs WHERE status = 'published' ORDER BY run_id DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await?
    .flatten();
    Ok(rows.and_then(|v| serde_json::from_value(v).ok()).unwrap_or_default())
}
