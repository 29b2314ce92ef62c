//! Beyond one machine (issue 8), on loopback: the batch on a real Ballista
//! cluster (our scheduler and two executors, separate processes) publishes
//! exactly what the in-process engine publishes, the exact merge holds
//! while a Ballista-run batch lands, and a lake on a local S3 server (moto)
//! serves ingest, both engines, export and forget-user.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use batch_layer::engine::Engine;
use batch_layer::ingest::{self, IngestConfig};
use batch_layer::lake::Lake;
use batch_layer::recompute::{self, RunConfig, RunOutcome};
use integration_tests::checks::{
    assert_demand_eq, assert_tables_match, demand, merged, schema_rows, serving_demand, wait_for_speed, watch_totals,
};
use integration_tests::cluster::{BallistaCluster, S3Server};
use integration_tests::fixture::{Stack, binary};
use integration_tests::generator::{self, Args, Truth};
use speed_layer::stream::{self, SpeedConfig};
use tokio_util::sync::CancellationToken;

fn generator_args(stack: &Stack, topic: &str, seed: u64, sales_url: &str) -> Args {
    Args {
        backfill_hours: 4,
        late_fraction: 0.1,
        bad_fraction: 0.02,
        products: 40,
        categories: 4,
        users: 300,
        no_catalog: false,
        sales_database_url: sales_url.to_string(),
        ..Args::for_tests(stack.brokers(), topic, seed)
    }
}

/// Copies a data file of the table at `table` under a new name in its
/// folder, as a crashed writer leaves one: no commit references it, so
/// neither engine may read it (a directory listing would count it twice).
fn stray_file(table: std::path::PathBuf) {
    let mut stack = vec![table];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() && !path.ends_with("_delta_log") {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "parquet") {
                std::fs::copy(&path, path.with_file_name("part-99999-stray-uncommitted.parquet")).unwrap();
                return;
            }
        }
    }
    panic!("no data file found");
}

