//! The speed layer's loop: consume, buffer a micro-batch, flush it in one
//! PostgreSQL transaction.
//!
//! Positions come from PostgreSQL, never from the broker's group offsets:
//! the first record seen of a partition (after start or a rebalance) makes
//! the loop load that partition's stored offset, seek there if the broker
//! started elsewhere, and from then on accept only the exact next offset.
//! A flush = decode → DLQ the rejects (acknowledged) → DataFusion deltas →
//! one transaction: COPY deltas into temporary tables, fold them into
//! `speed.*`, advance the offsets conditionally (see [`crate::offsets`]).
//! A crash at any point leaves either the whole flush or none of it.
//! Events and rejected records of forgotten users (`batch-layer
//! forget-user`) are dropped at decode; the set is re-read from PostgreSQL
//! every few seconds.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, ClientContext, Message, TopicPartitionList};
use shared_schema::cut::{Offset, Partition, SegmentSize};
use shared_schema::{EventDecoder, RawRecord};
use sqlx::{AssertSqlSafe, PgPool};
use tokio_util::sync::CancellationToken;

use crate::deltas::{self, ViewDelta};
use crate::dlq::{DeadLetter, Dlq};
use crate::offsets::{self, Advance};

/// What `speed-layer run` needs.
#[derive(Debug, Clone)]
pub struct SpeedConfig {
    pub brokers: String,
    pub topic: String,
    pub dlq_topic: String,
    pub group_id: String,
    pub database_url: String,
    /// Flush at the latest this long after the first buffered record.
    pub flush_interval: Duration,
    /// Flush as soon as this many records are buffered.
    pub max_batch: usize,
    /// The longest a fetch waits at the broker for new records
    /// (`fetch.wait.max.ms`): an upper bound on how late an idle consumer
    /// hears of a record, paid for with one fetch request per wait.
    pub fetch_wait: Duration,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (port 0: any).
    pub ops_addr: SocketAddr,
    /// How partitions are shared out.
    pub assignment: Assignment,
    /// The key forgotten user ids were hashed with (needed once any user
    /// is forgotten; without it the layer refuses to run).
    pub forget_key: Option<platform::forgotten::ForgetKey>,
    /// Notifications of stalls, lag and DLQ rate, with their thresholds.
    pub alerts: crate::alerts::Alerts,
}

impl SpeedConfig {
    /// One instance taking every partition of `topic`, flushing every 100 ms
    /// or 5,000 records, ops endpoints on any free port, no alerts and no
    /// forget key (tools and tests).
    pub fn single_instance(brokers: &str, topic: &str, dlq_topic: &str, database_url: &str) -> Self {
        Self {
            brokers: brokers.to_string(),
            topic: topic.to_string(),
            dlq_topic: dlq_topic.to_string(),
            group_id: format!("{topic}.speed"),
            database_url: database_url.to_string(),
            flush_interval: Duration::from_millis(100),
            max_batch: 5_000,
            fetch_wait: DEFAULT_FETCH_WAIT,
            ops_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            assignment: Assignment::All,
            forget_key: None,
            alerts: crate::alerts::Alerts::default(),
        }
    }
}

/// `fetch.wait.max.ms` unless configured. tansu 0.6 answers every fetch
/// only after this long (it sleeps out the wait even when it has records);
/// 10 ms and 50 ms measured the same within the noise there
/// (docs/BENCHMARKS.md), and 50 ms costs a fifth of the idle requests.
pub const DEFAULT_FETCH_WAIT: Duration = Duration::from_millis(50);

/// How often the forgotten users are re-read.
const FORGOTTEN_REFRESH: Duration = Duration::from_secs(5);

/// How an instance gets its partitions. Either way its positions come from
/// PostgreSQL and its commits are fenced, so totals stay exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Assignment {
    /// Join the consumer group; instances split the partitions (scale-out).
    Group,
    /// Take every partition directly, without group coordination: one
    /// instance, no rebalances (also sidesteps brokers whose group
    /// coordinator is unreliable).
    All,
}

