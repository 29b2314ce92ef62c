//! `batch-layer export-training`: the interactions and the session
//! sequences before a point in time, nothing after it, with a manifest that
//! says so.

use std::collections::BTreeMap;
use std::process::Command;

use batch_layer::export::{DATA_FILE, MANIFEST_FILE, Manifest, SESSIONS_FILE};
use batch_layer::ingest::{self, IngestConfig};
use batch_layer::lake::Lake;
use chrono::{DateTime, SecondsFormat, TimeDelta, Timelike, Utc};
use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{Int64Type, TimestampMicrosecondType};
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use integration_tests::fixture::{Stack, binary};
use integration_tests::generator::{self, Args};
use tokio_util::sync::CancellationToken;

fn event(user: &str, product: &str, kind: &str, at: DateTime<Utc>) -> (String, String) {
    let mut v = serde_json::json!({
        "event_id": uuid::Uuid::new_v4().to_string(),
        "event_type": kind,
        "event_time": at.to_rfc3339_opts(SecondsFormat::Millis, true),
        "user_id": user,
        "session_id": "s-x",
        "product_id": product,
    });
    if kind != "page_view" {
        v["quantity"] = 2.into();
        v["price_cents"] = 150.into();
    }
    (user.to_string(), v.to_string())
}

/// One row of the session sequences: position, event type, product, time (µs).
type SessionEvent = (i64, String, String, i64);

/// Views, purchases, units and the last time of any interaction (µs).
type Interactions = (i64, i64, i64, Option<i64>);

fn read_parquet(path: &std::path::Path) -> Vec<RecordBatch> {
    let file = std::fs::File::open(path).unwrap();
    ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap().map(Result::unwrap).collect()
}