#[tokio::test]
async fn ballista_runs_publish_what_in_process_runs_publish_and_the_merge_stays_exact() {
    let stack = Stack::from_env();
    let cluster = BallistaCluster::start(2, &[]).await.unwrap();
    let topic = stack.fresh_topic("scale_out", 4).await.unwrap();
    let dlq = stack.fresh_topic("scale_out_dlq", 1).await.unwrap();
    let (sales_url, _sales) = stack.fresh_database("scale_out_sales").await.unwrap();
    let (local_url, local) = stack.fresh_database("scale_out_local").await.unwrap();
    let (ballista_url, ballista) = stack.fresh_database("scale_out_ballista").await.unwrap();
    platform::db::migrate(&local, Some(100)).await.unwrap();
    platform::db::migrate(&ballista, Some(100)).await.unwrap();
    // The example view files, under the same proof as the shipped views.
    integration_tests::fixture::register_examples(&local).await;
    integration_tests::fixture::register_examples(&ballista).await;
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::parse(dir.path().to_str().unwrap()).unwrap();
    let ingest_config = IngestConfig { flush_records: 5_000, ..IngestConfig::catch_up(stack.brokers(), &topic, &lake) };
    // Every run folds: only the cluster's database has a speed layer to
    // leave a fold to, and the test compares what the engines compute.
    let in_process = RunConfig {
        sales_database_url: Some(sales_url.clone()),
        fold_every: std::time::Duration::ZERO,
        ..RunConfig::new(local_url, lake.clone(), topic.clone())
    };
    let on_cluster = RunConfig {
        engine: Engine::parse(&cluster.engine()).unwrap(),
        ..RunConfig { database_url: ballista_url.clone(), ..in_process.clone() }
    };

    // The speed layer feeds the database the cluster's batches land in.
    let shutdown = CancellationToken::new();
    let speed = tokio::spawn(stream::run(
        SpeedConfig::single_instance(stack.brokers(), &topic, &dlq, &ballista_url),
        shutdown.clone(),
    ));

    let mut truths: Vec<Truth> = Vec::new();
    let mut total = 0i64;
    // Round 0 is a full recompute, round 1 an incremental one after new and
    // late events.
    for round in 0..2u64 {
        let truth = generator::run(generator_args(&stack, &topic, 70 + round, &sales_url)).await.unwrap();
        total += (truth.events_sent + truth.bad_sent) as i64;
        truths.push(truth);
        let expected = merged(&truths.iter().collect::<Vec<_>>());
        wait_for_speed(&ballista, total).await;
        assert_demand_eq(&serving_demand(&ballista).await, &expected, "speed layer alone");
        ingest::run(ingest_config.clone(), CancellationToken::new()).await.unwrap();
        if round == 0 {
            stray_file(dir.path().join("events"));
        }

        let full = round == 0;
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = watch_totals(ballista.clone(), Arc::clone(&stop));
        let outcome = recompute::run(&RunConfig { full, ..on_cluster.clone() }).await;
        stop.store(true, Ordering::Relaxed);
        let (seen, reads) = watcher.await.unwrap();
        let outcome =
            outcome.unwrap_or_else(|e| panic!("round {round}: the Ballista run failed: {e}\n{}", cluster.logs()));
        assert!(matches!(outcome, RunOutcome::Published { .. }), "round {round}: {outcome:?}");
        assert!(reads >= 2, "the reader read {reads} times during the batch run");
        assert_eq!(seen.len(), 1, "round {round}: totals moved while the Ballista batch landed: {seen:?}");
        assert_demand_eq(&serving_demand(&ballista).await, &expected, "after the Ballista batch landed");

        let local_outcome = recompute::run(&RunConfig { full, ..in_process.clone() }).await.unwrap();
        assert!(matches!(local_outcome, RunOutcome::Published { .. }), "round {round}: {local_outcome:?}");
        let (a, b) = (schema_rows(&ballista, "batch").await, schema_rows(&local, "batch").await);
        assert!(
            b["product_demand_hourly"].len() > 100 && !b["item_similarity"].is_empty() && !b["products"].is_empty()
        );
        for name in integration_tests::fixture::example_view_names() {
            assert!(!b[name].is_empty(), "batch.{name} is empty");
        }
        let categories = &b["purchases_per_category_daily"];
        assert!(categories.iter().any(|r| r["category"] != "unknown"), "the catalog view reads the catalog");
        assert_tables_match(&a, &b, &format!("round {round}: batch.* of the Ballista run against the in-process run"));
        let cuts = "SELECT jsonb_object_agg(kafka_partition, cut_offset)::text FROM ops.cut";
        let cut_a: String = sqlx::query_scalar(cuts).fetch_one(&ballista).await.unwrap();
        let cut_b: String = sqlx::query_scalar(cuts).fetch_one(&local).await.unwrap();
        assert_eq!(cut_a, cut_b, "both engines publish the same cut");
    }
    shutdown.cancel();
    speed.await.unwrap().unwrap();
}

