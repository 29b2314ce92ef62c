//! `speed-layer run` against the real broker and PostgreSQL: exact totals,
//! every bad record in the DLQ with its reason, and nothing lost or doubled
//! across kill -9.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use chrono::{DateTime, Utc};
use integration_tests::checks::{
    assert_demand_eq, metric_sum, serving_demand, speed_consumed, wait_for_speed, wait_for_speed_within,
};
use integration_tests::fixture::{FreshStream, Stack, binary};
use integration_tests::generator::{self, Args, Truth};
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::{ClientConfig, Message};
use speed_layer::stream::{self, SpeedConfig};
use tokio_util::sync::CancellationToken;

fn generator_args(stack: &Stack, topic: &str, seed: u64, hours: u32, rate: f64, bad: f64) -> Args {
    Args { backfill_hours: hours, rate, bad_fraction: bad, ..Args::for_tests(stack.brokers(), topic, seed) }
}

/// The default flushing: group commit.
fn config(stack: &Stack, url: &str, topic: &str, dlq: &str) -> SpeedConfig {
    SpeedConfig::single_instance(stack.brokers(), topic, dlq, url)
}

/// Reads the whole DLQ topic: per reason, how many records, and checks
/// every one carries its source position.
async fn dlq_reasons(stack: &Stack, dlq: &str, expected: u64) -> BTreeMap<String, u64> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", stack.brokers())
        .set("group.id", format!("{dlq}.check"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[dlq]).unwrap();
    let mut out = BTreeMap::new();
    for _ in 0..expected {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await.expect("DLQ record").unwrap();
        let headers = m.headers().expect("DLQ records carry headers");
        let get = |name: &str| {
            headers
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        assert!(get("source_partition").is_some() && get("source_offset").is_some());
        *out.entry(get("reason").expect("reason header")).or_insert(0) += 1;
    }
    out
}

#[tokio::test]
async fn speed_totals_equal_an_independent_computation_and_bad_records_reach_the_dlq() {
    let stack = Stack::from_env();
    let FreshStream { topic, dlq, url, pool } = stack.fresh_stream("speed_exact", 4, 100).await.unwrap();
    let truth: Truth = generator::run(generator_args(&stack, &topic, 21, 3, 1.0, 0.05)).await.unwrap();

    let shutdown = CancellationToken::new();
    let task = tokio::spawn(stream::run(config(&stack, &url, &topic, &dlq), shutdown.clone()));
    wait_for_speed(&pool, (truth.events_sent + truth.bad_sent) as i64).await;
    shutdown.cancel();
    task.await.unwrap().unwrap();

    assert_demand_eq(&serving_demand(&pool).await, &truth.demand_map(), "serving.product_demand_hourly");
    // Speed rows are tagged by partition and 100-offset segment.
    let segments: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT (kafka_partition, segment)) FROM speed.product_demand_hourly")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(segments > 4, "{segments} segments");
    let last: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT max(last_event_time) FROM ops.speed_offsets").fetch_one(&pool).await.unwrap();
    assert!(last.is_some(), "freshness is recorded");
    assert_eq!(dlq_reasons(&stack, &dlq, truth.bad_sent).await, truth.bad_by_reason);
}

