//! Imported model outputs: `serving-layer import-recommendations
//! FILE.parquet --model-version V`.
//!
//! A data scientist's model writes a Parquet file with columns `user_id`,
//! `product_id`, `score` and optionally `rank` (1 = best; without it the
//! rank follows the score, highest first). The import checks every row
//! before touching the database, then replaces the contents of
//! `serving.model_recommendations` in one transaction: readers see the old
//! model or the new one, never a mix, and never wait (the replacement
//! deletes and inserts rows instead of truncating). Each import is recorded
//! in `ops.model_imports`.

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use sqlx::PgPool;

use crate::ids;

/// Longest accepted model version label.
pub const MAX_VERSION_BYTES: usize = 128;
/// Longest validity an import may give its rows.
pub const MAX_VALIDITY: std::time::Duration = std::time::Duration::from_secs(366 * 24 * 3600);
/// Validity of an import's rows when `--valid-for` is not given.
pub const DEFAULT_VALIDITY: &str = "7d";

/// [`DEFAULT_VALIDITY`] as a duration.
pub fn default_validity() -> std::time::Duration {
    humantime::parse_duration(DEFAULT_VALIDITY).expect("the default validity parses")
}
/// Rows per INSERT statement into the staging table.
const CHUNK: usize = 20_000;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("--model-version must be 1 to {MAX_VERSION_BYTES} bytes without control characters")]
    Version,
    #[error("--valid-for must be more than 0 and at most 366 days (e.g. 7d, 36h)")]
    Validity,
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a readable Parquet file: {source}")]
    Parquet { path: PathBuf, source: parquet::errors::ParquetError },
    #[error("{path} has no column {column:?} (needs user_id, product_id, score and optionally rank; found {found})")]
    MissingColumn { path: PathBuf, column: &'static str, found: String },
    #[error("{path}: column {column:?} is {found}, expected {expected}")]
    ColumnType { path: PathBuf, column: &'static str, found: DataType, expected: &'static str },
    #[error("{path}: row {row}: {problem}")]
    Row { path: PathBuf, row: usize, problem: String },
    #[error("{path} has no rows; refusing to replace the model's recommendations with nothing")]
    Empty { path: PathBuf },
    #[error("{path}: a user has the same {what} twice ({detail}); each user needs distinct products and ranks")]
    Duplicate { path: PathBuf, what: &'static str, detail: String },
    #[error("writing the recommendations to PostgreSQL failed: {0}")]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Forgotten(#[from] platform::forgotten::ForgetError),
}

/// What an import did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportSummary {
    /// Rows and users imported.
    pub rows: usize,
    pub users: usize,
    /// Rows and users of the file left out because the users are forgotten.
    pub dropped_rows: usize,
    pub dropped_users: usize,
    /// When the recommender stops serving the rows.
    pub valid_until: chrono::DateTime<chrono::Utc>,
}

impl Rows {
    /// Drops the rows of forgotten users; returns (rows, users) dropped.
    fn drop_forgotten(&mut self, forgotten: &platform::forgotten::Forgotten) -> (usize, usize) {
        if forgotten.is_empty() {
            return (0, 0);
        }
        let mut verdicts: std::collections::HashMap<&str, bool> = std::collections::HashMap::new();
        let keep: Vec<bool> = self
            .user_id
            .iter()
            .map(|u| !*verdicts.entry(u.as_str()).or_insert_with(|| forgotten.contains(u)))
            .collect();
        let users = verdicts.values().filter(|f| **f).count();
        let rows = keep.iter().filter(|k| !**k).count();
        if rows == 0 {
            return (0, 0);
        }
        fn retain<T>(v: &mut Vec<T>, keep: &[bool]) {
            let mut i = 0;
            v.retain(|_| {
                i += 1;
                keep[i - 1]
            });
        }
        retain(&mut self.user_id, &keep);
        retain(&mut self.product_id, &keep);
        retain(&mut self.score, &keep);
        if !self.rank.is_empty() {
            retain(&mut self.rank, &keep);
        }
        (rows, users)
    }
}

/// The file's rows, column by column.
#[derive(Debug, Default)]
struct Rows {
    user_id: Vec<String>,
    product_id: Vec<String>,
    score: Vec<f64>,
    /// Empty when the file has no `rank` column.
    rank: Vec<i64>,
}

fn column_type_ok(column: &str, t: &DataType) -> bool {
    match column {
        "user_id" | "product_id" => matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View),
        "score" => t.is_numeric(),
        _ => t.is_integer(),
    }
}

