//! Faults every real deployment meets (issue 14), each on the real stack:
//! records judged by their own Kafka timestamp, lost locks that must not
//! publish, late data thousands of hours back.

use std::collections::BTreeMap;
use std::time::Duration;

use batch_layer::ingest::{self, IngestConfig};
use batch_layer::lake::{Lake, REJECTED_TABLE};
use batch_layer::recompute::{self, PublishPause, RunConfig, RunError, RunOutcome};
use chrono::{DateTime, TimeDelta, Timelike, Utc};
use datafusion::arrow::array::AsArray;
use integration_tests::checks::{
    DemandMap, assert_demand_eq, demand, lake_query, merged, metric_sum, serving_demand, speed_consumed,
    wait_for_speed, wait_for_speed_within,
};
use integration_tests::fixture::{FreshStream, Stack, command, log_tail};
use integration_tests::generator::{self, Args, send_timed_records};
use integration_tests::private_stack::PrivateStack;
use speed_layer::stream::{self, SpeedConfig};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

fn page_view(id: &str, user: &str, product: &str, at: DateTime<Utc>) -> String {
    format!(
        r#"{{"event_id":"{id}","event_type":"page_view","event_time":"{}","user_id":"{user}","session_id":"s-{user}","product_id":"{product}"}}"#,
        at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    )
}

/// Views per product in `relation`.
async fn views(pool: &PgPool, relation: &str) -> BTreeMap<String, i64> {
    let sql = format!("SELECT product_id, sum(views)::bigint FROM {relation} GROUP BY 1");
    sqlx::query_as::<_, (String, i64)>(sqlx::AssertSqlSafe(sql)).fetch_all(pool).await.unwrap().into_iter().collect()
}

/// `events_rejected` as (kafka_offset, reason).
async fn rejected(lake: &Lake) -> Vec<(i64, String)> {
    let batches =
        lake_query(lake, REJECTED_TABLE, "SELECT kafka_offset, CAST(reason AS VARCHAR) FROM t ORDER BY 1").await;
    let mut out = Vec::new();
    for b in batches {
        let offsets = b.column(0).as_primitive::<datafusion::arrow::datatypes::Int64Type>();
        let reasons =
            datafusion::arrow::compute::cast(b.column(1), &datafusion::arrow::datatypes::DataType::Utf8).unwrap();
        let reasons = reasons.as_string::<i32>();
        for i in 0..b.num_rows() {
            out.push((offsets.value(i), reasons.value(i).to_string()));
        }
    }
    out
}

/// Item 4: "more than 5 minutes in the future" is judged against each
/// record's Kafka timestamp, so the lake and the speed layer reach the same
/// verdict whatever their clocks and whenever they read. Without the fix the
/// first record below is rejected (an hour ahead of the reader's clock) and
/// the second accepted (in the past by the reader's clock).
#[tokio::test]
async fn the_future_is_judged_by_the_record_timestamp_in_both_layers() {
    let stack = Stack::from_env();
    let FreshStream { topic, dlq, url, pool } = stack.fresh_stream("future_by_timestamp", 1, 100).await.unwrap();
    let now = Utc::now().with_nanosecond(0).unwrap();
    let ms = |t: DateTime<Utc>| Some(t.timestamp_millis());
    let records = vec![
        // A producer whose clock runs two hours ahead: an hour "ahead" of
        // the reader, but behind its own timestamp. Accepted.
        (
            "u-1".to_string(),
            page_view("e-ahead", "u-1", "p-ahead", now + TimeDelta::hours(1)),
            ms(now + TimeDelta::hours(2)),
        ),
        // Two hours after its record's timestamp, though in the reader's past. Rejected.
        (
            "u-2".to_string(),
            page_view("e-future", "u-2", "p-future", now - TimeDelta::hours(1)),
            ms(now - TimeDelta::hours(3)),
        ),
        ("u-3".to_string(), page_view("e-plain", "u-3", "p-plain", now - TimeDelta::minutes(10)), ms(now)),
    ];
    send_timed_records(stack.brokers(), &topic, &records).unwrap();

    let shutdown = CancellationToken::new();
    let speed =
        tokio::spawn(stream::run(SpeedConfig::single_instance(stack.brokers(), &topic, &dlq, &url), shutdown.clone()));
    wait_for_speed(&pool, 3).await;
    let expected = BTreeMap::from([("p-ahead".to_string(), 1), ("p-plain".to_string(), 1)]);
    assert_eq!(views(&pool, "serving.product_demand_hourly").await, expected, "the speed layer's verdicts");

    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::parse(dir.path().to_str().unwrap()).unwrap();
    let summary =
        ingest::run(IngestConfig::catch_up(stack.brokers(), &topic, &lake), CancellationToken::new()).await.unwrap();
    assert_eq!((summary.records, summary.events, summary.rejected), (3, 2, 1), "the ingest's verdicts");
    assert_eq!(rejected(&lake).await, vec![(1, "future_event_time".to_string())]);

    // The DLQ holds the one reject, with the same reason.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while stack.topic_size(&dlq).unwrap() < 1 {
        assert!(tokio::time::Instant::now() < deadline, "the reject never reached the DLQ");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(stack.topic_size(&dlq).unwrap(), 1);
    shutdown.cancel();
    speed.await.unwrap().unwrap();
}

