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
//!
//! With `NOTIFY_WEBHOOK_SECRET` set, each POST is signed: header
//! `X-Lambda-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`
//! ([`sign`]; a receiver checks it with [`verify`] or the same few lines in
//! any language, and refuses old timestamps against replays). Redirects are
//! never followed (a redirect could carry the signed body elsewhere), and
//! the webhook URL, which often holds a token in its path, is never logged:
//! only its scheme and host ([`Webhook::for_logs`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use serde_json::json;
use sha2::Sha256;
use sqlx::PgPool;
use tokio::sync::Notify;

/// The header carrying a POST's signature.
pub const SIGNATURE_HEADER: &str = "X-Lambda-Signature";

/// Shortest accepted `NOTIFY_WEBHOOK_SECRET`.
pub const MIN_SECRET_LEN: usize = 16;

/// Where notifications are POSTed, and the secret that signs them.
#[derive(Clone, PartialEq, Eq)]
pub struct Webhook {
    url: url::Url,
    secret: Option<Vec<u8>>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook").field("url", &self.for_logs()).field("signed", &self.secret.is_some()).finish()
    }
}

impl Webhook {
    /// An unsigned webhook (tests; see [`parse_webhook`] for the checks).
    pub fn unsigned(url: url::Url) -> Self {
        Self { url, secret: None }
    }

    pub fn url(&self) -> &url::Url {
        &self.url
    }

    /// Scheme, host and port only: tokens in the path or query stay out of
    /// logs and messages.
    pub fn for_logs(&self) -> String {
        let port = self.url.port().map(|p| format!(":{p}")).unwrap_or_default();
        format!("{}://{}{port}/…", self.url.scheme(), self.url.host_str().unwrap_or(""))
    }
}

/// `t=<timestamp>,v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    format!("t={timestamp},v1={}", crate::hex::encode(&mac(secret, timestamp, body).finalize().into_bytes()))
}

fn mac(secret: &[u8], timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// A receiver's check of [`SIGNATURE_HEADER`]: the signature matches the
/// body (compared in constant time) and its timestamp is within
/// `tolerance_seconds` of `now`.
pub fn verify(secret: &[u8], header: &str, body: &[u8], now: i64, tolerance_seconds: i64) -> bool {
    let mut timestamp = None;
    let mut signature = None;
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", v)) => signature = crate::hex::decode(v),
            _ => {}
        }
    }
    let (Some(t), Some(sig)) = (timestamp, signature) else { return false };
    (now - t).abs() <= tolerance_seconds && mac(secret, t, body).verify_slice(&sig).is_ok()
}

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
    pub webhook: Option<Webhook>,
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
    pub fn new(webhook: Option<Webhook>, source: &'static str) -> Self {
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

/// Parses `NOTIFY_WEBHOOK_URL` (empty: none) and `NOTIFY_WEBHOOK_SECRET`
/// (empty: unsigned). Messages never repeat the URL or the secret.
pub fn parse_webhook(url: Option<&str>, secret: Option<&str>) -> Result<Option<Webhook>, String> {
    let secret = secret.filter(|s| !s.is_empty());
    if let Some(s) = secret
        && s.chars().count() < MIN_SECRET_LEN
    {
        return Err(format!(
            "NOTIFY_WEBHOOK_SECRET is too short ({} characters): use at least {MIN_SECRET_LEN}, e.g. `openssl rand -hex 32`",
            s.chars().count()
        ));
    }
    match url.map(str::trim).filter(|u| !u.is_empty()) {
        None if secret.is_some() => Err("NOTIFY_WEBHOOK_SECRET is set but NOTIFY_WEBHOOK_URL is not".into()),
        None => Ok(None),
        Some(u) => {
            let parsed = url::Url::parse(u).map_err(|e| format!("NOTIFY_WEBHOOK_URL is not a URL: {e}"))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(format!("NOTIFY_WEBHOOK_URL must be http:// or https://, not {}://", parsed.scheme()));
            }
            Ok(Some(Webhook { url: parsed, secret: secret.map(|s| s.as_bytes().to_vec()) }))
        }
    }
}

