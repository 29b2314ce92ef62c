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
        #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
        brokers: String,
        /// Topic to read.
        #[arg(long, env = "EVENTS_TOPIC", default_value = "events")]
        topic: String,
        /// Where rejected records go.
        #[arg(long, env = "DLQ_TOPIC", default_value = "events.dlq")]
        dlq_topic: String,
        /// Consumer group; instances in one group split the partitions.
        #[arg(long, env = "SPEED_GROUP_ID", default_value = "lambda-speed")]
        group_id: String,
        /// Platform database.
        #[arg(long, env = "DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5433/lambda")]
        database_url: String,
        /// Flush a micro-batch at the latest this long after its first record (e.g. 200ms).
        #[arg(long, env = "SPEED_FLUSH_INTERVAL", default_value = "200ms", value_parser = humantime::parse_duration)]
        flush_interval: Duration,
        /// Flush as soon as this many records are buffered.
        #[arg(long, env = "SPEED_MAX_BATCH", default_value_t = 50_000)]
        max_batch: usize,
        /// Address of /metrics, /healthz and /readyz.
        #[arg(long, env = "SPEED_OPS_ADDR", default_value = "127.0.0.1:9101")]
        ops_addr: SocketAddr,
        /// `group`: instances in the consumer group split the partitions;
        /// `all`: this instance takes every partition itself (single instance).
        #[arg(long, env = "SPEED_ASSIGNMENT", value_enum, default_value = "group")]
        assignment: crate::stream::Assignment,
        /// Secret (at least 16 characters) that `batch-layer forget-user`
        /// hashed forgotten user ids with; needed once any user is forgotten.
        #[arg(long, env = "FORGET_KEY", hide_env_values = true)]
        forget_key: Option<String>,
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
            ops_addr,
            assignment,
            forget_key,
        } => {
            if max_batch == 0 {
                anyhow::bail!("--max-batch must be at least 1");
            }
            if flush_interval.is_zero() {
                anyhow::bail!("--flush-interval must be positive, e.g. 200ms");
            }
            let config = SpeedConfig {
                brokers,
                topic,
                dlq_topic,
                group_id,
                database_url,
                flush_interval,
                max_batch,
                ops_addr,
                assignment,
                forget_key: platform::forgotten::ForgetKey::optional(forget_key.as_deref())?,
            };
            stream::run(config, shutdown).await?;
            Ok(())
        }
    }
}