/// Item 5: a batch run whose advisory lock was lost (PostgreSQL restarted
/// while it computed) must not publish once a newer run took over, and the
/// cut never moves back. Run A stops just before its publish (the test
/// seam); PostgreSQL restarts, which ends A's lock session; more traffic is
/// ingested and run B publishes a higher cut; then A resumes. Without the
/// fencing token A would publish its older, lower cut over B's (the speed
/// rows between the two cuts already deleted: a gap on the dashboards).
#[tokio::test]
async fn a_run_that_lost_its_lock_cannot_publish() {
    let mut stack = PrivateStack::start().await.expect("private stack");
    stack.create_topic("events", 2).await.unwrap();
    stack.create_topic("events.dlq", 1).await.unwrap();
    let (url, pool) = stack.create_database("lambda").await.unwrap();
    platform::db::migrate(&pool, Some(100)).await.unwrap();
    let brokers = stack.brokers();
    let args = |seed| Args { backfill_hours: 3, ..Args::for_tests(&brokers, "events", seed) };
    let first = generator::run(args(71)).await.unwrap();

    let shutdown = CancellationToken::new();
    let speed = tokio::spawn(stream::run(
        SpeedConfig::single_instance(&brokers, "events", "events.dlq", &url),
        shutdown.clone(),
    ));
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::parse(dir.path().to_str().unwrap()).unwrap();
    ingest::run(IngestConfig::catch_up(&brokers, "events", &lake), CancellationToken::new()).await.unwrap();

    let pause = PublishPause::default();
    let config_a = RunConfig {
        full: true,
        pause_before_publish: Some(pause.clone()),
        ..RunConfig::new(url.clone(), lake.clone(), "events")
    };
    let run_a = tokio::spawn(async move { recompute::run(&config_a).await });
    tokio::time::timeout(Duration::from_secs(300), pause.reached.notified()).await.expect("run A reached its publish");

    stack.restart_postgres(tokio::time::sleep(Duration::from_millis(500))).await.unwrap();
    let second = generator::run(args(72)).await.unwrap();
    ingest::run(IngestConfig::catch_up(&brokers, "events", &lake), CancellationToken::new()).await.unwrap();
    let config_b = RunConfig { full: true, ..RunConfig::new(url.clone(), lake.clone(), "events") };
    let RunOutcome::Published { cut: cut_b, .. } = recompute::run(&config_b).await.unwrap() else {
        panic!("run B did not publish")
    };

    pause.resume.notify_one();
    match run_a.await.unwrap() {
        Err(RunError::Fenced { ours, current }) => assert!(current > ours, "tokens {ours} then {current}"),
        other => panic!("run A, fenced off by run B, ended with {other:?}"),
    }
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&url).await.unwrap();
    let cut: Vec<(i32, i64)> =
        sqlx::query_as("SELECT kafka_partition, cut_offset FROM ops.cut ORDER BY 1").fetch_all(&pool).await.unwrap();
    let expected_cut: Vec<(i32, i64)> = cut_b.iter().map(|(p, o)| (p.0, o.0)).collect();
    assert_eq!(cut, expected_cut, "the cut is run B's");
    let runs: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT status, message FROM ops.batch_runs ORDER BY run_id").fetch_all(&pool).await.unwrap();
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_eq!(runs[0].0, "failed", "run A is recorded as failed: {runs:?}");
    assert!(runs[0].1.as_deref().is_some_and(|m| m.contains("lost its lock")), "{runs:?}");
    assert_eq!(runs[1].0, "published");

    let total = (first.events_sent + first.bad_sent + second.events_sent + second.bad_sent) as i64;
    wait_for_speed(&pool, total).await;
    assert_demand_eq(&serving_demand(&pool).await, &merged(&[&first, &second]), "serving after both runs");
    shutdown.cancel();
    speed.await.unwrap().unwrap();
}

