//! Data-quality gate of a batch run: nothing is published unless every
//! check passes, so a bad batch can never replace good views.
//!
//! Checks, per computed view: no null key; no negative additive measure
//! (money, counts); no hour in the future; and the row count has not
//! collapsed against the last published run.

use std::collections::BTreeMap;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Int64Type, TimeUnit, TimestampMicrosecondType};
use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;
use shared_schema::views::{Merge, ViewDef};

/// One failed check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    pub view: &'static str,
    pub check: &'static str,
    pub detail: String,
}

/// The result of all checks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct QualityReport {
    pub failures: Vec<Failure>,
}

impl QualityReport {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    pub fn summary(&self) -> String {
        self.failures.iter().map(|f| format!("{}: {} ({})", f.view, f.check, f.detail)).collect::<Vec<_>>().join("; ")
    }
}

/// Runs every check over the computed views.
pub fn check(
    computed: &[(&'static ViewDef, &[RecordBatch])],
    previous_rows: &BTreeMap<String, u64>,
    max_shrink: f64,
    now: DateTime<Utc>,
) -> QualityReport {
    let mut failures = Vec::new();
    let horizon = (now + TimeDelta::hours(1)).timestamp_micros();
    for (view, batches) in computed {
        let mut fail = |check: &'static str, detail: String| failures.push(Failure { view: view.name, check, detail });
        let mut null_keys = 0;
        let mut negative = 0;
        let mut future = 0;
        for b in batches.iter() {
            for key in view.keys {
                if let Some(col) = b.column_by_name(key.name) {
                    null_keys += col.null_count();
                    if let DataType::Timestamp(TimeUnit::Microsecond, _) = col.data_type() {
                        future += col
                            .as_primitive::<TimestampMicrosecondType>()
                            .iter()
                            .flatten()
                            .filter(|t| *t > horizon)
                            .count();
                    }
                }
            }
            for m in view.measures.iter().filter(|m| m.merge == Merge::Sum) {
                if let Some(col) = b.column_by_name(m.name)
                    && col.data_type() == &DataType::Int64
                {
                    negative += col.as_primitive::<Int64Type>().iter().flatten().filter(|v| *v < 0).count();
                }
            }
        }
        if null_keys > 0 {
            fail("null_keys", format!("{null_keys} rows with a null key"));
        }
        if negative > 0 {
            fail("negative_measures", format!("{negative} negative values in additive measures"));
        }
        if future > 0 {
            fail("future_times", format!("{future} hours more than 1 hour in the future"));
        }
        let rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
        if let Some(&before) = previous_rows.get(view.name)
            && before > 0
            && (rows as f64) < (before as f64) * (1.0 - max_shrink)
        {
            fail("row_count", format!("{rows} rows, last published run had {before}"));
        }
    }
    QualityReport { failures }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray, TimestampMicrosecondArray};
    use arrow::datatypes::{Field, Schema};
    use shared_schema::views::PRODUCT_DEMAND_HOURLY;
    use std::sync::Arc;

    fn batch(hours: Vec<Option<i64>>, products: Vec<Option<&str>>, revenue: Vec<i64>) -> RecordBatch {
        let n = revenue.len();
        let mut fields = vec![
            Field::new("hour", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), true),
            Field::new("product_id", DataType::Utf8, true),
        ];
        let mut cols: Vec<Arc<dyn Array>> = vec![
            Arc::new(TimestampMicrosecondArray::from(hours).with_timezone("UTC")),
            Arc::new(StringArray::from(products)),
        ];
        for m in PRODUCT_DEMAND_HOURLY.measures {
            fields.push(Field::new(m.name, DataType::Int64, true));
            let values = if m.name == "revenue_cents" { revenue.clone() } else { vec![1; n] };
            cols.push(Arc::new(Int64Array::from(values)));
        }
        RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap()
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    #[test]
    fn good_batch_passes() {
        let b = batch(vec![Some(0)], vec![Some("p")], vec![5]);
        let report = check(&[(&PRODUCT_DEMAND_HOURLY, &[b][..])], &BTreeMap::new(), 0.5, now());
        assert!(report.passed(), "{}", report.summary());
    }

    #[test]
    fn each_check_names_its_failure() {
        let future = now().timestamp_micros() + 2 * 3_600_000_000;
        let b = batch(vec![None, Some(future)], vec![Some("p"), None], vec![-1, 3]);
        let prev = BTreeMap::from([("product_demand_hourly".to_string(), 10)]);
        let report = check(&[(&PRODUCT_DEMAND_HOURLY, &[b][..])], &prev, 0.5, now());
        let checks: Vec<_> = report.failures.iter().map(|f| f.check).collect();
        assert_eq!(checks, ["null_keys", "negative_measures", "future_times", "row_count"]);
    }
}
