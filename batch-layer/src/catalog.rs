//! The product catalog: a consistent, read-only snapshot of the shop's
//! `products` table, kept in the lake as the Delta table `products`.
//!
//! The shop's database is someone else's production system (often a
//! replica), so the snapshot is one `REPEATABLE READ READ ONLY` transaction
//! with a statement timeout: it sees one consistent state and can never hold
//! the shop up. Each snapshot overwrites the Delta table (its history keeps
//! the earlier ones). The catalog's column list is fingerprinted; a change
//! is recorded in `ops.catalog_schema` and reported in `ops.notifications`.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, Int64Builder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder};
use arrow::datatypes::SchemaRef;
use chrono::{DateTime, Utc};
use deltalake::protocol::SaveMode;
use serde_json::json;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, PgPool, Row};

use crate::lake::{Lake, LakeError, PRODUCTS_TABLE};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("shop database {url}: {source}")]
    Shop { url: String, source: sqlx::Error },
    #[error("the shop database has no `products` table with product_id, name, category, price_cents, updated_at")]
    NoProducts,
    #[error(transparent)]
    Lake(#[from] LakeError),
    #[error("writing the Delta table products: {0}")]
    Delta(#[from] deltalake::DeltaTableError),
    #[error("building the catalog batch: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("recording the catalog schema: {0}")]
    Ops(#[from] sqlx::Error),
}

/// What a snapshot found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogSnapshot {
    pub products: usize,
    pub columns: Vec<(String, String)>,
    /// The column list differs from the one the last run saw.
    pub schema_changed: bool,
    /// Why the shop's table cannot be read (a needed column dropped,
    /// renamed or retyped): the lake keeps the last good catalog.
    pub broken: Option<String>,
}

/// The columns a snapshot needs, and the types each may have.
const NEEDED: &[(&str, &[&str])] = &[
    ("product_id", &[]),
    ("name", &[]),
    ("category", &[]),
    ("price_cents", &["smallint", "integer", "bigint", "numeric"]),
    ("updated_at", &["timestamp with time zone", "timestamp without time zone", "date"]),
];

/// What makes `columns` unreadable as the catalog, if anything. Text
/// columns take any type (everything casts to text); numbers and times
/// must stay numbers and times.
pub fn breaking(columns: &[(String, String)]) -> Option<String> {
    let problems: Vec<String> = NEEDED
        .iter()
        .filter_map(|(name, types)| match columns.iter().find(|(c, _)| c == name) {
            None => Some(format!("column {name} is missing (dropped or renamed)")),
            Some((_, t)) if !types.is_empty() && !types.contains(&t.as_str()) => {
                Some(format!("column {name} is now {t}, not one of {}", types.join(", ")))
            }
            Some(_) => None,
        })
        .collect();
    (!problems.is_empty()).then(|| problems.join("; "))
}

/// Columns of the lake's `products` table.
pub fn schema() -> SchemaRef {
    shared_schema::schema::catalog_schema()
}

/// Takes the snapshot, writes it to the lake and records its schema.
pub async fn snapshot(shop_url: &str, lake: &Lake, ops: &PgPool) -> Result<CatalogSnapshot, CatalogError> {
    let shop = |source| CatalogError::Shop { url: platform::db::redact(shop_url), source };
    let options: PgConnectOptions = shop_url.parse().map_err(shop)?;
    let mut conn = tokio::time::timeout(Duration::from_secs(10), PgConnection::connect_with(&options))
        .await
        .map_err(|_| shop(sqlx::Error::PoolTimedOut))?
        .map_err(shop)?;
    let mut tx = conn.begin().await.map_err(shop)?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await.map_err(shop)?;
    sqlx::query("SET LOCAL statement_timeout = '30s'").execute(&mut *tx).await.map_err(shop)?;
    let columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT column_name::text, data_type::text FROM information_schema.columns
         WHERE table_schema = current_schema() AND table_name = 'products' ORDER BY ordinal_position",
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(shop)?;
    if columns.is_empty() {
        return Err(CatalogError::NoProducts);
    }
    let fingerprint = columns.iter().map(|(c, t)| format!("{c}:{t}")).collect::<Vec<_>>().join(",");
    let previous: Option<String> =
        sqlx::query_scalar("SELECT fingerprint FROM ops.catalog_schema ORDER BY id DESC LIMIT 1")
            .fetch_optional(ops)
            .await?;
    if let Some(problem) = breaking(&columns) {
        drop(tx);
        // Recorded and notified once per broken column list; the lake's
        // catalog is left as the last good snapshot wrote it.
        let new = previous.as_ref() != Some(&fingerprint);
        if new {
            record_schema(ops, &fingerprint, &columns, 0).await?;
            tracing::error!(%problem, "the shop's products table changed incompatibly; keeping the last good catalog");
            sqlx::query(
                "INSERT INTO ops.notifications (kind, severity, summary, details) VALUES ('catalog_schema_broken', 'critical', $1, $2)",
            )
            .bind(format!("The shop's products table can no longer be read ({problem}); the last good catalog stays"))
            .bind(json!({"problem": problem, "before": previous, "after": fingerprint}))
            .execute(ops)
            .await?;
        }
        return Ok(CatalogSnapshot { products: 0, columns, schema_changed: new, broken: Some(problem) });
    }
    let rows = sqlx::query(
        "SELECT product_id::text, name::text, category::text, price_cents::bigint, updated_at::timestamptz
         FROM products ORDER BY product_id",
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(shop)?;
    tx.commit().await.map_err(shop)?;

    let mut id = StringBuilder::new();
    let mut name = StringBuilder::new();
    let mut category = StringBuilder::new();
    let mut price = Int64Builder::new();
    let mut updated = TimestampMicrosecondBuilder::new().with_timezone("UTC");
    for r in &rows {
        id.append_value(r.get::<String, _>(0));
        name.append_option(r.get::<Option<String>, _>(1));
        category.append_option(r.get::<Option<String>, _>(2));
        price.append_option(r.get::<Option<i64>, _>(3));
        updated.append_option(r.get::<Option<DateTime<Utc>>, _>(4).map(|t| t.timestamp_micros()));
    }
    let batch = RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(id.finish()),
            Arc::new(name.finish()),
            Arc::new(category.finish()),
            Arc::new(price.finish()),
            Arc::new(updated.finish()),
        ],
    )?;
    // Written only when the content changed, so an unchanged catalog keeps
    // its Delta version and runs do not republish `batch.products`.
    let content = content_fingerprint(&batch);
    let table = lake.open_or_create(PRODUCTS_TABLE, &schema(), &[]).await?;
    if written_content(&table).await.as_deref() != Some(content.as_str()) {
        let properties = deltalake::kernel::transaction::CommitProperties::default()
            .with_metadata([(CONTENT_KEY.to_string(), json!(content))]);
        table.write(vec![batch]).with_save_mode(SaveMode::Overwrite).with_commit_properties(properties).await?;
    }

    let schema_changed = previous.as_ref().is_some_and(|p| *p != fingerprint);
    if previous.as_ref() != Some(&fingerprint) {
        record_schema(ops, &fingerprint, &columns, rows.len()).await?;
    }
    if schema_changed {
        tracing::warn!(before = ?previous, after = %fingerprint, "the catalog's schema changed in the shop database");
        sqlx::query(
            "INSERT INTO ops.notifications (kind, severity, summary, details)
             VALUES ('catalog_schema_changed', 'warning', 'The products table of the shop database changed its columns', $1)",
        )
        .bind(json!({"before": previous, "after": fingerprint}))
        .execute(ops)
        .await?;
    }
    Ok(CatalogSnapshot { products: rows.len(), columns, schema_changed, broken: None })
}

