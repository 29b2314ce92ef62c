//! Notifications to operators: recorded in `ops.notifications` and, with
//! `NOTIFY_WEBHOOK_URL` set, POSTed there as JSON.
//!
//! Telling someone must never hold the pipeline up: [`Notifier::send`] only
//! puts the notification in a bounded in-memory queue and returns. A
//! background task records it, POSTs it with capped exponential backoff and
//! jitter, and marks the row `delivered` once the webhook answered 2xx. When
//! the queue is full (the webhook is down and trouble keeps coming) the
//! oldest waiting notification is dropped and counted
//! (`notify_dropped_total`): the newest state is what operators need.
//!
//! The POSTed body:
//! `{"id": 17, "kind": "batch_run_failed", "severity": "critical",
//!   "summary": "...", "details": {...}, "source": "batch-layer",
//!   "created_at": "2026-11-26T10:00:00Z"}`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use tokio::sync::Notify;

/// How urgent a notification is (the `severity` of `ops.notifications`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

/// One thing operators must hear about.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    /// Machine-readable kind: `batch_run_failed`, `quality_check_failed`,
    /// `speed_stalled`, `speed_lagging`, `dlq_rate_high`,
    /// `catalog_schema_changed`, ...
    pub kind: String,
    pub severity: Severity,
    pub summary: String,
    pub details: serde_json::Value,
    /// The row of `ops.notifications` when it is recorded already.
    pub id: Option<i64>,
}

impl Notification {
    pub fn new(kind: &str, severity: Severity, summary: impl Into<String>, details: serde_json::Value) -> Self {
        Self { kind: kind.to_string(), severity, summary: summary.into(), details, id: None }
    }
}

/// Where notifications go and how hard to try.
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    /// The webhook (`NOTIFY_WEBHOOK_URL`); `None`: only record.
    pub webhook: Option<url::Url>,
    /// Which process sends (`batch-layer`, `speed-layer`).
    pub source: &'static str,
    /// Notifications waiting at most; beyond, the oldest is dropped.
    pub capacity: usize,
    /// POST attempts per notification.
    pub attempts: u32,
    /// Backoff after the first failed attempt, doubled up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl NotifyConfig {
    pub fn new(webhook: Option<url::Url>, source: &'static str) -> Self {
        Self {
            webhook,
            source,
            capacity: 256,
            attempts: 6,
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// Parses `NOTIFY_WEBHOOK_URL` (empty: none).
pub fn parse_webhook(url: Option<&str>) -> Result<Option<url::Url>, String> {
    match url.map(str::trim).filter(|u| !u.is_empty()) {
        None => Ok(None),
        Some(u) => {
            let parsed = url::Url::parse(u).map_err(|e| format!("NOTIFY_WEBHOOK_URL {u:?} is not a URL: {e}"))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(format!("NOTIFY_WEBHOOK_URL {u:?} must be http:// or https://"));
            }
            Ok(Some(parsed))
        }
    }
}

struct Queue {
    items: Mutex<VecDeque<Notification>>,
    wake: Notify,
    /// Notifications queued or being handled.
    pending: Mutex<usize>,
    idle: Notify,
    /// Set when the last [`Notifier`] is dropped: the task stops once the
    /// queue is empty (and lets go of its database pool).
    closed: std::sync::atomic::AtomicBool,
}

/// Cheap to clone; every clone feeds the same background task, which ends
/// when the last clone is dropped and the queue is empty.
#[derive(Clone)]
pub struct Notifier {
    queue: Arc<Queue>,
    capacity: usize,
    _alive: Arc<Alive>,
}

/// Tells the task, when the last handle goes, that nothing more can come.
struct Alive(Arc<Queue>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        self.0.wake.notify_one();
    }
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier").field("capacity", &self.capacity).finish_non_exhaustive()
    }
}

impl Notifier {
    /// Starts the background task. `pool`: where `ops.notifications` is
    /// (`None`: only POST).
    pub fn spawn(config: NotifyConfig, pool: Option<PgPool>) -> Self {
        let queue = Arc::new(Queue {
            items: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            pending: Mutex::new(0),
            idle: Notify::new(),
            closed: std::sync::atomic::AtomicBool::new(false),
        });
        let capacity = config.capacity.max(1);
        tokio::spawn(deliver(Arc::clone(&queue), config, pool));
        let alive = Arc::new(Alive(Arc::clone(&queue)));
        Self { queue, capacity, _alive: alive }
    }

    /// Queues `n` and returns at once; never blocks, never fails.
    pub fn send(&self, n: Notification) {
        tracing::warn!(kind = %n.kind, severity = n.severity.as_str(), summary = %n.summary, "notification");
        {
            let mut items = self.queue.items.lock().unwrap_or_else(|p| p.into_inner());
            items.push_back(n);
            *self.queue.pending.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            while items.len() > self.capacity {
                if let Some(old) = items.pop_front() {
                    metrics::counter!("notify_dropped_total").increment(1);
                    tracing::warn!(kind = %old.kind, "notification queue full; dropped the oldest");
                    self.done();
                }
            }
        }
        self.queue.wake.notify_one();
    }

    fn done(&self) {
        done(&self.queue);
    }

