//! `batch-layer export-training`: the recommender's training data as
//! Parquet, as of a point in time.
//!
//! One pinned snapshot of the lake; per user and product, the interactions
//! with `event_time` before `--as-of`, computed by the one view definition
//! [`USER_PRODUCT_INTERACTIONS`]; and beside them the same events as
//! session sequences ([`SESSIONS_FILE`]: one row per event, numbered in its
//! session, the format session-based models train on). Nothing at or after
//! the cut-off time enters, so a model trained on the files and evaluated on
//! later events sees no leakage. A `manifest.json` beside the data says what is in it: the
//! cut-off, the lake version (so the export can be reproduced), the row
//! counts and every column's meaning.
//!
//! Every export is registered in `ops.training_exports` (where, as of when,
//! the lake version, the forgotten set's version it excluded) and leaves out
//! forgotten users. It holds the lake fence shared from reading the
//! forgotten set to its registration, so a `forget-user` either sees it
//! registered (and rewrites it, [`scrub`]) or runs first (and the export
//! leaves the users out).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use chrono::{DateTime, Utc};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;
use datafusion::prelude::SessionContext;
use platform::forgotten::{ForgetKey, Forgotten, LakeFence};
use serde::Serialize;
use shared_schema::views::user_product_interactions;
use sqlx::PgPool;

use crate::lake::{self, EVENTS_TABLE, Lake, LakeError};
use crate::scope;

/// Name of the data file in the output folder.
pub const DATA_FILE: &str = "interactions.parquet";
/// Name of the manifest in the output folder.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Name of the session sequences in the output folder.
pub const SESSIONS_FILE: &str = "sessions.parquet";

/// The session sequences: every event of the snapshot before the cut-off,
/// numbered within its (user, session) by event time, then arrival (the
/// Kafka position), in that order.
const SESSIONS_SQL: &str = "SELECT user_id, session_id,
       CAST(row_number() OVER (PARTITION BY user_id, session_id
                               ORDER BY event_time, kafka_partition, kafka_offset) AS BIGINT) AS position,
       event_time, event_type, product_id, quantity, price_cents
FROM events
ORDER BY user_id, session_id, position";

/// What each column of [`SESSIONS_FILE`] holds.
const SESSION_COLUMNS: &[(&str, &str)] = &[
    ("user_id", "the event's user"),
    ("session_id", "the event's session, as the shop sent it"),
    ("position", "1-based place of the event in its session: by event_time, then arrival order"),
    ("event_time", "when it happened (UTC)"),
    ("event_type", "page_view, add_to_cart, remove_from_cart or purchase"),
    ("product_id", "the product"),
    ("quantity", "units, for cart and purchase events"),
    ("price_cents", "unit price in cents, for cart and purchase events"),
];

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Lake(Box<LakeError>),
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
    #[error("registering the export in ops.training_exports: {0}")]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Forgotten(#[from] platform::forgotten::ForgetError),
    #[error("reading the manifest {path}: {source}")]
    Manifest { path: PathBuf, source: serde_json::Error },
    #[error("the lake has no {what} to export ({source}); versions past the lake's retention are vacuumed")]
    Snapshot { what: String, source: deltalake::DeltaTableError },
}

impl From<LakeError> for ExportError {
    fn from(e: LakeError) -> Self {
        Self::Lake(Box::new(e))
    }
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
    /// Its row in `ops.training_exports`.
    #[serde(default)]
    pub export_id: Option<i64>,
    /// The forgotten set's version whose users it leaves out.
    #[serde(default)]
    pub forgotten_version: i64,
    /// When `forget-user` last removed users' rows from it.
    #[serde(default)]
    pub rewritten_at: Option<DateTime<Utc>>,
    /// Cut by arrival: only what the lake had committed by this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_by: Option<DateTime<Utc>>,
    /// The session sequences beside the interactions (absent from exports
    /// written before they were added).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<SessionsPart>,
}

/// The session sequences' file, as the manifest records it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct SessionsPart {
    pub file: String,
    /// Events, and sessions (rows with position 1).
    pub rows: u64,
    pub sessions: u64,
    pub columns: Vec<ManifestColumn>,
}

/// Which lake snapshot an export reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Snapshot {
    /// The newest.
    #[default]
    Latest,
    /// A Delta version, to reproduce an earlier export (its manifest's
    /// `delta_version`).
    Version(u64),
    /// The newest version committed at or before this time: what the
    /// platform had received by then, so a late event that arrived after
    /// it cannot leak in, whatever its event time.
    ReceivedBy(DateTime<Utc>),
}

