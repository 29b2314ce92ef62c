//! A view defined in a SQL file, added to a running platform (issue 20).
//!
//! The ingest, the speed layer (its default consumer-group mode) and the
//! schedule run under their own roles, as deployed. The test writes a view
//! file, runs the owner's `serving-layer migrate`, and compares
//! `serving.<view>` with the same measures computed here from the records
//! read back from the topic (not from anything the platform wrote):
//!
//! * right after the registration, before a batch run has published the
//!   view: the events sent after it (the speed layer's part; `serving.views`
//!   says `backfilling`);
//! * once the next batch run landed with its cut past the registration
//!   (`current`): every event, history included, and still every event as
//!   more arrive;
//! * after the file is changed: the new definition over every event, once
//!   the batch recomputed it;
//! * after the file is removed: kept until `--drop-removed-views`, then its
//!   relations are gone and the platform goes on.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use integration_tests::checks::{assert_demand_eq, merged, serving_demand, topic_records, wait_for_speed};
use integration_tests::fixture::{Stack, binary, command, log_tail, role_url, views_dir};
use integration_tests::generator::{self, Args, Truth};
use sqlx::{AssertSqlSafe, PgPool};

const VIEW: &str = "hourly_activity";

/// The view an analyst adds: every measure kind (counts, a filtered sum,
/// a least and a greatest time), over events but removals.
const FILE: &str = "-- Activity per hour and event type, removals aside.
-- readers: dashboard
SELECT date_trunc('hour', e.event_time) AS hour,
       e.event_type AS event_type,
       count(*) AS events,
       sum(CAST(e.quantity AS BIGINT)) FILTER (WHERE e.event_type = 'purchase') AS units,
       min(e.event_time) AS first_at,
       max(e.event_time) AS last_at
FROM events AS e
WHERE e.event_type <> 'remove_from_cart'
GROUP BY 1, 2
";

/// One row of the view: events, units, first and last time.
type Row = (i64, Option<i64>, DateTime<Utc>, DateTime<Utc>);
type Rows = BTreeMap<(DateTime<Utc>, String), Row>;

/// The view computed from the topic's records, each event id once;
/// `removals`: whether `remove_from_cart` events count (the changed file).
fn expected(brokers: &str, topic: &str, removals: bool) -> Rows {
    let mut seen = std::collections::HashSet::new();
    let mut rows = Rows::new();
    for r in topic_records(brokers, topic) {
        let event: serde_json::Value = serde_json::from_slice(&r.payload).expect("the generator sends JSON");
        if !seen.insert(event["event_id"].as_str().unwrap().to_string()) {
            continue;
        }
        let kind = event["event_type"].as_str().unwrap().to_string();
        if kind == "remove_from_cart" && !removals {
            continue;
        }
        let at: DateTime<Utc> = event["event_time"].as_str().unwrap().parse().unwrap();
        let hour = at.duration_trunc(TimeDelta::hours(1)).unwrap();
        // A filtered sum is 0 for a key without a selected event, as in
        // the shipped views.
        let units = if kind == "purchase" { event["quantity"].as_i64().unwrap() } else { 0 };
        let row = rows.entry((hour, kind)).or_insert((0, Some(0), at, at));
        row.0 += 1;
        row.1 = row.1.map(|u| u + units);
        row.2 = row.2.min(at);
        row.3 = row.3.max(at);
    }
    rows
}

type Served = (DateTime<Utc>, String, i64, Option<i64>, DateTime<Utc>, DateTime<Utc>);

async fn served(conn: &mut sqlx::PgConnection) -> Rows {
    let rows: Vec<Served> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT hour, event_type, events, units, first_at, last_at FROM serving.{VIEW}"
    )))
    .fetch_all(conn)
    .await
    .unwrap();
    rows.into_iter().map(|(h, k, n, u, f, l)| ((h, k), (n, u, f, l))).collect()
}

/// The view's state and its rows, read in one snapshot.
async fn snapshot(pool: &PgPool) -> (String, Rows) {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ").execute(&mut *tx).await.unwrap();
    let state: String = sqlx::query_scalar("SELECT state FROM serving.views WHERE name = $1")
        .bind(VIEW)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    let rows = served(&mut tx).await;
    tx.commit().await.unwrap();
    (state, rows)
}

