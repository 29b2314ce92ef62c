//! Data quality on real data (issue 18): bad data fed through the pipeline
//! (Kafka → ingest → lake → run), never edits of `ops` rows. A silent hour,
//! a drop and a flood of products the catalog does not know are notified
//! once and published; a lake that lost records publishes nothing until it
//! is repaired or the loss is accepted. And the duplicates seed each
//! publish continues holds what one read of the lake would.

use std::time::Duration;

use batch_layer::forget::{ForgetConfig, forget_users};
use batch_layer::ingest::{self, IngestConfig};
use batch_layer::lake::{EVENTS_TABLE, Lake};
use batch_layer::recompute::{self, RunConfig, RunOutcome};
use chrono::{DateTime, TimeDelta, Utc};
use integration_tests::fixture::Stack;
use integration_tests::generator::send_records;
use platform::forgotten::ForgetKey;
use shared_schema::schema::Hour;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

fn event(id: &str, user: &str, product: &str, at: DateTime<Utc>) -> (String, String) {
    let v = serde_json::json!({
        "event_id": id,
        "event_type": "page_view",
        "event_time": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "user_id": user,
        "session_id": format!("s-{user}"),
        "product_id": product,
        "schema_version": 1,
    });
    (user.to_string(), v.to_string())
}

async fn ingest(stack: &Stack, topic: &str, lake: &Lake, db: &str) {
    let config = IngestConfig {
        db: Some(ingest::PlatformDb { key: Some(ForgetKey::new(KEY).unwrap()), ..ingest::PlatformDb::new(db) }),
        ..IngestConfig::catch_up(stack.brokers(), topic, lake)
    };
    ingest::run(config, CancellationToken::new()).await.unwrap();
}

const KEY: &str = "test-forget-key-0123456789";

/// A test's own topic (2 partitions), migrated database (segment size 1)
/// and lake.
struct Setup {
    stack: Stack,
    topic: String,
    url: String,
    pool: PgPool,
    lake: Lake,
    _dir: tempfile::TempDir,
}

