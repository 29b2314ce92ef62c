//! `batch-layer forget-user --ids-file PATH`: the GDPR right to erasure,
//! for one user or many in one request (ids are read from a file or
//! standard input, never the command line, so they stay out of shell
//! history and process lists).
//!
//! In this order, so that a crash at any step leaves the users at least
//! blocked and a re-run finishes the job (every step is idempotent):
//!
//! 1. take the batch run lock (no recompute pins a snapshot that still
//!    holds the users) and the lake fence exclusively (an ingest flush in
//!    flight commits first; the next one waits for the rewrite below);
//! 2. record HMAC-SHA256(`FORGET_KEY`, id) in `ops.forgotten_users` (never
//!    the id) and bump the forgotten set's version, under the forget fence:
//!    from this commit on, no writer commits a row of these users (see
//!    [`platform::forgotten`]);
//! 3. Delta DELETE of the users' rows in the lake tables `events` (by
//!    `user_id`, one predicate for every id: each file is rewritten once)
//!    and `events_rejected` (records whose Kafka key or bytes name a user,
//!    found by a streaming scan and deleted by their Kafka position);
//! 4. VACUUM: the files the delete replaced, at once (retention 0), and
//!    files no commit references (left by killed writers) once older than a
//!    grace period;
//! 5. a checkpoint, then every older log entry is removed: old commits
//!    carry per-file min/max statistics (which can be a user's id) and the
//!    delete's own predicate. Time travel to before the forget ends here,
//!    which is the point;
//! 6. the registered training exports written before the request
//!    (`ops.training_exports`) that hold a user are rewritten without them;
//! 7. the lake fence is released; one PostgreSQL transaction deletes the
//!    users from every `batch.*`, `speed.*` and `serving.*` table that has a
//!    `user_id` column (found in `information_schema`, so a new user-level
//!    table is covered without a change here);
//! 8. a verification scan of the lake tables, the exports and those tables;
//!    only when it finds no trace is the request marked completed, with
//!    what was removed, what was verified, and when the Kafka topics' copies
//!    age out (their retention, read from the broker).
//!
//! The recompute reads the lake, which no longer holds the users; the demand
//! views keep anonymous aggregates (see `docs/PRIVACY.md`).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Int32Type, Int64Type};
use chrono::{DateTime, Utc};
use datafusion::prelude::{Expr, SessionContext, col as column, lit};
use deltalake::DeltaTable;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::operations::vacuum::VacuumMode;
use futures::StreamExt;
use platform::forgotten::{ForgetKey, Forgotten, Mentions};
use serde_json::json;
use shared_schema::cut::Partition;
use shared_schema::schema::{col, rejected_col};
use sqlx::{AssertSqlSafe, PgPool};

use crate::lake::{self, EVENTS_TABLE, Lake, LakeError, REJECTED_TABLE};
use crate::ledger;

/// Most ids one request takes (a larger list is split by the caller).
pub const MAX_IDS: usize = 100_000;

/// What `forget-user` needs.
#[derive(Debug, Clone)]
pub struct ForgetConfig {
    pub database_url: String,
    pub lake: Lake,
    pub key: ForgetKey,
    /// Files no commit references are removed once older than this (a
    /// concurrent ingest's files are younger until it commits).
    pub orphan_grace: Duration,
    /// Where the topics are whose retention says when their copies of the
    /// users' events age out (`None`: not asked, recorded as unknown).
    pub kafka: Option<TopicsConfig>,
}

