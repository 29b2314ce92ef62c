//! The speed layer's loop: consume, gather a micro-batch, flush it in one
//! PostgreSQL transaction, reading on during the flush and preparing the
//! next micro-batch while it commits.
//!
//! Positions come from PostgreSQL, never from the broker's group offsets:
//! the first record seen of a partition (after start or a rebalance) makes
//! the loop load that partition's stored offset, seek there if the broker
//! started elsewhere, and from then on accept only the exact next offset.
//! A crash at any point leaves either the whole flush or none of it.
//!
//! This module is the thin orchestration: the Kafka consumer, the
//! `select!` between receiving, flushing and shutdown. The parts:
//!
//! * [`positions`]: the next offset per partition and the verdict on each record;
//! * [`micro_batch`]: the records gathered, those held during a flush, when a flush is due;
//! * [`intake`]: records into the micro-batch through the positions, reloads after
//!   rebalances and fenced flushes (Kafka and PostgreSQL behind the `Edge` trait);
//! * [`sink`]: the one PostgreSQL transaction of a flush, fenced.

mod intake;
mod micro_batch;
mod positions;
mod sink;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, ClientContext, Message, TopicPartitionList};
use shared_schema::cut::{Offset, Partition};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use self::intake::{Edge, FlushEnd, Intake};
use self::micro_batch::{FlushPolicy, Hold, Record};
use self::sink::{Outcome, Prep, Sink};
use crate::dlq::Shipper;
use crate::offsets;

/// What `speed-layer run` needs.
#[derive(Debug, Clone)]
pub struct SpeedConfig {
    pub brokers: String,
    pub topic: String,
    pub dlq_topic: String,
    pub group_id: String,
    pub database_url: String,
    /// Flush at the latest this long after the first buffered record;
    /// zero: group commit, a flush as soon as the previous one committed.
    pub flush_interval: Duration,
    /// Flush as soon as this many records are buffered.
    pub max_batch: usize,
    /// Flush as soon as the buffered records hold this many bytes (keys
    /// and payloads); also bounds what is read during a flush, so memory
    /// stays bounded whatever the records' size.
    pub max_batch_bytes: usize,
    /// The longest a fetch waits at the broker for new records
    /// (`fetch.wait.max.ms`): an upper bound on how late an idle consumer
    /// hears of a record, paid for with one fetch request per wait.
    pub fetch_wait: Duration,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (port 0: any).
    pub ops_addr: SocketAddr,
    /// How partitions are shared out.
    pub assignment: Assignment,
    /// In group mode, this instance's static group membership
    /// (`group.instance.id`): a restarted instance with the same id takes
    /// its partitions back at once instead of waiting for the broker to
    /// expire the dead member (see [`consumer_config`]). `None`: a dynamic
    /// member.
    pub instance_id: Option<String>,
    /// The key forgotten user ids were hashed with (needed once any user
    /// is forgotten; without it the layer refuses to run).
    pub forget_key: Option<platform::forgotten::ForgetKey>,
    /// Notifications of stalls, lag and DLQ rate, with their thresholds.
    pub alerts: crate::alerts::Alerts,
    /// How often the heartbeat is written to `ops.heartbeats`.
    pub heartbeat_every: Duration,
}

impl SpeedConfig {
    /// One instance taking every partition of `topic`, flushing by group
    /// commit or at 5,000 records, ops endpoints on any free port, no alerts and no
    /// forget key (tools and tests).
    pub fn single_instance(brokers: &str, topic: &str, dlq_topic: &str, database_url: &str) -> Self {
        Self {
            brokers: brokers.to_string(),
            topic: topic.to_string(),
            dlq_topic: dlq_topic.to_string(),
            group_id: format!("{topic}.speed"),
            database_url: database_url.to_string(),
            flush_interval: Duration::ZERO,
            max_batch: 5_000,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            fetch_wait: DEFAULT_FETCH_WAIT,
            ops_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            assignment: Assignment::All,
            instance_id: None,
            forget_key: None,
            alerts: crate::alerts::Alerts::default(),
            heartbeat_every: platform::heartbeat::DEFAULT_EVERY,
        }
    }
}

/// [`SpeedConfig::max_batch_bytes`] unless configured: 64 MiB.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 64 << 20;