async fn setup(name: &str) -> Setup {
    let stack = Stack::from_env();
    let topic = stack.fresh_topic(name, 2).await.unwrap();
    let (url, pool) = stack.migrated_database(name, Some(1)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::parse(dir.path().to_str().unwrap()).unwrap();
    Setup { stack, topic, url, pool, lake, _dir: dir }
}

async fn notifications(pool: &PgPool) -> Vec<(String, String)> {
    sqlx::query_as("SELECT kind, summary FROM ops.notifications ORDER BY id").fetch_all(pool).await.unwrap()
}

/// A row of `ops.quality_hours`: hour, events, baseline, findings.
type CheckedHour = (DateTime<Utc>, i64, Option<f64>, Vec<String>);

fn hour_text(h: Hour) -> String {
    h.start().format("%Y-%m-%d %H:00Z").to_string()
}

#[tokio::test]
async fn a_silent_hour_a_drop_and_unknown_products_are_notified_once_and_published() {
    let Setup { stack, topic, url, pool, lake, _dir } = setup("quality_hours").await;
    let (sales_url, sales) = stack.fresh_database("quality_hours_sales").await.unwrap();
    sqlx::query(
        "CREATE TABLE products (product_id text PRIMARY KEY, name text NOT NULL, category text NOT NULL,
                                price_cents bigint NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&sales)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO products (product_id, name, category, price_cents)
         SELECT 'p-' || i, 'Product ' || i, 'c-' || (i % 3), 100 * i FROM generate_series(0, 9) i",
    )
    .execute(&sales)
    .await
    .unwrap();

    // Five days of steady traffic, ten events an hour for known products,
    // up to the hour before this one; on the last day a silent hour, an
    // hour at a third, and an hour where half the events name unknown
    // products.
    let start = Hour::of(Utc::now() - TimeDelta::hours(120));
    let at = |i: i64| Hour::of(start.start() + TimeDelta::hours(i));
    let (silent, low, unknown) = (at(104), at(105), at(106));
    let mut records = Vec::new();
    for i in 0..120 {
        let hour = at(i);
        let n = if hour == silent {
            0
        } else if hour == low {
            3
        } else {
            10
        };
        for j in 0..n {
            let t = hour.start() + TimeDelta::minutes(5 * j);
            records.push(event(&format!("e-{i}-{j}"), &format!("u{}", j % 4), &format!("p-{j}"), t));
            if hour == unknown {
                records.push(event(&format!("x-{i}-{j}"), &format!("u{}", j % 4), &format!("ghost-{j}"), t));
            }
        }
    }
    send_records(stack.brokers(), &topic, &records).unwrap();
    ingest(&stack, &topic, &lake, &url).await;
    let run = RunConfig {
        sales_database_url: Some(sales_url),
        full: true,
        ..RunConfig::new(url.clone(), lake.clone(), topic.clone())
    };
    assert!(matches!(recompute::run(&run).await.unwrap(), RunOutcome::Published { .. }), "findings do not block");

    let seen = notifications(&pool).await;
    let kinds: Vec<&str> = seen.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["missing_hour", "volume_drop", "unknown_products"], "{seen:?}");
    assert!(seen[0].1.contains(&hour_text(silent)), "{seen:?}");
    assert!(seen[1].1.contains(&format!("{} (3 events, usually 10)", hour_text(low))), "{seen:?}");
    assert!(seen[2].1.contains(&format!("{} (10 of 20)", hour_text(unknown))), "{seen:?}");
    // The checked hours: the last day of complete hours, each with what it showed.
    let checked: Vec<CheckedHour> =
        sqlx::query_as("SELECT hour, events, baseline, findings FROM ops.quality_hours ORDER BY hour")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(checked.len(), 24);
    assert_eq!((checked[0].0, checked.last().unwrap().0), (at(94).start(), at(117).start()));
    let flagged: Vec<(DateTime<Utc>, i64, Vec<String>)> =
        checked.iter().filter(|c| !c.3.is_empty()).map(|c| (c.0, c.1, c.3.clone())).collect();
    assert_eq!(
        flagged,
        [
            (silent.start(), 0, vec!["missing_hour".to_string()]),
            (low.start(), 3, vec!["volume_drop".to_string()]),
            (unknown.start(), 20, vec!["unknown_products".to_string()]),
        ]
    );
    assert!(checked.iter().all(|c| c.2 == Some(10.0)), "every checked hour has three earlier days: {checked:?}");

    // More traffic, another run: the hours already checked are not
    // notified again; the newly complete one is fine.
    let more: Vec<_> = (0..10).map(|j| event(&format!("n-{j}"), "u1", "p-1", at(120).start())).collect();
    send_records(stack.brokers(), &topic, &more).unwrap();
    ingest(&stack, &topic, &lake, &url).await;
    assert!(matches!(recompute::run(&run).await.unwrap(), RunOutcome::Published { .. }));
    assert_eq!(notifications(&pool).await.len(), 3, "{:?}", notifications(&pool).await);
    let last: DateTime<Utc> =
        sqlx::query_scalar("SELECT max(hour) FROM ops.quality_hours").fetch_one(&pool).await.unwrap();
    assert_eq!(last, at(118).start());
}