/// The webhook flags every notifying command takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct WebhookArgs {
    /// Webhook told of what operators must hear about (a JSON POST); it is
    /// recorded in ops.notifications either way.
    #[arg(long, env = "NOTIFY_WEBHOOK_URL", hide_env_values = true)]
    pub notify_webhook_url: Option<String>,
    /// Secret (at least 16 characters) signing each POST: header
    /// X-Lambda-Signature, HMAC-SHA256 over the timestamp and the body.
    #[arg(long, env = "NOTIFY_WEBHOOK_SECRET", hide_env_values = true)]
    pub notify_webhook_secret: Option<String>,
}

impl WebhookArgs {
    pub fn webhook(&self) -> anyhow::Result<Option<Webhook>> {
        parse_webhook(self.notify_webhook_url.as_deref(), self.notify_webhook_secret.as_deref())
            .map_err(anyhow::Error::msg)
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
    // Redirects are not followed: a redirect could carry the (signed) body
    // to a host the operator never configured.
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
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
    let (Some(webhook), Some(client)) = (&config.webhook, client) else { return };
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
        let mut request = client
            .post(webhook.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.clone());
        if let Some(secret) = &webhook.secret {
            request = request.header(SIGNATURE_HEADER, sign(secret, chrono::Utc::now().timestamp(), body.as_bytes()));
        }
        let sent = request.send().await;
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
            Ok(r) if r.status().is_redirection() => format!("HTTP {} (redirects are not followed)", r.status()),
            Ok(r) => format!("HTTP {}", r.status()),
            // Without the URL: its path often holds the webhook's token.
            Err(e) => e.without_url().to_string(),
        };
        if attempt == 1 {
            tracing::warn!(kind = %n.kind, webhook = %webhook.for_logs(), error = %failure, "webhook POST failed; retrying with backoff");
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
        assert_eq!(parse_webhook(None, None).unwrap(), None);
        assert_eq!(parse_webhook(Some(" "), Some("")).unwrap(), None);
        assert!(parse_webhook(Some("http://127.0.0.1:9/hook"), None).unwrap().is_some());
        assert!(parse_webhook(Some("ftp://x/"), None).is_err());
        assert!(parse_webhook(Some("not a url"), None).is_err());
        assert!(parse_webhook(Some("http://x/"), Some("short")).unwrap_err().contains("too short"));
        assert!(parse_webhook(None, Some("a-long-enough-secret")).is_err());
    }

    #[test]
    fn messages_and_logs_never_show_the_webhook_token() {
        let err = parse_webhook(Some("gopher://hooks.example.com/T0/B0/s3cr3t-token"), None).unwrap_err();
        assert!(!err.contains("s3cr3t"), "{err}");
        let hook =
            parse_webhook(Some("https://hooks.example.com:8443/T0/B0/s3cr3t-token?k=v"), Some("x".repeat(16).as_str()))
                .unwrap()
                .unwrap();
        assert_eq!(hook.for_logs(), "https://hooks.example.com:8443/…");
        let debug = format!("{hook:?}");
        assert!(!debug.contains("s3cr3t") && !debug.contains("xxxx"), "{debug}");
    }

    #[test]
    fn signatures_verify_only_for_the_same_secret_body_and_a_recent_time() {
        let secret = b"0123456789abcdef";
        let header = sign(secret, 1_000, b"{\"a\":1}");
        assert!(header.starts_with("t=1000,v1=") && header.len() == "t=1000,v1=".len() + 64, "{header}");
        assert!(verify(secret, &header, b"{\"a\":1}", 1_010, 300));
        assert!(!verify(secret, &header, b"{\"a\":2}", 1_010, 300), "another body");
        assert!(!verify(b"another-secret-16", &header, b"{\"a\":1}", 1_010, 300), "another secret");
        assert!(!verify(secret, &header, b"{\"a\":1}", 2_000, 300), "too old: a replay");
        assert!(!verify(secret, "t=1000,v1=zz", b"{\"a\":1}", 1_000, 300));
        assert!(!verify(secret, "", b"", 0, 300));
    }

    #[tokio::test]
    async fn a_full_queue_drops_the_oldest_and_send_never_blocks() {
        // A webhook that refuses connections, tried once: the first
        // notification occupies the task while the queue overflows.
        let config = NotifyConfig {
            capacity: 2,
            attempts: 1,
            ..NotifyConfig::new(Some(Webhook::unsigned(url::Url::parse("http://127.0.0.1:9/").unwrap())), "test")
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
