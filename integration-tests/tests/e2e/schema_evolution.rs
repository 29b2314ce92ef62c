//! Schema evolution: events of `schema_version` 2 carrying a field no layer
//! knows yet flow through the lake, the speed layer, the batch and serving
//! exactly like version 1 events; nothing is rejected.

use std::time::Duration;

use batch_layer::ingest::{self, IngestConfig};
use batch_layer::lake::Lake;
use batch_layer::recompute::{self, RunConfig, RunOutcome};
use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::Int64Type;
use integration_tests::fixture::{FreshStream, Stack};
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
    let FreshStream { topic, dlq, url, pool } = stack.fresh_stream("schema_v2", 2, 10).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::parse(dir.path().to_str().unwrap()).unwrap();
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", stack.brokers()).create().unwrap();
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
        SpeedConfig { max_batch: 1_000, ..SpeedConfig::single_instance(stack.brokers(), &topic, &dlq, &url) },
        shutdown.clone(),
    ));
    integration_tests::checks::wait_for_speed(&pool, 40).await;
    shutdown.cancel();
    speed.await.unwrap().unwrap();
    let speed_units: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(units), 0)::bigint FROM serving.product_demand_hourly WHERE product_id = 'p-evolve'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(speed_units, 80, "serving from the speed layer counts both versions");

    let with_db = IngestConfig {
        db: Some(batch_layer::ingest::PlatformDb::new(url.clone())),
        ..IngestConfig::catch_up(stack.brokers(), &topic, &lake)
    };
    let summary = ingest::run(with_db.clone(), CancellationToken::new()).await.unwrap();
    assert_eq!((summary.events, summary.rejected), (40, 0));
    // Noticed, and notified once: the new version and each new field.
    let notified = || async {
        sqlx::query_as::<_, (String, serde_json::Value)>(
            "SELECT kind, details FROM ops.notifications WHERE kind LIKE 'event_%' ORDER BY kind, details::text",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    let first = notified().await;
    let named: Vec<(String, String)> = first
        .iter()
        .map(|(k, d)| (k.clone(), d["field"].as_str().or(d["schema_version"].as_str()).unwrap_or("").to_string()))
        .collect();
    assert_eq!(
        named,
        [
            ("event_field_unknown".to_string(), "coupon_code".to_string()),
            ("event_field_unknown".into(), "device".into()),
            ("event_schema_version_new".into(), "2".into()),
        ]
    );
    let shapes: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT kind, name, events FROM ops.event_shapes ORDER BY kind, name")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(shapes.contains(&("schema_version".into(), "1".into(), 20)), "{shapes:?}");
    assert!(shapes.contains(&("unknown_field".into(), "coupon_code".into(), 20)), "{shapes:?}");
    let table = lake.open("events").await.unwrap().unwrap();
    let ctx = datafusion::prelude::SessionContext::new();
    batch_layer::lake::register(&ctx, "events", &table).await.unwrap();
    let b = ctx.sql("SELECT count(*) FROM events WHERE schema_version = 2").await.unwrap().collect().await.unwrap();
    assert_eq!(b[0].column(0).as_primitive::<Int64Type>().value(0), 20, "the lake keeps the version");
    // And the fields no layer knows yet, as sent, in `extra`: a view
    // defined later reads them with SQL (here the coupon of each event).
    let coupons = ctx
        .sql(
            "SELECT regexp_match(extra, '\"coupon_code\":\"([^\"]*)\"')[1] AS coupon, count(*) AS n
             FROM events GROUP BY 1 ORDER BY 1 NULLS LAST",
        )
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let rows = datafusion::arrow::util::pretty::pretty_format_batches(&coupons).unwrap().to_string();
    assert!(rows.contains("| WINTER26 | 20 |") && rows.contains("|          | 20 |"), "{rows}");
    let device = ctx
        .sql("SELECT count(*) FROM events WHERE extra LIKE '%\"device\":{\"app_version\":\"7.1\",\"os\":\"android\"}%'")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(device[0].column(0).as_primitive::<Int64Type>().value(0), 20, "nested values kept as sent");

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
    // More of the same, ingested later: counted, not notified again.
    for n in 40..50 {
        let payload = event(2, n);
        producer
            .send(FutureRecord::to(&topic).key("u-more").payload(&payload), Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    ingest::run(with_db, CancellationToken::new()).await.unwrap();
    assert_eq!(notified().await, first, "seen again: not notified again");
}

/// Adding a measure to a view is one change in `shared-schema` plus a
/// migration, and the next batch run (incremental, as scheduled) backfills
/// it over all history. The test replays that deploy with a measure that
/// exists, `units`: it publishes, then puts the database where it was
/// before `units` was defined (column gone, the view's recorded definition
/// the one without it), applies the migration a developer would write
/// (`ADD COLUMN units bigint`, appended, NULL everywhere), and lets the next
/// ordinary run catch up.
#[tokio::test]
async fn a_measure_added_to_a_view_is_backfilled_by_the_next_run() {
    use integration_tests::checks::{assert_demand_eq, demand, merged, serving_demand};
    use integration_tests::generator::{self, Args};
    use shared_schema::views::{ViewDef, product_demand_hourly};

    let stack = Stack::from_env();
    let topic = stack.fresh_topic("schema_measure", 2).await.unwrap();
    let (url, pool) = stack.fresh_database("schema_measure").await.unwrap();
    platform::db::migrate(&pool, Some(1)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::parse(dir.path().to_str().unwrap()).unwrap();
    let ingest_config = IngestConfig::catch_up(stack.brokers(), &topic, &lake);
    let run = RunConfig::new(url.clone(), lake.clone(), topic.clone());
    // Later traffic touches only the newest hours, so an ordinary incremental
    // run would leave the older ones without the new measure.
    let args = |seed, hours| Args { backfill_hours: hours, ..Args::for_tests(stack.brokers(), &topic, seed) };

    let first = generator::run(args(31, 8)).await.unwrap();
    ingest::run(ingest_config.clone(), CancellationToken::new()).await.unwrap();
    assert!(matches!(recompute::run(&run).await.unwrap(), RunOutcome::Published { hours: None, .. }));

    // Before `units` existed: no column, and the definition without it on record.
    let without: Vec<_> = product_demand_hourly().measures.iter().copied().filter(|m| m.name != "units").collect();
    let old = ViewDef { measures: Box::leak(without.into_boxed_slice()), ..*product_demand_hourly() };
    sqlx::raw_sql(
        "ALTER TABLE batch.product_demand_hourly__a DROP COLUMN units CASCADE;
         ALTER TABLE batch.product_demand_hourly__b DROP COLUMN units CASCADE;
         ALTER TABLE speed.product_demand_hourly DROP COLUMN units CASCADE;
         SELECT batch.shadow_view('product_demand_hourly');",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("UPDATE ops.view_definitions SET fingerprint = $1 WHERE name = $2")
        .bind(old.fingerprint())
        .bind(old.name)
        .execute(&pool)
        .await
        .unwrap();

    // The deploy: the migration adds the column, and `serving-layer migrate`
    // re-creates the serving views; the binaries carry the definition with
    // `units`.
    sqlx::raw_sql(
        "ALTER TABLE batch.product_demand_hourly__a ADD COLUMN units bigint;
         ALTER TABLE batch.product_demand_hourly__b ADD COLUMN units bigint;
         ALTER TABLE speed.product_demand_hourly ADD COLUMN units bigint;
         SELECT batch.shadow_view('product_demand_hourly');",
    )
    .execute(&pool)
    .await
    .unwrap();
    platform::db::migrate(&pool, None).await.unwrap();
    let missing: i64 = sqlx::query_scalar("SELECT count(*) FROM batch.product_demand_hourly WHERE units IS NULL")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(missing > 0);

    // New traffic, and the next scheduled (incremental) run.
    let second = generator::run(args(32, 1)).await.unwrap();
    ingest::run(ingest_config, CancellationToken::new()).await.unwrap();
    let outcome = recompute::run(&run).await.unwrap();
    let RunOutcome::Published { hours: Some(_), ref backfilled, .. } = outcome else {
        panic!("expected an incremental run, got {outcome:?}")
    };
    assert_eq!(backfilled, &["product_demand_hourly"], "only the changed view is recomputed over all history");
    assert!(recompute::summary(&outcome).contains("whose definition changed"), "{}", recompute::summary(&outcome));
    let missing: i64 = sqlx::query_scalar("SELECT count(*) FROM batch.product_demand_hourly WHERE units IS NULL")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(missing, 0, "every hour has units again");
    let expected = merged(&[&first, &second]);
    assert_demand_eq(&demand(&pool, "batch.product_demand_hourly").await, &expected, "batch after the backfill");
    assert_demand_eq(&serving_demand(&pool).await, &expected, "serving after the backfill");

    // Recorded: the run after that is an ordinary one again.
    let third = generator::run(args(33, 1)).await.unwrap();
    ingest::run(IngestConfig::catch_up(stack.brokers(), &topic, &lake), CancellationToken::new()).await.unwrap();
    let outcome = recompute::run(&run).await.unwrap();
    let RunOutcome::Published { hours: Some(_), ref backfilled, .. } = outcome else { panic!("{outcome:?}") };
    assert!(backfilled.is_empty(), "{backfilled:?}");
    assert_demand_eq(&serving_demand(&pool).await, &merged(&[&first, &second, &third]), "the run after");
}
