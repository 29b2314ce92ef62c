//! What the speed layer tells operators about itself: stalled or lagging
//! partitions and a high DLQ rate, through [`platform::notify`].
//!
//! Each condition notifies once when it starts and once (as `info`) when
//! it ends, never on every check, so a webhook is not flooded while an
//! outage lasts.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use platform::notify::{Notification, Notifier, Severity};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Thresholds and where to send notifications.
#[derive(Debug, Clone)]
pub struct Alerts {
    /// `NOTIFY_WEBHOOK_URL`; notifications are recorded in `ops.notifications` either way.
    pub notify_webhook: Option<platform::notify::Webhook>,
    /// A partition with records waiting whose offset has not moved for this long is stalled.
    pub stall_after: Duration,
    /// Records waiting in all partitions together above which the layer is lagging.
    pub lag_threshold: i64,
    /// Rejected share of the records of the last minute above which the DLQ rate is high.
    pub dlq_rate_threshold: f64,
    /// Records the last minute must hold before its DLQ rate counts.
    pub dlq_min_records: u64,
    /// How often stall and lag are checked.
    pub check_every: Duration,
}

impl Default for Alerts {
    fn default() -> Self {
        Self {
            notify_webhook: None,
            stall_after: Duration::from_secs(120),
            lag_threshold: 1_000_000,
            dlq_rate_threshold: 0.05,
            dlq_min_records: 100,
            check_every: Duration::from_secs(15),
        }
    }
}

/// Per partition, since when records have waited at an unmoved position.
/// A partition is stalled when that lasts longer than the stall bound:
/// not merely when its position is old, since a partition idle for an hour
/// whose first new record arrived a moment ago has an old position too.
#[derive(Debug, Default)]
pub(crate) struct Waiting(BTreeMap<i32, (i64, DateTime<Utc>)>);

impl Waiting {
    /// Records that `partition` stands at `next` with `lag` records
    /// waiting at `now`; returns since when they have waited there.
    pub(crate) fn observe(&mut self, partition: i32, next: i64, lag: i64, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if lag <= 0 {
            self.0.remove(&partition);
            return None;
        }
        let entry = self.0.entry(partition).or_insert((next, now));
        if entry.0 != next {
            *entry = (next, now);
        }
        Some(entry.1)
    }
}

/// The DLQ rate over a sliding minute.
#[derive(Debug)]
pub(crate) struct DlqRate {
    threshold: f64,
    min_records: u64,
    window: VecDeque<(Instant, u64, u64)>,
    high: bool,
}

impl DlqRate {
    pub(crate) fn new(alerts: &Alerts) -> Self {
        Self {
            threshold: alerts.dlq_rate_threshold,
            min_records: alerts.dlq_min_records,
            window: VecDeque::new(),
            high: false,
        }
    }

    /// Records one flush; returns a notification when the rate crosses the threshold.
    pub(crate) fn observe(&mut self, records: u64, rejected: u64) -> Option<Notification> {
        let now = Instant::now();
        self.window.push_back((now, records, rejected));
        while self.window.front().is_some_and(|(t, _, _)| now.duration_since(*t) > Duration::from_secs(60)) {
            self.window.pop_front();
        }
        let (total, bad) = self.window.iter().fold((0, 0), |(t, b), (_, r, x)| (t + r, b + x));
        if total < self.min_records {
            return None;
        }
        let rate = bad as f64 / total as f64;
        let details = json!({"rate": rate, "threshold": self.threshold, "records": total, "rejected": bad});
        if rate > self.threshold && !self.high {
            self.high = true;
            return Some(Notification::new(
                "dlq_rate_high",
                Severity::Warning,
                format!(
                    "{:.1}% of the records of the last minute were rejected to the DLQ ({bad} of {total})",
                    rate * 100.0
                ),
                details,
            ));
        }
        if rate <= self.threshold && self.high {
            self.high = false;
            return Some(Notification::new(
                "dlq_rate_normal",
                Severity::Info,
                "The DLQ rate is back to normal",
                details,
            ));
        }
        None
    }
}

