//! Carrying out a [`Plan`] in DataFusion: every view and batch table
//! computed from one pinned snapshot, in this process or on a Ballista
//! cluster, into Arrow batches that [`super::publish`] writes.
//!
//! Each query reads `events` registered with the filter its refresh needs
//! ([`crate::scope`]), so the SQL is the view's one definition, unchanged.

use std::collections::BTreeMap;

use arrow::array::RecordBatch;
use datafusion::prelude::SessionContext;
use deltalake::DeltaTable;
use shared_schema::cut::{Offset, Partition};
use shared_schema::derived::BatchTable;
use shared_schema::schema::Hour;
use shared_schema::views::{HOUR_EXPR, ViewDef, product_demand_hourly};

use super::RunError;
use super::plan::{Plan, Refresh};
use crate::engine::Engine;
use crate::lake::{self, Lake};
use crate::scope;

/// What a computed relation is.
#[derive(Clone, Copy)]
pub(crate) enum Relation {
    View(&'static ViewDef),
    Table(&'static BatchTable),
}

/// One relation computed by a run, ready to publish.
pub(crate) struct Computed {
    pub(crate) name: &'static str,
    pub(crate) relation: Relation,
    /// How it is written: batch tables are always replaced whole.
    pub(crate) refresh: Refresh,
    pub(crate) batches: Vec<RecordBatch>,
}

impl Computed {
    /// Whether the relation is replaced whole (the row-count check compares
    /// only those).
    pub(crate) fn replaces_all(&self) -> bool {
        self.refresh == Refresh::Replace
    }
}

/// A session over one snapshot: the lake's `events` (as
/// [`scope::LAKE_EVENTS`]) and the catalog as `products`; with the
/// catalog's Delta version (`None` before the first catalog snapshot).
pub(crate) async fn session(
    engine: &Engine,
    lake: &Lake,
    events: &DeltaTable,
) -> Result<(SessionContext, Option<i64>), RunError> {
    let ctx = engine.context().await?;
    engine.register(&ctx, scope::LAKE_EVENTS, events).await?;
    let catalog_version = match lake.open(lake::PRODUCTS_TABLE).await? {
        Some(products) => {
            engine.register(&ctx, "products", &products).await?;
            products.version().map(|v| v as i64)
        }
        None => {
            engine
                .register_empty(&ctx, "products", crate::catalog::schema())
                .map_err(|source| RunError::Compute { view: "products", source })?;
            None
        }
    };
    Ok((ctx, catalog_version))
}

/// The Kafka partitions the snapshot holds: as many as the ingest
/// recorded, or (a lake written before it did) those with events.
pub(crate) async fn partitions(
    ctx: &SessionContext,
    table: &DeltaTable,
    topic: &str,
) -> Result<Vec<Partition>, RunError> {
    use arrow::array::AsArray;
    if let Some(n) = lake::recorded_partitions(table, topic).await? {
        return Ok((0..n).map(Partition).collect());
    }
    use arrow::datatypes::Int32Type;
    let sql = format!("SELECT DISTINCT kafka_partition FROM {}", scope::LAKE_EVENTS);
    let batches = async { ctx.sql(&sql).await?.collect().await }
        .await
        .map_err(|source| RunError::Compute { view: "events", source })?;
    Ok(batches
        .iter()
        .flat_map(|b| b.column(0).as_primitive::<Int32Type>().values().iter().map(|p| Partition(*p)))
        .collect())
}

/// Per partition, the next offset the snapshot expects from `topic`.
pub(crate) async fn lake_next(
    ctx: &SessionContext,
    table: &DeltaTable,
    topic: &str,
) -> Result<BTreeMap<Partition, Offset>, RunError> {
    let partitions = partitions(ctx, table, topic).await?;
    Ok(lake::committed_offsets(table, topic, partitions).await?)
}

/// What the events between the previous cut and the new one touched: their
/// hours, and per partition the newest event time among them (what the
/// publish's duplicates history needs of the same range, read in the same
/// scan).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NewRange {
    pub(crate) hours: Vec<Hour>,
    pub(crate) newest: BTreeMap<Partition, i64>,
}

/// Reads [`NewRange`]: one scan of the new offsets, grouped by partition and
/// hour.
pub(crate) async fn new_range(ctx: &SessionContext, plan: &Plan) -> Result<NewRange, RunError> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Int32Type, TimestampMicrosecondType};
    let failed = |source| RunError::Compute { view: "touched hours", source };
    scope::register_events(ctx, scope::between(&plan.previous, &plan.cut)).await.map_err(failed)?;
    let sql = format!(
        "SELECT e.kafka_partition, {HOUR_EXPR} AS hour, max(e.event_time) AS newest FROM events e GROUP BY 1, 2"
    );
    let batches = async { ctx.sql(&sql).await?.collect().await }.await.map_err(failed)?;
    let mut range = NewRange::default();
    for b in &batches {
        let partitions = b.column(0).as_primitive::<Int32Type>();
        let hours = b.column(1).as_primitive::<TimestampMicrosecondType>();
        let times = b.column(2).as_primitive::<TimestampMicrosecondType>();
        for i in 0..b.num_rows() {
            if partitions.is_null(i) || hours.is_null(i) || times.is_null(i) {
                continue;
            }
            range.hours.extend(chrono::DateTime::from_timestamp_micros(hours.value(i)).map(Hour::of));
            let newest = range.newest.entry(Partition(partitions.value(i))).or_insert(times.value(i));
            *newest = (*newest).max(times.value(i));
        }
    }
    range.hours.sort();
    range.hours.dedup();
    Ok(range)
}

