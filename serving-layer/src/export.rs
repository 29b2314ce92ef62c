//! `serving-layer export-recommendations`: the top k products of every
//! user, in bulk, for the shop's emails and pages (issue 19, item 5).
//!
//! Each user's list is the one `GET /api/recommendations/{user}` answers
//! at the same moment: the same [`Recommender`] computes it (model outputs,
//! else personalised, padded or replaced by the popular list), except that
//! a database error fails the export instead of turning into a popular
//! list. The users are those the platform knows (`user_product_state` and
//! the imported model outputs), or those of a file.
//!
//! Three targets: a Parquet file, a CSV file (both written aside and
//! renamed into place, so a reader never sees half a file), or a table in
//! the shop's database, replaced in one transaction.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, Float64Array, Int32Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use sqlx::PgPool;

use crate::ids::UserId;
use crate::popular::PopularCache;
use crate::recommend::{K, Recommendations, Recommender};

/// Where the export goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Parquet(PathBuf),
    Csv(PathBuf),
    /// A table (`name` or `schema.name`) in the database at `url`.
    Table {
        url: String,
        table: String,
    },
}

impl Target {
    /// A file target from its extension.
    pub fn file(path: PathBuf) -> Result<Self, ExportError> {
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("parquet") => Ok(Target::Parquet(path)),
            Some("csv") => Ok(Target::Csv(path)),
            _ => Err(ExportError::Usage(format!(
                "--out {} must end in .parquet or .csv (or write a table with --table)",
                path.display()
            ))),
        }
    }

    /// A table target; the name must be a plain or schema-qualified
    /// lowercase identifier (it is written into SQL).
    pub fn table(url: String, table: String) -> Result<Self, ExportError> {
        let parts: Vec<&str> = table.split('.').collect();
        if parts.len() > 2 || !parts.iter().all(|p| shared_schema::view_sql::is_identifier(p)) {
            return Err(ExportError::Usage(format!(
                "--table {table:?} must be a lowercase table name, optionally with its schema (shop.recommendations)"
            )));
        }
        Ok(Target::Table { url, table })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    Usage(String),
    #[error("reading the platform database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("the popular list (which pads short lists) could not be loaded: {0}")]
    Popular(String),
    #[error("user id {0:?} in --users-file: {1}")]
    BadUser(String, crate::ids::InvalidId),
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("writing Parquet to {path}: {source}")]
    Parquet { path: PathBuf, source: parquet::errors::ParquetError },
    #[error("writing the table {table}: {source}")]
    Table { table: String, source: sqlx::Error },
    #[error("the shop's database: {0}")]
    Shop(platform::db::DbError),
    #[error("Arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportSummary {
    pub users: usize,
    pub rows: usize,
    /// Users per answer source (`model`, `blended`, `personalized`, `popular`).
    pub by_source: BTreeMap<&'static str, usize>,
    pub generated_at: DateTime<Utc>,
}

/// One exported row.
struct Row<'a> {
    user_id: &'a str,
    rank: i32,
    product_id: &'a str,
    score: f64,
    source: &'static str,
    model_version: Option<&'a str>,
}