/// The Kafka topics that hold the users' records.
#[derive(Debug, Clone)]
pub struct TopicsConfig {
    pub brokers: String,
    pub topics: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ForgetUserError {
    #[error("no user ids given: put one id per line in the --ids-file (or `-` for standard input)")]
    NoIds,
    #[error("{0} user ids in one request; at most {MAX_IDS}: split the file")]
    TooMany(usize),
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
    #[error("counting the users' rows in Delta table {table}: {source}")]
    Count { table: &'static str, source: Box<crate::reconcile::ReconcileError> },
    #[error("scanning Delta table {table}: {source}")]
    Scan { table: &'static str, source: Box<datafusion::error::DataFusionError> },
    #[error(transparent)]
    Export(Box<crate::export::ExportError>),
    #[error(
        "the verification scan still found the users' data ({0}); the request is not marked completed: run forget-user again with the same ids"
    )]
    Traces(String),
}

impl From<crate::export::ExportError> for ForgetUserError {
    fn from(e: crate::export::ExportError) -> Self {
        Self::Export(Box::new(e))
    }
}

impl From<LakeError> for ForgetUserError {
    fn from(e: LakeError) -> Self {
        Self::Lake(Box::new(e))
    }
}

/// What a forget did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForgetReport {
    /// Per user, the keyed hash recorded in `ops.forgotten_users` and how
    /// many times it has been requested (more than 1: a re-run).
    pub users: Vec<(String, i32)>,
    /// The forgotten set's version this request created.
    pub set_version: i64,
    /// Rows deleted per lake table and per PostgreSQL table.
    pub lake_rows: BTreeMap<String, u64>,
    pub table_rows: BTreeMap<String, u64>,
    /// Data files and log files removed from the lake.
    pub files_removed: u64,
    pub log_files_removed: u64,
    /// Registered exports written before the request: where each is, and
    /// how many of its rows were the users' (0: checked, left alone).
    pub exports: Vec<(String, u64)>,
    /// Registered exports whose folder is gone (deleted by their owner).
    pub exports_missing: Vec<String>,
    /// When the topics' copies of the users' records are deleted by
    /// retention at the latest, or why that is not known.
    pub topic_copies_gone_by: Result<DateTime<Utc>, String>,
}

impl ForgetReport {
    /// Whether every user had been forgotten before (a re-run).
    pub fn repeated(&self) -> bool {
        self.users.iter().all(|(_, n)| *n > 1)
    }

    /// The one line `forget-user` prints (no id, only hash prefixes).
    pub fn summary(&self) -> String {
        let rows = |m: &BTreeMap<String, u64>| {
            let hits: Vec<String> = m.iter().filter(|(_, n)| **n > 0).map(|(t, n)| format!("{t} {n}")).collect();
            if hits.is_empty() { "none".to_string() } else { hits.join(", ") }
        };
        let who = match self.users.as_slice() {
            [(hash, n)] => format!("user {} ({})", &hash[..16], if *n > 1 { "again" } else { "first request" }),
            many => {
                let again = many.iter().filter(|(_, n)| *n > 1).count();
                format!("{} users ({again} requested before)", many.len())
            }
        };
        let rewritten = self.exports.iter().filter(|(_, n)| *n > 0).count();
        let kafka = match &self.topic_copies_gone_by {
            Ok(t) => format!("Kafka's copies age out by {}", t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            Err(why) => format!("Kafka's copies: {why}"),
        };
        format!(
            "forgot {who}: lake rows deleted: {}; table rows deleted: {}; {} data files and {} log files removed from the lake; {} of {} earlier exports rewritten{}; verified; {kafka}",
            rows(&self.lake_rows),
            rows(&self.table_rows),
            self.files_removed,
            self.log_files_removed,
            rewritten,
            self.exports.len(),
            if self.exports_missing.is_empty() {
                String::new()
            } else {
                format!(" ({} gone)", self.exports_missing.len())
            },
        )
    }
}

/// Reads user ids, one per line, from `path`, or standard input for `-`
/// ([`forget_users`] trims them and drops empty lines and repeats).
pub fn read_ids(path: &std::path::Path) -> std::io::Result<Vec<String>> {
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(path)?
    };
    Ok(text.lines().map(str::to_owned).collect())
}

