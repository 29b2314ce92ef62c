//! Command line of `batch-layer`.

use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::ingest::{self, IngestConfig};
use crate::lake::Lake;

/// Batch layer of the Lambda data platform: the lake and the exact recompute.
#[derive(Debug, Parser)]
#[command(name = "batch-layer", version, about)]
pub struct Cli {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092", global = true)]
    pub brokers: String,
    /// The Delta Lake: a folder or an s3:// URL.
    #[arg(long, env = "LAKE_URI", default_value = ".local/lake", global = true)]
    pub lake_uri: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Drain topic `events` into the Delta table `events`, each offset exactly once.
    Ingest {
        /// Topic to read.
        #[arg(long, env = "EVENTS_TOPIC", default_value = "events")]
        topic: String,
        /// Flush at the latest this long after the first buffered record (e.g. 60s, 5s).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        flush_interval: Duration,
        /// Flush as soon as this many records are buffered.
        #[arg(long, default_value_t = 200_000)]
        flush_records: usize,
        /// Exit once every partition is read to its end as of the start.
        #[arg(long)]
        until_caught_up: bool,
    },
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let shutdown = platform::shutdown::on_signals();
    match cli.command {
        Command::Ingest { topic, flush_interval, flush_records, until_caught_up } => {
            if flush_records == 0 {
                anyhow::bail!("--flush-records must be at least 1");
            }
            let config = IngestConfig {
                brokers: cli.brokers,
                topic,
                lake: Lake::parse(&cli.lake_uri)?,
                flush_interval,
                flush_records,
                until_caught_up,
                show_progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            };
            let s = ingest::run(config, shutdown).await?;
            println!(
                "ingest: {} records read, {} events and {} rejected records committed in {} Delta commits; next offsets {:?}",
                s.records, s.events, s.rejected, s.commits, s.offsets
            );
            Ok(())
        }
    }
}