/// `fetch.wait.max.ms` unless configured. tansu 0.6 answers every fetch
/// only after this long (it sleeps out the wait even when it has records);
/// 10 ms and 50 ms measured the same within the noise there
/// (docs/BENCHMARKS.md), and 50 ms costs a fifth of the idle requests.
pub const DEFAULT_FETCH_WAIT: Duration = Duration::from_millis(50);

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
    #[error("planning the views' deltas: {0}")]
    Plan(#[from] datafusion::error::DataFusionError),
    #[error("replaying records from memory: {0}")]
    Replay(String),
    #[error("loading the views: {0}")]
    Views(String),
}

/// Partitions assigned or revoked since the loop last looked: their
/// positions must be reloaded from PostgreSQL.
#[derive(Default)]
struct RebalanceLog(Mutex<BTreeSet<Partition>>);

/// The consumer's context: records rebalances, and starts each assigned
/// partition at the offset PostgreSQL holds for it.
struct Context {
    log: Arc<RebalanceLog>,
    topic: String,
    database_url: String,
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
    /// Assigns partitions at the offsets PostgreSQL holds, not at the
    /// group's committed offsets (only informational here) or the
    /// beginning: a consumer that started behind read every record up to
    /// the position to skip it, and on a broker whose fetch from far behind
    /// is slow (tansu 0.6) it was revoked before its first fetch returned.
    /// When PostgreSQL does not answer, the partitions start where the
    /// group says and the positions put things right (see `positions`).
    fn rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        use rdkafka::types::RDKafkaRespErr::{
            RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS, RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS,
        };
        let partitions: Vec<Partition> = tpl.elements().iter().map(|e| Partition(e.partition())).collect();
        let outcome = match err {
            RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                match load_blocking(&self.database_url, &partitions) {
                    Ok(stored) => {
                        for p in &partitions {
                            let next = stored.get(p).copied().unwrap_or(Offset(0));
                            let _ = tpl.set_partition_offset(&self.topic, p.0, rdkafka::Offset::Offset(next.0));
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot load the stored offsets at assignment"),
                }
                consumer.assign(tpl).map(|()| "assigned")
            }
            RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => consumer.unassign().map(|()| "revoked"),
            other => {
                tracing::warn!(error = ?other, "rebalance error");
                consumer.unassign().map(|()| "unassigned after an error")
            }
        };
        match outcome {
            Ok(what) => tracing::info!(?partitions, what, "partitions rebalanced"),
            Err(e) => tracing::warn!(error = %e, ?partitions, "applying a rebalance failed"),
        }
        let mut log = self.log.0.lock().unwrap_or_else(|p| p.into_inner());
        log.extend(partitions);
    }
}

/// `offsets::load` from a thread of its own (rebalance callbacks run inside
/// the consumer's poll, on the async runtime, and must not nest one).
fn load_blocking(database_url: &str, partitions: &[Partition]) -> Result<BTreeMap<Partition, Offset>, String> {
    let (url, partitions) = (database_url.to_string(), partitions.to_vec());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        runtime.block_on(async {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(5))
                .connect(&url)
                .await
                .map_err(|e| e.to_string())?;
            let stored = offsets::load(&pool, &partitions).await.map_err(|e| e.to_string());
            pool.close().await;
            stored
        })
    })
    .join()
    .map_err(|_| "loading the stored offsets panicked".to_string())?
}

/// A copy of `m` (an absent payload is empty, and rejected as such).
fn record_of(m: &rdkafka::message::BorrowedMessage<'_>) -> Record {
    Record {
        partition: Partition(m.partition()),
        offset: Offset(m.offset()),
        timestamp: shared_schema::decode::kafka_time(m.timestamp().to_millis()),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().unwrap_or_default().to_vec(),
        gap_from: None,
    }
}

