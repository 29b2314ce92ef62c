//! The relations built on the views, each against an independent
//! computation: category demand through the catalog, popular products,
//! item similarity, demand spikes and freshness.

use std::collections::BTreeMap;

use batch_layer::ingest::{self, IngestConfig};
use batch_layer::lake::Lake;
use batch_layer::recompute::{self, RunConfig, RunOutcome};
use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use integration_tests::fixture::Stack;
use integration_tests::generator::{self, Args, Demand, Truth};
use shared_schema::derived::{POPULAR_DAYS, POPULAR_HALF_LIFE_HOURS, POPULAR_SCORE};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// A topic, a database whose batch holds every offset (segment size 1), a
/// lake, and the run configuration over them.
struct Setup {
    stack: Stack,
    topic: String,
    pool: PgPool,
    lake: Lake,
    run: RunConfig,
    _dir: tempfile::TempDir,
}

async fn setup(name: &str) -> Setup {
    let stack = Stack::from_env();
    let topic = stack.fresh_topic(name, 2).await.unwrap();
    let (url, pool) = stack.fresh_database(name).await.unwrap();
    platform::db::migrate(&pool, Some(1)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::parse(dir.path().to_str().unwrap()).unwrap();
    let run = RunConfig { full: true, ..RunConfig::new(url, lake.clone(), topic.clone()) };
    Setup { stack, topic, pool, lake, run, _dir: dir }
}

impl Setup {
    /// Ingests everything sent so far.
    async fn ingest(&self) {
        let config = IngestConfig::catch_up(self.stack.brokers(), &self.topic, &self.lake);
        ingest::run(config, CancellationToken::new()).await.unwrap();
    }

    /// Ingests everything sent so far and publishes a full batch run.
    async fn ingest_and_run(&self) {
        self.ingest().await;
        let outcome = recompute::run(&self.run).await.unwrap();
        assert!(matches!(outcome, RunOutcome::Published { .. }), "{outcome:?}");
    }

    /// A shop database `name` whose catalog the batch runs copy; returns
    /// it, and generator arguments (`seed`) that seed its catalog.
    async fn with_catalog(&mut self, name: &str, seed: u64) -> (PgPool, Args) {
        let (sales_url, sales) = self.stack.fresh_database(name).await.unwrap();
        self.run.sales_database_url = Some(sales_url.clone());
        let args = Args {
            no_catalog: false,
            sales_database_url: sales_url,
            ..Args::for_tests(self.stack.brokers(), &self.topic, seed)
        };
        (sales, args)
    }
}

/// Views, cart adds, purchases and revenue per (hour, category).
type CategoryDemand = BTreeMap<(DateTime<Utc>, String), (i64, i64, i64, i64)>;

/// layer, last event time, position, last update.
type FreshnessRow = (String, Option<DateTime<Utc>>, Option<i64>, Option<DateTime<Utc>>);

fn interest_weighted(d: &Demand) -> f64 {
    (d.views + 3 * d.cart_adds + 10 * d.purchases) as f64
}

/// `serving.popular_products` computed from the generator's own counts.
fn expected_popularity(truth: &Truth) -> Vec<(String, f64)> {
    let demand = truth.demand_map();
    let latest = demand.keys().map(|(h, _)| *h).max().expect("some demand");
    let mut scores: BTreeMap<String, f64> = BTreeMap::new();
    for ((hour, product), d) in &demand {
        if *hour <= latest - TimeDelta::days(POPULAR_DAYS) {
            continue;
        }
        let age_hours = (latest - *hour).num_seconds() as f64 / 3600.0;
        *scores.entry(product.clone()).or_default() +=
            interest_weighted(d) * 0.5f64.powf(age_hours / POPULAR_HALF_LIFE_HOURS);
    }
    let mut ranked: Vec<(String, f64)> = scores.into_iter().filter(|(_, s)| *s > 0.0).collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    ranked
}

#[tokio::test]
async fn category_demand_and_popularity_equal_independent_computations() {
    let s = setup("derived_category").await;
    let (sales_url, sales) = s.stack.fresh_database("derived_category_sales").await.unwrap();
    let args = Args {
        backfill_hours: 30,
        no_catalog: false,
        sales_database_url: sales_url.clone(),
        ..Args::for_tests(s.stack.brokers(), &s.topic, 91)
    };
    let truth = generator::run(args).await.unwrap();
    let run = RunConfig { sales_database_url: Some(sales_url), ..s.run.clone() };
    let config = IngestConfig::catch_up(s.stack.brokers(), &s.topic, &s.lake);
    ingest::run(config, CancellationToken::new()).await.unwrap();
    assert!(matches!(recompute::run(&run).await.unwrap(), RunOutcome::Published { .. }));

    // Category demand: the generator's counts summed by the shop's own catalog.
    let catalog: BTreeMap<String, String> =
        sqlx::query_as::<_, (String, String)>("SELECT product_id, category FROM products")
            .fetch_all(&sales)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let mut expected = CategoryDemand::new();
    for ((hour, product), d) in truth.demand_map() {
        let e = expected.entry((hour, catalog[&product].clone())).or_default();
        *e = (e.0 + d.views, e.1 + d.cart_adds, e.2 + d.purchases, e.3 + d.revenue_cents);
    }
    let actual: CategoryDemand = sqlx::query_as::<_, (DateTime<Utc>, String, i64, i64, i64, i64)>(
        "SELECT hour, category, views, cart_adds, purchases, revenue_cents FROM serving.category_demand_hourly",
    )
    .fetch_all(&s.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(h, c, v, a, p, r)| ((h, c), (v, a, p, r)))
    .collect();
    assert!(expected.len() > 30, "enough (hour, category) cells to mean something: {}", expected.len());
    assert_eq!(actual, expected, "serving.category_demand_hourly");

    // Popularity: decayed recent demand, ranked.
    let expected = expected_popularity(&truth);
    let actual: Vec<(i64, String, f64)> =
        sqlx::query_as("SELECT rank, product_id, score FROM serving.popular_products ORDER BY rank")
            .fetch_all(&s.pool)
            .await
            .unwrap();
    assert_eq!(actual.len(), expected.len());
    for ((rank, product, score), (i, (want_product, want_score))) in actual.iter().zip(expected.iter().enumerate()) {
        assert_eq!((*rank, product), (i as i64 + 1, want_product), "popular_products rank {rank}");
        assert!((score - want_score).abs() <= 1e-9 * want_score, "{product}: score {score}, expected {want_score}");
    }

    // The catalog copy is republished when the shop changed it, not by
    // every run.
    let s = &s;
    let more_traffic = |seed| async move {
        generator::run(Args { backfill_hours: 1, ..Args::for_tests(s.stack.brokers(), &s.topic, seed) }).await.unwrap();
        let config = IngestConfig::catch_up(s.stack.brokers(), &s.topic, &s.lake);
        ingest::run(config, CancellationToken::new()).await.unwrap();
    };
    let incremental = RunConfig { full: false, ..run.clone() };
    more_traffic(92).await;
    let RunOutcome::Published { tables, .. } = recompute::run(&incremental).await.unwrap() else {
        panic!("no publish")
    };
    assert!(!tables.contains(&"products"), "an unchanged catalog is not republished: {tables:?}");
    sqlx::query("UPDATE products SET category = 'c-renamed' WHERE product_id = (SELECT min(product_id) FROM products)")
        .execute(&sales)
        .await
        .unwrap();
    more_traffic(93).await;
    let RunOutcome::Published { tables, .. } = recompute::run(&incremental).await.unwrap() else {
        panic!("no publish")
    };
    assert!(tables.contains(&"products"), "a changed catalog is republished: {tables:?}");
    let renamed: i64 = sqlx::query_scalar("SELECT count(*) FROM batch.products WHERE category = 'c-renamed'")
        .fetch_one(&s.pool)
        .await
        .unwrap();
    assert_eq!(renamed, 1);
}

async fn similarity(pool: &PgPool) -> BTreeMap<(String, String), (f64, i64)> {
    sqlx::query_as::<_, (String, String, f64, i64)>(
        "SELECT product_id, similar_product_id, score, rank FROM serving.item_similarity",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(a, b, s, r)| ((a, b), (s, r)))
    .collect()
}

/// Co-occurrence on hand-made activity, where every score is known:
/// cosine of the users two products share, each user's most recent 30
/// products only, removals not counting as interest, top 20 per product.
#[tokio::test]
async fn item_similarity_scores_shared_users_of_recent_activity() {
    let s = setup("derived_similarity").await;
    let t0 = Utc::now() - TimeDelta::hours(3);
    let mut records = vec![
        generator::event_record("u1", "p1", "page_view", t0),
        generator::event_record("u1", "p2", "page_view", t0),
        generator::event_record("u2", "p1", "page_view", t0),
        generator::event_record("u2", "p2", "add_to_cart", t0),
        generator::event_record("u3", "p1", "page_view", t0),
        generator::event_record("u3", "p3", "purchase", t0),
        // A removal alone is no interest: u5 pairs p9 with nothing.
        generator::event_record("u5", "p1", "remove_from_cart", t0),
        generator::event_record("u5", "p9", "page_view", t0),
    ];
    // A heavy user: 35 products, one a minute; only the latest 30 count.
    for i in 0..35 {
        records.push(generator::event_record("u4", &format!("q{i:02}"), "page_view", t0 + TimeDelta::minutes(i)));
    }
    generator::send_records(s.stack.brokers(), &s.topic, &records).unwrap();
    s.ingest_and_run().await;

    let sim = similarity(&s.pool).await;
    let get = |a: &str, b: &str| sim.get(&(a.to_string(), b.to_string())).copied();
    let close = |x: f64, y: f64| (x - y).abs() < 1e-12;
    // p1 has 3 users, p2 2, p3 1.
    let (s12, r12) = get("p1", "p2").expect("p1 ~ p2");
    let (s13, r13) = get("p1", "p3").expect("p1 ~ p3");
    assert!(close(s12, 2.0 / 6f64.sqrt()) && close(s13, 1.0 / 3f64.sqrt()), "{s12} {s13}");
    assert_eq!((r12, r13), (1, 2));
    assert_eq!(get("p2", "p1").map(|x| x.0), Some(s12), "symmetric");
    assert_eq!(get("p2", "p3"), None, "no user has both");
    assert!(!sim.keys().any(|(a, b)| a == "p9" || b == "p9"), "a removal is not interest");
    assert!(!sim.keys().any(|(a, b)| a == b), "no product is similar to itself");

    // u4's five oldest products fell out of the window; the rest pair at
    // score 1 (one shared user each), cut to the top 20 by id.
    for old in ["q00", "q01", "q02", "q03", "q04"] {
        assert!(!sim.keys().any(|(a, b)| a == old || b == old), "{old} is beyond u4's 30 most recent");
    }
    let q10: Vec<(&String, i64)> =
        sim.iter().filter(|((a, _), _)| a == "q10").map(|((_, b), (_, r))| (b, *r)).collect();
    assert_eq!(q10.len(), 20);
    assert_eq!(q10[0], (&"q05".to_string(), 1));
    assert!(sim.iter().filter(|((a, _), _)| a.starts_with('q')).all(|(_, (score, _))| close(*score, 1.0)));
}

/// Category demand as it was defined before the rollups: the merged product
/// rows summed through the catalog. The oracle of the rollup test.
const CATEGORY_OVER_MERGED_ROWS: &str = "
    SELECT d.hour, COALESCE(p.category, 'unknown') AS category, sum(d.views)::bigint, sum(d.cart_adds)::bigint,
           sum(d.cart_removes)::bigint, sum(d.purchases)::bigint, sum(d.units)::bigint, sum(d.revenue_cents)::bigint
    FROM serving.product_demand_hourly AS d LEFT JOIN batch.products AS p ON p.product_id = d.product_id
    GROUP BY 1, 2 ORDER BY 1, 2";

/// Each product-hour's expected demand as spike detection defined it before
/// the rollups: its baseline share of the hour's level, the level computed
/// over every merged row of the hour. (Products without a baseline, which
/// are measured against a prior, are the launch test's.)
const EXPECTED_OVER_MERGED_ROWS: &str = "
    WITH d AS (SELECT hour, product_id, (views + cart_adds + purchases)::double precision AS demand
               FROM serving.product_demand_hourly),
    t AS (SELECT d.hour, percentile_cont(0.5) WITHIN GROUP (ORDER BY d.demand / lb.share) AS level
          FROM d JOIN batch.demand_baseline AS lb ON lb.product_id = d.product_id
          WHERE lb.share >= (SELECT 0.5 / count(*) FROM batch.demand_baseline)
          GROUP BY d.hour)
    SELECT d.hour, d.product_id, d.demand, GREATEST(b.share * t.level, 1.0)
    FROM d JOIN t ON t.hour = d.hour JOIN batch.demand_baseline AS b ON b.product_id = d.product_id
    ORDER BY 1, 2";

type CategoryRow = (DateTime<Utc>, String, i64, i64, i64, i64, i64, i64);
type ExpectedRow = (DateTime<Utc>, String, f64, f64);

/// Popularity as it was defined before its rollup: the merged product rows
/// of the last days, decayed to the newest hour, ranked.
fn popular_over_merged_rows() -> String {
    format!(
        "SELECT product_id, score FROM (
             SELECT product_id,
                    sum(({POPULAR_SCORE}) * power(0.5, extract(epoch FROM n.latest - hour)::double precision
                        / ({POPULAR_HALF_LIFE_HOURS} * 3600.0)))::double precision AS score
             FROM serving.product_demand_hourly
             CROSS JOIN (SELECT serving.latest_demand_hour() AS latest) AS n
             WHERE hour > n.latest - interval '{POPULAR_DAYS} days'
             GROUP BY product_id) AS s
         WHERE score > 0 ORDER BY score DESC, product_id"
    )
}