/// Forgets `ids` everywhere (see the module docs).
pub async fn forget_users(config: &ForgetConfig, ids: &[String]) -> Result<ForgetReport, ForgetUserError> {
    let ids: Vec<String> = {
        let mut seen = HashSet::new();
        ids.iter().map(|i| i.trim()).filter(|i| !i.is_empty() && seen.insert(*i)).map(str::to_owned).collect()
    };
    if ids.is_empty() {
        return Err(ForgetUserError::NoIds);
    }
    if ids.len() > MAX_IDS {
        return Err(ForgetUserError::TooMany(ids.len()));
    }
    let pool = platform::db::connect(&config.database_url, 3, Duration::from_secs(30)).await?;
    platform::db::check(&pool).await?;
    // Refuses a key other than the one earlier requests were hashed with.
    Forgotten::load(&pool, Some(&config.key)).await?;
    // The topics' retention first: a broker that is away must not hold the
    // fences below.
    let topic_copies = topic_copies_gone_by(config.kafka.as_ref()).await;
    let mut lock = pool.acquire().await?;
    // Dropped on an error, the connection closes and releases both locks.
    lock.close_on_drop();
    sqlx::query("SELECT pg_advisory_lock($1)").bind(crate::recompute::RUN_LOCK).execute(&mut *lock).await?;
    // A run that lost its lock (its session dropped) may still be computing
    // from a snapshot that holds these users: a new token fences its
    // publish off, as a newer run's would.
    sqlx::query("UPDATE ops.run_fence SET token = token + 1").execute(&mut *lock).await?;
    sqlx::query("SELECT pg_advisory_lock($1)").bind(platform::forgotten::LAKE_FENCE).execute(&mut *lock).await?;
    let lake = forget_in_lake(config, &pool, &ids).await;
    let _ =
        sqlx::query("SELECT pg_advisory_unlock($1)").bind(platform::forgotten::LAKE_FENCE).execute(&mut *lock).await;
    let outcome = match lake {
        Ok(mut report) => {
            report.topic_copies_gone_by = topic_copies;
            finish(&pool, config, &ids, report).await
        }
        Err(e) => Err(e),
    };
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)").bind(crate::recompute::RUN_LOCK).execute(&mut *lock).await;
    outcome
}

/// Forgets one user: [`forget_users`] with one id.
pub async fn forget_user(config: &ForgetConfig, user_id: &str) -> Result<ForgetReport, ForgetUserError> {
    forget_users(config, &[user_id.to_string()]).await
}

/// Steps 2 to 6, under the lake fence.
async fn forget_in_lake(config: &ForgetConfig, pool: &PgPool, ids: &[String]) -> Result<ForgetReport, ForgetUserError> {
    let hashes: Vec<String> = ids.iter().map(|id| config.key.hash(id)).collect();
    let (set_version, users) = platform::forgotten::record_forgotten(pool, &config.key, &hashes).await?;
    let mut report = ForgetReport {
        users,
        set_version,
        lake_rows: BTreeMap::new(),
        table_rows: BTreeMap::new(),
        files_removed: 0,
        log_files_removed: 0,
        exports: Vec::new(),
        exports_missing: Vec::new(),
        topic_copies_gone_by: Err("not asked".into()),
    };
    let mentions = Mentions::new(ids.iter().map(String::as_str));
    for name in [EVENTS_TABLE, REJECTED_TABLE] {
        let Some(table) = config.lake.open(name).await? else { continue };
        let (table, deleted) = delete_user_rows(table, name, ids, &mentions).await?;
        report.lake_rows.insert(name.to_string(), deleted);
        let table = if name == EVENTS_TABLE {
            let (table, scrubbed) = scrub_extra_mentions(table, ids).await?;
            if scrubbed > 0 {
                report.lake_rows.insert(format!("{name} (extra fields naming them, cleared)"), scrubbed);
            }
            table
        } else {
            table
        };
        let (files, logs) = purge(table, name, config.orphan_grace).await?;
        report.files_removed += files;
        report.log_files_removed += logs;
    }
    let scrubbed = crate::export::scrub(pool, ids, set_version).await?;
    report.exports = scrubbed.checked;
    report.exports_missing = scrubbed.missing;
    Ok(report)
}

