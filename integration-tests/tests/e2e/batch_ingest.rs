//! `batch-layer ingest` against the real broker and a real Delta table on
//! disk: every offset lands exactly once, across restarts and kill -9.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use batch_layer::ingest::{self, IngestConfig};
use batch_layer::lake::{self, EVENTS_TABLE, Lake, REJECTED_TABLE};
use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::Int64Type;
use datafusion::prelude::SessionContext;
use integration_tests::fixture::{Stack, binary};
use integration_tests::generator::{self, Args, Truth};
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

fn generator_args(stack: &Stack, topic: &str, seed: u64, hours: u32, rate: f64, bad: f64) -> Args {
    Args { backfill_hours: hours, rate, bad_fraction: bad, ..Args::for_tests(stack.brokers(), topic, seed) }
}

fn config(stack: &Stack, topic: &str, lake: &Lake) -> IngestConfig {
    IngestConfig {
        flush_interval: Duration::from_secs(2),
        flush_records: 2_000,
        ..IngestConfig::catch_up(stack.brokers(), topic, lake)
    }
}

/// (rows, distinct (partition, offset) pairs) of a lake table.
async fn counts(lake: &Lake, table: &str) -> (i64, i64) {
    let Some(t) = lake.open(table).await.unwrap() else { return (0, 0) };
    let ctx = SessionContext::new();
    lake::register(&ctx, "t", &t).await.unwrap();
    let batches = ctx
        .sql("SELECT count(*) AS n, count(DISTINCT CAST(kafka_partition AS BIGINT) * 1000000000000 + kafka_offset) AS d FROM t")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let b = &batches[0];
    (b.column(0).as_primitive::<Int64Type>().value(0), b.column(1).as_primitive::<Int64Type>().value(0))
}

async fn reasons(lake: &Lake) -> BTreeMap<String, u64> {
    let t = lake.open(REJECTED_TABLE).await.unwrap().unwrap();
    let ctx = SessionContext::new();
    lake::register(&ctx, "r", &t).await.unwrap();
    let batches = ctx.sql("SELECT reason, count(*) FROM r GROUP BY reason").await.unwrap().collect().await.unwrap();
    let mut out = BTreeMap::new();
    for b in batches {
        let reason =
            datafusion::arrow::compute::cast(b.column(0), &datafusion::arrow::datatypes::DataType::Utf8).unwrap();
        for i in 0..b.num_rows() {
            out.insert(
                reason.as_string::<i32>().value(i).to_string(),
                b.column(1).as_primitive::<Int64Type>().value(i) as u64,
            );
        }
    }
    out
}

#[tokio::test]
async fn ingest_commits_every_offset_once_and_resumes_from_the_lake() {
    let stack = Stack::from_env();
    let topic = stack.fresh_topic("ingest_resume", 4).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::parse(dir.path().to_str().unwrap()).unwrap();

    let first: Truth = generator::run(generator_args(&stack, &topic, 1, 2, 0.6, 0.05)).await.unwrap();
    let s1 = ingest::run(config(&stack, &topic, &lake), CancellationToken::new()).await.unwrap();
    assert_eq!(s1.events, first.events_sent);
    assert_eq!(s1.rejected, first.bad_sent);
    assert_eq!(counts(&lake, EVENTS_TABLE).await, (first.events_sent as i64, first.events_sent as i64));
    assert_eq!(reasons(&lake).await, first.bad_by_reason, "every rejected record is kept with its reason");

    // Nothing new: a second run reads nothing and commits nothing.
    let idle = ingest::run(config(&stack, &topic, &lake), CancellationToken::new()).await.unwrap();
    assert_eq!((idle.records, idle.commits), (0, 0));

    // More traffic: the next run resumes exactly where the lake ends.
    let second = generator::run(generator_args(&stack, &topic, 2, 1, 0.6, 0.05)).await.unwrap();
    let s2 = ingest::run(config(&stack, &topic, &lake), CancellationToken::new()).await.unwrap();
    assert_eq!(s2.records, second.events_sent + second.bad_sent);
    let total = (first.events_sent + second.events_sent) as i64;
    assert_eq!(counts(&lake, EVENTS_TABLE).await, (total, total));
    let bad = (first.bad_sent + second.bad_sent) as i64;
    assert_eq!(counts(&lake, REJECTED_TABLE).await, (bad, bad));

    // The table's txn offsets are the end of every partition.
    let table = lake.open(EVENTS_TABLE).await.unwrap().unwrap();
    let committed = lake::committed_offsets(&table, &topic, (0..4).map(shared_schema::Partition)).await.unwrap();
    let sum: i64 = committed.values().map(|o| o.0).sum();
    assert_eq!(sum, total + bad, "offsets cover every record, valid or not");
}

