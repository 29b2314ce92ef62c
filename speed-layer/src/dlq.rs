//! The dead-letter queue, through an outbox: every rejected record goes to
//! `events.dlq` with its original key and bytes (or, past 64 KiB, their
//! first 64 KiB, size and SHA-256: see [`platform::oversize`]), and headers
//! saying why and where from.
//!
//! A flush writes its rejects into `ops.dlq_outbox` in its own transaction
//! ([`enqueue`]), so they are committed exactly when the offsets that pass
//! them are. [`Shipper`] produces them to the DLQ topic in the background
//! and deletes what the broker acknowledged. So a reject is never lost, and
//! never stops the stream: not when the DLQ topic is away (the outbox
//! waits, the stream goes on), not when the record is larger than a DLQ
//! message may be. A crash between the produce and the delete repeats a DLQ
//! record (its `source_partition`/`source_offset` headers identify it).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use shared_schema::RejectedRecord;
use sqlx::{PgConnection, PgPool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Header names on DLQ records.
pub mod header {
    pub const REASON: &str = "reason";
    pub const FIELD: &str = "field";
    pub const DETAIL: &str = "detail";
    pub const SOURCE_TOPIC: &str = "source_topic";
    pub const SOURCE_PARTITION: &str = "source_partition";
    pub const SOURCE_OFFSET: &str = "source_offset";
    /// Size in bytes of the original record (always set).
    pub const ORIGINAL_SIZE: &str = "original_size";
    /// Hex SHA-256 of the original, set when the payload is only its prefix.
    pub const ORIGINAL_SHA256: &str = "original_sha256";
}

/// Outbox rows shipped per round.
const SHIP_BATCH: i64 = 256;

/// A rejected record with its original key and bytes.
#[derive(Debug, Clone, Copy)]
pub struct DeadLetter<'a> {
    pub record: &'a RejectedRecord,
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
}

/// Writes `rejected` into the outbox inside the flush's transaction.
pub async fn enqueue(
    conn: &mut PgConnection,
    source_topic: &str,
    rejected: &[DeadLetter<'_>],
) -> Result<(), sqlx::Error> {
    if rejected.is_empty() {
        return Ok(());
    }
    let n = rejected.len();
    let (mut partitions, mut offsets, mut has_key, mut keys) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut payloads, mut sizes, mut digests) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut reasons, mut fields, mut details) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for d in rejected {
        let kept = platform::oversize::keep(d.payload);
        partitions.push(d.record.partition);
        offsets.push(d.record.offset);
        has_key.push(d.key.is_some());
        keys.push(d.key.unwrap_or_default().to_vec());
        payloads.push(kept.bytes.to_vec());
        sizes.push(kept.original_size as i64);
        digests.push(kept.sha256.clone().unwrap_or_default());
        reasons.push(d.record.rejection.reason.as_str());
        fields.push(d.record.rejection.field.unwrap_or_default());
        details.push(d.record.rejection.detail.as_str());
    }
    sqlx::query(
        "INSERT INTO ops.dlq_outbox (source_topic, kafka_partition, kafka_offset, kafka_key, payload, original_size,
             original_sha256, reason, field, detail)
         SELECT $1, p, o, CASE WHEN hk THEN k END, b, s, NULLIF(d, ''), r, NULLIF(f, ''), t
         FROM unnest($2::int[], $3::bigint[], $4::bool[], $5::bytea[], $6::bytea[], $7::bigint[], $8::text[],
                     $9::text[], $10::text[], $11::text[]) AS x(p, o, hk, k, b, s, d, r, f, t)
         ON CONFLICT (source_topic, kafka_partition, kafka_offset) DO NOTHING",
    )
    .bind(source_topic)
    .bind(partitions)
    .bind(offsets)
    .bind(has_key)
    .bind(keys)
    .bind(payloads)
    .bind(sizes)
    .bind(digests)
    .bind(reasons)
    .bind(fields)
    .bind(details)
    .execute(conn)
    .await?;
    Ok(())
}

type OutboxRow = (i64, String, i32, i64, Option<Vec<u8>>, Vec<u8>, i64, Option<String>, String, Option<String>, String);

/// Ships the outbox to the DLQ topic in the background.
pub struct Shipper {
    producer: FutureProducer,
    brokers: String,
    topic: String,
    pool: PgPool,
    wake: Arc<Notify>,
}

impl std::fmt::Debug for Shipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shipper").field("topic", &self.topic).finish_non_exhaustive()
    }
}

impl Shipper {
    /// A shipper to `topic`; notify `wake` after a flush enqueued rejects.
    pub fn new(brokers: &str, topic: &str, pool: PgPool, wake: Arc<Notify>) -> Result<Self, KafkaError> {
        let producer = Self::producer(brokers)?;
        Ok(Self { producer, brokers: brokers.to_string(), topic: topic.to_string(), pool, wake })
    }

    fn producer(brokers: &str) -> Result<FutureProducer, KafkaError> {
        ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            // A DLQ that is away fails a round within seconds; the outbox
            // keeps the records and the next round tries again.
            .set("message.timeout.ms", "10000")
            .create()
    }

