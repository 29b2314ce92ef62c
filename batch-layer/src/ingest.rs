//! `batch-layer ingest`: Kafka topic `events` → Delta table `events`,
//! each offset exactly once.
//!
//! The consumer is *assigned* every partition at the offset the lake says
//! comes next ([`crate::lake::committed_offsets`]), never at the broker's
//! group offsets. Records are buffered and flushed by size or time. A flush
//! is two Delta commits, each carrying the next offset per partition as a
//! `txn` action:
//!
//! 1. `events_rejected`: the rejected records not yet in it (records below
//!    its own txn offsets are skipped, so a replay never duplicates them);
//! 2. `events`: the valid events.
//!
//! A kill at any moment therefore loses nothing (the broker still has every
//! record past the committed offsets) and duplicates nothing (each table
//! skips what its txn offsets cover). Data files of an interrupted commit
//! are unreferenced and removed by vacuum.
//!
//! Forgotten users (`forget-user`) are dropped, not written. Each flush
//! holds the lake fence shared (see [`platform::forgotten`]) from checking
//! the forgotten set's version to its last Delta commit: `forget-user` takes
//! it exclusively while it records a request and rewrites the lake, so a
//! flush either commits before the request (and the rewrite removes the
//! user) or runs after it with the new set, on tables reopened after the
//! rewrite.
//!
//! Offsets that hold no record (removed by retention before the ingest read
//! them, compacted away, transaction markers, aborted transactions: the
//! consumer reads `read_committed`) are stepped over, never waited for: each
//! such gap is recorded in `ops.offset_gaps` before the lake commit that
//! passes it, counted, and notified (see [`platform::gaps`]). Whether the
//! ingest has caught up is told by the broker (end of partition), not by
//! reaching the high watermark, which a trailing marker never lets it reach.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use deltalake::DeltaTable;
use deltalake::arrow::array::{
    BinaryBuilder, Int32Builder, Int64Builder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder,
};
use deltalake::kernel::Transaction;
use deltalake::kernel::transaction::CommitProperties;
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Message, TopicPartitionList};
use shared_schema::cut::{Offset, Partition};
use shared_schema::dedup::History;
use shared_schema::schema::PARTITION_COLUMNS;
use shared_schema::{EventDecoder, RawRecord, RejectedRecord, events_schema, rejected_schema};
use tokio_util::sync::CancellationToken;

use platform::forgotten::LakeFence;

use crate::lake::{EVENTS_TABLE, Lake, LakeError, REJECTED_TABLE, committed_offsets, ingest_app_id};
use crate::ledger;

/// What `ingest` needs.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    pub brokers: String,
    pub topic: String,
    pub lake: Lake,
    /// Flush at the latest this long after the first buffered record.
    pub flush_interval: Duration,
    /// Flush as soon as this many records are buffered.
    pub flush_records: usize,
    /// Flush as soon as the buffered records hold this many bytes (keys and
    /// payloads): memory stays bounded whatever the records' size.
    pub flush_bytes: usize,
    /// Stop once every partition is read up to its end as of the start.
    pub until_caught_up: bool,
    pub show_progress: bool,
    /// The platform database: which users are forgotten, where offset gaps
    /// are recorded and notifications kept (`None`: none of that; tools and
    /// tests without one).
    pub db: Option<PlatformDb>,
    /// A long-running ingest's `/readyz` (ready once it consumes) and lag
    /// metrics (`batch_ingest_partition_lag_records`, every 15 s); `None`
    /// for a one-off catch-up.
    pub ready: Option<platform::ops_http::Readiness>,
}

/// [`IngestConfig::flush_bytes`] unless configured: 64 MiB.
pub const DEFAULT_FLUSH_BYTES: usize = 64 << 20;

/// The platform database as the ingest uses it, with the key forgotten
/// user ids were hashed with and where notifications are POSTed.
#[derive(Debug, Clone)]
pub struct PlatformDb {
    pub database_url: String,
    pub key: Option<platform::forgotten::ForgetKey>,
    pub notify_webhook: Option<platform::notify::Webhook>,
}

impl PlatformDb {
    /// `database_url` with no forget key and no webhook.
    pub fn new(database_url: impl Into<String>) -> Self {
        Self { database_url: database_url.into(), key: None, notify_webhook: None }
    }
}