/// kill -9 the speed layer at random moments mid-stream, restart it each
/// time: the totals end exactly right.
#[tokio::test]
async fn kill_during_flush_loses_and_duplicates_nothing() {
    let stack = Stack::from_env();
    let FreshStream { topic, dlq, url, pool } = stack.fresh_stream("speed_kill", 4, 250).await.unwrap();
    let truth = generator::run(generator_args(&stack, &topic, 22, 8, 3.0, 0.01)).await.unwrap();
    let total = (truth.events_sent + truth.bad_sent) as i64;
    let bin = binary("speed-layer");
    let logs = tempfile::tempdir().unwrap();
    let log_path = logs.path().join("speed-layer.log");
    // Each incarnation takes every partition directly (`--assignment all`):
    // positions live in PostgreSQL, so group coordination is irrelevant to
    // exactness, and tansu 0.6.0's group coordinator can keep assigning
    // partitions to a killed member. (Groups are tested in speed_faults.)
    let spawn = |incarnation: u32| {
        let group = format!("{topic}.speed.{incarnation}");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).unwrap();
        tokio::process::Command::new(&bin)
            .args(["run", "--topic", &topic, "--dlq-topic", &dlq, "--group-id", &group])
            .args([
                "--max-batch",
                "300",
                "--flush-interval",
                "50ms",
                "--ops-addr",
                "127.0.0.1:0",
                "--assignment",
                "all",
            ])
            .env("KAFKA_BROKERS", stack.brokers())
            .env("DATABASE_URL", &url)
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut progress = Vec::new();
    let mut last = 0;
    for incarnation in 0..3 {
        // Kill only once this instance is demonstrably mid-stream: it has
        // committed past the previous instance.
        let mut child = spawn(incarnation);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
        while speed_consumed(&pool).await <= last {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a restarted instance made no progress; its log:\n{}",
                integration_tests::fixture::log_tail(&log_path, 15)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..400))).await;
        child.start_kill().unwrap();
        child.wait().await.unwrap();
        last = speed_consumed(&pool).await;
        progress.push(last);
    }
    eprintln!("offsets committed after each kill: {progress:?} of {total}");
    assert!(progress[2] < total, "every kill interrupted the stream: {progress:?} of {total}");
    let mut child = spawn(3);
    wait_for_speed_within(&pool, total, Duration::from_secs(480)).await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    assert_demand_eq(&serving_demand(&pool).await, &truth.demand_map(), "serving.product_demand_hourly");
}

