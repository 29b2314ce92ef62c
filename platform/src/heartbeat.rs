//! Heartbeats: each long-running process (`speed-layer run`, `batch-layer
//! ingest` and `schedule`) writes `ops.heartbeats` every few seconds from a
//! task of its own, so a watchdog in another process
//! (`serving-layer watchdog`) can tell when it falls silent: killed, hung,
//! or cut off from PostgreSQL. On a clean stop the row is marked stopped
//! and the watchdog does not miss it.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// How often the processes beat unless told otherwise.
pub const DEFAULT_EVERY: Duration = Duration::from_secs(15);

/// This machine's name, the default instance of a process.
pub fn host() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()))
        .unwrap_or_else(|| "localhost".into())
}

async fn beat(pool: &PgPool, process: &str, instance: &str, first: bool) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO ops.heartbeats (process, instance) VALUES ($1, $2)
         ON CONFLICT (process, instance) DO UPDATE SET beat_at = now(), stopped_at = NULL,
             started_at = CASE WHEN $3 THEN now() ELSE ops.heartbeats.started_at END",
    )
    .bind(process)
    .bind(instance)
    .bind(first)
    .execute(pool)
    .await
    .map(drop)
}

/// Beats every `every` until `shutdown`, then marks the row stopped. A
/// failed beat is logged once per outage and retried at the next tick.
pub fn spawn(
    pool: PgPool,
    process: &'static str,
    instance: String,
    every: Duration,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut failing = false;
        let mut first = true;
        loop {
            match beat(&pool, process, &instance, first).await {
                Ok(()) => {
                    if failing {
                        tracing::info!(process, "heartbeats are recorded again");
                    }
                    failing = false;
                    first = false;
                }
                Err(e) if !failing => {
                    tracing::warn!(process, error = %e, "cannot record a heartbeat; retrying");
                    failing = true;
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
        }
        let stopped = sqlx::query("UPDATE ops.heartbeats SET stopped_at = now() WHERE process = $1 AND instance = $2")
            .bind(process)
            .bind(&instance)
            .execute(&pool)
            .await;
        if let Err(e) = stopped {
            tracing::warn!(process, error = %e, "cannot mark the heartbeat stopped");
        }
    })
}

/// A small pool of the process's own (its beats do not wait behind its
/// work) and the task beating as `process` on this host; the pool serves
/// the process's other bookkeeping too.
pub async fn start(
    database_url: &str,
    process: &'static str,
    every: Duration,
    shutdown: CancellationToken,
) -> Result<(PgPool, tokio::task::JoinHandle<()>), crate::db::DbError> {
    let pool = crate::db::connect(database_url, 1, Duration::from_secs(30)).await?;
    let task = spawn(pool.clone(), process, host(), every, shutdown);
    Ok((pool, task))
}

/// The heartbeat flag every long-running command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct HeartbeatArgs {
    /// How often this process writes its heartbeat to ops.heartbeats (the
    /// watchdog's evidence that it lives).
    #[arg(long, env = "HEARTBEAT_EVERY", default_value = "15s", value_parser = humantime::parse_duration)]
    pub heartbeat_every: Duration,
}

impl HeartbeatArgs {
    /// The period, refused when zero.
    pub fn every(&self) -> anyhow::Result<Duration> {
        anyhow::ensure!(!self.heartbeat_every.is_zero(), "--heartbeat-every must be positive, e.g. 15s");
        Ok(self.heartbeat_every)
    }
}
