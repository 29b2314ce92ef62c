//! `batch-layer run`: recompute every view from one Delta snapshot and
//! publish it, with its offset cut, in one PostgreSQL transaction.
//!
//! 1. One snapshot of `events` is pinned; its `txn` offsets say exactly which
//!    Kafka offsets it holds. The cut per partition is that offset rounded
//!    down to a segment boundary ([`OffsetCut::from_lake`]), never below the
//!    cut already published.
//! 2. Each view's [`ViewDef::batch_sql`] runs in DataFusion over the snapshot,
//!    restricted to the offsets below the cut.
//! 3. Quality checks ([`crate::quality`]) must pass.
//! 4. One transaction replaces `batch.*`, stores the cut, deletes the speed
//!    rows below it and records the run. Readers see the old views or the new
//!    ones, and the totals of `serving.*` do not move: what leaves `speed.*`
//!    arrives in `batch.*` in the same commit.
//!
//! A PostgreSQL advisory lock makes overlapping runs impossible: a second
//! run finds the lock taken and publishes nothing.

use std::collections::BTreeMap;
use std::time::Instant;

use arrow::array::RecordBatch;
use datafusion::prelude::SessionContext;
use serde_json::json;
use shared_schema::ALL_VIEWS;
use shared_schema::cut::{Offset, OffsetCut, Partition};
use shared_schema::views::ViewDef;
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};

use crate::lake::{self, EVENTS_TABLE, Lake, LakeError};
use crate::quality::{self, QualityReport};

/// Advisory-lock key of batch runs ("lambdaBR").
pub const RUN_LOCK: i64 = 0x6c61_6d62_6461_4252;

