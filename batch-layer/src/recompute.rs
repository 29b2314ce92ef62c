//! `batch-layer run`: recompute every view from one Delta snapshot and
//! publish it, with its offset cut, in one PostgreSQL transaction.
//!
//! A run is four steps, one module each:
//!
//! 1. [`plan`]: one snapshot of `events` is pinned; its `txn` offsets say
//!    exactly which Kafka offsets it holds. The cut per partition is that
//!    offset rounded down to a segment boundary, never below the cut
//!    already published. The plan (pure, no I/O) decides from that, the
//!    view fingerprints, the touched hours and the batch tables' ages what
//!    each view and table needs.
//! 2. [`compute`]: each view's batch SQL runs in DataFusion over the
//!    snapshot, with `events` restricted to what its refresh needs.
//! 3. [`gate`]: quality checks must pass.
//! 4. [`publish`]: one transaction replaces `batch.*`, stores the cut,
//!    deletes the speed rows below it and records the run. Readers see the
//!    old views or the new ones, and the totals of `serving.*` do not move.
//!
//! A PostgreSQL advisory lock makes overlapping runs impossible: a second
//! run finds the lock taken and publishes nothing.

mod compute;
mod gate;
pub mod plan;
mod publish;
mod watch;

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::json;
use shared_schema::cut::{Offset, OffsetCut, Partition};
use shared_schema::derived::{BATCH_TABLES, PRODUCTS};
use shared_schema::views;
use shared_schema::views::product_demand_hourly;
use sqlx::{AssertSqlSafe, PgPool};

use crate::engine::Engine;
use crate::lake::{EVENTS_TABLE, Lake, LakeError};
use crate::quality::QualityReport;
use plan::{Decision, Plan};

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
    /// Publish although the lake misses records (see [`crate::reconcile`]),
    /// for this reason.
    pub accept_lake_loss: Option<String>,
    /// When a complete hour's volume or unknown products are notified.
    pub findings: crate::findings::Thresholds,
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
    pub notify_webhook: Option<platform::notify::Webhook>,
    /// Where the SQL runs: in this process, or on a Ballista cluster.
    pub engine: Engine,
    /// How long an incremental run may leave the new records of a view
    /// whose measures all merge by `max` or `min` (user_product_state) to
    /// the speed layer before it folds them into `batch.*` (zero: every
    /// run folds); only while the speed layer holds them all.
    pub fold_every: std::time::Duration,
    /// Tests only: pause before publishing (see [`PublishPause`]).
    pub pause_before_publish: Option<PublishPause>,
    /// Tests only: pause once the shadow tables are loaded, before their
    /// transaction commits.
    pub pause_while_loading: Option<PublishPause>,
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
            accept_lake_loss: None,
            findings: crate::findings::Thresholds::default(),
            sales_database_url: None,
            model_refresh: DEFAULT_MODEL_REFRESH,
            fold_every: DEFAULT_FOLD_EVERY,
            progress: false,
            notify_webhook: None,
            engine: Engine::InProcess,
            pause_before_publish: None,
            pause_while_loading: None,
        }
    }
}

/// Default of [`RunConfig::model_refresh`].
pub const DEFAULT_MODEL_REFRESH: std::time::Duration = std::time::Duration::from_secs(6 * 3600);
/// Default of [`RunConfig::fold_every`].
pub const DEFAULT_FOLD_EVERY: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

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
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    #[error("reconciling the lake with Kafka: {0}")]
    Reconcile(#[from] crate::reconcile::ReconcileError),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error("encoding COPY data: {0}")]
    Copy(#[from] platform::pgcopy::CopyError),
    #[error(
        "this run lost its lock (PostgreSQL restarted or its session dropped) and run token {current} took over from {ours}; nothing published"
    )]
    Fenced { ours: i64, current: i64 },
    #[error("publishing would move partition {partition}'s cut back from {published} to {planned}; nothing published")]
    CutMovesBack { partition: i32, published: i64, planned: i64 },
    #[error(
        "the speed layer's positions changed while this run computed, and it no longer holds the records the run left to it for {view}; nothing published, the next run folds them"
    )]
    SpeedMoved { view: &'static str },
}