/// Kill -9 the ingest process at random moments, restart it each time,
/// then let it catch up: the lake holds every event exactly once.
#[tokio::test]
async fn kill_during_ingest_loses_and_duplicates_nothing() {
    let stack = Stack::from_env();
    let topic = stack.fresh_topic("ingest_kill", 4).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake_path = dir.path().join("lake");
    // The ingest reads the forgotten users from its own database.
    let (url, _pool) = stack.migrated_database("ingest_kill", None).await.unwrap();
    let truth = generator::run(generator_args(&stack, &topic, 3, 6, 4.0, 0.02)).await.unwrap();
    let sent = (truth.events_sent + truth.bad_sent) as i64;
    assert_eq!(stack.topic_size(&topic).unwrap(), sent, "the broker holds exactly what was sent");
    let bin = binary("batch-layer");
    let spawn = |until_caught_up: bool| {
        let mut cmd = tokio::process::Command::new(&bin);
        cmd.args(["ingest", "--topic", &topic, "--flush-records", "400", "--flush-interval", "1s"])
            .args(["--ops-addr", "127.0.0.1:0"])
            .env("KAFKA_BROKERS", stack.brokers())
            .env("LAKE_URI", &lake_path)
            .env("DATABASE_URL", &url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if until_caught_up {
            cmd.arg("--until-caught-up");
        }
        cmd.spawn().unwrap()
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut kills = 0;
    let mut progress = Vec::new();
    let lake = Lake::parse(lake_path.to_str().unwrap()).unwrap();
    let mut last = 0;
    for _ in 0..4 {
        // Kill once this instance has committed something of its own, at a
        // random moment after that: mid-stream, whatever the machine's load.
        let mut child = spawn(false);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while counts(&lake, EVENTS_TABLE).await.0 <= last {
            assert!(tokio::time::Instant::now() < deadline, "a restarted ingest made no progress");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..600))).await;
        child.start_kill().unwrap(); // SIGKILL
        child.wait().await.unwrap();
        kills += 1;
        let (rows, distinct) = counts(&lake, EVENTS_TABLE).await;
        eprintln!("after kill {kills}: {rows} rows in the lake of {} sent", truth.events_sent);
        assert_eq!(rows, distinct, "a kill left a duplicate");
        last = rows;
        progress.push(rows);
    }
    assert!(progress[3] < truth.events_sent as i64, "every kill interrupted the ingest: {progress:?}");
    let status = spawn(true).wait().await.unwrap();
    assert!(status.success(), "final catch-up run failed: {status}");
    let n = truth.events_sent as i64;
    assert_eq!(counts(&lake, EVENTS_TABLE).await, (n, n), "after {kills} kills");
    let bad = truth.bad_sent as i64;
    if counts(&lake, REJECTED_TABLE).await != (bad, bad) {
        let kept = dir.keep();
        eprintln!("lake kept for inspection at {}", kept.display());
    }
    assert_eq!(counts(&lake, REJECTED_TABLE).await, (bad, bad), "rejected records (rows, distinct offsets)");
}

/// A lake written before the `extra` column existed takes it on the next
/// ingest (Delta schema merge): its older rows read it as NULL, nothing is
/// rewritten and every offset still lands once.
#[tokio::test]
async fn a_lake_from_before_the_extra_column_takes_it_on_the_next_write() {
    let stack = Stack::from_env();
    let topic = stack.fresh_topic("ingest_merge", 2).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::parse(dir.path().to_str().unwrap()).unwrap();
    let current = shared_schema::events_schema();
    let fields: Vec<_> = current.fields().iter().filter(|f| f.name() != "extra").cloned().collect();
    let old = datafusion::arrow::datatypes::Schema::new(fields);
    let created = lake.open_or_create(EVENTS_TABLE, &old, &shared_schema::schema::PARTITION_COLUMNS).await.unwrap();
    assert!(created.snapshot().unwrap().schema().field("extra").is_none(), "the old layout");

    let truth = generator::run(generator_args(&stack, &topic, 41, 2, 1.0, 0.0)).await.unwrap();
    ingest::run(config(&stack, &topic, &lake), CancellationToken::new()).await.unwrap();
    let table = lake.open(EVENTS_TABLE).await.unwrap().unwrap();
    assert!(table.snapshot().unwrap().schema().field("extra").is_some(), "merged in");
    let (rows, distinct) = counts(&lake, EVENTS_TABLE).await;
    assert_eq!((rows, distinct), (truth.events_sent as i64, truth.events_sent as i64));
}

