//! The quality gate between computing and publishing: every relation a run
//! computed is checked ([`crate::quality`]) against the last published
//! run; a failure is recorded on the run and nothing is published.

use std::collections::BTreeMap;

use sqlx::PgPool;

use super::RunError;
use super::compute::{Computed, Relation};
use crate::quality::{self, QualityReport, Target};

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