#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ManifestColumn {
    pub name: String,
    pub definition: String,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + use<> {
    let path = path.to_path_buf();
    move |source| ExportError::Io { path, source }
}

/// Writes the export into `out` (created if missing; must be empty),
/// without the users forgotten in `pool` (hashed with `key`), and registers
/// it there.
pub async fn run(
    lake: &Lake,
    out: &Path,
    as_of: DateTime<Utc>,
    pool: &PgPool,
    key: Option<&ForgetKey>,
) -> Result<Manifest, ExportError> {
    run_at(lake, out, as_of, Snapshot::Latest, pool, key).await
}

/// [`run`] over the lake `snapshot`.
pub async fn run_at(
    lake: &Lake,
    out: &Path,
    as_of: DateTime<Utc>,
    snapshot: Snapshot,
    pool: &PgPool,
    key: Option<&ForgetKey>,
) -> Result<Manifest, ExportError> {
    std::fs::create_dir_all(out).map_err(io(out))?;
    if std::fs::read_dir(out).map_err(io(out))?.next().is_some() {
        return Err(ExportError::NotEmpty(out.to_path_buf()));
    }
    let location = out.canonicalize().map_err(io(out))?;
    let fence = LakeFence::shared(pool).await?;
    let forgotten = Forgotten::load(pool, key).await?;
    let mut manifest = write(lake, out, as_of, snapshot, &forgotten).await?;
    let export_id: i64 = sqlx::query_scalar(
        "INSERT INTO ops.training_exports (location, as_of, delta_version, forgotten_version, rows)
         VALUES ($1, $2, $3, $4, $5) RETURNING export_id",
    )
    .bind(location.display().to_string())
    .bind(as_of)
    .bind(manifest.delta_version)
    .bind(forgotten.version())
    .bind(manifest.rows as i64)
    .fetch_one(pool)
    .await?;
    fence.release().await?;
    manifest.export_id = Some(export_id);
    write_manifest(out, &manifest)?;
    Ok(manifest)
}

fn write_manifest(out: &Path, manifest: &Manifest) -> Result<(), ExportError> {
    let path = out.join(MANIFEST_FILE);
    let json = serde_json::to_vec_pretty(manifest).expect("a manifest serialises");
    std::fs::write(&path, json).map_err(io(&path))
}

async fn write(
    lake: &Lake,
    out: &Path,
    as_of: DateTime<Utc>,
    snapshot: Snapshot,
    forgotten: &Forgotten,
) -> Result<Manifest, ExportError> {
    let mut table = lake.open(EVENTS_TABLE).await?.ok_or_else(|| ExportError::EmptyLake(lake.root().to_string()))?;
    match snapshot {
        Snapshot::Latest => {}
        Snapshot::Version(v) => table
            .load_version(v)
            .await
            .map_err(|source| ExportError::Snapshot { what: format!("version {v}"), source })?,
        Snapshot::ReceivedBy(t) => table.load_with_datetime(t).await.map_err(|source| ExportError::Snapshot {
            what: format!("version committed by {}", t.to_rfc3339()),
            source,
        })?,
    }
    let delta_version = table.version().unwrap_or_default() as i64;
    let ctx = SessionContext::new();
    lake::register(&ctx, scope::LAKE_EVENTS, &table).await?;
    scope::register_events(&ctx, scope::before(as_of)).await?;

    let view = user_product_interactions();
    let keys: Vec<_> = view.key_names().collect();
    let sql = format!("{}\nORDER BY {}", view.batch_sql(), keys.join(", "));
    let mut batches: Vec<RecordBatch> = Vec::new();
    for b in ctx.sql(&sql).await?.collect().await? {
        let (kept, _) = forgotten.filter_events(plain_strings(&b)?)?;
        batches.push(kept);
    }
    let schema = match batches.first() {
        Some(b) => b.schema(),
        None => plain_schema(ctx.sql(&sql).await?.schema().as_arrow()),
    };

    let (rows, users, products) = write_parquet(&out.join(DATA_FILE), schema, &batches)?;
    let sessions = write_sessions(&ctx, out, forgotten).await?;

    let columns = view
        .keys
        .iter()
        .map(|k| ManifestColumn { name: k.name.into(), definition: k.expr.into() })
        .chain(view.measures.iter().map(|m| ManifestColumn { name: m.name.into(), definition: m.aggregate_sql() }))
        .collect();
    let manifest = Manifest {
        view: view.name.into(),
        as_of,
        lake: lake.table_url(EVENTS_TABLE).to_string(),
        received_by: match snapshot {
            Snapshot::ReceivedBy(t) => Some(t),
            _ => None,
        },
        delta_version,
        created_at: Utc::now(),
        rows,
        users,
        products,
        file: DATA_FILE.into(),
        columns,
        export_id: None,
        forgotten_version: forgotten.version(),
        rewritten_at: None,
        sessions: Some(sessions),
    };
    write_manifest(out, &manifest)?;
    Ok(manifest)
}

