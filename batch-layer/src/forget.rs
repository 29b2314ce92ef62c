//! `batch-layer forget-user USER_ID`: the GDPR right to erasure.
//!
//! In this order, so that a crash at any step leaves the user at least
//! blocked and a re-run finishes the job (every step is idempotent):
//!
//! 1. record HMAC-SHA256(`FORGET_KEY`, id) in `ops.forgotten_users` (never
//!    the id): from their next flush the ingest and the speed layer drop
//!    the user's events;
//! 2. Delta DELETE of the user's rows in the lake tables `events` (by
//!    `user_id`) and `events_rejected` (records whose Kafka key or bytes
//!    name the user, deleted by their Kafka position);
//! 3. VACUUM: the files the delete replaced, at once (retention 0), and
//!    files no commit references (left by killed writers) once older than
//!    a grace period that protects a concurrent ingest's uncommitted files;
//! 4. a checkpoint, then every older log entry is removed: old commits
//!    carry per-file min/max statistics (which can be the user's id) and
//!    the delete's own predicate. Time travel to before the forget ends
//!    here, which is the point;
//! 5. one PostgreSQL transaction deletes the user from every `batch.*`,
//!    `speed.*` and `serving.*` table that has a `user_id` column (found in
//!    `information_schema`, so a new user-level table is covered without a
//!    change here) and marks the request complete.
//!
//! The recompute reads the lake, which no longer holds the user; the demand
//! views keep anonymous aggregates (see `docs/PRIVACY.md`).

use std::collections::BTreeMap;
use std::time::Duration;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Int32Type, Int64Type};
use datafusion::prelude::SessionContext;
use deltalake::DeltaTable;
use deltalake::operations::vacuum::VacuumMode;
use platform::forgotten::{ForgetKey, Forgotten, rejected_user_ids};
use serde_json::json;
use shared_schema::schema::{col, rejected_col};
use sqlx::{AssertSqlSafe, PgPool};

use crate::lake::{self, EVENTS_TABLE, Lake, LakeError, REJECTED_TABLE};

