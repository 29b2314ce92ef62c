//! `batch-layer forget-user`: after it, no Parquet file or log entry under
//! the lake and no table with a user column holds the user, also after a
//! full recompute; later events of the user never appear anywhere, while
//! everyone else's keep flowing.

use std::path::Path;
use std::time::Duration;

use batch_layer::forget::{ForgetConfig, forget_user};
use batch_layer::ingest::{self, IngestConfig, PlatformDb};
use batch_layer::lake::Lake;
use batch_layer::recompute::{self, RunConfig, RunOutcome};
use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::DataType;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::parquet::file::statistics::Statistics;
use integration_tests::checks::speed_consumed;
use integration_tests::fixture::{FreshStream, Stack};
use integration_tests::generator::{self, Args};
use platform::forgotten::ForgetKey;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use speed_layer::stream::{self, SpeedConfig};
use sqlx::{AssertSqlSafe, PgPool};
use tokio_util::sync::CancellationToken;

const KEY: &str = "test-forget-key-0123456789";

/// Every place under `dir` where `user` appears: Parquet values (strings
/// equal to it or quoting it, bytes quoting it or equal to it), Parquet
/// column statistics, and Delta log JSON quoting it.
fn traces(dir: &Path, user: &str) -> Vec<String> {
    let quoted = format!("\"{user}\"");
    let single = format!("'{user}'");
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut parquet_files = 0;
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let name = path.display().to_string();
            if name.ends_with(".parquet") {
                parquet_files += 1;
                let file = std::fs::File::open(&path).unwrap();
                let builder = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
                for rg in builder.metadata().row_groups() {
                    for c in rg.columns() {
                        if let Some(Statistics::ByteArray(s)) = c.statistics() {
                            let hit =
                                [s.min_opt(), s.max_opt()].into_iter().flatten().any(|v| v.data() == user.as_bytes());
                            if hit {
                                found.push(format!("{name}: statistics of {}", c.column_path()));
                            }
                        }
                    }
                }
                for batch in builder.build().unwrap() {
                    let batch = batch.unwrap();
                    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
                        let hit = value_mentions(column.as_ref(), user, &quoted);
                        if hit {
                            found.push(format!("{name}: column {}", field.name()));
                        }
                    }
                }
            } else if name.ends_with(".json") || name.contains("_delta_log") {
                let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
                if text.contains(&quoted) || text.contains(&single) || text.contains(&format!("\\\"{user}\\\"")) {
                    found.push(format!("{name}: log text"));
                }
            }
        }
    }
    assert!(parquet_files > 0, "no Parquet files under {}", dir.display());
    found
}

/// Whether any value of `column` (nested columns included) is `user` or
/// quotes it.
fn value_mentions(column: &dyn Array, user: &str, quoted: &str) -> bool {
    match column.data_type() {
        DataType::Utf8 => column.as_string::<i32>().iter().flatten().any(|v| v == user || v.contains(quoted)),
        DataType::LargeUtf8 => column.as_string::<i64>().iter().flatten().any(|v| v == user || v.contains(quoted)),
        DataType::Utf8View => column.as_string_view().iter().flatten().any(|v| v == user || v.contains(quoted)),
        DataType::Binary => column.as_binary::<i32>().iter().flatten().any(|v| bytes_mention(v, user, quoted)),
        DataType::LargeBinary => column.as_binary::<i64>().iter().flatten().any(|v| bytes_mention(v, user, quoted)),
        DataType::Struct(_) => column.as_struct().columns().iter().any(|c| value_mentions(c.as_ref(), user, quoted)),
        DataType::List(_) => value_mentions(column.as_list::<i32>().values().as_ref(), user, quoted),
        DataType::Map(_, _) => {
            let m = column.as_map();
            value_mentions(m.keys().as_ref(), user, quoted) || value_mentions(m.values().as_ref(), user, quoted)
        }
        DataType::Dictionary(_, _) => {
            let d = column.as_any_dictionary();
            value_mentions(d.values().as_ref(), user, quoted)
        }
        _ => false,
    }
}

fn bytes_mention(v: &[u8], user: &str, quoted: &str) -> bool {
    v == user.as_bytes() || v.windows(quoted.len()).any(|w| w == quoted.as_bytes())
}

/// Per relation with a `user_id` column (tables and views, every schema),
/// the rows of `user`; plus any `ops` row whose text holds the id.
async fn table_traces(pool: &PgPool, user: &str) -> Vec<(String, i64)> {
    let relations: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_schema::text, table_name::text FROM information_schema.columns
         WHERE column_name = 'user_id' AND table_schema NOT IN ('pg_catalog', 'information_schema')
         ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(relations.len() >= 4, "batch, speed and serving user tables expected: {relations:?}");
    let ops: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'ops' AND table_type = 'BASE TABLE'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut out = Vec::new();
    for (schema, table) in relations {
        let n: i64 =
            sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {schema}.{table} WHERE user_id = $1")))
                .bind(user)
                .fetch_one(pool)
                .await
                .unwrap();
        out.push((format!("{schema}.{table}"), n));
    }
    for table in ops {
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM ops.{table} t WHERE position($1 in t::text) > 0"
        )))
        .bind(user)
        .fetch_one(pool)
        .await
        .unwrap();
        out.push((format!("ops.{table}"), n));
    }
    out.retain(|(_, n)| *n > 0);
    out
}

