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
use shared_schema::derived::{BATCH_TABLES, Input, Scope};
use shared_schema::views::{PRODUCT_DEMAND_HOURLY, ViewDef};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};

use crate::engine::Engine;
use crate::lake::{self, EVENTS_TABLE, Lake, LakeError};
use crate::quality::{self, QualityReport, Target};

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
    /// Recompute everything instead of only what new events touched.
    pub full: bool,
    /// The shop's database, whose `products` table each run snapshots into
    /// the lake (`None`: skip the catalog).
    pub sales_database_url: Option<String>,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// How old the windowed batch tables (demand baseline, item similarity)
    /// may get before an incremental run recomputes them; a full run always
    /// does.
    pub model_refresh: std::time::Duration,
    /// Where failed runs, failed quality checks and catalog schema changes
    /// are POSTed (`NOTIFY_WEBHOOK_URL`); they are recorded in
    /// `ops.notifications` either way.
    pub notify_webhook: Option<url::Url>,
    /// Where the SQL runs: in this process, or on a Ballista cluster.
    pub engine: Engine,
}

impl RunConfig {
    /// Defaults for everything but where things are.
    pub fn new(database_url: impl Into<String>, lake: Lake, topic: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            lake,
            topic: topic.into(),
            max_shrink: 0.5,
            full: false,
            sales_database_url: None,
            model_refresh: DEFAULT_MODEL_REFRESH,
            progress: false,
            notify_webhook: None,
            engine: Engine::InProcess,
        }
    }
}

/// Default of [`RunConfig::model_refresh`].
pub const DEFAULT_MODEL_REFRESH: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

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
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
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
        /// Rows of each published table after the run.
        rows: BTreeMap<String, u64>,
        /// Hours recomputed by an incremental run (`None`: a full run).
        hours: Option<usize>,
        /// The batch tables recomputed by this run.
        tables: Vec<&'static str>,
        /// Views recomputed over all history by an incremental run because
        /// their definition changed since they were last published.
        backfilled: Vec<&'static str>,
        /// Milliseconds spent computing, publishing, and in all.
        compute_ms: u64,
        publish_ms: u64,
        total_ms: u64,
    },
    /// The lake has not changed since the last published run.
    Unchanged { delta_version: i64 },
    /// A quality check failed; the last good views keep serving.
    Rejected { run_id: i64, report: QualityReport },
    /// Another run holds the lock.
    Busy,
}

/// How long a finished run waits for its notifications to be delivered.
const NOTIFY_FLUSH: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs one recompute; a failed run or quality check is notified.
pub async fn run(config: &RunConfig) -> Result<RunOutcome, RunError> {
    use platform::notify::{Notification, Notifier, NotifyConfig, Severity};
    let pool = platform::db::connect(&config.database_url, 4, std::time::Duration::from_secs(30)).await;
    let notifier =
        Notifier::spawn(NotifyConfig::new(config.notify_webhook.clone(), "batch-layer"), pool.as_ref().ok().cloned());
    let outcome = match pool {
        Ok(pool) => run_with(config, &pool, &notifier).await,
        Err(e) => Err(e.into()),
    };
    match &outcome {
        Err(e) => notifier.send(Notification::new(
            "batch_run_failed",
            Severity::Critical,
            format!("A batch run failed and published nothing: {e}"),
            json!({"error": e.to_string(), "lake": config.lake.root().as_str(), "topic": config.topic}),
        )),
        Ok(RunOutcome::Rejected { run_id, report }) => notifier.send(Notification::new(
            "quality_check_failed",
            Severity::Critical,
            format!("Batch run {run_id} failed its quality checks and published nothing: {}", report.summary()),
            json!({"run_id": run_id, "failures": report.summary()}),
        )),
        Ok(_) => {}
    }
    notifier.flush(NOTIFY_FLUSH).await;
    outcome
}

