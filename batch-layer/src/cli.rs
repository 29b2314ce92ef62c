//! Command line of `batch-layer`.

use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::ingest::{self, IngestConfig};
use crate::lake::Lake;
use crate::recompute::{self, RunConfig, RunOutcome};

/// Batch layer of the Lambda data platform: the lake and the exact recompute.
#[derive(Debug, Parser)]
#[command(name = "batch-layer", version, about)]
pub struct Cli {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = shared_schema::defaults::KAFKA_BROKERS, global = true)]
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
        #[arg(long, env = "EVENTS_TOPIC", default_value = shared_schema::defaults::EVENTS_TOPIC)]
        topic: String,
        /// Flush at the latest this long after the first buffered record (e.g. 60s, 5s).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        flush_interval: Duration,
        /// Flush as soon as this many records are buffered.
        #[arg(long, default_value_t = 200_000)]
        flush_records: usize,
        /// Flush as soon as the buffered records hold this many MiB (memory
        /// stays bounded whatever the records' size).
        #[arg(long, default_value_t = 64)]
        flush_mib: usize,
        /// Exit once every partition is read to its end as of the start.
        #[arg(long)]
        until_caught_up: bool,
        /// Platform database (the ingest reads the forgotten users from it).
        #[arg(long, env = "DATABASE_URL", hide_env_values = true, default_value = shared_schema::defaults::DATABASE_URL)]
        database_url: String,
        #[command(flatten)]
        forget: ForgetKeyArgs,
        #[command(flatten)]
        notify: platform::notify::WebhookArgs,
        /// Where /metrics, /healthz and /readyz listen while the ingest runs
        /// (not with --until-caught-up).
        #[arg(long, env = "INGEST_OPS_ADDR", default_value = "127.0.0.1:9103")]
        ops_addr: std::net::SocketAddr,
        #[command(flatten)]
        heartbeat: platform::heartbeat::HeartbeatArgs,
    },
    /// Recompute the views from the lake and publish them with their offset cut,
    /// atomically: incremental by default (only the hours new events touched),
    /// everything with --full; quality checks gate the publish.
    Run {
        #[command(flatten)]
        run: RunArgs,
        /// Recompute every hour, not only those new events touched (also when the lake is unchanged).
        #[arg(long)]
        full: bool,
        /// Publish although the lake misses records Kafka gave it (the
        /// reconciliation failed and they cannot be re-ingested): the
        /// reason is recorded, and only a further loss stops a run again.
        #[arg(long, value_name = "REASON")]
        accept_lake_loss: Option<String>,
    },
    /// Recover after a loss, in one step: bring the lake up to Kafka (an
    /// empty --lake-uri is rebuilt from the start of each partition), then
    /// recompute and publish every view and batch table from it (a full run).
    /// Stop the ingest, the schedule and the speed layer first; start them
    /// after. PostgreSQL lost: create the database and run `serving-layer
    /// migrate` before (and restore `ops.forgotten_users`).
    Recover {
        #[command(flatten)]
        run: RunArgs,
        /// Flush the ingest once this many records are buffered.
        #[arg(long, default_value_t = 200_000)]
        flush_records: usize,
        /// Take the lake as it is, without reading Kafka (the broker is
        /// away, or the lake is known to be caught up).
        #[arg(long)]
        skip_ingest: bool,
        #[command(flatten)]
        forget: ForgetKeyArgs,
    },
    /// Run `run` on a schedule until SIGTERM: every period aligned to the clock
    /// (--every 1h runs at :00), or at the times of a cron expression (UTC).
    Schedule {
        /// The period between runs (e.g. 1h, 15m).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration, conflicts_with = "cron")]
        every: Duration,
        /// A cron expression instead of --every, 5 fields (minute hour day month weekday), e.g. "5 * * * *".
        #[arg(long, value_parser = parse_cron)]
        cron: Option<Box<croner::Cron>>,
        #[command(flatten)]
        run: RunArgs,
        /// Maintain the lake (see `maintain`) after a run once this long
        /// has passed since the last maintenance; 0s never.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        maintain_every: Duration,
        #[command(flatten)]
        maintain: MaintainArgs,
        /// Where /metrics, /healthz and /readyz listen.
        #[arg(long, env = "SCHEDULE_OPS_ADDR", default_value = "127.0.0.1:9104")]
        ops_addr: std::net::SocketAddr,
        #[command(flatten)]
        heartbeat: platform::heartbeat::HeartbeatArgs,
    },
    /// Keep the lake fast as it ages: compact the closed hours' small files
    /// (one per ingest flush) into few, checkpoint the log, and remove
    /// replaced files and log entries past the retention. `schedule` runs it
    /// too (--maintain-every). Safe to re-run and to run while the ingest
    /// writes.
    Maintain {
        #[command(flatten)]
        maintain: MaintainArgs,
        /// Platform database (for the lake fence `forget-user` takes).
        #[arg(long, env = "DATABASE_URL", hide_env_values = true, default_value = shared_schema::defaults::DATABASE_URL)]
        database_url: String,
    },
    /// Forget users (GDPR right to erasure): delete their rows from the lake
    /// (Delta delete, then vacuum), from registered training exports and from
    /// every table with a user column, record only a keyed hash of each id,
    /// keep them out of every later write, verify, and report when Kafka's
    /// copies age out. Safe to re-run.
    ForgetUser {
        /// File with the user ids as the shop sends them, one per line; `-`
        /// reads standard input. (Never ids on the command line: they would
        /// stay in shell history and process lists.)
        #[arg(long, value_name = "PATH")]
        ids_file: Option<std::path::PathBuf>,
        /// Refused: see --ids-file.
        #[arg(hide = true)]
        user_id: Option<String>,
        /// Topics whose retention says when Kafka's copies age out.
        #[arg(long, value_delimiter = ',', default_value = "events,events.dlq", env = "FORGET_TOPICS")]
        topics: Vec<String>,
        /// Platform database.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true, default_value = shared_schema::defaults::DATABASE_URL)]
        database_url: String,
        #[command(flatten)]
        forget: ForgetKeyArgs,
        /// Lake files no commit references are removed once older than this
        /// (younger ones may be a running ingest's, not yet committed).
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        orphan_grace: Duration,
    },
    /// Re-inject the records rejected for one reason (from the lake's
    /// events_rejected, the durable copy of the DLQ) into the events topic,
    /// once the contract or the sender is fixed: only records the contract
    /// now accepts, each at most once (ops.dlq_replays), with a summary.
    ReplayDlq {
        /// The rejection reason to replay, e.g. future_event_time.
        #[arg(long)]
        reason: String,
        /// Only records rejected at or after this time (RFC 3339, or a date).
        #[arg(long, value_parser = parse_time)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Topic to send them to.
        #[arg(long, env = "EVENTS_TOPIC", default_value = shared_schema::defaults::EVENTS_TOPIC)]
        topic: String,
        /// Platform database (ops.dlq_replays).
        #[arg(long, env = "DATABASE_URL", hide_env_values = true, default_value = shared_schema::defaults::DATABASE_URL)]
        database_url: String,
    },
    /// Check the view files (one SQL file per view, see docs/VIEWS.md) as the
    /// layers will run them, before `serving-layer migrate` registers them.
    Views {
        #[command(subcommand)]
        command: ViewsCommand,
    },
    /// Write the recommender's training data (per user and product, the
    /// interactions before --as-of, forgotten users left out) as Parquet,
    /// with a manifest, into an empty folder, registered in ops.training_exports.
    ExportTraining {
        /// Platform database (the export is registered there; forgotten users are read from it).
        #[arg(long, env = "DATABASE_URL", hide_env_values = true, default_value = shared_schema::defaults::DATABASE_URL)]
        database_url: String,
        #[command(flatten)]
        forget: ForgetKeyArgs,
        /// Output folder (created if missing; must be empty).
        #[arg(long)]
        out: std::path::PathBuf,
        /// Only interactions strictly before this time (RFC 3339, or a date
        /// meaning its midnight UTC); default: now, or --received-by.
        #[arg(long, value_parser = parse_time)]
        as_of: Option<chrono::DateTime<chrono::Utc>>,
        /// Cut by arrival: only what the lake had committed by this time, so
        /// an event that arrived later cannot leak in, whatever its time.
        #[arg(long, value_parser = parse_time, conflicts_with = "version")]
        received_by: Option<chrono::DateTime<chrono::Utc>>,
        /// Read this lake version (a manifest's delta_version) to reproduce
        /// an earlier export.
        #[arg(long)]
        version: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ViewsCommand {
    /// Parse every file, derive its keys, measures and merge rules, refuse
    /// what cannot be merged exactly (one line each: file:line:column:
    /// reason), and plan each view in DataFusion.
    Check {
        /// The views folder.
        #[arg(long, env = "VIEWS_DIR", default_value = "views")]
        views_dir: std::path::PathBuf,
    },
}

/// The secret that hashes forgotten user ids (`forget-user`, the ingest and
/// the speed layer must share it).
#[derive(Debug, clap::Args)]
pub struct ForgetKeyArgs {
    /// Secret (at least 16 characters) for the keyed hash of forgotten user
    /// ids; needed once any user is forgotten.
    #[arg(long = "forget-key", env = "FORGET_KEY", hide_env_values = true)]
    key: Option<String>,
}

impl ForgetKeyArgs {
    fn optional(&self) -> anyhow::Result<Option<platform::forgotten::ForgetKey>> {
        Ok(platform::forgotten::ForgetKey::optional(self.key.as_deref())?)
    }

    fn required(&self) -> anyhow::Result<platform::forgotten::ForgetKey> {
        self.optional()?.ok_or_else(|| platform::forgotten::ForgetError::NoKey.into())
    }
}

fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.to_utc());
    }
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map(|d| d.and_time(chrono::NaiveTime::MIN).and_utc())
        .map_err(|_| "expected a time like 2026-11-25T12:00:00Z or a date like 2026-11-25".to_string())
}

