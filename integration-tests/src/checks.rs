//! Checks the integration tests share: reading a demand view back from
//! PostgreSQL and comparing it with the generator's ground truth.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};

use crate::generator::{Demand, Truth};

/// `product_demand_hourly` keyed by (hour, product).
pub type DemandMap = BTreeMap<(DateTime<Utc>, String), Demand>;

/// Reads a `product_demand_hourly` relation (`serving.…` or `batch.…`).
pub async fn demand(pool: &PgPool, relation: &str) -> DemandMap {
    let sql = format!(
        "SELECT hour, product_id, views, cart_adds, cart_removes, purchases, units, revenue_cents FROM {relation}"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_all(pool)
        .await
        .unwrap_or_else(|e| panic!("reading {relation}: {e}"))
        .into_iter()
        .map(|r| {
            let d = Demand {
                views: r.get(2),
                cart_adds: r.get(3),
                cart_removes: r.get(4),
                purchases: r.get(5),
                units: r.get(6),
                revenue_cents: r.get(7),
            };
            ((r.get(0), r.get(1)), d)
        })
        .collect()
}

/// What dashboards read: `serving.product_demand_hourly`.
pub async fn serving_demand(pool: &PgPool) -> DemandMap {
    demand(pool, "serving.product_demand_hourly").await
}

/// The expected demand of several generator runs together.
pub fn merged(truths: &[&Truth]) -> DemandMap {
    let mut out = DemandMap::new();
    for t in truths {
        for (k, d) in t.demand_map() {
            *out.entry(k).or_default() += d;
        }
    }
    out
}

/// Asserts equality, reporting a few differing keys instead of both maps.
pub fn assert_demand_eq(actual: &DemandMap, expected: &DemandMap, what: &str) {
    let keys: BTreeSet<_> = actual.keys().chain(expected.keys()).collect();
    let diffs: Vec<String> = keys
        .into_iter()
        .filter(|k| actual.get(*k) != expected.get(*k))
        .map(|k| format!("{k:?}: actual {:?}, expected {:?}", actual.get(k), expected.get(k)))
        .collect();
    assert!(
        diffs.is_empty(),
        "{what}: {} of {} keys differ, e.g.\n{}",
        diffs.len(),
        expected.len(),
        diffs[..diffs.len().min(5)].join("\n")
    );
}

/// Sum of a Prometheus counter over all its label sets in the text format.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let series_name = series.split('{').next()?;
            (series_name == name).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Records the speed layer has accounted for: per partition its stored next
/// offset, else the batch's cut (where it starts a partition it never had
/// to store: a cut at the end of the partition leaves it nothing to read).
pub async fn speed_consumed(pool: &PgPool) -> i64 {
    try_speed_consumed(pool).await.unwrap()
}

/// [`speed_consumed`], for tests that stop PostgreSQL meanwhile: the
/// speed layer's own [`speed_layer::offsets::standings`], summed.
pub async fn try_speed_consumed(pool: &PgPool) -> Result<i64, sqlx::Error> {
    let standings = speed_layer::offsets::standings(pool).await?;
    Ok(standings.iter().map(|s| s.next_offset).sum())
}

/// Waits until the speed layer's stored offsets add up to `total` records
/// (five minutes at most: a liveness bound, the whole suite on two CPUs
/// runs these tests several times slower than alone).
pub async fn wait_for_speed(pool: &PgPool, total: i64) {
    wait_for_speed_within(pool, total, std::time::Duration::from_secs(300)).await;
}

/// [`wait_for_speed`] with another bound.
pub async fn wait_for_speed_within(pool: &PgPool, total: i64, within: std::time::Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let n = speed_consumed(pool).await;
        if n >= total {
            assert_eq!(n, total, "the speed layer went past the end of the topic");
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "speed layer at {n} of {total}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Reads the serving totals continuously until `stop`, and once more after
/// it (so a landing that `stop` follows is always read after); returns every
/// distinct (views, revenue) pair it saw, and how many reads it made. Each
/// read also sums the category view in the same snapshot, which must agree.
pub fn watch_totals(
    pool: PgPool,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(Vec<(i64, i64)>, usize)> {
    use std::sync::atomic::Ordering;
    tokio::spawn(async move {
        let mut seen: Vec<(i64, i64)> = Vec::new();
        let mut reads = 0;
        loop {
            let last = stop.load(Ordering::Relaxed);
            reads += 1;
            let (views, revenue, category_views, category_revenue): (i64, i64, i64, i64) = sqlx::query_as(
                "SELECT COALESCE(sum(views), 0)::bigint, COALESCE(sum(revenue_cents), 0)::bigint,
                        (SELECT COALESCE(sum(views), 0)::bigint FROM serving.category_demand_hourly),
                        (SELECT COALESCE(sum(revenue_cents), 0)::bigint FROM serving.category_demand_hourly)
                 FROM serving.product_demand_hourly",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            assert_eq!((category_views, category_revenue), (views, revenue), "category and product totals agree");
            let t = (views, revenue);
            if seen.last() != Some(&t) {
                seen.push(t);
            }
            if last {
                break;
            }
        }
        (seen, reads)
    })
}

/// Adds `rows` rows of an unknown product in hours long past to the
/// published `batch.product_demand_hourly`, so that a full recompute holds
/// far fewer rows than readers see: the row-count check's case.
pub async fn inflate_published_demand(pool: &PgPool, rows: i64) {
    sqlx::query(
        "INSERT INTO batch.product_demand_hourly (hour, product_id, views, cart_adds, cart_removes, purchases, units,
             revenue_cents)
         SELECT timestamptz '2000-01-01 00:00:00+00' + n * interval '1 hour', 'p-inflated', 1, 0, 0, 0, 0, 0
         FROM generate_series(1, $1) AS n",
    )
    .bind(rows)
    .execute(pool)
    .await
    .unwrap();
}

/// Every relation of `schema` as readers see it (a batch relation's view,
/// not its two tables), each as its rows in JSON, in an order that does not
/// depend on fractions.
pub async fn schema_rows(pool: &PgPool, schema: &str) -> BTreeMap<String, Vec<serde_json::Value>> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables
         WHERE table_schema = $1 AND table_type IN ('BASE TABLE', 'VIEW') AND table_name::text !~ '__[ab]$'
         ORDER BY 1",
    )
    .bind(schema)
    .fetch_all(pool)
    .await
    .unwrap();
    let mut out = BTreeMap::new();
    for table in tables {
        let sql = format!("SELECT to_jsonb(t) FROM {schema}.{table} t");
        let mut rows: Vec<serde_json::Value> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_all(pool).await.unwrap();
        // Sorted by everything but fractions, which may differ in their last
        // bits between two computations of the same rows.
        rows.sort_by_cached_key(|r| match r {
            serde_json::Value::Object(m) => m
                .iter()
                .filter(|(_, v)| !v.as_number().is_some_and(serde_json::Number::is_f64))
                .map(|(k, v)| format!("{k}={v};"))
                .collect(),
            other => other.to_string(),
        });
        out.insert(table, rows);
    }
    out
}

/// Asserts two sets of tables hold the same rows. Numbers must be equal,
/// except that fractions (similarity scores, shares) may differ in their
/// last bits: a distributed sum adds in another order.
pub fn assert_tables_match(
    actual: &BTreeMap<String, Vec<serde_json::Value>>,
    expected: &BTreeMap<String, Vec<serde_json::Value>>,
    what: &str,
) {
    assert_eq!(actual.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>(), "{what}: the tables differ");
    for (table, rows) in expected {
        let got = &actual[table];
        assert_eq!(got.len(), rows.len(), "{what}: {table} has {} rows, expected {}", got.len(), rows.len());
        for (a, e) in got.iter().zip(rows) {
            assert!(json_close(a, e), "{what}: {table} differs:\n  actual   {a}\n  expected {e}");
        }
    }
}

fn json_close(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(f64::NAN));
            (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0)
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| json_close(v, w)))
        }
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(v, w)| json_close(v, w)),
        _ => a == b,
    }
}

