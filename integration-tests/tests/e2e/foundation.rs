//! Foundation against the real stack: migrations and generated views in
//! PostgreSQL, the roles, the exact merge SQL, the view definitions in
//! DataFusion, and the generator's traffic through a real Kafka broker.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Int64Type, TimestampMicrosecondType};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use integration_tests::fixture::Stack;
use integration_tests::generator::{self, Args};
use integration_tests::shop::{Shop, ShopConfig};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use shared_schema::derived::serving_relations;
use shared_schema::views::{self, Reader, ViewDef, product_demand_hourly};
use shared_schema::{EventDecoder, EventType, RawRecord, events_schema};
use sqlx::{AssertSqlSafe, PgPool, Row};

async fn columns(pool: &PgPool, schema: &str, table: &str) -> Vec<(String, String)> {
    sqlx::query(
        "SELECT column_name::text, data_type::text FROM information_schema.columns
         WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
    )
    .bind(schema)
    .bind(table)
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

fn pg_type(ty: shared_schema::views::SqlType) -> &'static str {
    match ty.postgres() {
        "timestamptz" => "timestamp with time zone",
        other => other,
    }
}

fn expected(cols: Vec<(&'static str, shared_schema::views::SqlType)>) -> Vec<(String, String)> {
    cols.into_iter().map(|(n, t)| (n.to_string(), pg_type(t).to_string())).collect()
}

#[tokio::test]
async fn migrated_tables_match_view_definitions_and_prepare_is_idempotent() {
    let (_, pool) = Stack::from_env().fresh_database("migrations").await.unwrap();
    let d1 = platform::db::migrate(&pool, Some(500)).await.unwrap();
    let d2 = platform::db::migrate(&pool, None).await.unwrap();
    assert_eq!(d1, d2, "a second prepare changes nothing");
    assert_eq!(d1.segment_size.get(), 500);
    let err = platform::db::migrate(&pool, Some(1000)).await.unwrap_err();
    assert!(err.to_string().contains("segment size is 500"), "{err}");

    for v in views::all() {
        assert_eq!(columns(&pool, "batch", v.name).await, expected(v.batch_columns()), "batch.{}", v.name);
        assert_eq!(columns(&pool, "speed", v.name).await, expected(v.speed_columns()), "speed.{}", v.name);
        let serving: Vec<(String, String)> = expected(v.batch_columns());
        assert_eq!(columns(&pool, "serving", v.name).await, serving, "serving.{}", v.name);
    }
    for t in shared_schema::derived::BATCH_TABLES {
        let cols: Vec<_> = t.columns.to_vec();
        assert_eq!(columns(&pool, "batch", t.name).await, expected(cols.clone()), "batch.{}", t.name);
        assert_eq!(columns(&pool, "serving", t.name).await, expected(cols), "serving.{}", t.name);
    }
    // Every generated relation, and the fingerprint of the set.
    let views: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.generated_views").fetch_one(&pool).await.unwrap();
    assert_eq!(views, serving_relations(views::all()).len() as i64 + 1);
}

/// Each batch relation is a view over one of two tables with the same
/// columns and indexes; a shadow load begun twice (by a caller committing
/// between the steps, which the publish does not) keeps the indexes it
/// saved, and a shadow whose load has not ended cannot be swapped in.
#[tokio::test]
async fn batch_relations_are_views_over_pairs_of_tables() {
    let (_, pool) = Stack::from_env().migrated_database("shadow_pairs", None).await.unwrap();
    let indexes = |table: String| {
        let pool = pool.clone();
        async move {
            let defs: Vec<String> = sqlx::query_scalar(
                "SELECT regexp_replace(pg_get_indexdef(indexrelid), '__[ab]', '__x', 'g') FROM pg_index
                 WHERE indrelid = $1::regclass ORDER BY 1",
            )
            .bind(table)
            .fetch_all(&pool)
            .await
            .unwrap();
            defs
        }
    };
    let names: Vec<&str> = views::all()
        .iter()
        .map(|v| v.name)
        .chain(shared_schema::derived::BATCH_TABLES.iter().map(|t| t.name))
        .collect();
    for name in &names {
        let kind: String = sqlx::query_scalar("SELECT relkind::text FROM pg_class WHERE oid = $1::regclass")
            .bind(format!("batch.{name}"))
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(kind, "v", "batch.{name} is a view");
        let view = columns(&pool, "batch", name).await;
        assert_eq!(columns(&pool, "batch", &format!("{name}__a")).await, view, "{name}__a");
        assert_eq!(columns(&pool, "batch", &format!("{name}__b")).await, view, "{name}__b");
        let a = indexes(format!("batch.{name}__a")).await;
        assert!(!a.is_empty(), "{name}__a has its primary key");
        assert_eq!(indexes(format!("batch.{name}__b")).await, a, "{name}: both tables index alike");
    }

    let name = "user_product_state";
    let shadow: String = sqlx::query_scalar("SELECT batch.shadow_begin($1)").bind(name).fetch_one(&pool).await.unwrap();
    assert_eq!(shadow, "batch.user_product_state__b");
    assert_eq!(indexes(shadow.clone()).await, Vec::<String>::new(), "loaded without indexes");
    let again: String = sqlx::query_scalar("SELECT batch.shadow_begin($1)").bind(name).fetch_one(&pool).await.unwrap();
    assert_eq!(again, shadow);
    let e = sqlx::query("SELECT batch.shadow_swap($1)").bind(name).execute(&pool).await.unwrap_err();
    assert!(e.to_string().contains("still being loaded"), "{e}");
    sqlx::query("SELECT batch.shadow_end($1)").bind(name).execute(&pool).await.unwrap();
    assert_eq!(indexes(shadow).await, indexes(format!("batch.{name}__a")).await, "the indexes are back");
    sqlx::query("SELECT batch.shadow_swap($1)").bind(name).execute(&pool).await.unwrap();
    let active: String = sqlx::query_scalar("SELECT active FROM ops.batch_shadows WHERE name = $1")
        .bind(name)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(active, "b");
    let e = sqlx::query("SELECT batch.shadow_begin('nothing')").execute(&pool).await.unwrap_err();
    assert!(e.to_string().contains("has no shadow table"), "{e}");

    // A migration that adds a column to a pair keeps every serving view in
    // place; one that drops a column has `migrate` re-create them.
    let generated = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM ops.generated_views").fetch_one(&pool).await.unwrap()
    };
    let before = generated().await;
    sqlx::raw_sql(
        "ALTER TABLE batch.products__a ADD COLUMN brand text;
         ALTER TABLE batch.products__b ADD COLUMN brand text;
         SELECT batch.shadow_view('products');",
    )
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(columns(&pool, "batch", "products").await.last().map(|(n, _)| n.as_str()), Some("brand"));
    sqlx::query("SELECT count(*) FROM serving.products").execute(&pool).await.unwrap();
    assert_eq!(generated().await, before, "the serving views stay");
    sqlx::raw_sql(
        "ALTER TABLE batch.products__a DROP COLUMN brand CASCADE;
         ALTER TABLE batch.products__b DROP COLUMN brand CASCADE;
         SELECT batch.shadow_view('products');",
    )
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(generated().await, 0, "migrate re-creates the serving views");
    platform::db::migrate(&pool, None).await.unwrap();
    sqlx::query("SELECT count(*) FROM serving.products").execute(&pool).await.unwrap();
}