#[tokio::test]
async fn export_holds_exactly_the_interactions_before_the_cutoff() {
    let stack = Stack::from_env();
    let topic = stack.fresh_topic("export", 2).await.unwrap();
    let (url, _pool) = stack.migrated_database("export_training", None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake_dir = dir.path().join("lake");
    let lake = Lake::parse(lake_dir.to_str().unwrap()).unwrap();

    let truth =
        generator::run(Args { backfill_hours: 6, ..Args::for_tests(stack.brokers(), &topic, 101) }).await.unwrap();
    let hours: Vec<DateTime<Utc>> = truth.demand_map().keys().map(|(h, _)| *h).collect();
    let as_of = hours[hours.len() / 2];
    // Hand-made edges: one second before the cut-off counts, the cut-off
    // itself and later do not, whatever order they arrive in.
    let before = as_of - TimeDelta::seconds(1);
    let records = vec![
        event("x-1", "p-x", "page_view", before),
        event("x-1", "p-x", "purchase", before - TimeDelta::minutes(5)),
        event("x-1", "p-x", "purchase", as_of),
        event("x-1", "p-y", "page_view", as_of + TimeDelta::minutes(1)),
        event("x-2", "p-x", "add_to_cart", before - TimeDelta::hours(2)),
    ];
    generator::send_records(stack.brokers(), &topic, &records).unwrap();
    ingest::run(IngestConfig::catch_up(stack.brokers(), &topic, &lake), CancellationToken::new()).await.unwrap();

    let out = dir.path().join("export");
    let status = Command::new(binary("batch-layer"))
        .args(["--lake-uri", lake_dir.to_str().unwrap(), "export-training", "--out", out.to_str().unwrap()])
        .env("DATABASE_URL", &url)
        .args(["--as-of", &as_of.to_rfc3339()])
        .status()
        .unwrap();
    assert!(status.success());

    let manifest: Manifest = serde_json::from_slice(&std::fs::read(out.join(MANIFEST_FILE)).unwrap()).unwrap();
    assert_eq!(manifest.as_of, as_of);
    assert_eq!(manifest.file, DATA_FILE);
    assert!(manifest.columns.iter().any(|c| c.name == "last_purchased_at"));
    let batches = read_parquet(&out.join(DATA_FILE));
    assert_eq!(batches.iter().map(|b| b.num_rows() as u64).sum::<u64>(), manifest.rows);

    // Per (user, product): views, purchases, units and the last time of any interaction.
    let mut rows: BTreeMap<(String, String), Interactions> = BTreeMap::new();
    let mut latest = i64::MIN;
    for b in &batches {
        let s = |n: &str| b.column_by_name(n).unwrap().as_string::<i32>().clone();
        let i = |n: &str| b.column_by_name(n).unwrap().as_primitive::<Int64Type>().clone();
        let t = |n: &str| b.column_by_name(n).unwrap().as_primitive::<TimestampMicrosecondType>().clone();
        let (user, product, views, purchases, units) =
            (s("user_id"), s("product_id"), i("views"), i("purchases"), i("units"));
        let times = ["last_viewed_at", "last_carted_at", "last_removed_at", "last_purchased_at"].map(t);
        for r in 0..b.num_rows() {
            let last = times.iter().filter(|c| c.is_valid(r)).map(|c| c.value(r)).max();
            latest = latest.max(last.unwrap_or(i64::MIN));
            let key = (user.value(r).to_string(), product.value(r).to_string());
            rows.insert(key, (views.value(r), purchases.value(r), units.value(r), last));
        }
    }
    assert!(latest < as_of.timestamp_micros(), "nothing at or after the cut-off");
    let x = |u: &str, p: &str| rows.get(&(u.to_string(), p.to_string())).copied();
    assert_eq!(x("x-1", "p-x"), Some((1, 1, 2, Some(before.timestamp_micros()))));
    assert_eq!(x("x-1", "p-y"), None);
    assert_eq!(x("x-2", "p-x").map(|r| r.0), Some(0));

    // The generated traffic: every view and purchase of the hours before the
    // cut-off (hour boundaries, so the truth's hourly counts apply).
    assert_eq!(as_of.minute(), 0);
    let (mut views, mut purchases) = (0, 0);
    for ((hour, _), d) in truth.demand_map() {
        if hour < as_of {
            views += d.views;
            purchases += d.purchases;
        }
    }
    let generated = rows.iter().filter(|((u, _), _)| !u.starts_with("x-"));
    let (got_views, got_purchases) = generated.fold((0, 0), |(v, p), (_, r)| (v + r.0, p + r.1));
    assert_eq!((got_views, got_purchases), (views, purchases));
    assert!(views > 0);

    // The session sequences: every event before the cut-off, numbered in
    // its session by time.
    let part = manifest.sessions.clone().expect("the manifest lists the session sequences");
    assert_eq!(part.file, SESSIONS_FILE);
    let mut sessions: BTreeMap<(String, String), Vec<SessionEvent>> = BTreeMap::new();
    for b in read_parquet(&out.join(SESSIONS_FILE)) {
        let s = |n: &str| b.column_by_name(n).unwrap().as_string::<i32>().clone();
        let (user, session, kind, product) = (s("user_id"), s("session_id"), s("event_type"), s("product_id"));
        let position = b.column_by_name("position").unwrap().as_primitive::<Int64Type>().clone();
        let at = b.column_by_name("event_time").unwrap().as_primitive::<TimestampMicrosecondType>().clone();
        for r in 0..b.num_rows() {
            let key = (user.value(r).to_string(), session.value(r).to_string());
            let event = (position.value(r), kind.value(r).to_string(), product.value(r).to_string(), at.value(r));
            sessions.entry(key).or_default().push(event);
        }
    }
    let events: usize = sessions.values().map(Vec::len).sum();
    assert_eq!((events as u64, sessions.len() as u64), (part.rows, part.sessions));
    for (key, seq) in &sessions {
        let positions: Vec<i64> = seq.iter().map(|e| e.0).collect();
        assert_eq!(positions, (1..=seq.len() as i64).collect::<Vec<_>>(), "{key:?} in order, numbered from 1");
        assert!(seq.windows(2).all(|w| w[0].3 <= w[1].3), "{key:?} by time: {seq:?}");
        assert!(seq.iter().all(|e| e.3 < as_of.timestamp_micros()), "nothing at or after the cut-off: {key:?}");
    }
    let session = |u: &str| sessions[&(u.to_string(), "s-x".to_string())].clone();
    let micros = |t: DateTime<Utc>| t.timestamp_micros();
    assert_eq!(
        session("x-1"),
        [
            (1, "purchase".into(), "p-x".into(), micros(before - TimeDelta::minutes(5))),
            (2, "page_view".into(), "p-x".into(), micros(before))
        ]
    );
    assert_eq!(session("x-2"), [(1, "add_to_cart".into(), "p-x".into(), micros(before - TimeDelta::hours(2)))]);
    let generated: usize = sessions.iter().filter(|((u, _), _)| !u.starts_with("x-")).map(|(_, s)| s.len()).sum();
    let truth_events: i64 = truth
        .demand_map()
        .iter()
        .filter(|((hour, _), _)| *hour < as_of)
        .map(|(_, d)| d.views + d.cart_adds + d.cart_removes + d.purchases)
        .sum();
    assert_eq!(generated as i64, truth_events, "every generated event before the cut-off, once");

    // A second export into the same folder is refused, not mixed in.
    let again = Command::new(binary("batch-layer"))
        .args(["--lake-uri", lake_dir.to_str().unwrap(), "export-training", "--out", out.to_str().unwrap()])
        .env("DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("not empty") && err.lines().count() == 1, "{err}");
}

/// The rows of an export's data file, as text, in file order.
fn export_rows(dir: &std::path::Path) -> Vec<String> {
    let mut rows = Vec::new();
    for b in read_parquet(&dir.join(DATA_FILE)) {
        let users = b.column_by_name("user_id").unwrap().as_string::<i32>().clone();
        let products = b.column_by_name("product_id").unwrap().as_string::<i32>().clone();
        let views = b.column_by_name("views").unwrap().as_primitive::<Int64Type>().clone();
        for r in 0..b.num_rows() {
            rows.push(format!("{}|{}|{}", users.value(r), products.value(r), views.value(r)));
        }
    }
    rows
}

/// Exports cut by arrival (`--received-by`: what the lake had committed by
/// then) leave out an event that arrived later with an earlier event time;
/// `--version` reproduces an export from its manifest's lake version.
#[tokio::test]
async fn exports_cut_by_arrival_and_reproduce_a_version() {
    let stack = Stack::from_env();
    let topic = stack.fresh_topic("export_arrival", 2).await.unwrap();
    let (url, _pool) = stack.migrated_database("export_arrival", None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake_dir = dir.path().join("lake");
    let lake = Lake::parse(lake_dir.to_str().unwrap()).unwrap();
    let as_of = Utc::now() - TimeDelta::minutes(1);
    let export = |out: &std::path::Path, extra: Vec<String>| {
        let out_arg = out.to_str().unwrap().to_string();
        let status = Command::new(binary("batch-layer"))
            .args(["--lake-uri", lake_dir.to_str().unwrap(), "export-training", "--out", &out_arg])
            .args(["--as-of", &as_of.to_rfc3339()])
            .args(extra)
            .env("DATABASE_URL", &url)
            .status()
            .unwrap();
        assert!(status.success(), "export {out_arg}");
        let manifest: Manifest = serde_json::from_slice(&std::fs::read(out.join(MANIFEST_FILE)).unwrap()).unwrap();
        (manifest, export_rows(out))
    };

    // What had arrived by `received`: one event an hour before the cut-off.
    let early = vec![event("a-1", "p-a", "page_view", as_of - TimeDelta::hours(1))];
    generator::send_records(stack.brokers(), &topic, &early).unwrap();
    ingest::run(IngestConfig::catch_up(stack.brokers(), &topic, &lake), CancellationToken::new()).await.unwrap();
    let first = dir.path().join("first");
    let (first_manifest, first_rows) = export(&first, vec![]);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let received = Utc::now();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;

    // A late event: it arrives after `received`, its time is before the cut-off.
    let late = vec![event("late-1", "p-a", "page_view", as_of - TimeDelta::hours(2))];
    generator::send_records(stack.brokers(), &topic, &late).unwrap();
    ingest::run(IngestConfig::catch_up(stack.brokers(), &topic, &lake), CancellationToken::new()).await.unwrap();

    let (now_manifest, now_rows) = export(&dir.path().join("now"), vec![]);
    assert!(now_rows.iter().any(|r| r.starts_with("late-1|")), "the newest lake holds the late event: {now_rows:?}");
    assert!(now_manifest.delta_version > first_manifest.delta_version);

    let by_arrival = dir.path().join("by_arrival");
    let (arrival_manifest, arrival_rows) = export(&by_arrival, vec!["--received-by".into(), received.to_rfc3339()]);
    assert_eq!(arrival_rows, first_rows, "what had arrived by then, the late event left out");
    assert_eq!(arrival_manifest.delta_version, first_manifest.delta_version);
    assert_eq!(arrival_manifest.received_by, Some(received));

    let again = dir.path().join("again");
    let version = first_manifest.delta_version.to_string();
    let (again_manifest, again_rows) = export(&again, vec!["--version".into(), version]);
    assert_eq!(again_rows, first_rows, "--version reproduces the first export");
    assert_eq!(again_manifest.delta_version, first_manifest.delta_version);
    assert_eq!(again_manifest.rows, first_manifest.rows);

    let missing = Command::new(binary("batch-layer"))
        .args(["--lake-uri", lake_dir.to_str().unwrap(), "export-training", "--version", "999"])
        .args(["--out", dir.path().join("missing").to_str().unwrap()])
        .env("DATABASE_URL", &url)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success() && err.lines().count() == 1, "{err}");
    assert!(err.contains("the lake has no version 999 to export"), "{err}");
}