/// The speed layer's Kafka consumer settings (`bench_speed` reads with the
/// same, to compare a bare consumer with the layer).
///
/// With an `instance_id` the consumer is a static member of its group
/// (KIP-345): after a crash (kill -9, no LeaveGroup) a dynamic member's
/// partitions stay with the dead member until the broker expires its
/// session, and a restarted instance joins as a new member and waits for
/// that (on tansu 0.6, whose coordinator never expires sessions, it waited
/// for good). A static member that comes back under its id is handed its
/// assignment again at once. Ids must be unique within the group.
pub fn consumer_config(brokers: &str, group_id: &str, fetch_wait: Duration, instance_id: Option<&str>) -> ClientConfig {
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
        .set("fetch.wait.max.ms", fetch_wait.as_millis().max(1).to_string())
        // Only committed records of transactional producers: records of
        // aborted transactions are never delivered, let alone counted.
        .set("isolation.level", "read_committed");
    if let Some(id) = instance_id {
        config.set("group.instance.id", id);
    }
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
    let deployment = platform::db::check(&pool).await?;
    let forgotten = platform::forgotten::Forgotten::load(&pool, config.forget_key.as_ref()).await?;
    let log = Arc::new(RebalanceLog::default());
    let instance_id = match config.assignment {
        Assignment::Group => config.instance_id.as_deref(),
        Assignment::All => None,
    };
    let consumer: StreamConsumer<Context> =
        consumer_config(&config.brokers, &config.group_id, config.fetch_wait, instance_id)
            .create_with_context(Context {
                log: Arc::clone(&log),
                topic: config.topic.clone(),
                database_url: config.database_url.clone(),
            })
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
            let starts = partitions.iter().map(|p| (*p, stored.get(p).copied().unwrap_or(Offset(0))));
            consumer.assign(&partition_list(&config.topic, starts).map_err(kafka)?).map_err(kafka)?;
            tracing::info!(partitions = partitions.len(), "assigned every partition directly");
        }
    }
    // Rejects wait in PostgreSQL's outbox; this ships them to the DLQ topic.
    let dlq_wake = Arc::new(tokio::sync::Notify::new());
    let shipper_stop = CancellationToken::new();
    let shipper = tokio::spawn(
        Shipper::new(&config.brokers, &config.dlq_topic, pool.clone(), Arc::clone(&dlq_wake))
            .map_err(kafka)?
            .run(shipper_stop.clone(), Duration::from_secs(10)),
    );
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
    let heartbeat = platform::heartbeat::spawn(
        pool.clone(),
        "speed-layer",
        config.instance_id.clone().unwrap_or_else(platform::heartbeat::host),
        config.heartbeat_every,
        shutdown.clone(),
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
    tracing::info!(topic = %config.topic, group = %config.group_id, instance = ?instance_id, segment_size = deployment.segment_size.get(), "speed layer started");

    let mut state = Loop {
        source: KafkaSource(&consumer),
        edge: KafkaEdge { topic: &config.topic, pool: &pool, consumer: &consumer, rebalances: &log },
        policy: FlushPolicy {
            interval: config.flush_interval,
            max_batch: config.max_batch,
            max_bytes: config.max_batch_bytes,
        },
        intake: Intake::default(),
        sink: Sink::new(&config, &pool, &dlq_wake, deployment, forgotten, ready.clone(), notifier.clone())
            .await
            .map_err(|e| SpeedError::Views(e.to_string()))?,
        ended: false,
    };
    state.drive(&shutdown).await;
    ready.set(false);
    tracing::info!("speed layer stopped cleanly");
    drop(consumer);
    // The rejects of the last flushes, shipped before stopping if the DLQ is there.
    shipper_stop.cancel();
    let _ = shipper.await;
    let _ = lag.await;
    let _ = alerts.await;
    let _ = heartbeat.await;
    notifier.flush(Duration::from_secs(5)).await;
    let _ = ops_task.await;
    Ok(())
}