/// Runs `sql` over lake table `table`, registered as `t`; panics when the
/// lake has no such table.
pub async fn lake_query(
    lake: &batch_layer::lake::Lake,
    table: &str,
    sql: &str,
) -> Vec<datafusion::arrow::array::RecordBatch> {
    let t = lake.open(table).await.unwrap().unwrap_or_else(|| panic!("the lake has no table {table}"));
    let ctx = datafusion::prelude::SessionContext::new();
    batch_layer::lake::register(&ctx, "t", &t).await.unwrap();
    ctx.sql(sql).await.unwrap().collect().await.unwrap()
}

/// A record read back from a topic.
#[derive(Debug, Clone)]
pub struct TopicRecord {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    /// Kafka timestamp.
    pub timestamp: Option<DateTime<Utc>>,
}

/// Every record of `topic`, from each partition's start to its end (two
/// minutes at most).
pub fn topic_records(brokers: &str, topic: &str) -> Vec<TopicRecord> {
    use rdkafka::Message;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}.read-back"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap_or_else(|e| panic!("a consumer for {topic}: {e}"));
    let metadata = consumer
        .fetch_metadata(Some(topic), std::time::Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("metadata of {topic}: {e}"));
    let partitions = metadata.topics()[0].partitions().len();
    let mut assignment = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        assignment.add_partition_offset(topic, p as i32, rdkafka::Offset::Beginning).unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let (mut ended, mut records) = (BTreeSet::new(), Vec::new());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while ended.len() < partitions {
        assert!(std::time::Instant::now() < deadline, "reading {topic} back took over two minutes");
        match consumer.poll(std::time::Duration::from_secs(1)) {
            Some(Ok(m)) => {
                ended.remove(&m.partition());
                records.push(TopicRecord {
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().unwrap_or_default().to_vec(),
                    timestamp: m.timestamp().to_millis().and_then(DateTime::from_timestamp_millis),
                });
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                ended.insert(p);
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    records
}