/// Item 6: late events scattered over 20,000 hours (every other hour for
/// more than four years) are recomputed exactly by an incremental run, and
/// an incremental run equals a full one. The run's filter has one range
/// term per run of hours, at most `plan::MAX_HOUR_RUNS` runs (the gaps
/// between them filled), instead of 20,000 equality terms. Segments of one
/// offset, so the batch covers every record and serving is the batch alone.
#[tokio::test]
async fn late_events_in_twenty_thousand_hours_are_recomputed_exactly() {
    const LATE: i64 = 20_000;
    let stack = Stack::from_env();
    let FreshStream { topic, url, pool, .. } = stack.fresh_stream("late_hours", 2, 1).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::parse(dir.path().to_str().unwrap()).unwrap();
    let now = Utc::now().with_nanosecond(0).unwrap();
    let mut expected = DemandMap::new();
    let mut send = |records: Vec<(i64, DateTime<Utc>)>| {
        let rows: Vec<(String, String, Option<i64>)> = records
            .iter()
            .map(|(i, at)| {
                let (user, product) = (format!("u-{}", i % 97), format!("p-{}", i % 7));
                expected.entry((shared_schema::schema::Hour::of(*at).start(), product.clone())).or_default().views += 1;
                (user.clone(), page_view(&format!("e-{i}"), &user, &product, *at), None)
            })
            .collect();
        send_timed_records(stack.brokers(), &topic, &rows).unwrap();
    };
    // Recent traffic, published by a full run.
    send((0..200).map(|i| (i, now - TimeDelta::minutes(i))).collect());
    let ingest_config =
        IngestConfig { flush_records: 50_000, ..IngestConfig::catch_up(stack.brokers(), &topic, &lake) };
    ingest::run(ingest_config.clone(), CancellationToken::new()).await.unwrap();
    let full = RunConfig { full: true, ..RunConfig::new(url.clone(), lake.clone(), topic.clone()) };
    assert!(matches!(recompute::run(&full).await.unwrap(), RunOutcome::Published { .. }));

    // Then the late events: one in every other hour, back more than four years.
    send((0..LATE).map(|i| (1_000 + i, now - TimeDelta::hours(3 + 2 * i))).collect());
    ingest::run(ingest_config, CancellationToken::new()).await.unwrap();
    let started = std::time::Instant::now();
    let incremental = RunConfig::new(url.clone(), lake.clone(), topic.clone());
    let outcome = recompute::run(&incremental).await.unwrap();
    eprintln!("incremental run over {LATE} late hours: {:?} ({outcome:?})", started.elapsed());
    let RunOutcome::Published { hours: Some(hours), .. } = outcome else { panic!("{outcome:?}") };
    assert!(hours >= LATE as usize, "{hours} hours recomputed");
    assert_demand_eq(&serving_demand(&pool).await, &expected, "serving after the incremental run");
    let after_incremental = demand(&pool, "batch.product_demand_hourly").await;

    // A full run over the same lake publishes the same rows.
    assert!(matches!(recompute::run(&full).await.unwrap(), RunOutcome::Published { hours: None, .. }));
    assert_demand_eq(&demand(&pool, "batch.product_demand_hourly").await, &after_incremental, "full = incremental");
}