/// Waits until the view is `current` (a batch published it with its cut
/// past where the speed layer started it) and served equals `want`.
async fn wait_current(pool: &PgPool, want: &Rows, logs: &Path) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        let (state, rows) = snapshot(pool).await;
        if state == "current" && rows == *want {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            assert_eq!(state, "current", "schedule log:\n{}", log_tail(&logs.join("schedule.log"), 30));
            assert_rows_eq(&rows, want, "the current view");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn assert_rows_eq(actual: &Rows, want: &Rows, what: &str) {
    for (key, row) in want {
        assert_eq!(actual.get(key), Some(row), "{what}: {key:?}");
    }
    assert_eq!(actual.len(), want.len(), "{what}: rows the events do not make");
}

/// Runs the owner's migrate over `dir`; returns its standard output.
async fn migrate(url: &str, dir: &Path, extra: &[&str]) -> String {
    let out = tokio::process::Command::new(binary("serving-layer"))
        .args(["migrate", "--database-url", url, "--views-dir", dir.to_str().unwrap()])
        .args(extra)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "migrate failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Sends one generator run and waits for the speed layer to hold it.
async fn send(brokers: &str, topic: &str, seed: u64, pool: &PgPool, sent: &mut Vec<Truth>) {
    let truth = generator::run(Args { backfill_hours: 1, ..Args::for_tests(brokers, topic, seed) }).await.unwrap();
    sent.push(truth);
    let total = sent.iter().map(|t| t.events_sent as i64).sum();
    wait_for_speed(pool, total).await;
}

/// Sleeps until `after` seconds past the next multiple of `period`.
async fn just_after_tick(period: u64, after: u64) {
    let now = Utc::now().timestamp_millis() as u64;
    let next = (now / (period * 1000) + 1) * period * 1000 + after * 1000;
    tokio::time::sleep(Duration::from_millis(next - now)).await;
}

#[tokio::test]
async fn a_view_file_added_to_a_running_platform_is_served_exactly() {
    let stack = Stack::from_env();
    let (url, pool) = stack.fresh_database("view_files").await.unwrap();
    let brokers = stack.brokers().to_string();
    let topic = stack.fresh_topic("view_files", 2).await.unwrap();
    let dlq = stack.fresh_topic("view_files_dlq", 1).await.unwrap();
    let lake = tempfile::tempdir().unwrap();
    let lake = lake.path().join("lake");
    let lake = lake.to_str().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let log = |name: &str| Stdio::from(std::fs::File::create(logs.path().join(format!("{name}.log"))).unwrap());

    // The views folder as shipped: the owner's first migrate.
    let folder = tempfile::tempdir().unwrap();
    for file in ["product_demand_hourly.sql", "user_product_state.sql"] {
        std::fs::copy(views_dir().join(file), folder.path().join(file)).unwrap();
    }
    migrate(&url, folder.path(), &["--segment-size", "10"]).await;

    // The platform, each service under its role.
    let batch = role_url(&url, "batch_writer");
    let common = ["--lake-uri", lake, "--topic", &topic, "--ops-addr", "127.0.0.1:0"];
    let _ingest = command("batch-layer", &brokers, &batch, log("ingest"))
        .args(["ingest", "--flush-interval", "1s"])
        .args(common)
        .spawn()
        .unwrap();
    let speed_url = role_url(&url, "speed_writer");
    let group = format!("{topic}.speed");
    let _speed = command("speed-layer", &brokers, &speed_url, log("speed"))
        .args(["run", "--topic", &topic, "--dlq-topic", &dlq, "--group-id", &group, "--ops-addr", "127.0.0.1:0"])
        .spawn()
        .unwrap();
    const EVERY: u64 = 30;
    let _schedule = command("batch-layer", &brokers, &batch, log("schedule"))
        .args(["schedule", "--every", &format!("{EVERY}s"), "--no-catalog", "--maintain-every", "0s"])
        .args(common)
        .spawn()
        .unwrap();

    // History from before the view, published by the batch.
    let mut sent = Vec::new();
    send(&brokers, &topic, 201, &pool, &mut sent).await;
    let history = sent[0].events_sent as i64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    while sqlx::query_scalar::<_, i64>("SELECT COALESCE(sum(cut_offset), 0)::bigint FROM ops.cut")
        .fetch_one(&pool)
        .await
        .unwrap()
        < history - 2 * 10
    {
        assert!(tokio::time::Instant::now() < deadline, "{}", log_tail(&logs.path().join("schedule.log"), 30));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The view file, registered between two runs of the schedule.
    just_after_tick(EVERY, 3).await;
    std::fs::write(folder.path().join(format!("{VIEW}.sql")), FILE).unwrap();
    let out = migrate(&url, folder.path(), &[]).await;
    assert!(out.contains(&format!("views added (the next batch run backfills them): {VIEW}")), "{out}");
    let before = expected(&brokers, &topic, false);

    // Before the batch lands: what the speed layer saw since.
    send(&brokers, &topic, 202, &pool, &mut sent).await;
    let (state, rows) = snapshot(&pool).await;
    assert_eq!(state, "backfilling", "the next run of the schedule came before this check");
    let all = expected(&brokers, &topic, false);
    let mut since = all.clone();
    for (key, old) in &before {
        let row = since.get_mut(key).unwrap();
        if row.0 == old.0 {
            since.remove(key);
        } else {
            // Counts and sums split exactly; times are compared on the whole below.
            *row = (row.0 - old.0, row.1.zip(old.1).map(|(a, b)| a - b), row.2, row.3);
        }
    }
    let counts = |rows: &Rows| -> BTreeMap<_, _> { rows.iter().map(|(k, r)| (k.clone(), (r.0, r.1))).collect() };
    assert_eq!(counts(&rows), counts(&since), "before the batch: the events sent after the registration");
    let dashboard = PgPool::connect(&role_url(&url, "dashboard_reader")).await.unwrap();
    let readable: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM serving.{VIEW}")))
        .fetch_one(&dashboard)
        .await
        .unwrap();
    assert_eq!(readable, rows.len() as i64, "dashboards read the view");

    // After the next batch: every event, history included.
    wait_current(&pool, &all, logs.path()).await;
    // Kept current by the speed layer as more arrive.
    send(&brokers, &topic, 203, &pool, &mut sent).await;
    let (_, rows) = snapshot(&pool).await;
    assert_rows_eq(&rows, &expected(&brokers, &topic, false), "after more events");

    // A changed file: recomputed under its new definition.
    std::fs::write(
        folder.path().join(format!("{VIEW}.sql")),
        FILE.replace("WHERE e.event_type <> 'remove_from_cart'\n", ""),
    )
    .unwrap();
    let out = migrate(&url, folder.path(), &[]).await;
    assert!(out.contains(&format!("views redefined (the next batch run recomputes them): {VIEW}")), "{out}");
    send(&brokers, &topic, 204, &pool, &mut sent).await;
    wait_current(&pool, &expected(&brokers, &topic, true), logs.path()).await;

    // A removed file: kept until the flag says, then dropped.
    std::fs::remove_file(folder.path().join(format!("{VIEW}.sql"))).unwrap();
    let out = migrate(&url, folder.path(), &[]).await;
    assert!(out.contains(&format!("views kept and maintained (--drop-removed-views drops them): {VIEW}")), "{out}");
    let out = migrate(&url, folder.path(), &["--drop-removed-views"]).await;
    assert!(out.contains(&format!("views dropped: {VIEW}")), "{out}");
    for relation in ["serving", "batch", "speed"].map(|s| format!("{s}.{VIEW}")) {
        let exists: Option<String> =
            sqlx::query_scalar("SELECT to_regclass($1)::text").bind(&relation).fetch_one(&pool).await.unwrap();
        assert_eq!(exists, None, "{relation} is dropped");
    }
    // The platform goes on with the shipped views.
    send(&brokers, &topic, 205, &pool, &mut sent).await;
    let truths: Vec<&Truth> = sent.iter().collect();
    assert_demand_eq(&serving_demand(&pool).await, &merged(&truths), "the shipped view after the drop");
}