/// Where a run waits between its quality gate and its publish, or while it
/// loads the shadow tables: a seam for tests that must change the world or
/// look at it at exactly that point (restart PostgreSQL, start another run,
/// read the serving views). `reached` is notified, then the run waits for
/// `resume`.
#[derive(Debug, Clone, Default)]
pub struct PublishPause {
    pub reached: std::sync::Arc<tokio::sync::Notify>,
    pub resume: std::sync::Arc<tokio::sync::Notify>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RunOutcome {
    Published {
        run_id: i64,
        delta_version: i64,
        cut: OffsetCut,
        /// Rows written to each published relation: the whole relation when
        /// it was replaced, the recomputed hours or folded rows otherwise.
        rows: BTreeMap<String, u64>,
        /// Hours recomputed by an incremental run (`None`: a full run).
        hours: Option<usize>,
        /// The batch tables recomputed by this run.
        tables: Vec<&'static str>,
        /// Views recomputed over all history by an incremental run because
        /// their definition changed since they were last published.
        backfilled: Vec<&'static str>,
        /// Views whose new records this run left to the speed layer for a
        /// later fold (see [`RunConfig::fold_every`]).
        deferred: Vec<&'static str>,
        /// Milliseconds spent preparing (the lock, the snapshot, the lake's
        /// reconciliation), computing, checking, publishing, and in all.
        prepare_ms: u64,
        compute_ms: u64,
        check_ms: u64,
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
    let deployment = platform::db::check(&pool).await?;
    let mut lock_conn = pool.acquire().await?;
    let locked: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(RUN_LOCK).fetch_one(&mut *lock_conn).await?;
    if !locked {
        return Ok(RunOutcome::Busy);
    }
    // The lock lives only as long as this session; the token outlives it
    // and fences the publish (see `publish`).
    let token: i64 = sqlx::query_scalar("UPDATE ops.run_fence SET token = token + 1 RETURNING token")
        .fetch_one(&mut *lock_conn)
        .await?;
    if let Some(url) = &config.sales_database_url {
        // No view reads the catalog yet, so a shop database that is away
        // costs this run its snapshot, not its publish.
        match crate::catalog::snapshot(url, &config.lake, &pool).await {
            Ok(s) => {
                if s.broken.is_none() {
                    tracing::info!(products = s.products, schema_changed = s.schema_changed, "catalog snapshot taken");
                }
                if s.schema_changed {
                    notify_catalog_change(&pool, notifier).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "catalog snapshot skipped"),
        }
    }
    let outcome = locked_run(config, &pool, deployment, token, started, notifier).await;
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)").bind(RUN_LOCK).execute(&mut *lock_conn).await;
    outcome
}

/// Sends the schema change the catalog snapshot just recorded in
/// `ops.notifications` to the webhook.
async fn notify_catalog_change(pool: &PgPool, notifier: &platform::notify::Notifier) {
    let row: Result<Option<(i64, String, String, serde_json::Value)>, _> = sqlx::query_as(
        "SELECT id, kind, summary, details FROM ops.notifications
         WHERE kind IN ('catalog_schema_changed', 'catalog_schema_broken') AND NOT delivered ORDER BY id DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await;
    if let Ok(Some((id, kind, summary, details))) = row {
        let severity = if kind == "catalog_schema_broken" {
            platform::notify::Severity::Critical
        } else {
            platform::notify::Severity::Warning
        };
        let mut n = platform::notify::Notification::new(&kind, severity, summary, details);
        n.id = Some(id);
        notifier.send(n);
    }
}

async fn locked_run(
    config: &RunConfig,
    pool: &PgPool,
    deployment: platform::db::Deployment,
    token: i64,
    started: Instant,
    notifier: &platform::notify::Notifier,
) -> Result<RunOutcome, RunError> {
    // We hold the lock: a run still marked running was interrupted.
    sqlx::query("UPDATE ops.batch_runs SET status = 'failed', finished_at = now(), message = 'interrupted' WHERE status = 'running'")
        .execute(pool)
        .await?;
    let table =
        config.lake.open(EVENTS_TABLE).await?.ok_or_else(|| RunError::EmptyLake(config.lake.root().to_string()))?;
    let version = table.version().unwrap_or_default() as i64;
    let published = published(pool).await?;
    let definitions: Vec<(&'static str, String)> = views::all().iter().map(|v| (v.name, v.fingerprint())).collect();
    let request = plan::Request {
        full: config.full,
        lake_version: version,
        segment_size: deployment.segment_size,
        definitions: &definitions,
        published: &published,
    };
    if plan::nothing_new(&request) {
        return Ok(RunOutcome::Unchanged { delta_version: version });
    }
    let (ctx, catalog_version) = compute::session(&config.engine, &config.lake, &table).await?;
    let lake_next = compute::lake_next(&ctx, &table, &config.topic).await?;
    let plan = match plan::decide(&request, &lake_next)? {
        Decision::Unchanged => return Ok(RunOutcome::Unchanged { delta_version: version }),
        Decision::Run(plan) => plan,
    };

    let mode = if plan.full { "full" } else { "incremental" };
    let run_id: i64 = sqlx::query_scalar(
        "INSERT INTO ops.batch_runs (status, mode, delta_version, cut) VALUES ('running', $1, $2, $3) RETURNING run_id",
    )
    .bind(mode)
    .bind(version)
    .bind(cut_json(&plan.cut))
    .fetch_one(pool)
    .await?;

    // The lake first: a lake that misses records publishes nothing. Its
    // files (with the log's row counts) serve the hours' check too.
    let files = crate::lake_files::LakeFiles::from_snapshot(EVENTS_TABLE, &table)
        .await
        .map_err(crate::reconcile::ReconcileError::from)?;
    let account = crate::reconcile::reconcile(&config.lake, &table, &files, &lake_next).await?;
    let report = gate::reconciled(pool, run_id, &account, config.accept_lake_loss.as_deref()).await?;
    if !report.passed() {
        return Ok(RunOutcome::Rejected { run_id, report });
    }

    let compute_started = Instant::now();
    let prepare_ms = started.elapsed().as_millis() as u64;
    let progress = progress_bar(config.progress, (views::all().len() + BATCH_TABLES.len() + 2) as u64);
    progress.set_message("finding the hours new events touched");
    let new_range = if plan.needs_touched_hours() { Some(compute::new_range(&ctx, &plan).await?) } else { None };
    let touched = new_range.as_ref().map(|r| plan::cover(&r.hours, plan::MAX_HOUR_RUNS)).unwrap_or_default();
    let (ages, catalog_published) = table_ages(pool).await?;
    let catalog_changed = catalog_published != Some(catalog_version);
    let folds = if plan.full { plan::Folds::default() } else { folds(pool, config.fold_every).await? };
    let mut computed = Vec::new();
    let mut deferred = Vec::new();
    for (view, refresh) in plan.views(views::all(), &touched, catalog_changed, &folds) {
        progress.inc(1);
        if let plan::Refresh::Defer { from } = refresh {
            deferred.push((view.name, from));
            continue;
        }
        progress.set_message(format!("computing {}", view.name));
        computed.push(compute::view(&ctx, &plan, view, refresh).await?);
    }
    // The windowed tables look back from the newest hour below the cut.
    let newest_hour = newest_hour(pool, &computed, &plan).await?;
    let anchor = newest_hour.unwrap_or_else(chrono::Utc::now);
    for table in plan.tables(BATCH_TABLES, &ages, config.model_refresh, newest_hour.is_some(), catalog_changed) {
        progress.inc(1);
        progress.set_message(format!("computing {}", table.name));
        let done = compute::table(&ctx, &plan, table, anchor, &computed).await?;
        computed.push(done);
    }
    progress.set_message("duplicates: newest times and the speed layer's seed");
    let scanned = new_range.map(|r| r.newest);
    let cut_history =
        dedup_history(pool, &ctx, &table, &plan, scanned.as_ref(), deployment.dedup_window_micros).await?;
    let compute_ms = compute_started.elapsed().as_millis() as u64;

    let check_started = Instant::now();
    let report = gate::check(pool, run_id, &computed, config.max_shrink).await?;
    let check_ms = check_started.elapsed().as_millis() as u64;
    if !report.passed() {
        return Ok(RunOutcome::Rejected { run_id, report });
    }

    if let Some(pause) = &config.pause_before_publish {
        pause.reached.notify_one();
        pause.resume.notified().await;
    }
    progress.set_position(progress.length().unwrap_or(1) - 1);
    progress.set_message("publishing in one transaction");
    let publish_started = Instant::now();
    let mut conn = pool.acquire().await?;
    let record = publish::Record {
        run_id,
        token,
        cut: &plan.cut,
        segment_size: deployment.segment_size,
        newest_hour,
        anchor,
        definitions: &definitions,
        history: &cut_history,
        catalog_version,
        pause_while_loading: config.pause_while_loading.as_ref(),
        deferred: &deferred,
    };
    let rows = match publish::publish(&mut conn, &computed, &record).await {
        Ok(rows) => rows,
        Err(e) => {
            // Not left 'running' for the next run to call interrupted.
            let _ = sqlx::query(
                "UPDATE ops.batch_runs SET status = 'failed', finished_at = now(), message = $2 WHERE run_id = $1",
            )
            .bind(run_id)
            .bind(e.to_string())
            .execute(pool)
            .await;
            return Err(e);
        }
    };
    let publish_ms = publish_started.elapsed().as_millis() as u64;
    let tables: Vec<&'static str> =
        computed.iter().filter(|c| matches!(c.relation, compute::Relation::Table(_))).map(|c| c.name).collect();
    sqlx::query(
        "UPDATE ops.batch_runs SET status = 'published', finished_at = now(), rows_per_view = $2, durations_ms = $3,
             message = $4
         WHERE run_id = $1",
    )
    .bind(run_id)
    .bind(json!(rows))
    .bind(json!({
        "prepare": prepare_ms,
        "compute": compute_ms,
        "check": check_ms,
        "publish": publish_ms,
        "total": started.elapsed().as_millis() as u64
    }))
    .bind(
        match (plan.full, plan.redefined.is_empty()) {
            (true, _) => "full: every hour recomputed".to_string(),
            (false, true) => format!("incremental: {} hours recomputed", touched.len()),
            (false, false) => format!(
                "incremental: {} hours recomputed, all hours of {} (definition changed)",
                touched.len(),
                plan.redefined.join(", ")
            ),
        } + &deferred_note(&deferred),
    )
    .execute(pool)
    .await?;
    progress.set_message("checking the complete hours");
    let watch_started = Instant::now();
    match watch::hours(pool, &ctx, &files, config.findings, notifier).await {
        Ok(checked) if !checked.is_empty() => tracing::info!(
            hours = checked.len(),
            ms = watch_started.elapsed().as_millis() as u64,
            "complete hours checked"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "the complete hours were not checked this run"),
    }
    progress.finish_and_clear();
    Ok(RunOutcome::Published {
        run_id,
        delta_version: version,
        hours: (!plan.full).then_some(touched.len()),
        tables,
        backfilled: plan.redefined,
        deferred: deferred.iter().map(|(name, _)| *name).collect(),
        cut: plan.cut,
        rows,
        prepare_ms,
        compute_ms,
        check_ms,
        publish_ms,
        total_ms: started.elapsed().as_millis() as u64,
    })
}

/// What the publish records for duplicates (see [`crate::dedup`]): the
/// newest time per partition below the new cut, and the seed for the
/// partitions the speed layer holds no position in yet. `scanned`: the
/// newest times between the previous cut and the new one, when the run
/// read them already ([`compute::NewRange`]).
async fn dedup_history(
    pool: &PgPool,
    ctx: &datafusion::prelude::SessionContext,
    table: &deltalake::DeltaTable,
    plan: &plan::Plan,
    scanned: Option<&BTreeMap<Partition, i64>>,
    window_micros: i64,
) -> Result<crate::dedup::CutHistory, RunError> {
    let stored: Vec<(i32, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as("SELECT kafka_partition, newest_event_time FROM ops.cut WHERE newest_event_time IS NOT NULL")
            .fetch_all(pool)
            .await?;
    let stored = stored.into_iter().map(|(p, t)| (Partition(p), t.timestamp_micros())).collect();
    let positioned: Vec<i32> =
        sqlx::query_scalar("SELECT kafka_partition FROM ops.speed_offsets").fetch_all(pool).await?;
    let unpositioned: Vec<Partition> = plan.cut.iter().map(|(p, _)| p).filter(|p| !positioned.contains(&p.0)).collect();
    let seeded: Vec<(i32, i64)> =
        sqlx::query_as("SELECT kafka_partition, cut_offset FROM ops.dedup_seed_cut").fetch_all(pool).await?;
    let seeded = seeded.into_iter().map(|(p, o)| (Partition(p), Offset(o))).collect();
    let known = crate::dedup::Known { stored: &stored, unpositioned: &unpositioned, seeded: &seeded, scanned };
    Ok(crate::dedup::cut_history(ctx, table, &plan.previous, &plan.cut, &known, window_micros).await?)
}

/// `; <views> left to the speed layer` when a run deferred folds.
fn deferred_note(deferred: &[(&str, OffsetCut)]) -> String {
    if deferred.is_empty() {
        return String::new();
    }
    let names: Vec<&str> = deferred.iter().map(|(name, _)| *name).collect();
    format!("; {} left to the speed layer until its fold", names.join(", "))
}

/// What decides an incremental run's folds: the views pending since an
/// earlier run, and the records the speed layer holds.
async fn folds(pool: &PgPool, every: std::time::Duration) -> Result<plan::Folds, RunError> {
    let rows: Vec<(String, serde_json::Value, f64)> = sqlx::query_as(
        "SELECT view_name, folded_cut, extract(epoch FROM now() - pending_since)::float8 FROM ops.view_folds",
    )
    .fetch_all(pool)
    .await?;
    // `folded_cut` is written by `cut_json`, which is how `OffsetCut`
    // serializes; one that did not read back would make the fold start at
    // offset 0, which re-reads more and changes nothing (max-only merges).
    let pending = rows
        .into_iter()
        .map(|(name, cut, secs)| {
            let cut: OffsetCut = serde_json::from_value(cut).unwrap_or_default();
            (name, (cut, std::time::Duration::from_secs_f64(secs.max(0.0))))
        })
        .collect();
    let mut conn = pool.acquire().await?;
    Ok(plan::Folds { pending, every, ..speed_side(&mut conn).await? })
}

/// What the speed layer holds: per partition where its records begin and
/// end, and per view registered since it began, where it began that view.
pub(crate) async fn speed_side(conn: &mut sqlx::PgConnection) -> Result<plan::Folds, RunError> {
    let rows: Vec<(i32, Option<i64>, i64)> =
        sqlx::query_as("SELECT kafka_partition, started_offset, next_offset FROM ops.speed_offsets")
            .fetch_all(&mut *conn)
            .await?;
    let speed = rows
        .into_iter()
        .map(|(p, started, next)| (Partition(p), plan::SpeedSpan { started: started.map(Offset), next: Offset(next) }))
        .collect();
    let starts: Vec<(String, i32, i64)> =
        sqlx::query_as("SELECT name, kafka_partition, start_offset FROM ops.view_speed_start")
            .fetch_all(&mut *conn)
            .await?;
    let mut view_starts: BTreeMap<String, OffsetCut> = BTreeMap::new();
    for (name, p, o) in starts {
        view_starts.entry(name).or_default().insert(Partition(p), Offset(o));
    }
    Ok(plan::Folds { speed, view_starts, ..Default::default() })
}

/// What the last published run left: its lake version, the cut, the view
/// fingerprints.
async fn published(pool: &PgPool) -> Result<plan::Published, RunError> {
    let version: Option<i64> = sqlx::query_scalar(
        "SELECT delta_version FROM ops.batch_runs WHERE status = 'published' ORDER BY run_id DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await?
    .flatten();
    let fingerprints: BTreeMap<String, String> =
        sqlx::query_as::<_, (String, String)>("SELECT name, fingerprint FROM ops.view_definitions")
            .fetch_all(pool)
            .await?
            .into_iter()
            .collect();
    let cut: OffsetCut = sqlx::query_as::<_, (i32, i64)>("SELECT kafka_partition, cut_offset FROM ops.cut")
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|(p, o)| (shared_schema::Partition(p), shared_schema::Offset(o)))
        .collect();
    Ok(plan::Published { version, cut, fingerprints })
}

/// The newest event hour below the cut: from the hourly view just computed,
/// and (for an incremental run) from what is already published.
async fn newest_hour(
    pool: &PgPool,
    computed: &[compute::Computed],
    plan: &Plan,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, RunError> {
    let computed_max = compute::newest_hour(computed);
    let published = if plan.full {
        None
    } else {
        let view = product_demand_hourly();
        sqlx::query_scalar::<_, Option<chrono::DateTime<chrono::Utc>>>(AssertSqlSafe(format!(
            "SELECT max({}) FROM batch.{}",
            view.hour_key.unwrap_or("hour"),
            view.name
        )))
        .fetch_one(pool)
        .await?
    };
    Ok(computed_max.max(published))
}

/// How long ago each batch table was computed, and the catalog version the
/// published catalog copy was taken from (`None` when it was never
/// published, `Some(None)` when it was published from no catalog).
async fn table_ages(pool: &PgPool) -> Result<(BTreeMap<String, std::time::Duration>, Option<Option<i64>>), RunError> {
    let rows: Vec<(String, f64, Option<i64>)> = sqlx::query_as(
        "SELECT name, extract(epoch FROM now() - computed_at)::float8, source_version FROM ops.batch_tables",
    )
    .fetch_all(pool)
    .await?;
    let catalog = rows.iter().find(|(name, ..)| name == PRODUCTS.name).map(|(_, _, version)| *version);
    let ages = rows.into_iter().map(|(name, secs, _)| (name, std::time::Duration::from_secs_f64(secs.max(0.0))));
    Ok((ages.collect(), catalog))
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
            deferred,
            compute_ms,
            publish_ms,
            total_ms,
            ..
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
            let deferred = if deferred.is_empty() {
                String::new()
            } else {
                format!(
                    " The speed layer holds the new records of {} until a later run folds them.",
                    deferred.join(", ")
                )
            };
            format!(
                "Run {run_id}: the {what} of lake version {delta_version}, and {tables}. It published with the \
                 offset cut [{}] (partition:offset); the serving views now merge the speed layer from there.{deferred} \
                 Rows written: {}. Took {:.1} s ({:.1} s computing, {:.1} s publishing).",
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

fn cut_json(cut: &OffsetCut) -> serde_json::Value {
    serde_json::Value::Object(cut.iter().map(|(p, o)| (p.0.to_string(), json!(o.0))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_fold_reads_back_the_cut_it_wrote() {
        let cut: OffsetCut = [(Partition(0), Offset(100)), (Partition(3), Offset(7))].into_iter().collect();
        let back: OffsetCut = serde_json::from_value(cut_json(&cut)).unwrap();
        assert_eq!(back, cut);
    }
}
