//! A pinned Delta snapshot as a list of Parquet files, the form in which a
//! lake table travels in a Ballista plan.
//!
//! A delta-rs table provider cannot travel in a plan (its scan has no
//! serialisation). [`LakeFiles`] is the snapshot reduced to what a reader
//! needs: each live Parquet file with its size, partition values, and the
//! row count and integer min/max the Delta log records for it. [`LakeCodec`]
//! serialises it (as JSON) into the logical plan; the scheduler, which knows
//! the codec, turns it into DataFusion's own Parquet scan, which every
//! executor already knows how to run.
//!
//! Guarantees: executors read exactly that version's files, never a
//! directory listing, so files a later commit added or removed make no
//! difference; a file whose logged bounds rule it out is never opened; every
//! filter stays above the scan too, so pruning is an optimisation and never
//! changes a result. Tables this form cannot represent (column mapping,
//! deletion vectors) are refused with [`LakeFilesError::Unsupported`].

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::datatypes::{Field, FieldRef, Schema, SchemaRef};
use async_trait::async_trait;
use ballista_core::serde::BallistaLogicalExtensionCodec;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::stats::Precision;
use datafusion::common::{DFSchema, ScalarValue, Statistics, TableReference};
use datafusion::config::TableParquetOptions;
use datafusion::datasource::TableType;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::TaskContext;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{Expr, LogicalPlan, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::logical_plan::LogicalExtensionCodec;
use deltalake::{DeltaTable, DeltaTableError};
use serde::{Deserialize, Serialize};
use url::Url;

/// Why a Delta snapshot cannot be read as [`LakeFiles`].
#[derive(Debug, thiserror::Error)]
pub enum LakeFilesError {
    #[error(
        "Delta table {table} uses {feature}, which the Ballista engine cannot read yet; run with the in-process engine (--engine local)"
    )]
    Unsupported { table: String, feature: UnsupportedFeature },
    #[error("Delta table {table}: data file {file}: {source}")]
    FilePath { table: String, file: String, source: FilePathError },
    #[error("Delta table {table}: {source}")]
    Delta { table: String, source: DeltaTableError },
    #[error("Delta table {table}: {source}")]
    DataFusion { table: String, source: DataFusionError },
}

/// A Delta feature the file list cannot represent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnsupportedFeature {
    /// `delta.columnMapping.mode` other than `none`: Parquet column names
    /// differ from the table's.
    ColumnMapping,
    /// Rows deleted by a deletion vector are still in the Parquet file.
    DeletionVectors,
}

impl std::fmt::Display for UnsupportedFeature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ColumnMapping => "column mapping",
            Self::DeletionVectors => "deletion vectors",
        })
    }
}

/// Why a data file's path in the log gives no object-store path.
#[derive(Debug, thiserror::Error)]
pub enum FilePathError {
    #[error("not a URL: {0}")]
    Url(#[from] url::ParseError),
    #[error("not an object-store path: {0}")]
    Path(#[from] object_store::path::Error),
}
/// One live data file of a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct LakeFile {
    /// Path inside the object store (`store`).
    path: String,
    size: u64,
    /// In the order of [`LakeFiles::partition_columns`]; `None` is null.
    partition_values: Vec<Option<String>>,
    /// Rows, from the Delta log's statistics when it has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rows: Option<u64>,
    /// Per integer column of the file, its smallest and largest value, from
    /// the log's statistics: lets a scan skip the file without opening it
    /// (an incremental run reads a few Kafka offset ranges). Integers only:
    /// the log truncates timestamps and strings, so their bounds are not
    /// exact.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    bounds: Vec<Bounds>,
}

/// An integer column's smallest and largest value in one file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Bounds {
    column: String,
    min: i64,
    max: i64,
}