/// A record for [`replay`]: what the consumer would have received.
#[derive(Debug, Clone)]
pub struct ReplayRecord {
    pub partition: Partition,
    pub offset: Offset,
    /// The Kafka timestamp, milliseconds since the epoch.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

/// Runs `records`, already in memory, through everything `run` does after
/// the Kafka consumer: the positions, micro-batches up to `max_batch`
/// records or `max_batch_bytes`, the decode, the deltas of every view and
/// the fenced PostgreSQL commit with the offsets. What the layer can do
/// with the broker out of the way (`bench_speed --from-memory`). Each
/// partition's records must come in offset order from the position
/// PostgreSQL holds; nothing seeks.
pub async fn replay(config: &SpeedConfig, records: Vec<ReplayRecord>) -> Result<(), SpeedError> {
    let pool = platform::db::connect(&config.database_url, 4, Duration::from_secs(60)).await?;
    let deployment = platform::db::check(&pool).await?;
    let forgotten = platform::forgotten::Forgotten::load(&pool, config.forget_key.as_ref()).await?;
    let notifier =
        platform::notify::Notifier::spawn(platform::notify::NotifyConfig::new(None, "speed-layer"), Some(pool.clone()));
    let dlq_wake = tokio::sync::Notify::new();
    let sink = Sink::new(config, &pool, &dlq_wake, deployment, forgotten, Default::default(), notifier)
        .await
        .map_err(|e| SpeedError::Views(e.to_string()))?;
    let mut state = Loop {
        source: MemorySource { records: records.into_iter(), next: BTreeMap::new(), disorder: None },
        edge: MemoryEdge { pool: &pool, sought: None },
        // Records are all there at once: a micro-batch is flushed when full.
        policy: FlushPolicy { interval: Duration::MAX, max_batch: config.max_batch, max_bytes: config.max_batch_bytes },
        intake: Intake::default(),
        sink,
        ended: false,
    };
    state.drive(&CancellationToken::new()).await;
    pool.close().await;
    if let Some(disorder) = state.source.disorder.or(state.edge.sought) {
        return Err(SpeedError::Replay(disorder));
    }
    Ok(())
}

/// The records of [`replay`], checked to follow each other in every
/// partition.
struct MemorySource {
    records: std::vec::IntoIter<ReplayRecord>,
    /// Per partition, the offset of the next record.
    next: BTreeMap<Partition, Offset>,
    /// Set (and the records end) at the first record out of order.
    disorder: Option<String>,
}

impl Source for MemorySource {
    async fn recv(&mut self) -> Received {
        if self.disorder.is_some() {
            return Received::End;
        }
        let Some(r) = self.records.next() else { return Received::End };
        let expected = *self.next.entry(r.partition).or_insert(r.offset);
        if r.offset != expected {
            self.disorder =
                Some(format!("partition {} offset {} follows offset {}", r.partition, r.offset, expected.0 - 1));
            return Received::End;
        }
        self.next.insert(r.partition, Offset(r.offset.0 + 1));
        Received::Record(Record {
            partition: r.partition,
            offset: r.offset,
            timestamp: shared_schema::decode::kafka_time(r.timestamp_ms),
            key: r.key,
            payload: r.payload,
            gap_from: None,
        })
    }
}

/// PostgreSQL alone: what [`replay`]'s intake needs. A seek means the
/// records did not start at the stored offsets or a flush was fenced.
struct MemoryEdge<'a> {
    pool: &'a PgPool,
    sought: Option<String>,
}

impl Edge for MemoryEdge<'_> {
    type Error = sqlx::Error;

    fn rebalanced(&mut self) -> BTreeSet<Partition> {
        BTreeSet::new()
    }

    async fn load(&mut self, partitions: &[Partition]) -> Result<BTreeMap<Partition, Offset>, sqlx::Error> {
        offsets::load(self.pool, partitions).await
    }

    fn seek(&mut self, partition: Partition, offset: Offset) -> bool {
        self.sought.get_or_insert_with(|| {
            format!(
                "partition {partition} would be read again from offset {offset}: the records must start at the \
                 stored offsets, and no other instance may write them"
            )
        });
        false
    }
}

/// Where records come from: the Kafka consumer, or memory ([`replay`]).
trait Source {
    async fn recv(&mut self) -> Received;
}

enum Received {
    Record(Record),
    /// The consumer failed; librdkafka retries.
    Failed(KafkaError),
    /// No more records (memory only).
    End,
}

/// The speed layer's consumer as a [`Source`].
struct KafkaSource<'a>(&'a StreamConsumer<Context>);

impl Source for KafkaSource<'_> {
    async fn recv(&mut self) -> Received {
        match self.0.recv().await {
            Ok(m) => Received::Record(record_of(&m)),
            Err(e) => Received::Failed(e),
        }
    }
}

/// The micro-batch after the one committing.
#[derive(Default)]
enum Next {
    #[default]
    None,
    /// Prepared while the one before it committed.
    Prep(Prep),
    /// To be prepared once the one committing has committed.
    Records(Vec<Record>),
}

