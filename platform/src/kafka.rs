//! Broker metadata every layer reads the same way: the end of each
//! partition, for lag.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// A client for broker metadata, or `None` (logged: `what` is disabled).
pub fn metadata_client(brokers: &str, what: &str) -> Option<Arc<BaseConsumer>> {
    match ClientConfig::new().set("bootstrap.servers", brokers).create::<BaseConsumer>() {
        Ok(c) => Some(Arc::new(c)),
        Err(e) => {
            tracing::warn!(error = %e, "{what} disabled: cannot create a metadata client");
            None
        }
    }
}

/// The end (high watermark) of every partition of `topic`, asked off the
/// async threads; empty when the broker does not answer.
pub async fn topic_ends(consumer: &Arc<BaseConsumer>, topic: &str) -> Vec<(i32, i64)> {
    let (c, topic) = (Arc::clone(consumer), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let partitions = c
            .fetch_metadata(Some(&topic), Duration::from_secs(5))
            .map(|m| m.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect::<Vec<_>>())
            .unwrap_or_default();
        partitions
            .into_iter()
            .filter_map(|p| c.fetch_watermarks(&topic, p, Duration::from_secs(5)).ok().map(|(_, high)| (p, high)))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default()
}
