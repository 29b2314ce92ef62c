//! Notifications reach a webhook (a local HTTP receiver here) and are
//! recorded in `ops.notifications`, marked delivered once the POST
//! succeeded: a failed batch run, a failed quality check, a catalog schema
//! change, a lagging speed layer and a high DLQ rate. The receiver refuses
//! its first requests, so delivery must retry, and checks each POST's
//! signature itself (HMAC-SHA256 over the timestamp and the body, computed
//! here, not by the platform's code). A redirect is never followed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use batch_layer::ingest::{self, IngestConfig};
use batch_layer::lake::Lake;
use batch_layer::recompute::{self, RunConfig, RunOutcome};
use integration_tests::fixture::{FreshStream, Stack};
use integration_tests::generator::{self, Args};
use serde_json::Value;
use speed_layer::alerts::Alerts;
use speed_layer::stream::{self, SpeedConfig};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// The secret both sides know.
const SECRET: &str = "a-webhook-secret-for-tests";

#[derive(Clone, Default)]
struct Receiver {
    bodies: Arc<Mutex<Vec<Value>>>,
    refuse: Arc<AtomicUsize>,
    /// POSTs whose signature was missing or wrong.
    unsigned: Arc<AtomicUsize>,
}

impl Receiver {
    fn kinds(&self) -> Vec<String> {
        self.bodies.lock().unwrap().iter().filter_map(|b| b["kind"].as_str().map(str::to_string)).collect()
    }

    fn body(&self, kind: &str) -> Option<Value> {
        self.bodies.lock().unwrap().iter().find(|b| b["kind"] == kind).cloned()
    }
}

/// What a receiver does with `X-Lambda-Signature: t=…,v1=…`: recompute
/// HMAC-SHA256(secret, "t.body") and compare; refuse timestamps older than
/// five minutes.
fn signed(headers: &HeaderMap, body: &[u8]) -> bool {
    use hmac::{Hmac, KeyInit, Mac};
    let Some(header) = headers.get("x-lambda-signature").and_then(|v| v.to_str().ok()) else { return false };
    let fields: std::collections::HashMap<&str, &str> = header.split(',').filter_map(|p| p.split_once('=')).collect();
    let (Some(t), Some(v1)) = (fields.get("t"), fields.get("v1")) else { return false };
    let fresh = t.parse::<i64>().is_ok_and(|t| (chrono::Utc::now().timestamp() - t).abs() <= 300);
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let expected: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    fresh && expected == *v1
}

async fn hook(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if !signed(&headers, &body) {
        r.unsigned.fetch_add(1, Ordering::SeqCst);
        return StatusCode::UNAUTHORIZED;
    }
    // Refuse the first requests: the sender must retry.
    if r.refuse.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    r.bodies.lock().unwrap().push(serde_json::from_slice(&body).unwrap());
    StatusCode::NO_CONTENT
}