#[tokio::test]
async fn a_lake_that_lost_records_publishes_nothing_until_the_loss_is_accepted() {
    let Setup { stack, topic, url, pool, lake, _dir } = setup("quality_reconcile").await;
    let run = RunConfig { full: true, ..RunConfig::new(url.clone(), lake.clone(), topic.clone()) };

    // Every kind of record the ledger and the two tables must account for:
    // good events, duplicates, malformed records, a user forgotten before
    // the ingest (dropped on the way in) and one forgotten after it (erased).
    let t0 = Hour::of(Utc::now() - TimeDelta::hours(5)).start();
    let mut records = Vec::new();
    for i in 0..300 {
        let user = ["early", "late", "u1", "u2", "u3"][i % 5];
        records.push(event(&format!("e-{i}"), user, &format!("p-{}", i % 7), t0 + TimeDelta::minutes(i as i64)));
    }
    records.extend(records[..20].to_vec());
    records.extend((0..6).map(|i| (format!("u{i}"), format!("{{\"broken\": {i}"))));
    let forget = |ids: &[&str]| {
        let config = ForgetConfig {
            database_url: url.clone(),
            lake: lake.clone(),
            key: ForgetKey::new(KEY).unwrap(),
            orphan_grace: Duration::from_secs(600),
            kafka: None,
        };
        let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        async move { forget_users(&config, &ids).await.unwrap() }
    };
    forget(&["early"]).await;
    send_records(stack.brokers(), &topic, &records).unwrap();
    ingest(&stack, &topic, &lake, &url).await;
    forget(&["late"]).await;
    assert!(matches!(recompute::run(&run).await.unwrap(), RunOutcome::Published { .. }));
    let (unaccounted, account): (i64, serde_json::Value) =
        sqlx::query_as("SELECT unaccounted, account FROM ops.lake_reconciliation").fetch_one(&pool).await.unwrap();
    assert_eq!(unaccounted, 0, "{account}");
    assert_eq!(account["offsets"], 326, "{account}");
    // 60 events of each user; the first 20 sent twice (4 of each user).
    // Dropped on the way in: the early user's 60 events and 4 duplicates;
    // erased: the late user's; rejected: 12 duplicates and 6 malformed.
    assert_eq!(account["forgotten"], 64, "{account}");
    assert_eq!(account["erased"], 64, "{account}");
    assert_eq!(account["rejected"], 18, "{account}");
    assert_eq!(account["events"], 180, "{account}");

    // Rows go missing from the lake behind the platform's back (a data
    // file lost, a clean-up gone wrong): the run refuses to publish.
    let served: i64 = sqlx::query_scalar("SELECT sum(views)::bigint FROM serving.product_demand_hourly")
        .fetch_one(&pool)
        .await
        .unwrap();
    let table = lake.open(EVENTS_TABLE).await.unwrap().unwrap();
    let (_, deleted) = table.delete().with_predicate("user_id = 'u1'").await.unwrap();
    let lost = deleted.num_deleted_rows.unwrap() as i64;
    assert!(lost > 0);
    let RunOutcome::Rejected { report, .. } = recompute::run(&run).await.unwrap() else {
        panic!("a lake that lost records must not publish")
    };
    let summary = report.summary();
    assert!(summary.contains("lake_reconciliation"), "{summary}");
    assert!(summary.contains(&format!("holds or accounts for {} of the 326 offsets", 326 - lost)), "{summary}");
    assert!(summary.contains("partition 0:") || summary.contains("partition 1:"), "{summary}");
    assert!(summary.contains("--accept-lake-loss"), "{summary}");
    let still: i64 = sqlx::query_scalar("SELECT sum(views)::bigint FROM serving.product_demand_hourly")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(still, served, "the last good views keep serving");
    let kinds: Vec<String> = notifications(&pool).await.into_iter().map(|(k, _)| k).collect();
    assert!(kinds.contains(&"quality_check_failed".to_string()), "{kinds:?}");
    // Again, the same: nothing publishes until someone acts.
    assert!(matches!(recompute::run(&run).await.unwrap(), RunOutcome::Rejected { .. }));

    // The operator accepts the loss; only a further loss stops a run again.
    let accepting = RunConfig { accept_lake_loss: Some("u1's file lost in a test".into()), ..run.clone() };
    assert!(matches!(recompute::run(&accepting).await.unwrap(), RunOutcome::Published { .. }));
    let (accepted, reason): (i64, String) =
        sqlx::query_as("SELECT accepted, reason FROM ops.lake_reconciliation").fetch_one(&pool).await.unwrap();
    assert_eq!((accepted, reason.as_str()), (lost, "u1's file lost in a test"));
    let more: Vec<_> = (0..10).map(|i| event(&format!("m-{i}"), "u2", "p-1", t0)).collect();
    send_records(stack.brokers(), &topic, &more).unwrap();
    ingest(&stack, &topic, &lake, &url).await;
    assert!(matches!(recompute::run(&run).await.unwrap(), RunOutcome::Published { .. }));
    let table = lake.open(EVENTS_TABLE).await.unwrap().unwrap();
    table.delete().with_predicate("user_id = 'u2'").await.unwrap();
    assert!(matches!(recompute::run(&run).await.unwrap(), RunOutcome::Rejected { .. }), "a further loss");
}

