//! Dead-man alerts (issue 18): `serving-layer watchdog`, a process of its
//! own under role `ops_watchdog` with its unit's env file, notifies once
//! when the ingest, the scheduler or the speed layer is killed (its
//! heartbeat falls silent) and once when it is back; and once when
//! PostgreSQL cannot be reached, once when it answers again.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::post;
use integration_tests::fixture::{FreshStream, Stack, binary, log_tail};
use integration_tests::generator::{self, Args};
use integration_tests::private_stack::PrivateStack;
use serde_json::Value;
use std::process::Stdio;

/// A webhook that keeps every body it is sent.
async fn receiver() -> (String, Arc<Mutex<Vec<Value>>>) {
    let bodies: Arc<Mutex<Vec<Value>>> = Arc::default();
    let app = axum::Router::new()
        .route(
            "/hook",
            post(|State(b): State<Arc<Mutex<Vec<Value>>>>, axum::Json(v): axum::Json<Value>| async move {
                b.lock().unwrap().push(v);
                axum::http::StatusCode::NO_CONTENT
            }),
        )
        .with_state(Arc::clone(&bodies));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/hook"), bodies)
}

/// (kind, process) of every notification so far.
fn seen(bodies: &Mutex<Vec<Value>>) -> Vec<(String, String)> {
    bodies
        .lock()
        .unwrap()
        .iter()
        .map(|b| {
            (b["kind"].as_str().unwrap_or_default().to_string(), b["details"]["process"].as_str().unwrap_or("").into())
        })
        .collect()
}