/// Exports the top `k` of every user (or of `users`) to `target`, with
/// `concurrency` users computed at once.
pub async fn export(
    pool: &PgPool,
    k: K,
    users: Option<Vec<UserId>>,
    concurrency: usize,
    target: &Target,
) -> Result<ExportSummary, ExportError> {
    let popular = PopularCache::new();
    popular.reload(pool).await.map_err(|e| ExportError::Popular(e.to_string()))?;
    let recommender = Arc::new(Recommender::new(pool.clone(), popular, Duration::from_secs(60)));
    let users = match users {
        Some(users) => users,
        None => known_users(pool).await?,
    };
    let generated_at = Utc::now();
    let started = Instant::now();
    let total = users.len();
    let mut answers: Vec<Recommendations> = Vec::with_capacity(total);
    let mut stream = futures::stream::iter(users)
        .map(|user| {
            let recommender = Arc::clone(&recommender);
            async move { recommender.recommend_exact(&user, k).await }
        })
        .buffered(concurrency.max(1));
    while let Some(answer) = stream.next().await {
        answers.push(answer?);
        if answers.len().is_multiple_of(10_000) {
            tracing::info!(users = answers.len(), of = total, secs = started.elapsed().as_secs(), "exporting");
        }
    }
    let mut by_source = BTreeMap::new();
    for a in &answers {
        *by_source.entry(a.source.as_str()).or_default() += 1;
    }
    let rows: Vec<Row<'_>> = answers
        .iter()
        .flat_map(|a| {
            a.products.iter().enumerate().map(move |(i, p)| Row {
                user_id: &a.user_id,
                rank: i as i32 + 1,
                product_id: &p.product_id,
                score: p.score,
                source: a.source.as_str(),
                model_version: a.model_version.as_deref(),
            })
        })
        .collect();
    match target {
        Target::Parquet(path) => write_parquet(path, &rows, generated_at)?,
        Target::Csv(path) => write_csv(path, &rows, generated_at)?,
        Target::Table { url, table } => write_table(url, table, &rows, generated_at).await?,
    }
    Ok(ExportSummary { users: answers.len(), rows: rows.len(), by_source, generated_at })
}

/// Every user with interactions or model outputs, sorted by bytes.
async fn known_users(pool: &PgPool) -> Result<Vec<UserId>, ExportError> {
    let mut ids: Vec<String> = sqlx::query_scalar(
        "SELECT user_id FROM serving.user_product_state UNION SELECT user_id FROM serving.model_recommendations",
    )
    .fetch_all(pool)
    .await?;
    // By bytes, whatever the database's collation.
    ids.sort_unstable();
    // Ids in the platform passed the same rule on their way in.
    Ok(ids.iter().filter_map(|id| UserId::parse(id).ok()).collect())
}

/// The user ids of a file, one per line (blank lines skipped).
pub fn read_users(path: &Path) -> Result<Vec<UserId>, ExportError> {
    let text = std::fs::read_to_string(path).map_err(|source| ExportError::Read { path: path.to_owned(), source })?;
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| UserId::parse(l).map_err(|e| ExportError::BadUser(l.chars().take(40).collect(), e)))
        .collect()
}

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Utf8, false),
        Field::new("rank", DataType::Int32, false),
        Field::new("product_id", DataType::Utf8, false),
        Field::new("score", DataType::Float64, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("model_version", DataType::Utf8, true),
        Field::new("generated_at", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), false),
    ]))
}

/// `path` with `.partial` appended: written first, renamed into place.
fn aside(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

fn write_parquet(path: &Path, rows: &[Row<'_>], at: DateTime<Utc>) -> Result<(), ExportError> {
    let tmp = aside(path);
    let columns: Vec<ArrayRef> = vec![
        Arc::new(rows.iter().map(|r| Some(r.user_id)).collect::<StringArray>()),
        Arc::new(rows.iter().map(|r| r.rank).collect::<Int32Array>()),
        Arc::new(rows.iter().map(|r| Some(r.product_id)).collect::<StringArray>()),
        Arc::new(rows.iter().map(|r| r.score).collect::<Float64Array>()),
        Arc::new(rows.iter().map(|r| Some(r.source)).collect::<StringArray>()),
        Arc::new(rows.iter().map(|r| r.model_version).collect::<StringArray>()),
        Arc::new(TimestampMicrosecondArray::from(vec![at.timestamp_micros(); rows.len()]).with_timezone("UTC")),
    ];
    let batch = RecordBatch::try_new(schema(), columns)?;
    let parquet = |source| ExportError::Parquet { path: path.to_owned(), source };
    let file = std::fs::File::create(&tmp).map_err(|source| ExportError::Write { path: tmp.clone(), source })?;
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema(), None).map_err(parquet)?;
    writer.write(&batch).map_err(parquet)?;
    writer.close().map_err(parquet)?;
    std::fs::rename(&tmp, path).map_err(|source| ExportError::Write { path: path.to_owned(), source })
}

/// A CSV field, quoted when it must be (RFC 4180).
fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_string()
    }
}