/// Reads and checks the whole file (blocking I/O).
fn read(path: &Path) -> Result<Rows, ImportError> {
    let file = File::open(path).map_err(|source| ImportError::Open { path: path.to_owned(), source })?;
    let parquet_err = |source| ImportError::Parquet { path: path.to_owned(), source };
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(parquet_err)?;
    let schema = builder.schema().clone();
    let found = schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ");
    let mut wanted: Vec<&'static str> = Vec::new();
    for column in ["user_id", "product_id", "score", "rank"] {
        match schema.field_with_name(column) {
            Ok(field) => {
                if !column_type_ok(column, field.data_type()) {
                    let expected = match column {
                        "user_id" | "product_id" => "a string",
                        "score" => "a number",
                        _ => "an integer",
                    };
                    return Err(ImportError::ColumnType {
                        path: path.to_owned(),
                        column,
                        found: field.data_type().clone(),
                        expected,
                    });
                }
                wanted.push(column);
            }
            Err(_) if column == "rank" => {}
            Err(_) => return Err(ImportError::MissingColumn { path: path.to_owned(), column, found }),
        }
    }
    let has_rank = wanted.contains(&"rank");
    let indices: Vec<usize> = wanted.iter().filter_map(|c| schema.index_of(c).ok()).collect();
    let mask = ProjectionMask::roots(builder.parquet_schema(), indices);
    let reader = builder.with_projection(mask).build().map_err(parquet_err)?;

    let mut rows = Rows::default();
    for batch in reader {
        let batch = batch.map_err(|e| ImportError::Parquet { path: path.to_owned(), source: e.into() })?;
        append(path, &batch, has_rank, &mut rows)?;
    }
    if rows.user_id.is_empty() {
        return Err(ImportError::Empty { path: path.to_owned() });
    }
    Ok(rows)
}

