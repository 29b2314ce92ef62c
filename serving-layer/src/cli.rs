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
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, default_value = shared_schema::defaults::DATABASE_URL, global = true)]
    pub database_url: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply the SQL migrations, fix the segment size and (re)create the
    /// generated serving views, then exit: the one schema change, run as the
    /// schema owner before the services start (they only check the version).
    Migrate {
        /// Offsets per segment; only takes effect when the schema is created.
        #[arg(long, env = "SEGMENT_SIZE")]
        segment_size: Option<i64>,
        /// The views folder: one SQL file per view (see docs/VIEWS.md). New
        /// files get their tables, changed ones are recomputed by the next
        /// batch run.
        #[arg(long, env = "VIEWS_DIR", default_value = "views")]
        views_dir: std::path::PathBuf,
        /// Drop the relations of registered views whose file is gone (kept
        /// and maintained otherwise).
        #[arg(long)]
        drop_removed_views: bool,
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
        /// Database the recommendations read, as role `recommender_reader`
        /// (a hot standby will do) [default: DATABASE_URL].
        #[arg(long, env = "RECOMMENDER_DATABASE_URL", hide_env_values = true)]
        recommender_database_url: Option<String>,
        /// Database the dashboard reads, as role `dashboard_reader` (a hot
        /// standby will do) [default: DATABASE_URL].
        #[arg(long, env = "DASHBOARD_DATABASE_URL", hide_env_values = true)]
        dashboard_database_url: Option<String>,
        /// Where /metrics, /healthz and /readyz listen (keep it off the public edge).
        #[arg(long, env = "SERVING_OPS_ADDR", default_value = "127.0.0.1:9102")]
        ops_addr: SocketAddr,
        /// Requests per second per API key (also the burst); more get 429.
        #[arg(long, env = "SERVING_RATE_LIMIT", default_value_t = 50.0)]
        rate_limit: f64,
        /// Secret (at least 16 characters) signing dashboard session cookies;
        /// set the same on every instance behind one load balancer
        /// [default: random per process].
        #[arg(long, env = "SERVING_SESSION_SECRET", hide_env_values = true)]
        session_secret: Option<String>,
        /// Origins whose web pages may call the API (CORS), comma-separated,
        /// e.g. https://shop.example.com [default: none].
        #[arg(long, env = "SERVING_CORS_ORIGINS", value_delimiter = ',')]
        cors_origins: Vec<String>,
        /// The shop's currency (ISO 4217, e.g. EUR): the dashboard shows
        /// revenue and prices in it.
        #[arg(long, env = "SERVING_CURRENCY", default_value = "USD")]
        currency: String,
    },
    /// Dead-man alerts that do not depend on the dead process: notify when a
    /// process's heartbeat goes silent (and returns), when the batch views
    /// are stale, when the speed layer lags, when PostgreSQL cannot be
    /// reached. Runs as role ops_watchdog, until SIGTERM.
    Watchdog {
        #[command(flatten)]
        notify: platform::notify::WebhookArgs,
        /// How often to check.
        #[arg(long, env = "WATCHDOG_CHECK_EVERY", default_value = "15s", value_parser = humantime::parse_duration)]
        check_every: Duration,
        /// A heartbeat older than this is a silent process (they beat every 15 s by default).
        #[arg(long, env = "WATCHDOG_SILENT_AFTER", default_value = "1m", value_parser = humantime::parse_duration)]
        silent_after: Duration,
        /// No successful batch run for this long is stale views.
        #[arg(long, env = "WATCHDOG_BATCH_STALE_AFTER", default_value = "75m", value_parser = humantime::parse_duration)]
        batch_stale_after: Duration,
        /// Records the speed layer may be behind before it is lagging.
        #[arg(long, env = "WATCHDOG_SPEED_LAG_BOUND", default_value_t = 1_000_000)]
        speed_lag_bound: i64,
        /// Where its own /metrics, /healthz and /readyz listen.
        #[arg(long, env = "WATCHDOG_OPS_ADDR", default_value = "127.0.0.1:9105")]
        ops_addr: SocketAddr,
    },
    /// API keys for the serving edge (run as the schema owner).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Replace the imported model recommendations with a Parquet file's
    /// (columns user_id, product_id, score and optionally rank), atomically.
    ImportRecommendations {
        /// The Parquet file.
        file: PathBuf,
        /// Version label of the model that produced the file.
        #[arg(long)]
        model_version: String,
        /// How long the rows are served (e.g. 7d, 36h). Past that, users
        /// get recommendations from live signals again until the next
        /// import: a model nobody refreshes stops overriding what they do.
        #[arg(long, default_value = crate::models::DEFAULT_VALIDITY, value_parser = humantime::parse_duration)]
        valid_for: Duration,
        /// Secret (at least 16 characters) that `batch-layer forget-user`
        /// hashed forgotten user ids with: their rows are left out. Needed
        /// once any user is forgotten.
        #[arg(long, env = "FORGET_KEY", hide_env_values = true)]
        forget_key: Option<String>,
    },
    /// Write the top k recommendations of every user the platform knows
    /// (or of --users-file) in bulk, the lists the API answers: to a Parquet
    /// or CSV file (--out), or into a table of the shop's database (--table),
    /// replaced whole. Columns: user_id, rank, product_id, score, source,
    /// model_version, generated_at.
    ExportRecommendations {
        /// File to write (`.parquet` or `.csv`), replaced whole.
        #[arg(long, conflicts_with = "table", required_unless_present = "table")]
        out: Option<PathBuf>,
        /// Table to replace in the shop's database, e.g. shop.recommendations
        /// (created when missing).
        #[arg(long)]
        table: Option<String>,
        /// The shop's database, for --table.
        #[arg(long, env = "SALES_DATABASE_URL", hide_env_values = true, default_value = shared_schema::defaults::SALES_DATABASE_URL)]
        sales_database_url: String,
        /// Products per user (1 to 100).
        #[arg(long, default_value_t = crate::recommend::DEFAULT_K)]
        k: u32,
        /// Only these users, one id per line.
        #[arg(long, value_name = "PATH")]
        users_file: Option<PathBuf>,
        /// Users computed at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print it (the only time it is shown; only its hash is stored).
    Create {
        /// What the key may read: `recommendations` or `dashboard`.
        #[arg(long)]
        scope: String,
        /// Who or what holds it, for `keys list`.
        #[arg(long)]
        name: String,
    },
    /// Revoke a key by id: refused by every `serve` within 10 s.
    Revoke {
        /// The key's id (`keys list`; the number in `lk_<id>_…`).
        key_id: i64,
    },
    /// List the keys (ids, names, scopes, never the secrets).
    List,
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Migrate { segment_size, views_dir, drop_removed_views } => {
            let views = platform::views::load_folder(&views_dir)?;
            let pool = platform::db::connect(&cli.database_url, 2, Duration::from_secs(30)).await?;
            let (deployment, changes) =
                platform::db::migrate_with(&pool, segment_size, &views, drop_removed_views).await?;
            for line in changes.lines() {
                println!("{line}");
            }
            tracing::info!(segment_size = deployment.segment_size.get(), views = views.len(), "schema is up to date");
            Ok(())
        }
        Command::Serve {
            addr,
            budget,
            popular_refresh,
            max_connections,
            recommender_database_url,
            dashboard_database_url,
            ops_addr,
            rate_limit,
            session_secret,
            cors_origins,
            currency,
        } => {
            let Some(currency) = crate::server::Currency::parse(&currency) else {
                anyhow::bail!(
                    "--currency must be an ISO 4217 code of three capital letters, e.g. EUR, not {currency:?}"
                );
            };
            if !(rate_limit.is_finite() && rate_limit > 0.0) {
                anyhow::bail!("--rate-limit must be a positive number of requests per second, e.g. 50");
            }
            if session_secret.as_ref().is_some_and(|s| s.chars().count() < 16) {
                anyhow::bail!("SERVING_SESSION_SECRET must be at least 16 characters, e.g. `openssl rand -hex 32`");
            }
            if let Some(bad) = cors_origins.iter().find(|o| !(o.starts_with("https://") || o.starts_with("http://"))) {
                anyhow::bail!("--cors-origins takes origins such as https://shop.example.com, not {bad:?}");
            }
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
            let config = ServeConfig {
                addr,
                recommender_url: recommender_database_url.unwrap_or_else(|| cli.database_url.clone()),
                dashboard_url: dashboard_database_url.unwrap_or(cli.database_url),
                budget,
                popular_refresh,
                max_connections,
                ops_addr,
                rate_limit,
                session_secret,
                cors_origins,
                currency,
            };
            server::run(config, shutdown).await?;
            tracing::info!("stopped");
            Ok(())
        }
        Command::Watchdog { notify, check_every, silent_after, batch_stale_after, speed_lag_bound, ops_addr } => {
            if check_every.is_zero() || silent_after.is_zero() || batch_stale_after.is_zero() {
                anyhow::bail!("--check-every, --silent-after and --batch-stale-after must be positive, e.g. 15s");
            }
            let config = crate::watchdog::WatchdogConfig {
                database_url: cli.database_url,
                webhook: notify.webhook()?,
                check_every,
                silent_after,
                batch_stale_after,
                speed_lag_bound,
            };
            let shutdown = platform::shutdown::on_signals();
            let ready = platform::ops_http::Readiness::default();
            platform::ops_http::serve_for_command(ops_addr, ready.clone(), shutdown.clone(), "WATCHDOG_OPS_ADDR")
                .await?;
            crate::watchdog::run(config, ready, shutdown).await;
            Ok(())
        }
        Command::Keys { command } => {
            let pool = platform::db::connect(&cli.database_url, 1, Duration::from_secs(30)).await?;
            platform::db::check(&pool).await?;
            match command {
                KeysCommand::Create { scope, name } => {
                    let scope = crate::auth::Scope::parse(&scope).ok_or_else(|| {
                        anyhow::anyhow!("--scope must be recommendations or dashboard, got {scope:?}")
                    })?;
                    let key = crate::auth::create_key(&pool, &name, scope).await?;
                    eprintln!("key {} ({}) for {name}; shown once, keep it secret:", key.key_id, scope.as_str());
                    println!("{}", key.key);
                }
                KeysCommand::Revoke { key_id } => {
                    if !crate::auth::revoke_key(&pool, key_id).await? {
                        anyhow::bail!("no active key {key_id}: see `serving-layer keys list`");
                    }
                    println!("revoked key {key_id}");
                }
                KeysCommand::List => {
                    for k in crate::auth::list_keys(&pool).await? {
                        let state =
                            k.revoked_at.map_or("active".to_string(), |at| format!("revoked {}", at.to_rfc3339()));
                        println!("{}\t{}\t{}\t{}\t{state}", k.key_id, k.scope, k.name, k.created_at.to_rfc3339());
                    }
                }
            }
            Ok(())
        }
        Command::ExportRecommendations { out, table, sales_database_url, k, users_file, concurrency } => {
            let k = crate::recommend::K::new(k)
                .ok_or_else(|| anyhow::anyhow!("--k must be from 1 to {}, e.g. --k 10", crate::recommend::MAX_K))?;
            let target = match (out, table) {
                (Some(out), _) => crate::export::Target::file(out)?,
                (None, Some(table)) => crate::export::Target::table(sales_database_url, table)?,
                (None, None) => anyhow::bail!("say where to write: --out FILE.parquet|.csv or --table NAME"),
            };
            let users = users_file.as_deref().map(crate::export::read_users).transpose()?;
            let pool =
                platform::db::connect(&cli.database_url, concurrency.max(1) as u32, Duration::from_secs(30)).await?;
            platform::db::check(&pool).await?;
            let s = crate::export::export(&pool, k, users, concurrency, &target).await?;
            let sources: Vec<String> = s.by_source.iter().map(|(source, n)| format!("{n} {source}")).collect();
            let place = match &target {
                crate::export::Target::Parquet(p) | crate::export::Target::Csv(p) => p.display().to_string(),
                crate::export::Target::Table { table, .. } => format!("table {table} of the shop's database"),
            };
            println!(
                "exported {} recommendations for {} users ({}) generated at {} to {place}",
                s.rows,
                s.users,
                sources.join(", "),
                s.generated_at.to_rfc3339()
            );
            Ok(())
        }
        Command::ImportRecommendations { file, model_version, valid_for, forget_key } => {
            let key = platform::forgotten::ForgetKey::optional(forget_key.as_deref())?;
            crate::models::check_validity(valid_for)?;
            let pool = platform::db::connect(&cli.database_url, 2, Duration::from_secs(30)).await?;
            platform::db::check(&pool).await?;
            let summary = crate::models::import(&pool, &file, &model_version, valid_for, key.as_ref()).await?;
            tracing::info!(
                file = %file.display(),
                model_version,
                rows = summary.rows,
                users = summary.users,
                dropped_rows = summary.dropped_rows,
                dropped_users = summary.dropped_users,
                valid_until = %summary.valid_until,
                "imported model recommendations"
            );
            println!(
                "imported {} recommendations for {} users as model {model_version}, served until {}; left out {} rows of {} forgotten users",
                summary.rows,
                summary.users,
                summary.valid_until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                summary.dropped_rows,
                summary.dropped_users
            );
            Ok(())
        }
    }
}