/// A signed webhook on a free port that refuses its first `refuse`
/// requests; `/moved` answers with a redirect to it.
async fn receiver(refuse: usize) -> (platform::notify::Webhook, Receiver) {
    let r = Receiver { refuse: Arc::new(AtomicUsize::new(refuse)), ..Receiver::default() };
    let app = axum::Router::new()
        .route("/hook", post(hook))
        .route("/moved", post(|| async { (StatusCode::TEMPORARY_REDIRECT, [("location", "/hook")]) }))
        .with_state(r.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let url = format!("http://{addr}/hook");
    (platform::notify::parse_webhook(Some(&url), Some(SECRET)).unwrap().unwrap(), r)
}

/// kind → delivered, for every recorded notification.
async fn recorded(pool: &PgPool) -> Vec<(String, bool)> {
    sqlx::query_as("SELECT kind, delivered FROM ops.notifications ORDER BY id").fetch_all(pool).await.unwrap()
}

#[tokio::test]
async fn failed_runs_quality_checks_and_catalog_changes_are_posted_and_recorded() {
    let stack = Stack::from_env();
    let topic = stack.fresh_topic("notify_batch", 2).await.unwrap();
    let (url, pool) = stack.fresh_database("notify_batch").await.unwrap();
    let (sales_url, sales) = stack.fresh_database("notify_batch_sales").await.unwrap();
    platform::db::migrate(&pool, Some(1)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::parse(dir.path().to_str().unwrap()).unwrap();
    let (webhook, hook) = receiver(2).await;
    let config = RunConfig {
        full: true,
        notify_webhook: Some(webhook),
        sales_database_url: Some(sales_url.clone()),
        ..RunConfig::new(url.clone(), lake.clone(), topic.clone())
    };

    // Nothing ingested yet: the run fails, and says so.
    let e = recompute::run(&config).await.unwrap_err().to_string();
    assert!(e.contains("ingest"), "{e}");
    let failed = hook.body("batch_run_failed").expect("the failed run was posted after two refusals");
    assert_eq!(failed["severity"], "critical");
    assert_eq!(failed["source"], "batch-layer");
    assert!(failed["summary"].as_str().unwrap().contains("published nothing"), "{failed}");
    assert_eq!(recorded(&pool).await, [("batch_run_failed".to_string(), true)]);

    let args = Args { no_catalog: false, sales_database_url: sales_url, ..Args::for_tests(stack.brokers(), &topic, 5) };
    generator::run(args.clone()).await.unwrap();
    ingest::run(IngestConfig::catch_up(stack.brokers(), &topic, &lake), CancellationToken::new()).await.unwrap();
    assert!(matches!(recompute::run(&config).await.unwrap(), RunOutcome::Published { .. }));
    assert_eq!(hook.kinds(), ["batch_run_failed"], "a good run notifies nothing");

    // The shop changes its catalog, and the next run fails its checks.
    sqlx::query("ALTER TABLE products ADD COLUMN brand text").execute(&sales).await.unwrap();
    integration_tests::checks::inflate_published_demand(&pool, 100_000).await;
    assert!(matches!(recompute::run(&config).await.unwrap(), RunOutcome::Rejected { .. }));
    let mut kinds = hook.kinds();
    kinds.sort();
    assert_eq!(kinds, ["batch_run_failed", "catalog_schema_changed", "quality_check_failed"]);
    let quality = hook.body("quality_check_failed").unwrap();
    assert!(quality["summary"].as_str().unwrap().contains("row_count"), "{quality}");
    assert!(quality["id"].as_i64().is_some());
    let mut rows = recorded(&pool).await;
    rows.sort();
    assert_eq!(
        rows,
        [
            ("batch_run_failed".to_string(), true),
            ("catalog_schema_changed".to_string(), true),
            ("quality_check_failed".to_string(), true)
        ]
    );
}

#[tokio::test]
async fn a_lagging_speed_layer_and_a_high_dlq_rate_are_posted_and_recorded() {
    let stack = Stack::from_env();
    let FreshStream { topic, dlq, url, pool } = stack.fresh_stream("notify_speed", 2, 100).await.unwrap();
    let truth =
        generator::run(Args { bad_fraction: 0.2, ..Args::for_tests(stack.brokers(), &topic, 6) }).await.unwrap();
    let total = (truth.events_sent + truth.bad_sent) as i64;
    let (webhook, hook) = receiver(1).await;
    let shutdown = CancellationToken::new();
    let speed = tokio::spawn(stream::run(
        SpeedConfig {
            max_batch: 200,
            alerts: Alerts {
                notify_webhook: Some(webhook),
                lag_threshold: 10,
                dlq_rate_threshold: 0.05,
                dlq_min_records: 100,
                check_every: Duration::from_millis(100),
                ..Alerts::default()
            },
            ..SpeedConfig::single_instance(stack.brokers(), &topic, &dlq, &url)
        },
        shutdown.clone(),
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let consumed = integration_tests::checks::speed_consumed(&pool).await;
        let kinds = hook.kinds();
        let last_lag_state = kinds.iter().rev().find(|k| *k == "speed_lagging" || *k == "speed_caught_up");
        if consumed == total && last_lag_state.map(String::as_str) == Some("speed_caught_up") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "consumed {consumed} of {total}; notified {kinds:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shutdown.cancel();
    speed.await.unwrap().unwrap();

    let kinds = hook.kinds();
    // Once per change of state: lagging and caught-up alternate, starting
    // lagging and ending caught up (a loaded machine may legitimately fall
    // behind twice; a repeat without a change between would be spam).
    let lag_states: Vec<&str> =
        kinds.iter().map(String::as_str).filter(|k| *k == "speed_lagging" || *k == "speed_caught_up").collect();
    assert!(!lag_states.is_empty(), "{kinds:?}");
    for (i, k) in lag_states.iter().enumerate() {
        let expected = if i % 2 == 0 { "speed_lagging" } else { "speed_caught_up" };
        assert_eq!(*k, expected, "lag alerts must alternate: {kinds:?}");
    }
    assert_eq!(lag_states.last(), Some(&"speed_caught_up"), "{kinds:?}");
    // A fifth of the records are bad throughout, so the rate never drops
    // back below the threshold: one crossing, one notification.
    assert_eq!(kinds.iter().filter(|k| *k == "dlq_rate_high").count(), 1, "{kinds:?}");
    assert!(!kinds.iter().any(|k| k == "speed_stalled"), "{kinds:?}");
    let lagging = hook.body("speed_lagging").unwrap();
    assert!(lagging["details"]["lag"].as_i64().unwrap() > 10, "{lagging}");
    let dlq_rate = hook.body("dlq_rate_high").unwrap();
    assert!(dlq_rate["details"]["rate"].as_f64().unwrap() > 0.05, "{dlq_rate}");
    let rows = recorded(&pool).await;
    assert_eq!(rows.len(), kinds.len(), "{rows:?} vs {kinds:?}");
    assert!(rows.iter().all(|(_, delivered)| *delivered), "{rows:?}");
    assert_eq!(hook.unsigned.load(Ordering::SeqCst), 0, "every POST carries a valid signature");
}

/// A webhook that answers with a redirect is not followed: the signed body
/// never reaches the redirect's target, and the notification stays
/// undelivered (for `ops.notifications` readers and a retry by hand).
#[tokio::test]
async fn a_redirecting_webhook_is_not_followed() {
    use platform::notify::{Notification, Notifier, NotifyConfig, Severity};
    let (webhook, hook) = receiver(0).await;
    let moved = webhook.url().join("/moved").unwrap();
    let webhook = platform::notify::parse_webhook(Some(moved.as_str()), Some(SECRET)).unwrap().unwrap();
    let notifier = Notifier::spawn(NotifyConfig { attempts: 2, ..NotifyConfig::new(Some(webhook), "test") }, None);
    notifier.send(Notification::new("redirect_probe", Severity::Info, "probe", serde_json::json!({})));
    notifier.flush(Duration::from_secs(30)).await;
    assert!(hook.kinds().is_empty(), "the redirect was followed: {:?}", hook.kinds());
    assert_eq!(hook.unsigned.load(Ordering::SeqCst), 0);
}

/// A partition whose records the batch's cut covers to the end leaves the
/// speed layer nothing to read, so it never stores an offset there. It
/// stands at the cut, not at 0: no lag, no stall alert, no lagging alert.
/// (A CI run of `least_privilege` once waited on such a partition for four
/// minutes while the layer called it stalled.)
#[tokio::test]
async fn a_partition_the_cut_covers_to_its_end_is_neither_lagging_nor_stalled() {
    let stack = Stack::from_env();
    let FreshStream { topic, dlq, url, pool } = stack.fresh_stream("notify_cut_end", 1, 100).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::parse(dir.path().to_str().unwrap()).unwrap();
    let at = chrono::Utc::now() - chrono::Duration::hours(2);
    let records: Vec<_> =
        (0..200).map(|i| generator::event_record(&format!("u-{i}"), "p-00001", "page_view", at)).collect();
    generator::send_records(stack.brokers(), &topic, &records).unwrap();
    ingest::run(IngestConfig::catch_up(stack.brokers(), &topic, &lake), CancellationToken::new()).await.unwrap();
    let run = RunConfig { full: true, ..RunConfig::new(url.clone(), lake.clone(), topic.clone()) };
    assert!(matches!(recompute::run(&run).await.unwrap(), RunOutcome::Published { .. }));
    let cut: i64 =
        sqlx::query_scalar("SELECT cut_offset FROM ops.cut WHERE kafka_partition = 0").fetch_one(&pool).await.unwrap();
    assert_eq!(cut, 200, "the cut is at the partition's end (a multiple of the segment size)");

    let ops = std::net::SocketAddr::from(([127, 0, 0, 1], integration_tests::fixture::free_port().unwrap()));
    let shutdown = CancellationToken::new();
    let speed = tokio::spawn(stream::run(
        SpeedConfig {
            ops_addr: ops,
            assignment: stream::Assignment::Group,
            alerts: Alerts {
                lag_threshold: 100,
                stall_after: Duration::from_secs(3),
                check_every: Duration::from_millis(100),
                ..Alerts::default()
            },
            ..SpeedConfig::single_instance(stack.brokers(), &topic, &dlq, &url)
        },
        shutdown.clone(),
    ));
    // The lag gauge is first set after five seconds; by then the alerts
    // were checked dozens of times, past the three-second stall bound.
    let metrics =
        || async { integration_tests::serving::get(ops, "/metrics").await.map(|a| a.body).unwrap_or_default() };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !metrics().await.contains("speed_partition_lag_records{") {
        assert!(tokio::time::Instant::now() < deadline, "no lag gauge in 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(integration_tests::checks::metric_sum(&metrics().await, "speed_partition_lag_records"), 0.0);
    assert_eq!(recorded(&pool).await, [], "nothing waits, so nothing is lagging or stalled");
    assert_eq!(integration_tests::checks::speed_consumed(&pool).await, 200);

    // Records after the cut are read and stored as usual; the idle time
    // before them is no stall (records wait from their arrival).
    let more: Vec<_> =
        (0..30).map(|i| generator::event_record(&format!("v-{i}"), "p-00002", "page_view", at)).collect();
    generator::send_records(stack.brokers(), &topic, &more).unwrap();
    integration_tests::checks::wait_for_speed_within(&pool, 230, Duration::from_secs(60)).await;
    let stored: i64 = sqlx::query_scalar("SELECT next_offset FROM ops.speed_offsets WHERE kafka_partition = 0")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, 230);
    shutdown.cancel();
    speed.await.unwrap().unwrap();
    assert_eq!(recorded(&pool).await, [], "{:?}", recorded(&pool).await);
}
