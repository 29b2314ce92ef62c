//! The committed bad-input corpus (`integration-tests/corpus/`) against the
//! decoder and against the whole pipeline: every malformed record ends in
//! the DLQ and in the lake's `events_rejected` table with its reason and its
//! original bytes (past 64 KiB: the first 64 KiB, the size and the SHA-256),
//! and every valid event around them is counted exactly once. Records made
//! at test time add the sizes no file should hold: 256 KiB, a
//! 1,000,001-byte record (one byte over librdkafka's default message
//! limit, the DLQ producer's) and one of 1,048,400 bytes, about the largest
//! a Kafka broker accepts by default.
//!
//! `corpus/bad/MANIFEST` names the reason each bad file must be rejected
//! for; every file of `corpus/good/` must be accepted. The same files seed
//! the decoder's fuzz target (`make fuzz`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use batch_layer::lake::{EVENTS_TABLE, Lake, REJECTED_TABLE};
use chrono::{DateTime, DurationRound, SecondsFormat, TimeDelta, Utc};
use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Int32Type, Int64Type};
use integration_tests::checks::{DemandMap, assert_demand_eq, lake_query, serving_demand, speed_consumed};
use integration_tests::fixture::{FreshStream, Stack, binary, log_tail};
use integration_tests::generator::Demand;
use integration_tests::shop::{Shop, ShopConfig};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use shared_schema::event::MAX_RECORD_BYTES;
use shared_schema::{Event, RejectReason};

/// Sizes of the oversized records made at test time (the corpus holds one
/// a single byte over the limit; these are far over it).
const LARGE_RECORD_BYTES: [usize; 3] = [256 * 1024, 1_000_001, 1_048_400];

/// Partitions of the test's `events` topic.
const PARTITIONS: i32 = 3;

fn corpus_dir() -> PathBuf {
    // At run time (cargo and nextest set it): the target directory is shared
    // between clones, so the binary may have been built in another one.
    let crate_dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string());
    Path::new(&crate_dir).join("corpus")
}

/// A corpus record: its file name, its bytes, and the reason it must be
/// rejected for (`None`: it must be accepted).
#[derive(Debug, Clone)]
struct Record {
    name: String,
    bytes: Vec<u8>,
    reason: Option<RejectReason>,
}

fn files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != "MANIFEST")
        .collect()
}

/// The bad records of `corpus/bad/`, in MANIFEST order. Panics if a file is
/// missing from the MANIFEST or the MANIFEST names a file that is not there.
fn bad_corpus() -> Vec<Record> {
    let dir = corpus_dir().join("bad");
    let manifest = std::fs::read_to_string(dir.join("MANIFEST")).expect("corpus/bad/MANIFEST");
    let mut out = Vec::new();
    for line in manifest.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (name, reason) = line.split_once(char::is_whitespace).unwrap_or_else(|| panic!("MANIFEST line {line:?}"));
        let reason = RejectReason::parse(reason.trim()).unwrap_or_else(|| panic!("{name}: unknown reason {reason:?}"));
        let bytes = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("MANIFEST names {name}: {e}"));
        out.push(Record { name: name.to_string(), bytes, reason: Some(reason) });
    }
    let listed: BTreeSet<String> = out.iter().map(|r| r.name.clone()).collect();
    assert_eq!(listed.len(), out.len(), "a file is listed twice in MANIFEST");
    let unlisted: Vec<_> = files(&dir).difference(&listed).cloned().collect();
    assert!(unlisted.is_empty(), "files in corpus/bad/ without a MANIFEST line: {unlisted:?}");
    out
}

/// The records of `corpus/good/`, sorted by name.
fn good_corpus() -> Vec<Record> {
    let dir = corpus_dir().join("good");
    files(&dir)
        .into_iter()
        .map(|name| Record { bytes: std::fs::read(dir.join(&name)).unwrap(), name, reason: None })
        .collect()
}

