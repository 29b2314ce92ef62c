//! Schema evolution: events of `schema_version` 2 carrying a field no layer
//! knows yet flow through the lake, the speed layer, the batch and serving
//! exactly like version 1 events; nothing is rejected.

use std::time::Duration;

use batch_layer::ingest::{self, IngestConfig};
use batch_layer::lake::Lake;
use batch_layer::recompute::{self, RunConfig, RunOutcome};
use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::Int64Type;
use integration_tests::fixture::Stack;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use speed_layer::stream::{self, SpeedConfig};
use tokio_util::sync::CancellationToken;

fn event(version: i32, n: u32) -> String {
    let mut e = serde_json::json!({
        "event_id": uuid::Uuid::new_v4().to_string(),
        "event_type": "purchase",
        "event_time": (chrono::Utc::now() - chrono::TimeDelta::hours(1)).to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "user_id": format!("u-v{version}-{}", n % 7),
        "session_id": "s-1",
        "product_id": "p-evolve",
        "quantity": 2,
        "price_cents": 500,
        "schema_version": version,
    });
    if version >= 2 {
        // New in version 2: optional fields no layer reads yet.
        e["coupon_code"] = serde_json::json!("WINTER26");
        e["device"] = serde_json::json!({"os": "android", "app_version": "7.1"});
    }
    e.to_string()
}

#[tokio::test]
async fn version_two_events_with_new_fields_flow_through_every_layer() {
    let stack = Stack::from_env();
    let topic = stack.fresh_topic("schema_v2", 2).await.unwrap();
    let dlq = stack.fresh_topic("schema_v2_dlq", 1).await.unwrap();
    let (url, pool) = stack.fresh_database("schema_v2").await.unwrap();
    platform::db::prepare(&pool, Some(10)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::parse(dir.path().to_str().unwrap()).unwrap();
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &stack.brokers).create().unwrap();
    for n in 0..40 {
        let version = if n % 2 == 0 { 1 } else { 2 };
        let payload = event(version, n);
        let key = format!("u-{n}");
        producer
            .send(FutureRecord::to(&topic).key(&key).payload(&payload), Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }

    let shutdown = CancellationToken::new();
    let speed = tokio::spawn(stream::run(
        SpeedConfig { max_batch: 1_000, ..SpeedConfig::single_instance(&stack.brokers, &topic, &dlq, &url) },
        shutdown.clone(),
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let consumed: i64 = sqlx::query_scalar("SELECT COALESCE(sum(next_offset), 0)::bigint FROM ops.speed_offsets")
            .fetch_one(&pool)
            .await
            .unwrap();
        if consumed == 40 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "speed layer at {consumed} of 40");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shutdown.cancel();
    speed.await.unwrap().unwrap();
    let speed_units: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(units), 0)::bigint FROM serving.product_demand_hourly WHERE product_id = 'p-evolve'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(speed_units, 80, "serving from the speed layer counts both versions");

    let summary =
        ingest::run(IngestConfig::catch_up(&stack.brokers, &topic, &lake), CancellationToken::new()).await.unwrap();
    assert_eq!((summary.events, summary.rejected), (40, 0));
    let table = lake.open("events").await.unwrap().unwrap();
    let ctx = datafusion::prelude::SessionContext::new();
    batch_layer::lake::register(&ctx, "events", &table).await.unwrap();
    let b = ctx.sql("SELECT count(*) FROM events WHERE schema_version = 2").await.unwrap().collect().await.unwrap();
    assert_eq!(b[0].column(0).as_primitive::<Int64Type>().value(0), 20, "the lake keeps the version");

    let run = RunConfig { full: true, ..RunConfig::new(url.clone(), lake.clone(), topic.clone()) };
    assert!(matches!(recompute::run(&run).await.unwrap(), RunOutcome::Published { .. }));
    let (batch_units, revenue): (i64, i64) = sqlx::query_as(
        "SELECT sum(units)::bigint, sum(revenue_cents)::bigint FROM batch.product_demand_hourly WHERE product_id = 'p-evolve'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((batch_units, revenue), (80, 40_000), "the batch counts both versions");
    let served: i64 = sqlx::query_scalar(
        "SELECT sum(units)::bigint FROM serving.product_demand_hourly WHERE product_id = 'p-evolve'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(served, 80, "batch + speed at the cut: each event once");
    let users: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT user_id) FROM serving.user_product_state WHERE product_id = 'p-evolve'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(users, 14, "user state from both versions");
}