/// Each read-only role reads exactly the serving relations granted to it,
/// derived views included (they call a function that reads batch and
/// speed tables the roles themselves may not read).
#[tokio::test]
async fn reader_roles_read_exactly_their_serving_relations() {
    let (_, pool) = Stack::from_env().migrated_database("reader_roles", None).await.unwrap();
    for reader in [Reader::Dashboard, Reader::Recommender] {
        for r in serving_relations(views::all()) {
            let mut tx = pool.begin().await.unwrap();
            sqlx::query(AssertSqlSafe(format!("SET LOCAL ROLE {}", reader.role()))).execute(&mut *tx).await.unwrap();
            let read =
                sqlx::query(AssertSqlSafe(format!("SELECT * FROM serving.{} LIMIT 1", r.name))).execute(&mut *tx).await;
            tx.rollback().await.unwrap();
            match read {
                Ok(_) => assert!(r.readers.contains(&reader), "{} may not read serving.{}", reader.role(), r.name),
                Err(e) => {
                    assert!(!r.readers.contains(&reader), "{} must read serving.{}: {e}", reader.role(), r.name);
                    assert!(e.to_string().contains("permission denied"), "{}: {e}", r.name);
                }
            }
        }
    }
}

#[tokio::test]
async fn dashboard_reader_sees_aggregates_only_and_writes_nothing() {
    let (_, pool) = Stack::from_env().migrated_database("roles", None).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL ROLE dashboard_reader").execute(&mut *tx).await.unwrap();
    sqlx::query("SELECT count(*) FROM serving.product_demand_hourly").execute(&mut *tx).await.unwrap();
    tx.rollback().await.unwrap();

    for denied in [
        "SELECT count(*) FROM serving.user_product_state",
        "SELECT count(*) FROM batch.product_demand_hourly",
        "SELECT count(*) FROM speed.product_demand_hourly",
        "DELETE FROM ops.cut",
        "CREATE TABLE serving.x (a int)",
    ] {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("SET LOCAL ROLE dashboard_reader").execute(&mut *tx).await.unwrap();
        let err = sqlx::query(denied).execute(&mut *tx).await.unwrap_err();
        assert!(err.to_string().contains("permission denied"), "{denied}: {err}");
        tx.rollback().await.unwrap();
    }

    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL ROLE recommender_reader").execute(&mut *tx).await.unwrap();
    sqlx::query("SELECT count(*) FROM serving.user_product_state").execute(&mut *tx).await.unwrap();
    tx.rollback().await.unwrap();
}

