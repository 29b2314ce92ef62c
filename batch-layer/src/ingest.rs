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
//! Forgotten users (`forget-user`) are read from PostgreSQL before every
//! flush; their events and rejected records are dropped, not written.

use std::collections::BTreeMap;
use std::sync::Arc;
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
use shared_schema::schema::PARTITION_COLUMNS;
use shared_schema::{EventDecoder, RawRecord, RejectedRecord, events_schema, rejected_schema};
use tokio_util::sync::CancellationToken;

use crate::lake::{EVENTS_TABLE, Lake, LakeError, REJECTED_TABLE, committed_offsets, ingest_app_id};

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
    /// Stop once every partition is read up to its end as of the start.
    pub until_caught_up: bool,
    pub show_progress: bool,
    /// Where to learn which users are forgotten (`None`: do not look; tools
    /// and tests whose database has none).
    pub forget: Option<Forgetting>,
}

/// Where the ingest learns which users are forgotten, and the key their
/// ids were hashed with.
#[derive(Debug, Clone)]
pub struct Forgetting {
    pub database_url: String,
    pub key: Option<platform::forgotten::ForgetKey>,
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
            until_caught_up: true,
            show_progress: false,
            forget: None,
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
    /// Next offset per partition in `events` when the run ended.
    pub offsets: BTreeMap<Partition, Offset>,
}

struct Buffered {
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
}

/// The forgotten users, re-read before each flush.
struct Forget {
    pool: sqlx::PgPool,
    key: Option<platform::forgotten::ForgetKey>,
    users: platform::forgotten::Forgotten,
}

impl Forget {
    async fn connect(config: &Forgetting) -> Result<Self, IngestError> {
        let pool = platform::db::connect(&config.database_url, 1, Duration::from_secs(30)).await?;
        platform::db::MIGRATOR.run(&pool).await.map_err(platform::db::DbError::from)?;
        let users = platform::forgotten::Forgotten::load(&pool, config.key.as_ref()).await?;
        Ok(Self { pool, key: config.key.clone(), users })
    }

    async fn refresh(&mut self) -> Result<(), IngestError> {
        self.users = platform::forgotten::Forgotten::load(&self.pool, self.key.as_ref()).await?;
        Ok(())
    }
}

struct Tables {
    events: DeltaTable,
    rejected: DeltaTable,
    /// Next offset per partition of each table.
    events_next: BTreeMap<Partition, Offset>,
    rejected_next: BTreeMap<Partition, Offset>,
}

fn consumer(config: &IngestConfig) -> Result<StreamConsumer, IngestError> {
    ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", "lambda-batch-ingest")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.message.max.bytes", "4194304")
        .create()
        .map_err(|source| IngestError::Kafka { brokers: config.brokers.clone(), source: Box::new(source) })
}

/// Runs the ingest until caught up (with `until_caught_up`) or `shutdown`.
pub async fn run(config: IngestConfig, shutdown: CancellationToken) -> Result<IngestSummary, IngestError> {
    let kafka = |source: KafkaError| IngestError::Kafka { brokers: config.brokers.clone(), source: Box::new(source) };
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
    let events_next = committed_offsets(&events, &config.topic, partitions.iter().map(|p| Partition(*p)))
        .await
        .map_err(commit_err(EVENTS_TABLE))?;
    let rejected_next = committed_offsets(&rejected, &config.topic, partitions.iter().map(|p| Partition(*p)))
        .await
        .map_err(commit_err(REJECTED_TABLE))?;
    let mut tables = Tables { events, rejected, events_next, rejected_next };
    let mut forget = match &config.forget {
        Some(f) => Some(Forget::connect(f).await?),
        None => None,
    };

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

    let bar = progress(config.show_progress && config.until_caught_up, backlog);
    let mut next: BTreeMap<Partition, Offset> = partitions
        .iter()
        .map(|p| (Partition(*p), tables.events_next.get(&Partition(*p)).copied().unwrap_or(Offset(0))))
        .collect();
    let caught_up = |next: &BTreeMap<Partition, Offset>| {
        ends.iter().all(|(p, end)| next.get(p).copied().unwrap_or(Offset(0)) >= *end)
    };
    let mut summary = IngestSummary::default();
    let mut decoder = EventDecoder::new();
    let mut buffer: Vec<Buffered> = Vec::new();
    let mut first_at: Option<Instant> = None;

    loop {
        let done = config.until_caught_up && caught_up(&next);
        let stopping = shutdown.is_cancelled();
        let due = first_at.is_some_and(|t| t.elapsed() >= config.flush_interval);
        if !buffer.is_empty() && (done || stopping || due || buffer.len() >= config.flush_records) {
            if let Some(f) = forget.as_mut() {
                f.refresh().await?;
            }
            let forgotten = forget.as_ref().map(|f| &f.users);
            let flushed =
                flush(&config, &mut tables, &mut decoder, std::mem::take(&mut buffer), &next, forgotten).await?;
            summary.records += flushed.records;
            summary.events += flushed.events;
            summary.rejected += flushed.rejected;
            summary.commits += flushed.commits;
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
                    Ok(Err(e)) => {
                        // Transient broker trouble: librdkafka reconnects by itself.
                        tracing::warn!(error = %e, "Kafka consumer error; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Ok(Ok(m)) => {
                        let (p, o) = (Partition(m.partition()), Offset(m.offset()));
                        // A reassignment could redeliver; never take an offset twice.
                        if o < next.get(&p).copied().unwrap_or(Offset(0)) {
                            continue;
                        }
                        next.insert(p, Offset(o.0 + 1));
                        buffer.push(Buffered {
                            partition: p.0,
                            offset: o.0,
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

async fn flush(
    config: &IngestConfig,
    tables: &mut Tables,
    decoder: &mut EventDecoder,
    buffer: Vec<Buffered>,
    next: &BTreeMap<Partition, Offset>,
    forgotten: Option<&platform::forgotten::Forgotten>,
) -> Result<Flushed, IngestError> {
    let started = Instant::now();
    let records: Vec<RawRecord<'_>> =
        buffer.iter().map(|b| RawRecord { partition: b.partition, offset: b.offset, payload: &b.payload }).collect();
    let mut decoded = decoder.decode(&records, Utc::now())?;
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
    let mut out = Flushed { records: buffer.len() as u64, events: 0, rejected: 0, commits: 0 };

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
        tables.events = append_events(tables.events.clone(), decoded.batch.clone(), &config.topic, &offsets)
            .await
            .map_err(|source| IngestError::Commit { table: EVENTS_TABLE, source: Box::new(source) })?;
        tables.events_next.extend(offsets);
        out.events = decoded.batch.num_rows() as u64;
        out.commits += 1;
    }
    metrics::counter!("batch_ingest_records_total").increment(out.records);
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
/// one Delta commit that records `offsets` (per partition of `topic`, the
/// next offset) as its `txn` actions: the one way events enter the lake.
/// Returns the table at the new version.
pub async fn append_events(
    table: DeltaTable,
    events: RecordBatch,
    topic: &str,
    offsets: &BTreeMap<Partition, Offset>,
) -> Result<DeltaTable, deltalake::DeltaTableError> {
    let props = CommitProperties::default().with_application_transactions(txns(topic, offsets));
    table.write(vec![events]).with_partition_columns(PARTITION_COLUMNS).with_commit_properties(props).await
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
        payload.append_value(&b.payload);
        reason.append_value(r.rejection.reason.as_str());
        field.append_option(r.rejection.field);
        detail.append_value(&r.rejection.detail);
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