impl IngestConfig {
    /// Drain `topic` into `lake` until caught up, flushing every second or
    /// 10,000 records, without a progress bar (tools and tests).
    pub fn catch_up(brokers: &str, topic: &str, lake: &Lake) -> Self {
        Self {
            brokers: brokers.to_string(),
            topic: topic.to_string(),
            lake: lake.clone(),
            flush_interval: Duration::from_secs(1),
            flush_records: 10_000,
            flush_bytes: DEFAULT_FLUSH_BYTES,
            until_caught_up: true,
            show_progress: false,
            db: None,
            ready: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Lake(Box<LakeError>),
    #[error("Kafka ({brokers}): {source}")]
    Kafka { brokers: String, source: Box<KafkaError> },
    #[error("topic {topic:?} does not exist on {brokers} (`make up` creates `events`)")]
    NoTopic { topic: String, brokers: String },
    #[error(
        "topic {topic:?} partition {partition} ends at offset {end}, but the lake already holds offsets up to {lake}: the topic was recreated or truncated; point LAKE_URI at a new lake or restore the topic"
    )]
    TopicBehindLake { topic: String, partition: i32, end: i64, lake: i64 },
    #[error("committing to Delta table {table}: {source}")]
    Commit { table: &'static str, source: Box<deltalake::DeltaTableError> },
    #[error("decoding records failed: {0}")]
    Decode(#[from] shared_schema::decode::DecodeError),
    #[error("building the rejected-records batch failed: {0}")]
    Arrow(#[from] deltalake::arrow::error::ArrowError),
    #[error(transparent)]
    Db(#[from] platform::db::DbError),
    #[error(transparent)]
    Forgotten(#[from] platform::forgotten::ForgetError),
}

impl From<LakeError> for IngestError {
    fn from(e: LakeError) -> Self {
        Self::Lake(Box::new(e))
    }
}

/// What one `ingest` run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestSummary {
    pub records: u64,
    pub events: u64,
    pub rejected: u64,
    pub commits: u64,
    /// Offsets stepped over because they hold no record (see [`platform::gaps`]).
    pub gap_records: u64,
    /// Next offset per partition in `events` when the run ended.
    pub offsets: BTreeMap<Partition, Offset>,
}

struct Buffered {
    partition: i32,
    offset: i64,
    timestamp: Option<chrono::DateTime<Utc>>,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
}

/// The platform database while the ingest runs: the forgotten users
/// (re-read before each flush), and where gaps are recorded and notified.
struct Db {
    pool: sqlx::PgPool,
    key: Option<platform::forgotten::ForgetKey>,
    users: platform::forgotten::Forgotten,
    notifier: platform::notify::Notifier,
    notices: platform::gaps::GapNotices,
}

impl Db {
    async fn connect(config: &PlatformDb) -> Result<Self, IngestError> {
        let pool = platform::db::connect(&config.database_url, 4, Duration::from_secs(30)).await?;
        platform::db::check(&pool).await?;
        let users = platform::forgotten::Forgotten::load(&pool, config.key.as_ref()).await?;
        let notifier = platform::notify::Notifier::spawn(
            platform::notify::NotifyConfig::new(config.notify_webhook.clone(), "batch-ingest"),
            Some(pool.clone()),
        );
        Ok(Self { pool, key: config.key.clone(), users, notifier, notices: platform::gaps::GapNotices::default() })
    }

    /// Takes the lake fence shared for one flush; reloads the forgotten
    /// users and reopens `tables` when users were forgotten since the last
    /// flush (the forget rewrote the tables and pruned their log). Release
    /// with [`LakeFence::release`] after the flush's commits.
    async fn fence(&mut self, config: &IngestConfig, tables: &mut Tables) -> Result<LakeFence, IngestError> {
        let db = |e: sqlx::Error| IngestError::Db(platform::db::DbError::from(e));
        let mut fence = LakeFence::shared(&self.pool).await.map_err(db)?;
        let version = platform::forgotten::current_version(fence.conn()).await.map_err(db)?;
        if version != self.users.version() {
            self.users = platform::forgotten::Forgotten::load(&self.pool, self.key.as_ref()).await?;
            tables.reopen(config).await?;
            tracing::info!(forgotten = self.users.len(), "users were forgotten; reloaded them and the lake tables");
        }
        Ok(fence)
    }

    /// Records `gaps` (before the lake commit that passes them) and
    /// notifies them when due.
    async fn record_gaps(&mut self, topic: &str, gaps: &[platform::gaps::Gap]) -> Result<(), IngestError> {
        let mut conn = self.pool.acquire().await.map_err(platform::db::DbError::from)?;
        platform::gaps::record(&mut conn, platform::gaps::Layer::Batch, topic, gaps)
            .await
            .map_err(platform::db::DbError::from)?;
        if let Some(n) = self.notices.notice(platform::gaps::Layer::Batch, topic, gaps, Instant::now()) {
            self.notifier.send(n);
        }
        Ok(())
    }

    /// Counts what a flush's events said about the contract in
    /// `ops.event_shapes`, and notifies once: a schema_version other than 1
    /// when first seen, an unknown field when its share of a flush first
    /// reaches [`UNKNOWN_FIELD_SHARE`]. Best effort: a failure is logged,
    /// never a reason to stop ingesting.
    async fn record_shape(&mut self, shape: &shared_schema::decode::Shape, events: u64) {
        use platform::notify::{Notification, Severity};
        let rows = shape.versions.iter().map(|(v, n)| ("schema_version", v.to_string(), *n, *v != 1)).chain(
            shape.unknown_fields.iter().map(|(f, n)| {
                ("unknown_field", f.clone(), *n, events > 0 && *n as f64 / events as f64 >= UNKNOWN_FIELD_SHARE)
            }),
        );
        for (kind, name, n, due) in rows {
            let notify: Result<Option<bool>, sqlx::Error> = sqlx::query_scalar(
                "INSERT INTO ops.event_shapes AS s (kind, name, events) VALUES ($1, $2, $3)
                 ON CONFLICT (kind, name) DO UPDATE SET events = s.events + EXCLUDED.events
                 RETURNING s.notified_at IS NULL AND $4",
            )
            .bind(kind)
            .bind(&name)
            .bind(n as i64)
            .bind(due)
            .fetch_optional(&self.pool)
            .await;
            match notify {
                Ok(Some(true)) => {
                    let share = if events > 0 { n as f64 / events as f64 } else { 0.0 };
                    let n = if kind == "schema_version" {
                        Notification::new(
                            "event_schema_version_new",
                            Severity::Warning,
                            format!("events of schema_version {name} arrive; the lake stores the version as sent"),
                            serde_json::json!({ "schema_version": name, "events": n }),
                        )
                    } else {
                        Notification::new(
                            "event_field_unknown",
                            Severity::Warning,
                            format!(
                                "{:.0}% of the events carry a field {name:?} the contract does not know",
                                share * 100.0
                            ),
                            serde_json::json!({ "field": name, "events": n, "share": share }),
                        )
                    };
                    self.notifier.send(n);
                    let _ =
                        sqlx::query("UPDATE ops.event_shapes SET notified_at = now() WHERE kind = $1 AND name = $2")
                            .bind(kind)
                            .bind(&name)
                            .execute(&self.pool)
                            .await;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot record the events' schema versions and unknown fields"),
            }
        }
    }
}

/// Share of a flush's events carrying an unknown field at which it is notified.
pub const UNKNOWN_FIELD_SHARE: f64 = 0.01;

struct Tables {
    events: DeltaTable,
    rejected: DeltaTable,
    /// Next offset per partition of each table.
    events_next: BTreeMap<Partition, Offset>,
    rejected_next: BTreeMap<Partition, Offset>,
    /// What duplicates are judged against: the keys below the replay
    /// position (see [`crate::dedup`]).
    history: History,
    /// The ledger `events` records (see [`crate::ledger`]), and what was
    /// counted of offsets it does not cover yet: recorded with the commit
    /// that moves past them.
    ledger: ledger::Counts,
    pending: ledger::Counts,
}

impl Tables {
    /// Reopens both tables at their newest version (after a forget rewrote
    /// them and removed the log entries this snapshot would read next).
    async fn reopen(&mut self, config: &IngestConfig) -> Result<(), IngestError> {
        if let Some(t) = config.lake.open(EVENTS_TABLE).await? {
            self.events = t;
        }
        if let Some(t) = config.lake.open(REJECTED_TABLE).await? {
            self.rejected = t;
        }
        Ok(())
    }
}

/// The ingest consumer's context: the end of a partition, which the ingest
/// asks to be told of, is news, not an error (librdkafka's default context
/// logs it as one).
struct IngestContext;

impl rdkafka::ClientContext for IngestContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(rdkafka::error::RDKafkaErrorCode::PartitionEOF) {
            tracing::debug!(%reason, "end of partition");
        } else {
            tracing::error!("librdkafka: {error}: {reason}");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for IngestContext {}

fn consumer(config: &IngestConfig) -> Result<StreamConsumer<IngestContext>, IngestError> {
    ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", "lambda-batch-ingest")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.message.max.bytes", "4194304")
        // Told when a partition is read to its end: caught up, even when the
        // last offsets are transaction markers that are never delivered.
        .set("enable.partition.eof", "true")
        // Only committed records of transactional producers reach the lake.
        .set("isolation.level", "read_committed")
        .create_with_context(IngestContext)
        .map_err(|source| IngestError::Kafka { brokers: config.brokers.clone(), source: Box::new(source) })
}

/// Runs the ingest until caught up (with `until_caught_up`) or `shutdown`.
pub async fn run(config: IngestConfig, shutdown: CancellationToken) -> Result<IngestSummary, IngestError> {
    let kafka = |source: KafkaError| IngestError::Kafka { brokers: config.brokers.clone(), source: Box::new(source) };
    // The schema check first: a database that is not migrated is reported
    // before anything else is touched.
    let mut db = match &config.db {
        Some(d) => Some(Db::connect(d).await?),
        None => None,
    };
    let consumer = consumer(&config)?;
    let metadata = consumer.fetch_metadata(Some(&config.topic), Duration::from_secs(30)).map_err(kafka)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == config.topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(IngestError::NoTopic { topic: config.topic.clone(), brokers: config.brokers.clone() });
    }

    let events = config.lake.open_or_create(EVENTS_TABLE, &events_schema(), &PARTITION_COLUMNS).await?;
    let rejected = config
        .lake
        .open_or_create(REJECTED_TABLE, &rejected_schema(), &[shared_schema::schema::rejected_col::REJECTED_DATE])
        .await?;
    let commit_err =
        |table| move |source: deltalake::DeltaTableError| IngestError::Commit { table, source: Box::new(source) };
    // Collected first: an iterator with a closure held across the await
    // would keep the future from being `Send` (a spawned ingest).
    let typed: Vec<Partition> = partitions.iter().copied().map(Partition).collect();
    let events_next =
        committed_offsets(&events, &config.topic, typed.clone()).await.map_err(commit_err(EVENTS_TABLE))?;
    let rejected_next =
        committed_offsets(&rejected, &config.topic, typed.clone()).await.map_err(commit_err(REJECTED_TABLE))?;
    let ledger = ledger::committed(&events, typed).await.map_err(commit_err(EVENTS_TABLE))?;

    // The deployment's window; the default before any binary created the
    // deployment row, or without a database.
    let window = match &db {
        Some(d) => platform::db::dedup_window_micros(&d.pool).await.map_err(platform::db::DbError::from)?,
        None => None,
    }
    .unwrap_or(shared_schema::dedup::DEFAULT_WINDOW_MICROS);
    let history = crate::dedup::ingest_history(&events, &config.topic, &events_next, window).await?;
    tracing::debug!(keys = history.len(), window_s = window / 1_000_000, "duplicates history loaded from the lake");
    let mut tables =
        Tables { events, rejected, events_next, rejected_next, history, ledger, pending: ledger::Counts::default() };

    let mut assignment = TopicPartitionList::new();
    let mut ends: BTreeMap<Partition, Offset> = BTreeMap::new();
    let mut backlog = 0u64;
    for &p in &partitions {
        let start = tables.events_next.get(&Partition(p)).map_or(0, |o| o.0);
        assignment.add_partition_offset(&config.topic, p, rdkafka::Offset::Offset(start)).map_err(kafka)?;
        let (low, high) = consumer.fetch_watermarks(&config.topic, p, Duration::from_secs(30)).map_err(kafka)?;
        if high < start {
            return Err(IngestError::TopicBehindLake {
                topic: config.topic.clone(),
                partition: p,
                end: high,
                lake: start,
            });
        }
        ends.insert(Partition(p), Offset(high));
        backlog += (high - start.max(low)).max(0) as u64;
    }
    consumer.assign(&assignment).map_err(kafka)?;
    tracing::info!(
        topic = %config.topic,
        partitions = partitions.len(),
        resume = ?tables.events_next,
        backlog,
        lake = %config.lake.root(),
        "ingest started"
    );

    // What the lake holds per partition, for the lag watcher.
    let committed: Arc<Mutex<BTreeMap<i32, i64>>> =
        Arc::new(Mutex::new(tables.events_next.iter().map(|(p, o)| (p.0, o.0)).collect()));
    let _lag = config.ready.as_ref().map(|ready| {
        ready.set(true);
        let stop = CancellationToken::new();
        tokio::spawn(watch_lag(config.brokers.clone(), config.topic.clone(), Arc::clone(&committed), stop.clone()));
        stop.drop_guard()
    });
    let bar = progress(config.show_progress && config.until_caught_up, backlog);
    let mut next: BTreeMap<Partition, Offset> = partitions
        .iter()
        .map(|p| (Partition(*p), tables.events_next.get(&Partition(*p)).copied().unwrap_or(Offset(0))))
        .collect();
    // Partitions the broker said are read to their end (since their last record).
    let mut at_end: std::collections::BTreeSet<Partition> = std::collections::BTreeSet::new();
    let caught_up = |next: &BTreeMap<Partition, Offset>, at_end: &std::collections::BTreeSet<Partition>| {
        ends.iter().all(|(p, end)| at_end.contains(p) || next.get(p).copied().unwrap_or(Offset(0)) >= *end)
    };
    let mut summary = IngestSummary::default();
    let mut decoder = EventDecoder::new();
    let mut buffer: Vec<Buffered> = Vec::new();
    let mut buffered_bytes = 0usize;
    let mut gaps: Vec<platform::gaps::Gap> = Vec::new();
    let mut first_at: Option<Instant> = None;

    loop {
        let done = config.until_caught_up && caught_up(&next, &at_end);
        let stopping = shutdown.is_cancelled();
        let due = first_at.is_some_and(|t| t.elapsed() >= config.flush_interval);
        let full = buffer.len() >= config.flush_records || buffered_bytes >= config.flush_bytes;
        if !buffer.is_empty() && (done || stopping || due || full) {
            buffered_bytes = 0;
            let passed = std::mem::take(&mut gaps);
            let gap_records: u64 = passed.iter().map(platform::gaps::Gap::len).sum();
            for g in &passed {
                tables.pending.add(g.partition, ledger::Kind::Gap, g.len() as i64);
            }
            let fence = match db.as_mut() {
                Some(d) => {
                    let fence = d.fence(&config, &mut tables).await?;
                    d.record_gaps(&config.topic, &passed).await?;
                    Some(fence)
                }
                None => None,
            };
            if gap_records > 0 {
                metrics::counter!("batch_ingest_gap_records_total").increment(gap_records);
                tracing::warn!(gaps = ?passed, "stepped over offsets that hold no record");
                summary.gap_records += gap_records;
            }
            let forgotten = db.as_ref().map(|d| &d.users);
            let flushed =
                flush(&config, &mut tables, &mut decoder, std::mem::take(&mut buffer), &next, forgotten).await?;
            summary.records += flushed.records;
            summary.events += flushed.events;
            summary.rejected += flushed.rejected;
            summary.commits += flushed.commits;
            if let Some(d) = db.as_mut() {
                d.record_shape(&flushed.shape, flushed.events).await;
            }
            committed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(tables.events_next.iter().map(|(p, o)| (p.0, o.0)));
            if let Some(fence) = fence {
                fence.release().await.map_err(|e| IngestError::Db(platform::db::DbError::from(e)))?;
            }
            bar.inc(flushed.records);
            first_at = None;
        }
        if done || stopping {
            break;
        }
        let wait = match first_at {
            Some(t) => config.flush_interval.saturating_sub(t.elapsed()),
            None => Duration::from_millis(500),
        };
        tokio::select! {
            _ = shutdown.cancelled() => continue,
            received = tokio::time::timeout(wait.max(Duration::from_millis(1)), consumer.recv()) => {
                match received {
                    Err(_elapsed) => continue,
                    Ok(Err(KafkaError::PartitionEOF(p))) => {
                        // Read to the end: caught up if the fetch position
                        // reached the end as of the start (offsets between
                        // the last record and it hold nothing to read).
                        let position = consumer.position().ok().and_then(|tpl| {
                            tpl.find_partition(&config.topic, p).and_then(|e| e.offset().to_raw())
                        });
                        let end = ends.get(&Partition(p)).copied().unwrap_or(Offset(0));
                        if position.is_some_and(|o| o >= end.0) {
                            at_end.insert(Partition(p));
                        } else {
                            tracing::debug!(partition = p, ?position, end = end.0, "end of partition before its end as of the start");
                        }
                    }
                    Ok(Err(e)) => {
                        // Transient broker trouble: librdkafka reconnects by itself.
                        tracing::warn!(error = %e, "Kafka consumer error; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Ok(Ok(m)) => {
                        let (p, o) = (Partition(m.partition()), Offset(m.offset()));
                        at_end.remove(&p);
                        let expected = next.get(&p).copied().unwrap_or(Offset(0));
                        // A reassignment could redeliver; never take an offset twice.
                        if o < expected {
                            continue;
                        }
                        // The consumer reads on from the position it was
                        // assigned: offsets it skipped hold no record.
                        if o > expected {
                            gaps.push(platform::gaps::Gap { partition: p, from: expected, to: o });
                        }
                        next.insert(p, Offset(o.0 + 1));
                        buffered_bytes += m.payload_len() + m.key().map_or(0, <[u8]>::len);
                        buffer.push(Buffered {
                            partition: p.0,
                            offset: o.0,
                            timestamp: shared_schema::decode::kafka_time(m.timestamp().to_millis()),
                            key: m.key().map(<[u8]>::to_vec),
                            payload: m.payload().unwrap_or_default().to_vec(),
                        });
                        first_at.get_or_insert_with(Instant::now);
                    }
                }
            }
        }
    }
    bar.finish_and_clear();
    if let Some(d) = db {
        d.notifier.flush(Duration::from_secs(10)).await;
    }
    summary.offsets = tables.events_next.clone();
    Ok(summary)
}

fn progress(show: bool, len: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("ingest [{elapsed_precise}] {wide_bar} {pos}/{len} records {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

struct Flushed {
    records: u64,
    events: u64,
    rejected: u64,
    commits: u64,
    shape: shared_schema::decode::Shape,
}

/// The offsets a commit records for the partitions this flush read: the
/// position reached, but never below what the table already holds. (A
/// table can be ahead of the replay position: `events_rejected` commits
/// before `events`, so after a kill between the two the replay starts
/// below it; recording the lower offset would make a later replay write
/// those rejects again.)
fn advanced(
    committed: &BTreeMap<Partition, Offset>,
    next: &BTreeMap<Partition, Offset>,
    touched: &std::collections::BTreeSet<Partition>,
) -> BTreeMap<Partition, Offset> {
    touched
        .iter()
        .filter_map(|p| next.get(p).map(|n| (*p, (*n).max(committed.get(p).copied().unwrap_or(Offset(0))))))
        .collect()
}

fn txns(topic: &str, offsets: &BTreeMap<Partition, Offset>) -> Vec<Transaction> {
    offsets.iter().map(|(p, o)| Transaction::new(ingest_app_id(topic, *p), o.0)).collect()
}

/// Sets `batch_ingest_partition_lag_records{partition}` (the broker's end
/// minus what the lake holds) every 15 s until `stop`.
async fn watch_lag(brokers: String, topic: String, committed: Arc<Mutex<BTreeMap<i32, i64>>>, stop: CancellationToken) {
    let Some(client) = platform::kafka::metadata_client(&brokers, "ingest lag metrics") else { return };
    loop {
        for (p, end) in platform::kafka::topic_ends(&client, &topic).await {
            let held = committed.lock().unwrap_or_else(|e| e.into_inner()).get(&p).copied().unwrap_or(0);
            metrics::gauge!("batch_ingest_partition_lag_records", "partition" => p.to_string())
                .set((end - held).max(0) as f64);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(15)) => {}
        }
    }
}

async fn flush(
    config: &IngestConfig,
    tables: &mut Tables,
    decoder: &mut EventDecoder,
    buffer: Vec<Buffered>,
    next: &BTreeMap<Partition, Offset>,
    forgotten: Option<&platform::forgotten::Forgotten>,
) -> Result<Flushed, IngestError> {
    let started = Instant::now();
    metrics::counter!("batch_ingest_bytes_total").increment(buffer.iter().map(|b| b.payload.len() as u64).sum());
    let records: Vec<RawRecord<'_>> = buffer
        .iter()
        .map(|b| RawRecord { partition: b.partition, offset: b.offset, timestamp: b.timestamp, payload: &b.payload })
        .collect();
    // Duplicates are judged before forgotten users are dropped, as the
    // speed layer does, so both see the same newest times.
    let mut judging = tables.history.judging();
    let mut decoded = decoder.decode_judged(&records, &mut judging)?;
    let changes = judging.finish();
    // A failed commit ends the run (the next one rebuilds the history from
    // the lake), so what was judged is applied at once.
    tables.history.apply(changes);
    if let Some(forgotten) = forgotten.filter(|f| !f.is_empty()) {
        let (kept, dropped_events) = forgotten.filter_events(decoded.batch)?;
        decoded.batch = kept;
        let before = decoded.rejected.len();
        decoded.rejected.retain(|r| {
            let b = &buffer[r.index];
            !forgotten.rejected_is_forgotten(b.key.as_deref(), &b.payload)
        });
        let dropped = dropped_events + (before - decoded.rejected.len());
        if dropped > 0 {
            metrics::counter!("batch_ingest_forgotten_total").increment(dropped as u64);
            tracing::debug!(dropped, "dropped records of forgotten users");
        }
    }
    let touched: std::collections::BTreeSet<Partition> = buffer.iter().map(|b| Partition(b.partition)).collect();
    // Every record read is a row of one table, or dropped (a forgotten
    // user's): the ledger counts the dropped ones per partition.
    let mut unwritten: BTreeMap<i32, i64> = BTreeMap::new();
    for b in &buffer {
        *unwritten.entry(b.partition).or_default() += 1;
    }
    for (p, n) in rows_per_partition(&decoded.batch) {
        *unwritten.entry(p).or_default() -= n;
    }
    for r in &decoded.rejected {
        *unwritten.entry(r.partition).or_default() -= 1;
    }
    for (p, n) in unwritten {
        tables.pending.add(Partition(p), ledger::Kind::Forgotten, n);
    }
    let mut out = Flushed {
        records: buffer.len() as u64,
        events: 0,
        rejected: 0,
        commits: 0,
        shape: std::mem::take(&mut decoded.shape),
    };

    // 1. Rejected records the rejected table does not hold yet.
    let fresh: Vec<&RejectedRecord> = decoded
        .rejected
        .iter()
        .filter(|r| Offset(r.offset) >= tables.rejected_next.get(&Partition(r.partition)).copied().unwrap_or(Offset(0)))
        .collect();
    if !fresh.is_empty() {
        let batch = rejected_batch(&fresh, &buffer)?;
        let offsets = advanced(&tables.rejected_next, next, &touched);
        let props = CommitProperties::default().with_application_transactions(txns(&config.topic, &offsets));
        let table = tables.rejected.clone();
        tables.rejected = table
            .write(vec![batch])
            .with_partition_columns([shared_schema::schema::rejected_col::REJECTED_DATE])
            .with_commit_properties(props)
            .await
            .map_err(|source| IngestError::Commit { table: REJECTED_TABLE, source: Box::new(source) })?;
        tables.rejected_next.extend(offsets);
        out.rejected = fresh.len() as u64;
        out.commits += 1;
    }

    // 2. Valid events, with the offsets they bring the table to.
    if decoded.batch.num_rows() > 0 {
        let offsets = advanced(&tables.events_next, next, &touched);
        let newest: BTreeMap<Partition, i64> = offsets
            .keys()
            .filter_map(|p| tables.history.partition(p.0).and_then(|h| h.newest).map(|n| (*p, n)))
            .collect();
        let counted = tables.pending.take(offsets.keys().copied());
        let partitions = next.keys().map(|p| p.0 + 1).max().unwrap_or(0);
        let mut actions = events_txns(&config.topic, &offsets, partitions, &newest);
        actions.extend(ledger::Counts::txns(&tables.ledger, &counted));
        tables.events = append_with(tables.events.clone(), decoded.batch.clone(), actions)
            .await
            .map_err(|source| IngestError::Commit { table: EVENTS_TABLE, source: Box::new(source) })?;
        tables.events_next.extend(offsets);
        tables.ledger.merge(&counted);
        out.events = decoded.batch.num_rows() as u64;
        out.commits += 1;
    }
    metrics::counter!("batch_ingest_records_total").increment(out.records);
    metrics::counter!("batch_ingest_commits_total").increment(out.commits);
    metrics::counter!("batch_ingest_rejected_total").increment(decoded.rejected.len() as u64);
    metrics::histogram!("batch_ingest_flush_seconds").record(started.elapsed().as_secs_f64());
    tracing::info!(
        records = out.records,
        events = out.events,
        rejected = out.rejected,
        version = tables.events.version(),
        ms = started.elapsed().as_millis() as u64,
        "flushed to the lake"
    );
    Ok(out)
}

/// Appends decoded `events` (in [`events_schema`]) to the `events` table in
/// one Delta commit, the one way events enter the lake, with the `txn`
/// actions the ingest records ([`events_txns`]): `offsets` (per partition
/// of `topic`, the next offset), how many `partitions` the topic has, and
/// each partition's `newest` event time. Returns the table at the new
/// version.
pub async fn append_events(
    table: DeltaTable,
    events: RecordBatch,
    topic: &str,
    offsets: &BTreeMap<Partition, Offset>,
    partitions: i32,
    newest: &BTreeMap<Partition, i64>,
) -> Result<DeltaTable, deltalake::DeltaTableError> {
    append_with(table, events, events_txns(topic, offsets, partitions, newest)).await
}

/// The `txn` actions of a commit to `events` (besides the ledger's): the
/// next offset of each partition written, the topic's partition count
/// ([`crate::lake::recorded_partitions`]), and each partition's newest
/// time, from which a restart rebuilds its duplicates history
/// ([`crate::dedup`]). Readers find all of them in the newest commit.
fn events_txns(
    topic: &str,
    offsets: &BTreeMap<Partition, Offset>,
    partitions: i32,
    newest: &BTreeMap<Partition, i64>,
) -> Vec<Transaction> {
    let mut actions = txns(topic, offsets);
    actions.push(Transaction::new(crate::lake::partitions_app_id(topic), i64::from(partitions)));
    actions.extend(crate::dedup::newest_txns(topic, newest));
    actions
}

/// Rows per Kafka partition of a batch in [`events_schema`].
fn rows_per_partition(batch: &RecordBatch) -> BTreeMap<i32, i64> {
    use deltalake::arrow::array::AsArray;
    use deltalake::arrow::datatypes::Int32Type;
    let mut rows = BTreeMap::new();
    if let Some(col) = batch.column_by_name(shared_schema::schema::col::KAFKA_PARTITION) {
        for p in col.as_primitive::<Int32Type>().iter().flatten() {
            *rows.entry(p).or_default() += 1;
        }
    }
    rows
}

/// Appends `events` to the `events` table in one commit carrying `actions`.
async fn append_with(
    table: DeltaTable,
    events: RecordBatch,
    actions: Vec<Transaction>,
) -> Result<DeltaTable, deltalake::DeltaTableError> {
    let props = CommitProperties::default().with_application_transactions(actions);
    // Merge: a lake written before a column was added (`extra`) takes it on
    // the first write; its older files read it as NULL.
    table
        .write(vec![events])
        .with_partition_columns(PARTITION_COLUMNS)
        .with_schema_mode(deltalake::operations::write::SchemaMode::Merge)
        .with_commit_properties(props)
        .await
}

fn rejected_batch(rejected: &[&RejectedRecord], buffer: &[Buffered]) -> Result<RecordBatch, IngestError> {
    let now = Utc::now();
    let n = rejected.len();
    let mut partition = Int32Builder::with_capacity(n);
    let mut offset = Int64Builder::with_capacity(n);
    let mut key = BinaryBuilder::new();
    let mut payload = BinaryBuilder::new();
    let mut reason = StringBuilder::new();
    let mut field = StringBuilder::new();
    let mut detail = StringBuilder::new();
    let mut at = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut date = StringBuilder::new();
    let today = now.date_naive().to_string();
    for r in rejected {
        let b = &buffer[r.index];
        partition.append_value(r.partition);
        offset.append_value(r.offset);
        key.append_option(b.key.as_deref());
        // A record past 64 KiB keeps its first 64 KiB, its size and SHA-256:
        // a flush of megabyte rejects stays small.
        let kept = platform::oversize::keep(&b.payload);
        payload.append_value(kept.bytes);
        reason.append_value(r.rejection.reason.as_str());
        field.append_option(r.rejection.field);
        match kept.describe() {
            Some(what) => detail.append_value(format!("{}; {what}", r.rejection.detail)),
            None => detail.append_value(&r.rejection.detail),
        }
        at.append_value(now.timestamp_micros());
        date.append_value(&today);
    }
    Ok(RecordBatch::try_new(
        rejected_schema(),
        vec![
            Arc::new(partition.finish()),
            Arc::new(offset.finish()),
            Arc::new(key.finish()),
            Arc::new(payload.finish()),
            Arc::new(reason.finish()),
            Arc::new(field.finish()),
            Arc::new(detail.finish()),
            Arc::new(at.finish()),
            Arc::new(date.finish()),
        ],
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_offsets_never_move_back() {
        let typed = |pairs: &[(i32, i64)]| pairs.iter().map(|(p, o)| (Partition(*p), Offset(*o))).collect();
        let committed: BTreeMap<Partition, Offset> = typed(&[(0, 1062), (1, 10)]);
        let next = typed(&[(0, 1000), (1, 311), (2, 5)]);
        let touched = [Partition(0), Partition(1)].into_iter().collect();
        assert_eq!(advanced(&committed, &next, &touched), typed(&[(0, 1062), (1, 311)]));
    }
}