/// Steps 7 and 8.
async fn finish(
    pool: &PgPool,
    config: &ForgetConfig,
    ids: &[String],
    mut report: ForgetReport,
) -> Result<ForgetReport, ForgetUserError> {
    report.table_rows = delete_from_tables(pool, ids).await?;
    let verified = verify(pool, config, ids).await?;
    let traces: Vec<String> = verified.iter().filter(|(_, n)| **n > 0).map(|(t, n)| format!("{t}: {n}")).collect();
    if !traces.is_empty() {
        return Err(ForgetUserError::Traces(traces.join(", ")));
    }
    let hashes: Vec<String> = report.users.iter().map(|(h, _)| h.clone()).collect();
    sqlx::query(
        "UPDATE ops.forgotten_users SET completed_at = now(), removed = $2, verified = $3, topic_copies_gone_by = $4
         WHERE user_hash = ANY($1)",
    )
    .bind(&hashes)
    .bind(json!({
        "request_users": ids.len(),
        "lake": report.lake_rows,
        "tables": report.table_rows,
        "exports_rewritten": report.exports.iter().filter(|(_, n)| *n > 0).count(),
        "topic_copies": report.topic_copies_gone_by.as_ref().err(),
    }))
    .bind(json!(verified))
    .bind(report.topic_copies_gone_by.as_ref().ok())
    .execute(pool)
    .await?;
    let n = report.users.len();
    tracing::info!(users = n, version = report.set_version, lake = ?report.lake_rows, tables = ?report.table_rows, "users forgotten and verified");
    Ok(report)
}

/// Deletes the users' rows of one lake table; returns the table after the
/// delete and how many rows went. The delete's commit adds them to the
/// table's ledger ([`crate::ledger`]), per Kafka partition.
async fn delete_user_rows(
    table: DeltaTable,
    name: &'static str,
    ids: &[String],
    mentions: &Mentions,
) -> Result<(DeltaTable, u64), ForgetUserError> {
    let (predicate, per_partition) = if name == EVENTS_TABLE {
        let predicate = users_predicate(ids);
        let rows = crate::reconcile::rows_by_partition(&table, name, Some(predicate.clone()))
            .await
            .map_err(|e| ForgetUserError::Count { table: name, source: Box::new(e) })?;
        (predicate, rows)
    } else {
        let positions = rejected_positions(&table, mentions).await?;
        let rows = positions.iter().map(|(p, o)| (Partition(*p), o.len() as i64)).collect();
        match rejected_predicate(positions) {
            Some(predicate) => (predicate, rows),
            None => return Ok((table, 0)),
        }
    };
    if per_partition.is_empty() {
        return Ok((table, 0));
    }
    let mut erased = ledger::Counts::default();
    for (p, n) in &per_partition {
        erased.add(*p, ledger::Kind::Erased, *n);
    }
    let committed = ledger::committed(&table, per_partition.keys().copied())
        .await
        .map_err(|source| ForgetUserError::Delta { table: name, step: "read the ledger", source: Box::new(source) })?;
    let props = CommitProperties::default().with_application_transactions(ledger::Counts::txns(&committed, &erased));
    let (table, metrics) = table
        .delete()
        .with_predicate(predicate)
        .with_commit_properties(props)
        .await
        .map_err(|source| ForgetUserError::Delta { table: name, step: "delete", source: Box::new(source) })?;
    let deleted = metrics.num_deleted_rows.unwrap_or_default() as u64;
    let counted: i64 = per_partition.values().sum();
    if deleted as i64 != counted {
        // The fence keeps writers out, so this is a bug, and the ledger
        // now disagrees with the table: the next run's reconciliation says so.
        tracing::error!(table = name, deleted, counted, "forget deleted other rows than it counted");
    }
    Ok((table, deleted))
}

/// Other users' events whose unknown fields (`extra`, kept as sent) name
/// one of the users as a JSON string: their `extra` is cleared, the events
/// themselves stay. Returns the table after the update and how many events
/// were cleared (none on a lake from before the column).
async fn scrub_extra_mentions(table: DeltaTable, ids: &[String]) -> Result<(DeltaTable, u64), ForgetUserError> {
    let Some(predicate) = extra_mentions(&table, ids) else { return Ok((table, 0)) };
    let (table, metrics) =
        table.update().with_predicate(predicate).with_update(col::EXTRA, "NULL").await.map_err(|source| {
            ForgetUserError::Delta { table: EVENTS_TABLE, step: "clear extra fields", source: Box::new(source) }
        })?;
    Ok((table, metrics.num_updated_rows as u64))
}