    /// Waits until every queued notification is handled (delivered, or
    /// given up on), at most `timeout`. For processes about to exit.
    pub async fn flush(&self, timeout: Duration) {
        let wait = async {
            loop {
                let idle = self.queue.idle.notified();
                if *self.queue.pending.lock().unwrap_or_else(|p| p.into_inner()) == 0 {
                    return;
                }
                idle.await;
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
    }
}

fn done(queue: &Queue) {
    let mut pending = queue.pending.lock().unwrap_or_else(|p| p.into_inner());
    *pending = pending.saturating_sub(1);
    if *pending == 0 {
        queue.idle.notify_waiters();
    }
}

async fn deliver(queue: Arc<Queue>, config: NotifyConfig, pool: Option<PgPool>) {
    let client = match reqwest::Client::builder().timeout(Duration::from_secs(10)).build() {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook client; notifications are only recorded");
            None
        }
    };
    loop {
        let next = queue.items.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
        let Some(n) = next else {
            // Every handle is gone and the queue is empty: nothing can arrive.
            if queue.closed.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            queue.wake.notified().await;
            continue;
        };
        handle(&n, &config, pool.as_ref(), client.as_ref()).await;
        done(&queue);
    }
}

async fn handle(n: &Notification, config: &NotifyConfig, pool: Option<&PgPool>, client: Option<&reqwest::Client>) {
    let mut id = n.id;
    let mut created_at = chrono::Utc::now();
    if let (None, Some(pool)) = (id, pool) {
        let recorded: Result<(i64, chrono::DateTime<chrono::Utc>), _> = sqlx::query_as(
            "INSERT INTO ops.notifications (kind, severity, summary, details) VALUES ($1, $2, $3, $4)
             RETURNING id, created_at",
        )
        .bind(&n.kind)
        .bind(n.severity.as_str())
        .bind(&n.summary)
        .bind(&n.details)
        .fetch_one(pool)
        .await;
        match recorded {
            Ok((i, at)) => (id, created_at) = (Some(i), at),
            Err(e) => tracing::warn!(error = %e, kind = %n.kind, "cannot record the notification in ops.notifications"),
        }
    }
    let (Some(url), Some(client)) = (&config.webhook, client) else { return };
    let body = json!({
        "id": id,
        "kind": n.kind,
        "severity": n.severity.as_str(),
        "summary": n.summary,
        "details": n.details,
        "source": config.source,
        "created_at": created_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    })
    .to_string();
    let mut backoff = crate::backoff::Backoff::new(config.backoff, config.max_backoff);
    for attempt in 1..=config.attempts.max(1) {
        let sent = client
            .post(url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.clone())
            .send()
            .await;
        let failure = match sent {
            Ok(r) if r.status().is_success() => {
                metrics::counter!("notify_delivered_total").increment(1);
                if let (Some(id), Some(pool)) = (id, pool)
                    && let Err(e) = sqlx::query("UPDATE ops.notifications SET delivered = true WHERE id = $1")
                        .bind(id)
                        .execute(pool)
                        .await
                {
                    tracing::warn!(error = %e, id, "delivered, but cannot mark ops.notifications");
                }
                return;
            }
            Ok(r) => format!("HTTP {}", r.status()),
            Err(e) => e.to_string(),
        };
        if attempt == 1 {
            tracing::warn!(kind = %n.kind, error = %failure, "webhook POST failed; retrying with backoff");
        }
        if attempt < config.attempts {
            backoff.sleep().await;
        } else {
            metrics::counter!("notify_failed_total").increment(1);
            tracing::error!(kind = %n.kind, error = %failure, attempts = config.attempts, "webhook never answered; the notification stays undelivered in ops.notifications");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_urls_are_checked() {
        assert_eq!(parse_webhook(None).unwrap(), None);
        assert_eq!(parse_webhook(Some(" ")).unwrap(), None);
        assert!(parse_webhook(Some("http://127.0.0.1:9/hook")).unwrap().is_some());
        assert!(parse_webhook(Some("ftp://x/")).is_err());
        assert!(parse_webhook(Some("not a url")).is_err());
    }

    #[tokio::test]
    async fn a_full_queue_drops_the_oldest_and_send_never_blocks() {
        // A webhook that refuses connections, tried once: the first
        // notification occupies the task while the queue overflows.
        let config = NotifyConfig {
            capacity: 2,
            attempts: 1,
            ..NotifyConfig::new(Some(url::Url::parse("http://127.0.0.1:9/").unwrap()), "test")
        };
        let notifier = Notifier::spawn(config, None);
        let started = std::time::Instant::now();
        for i in 0..50 {
            notifier.send(Notification::new("test", Severity::Info, format!("n{i}"), json!({})));
        }
        assert!(started.elapsed() < Duration::from_millis(500), "send must not wait for delivery");
        let queued: Vec<String> = notifier.queue.items.lock().unwrap().iter().map(|n| n.summary.clone()).collect();
        assert!(queued.len() <= 2, "{queued:?}");
        assert_eq!(queued.last().map(String::as_str), Some("n49"), "the newest is kept");
        notifier.flush(Duration::from_secs(20)).await;
        assert_eq!(*notifier.queue.pending.lock().unwrap(), 0);
    }

    #[tokio::test]
    async fn the_task_ends_with_the_last_handle_even_if_it_never_sent() {
        // A run that notified nothing must not leave its task (and the
        // database pool it holds) behind.
        let notifier = Notifier::spawn(NotifyConfig::new(None, "test"), None);
        let other = notifier.clone();
        let queue = Arc::downgrade(&notifier.queue);
        drop(notifier);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(queue.upgrade().is_some(), "a handle is left: the task keeps running");
        drop(other);
        for _ in 0..100 {
            if queue.upgrade().is_none() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the task still holds the queue after every handle was dropped");
    }
}