fn append(path: &Path, batch: &RecordBatch, has_rank: bool, rows: &mut Rows) -> Result<(), ImportError> {
    let first_row = rows.user_id.len() + 1;
    let bad = |i: usize, problem: String| ImportError::Row { path: path.to_owned(), row: first_row + i, problem };
    let column = |name: &'static str, to: &DataType| {
        let array = batch.column_by_name(name).ok_or_else(|| ImportError::MissingColumn {
            path: path.to_owned(),
            column: name,
            found: String::new(),
        })?;
        cast(array, to).map_err(|e| ImportError::Parquet { path: path.to_owned(), source: e.into() })
    };
    let users = column("user_id", &DataType::Utf8)?;
    let products = column("product_id", &DataType::Utf8)?;
    let scores = column("score", &DataType::Float64)?;
    let (users, products, scores) =
        (users.as_string::<i32>(), products.as_string::<i32>(), scores.as_primitive::<Float64Type>());
    let ranks = if has_rank { Some(column("rank", &DataType::Int64)?) } else { None };
    let ranks = ranks.as_ref().map(|r| r.as_primitive::<Int64Type>());
    for i in 0..batch.num_rows() {
        for (name, array) in [("user_id", users), ("product_id", products)] {
            if array.is_null(i) {
                return Err(bad(i, format!("{name} is null")));
            }
            ids::check(array.value(i)).map_err(|e| bad(i, format!("{name} {:?} {e}", truncate(array.value(i)))))?;
        }
        if scores.is_null(i) || !scores.value(i).is_finite() {
            return Err(bad(i, "score must be a finite number".into()));
        }
        rows.user_id.push(users.value(i).to_owned());
        rows.product_id.push(products.value(i).to_owned());
        rows.score.push(scores.value(i));
        if let Some(ranks) = ranks {
            if ranks.is_null(i) || !(1..=i64::from(i32::MAX)).contains(&ranks.value(i)) {
                return Err(bad(i, "rank must be an integer of at least 1".into()));
            }
            rows.rank.push(ranks.value(i));
        }
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

/// Refuses a validity of zero or past [`MAX_VALIDITY`].
pub fn check_validity(valid_for: std::time::Duration) -> Result<(), ImportError> {
    if valid_for.is_zero() || valid_for > MAX_VALIDITY { Err(ImportError::Validity) } else { Ok(()) }
}

/// Imports `path` as model `version`, replacing the previous model's rows
/// atomically, without the users forgotten in `pool` (hashed with `key`):
/// a model trained before a `forget-user` cannot bring them back. The
/// forgotten set is read inside the import's transaction, under the forget
/// fence (see [`platform::forgotten`]), so a request either lands before it
/// (and is applied here) or after its commit (and deletes what it wrote).
pub async fn import(
    pool: &PgPool,
    path: &Path,
    version: &str,
    valid_for: std::time::Duration,
    key: Option<&platform::forgotten::ForgetKey>,
) -> Result<ImportSummary, ImportError> {
    if version.is_empty() || version.len() > MAX_VERSION_BYTES || version.chars().any(char::is_control) {
        return Err(ImportError::Version);
    }
    check_validity(valid_for)?;
    let owned = path.to_owned();
    let mut rows = tokio::task::spawn_blocking(move || read(&owned))
        .await
        .map_err(|e| ImportError::Open { path: path.to_owned(), source: std::io::Error::other(e) })??;

    let mut tx = pool.begin().await?;
    // One import at a time; readers (ACCESS SHARE) are not blocked.
    sqlx::query("LOCK TABLE serving.model_recommendations IN SHARE ROW EXCLUSIVE MODE").execute(&mut *tx).await?;
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
        .bind(platform::forgotten::FORGET_FENCE)
        .execute(&mut *tx)
        .await?;
    let forgotten = platform::forgotten::Forgotten::load(&mut *tx, key).await?;
    let (dropped_rows, dropped_users) = rows.drop_forgotten(&forgotten);
    let n = rows.user_id.len();
    sqlx::query(
        "CREATE TEMPORARY TABLE model_import (user_id text, product_id text, score float8, rank bigint) ON COMMIT DROP",
    )
    .execute(&mut *tx)
    .await?;
    for start in (0..n).step_by(CHUNK) {
        let end = (start + CHUNK).min(n);
        let ranks: Option<&[i64]> = (!rows.rank.is_empty()).then(|| &rows.rank[start..end]);
        sqlx::query(
            "INSERT INTO model_import (user_id, product_id, score, rank)
             SELECT u, p, s, r
             FROM unnest($1::text[], $2::text[], $3::float8[]) WITH ORDINALITY AS t(u, p, s, i)
             LEFT JOIN unnest($4::bigint[]) WITH ORDINALITY AS rk(r, j) ON rk.j = t.i",
        )
        .bind(&rows.user_id[start..end])
        .bind(&rows.product_id[start..end])
        .bind(&rows.score[start..end])
        .bind(ranks.unwrap_or(&[]))
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("DELETE FROM serving.model_recommendations").execute(&mut *tx).await?;
    let inserted = sqlx::query(
        "INSERT INTO serving.model_recommendations
             (user_id, rank, product_id, score, model_version, imported_at, valid_until)
         SELECT user_id,
                COALESCE(rank, row_number() OVER (PARTITION BY user_id ORDER BY score DESC, product_id)),
                product_id, score, $1, now(), now() + make_interval(secs => $2)
         FROM model_import",
    )
    .bind(version)
    .bind(valid_for.as_secs_f64())
    .execute(&mut *tx)
    .await;
    if let Err(sqlx::Error::Database(db)) = &inserted
        && db.is_unique_violation()
    {
        let what = if db.constraint().is_some_and(|c| c.contains("product")) { "product_id" } else { "rank" };
        let detail = db
            .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
            .and_then(|pg| pg.detail())
            .unwrap_or_else(|| db.message())
            .to_owned();
        return Err(ImportError::Duplicate { path: path.to_owned(), what, detail });
    }
    inserted?;
    let users: i64 = sqlx::query_scalar("SELECT count(DISTINCT user_id) FROM model_import").fetch_one(&mut *tx).await?;
    let valid_until: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
        "INSERT INTO ops.model_imports (model_version, source_file, users, rows, valid_until)
         VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))
         RETURNING valid_until",
    )
    .bind(version)
    .bind(path.display().to_string())
    .bind(users)
    .bind(n as i64)
    .bind(valid_for.as_secs_f64())
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    // Fresh statistics now, not whenever autovacuum gets to it: readers
    // use generic plans, which are re-planned with them (an empty table's
    // plan would scan instead of using the key).
    sqlx::query("ANALYZE serving.model_recommendations").execute(pool).await?;
    Ok(ImportSummary { rows: n, users: users as usize, dropped_rows, dropped_users, valid_until })
}