/// serving = batch + speed rows at or above the cut, per partition: rows
/// of segments below the cut are the batch's and must not count twice.
#[tokio::test]
async fn serving_view_merges_batch_and_speed_exactly_at_the_cut() {
    let (_, pool) = Stack::from_env().fresh_database("merge").await.unwrap();
    platform::db::migrate(&pool, Some(100)).await.unwrap();
    let hour = "2026-11-24 13:00:00+00";
    sqlx::query("INSERT INTO batch.product_demand_hourly VALUES ($1::timestamptz, 'p-1', 10, 1, 0, 1, 2, 500)")
        .bind(hour)
        .execute(&pool)
        .await
        .unwrap();
    // Partition 0 cut at offset 300 (segment 3); partition 1 has no cut.
    sqlx::query("INSERT INTO ops.cut (kafka_partition, cut_offset) VALUES (0, 300)").execute(&pool).await.unwrap();
    for (partition, segment, views) in [(0, 2, 1000), (0, 3, 5), (0, 4, 7), (1, 0, 11)] {
        sqlx::query(
            "INSERT INTO speed.product_demand_hourly VALUES ($1::timestamptz, 'p-1', $2, $3, $4, 0, 0, 0, 0, 0)",
        )
        .bind(hour)
        .bind(partition as i64)
        .bind(segment as i64)
        .bind(views as i64)
        .execute(&pool)
        .await
        .unwrap();
    }
    let row = sqlx::query(
        "SELECT views, cart_adds, revenue_cents FROM serving.product_demand_hourly WHERE product_id = 'p-1'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let (views, adds, revenue): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!((views, adds, revenue), (10 + 5 + 7 + 11, 1, 500), "segment 2 of partition 0 lies below the cut");

    // The speed upsert adds deltas into the same segment row.
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("CREATE TEMP TABLE d2 (LIKE speed.product_demand_hourly)").execute(&mut *conn).await.unwrap();
    sqlx::query("INSERT INTO d2 VALUES ($1::timestamptz, 'p-1', 0, 4, 3, 0, 0, 0, 0, 0)")
        .bind(hour)
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(product_demand_hourly().speed_upsert_sql("d2"))).execute(&mut *conn).await.unwrap();
    let v: i64 =
        sqlx::query_scalar("SELECT views FROM speed.product_demand_hourly WHERE kafka_partition = 0 AND segment = 4")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    assert_eq!(v, 10);
}

/// Independent computation of product_demand_hourly from the generator's
/// own events, in plain Rust: the view definition must agree exactly.
fn expected_product_demand(events: &[integration_tests::shop::ShopEvent]) -> BTreeMap<(i64, String), [i64; 6]> {
    let mut out: BTreeMap<(i64, String), [i64; 6]> = BTreeMap::new();
    for e in events {
        let hour = e.event_time.timestamp_micros().div_euclid(3_600_000_000) * 3_600_000_000;
        let m = out.entry((hour, e.product_id.clone())).or_default();
        match e.event_type {
            EventType::PageView => m[0] += 1,
            EventType::AddToCart => m[1] += 1,
            EventType::RemoveFromCart => m[2] += 1,
            EventType::Purchase => {
                m[3] += 1;
                m[4] += i64::from(e.quantity.unwrap());
                m[5] += e.revenue_cents();
            }
        }
    }
    out
}

