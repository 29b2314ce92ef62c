//! `batch-layer export-training`: the recommender's training data as
//! Parquet, as of a point in time.
//!
//! One pinned snapshot of the lake; per user and product, the interactions
//! with `event_time` before `--as-of`, computed by the one view definition
//! [`USER_PRODUCT_INTERACTIONS`]. Nothing at or after the cut-off time
//! enters, so a model trained on the file and evaluated on later events sees
//! no leakage. A `manifest.json` beside the data says what is in it: the
//! cut-off, the lake version (so the export can be reproduced), the row
//! counts and every column's meaning.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use chrono::{DateTime, Utc};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;
use datafusion::prelude::SessionContext;
use serde::Serialize;
use shared_schema::views::USER_PRODUCT_INTERACTIONS;

use crate::lake::{self, EVENTS_TABLE, Lake, LakeError};
use crate::scope;

/// Name of the data file in the output folder.
pub const DATA_FILE: &str = "interactions.parquet";
/// Name of the manifest in the output folder.
pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Lake(#[from] LakeError),
    #[error("the lake has no `events` table yet at {0}; run `batch-layer ingest` first")]
    EmptyLake(String),
    #[error("computing the interactions: {0}")]
    Compute(#[from] datafusion::error::DataFusionError),
    #[error("writing {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("converting the interactions: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("writing Parquet: {0}")]
    Parquet(#[from] datafusion::parquet::errors::ParquetError),
    #[error("{0} exists and is not empty; choose an empty or new folder")]
    NotEmpty(PathBuf),
}

/// What the manifest records.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Manifest {
    pub view: String,
    /// Interactions strictly before this time are included.
    pub as_of: DateTime<Utc>,
    pub lake: String,
    pub delta_version: i64,
    pub created_at: DateTime<Utc>,
    pub rows: u64,
    pub users: u64,
    pub products: u64,
    pub file: String,
    pub columns: Vec<ManifestColumn>,
}

#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ManifestColumn {
    pub name: String,
    pub definition: String,
}

/// Writes the export into `out` (created if missing; must be empty).
pub async fn run(lake: &Lake, out: &Path, as_of: DateTime<Utc>) -> Result<Manifest, ExportError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ExportError::Io { path, source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    if std::fs::read_dir(out).map_err(io(out))?.next().is_some() {
        return Err(ExportError::NotEmpty(out.to_path_buf()));
    }
    let table = lake.open(EVENTS_TABLE).await?.ok_or_else(|| ExportError::EmptyLake(lake.root().to_string()))?;
    let delta_version = table.version().unwrap_or_default() as i64;
    let ctx = SessionContext::new();
    lake::register(&ctx, scope::LAKE_EVENTS, &table).await?;
    scope::register_events(&ctx, scope::before(as_of)).await?;

    let view = &USER_PRODUCT_INTERACTIONS;
    let keys: Vec<_> = view.key_names().collect();
    let sql = format!("{}\nORDER BY {}", view.batch_sql(), keys.join(", "));
    let batches: Vec<RecordBatch> =
        ctx.sql(&sql).await?.collect().await?.iter().map(plain_strings).collect::<Result<_, _>>()?;
    let schema = match batches.first() {
        Some(b) => b.schema(),
        None => plain_schema(ctx.sql(&sql).await?.schema().as_arrow()),
    };

    let data = out.join(DATA_FILE);
    let file = std::fs::File::create(&data).map_err(io(&data))?;
    let props = WriterProperties::builder().set_compression(Compression::ZSTD(ZstdLevel::default())).build();
    let mut writer = ArrowWriter::try_new(file, schema, Some(props))?;
    let mut users = std::collections::HashSet::new();
    let mut products = std::collections::HashSet::new();
    let mut rows = 0u64;
    for b in &batches {
        writer.write(b)?;
        rows += b.num_rows() as u64;
        collect_distinct(b, "user_id", &mut users);
        collect_distinct(b, "product_id", &mut products);
    }
    writer.close()?;

    let columns = view
        .keys
        .iter()
        .map(|k| ManifestColumn { name: k.name.into(), definition: k.expr.into() })
        .chain(view.measures.iter().map(|m| ManifestColumn {
            name: m.name.into(),
            definition: format!("{:?} of {}", m.merge, m.expr).to_lowercase(),
        }))
        .collect();
    let manifest = Manifest {
        view: view.name.into(),
        as_of,
        lake: lake.table_url(EVENTS_TABLE).to_string(),
        delta_version,
        created_at: Utc::now(),
        rows,
        users: users.len() as u64,
        products: products.len() as u64,
        file: DATA_FILE.into(),
        columns,
    };
    let path = out.join(MANIFEST_FILE);
    let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
    std::fs::write(&path, json).map_err(io(&path))?;
    Ok(manifest)
}

/// Strings as plain `Utf8` (DataFusion computes `Utf8View`), which every
/// Parquet reader understands.
fn plain_schema(schema: &Schema) -> SchemaRef {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Utf8View | DataType::LargeUtf8 => f.as_ref().clone().with_data_type(DataType::Utf8),
            _ => f.as_ref().clone(),
        })
        .collect();
    Arc::new(Schema::new(fields))
}

fn plain_strings(b: &RecordBatch) -> Result<RecordBatch, arrow::error::ArrowError> {
    let schema = plain_schema(&b.schema());
    let columns = b
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(c, f)| arrow::compute::cast(c, f.data_type()))
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(schema, columns)
}

fn collect_distinct(b: &RecordBatch, column: &str, into: &mut std::collections::HashSet<String>) {
    use arrow::array::AsArray;
    let Some(col) = b.column_by_name(column) else { return };
    let Ok(strings) = arrow::compute::cast(col, &arrow::datatypes::DataType::Utf8) else { return };
    into.extend(strings.as_string::<i32>().iter().flatten().map(str::to_owned));
}