/// `serving.popular_products` equals [`popular_over_merged_rows`]: the
/// same products in the same order, each score within rounding; returns
/// how many products it ranks.
async fn assert_popularity_matches(pool: &PgPool, when: &str) -> usize {
    let oracle: Vec<(String, f64)> =
        sqlx::query_as(sqlx::AssertSqlSafe(popular_over_merged_rows())).fetch_all(pool).await.unwrap();
    let served: Vec<(i64, String, f64)> =
        sqlx::query_as("SELECT rank, product_id, score FROM serving.popular_products ORDER BY rank")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(served.len(), oracle.len(), "serving.popular_products {when}: {served:?} against {oracle:?}");
    for ((rank, product, score), (i, (want_product, want_score))) in served.iter().zip(oracle.iter().enumerate()) {
        assert_eq!((*rank, product), (i as i64 + 1, want_product), "serving.popular_products {when}: rank {rank}");
        assert!(
            (score - want_score).abs() <= 1e-9 * want_score,
            "serving.popular_products {when}: {product} scores {score}, the merged rows {want_score}"
        );
    }
    served.len()
}

/// `serving.category_demand_hourly` and the expected demand of
/// `serving.demand_spike_hours` equal the oracles; returns how many rows
/// each has.
async fn assert_rollups_match(pool: &PgPool, when: &str) -> (usize, usize) {
    let oracle: Vec<CategoryRow> = sqlx::query_as(CATEGORY_OVER_MERGED_ROWS).fetch_all(pool).await.unwrap();
    let served: Vec<CategoryRow> = sqlx::query_as(
        "SELECT hour, category, views, cart_adds, cart_removes, purchases, units, revenue_cents
         FROM serving.category_demand_hourly ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(served, oracle, "serving.category_demand_hourly {when}");
    let categories = served.len();
    let oracle: Vec<ExpectedRow> = sqlx::query_as(EXPECTED_OVER_MERGED_ROWS).fetch_all(pool).await.unwrap();
    let served: Vec<ExpectedRow> = sqlx::query_as(
        "SELECT hour, product_id, demand, expected FROM serving.demand_spike_hours
             WHERE basis = 'product' ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(served, oracle, "serving.demand_spike_hours {when}");
    assert!(assert_popularity_matches(pool, when).await > 0, "popularity ranks products {when}");
    (categories, served.len())
}

/// Popularity reads the batch's part from its rollup, as of the newest
/// batch hour, and takes out the batch hours that left its window since
/// when the speed layer holds newer hours. However far ahead the speed
/// layer is (none to 30 hours, with late rows in an old hour and rows
/// below the cut it must ignore), the scores are those of the merged rows.
#[tokio::test]
async fn popularity_from_its_rollup_equals_popularity_over_merged_rows() {
    let s = setup("derived_popular").await;
    // Nine days of batch demand for three products, each its own pattern,
    // and a fourth whose demand is all at the window's far end, so the
    // ranking changes as hours leave the window.
    sqlx::query(
        "INSERT INTO batch.product_demand_hourly
             (hour, product_id, views, cart_adds, cart_removes, purchases, units, revenue_cents)
         SELECT date_trunc('hour', now()) - make_interval(hours => h), 'p-' || p,
                1 + (h * (p + 3) + p * 11) % 40, (h + p) % 5, 0, (h * p) % 3, (h * p) % 3, 999 * ((h * p) % 3)
         FROM generate_series(0, 215) AS h CROSS JOIN generate_series(1, 4) AS p
         WHERE p < 4 OR h BETWEEN 160 AND 169",
    )
    .execute(&s.pool)
    .await
    .unwrap();
    platform::db::refill_rollups(&s.pool).await.unwrap();
    sqlx::query("INSERT INTO ops.cut (kafka_partition, cut_offset) VALUES (0, 100)").execute(&s.pool).await.unwrap();
    let rolled_up: i64 =
        sqlx::query_scalar("SELECT count(*) FROM batch.popular_scores").fetch_one(&s.pool).await.unwrap();
    assert_eq!(rolled_up, 4, "one row per product of the window");
    assert_eq!(assert_popularity_matches(&s.pool, "with the batch alone").await, 4);

    for ahead in [1, 5, 30] {
        sqlx::query("DELETE FROM speed.product_demand_hourly").execute(&s.pool).await.unwrap();
        // Above the cut (segment 1000): every hour after the batch's newest
        // up to `ahead`, and a late row in a batch hour; below it (segment
        // 10, already in the batch): a row that must not count.
        sqlx::query(
            "WITH b AS (SELECT max(hour) AS newest FROM batch.product_demand_hourly)
             INSERT INTO speed.product_demand_hourly
                 (hour, product_id, kafka_partition, segment, views, cart_adds, cart_removes, purchases, units,
                  revenue_cents)
             SELECT b.newest + make_interval(hours => k), 'p-' || (1 + k % 4), 0, 1000, 5 * k, k % 3, 0, k % 2,
                    k % 2, 999 * (k % 2)
             FROM b CROSS JOIN generate_series(1, $1) AS k
             UNION ALL
             SELECT b.newest - interval '30 hours', 'p-4', 0, 1000, 400, 0, 0, 0, 0, 0 FROM b
             UNION ALL
             SELECT b.newest - interval '2 hours', 'p-1', 0, 10, 100000, 0, 0, 0, 0, 0 FROM b",
        )
        .bind(ahead)
        .execute(&s.pool)
        .await
        .unwrap();
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM batch.product_demand_hourly
             WHERE hour > (SELECT max(hour) FROM batch.popular_scores) - interval '7 days'
               AND hour <= serving.latest_demand_hour() - interval '7 days'",
        )
        .fetch_one(&s.pool)
        .await
        .unwrap();
        assert!(left > 0, "{ahead} hours ahead: batch hours left the window since the rollup's anchor");
        assert_popularity_matches(&s.pool, &format!("with the speed layer {ahead} hours ahead")).await;
    }
}

/// The category and spike views read the batch's per-hour rollups instead
/// of aggregating all history on each read. Whatever the batch and the
/// speed layer hold (speed rows in the current hour, in an hour the batch
/// has not seen, late ones in an old hour; after full and incremental runs,
/// a catalog change, and a migrate that refills them), they give what the
/// views over the merged product rows give.
#[tokio::test]
async fn rollups_give_what_the_views_over_merged_rows_give() {
    let mut s = setup("derived_rollups").await;
    let (sales, args) = s.with_catalog("derived_rollups_sales", 97).await;
    generator::run(Args { backfill_hours: 30, ..args }).await.unwrap();
    s.ingest_and_run().await;
    let run = s.run.clone();
    let ingest_all = || s.ingest();
    let rollup_rows = |table: &'static str| {
        let pool = s.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM batch.{table}")))
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let (categories, spike_hours) = assert_rollups_match(&s.pool, "after a full run").await;
    assert!(categories > 30 && spike_hours > 100, "too little to mean something: {categories}, {spike_hours}");
    assert_eq!(rollup_rows("category_demand_hourly").await as usize, categories, "the batch's rows are all rolled up");
    assert!(rollup_rows("demand_levels").await >= 30);

    // Speed rows above the cut (segments far past it): in the newest hour,
    // in the hour after it (no batch rows yet), and late ones in the oldest
    // hour, one of a product the catalog does not know.
    sqlx::query(
        "WITH h AS (SELECT max(hour) AS newest, min(hour) AS oldest FROM batch.product_demand_hourly)
         INSERT INTO speed.product_demand_hourly
             (hour, product_id, kafka_partition, segment, views, cart_adds, cart_removes, purchases, units, revenue_cents)
         SELECT x.hour, x.product_id, 0, 1000000000, x.views, 2, 0, 1, 1, 999
         FROM h CROSS JOIN LATERAL (VALUES
             (h.newest, (SELECT min(product_id) FROM batch.products), 500),
             (h.newest, (SELECT max(product_id) FROM batch.products), 7),
             (h.newest + interval '1 hour', (SELECT min(product_id) FROM batch.products), 40),
             (h.oldest, (SELECT max(product_id) FROM batch.products), 300),
             (h.oldest, 'p-not-in-catalog', 25)) AS x(hour, product_id, views)",
    )
    .execute(&s.pool)
    .await
    .unwrap();
    let (categories_with_speed, _) = assert_rollups_match(&s.pool, "with speed rows above the cut").await;
    assert!(categories_with_speed > categories, "the speed rows add (hour, category) cells");

    // Incremental runs: new and late traffic (the hours written are rolled
    // up again), then a catalog change (every hour's categories are).
    let incremental = RunConfig { full: false, ..run.clone() };
    let before = rollup_rows("category_demand_hourly").await;
    generator::run(Args { backfill_hours: 3, late_fraction: 0.2, ..Args::for_tests(s.stack.brokers(), &s.topic, 98) })
        .await
        .unwrap();
    ingest_all().await;
    assert!(matches!(recompute::run(&incremental).await.unwrap(), RunOutcome::Published { .. }));
    assert_rollups_match(&s.pool, "after an incremental run").await;
    assert!(rollup_rows("category_demand_hourly").await >= before);
    sqlx::query("UPDATE products SET category = 'c-renamed' WHERE product_id = (SELECT max(product_id) FROM products)")
        .execute(&sales)
        .await
        .unwrap();
    generator::run(Args { backfill_hours: 1, ..Args::for_tests(s.stack.brokers(), &s.topic, 99) }).await.unwrap();
    ingest_all().await;
    let RunOutcome::Published { tables, .. } = recompute::run(&incremental).await.unwrap() else {
        panic!("no publish")
    };
    assert!(tables.contains(&"products"), "a changed catalog is republished: {tables:?}");
    assert_rollups_match(&s.pool, "after a catalog change").await;
    let renamed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM batch.category_demand_hourly WHERE category = 'c-renamed' AND hour < now() - interval '10 hours'",
    )
    .fetch_one(&s.pool)
    .await
    .unwrap();
    assert!(renamed > 0, "old hours are rolled up under the new category");

    // A release whose rollups changed: `migrate` fills them again.
    sqlx::query("DELETE FROM ops.generated_views").execute(&s.pool).await.unwrap();
    sqlx::query("DELETE FROM batch.category_demand_hourly").execute(&s.pool).await.unwrap();
    sqlx::query("DELETE FROM batch.demand_levels").execute(&s.pool).await.unwrap();
    platform::db::migrate(&s.pool, Some(1)).await.unwrap();
    assert_rollups_match(&s.pool, "after migrate refilled them").await;
    assert!(rollup_rows("demand_levels").await >= 30);
}

