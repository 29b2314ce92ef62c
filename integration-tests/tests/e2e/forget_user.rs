//! `batch-layer forget-user`: after it, no Parquet file or log entry under
//! the lake and no table with a user column holds the user, also after a
//! full recompute; later events of the user never appear anywhere, while
//! everyone else's keep flowing.

use std::collections::HashSet;
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
use platform::forgotten::{ForgetKey, Mentions};
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
    traces_of(dir, &[user.to_string()])
}

/// [`traces`] of any of `users`, in one pass over the files.
fn traces_of(dir: &Path, users: &[String]) -> Vec<String> {
    let ids: HashSet<&[u8]> = users.iter().map(|u| u.as_bytes()).collect();
    let mentions = Mentions::new(users.iter().map(String::as_str));
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
                            let hit = [s.min_opt(), s.max_opt()].into_iter().flatten().any(|v| ids.contains(v.data()));
                            if hit {
                                found.push(format!("{name}: statistics of {}", c.column_path()));
                            }
                        }
                    }
                }
                for batch in builder.build().unwrap() {
                    let batch = batch.unwrap();
                    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
                        if value_mentions(column.as_ref(), &ids, &mentions) {
                            found.push(format!("{name}: column {}", field.name()));
                        }
                    }
                }
            } else if name.ends_with(".json") || name.contains("_delta_log") {
                let bytes = std::fs::read(&path).unwrap();
                // Log JSON quotes strings with `"` (and escapes them inside
                // predicates as `\"`); SQL text quotes with `'`.
                let text = String::from_utf8_lossy(&bytes).replace("\\\"", "\"").replace('\'', "\"");
                if !mentions.in_record(None, text.as_bytes()).is_empty() {
                    found.push(format!("{name}: log text"));
                }
            }
        }
    }
    assert!(parquet_files > 0, "no Parquet files under {}", dir.display());
    found
}

/// Whether any value of `column` (nested columns included) is one of the
/// ids or quotes one.
fn value_mentions(column: &dyn Array, ids: &HashSet<&[u8]>, mentions: &Mentions) -> bool {
    let hit = |v: &[u8]| ids.contains(v) || !mentions.in_record(None, v).is_empty();
    match column.data_type() {
        DataType::Utf8 => column.as_string::<i32>().iter().flatten().any(|v| hit(v.as_bytes())),
        DataType::LargeUtf8 => column.as_string::<i64>().iter().flatten().any(|v| hit(v.as_bytes())),
        DataType::Utf8View => column.as_string_view().iter().flatten().any(|v| hit(v.as_bytes())),
        DataType::Binary => column.as_binary::<i32>().iter().flatten().any(hit),
        DataType::LargeBinary => column.as_binary::<i64>().iter().flatten().any(hit),
        DataType::Struct(_) => column.as_struct().columns().iter().any(|c| value_mentions(c.as_ref(), ids, mentions)),
        DataType::List(_) => value_mentions(column.as_list::<i32>().values().as_ref(), ids, mentions),
        DataType::Map(_, _) => {
            let m = column.as_map();
            value_mentions(m.keys().as_ref(), ids, mentions) || value_mentions(m.values().as_ref(), ids, mentions)
        }
        DataType::Dictionary(_, _) => {
            let d = column.as_any_dictionary();
            value_mentions(d.values().as_ref(), ids, mentions)
        }
        _ => false,
    }
}

/// Per relation with a `user_id` column (tables and views, every schema),
/// the rows of `user`; plus any `ops` row whose text holds the id.
async fn table_traces(pool: &PgPool, user: &str) -> Vec<(String, i64)> {
    table_traces_of(pool, &[user.to_string()]).await
}

/// [`table_traces`] of any of `users`.
async fn table_traces_of(pool: &PgPool, users: &[String]) -> Vec<(String, i64)> {
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
            sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {schema}.{table} WHERE user_id = ANY($1)")))
                .bind(users)
                .fetch_one(pool)
                .await
                .unwrap();
        out.push((format!("{schema}.{table}"), n));
    }
    for table in ops {
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM ops.{table} t WHERE EXISTS (SELECT 1 FROM unnest($1::text[]) u WHERE position(u in t::text) > 0)"
        )))
        .bind(users)
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

