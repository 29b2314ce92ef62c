//! The exact merge at the Kafka-offset cut, end to end on the real stack:
//! the speed layer counts everything, a batch run lands (lake snapshot →
//! views → PostgreSQL with its cut, in one transaction), and no number a
//! dashboard reads changes, not even for one read in between.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use batch_layer::ingest::{self, IngestConfig};
use batch_layer::lake::Lake;
use batch_layer::recompute::{self, RunConfig, RunOutcome};
use chrono::{DateTime, Utc};
use integration_tests::checks::{
    DemandMap, assert_demand_eq, assert_tables_match, merged, schema_rows, serving_demand, wait_for_speed, watch_totals,
};
use integration_tests::fixture::{FreshStream, Stack};
use integration_tests::generator::{self, Args, Truth};
use speed_layer::stream::{self, SpeedConfig};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

fn generator_args(stack: &Stack, topic: &str, seed: u64, hours: u32) -> Args {
    Args {
        backfill_hours: hours,
        bad_fraction: 0.02,
        late_fraction: 0.05,
        ..Args::for_tests(stack.brokers(), topic, seed)
    }
}

async fn user_state(pool: &PgPool) -> Vec<(String, String, Option<DateTime<Utc>>, Option<DateTime<Utc>>)> {
    sqlx::query_as(
        "SELECT user_id, product_id, last_viewed_at, last_purchased_at FROM serving.user_product_state ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// The served rows of the example view files, by view.
async fn example_rows(pool: &PgPool) -> BTreeMap<String, Vec<serde_json::Value>> {
    let names = integration_tests::fixture::example_view_names();
    schema_rows(pool, "serving").await.into_iter().filter(|(name, _)| names.contains(&name.as_str())).collect()
}

/// `batch.user_product_state`, every column, in key order.
async fn read_batch_state(pool: &PgPool) -> Vec<serde_json::Value> {
    sqlx::query_scalar("SELECT to_jsonb(b) FROM batch.user_product_state b ORDER BY user_id, product_id")
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn speed_user_state_rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM speed.user_product_state").fetch_one(pool).await.unwrap()
}

type Carts = BTreeMap<(DateTime<Utc>, String), (i64, i64, i64)>;

/// `serving.cart_abandonment_hourly` (a view file): adds, removes, purchases.
async fn carts(pool: &PgPool) -> Carts {
    let rows: Vec<(DateTime<Utc>, String, i64, i64, i64)> = sqlx::query_as(
        "SELECT hour, product_id, cart_adds, cart_removes, purchases FROM serving.cart_abandonment_hourly",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().map(|(h, p, a, r, b)| ((h, p), (a, r, b))).collect()
}

/// The same from the generator's own count of what it sent.
fn expected_carts(demand: &DemandMap) -> Carts {
    demand
        .iter()
        .map(|(k, d)| (k.clone(), (d.cart_adds, d.cart_removes, d.purchases)))
        .filter(|(_, c)| *c != (0, 0, 0))
        .collect()
}

#[tokio::test]
async fn batch_landing_changes_no_serving_number() {
    let stack = Stack::from_env();
    let FreshStream { topic, dlq, url, pool } = stack.fresh_stream("exact_merge", 4, 100).await.unwrap();
    // The example view files, under the same proof as the shipped views.
    integration_tests::fixture::register_examples(&pool).await;
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::parse(dir.path().to_str().unwrap()).unwrap();
    let ingest_config = IngestConfig { flush_records: 5_000, ..IngestConfig::catch_up(stack.brokers(), &topic, &lake) };
    let run_config = RunConfig::new(url.clone(), lake.clone(), topic.clone());

    let shutdown = CancellationToken::new();
    let speed =
        tokio::spawn(stream::run(SpeedConfig::single_instance(stack.brokers(), &topic, &dlq, &url), shutdown.clone()));

    let mut truths: Vec<Truth> = Vec::new();
    let mut total = 0i64;
    let mut batch_state = Vec::new();
    // Round 0 is the first (full) run; round 1 leaves the user-product
    // state's new records to the speed layer, which holds them all; round
    // 2 is told to fold, and folds what round 1 left too.
    for round in 0..3u64 {
        let truth = generator::run(generator_args(&stack, &topic, 40 + round, 3)).await.unwrap();
        total += (truth.events_sent + truth.bad_sent) as i64;
        truths.push(truth);
        let expected = merged(&truths.iter().collect::<Vec<_>>());

        wait_for_speed(&pool, total).await;
        let before = serving_demand(&pool).await;
        assert_demand_eq(&before, &expected, "speed layer alone");
        let users_before = user_state(&pool).await;
        assert_eq!(carts(&pool).await, expected_carts(&expected), "cart_abandonment_hourly, speed layer alone");
        let files_before = example_rows(&pool).await;

        let summary = ingest::run(ingest_config.clone(), CancellationToken::new()).await.unwrap();
        assert!(summary.records > 0);

        let stop = Arc::new(AtomicBool::new(false));
        let watcher = watch_totals(pool.clone(), Arc::clone(&stop));
        // The reader is reading before the run begins (a read takes
        // milliseconds), and once more after it.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let config = match round {
            2 => RunConfig { fold_every: std::time::Duration::ZERO, ..run_config.clone() },
            _ => run_config.clone(),
        };
        let speed_state_before = speed_user_state_rows(&pool).await;
        let outcome = recompute::run(&config).await.unwrap();
        stop.store(true, Ordering::Relaxed);
        let (seen, reads) = watcher.await.unwrap();
        assert!(reads >= 2, "the reader read {reads} times during the batch run");
        let RunOutcome::Published { cut, rows, hours, deferred, .. } = outcome else {
            panic!("round {round}: {outcome:?}")
        };
        eprintln!("round {round}: {reads} reads during the batch landing, totals {seen:?}");
        assert_eq!(seen.len(), 1, "round {round}: a reader saw the totals change while the batch landed: {seen:?}");

        // The cut sits on segment boundaries and covers most of the topic.
        let covered: i64 = cut.iter().map(|(_, o)| o.0).sum();
        assert!(cut.iter().all(|(_, o)| o.0 % 100 == 0), "{cut:?}");
        assert!(covered > total - 4 * 100 && covered <= total, "cut covers {covered} of {total}");
        assert!(rows["product_demand_hourly"] > 0);

        let after = serving_demand(&pool).await;
        assert_demand_eq(&after, &expected, "after the batch landed");
        assert_eq!(user_state(&pool).await, users_before, "round {round}: user_product_state moved");
        assert_tables_match(&example_rows(&pool).await, &files_before, &format!("round {round}: a view file moved"));
        assert_eq!(carts(&pool).await, expected_carts(&expected), "cart_abandonment_hourly after the landing");

        // The user-product state: deferred in round 1 (its batch rows and
        // the speed layer's stay as they were), folded otherwise (the speed
        // rows the batch rows now dominate are gone).
        let pending: Vec<(String,)> =
            sqlx::query_as("SELECT view_name FROM ops.view_folds").fetch_all(&pool).await.unwrap();
        if round == 1 {
            assert_eq!(deferred, ["user_product_state"], "round 1");
            assert!(!rows.contains_key("user_product_state"), "round 1 wrote {rows:?}");
            assert_eq!(read_batch_state(&pool).await, batch_state, "round 1: the batch rows moved");
            assert_eq!(speed_user_state_rows(&pool).await, speed_state_before, "round 1: speed rows were pruned");
            assert_eq!(pending, [("user_product_state".to_string(),)]);
        } else {
            assert!(deferred.is_empty(), "round {round}: {deferred:?}");
            assert!(rows["user_product_state"] > 0, "round {round}: {rows:?}");
            assert!(speed_user_state_rows(&pool).await < speed_state_before, "round {round}: nothing pruned");
            assert!(pending.is_empty(), "round {round}: {pending:?}");
        }
        batch_state = read_batch_state(&pool).await;

        // Speed rows below the cut are gone; the batch holds them now.
        let stale: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM speed.product_demand_hourly s JOIN ops.cut c USING (kafka_partition)
             WHERE (s.segment + 1) * 100 <= c.cut_offset",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(stale, 0);
        let batch_rows: i64 =
            sqlx::query_scalar("SELECT count(*) FROM batch.product_demand_hourly").fetch_one(&pool).await.unwrap();
        match hours {
            // A full run writes the whole view.
            None => assert_eq!(batch_rows as u64, rows["product_demand_hourly"]),
            // An incremental run writes the hours it recomputed; the hours
            // before (the first round's oldest, once the clock passed an
            // hour boundary between the rounds) stay as they were.
            Some(_) => assert!(
                (1..=batch_rows as u64).contains(&rows["product_demand_hourly"]),
                "round {round}: wrote {} rows, the table holds {batch_rows}",
                rows["product_demand_hourly"]
            ),
        }
    }

    // Nothing new in the lake: the next run publishes nothing and says so.
    assert!(matches!(recompute::run(&run_config).await.unwrap(), RunOutcome::Unchanged { .. }));
    let runs: Vec<(String,)> =
        sqlx::query_as("SELECT status FROM ops.batch_runs ORDER BY run_id").fetch_all(&pool).await.unwrap();
    assert_eq!(runs, vec![("published".to_string(),); 3]);

    // The fold of two runs' records is the state a full run computes.
    let full = recompute::run(&RunConfig { full: true, ..run_config.clone() }).await.unwrap();
    assert!(matches!(full, RunOutcome::Published { .. }), "{full:?}");
    assert_eq!(read_batch_state(&pool).await, batch_state, "the folds differ from a full recompute");

    shutdown.cancel();
    speed.await.unwrap().unwrap();
}

/// A run that left the user-product state to the speed layer checks again,
/// in its publish's transaction, that the speed layer still holds what it
/// leaves there: a position that began anew while the run computed (as
/// after a reset) refuses the publish, and the next run folds.
#[tokio::test]
async fn a_deferred_fold_is_refused_when_the_speed_layer_began_anew_during_the_run() {
    use batch_layer::recompute::{PublishPause, RunError};
    let stack = Stack::from_env();
    let FreshStream { topic, dlq, url, pool } = stack.fresh_stream("fold_refused", 2, 100).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::parse(dir.path().to_str().unwrap()).unwrap();
    let ingest_config = IngestConfig::catch_up(stack.brokers(), &topic, &lake);
    let run_config = RunConfig::new(url.clone(), lake.clone(), topic.clone());
    let shutdown = CancellationToken::new();
    let speed =
        tokio::spawn(stream::run(SpeedConfig::single_instance(stack.brokers(), &topic, &dlq, &url), shutdown.clone()));
    let mut total = 0i64;
    for round in 0..2u64 {
        let truth = generator::run(generator_args(&stack, &topic, 50 + round, 2)).await.unwrap();
        total += (truth.events_sent + truth.bad_sent) as i64;
        wait_for_speed(&pool, total).await;
        ingest::run(ingest_config.clone(), CancellationToken::new()).await.unwrap();
        if round == 0 {
            assert!(matches!(recompute::run(&run_config).await.unwrap(), RunOutcome::Published { .. }));
        }
    }
    let cut_before: Vec<(i32, i64)> =
        sqlx::query_as("SELECT kafka_partition, cut_offset FROM ops.cut ORDER BY 1").fetch_all(&pool).await.unwrap();
    let batch_before = read_batch_state(&pool).await;

    let pause = PublishPause::default();
    let paused = RunConfig { pause_before_publish: Some(pause.clone()), ..run_config.clone() };
    let run = tokio::spawn(async move { recompute::run(&paused).await });
    tokio::time::timeout(std::time::Duration::from_secs(300), pause.reached.notified())
        .await
        .expect("the run reached its publish");
    // The positions now begin where they stand: the records between the
    // batch rows and them are no longer known to be in the speed layer.
    sqlx::query("UPDATE ops.speed_offsets SET started_offset = next_offset").execute(&pool).await.unwrap();
    pause.resume.notify_one();
    match run.await.unwrap() {
        Err(RunError::SpeedMoved { view }) => assert_eq!(view, "user_product_state"),
        other => panic!("the run should have been refused: {other:?}"),
    }
    let cut_after: Vec<(i32, i64)> =
        sqlx::query_as("SELECT kafka_partition, cut_offset FROM ops.cut ORDER BY 1").fetch_all(&pool).await.unwrap();
    assert_eq!(cut_after, cut_before, "nothing published");
    assert_eq!(read_batch_state(&pool).await, batch_before, "nothing published");
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.view_folds").fetch_one(&pool).await.unwrap();
    assert_eq!(pending, 0, "no fold recorded as pending");
    let status: (String, Option<String>) =
        sqlx::query_as("SELECT status, message FROM ops.batch_runs ORDER BY run_id DESC LIMIT 1")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(status.0, "failed", "{status:?}");
    assert!(status.1.as_deref().is_some_and(|m| m.contains("speed layer")), "{status:?}");

    // The next run finds the speed layer no longer holds the range and folds.
    let RunOutcome::Published { deferred, rows, .. } = recompute::run(&run_config).await.unwrap() else {
        panic!("the next run did not publish")
    };
    assert!(deferred.is_empty(), "{deferred:?}");
    assert!(rows["user_product_state"] > 0, "{rows:?}");
    let folded = read_batch_state(&pool).await;
    let full = recompute::run(&RunConfig { full: true, ..run_config.clone() }).await.unwrap();
    assert!(matches!(full, RunOutcome::Published { .. }), "{full:?}");
    assert_eq!(read_batch_state(&pool).await, folded, "the fold differs from a full recompute");
    shutdown.cancel();
    speed.await.unwrap().unwrap();
}