/// SIGTERM makes the binary flush what it holds and exit cleanly: with a
/// flush interval of an hour and no size limit reached, every record is
/// still buffered when the signal comes, and committed exactly once after.
#[tokio::test]
async fn sigterm_flushes_what_is_buffered_and_exits_cleanly() {
    let stack = Stack::from_env();
    let FreshStream { topic, dlq, url, pool } = stack.fresh_stream("speed_sigterm", 2, 100).await.unwrap();
    // Good records only: the flush on the way out then needs PostgreSQL
    // alone (DLQ delivery before a commit is covered by the other tests).
    let truth = generator::run(generator_args(&stack, &topic, 23, 1, 1.0, 0.0)).await.unwrap();
    let total = truth.events_sent;
    let port = integration_tests::fixture::free_port().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let log_path = logs.path().join("speed-layer.log");
    let mut child = tokio::process::Command::new(binary("speed-layer"))
        .args(["run", "--topic", &topic, "--dlq-topic", &dlq, "--group-id", &format!("{topic}.speed")])
        .args(["--assignment", "all", "--flush-interval", "1h", "--max-batch", "10000000"])
        .args(["--ops-addr", &format!("127.0.0.1:{port}")])
        .env("KAFKA_BROKERS", stack.brokers())
        .env("DATABASE_URL", &url)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    // Every record read (and buffered, not yet committed).
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        let read = match integration_tests::serving::get(addr, "/metrics").await {
            Ok(a) => metric_sum(&a.body, "speed_records_total") as u64,
            Err(_) => 0,
        };
        if read == total {
            break;
        }
        assert!(read < total, "read {read} records, the topic holds {total}");
        assert!(tokio::time::Instant::now() < deadline, "read {read} of {total}; log:\n{}", log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(speed_consumed(&pool).await, 0, "nothing is committed before the hour is up");

    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let Ok(status) = tokio::time::timeout(Duration::from_secs(120), child.wait()).await else {
        panic!("still running 120 s after SIGTERM; log:\n{}", log());
    };
    let status = status.unwrap();
    assert!(status.success(), "exit status {status}; log:\n{}", log());
    assert!(log().contains("speed layer stopped cleanly"), "{}", log());
    assert_eq!(speed_consumed(&pool).await, total as i64, "every record committed on the way out");
    assert_demand_eq(&serving_demand(&pool).await, &truth.demand_map(), "serving.product_demand_hourly");
}

/// Mistakes on `speed-layer run`'s command line get one line naming the
/// flag and how to fix it, before anything is connected.
#[test]
fn command_line_mistakes_get_one_line_naming_the_fix() {
    let cases: [(&[&str], &str); 4] = [
        (&["--max-batch", "0"], "--max-batch must be at least 1"),
        (&["--flush-interval", "2h"], "--flush-interval must be at most 1h, e.g. 0s (group commit) or 200ms"),
        (&["--fetch-wait", "0s"], "--fetch-wait must be from 1ms to 300s, e.g. 50ms"),
        (&["--dlq-rate-threshold", "1.5"], "--dlq-rate-threshold must be between 0 and 1, got 1.5"),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = ["run"].into_iter().chain(args.iter().copied()).collect();
        integration_tests::fixture::assert_one_line_error("speed-layer", &args, &[], expected);
    }
}

/// `stream::replay`, the path `bench_speed` measures the layer's own
/// ceiling with (records from memory, no broker), runs the same positions,
/// decode, duplicates rule and fenced commit as `run`: every event counted
/// once, repeated events and a malformed record rejected into the outbox.
/// Each micro-batch is prepared while the one before it commits, so the
/// copy in the micro-batch right after its first is judged against what
/// the uncommitted one staged; the copy at the end, against the committed
/// history.
#[tokio::test]
async fn replay_from_memory_counts_each_event_once() {
    use integration_tests::shop::{Shop, ShopConfig};
    use shared_schema::cut::{Offset, Partition};
    let stack = Stack::from_env();
    let FreshStream { topic, dlq, url, pool } = stack.fresh_stream("speed_replay", 2, 100).await.unwrap();
    let shop = Shop::new(ShopConfig { rate: 5.0, ..ShopConfig::default() });
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let to = Utc::now() - chrono::TimeDelta::hours(1);
    let events = shop.events_between(to - chrono::TimeDelta::hours(1), to, &[], DateTime::<Utc>::MAX_UTC, &mut rng);
    assert!(events.len() > 1_000, "{} events", events.len());
    let mut next = [0i64; 2];
    let mut record = |partition: usize, time: DateTime<Utc>, payload: Vec<u8>| {
        let r = stream::ReplayRecord {
            partition: Partition(partition as i32),
            offset: Offset(next[partition]),
            timestamp_ms: Some(time.timestamp_millis()),
            key: None,
            payload,
        };
        next[partition] += 1;
        r
    };
    let mut records = Vec::new();
    for (i, e) in events.iter().enumerate() {
        records.push(record(i % 2, e.event_time, e.to_json().into_bytes()));
        // The first micro-batch holds 500 records; this copy of its last
        // event of partition 1 opens the second.
        if records.len() == 500 {
            let first = &events[499];
            records.push(record(1, first.event_time, first.to_json().into_bytes()));
        }
    }
    records.push(record(0, events[0].event_time, events[0].to_json().into_bytes()));
    records.push(record(1, to, b"not an event".to_vec()));

    let config = SpeedConfig { max_batch: 500, ..SpeedConfig::single_instance(stack.brokers(), &topic, &dlq, &url) };
    stream::replay(&config, records).await.unwrap();

    assert_eq!(speed_consumed(&pool).await, events.len() as i64 + 3, "every offset committed");
    let counted: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(views + cart_adds + cart_removes + purchases), 0)::bigint FROM serving.product_demand_hourly",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(counted, events.len() as i64, "each event counted once");
    let rejected: Vec<String> =
        sqlx::query_scalar("SELECT reason FROM ops.dlq_outbox ORDER BY reason").fetch_all(&pool).await.unwrap();
    assert_eq!(rejected.len(), 3, "{rejected:?}");
    assert_eq!(rejected.iter().filter(|r| *r == "duplicate_event_id").count(), 2, "{rejected:?}");
}