/// Computes `view` as `refresh` says: the events below the cut, only those
/// of the hours to recompute, or only the offset range to fold (never a
/// deferred view).
pub(crate) async fn view(
    ctx: &SessionContext,
    plan: &Plan,
    view: &'static ViewDef,
    refresh: Refresh,
) -> Result<Computed, RunError> {
    let below = scope::below(&plan.cut);
    let filter = match &refresh {
        Refresh::Replace => below,
        Refresh::Hours { hours, .. } => below.and(scope::in_hours(hours)),
        Refresh::Upsert { from } => scope::between(from, &plan.cut),
        Refresh::Defer { .. } => unreachable!("a deferred view is not computed"),
    };
    let batches = query(ctx, view.name, filter, &view.batch_sql()).await?;
    Ok(Computed { name: view.name, relation: Relation::View(view), refresh, batches })
}

/// Computes a batch table over the events below the cut inside its window
/// before `anchor` (the newest event hour below the cut), step by step:
/// the first step reads the lake (or, when it is a view this run computed
/// over all hours, takes those rows for the window), each later one the
/// kept results of the steps before it, in this process.
pub(crate) async fn table(
    ctx: &SessionContext,
    plan: &Plan,
    table: &'static BatchTable,
    anchor: chrono::DateTime<chrono::Utc>,
    computed: &[Computed],
) -> Result<Computed, RunError> {
    let below = scope::below(&plan.cut);
    let start = table.window().map(|window| anchor - window);
    let filter = match start {
        Some(start) => below.and(scope::since(start)),
        None => below,
    };
    let failed = |source| RunError::Compute { view: table.name, source };
    let steps = table.steps();
    let local = SessionContext::new();
    let mut batches = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let (schema, rows) = match step.view.and_then(|v| view_rows(computed, v, start)) {
            Some(kept) => kept,
            None if i == 0 => query_kept(ctx, table.name, filter.clone(), &step.sql).await?,
            None => async { kept(local.sql(&step.sql).await?).await }.await.map_err(failed)?,
        };
        if i + 1 == steps.len() {
            batches = rows;
        } else {
            let kept = datafusion::datasource::MemTable::try_new(schema, vec![rows]).map_err(failed)?;
            local.register_table(step.name, std::sync::Arc::new(kept)).map_err(failed)?;
        }
    }
    Ok(Computed { name: table.name, relation: Relation::Table(table), refresh: Refresh::Replace, batches })
}

/// The rows of `view` for the hours from `start` on, when this run
/// computed the view over all hours (and `start` is an hour).
fn view_rows(
    computed: &[Computed],
    view: &ViewDef,
    start: Option<chrono::DateTime<chrono::Utc>>,
) -> Option<(arrow::datatypes::SchemaRef, Vec<RecordBatch>)> {
    use arrow::array::{Scalar, TimestampMicrosecondArray};
    let start = start?;
    let key = view.hour_key?;
    if Hour::of(start).start() != start {
        return None;
    }
    let all = computed.iter().find(|c| c.name == view.name && c.replaces_all())?;
    let schema = all.batches.first()?.schema();
    let bound = Scalar::new(TimestampMicrosecondArray::from(vec![start.timestamp_micros()]).with_timezone("UTC"));
    let mut rows = Vec::new();
    for b in &all.batches {
        let hours = b.column_by_name(key)?;
        let keep = arrow::compute::kernels::cmp::gt_eq(hours, &bound).ok()?;
        rows.push(arrow::compute::filter_record_batch(b, &keep).ok()?);
    }
    Some((schema, rows))
}

/// Like [`query`], with the result's schema (a step's result is kept as a
/// table even when it has no rows).
async fn query_kept(
    ctx: &SessionContext,
    name: &'static str,
    filter: datafusion::prelude::Expr,
    sql: &str,
) -> Result<(arrow::datatypes::SchemaRef, Vec<RecordBatch>), RunError> {
    async {
        scope::register_events(ctx, filter).await?;
        kept(ctx.sql(sql).await?).await
    }
    .await
    .map_err(|source| RunError::Compute { view: name, source })
}

/// `frame`'s schema and rows.
async fn kept(
    frame: datafusion::dataframe::DataFrame,
) -> datafusion::error::Result<(arrow::datatypes::SchemaRef, Vec<RecordBatch>)> {
    let schema = frame.schema().inner().clone();
    Ok((schema, frame.collect().await?))
}

/// The newest event hour in what this run computed of the hourly view.
pub(crate) fn newest_hour(computed: &[Computed]) -> Option<chrono::DateTime<chrono::Utc>> {
    use arrow::array::AsArray;
    use arrow::datatypes::TimestampMicrosecondType;
    let view = product_demand_hourly();
    let key = view.hour_key.unwrap_or("hour");
    computed
        .iter()
        .filter(|c| c.name == view.name)
        .flat_map(|c| &c.batches)
        .filter_map(|b| b.column_by_name(key))
        .filter_map(|col| arrow::compute::max(col.as_primitive::<TimestampMicrosecondType>()))
        .max()
        .and_then(chrono::DateTime::from_timestamp_micros)
}

/// Runs `sql` to completion over `events` restricted by `filter`.
async fn query(
    ctx: &SessionContext,
    name: &'static str,
    filter: datafusion::prelude::Expr,
    sql: &str,
) -> Result<Vec<RecordBatch>, RunError> {
    Ok(query_kept(ctx, name, filter, sql).await?.1)
}