/// `extra` holds one of `ids` as a JSON string; `None` when `table` has no
/// `extra` column (a lake from before it) or there are no ids.
fn extra_mentions(table: &DeltaTable, ids: &[String]) -> Option<Expr> {
    if !table.snapshot().is_ok_and(|s| s.schema().field(col::EXTRA).is_some()) {
        return None;
    }
    ids.iter()
        .map(|id| {
            let quoted = serde_json::to_string(id).unwrap_or_default();
            datafusion::functions::expr_fn::strpos(column(col::EXTRA), lit(quoted)).gt(lit(0))
        })
        .reduce(Expr::or)
}

fn users_predicate(ids: &[String]) -> Expr {
    column(col::USER_ID).in_list(ids.iter().map(|id| lit(id.as_str())).collect(), false)
}

/// A predicate selecting the rejected records at `positions` (per
/// partition, offsets); `None` when there are none.
fn rejected_predicate(positions: BTreeMap<i32, Vec<i64>>) -> Option<Expr> {
    if positions.is_empty() {
        return None;
    }
    let terms = positions
        .into_iter()
        .map(|(p, offsets)| {
            column(rejected_col::KAFKA_PARTITION)
                .eq(lit(p))
                .and(column(rejected_col::KAFKA_OFFSET).in_list(offsets.into_iter().map(lit).collect(), false))
        })
        .collect();
    Some(crate::scope::any(terms))
}

/// Per partition, the offsets of the rejected records that name a user.
async fn rejected_positions(
    table: &DeltaTable,
    mentions: &Mentions,
) -> Result<BTreeMap<i32, Vec<i64>>, ForgetUserError> {
    use rejected_col::{KAFKA_KEY, KAFKA_OFFSET, KAFKA_PARTITION, PAYLOAD};
    let ctx = SessionContext::new();
    lake::register(&ctx, REJECTED_TABLE, table).await?;
    let sql = format!("SELECT {KAFKA_PARTITION}, {KAFKA_OFFSET}, {KAFKA_KEY}, {PAYLOAD} FROM {REJECTED_TABLE}");
    let scan = |source| ForgetUserError::Scan { table: REJECTED_TABLE, source: Box::new(source) };
    let mut stream = ctx.sql(&sql).await.map_err(scan)?.execute_stream().await.map_err(scan)?;
    let mut positions: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    while let Some(b) = stream.next().await {
        let b = b.map_err(scan)?;
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
            if !mentions.in_record(key, payload.value(i)).is_empty() {
                positions.entry(partition.value(i)).or_default().push(offset.value(i));
            }
        }
    }
    Ok(positions)
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

/// The base tables with a `user_id` column in the layers' schemas.
async fn user_tables(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
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
    Ok(tables.into_iter().map(|(s, t)| format!("{}.{}", quote_ident(&s), quote_ident(&t))).collect())
}

/// The DLQ outbox rows (rejected records not yet shipped to the DLQ topic)
/// whose key or bytes name a user.
async fn outbox_rows(conn: &mut sqlx::PgConnection, ids: &[String]) -> Result<Vec<i64>, sqlx::Error> {
    let mentions = Mentions::new(ids.iter().map(String::as_str));
    let mut found = Vec::new();
    let mut after = 0i64;
    // A page at a time: the outbox is small unless the DLQ topic is away.
    loop {
        let page: Vec<(i64, Option<Vec<u8>>, Vec<u8>)> =
            sqlx::query_as("SELECT id, kafka_key, payload FROM ops.dlq_outbox WHERE id > $1 ORDER BY id LIMIT 1000")
                .bind(after)
                .fetch_all(&mut *conn)
                .await?;
        let Some(last) = page.last().map(|r| r.0) else { break };
        after = last;
        found.extend(page.into_iter().filter(|(_, k, p)| !mentions.in_record(k.as_deref(), p).is_empty()).map(|r| r.0));
    }
    Ok(found)
}

