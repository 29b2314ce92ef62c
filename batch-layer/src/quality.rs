//! Data-quality gate of a batch run: nothing is published unless every
//! check passes, so a bad batch can never replace good views.
//!
//! Checks, per computed view or batch table: no null key; no negative
//! additive measure (money, counts, scores); no key time in the future; and
//! the row count has not collapsed against the last published run.

use std::collections::BTreeMap;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float64Type, Int64Type, TimeUnit, TimestampMicrosecondType};
use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;
use shared_schema::derived::BatchTable;
use shared_schema::views::{Merge, ViewDef};

/// What the gate checks of one computed relation.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    pub name: &'static str,
    pub keys: Vec<&'static str>,
    /// Columns that may never be negative.
    pub non_negative: Vec<&'static str>,
    pub batches: &'a [RecordBatch],
}

impl<'a> Target<'a> {
    /// A view: its keys; its counts must not be negative, nor the sums of
    /// the shipped views (quantities and prices, which the event contract
    /// keeps positive). A sum in a view file may be negative by design.
    pub fn view(view: &ViewDef, batches: &'a [RecordBatch]) -> Self {
        let shipped = shared_schema::views::builtin().iter().any(|b| b.name == view.name);
        let additive =
            view.measures.iter().filter(|m| m.merge == Merge::Sum && (shipped || m.expr == "1")).map(|m| m.name);
        Self { name: view.name, keys: view.key_names().collect(), non_negative: additive.collect(), batches }
    }

    pub fn table(table: &BatchTable, batches: &'a [RecordBatch]) -> Self {
        Self { name: table.name, keys: table.key_names().collect(), non_negative: table.non_negative.to_vec(), batches }
    }
}

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

/// Runs every check over the computed relations.
pub fn check(
    computed: &[Target<'_>],
    previous_rows: &BTreeMap<String, u64>,
    max_shrink: f64,
    now: DateTime<Utc>,
) -> QualityReport {
    let mut failures = Vec::new();
    let horizon = (now + TimeDelta::hours(1)).timestamp_micros();
    for target in computed {
        let mut fail =
            |check: &'static str, detail: String| failures.push(Failure { view: target.name, check, detail });
        let mut null_keys = 0;
        let mut negative = 0;
        let mut future = 0;
        for b in target.batches {
            for key in &target.keys {
                if let Some(col) = b.column_by_name(key) {
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
            for col in target.non_negative.iter().filter_map(|name| b.column_by_name(name)) {
                negative += match col.data_type() {
                    DataType::Int64 => col.as_primitive::<Int64Type>().iter().flatten().filter(|v| *v < 0).count(),
                    DataType::Float64 => {
                        col.as_primitive::<Float64Type>().iter().flatten().filter(|v| *v < 0.0 || v.is_nan()).count()
                    }
                    _ => 0,
                };
            }
        }
        if null_keys > 0 {
            fail("null_keys", format!("{null_keys} rows with a null key"));
        }
        if negative > 0 {
            fail("negative_measures", format!("{negative} negative or NaN values where none may be"));
        }
        if future > 0 {
            fail("future_times", format!("{future} hours more than 1 hour in the future"));
        }
        let rows: u64 = target.batches.iter().map(|b| b.num_rows() as u64).sum();
        if let Some(&before) = previous_rows.get(target.name)
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
    use shared_schema::views::product_demand_hourly;
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
        for m in product_demand_hourly().measures {
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
        let report = check(&[Target::view(product_demand_hourly(), &[b])], &BTreeMap::new(), 0.5, now());
        assert!(report.passed(), "{}", report.summary());
    }

    #[test]
    fn each_check_names_its_failure() {
        let future = now().timestamp_micros() + 2 * 3_600_000_000;
        let b = batch(vec![None, Some(future)], vec![Some("p"), None], vec![-1, 3]);
        let prev = BTreeMap::from([("product_demand_hourly".to_string(), 10)]);
        let report = check(&[Target::view(product_demand_hourly(), &[b])], &prev, 0.5, now());
        let checks: Vec<_> = report.failures.iter().map(|f| f.check).collect();
        assert_eq!(checks, ["null_keys", "negative_measures", "future_times", "row_count"]);
    }

    #[test]
    fn batch_table_scores_must_not_be_negative_or_nan() {
        use shared_schema::derived::ITEM_SIMILARITY;
        let fields: Vec<Field> = ITEM_SIMILARITY
            .columns
            .iter()
            .map(|(n, t)| {
                let ty = match t {
                    shared_schema::views::SqlType::Double => DataType::Float64,
                    shared_schema::views::SqlType::BigInt => DataType::Int64,
                    _ => DataType::Utf8,
                };
                Field::new(*n, ty, true)
            })
            .collect();
        let cols: Vec<Arc<dyn Array>> = vec![
            Arc::new(StringArray::from(vec!["a", "b"])),
            Arc::new(StringArray::from(vec!["b", "a"])),
            Arc::new(arrow::array::Float64Array::from(vec![0.5, f64::NAN])),
            Arc::new(Int64Array::from(vec![1, 1])),
        ];
        let b = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap();
        let report = check(&[Target::table(&ITEM_SIMILARITY, &[b])], &BTreeMap::new(), 0.5, now());
        assert_eq!(report.summary(), "item_similarity: negative_measures (1 negative or NaN values where none may be)");
    }
}