async fn run_sql(batch: RecordBatch, sql: &str) -> Vec<RecordBatch> {
    let ctx = SessionContext::new();
    let table = MemTable::try_new(events_schema(), vec![vec![batch]]).unwrap();
    ctx.register_table("events", Arc::new(table)).unwrap();
    ctx.sql(sql).await.unwrap().collect().await.unwrap()
}

/// The speed rows (with `kafka_partition` and `segment`) whose segment
/// `cut` leaves to the speed layer.
fn speed_rows_left_by(
    batches: &[RecordBatch],
    cut: &shared_schema::OffsetCut,
    size: shared_schema::cut::SegmentSize,
) -> Vec<RecordBatch> {
    batches
        .iter()
        .map(|b| {
            let p = b.column_by_name("kafka_partition").unwrap().as_primitive::<Int64Type>();
            let s = b.column_by_name("segment").unwrap().as_primitive::<Int64Type>();
            let keep: datafusion::arrow::array::BooleanArray = (0..b.num_rows())
                .map(|i| {
                    let partition = shared_schema::Partition(i32::try_from(p.value(i)).unwrap());
                    Some(cut.leaves_to_speed(partition, shared_schema::Segment(s.value(i)), size))
                })
                .collect();
            datafusion::arrow::compute::filter_record_batch(b, &keep).unwrap()
        })
        .collect()
}

fn demand_rows(batches: &[RecordBatch], view: &ViewDef) -> BTreeMap<(i64, String), [i64; 6]> {
    let mut out: BTreeMap<(i64, String), [i64; 6]> = BTreeMap::new();
    for b in batches {
        let hour = b.column_by_name("hour").unwrap().as_primitive::<TimestampMicrosecondType>();
        let product = cast(b.column_by_name("product_id").unwrap(), &DataType::Utf8).unwrap();
        let product = product.as_string::<i32>();
        for i in 0..b.num_rows() {
            let m = out.entry((hour.value(i), product.value(i).to_string())).or_default();
            for (k, name) in view.measure_names().enumerate() {
                m[k] += b.column_by_name(name).unwrap().as_primitive::<Int64Type>().value(i);
            }
        }
    }
    out
}

/// One definition, two executions: the batch query over everything and the
/// speed query's per-segment deltas summed up both equal an independent
/// computation; and batch(below cut) + speed(at or above cut) = batch(all).
#[tokio::test]
async fn view_definition_executes_identically_for_batch_and_speed() {
    let shop = Shop::new(ShopConfig { products: 50, users: 300, rate: 5.0, ..ShopConfig::default() });
    let t0: DateTime<Utc> = Utc.with_ymd_and_hms(2026, 11, 20, 0, 0, 0).unwrap();
    let now = t0 + TimeDelta::days(2);
    let events = shop.events_between(t0, t0 + TimeDelta::hours(6), &[], now, &mut StdRng::seed_from_u64(9));
    let payloads: Vec<String> = events.iter().map(|e| e.to_json()).collect();
    let records: Vec<RawRecord<'_>> = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| RawRecord {
            partition: (i % 3) as i32,
            offset: (i / 3) as i64,
            timestamp: Some(now),
            payload: p.as_bytes(),
        })
        .collect();
    let decoded = EventDecoder::new().decode(&records).unwrap();
    assert!(decoded.rejected.is_empty());
    let truth = expected_product_demand(&events);

    let view = product_demand_hourly();
    let all = demand_rows(&run_sql(decoded.batch.clone(), &view.batch_sql()).await, view);
    assert_eq!(all, truth, "batch query equals the independent computation");
    let speed = demand_rows(&run_sql(decoded.batch.clone(), &view.speed_sql(7)).await, view);
    assert_eq!(speed, truth, "summed speed deltas equal the independent computation");

    let size = shared_schema::cut::SegmentSize::new(7).unwrap();
    let speed = run_sql(decoded.batch.clone(), &view.speed_sql(size.get())).await;
    for cut_at in [0i64, 7, 70, 140, 100_000] {
        let mut cut = shared_schema::OffsetCut::new();
        for p in 0..3 {
            cut.insert(shared_schema::Partition(p), shared_schema::Offset(cut_at + 7 * i64::from(p)));
        }
        // The batch reads the lake restricted to the cut, as `run` does.
        let ctx = SessionContext::new();
        let table = MemTable::try_new(events_schema(), vec![vec![decoded.batch.clone()]]).unwrap();
        ctx.register_table(batch_layer::scope::LAKE_EVENTS, Arc::new(table)).unwrap();
        batch_layer::scope::register_events(&ctx, batch_layer::scope::below(&cut)).await.unwrap();
        let below = demand_rows(&ctx.sql(&view.batch_sql()).await.unwrap().collect().await.unwrap(), view);
        // The speed rows the serving view merges: segments the cut leaves.
        let above = demand_rows(&speed_rows_left_by(&speed, &cut, size), view);
        let mut merged = below.clone();
        for (k, m) in above {
            let e = merged.entry(k).or_default();
            for i in 0..6 {
                e[i] += m[i];
            }
        }
        assert_eq!(merged, truth, "cut at {cut_at}: below + above = all");
    }
}