/// Where a catalog commit records the fingerprint of what it wrote.
const CONTENT_KEY: &str = "lambda.catalog.content";

/// SHA-256 of the snapshot's rows (in product order, as read).
fn content_fingerprint(batch: &RecordBatch) -> String {
    let mut text = String::new();
    for column in batch.columns() {
        let formatter = arrow::util::display::ArrayFormatter::try_new(column.as_ref(), &Default::default());
        for row in 0..batch.num_rows() {
            match (&formatter, column.is_null(row)) {
                (_, true) => text.push_str("\u{0}null"),
                (Ok(f), false) => text.push_str(&f.value(row).to_string()),
                (Err(_), false) => text.push('?'),
            }
            text.push('\u{1}');
        }
        text.push('\u{2}');
    }
    platform::oversize::sha256_hex(text.as_bytes())
}

/// The content fingerprint the table's newest commit recorded, if it was a
/// catalog snapshot's.
async fn written_content(table: &deltalake::DeltaTable) -> Option<String> {
    use futures::StreamExt;
    let newest = table.history(Some(1)).next().await?.ok()?;
    newest.info.get(CONTENT_KEY).and_then(|v| v.as_str()).map(str::to_string)
}

async fn record_schema(
    ops: &PgPool,
    fingerprint: &str,
    columns: &[(String, String)],
    products: usize,
) -> Result<(), sqlx::Error> {
    let cols = json!(columns.iter().map(|(c, t)| json!({"column": c, "type": t})).collect::<Vec<_>>());
    sqlx::query("INSERT INTO ops.catalog_schema (fingerprint, columns, products) VALUES ($1, $2, $3)")
        .bind(fingerprint)
        .bind(&cols)
        .bind(products as i64)
        .execute(ops)
        .await
        .map(drop)
}