/// Records no file can hold: one far over the size limit, and one whose
/// time lies exactly [`shared_schema::event::MAX_FUTURE_SKEW`] after `now`,
/// which stays acceptable whenever it is judged later than `now`.
fn made_at_test_time(now: DateTime<Utc>) -> Vec<Record> {
    let event = |id: &str, time: DateTime<Utc>, extra: &str| {
        format!(
            r#"{{"event_id":"{id}","event_type":"add_to_cart","event_time":"{}","user_id":"u-corpus-made","session_id":"s-made","product_id":"p-00002","quantity":2,"price_cents":1250{extra}}}"#,
            time.to_rfc3339_opts(SecondsFormat::Millis, true)
        )
    };
    let mut made: Vec<Record> = LARGE_RECORD_BYTES
        .iter()
        .map(|size| {
            let mut bytes = event(&format!("corpus-made-oversized-{size}"), now, r#","padding":""#).into_bytes();
            bytes.resize(size - 2, b'x');
            bytes.extend_from_slice(br#""}"#);
            assert_eq!(bytes.len(), *size);
            Record { name: format!("made/oversized_{size}_bytes.json"), bytes, reason: Some(RejectReason::Oversized) }
        })
        .collect();
    made.extend([Record {
        name: "made/event_time_exactly_five_minutes_ahead.json".into(),
        bytes: event("corpus-made-five-minutes-ahead", now + TimeDelta::minutes(5), "").into_bytes(),
        reason: None,
    }]);
    made
}

/// What a valid record adds to `product_demand_hourly`, computed from the
/// JSON with `serde_json` alone, independently of the platform's decoder.
fn demand_of(bytes: &[u8]) -> (String, (DateTime<Utc>, String), Demand) {
    let v: serde_json::Value = serde_json::from_slice(bytes).expect("a good record is JSON");
    let s = |k: &str| v[k].as_str().unwrap_or_else(|| panic!("{k} of a good record")).to_string();
    let time = DateTime::parse_from_rfc3339(&s("event_time")).unwrap().with_timezone(&Utc);
    let hour = time.duration_trunc(TimeDelta::hours(1)).unwrap();
    let mut d = Demand::default();
    match s("event_type").as_str() {
        "page_view" => d.views = 1,
        "add_to_cart" => d.cart_adds = 1,
        "remove_from_cart" => d.cart_removes = 1,
        "purchase" => {
            let (q, p) = (v["quantity"].as_i64().unwrap(), v["price_cents"].as_i64().unwrap());
            (d.purchases, d.units, d.revenue_cents) = (1, q, q * p);
        }
        other => panic!("good record of type {other}"),
    }
    (s("event_id"), (hour, s("product_id")), d)
}

fn add(map: &mut DemandMap, key: (DateTime<Utc>, String), d: Demand) {
    *map.entry(key).or_default() += d;
}

#[test]
fn every_corpus_record_decodes_as_its_manifest_says() {
    let now = Utc::now();
    let bad = bad_corpus();
    let mut records = bad.clone();
    records.extend(good_corpus());
    records.extend(made_at_test_time(now));
    let mut wrong = Vec::new();
    for r in &records {
        let got = Event::parse(&r.bytes, now).err().map(|e| e.reason);
        if got != r.reason {
            wrong.push(format!("{}: expected {:?}, got {:?}", r.name, r.reason, Event::parse(&r.bytes, now).err()));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} corpus records decode wrongly:\n{}",
        wrong.len(),
        records.len(),
        wrong.join("\n")
    );
    let oversized = bad.iter().find(|r| r.reason == Some(RejectReason::Oversized)).expect("an oversized file");
    assert_eq!(oversized.bytes.len(), MAX_RECORD_BYTES + 1, "the committed oversized record is one byte over");
    for reason in RejectReason::PARSE {
        assert!(bad.iter().any(|r| r.reason == Some(reason)), "no corpus file is rejected as {reason}");
    }
}

/// One record as the broker stored it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stored {
    key: Vec<u8>,
    payload: Vec<u8>,
    partition: i32,
    offset: i64,
    reason: String,
    /// The original's size and SHA-256 as stored with it, when only its
    /// first bytes are (DLQ headers; the detail text in the lake).
    size: Option<usize>,
    sha256: Option<String>,
}

/// Every record of the DLQ topic (one partition), from the beginning.
fn read_dlq(stack: &Stack, dlq: &str, source_topic: &str, expected: usize) -> Vec<Stored> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", stack.brokers())
        .set("group.id", format!("{dlq}.check"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(dlq, 0, Offset::Beginning).unwrap();
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while out.len() < expected {
        assert!(std::time::Instant::now() < deadline, "only {} of {expected} records in the DLQ", out.len());
        let Some(m) = consumer.poll(Duration::from_millis(500)) else { continue };
        let m = m.unwrap();
        let headers = m.headers().expect("DLQ records carry headers");
        let header = |name: &str| {
            headers
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8(v.to_vec()).unwrap())
                .unwrap_or_else(|| panic!("DLQ record without a {name} header"))
        };
        assert_eq!(header("source_topic"), source_topic);
        let sha256 = headers
            .iter()
            .find(|h| h.key == "original_sha256")
            .and_then(|h| h.value)
            .map(|v| String::from_utf8(v.to_vec()).unwrap());
        out.push(Stored {
            key: m.key().unwrap_or_default().to_vec(),
            payload: m.payload().unwrap_or_default().to_vec(),
            partition: header("source_partition").parse().unwrap(),
            offset: header("source_offset").parse().unwrap(),
            reason: header("reason"),
            size: Some(header("original_size").parse().unwrap()),
            sha256,
        });
    }
    assert_eq!(records_in(&consumer, dlq, 1), expected as i64, "the DLQ holds exactly the bad records");
    out
}

/// Records in `topic`, asked with a patient timeout: the broker is shared
/// with tests running in parallel and can take seconds to answer.
fn records_in(consumer: &BaseConsumer, topic: &str, partitions: i32) -> i64 {
    (0..partitions)
        .map(|p| {
            let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(60)).unwrap();
            high - low
        })
        .sum()
}