/// Writes `batches` to a new Parquet file at `path` (zstd); returns its
/// rows and its distinct users and products.
fn write_parquet(path: &Path, schema: SchemaRef, batches: &[RecordBatch]) -> Result<(u64, u64, u64), ExportError> {
    let file = std::fs::File::create(path).map_err(io(path))?;
    let props = WriterProperties::builder().set_compression(Compression::ZSTD(ZstdLevel::default())).build();
    let mut writer = ArrowWriter::try_new(file, schema, Some(props))?;
    let (mut users, mut products, mut rows) = (HashSet::new(), HashSet::new(), 0u64);
    for b in batches {
        writer.write(b)?;
        rows += b.num_rows() as u64;
        collect_distinct(b, "user_id", &mut users);
        collect_distinct(b, "product_id", &mut products);
    }
    writer.close()?;
    Ok((rows, users.len() as u64, products.len() as u64))
}

/// Sessions in `batches`: rows whose `position` is 1.
fn count_sessions(batches: &[RecordBatch]) -> u64 {
    use arrow::array::AsArray;
    batches
        .iter()
        .filter_map(|b| b.column_by_name("position"))
        .map(|c| c.as_primitive::<arrow::datatypes::Int64Type>().iter().filter(|p| *p == Some(1)).count() as u64)
        .sum()
}

/// Writes [`SESSIONS_FILE`] from the `events` registered in `ctx`, without
/// forgotten users, streaming the sorted events into the file.
async fn write_sessions(ctx: &SessionContext, out: &Path, forgotten: &Forgotten) -> Result<SessionsPart, ExportError> {
    use futures::StreamExt;
    let df = ctx.sql(SESSIONS_SQL).await?;
    let schema = plain_schema(df.schema().as_arrow());
    let path = out.join(SESSIONS_FILE);
    let file = std::fs::File::create(&path).map_err(io(&path))?;
    let props = WriterProperties::builder().set_compression(Compression::ZSTD(ZstdLevel::default())).build();
    let mut writer = ArrowWriter::try_new(file, schema, Some(props))?;
    let (mut rows, mut sessions) = (0u64, 0u64);
    let mut stream = df.execute_stream().await?;
    while let Some(b) = stream.next().await {
        let (kept, _) = forgotten.filter_events(plain_strings(&b?)?)?;
        rows += kept.num_rows() as u64;
        sessions += count_sessions(std::slice::from_ref(&kept));
        writer.write(&kept)?;
    }
    writer.close()?;
    let columns = SESSION_COLUMNS
        .iter()
        .map(|(name, definition)| ManifestColumn { name: (*name).into(), definition: (*definition).into() })
        .collect();
    Ok(SessionsPart { file: SESSIONS_FILE.into(), rows, sessions, columns })
}

/// What [`scrub`] found among the registered exports.
#[derive(Debug, Clone, Default)]
pub struct Scrubbed {
    /// Each export written before the request: its folder and how many of
    /// its rows were the users' (rewritten without them when more than 0).
    pub checked: Vec<(String, u64)>,
    /// Registered exports whose data file is gone.
    pub missing: Vec<String>,
}

