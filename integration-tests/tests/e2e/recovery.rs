//! Recovery drills (issue 18): the procedures of OPERATIONS.md "Backup and
//! recovery", run with the binaries and flags users run. PostgreSQL is
//! lost (a new, empty database) and `batch-layer recover` rebuilds every
//! batch and serving table from the lake, the speed layer its own from the
//! cut; then the lake is lost and `recover` rebuilds it from Kafka. Each
//! time serving equals the generator's independent counts.

use std::process::Stdio;
use std::time::Duration;

use integration_tests::checks::{assert_demand_eq, merged, serving_demand, wait_for_speed};
use integration_tests::fixture::{FreshStream, Stack, command, free_port, log_tail};
use integration_tests::generator::{self, Args};

/// Runs `batch-layer ARGS` to completion against `url` and the lake at
/// `lake`; returns its standard output, failing with its log otherwise.
async fn batch(stack: &Stack, url: &str, lake: &str, log: &std::path::Path, args: &[&str]) -> String {
    let file = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let out = command("batch-layer", stack.brokers(), url, file.into())
        .env("LAKE_URI", lake)
        .args(args)
        .stdout(Stdio::piped())
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "batch-layer {args:?} failed:\n{}", log_tail(log, 20));
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn recovery_drills_rebuild_serving_from_the_lake_and_the_lake_from_kafka() {
    let stack = Stack::from_env();
    let FreshStream { topic, dlq, url, pool } = stack.fresh_stream("recovery", 2, 100).await.unwrap();
    let truth =
        generator::run(Args { backfill_hours: 3, bad_fraction: 0.01, ..Args::for_tests(stack.brokers(), &topic, 91) })
            .await
            .unwrap();
    let sent = |t: &generator::Truth| (t.events_sent + t.bad_sent) as i64;
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let lake = lake.to_str().unwrap();
    let log = dir.path().join("batch.log");
    let speed_log = dir.path().join("speed.log");
    let ops = format!("127.0.0.1:{}", free_port().unwrap());
    let speed = |url: &str| {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&speed_log).unwrap();
        command("speed-layer", stack.brokers(), url, file.into())
            .args(["run", "--topic", &topic, "--dlq-topic", &dlq, "--group-id", &format!("{topic}.speed")])
            .args(["--flush-interval", "100ms", "--ops-addr", &ops])
            .spawn()
            .unwrap()
    };

    // The pipeline as deployed: the ingest, a run, the speed layer (group mode).
    batch(&stack, &url, lake, &log, &["ingest", "--topic", &topic, "--until-caught-up"]).await;
    batch(&stack, &url, lake, &log, &["run", "--topic", &topic, "--no-catalog"]).await;
    let mut running = speed(&url);
    wait_for_speed(&pool, sent(&truth)).await;
    assert_demand_eq(&serving_demand(&pool).await, &merged(&[&truth]), "before the drills");

    // Drill 1: PostgreSQL is lost. The speed layer stops with it; the owner
    // creates and migrates a new database; `recover`; the speed layer starts.
    running.kill().await.unwrap();
    let (restored_url, restored) = stack.migrated_database("recovery_restored", Some(100)).await.unwrap();
    let report = batch(&stack, &restored_url, lake, &log, &["recover", "--topic", &topic, "--no-catalog"]).await;
    assert!(report.contains("lake brought up to Kafka"), "{report}");
    let mut running = speed(&restored_url);
    serving_reaches(&restored, &merged(&[&truth]), "after PostgreSQL was lost").await;

    // Drill 2: the lake is lost while traffic goes on; `recover` rebuilds it
    // from Kafka (which still holds every record) and republishes.
    std::fs::remove_dir_all(lake).unwrap();
    let more =
        generator::run(Args { backfill_hours: 1, ..Args::for_tests(stack.brokers(), &topic, 92) }).await.unwrap();
    let report = batch(&stack, &restored_url, lake, &log, &["recover", "--topic", &topic, "--no-catalog"]).await;
    assert!(report.contains("lake rebuilt from Kafka"), "{report}");
    assert!(report.contains(&format!("{} records read", sent(&truth) + sent(&more))), "{report}");
    assert!(report.contains("0 offsets stepped over"), "{report}");
    serving_reaches(&restored, &merged(&[&truth, &more]), "after the lake was lost").await;
    let unaccounted: i64 =
        sqlx::query_scalar("SELECT unaccounted FROM ops.lake_reconciliation").fetch_one(&restored).await.unwrap();
    assert_eq!(unaccounted, 0, "the rebuilt lake accounts for every offset");
    running.kill().await.unwrap();
}

/// Polls serving until it equals `expected` (the speed layer catching up
/// from the cut; five minutes at most), then asserts it.
async fn serving_reaches(pool: &sqlx::PgPool, expected: &integration_tests::checks::DemandMap, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while serving_demand(pool).await != *expected && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_demand_eq(&serving_demand(pool).await, expected, what);
}