#[derive(Debug, thiserror::Error)]
pub enum SpeedError {
    #[error("Kafka ({brokers}): {source}")]
    Kafka { brokers: String, source: Box<KafkaError> },
    #[error(transparent)]
    Db(#[from] platform::db::DbError),
    #[error("ops endpoint on {addr}: {source}")]
    Ops { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Forgotten(#[from] platform::forgotten::ForgetError),
}

/// Partitions assigned or revoked since the loop last looked: their
/// positions must be reloaded from PostgreSQL.
#[derive(Default)]
struct RebalanceLog(Mutex<BTreeSet<Partition>>);

struct Context(Arc<RebalanceLog>);

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn post_rebalance(&self, _: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let tpl = match rebalance {
            Rebalance::Assign(tpl) | Rebalance::Revoke(tpl) => tpl,
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, "rebalance error");
                return;
            }
        };
        let mut log = self.0.0.lock().unwrap_or_else(|p| p.into_inner());
        log.extend(tpl.elements().iter().map(|e| Partition(e.partition())));
        tracing::info!(?rebalance, "partitions rebalanced");
    }
}

struct Buffered {
    partition: Partition,
    offset: Offset,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
}

impl Buffered {
    /// A copy of `m` (an absent payload is empty, and rejected as such).
    fn of(m: &rdkafka::message::BorrowedMessage<'_>) -> Self {
        Self {
            partition: Partition(m.partition()),
            offset: Offset(m.offset()),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().unwrap_or_default().to_vec(),
        }
    }
}

/// The speed layer's Kafka consumer settings (`bench_speed` reads with the
/// same, to compare a bare consumer with the layer).
pub fn consumer_config(brokers: &str, group_id: &str, fetch_wait: Duration) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        // A killed instance's partitions move on within seconds, yet a
        // loaded broker does not make a live member miss its session.
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "2000")
        .set("max.poll.interval.ms", "30000")
        .set("fetch.wait.max.ms", fetch_wait.as_millis().max(1).to_string());
    config
}

/// Runs until `shutdown`; flushes what it holds before returning.
pub async fn run(config: SpeedConfig, shutdown: CancellationToken) -> Result<(), SpeedError> {
    let kafka = |source: KafkaError| SpeedError::Kafka { brokers: config.brokers.clone(), source: Box::new(source) };
    let ready = platform::ops_http::Readiness::default();
    let (ops_addr, ops_task) = platform::ops_http::serve(config.ops_addr, ready.clone(), shutdown.clone())
        .await
        .map_err(|source| SpeedError::Ops { addr: config.ops_addr, source })?;
    tracing::info!(%ops_addr, "serving /metrics, /healthz, /readyz");

    let pool = platform::db::connect(&config.database_url, 4, Duration::from_secs(60)).await?;
    let deployment = platform::db::prepare(&pool, None).await?;
    let forgotten = platform::forgotten::Forgotten::load(&pool, config.forget_key.as_ref()).await?;
    let log = Arc::new(RebalanceLog::default());
    let consumer: StreamConsumer<Context> = consumer_config(&config.brokers, &config.group_id, config.fetch_wait)
        .create_with_context(Context(Arc::clone(&log)))
        .map_err(kafka)?;
    match config.assignment {
        Assignment::Group => consumer.subscribe(&[&config.topic]).map_err(kafka)?,
        Assignment::All => {
            let metadata = consumer.fetch_metadata(Some(&config.topic), Duration::from_secs(30)).map_err(kafka)?;
            let partitions: Vec<Partition> = metadata
                .topics()
                .iter()
                .filter(|t| t.name() == config.topic)
                .flat_map(|t| t.partitions().iter().map(|p| Partition(p.id())))
                .collect();
            let stored = offsets::load(&pool, &partitions).await.map_err(|e| SpeedError::Db(e.into()))?;
            let mut tpl = TopicPartitionList::new();
            for p in &partitions {
                let next = stored.get(p).copied().unwrap_or(Offset(0));
                tpl.add_partition_offset(&config.topic, p.0, rdkafka::Offset::Offset(next.0)).map_err(kafka)?;
            }
            consumer.assign(&tpl).map_err(kafka)?;
            tracing::info!(partitions = partitions.len(), "assigned every partition directly");
        }
    }
    let dlq = Dlq::new(&config.brokers, &config.dlq_topic, &config.topic).map_err(kafka)?;
    let lag = tokio::spawn(crate::lag::watch(
        config.brokers.clone(),
        config.topic.clone(),
        pool.clone(),
        Duration::from_secs(5),
        shutdown.clone(),
    ));
    let notifier = platform::notify::Notifier::spawn(
        platform::notify::NotifyConfig::new(config.alerts.notify_webhook.clone(), "speed-layer"),
        Some(pool.clone()),
    );
    let alerts = tokio::spawn(crate::alerts::watch(
        config.brokers.clone(),
        config.topic.clone(),
        pool.clone(),
        config.alerts.clone(),
        notifier.clone(),
        shutdown.clone(),
    ));
    ready.set(true);
    tracing::info!(topic = %config.topic, group = %config.group_id, segment_size = deployment.segment_size.get(), "speed layer started");

    let mut state = Loop {
        config: &config,
        pool: &pool,
        consumer: &consumer,
        dlq: &dlq,
        segment_size: deployment.segment_size,
        positions: BTreeMap::new(),
        buffer: Vec::new(),
        first_at: None,
        decoder: EventDecoder::new(),
        ready: ready.clone(),
        rebalances: Arc::clone(&log),
        forgotten,
        forgotten_at: Instant::now(),
        dlq_rate: crate::alerts::DlqRate::new(&config.alerts),
        notifier: notifier.clone(),
    };
    loop {
        state.apply_rebalances();
        let due = state.first_at.is_some_and(|t| t.elapsed() >= config.flush_interval);
        if !state.buffer.is_empty() && (due || state.buffer.len() >= config.max_batch || shutdown.is_cancelled()) {
            state.flush_while_receiving(&shutdown).await;
        }
        // What was read during a last flush is flushed before stopping.
        if shutdown.is_cancelled() && state.buffer.is_empty() {
            break;
        }
        let wait = match state.first_at {
            Some(t) => config.flush_interval.saturating_sub(t.elapsed()),
            None => Duration::from_millis(250),
        };
        tokio::select! {
            _ = shutdown.cancelled() => {}
            received = tokio::time::timeout(wait.max(Duration::from_millis(1)), consumer.recv()) => match received {
                Err(_) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "Kafka consumer error; librdkafka retries");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok(Ok(m)) => {
                    state.accept(Buffered::of(&m), Instant::now()).await;
                }
            }
        }
    }
    ready.set(false);
    tracing::info!("speed layer stopped cleanly");
    drop(consumer);
    let _ = lag.await;
    let _ = alerts.await;
    notifier.flush(Duration::from_secs(5)).await;
    let _ = ops_task.await;
    Ok(())
}