/// Injected spikes are found as spikes, from about their start; the ones
/// still going on at the newest hour are reported as active.
#[tokio::test]
async fn injected_demand_spikes_are_detected() {
    let s = setup("derived_spikes").await;
    // A week: spikes last up to two days, and the baseline must see the
    // product's normal level for most of its window.
    let args = Args {
        backfill_hours: 168,
        products: 40,
        spikes: Some(3),
        rate: 0.5,
        ..Args::for_tests(s.stack.brokers(), &s.topic, 95)
    };
    let truth = generator::run(args).await.unwrap();
    s.ingest_and_run().await;

    // Precision and recall at scale are measured by the `quality` tool
    // (docs/BENCHMARKS.md); here: the injected spikes with two hours of
    // data are found, from about their start, with few false alarms.
    let score = integration_tests::quality::score_spikes(&s.pool, &truth.spikes).await.unwrap();
    assert!(score.detectable > 0, "no injected spike has two hours of data: {:?}", truth.spikes);
    // A weak, short spike at night (4x for a few hours at this test's low
    // rate) can stay within the noise: one of the three may be missed.
    assert!(score.found >= 1 && score.found + 1 >= score.detectable, "missed {:?}", score.missed);
    let mut errors: Vec<i64> = score.start_errors_hours.iter().map(|e| e.abs()).collect();
    errors.sort_unstable();
    assert!(errors[errors.len() / 2] <= 1 && errors.iter().all(|e| *e <= 6), "start errors {errors:?}");
    assert!(score.false_alarms.len() <= 2, "false alarms: {:?}", score.false_alarms);
    let latest: DateTime<Utc> =
        sqlx::query_scalar("SELECT serving.latest_demand_hour()").fetch_one(&s.pool).await.unwrap();

    // Active now: the spikes whose window reaches the newest hour.
    let active: Vec<(String, DateTime<Utc>, f64, f64)> =
        sqlx::query_as("SELECT product_id, spike_start, current_demand, baseline_demand FROM serving.demand_spikes")
            .fetch_all(&s.pool)
            .await
            .unwrap();
    // Ongoing, and long enough to be sure of (two hours, or stronger ones sooner).
    let ongoing: Vec<_> = truth
        .spikes
        .iter()
        .filter(|t| t.end > latest + TimeDelta::hours(1) && t.start + TimeDelta::hours(2) <= latest)
        .filter(|t| !score.missed.contains(t))
        .collect();
    for t in &ongoing {
        let a = active.iter().find(|a| a.0 == t.product_id);
        assert!(a.is_some_and(|a| a.2 > a.3), "ongoing spike {t:?} not active in {active:?}");
    }
    let unexpected: Vec<_> = active.iter().filter(|a| !truth.spikes.iter().any(|t| t.product_id == a.0)).collect();
    assert!(unexpected.len() <= 1, "active but never injected: {unexpected:?}");
}

