//! After a publish: the complete hours not checked yet are judged
//! ([`crate::findings`]), recorded in `ops.quality_hours`, and notified,
//! one notification per kind and run. Nothing here fails the run.

use std::collections::BTreeMap;

use arrow::array::AsArray;
use arrow::datatypes::{Int64Type, TimestampMicrosecondType};
use datafusion::prelude::SessionContext;
use deltalake::DeltaTable;
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
    events: &DeltaTable,
    thresholds: Thresholds,
    notifier: &Notifier,
) -> anyhow::Result<Vec<HourCheck>> {
    let files = LakeFiles::from_snapshot(crate::lake::EVENTS_TABLE, events).await?;
    let Some(volume) = findings::hourly_volume(&files) else {
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
        let (with_product, unknown) = match &products {
            Some(p) => {
                let (n, u) = p.get(&hour).copied().unwrap_or((0, 0));
                (Some(n), Some(u))
            }
            None => (None, None),
        };
        let unknown_finding = match (with_product, unknown) {
            (Some(n), Some(u)) => findings::judge_unknown(n, u, thresholds.max_unknown_products),
            _ => None,
        };
        checks.push(HourCheck {
            hour: hour.start(),
            events: volume.get(&hour).copied().unwrap_or(0),
            baseline,
            with_product,
            unknown_products: unknown,
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
    let known: i64 = {
        let b = ctx.sql("SELECT count(*) AS n FROM products").await?.collect().await?;
        b.first().map_or(0, |b| {
            arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Int64)
                .map_or(0, |c| c.as_primitive::<Int64Type>().value(0))
        })
    };
    if known == 0 {
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
        let hours: Vec<String> = hit.iter().map(|c| c.hour.format("%Y-%m-%d %H:00Z").to_string()).collect();
        let summary = match finding {
            Finding::MissingHour => format!(
                "No events in {} (traffic around it, or its usual level, says there should be)",
                hours.join(", ")
            ),
            Finding::VolumeDrop => format!(
                "Events fell below {:.0}% of the usual level in {}",
                thresholds.volume_floor * 100.0,
                hit.iter()
                    .map(|c| format!(
                        "{} ({} events, usually {:.0})",
                        c.hour.format("%Y-%m-%d %H:00Z"),
                        c.events,
                        c.baseline.unwrap_or_default()
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Finding::UnknownProducts => format!(
                "More than {:.1}% of the events name products the catalog does not know in {}",
                thresholds.max_unknown_products * 100.0,
                hit.iter()
                    .map(|c| format!(
                        "{} ({} of {})",
                        c.hour.format("%Y-%m-%d %H:00Z"),
                        c.unknown_products.unwrap_or_default(),
                        c.with_product.unwrap_or_default()
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        notifier.send(Notification::new(finding.kind(), Severity::Warning, summary, json!({"hours": hit})));
    }
}