/// A record received while a flush ran, accepted after it.
struct Held {
    record: Buffered,
    at: Instant,
}

/// What [`Loop::accept`] did with a record.
#[derive(Debug, PartialEq, Eq)]
enum Accepted {
    Buffered,
    /// Already counted.
    Behind,
    /// Not the next record: the partition is read again from its position.
    SoughtBack,
}

struct Loop<'a> {
    config: &'a SpeedConfig,
    pool: &'a PgPool,
    consumer: &'a StreamConsumer<Context>,
    dlq: &'a Dlq,
    segment_size: SegmentSize,
    /// Per partition, the next offset this instance accepts.
    positions: BTreeMap<Partition, Offset>,
    buffer: Vec<Buffered>,
    first_at: Option<Instant>,
    decoder: EventDecoder,
    ready: platform::ops_http::Readiness,
    rebalances: Arc<RebalanceLog>,
    forgotten: platform::forgotten::Forgotten,
    forgotten_at: Instant,
    dlq_rate: crate::alerts::DlqRate,
    notifier: platform::notify::Notifier,
}

impl Loop<'_> {
    /// Forgets the position and the buffered records of every partition
    /// assigned or revoked since the last look: records of an earlier
    /// assignment are re-read from the offset PostgreSQL holds.
    /// Returns the partitions that changed.
    fn apply_rebalances(&mut self) -> BTreeSet<Partition> {
        let changed = std::mem::take(&mut *self.rebalances.0.lock().unwrap_or_else(|p| p.into_inner()));
        if changed.is_empty() {
            return changed;
        }
        for p in &changed {
            self.positions.remove(p);
        }
        let before = self.buffer.len();
        self.buffer.retain(|b| !changed.contains(&b.partition));
        if self.buffer.is_empty() {
            self.first_at = None;
        }
        if before != self.buffer.len() {
            tracing::info!(
                dropped = before - self.buffer.len(),
                ?changed,
                "rebalance: buffered records will be re-read"
            );
        }
        changed
    }

    /// Flushes the buffer while the consumer goes on receiving, so records
    /// that arrive during a flush wait only for their own micro-batch, not
    /// for the previous one's commit too. What arrives is held and accepted
    /// once the flush is over, when the positions it leaves are known: at
    /// most a micro-batch of it (a flush retrying against a dead database
    /// stops the reading; memory peaks at about twice `max_batch`), nothing
    /// after shutdown began or after a consumer error. Records of partitions
    /// reassigned meanwhile are dropped and re-read from the offset
    /// PostgreSQL holds.
    async fn flush_while_receiving(&mut self, shutdown: &CancellationToken) {
        let consumer = self.consumer;
        let max_held = self.config.max_batch;
        let mut held: Vec<Held> = Vec::new();
        let mut receiving = true;
        {
            let flush = self.flush(shutdown);
            tokio::pin!(flush);
            loop {
                tokio::select! {
                    biased;
                    () = &mut flush => break,
                    received = consumer.recv(), if receiving && held.len() < max_held && !shutdown.is_cancelled() => {
                        match received {
                            Ok(m) => held.push(Held { record: Buffered::of(&m), at: Instant::now() }),
                            Err(e) => {
                                tracing::warn!(error = %e, "Kafka consumer error; librdkafka retries");
                                receiving = false;
                            }
                        }
                    }
                }
            }
        }
        let changed = self.apply_rebalances();
        held.retain(|h| !changed.contains(&h.record.partition));
        // Positions unknown after a fenced flush or for a partition first
        // seen now: loaded at once, not once per held record.
        let unknown: Vec<Partition> = held
            .iter()
            .map(|h| h.record.partition)
            .filter(|p| !self.positions.contains_key(p))
            .collect::<BTreeSet<Partition>>()
            .into_iter()
            .collect();
        if !unknown.is_empty()
            && let Err(e) = self.load_positions(&unknown).await
        {
            // Read those partitions again from their first held record.
            tracing::warn!(error = %e, partitions = ?unknown, "cannot load the stored offsets; re-reading");
            for p in &unknown {
                if let Some(first) = held.iter().find(|h| h.record.partition == *p) {
                    self.seek(*p, first.record.offset);
                }
            }
            held.retain(|h| !unknown.contains(&h.record.partition));
        }
        // Once a partition is sought back, its later held records come again.
        let mut sought = BTreeSet::new();
        for Held { record, at } in held {
            let partition = record.partition;
            if !sought.contains(&partition) && self.accept(record, at).await == Accepted::SoughtBack {
                sought.insert(partition);
            }
        }
    }

    /// Buffers the record if it is the next of its partition; `at` is when
    /// it was received (a micro-batch's age counts from its first record's).
    async fn accept(&mut self, record: Buffered, at: Instant) -> Accepted {
        let (partition, offset) = (record.partition, record.offset);
        // A rebalance callback may have run while this record was fetched.
        self.apply_rebalances();
        let expected = match self.positions.get(&partition) {
            Some(next) => *next,
            None => match self.load_positions(&[partition]).await {
                Ok(()) => self.positions[&partition],
                Err(e) => {
                    // Seek back so the record comes again once PostgreSQL answers.
                    tracing::warn!(error = %e, %partition, "cannot load the stored offset; retrying");
                    self.seek(partition, offset);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    return Accepted::SoughtBack;
                }
            },
        };
        if offset < expected {
            return Accepted::Behind; // already counted (replay after a seek or rebalance)
        }
        if offset > expected {
            // The broker started past what PostgreSQL holds: go back.
            self.seek(partition, expected);
            return Accepted::SoughtBack;
        }
        self.positions.insert(partition, Offset(offset.0 + 1));
        metrics::counter!("speed_records_total").increment(1);
        metrics::counter!("speed_bytes_total").increment(record.payload.len() as u64);
        self.buffer.push(record);
        self.first_at.get_or_insert(at);
        Accepted::Buffered
    }

    /// Sets the position of each of `partitions` to the next offset
    /// PostgreSQL holds for it (0 for a partition never seen).
    async fn load_positions(&mut self, partitions: &[Partition]) -> Result<(), sqlx::Error> {
        let loaded = offsets::load(self.pool, partitions).await?;
        for p in partitions {
            self.positions.insert(*p, loaded.get(p).copied().unwrap_or(Offset(0)));
        }
        Ok(())
    }

    fn seek(&self, partition: Partition, offset: Offset) {
        let mut tpl = TopicPartitionList::new();
        if tpl.add_partition_offset(&self.config.topic, partition.0, rdkafka::Offset::Offset(offset.0)).is_ok()
            && let Err(e) = self.consumer.seek_partitions(tpl, Duration::from_secs(5))
        {
            tracing::warn!(error = %e, %partition, %offset, "seek failed; will retry on the next record");
        }
    }

    /// Flushes the buffer, retrying with capped backoff while PostgreSQL or
    /// the broker is away (progress stops, the process does not).
    async fn flush(&mut self, shutdown: &CancellationToken) {
        let buffer = std::mem::take(&mut self.buffer);
        self.first_at = None;
        let mut backoff = platform::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut failing = false;
        let mut dlq_done = false;
        loop {
            match self.try_flush(&buffer, &mut dlq_done).await {
                Ok(Flushed::Committed) => {
                    if failing {
                        tracing::info!("flushing works again");
                    }
                    self.ready.set(true);
                    return;
                }
                Ok(Flushed::Fenced(partitions)) => {
                    // Another instance moved these partitions: drop the whole
                    // micro-batch and re-read every partition from PostgreSQL.
                    tracing::warn!(?partitions, "offsets moved by another instance; discarding this micro-batch");
                    self.positions.clear();
                    return;
                }
                Err(e) => {
                    if !failing {
                        tracing::error!(error = %e, "flush failed; retrying with backoff until it succeeds");
                        failing = true;
                    }
                    self.ready.set(false);
                    metrics::counter!("speed_flush_failures_total").increment(1);
                    if shutdown.is_cancelled() && backoff.at_cap() {
                        // Nothing was committed; the next start resumes from PostgreSQL.
                        tracing::warn!("shutting down with an uncommitted micro-batch; it will be re-read");
                        return;
                    }
                    backoff.sleep().await;
                }
            }
        }
    }

    /// One attempt; `dlq_done` remembers across attempts that the rejects
    /// of this micro-batch are already acknowledged by the DLQ.
    async fn try_flush(&mut self, buffer: &[Buffered], dlq_done: &mut bool) -> Result<Flushed, FlushError> {
        let started = Instant::now();
        let records: Vec<RawRecord<'_>> = buffer
            .iter()
            .map(|b| RawRecord { partition: b.partition.0, offset: b.offset.0, payload: &b.payload })
            .collect();
        let mut decoded = self.decoder.decode(&records, Utc::now())?;
        if self.forgotten_at.elapsed() >= FORGOTTEN_REFRESH {
            self.forgotten = platform::forgotten::Forgotten::load(self.pool, self.config.forget_key.as_ref()).await?;
            self.forgotten_at = Instant::now();
        }
        if !self.forgotten.is_empty() {
            let (kept, events) = self.forgotten.filter_events(decoded.batch)?;
            decoded.batch = kept;
            let before = decoded.rejected.len();
            let forgotten = &self.forgotten;
            decoded
                .rejected
                .retain(|r| !forgotten.rejected_is_forgotten(buffer[r.index].key.as_deref(), &buffer[r.index].payload));
            let dropped = events + before - decoded.rejected.len();
            if dropped > 0 {
                metrics::counter!("speed_forgotten_total").increment(dropped as u64);
                tracing::debug!(dropped, "dropped records of forgotten users");
            }
        }

        let rejected: Vec<_> = decoded
            .rejected
            .iter()
            .map(|r| {
                let b = &buffer[r.index];
                DeadLetter { record: r, key: b.key.as_deref(), payload: b.payload.as_slice() }
            })
            .collect();
        if !*dlq_done {
            self.dlq.send(&rejected).await.map_err(|e| FlushError::Dlq(Box::new(e)))?;
            *dlq_done = true;
        }

        let mut advances: BTreeMap<Partition, Advance> = BTreeMap::new();
        for b in buffer {
            let next = Offset(b.offset.0 + 1);
            let a = advances.entry(b.partition).or_insert(Advance {
                partition: b.partition,
                from: b.offset,
                to: next,
                last_event_time: None,
            });
            a.from = a.from.min(b.offset);
            a.to = a.to.max(next);
        }
        let counts = buffer.iter().fold(BTreeMap::<Partition, i64>::new(), |mut m, b| {
            *m.entry(b.partition).or_default() += 1;
            m
        });
        if advances.values().any(|a| counts.get(&a.partition) != Some(&(a.to.0 - a.from.0))) {
            // Never commit a micro-batch with a gap or a repeat: start over
            // from what PostgreSQL holds.
            tracing::error!("micro-batch offsets are not contiguous; discarding it and re-reading");
            return Ok(Flushed::Fenced(advances.keys().copied().collect()));
        }
        for (p, t) in last_event_times(&decoded.batch) {
            if let Some(a) = advances.get_mut(&p) {
                a.last_event_time = a.last_event_time.max(Some(t));
            }
        }
        let deltas = deltas::compute(decoded.batch, self.segment_size).await?;

        let mut tx = self.pool.begin().await?;
        let advances: Vec<Advance> = advances.into_values().collect();
        let fenced = offsets::advance(&mut tx, &advances).await?;
        if !fenced.is_empty() {
            tx.rollback().await?;
            return Ok(Flushed::Fenced(fenced));
        }
        let mut rows = 0;
        for delta in &deltas {
            rows += write_delta(&mut tx, delta).await?;
        }
        tx.commit().await?;

        // Informational only (positions live in PostgreSQL): lets Kafka
        // tooling show the group's lag.
        let mut tpl = TopicPartitionList::new();
        for a in &advances {
            let _ = tpl.add_partition_offset(&self.config.topic, a.partition.0, rdkafka::Offset::Offset(a.to.0));
        }
        let _ = self.consumer.commit(&tpl, CommitMode::Async);

        let secs = started.elapsed().as_secs_f64();
        metrics::histogram!("speed_flush_seconds").record(secs);
        metrics::counter!("speed_rows_written_total").increment(rows);
        metrics::counter!("speed_dlq_total").increment(rejected.len() as u64);
        if let Some(n) = self.dlq_rate.observe(buffer.len() as u64, rejected.len() as u64) {
            self.notifier.send(n);
        }
        for a in &advances {
            if let Some(t) = a.last_event_time {
                metrics::gauge!("speed_last_event_time_seconds", "partition" => a.partition.to_string())
                    .set(t.timestamp_millis() as f64 / 1000.0);
            }
        }
        tracing::debug!(records = buffer.len(), rejected = rejected.len(), rows, ms = secs * 1000.0, "flushed");
        Ok(Flushed::Committed)
    }
}