/// Freshness tells, per layer, how far it got.
#[tokio::test]
async fn freshness_reports_each_layer() {
    let s = setup("derived_freshness").await;
    generator::run(Args::for_tests(s.stack.brokers(), &s.topic, 97)).await.unwrap();
    s.ingest_and_run().await;
    let rows: Vec<FreshnessRow> =
        sqlx::query_as("SELECT layer, last_event_time, last_offset, last_update FROM serving.freshness ORDER BY layer")
            .fetch_all(&s.pool)
            .await
            .unwrap();
    let total = s.stack.topic_size(&s.topic).unwrap();
    assert_eq!(rows.len(), 2);
    let (layer, newest, offset, updated) = &rows[0];
    assert_eq!(layer, "batch");
    assert_eq!(*offset, Some(total), "the batch's position is its cut: everything, at segment size 1");
    let latest: DateTime<Utc> =
        sqlx::query_scalar("SELECT serving.latest_demand_hour()").fetch_one(&s.pool).await.unwrap();
    assert_eq!(*newest, Some(latest));
    assert!(updated.is_some());
    assert_eq!(rows[1].0, "speed");
    assert_eq!(rows[1].2, None, "no speed layer ran");
}

/// `percentile_cont(0.5)`: the middle value, or the mean of the two middle
/// ones.
fn median(mut values: Vec<f64>) -> f64 {
    assert!(!values.is_empty());
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 }
}