impl Next {
    fn records(&self) -> &[Record] {
        match self {
            Next::None | Next::Prep(Prep::Abandoned) => &[],
            Next::Prep(Prep::Ready(p)) => &p.records,
            Next::Prep(Prep::Fenced(r)) | Next::Records(r) => r,
        }
    }

    /// Prepared with what changed since: to be prepared again.
    fn unprepared(self) -> Self {
        match self {
            Next::Prep(Prep::Ready(p)) => Next::Records(p.records),
            other => other,
        }
    }
}

/// What a discarded flush held, per partition (see [`FlushEnd::Fenced`]):
/// the micro-batch and the one prepared after it.
fn discarded(records: &[Record], next: &Next) -> BTreeMap<Partition, (Offset, Offset)> {
    micro_batch::spans(records.iter().chain(next.records()))
}

/// The loop's state between iterations.
struct Loop<'a, S, E> {
    source: S,
    edge: E,
    policy: FlushPolicy,
    intake: Intake,
    sink: Sink<'a>,
    /// The source has no more records ([`replay`]).
    ended: bool,
}

impl<S: Source, E: Edge> Loop<'_, S, E> {
    /// Receives and flushes until `shutdown` (or the end of the records);
    /// what it holds is flushed before it returns.
    async fn drive(&mut self, shutdown: &CancellationToken) {
        loop {
            self.intake.apply_rebalances(&mut self.edge);
            let stopping = shutdown.is_cancelled() || self.ended;
            if self.intake.batch.flush_due(self.policy, Instant::now(), stopping) {
                self.flush(shutdown).await;
            }
            // What was read during a last flush is flushed before stopping.
            if (shutdown.is_cancelled() || self.ended) && self.intake.batch.is_empty() {
                return;
            }
            let wait = self.intake.batch.wait(self.policy, Instant::now());
            tokio::select! {
                _ = shutdown.cancelled() => {}
                received = tokio::time::timeout(wait.max(Duration::from_millis(1)), self.source.recv()) => match received {
                    Err(_) => {}
                    Ok(Received::Record(r)) => {
                        self.intake.accept(r, Instant::now(), &mut self.edge).await;
                    }
                    Ok(Received::Failed(e)) => {
                        tracing::warn!(error = %e, "Kafka consumer error; librdkafka retries");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Ok(Received::End) => self.ended = true,
                }
            }
        }
    }

    /// Flushes the micro-batch while receiving on, and the micro-batches
    /// that come due meanwhile: each is prepared (decode, duplicates,
    /// deltas: this process's CPU) while the one before it commits (a task
    /// of its own, mostly PostgreSQL's time), so a flush costs the slower of
    /// the two rather than their sum.
    ///
    /// Records that arrive during a commit are held; once they make a
    /// micro-batch ([`Hold::due`]) they are accepted through the positions
    /// the committing one leaves, as if it had committed, and prepared
    /// against the duplicates history it staged. Its commit carries the
    /// offsets on from where the committing one ends, so it commits only
    /// after it. When the committing one is fenced, both are discarded and
    /// re-read from the offsets PostgreSQL holds; when the forgotten users
    /// or the registered views changed under it, both are prepared again.
    /// At most a micro-batch more is held (a commit retrying against a dead
    /// database stops the reading; memory peaks at about three times
    /// `max_batch`), nothing after shutdown began or after a consumer
    /// error. Records of partitions reassigned meanwhile are dropped and
    /// re-read from the offset PostgreSQL holds, and a micro-batch that
    /// holds some of them commits only if no other instance moved them
    /// (the fence).
    async fn flush(&mut self, shutdown: &CancellationToken) {
        let records = self.intake.batch.take();
        let mut current = self.sink.prepare(records, shutdown).await;
        let mut held = Hold::new(self.policy);
        let mut next = Next::None;
        let end = loop {
            let prepared = match current {
                Prep::Ready(prepared) => prepared,
                Prep::Fenced(records) => break FlushEnd::Fenced(discarded(&records, &next)),
                Prep::Abandoned => break FlushEnd::Kept,
            };
            let mut commit = tokio::spawn(self.sink.committer().commit(prepared, shutdown.clone()));
            let done = loop {
                let now = Instant::now();
                if matches!(next, Next::None) && held.due(self.policy, now) {
                    let due = std::mem::replace(&mut held, Hold::new(self.policy));
                    self.intake.after_flush(FlushEnd::Kept, due, &mut self.edge).await;
                    let records = self.intake.batch.take();
                    if !records.is_empty() {
                        metrics::counter!("speed_prepared_ahead_total").increment(1);
                        next = Next::Prep(self.sink.prepare(records, shutdown).await);
                    }
                    continue;
                }
                let age = held.until_due(self.policy, now).filter(|_| matches!(next, Next::None));
                tokio::select! {
                    biased;
                    done = &mut commit => break done,
                    received = self.source.recv(), if held.wants_more(shutdown.is_cancelled()) => match received {
                        Received::Record(r) => held.push(r, Instant::now()),
                        Received::Failed(e) => {
                            tracing::warn!(error = %e, "Kafka consumer error; librdkafka retries");
                            held.close();
                        }
                        Received::End => {
                            self.ended = true;
                            held.close();
                        }
                    },
                    () = tokio::time::sleep(age.unwrap_or_default()), if age.is_some() => {}
                }
            };
            let done = done.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            self.sink.after_commit(&done);
            match &done.outcome {
                Outcome::Committed(offsets) => {
                    self.edge.committed(offsets);
                    current = match std::mem::take(&mut next) {
                        Next::None => break FlushEnd::Kept,
                        Next::Prep(prep) => prep,
                        Next::Records(records) => self.sink.prepare(records, shutdown).await,
                    };
                }
                Outcome::Fenced(_) => break FlushEnd::Fenced(discarded(&done.prepared.records, &next)),
                Outcome::StaleForgotten | Outcome::StaleViews => {
                    next = std::mem::take(&mut next).unprepared();
                    current = self.sink.prepare(done.prepared.records, shutdown).await;
                }
                Outcome::Abandoned => break FlushEnd::Kept,
            }
        };
        self.intake.after_flush(end, held, &mut self.edge).await;
    }
}