/// `batch-layer replay-dlq`: records rejected for a reason that no longer
/// holds (here a clock that ran ahead: `future_event_time`, judged against
/// the record's Kafka timestamp) are sent again once their time has come,
/// counted by the next ingest, and a second replay sends nothing twice.
#[tokio::test]
async fn replaying_the_dlq_counts_each_fixed_record_once() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let stack = Stack::from_env();
    let topic = stack.fresh_topic("replay_dlq", 1).await.unwrap();
    let (url, _pool) = stack.migrated_database("replay_dlq", None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake_path = dir.path().join("lake");
    let lake = Lake::parse(lake_path.to_str().unwrap()).unwrap();
    let producer: FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", stack.brokers()).create().unwrap();
    // Five minutes and ten seconds ahead: rejected now, fine in a few seconds.
    let ahead = chrono::Utc::now() + shared_schema::event::MAX_FUTURE_SKEW + chrono::TimeDelta::seconds(10);
    for n in 0..6 {
        let time = if n % 2 == 0 { ahead } else { chrono::Utc::now() };
        let payload = serde_json::json!({
            "event_id": format!("e-replay-{n}"), "event_type": "page_view",
            "event_time": time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "user_id": format!("u-{n}"), "session_id": "s", "product_id": "p-1",
        })
        .to_string();
        let key = format!("u-{n}");
        producer.send(FutureRecord::to(&topic).key(&key).payload(&payload), Duration::from_secs(30)).await.unwrap();
    }
    let ingest = || {
        let config = IngestConfig {
            db: Some(batch_layer::ingest::PlatformDb::new(url.clone())),
            ..config(&stack, &topic, &lake)
        };
        async move { ingest::run(config, CancellationToken::new()).await.unwrap() }
    };
    let first = ingest().await;
    assert_eq!((first.events, first.rejected), (3, 3));

    let replay = || async {
        let out = tokio::process::Command::new(binary("batch-layer"))
            .args(["replay-dlq", "--reason", "future_event_time", "--topic", &topic])
            .env("KAFKA_BROKERS", stack.brokers())
            .env("LAKE_URI", &lake_path)
            .env("DATABASE_URL", &url)
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    // Too early: the contract still rejects them, nothing is sent.
    let early = replay().await;
    assert!(
        early.contains("3 records rejected as future_event_time: 0 sent") && early.contains("3 still rejected"),
        "{early}"
    );
    let wait = (ahead - shared_schema::event::MAX_FUTURE_SKEW - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_secs(1)).await;
    let sent = replay().await;
    assert!(sent.contains(": 3 sent to"), "{sent}");
    let second = ingest().await;
    assert_eq!((second.events, second.rejected), (3, 0), "the replayed records are counted");
    let again = replay().await;
    assert!(again.contains(": 0 sent to") && again.contains("3 already replayed"), "{again}");
    let third = ingest().await;
    assert_eq!(third.records, 0, "nothing was sent twice");
    let (rows, distinct) = counts(&lake, EVENTS_TABLE).await;
    assert_eq!((rows, distinct), (6, 6));
}

/// `generate --history-end T`: the same seed and end send the same events
/// (what lets `make bench-quality` compare two versions on the same week);
/// another end sends others, and live traffic cannot be combined with it.
#[tokio::test]
async fn a_history_anchored_in_time_is_the_same_on_every_run() {
    let stack = Stack::from_env();
    let end: chrono::DateTime<chrono::Utc> = "2026-11-30T00:00:00Z".parse().unwrap();
    let mut sent = Vec::new();
    for (name, end) in [("anchored_a", end), ("anchored_b", end), ("anchored_c", end + chrono::TimeDelta::hours(1))] {
        let topic = stack.fresh_topic(name, 1).await.unwrap();
        let args = Args { backfill_hours: 3, history_end: Some(end), ..Args::for_tests(stack.brokers(), &topic, 5) };
        let truth = generator::run(args).await.unwrap();
        let mut payloads: Vec<Vec<u8>> =
            integration_tests::checks::topic_records(stack.brokers(), &topic).into_iter().map(|r| r.payload).collect();
        payloads.sort();
        assert_eq!(payloads.len() as u64, truth.events_sent, "{name}");
        sent.push((payloads, truth.spikes));
    }
    assert!(!sent[0].0.is_empty());
    assert_eq!(sent[0], sent[1], "the same seed and end send the same events and spikes");
    assert_ne!(sent[0].0, sent[2].0, "another end sends another week");
    let live = Args {
        backfill_hours: 1,
        duration: Duration::from_secs(1),
        history_end: Some(end),
        ..Args::for_tests(stack.brokers(), "unused", 5)
    };
    let e = generator::run(live).await.unwrap_err().to_string();
    assert!(e.contains("--history-end and --duration exclude each other"), "{e}");
}