/// The duplicates seed (`ops.dedup_seed`) is continued from publish to
/// publish with the new offsets' keys (an incremental run reads only
/// those); what it holds is what one read of the lake would give. The
/// newest time each publish records with the cut (read in the scan that
/// finds the touched hours) is the lake's below the cut.
#[tokio::test]
async fn the_duplicates_seed_continued_by_incremental_runs_equals_one_read_whole() {
    let Setup { stack, topic, url, pool, lake, _dir } = setup("seed_continued").await;
    let run = RunConfig::new(url.clone(), lake.clone(), topic.clone());
    let t0 = Hour::of(Utc::now() - TimeDelta::hours(3)).start();
    let seed = || async {
        let rows: Vec<(i32, Vec<u8>, DateTime<Utc>)> =
            sqlx::query_as("SELECT kafka_partition, event_key, event_time FROM ops.dedup_seed ORDER BY 1, 2")
                .fetch_all(&pool)
                .await
                .unwrap();
        rows
    };
    // Per partition, the newest time recorded with the cut, and the
    // lake's newest event below it.
    let newest = || async {
        use datafusion::arrow::array::{Array, AsArray};
        use datafusion::arrow::datatypes::TimestampMicrosecondType;
        let cut: Vec<(i32, i64, Option<DateTime<Utc>>)> =
            sqlx::query_as("SELECT kafka_partition, cut_offset, newest_event_time FROM ops.cut ORDER BY 1")
                .fetch_all(&pool)
                .await
                .unwrap();
        let ctx = datafusion::prelude::SessionContext::new();
        let table = lake.open(EVENTS_TABLE).await.unwrap().unwrap();
        batch_layer::lake::register(&ctx, "events", &table).await.unwrap();
        let mut pairs = Vec::new();
        for (p, cut, recorded) in cut {
            let sql =
                format!("SELECT max(event_time) FROM events WHERE kafka_partition = {p} AND kafka_offset < {cut}");
            let batches = ctx.sql(&sql).await.unwrap().collect().await.unwrap();
            let max = batches[0].column(0).as_primitive::<TimestampMicrosecondType>();
            let lake = (!max.is_null(0)).then(|| DateTime::from_timestamp_micros(max.value(0)).unwrap());
            pairs.push((p, recorded, lake));
        }
        pairs
    };
    for batch in 0..3 {
        // Each batch ten minutes later than the one before.
        let at = |i: i64| t0 + TimeDelta::seconds(600 * batch + i);
        let records: Vec<_> =
            (0..200).map(|i| event(&format!("b{batch}-{i}"), &format!("u{}", i % 9), "p-1", at(i))).collect();
        send_records(stack.brokers(), &topic, &records).unwrap();
        ingest(&stack, &topic, &lake, &url).await;
        assert!(matches!(recompute::run(&run).await.unwrap(), RunOutcome::Published { .. }), "batch {batch}");
        let pairs = newest().await;
        assert!(!pairs.is_empty(), "batch {batch}: no cut");
        for (p, recorded, lake) in pairs {
            assert_eq!(recorded, lake, "batch {batch}, partition {p}: the newest time recorded with the cut");
        }
    }
    let continued = seed().await;
    assert_eq!(continued.len(), 600, "every key of the window, none twice");
    // Forget where the stored seed reaches: the next publish reads it whole.
    sqlx::query("DELETE FROM ops.dedup_seed_cut").execute(&pool).await.unwrap();
    let full = RunConfig { full: true, ..run.clone() };
    assert!(matches!(recompute::run(&full).await.unwrap(), RunOutcome::Published { .. }));
    assert_eq!(seed().await, continued);
}