/// Every row of `events_rejected`.
async fn read_rejected(lake: &Lake) -> Vec<Stored> {
    let batches = lake_query(
        lake,
        REJECTED_TABLE,
        "SELECT kafka_key, payload, kafka_partition, kafka_offset, reason, detail FROM t",
    )
    .await;
    let mut out = Vec::new();
    for b in batches {
        let col = |i: usize, t: &DataType| cast(b.column(i), t).unwrap();
        let (key, payload) = (col(0, &DataType::Binary), col(1, &DataType::Binary));
        let (partition, offset, reason) = (col(2, &DataType::Int32), col(3, &DataType::Int64), col(4, &DataType::Utf8));
        let detail = col(5, &DataType::Utf8);
        for i in 0..b.num_rows() {
            // "…; kept the first 65536 of N bytes, SHA-256 X" for a prefix.
            let detail = detail.as_string::<i32>().value(i);
            let kept = detail.split_once("kept the first ").map(|(_, rest)| rest);
            let size = kept.and_then(|k| k.split(" of ").nth(1)?.split(' ').next()?.parse().ok());
            let sha256 = kept.and_then(|k| k.rsplit("SHA-256 ").next()).map(str::to_string);
            out.push(Stored {
                size,
                sha256,
                key: if key.is_null(i) { Vec::new() } else { key.as_binary::<i32>().value(i).to_vec() },
                payload: payload.as_binary::<i32>().value(i).to_vec(),
                partition: partition.as_primitive::<Int32Type>().value(i),
                offset: offset.as_primitive::<Int64Type>().value(i),
                reason: reason.as_string::<i32>().value(i).to_string(),
            });
        }
    }
    out
}

/// Event ids of the lake's `events` table, and its row count.
async fn lake_event_ids(lake: &Lake) -> (BTreeSet<String>, usize) {
    let batches = lake_query(lake, EVENTS_TABLE, "SELECT event_id FROM t").await;
    let mut ids = BTreeSet::new();
    let mut rows = 0;
    for b in batches {
        let col = cast(b.column(0), &DataType::Utf8).unwrap();
        for i in 0..b.num_rows() {
            ids.insert(col.as_string::<i32>().value(i).to_string());
        }
        rows += b.num_rows();
    }
    (ids, rows)
}

/// Checks one stored copy of the bad records (the DLQ or `events_rejected`):
/// each bad record exactly once, with its original bytes, its position in
/// the source topic and its reason.
fn assert_every_bad_record_kept(what: &str, stored: &[Stored], sent: &BTreeMap<Vec<u8>, (Record, i32, i64)>) {
    let mut seen = BTreeSet::new();
    let mut wrong = Vec::new();
    for s in stored {
        let Some((r, partition, offset)) = sent.get(&s.key) else {
            wrong.push(format!("a record with key {:?} that was not a bad record", String::from_utf8_lossy(&s.key)));
            continue;
        };
        assert!(seen.insert(s.key.clone()), "{what} holds {} twice", r.name);
        let reason = r.reason.expect("bad").as_str();
        if s.reason != reason {
            wrong.push(format!("{}: reason {} instead of {reason}", r.name, s.reason));
        }
        let kept = platform::oversize::keep(&r.bytes);
        if s.payload != kept.bytes {
            wrong.push(format!(
                "{}: payload of {} bytes differs from the {} kept of the {} sent",
                r.name,
                s.payload.len(),
                kept.bytes.len(),
                r.bytes.len()
            ));
        }
        if s.sha256 != kept.sha256 || s.size.is_some_and(|n| n != r.bytes.len()) {
            wrong.push(format!(
                "{}: size {:?} and SHA-256 {:?} stored, not {} and {:?}",
                r.name,
                s.size,
                s.sha256,
                r.bytes.len(),
                kept.sha256
            ));
        }
        if (s.partition, s.offset) != (*partition, *offset) {
            wrong.push(format!("{}: at {}/{} instead of {partition}/{offset}", r.name, s.partition, s.offset));
        }
    }
    let missing: Vec<_> = sent.iter().filter(|(k, _)| !seen.contains(*k)).map(|(_, (r, _, _))| &r.name).collect();
    assert!(missing.is_empty(), "{what} lacks {} bad records: {missing:?}", missing.len());
    assert!(wrong.is_empty(), "{what}:\n{}", wrong.join("\n"));
}

