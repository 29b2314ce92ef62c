//! The quality gate between computing and publishing: the lake must be
//! reconciled with Kafka ([`crate::reconcile`]), and every relation a run
//! computed is checked ([`crate::quality`]) against the last published
//! run; a failure is recorded on the run and nothing is published.

use std::collections::BTreeMap;

use sqlx::{AssertSqlSafe, PgPool};

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
    let whole = published_rows(pool, computed).await?;
    let targets: Vec<Target<'_>> = computed
        .iter()
        .map(|c| match c.relation {
            Relation::View(v) => Target::view(v, &c.batches),
            Relation::Table(t) => Target::table(t, &c.batches),
        })
        .collect();
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
    let stored: Option<(i64, String)> =
        sqlx::query_as("SELECT accepted, reason FROM ops.lake_reconciliation").fetch_optional(pool).await?;
    let (before, why) = match stored {
        Some(kept) => kept,
        None => {
            // The first account. A deployment that published before kept
            // no ledger then: what its lake misses now is where it starts.
            let older: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM ops.batch_runs WHERE status = 'published')")
                    .fetch_one(pool)
                    .await?;
            if older && unaccounted > 0 {
                tracing::warn!(
                    missing = unaccounted,
                    "the lake misses records from before reconciliation began; accepted"
                );
                (unaccounted, "what the lake missed when reconciliation began".to_string())
            } else {
                (0, "a lake reconciled from its start".to_string())
            }
        }
    };
    let (accepted, reason) = match accept {
        Some(reason) if unaccounted > before => {
            tracing::warn!(missing = unaccounted, accepted = before, %reason, "the lake's loss accepted by the operator");
            (unaccounted, reason.to_string())
        }
        _ if (0..before).contains(&unaccounted) => {
            tracing::info!(missing = unaccounted, accepted = before, "the lake misses fewer records than accepted");
            (unaccounted, "the lake misses fewer records".to_string())
        }
        _ => (before, why),
    };
    sqlx::query(
        "INSERT INTO ops.lake_reconciliation AS r
             (accepted, reason, checked_at, delta_version, unaccounted, account)
         VALUES ($1, $2, now(), $3, $4, $5)
         ON CONFLICT (singleton) DO UPDATE SET
             accepted = EXCLUDED.accepted, reason = EXCLUDED.reason,
             accepted_at = CASE WHEN r.accepted = EXCLUDED.accepted THEN r.accepted_at ELSE now() END,
             checked_at = now(), delta_version = EXCLUDED.delta_version,
             unaccounted = EXCLUDED.unaccounted, account = EXCLUDED.account",
    )
    .bind(accepted)
    .bind(&reason)
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

/// The rows each relation the run replaces whole holds now, as readers
/// see it: the row-count check's baseline. Counted here, before the
/// publish, and only for those relations (a full run's views, the batch
/// tables due), whose whole contents the run recomputes anyway; the
/// relations an incremental run extends are not counted.
async fn published_rows(pool: &PgPool, computed: &[Computed]) -> Result<BTreeMap<String, u64>, RunError> {
    let mut rows = BTreeMap::new();
    for c in computed.iter().filter(|c| c.replaces_all()) {
        let n: i64 =
            sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM batch.{}", c.name))).fetch_one(pool).await?;
        rows.insert(c.name.to_string(), n.max(0) as u64);
    }
    Ok(rows)
}