/// Checks stall and lag every `check_every` until `shutdown`.
pub(crate) async fn watch(
    brokers: String,
    topic: String,
    pool: PgPool,
    alerts: Alerts,
    notifier: Notifier,
    shutdown: CancellationToken,
) {
    let Some(consumer) = crate::lag::metadata_client(&brokers, "stall and lag alerts") else { return };
    let mut waiting = Waiting::default();
    let (mut stalled, mut lagging) = (false, false);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(alerts.check_every) => {}
        }
        let Ok(stored) = crate::offsets::standings(&pool).await else {
            continue; // PostgreSQL away: the flush loop reports it
        };
        let ends = crate::lag::topic_ends(&consumer, &topic).await;
        if ends.is_empty() {
            continue; // broker away: nothing to judge
        }
        let now = Utc::now();
        let stall = chrono::Duration::from_std(alerts.stall_after).unwrap_or(chrono::Duration::MAX);
        let mut total_lag = 0;
        let mut stuck = Vec::new();
        for (p, high) in ends {
            let next = stored.iter().find(|s| s.partition == p).map_or(0, |s| s.next_offset);
            let lag = (high - next).max(0);
            total_lag += lag;
            if let Some(since) = waiting.observe(p, next, lag, now)
                && now - since > stall
            {
                stuck.push(json!({"partition": p, "lag": lag, "since": since}));
            }
        }
        let now_stalled = !stuck.is_empty();
        if now_stalled != stalled {
            stalled = now_stalled;
            notifier.send(if stalled {
                Notification::new(
                    "speed_stalled",
                    Severity::Critical,
                    format!(
                        "The speed layer has not advanced {} partitions with records waiting for over {}s",
                        stuck.len(),
                        alerts.stall_after.as_secs()
                    ),
                    json!({"topic": topic, "partitions": stuck}),
                )
            } else {
                Notification::new(
                    "speed_resumed",
                    Severity::Info,
                    "The speed layer advances again",
                    json!({"topic": topic}),
                )
            });
        }
        if (total_lag > alerts.lag_threshold) != lagging {
            lagging = total_lag > alerts.lag_threshold;
            let details = json!({"topic": topic, "lag": total_lag, "threshold": alerts.lag_threshold});
            notifier.send(if lagging {
                Notification::new(
                    "speed_lagging",
                    Severity::Warning,
                    format!("The speed layer is {total_lag} records behind (threshold {})", alerts.lag_threshold),
                    details,
                )
            } else {
                Notification::new("speed_caught_up", Severity::Info, "The speed layer caught up", details)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dlq_rate_notifies_once_on_each_crossing() {
        let alerts = Alerts { dlq_rate_threshold: 0.1, dlq_min_records: 100, ..Alerts::default() };
        let mut rate = DlqRate::new(&alerts);
        assert!(rate.observe(50, 40).is_none(), "too few records to judge");
        let n = rate.observe(50, 0).expect("40 of 100 is above 10%");
        assert_eq!((n.kind.as_str(), n.severity), ("dlq_rate_high", Severity::Warning));
        assert!(rate.observe(100, 50).is_none(), "still high: no repeat");
        let n = rate.observe(10_000, 0).expect("back below");
        assert_eq!(n.kind, "dlq_rate_normal");
    }

    #[test]
    fn records_wait_from_their_first_sight_at_an_unmoved_position() {
        let t = |s: i64| DateTime::<Utc>::from_timestamp(1_800_000_000 + s, 0).unwrap();
        let mut waiting = Waiting::default();
        assert_eq!(waiting.observe(0, 100, 0, t(0)), None, "nothing waits");
        // Idle for an hour, then records arrive: they wait from now.
        assert_eq!(waiting.observe(0, 100, 5, t(3600)), Some(t(3600)));
        assert_eq!(waiting.observe(0, 100, 9, t(3700)), Some(t(3600)), "still at 100: waiting on");
        assert_eq!(waiting.observe(0, 105, 4, t(3710)), Some(t(3710)), "moved: waits afresh");
        assert_eq!(waiting.observe(0, 109, 0, t(3720)), None, "caught up");
        assert_eq!(waiting.observe(0, 109, 1, t(3800)), Some(t(3800)));
        assert_eq!(waiting.observe(1, 0, 1, t(3800)), Some(t(3800)), "partitions apart");
    }
}