/// What `run` needs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub database_url: String,
    pub lake: Lake,
    /// The topic whose offsets the lake's `txn` actions record.
    pub topic: String,
    /// Largest accepted drop in a view's row count against the last
    /// published run (0.5 = may shrink by half).
    pub max_shrink: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Db(#[from] platform::db::DbError),
    #[error("PostgreSQL: {0}")]
    Sql(#[from] sqlx::Error),
    #[error(transparent)]
    Lake(#[from] LakeError),
    #[error("the lake has no `events` table yet at {0}; run `batch-layer ingest` first")]
    EmptyLake(String),
    #[error("reading the lake: {0}")]
    Delta(#[from] deltalake::DeltaTableError),
    #[error("computing view {view}: {source}")]
    Compute { view: &'static str, source: datafusion::error::DataFusionError },
    #[error(
        "partition {partition}: the lake ends at offset {lake}, below the published cut {published}; the lake is behind what was published"
    )]
    CutBackwards { partition: i32, lake: i64, published: i64 },
    #[error("encoding COPY data: {0}")]
    Copy(#[from] platform::pgcopy::CopyError),
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RunOutcome {
    Published {
        run_id: i64,
        delta_version: i64,
        cut: OffsetCut,
        rows: BTreeMap<String, u64>,
    },
    /// The lake has not changed since the last published run.
    Unchanged {
        delta_version: i64,
    },
    /// A quality check failed; the last good views keep serving.
    Rejected {
        run_id: i64,
        report: QualityReport,
    },
    /// Another run holds the lock.
    Busy,
}

/// Runs one recompute.
pub async fn run(config: &RunConfig) -> Result<RunOutcome, RunError> {
    let started = Instant::now();
    let pool = platform::db::connect(&config.database_url, 4, std::time::Duration::from_secs(30)).await?;
    let deployment = platform::db::prepare(&pool, None).await?;
    let mut lock_conn = pool.acquire().await?;
    let locked: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(RUN_LOCK).fetch_one(&mut *lock_conn).await?;
    if !locked {
        return Ok(RunOutcome::Busy);
    }
    let outcome = locked_run(config, &pool, deployment, started).await;
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)").bind(RUN_LOCK).execute(&mut *lock_conn).await;
    outcome
}

async fn locked_run(
    config: &RunConfig,
    pool: &PgPool,
    deployment: platform::db::Deployment,
    started: Instant,
) -> Result<RunOutcome, RunError> {
    // We hold the lock: a run still marked running was interrupted.
    sqlx::query("UPDATE ops.batch_runs SET status = 'failed', finished_at = now(), message = 'interrupted' WHERE status = 'running'")
        .execute(pool)
        .await?;
    let table =
        config.lake.open(EVENTS_TABLE).await?.ok_or_else(|| RunError::EmptyLake(config.lake.root().to_string()))?;
    let version = table.version().unwrap_or_default() as i64;
    let last: Option<i64> = sqlx::query_scalar(
        "SELECT delta_version FROM ops.batch_runs WHERE status = 'published' ORDER BY run_id DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await?
    .flatten();
    if last == Some(version) {
        return Ok(RunOutcome::Unchanged { delta_version: version });
    }

    let ctx = SessionContext::new();
    lake::register(&ctx, "events", &table).await?;
    let partitions = lake_partitions(&ctx).await?;
    let lake_next = lake::committed_offsets(&table, &config.topic, partitions.iter().copied()).await?;
    let cut = OffsetCut::from_lake(lake_next.iter().map(|(p, o)| (Partition(*p), Offset(*o))), deployment.segment_size);
    let published: Vec<(i32, i64)> =
        sqlx::query_as("SELECT kafka_partition, cut_offset FROM ops.cut").fetch_all(pool).await?;
    for (p, published) in published {
        let lake = cut.get(Partition(p)).0;
        if lake < published {
            return Err(RunError::CutBackwards { partition: p, lake, published });
        }
    }

    let run_id: i64 = sqlx::query_scalar(
        "INSERT INTO ops.batch_runs (status, mode, delta_version, cut) VALUES ('running', 'full', $1, $2) RETURNING run_id",
    )
    .bind(version)
    .bind(cut_json(&cut))
    .fetch_one(pool)
    .await?;

    let compute_started = Instant::now();
    let predicate = cut.predicate();
    let mut computed: Vec<(&'static ViewDef, Vec<RecordBatch>)> = Vec::new();
    for view in ALL_VIEWS {
        let batches = async { ctx.sql(&view.batch_sql(Some(&predicate))).await?.collect().await }
            .await
            .map_err(|source| RunError::Compute { view: view.name, source })?;
        computed.push((view, batches));
    }
    let compute_ms = compute_started.elapsed().as_millis() as u64;
    let rows: BTreeMap<String, u64> =
        computed.iter().map(|(v, b)| (v.name.to_string(), b.iter().map(|b| b.num_rows() as u64).sum())).collect();

    let previous = previous_rows(pool).await?;
    let report = quality::check(&computed, &previous, config.max_shrink, chrono::Utc::now());
    if !report.passed() {
        sqlx::query(
            "UPDATE ops.batch_runs SET status = 'rejected', finished_at = now(), rows_per_view = $2, message = $3 WHERE run_id = $1",
        )
        .bind(run_id)
        .bind(json!(rows))
        .bind(report.summary())
        .execute(pool)
        .await?;
        tracing::error!(run_id, failures = %report.summary(), "quality checks failed; nothing published");
        return Ok(RunOutcome::Rejected { run_id, report });
    }

    let publish_started = Instant::now();
    let mut conn = pool.acquire().await?;
    publish(&mut conn, &computed, &cut, deployment.segment_size.get()).await?;
    let publish_ms = publish_started.elapsed().as_millis() as u64;
    sqlx::query(
        "UPDATE ops.batch_runs SET status = 'published', finished_at = now(), rows_per_view = $2, durations_ms = $3
         WHERE run_id = $1",
    )
    .bind(run_id)
    .bind(json!(rows))
    .bind(json!({"compute": compute_ms, "publish": publish_ms, "total": started.elapsed().as_millis() as u64}))
    .execute(pool)
    .await?;
    Ok(RunOutcome::Published { run_id, delta_version: version, cut, rows })
}

fn cut_json(cut: &OffsetCut) -> serde_json::Value {
    serde_json::Value::Object(cut.iter().map(|(p, o)| (p.0.to_string(), json!(o.0))).collect())
}

async fn lake_partitions(ctx: &SessionContext) -> Result<Vec<i32>, RunError> {
    use arrow::array::AsArray;
    use arrow::datatypes::Int32Type;
    let batches = async { ctx.sql("SELECT DISTINCT kafka_partition FROM events").await?.collect().await }
        .await
        .map_err(|source| RunError::Compute { view: "events", source })?;
    Ok(batches.iter().flat_map(|b| b.column(0).as_primitive::<Int32Type>().values().to_vec()).collect())
}

async fn previous_rows(pool: &PgPool) -> Result<BTreeMap<String, u64>, RunError> {
    let rows: Option<serde_json::Value> = sqlx::query_scalar(
        "SELECT rows_per_view FROM ops.batch_runs WHERE status = 'published' ORDER BY run_id DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await?
    .flatten();
    Ok(rows.and_then(|v| serde_json::from_value(v).ok()).unwrap_or_default())
}

/// The one transaction: views, cut, speed clean-up.
async fn publish(
    conn: &mut PgConnection,
    computed: &[(&'static ViewDef, Vec<RecordBatch>)],
    cut: &OffsetCut,
    segment_size: i64,
) -> Result<(), RunError> {
    let mut tx = conn.begin().await?;
    for (view, batches) in computed {
        let staging = format!("batch_staging_{}", view.name);
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE TEMP TABLE {staging} (LIKE batch.{name}) ON COMMIT DROP",
            name = view.name
        )))
        .execute(&mut *tx)
        .await?;
        let statement = format!("COPY {staging} FROM STDIN (FORMAT binary)");
        let mut copy = tx.copy_in_raw(&statement).await?;
        copy.send(platform::pgcopy::encode(batches)?).await?;
        copy.finish().await?;
        sqlx::raw_sql(AssertSqlSafe(format!(
            "TRUNCATE batch.{name}; INSERT INTO batch.{name} SELECT * FROM {staging};",
            name = view.name
        )))
        .execute(&mut *tx)
        .await?;
    }
    for (p, o) in cut.iter() {
        sqlx::query(
            "INSERT INTO ops.cut (kafka_partition, cut_offset, updated_at) VALUES ($1, $2, now())
             ON CONFLICT (kafka_partition) DO UPDATE SET cut_offset = EXCLUDED.cut_offset, updated_at = now()",
        )
        .bind(p.0)
        .bind(o.0)
        .execute(&mut *tx)
        .await?;
    }
    // The batch now holds everything below the cut: the speed rows of those
    // segments are garbage (the serving views already ignore them).
    for view in ALL_VIEWS.iter().filter(|v| v.segmented()) {
        sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM speed.{name} s USING ops.cut c
             WHERE c.kafka_partition = s.kafka_partition AND (s.segment + 1) * $1 <= c.cut_offset",
            name = view.name
        )))
        .bind(segment_size)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}