    /// Ships until `stop`, then makes a last attempt of at most `last_try`
    /// for what the final flushes enqueued; what is left waits in the
    /// outbox for the next start.
    pub async fn run(mut self, stop: CancellationToken, last_try: Duration) {
        let mut backoff = platform::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut failing = false;
        while !stop.is_cancelled() {
            let wait = match self.ship_round().await {
                Ok(0) => Duration::from_secs(1),
                Ok(_) => {
                    if failing {
                        tracing::info!(topic = %self.topic, "shipping to the DLQ works again");
                        failing = false;
                    }
                    backoff.reset();
                    continue;
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, topic = %self.topic, "cannot ship rejects to the DLQ; they wait in ops.dlq_outbox");
                        failing = true;
                    }
                    metrics::counter!("speed_dlq_ship_failures_total").increment(1);
                    // A fresh producer for the next round: an idempotent
                    // producer whose broker lost its state (a broker that
                    // crashed or failed over) can never succeed again, and a
                    // new one gets a new producer id. The outbox keeps the
                    // records, so nothing is lost; a record the broker took
                    // without our seeing the ack may reach the DLQ twice.
                    match Self::producer(&self.brokers) {
                        Ok(producer) => self.producer = producer,
                        Err(e) => tracing::warn!(error = %e, "cannot create a new DLQ producer; keeping the old one"),
                    }
                    backoff.next_delay()
                }
            };
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = self.wake.notified(), if !failing => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        let last = async {
            while let Ok(n) = self.ship_round().await {
                if n == 0 {
                    break;
                }
            }
        };
        if tokio::time::timeout(last_try, last).await.is_err() {
            tracing::warn!("stopping with rejects still in ops.dlq_outbox; the next start ships them");
        }
    }

    /// Ships one batch of the outbox; returns how many records went out.
    async fn ship_round(&self) -> Result<usize, ShipError> {
        let rows: Vec<OutboxRow> = sqlx::query_as(
            "SELECT id, source_topic, kafka_partition, kafka_offset, kafka_key, payload, original_size, original_sha256,
                    reason, field, detail
             FROM ops.dlq_outbox ORDER BY id LIMIT $1",
        )
        .bind(SHIP_BATCH)
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            metrics::gauge!("speed_dlq_outbox_records").set(0.0);
            return Ok(0);
        }
        let sends = rows.iter().map(|row| self.send(row));
        let results = futures::future::join_all(sends).await;
        let shipped: Vec<i64> = rows.iter().zip(&results).filter(|(_, r)| r.is_ok()).map(|(row, _)| row.0).collect();
        if !shipped.is_empty() {
            sqlx::query("DELETE FROM ops.dlq_outbox WHERE id = ANY($1)").bind(&shipped).execute(&self.pool).await?;
            metrics::counter!("speed_dlq_total").increment(shipped.len() as u64);
        }
        let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.dlq_outbox").fetch_one(&self.pool).await?;
        metrics::gauge!("speed_dlq_outbox_records").set(waiting as f64);
        match results.into_iter().find_map(Result::err) {
            Some(e) if shipped.is_empty() => Err(ShipError::Kafka(Box::new(e))),
            _ => Ok(shipped.len()),
        }
    }

    async fn send(&self, row: &OutboxRow) -> Result<(), KafkaError> {
        let (_, source_topic, partition, offset, key, payload, size, sha256, reason, field, detail) = row;
        let (partition, offset, size) = (partition.to_string(), offset.to_string(), size.to_string());
        let mut headers = OwnedHeaders::new()
            .insert(Header { key: header::REASON, value: Some(reason.as_str()) })
            .insert(Header { key: header::DETAIL, value: Some(detail.as_str()) })
            .insert(Header { key: header::SOURCE_TOPIC, value: Some(source_topic.as_str()) })
            .insert(Header { key: header::SOURCE_PARTITION, value: Some(partition.as_str()) })
            .insert(Header { key: header::SOURCE_OFFSET, value: Some(offset.as_str()) })
            .insert(Header { key: header::ORIGINAL_SIZE, value: Some(size.as_str()) });
        if let Some(field) = field {
            headers = headers.insert(Header { key: header::FIELD, value: Some(field.as_str()) });
        }
        if let Some(sha) = sha256 {
            headers = headers.insert(Header { key: header::ORIGINAL_SHA256, value: Some(sha.as_str()) });
        }
        let mut record = FutureRecord::to(&self.topic).payload(payload.as_slice()).headers(headers);
        if let Some(k) = key {
            record = record.key(k.as_slice());
        }
        self.producer.send(record, Duration::from_secs(30)).await.map(|_| ()).map_err(|(e, _)| e)
    }
}

#[derive(Debug, thiserror::Error)]
enum ShipError {
    #[error("PostgreSQL: {0}")]
    Db(#[from] sqlx::Error),
    #[error("producing to the DLQ: {0}")]
    Kafka(Box<KafkaError>),
}
