//! Command line of `serving-layer`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::server::{self, ServeConfig};

/// Serving layer of the Lambda data platform.
#[derive(Debug, Parser)]
#[command(name = "serving-layer", version, about)]
pub struct Cli {
    /// Platform database.
    #[arg(long, env = "DATABASE_URL", default_value = shared_schema::defaults::DATABASE_URL, global = true)]
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
    /// Serve the recommendations API, the dashboard and its API, and
    /// /metrics, /healthz, /readyz until SIGTERM/SIGINT.
    Serve {
        /// Address to listen on.
        #[arg(long, env = "SERVING_ADDR", default_value = "127.0.0.1:8080")]
        addr: SocketAddr,
        /// Database time a recommendation may take before the popular list answers (e.g. 100ms).
        #[arg(long, env = "SERVING_BUDGET", default_value = "100ms", value_parser = humantime::parse_duration)]
        budget: Duration,
        /// How often the in-memory popular list is reloaded.
        #[arg(long, env = "SERVING_POPULAR_REFRESH", default_value = "10s", value_parser = humantime::parse_duration)]
        popular_refresh: Duration,
        /// PostgreSQL connections for recommendations.
        #[arg(long, env = "SERVING_MAX_CONNECTIONS", default_value_t = 16)]
        max_connections: u32,
    },
    /// Replace the imported model recommendations with a Parquet file's
    /// (columns user_id, product_id, score and optionally rank), atomically.
    ImportRecommendations {
        /// The Parquet file.
        file: PathBuf,
        /// Version label of the model that produced the file.
        #[arg(long)]
        model_version: String,
        /// Secret (at least 16 characters) that `batch-layer forget-user`
        /// hashed forgotten user ids with: their rows are left out. Needed
        /// once any user is forgotten.
        #[arg(long, env = "FORGET_KEY", hide_env_values = true)]
        forget_key: Option<String>,
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
        Command::Serve { addr, budget, popular_refresh, max_connections } => {
            if budget.is_zero() {
                anyhow::bail!("--budget must be positive, e.g. 100ms");
            }
            if popular_refresh.is_zero() {
                anyhow::bail!("--popular-refresh must be positive, e.g. 10s");
            }
            if max_connections == 0 {
                anyhow::bail!("--max-connections must be at least 1");
            }
            let shutdown = platform::shutdown::on_signals();
            let config = ServeConfig { addr, database_url: cli.database_url, budget, popular_refresh, max_connections };
            server::run(config, shutdown).await?;
            tracing::info!("stopped");
            Ok(())
        }
        Command::ImportRecommendations { file, model_version, forget_key } => {
            let key = platform::forgotten::ForgetKey::optional(forget_key.as_deref())?;
            let pool = platform::db::connect(&cli.database_url, 2, Duration::from_secs(30)).await?;
            platform::db::prepare(&pool, None).await?;
            let summary = crate::models::import(&pool, &file, &model_version, key.as_ref()).await?;
            tracing::info!(
                file = %file.display(),
                model_version,
                rows = summary.rows,
                users = summary.users,
                dropped_rows = summary.dropped_rows,
                dropped_users = summary.dropped_users,
                "imported model recommendations"
            );
            println!(
                "imported {} recommendations for {} users as model {model_version}; left out {} rows of {} forgotten users",
                summary.rows, summary.users, summary.dropped_rows, summary.dropped_users
            );
            Ok(())
        }
    }
}