/// Runs `batch-layer ARGS` with `env`, returning its stdout; fails the test
/// with its stderr if it fails.
fn batch_layer(args: &[&str], env: &[(&str, String)]) -> String {
    let out = std::process::Command::new(binary("batch-layer"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "batch-layer {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every user id in every Parquet file of the bucket.
async fn users_in_bucket(s3: &S3Server) -> (usize, std::collections::BTreeSet<String>) {
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use futures::TryStreamExt;
    use object_store::{ObjectStore, ObjectStoreExt};
    let store = s3.store().unwrap();
    let objects: Vec<_> = store.list(None).try_collect().await.unwrap();
    let mut files = 0;
    let mut users = std::collections::BTreeSet::new();
    for o in objects.iter().filter(|o| o.location.as_ref().ends_with(".parquet")) {
        files += 1;
        let bytes = store.get(&o.location).await.unwrap().bytes().await.unwrap();
        for batch in ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap().build().unwrap() {
            let batch = batch.unwrap();
            let Some(col) = batch.column_by_name("user_id") else { continue };
            let col = datafusion::arrow::compute::cast(col, &datafusion::arrow::datatypes::DataType::Utf8).unwrap();
            let col = col.as_string::<i32>();
            users.extend((0..col.len()).filter(|i| col.is_valid(*i)).map(|i| col.value(i).to_string()));
        }
    }
    (files, users)
}

#[tokio::test]
async fn a_lake_on_s3_serves_ingest_both_engines_export_and_forget() {
    let stack = Stack::from_env();
    let s3 = S3Server::start("lake").await.unwrap();
    // delta-rs commits with a conditional put (If-None-Match), so two
    // writers can never both create the same log entry; the server must
    // refuse the second.
    {
        use object_store::{ObjectStore, PutMode, PutOptions};
        let store = s3.store().unwrap();
        let path = object_store::path::Path::from("probe/00000000000000000000.json");
        let create = || PutOptions { mode: PutMode::Create, ..Default::default() };
        store.put_opts(&path, "a".into(), create()).await.unwrap();
        let second = store.put_opts(&path, "b".into(), create()).await;
        assert!(
            matches!(second, Err(object_store::Error::AlreadyExists { .. })),
            "the S3 server accepted a second create: {second:?}"
        );
    }
    let mut env = s3.env();
    let cluster = BallistaCluster::start(2, &env).await.unwrap();
    let topic = stack.fresh_topic("s3_lake", 2).await.unwrap();
    let (sales_url, _sales) = stack.fresh_database("s3_lake_sales").await.unwrap();
    let (local_url, local) = stack.fresh_database("s3_lake_local").await.unwrap();
    let (ballista_url, ballista) = stack.fresh_database("s3_lake_ballista").await.unwrap();
    // Segment size 1: the cut is the lake's end, so the batch holds everything.
    platform::db::migrate(&local, Some(1)).await.unwrap();
    platform::db::migrate(&ballista, Some(1)).await.unwrap();
    let truth = generator::run(generator_args(&stack, &topic, 80, &sales_url)).await.unwrap();

    env.extend([
        ("LAKE_URI", s3.uri("shop")),
        ("KAFKA_BROKERS", stack.brokers().to_string()),
        ("EVENTS_TOPIC", topic.clone()),
        ("SALES_DATABASE_URL", sales_url.clone()),
        ("FORGET_KEY", "a-test-key-of-sixteen-or-more".into()),
        ("RUST_LOG", "warn".into()),
    ]);
    let db = |url: &str| ("DATABASE_URL", url.to_string());
    let with = |extra: (&'static str, String)| env.iter().cloned().chain([extra]).collect::<Vec<_>>();

    batch_layer(&["ingest", "--until-caught-up", "--flush-records", "5000"], &with(db(&local_url)));
    batch_layer(&["run", "--full"], &with(db(&local_url)));
    batch_layer(&["run", "--full", "--engine", &cluster.engine()], &with(db(&ballista_url)));
    let expected = truth.demand_map();
    assert_demand_eq(&demand(&local, "batch.product_demand_hourly").await, &expected, "in process, lake on S3");
    assert_demand_eq(&demand(&ballista, "batch.product_demand_hourly").await, &expected, "Ballista, lake on S3");
    assert_tables_match(
        &schema_rows(&ballista, "batch").await,
        &schema_rows(&local, "batch").await,
        "batch.* of the Ballista run against the in-process run, lake on S3",
    );

    let out = tempfile::tempdir().unwrap();
    let export_dir = out.path().join("export");
    batch_layer(&["export-training", "--out", export_dir.to_str().unwrap()], &with(db(&local_url)));
    let manifest: batch_layer::export::Manifest =
        serde_json::from_slice(&std::fs::read(export_dir.join(batch_layer::export::MANIFEST_FILE)).unwrap()).unwrap();
    let interactions: i64 =
        sqlx::query_scalar("SELECT count(*) FROM batch.user_product_state").fetch_one(&local).await.unwrap();
    assert_eq!(manifest.rows as i64, interactions, "the export holds every user and product pair");
    assert!(manifest.lake.starts_with("s3://lake/shop"), "{}", manifest.lake);

    let (files, users) = users_in_bucket(&s3).await;
    assert!(files > 0);
    let user = users.iter().next().expect("some user in the lake").clone();
    let ids = out.path().join("forget.txt");
    std::fs::write(&ids, format!("{user}\n")).unwrap();
    batch_layer(&["forget-user", "--ids-file", ids.to_str().unwrap(), "--orphan-grace", "0s"], &with(db(&local_url)));
    let (_, left) = users_in_bucket(&s3).await;
    assert!(!left.contains(&user), "user {user} is still in a Parquet file of the bucket");
    assert_eq!(left.len(), users.len() - 1, "only that user is gone");
    batch_layer(&["run", "--full", "--engine", &cluster.engine()], &with(db(&local_url)));
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM batch.user_product_state WHERE user_id = $1")
        .bind(&user)
        .fetch_one(&local)
        .await
        .unwrap();
    assert_eq!(rows, 0, "a Ballista recompute after forget-user brings the user back");
}