async fn wait_for(bodies: &Mutex<Vec<Value>>, kind: &str, process: &str, within: Duration) -> Duration {
    let started = Instant::now();
    while !seen(bodies).iter().any(|(k, p)| k == kind && p == process) {
        assert!(started.elapsed() < within, "no {kind} for {process:?} within {within:?}; seen {:?}", seen(bodies));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

fn watchdog(database_url: &str, hook: &str, log: &std::path::Path) -> tokio::process::Child {
    tokio::process::Command::new(binary("serving-layer"))
        .args(["watchdog", "--check-every", "300ms", "--silent-after", "6s", "--ops-addr", "127.0.0.1:0"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", database_url)
        .env("NOTIFY_WEBHOOK_URL", hook)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn a_killed_process_is_notified_once_and_its_return_once() {
    let stack = Stack::from_env();
    let FreshStream { topic, dlq, url, pool } = stack.fresh_stream("watchdog", 2, 100).await.unwrap();
    generator::run(Args { backfill_hours: 1, ..Args::for_tests(stack.brokers(), &topic, 81) }).await.unwrap();
    let lake = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let as_role = |role: &str| integration_tests::fixture::role_url(&url, role);
    let spawn = |name: &str| {
        let (role, args): (&str, Vec<&str>) = match name {
            "batch-ingest" => ("batch_writer", vec!["ingest", "--topic", &topic, "--flush-interval", "1s"]),
            "batch-schedule" => ("batch_writer", vec!["schedule", "--every", "1h", "--no-catalog", "--topic", &topic]),
            _ => ("speed_writer", vec!["run", "--topic", &topic, "--dlq-topic", &dlq, "--assignment", "all"]),
        };
        let bin = if name == "speed-layer" { "speed-layer" } else { "batch-layer" };
        let log = std::fs::OpenOptions::new().create(true).append(true).open(logs.path().join(name)).unwrap();
        tokio::process::Command::new(binary(bin))
            .args(&args)
            .args(["--heartbeat-every", "500ms", "--ops-addr", "127.0.0.1:0"])
            .env("KAFKA_BROKERS", stack.brokers())
            .env("LAKE_URI", lake.path())
            .env("DATABASE_URL", as_role(role))
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let names = ["batch-ingest", "batch-schedule", "speed-layer"];
    let mut children: Vec<_> = names.iter().map(|n| spawn(n)).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let beating: i64 =
            sqlx::query_scalar("SELECT count(*) FROM ops.heartbeats WHERE beat_at > now() - interval '2 seconds'")
                .fetch_one(&pool)
                .await
                .unwrap();
        if beating == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "{beating} of 3 processes beat");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let (hook, bodies) = receiver().await;
    let log = logs.path().join("watchdog");
    let _watchdog = watchdog(&as_role("ops_watchdog"), &hook, &log);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(seen(&bodies).is_empty(), "all is well, yet: {:?}\n{}", seen(&bodies), log_tail(&log, 10));

    for (i, name) in names.iter().enumerate() {
        children[i].start_kill().unwrap(); // SIGKILL: no clean stop is recorded
        children[i].wait().await.unwrap();
        // Silent after 6 s, checked every 300 ms: told within its threshold
        // and a few checks.
        let took = wait_for(&bodies, "process_silent", name, Duration::from_secs(20)).await;
        eprintln!("{name}: process_silent {took:?} after the kill");
        children[i] = spawn(name);
        wait_for(&bodies, "process_recovered", name, Duration::from_secs(30)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for name in names {
        let count = |kind: &str| seen(&bodies).iter().filter(|(k, p)| k == kind && p == name).count();
        assert_eq!((count("process_silent"), count("process_recovered")), (1, 1), "{name}: {:?}", seen(&bodies));
    }
    // Recorded too, by the watchdog's role.
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.notifications WHERE kind LIKE 'process_%'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(recorded, 6);
}

#[tokio::test]
async fn postgres_out_of_reach_is_notified_once_and_its_return_once() {
    let mut stack = PrivateStack::start().await.expect("private stack");
    let (url, pool) = stack.create_database("lambda").await.unwrap();
    platform::db::migrate(&pool, None).await.unwrap();
    pool.close().await;
    let (hook, bodies) = receiver().await;
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("watchdog");
    let watchdog_url = integration_tests::fixture::role_url(&url, "ops_watchdog");
    let _watchdog = watchdog(&watchdog_url, &hook, &log);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stack
        .restart_postgres(async {
            wait_for(&bodies, "postgres_unreachable", "", Duration::from_secs(30)).await;
        })
        .await
        .unwrap();
    wait_for(&bodies, "postgres_reachable", "", Duration::from_secs(30)).await;
    let kinds: Vec<String> = seen(&bodies).into_iter().map(|(k, _)| k).collect();
    assert_eq!(kinds, ["postgres_unreachable", "postgres_reachable"], "{}", log_tail(&log, 10));
}

/// Stale batch views (no successful run for 75 minutes) and a lagging speed
/// layer are notified once each, and once when they are over.
#[tokio::test]
async fn stale_views_and_speed_lag_are_notified_once_each_way() {
    let (url, pool) = Stack::from_env().migrated_database("watchdog_conditions", None).await.unwrap();
    // The last successful run finished two hours ago; the speed layer is
    // 2,000,000 records behind on partition 0.
    sqlx::raw_sql(
        "INSERT INTO ops.batch_runs (status, mode, started_at, finished_at)
             VALUES ('published', 'full', now() - interval '121 minutes', now() - interval '2 hours');
         INSERT INTO ops.speed_offsets (kafka_partition, next_offset, end_offset) VALUES (0, 1000, 2001000);",
    )
    .execute(&pool)
    .await
    .unwrap();
    let (hook, bodies) = receiver().await;
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("watchdog");
    let _watchdog = watchdog(&integration_tests::fixture::role_url(&url, "ops_watchdog"), &hook, &log);
    wait_for(&bodies, "batch_stale", "", Duration::from_secs(30)).await;
    wait_for(&bodies, "speed_lag_high", "", Duration::from_secs(30)).await;
    sqlx::raw_sql(
        "INSERT INTO ops.batch_runs (status, mode, started_at, finished_at) VALUES ('unchanged', 'incremental', now(), now());
         UPDATE ops.speed_offsets SET next_offset = end_offset;",
    )
    .execute(&pool)
    .await
    .unwrap();
    wait_for(&bodies, "batch_fresh", "", Duration::from_secs(30)).await;
    wait_for(&bodies, "speed_lag_normal", "", Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut kinds: Vec<String> = seen(&bodies).into_iter().map(|(k, _)| k).collect();
    kinds.sort();
    assert_eq!(kinds, ["batch_fresh", "batch_stale", "speed_lag_high", "speed_lag_normal"], "{}", log_tail(&log, 10));
}