enum Flushed {
    Committed,
    Fenced(Vec<Partition>),
}

#[derive(Debug, thiserror::Error)]
enum FlushError {
    #[error("decoding: {0}")]
    Decode(#[from] shared_schema::decode::DecodeError),
    #[error("DLQ: {0}")]
    Dlq(Box<KafkaError>),
    #[error("computing deltas: {0}")]
    Deltas(#[from] datafusion::error::DataFusionError),
    #[error("PostgreSQL: {0}")]
    Db(#[from] sqlx::Error),
    #[error("encoding COPY data: {0}")]
    Copy(#[from] platform::pgcopy::CopyError),
    #[error(transparent)]
    Forgotten(#[from] platform::forgotten::ForgetError),
    #[error("dropping forgotten users: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
}

/// COPYs a view's deltas into a temporary table and folds them into
/// `speed.<view>` with the view's merge rules.
async fn write_delta(conn: &mut sqlx::PgConnection, delta: &ViewDelta) -> Result<u64, FlushError> {
    if delta.rows() == 0 {
        return Ok(0);
    }
    let name = delta.view.name;
    let temp = format!("speed_delta_{name}");
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE TEMP TABLE IF NOT EXISTS {temp} (LIKE speed.{name}) ON COMMIT DELETE ROWS"
    )))
    .execute(&mut *conn)
    .await?;
    let data = platform::pgcopy::encode(&delta.batches)?;
    let statement = format!("COPY {temp} FROM STDIN (FORMAT binary)");
    let mut copy = conn.copy_in_raw(&statement).await?;
    copy.send(data).await?;
    copy.finish().await?;
    let done = sqlx::query(AssertSqlSafe(delta.view.speed_upsert_sql(&temp))).execute(&mut *conn).await?;
    Ok(done.rows_affected())
}

fn last_event_times(batch: &arrow::array::RecordBatch) -> Vec<(Partition, DateTime<Utc>)> {
    use arrow::array::AsArray;
    use arrow::datatypes::{Int32Type, TimestampMicrosecondType};
    use shared_schema::schema::col;
    let (Some(t), Some(p)) = (batch.column_by_name(col::EVENT_TIME), batch.column_by_name(col::KAFKA_PARTITION)) else {
        return Vec::new();
    };
    let t = t.as_primitive::<TimestampMicrosecondType>();
    let p = p.as_primitive::<Int32Type>();
    p.values()
        .iter()
        .zip(t.values())
        .filter_map(|(p, t)| DateTime::from_timestamp_micros(*t).map(|t| (Partition(*p), t)))
        .collect()
}
