//! View deltas of one micro-batch, computed by DataFusion from the same
//! view definitions the batch layer executes.
//!
//! Each view's [`ViewDef::speed_sql`] runs over the decoded micro-batch
//! registered as `events`; for views with additive measures the rows are
//! grouped by Kafka partition and offset segment too, which is what lets
//! the serving layer cut them exactly where the batch ends.

use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use shared_schema::cut::SegmentSize;
use shared_schema::schema::{catalog_schema, events_schema};
use shared_schema::views::{Source, ViewDef};

/// The deltas of one view.
#[derive(Debug, Clone)]
pub struct ViewDelta {
    pub view: &'static ViewDef,
    /// Columns in [`ViewDef::speed_columns`] order.
    pub batches: Vec<RecordBatch>,
}

impl ViewDelta {
    pub fn rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }
}

/// The views' plans, made once per set of views: each micro-batch is
/// swapped into the `events` table they scan and only the physical plan is
/// made again, so a flush does not parse, analyse and optimise the views'
/// SQL each time (what group commit's many small flushes would otherwise
/// pay for). Views over the catalog read `products`, the published catalog
/// ([`load_catalog`]), swapped in the same way when it is reloaded.
pub struct Deltas {
    ctx: SessionContext,
    events: Arc<MemTable>,
    products: Arc<MemTable>,
    /// Each view with its optimised logical plan over `events`.
    plans: Vec<(&'static ViewDef, LogicalPlan)>,
}

impl Deltas {
    /// Plans every view of `views` (the registered set).
    pub async fn new(segment_size: SegmentSize, views: &'static [ViewDef]) -> Result<Self, DataFusionError> {
        let ctx = SessionContext::new();
        let events = Arc::new(MemTable::try_new(events_schema(), vec![Vec::new()])?);
        let products = Arc::new(MemTable::try_new(catalog_schema(), vec![Vec::new()])?);
        ctx.register_table("events", Arc::clone(&events) as Arc<dyn datafusion::catalog::TableProvider>)?;
        ctx.register_table("products", Arc::clone(&products) as Arc<dyn datafusion::catalog::TableProvider>)?;
        let mut plans = Vec::new();
        for view in views {
            let plan = ctx.sql(&view.speed_sql(segment_size.get())).await?.into_optimized_plan()?;
            plans.push((view, plan));
        }
        Ok(Self { ctx, events, products, plans })
    }

    /// Whether a view reads the catalog.
    pub fn reads_catalog(&self) -> bool {
        self.plans.iter().any(|(v, _)| v.source == Source::EventsWithCatalog)
    }

    /// Swaps in the catalog the views over it read.
    pub async fn set_catalog(&self, catalog: RecordBatch) {
        *self.products.batches[0].write().await = vec![catalog];
    }

