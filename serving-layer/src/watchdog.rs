//! `serving-layer watchdog`: dead-man alerts that do not depend on the dead
//! process. A small process of its own, under role `ops_watchdog`, checks
//! every few seconds and notifies (webhook and `ops.notifications`) once
//! when a condition starts and once when it ends:
//!
//! | kind | condition |
//! | --- | --- |
//! | `process_silent` / `process_recovered` | a process's heartbeat (`ops.heartbeats`) is older than `--silent-after` (a process stopped cleanly is not missed) |
//! | `batch_stale` / `batch_fresh` | no successful batch run for `--batch-stale-after` (75 minutes: the dashboards' one-hour promise) |
//! | `speed_lag_high` / `speed_lag_normal` | the speed layer is more than `--speed-lag-bound` records behind |
//! | `postgres_unreachable` / `postgres_reachable` | two checks in a row cannot read PostgreSQL (then the webhook is all there is) |

use std::collections::BTreeMap;
use std::time::Duration;

use platform::notify::{Notification, Notifier, NotifyConfig, Severity, Webhook};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// What the watchdog watches and how strictly.
#[derive(Debug, Clone)]
pub struct WatchdogConfig {
    pub database_url: String,
    pub webhook: Option<Webhook>,
    pub check_every: Duration,
    pub silent_after: Duration,
    pub batch_stale_after: Duration,
    pub speed_lag_bound: i64,
}

/// One condition at one check: its key, whether it is bad, and the
/// notification for either way.
struct Condition {
    key: String,
    bad: bool,
    raised: Notification,
    cleared: Notification,
}

fn condition(key: String, bad: bool, raised: Notification, cleared: Notification) -> Condition {
    Condition { key, bad, raised, cleared }
}

/// Everything observable through PostgreSQL at one check.
async fn observe(pool: &PgPool, config: &WatchdogConfig) -> Result<Vec<Condition>, sqlx::Error> {
    let mut out = Vec::new();
    let beats: Vec<(String, String, f64, bool)> = sqlx::query_as(
        "SELECT process, instance, extract(epoch FROM now() - beat_at)::float8, stopped_at IS NOT NULL
         FROM ops.heartbeats ORDER BY process, instance",
    )
    .fetch_all(pool)
    .await?;
    let limit = config.silent_after.as_secs_f64();
    for (process, instance, age, stopped) in beats {
        let details = json!({ "process": process, "instance": instance, "silent_seconds": age.round() });
        out.push(condition(
            format!("heartbeat/{process}/{instance}"),
            !stopped && age > limit,
            Notification::new(
                "process_silent",
                Severity::Critical,
                format!("{process} on {instance} has not beaten for {age:.0} s (limit {limit:.0} s): down or hung"),
                details.clone(),
            ),
            Notification::new(
                "process_recovered",
                Severity::Info,
                format!("{process} on {instance} beats again"),
                details,
            ),
        ));
    }
    let batch_age: Option<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM now() - max(finished_at))::float8 FROM ops.batch_runs
         WHERE status IN ('published', 'unchanged')",
    )
    .fetch_one(pool)
    .await?;
    if let Some(age) = batch_age {
        let limit = config.batch_stale_after.as_secs_f64();
        let details = json!({ "age_seconds": age.round(), "limit_seconds": limit });
        out.push(condition(
            "batch".into(),
            age > limit,
            Notification::new(
                "batch_stale",
                Severity::Critical,
                format!("no successful batch run for {:.0} minutes", age / 60.0),
                details.clone(),
            ),
            Notification::new("batch_fresh", Severity::Info, "a batch run succeeded again", details),
        ));
    }
    let lag: Option<i64> = sqlx::query_scalar(
        "SELECT sum(greatest(end_offset - next_offset, 0))::bigint FROM ops.speed_offsets WHERE end_offset IS NOT NULL",
    )
    .fetch_one(pool)
    .await?;
    if let Some(lag) = lag {
        let details = json!({ "lag_records": lag, "bound": config.speed_lag_bound });
        out.push(condition(
            "speed_lag".into(),
            lag > config.speed_lag_bound,
            Notification::new(
                "speed_lag_high",
                Severity::Warning,
                format!("the speed layer is {lag} records behind (bound {})", config.speed_lag_bound),
                details.clone(),
            ),
            Notification::new("speed_lag_normal", Severity::Info, "the speed layer is within its lag bound", details),
        ));
    }
    Ok(out)
}

/// Checks every `check_every` until `shutdown`.
pub async fn run(config: WatchdogConfig, ready: platform::ops_http::Readiness, shutdown: CancellationToken) {
    // Lazy: a database that is down at start is a condition to report,
    // not a reason not to start.
    let pool = match sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy(&config.database_url)
    {
        Ok(pool) => pool,
        Err(e) => {
            tracing::error!(error = %e, "invalid database URL; the watchdog only reports PostgreSQL unreachable");
            sqlx::postgres::PgPoolOptions::new()
                .connect_lazy("postgres://invalid@127.0.0.1:9/none")
                .expect("a valid URL")
        }
    };
    let notifier = Notifier::spawn(NotifyConfig::new(config.webhook.clone(), "watchdog"), Some(pool.clone()));
    let mut bad: BTreeMap<String, bool> = BTreeMap::new();
    let mut failed_checks = 0u32;
    ready.set(true);
    tracing::info!(every = ?config.check_every, silent_after = ?config.silent_after, "watchdog started");
    loop {
        match observe(&pool, &config).await {
            Ok(conditions) => {
                if failed_checks >= 2 {
                    notifier.send(Notification::new(
                        "postgres_reachable",
                        Severity::Info,
                        "PostgreSQL answers the watchdog again",
                        json!({}),
                    ));
                }
                failed_checks = 0;
                for c in conditions {
                    let was = bad.insert(c.key.clone(), c.bad).unwrap_or(false);
                    if c.bad && !was {
                        tracing::warn!(condition = %c.key, "{}", c.raised.summary);
                        notifier.send(c.raised);
                    } else if !c.bad && was {
                        tracing::info!(condition = %c.key, "{}", c.cleared.summary);
                        notifier.send(c.cleared);
                    }
                }
            }
            Err(e) => {
                failed_checks += 1;
                if failed_checks == 2 {
                    tracing::error!(error = %e, "PostgreSQL cannot be reached");
                    notifier.send(Notification::new(
                        "postgres_unreachable",
                        Severity::Critical,
                        "the watchdog cannot read PostgreSQL: every layer that writes there is stalled or failing",
                        json!({ "error": e.to_string() }),
                    ));
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(config.check_every) => {}
        }
    }
    notifier.flush(Duration::from_secs(10)).await;
    tracing::info!("watchdog stopped");
}
