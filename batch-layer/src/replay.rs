//! `batch-layer replay-dlq`: after the contract (or the sender) is fixed, an
//! operator re-injects the records rejected for one reason into the events
//! topic, from the lake's `events_rejected` (the durable copy of the DLQ).
//!
//! - Only records that the contract now accepts are sent: one still
//!   rejected is counted and left where it is.
//! - Each record is sent once: its original position goes into
//!   `ops.dlq_replays` after the broker acknowledged it, and a second replay
//!   skips it. (A crash between the two re-sends it on the next replay; the
//!   event's id then makes both layers count it once, inside the
//!   duplicates window.)
//! - Oversize records are kept only as a prefix and a hash: not replayable.

use std::time::Duration;

use chrono::{DateTime, Utc};
use datafusion::arrow::array::{Array, AsArray};
use datafusion::prelude::SessionContext;
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use shared_schema::schema::rejected_col;
use sqlx::PgPool;

use crate::lake::{self, Lake, REJECTED_TABLE};

/// What a replay did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Rejected records of the reason (since the time given).
    pub matched: u64,
    pub replayed: u64,
    pub already_replayed: u64,
    /// Records the contract still rejects (with the reason they get now).
    pub still_rejected: u64,
    pub not_replayable: u64,
}

impl ReplaySummary {
    pub fn line(&self, reason: &str, topic: &str) -> String {
        format!(
            "replay-dlq: {} records rejected as {reason}: {} sent to {topic}, {} already replayed, {} still rejected by the contract, {} not replayable (oversize)",
            self.matched, self.replayed, self.already_replayed, self.still_rejected, self.not_replayable
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Lake(#[from] lake::LakeError),
    #[error("reading {REJECTED_TABLE}: {0}")]
    Scan(#[from] datafusion::error::DataFusionError),
    #[error("Kafka ({brokers}): {source}")]
    Kafka { brokers: String, source: rdkafka::error::KafkaError },
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error("reading {REJECTED_TABLE}: {0}")]
    Arrow(#[from] datafusion::arrow::error::ArrowError),
}

/// Replays the records rejected as `reason` (since `since`) into `topic`.
pub async fn replay(
    lake: &Lake,
    pool: &PgPool,
    brokers: &str,
    topic: &str,
    reason: &str,
    since: Option<DateTime<Utc>>,
    show_progress: bool,
) -> Result<ReplaySummary, ReplayError> {
    let mut summary = ReplaySummary::default();
    let Some(table) = lake.open(REJECTED_TABLE).await? else { return Ok(summary) };
    let ctx = SessionContext::new();
    lake::register(&ctx, REJECTED_TABLE, &table).await?;
    let since_micros = since.map_or(i64::MIN, |t| t.timestamp_micros());
    use rejected_col::*;
    let sql = format!(
        "SELECT {KAFKA_PARTITION}, {KAFKA_OFFSET}, {KAFKA_KEY}, {PAYLOAD} FROM {REJECTED_TABLE}
         WHERE {REASON} = $1 AND CAST({REJECTED_AT} AS BIGINT) >= $2
         ORDER BY {KAFKA_PARTITION}, {KAFKA_OFFSET}"
    );
    let params = vec![
        datafusion::common::ScalarValue::Utf8(Some(reason.to_string())),
        datafusion::common::ScalarValue::Int64(Some(since_micros)),
    ];
    let batches = ctx.sql(&sql).await?.with_param_values(params)?.collect().await?;
    summary.matched = batches.iter().map(|b| b.num_rows() as u64).sum();
    let done: Vec<(i32, i64)> =
        sqlx::query_as("SELECT source_partition, source_offset FROM ops.dlq_replays").fetch_all(pool).await?;
    let done: std::collections::HashSet<(i32, i64)> = done.into_iter().collect();
    let kafka = |source| ReplayError::Kafka { brokers: brokers.to_string(), source };
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "60000")
        .create()
        .map_err(kafka)?;
    let bar = if show_progress { ProgressBar::new(summary.matched) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("replay [{elapsed_precise}] {wide_bar} {pos}/{len} records")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    for b in &batches {
        let partitions = b.column(0).as_primitive::<datafusion::arrow::datatypes::Int32Type>();
        let offsets = b.column(1).as_primitive::<datafusion::arrow::datatypes::Int64Type>();
        // Parquet may hand binary columns back as views: one layout here.
        let binary =
            |i: usize| datafusion::arrow::compute::cast(b.column(i), &datafusion::arrow::datatypes::DataType::Binary);
        let (keys, payloads) = (binary(2)?, binary(3)?);
        let (keys, payloads) = (keys.as_binary::<i32>(), payloads.as_binary::<i32>());
        for i in 0..b.num_rows() {
            bar.inc(1);
            let position = (partitions.value(i), offsets.value(i));
            if done.contains(&position) {
                summary.already_replayed += 1;
                continue;
            }
            if reason == shared_schema::RejectReason::Oversized.as_str() {
                summary.not_replayable += 1;
                continue;
            }
            let payload = payloads.value(i);
            if shared_schema::Event::parse(payload, Utc::now()).is_err() {
                summary.still_rejected += 1;
                continue;
            }
            let mut record = FutureRecord::to(topic).payload(payload);
            if !keys.is_null(i) {
                record = record.key(keys.value(i));
            }
            producer.send(record, Duration::from_secs(60)).await.map_err(|(e, _)| kafka(e))?;
            sqlx::query(
                "INSERT INTO ops.dlq_replays (source_partition, source_offset, reason) VALUES ($1, $2, $3)
                 ON CONFLICT DO NOTHING",
            )
            .bind(position.0)
            .bind(position.1)
            .bind(reason)
            .execute(pool)
            .await?;
            summary.replayed += 1;
        }
    }
    bar.finish_and_clear();
    Ok(summary)
}