    /// The deltas of every speed view over `events`.
    pub async fn compute(&self, events: RecordBatch) -> Result<Vec<ViewDelta>, DataFusionError> {
        *self.events.batches[0].write().await = vec![events];
        let state = self.ctx.state();
        let mut out = Vec::with_capacity(self.plans.len());
        let mut outcome = Ok(());
        for (view, plan) in &self.plans {
            let physical = match state.query_planner().create_physical_plan(plan, &state).await {
                Ok(p) => p,
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            };
            let collected = datafusion::physical_plan::collect(physical, self.ctx.task_ctx()).await;
            match collected.and_then(|batches| in_key_order(view, &batches)) {
                Ok(batches) => out.push(ViewDelta { view, batches }),
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
        }
        // The micro-batch is not kept past its flush.
        self.events.batches[0].write().await.clear();
        outcome.map(|()| out)
    }
}

/// `batches` as one batch in the order of `speed.<view>`'s primary key, so
/// the upsert walks its B-tree in order instead of at random (the rows come
/// out of DataFusion's grouping in hash order).
fn in_key_order(view: &ViewDef, batches: &[RecordBatch]) -> Result<Vec<RecordBatch>, DataFusionError> {
    let Some(first) = batches.first() else { return Ok(Vec::new()) };
    let rows = arrow::compute::concat_batches(&first.schema(), batches)?;
    let keys: Vec<arrow::compute::SortColumn> = (0..view.speed_key_names().len())
        .map(|i| arrow::compute::SortColumn { values: Arc::clone(rows.column(i)), options: None })
        .collect();
    let order = arrow::compute::lexsort_to_indices(&keys, None)?;
    Ok(vec![arrow::compute::take_record_batch(&rows, &order)?])
}

/// The published catalog (`batch.products`) with the lake's `products`
/// columns; `updated_at`, which views may not read, stays empty.
pub async fn load_catalog(pool: &sqlx::PgPool) -> Result<RecordBatch, CatalogError> {
    use arrow::array::{ArrayRef, Int64Array, StringArray, TimestampMicrosecondArray};
    type Row = (String, Option<String>, Option<String>, Option<i64>, Option<chrono::DateTime<chrono::Utc>>);
    let rows: Vec<Row> =
        sqlx::query_as("SELECT product_id, name, category, price_cents, NULL::timestamptz FROM batch.products")
            .fetch_all(pool)
            .await?;
    let text = |f: fn(&Row) -> Option<&str>| Arc::new(rows.iter().map(f).collect::<StringArray>()) as ArrayRef;
    let columns = vec![
        text(|r| Some(r.0.as_str())),
        text(|r| r.1.as_deref()),
        text(|r| r.2.as_deref()),
        Arc::new(rows.iter().map(|r| r.3).collect::<Int64Array>()) as ArrayRef,
        Arc::new(
            rows.iter()
                .map(|r| r.4.map(|t| t.timestamp_micros()))
                .collect::<TimestampMicrosecondArray>()
                .with_timezone("UTC"),
        ),
    ];
    Ok(RecordBatch::try_new(catalog_schema(), columns)?)
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("reading the published catalog: {0}")]
    Db(#[from] sqlx::Error),
    #[error("the published catalog: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::TimestampMicrosecondType;
    use shared_schema::views::product_demand_hourly;

    /// Events at awkward times: either side of hour and day boundaries,
    /// a leap day, a European clock change, at microsecond precision.
    fn events() -> RecordBatch {
        let times = [
            "2026-11-30T23:59:59.999999Z",
            "2026-12-01T00:00:00Z",
            "2026-12-01T00:00:00.000001Z",
            "2026-12-01T13:30:00Z",
            "2026-03-29T01:30:00Z",
            "2024-02-29T12:00:00.5Z",
        ];
        let json: Vec<String> = times
            .iter()
            .enumerate()
            .map(|(i, t)| {
                format!(
                    r#"{{"event_id":"e{i}","event_type":"page_view","event_time":"{t}","user_id":"u","session_id":"s","product_id":"p","schema_version":1}}"#
                )
            })
            .collect();
        let raw: Vec<shared_schema::RawRecord<'_>> = json
            .iter()
            .enumerate()
            .map(|(i, j)| shared_schema::RawRecord {
                partition: 0,
                offset: i as i64,
                timestamp: None,
                payload: j.as_bytes(),
            })
            .collect();
        let decoded = shared_schema::EventDecoder::new().decode(&raw).unwrap();
        assert!(decoded.rejected.is_empty(), "{:?}", decoded.rejected);
        decoded.batch
    }

    /// Rows come out of DataFusion's grouping in hash order; each view's
    /// deltas reach the upsert in the order of its speed table's key.
    #[tokio::test]
    async fn deltas_come_in_the_order_of_the_speed_key() {
        let json: Vec<String> = (0..400)
            .map(|i| {
                // Users, products, hours and partitions all out of order.
                let (u, p, h) = ((i * 37) % 23, (i * 11) % 17, (i * 7) % 5);
                format!(
                    r#"{{"event_id":"e{i}","event_type":"page_view","event_time":"2026-12-01T{h:02}:00:00Z","user_id":"u{u}","session_id":"s","product_id":"p{p}","schema_version":1}}"#
                )
            })
            .collect();
        let raw: Vec<shared_schema::RawRecord<'_>> = json
            .iter()
            .enumerate()
            .map(|(i, j)| shared_schema::RawRecord {
                partition: (i % 3) as i32,
                offset: (i / 3 * 50) as i64,
                timestamp: None,
                payload: j.as_bytes(),
            })
            .collect();
        let decoded = shared_schema::EventDecoder::new().decode(&raw).unwrap();
        let deltas = Deltas::new(SegmentSize::new(100).unwrap(), shared_schema::views::builtin()).await.unwrap();
        let computed = deltas.compute(decoded.batch).await.unwrap();
        assert!(!computed.is_empty());
        for delta in &computed {
            let keys = delta.view.speed_key_names().len();
            assert_eq!(delta.batches.len(), 1, "{}", delta.view.name);
            let batch = &delta.batches[0];
            assert!(batch.num_rows() > 20, "{}: {} rows", delta.view.name, batch.num_rows());
            let fields = (0..keys).map(|i| arrow::row::SortField::new(batch.column(i).data_type().clone())).collect();
            let rows =
                arrow::row::RowConverter::new(fields).unwrap().convert_columns(&batch.columns()[..keys]).unwrap();
            for i in 1..rows.num_rows() {
                assert!(rows.row(i - 1) < rows.row(i), "{}: row {i} is out of key order", delta.view.name);
            }
        }
    }

    #[tokio::test]
    async fn the_hour_key_is_the_utc_hour_of_the_event_with_the_same_type() {
        let ctx = SessionContext::new();
        ctx.register_table("events", Arc::new(MemTable::try_new(events_schema(), vec![vec![events()]]).unwrap()))
            .unwrap();
        let hour =
            product_demand_hourly().keys.iter().find(|k| Some(k.name) == product_demand_hourly().hour_key).unwrap();
        let sql = format!("SELECT {} AS key, date_trunc('hour', e.event_time) AS truncated FROM events e", hour.expr);
        let batches = ctx.sql(&sql).await.unwrap().collect().await.unwrap();
        let b = &batches[0];
        assert_eq!(b.num_rows(), 6);
        assert_eq!(b.column(0).data_type(), &shared_schema::schema::timestamp_type(), "{}", hour.expr);
        assert_eq!(b.column(0).data_type(), b.column(1).data_type());
        let key = b.column(0).as_primitive::<TimestampMicrosecondType>();
        let truncated = b.column(1).as_primitive::<TimestampMicrosecondType>();
        assert_eq!(key.null_count(), 0);
        assert_eq!(key.values(), truncated.values());
    }
}