/// One product-hour of `serving.demand_spike_hours`: demand, expected,
/// is_spike, basis.
type SpikeHour = (f64, f64, bool, String);

async fn spike_hour(pool: &PgPool, product: &str, hour: DateTime<Utc>) -> Option<SpikeHour> {
    sqlx::query_as(
        "SELECT demand, expected, is_spike, basis FROM serving.demand_spike_hours WHERE product_id = $1 AND hour = $2",
    )
    .bind(product)
    .bind(hour)
    .fetch_optional(pool)
    .await
    .unwrap()
}

/// A product launched after the last baseline refresh (every six hours)
/// has no baseline of its own. Its launch, flowing through the speed layer
/// (its default group mode, under its role) and not yet through any batch
/// run, shows as a spike within seconds, measured against the typical
/// product of its catalog category; a launch drawing what such a product
/// draws is not a spike; a product the catalog does not know yet is
/// measured against the whole shop's typical product.
#[tokio::test]
async fn a_new_product_taking_off_live_is_a_spike_within_the_hour() {
    let mut s = setup("derived_launch").await;
    let (sales, args) = s.with_catalog("derived_launch_sales", 99).await;
    generator::run(Args { backfill_hours: 48, products: 40, spikes: Some(0), rate: 0.5, ..args }).await.unwrap();
    s.ingest_and_run().await;
    let run = s.run.clone();
    let ingest_all = || s.ingest();

    // The launch: two products enter the shop's catalog in the category of
    // an existing one, and the next (incremental) run copies the catalog
    // but leaves the baseline, as between two refreshes.
    let baseline: Vec<(String, f64, Option<String>)> = sqlx::query_as(
        "SELECT b.product_id, b.share, p.category FROM batch.demand_baseline AS b
         LEFT JOIN batch.products AS p USING (product_id)",
    )
    .fetch_all(&s.pool)
    .await
    .unwrap();
    assert!(baseline.len() >= 30 && baseline.iter().all(|b| b.2.is_some()), "{baseline:?}");
    let category = baseline[0].2.clone().unwrap();
    sqlx::query(
        "INSERT INTO products (product_id, name, category, price_cents)
         VALUES ('p-launch', 'Launch', $1, 4900), ('p-steady', 'Steady', $1, 4900)",
    )
    .bind(&category)
    .execute(&sales)
    .await
    .unwrap();
    let now = Utc::now();
    let hour = now.duration_trunc(TimeDelta::hours(1)).unwrap();
    generator::send_records(
        s.stack.brokers(),
        &s.topic,
        &[generator::event_record("u-x", &baseline[0].0, "page_view", now)],
    )
    .unwrap();
    ingest_all().await;
    let RunOutcome::Published { tables, .. } = recompute::run(&RunConfig { full: false, ..run.clone() }).await.unwrap()
    else {
        panic!("the incremental run did not publish");
    };
    assert!(tables.contains(&"products") && !tables.contains(&"demand_baseline"), "{tables:?}");

    // The speed layer, as deployed.
    let logs = tempfile::tempdir().unwrap();
    let log_path = logs.path().join("speed.log");
    let dlq = s.stack.fresh_topic("derived_launch_dlq", 1).await.unwrap();
    let _speed =
        integration_tests::fixture::speed_layer(s.stack.brokers(), &s.run.database_url, &s.topic, &dlq, &log_path);

    // This hour's traffic: every known product at its baseline share of a
    // level of 2,000, and the new ones.
    const LEVEL: f64 = 2000.0;
    let mut records = Vec::new();
    let mut views = |product: &str, n: usize| {
        for i in 0..n {
            records.push(generator::event_record(&format!("u-{product}-{i}"), product, "page_view", now));
        }
    };
    for (product, share, _) in &baseline {
        views(product, (share * LEVEL).round() as usize);
    }
    let typical = median(baseline.iter().filter(|b| b.2.as_deref() == Some(&category)).map(|b| b.1).collect());
    let shop = median(baseline.iter().map(|b| b.1).collect());
    views("p-launch", 400);
    views("p-steady", (typical * LEVEL).round().max(1.0) as usize);
    views("p-unlisted", 3);
    generator::send_records(s.stack.brokers(), &s.topic, &records).unwrap();

    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(90);
    let spikes = loop {
        let spikes: Vec<(String, DateTime<Utc>, f64, f64)> = sqlx::query_as(
            "SELECT product_id, spike_start, current_demand, baseline_demand FROM serving.demand_spikes",
        )
        .fetch_all(&s.pool)
        .await
        .unwrap();
        let unlisted = spike_hour(&s.pool, "p-unlisted", hour).await;
        if spikes.iter().any(|s| s.0 == "p-launch") && unlisted.is_some() {
            break spikes;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no launch spike in {spikes:?}; speed layer log:\n{}",
            integration_tests::fixture::log_tail(&log_path, 30)
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    let launch = spikes.iter().find(|s| s.0 == "p-launch").unwrap();
    assert_eq!((launch.1, launch.2), (hour, 400.0), "{launch:?}");
    assert!(spikes.iter().all(|s| s.0 != "p-steady"), "a launch at its category's usual level is no spike: {spikes:?}");

    // The expectations: the category's (or the shop's) typical share of the
    // hour's level, the level read off a product with its own baseline.
    let reference = baseline.iter().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
    let (_, own_expected, _, own_basis) = spike_hour(&s.pool, &reference.0, hour).await.unwrap();
    assert_eq!(own_basis, "product");
    let level = own_expected / reference.1;
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
    let (demand, expected, is_spike, basis) = spike_hour(&s.pool, "p-launch", hour).await.unwrap();
    assert_eq!((demand, is_spike, basis.as_str()), (400.0, true, "category"));
    assert!(
        close(expected, (typical * level).max(1.0)) && close(launch.3, expected),
        "{expected} vs {typical} x {level}"
    );
    let (_, expected, is_spike, basis) = spike_hour(&s.pool, "p-steady", hour).await.unwrap();
    assert_eq!((is_spike, basis.as_str()), (false, "category"));
    assert!(close(expected, (typical * level).max(1.0)), "{expected}");
    let (demand, expected, is_spike, basis) = spike_hour(&s.pool, "p-unlisted", hour).await.unwrap();
    assert_eq!((demand, is_spike, basis.as_str()), (3.0, false, "shop"));
    assert!(close(expected, (shop * level).max(1.0)), "{expected} vs {shop} x {level}");
}