/// Kafka and PostgreSQL as the intake sees them.
struct KafkaEdge<'a> {
    topic: &'a str,
    pool: &'a PgPool,
    consumer: &'a StreamConsumer<Context>,
    rebalances: &'a RebalanceLog,
}

impl Edge for KafkaEdge<'_> {
    type Error = sqlx::Error;

    fn rebalanced(&mut self) -> BTreeSet<Partition> {
        std::mem::take(&mut *self.rebalances.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    async fn load(&mut self, partitions: &[Partition]) -> Result<BTreeMap<Partition, Offset>, sqlx::Error> {
        offsets::load(self.pool, partitions).await
    }

    fn seek(&mut self, partition: Partition, offset: Offset) -> bool {
        let tpl = match partition_list(self.topic, [(partition, offset)]) {
            Ok(tpl) => tpl,
            Err(e) => {
                tracing::warn!(error = %e, %partition, %offset, "cannot seek");
                return false;
            }
        };
        match self.consumer.seek_partitions(tpl, Duration::from_secs(5)) {
            // Per-partition errors come back in the list.
            Ok(result) => match result.elements().first().map(|e| e.error()) {
                Some(Err(e)) => {
                    tracing::warn!(error = %e, %partition, %offset, "seek failed; will retry on the next record");
                    false
                }
                _ => true,
            },
            Err(e) => {
                tracing::warn!(error = %e, %partition, %offset, "seek failed; will retry on the next record");
                false
            }
        }
    }

    /// Informational only (positions live in PostgreSQL): lets Kafka
    /// tooling show the group's lag.
    fn committed(&mut self, next: &[(Partition, Offset)]) {
        if let Ok(tpl) = partition_list(self.topic, next.iter().copied()) {
            let _ = self.consumer.commit(&tpl, CommitMode::Async);
        }
    }
}

/// `offsets` of `topic`'s partitions as rdkafka's partition list.
fn partition_list(
    topic: &str,
    offsets: impl IntoIterator<Item = (Partition, Offset)>,
) -> Result<TopicPartitionList, KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for (partition, offset) in offsets {
        tpl.add_partition_offset(topic, partition.0, rdkafka::Offset::Offset(offset.0))?;
    }
    Ok(tpl)
}
