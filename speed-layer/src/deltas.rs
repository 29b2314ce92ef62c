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
use datafusion::prelude::SessionContext;
use shared_schema::cut::SegmentSize;
use shared_schema::views::{Source, ViewDef};
use shared_schema::{ALL_VIEWS, events_schema};

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

/// Views the speed layer maintains: every view computed from events alone.
/// (Views that need the catalog are merged in serving from their product
/// view; the catalog is the batch layer's.)
pub fn speed_views() -> impl Iterator<Item = &'static ViewDef> {
    ALL_VIEWS.iter().filter(|v| v.source == Source::Events)
}

/// Computes the deltas of every speed view over `events`.
pub async fn compute(events: RecordBatch, segment_size: SegmentSize) -> Result<Vec<ViewDelta>, DataFusionError> {
    let ctx = SessionContext::new();
    let table = MemTable::try_new(events_schema(), vec![vec![events]])?;
    ctx.register_table("events", Arc::new(table))?;
    let mut out = Vec::new();
    for view in speed_views() {
        let batches = ctx.sql(&view.speed_sql(segment_size.get())).await?.collect().await?;
        out.push(ViewDelta { view, batches });
    }
    Ok(out)
}