/// A model output file: (user, product) rows with descending scores.
fn write_model(path: &Path, rows: &[(&str, &str)]) {
    let rows: Vec<_> = rows.iter().enumerate().map(|(i, (u, p))| (*u, *p, 1.0 - i as f64 / 10.0, None)).collect();
    integration_tests::serving::write_model_file(path, &rows).unwrap();
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
        ..IngestConfig::catch_up(stack.brokers(), &topic, &lake)
    };
    let run = RunConfig::new(url.clone(), lake.clone(), topic.clone());
    let full = RunConfig { full: true, ..run.clone() };

    generator::run(Args { users: 50, bad_fraction: 0.02, ..Args::for_tests(stack.brokers(), &topic, 17) })
        .await
        .unwrap();
    let speed_shutdown = CancellationToken::new();
    let speed = tokio::spawn(stream::run(
        SpeedConfig {
            forget_key: Some(key.clone()),
            ..SpeedConfig::single_instance(stack.brokers(), &topic, &dlq, &url)
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
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", stack.brokers()).create().unwrap();
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
    // The publish pruned the speed state the batch holds; a new event puts
    // some back.
    send(&producer, &topic, Some(&victim), &event(&victim, 4)).await;
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

    // A training export written before the request holds the user.
    let exports = tempfile::tempdir().unwrap();
    let before_dir = exports.path().join("before");
    let m = batch_layer::export::run(&lake, &before_dir, chrono::Utc::now(), &pool, Some(&key)).await.unwrap();
    assert!(m.export_id.is_some());
    assert!(!traces(&before_dir, &victim).is_empty(), "the export holds the user before the forget");

    let config = ForgetConfig {
        database_url: url.clone(),
        lake: lake.clone(),
        key: key.clone(),
        orphan_grace: Duration::from_secs(600),
        kafka: None,
    };
    let report = forget_user(&config, &victim).await.unwrap();
    assert!(!report.repeated());
    let location = before_dir.canonicalize().unwrap().display().to_string();
    assert!(
        report.exports.iter().any(|(l, n)| *l == location && *n > 0),
        "the earlier export is listed and rewritten: {report:?}"
    );
    assert_eq!(traces(&before_dir, &victim), Vec::<String>::new(), "the export after the forget");
    let rewritten: (i64, bool) = sqlx::query_as(
        "SELECT forgotten_version, rewritten_at IS NOT NULL FROM ops.training_exports WHERE location = $1",
    )
    .bind(&location)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(rewritten, (report.set_version, true));
    let manifest: batch_layer::export::Manifest =
        serde_json::from_slice(&std::fs::read(before_dir.join(batch_layer::export::MANIFEST_FILE)).unwrap()).unwrap();
    assert_eq!(manifest.rows, m.rows - report.exports[0].1, "the manifest counts what is left");
    assert!(manifest.rewritten_at.is_some());
    // An export written after it leaves the user out, and says as of which version.
    let after_dir = exports.path().join("after");
    let after = batch_layer::export::run(&lake, &after_dir, chrono::Utc::now(), &pool, Some(&key)).await.unwrap();
    assert_eq!(after.forgotten_version, report.set_version);
    assert_eq!(traces(&after_dir, &victim), Vec::<String>::new(), "an export after the forget");

    // Re-importing a model trained before the request cannot bring the user back.
    let model = exports.path().join("model.parquet");
    write_model(&model, &[(&victim, "p-1"), (&victim, "p-2"), (control, "p-3")]);
    let e = serving_layer::models::import(&pool, &model, "m2", serving_layer::models::default_validity(), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no FORGET_KEY"), "an import without the key must refuse: {e}");
    let imported =
        serving_layer::models::import(&pool, &model, "m2", serving_layer::models::default_validity(), Some(&key))
            .await
            .unwrap();
    assert_eq!(
        (imported.rows, imported.users, imported.dropped_rows, imported.dropped_users),
        (1, 1, 2, 1),
        "the forgotten user's rows are dropped and counted"
    );
    assert_eq!(report.lake_rows.get("events"), Some(&(lake_before as u64)), "{report:?}");
    assert!(report.lake_rows.get("events_rejected").is_some_and(|n| *n >= 2), "{report:?}");
    assert!(report.table_rows.get("serving.model_recommendations") == Some(&1), "{report:?}");
    assert!(!report.summary().contains(&victim), "the summary must not name the user");

    assert_eq!(traces(dir.path(), &victim), Vec::<String>::new(), "lake files after the forget");
    assert_eq!(table_traces(&pool, &victim).await, Vec::<(String, i64)>::new(), "tables after the forget");
    let audit: (String, i32, bool, bool) = sqlx::query_as(
        "SELECT user_hash, requests, completed_at IS NOT NULL,
                verified IS NOT NULL AND NOT EXISTS (SELECT 1 FROM jsonb_each_text(verified) WHERE value <> '0')
         FROM ops.forgotten_users",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(audit, (key.hash(&victim), 1, true, true), "completed after a clean verification scan");
    assert_eq!(lake_count(&lake, &format!("= '{victim}'")).await, 0);
    assert_eq!(
        lake_count(&lake, &format!("<> '{victim}'")).await,
        others_before,
        "every other user's events stay in the lake"
    );

    // A full recompute from the lake brings nothing back.
    assert!(matches!(recompute::run(&full).await.unwrap(), RunOutcome::Published { .. }));
    assert_eq!(table_traces(&pool, &victim).await, Vec::<(String, i64)>::new(), "tables after run --full");

    // Later events of the user, sent at once (no wait for the speed layer's
    // periodic reload: its flush checks the set's version in its commit),
    // are dropped by the ingest and the speed layer; the control user's go
    // through.
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
    assert!(again.repeated());
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

/// `make up` creates `events` and `events.dlq` with a retention, read back
/// here through the Kafka admin API; `forget-user` reports from it when
/// Kafka's copies of the user's records are gone, and records it in the
/// audit row.
#[tokio::test]
async fn topics_keep_records_for_their_retention_and_forget_reports_it() {
    // The broker `make up` started, whose topics are the subject.
    let stack = Stack::local();
    let expected = std::env::var("TOPIC_RETENTION_MS").unwrap_or_else(|_| "604800000".into());
    for topic in ["events", "events.dlq"] {
        let configs = batch_layer::topics::describe(stack.brokers(), topic).await.unwrap();
        assert_eq!(
            configs.get("retention.ms"),
            Some(&expected),
            "`make up` creates {topic} with retention.ms (a topic created before it has none: `make down clean up`)"
        );
    }
    let (url, pool) = stack.migrated_database("forget_retention", None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = ForgetConfig {
        database_url: url.clone(),
        lake: Lake::parse(dir.path().to_str().unwrap()).unwrap(),
        key: ForgetKey::new(KEY).unwrap(),
        orphan_grace: Duration::from_secs(600),
        kafka: Some(batch_layer::forget::TopicsConfig {
            brokers: stack.brokers().to_string(),
            topics: vec!["events".into(), "events.dlq".into()],
        }),
    };
    let retention = chrono::Duration::milliseconds(expected.parse().unwrap());
    let before = chrono::Utc::now();
    let report = batch_layer::forget::forget_users(&config, &["u-retention".to_string()]).await.unwrap();
    let gone_by = report.topic_copies_gone_by.clone().unwrap();
    assert!(gone_by >= before + retention && gone_by <= chrono::Utc::now() + retention, "{gone_by}");
    assert!(report.summary().contains("Kafka's copies age out by"), "{}", report.summary());
    let recorded: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT topic_copies_gone_by FROM ops.forgotten_users").fetch_one(&pool).await.unwrap();
    assert!((recorded - gone_by).num_milliseconds().abs() <= 1, "audit row {recorded} vs report {gone_by}");

    // A topic without a retention keeps records for ever: said, not hidden.
    let forever = stack.fresh_topic("forget_no_retention", 1).await.unwrap();
    let config = ForgetConfig {
        kafka: Some(batch_layer::forget::TopicsConfig { brokers: stack.brokers().to_string(), topics: vec![forever] }),
        ..config
    };
    let report = batch_layer::forget::forget_users(&config, &["u-retention-2".to_string()]).await.unwrap();
    let why = report.topic_copies_gone_by.unwrap_err();
    assert!(why.contains("retention"), "{why}");
}

/// Records in `topic` (high minus low watermarks).
fn topic_size(brokers: &str, topic: &str) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    (0..4)
        .map(|p| consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).map_or(0, |(low, high)| high - low))
        .sum()
}

/// Records of `topic` whose key is one of `keys` and whose Kafka timestamp
/// is at or after `since`.
fn records_since(brokers: &str, topic: &str, keys: &HashSet<&str>, since: chrono::DateTime<chrono::Utc>) -> usize {
    integration_tests::checks::topic_records(brokers, topic)
        .iter()
        .filter(|r| {
            let key = r.key.as_deref().and_then(|k| std::str::from_utf8(k).ok());
            key.is_some_and(|k| keys.contains(k)) && r.timestamp.is_some_and(|t| t >= since)
        })
        .count()
}

/// Users are forgotten one after another, and a hundred in one request,
/// while traffic flows at a high rate with their events in it, the ingest
/// and the speed layer (in its consumer-group mode) write, and batch runs
/// keep trying: no sleep anywhere. Afterwards no lake file, export or table
/// holds any of them, every request is marked completed, and everyone
/// else's events kept flowing.
#[tokio::test]
async fn users_forgotten_under_traffic_never_come_back() {
    // A broker and a database of its own: the traffic does not load the
    // stack the other tests share (tansu's sqlite engine is the weak spot).
    let stack = integration_tests::private_stack::PrivateStack::start().await.expect("private stack");
    let (topic, dlq) = ("events".to_string(), "events.dlq".to_string());
    stack.create_topic(&topic, 4).await.unwrap();
    stack.create_topic(&dlq, 1).await.unwrap();
    let (url, pool) = stack.create_database("lambda").await.unwrap();
    platform::db::migrate(&pool, Some(1000)).await.unwrap();
    let brokers = stack.brokers();
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::parse(dir.path().to_str().unwrap()).unwrap();
    let key = ForgetKey::new(KEY).unwrap();

    // 150 users, malformed records of 50 `u-bad-*` users, 400 a second
    // (what the local broker takes beside two consumers on two cores; the
    // race is about how often the writers commit: the ingest every 300 ms,
    // the speed layer every 100 ms).
    let args = Args {
        users: 150,
        backfill_hours: 0,
        spikes: Some(0),
        rate: 400.0,
        duration: Duration::from_secs(45),
        bad_fraction: 0.05,
        ..Args::for_tests(&brokers, &topic, 29)
    };
    // The generator is not `Send`: it runs on a thread of its own.
    let traffic = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(generator::run(args))
    });
    let stop = CancellationToken::new();
    let ingest = tokio::spawn(ingest::run(
        IngestConfig {
            flush_interval: Duration::from_millis(300),
            flush_records: 2_000,
            until_caught_up: false,
            db: Some(PlatformDb { key: Some(key.clone()), ..PlatformDb::new(url.clone()) }),
            ..IngestConfig::catch_up(&brokers, &topic, &lake)
        },
        stop.clone(),
    ));
    let speed = tokio::spawn(stream::run(
        SpeedConfig {
            forget_key: Some(key.clone()),
            assignment: speed_layer::stream::Assignment::Group,
            ..SpeedConfig::single_instance(&brokers, &topic, &dlq, &url)
        },
        stop.clone(),
    ));
    let runs = {
        let (run, stop) = (RunConfig::new(url.clone(), lake.clone(), topic.clone()), stop.clone());
        tokio::spawn(async move {
            let mut published = 0;
            while !stop.is_cancelled() {
                if let Ok(RunOutcome::Published { .. }) = recompute::run(&run).await {
                    published += 1;
                }
                // A scheduler's pace, not a busy loop (each run opens its
                // own connections).
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            published
        })
    };
    // Until both layers hold a good part of the traffic.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let lake_rows = match lake.open("events").await.unwrap() {
            Some(_) => lake_count(&lake, "IS NOT NULL").await,
            None => 0,
        };
        let consumed = speed_consumed(&pool).await;
        if lake_rows > 2_000 && consumed > 2_000 {
            break;
        }
        let sent = topic_size(&brokers, &topic);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the layers never got going: {sent} records sent, {lake_rows} in the lake, {consumed} read by the speed layer"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let others_before = lake_count(&lake, "NOT LIKE 'u-0000%'").await;

    let (top,): (String,) = sqlx::query_as(
        "SELECT user_id FROM speed.user_product_state GROUP BY user_id ORDER BY count(*) DESC, user_id LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let hundred: Vec<String> = (0..150).map(|u| format!("u-{u:06}")).filter(|u| *u != top).take(100).collect();
    let config = ForgetConfig {
        database_url: url.clone(),
        lake: lake.clone(),
        key: key.clone(),
        orphan_grace: Duration::from_secs(600),
        kafka: None,
    };
    let since = chrono::Utc::now();
    let started = std::time::Instant::now();
    let first = forget_user(&config, &top).await.unwrap();
    let bad = forget_user(&config, "u-bad-7").await.unwrap();
    let many = batch_layer::forget::forget_users(&config, &hundred).await.unwrap();
    eprintln!("three requests, 102 users, forgotten under traffic in {:?}", started.elapsed());
    assert_eq!(many.users.len(), 100);
    assert!(first.set_version < bad.set_version && bad.set_version < many.set_version);

    tokio::task::spawn_blocking(move || traffic.join()).await.unwrap().unwrap().unwrap();
    let total = topic_size(&brokers, &topic);
    integration_tests::checks::wait_for_speed(&pool, total).await;
    stop.cancel();
    ingest.await.unwrap().unwrap();
    speed.await.unwrap().unwrap();
    let published = runs.await.unwrap();
    // What is left: the ingest to the end of the topic, and a last run.
    ingest::run(
        IngestConfig {
            db: Some(PlatformDb { key: Some(key.clone()), ..PlatformDb::new(url.clone()) }),
            ..IngestConfig::catch_up(&brokers, &topic, &lake)
        },
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let last = recompute::run(&RunConfig::new(url.clone(), lake.clone(), topic.clone())).await.unwrap();
    assert!(matches!(last, RunOutcome::Published { .. } | RunOutcome::Unchanged { .. }), "{last:?}");

    let mut victims = vec![top.clone(), "u-bad-7".to_string()];
    victims.extend(hundred.iter().cloned());
    // Not vacuous: their events kept coming after the first request.
    let keys: HashSet<&str> = victims.iter().map(String::as_str).collect();
    let after = records_since(&brokers, &topic, &keys, since);
    assert!(after > 500, "only {after} records of the forgotten users arrived after the first request");
    assert!(published > 0, "batch runs published while the test ran");

    assert_eq!(traces_of(dir.path(), &victims), Vec::<String>::new(), "lake files");
    assert_eq!(table_traces_of(&pool, &victims).await, Vec::<(String, i64)>::new(), "tables");
    let (requests, completed): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(completed_at) FROM ops.forgotten_users").fetch_one(&pool).await.unwrap();
    assert_eq!((requests, completed), (102, 102), "every request completed after its verification scan");
    assert!(
        lake_count(&lake, "NOT LIKE 'u-0000%'").await > others_before,
        "everyone else's events kept reaching the lake"
    );
}

/// After a publish, the speed rows of `user_product_state` the batch holds
/// are gone, and readers see exactly what they saw before.
#[tokio::test]
async fn speed_state_the_batch_holds_is_pruned_without_changing_what_readers_see() {
    let stack = Stack::from_env();
    let FreshStream { topic, dlq, url, pool } = stack.fresh_stream("speed_prune", 2, 10).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::parse(dir.path().to_str().unwrap()).unwrap();
    generator::run(Args { users: 50, ..Args::for_tests(stack.brokers(), &topic, 41) }).await.unwrap();
    let shutdown = CancellationToken::new();
    let speed =
        tokio::spawn(stream::run(SpeedConfig::single_instance(stack.brokers(), &topic, &dlq, &url), shutdown.clone()));
    wait_for_speed(&stack, &topic, &pool).await;
    let served = |pool: PgPool| async move {
        sqlx::query_as::<_, (i64, String)>(
            "SELECT count(*), md5(string_agg(t::text, ',' ORDER BY user_id, product_id)) FROM serving.user_product_state t",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let speed_rows = |pool: PgPool| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM speed.user_product_state").fetch_one(&pool).await.unwrap()
    };
    // Speed rows the batch row of their key dominates (every measure absent
    // or no newer than the batch's).
    let dominated = |pool: PgPool| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM speed.user_product_state s JOIN batch.user_product_state b USING (user_id, product_id)
             WHERE (s.last_viewed_at IS NULL OR s.last_viewed_at <= b.last_viewed_at)
               AND (s.last_carted_at IS NULL OR s.last_carted_at <= b.last_carted_at)
               AND (s.last_removed_at IS NULL OR s.last_removed_at <= b.last_removed_at)
               AND (s.last_purchased_at IS NULL OR s.last_purchased_at <= b.last_purchased_at)",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let before = served(pool.clone()).await;
    assert!(speed_rows(pool.clone()).await > 100);

    ingest::run(IngestConfig::catch_up(stack.brokers(), &topic, &lake), CancellationToken::new()).await.unwrap();
    let run = RunConfig::new(url.clone(), lake.clone(), topic.clone());
    assert!(matches!(recompute::run(&run).await.unwrap(), RunOutcome::Published { .. }));
    assert_eq!(served(pool.clone()).await, before, "the prune changes nothing readers see");
    let left = speed_rows(pool.clone()).await;
    assert_eq!(dominated(pool.clone()).await, 0, "no speed row the batch holds is left");
    // The cut stops at a segment boundary: what is left comes from above it.
    let above_cut: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(s.next_offset - c.cut_offset), 0)::bigint
         FROM ops.speed_offsets s JOIN ops.cut c USING (kafka_partition)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(left <= above_cut && above_cut < 20, "{left} speed rows left, {above_cut} offsets above the cut");

    // New events live in the speed layer until the next publish.
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", stack.brokers()).create().unwrap();
    for n in 0..6 {
        send(&producer, &topic, Some("u-new"), &event("u-new", n)).await;
    }
    wait_for_speed(&stack, &topic, &pool).await;
    let new: i64 = sqlx::query_scalar("SELECT count(*) FROM speed.user_product_state WHERE user_id = 'u-new'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(new, 5, "the new user's five products");
    let (rows, _) = served(pool.clone()).await;
    assert_eq!(rows, before.0 + 5);

    // An incremental publish prunes against the rows it folded in: fifteen
    // more events of one product put the cut past the new user's first six,
    // so the batch now holds its other four products and their speed rows go.
    // (Told to fold: by default a run leaves the new records to the speed
    // layer, which holds them, and folds them hours later.)
    for n in (10..85).step_by(5) {
        send(&producer, &topic, Some("u-new"), &event("u-new", n)).await;
    }
    wait_for_speed(&stack, &topic, &pool).await;
    let before = served(pool.clone()).await;
    ingest::run(IngestConfig::catch_up(stack.brokers(), &topic, &lake), CancellationToken::new()).await.unwrap();
    let fold = RunConfig { fold_every: std::time::Duration::ZERO, ..run.clone() };
    let outcome = recompute::run(&fold).await.unwrap();
    assert!(matches!(outcome, RunOutcome::Published { hours: Some(_), .. }), "an incremental publish: {outcome:?}");
    assert_eq!(served(pool.clone()).await, before, "the incremental prune changes nothing readers see");
    assert_eq!(dominated(pool.clone()).await, 0, "no speed row the batch holds is left after an incremental publish");
    let kept: Vec<String> =
        sqlx::query_scalar("SELECT product_id FROM speed.user_product_state WHERE user_id = 'u-new' ORDER BY 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(kept.iter().all(|p| p == "p-0"), "only the product with events above the cut stays: {kept:?}");
    shutdown.cancel();
    speed.await.unwrap().unwrap();
}

/// Mistakes on `forget-user`'s command line get one line naming the fix,
/// before anything is connected; ids are never taken from the command line.
#[test]
fn forget_user_command_line_mistakes_get_one_line_naming_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n  \n").unwrap();
    let missing = dir.path().join("missing.txt");
    let cases: [(Vec<&str>, String); 4] = [
        (
            vec!["u-1042"],
            "user ids are not taken on the command line (they would stay in shell history and process lists): put them in a file, one per line, and pass --ids-file FILE (or --ids-file - to read standard input)".into(),
        ),
        (vec![], "give the users to forget with --ids-file FILE (one id per line; - reads standard input)".into()),
        (
            vec!["--ids-file", empty.to_str().unwrap()],
            "no user ids given: put one id per line in the --ids-file (or `-` for standard input)".into(),
        ),
        (
            vec!["--ids-file", missing.to_str().unwrap()],
            format!("reading the ids from {}: No such file or directory (os error 2)", missing.display()),
        ),
    ];
    let lake = dir.path().join("lake");
    let envs = [("FORGET_KEY", KEY), ("LAKE_URI", lake.to_str().unwrap())];
    for (args, expected) in cases {
        let args: Vec<&str> = ["forget-user"].into_iter().chain(args).collect();
        integration_tests::fixture::assert_one_line_error("batch-layer", &args, &envs, &expected);
    }
}

/// The lake keeps unknown fields as sent (`extra`): a field of another
/// user's event that names the forgotten user is cleared (the event stays,
/// counted as before), and the verification scan looks there too.
#[tokio::test]
async fn a_forgotten_user_named_in_another_users_unknown_fields_is_cleared() {
    let stack = Stack::from_env();
    let topic = stack.fresh_topic("forget_extra", 1).await.unwrap();
    let (url, pool) = stack.migrated_database("forget_extra", None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::parse(dir.path().to_str().unwrap()).unwrap();
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", stack.brokers()).create().unwrap();
    let mut gift: serde_json::Value = serde_json::from_str(&event("u-giver", 1)).unwrap();
    gift["gift_for"] = serde_json::json!("u-erase-me");
    gift["note"] = serde_json::json!({"from": "u-giver"});
    send(&producer, &topic, Some("u-giver"), &gift.to_string()).await;
    send(&producer, &topic, Some("u-giver"), &event("u-giver", 2)).await;
    send(&producer, &topic, Some("u-erase-me"), &event("u-erase-me", 3)).await;
    let ingest_config = IngestConfig {
        db: Some(PlatformDb::new(url.clone())),
        ..IngestConfig::catch_up(stack.brokers(), &topic, &lake)
    };
    ingest::run(ingest_config, CancellationToken::new()).await.unwrap();
    let count = |condition: &'static str| {
        let lake = lake.clone();
        async move {
            let table = lake.open("events").await.unwrap().expect("events table");
            let ctx = datafusion::prelude::SessionContext::new();
            batch_layer::lake::register(&ctx, "events", &table).await.unwrap();
            let b = ctx
                .sql(&format!("SELECT count(*) FROM events WHERE {condition}"))
                .await
                .unwrap()
                .collect()
                .await
                .unwrap();
            b[0].column(0).as_primitive::<datafusion::arrow::datatypes::Int64Type>().value(0)
        }
    };
    assert_eq!(count("extra LIKE '%u-erase-me%'").await, 1);

    let config = ForgetConfig {
        database_url: url.clone(),
        lake: lake.clone(),
        key: ForgetKey::new(KEY).unwrap(),
        orphan_grace: Duration::from_secs(0),
        kafka: None,
    };
    let report = forget_user(&config, "u-erase-me").await.unwrap();
    assert_eq!(report.lake_rows.get("events"), Some(&1), "{:?}", report.lake_rows);
    assert_eq!(report.lake_rows.get("events (extra fields naming them, cleared)"), Some(&1), "{:?}", report.lake_rows);
    assert_eq!(count("user_id = 'u-giver'").await, 2, "the giver's events stay");
    assert_eq!(count("extra IS NOT NULL").await, 0);
    assert!(traces(dir.path(), "u-erase-me").is_empty(), "{:?}", traces(dir.path(), "u-erase-me"));
    let completed: bool =
        sqlx::query_scalar("SELECT completed_at IS NOT NULL FROM ops.forgotten_users").fetch_one(&pool).await.unwrap();
    assert!(completed, "verified");
}

/// A batch run whose lock was lost (its session ended while it computed
/// from a snapshot that held the user) cannot publish after a forget: the
/// forget takes a new fencing token, so the run's publish is refused and
/// the user stays gone from `batch.*`.
#[tokio::test]
async fn a_run_that_lost_its_lock_cannot_publish_a_forgotten_user_back() {
    use batch_layer::recompute::{PublishPause, RunError};
    let stack = Stack::from_env();
    // Segment size 1: the batch holds every event.
    let FreshStream { topic, url, pool, .. } = stack.fresh_stream("forget_fenced_run", 2, 1).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::parse(dir.path().to_str().unwrap()).unwrap();
    let key = ForgetKey::new(KEY).unwrap();
    generator::run(Args { users: 50, ..Args::for_tests(stack.brokers(), &topic, 19) }).await.unwrap();
    let ingest_config = IngestConfig {
        db: Some(PlatformDb { key: Some(key.clone()), ..PlatformDb::new(url.clone()) }),
        ..IngestConfig::catch_up(stack.brokers(), &topic, &lake)
    };
    ingest::run(ingest_config, CancellationToken::new()).await.unwrap();
    let full = RunConfig { full: true, ..RunConfig::new(url.clone(), lake.clone(), topic.clone()) };
    assert!(matches!(recompute::run(&full).await.unwrap(), RunOutcome::Published { .. }));
    let (victim,): (String,) =
        sqlx::query_as("SELECT user_id FROM batch.user_product_state GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1")
            .fetch_one(&pool)
            .await
            .unwrap();

    // A run computes from the snapshot that holds the user, and waits at
    // its publish; its lock's session ends meanwhile.
    let pause = PublishPause::default();
    let stale = RunConfig { pause_before_publish: Some(pause.clone()), ..full.clone() };
    let run = tokio::spawn(async move { recompute::run(&stale).await });
    tokio::time::timeout(Duration::from_secs(120), pause.reached.notified()).await.expect("the run computed");
    let ended: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(l.pid) FROM pg_locks l
         JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE l.locktype = 'advisory' AND a.datname = current_database() AND l.granted) t",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(ended, 1, "the run's lock session");

    let config =
        ForgetConfig { database_url: url.clone(), lake, key, orphan_grace: Duration::from_secs(600), kafka: None };
    forget_user(&config, &victim).await.unwrap();
    pause.resume.notify_one();
    match run.await.unwrap() {
        Err(RunError::Fenced { ours, current }) => assert!(current > ours, "tokens {ours} then {current}"),
        other => panic!("the run that lost its lock during the forget ended with {other:?}"),
    }
    assert_eq!(table_traces(&pool, &victim).await, Vec::<(String, i64)>::new(), "the user stays gone");
}