/// What `forget-user` needs.
#[derive(Debug, Clone)]
pub struct ForgetConfig {
    pub database_url: String,
    pub lake: Lake,
    pub key: ForgetKey,
    /// Files no commit references are removed once older than this (a
    /// concurrent ingest's files are younger until it commits).
    pub orphan_grace: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ForgetUserError {
    #[error("the user id is empty")]
    EmptyId,
    #[error(transparent)]
    Db(#[from] platform::db::DbError),
    #[error(transparent)]
    Forgotten(#[from] platform::forgotten::ForgetError),
    #[error("PostgreSQL: {0}")]
    Sql(#[from] sqlx::Error),
    #[error(transparent)]
    Lake(Box<LakeError>),
    #[error("Delta table {table}: {step}: {source}")]
    Delta { table: &'static str, step: &'static str, source: Box<deltalake::DeltaTableError> },
    #[error("scanning Delta table {table}: {source}")]
    Scan { table: &'static str, source: Box<datafusion::error::DataFusionError> },
}

impl From<LakeError> for ForgetUserError {
    fn from(e: LakeError) -> Self {
        Self::Lake(Box::new(e))
    }
}

/// What a forget did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForgetReport {
    /// The keyed hash recorded in `ops.forgotten_users`.
    pub user_hash: String,
    /// The user had been forgotten before (this is a re-run).
    pub repeated: bool,
    /// Rows deleted per lake table and per PostgreSQL table.
    pub lake_rows: BTreeMap<String, u64>,
    pub table_rows: BTreeMap<String, u64>,
    /// Data files and log files removed from the lake.
    pub files_removed: u64,
    pub log_files_removed: u64,
}

impl ForgetReport {
    /// The one line `forget-user` prints (no id, only the hash).
    pub fn summary(&self) -> String {
        let rows = |m: &BTreeMap<String, u64>| {
            if m.is_empty() {
                "none".to_string()
            } else {
                m.iter().map(|(t, n)| format!("{t} {n}")).collect::<Vec<_>>().join(", ")
            }
        };
        format!(
            "forgot user {} ({}): lake rows deleted: {}; table rows deleted: {}; {} data files and {} log files removed from the lake",
            &self.user_hash[..16],
            if self.repeated { "again" } else { "first request" },
            rows(&self.lake_rows),
            rows(&self.table_rows),
            self.files_removed,
            self.log_files_removed,
        )
    }
}

/// Forgets `user_id` everywhere (see the module docs).
pub async fn forget_user(config: &ForgetConfig, user_id: &str) -> Result<ForgetReport, ForgetUserError> {
    if user_id.trim().is_empty() {
        return Err(ForgetUserError::EmptyId);
    }
    let pool = platform::db::connect(&config.database_url, 2, Duration::from_secs(30)).await?;
    platform::db::prepare(&pool, None).await?;
    // Refuses a key other than the one earlier requests were hashed with.
    Forgotten::load(&pool, Some(&config.key)).await?;
    // No batch run may overlap: one that pinned its snapshot before the
    // delete would publish the user's rows again after it. Wait for a
    // running one to finish; runs that start meanwhile find the lock taken.
    let mut lock = pool.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock($1)").bind(crate::recompute::RUN_LOCK).execute(&mut *lock).await?;
    let outcome = forget_locked(config, &pool, user_id).await;
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)").bind(crate::recompute::RUN_LOCK).execute(&mut *lock).await;
    outcome
}

async fn forget_locked(config: &ForgetConfig, pool: &PgPool, user_id: &str) -> Result<ForgetReport, ForgetUserError> {
    let pool = pool.clone();
    let user_hash = config.key.hash(user_id);
    let requests: i32 = sqlx::query_scalar(
        "INSERT INTO ops.forgotten_users (user_hash, key_id) VALUES ($1, $2)
         ON CONFLICT (user_hash) DO UPDATE SET requests = ops.forgotten_users.requests + 1,
             last_requested_at = now(), completed_at = NULL
         RETURNING requests",
    )
    .bind(&user_hash)
    .bind(config.key.id())
    .fetch_one(&pool)
    .await?;
    let mut report = ForgetReport { user_hash: user_hash.clone(), repeated: requests > 1, ..Default::default() };

    for name in [EVENTS_TABLE, REJECTED_TABLE] {
        let Some(table) = config.lake.open(name).await? else { continue };
        let (table, deleted) = delete_user_rows(table, name, user_id).await?;
        report.lake_rows.insert(name.to_string(), deleted);
        let (files, logs) = purge(table, name, config.orphan_grace).await?;
        report.files_removed += files;
        report.log_files_removed += logs;
    }

    report.table_rows = delete_from_tables(&pool, user_id, &user_hash, &report).await?;
    tracing::info!(user_hash = %&user_hash[..16], lake = ?report.lake_rows, tables = ?report.table_rows, "user forgotten");
    Ok(report)
}

/// Deletes the user's rows of one lake table; returns the table after the
/// delete and how many rows went.
async fn delete_user_rows(
    table: DeltaTable,
    name: &'static str,
    user_id: &str,
) -> Result<(DeltaTable, u64), ForgetUserError> {
    let predicate = if name == EVENTS_TABLE {
        Some(datafusion::prelude::col(col::USER_ID).eq(datafusion::prelude::lit(user_id)))
    } else {
        rejected_predicate(&table, user_id).await?
    };
    let Some(predicate) = predicate else {
        return Ok((table, 0));
    };
    let (table, metrics) = table.delete().with_predicate(predicate).await.map_err(|source| ForgetUserError::Delta {
        table: name,
        step: "delete",
        source: Box::new(source),
    })?;
    Ok((table, metrics.num_deleted_rows.unwrap_or_default() as u64))
}

/// A predicate selecting, by Kafka position, the rejected records that
/// name the user in their key or bytes; `None` when there are none.
async fn rejected_predicate(
    table: &DeltaTable,
    user_id: &str,
) -> Result<Option<datafusion::prelude::Expr>, ForgetUserError> {
    use rejected_col::{KAFKA_KEY, KAFKA_OFFSET, KAFKA_PARTITION, PAYLOAD};
    let ctx = SessionContext::new();
    lake::register(&ctx, REJECTED_TABLE, table).await?;
    let sql = format!("SELECT {KAFKA_PARTITION}, {KAFKA_OFFSET}, {KAFKA_KEY}, {PAYLOAD} FROM {REJECTED_TABLE}");
    let scan = |source| ForgetUserError::Scan { table: REJECTED_TABLE, source: Box::new(source) };
    let batches = ctx.sql(&sql).await.map_err(scan)?.collect().await.map_err(scan)?;
    // The id as a JSON string also catches bytes that no longer parse.
    let quoted = serde_json::to_string(user_id).unwrap_or_default().into_bytes();
    let mut positions: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for b in &batches {
        // The Delta provider may hand out view types; read plain arrays.
        let cast = |i: usize, to: &DataType| {
            arrow::compute::cast(b.column(i), to)
                .map_err(|e| ForgetUserError::Scan { table: REJECTED_TABLE, source: Box::new(e.into()) })
        };
        let (partition, offset) = (cast(0, &DataType::Int32)?, cast(1, &DataType::Int64)?);
        let (key, payload) = (cast(2, &DataType::Binary)?, cast(3, &DataType::Binary)?);
        let partition = partition.as_primitive::<Int32Type>();
        let offset = offset.as_primitive::<Int64Type>();
        let key = key.as_binary::<i32>();
        let payload = payload.as_binary::<i32>();
        for i in 0..b.num_rows() {
            let key = (!key.is_null(i)).then(|| key.value(i));
            let payload = payload.value(i);
            let names_user = rejected_user_ids(key, payload).iter().any(|u| u == user_id)
                || payload.windows(quoted.len()).any(|w| w == quoted.as_slice());
            if names_user {
                positions.entry(partition.value(i)).or_default().push(offset.value(i));
            }
        }
    }
    if positions.is_empty() {
        return Ok(None);
    }
    use datafusion::prelude::{col as column, lit};
    let terms = positions
        .into_iter()
        .map(|(p, offsets)| {
            column(KAFKA_PARTITION)
                .eq(lit(p))
                .and(column(KAFKA_OFFSET).in_list(offsets.into_iter().map(lit).collect(), false))
        })
        .collect();
    Ok(Some(crate::scope::any(terms)))
}

/// Removes every file that may still hold deleted rows: the replaced data
/// files, old orphans, and the log entries before a new checkpoint.
/// Returns (data files, log files) removed.
async fn purge(table: DeltaTable, name: &'static str, grace: Duration) -> Result<(u64, u64), ForgetUserError> {
    let delta = |step| move |source| ForgetUserError::Delta { table: name, step, source: Box::new(source) };
    // delta-rs refuses a retention below the table's (7 days by default)
    // unless the check is disabled: here removing them now is the point.
    let (table, replaced) = table
        .vacuum()
        .with_retention_period(chrono::Duration::zero())
        .with_enforce_retention_duration(false)
        .with_mode(VacuumMode::Lite)
        .await
        .map_err(delta("vacuum"))?;
    let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
    let (table, orphans) = table
        .vacuum()
        .with_retention_period(grace)
        .with_enforce_retention_duration(false)
        .with_mode(VacuumMode::Full)
        .await
        .map_err(delta("vacuum orphans"))?;
    deltalake::checkpoints::create_checkpoint(&table, None).await.map_err(delta("checkpoint"))?;
    let version = table.version().unwrap_or_default();
    // Every log entry before the checkpoint, whatever its age.
    let cutoff = chrono::Utc::now().timestamp_millis() + 60_000;
    let logs = deltalake::checkpoints::cleanup_expired_logs_for(version, table.log_store().as_ref(), cutoff, None)
        .await
        .map_err(delta("log cleanup"))?;
    Ok(((replaced.files_deleted.len() + orphans.files_deleted.len()) as u64, logs as u64))
}

/// Deletes the user from every base table with a `user_id` column in the
/// layers' schemas and completes the audit row, in one transaction.
async fn delete_from_tables(
    pool: &PgPool,
    user_id: &str,
    user_hash: &str,
    report: &ForgetReport,
) -> Result<BTreeMap<String, u64>, ForgetUserError> {
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.table_schema::text, c.table_name::text
         FROM information_schema.columns c
         JOIN information_schema.tables t USING (table_schema, table_name)
         WHERE c.column_name = 'user_id' AND t.table_type = 'BASE TABLE'
           AND c.table_schema IN ('batch', 'speed', 'serving')
         ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await?;
    let mut tx = pool.begin().await?;
    let mut rows = BTreeMap::new();
    for (schema, table) in tables {
        let done = sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM {}.{} WHERE user_id = $1",
            quote_ident(&schema),
            quote_ident(&table)
        )))
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
        rows.insert(format!("{schema}.{table}"), done.rows_affected());
    }
    sqlx::query("UPDATE ops.forgotten_users SET completed_at = now(), removed = $2 WHERE user_hash = $1")
        .bind(user_hash)
        .bind(json!({"lake": report.lake_rows, "tables": rows}))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(rows)
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