fn write_csv(path: &Path, rows: &[Row<'_>], at: DateTime<Utc>) -> Result<(), ExportError> {
    use std::io::Write as _;
    let tmp = aside(path);
    let write = |source| ExportError::Write { path: tmp.clone(), source };
    let file = std::fs::File::create(&tmp).map_err(write)?;
    let mut out = std::io::BufWriter::new(file);
    let at = at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    writeln!(out, "user_id,rank,product_id,score,source,model_version,generated_at").map_err(write)?;
    for r in rows {
        writeln!(
            out,
            "{},{},{},{},{},{},{at}",
            csv_field(r.user_id),
            r.rank,
            csv_field(r.product_id),
            r.score,
            r.source,
            r.model_version.map(csv_field).unwrap_or_default()
        )
        .map_err(write)?;
    }
    out.flush().map_err(write)?;
    drop(out);
    std::fs::rename(&tmp, path).map_err(|source| ExportError::Write { path: path.to_owned(), source })
}

/// Replaces `table`'s rows with `rows` in one transaction (created when
/// missing), so the shop reads the previous export or this one, whole.
async fn write_table(url: &str, table: &str, rows: &[Row<'_>], at: DateTime<Utc>) -> Result<(), ExportError> {
    let failed = |source| ExportError::Table { table: table.to_string(), source };
    let pool = platform::db::connect(url, 1, Duration::from_secs(30)).await.map_err(ExportError::Shop)?;
    let mut tx = pool.begin().await.map_err(failed)?;
    let ddl = format!(
        "CREATE TABLE IF NOT EXISTS {table} (
            user_id       text NOT NULL,
            rank          integer NOT NULL,
            product_id    text NOT NULL,
            score         double precision NOT NULL,
            source        text NOT NULL,
            model_version text,
            generated_at  timestamptz NOT NULL,
            PRIMARY KEY (user_id, rank)
        )"
    );
    sqlx::query(sqlx::AssertSqlSafe(ddl)).execute(&mut *tx).await.map_err(failed)?;
    sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {table}"))).execute(&mut *tx).await.map_err(failed)?;
    let insert = format!(
        "INSERT INTO {table} (user_id, rank, product_id, score, source, model_version, generated_at)
         SELECT u, r, p, s, src, v, $7 FROM unnest($1::text[], $2::int[], $3::text[], $4::float8[], $5::text[], $6::text[])
             AS t(u, r, p, s, src, v)"
    );
    for chunk in rows.chunks(50_000) {
        sqlx::query(sqlx::AssertSqlSafe(insert.clone()))
            .bind(chunk.iter().map(|r| r.user_id).collect::<Vec<_>>())
            .bind(chunk.iter().map(|r| r.rank).collect::<Vec<_>>())
            .bind(chunk.iter().map(|r| r.product_id).collect::<Vec<_>>())
            .bind(chunk.iter().map(|r| r.score).collect::<Vec<_>>())
            .bind(chunk.iter().map(|r| r.source).collect::<Vec<_>>())
            .bind(chunk.iter().map(|r| r.model_version).collect::<Vec<_>>())
            .bind(at)
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
    }
    tx.commit().await.map_err(failed)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_named_by_extension_or_table() {
        assert_eq!(Target::file("a/b.parquet".into()).unwrap(), Target::Parquet("a/b.parquet".into()));
        assert_eq!(Target::file("b.CSV".into()).unwrap(), Target::Csv("b.CSV".into()));
        assert!(Target::file("b.json".into()).unwrap_err().to_string().contains("must end in .parquet or .csv"));
        assert!(Target::table("u".into(), "shop.recs".into()).is_ok());
        for bad in ["Recs", "a.b.c", "recs; DROP TABLE x", ""] {
            assert!(Target::table("u".into(), bad.into()).is_err(), "{bad}");
        }
    }

    #[test]
    fn csv_fields_are_quoted_when_they_must_be() {
        assert_eq!(csv_field("u-1"), "u-1");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