/// How often [`export_status`] reads the current model's status.
pub const STATUS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Exports the current model's coverage, age and remaining validity as
/// metrics (see [`crate::telemetry`]) every [`STATUS_EVERY`] until
/// `shutdown`, from `serving.model_status()` (what the last import
/// recorded; nothing per user). A failed read keeps the last figures.
pub async fn export_status(pool: PgPool, shutdown: tokio_util::sync::CancellationToken) {
    type Status =
        (Option<String>, Option<chrono::DateTime<chrono::Utc>>, Option<chrono::DateTime<chrono::Utc>>, Option<i64>);
    let mut tick = tokio::time::interval(STATUS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let status = sqlx::query_as::<_, Status>(
            "SELECT model_version, imported_at, valid_until, users FROM serving.model_status()",
        )
        .fetch_optional(&pool)
        .await;
        match status {
            Ok(row) => {
                failing = false;
                let now = chrono::Utc::now();
                let (users, imported, valid) = match row {
                    Some((Some(_), Some(imported), Some(valid), users)) => {
                        (users.unwrap_or(0), Some(imported), Some(valid))
                    }
                    _ => (0, None, None),
                };
                let seconds = |d: chrono::TimeDelta| d.num_milliseconds() as f64 / 1000.0;
                crate::telemetry::model_status(
                    users,
                    imported.map(|t| seconds(now - t)),
                    valid.map(|t| seconds(t - now)),
                );
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot read the model's status; its metrics keep their last values");
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Float32Array, Int32Array, LargeStringArray, StringArray};
    use parquet::arrow::ArrowWriter;

    use super::*;

    fn write(dir: &Path, columns: Vec<(&str, ArrayRef)>) -> PathBuf {
        let batch = RecordBatch::try_from_iter(columns).unwrap();
        let path = dir.join("model.parquet");
        let mut writer = ArrowWriter::try_new(File::create(&path).unwrap(), batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        path
    }

    fn strings(values: &[&str]) -> ArrayRef {
        Arc::new(StringArray::from(values.to_vec()))
    }

    #[test]
    fn other_string_and_number_types_are_accepted_and_rank_is_optional() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            vec![
                ("extra", strings(&["x", "y"])),
                ("user_id", Arc::new(LargeStringArray::from(vec!["u-1", "u-1"]))),
                ("product_id", strings(&["p-1", "p-2"])),
                ("score", Arc::new(Float32Array::from(vec![0.5, 0.25]))),
            ],
        );
        let rows = read(&path).unwrap();
        assert_eq!(rows.user_id, ["u-1", "u-1"]);
        assert_eq!(rows.product_id, ["p-1", "p-2"]);
        assert_eq!(rows.score, [0.5, 0.25]);
        assert!(rows.rank.is_empty());

        let path = write(
            dir.path(),
            vec![
                ("user_id", strings(&["u-1"])),
                ("product_id", strings(&["p-1"])),
                ("score", Arc::new(Int32Array::from(vec![3]))),
                ("rank", Arc::new(Int32Array::from(vec![1]))),
            ],
        );
        let rows = read(&path).unwrap();
        assert_eq!((rows.score, rows.rank), (vec![3.0], vec![1]));
    }

    #[test]
    fn wrong_columns_and_rows_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            vec![("user_id", strings(&["u-1"])), ("product_id", strings(&["p-1"])), ("score", strings(&["high"]))],
        );
        let e = read(&path).unwrap_err().to_string();
        assert_eq!(e, format!("{}: column \"score\" is Utf8, expected a number", path.display()));

        let path = write(dir.path(), vec![("user", strings(&["u-1"])), ("product_id", strings(&["p-1"]))]);
        let e = read(&path).unwrap_err().to_string();
        assert!(e.contains("has no column \"user_id\"") && e.contains("found user, product_id"), "{e}");

        let nan: ArrayRef = Arc::new(arrow::array::Float64Array::from(vec![1.0, f64::NAN]));
        let path = write(
            dir.path(),
            vec![("user_id", strings(&["u-1", "u-2"])), ("product_id", strings(&["p-1", "p-1"])), ("score", nan)],
        );
        assert_eq!(
            read(&path).unwrap_err().to_string(),
            format!("{}: row 2: score must be a finite number", path.display())
        );

        let rank: ArrayRef = Arc::new(Int32Array::from(vec![0]));
        let score: ArrayRef = Arc::new(Float32Array::from(vec![1.0]));
        let path = write(
            dir.path(),
            vec![("user_id", strings(&["u-1"])), ("product_id", strings(&["p-1"])), ("score", score), ("rank", rank)],
        );
        assert!(read(&path).unwrap_err().to_string().ends_with("row 1: rank must be an integer of at least 1"));

        let null_user: ArrayRef = Arc::new(StringArray::from(vec![Some("u-1"), None]));
        let score: ArrayRef = Arc::new(Float32Array::from(vec![1.0, 1.0]));
        let path =
            write(dir.path(), vec![("user_id", null_user), ("product_id", strings(&["p-1", "p-1"])), ("score", score)]);
        assert!(read(&path).unwrap_err().to_string().ends_with("row 2: user_id is null"));

        let score: ArrayRef = Arc::new(Float32Array::from(Vec::<f32>::new()));
        let path = write(dir.path(), vec![("user_id", strings(&[])), ("product_id", strings(&[])), ("score", score)]);
        assert!(matches!(read(&path), Err(ImportError::Empty { .. })));
    }
}
