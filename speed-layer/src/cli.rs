//! Command line of `speed-layer`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::stream::{self, SpeedConfig};

/// Speed layer of the Lambda data platform: exactly-once view deltas from Kafka.
#[derive(Debug, Parser)]
#[command(name = "speed-layer", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume `events` and keep `speed.*` up to date until SIGTERM/SIGINT.
    Run {
        /// Kafka bootstrap servers.
        #[arg(long, env = "KAFKA_BROKERS", default_value = shared_schema::defaults::KAFKA_BROKERS)]
        brokers: String,
        /// Topic to read.
        #[arg(long, env = "EVENTS_TOPIC", default_value = shared_schema::defaults::EVENTS_TOPIC)]
        topic: String,
        /// Where rejected records go.
        #[arg(long, env = "DLQ_TOPIC", default_value = shared_schema::defaults::DLQ_TOPIC)]
        dlq_topic: String,
        /// Consumer group; instances in one group split the partitions.
        #[arg(long, env = "SPEED_GROUP_ID", default_value = "lambda-speed")]
        group_id: String,
        /// Platform database.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true, default_value = shared_schema::defaults::DATABASE_URL)]
        database_url: String,
        /// Flush a micro-batch at the latest this long after its first
        /// record. 0s (the default): group commit, each flush starts as soon
        /// as the previous one has committed, with everything read meanwhile.
        #[arg(long, env = "SPEED_FLUSH_INTERVAL", default_value = "0s", value_parser = humantime::parse_duration)]
        flush_interval: Duration,
        /// Flush as soon as this many records are buffered.
        #[arg(long, env = "SPEED_MAX_BATCH", default_value_t = 50_000)]
        max_batch: usize,
        /// Flush as soon as the buffered records hold this many MiB; also
        /// bounds what is read during a flush (memory stays bounded).
        #[arg(long, env = "SPEED_MAX_BATCH_MIB", default_value_t = 64)]
        max_batch_mib: usize,
        /// Longest a fetch waits at the broker for new records (Kafka's
        /// fetch.wait.max.ms): lower is fresher, at one request per wait while idle.
        #[arg(long, env = "SPEED_FETCH_WAIT", default_value = "50ms", value_parser = humantime::parse_duration)]
        fetch_wait: Duration,
        /// Address of /metrics, /healthz and /readyz.
        #[arg(long, env = "SPEED_OPS_ADDR", default_value = "127.0.0.1:9101")]
        ops_addr: SocketAddr,
        /// `group`: instances in the consumer group split the partitions;
        /// `all`: this instance takes every partition itself (single instance).
        #[arg(long, env = "SPEED_ASSIGNMENT", value_enum, default_value = "group")]
        assignment: crate::stream::Assignment,
        /// In group mode, this instance's static membership id
        /// (group.instance.id), unique in the group: a restart after a crash
        /// takes its partitions back at once. Default `speed-<host>-<ops
        /// port>`; `none` for a dynamic member (also the default when the
        /// ops port is 0, which changes at every start).
        #[arg(long, env = "SPEED_INSTANCE_ID")]
        instance_id: Option<String>,
        /// Secret (at least 16 characters) that `batch-layer forget-user`
        /// hashed forgotten user ids with; needed once any user is forgotten.
        #[arg(long, env = "FORGET_KEY", hide_env_values = true)]
        forget_key: Option<String>,
        #[command(flatten)]
        notify: platform::notify::WebhookArgs,
        #[command(flatten)]
        heartbeat: platform::heartbeat::HeartbeatArgs,
        /// A partition with records waiting whose offset has not moved this long is stalled.
        #[arg(long, env = "SPEED_STALL_AFTER", default_value = "2m", value_parser = humantime::parse_duration)]
        stall_after: Duration,
        /// Records waiting (all partitions) above which the layer is lagging.
        #[arg(long, env = "SPEED_LAG_THRESHOLD", default_value_t = 1_000_000)]
        lag_threshold: i64,
        /// Rejected share of the last minute's records above which the DLQ rate is high (0 to 1).
        #[arg(long, env = "SPEED_DLQ_RATE_THRESHOLD", default_value_t = 0.05)]
        dlq_rate_threshold: f64,
    },
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let shutdown = platform::shutdown::on_signals();
    match cli.command {
        Command::Run {
            brokers,
            topic,
            dlq_topic,
            group_id,
            database_url,
            flush_interval,
            max_batch,
            max_batch_mib,
            fetch_wait,
            ops_addr,
            assignment,
            instance_id,
            forget_key,
            heartbeat,
            notify,
            stall_after,
            lag_threshold,
            dlq_rate_threshold,
        } => {
            if !(0.0..=1.0).contains(&dlq_rate_threshold) {
                anyhow::bail!("--dlq-rate-threshold must be between 0 and 1, got {dlq_rate_threshold}");
            }
            let alerts = crate::alerts::Alerts {
                notify_webhook: notify.webhook()?,
                stall_after,
                lag_threshold,
                dlq_rate_threshold,
                ..crate::alerts::Alerts::default()
            };
            if max_batch == 0 {
                anyhow::bail!("--max-batch must be at least 1");
            }
            if max_batch_mib == 0 || max_batch_mib > 16 * 1024 {
                anyhow::bail!("--max-batch-mib must be from 1 to 16384, e.g. 64");
            }
            if fetch_wait.is_zero() || fetch_wait > Duration::from_secs(300) {
                anyhow::bail!("--fetch-wait must be from 1ms to 300s, e.g. 50ms");
            }
            if flush_interval > Duration::from_secs(3600) {
                anyhow::bail!("--flush-interval must be at most 1h, e.g. 0s (group commit) or 200ms");
            }
            let config = SpeedConfig {
                brokers,
                topic,
                dlq_topic,
                group_id,
                database_url,
                flush_interval,
                max_batch,
                max_batch_bytes: max_batch_mib << 20,
                fetch_wait,
                ops_addr,
                assignment,
                instance_id: instance_id_or_default(instance_id, ops_addr),
                forget_key: platform::forgotten::ForgetKey::optional(forget_key.as_deref())?,
                alerts,
                heartbeat_every: heartbeat.every()?,
            };
            stream::run(config, shutdown).await?;
            Ok(())
        }
    }
}

/// `--instance-id` as given (`none`: no static membership), or by default
/// `speed-<host>-<ops port>`: stable across restarts on one host and unique
/// there (two instances cannot share an ops port). A random ops port (0)
/// gives no stable id, so a dynamic member.
fn instance_id_or_default(given: Option<String>, ops_addr: SocketAddr) -> Option<String> {
    match given {
        Some(id) if id.eq_ignore_ascii_case("none") || id.is_empty() => None,
        Some(id) => Some(id),
        None if ops_addr.port() == 0 => None,
        None => Some(format!("speed-{}-{}", hostname(), ops_addr.port())),
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_id_defaults_to_host_and_ops_port() {
        let fixed: SocketAddr = "127.0.0.1:9101".parse().unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let default = instance_id_or_default(None, fixed).unwrap();
        assert!(default.starts_with("speed-") && default.ends_with("-9101"), "{default}");
        assert_eq!(instance_id_or_default(None, any), None);
        assert_eq!(instance_id_or_default(Some("none".into()), fixed), None);
        assert_eq!(instance_id_or_default(Some("speed-a".into()), any).as_deref(), Some("speed-a"));
    }
}