fn event(user: &str, n: u32) -> String {
    serde_json::json!({
        "event_id": uuid::Uuid::new_v4().to_string(),
        "event_type": if n.is_multiple_of(3) { "purchase" } else { "add_to_cart" },
        "event_time": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "user_id": user,
        "session_id": format!("s-{user}"),
        "product_id": format!("p-{}", n % 5),
        "quantity": 1,
        "price_cents": 999,
        "schema_version": 1,
    })
    .to_string()
}

async fn send(producer: &FutureProducer, topic: &str, key: Option<&str>, payload: &str) {
    let mut record = FutureRecord::to(topic).payload(payload);
    if let Some(k) = key {
        record = record.key(k);
    }
    producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e).unwrap();
}

async fn wait_for_speed(stack: &Stack, topic: &str, pool: &PgPool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let total = stack.topic_size(topic).unwrap_or_else(|e| panic!("topic size of {topic}: {e}"));
    while speed_consumed(pool).await < total {
        assert!(tokio::time::Instant::now() < deadline, "speed layer stuck below {total} offsets");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Events in the lake matching `condition` on `user_id`.
async fn lake_count(lake: &Lake, condition: &str) -> i64 {
    let table = lake.open("events").await.unwrap().expect("events table");
    let ctx = datafusion::prelude::SessionContext::new();
    batch_layer::lake::register(&ctx, "events", &table).await.unwrap();
    let sql = format!("SELECT count(*) FROM events WHERE user_id {condition}");
    let b = ctx.sql(&sql).await.unwrap().collect().await.unwrap();
    b[0].column(0).as_primitive::<datafusion::arrow::datatypes::Int64Type>().value(0)
}

#[tokio::test]
async fn forgotten_user_leaves_no_trace_and_never_comes_back() {
    let stack = Stack::from_env();
    // Small segments: the batch holds most offsets, the speed layer the rest.
    let FreshStream { topic, dlq, url, pool } = stack.fresh_stream("forget_user", 2, 10).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::parse(dir.path().to_str().unwrap()).unwrap();
    let key = ForgetKey::new(KEY).unwrap();
    let ingest_config = IngestConfig {
        flush_records: 2_000,
        db: Some(PlatformDb { key: Some(key.clone()), ..PlatformDb::new(url.clone()) }),
        ..IngestConfig::catch_up(&stack.brokers, &topic, &lake)
    };
    let run = RunConfig::new(url.clone(), lake.clone(), topic.clone());
    let full = RunConfig { full: true, ..run.clone() };

    generator::run(Args { users: 50, bad_fraction: 0.02, ..Args::for_tests(&stack.brokers, &topic, 17) })
        .await
        .unwrap();
    let speed_shutdown = CancellationToken::new();
    let speed = tokio::spawn(stream::run(
        SpeedConfig {
            forget_key: Some(key.clone()),
            ..SpeedConfig::single_instance(&stack.brokers, &topic, &dlq, &url)
        },
        speed_shutdown.clone(),
    ));
    wait_for_speed(&stack, &topic, &pool).await;
    // The most active user, with model recommendations and rejected records.
    let (victim,): (String,) = sqlx::query_as(
        "SELECT user_id FROM speed.user_product_state GROUP BY user_id ORDER BY count(*) DESC, user_id LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let control = "u-control-forget";
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &stack.brokers).create().unwrap();
    let bad_type = event(&victim, 1).replace("add_to_cart", "teleport");
    send(&producer, &topic, Some(&victim), &bad_type).await;
    let truncated = event(&victim, 2);
    send(&producer, &topic, None, &truncated[..truncated.len() - 1]).await;
    sqlx::query(
        "INSERT INTO serving.model_recommendations (user_id, rank, product_id, score, model_version)
         VALUES ($1, 1, 'p-1', 0.9, 'm1'), ($2, 1, 'p-2', 0.8, 'm1')",
    )
    .bind(&victim)
    .bind(control)
    .execute(&pool)
    .await
    .unwrap();
    ingest::run(ingest_config.clone(), CancellationToken::new()).await.unwrap();
    assert!(matches!(recompute::run(&run).await.unwrap(), RunOutcome::Published { .. }));
    wait_for_speed(&stack, &topic, &pool).await;

    // The checks find the user before the forget (they are not vacuous).
    let before = traces(dir.path(), &victim);
    assert!(before.iter().any(|t| t.contains("events_rejected")), "{before:?}");
    assert!(before.iter().any(|t| t.contains("column user_id")), "{before:?}");
    let tables_before = table_traces(&pool, &victim).await;
    for t in ["batch.user_product_state", "speed.user_product_state", "serving.model_recommendations"] {
        assert!(tables_before.iter().any(|(n, _)| n == t), "{t} should hold the user first: {tables_before:?}");
    }
    let lake_before = lake_count(&lake, &format!("= '{victim}'")).await;
    let others_before = lake_count(&lake, &format!("<> '{victim}'")).await;
    assert!(lake_before > 0);

    let config = ForgetConfig {
        database_url: url.clone(),
        lake: lake.clone(),
        key: key.clone(),
        orphan_grace: Duration::from_secs(600),
    };
    let report = forget_user(&config, &victim).await.unwrap();
    assert!(!report.repeated);
    assert_eq!(report.lake_rows.get("events"), Some(&(lake_before as u64)), "{report:?}");
    assert!(report.lake_rows.get("events_rejected").is_some_and(|n| *n >= 2), "{report:?}");
    assert!(report.table_rows.get("serving.model_recommendations") == Some(&1), "{report:?}");
    assert!(!report.summary().contains(&victim), "the summary must not name the user");

    assert_eq!(traces(dir.path(), &victim), Vec::<String>::new(), "lake files after the forget");
    assert_eq!(table_traces(&pool, &victim).await, Vec::<(String, i64)>::new(), "tables after the forget");
    let audit: (String, i32, bool) =
        sqlx::query_as("SELECT user_hash, requests, completed_at IS NOT NULL FROM ops.forgotten_users")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(audit, (key.hash(&victim), 1, true));
    assert_eq!(lake_count(&lake, &format!("= '{victim}'")).await, 0);
    assert_eq!(
        lake_count(&lake, &format!("<> '{victim}'")).await,
        others_before,
        "every other user's events stay in the lake"
    );

    // A full recompute from the lake brings nothing back.
    assert!(matches!(recompute::run(&full).await.unwrap(), RunOutcome::Published { .. }));
    assert_eq!(table_traces(&pool, &victim).await, Vec::<(String, i64)>::new(), "tables after run --full");

    // Later events of the user are dropped by the ingest and the speed
    // layer (which re-reads the forgotten users every 5 s); the control
    // user's go through.
    tokio::time::sleep(Duration::from_secs(6)).await;
    for n in 0..30 {
        send(&producer, &topic, Some(&victim), &event(&victim, n)).await;
        send(&producer, &topic, Some(control), &event(control, n)).await;
    }
    send(&producer, &topic, Some(&victim), &bad_type).await;
    wait_for_speed(&stack, &topic, &pool).await;
    ingest::run(ingest_config.clone(), CancellationToken::new()).await.unwrap();
    let outcome = recompute::run(&run).await.unwrap();
    assert!(matches!(outcome, RunOutcome::Published { .. } | RunOutcome::Unchanged { .. }), "{outcome:?}");
    assert!(matches!(recompute::run(&full).await.unwrap(), RunOutcome::Published { .. }));
    assert_eq!(lake_count(&lake, &format!("= '{control}'")).await, 30, "the control user's events reach the lake");
    let control_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM serving.user_product_state WHERE user_id = $1")
        .bind(control)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(control_rows, 5, "the control user's state is served");
    assert_eq!(traces(dir.path(), &victim), Vec::<String>::new(), "lake files after new events");
    assert_eq!(table_traces(&pool, &victim).await, Vec::<(String, i64)>::new(), "tables after new events");

    // A re-run is harmless and counted.
    let again = forget_user(&config, &victim).await.unwrap();
    assert!(again.repeated);
    assert_eq!(again.lake_rows.values().sum::<u64>() + again.table_rows.values().sum::<u64>(), 0, "{again:?}");
    let requests: i32 = sqlx::query_scalar("SELECT requests FROM ops.forgotten_users").fetch_one(&pool).await.unwrap();
    assert_eq!(requests, 2);

    // A writer with another key (or none) refuses to run.
    let wrong = ForgetKey::new("another-key-0123456789").unwrap();
    let bad = IngestConfig {
        db: Some(PlatformDb { key: Some(wrong), ..PlatformDb::new(url.clone()) }),
        ..ingest_config.clone()
    };
    let e = ingest::run(bad, CancellationToken::new()).await.unwrap_err().to_string();
    assert!(e.contains("FORGET_KEY differs"), "{e}");
    let none = IngestConfig { db: Some(PlatformDb::new(url.clone())), ..ingest_config };
    let e = ingest::run(none, CancellationToken::new()).await.unwrap_err().to_string();
    assert!(e.contains("no FORGET_KEY"), "{e}");

    speed_shutdown.cancel();
    speed.await.unwrap().unwrap();
}