/// Deletes the users from every table of [`user_tables`] and their records
/// from the DLQ outbox, in one transaction.
async fn delete_from_tables(pool: &PgPool, ids: &[String]) -> Result<BTreeMap<String, u64>, ForgetUserError> {
    let tables = user_tables(pool).await?;
    let mut tx = pool.begin().await?;
    let mut rows = BTreeMap::new();
    let outbox = outbox_rows(&mut tx, ids).await?;
    let done = sqlx::query("DELETE FROM ops.dlq_outbox WHERE id = ANY($1)").bind(&outbox).execute(&mut *tx).await?;
    rows.insert("ops.dlq_outbox".to_string(), done.rows_affected());
    for table in tables {
        let done = sqlx::query(AssertSqlSafe(format!("DELETE FROM {table} WHERE user_id = ANY($1)")))
            .bind(ids)
            .execute(&mut *tx)
            .await?;
        rows.insert(table.replace('"', ""), done.rows_affected());
    }
    tx.commit().await?;
    Ok(rows)
}

/// The verification scan: per place, the rows that still hold a user (all
/// zero when the forget is complete). Reads the lake tables afresh.
async fn verify(
    pool: &PgPool,
    config: &ForgetConfig,
    ids: &[String],
) -> Result<BTreeMap<String, u64>, ForgetUserError> {
    let mut found = BTreeMap::new();
    if let Some(table) = config.lake.open(EVENTS_TABLE).await? {
        let ctx = SessionContext::new();
        lake::register(&ctx, EVENTS_TABLE, &table).await?;
        let scan = |source| ForgetUserError::Scan { table: EVENTS_TABLE, source: Box::new(source) };
        let n = ctx.table(EVENTS_TABLE).await.map_err(scan)?.filter(users_predicate(ids)).map_err(scan)?;
        found.insert(format!("lake {EVENTS_TABLE}"), n.count().await.map_err(scan)? as u64);
        if let Some(mentioned) = extra_mentions(&table, ids) {
            let n = ctx.table(EVENTS_TABLE).await.map_err(scan)?.filter(mentioned).map_err(scan)?;
            found.insert(format!("lake {EVENTS_TABLE} extra"), n.count().await.map_err(scan)? as u64);
        }
    }
    if let Some(table) = config.lake.open(REJECTED_TABLE).await? {
        let mentions = Mentions::new(ids.iter().map(String::as_str));
        let positions = rejected_positions(&table, &mentions).await?;
        found.insert(format!("lake {REJECTED_TABLE}"), positions.values().map(|v| v.len() as u64).sum());
    }
    for table in user_tables(pool).await? {
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {table} WHERE user_id = ANY($1)")))
            .bind(ids)
            .fetch_one(pool)
            .await?;
        found.insert(table.replace('"', ""), n as u64);
    }
    let mut conn = pool.acquire().await?;
    found.insert("ops.dlq_outbox".to_string(), outbox_rows(&mut conn, ids).await?.len() as u64);
    drop(conn);
    for (location, n) in crate::export::holding(pool, ids).await? {
        found.insert(format!("export {location}"), n);
    }
    Ok(found)
}

/// When the topics' copies of a record written now are gone at the latest:
/// now plus the longest retention (plus `segment.ms` where a topic reports
/// one: Kafka deletes whole segments, and the active one rolls only then).
async fn topic_copies_gone_by(kafka: Option<&TopicsConfig>) -> Result<DateTime<Utc>, String> {
    let Some(kafka) = kafka else {
        return Err("not asked (no brokers given)".into());
    };
    let mut longest = chrono::Duration::zero();
    for topic in &kafka.topics {
        let configs = crate::topics::describe(&kafka.brokers, topic).await.map_err(|e| e.to_string())?;
        let ms = |name: &str| configs.get(name).and_then(|v| v.parse::<i64>().ok());
        match ms("retention.ms") {
            None => return Err(format!("topic {topic} reports no retention.ms")),
            Some(r) if r < 0 => return Err(format!("topic {topic} keeps records forever (retention.ms = {r})")),
            Some(r) => {
                let total = chrono::Duration::milliseconds(r + ms("segment.ms").unwrap_or(0).max(0));
                longest = longest.max(total);
            }
        }
    }
    Ok(Utc::now() + longest)
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
