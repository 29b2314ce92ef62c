//! Serving from a hot standby (issue 15): `serve` reads a streaming replica
//! (made with `pg_basebackup -R`, as `make up-replica` makes one) under the
//! reader roles. Once the standby has replayed, it answers exactly what the
//! primary answers, after a batch publish and after speed flushes, and
//! `/api/freshness` reports its replication lag.

use std::time::Duration;

use batch_layer::ingest::{self, IngestConfig};
use batch_layer::lake::Lake;
use batch_layer::recompute::{self, RunConfig};
use integration_tests::checks::{assert_demand_eq, serving_demand, wait_for_speed};
use integration_tests::generator::{self, Args};
use integration_tests::private_stack::PrivateStack;
use integration_tests::serving::get;
use serving_layer::server::{self, ServeConfig};
use speed_layer::stream::{self, SpeedConfig};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Waits until the standby has replayed everything the primary has written.
async fn replayed(primary: &PgPool, standby: &PgPool) {
    let written: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text").fetch_one(primary).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let behind: bool = sqlx::query_scalar("SELECT pg_last_wal_replay_lsn() < $1::pg_lsn")
            .bind(&written)
            .fetch_one(standby)
            .await
            .unwrap();
        if !behind {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the standby did not replay up to {written} in 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a dashboard viewer and the recommender see through `addr`.
async fn answers(addr: std::net::SocketAddr, users: &[String]) -> Vec<(String, String)> {
    let to = chrono::Utc::now() + chrono::Duration::hours(1);
    let from = to - chrono::Duration::hours(700);
    let mut paths = vec![
        format!("/api/demand/hourly?from={}&to={}", from.format("%Y-%m-%dT%H:00:00Z"), to.format("%Y-%m-%dT%H:00:00Z")),
        "/api/spikes?limit=100".into(),
        "/api/popular?limit=50".into(),
    ];
    paths.extend(users.iter().map(|u| format!("/api/recommendations/{u}?k=10")));
    let mut out = Vec::new();
    for path in paths {
        let answer = get(addr, &path).await.unwrap();
        assert_eq!(answer.status, 200, "{path}: {}", answer.body);
        out.push((path, answer.body));
    }
    out
}

async fn serve(recommender_url: String, dashboard_url: String, stop: &CancellationToken) -> std::net::SocketAddr {
    let config = ServeConfig { recommender_url, dashboard_url, ..ServeConfig::any_port("unused") };
    let running = server::start(config, stop.clone()).await.unwrap();
    integration_tests::serving::wait_ready(running.ops_addr).await;
    running.addr
}

#[tokio::test]
async fn serve_on_a_hot_standby_answers_what_the_primary_answers() {
    let mut stack = PrivateStack::start().await.expect("private stack");
    let (url, primary) = stack.create_database("lambda").await.unwrap();
    platform::db::migrate(&primary, Some(100)).await.unwrap();
    // The copy is taken before any data: everything after arrives by streaming.
    stack.start_replica().await.unwrap();
    let standby = PgPool::connect(&stack.replica_url("postgres", "lambda").unwrap()).await.unwrap();
    let brokers = stack.brokers();
    stack.create_topic("events", 2).await.unwrap();
    stack.create_topic("events.dlq", 1).await.unwrap();
    let lake_dir = tempfile::tempdir().unwrap();
    let lake = Lake::parse(lake_dir.path().to_str().unwrap()).unwrap();

    // A batch publish.
    let first = generator::run(Args { backfill_hours: 4, ..Args::for_tests(&brokers, "events", 71) }).await.unwrap();
    ingest::run(IngestConfig::catch_up(&brokers, "events", &lake), CancellationToken::new()).await.unwrap();
    recompute::run(&RunConfig { full: true, ..RunConfig::new(url.clone(), lake.clone(), "events") }).await.unwrap();

    // Speed flushes past the cut.
    let second = generator::run(Args { backfill_hours: 1, ..Args::for_tests(&brokers, "events", 72) }).await.unwrap();
    let total = (first.events_sent + first.bad_sent + second.events_sent + second.bad_sent) as i64;
    let shutdown = CancellationToken::new();
    let speed = tokio::spawn(stream::run(
        SpeedConfig::single_instance(&brokers, "events", "events.dlq", &url),
        shutdown.clone(),
    ));
    wait_for_speed(&primary, total).await;
    shutdown.cancel();
    speed.await.unwrap().unwrap();
    let expected = integration_tests::checks::merged(&[&first, &second]);
    assert_demand_eq(&serving_demand(&primary).await, &expected, "serving.product_demand_hourly on the primary");

    replayed(&primary, &standby).await;
    assert_demand_eq(&serving_demand(&standby).await, &expected, "serving.product_demand_hourly on the standby");

    // Each serve under the reader roles: one on the primary, one on the standby.
    let primary_as = |role: &str| integration_tests::fixture::role_url(&url, role);
    let standby_as = |role: &str| stack.replica_url(role, "lambda").unwrap();
    let stop = CancellationToken::new();
    let from_primary = serve(primary_as("recommender_reader"), primary_as("dashboard_reader"), &stop).await;
    let from_standby = serve(standby_as("recommender_reader"), standby_as("dashboard_reader"), &stop).await;
    // Keys are made on the primary (`keys create`) and reach the standby by
    // replication, like everything else.
    integration_tests::serving::sign_requests(from_primary, &primary).await.unwrap();
    integration_tests::serving::sign_requests(from_standby, &primary).await.unwrap();
    replayed(&primary, &standby).await;

    let users: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT user_id FROM serving.user_product_state ORDER BY user_id LIMIT 5")
            .fetch_all(&standby)
            .await
            .unwrap();
    assert!(!users.is_empty());
    assert_eq!(answers(from_standby, &users).await, answers(from_primary, &users).await);

    // The lag is reported by the standby only.
    let layers = |body: String| -> Vec<serde_json::Value> { serde_json::from_str(&body).unwrap() };
    let on_standby = layers(get(from_standby, "/api/freshness").await.unwrap().body);
    let replication = on_standby.iter().find(|l| l["layer"] == "replication").expect("a replication entry");
    assert!(replication["update_age_seconds"].as_f64().is_some_and(|lag| lag >= 0.0), "{replication}");
    let on_primary = layers(get(from_primary, "/api/freshness").await.unwrap().body);
    assert!(on_primary.iter().all(|l| l["layer"] != "replication"), "{on_primary:?}");
    stop.cancel();
}
