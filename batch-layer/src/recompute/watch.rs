//! After a publish: the complete hours not checked yet are judged
//! ([`crate::findings`]), recorded in `ops.quality_hours`, and notified,
//! one notification per kind and run. Nothing here fails the run.

use std::collections::BTreeMap;

use arrow::array::AsArray;
use arrow::datatypes::{Int64Type, TimestampMicrosecondType};
use datafusion::prelude::SessionContext;
use platform::notify::{Notification, Notifier, Severity};
use serde_json::json;
use shared_schema::schema::Hour;
use sqlx::PgPool;

use crate::findings::{self, Finding, HourCheck, Thresholds};
use crate::lake_files::LakeFiles;

/// Checks, records and notifies; returns the hours checked.
pub(crate) async fn hours(
    pool: &PgPool,
    ctx: &SessionContext,
    files: &LakeFiles,
    thresholds: Thresholds,
    notifier: &Notifier,
) -> anyhow::Result<Vec<HourCheck>> {
    let Some(volume) = findings::hourly_volume(files) else {
        tracing::info!("the lake's log has no row counts; hours not checked");
        return Ok(Vec::new());
    };
    let last: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT max(hour) FROM ops.quality_hours").fetch_one(pool).await?;
    let candidates = findings::candidates(&volume, last.map(Hour::of));
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    let products = unknown_products(ctx, &candidates).await?;
    let mut checks = Vec::new();
    for hour in candidates {
        let (baseline, volume_finding) = findings::judge_volume(&volume, hour, thresholds.volume_floor);
        // (events naming a product, those the catalog does not know)
        let counts = products.as_ref().map(|p| p.get(&hour).copied().unwrap_or((0, 0)));
        let unknown_finding = counts.and_then(|(n, u)| findings::judge_unknown(n, u, thresholds.max_unknown_products));
        checks.push(HourCheck {
            hour: hour.start(),
            events: volume.get(&hour).copied().unwrap_or(0),
            baseline,
            with_product: counts.map(|(n, _)| n),
            unknown_products: counts.map(|(_, u)| u),
            findings: volume_finding.into_iter().chain(unknown_finding).collect(),
        });
    }
    let mut tx = pool.begin().await?;
    for c in &checks {
        let kinds: Vec<&str> = c.findings.iter().map(|f| f.kind()).collect();
        sqlx::query(
            "INSERT INTO ops.quality_hours (hour, events, baseline, with_product, unknown_products, findings)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (hour) DO NOTHING",
        )
        .bind(c.hour)
        .bind(c.events as i64)
        .bind(c.baseline)
        .bind(c.with_product.map(|n| n as i64))
        .bind(c.unknown_products.map(|n| n as i64))
        .bind(&kinds)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    notify(&checks, thresholds, notifier);
    Ok(checks)
}

/// Per hour, the events naming a product and those naming one the catalog
/// does not know; `None` when the lake has no catalog.
async fn unknown_products(ctx: &SessionContext, hours: &[Hour]) -> anyhow::Result<Option<BTreeMap<Hour, (u64, u64)>>> {
    if ctx.table("products").await?.count().await? == 0 {
        return Ok(None);
    }
    crate::scope::register_events(ctx, crate::scope::in_hours(hours)).await?;
    let sql = format!(
        "SELECT {} AS hour, count(*) AS n,
                      count(*) FILTER (WHERE p.product_id IS NULL) AS unknown
               FROM events e LEFT JOIN (SELECT DISTINCT product_id FROM products) p ON e.product_id = p.product_id
               WHERE e.product_id IS NOT NULL
               GROUP BY 1",
        shared_schema::views::HOUR_EXPR
    );
    let mut out = BTreeMap::new();
    for b in ctx.sql(&sql).await?.collect().await? {
        let cast = |i: usize, to: &arrow::datatypes::DataType| arrow::compute::cast(b.column(i), to);
        let hour = cast(0, &shared_schema::schema::timestamp_type())?;
        let n = cast(1, &arrow::datatypes::DataType::Int64)?;
        let u = cast(2, &arrow::datatypes::DataType::Int64)?;
        let (hour, n, u) = (
            hour.as_primitive::<TimestampMicrosecondType>(),
            n.as_primitive::<Int64Type>(),
            u.as_primitive::<Int64Type>(),
        );
        for i in 0..b.num_rows() {
            if let Some(t) = chrono::DateTime::from_timestamp_micros(hour.value(i)) {
                out.insert(Hour::of(t), (n.value(i) as u64, u.value(i) as u64));
            }
        }
    }
    Ok(Some(out))
}

fn notify(checks: &[HourCheck], thresholds: Thresholds, notifier: &Notifier) {
    for finding in [Finding::MissingHour, Finding::VolumeDrop, Finding::UnknownProducts] {
        let hit: Vec<&HourCheck> = checks.iter().filter(|c| c.findings.contains(&finding)).collect();
        if hit.is_empty() {
            continue;
        }
        metrics::counter!("batch_quality_findings_total", "kind" => finding.kind()).increment(hit.len() as u64);
        let listed = hit
            .iter()
            .map(|c| {
                let hour = c.hour.format("%Y-%m-%d %H:00Z");
                match finding {
                    Finding::MissingHour => hour.to_string(),
                    Finding::VolumeDrop => {
                        format!("{hour} ({} events, usually {:.0})", c.events, c.baseline.unwrap_or_default())
                    }
                    Finding::UnknownProducts => format!(
                        "{hour} ({} of {})",
                        c.unknown_products.unwrap_or_default(),
                        c.with_product.unwrap_or_default()
                    ),
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let summary = match finding {
            Finding::MissingHour => {
                format!("No events in {listed} (traffic around it, or its usual level, says there should be)")
            }
            Finding::VolumeDrop => {
                format!("Events fell below {:.0}% of the usual level in {listed}", thresholds.volume_floor * 100.0)
            }
            Finding::UnknownProducts => format!(
                "More than {:.1}% of the events name products the catalog does not know in {listed}",
                thresholds.max_unknown_products * 100.0
            ),
        };
        notifier.send(Notification::new(finding.kind(), Severity::Warning, summary, json!({"hours": hit})));
    }
}