/// What every batch run needs, for `run` and `schedule` alike.
#[derive(Debug, clap::Args)]
pub struct MaintainArgs {
    /// Compact an hour's files once the hour ended this long ago (late
    /// events may still add a file; the next maintenance takes it in).
    #[arg(long, default_value = "2h", value_parser = humantime::parse_duration)]
    pub closed_after: Duration,
    /// Keep replaced data files and log entries this long (at least 1h: a
    /// running batch run may still read a file compaction replaced).
    #[arg(long, default_value = "7days", value_parser = humantime::parse_duration)]
    pub retention: Duration,
}

impl MaintainArgs {
    pub fn config(&self, lake_uri: &str) -> anyhow::Result<crate::maintain::MaintainConfig> {
        if self.retention < Duration::from_secs(3600) {
            anyhow::bail!(
                "--retention must be at least 1h (a running batch run may still read the files it would remove), e.g. --retention 7days"
            );
        }
        Ok(crate::maintain::MaintainConfig {
            closed_after: self.closed_after,
            retention: self.retention,
            ..crate::maintain::MaintainConfig::new(Lake::parse(lake_uri)?)
        })
    }
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Platform database.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, default_value = shared_schema::defaults::DATABASE_URL)]
    database_url: String,
    /// Topic whose offsets the lake records.
    #[arg(long, env = "EVENTS_TOPIC", default_value = shared_schema::defaults::EVENTS_TOPIC)]
    topic: String,
    /// Largest accepted drop of a view's row count against the last
    /// published run, as a fraction (0.5 = half).
    #[arg(long, default_value_t = 0.5)]
    max_shrink: f64,
    /// Notify of a complete hour whose events fall below this fraction of
    /// its baseline (the median of the same hour on up to seven earlier
    /// days, at least three), or that has none (0 turns the check off).
    #[arg(long, default_value_t = crate::findings::DEFAULT_VOLUME_FLOOR)]
    volume_floor: f64,
    /// Notify of a complete hour in which more than this share of the
    /// events name a product the catalog does not know (1 turns it off).
    #[arg(long, default_value_t = crate::findings::DEFAULT_UNKNOWN_PRODUCTS)]
    max_unknown_products: f64,
    /// Recompute the windowed tables (demand baseline, item similarity) in an
    /// incremental run once they are this old (a full run always does).
    #[arg(long, default_value = "6h", value_parser = humantime::parse_duration)]
    model_refresh: Duration,
    /// Fold the user-product state's new records into `batch.*` at least
    /// this often; until then an incremental run leaves them to the speed
    /// layer, which holds them (only while it does; `0s`: every run folds).
    #[arg(long, default_value = "6h", value_parser = humantime::parse_duration)]
    fold_every: Duration,
    #[command(flatten)]
    catalog: CatalogArgs,
    #[command(flatten)]
    notify: platform::notify::WebhookArgs,
    /// Where the SQL runs: `local` (in this process) or `ballista://HOST:PORT`
    /// (a Ballista scheduler: `batch-cluster scheduler`; `make cluster-up` starts one
    /// on 127.0.0.1:50050).
    #[arg(long, env = "BATCH_ENGINE", default_value = "local")]
    engine: String,
}