/// Item 8: `speed-layer run` in its default consumer-group mode, killed
/// with SIGKILL mid-stream and started again the same way, takes its
/// partitions back within seconds and ends exact. (A dynamic member's
/// restart waited for the dead member's session to expire; on tansu 0.6,
/// which never expires one, for good. The default is now a static member,
/// `speed-<host>-<ops port>`.)
#[tokio::test]
async fn a_restart_after_kill_9_in_group_mode_resumes() {
    let stack = Stack::from_env();
    let FreshStream { topic, dlq, url, pool } = stack.fresh_stream("group_kill", 4, 100).await.unwrap();
    let truth =
        generator::run(Args { backfill_hours: 8, ..Args::for_tests(stack.brokers(), &topic, 81) }).await.unwrap();
    let total = (truth.events_sent + truth.bad_sent) as i64;
    let ops = format!("127.0.0.1:{}", integration_tests::fixture::free_port().unwrap());
    let logs = tempfile::tempdir().unwrap();
    let log_path = logs.path().join("speed-layer.log");
    let spawn = || {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).unwrap();
        // The documented command, group mode by default.
        command("speed-layer", stack.brokers(), &url, log.into())
            .args(["run", "--topic", &topic, "--dlq-topic", &dlq, "--group-id", &format!("{topic}.speed")])
            .args(["--max-batch", "300", "--flush-interval", "50ms", "--ops-addr", &ops])
            .spawn()
            .unwrap()
    };
    let mut child = spawn();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    while speed_consumed(&pool).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first instance made no progress:\n{}",
            log_tail(&log_path, 20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let at_kill = speed_consumed(&pool).await;
    assert!(at_kill < total, "the stream ended before the kill ({at_kill} of {total})");

    let restarted = std::time::Instant::now();
    let mut child = spawn();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while speed_consumed(&pool).await <= at_kill {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the restarted group member made no progress in 60 s:\n{}",
            log_tail(&log_path, 20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("the restarted member resumed after {:?}", restarted.elapsed());
    wait_for_speed_within(&pool, total, Duration::from_secs(480)).await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    assert_demand_eq(&serving_demand(&pool).await, &truth.demand_map(), "serving after a kill -9 in group mode");
}

/// Produces `n` page views to `partition` of `topic` with Kafka timestamp
/// `timestamp` (ms), numbered from `first`; returns their (hour, product) views.
fn produce_views(
    producer: &rdkafka::producer::BaseProducer,
    topic: &str,
    partition: i32,
    first: i64,
    n: i64,
    timestamp: i64,
    expected: &mut DemandMap,
) {
    let at = Utc::now() - TimeDelta::minutes(30);
    for i in first..first + n {
        let product = format!("p-{}", i % 5);
        let payload = page_view(&format!("e-{partition}-{i}"), &format!("u-{partition}"), &product, at);
        expected.entry((shared_schema::schema::Hour::of(at).start(), product)).or_default().views += 1;
        let record = rdkafka::producer::BaseRecord::to(topic)
            .partition(partition)
            .key("k")
            .payload(&payload)
            .timestamp(timestamp);
        producer.send(record).map_err(|(e, _)| e).unwrap();
    }
}

/// The gaps a layer recorded, as (partition, from, to).
async fn recorded_gaps(pool: &PgPool, layer: &str) -> Vec<(i32, i64, i64)> {
    sqlx::query_as("SELECT kafka_partition, from_offset, to_offset FROM ops.offset_gaps WHERE layer = $1 ORDER BY 1, 2")
        .bind(layer)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Item 1: offsets that hold no record never stall a partition. The
/// broker's retention removes records before either layer reads them
/// (their Kafka timestamps are older than the topic's `retention.ms`): the
/// first 20 of each partition (a log that starts past 0, a layer down longer
/// than retention), and offsets 40-41 in the middle of the log, as
/// compaction, transaction markers or aborted records leave them. tansu 0.6
/// implements neither `DeleteRecords` nor transactions (`EndTxn` is not
/// supported), so retention is how records go here (and only where a record
/// follows: tansu derives the high watermark from the last record). Both
/// layers step over every gap, record the same gaps in `ops.offset_gaps`,
/// and serving is exact for what remains.
#[tokio::test]
async fn offset_gaps_never_stall_either_layer() {
    use rdkafka::producer::{BaseProducer, Producer};
    const PARTITIONS: i32 = 2;
    let stack = PrivateStack::start_with_maintenance(Some(Duration::from_millis(500))).await.expect("private stack");
    let retention = [("cleanup.policy", "delete"), ("retention.ms", "600000")];
    stack.create_topic_with("events", PARTITIONS, &retention).await.unwrap();
    stack.create_topic("events.dlq", 1).await.unwrap();
    let (url, pool) = stack.create_database("lambda").await.unwrap();
    platform::db::migrate(&pool, Some(10)).await.unwrap();
    let brokers = stack.brokers();
    let plain: BaseProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
    let now_ms = || Utc::now().timestamp_millis();
    let hour_ago = || now_ms() - 3_600_000;

    // Per partition: offsets 0-19 an hour old (past retention), 20-39
    // current, 40-41 an hour old again, 42-51 current.
    let (mut removed, mut expected) = (DemandMap::new(), DemandMap::new());
    for p in 0..PARTITIONS {
        produce_views(&plain, "events", p, 0, 20, hour_ago(), &mut removed);
        produce_views(&plain, "events", p, 20, 20, now_ms(), &mut expected);
        produce_views(&plain, "events", p, 40, 2, hour_ago(), &mut removed);
        produce_views(&plain, "events", p, 42, 10, now_ms(), &mut expected);
    }
    plain.flush(Duration::from_secs(30)).unwrap();

    // Wait until retention removed the old records: the log start moves to
    // 20 (one statement of the broker's maintenance removes every old
    // record, 40-41 included).
    let probe: rdkafka::consumer::BaseConsumer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        use rdkafka::consumer::Consumer;
        let starts: Vec<i64> = (0..PARTITIONS)
            .map(|p| probe.fetch_watermarks("events", p, Duration::from_secs(5)).map_or(-1, |(low, _)| low))
            .collect();
        if starts.iter().all(|low| *low == 20) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "retention never removed the old records (log starts {starts:?})"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let shutdown = CancellationToken::new();
    let ops = std::net::SocketAddr::from(([127, 0, 0, 1], integration_tests::fixture::free_port().unwrap()));
    let speed_config =
        SpeedConfig { ops_addr: ops, ..SpeedConfig::single_instance(&brokers, "events", "events.dlq", &url) };
    let speed = tokio::spawn(stream::run(speed_config, shutdown.clone()));
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::parse(dir.path().to_str().unwrap()).unwrap();
    let ingest_config = IngestConfig {
        db: Some(batch_layer::ingest::PlatformDb::new(url.clone())),
        ..IngestConfig::catch_up(&brokers, "events", &lake)
    };
    let first =
        tokio::time::timeout(Duration::from_secs(120), ingest::run(ingest_config.clone(), CancellationToken::new()))
            .await
            .expect("the ingest catches up")
            .unwrap();
    assert_eq!((first.records, first.events, first.gap_records), (60, 60, 44), "{first:?}");
    let again = ingest::run(ingest_config, CancellationToken::new()).await.unwrap();
    assert_eq!((again.records, again.gap_records), (0, 0), "a second ingest resumes past the gaps: {again:?}");
    wait_for_speed(&pool, 2 * 52).await;

    let gaps: Vec<(i32, i64, i64)> = (0..PARTITIONS).flat_map(|p| [(p, 0, 20), (p, 40, 42)]).collect();
    assert_eq!(recorded_gaps(&pool, "speed").await, gaps, "the speed layer's gaps");
    assert_eq!(recorded_gaps(&pool, "batch").await, gaps, "the ingest's gaps");
    let RunOutcome::Published { cut, .. } =
        recompute::run(&RunConfig::new(url.clone(), lake.clone(), "events")).await.unwrap()
    else {
        panic!("the batch run did not publish")
    };
    assert!(cut.iter().all(|(_, o)| o.0 == 50), "{cut:?}");
    assert_demand_eq(&serving_demand(&pool).await, &expected, "serving: exactly the records that remain");
    let page = integration_tests::serving::get(ops, "/metrics").await.unwrap().body;
    assert_eq!(metric_sum(&page, "speed_gap_records_total"), 44.0, "counted once each: {page}");
    shutdown.cancel();
    speed.await.unwrap().unwrap();
}

/// Reads `n` records of the one-partition `topic` from its beginning: (key,
/// payload length, headers).
fn read_topic(brokers: &str, topic: &str, n: usize) -> Vec<(Vec<u8>, usize, BTreeMap<String, String>)> {
    use rdkafka::Message;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Headers;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}.check"))
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::Beginning).unwrap();
    consumer.assign(&tpl).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut out = Vec::new();
    while out.len() < n {
        assert!(std::time::Instant::now() < deadline, "only {} of {n} records in {topic}", out.len());
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) else { continue };
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        out.push((m.key().unwrap_or_default().to_vec(), m.payload_len(), headers));
    }
    out
}

