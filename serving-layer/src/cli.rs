//! Command line of `serving-layer`.

use std::time::Duration;

use clap::{Parser, Subcommand};

/// Serving layer of the Lambda data platform.
#[derive(Debug, Parser)]
#[command(name = "serving-layer", version, about)]
pub struct Cli {
    /// Platform database.
    #[arg(long, env = "DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5433/lambda", global = true)]
    pub database_url: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply the SQL migrations, fix the segment size and (re)create the
    /// generated serving views, then exit. Every binary also does this at start.
    Migrate {
        /// Offsets per segment; only takes effect when the schema is created.
        #[arg(long, env = "SEGMENT_SIZE")]
        segment_size: Option<i64>,
    },
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Migrate { segment_size } => {
            let pool = platform::db::connect(&cli.database_url, 2, Duration::from_secs(30)).await?;
            let deployment = platform::db::prepare(&pool, segment_size).await?;
            tracing::info!(segment_size = deployment.segment_size.get(), "schema is up to date");
            Ok(())
        }
    }
}