/// Rewrites, without `ids`' rows, every registered export written before
/// the forgotten set reached `version` (the caller holds the lake fence
/// exclusively); they are marked as of `version` afterwards.
pub async fn scrub(pool: &PgPool, ids: &[String], version: i64) -> Result<Scrubbed, ExportError> {
    let exports: Vec<(i64, String)> = sqlx::query_as(
        "SELECT export_id, location FROM ops.training_exports WHERE forgotten_version < $1 ORDER BY export_id",
    )
    .bind(version)
    .fetch_all(pool)
    .await?;
    let users: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut scrubbed = Scrubbed::default();
    for (export_id, location) in exports {
        let dir = PathBuf::from(&location);
        let data = dir.join(DATA_FILE);
        if !data.exists() {
            scrubbed.missing.push(location);
            continue;
        }
        let (kept, removed) = read_without(&data, &users)?;
        let rows: u64 = kept.iter().map(|b| b.num_rows() as u64).sum();
        let sessions = dir.join(SESSIONS_FILE);
        let (sessions_kept, sessions_removed) =
            if sessions.exists() { read_without(&sessions, &users)? } else { (Vec::new(), 0) };
        if removed > 0 || sessions_removed > 0 {
            rewrite(&dir, &kept, (sessions_removed > 0).then_some(sessions_kept.as_slice()), version)?;
        }
        sqlx::query(
            "UPDATE ops.training_exports SET forgotten_version = $2, rows = $3,
                 rewritten_at = CASE WHEN $4 THEN now() ELSE rewritten_at END
             WHERE export_id = $1",
        )
        .bind(export_id)
        .bind(version)
        .bind(rows as i64)
        .bind(removed > 0)
        .execute(pool)
        .await?;
        if removed > 0 {
            tracing::info!(export_id, location, removed, "export rewritten without forgotten users");
        }
        scrubbed.checked.push((location, removed));
    }
    Ok(scrubbed)
}

/// Per registered export that still exists, how many rows of `ids` it holds.
pub async fn holding(pool: &PgPool, ids: &[String]) -> Result<Vec<(String, u64)>, ExportError> {
    let locations: Vec<String> =
        sqlx::query_scalar("SELECT location FROM ops.training_exports ORDER BY export_id").fetch_all(pool).await?;
    let users: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut out = Vec::new();
    for location in locations {
        let data = PathBuf::from(&location).join(DATA_FILE);
        if data.exists() {
            let (_, held) = read_without(&data, &users)?;
            let sessions = PathBuf::from(&location).join(SESSIONS_FILE);
            let (_, in_sessions) = if sessions.exists() { read_without(&sessions, &users)? } else { (Vec::new(), 0) };
            out.push((location, held + in_sessions));
        }
    }
    Ok(out)
}

/// The batches of a data file without the rows of `users`, and how many
/// rows that left out.
fn read_without(path: &Path, users: &HashSet<&str>) -> Result<(Vec<RecordBatch>, u64), ExportError> {
    use arrow::array::{AsArray, BooleanArray};
    let file = std::fs::File::open(path).map_err(io(path))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)?.build()?;
    let mut kept = Vec::new();
    let mut removed = 0u64;
    for b in reader {
        let b = b?;
        let ids = arrow::compute::cast(
            b.column_by_name("user_id").ok_or_else(|| ExportError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::other("no user_id column"),
            })?,
            &DataType::Utf8,
        )?;
        let ids = ids.as_string::<i32>();
        let keep: BooleanArray = ids.iter().map(|u| Some(!u.is_some_and(|u| users.contains(u)))).collect();
        removed += keep.false_count() as u64;
        kept.push(arrow::compute::filter_record_batch(&b, &keep)?);
    }
    Ok((kept, removed))
}

/// Replaces an export's data file with `batches`, and its session
/// sequences with `sessions` when given (each written aside, then renamed
/// over the old one), and updates its manifest.
fn rewrite(
    dir: &Path,
    batches: &[RecordBatch],
    sessions: Option<&[RecordBatch]>,
    version: i64,
) -> Result<(), ExportError> {
    let replace = |name: &str, batches: &[RecordBatch]| -> Result<Option<(u64, u64, u64)>, ExportError> {
        let Some(schema) = batches.first().map(RecordBatch::schema) else { return Ok(None) };
        let (path, aside) = (dir.join(name), dir.join(format!("{name}.rewrite")));
        let counts = write_parquet(&aside, schema, batches)?;
        std::fs::rename(&aside, &path).map_err(io(&path))?;
        Ok(Some(counts))
    };
    let data = replace(DATA_FILE, batches)?;
    let sessions = match sessions {
        Some(s) => replace(SESSIONS_FILE, s)?.map(|(rows, _, _)| (rows, count_sessions(s))),
        None => None,
    };
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read(&path).map_err(io(&path))?;
    let mut manifest: Manifest =
        serde_json::from_slice(&text).map_err(|source| ExportError::Manifest { path: path.clone(), source })?;
    if let Some((rows, users, products)) = data {
        manifest.rows = rows;
        manifest.users = users;
        manifest.products = products;
    }
    if let (Some((rows, sessions)), Some(part)) = (sessions, manifest.sessions.as_mut()) {
        part.rows = rows;
        part.sessions = sessions;
    }
    manifest.forgotten_version = version;
    manifest.rewritten_at = Some(Utc::now());
    write_manifest(dir, &manifest)
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