/// A producer for records up to 2 MB (librdkafka's default limit is 1,000,000 bytes).
fn large_producer(brokers: &str) -> rdkafka::producer::BaseProducer {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("message.max.bytes", "2000000")
        .set("linger.ms", "20")
        .create()
        .unwrap()
}

/// Item 2: a rejected record never stops the stream, not when the DLQ
/// topic does not exist and not when the record is larger than a DLQ
/// message may be. Good records around the rejects are counted exactly
/// while the DLQ is missing; the rejects wait in `ops.dlq_outbox` and arrive
/// once the topic exists, the large one as its first 64 KiB with its size
/// and SHA-256. (Before the outbox, the flush produced its rejects to the
/// DLQ and retried until the broker acknowledged them: a missing DLQ topic,
/// or a record over the producer's limit, stopped the stream for good.)
#[tokio::test]
async fn rejects_of_any_size_wait_for_a_missing_dlq_without_stopping_the_stream() {
    use rdkafka::producer::Producer;
    let stack = Stack::from_env();
    let FreshStream { topic, url, pool, .. } = stack.fresh_stream("dlq_missing", 1, 100).await.unwrap();
    let dlq = format!("{topic}.dlq-later");
    let producer = large_producer(stack.brokers());
    let at = Utc::now() - TimeDelta::minutes(20);
    let mut big = page_view("e-big", "u-big", "p-big", at).into_bytes();
    big.truncate(big.len() - 1);
    big.extend_from_slice(br#","padding":""#);
    big.resize(1_000_001 - 2, b'x');
    big.extend_from_slice(br#""}"#);
    assert_eq!(big.len(), 1_000_001);
    let mut records: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..150 {
        if i == 50 {
            records.push(("reject-big".into(), big.clone()));
        }
        if i == 100 {
            records.push(("reject-small".into(), b"{oops".to_vec()));
        }
        records.push((
            format!("u-{i}"),
            page_view(&format!("e-{i}"), &format!("u-{i}"), &format!("p-{}", i % 3), at).into_bytes(),
        ));
    }
    for (key, payload) in &records {
        producer.send(rdkafka::producer::BaseRecord::to(&topic).key(key).payload(payload)).map_err(|(e, _)| e).unwrap();
    }
    producer.flush(Duration::from_secs(60)).unwrap();

    let shutdown = CancellationToken::new();
    let speed =
        tokio::spawn(stream::run(SpeedConfig::single_instance(stack.brokers(), &topic, &dlq, &url), shutdown.clone()));
    wait_for_speed(&pool, records.len() as i64).await;
    let expected = BTreeMap::from([("p-0".to_string(), 50), ("p-1".to_string(), 50), ("p-2".to_string(), 50)]);
    assert_eq!(views(&pool, "serving.product_demand_hourly").await, expected, "good records, counted exactly");
    let waiting: Vec<(String, i64, Option<String>)> =
        sqlx::query_as("SELECT reason, original_size, original_sha256 FROM ops.dlq_outbox ORDER BY kafka_offset")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(waiting.len(), 2, "both rejects wait in the outbox: {waiting:?}");
    assert_eq!((waiting[0].0.as_str(), waiting[0].1), ("oversized", 1_000_001));
    assert_eq!(waiting[0].2.as_deref(), Some(platform::oversize::sha256_hex(&big).as_str()));
    assert!(!speed.is_finished(), "the speed layer stopped");

    // The DLQ topic appears: the rejects arrive, and leave the outbox.
    stack.create_topic(&dlq, 1).await.unwrap();
    let arrived = read_topic(stack.brokers(), &dlq, 2);
    let by_key: BTreeMap<Vec<u8>, (usize, BTreeMap<String, String>)> =
        arrived.into_iter().map(|(k, len, h)| (k, (len, h))).collect();
    let (len, headers) = &by_key[b"reject-big".as_slice()];
    assert_eq!(*len, platform::oversize::KEPT_BYTES);
    assert_eq!(headers["reason"], "oversized");
    assert_eq!(headers["original_size"], "1000001");
    assert_eq!(headers["original_sha256"], platform::oversize::sha256_hex(&big));
    let (len, headers) = &by_key[b"reject-small".as_slice()];
    assert_eq!((*len, headers["reason"].as_str(), headers.get("original_sha256")), (5, "not_json", None));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.dlq_outbox").fetch_one(&pool).await.unwrap();
        if n == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{n} rejects stay in the outbox");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shutdown.cancel();
    speed.await.unwrap().unwrap();
}

/// The peak resident memory (VmHWM) of process `pid` so far, in MiB.
fn peak_rss_mib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib / 1024)
}

