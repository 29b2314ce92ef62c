//! `batch-layer run` guards: a failed quality check publishes nothing and
//! keeps the last good views; overlapping runs cannot both publish; the
//! published tables equal an independent computation.

use std::collections::BTreeMap;

use batch_layer::ingest::{self, IngestConfig};
use batch_layer::lake::Lake;
use batch_layer::recompute::{self, RUN_LOCK, RunConfig, RunOutcome};
use integration_tests::checks::{DemandMap, assert_demand_eq, assert_tables_match, demand, schema_rows};
use integration_tests::fixture::Stack;
use integration_tests::generator::{self, Args};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

fn generator_args(stack: &Stack, topic: &str, seed: u64) -> Args {
    late_args(stack, topic, seed, 0.0)
}

fn late_args(stack: &Stack, topic: &str, seed: u64, late_fraction: f64) -> Args {
    Args { products: 40, categories: 4, users: 300, late_fraction, ..Args::for_tests(stack.brokers(), topic, seed) }
}

async fn batch_demand(pool: &PgPool) -> DemandMap {
    demand(pool, "batch.product_demand_hourly").await
}

#[tokio::test]
async fn quality_gate_and_lock_keep_the_last_good_views() {
    let stack = Stack::from_env();
    let topic = stack.fresh_topic("batch_run", 2).await.unwrap();
    // Segment size 1: the cut is the lake's end, so the batch holds everything.
    let (url, pool) = stack.fresh_database("batch_run").await.unwrap();
    platform::db::migrate(&pool, Some(1)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::parse(dir.path().to_str().unwrap()).unwrap();
    let ingest_config = IngestConfig::catch_up(stack.brokers(), &topic, &lake);
    // Full runs: the row-count check compares whole tables.
    let config = RunConfig { full: true, ..RunConfig::new(url.clone(), lake.clone(), topic.clone()) };

    let truth = generator::run(generator_args(&stack, &topic, 61)).await.unwrap();
    ingest::run(ingest_config.clone(), CancellationToken::new()).await.unwrap();
    assert!(matches!(recompute::run(&config).await.unwrap(), RunOutcome::Published { .. }));
    let good = batch_demand(&pool).await;
    assert_demand_eq(&good, &truth.demand_map(), "batch.product_demand_hourly against the independent computation");

    // New data arrives, but the published view holds far more rows than
    // any new run can have: the row-count check must block the publish.
    generator::run(generator_args(&stack, &topic, 62)).await.unwrap();
    ingest::run(ingest_config.clone(), CancellationToken::new()).await.unwrap();
    integration_tests::checks::inflate_published_demand(&pool, 100_000).await;
    let good = batch_demand(&pool).await;
    let cut_before: Vec<(i32, i64)> =
        sqlx::query_as("SELECT kafka_partition, cut_offset FROM ops.cut ORDER BY 1").fetch_all(&pool).await.unwrap();
    match recompute::run(&config).await.unwrap() {
        RunOutcome::Rejected { report, .. } => {
            assert_eq!(report.failures.len(), 1, "{}", report.summary());
            assert_eq!((report.failures[0].view, report.failures[0].check), ("product_demand_hourly", "row_count"));
        }
        other => panic!("expected the quality gate to reject the run, got {other:?}"),
    }
    assert_eq!(batch_demand(&pool).await, good, "a rejected run publishes nothing");
    let cut_after: Vec<(i32, i64)> =
        sqlx::query_as("SELECT kafka_partition, cut_offset FROM ops.cut ORDER BY 1").fetch_all(&pool).await.unwrap();
    assert_eq!(cut_after, cut_before, "a rejected run moves no cut");
    let status: String = sqlx::query_scalar("SELECT status FROM ops.batch_runs ORDER BY run_id DESC LIMIT 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(status, "rejected");

    // Another run holds the lock: this one cannot publish.
    let mut holder = pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)").bind(RUN_LOCK).execute(&mut *holder).await.unwrap();
    let relaxed = RunConfig { max_shrink: 1.0, ..config.clone() };
    assert_eq!(recompute::run(&relaxed).await.unwrap(), RunOutcome::Busy);
    sqlx::query("SELECT pg_advisory_unlock($1)").bind(RUN_LOCK).execute(&mut *holder).await.unwrap();
    assert!(matches!(recompute::run(&relaxed).await.unwrap(), RunOutcome::Published { .. }));
    assert_ne!(batch_demand(&pool).await, good, "once the lock is free the new data is published");
}

async fn user_state(pool: &PgPool) -> Vec<(String, String, Option<chrono::DateTime<chrono::Utc>>)> {
    sqlx::query_as("SELECT user_id, product_id, last_viewed_at FROM batch.user_product_state ORDER BY 1, 2")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Every batch table's rows as text, numbers rounded to 9 significant
/// digits (parallel float sums may differ in the last bits).
async fn batch_tables(pool: &PgPool) -> Vec<(&'static str, Vec<String>)> {
    let mut out = Vec::new();
    for t in shared_schema::derived::BATCH_TABLES {
        let cols: Vec<String> = t
            .columns
            .iter()
            .map(|(n, ty)| match ty {
                shared_schema::views::SqlType::Double => format!("to_char({n}, '9.99999999EEEE')"),
                _ => format!("{n}::text"),
            })
            .collect();
        let sql = format!("SELECT concat_ws('|', {}) FROM batch.{} ORDER BY 1", cols.join(", "), t.name);
        out.push((t.name, sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_all(pool).await.unwrap()));
    }
    out
}

/// The batch rows of the example view files, by view.
async fn example_rows(pool: &PgPool) -> BTreeMap<String, Vec<serde_json::Value>> {
    let names = integration_tests::fixture::example_view_names();
    schema_rows(pool, "batch").await.into_iter().filter(|(name, _)| names.contains(&name.as_str())).collect()
}

/// Incremental runs (only the hours new events touched, late events
/// included) publish exactly what a full recompute publishes, for the
/// shipped views and for view files.
#[tokio::test]
async fn incremental_runs_equal_a_full_recompute_with_late_events() {
    let stack = Stack::from_env();
    let topic = stack.fresh_topic("incremental", 2).await.unwrap();
    let (url, pool) = stack.fresh_database("incremental").await.unwrap();
    platform::db::migrate(&pool, Some(50)).await.unwrap();
    // The example view files, under the same proof as the shipped views.
    integration_tests::fixture::register_examples(&pool).await;
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::parse(dir.path().to_str().unwrap()).unwrap();
    let ingest_config = IngestConfig { flush_records: 3_000, ..IngestConfig::catch_up(stack.brokers(), &topic, &lake) };
    // Every run recomputes the windowed tables too, so they can be compared.
    let incremental = RunConfig {
        model_refresh: std::time::Duration::ZERO,
        ..RunConfig::new(url.clone(), lake.clone(), topic.clone())
    };

    let mut hours_seen = Vec::new();
    for seed in [71, 72, 73] {
        generator::run(late_args(&stack, &topic, seed, 0.1)).await.unwrap();
        ingest::run(ingest_config.clone(), CancellationToken::new()).await.unwrap();
        match recompute::run(&incremental).await.unwrap() {
            RunOutcome::Published { hours, .. } => hours_seen.push(hours),
            other => panic!("seed {seed}: {other:?}"),
        }
    }
    assert_eq!(hours_seen[0], None, "the first run is a full one");
    assert!(hours_seen[1..].iter().all(|h| h.is_some_and(|h| h > 0)), "{hours_seen:?}");
    let modes: Vec<(String,)> =
        sqlx::query_as("SELECT mode FROM ops.batch_runs ORDER BY run_id").fetch_all(&pool).await.unwrap();
    assert_eq!(modes.iter().map(|m| m.0.as_str()).collect::<Vec<_>>(), ["full", "incremental", "incremental"]);

    let demand = batch_demand(&pool).await;
    let users = user_state(&pool).await;
    let tables = batch_tables(&pool).await;
    // No catalog in this test, so `products` stays empty; the others must not.
    let empty: Vec<_> = tables.iter().filter(|(_, rows)| rows.is_empty()).map(|(name, _)| *name).collect();
    assert_eq!(empty, ["products"]);
    let files = example_rows(&pool).await;
    for (name, rows) in &files {
        assert!(!rows.is_empty(), "batch.{name} is empty");
    }
    let full = RunConfig { full: true, ..incremental.clone() };
    assert!(matches!(recompute::run(&full).await.unwrap(), RunOutcome::Published { hours: None, .. }));
    assert_tables_match(&example_rows(&pool).await, &files, "file-defined views: incremental = full");
    assert_eq!(batch_demand(&pool).await, demand, "product_demand_hourly: incremental = full");
    assert_eq!(user_state(&pool).await, users, "user_product_state: incremental = full");
    assert_eq!(batch_tables(&pool).await, tables, "batch tables: incremental = full");
    assert!(matches!(recompute::run(&incremental).await.unwrap(), RunOutcome::Unchanged { .. }));
}

/// Each run snapshots the shop's catalog into the lake's `products` table;
/// a changed column list is recorded and reported.
#[tokio::test]
async fn catalog_snapshot_lands_in_the_lake_and_schema_changes_are_reported() {
    let stack = Stack::from_env();
    let topic = stack.fresh_topic("catalog", 1).await.unwrap();
    let (sales_url, sales) = stack.fresh_database("catalog_sales").await.unwrap();
    let (url, pool) = stack.fresh_database("catalog").await.unwrap();
    platform::db::migrate(&pool, Some(10)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::parse(dir.path().to_str().unwrap()).unwrap();
    let mut args = generator_args(&stack, &topic, 81);
    args.no_catalog = false;
    args.sales_database_url = sales_url.clone();
    generator::run(args).await.unwrap();

    let first = batch_layer::catalog::snapshot(&sales_url, &lake, &pool).await.unwrap();
    assert_eq!((first.products, first.schema_changed), (40, false));
    let table = lake.open(batch_layer::lake::PRODUCTS_TABLE).await.unwrap().expect("products table");
    let ctx = datafusion::prelude::SessionContext::new();
    batch_layer::lake::register(&ctx, "products", &table).await.unwrap();
    let n = ctx.sql("SELECT count(*) FROM products").await.unwrap().collect().await.unwrap();
    use datafusion::arrow::array::AsArray;
    assert_eq!(n[0].column(0).as_primitive::<datafusion::arrow::datatypes::Int64Type>().value(0), 40);

    // Same schema again: nothing new recorded.
    assert!(!batch_layer::catalog::snapshot(&sales_url, &lake, &pool).await.unwrap().schema_changed);
    sqlx::query("ALTER TABLE products ADD COLUMN brand text").execute(&sales).await.unwrap();
    let changed = batch_layer::catalog::snapshot(&sales_url, &lake, &pool).await.unwrap();
    assert!(changed.schema_changed);
    assert!(changed.columns.iter().any(|(c, _)| c == "brand"));
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.catalog_schema").fetch_one(&pool).await.unwrap();
    assert_eq!(seen, 2);
    let kind: String = sqlx::query_scalar("SELECT kind FROM ops.notifications ORDER BY id DESC LIMIT 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(kind, "catalog_schema_changed");

    // Breaking changes (a column renamed, a column retyped): the lake keeps
    // the last good catalog, and each is notified once, as critical.
    let lake_products = |lake: Lake| async move {
        let ctx = datafusion::prelude::SessionContext::new();
        let table = lake.open(batch_layer::lake::PRODUCTS_TABLE).await.unwrap().expect("products table");
        batch_layer::lake::register(&ctx, "products", &table).await.unwrap();
        let n = ctx.sql("SELECT count(category) FROM products").await.unwrap().collect().await.unwrap();
        n[0].column(0).as_primitive::<datafusion::arrow::datatypes::Int64Type>().value(0)
    };
    let broken_notes = || async {
        sqlx::query_as::<_, (String, String)>(
            "SELECT severity, summary FROM ops.notifications WHERE kind = 'catalog_schema_broken' ORDER BY id",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    for (break_it, problem, mend) in [
        (
            "ALTER TABLE products RENAME COLUMN category TO department",
            "column category is missing",
            "ALTER TABLE products RENAME COLUMN department TO category",
        ),
        (
            "ALTER TABLE products ALTER COLUMN price_cents TYPE text",
            "column price_cents is now text",
            "ALTER TABLE products ALTER COLUMN price_cents TYPE bigint USING price_cents::bigint",
        ),
    ] {
        let before = broken_notes().await.len();
        sqlx::query(break_it).execute(&sales).await.unwrap();
        let broken = batch_layer::catalog::snapshot(&sales_url, &lake, &pool).await.unwrap();
        assert!(broken.broken.as_deref().is_some_and(|p| p.contains(problem)), "{broken:?}");
        assert_eq!(lake_products(lake.clone()).await, 40, "the last good catalog stays");
        // Seen again at the next run: not notified twice.
        assert!(!batch_layer::catalog::snapshot(&sales_url, &lake, &pool).await.unwrap().schema_changed);
        let notes = broken_notes().await;
        assert_eq!(notes.len(), before + 1, "{notes:?}");
        assert_eq!(notes[before].0, "critical");
        assert!(notes[before].1.contains(problem), "{notes:?}");
        sqlx::query(mend).execute(&sales).await.unwrap();
        let mended = batch_layer::catalog::snapshot(&sales_url, &lake, &pool).await.unwrap();
        assert!(mended.broken.is_none() && mended.schema_changed && mended.products == 40, "{mended:?}");
    }

    // A run takes the snapshot itself, and an unreachable shop database does
    // not stop it from publishing.
    let ingest_config = IngestConfig::catch_up(stack.brokers(), &topic, &lake);
    ingest::run(ingest_config, CancellationToken::new()).await.unwrap();
    let config = RunConfig {
        sales_database_url: Some("postgres://postgres@127.0.0.1:1/nowhere".into()),
        ..RunConfig::new(url.clone(), lake.clone(), topic.clone())
    };
    assert!(matches!(recompute::run(&config).await.unwrap(), RunOutcome::Published { .. }));
}