impl RunArgs {
    fn config(self, lake_uri: &str, full: bool) -> anyhow::Result<RunConfig> {
        if !(0.0..=1.0).contains(&self.max_shrink) {
            anyhow::bail!("--max-shrink must be between 0 and 1, got {}", self.max_shrink);
        }
        if !(0.0..=1.0).contains(&self.volume_floor) {
            anyhow::bail!("--volume-floor must be between 0 and 1, got {}", self.volume_floor);
        }
        if !(0.0..=1.0).contains(&self.max_unknown_products) {
            anyhow::bail!("--max-unknown-products must be between 0 and 1, got {}", self.max_unknown_products);
        }
        Ok(RunConfig {
            max_shrink: self.max_shrink,
            findings: crate::findings::Thresholds {
                volume_floor: self.volume_floor,
                max_unknown_products: self.max_unknown_products,
            },
            full,
            sales_database_url: self.catalog.url(),
            model_refresh: self.model_refresh,
            fold_every: self.fold_every,
            notify_webhook: self.notify.webhook()?,
            progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            engine: crate::engine::Engine::parse(&self.engine)?,
            ..RunConfig::new(self.database_url, Lake::parse(lake_uri)?, self.topic)
        })
    }
}

fn parse_cron(s: &str) -> Result<Box<croner::Cron>, String> {
    s.parse::<croner::Cron>()
        .map(Box::new)
        .map_err(|e| format!("{e} (expected 5 fields: minute hour day month weekday)"))
}