/// The row count and the integer columns' bounds of a Delta `add` action's
/// statistics (`{"numRecords":…,"minValues":{…},"maxValues":{…}}`), for the
/// top-level integer columns of `schema`. Anything unreadable is left out.
fn file_bounds(stats: Option<&str>, schema: &Schema) -> (Option<u64>, Vec<Bounds>) {
    let Some(stats) = stats.and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok()) else {
        return (None, Vec::new());
    };
    let rows = stats["numRecords"].as_u64();
    let bounds = schema
        .fields()
        .iter()
        .filter(|f| f.data_type().is_signed_integer())
        .filter_map(|f| {
            let min = stats["minValues"][f.name()].as_i64()?;
            let max = stats["maxValues"][f.name()].as_i64()?;
            Some(Bounds { column: f.name().clone(), min, max })
        })
        .collect();
    (rows, bounds)
}

/// A Delta snapshot as a list of Parquet files: the table provider a
/// Ballista plan carries (see the module documentation).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LakeFiles {
    /// The table's schema with its partition columns moved last, the order
    /// in which DataFusion's file scan produces them (queries name columns,
    /// so the order is not visible to them).
    #[serde(skip, default = "empty_schema")]
    schema: SchemaRef,
    partition_columns: Vec<String>,
    /// The object store's URL (`file:///`, `s3://bucket`).
    store: String,
    files: Vec<LakeFile>,
    /// For messages: which table and version this is.
    table: String,
    version: i64,
}

fn empty_schema() -> SchemaRef {
    Arc::new(Schema::empty())
}

/// `schema` with the `partitions` columns moved to the end, in that order.
fn partitions_last(schema: &Schema, partitions: &[String]) -> SchemaRef {
    let data = schema.fields().iter().filter(|f| !partitions.contains(f.name())).cloned();
    let parts = partitions.iter().filter_map(|p| schema.field_with_name(p).ok().map(|f| Arc::new(f.clone())));
    Arc::new(Schema::new_with_metadata(data.chain(parts).collect::<Vec<FieldRef>>(), schema.metadata().clone()))
}

/// Where a data file is inside its object store: the table root's path plus
/// the file's path relative to it (as delta-rs parses it into an
/// object-store path), or the path of an absolute URL in the log.
fn file_path(root: &Url, raw: &str, relative: object_store::path::Path) -> Result<String, FilePathError> {
    if raw.contains("://") {
        let url = Url::parse(raw)?;
        return Ok(object_store::path::Path::from_url_path(url.path())?.to_string());
    }
    let root = object_store::path::Path::from_url_path(root.path())?;
    Ok(root.parts().chain(relative.parts()).collect::<object_store::path::Path>().to_string())
}

impl LakeFiles {
    /// The live files of `table`'s loaded snapshot.
    pub async fn from_snapshot(name: &str, table: &DeltaTable) -> Result<Self, LakeFilesError> {
        let delta = |source| LakeFilesError::Delta { table: name.into(), source };
        let unsupported = |feature| LakeFilesError::Unsupported { table: name.into(), feature };
        let snapshot = table.snapshot().map_err(delta)?;
        let mapping = snapshot.metadata().configuration().get("delta.columnMapping.mode").cloned();
        if mapping.is_some_and(|m| m != "none") {
            return Err(unsupported(UnsupportedFeature::ColumnMapping));
        }
        // The provider's schema is the one the in-process engine reads, so
        // both engines see the same column types.
        let provider =
            table.table_provider().await.map_err(|source| LakeFilesError::DataFusion { table: name.into(), source })?;
        let partition_columns: Vec<String> = snapshot.metadata().partition_columns().to_vec();
        let schema = partitions_last(&provider.schema(), &partition_columns);
        let root = table.log_store().root_url().clone();
        let store = format!("{}://{}", root.scheme(), root.host_str().unwrap_or(""));
        let mut files = Vec::new();
        for file in snapshot.log_data().iter() {
            if file.deletion_vector_descriptor().is_some() {
                return Err(unsupported(UnsupportedFeature::DeletionVectors));
            }
            let raw = file.path();
            let path = file_path(&root, &raw, file.object_store_path()).map_err(|source| LakeFilesError::FilePath {
                table: name.into(),
                file: raw.to_string(),
                source,
            })?;
            let values = file.partition_values_map();
            let (rows, bounds) = file_bounds(file.stats().as_deref(), &schema);
            files.push(LakeFile {
                path,
                size: file.size() as u64,
                partition_values: partition_columns.iter().map(|c| values.get(c).cloned().flatten()).collect(),
                rows,
                bounds,
            });
        }
        Ok(Self {
            schema,
            partition_columns,
            store,
            files,
            table: name.into(),
            version: table.version().map_or(-1, |v| v as i64),
        })
    }

