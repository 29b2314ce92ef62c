//! The dead-letter queue: every rejected record goes to `events.dlq` with
//! its original key and bytes, and headers saying why and where from.
//!
//! Records are produced, and acknowledged by the broker, *before* the flush
//! that moves past them commits; so a crash can repeat a DLQ record (its
//! `source_partition`/`source_offset` headers identify it) but never lose
//! one. A bad record never stops the stream: it costs one produce.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use shared_schema::RejectedRecord;

/// Header names on DLQ records.
pub mod header {
    pub const REASON: &str = "reason";
    pub const FIELD: &str = "field";
    pub const DETAIL: &str = "detail";
    pub const SOURCE_TOPIC: &str = "source_topic";
    pub const SOURCE_PARTITION: &str = "source_partition";
    pub const SOURCE_OFFSET: &str = "source_offset";
}

/// A rejected record with its original key and bytes.
#[derive(Debug, Clone, Copy)]
pub struct DeadLetter<'a> {
    pub record: &'a RejectedRecord,
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
}

pub struct Dlq {
    producer: FutureProducer,
    topic: String,
    source_topic: String,
}

impl std::fmt::Debug for Dlq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dlq").field("topic", &self.topic).finish_non_exhaustive()
    }
}

impl Dlq {
    pub fn new(brokers: &str, topic: &str, source_topic: &str) -> Result<Self, KafkaError> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "30000")
            .create()?;
        Ok(Self { producer, topic: topic.to_string(), source_topic: source_topic.to_string() })
    }

    /// Produces every rejected record and waits for the broker's
    /// acknowledgement of all of them.
    pub async fn send(&self, rejected: &[DeadLetter<'_>]) -> Result<(), KafkaError> {
        let mut pending = Vec::with_capacity(rejected.len());
        for DeadLetter { record: r, key, payload } in rejected {
            let partition = r.partition.to_string();
            let offset = r.offset.to_string();
            let mut headers = OwnedHeaders::new()
                .insert(Header { key: header::REASON, value: Some(r.rejection.reason.as_str()) })
                .insert(Header { key: header::DETAIL, value: Some(r.rejection.detail.as_str()) })
                .insert(Header { key: header::SOURCE_TOPIC, value: Some(self.source_topic.as_str()) })
                .insert(Header { key: header::SOURCE_PARTITION, value: Some(partition.as_str()) })
                .insert(Header { key: header::SOURCE_OFFSET, value: Some(offset.as_str()) });
            if let Some(field) = r.rejection.field {
                headers = headers.insert(Header { key: header::FIELD, value: Some(field) });
            }
            let mut record = FutureRecord::to(&self.topic).payload(*payload).headers(headers);
            if let Some(k) = key {
                record = record.key(*k);
            }
            pending.push(self.producer.send(record, Duration::from_secs(30)));
        }
        for p in pending {
            p.await.map_err(|(e, _)| e)?;
        }
        Ok(())
    }
}