async fn run_with(
    config: &RunConfig,
    pool: &PgPool,
    notifier: &platform::notify::Notifier,
) -> Result<RunOutcome, RunError> {
    let started = Instant::now();
    let pool = pool.clone();
    let deployment = platform::db::prepare(&pool, None).await?;
    let mut lock_conn = pool.acquire().await?;
    let locked: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(RUN_LOCK).fetch_one(&mut *lock_conn).await?;
    if !locked {
        return Ok(RunOutcome::Busy);
    }
    if let Some(url) = &config.sales_database_url {
        // No view reads the catalog yet, so a shop database that is away
        // costs this run its snapshot, not its publish.
        match crate::catalog::snapshot(url, &config.lake, &pool).await {
            Ok(s) => {
                tracing::info!(products = s.products, schema_changed = s.schema_changed, "catalog snapshot taken");
                if s.schema_changed {
                    notify_catalog_change(&pool, notifier).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "catalog snapshot skipped"),
        }
    }
    let outcome = locked_run(config, &pool, deployment, started).await;
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)").bind(RUN_LOCK).execute(&mut *lock_conn).await;
    outcome
}

/// Sends the schema change the catalog snapshot just recorded in
/// `ops.notifications` to the webhook.
async fn notify_catalog_change(pool: &PgPool, notifier: &platform::notify::Notifier) {
    let row: Result<Option<(i64, String, serde_json::Value)>, _> = sqlx::query_as(
        "SELECT id, summary, details FROM ops.notifications
         WHERE kind = 'catalog_schema_changed' AND NOT delivered ORDER BY id DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await;
    if let Ok(Some((id, summary, details))) = row {
        let mut n = platform::notify::Notification::new(
            "catalog_schema_changed",
            platform::notify::Severity::Warning,
            summary,
            details,
        );
        n.id = Some(id);
        notifier.send(n);
    }
}

/// How one relation is brought up to date by a run.
#[derive(Debug, Clone, PartialEq)]
enum Refresh {
    /// Recompute everything below the cut and replace the table.
    Replace,
    /// Recompute the listed hours below the cut and replace those hours.
    Hours { key: &'static str, hours: Vec<chrono::DateTime<chrono::Utc>> },
    /// Fold the rows of the new offset range in with the merge rules
    /// (the statement, reading the staging table).
    Upsert(String),
}

/// One relation computed by a run, ready to publish.
struct Computed {
    name: &'static str,
    refresh: Refresh,
    batches: Vec<RecordBatch>,
}

fn staging_table(name: &str) -> String {
    format!("batch_staging_{name}")
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
    let full = config.full || last.is_none();
    let defined: BTreeMap<String, String> =
        sqlx::query_as::<_, (String, String)>("SELECT name, fingerprint FROM ops.view_definitions")
            .fetch_all(pool)
            .await?
            .into_iter()
            .collect();
    // Every view's current definition, recorded with the publish: a view
    // this run skips is not redefined (those are recomputed), so its tables
    // match it too.
    let definitions: Vec<(&'static str, String)> = ALL_VIEWS.iter().map(|v| (v.name, v.fingerprint())).collect();
    // No fingerprint on record at all: tables published before they were
    // recorded (an upgrade); this run records them without a backfill.
    let redefined: Vec<&'static str> = if full || defined.is_empty() {
        Vec::new()
    } else {
        definitions.iter().filter(|(name, f)| defined.get(*name) != Some(f)).map(|(name, _)| *name).collect()
    };
    if !full && last == Some(version) && redefined.is_empty() {
        return Ok(RunOutcome::Unchanged { delta_version: version });
    }

    let ctx = config.engine.context().await?;
    config.engine.register(&ctx, "events", &table).await?;
    register_catalog(&ctx, &config.engine, &config.lake).await?;
    let partitions = lake_partitions(&ctx).await?;
    let lake_next = lake::committed_offsets(&table, &config.topic, partitions.iter().copied()).await?;
    let cut = OffsetCut::from_lake(lake_next.iter().map(|(p, o)| (Partition(*p), Offset(*o))), deployment.segment_size);
    let published: Vec<(i32, i64)> =
        sqlx::query_as("SELECT kafka_partition, cut_offset FROM ops.cut").fetch_all(pool).await?;
    let mut old_cut = OffsetCut::new();
    for (p, published) in published {
        let lake = cut.get(Partition(p)).0;
        if lake < published {
            return Err(RunError::CutBackwards { partition: p, lake, published });
        }
        old_cut.insert(Partition(p), Offset(published));
    }
    if !full && cut == old_cut && redefined.is_empty() {
        // New data, but none of it below a segment boundary yet: the speed
        // layer holds it, and the batch has nothing new to publish.
        return Ok(RunOutcome::Unchanged { delta_version: version });
    }

    let mode = if full { "full" } else { "incremental" };
    let run_id: i64 = sqlx::query_scalar(
        "INSERT INTO ops.batch_runs (status, mode, delta_version, cut) VALUES ('running', $1, $2, $3) RETURNING run_id",
    )
    .bind(mode)
    .bind(version)
    .bind(cut_json(&cut))
    .fetch_one(pool)
    .await?;

    let compute_started = Instant::now();
    let progress = progress_bar(config.progress, (ALL_VIEWS.len() + BATCH_TABLES.len() + 2) as u64);
    progress.set_message("finding the hours new events touched");
    let below_cut = cut.predicate();
    let new_range = range_predicate(&old_cut, &cut);
    let touched = if full { Vec::new() } else { touched_hours(&ctx, &new_range).await? };
    let mut computed: Vec<Computed> = Vec::new();
    let mut targets: Vec<(&'static ViewDef, usize)> = Vec::new();
    for view in ALL_VIEWS {
        let (refresh, predicate) = if full || redefined.contains(&view.name) {
            // A changed definition is recomputed over all history: a new
            // measure is backfilled by the next run, incremental or not.
            (Refresh::Replace, below_cut.clone())
        } else if let Some(key) = view.hour_key {
            if touched.is_empty() {
                continue;
            }
            let hours = touched.iter().map(|(h, _)| *h).collect();
            (Refresh::Hours { key, hours }, format!("({below_cut}) AND ({})", hours_predicate(&touched)))
        } else if view.mergeable_by_upsert() {
            (Refresh::Upsert(view.batch_upsert_sql(&staging_table(view.name))), new_range.clone())
        } else {
            (Refresh::Replace, below_cut.clone())
        };
        progress.inc(1);
        progress.set_message(format!("computing {}", view.name));
        let batches = query(&ctx, view.name, &view.batch_sql(Some(&predicate))).await?;
        targets.push((view, computed.len()));
        computed.push(Computed { name: view.name, refresh, batches });
    }

    // The windowed tables look back from the newest hour below the cut.
    let newest_hour = newest_hour(pool, &computed, full).await?;
    let stale = stale_tables(pool, config.model_refresh).await?;
    let scope = Scope { below_cut: below_cut.clone(), anchor: newest_hour.unwrap_or_else(chrono::Utc::now) };
    let mut refreshed_tables = Vec::new();
    for table in BATCH_TABLES {
        let due = match table.input {
            Input::Catalog => true,
            Input::RecentEvents { .. } => full || stale.contains(&table.name),
        };
        if !due || (newest_hour.is_none() && table.input != Input::Catalog) {
            continue;
        }
        progress.inc(1);
        progress.set_message(format!("computing {}", table.name));
        let batches = query(&ctx, table.name, &table.batch_sql(&scope)).await?;
        refreshed_tables.push((table, computed.len()));
        computed.push(Computed { name: table.name, refresh: Refresh::Replace, batches });
    }
    let compute_ms = compute_started.elapsed().as_millis() as u64;

    let previous = previous_rows(pool).await?;
    let checked: Vec<Target<'_>> = targets
        .iter()
        .map(|(v, i)| Target::view(v, &computed[*i].batches))
        .chain(refreshed_tables.iter().map(|(t, i)| Target::table(t, &computed[*i].batches)))
        .collect();
    // The row-count check compares whole tables, so only replaced ones take part.
    let whole: BTreeMap<String, u64> = previous
        .into_iter()
        .filter(|(name, _)| computed.iter().any(|c| c.name == name && c.refresh == Refresh::Replace))
        .collect();
    let report = quality::check(&checked, &whole, config.max_shrink, chrono::Utc::now());
    if !report.passed() {
        sqlx::query(
            "UPDATE ops.batch_runs SET status = 'rejected', finished_at = now(), message = $2 WHERE run_id = $1",
        )
        .bind(run_id)
        .bind(report.summary())
        .execute(pool)
        .await?;
        tracing::error!(run_id, failures = %report.summary(), "quality checks failed; nothing published");
        return Ok(RunOutcome::Rejected { run_id, report });
    }

    progress.set_position(progress.length().unwrap_or(1) - 1);
    progress.set_message("publishing in one transaction");
    let publish_started = Instant::now();
    let mut conn = pool.acquire().await?;
    let tables: Vec<&'static str> = refreshed_tables.iter().map(|(t, _)| t.name).collect();
    let published = Published {
        run_id,
        cut: &cut,
        segment_size: deployment.segment_size.get(),
        newest_hour,
        scope: &scope,
        definitions: &definitions,
    };
    let rows = publish(&mut conn, &computed, &tables, &published).await?;
    let publish_ms = publish_started.elapsed().as_millis() as u64;
    sqlx::query(
        "UPDATE ops.batch_runs SET status = 'published', finished_at = now(), rows_per_view = $2, durations_ms = $3,
             message = $4
         WHERE run_id = $1",
    )
    .bind(run_id)
    .bind(json!(rows))
    .bind(json!({"compute": compute_ms, "publish": publish_ms, "total": started.elapsed().as_millis() as u64}))
    .bind(match (full, redefined.is_empty()) {
        (true, _) => "full: every hour recomputed".to_string(),
        (false, true) => format!("incremental: {} hours recomputed", touched.len()),
        (false, false) => format!(
            "incremental: {} hours recomputed, all hours of {} (definition changed)",
            touched.len(),
            redefined.join(", ")
        ),
    })
    .execute(pool)
    .await?;
    progress.finish_and_clear();
    Ok(RunOutcome::Published {
        run_id,
        delta_version: version,
        cut,
        rows,
        hours: (!full).then_some(touched.len()),
        tables,
        backfilled: redefined,
        compute_ms,
        publish_ms,
        total_ms: started.elapsed().as_millis() as u64,
    })
}

/// The one-paragraph account of a run that `run` prints.
pub fn summary(outcome: &RunOutcome) -> String {
    match outcome {
        RunOutcome::Published {
            run_id,
            delta_version,
            cut,
            rows,
            hours,
            tables,
            backfilled,
            compute_ms,
            publish_ms,
            total_ms,
        } => {
            let what = match hours {
                Some(h) if backfilled.is_empty() => format!("incremental run recomputed {h} hours"),
                Some(h) => format!(
                    "incremental run recomputed {h} hours (and all history of {}, whose definition changed)",
                    backfilled.join(", ")
                ),
                None => "full run recomputed every hour".to_string(),
            };
            let tables = if tables.is_empty() {
                "no batch table was due".to_string()
            } else {
                format!("batch tables {} were refreshed", tables.join(", "))
            };
            let cut: Vec<String> = cut.iter().map(|(p, o)| format!("{}:{}", p.0, o.0)).collect();
            let rows: Vec<String> = rows.iter().map(|(v, n)| format!("{v} {n}")).collect();
            format!(
                "Run {run_id}: the {what} of lake version {delta_version}, and {tables}. It published with the \
                 offset cut [{}] (partition:offset); the serving views now merge the speed layer from there. \
                 Rows now: {}. Took {:.1} s ({:.1} s computing, {:.1} s publishing).",
                cut.join(", "),
                rows.join(", "),
                *total_ms as f64 / 1000.0,
                *compute_ms as f64 / 1000.0,
                *publish_ms as f64 / 1000.0,
            )
        }
        RunOutcome::Unchanged { delta_version } => {
            format!(
                "The lake is unchanged since the last published run (version {delta_version}); nothing new to publish."
            )
        }
        RunOutcome::Rejected { run_id, report } => format!(
            "Run {run_id} failed its quality checks and published nothing ({}); the last good views keep serving.",
            report.summary()
        ),
        RunOutcome::Busy => "Another batch run holds the lock; nothing published.".to_string(),
    }
}

/// Rows whose offsets lie in `[old[p], new[p])` for some partition.
fn range_predicate(old: &OffsetCut, new: &OffsetCut) -> String {
    let terms: Vec<String> = new
        .iter()
        .filter(|(p, o)| old.get(*p) < *o)
        .map(|(p, o)| {
            format!("(e.kafka_partition = {} AND e.kafka_offset >= {} AND e.kafka_offset < {})", p.0, old.get(p).0, o.0)
        })
        .collect();
    if terms.is_empty() { "FALSE".into() } else { terms.join(" OR ") }
}

/// The (hour, partition value) pairs of the events in `range`.
async fn touched_hours(
    ctx: &SessionContext,
    range: &str,
) -> Result<Vec<(chrono::DateTime<chrono::Utc>, (String, i32))>, RunError> {
    use arrow::array::AsArray;
    use arrow::datatypes::{Int32Type, TimestampMicrosecondType};
    let sql = format!(
        "SELECT DISTINCT date_trunc('hour', e.event_time) AS hour, CAST(e.event_date AS VARCHAR) AS d, \
         CAST(e.event_hour AS INT) AS h FROM events e WHERE {range}"
    );
    let batches = async { ctx.sql(&sql).await?.collect().await }
        .await
        .map_err(|source| RunError::Compute { view: "touched hours", source })?;
    let mut out = Vec::new();
    for b in &batches {
        let hour = b.column(0).as_primitive::<TimestampMicrosecondType>();
        let date = arrow::compute::cast(b.column(1), &arrow::datatypes::DataType::Utf8)
            .map_err(|e| RunError::Compute { view: "touched hours", source: e.into() })?;
        let date = date.as_string::<i32>();
        let h = b.column(2).as_primitive::<Int32Type>();
        for i in 0..b.num_rows() {
            if let Some(t) = chrono::DateTime::from_timestamp_micros(hour.value(i)) {
                out.push((t, (date.value(i).to_string(), h.value(i))));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Restricts a scan to the given lake partitions (so DataFusion prunes files).
fn hours_predicate(hours: &[(chrono::DateTime<chrono::Utc>, (String, i32))]) -> String {
    hours
        .iter()
        .map(|(_, (d, h))| format!("(e.event_date = '{d}' AND e.event_hour = {h})"))
        .collect::<Vec<_>>()
        .join(" OR ")
}

/// Registers the lake's catalog snapshot as `products`; an empty one if
/// no snapshot was ever taken, so the views that read it still run.
async fn register_catalog(ctx: &SessionContext, engine: &Engine, lake: &Lake) -> Result<(), RunError> {
    match lake.open(lake::PRODUCTS_TABLE).await? {
        Some(products) => engine.register(ctx, "products", &products).await?,
        None => engine
            .register_empty(ctx, "products", crate::catalog::schema())
            .map_err(|source| RunError::Compute { view: "products", source })?,
    }
    Ok(())
}

fn progress_bar(show: bool, steps: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(steps);
    bar.set_style(
        indicatif::ProgressStyle::with_template("run [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

/// Runs one query to completion.
async fn query(ctx: &SessionContext, name: &'static str, sql: &str) -> Result<Vec<RecordBatch>, RunError> {
    async { ctx.sql(sql).await?.collect().await }.await.map_err(|source| RunError::Compute { view: name, source })
}

/// The newest event hour below the cut: from the hourly view just computed,
/// and (for an incremental run) from what is already published.
async fn newest_hour(
    pool: &PgPool,
    computed: &[Computed],
    full: bool,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, RunError> {
    use arrow::array::AsArray;
    use arrow::datatypes::TimestampMicrosecondType;
    let view = &PRODUCT_DEMAND_HOURLY;
    let key = view.hour_key.unwrap_or("hour");
    let computed_max = computed
        .iter()
        .filter(|c| c.name == view.name)
        .flat_map(|c| &c.batches)
        .filter_map(|b| b.column_by_name(key))
        .filter_map(|col| arrow::compute::max(col.as_primitive::<TimestampMicrosecondType>()))
        .max()
        .and_then(chrono::DateTime::from_timestamp_micros);
    let published = if full {
        None
    } else {
        sqlx::query_scalar::<_, Option<chrono::DateTime<chrono::Utc>>>(AssertSqlSafe(format!(
            "SELECT max({key}) FROM batch.{}",
            view.name
        )))
        .fetch_one(pool)
        .await?
    };
    Ok(computed_max.max(published))
}

/// The windowed batch tables not computed within `max_age` (or never).
async fn stale_tables(pool: &PgPool, max_age: std::time::Duration) -> Result<Vec<&'static str>, RunError> {
    let fresh: Vec<String> =
        sqlx::query_scalar("SELECT name FROM ops.batch_tables WHERE computed_at > now() - make_interval(secs => $1)")
            .bind(max_age.as_secs_f64())
            .fetch_all(pool)
            .await?;
    Ok(BATCH_TABLES.iter().map(|t| t.name).filter(|n| !fresh.iter().any(|f| f == n)).collect())
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

/// What the publish records besides the tables.
struct Published<'a> {
    run_id: i64,
    cut: &'a OffsetCut,
    segment_size: i64,
    newest_hour: Option<chrono::DateTime<chrono::Utc>>,
    scope: &'a Scope,
    /// The fingerprint of each view computed, recorded with it.
    definitions: &'a [(&'static str, String)],
}

/// The one transaction: views, batch tables, cut, speed clean-up. Returns
/// the rows of each published table after the publish.
async fn publish(
    conn: &mut PgConnection,
    computed: &[Computed],
    tables: &[&'static str],
    run: &Published<'_>,
) -> Result<BTreeMap<String, u64>, RunError> {
    let mut tx = conn.begin().await?;
    let mut rows = BTreeMap::new();
    for Computed { name, refresh, batches } in computed {
        let staging = staging_table(name);
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE TEMP TABLE {staging} (LIKE batch.{name}) ON COMMIT DROP")))
            .execute(&mut *tx)
            .await?;
        // Columns by name, not position: a column a migration appended may
        // sit anywhere in the definition.
        let columns = batches.first().map_or_else(
            || "*".to_string(),
            |b| b.schema().fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", "),
        );
        let list = if columns == "*" { String::new() } else { format!(" ({columns})") };
        let statement = format!("COPY {staging}{list} FROM STDIN (FORMAT binary)");
        let mut copy = tx.copy_in_raw(&statement).await?;
        copy.send(platform::pgcopy::encode(batches)?).await?;
        copy.finish().await?;
        let insert = format!("INSERT INTO batch.{name}{list} SELECT {columns} FROM {staging}");
        match refresh {
            Refresh::Replace => {
                sqlx::raw_sql(AssertSqlSafe(format!("TRUNCATE batch.{name}; {insert};"))).execute(&mut *tx).await?;
            }
            Refresh::Hours { key, hours } => {
                sqlx::query(AssertSqlSafe(format!("DELETE FROM batch.{name} WHERE {key} = ANY($1)")))
                    .bind(hours)
                    .execute(&mut *tx)
                    .await?;
                sqlx::raw_sql(AssertSqlSafe(insert)).execute(&mut *tx).await?;
            }
            Refresh::Upsert(statement) => {
                sqlx::raw_sql(AssertSqlSafe(statement.clone())).execute(&mut *tx).await?;
            }
        }
        let n: i64 =
            sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM batch.{name}"))).fetch_one(&mut *tx).await?;
        rows.insert(name.to_string(), n as u64);
    }
    for name in tables {
        sqlx::query(
            "INSERT INTO ops.batch_tables (name, run_id, anchor, computed_at) VALUES ($1, $2, $3, now())
             ON CONFLICT (name) DO UPDATE SET run_id = EXCLUDED.run_id, anchor = EXCLUDED.anchor, computed_at = now()",
        )
        .bind(name)
        .bind(run.run_id)
        .bind(run.scope.anchor)
        .execute(&mut *tx)
        .await?;
    }
    for (name, fingerprint) in run.definitions {
        sqlx::query(
            "INSERT INTO ops.view_definitions (name, fingerprint, run_id, published_at) VALUES ($1, $2, $3, now())
             ON CONFLICT (name) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, run_id = EXCLUDED.run_id,
                 published_at = now()",
        )
        .bind(name)
        .bind(fingerprint)
        .bind(run.run_id)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("UPDATE ops.batch_runs SET newest_hour = $2 WHERE run_id = $1")
        .bind(run.run_id)
        .bind(run.newest_hour)
        .execute(&mut *tx)
        .await?;
    let (cut, segment_size) = (run.cut, run.segment_size);
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
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_range_covers_exactly_the_offsets_between_the_cuts() {
        let mut old = OffsetCut::new();
        old.insert(Partition(0), Offset(100));
        old.insert(Partition(1), Offset(300));
        let mut new = OffsetCut::new();
        new.insert(Partition(0), Offset(200));
        new.insert(Partition(1), Offset(300));
        new.insert(Partition(2), Offset(100));
        assert_eq!(
            range_predicate(&old, &new),
            "(e.kafka_partition = 0 AND e.kafka_offset >= 100 AND e.kafka_offset < 200) OR \
             (e.kafka_partition = 2 AND e.kafka_offset >= 0 AND e.kafka_offset < 100)"
        );
        assert_eq!(range_predicate(&new, &new), "FALSE");
    }
}