    /// An empty table of `schema` (a table the lake does not have yet).
    pub fn empty(name: &str, schema: SchemaRef) -> Self {
        Self {
            schema,
            partition_columns: Vec::new(),
            store: "file://".into(),
            files: Vec::new(),
            table: name.into(),
            version: -1,
        }
    }

    /// The table's partition columns, in the order of the values below.
    pub fn partition_columns(&self) -> &[String] {
        &self.partition_columns
    }

    /// The number of live data files.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Live data files per value of the partition columns (in their order).
    pub fn files_per_partition_value(&self) -> BTreeMap<Vec<Option<String>>, usize> {
        let mut files = BTreeMap::new();
        for f in &self.files {
            *files.entry(f.partition_values.clone()).or_default() += 1;
        }
        files
    }

    /// Rows per value of the partition columns (in their order), from the
    /// log's statistics alone; `None` when a file has no row count.
    pub fn rows_per_partition_value(&self) -> Option<BTreeMap<Vec<Option<String>>, u64>> {
        let mut rows = BTreeMap::new();
        for f in &self.files {
            *rows.entry(f.partition_values.clone()).or_default() += f.rows?;
        }
        Some(rows)
    }

    /// The partition columns' fields, in [`Self::partition_columns`] order.
    fn partition_fields(&self) -> Vec<FieldRef> {
        self.partition_columns
            .iter()
            .filter_map(|c| self.schema.field_with_name(c).ok().map(|f| Arc::new(f.clone())))
            .collect()
    }

    fn file_schema(&self) -> SchemaRef {
        let fields: Vec<Field> = self
            .schema
            .fields()
            .iter()
            .filter(|f| !self.partition_columns.contains(f.name()))
            .map(|f| f.as_ref().clone())
            .collect();
        Arc::new(Schema::new(fields))
    }

    /// `file`'s statistics over [`Self::file_schema`] (DataFusion adds the
    /// partition columns), when the log gave any and no partition value is
    /// null (DataFusion takes partition values to be never null).
    fn statistics(&self, file: &LakeFile, file_schema: &Schema) -> DfResult<Option<Statistics>> {
        if (file.rows.is_none() && file.bounds.is_empty()) || file.partition_values.iter().any(Option::is_none) {
            return Ok(None);
        }
        let mut stats = Statistics::new_unknown(file_schema);
        if let Some(rows) = file.rows {
            stats.num_rows = Precision::Exact(rows as usize);
        }
        for b in &file.bounds {
            let Ok(i) = file_schema.index_of(&b.column) else { continue };
            let data_type = file_schema.field(i).data_type();
            let column = &mut stats.column_statistics[i];
            column.min_value = Precision::Exact(ScalarValue::Int64(Some(b.min)).cast_to(data_type)?);
            column.max_value = Precision::Exact(ScalarValue::Int64(Some(b.max)).cast_to(data_type)?);
        }
        Ok(Some(stats))
    }

    fn is_partition_filter(&self, expr: &Expr) -> bool {
        let columns = expr.column_refs();
        !columns.is_empty() && columns.iter().all(|c| self.partition_columns.contains(&c.name))
    }