/// Item 3: a flood of 1 MiB rejected records costs both layers bounded
/// memory: a micro-batch and an ingest flush end at a byte bound, not only
/// at a record count, and a reject keeps at most 64 KiB. 400 records of
/// 1 MiB (400 MiB) through the binaries with 16 MiB bounds and flush
/// intervals long enough to gather the whole flood; the peak RSS of each
/// stays below 200 MiB (with the old count bounds each held the whole
/// flood: with 1,024 MiB bounds the peaks were 363 and 267 MiB). The peaks are
/// printed for docs/BENCHMARKS.md.
#[tokio::test]
async fn a_flood_of_large_rejects_costs_bounded_memory() {
    use rdkafka::producer::Producer;
    const FLOOD: usize = 400;
    const BOUND_MIB: u64 = 200;
    let stack = PrivateStack::start().await.expect("private stack");
    stack.create_topic("events", 2).await.unwrap();
    stack.create_topic("events.dlq", 1).await.unwrap();
    let (url, pool) = stack.create_database("lambda").await.unwrap();
    platform::db::migrate(&pool, Some(100)).await.unwrap();
    let brokers = stack.brokers();
    let producer = large_producer(&brokers);
    let at = Utc::now() - TimeDelta::minutes(20);
    for i in 0..FLOOD {
        let mut payload = vec![b'x'; 1 << 20];
        payload[0] = b'{';
        let good = page_view(&format!("e-{i}"), &format!("u-{i}"), "p-flood", at);
        for (key, bytes) in [(format!("big-{i}"), payload), (format!("u-{i}"), good.into_bytes())] {
            loop {
                match producer.send(rdkafka::producer::BaseRecord::to("events").key(&key).payload(&bytes)) {
                    Ok(()) => break,
                    Err((e, _)) => {
                        assert!(
                            matches!(e.rdkafka_error_code(), Some(rdkafka::types::RDKafkaErrorCode::QueueFull)),
                            "{e}"
                        );
                        producer.poll(Duration::from_millis(100));
                    }
                }
            }
        }
    }
    producer.flush(Duration::from_secs(300)).unwrap();
    let total = (2 * FLOOD) as i64;

    let logs = tempfile::tempdir().unwrap();
    let log = |name: &str| std::process::Stdio::from(std::fs::File::create(logs.path().join(name)).unwrap());
    let mut speed = command("speed-layer", &brokers, &url, log("speed.log"))
        .args(["run", "--assignment", "all", "--ops-addr", "127.0.0.1:0", "--max-batch-mib", "16"])
        // Without a byte bound, a long interval lets a micro-batch take the whole flood.
        .args(["--flush-interval", "20s"])
        .spawn()
        .unwrap();
    let lake = tempfile::tempdir().unwrap();
    let mut ingest = command("batch-layer", &brokers, &url, log("ingest.log"))
        .args(["ingest", "--until-caught-up", "--flush-mib", "16", "--flush-interval", "20s"])
        .env("LAKE_URI", lake.path())
        .spawn()
        .unwrap();
    let (speed_pid, ingest_pid) = (speed.id().unwrap(), ingest.id().unwrap());
    let (mut speed_peak, mut ingest_peak) = (0, 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    let mut ingest_done = None;
    loop {
        speed_peak = speed_peak.max(peak_rss_mib(speed_pid).unwrap_or(0));
        if ingest_done.is_none() {
            ingest_peak = ingest_peak.max(peak_rss_mib(ingest_pid).unwrap_or(0));
            ingest_done = ingest.try_wait().unwrap();
        }
        if let Some(status) = speed.try_wait().unwrap() {
            panic!("the speed layer exited ({status}); see {}", logs.path().display());
        }
        if ingest_done.is_some() && speed_consumed(&pool).await >= total {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the flood was not read within 10 minutes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = ingest_done.unwrap();
    assert!(status.success(), "the ingest failed ({status}); see {}", logs.path().display());
    speed.start_kill().unwrap();
    speed.wait().await.unwrap();
    eprintln!(
        "peak RSS with {FLOOD} rejected records of 1 MiB: speed layer {speed_peak} MiB, ingest {ingest_peak} MiB"
    );
    assert_eq!(
        views(&pool, "serving.product_demand_hourly").await,
        BTreeMap::from([("p-flood".to_string(), FLOOD as i64)])
    );
    assert!(speed_peak < BOUND_MIB, "the speed layer peaked at {speed_peak} MiB");
    assert!(ingest_peak < BOUND_MIB, "the ingest peaked at {ingest_peak} MiB");
}

/// Item 9: the fence under load. Two `speed-layer run` processes that both
/// believe they own every partition (what a member whose partitions moved
/// on, still committing, amounts to; on tansu 0.6 a live but stale group
/// member cannot be produced, as its coordinator never expires a session)
/// read the same stream into one database. Each flush advances offsets only
/// from the offset it started at, so one of any two overlapping flushes is
/// fenced (`speed_fenced_flushes_total`), rolls back and re-reads: the
/// totals end exact. Micro-batches are prepared while the one before them
/// commits (`speed_prepared_ahead_total`), so a fenced commit also
/// discards the micro-batch prepared on top of it.
#[tokio::test]
async fn competing_instances_are_fenced_and_totals_stay_exact() {
    let stack = Stack::from_env();
    let FreshStream { topic, dlq, url, pool } = stack.fresh_stream("fence_under_load", 4, 100).await.unwrap();
    let truth =
        generator::run(Args { backfill_hours: 6, ..Args::for_tests(stack.brokers(), &topic, 91) }).await.unwrap();
    let total = (truth.events_sent + truth.bad_sent) as i64;
    let logs = tempfile::tempdir().unwrap();
    let spawn = |i: usize| {
        let ops = std::net::SocketAddr::from(([127, 0, 0, 1], integration_tests::fixture::free_port().unwrap()));
        let log = std::fs::File::create(logs.path().join(format!("speed-{i}.log"))).unwrap();
        let child = command("speed-layer", stack.brokers(), &url, log.into())
            .args(["run", "--topic", &topic, "--dlq-topic", &dlq, "--group-id", &format!("{topic}.speed")])
            .args(["--assignment", "all", "--max-batch", "200", "--flush-interval", "20ms", "--ops-addr"])
            .arg(ops.to_string())
            .spawn()
            .unwrap();
        (child, ops)
    };
    let (mut a, ops_a) = spawn(1);
    let (mut b, ops_b) = spawn(2);
    wait_for_speed_within(&pool, total, Duration::from_secs(300)).await;
    let (mut fenced, mut ahead) = (0.0, 0.0);
    for ops in [ops_a, ops_b] {
        let page = integration_tests::serving::get(ops, "/metrics").await.unwrap().body;
        fenced += metric_sum(&page, "speed_fenced_flushes_total");
        ahead += metric_sum(&page, "speed_prepared_ahead_total");
    }
    for child in [&mut a, &mut b] {
        assert!(child.try_wait().unwrap().is_none(), "an instance exited; see {}", logs.path().display());
        child.start_kill().unwrap();
        child.wait().await.unwrap();
    }
    eprintln!("{fenced} flushes fenced off, {ahead} prepared ahead, while two instances read {total} records");
    assert!(fenced > 0.0, "the two instances never overlapped: the fence was not exercised");
    assert!(ahead > 0.0, "no micro-batch was prepared while another committed");
    assert_demand_eq(&serving_demand(&pool).await, &truth.demand_map(), "serving after competing instances");
}

/// What a duplicates test sent: records in order, and the truth (views per
/// product, each `event_id` once, except copies beyond the window).
#[derive(Default)]
struct Sent {
    records: Vec<(String, String)>,
    /// Each record's product.
    products: Vec<String>,
    truth: BTreeMap<String, i64>,
    duplicates: usize,
}

impl Sent {
    fn event(&mut self, id: &str, user: &str, product: &str, at: DateTime<Utc>) {
        self.records.push((user.to_string(), page_view(id, user, product, at)));
        self.products.push(product.to_string());
        *self.truth.entry(product.to_string()).or_default() += 1;
    }

    /// The record sent as `index` again, as a producer retry would.
    fn again(&mut self, index: usize, counted: bool) {
        let (record, product) = (self.records[index].clone(), self.products[index].clone());
        self.records.push(record);
        self.products.push(product.clone());
        if counted {
            *self.truth.entry(product).or_default() += 1;
        } else {
            self.duplicates += 1;
        }
    }
}

/// Item 7: the same `event_id` delivered twice counts once in batch, speed
/// and serving, including when the first copy is below the cut and the
/// second above it. The window is 2 hours here. Phase 1 (copies within it,
/// and an event 5 hours older than its partition's newest, beyond the
/// window) is ingested and published while no speed layer runs, so the
/// speed layer starts at the cut and knows the first copies below it only
/// from the batch's seed (`ops.dedup_seed`; without it, every copy in phase
/// 2 of a phase-1 event would count twice). Phase 3 comes after a restart
/// of the speed layer, which then judges by what it stored itself
/// (`speed.event_keys`). Serving equals the truth after each phase and does
/// not move when the second batch lands; the lake holds each first copy
/// once and every duplicate in `events_rejected`.
#[tokio::test]
async fn duplicates_count_once_in_batch_speed_and_serving() {
    let stack = Stack::from_env();
    let FreshStream { topic, dlq, url, pool } = stack.fresh_stream("duplicates", 2, 10).await.unwrap();
    sqlx::query("UPDATE ops.deployment SET dedup_window = interval '2 hours'").execute(&pool).await.unwrap();
    let now = Utc::now().with_nanosecond(0).unwrap();
    let at = |i: usize| now - TimeDelta::minutes(40) + TimeDelta::seconds(i as i64);
    let mut sent = Sent::default();

    // Phase 1: 48 events of 16 users, copies of six of them, and an event
    // far behind the newest times, beyond the window.
    for i in 0..48 {
        sent.event(&format!("e-{i}"), &format!("u-{}", i % 16), &format!("p-{}", i % 5), at(i));
    }
    for i in [0, 3, 17, 30, 46, 47] {
        sent.again(i, false);
    }
    sent.event("e-old", "u-old", "p-old", now - TimeDelta::hours(5));
    let old = sent.records.len() - 1;
    generator::send_records(stack.brokers(), &topic, &sent.records).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::parse(dir.path().to_str().unwrap()).unwrap();
    let ingest_config = IngestConfig {
        db: Some(ingest::PlatformDb::new(url.clone())),
        ..IngestConfig::catch_up(stack.brokers(), &topic, &lake)
    };
    let first = ingest::run(ingest_config.clone(), CancellationToken::new()).await.unwrap();
    assert_eq!(first.rejected, 6, "the ingest rejects the six copies");
    let run = RunConfig::new(url.clone(), lake.clone(), topic.clone());
    assert!(matches!(recompute::run(&run).await.unwrap(), RunOutcome::Published { .. }));
    let seeded: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.dedup_seed").fetch_one(&pool).await.unwrap();
    assert!(seeded > 0, "no speed layer holds a position: the publish leaves it the keys below the cut");

    // Phase 2: copies of the first 12 events (below the cut, most of
    // them), new events, copies of five of those, and the old event again
    // (beyond the window: counted, as its first copy was).
    let phase1 = sent.records.len();
    for i in 0..12 {
        sent.again(i, false);
    }
    for i in 48..68 {
        sent.event(&format!("e-{i}"), &format!("u-{}", i % 16), &format!("p-{}", i % 5), at(i));
    }
    for k in [0, 4, 9, 14, 19] {
        sent.again(phase1 + 12 + k, false);
    }
    sent.again(old, true);
    generator::send_records(stack.brokers(), &topic, &sent.records[phase1..]).unwrap();
    let shutdown = CancellationToken::new();
    let config = SpeedConfig::single_instance(stack.brokers(), &topic, &dlq, &url);
    let speed = tokio::spawn(stream::run(config.clone(), shutdown.clone()));
    wait_for_speed(&pool, sent.records.len() as i64).await;
    assert_eq!(views(&pool, "serving.product_demand_hourly").await, sent.truth, "serving after phase 2");
    shutdown.cancel();
    speed.await.unwrap().unwrap();

    // Phase 3, after a restart: copies of phase-1 and phase-2 events, and new ones.
    let phase2 = sent.records.len();
    for i in [1, 5, 40, phase1 + 13, phase1 + 20] {
        sent.again(i, false);
    }
    for i in 68..73 {
        sent.event(&format!("e-{i}"), &format!("u-{}", i % 16), &format!("p-{}", i % 5), at(i));
    }
    sent.again(sent.records.len() - 1, false);
    generator::send_records(stack.brokers(), &topic, &sent.records[phase2..]).unwrap();
    let ops = std::net::SocketAddr::from(([127, 0, 0, 1], integration_tests::fixture::free_port().unwrap()));
    let shutdown = CancellationToken::new();
    let speed = tokio::spawn(stream::run(SpeedConfig { ops_addr: ops, ..config }, shutdown.clone()));
    wait_for_speed(&pool, sent.records.len() as i64).await;
    assert_eq!(views(&pool, "serving.product_demand_hourly").await, sent.truth, "serving after phase 3");
    let page = integration_tests::serving::get(ops, "/metrics").await.unwrap().body;
    let dups = metric_sum(&page, "speed_duplicate_records_total");
    assert!(dups >= 6.0, "the speed layer counted {dups} duplicates, at least phase 3's 6");

    // The batch lands: nothing moves, and the batch alone agrees.
    let later = ingest::run(ingest_config, CancellationToken::new()).await.unwrap();
    assert_eq!(first.rejected + later.rejected, sent.duplicates as u64, "the ingest's verdicts");
    assert!(matches!(recompute::run(&run).await.unwrap(), RunOutcome::Published { .. }));
    assert_eq!(views(&pool, "serving.product_demand_hourly").await, sent.truth, "serving after the second batch");
    let full = RunConfig { full: true, ..run.clone() };
    assert!(matches!(recompute::run(&full).await.unwrap(), RunOutcome::Published { .. }));
    assert_eq!(views(&pool, "serving.product_demand_hourly").await, sent.truth, "serving after a full run");

    let batches = lake_query(&lake, "events", "SELECT count(*), count(DISTINCT event_id) FROM t").await;
    let counts = |c: usize| batches[0].column(c).as_primitive::<datafusion::arrow::datatypes::Int64Type>().value(0);
    assert_eq!(
        (counts(0), counts(1)),
        (75, 74),
        "73 events and the old one once each, the old one again (beyond the window)"
    );
    let reasons = rejected(&lake).await;
    assert_eq!(reasons.len(), sent.duplicates);
    assert!(reasons.iter().all(|(_, r)| r == "duplicate_event_id"), "{reasons:?}");
    shutdown.cancel();
    speed.await.unwrap().unwrap();
}