#[tokio::test]
async fn corpus_records_reach_the_dlq_and_the_lake_with_their_reason_and_valid_events_are_counted_exactly() {
    let stack = Stack::from_env();
    let FreshStream { topic, dlq, url, pool } = stack.fresh_stream("bad_input_corpus", PARTITIONS, 100).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake_path = dir.path().join("lake");

    // The corpus in a shuffled order, each record between valid generated
    // events: one hour of a small shop's traffic.
    let now = Utc::now().duration_trunc(TimeDelta::milliseconds(1)).unwrap();
    let mut corpus = bad_corpus();
    corpus.extend(good_corpus());
    corpus.extend(made_at_test_time(now));
    let mut rng = rand::rngs::StdRng::seed_from_u64(66);
    corpus.shuffle(&mut rng);
    let shop = Shop::new(ShopConfig { seed: 66, products: 60, categories: 6, users: 400, rate: 1.0 });
    let from = now - TimeDelta::hours(2);
    let valid = shop.events_between(from, from + TimeDelta::hours(1), &[], now, &mut rng);
    // The shop's traffic follows the time of day: at night an hour holds
    // fewer events, enough to surround every corpus record all the same.
    assert!(valid.len() > 500, "{} generated events", valid.len());

    let mut expected = DemandMap::new();
    let mut expected_ids = BTreeSet::new();
    let mut to_send: Vec<(Vec<u8>, Vec<u8>, Option<Record>)> = Vec::new();
    let per_gap = valid.len() / (corpus.len() + 1);
    let mut events = valid.iter();
    for r in &corpus {
        for e in events.by_ref().take(per_gap) {
            to_send.push((e.user_id.clone().into_bytes(), e.to_json().into_bytes(), None));
            let mut d = Demand::default();
            d.add(e);
            add(&mut expected, (e.event_time.duration_trunc(TimeDelta::hours(1)).unwrap(), e.product_id.clone()), d);
            assert!(expected_ids.insert(e.event_id.clone()));
        }
        // Bad records are keyed by their file name, which identifies them
        // in the DLQ and the lake; valid ones by user, as the shop does.
        let key = match r.reason {
            Some(_) => format!("corpus/{}", r.name).into_bytes(),
            None => {
                let (id, key, d) = demand_of(&r.bytes);
                add(&mut expected, key, d);
                assert!(expected_ids.insert(id), "{}: event id used twice", r.name);
                serde_json::from_slice::<serde_json::Value>(&r.bytes).unwrap()["user_id"]
                    .as_str()
                    .unwrap()
                    .as_bytes()
                    .to_vec()
            }
        };
        to_send.push((key, r.bytes.clone(), Some(r.clone())));
    }
    for e in events {
        to_send.push((e.user_id.clone().into_bytes(), e.to_json().into_bytes(), None));
        let mut d = Demand::default();
        d.add(e);
        add(&mut expected, (e.event_time.duration_trunc(TimeDelta::hours(1)).unwrap(), e.product_id.clone()), d);
        assert!(expected_ids.insert(e.event_id.clone()));
    }

    // Send in order, idempotently, and note where each bad record landed.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", stack.brokers())
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .set("message.timeout.ms", "120000")
        // The largest records made here exceed librdkafka's 1,000,000-byte default.
        .set("message.max.bytes", "2000000")
        .create()
        .unwrap();
    let deliveries: Vec<_> = to_send
        .iter()
        .map(|(key, payload, _)| {
            producer.send_result(FutureRecord::to(&topic).key(key).payload(payload)).map_err(|(e, _)| e).unwrap()
        })
        .collect();
    let mut bad_sent = BTreeMap::new();
    for ((key, _, record), delivery) in to_send.iter().zip(deliveries) {
        let delivered = delivery.await.expect("delivery").map_err(|(e, _)| e).expect("broker acknowledged");
        if let Some(r) = record.as_ref().filter(|r| r.reason.is_some()) {
            bad_sent.insert(key.clone(), (r.clone(), delivered.partition, delivered.offset));
        }
    }
    let total = to_send.len() as i64;
    let watermarks: BaseConsumer = ClientConfig::new().set("bootstrap.servers", stack.brokers()).create().unwrap();
    assert_eq!(records_in(&watermarks, &topic, PARTITIONS), total, "the broker holds exactly what was sent");
    let bad_count = bad_sent.len();
    let good_count = expected_ids.len();
    eprintln!(
        "sent {total} records: {bad_count} bad, {} good from the corpus, {} generated",
        corpus.len() - bad_count,
        valid.len()
    );

    // The speed layer and the lake ingest, as processes, side by side.
    let logs = tempfile::tempdir().unwrap();
    let (speed_log, ingest_log) = (logs.path().join("speed-layer.log"), logs.path().join("ingest.log"));
    let log = |p: &Path| Stdio::from(std::fs::File::create(p).unwrap());
    let mut speed = tokio::process::Command::new(binary("speed-layer"))
        .args(["run", "--topic", &topic, "--dlq-topic", &dlq, "--group-id", &format!("{topic}.speed")])
        .args(["--max-batch", "500", "--flush-interval", "100ms", "--ops-addr", "127.0.0.1:0", "--assignment", "all"])
        .env("KAFKA_BROKERS", stack.brokers())
        .env("DATABASE_URL", &url)
        .stdout(Stdio::null())
        .stderr(log(&speed_log))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let ingest = tokio::process::Command::new(binary("batch-layer"))
        .args(["ingest", "--topic", &topic, "--until-caught-up", "--flush-records", "1000", "--flush-interval", "1s"])
        .env("KAFKA_BROKERS", stack.brokers())
        .env("LAKE_URI", &lake_path)
        .env("DATABASE_URL", &url)
        .stdout(Stdio::null())
        .stderr(log(&ingest_log))
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let n = speed_consumed(&pool).await;
        if n >= total {
            assert_eq!(n, total, "the speed layer went past the end of the topic");
            break;
        }
        if let Some(status) = speed.try_wait().unwrap() {
            panic!(
                "the speed layer exited ({status}) at {n} of {total} offsets; its log:\n{}",
                log_tail(&speed_log, 20)
            );
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "speed layer stuck at {n} of {total} offsets; its log:\n{}",
            log_tail(&speed_log, 20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = tokio::time::timeout(Duration::from_secs(180), ingest.wait_with_output())
        .await
        .expect("the ingest caught up within 3 minutes")
        .unwrap()
        .status;
    assert!(status.success(), "the ingest failed ({status}); its log:\n{}", log_tail(&ingest_log, 20));
    // The rejects are committed to the outbox with the offsets; wait until
    // they are shipped before stopping the speed layer.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.dlq_outbox").fetch_one(&pool).await.unwrap();
        if waiting == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{waiting} rejects still in the outbox; the speed layer's log:\n{}",
            log_tail(&speed_log, 20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    speed.start_kill().unwrap();
    speed.wait().await.unwrap();

    // Every bad record: in the DLQ and in events_rejected, exactly once,
    // byte for byte, with its position and its reason.
    let in_dlq = read_dlq(&stack, &dlq, &topic, bad_count);
    assert_every_bad_record_kept("the DLQ", &in_dlq, &bad_sent);
    let lake = Lake::parse(lake_path.to_str().unwrap()).unwrap();
    let in_lake = read_rejected(&lake).await;
    assert_eq!(in_lake.len(), bad_count, "events_rejected rows");
    assert_every_bad_record_kept("events_rejected", &in_lake, &bad_sent);

    // Every valid event: once in the lake, and counted in serving.
    let (ids, rows) = lake_event_ids(&lake).await;
    assert_eq!(rows, good_count, "rows of the lake's events table");
    let missing: Vec<_> = expected_ids.difference(&ids).take(5).collect();
    let extra: Vec<_> = ids.difference(&expected_ids).take(5).collect();
    assert!(missing.is_empty() && extra.is_empty(), "lake events: missing {missing:?}, unexpected {extra:?}");
    assert_demand_eq(&serving_demand(&pool).await, &expected, "serving.product_demand_hourly");
}