    /// The files whose partition values can satisfy every partition-only
    /// filter (the others are applied by the scan and by DataFusion).
    fn pruned(&self, state: &dyn Session, filters: &[Expr]) -> DfResult<Vec<PartitionedFile>> {
        let fields = self.partition_fields();
        let file_schema = self.file_schema();
        let mut files = Vec::with_capacity(self.files.len());
        for f in &self.files {
            let values = f
                .partition_values
                .iter()
                .zip(&fields)
                .map(|(v, field)| match v {
                    Some(s) => ScalarValue::try_from_string(s.clone(), field.data_type()),
                    None => ScalarValue::try_from(field.data_type()),
                })
                .collect::<DfResult<Vec<_>>>()?;
            let mut file = PartitionedFile::new(f.path.clone(), f.size).with_partition_values(values);
            if let Some(stats) = self.statistics(f, &file_schema)? {
                file = file.with_statistics(Arc::new(stats));
            }
            files.push(file);
        }
        let Some(predicate) = conjunction(filters.iter().filter(|e| self.is_partition_filter(e)).cloned()) else {
            return Ok(files);
        };
        // One row per file holding its partition values; the predicate
        // decides each file at once.
        if files.is_empty() {
            return Ok(files);
        }
        let schema = Arc::new(Schema::new(fields.clone()));
        let columns = (0..fields.len())
            .map(|i| ScalarValue::iter_to_array(files.iter().map(|f| f.partition_values[i].clone())))
            .collect::<DfResult<Vec<_>>>()?;
        let batch = arrow::array::RecordBatch::try_new(schema.clone(), columns)?;
        let physical = state.create_physical_expr(predicate, &DFSchema::try_from(schema)?)?;
        let keep = physical.evaluate(&batch)?.into_array(batch.num_rows())?;
        let keep = arrow::array::AsArray::as_boolean(&keep);
        use arrow::array::Array as _;
        Ok(files.into_iter().enumerate().filter(|(i, _)| keep.is_valid(*i) && keep.value(*i)).map(|(_, f)| f).collect())
    }
}

#[async_trait]
impl TableProvider for LakeFiles {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> DfResult<Vec<TableProviderFilterPushDown>> {
        // Inexact: DataFusion keeps every filter above the scan, so pruning
        // files and row groups is an optimisation, never a correctness risk.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let files = self.pruned(state, filters)?;
        let table_schema = datafusion::datasource::table_schema::TableSchema::builder(self.file_schema())
            .with_table_partition_cols(self.partition_fields())
            .build();
        let options =
            TableParquetOptions { global: state.config_options().execution.parquet.clone(), ..Default::default() };
        let mut source = ParquetSource::new(table_schema).with_table_parquet_options(options);
        let row_filters: Vec<Expr> = filters.iter().filter(|e| !self.is_partition_filter(e)).cloned().collect();
        if let Some(predicate) = conjunction(row_filters) {
            let df_schema = DFSchema::try_from(self.schema.clone())?;
            source = source.with_predicate(state.create_physical_expr(predicate, &df_schema)?);
        }
        // Spread the files over the session's partitions, biggest first.
        let partitions = state.config_options().execution.target_partitions.max(1);
        let mut groups: Vec<(u64, Vec<PartitionedFile>)> = vec![(0, Vec::new()); partitions.min(files.len().max(1))];
        let mut files = files;
        files.sort_by_key(|f| std::cmp::Reverse(f.object_meta.size));
        for f in files {
            let smallest = groups.iter_mut().min_by_key(|(bytes, _)| *bytes).expect("at least one group");
            smallest.0 += f.object_meta.size;
            smallest.1.push(f);
        }
        let config = FileScanConfigBuilder::new(ObjectStoreUrl::parse(&self.store)?, Arc::new(source))
            .with_file_groups(groups.into_iter().map(|(_, g)| FileGroup::new(g)).collect())
            .with_projection_indices(projection.cloned())?
            .with_limit(limit)
            .build();
        Ok(DataSourceExec::from_data_source(config))
    }
}

/// Ballista's logical codec, plus [`LakeFiles`] tables (as JSON).
#[derive(Debug, Default)]
pub struct LakeCodec {
    inner: BallistaLogicalExtensionCodec,
}

