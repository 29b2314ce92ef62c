//! A topic's configuration as the broker reports it, through the Kafka
//! admin API (`DescribeConfigs`): `forget-user` reads the retention that
//! bounds how long Kafka keeps a forgotten user's records.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;

#[derive(Debug, thiserror::Error)]
pub enum TopicConfigError {
    #[error("asking {brokers} for topic {topic}'s configuration: {reason}")]
    Kafka { brokers: String, topic: String, reason: String },
}

/// The configuration entries `brokers` reports for `topic` (name → value;
/// entries without a value are left out).
pub async fn describe(brokers: &str, topic: &str) -> Result<BTreeMap<String, String>, TopicConfigError> {
    let err = |reason: String| TopicConfigError::Kafka { brokers: brokers.into(), topic: topic.into(), reason };
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("socket.timeout.ms", "10000")
        .create()
        .map_err(|e| err(e.to_string()))?;
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(15)));
    let results =
        admin.describe_configs(&[ResourceSpecifier::Topic(topic)], &options).await.map_err(|e| err(e.to_string()))?;
    let resource =
        results.into_iter().next().ok_or_else(|| err("no answer".into()))?.map_err(|code| err(format!("{code}")))?;
    Ok(resource.entries.into_iter().filter_map(|e| e.value.map(|v| (e.name, v))).collect())
}