/// The generator's history and malformed records go through a real broker
/// and come back whole: every event decodes, every bad record is rejected
/// with the reason it was made for, and records are keyed by user.
#[tokio::test]
async fn generated_traffic_round_trips_through_kafka() {
    let stack = Stack::from_env();
    let topic = stack.fresh_topic("generator", 4).await.unwrap();
    let (sales_url, sales) = stack.fresh_database("generator_sales").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let args = Args {
        sales_database_url: sales_url,
        no_catalog: false,
        seed: 7,
        products: 40,
        categories: 5,
        users: 200,
        rate: 0.5,
        bad_fraction: 0.2,
        truth: dir.path().join("truth.json"),
        ..Args::for_tests(stack.brokers(), &topic, 7)
    };
    let truth = generator::run(args).await.unwrap();
    // Traffic follows the time of day (fewer events at night).
    assert!(truth.events_sent > 500, "{}", truth.events_sent);
    assert!(truth.bad_sent > 100, "{}", truth.bad_sent);
    assert_eq!(truth.spikes.len(), 1);
    let written: generator::Truth =
        serde_json::from_slice(&std::fs::read(dir.path().join("truth.json")).unwrap()).unwrap();
    assert_eq!(written.events_sent, truth.events_sent);
    let products: i64 = sqlx::query_scalar("SELECT count(*) FROM products").fetch_one(&sales).await.unwrap();
    assert_eq!(products, 40);

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", stack.brokers())
        .set("group.id", format!("{topic}.check"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let total = truth.events_sent + truth.bad_sent;
    struct Received {
        partition: i32,
        offset: i64,
        timestamp: Option<DateTime<Utc>>,
        payload: Vec<u8>,
        key: Option<Vec<u8>>,
    }
    let mut payloads: Vec<Received> = Vec::new();
    while (payloads.len() as u64) < total {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("records stopped arriving before all were read")
            .unwrap();
        payloads.push(Received {
            partition: m.partition(),
            offset: m.offset(),
            timestamp: shared_schema::decode::kafka_time(m.timestamp().to_millis()),
            payload: m.payload().unwrap_or_default().to_vec(),
            key: m.key().map(<[u8]>::to_vec),
        });
    }
    let records: Vec<RawRecord<'_>> = payloads
        .iter()
        .map(|r| RawRecord { partition: r.partition, offset: r.offset, timestamp: r.timestamp, payload: &r.payload })
        .collect();
    let decoded = EventDecoder::new().decode(&records).unwrap();
    assert_eq!(decoded.batch.num_rows() as u64, truth.events_sent);
    assert_eq!(decoded.rejected.len() as u64, truth.bad_sent);
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    for r in &decoded.rejected {
        *reasons.entry(r.rejection.reason.as_str().to_string()).or_default() += 1;
    }
    assert_eq!(reasons, truth.bad_by_reason);

    // Keyed by user: one user's events all sit in one partition.
    let users = decoded.batch.column_by_name("user_id").unwrap().as_string::<i32>();
    let parts = decoded
        .batch
        .column_by_name("kafka_partition")
        .unwrap()
        .as_primitive::<datafusion::arrow::datatypes::Int32Type>();
    let mut home: BTreeMap<&str, i32> = BTreeMap::new();
    for i in 0..decoded.batch.num_rows() {
        let p = *home.entry(users.value(i)).or_insert(parts.value(i));
        assert_eq!(p, parts.value(i), "user {} spans partitions", users.value(i));
    }
    for Received { payload, key, .. } in payloads.iter().take(50) {
        if let Ok(e) = shared_schema::Event::parse(payload, Utc::now()) {
            assert_eq!(key.as_deref(), Some(e.user_id.as_bytes()));
        }
    }
}