impl LogicalExtensionCodec for LakeCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[LogicalPlan],
        ctx: &TaskContext,
    ) -> DfResult<datafusion::logical_expr::Extension> {
        self.inner.try_decode(buf, inputs, ctx)
    }

    fn try_encode(&self, node: &datafusion::logical_expr::Extension, buf: &mut Vec<u8>) -> DfResult<()> {
        self.inner.try_encode(node, buf)
    }

    fn try_decode_table_provider(
        &self,
        buf: &[u8],
        table_ref: &TableReference,
        schema: SchemaRef,
        ctx: &TaskContext,
    ) -> DfResult<Arc<dyn TableProvider>> {
        match serde_json::from_slice::<LakeFiles>(buf) {
            Ok(mut files) => {
                files.schema = schema;
                Ok(Arc::new(files))
            }
            Err(_) => self.inner.try_decode_table_provider(buf, table_ref, schema, ctx),
        }
    }

    fn try_encode_table_provider(
        &self,
        table_ref: &TableReference,
        node: Arc<dyn TableProvider>,
        buf: &mut Vec<u8>,
    ) -> DfResult<()> {
        match node.downcast_ref::<LakeFiles>() {
            Some(files) => serde_json::to_writer(buf, files)
                .map_err(|e| DataFusionError::Internal(format!("encoding lake table {table_ref}: {e}"))),
            None => self.inner.try_encode_table_provider(table_ref, node, buf),
        }
    }

    fn try_decode_file_format(
        &self,
        buf: &[u8],
        ctx: &TaskContext,
    ) -> DfResult<Arc<dyn datafusion::datasource::file_format::FileFormatFactory>> {
        self.inner.try_decode_file_format(buf, ctx)
    }

    fn try_encode_file_format(
        &self,
        buf: &mut Vec<u8>,
        node: Arc<dyn datafusion::datasource::file_format::FileFormatFactory>,
    ) -> DfResult<()> {
        self.inner.try_encode_file_format(buf, node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::SessionContext;

    #[test]
    fn partition_columns_move_last_whatever_their_place_in_the_table() {
        use arrow::datatypes::DataType;
        let schema = Schema::new(vec![
            Field::new("d", DataType::Date32, true),
            Field::new("v", DataType::Int64, false),
            Field::new("h", DataType::Int32, true),
            Field::new("added_later", DataType::Int32, true),
        ]);
        let moved = partitions_last(&schema, &["h".into(), "d".into()]);
        let names: Vec<&str> = moved.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["v", "added_later", "h", "d"]);
    }

    #[test]
    fn file_paths_join_the_table_root() {
        let root = Url::parse("file:///data/lake/events/").unwrap();
        let rel = object_store::path::Path::parse("event_date=2026-11-26/event_hour=3/a.parquet").unwrap();
        assert_eq!(
            file_path(&root, "event_date=2026-11-26/event_hour=3/a.parquet", rel).unwrap(),
            "data/lake/events/event_date=2026-11-26/event_hour=3/a.parquet"
        );
        let s3 = Url::parse("s3://bucket/shop/events/").unwrap();
        let rel = object_store::path::Path::parse("event_hour=3/x.parquet").unwrap();
        assert_eq!(file_path(&s3, "event_hour=3/x.parquet", rel).unwrap(), "shop/events/event_hour=3/x.parquet");
        let abs = object_store::path::Path::parse("ignored").unwrap();
        assert_eq!(file_path(&s3, "s3://bucket/elsewhere/y.parquet", abs).unwrap(), "elsewhere/y.parquet");
    }

    #[test]
    fn lake_files_round_trip_through_the_codec() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("v", arrow::datatypes::DataType::Int64, false),
            Field::new("d", arrow::datatypes::DataType::Date32, true),
        ]));
        let files = LakeFiles {
            schema: schema.clone(),
            partition_columns: vec!["d".into()],
            store: "file://".into(),
            files: vec![LakeFile {
                path: "lake/t/d=2026-11-26/a.parquet".into(),
                size: 10,
                partition_values: vec![None],
                rows: Some(2),
                bounds: vec![Bounds { column: "v".into(), min: -1, max: 7 }],
            }],
            table: "t".into(),
            version: 3,
        };
        let codec = LakeCodec::default();
        let mut buf = Vec::new();
        codec.try_encode_table_provider(&TableReference::bare("t"), Arc::new(files.clone()), &mut buf).unwrap();
        let back = codec
            .try_decode_table_provider(&buf, &TableReference::bare("t"), schema.clone(), &TaskContext::default())
            .unwrap();
        let back = back.downcast_ref::<LakeFiles>().unwrap();
        assert_eq!(back.files, files.files);
        assert_eq!(back.schema(), schema);
        assert_eq!(back.file_schema().fields().len(), 1);
    }

    #[test]
    fn integer_bounds_and_rows_come_from_the_log_statistics() {
        use arrow::datatypes::DataType;
        let schema = Schema::new(vec![
            Field::new("kafka_offset", DataType::Int64, false),
            Field::new("kafka_partition", DataType::Int32, false),
            Field::new("event_time", DataType::Utf8, false),
            Field::new("no_stats", DataType::Int32, true),
        ]);
        let stats = r#"{"numRecords":3,"minValues":{"kafka_offset":100,"kafka_partition":2,"event_time":"a"},
                        "maxValues":{"kafka_offset":199,"kafka_partition":2,"event_time":"z"},"nullCount":{}}"#;
        let (rows, bounds) = file_bounds(Some(stats), &schema);
        assert_eq!(rows, Some(3));
        assert_eq!(
            bounds,
            [
                Bounds { column: "kafka_offset".into(), min: 100, max: 199 },
                Bounds { column: "kafka_partition".into(), min: 2, max: 2 },
            ]
        );
        assert_eq!(file_bounds(None, &schema), (None, Vec::new()));
        assert_eq!(file_bounds(Some("not json"), &schema), (None, Vec::new()));
    }

    /// A file whose logged bounds rule it out is never opened: here it does
    /// not even exist, and the query still answers from the other file.
    #[tokio::test]
    async fn files_outside_the_filter_are_skipped_by_their_logged_bounds() {
        use arrow::array::{Int64Array, RecordBatch};
        use arrow::datatypes::DataType;
        let dir = tempfile::tempdir().unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let real = dir.path().join("real.parquet");
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from_iter_values(10..20))]).unwrap();
        let mut writer = datafusion::parquet::arrow::ArrowWriter::try_new(
            std::fs::File::create(&real).unwrap(),
            schema.clone(),
            None,
        )
        .unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let path = |p: &std::path::Path| p.to_str().unwrap().trim_start_matches('/').to_string();
        let file = |p: String, size: u64, min: i64, max: i64| LakeFile {
            path: p,
            size,
            partition_values: vec![],
            rows: Some(10),
            bounds: vec![Bounds { column: "v".into(), min, max }],
        };
        let lake = LakeFiles {
            schema: schema.clone(),
            partition_columns: vec![],
            store: "file://".into(),
            files: vec![
                file(path(&dir.path().join("missing.parquet")), 1000, 0, 9),
                file(path(&real), std::fs::metadata(&real).unwrap().len(), 10, 19),
            ],
            table: "t".into(),
            version: 1,
        };
        let ctx = SessionContext::new();
        ctx.register_table("t", Arc::new(lake)).unwrap();
        let count = |sql: &'static str| {
            let ctx = ctx.clone();
            async move {
                let batches = ctx.sql(sql).await?.collect().await?;
                let n =
                    arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(batches[0].column(0)).value(0);
                Ok::<i64, DataFusionError>(n)
            }
        };
        assert_eq!(count("SELECT count(*) FROM t WHERE v >= 12").await.unwrap(), 8);
        // Without a filter that rules it out, the missing file is read (and fails).
        assert!(count("SELECT count(*) FROM t WHERE v >= 5").await.is_err());
    }
}