/// Where each run snapshots the product catalog from.
#[derive(Debug, clap::Args)]
pub struct CatalogArgs {
    /// The shop's database (its `products` table is snapshotted read-only into the lake).
    #[arg(long, env = "SALES_DATABASE_URL", hide_env_values = true, default_value = shared_schema::defaults::SALES_DATABASE_URL)]
    sales_database_url: String,
    /// Do not snapshot the catalog.
    #[arg(long)]
    no_catalog: bool,
}

impl CatalogArgs {
    fn url(self) -> Option<String> {
        (!self.no_catalog).then_some(self.sales_database_url)
    }
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let shutdown = platform::shutdown::on_signals();
    match cli.command {
        Command::Ingest {
            topic,
            flush_interval,
            flush_records,
            flush_mib,
            until_caught_up,
            database_url,
            forget,
            notify,
            ops_addr,
            heartbeat,
        } => {
            if flush_records == 0 {
                anyhow::bail!("--flush-records must be at least 1");
            }
            if flush_mib == 0 || flush_mib > 16 * 1024 {
                anyhow::bail!("--flush-mib must be from 1 to 16384, e.g. 64");
            }
            let heartbeat_every = heartbeat.every()?;
            let heartbeat_url = database_url.clone();
            let db = ingest::PlatformDb { database_url, key: forget.optional()?, notify_webhook: notify.webhook()? };
            let config = IngestConfig {
                brokers: cli.brokers,
                topic,
                lake: Lake::parse(&cli.lake_uri)?,
                flush_interval,
                flush_records,
                flush_bytes: flush_mib << 20,
                until_caught_up,
                show_progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
                db: Some(db),
                ready: None,
            };
            // A long-running ingest is watched like the speed layer (and
            // beats for the watchdog); a catch-up is a one-off.
            let (config, heartbeat) = if until_caught_up {
                (config, None)
            } else {
                let ready = platform::ops_http::Readiness::default();
                platform::ops_http::serve_for_command(ops_addr, ready.clone(), shutdown.clone(), "INGEST_OPS_ADDR")
                    .await?;
                let (_, beats) =
                    platform::heartbeat::start(&heartbeat_url, "batch-ingest", heartbeat_every, shutdown.clone())
                        .await?;
                (IngestConfig { ready: Some(ready), ..config }, Some(beats))
            };
            let s = ingest::run(config, shutdown.clone()).await;
            if let Some(beats) = heartbeat {
                // A clean stop is marked as such; a failure leaves the
                // heartbeat to go stale, so the watchdog tells someone.
                if s.is_ok() {
                    shutdown.cancel();
                    let _ = beats.await;
                } else {
                    beats.abort();
                }
            }
            let s = s?;
            println!(
                "ingest: {} records read, {} events and {} rejected records committed in {} Delta commits; next offsets {:?}",
                s.records, s.events, s.rejected, s.commits, s.offsets
            );
            if s.gap_records > 0 {
                println!(
                    "ingest: stepped over {} offsets that hold no record (retention, compaction or transaction markers); see ops.offset_gaps",
                    s.gap_records
                );
            }
            Ok(())
        }
        Command::Recover { run, flush_records, skip_ingest, forget } => {
            if flush_records == 0 {
                anyhow::bail!("--flush-records must be at least 1");
            }
            let run = run.config(&cli.lake_uri, true)?;
            let db = ingest::PlatformDb {
                database_url: run.database_url.clone(),
                key: forget.optional()?,
                notify_webhook: run.notify_webhook.clone(),
            };
            let ingest = IngestConfig {
                brokers: cli.brokers,
                topic: run.topic.clone(),
                lake: run.lake.clone(),
                flush_interval: Duration::from_secs(60),
                flush_records,
                flush_bytes: 64 << 20,
                until_caught_up: true,
                show_progress: run.progress,
                db: Some(db),
                ready: None,
            };
            let ingest = (!skip_ingest).then_some(ingest);
            let report = crate::recover::recover(ingest, run, shutdown).await?;
            println!("{}", report.summary());
            Ok(())
        }
        Command::Run { run, full, accept_lake_loss } => {
            let config = RunConfig { accept_lake_loss, ..run.config(&cli.lake_uri, full)? };
            match recompute::run(&config).await? {
                published @ RunOutcome::Published { .. } => {
                    println!("{}", crate::recompute::summary(&published));
                    Ok(())
                }
                unchanged @ RunOutcome::Unchanged { .. } => {
                    println!("{}", crate::recompute::summary(&unchanged));
                    Ok(())
                }
                RunOutcome::Rejected { run_id, report } => {
                    anyhow::bail!(
                        "run {run_id} failed its quality checks and published nothing ({}); the last good views keep serving",
                        report.summary()
                    )
                }
                RunOutcome::Busy => {
                    anyhow::bail!("another batch run holds the lock; nothing published (wait for it to finish)")
                }
            }
        }
        Command::ForgetUser { ids_file, user_id, topics, database_url, forget, orphan_grace } => {
            if user_id.is_some() {
                anyhow::bail!(
                    "user ids are not taken on the command line (they would stay in shell history and process lists): put them in a file, one per line, and pass --ids-file FILE (or --ids-file - to read standard input)"
                );
            }
            let Some(ids_file) = ids_file else {
                anyhow::bail!(
                    "give the users to forget with --ids-file FILE (one id per line; - reads standard input)"
                );
            };
            let ids = crate::forget::read_ids(&ids_file)
                .map_err(|e| anyhow::anyhow!("reading the ids from {}: {e}", ids_file.display()))?;
            let config = crate::forget::ForgetConfig {
                database_url,
                lake: Lake::parse(&cli.lake_uri)?,
                key: forget.required()?,
                orphan_grace,
                kafka: Some(crate::forget::TopicsConfig { brokers: cli.brokers.clone(), topics }),
            };
            let report = crate::forget::forget_users(&config, &ids).await?;
            println!("{}", report.summary());
            Ok(())
        }
        Command::ReplayDlq { reason, since, topic, database_url } => {
            if shared_schema::RejectReason::ALL.iter().all(|r| r.as_str() != reason) {
                let known: Vec<&str> = shared_schema::RejectReason::ALL.iter().map(|r| r.as_str()).collect();
                anyhow::bail!("--reason {reason:?} is not a rejection reason; one of {}", known.join(", "));
            }
            if reason == shared_schema::RejectReason::DuplicateEvent.as_str() {
                anyhow::bail!("duplicates are not replayed: the first copy of each was counted; pick another --reason");
            }
            let pool = platform::db::connect(&database_url, 2, Duration::from_secs(30)).await?;
            platform::db::check(&pool).await?;
            let summary = crate::replay::replay(
                &Lake::parse(&cli.lake_uri)?,
                &pool,
                &cli.brokers,
                &topic,
                &reason,
                since,
                std::io::IsTerminal::is_terminal(&std::io::stderr()),
            )
            .await?;
            println!("{}", summary.line(&reason, &topic));
            Ok(())
        }
        Command::ExportTraining { out, as_of, received_by, version, database_url, forget } => {
            let as_of = as_of.or(received_by).unwrap_or_else(chrono::Utc::now);
            let snapshot = match (version, received_by) {
                (Some(v), _) => crate::export::Snapshot::Version(v),
                (None, Some(t)) => crate::export::Snapshot::ReceivedBy(t),
                (None, None) => crate::export::Snapshot::Latest,
            };
            let pool = platform::db::connect(&database_url, 2, Duration::from_secs(30)).await?;
            platform::db::check(&pool).await?;
            let key = forget.optional()?;
            let lake = Lake::parse(&cli.lake_uri)?;
            let m = crate::export::run_at(&lake, &out, as_of, snapshot, &pool, key.as_ref()).await?;
            let (events, sessions) = m.sessions.as_ref().map_or((0, 0), |s| (s.rows, s.sessions));
            println!(
                "exported {} interactions of {} users with {} products, and {events} events in {sessions} sessions, before {} (lake version {}) to {}; see {}",
                m.rows,
                m.users,
                m.products,
                m.as_of.to_rfc3339(),
                m.delta_version,
                out.display(),
                out.join(crate::export::MANIFEST_FILE).display()
            );
            Ok(())
        }
        Command::Views { command: ViewsCommand::Check { views_dir } } => {
            let lines = crate::view_files::check(&views_dir).await?;
            for line in &lines {
                println!("{line}");
            }
            println!("{} views in {}: each can be merged exactly", lines.len(), views_dir.display());
            Ok(())
        }
        Command::Maintain { maintain, database_url } => {
            let config = maintain.config(&cli.lake_uri)?;
            let pool = platform::db::connect(&database_url, 2, Duration::from_secs(30)).await?;
            for t in crate::maintain::maintain(&config, &pool, chrono::Utc::now()).await? {
                println!(
                    "{}: {} closed partitions compacted ({} files into {}), {} files now; {} log entries and {} replaced files removed",
                    t.table, t.partitions, t.files_removed, t.files_added, t.files, t.logs_removed, t.files_vacuumed
                );
            }
            Ok(())
        }
        Command::Schedule { every, cron, run, maintain_every, maintain, ops_addr, heartbeat } => {
            if every < Duration::from_secs(1) {
                anyhow::bail!("--every must be at least 1s, e.g. --every 1h");
            }
            let config = run.config(&cli.lake_uri, false)?;
            let maintenance = (!maintain_every.is_zero())
                .then(|| maintain.config(&cli.lake_uri))
                .transpose()?
                .map(|config| crate::schedule::Maintenance { config, every: maintain_every });
            let timing = match cron {
                Some(cron) => crate::schedule::Timing::Cron(cron),
                None => crate::schedule::Timing::Every(every),
            };
            let ready = platform::ops_http::Readiness::default();
            platform::ops_http::serve_for_command(ops_addr, ready.clone(), shutdown.clone(), "SCHEDULE_OPS_ADDR")
                .await?;
            let (pool, beats) = platform::heartbeat::start(
                &config.database_url,
                "batch-schedule",
                heartbeat.every()?,
                shutdown.clone(),
            )
            .await?;
            crate::schedule::run(config, timing, maintenance, &pool, ready, shutdown.clone()).await;
            shutdown.cancel();
            let _ = beats.await;
            Ok(())
        }
    }
}
