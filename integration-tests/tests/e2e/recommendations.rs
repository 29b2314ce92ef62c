//! What the recommender makes of everything the shop knows about a user,
//! on the real stack: the similarity a batch run computed from generated
//! traffic, the clicks and purchases the speed layer (its default group
//! mode, under its role) brings in, and the API served under the reader
//! roles.

use std::collections::BTreeMap;
use std::time::Duration;

use batch_layer::ingest::{self, IngestConfig};
use batch_layer::lake::Lake;
use batch_layer::recompute::{self, RunConfig, RunOutcome};
use chrono::Utc;
use integration_tests::fixture::{Stack, command, log_tail, role_url};
use integration_tests::generator::{self, Args, event_record};
use integration_tests::serving::{get, sign_requests, wait_ready};
use serde_json::Value;
use serving_layer::server::{self, ServeConfig};
use tokio_util::sync::CancellationToken;

/// `percentile_cont(0.5)` of `values`.
fn median(mut values: Vec<f64>) -> f64 {
    assert!(!values.is_empty());
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 }
}

/// `(product_id, score)` of an answer, and its source.
fn answer(v: &Value) -> (Vec<(String, f64)>, String) {
    let products = v["products"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["product_id"].as_str().unwrap().to_string(), p["score"].as_f64().unwrap()))
        .collect();
    (products, v["source"].as_str().unwrap().to_string())
}

/// A user who only bought gets what goes with the purchase, and a product
/// launched after the last similarity refresh reaches the users of its
/// category as soon as the speed layer has its first demand, before any
/// batch run saw it.
#[tokio::test]
async fn purchases_and_products_newer_than_the_similarity_are_recommended() {
    let stack = Stack::from_env();
    let topic = stack.fresh_topic("recs_launch", 2).await.unwrap();
    let dlq = stack.fresh_topic("recs_launch_dlq", 1).await.unwrap();
    let (url, pool) = stack.migrated_database("recs_launch", Some(1)).await.unwrap();
    let (sales_url, sales) = stack.fresh_database("recs_launch_sales").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::parse(dir.path().join("lake").to_str().unwrap()).unwrap();

    // A day of traffic, published by a full run: similarity, catalog, popularity.
    let args = Args {
        backfill_hours: 24,
        products: 40,
        users: 300,
        no_catalog: false,
        sales_database_url: sales_url.clone(),
        ..Args::for_tests(stack.brokers(), &topic, 61)
    };
    generator::run(args).await.unwrap();
    let run = RunConfig {
        full: true,
        sales_database_url: Some(sales_url),
        ..RunConfig::new(url.clone(), lake.clone(), topic.clone())
    };
    let ingest_all = || async {
        ingest::run(IngestConfig::catch_up(stack.brokers(), &topic, &lake), CancellationToken::new()).await.unwrap();
    };
    ingest_all().await;
    assert!(matches!(recompute::run(&run).await.unwrap(), RunOutcome::Published { .. }));

    type Pair = (String, String, f64, Option<String>, Option<String>);
    let pairs: Vec<Pair> = sqlx::query_as(
        "SELECT s.product_id, s.similar_product_id, s.score, a.category, b.category
         FROM batch.item_similarity AS s
         LEFT JOIN batch.products AS a ON a.product_id = s.product_id
         LEFT JOIN batch.products AS b ON b.product_id = s.similar_product_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(pairs.len() > 100, "too little similarity to mean something: {}", pairs.len());
    let category_of: BTreeMap<String, String> =
        pairs.iter().filter_map(|p| Some((p.0.clone(), p.3.clone()?))).collect();
    // The launch's category is the first product's; the buyer's product
    // is the first one of another category.
    let (first, category) = category_of.iter().next().map(|(p, c)| (p.clone(), c.clone())).unwrap();
    let (bought, _) = category_of.iter().find(|(_, c)| **c != category).unwrap();
    let seen: Vec<&String> = category_of.iter().filter(|(p, c)| **c == category && **p != first).map(|x| x.0).collect();
    assert!(!seen.is_empty(), "the category has one product");

    // The launch enters the catalog; the next run copies the catalog but
    // leaves similarity alone (it refreshes every six hours).
    sqlx::query(
        "INSERT INTO products (product_id, name, category, price_cents) VALUES ('p-launch', 'Launch', $1, 4900)",
    )
    .bind(&category)
    .execute(&sales)
    .await
    .unwrap();
    generator::send_records(stack.brokers(), &topic, &[event_record("u-x", &first, "page_view", Utc::now())]).unwrap();
    ingest_all().await;
    let RunOutcome::Published { tables, .. } = recompute::run(&RunConfig { full: false, ..run.clone() }).await.unwrap()
    else {
        panic!("the incremental run did not publish");
    };
    assert!(tables.contains(&"products") && !tables.contains(&"item_similarity"), "{tables:?}");

    // The speed layer and the API, each under its role.
    let logs = tempfile::tempdir().unwrap();
    let log_path = logs.path().join("speed.log");
    let _speed = command(
        "speed-layer",
        stack.brokers(),
        &role_url(&url, "speed_writer"),
        std::process::Stdio::from(std::fs::File::create(&log_path).unwrap()),
    )
    .args(["run", "--topic", &topic, "--dlq-topic", &dlq, "--group-id", &format!("{topic}.speed")])
    .args(["--ops-addr", "127.0.0.1:0"])
    .spawn()
    .unwrap();
    let config = ServeConfig {
        recommender_url: role_url(&url, "recommender_reader"),
        dashboard_url: role_url(&url, "dashboard_reader"),
        budget: Duration::from_secs(2),
        ..ServeConfig::any_port(&url)
    };
    let stop = CancellationToken::new();
    let running = server::start(config, stop.clone()).await.unwrap();
    sign_requests(running.addr, &pool).await.unwrap();
    wait_ready(running.ops_addr).await;

    // Shoppers discover the launch; one user looks at two products of its
    // category; another only buys a product of another category.
    let now = Utc::now();
    let mut records: Vec<_> =
        (0..20).map(|i| event_record(&format!("u-fan-{i}"), "p-launch", "page_view", now)).collect();
    records.push(event_record("u-looker", seen[0], "page_view", now));
    records.push(event_record("u-looker", &first, "page_view", now));
    records.push(event_record("u-buyer", bought, "purchase", now));
    generator::send_records(stack.brokers(), &topic, &records).unwrap();

    let recommend = |user: &'static str| async move {
        let a = get(running.addr, &format!("/api/recommendations/{user}?k=10")).await.unwrap();
        assert_eq!(a.status, 200, "{}", a.body);
        answer(&a.json())
    };
    // The category's prior: the median of its products' best score with
    // another product of the category.
    let mut best: BTreeMap<&str, f64> = BTreeMap::new();
    for p in pairs.iter().filter(|p| p.3.as_deref() == Some(&category) && p.4.as_deref() == Some(&category)) {
        let b = best.entry(p.0.as_str()).or_insert(f64::MIN);
        *b = b.max(p.2);
    }
    let prior = median(best.into_values().collect());
    // u-looker's list: what is similar to either product seen (weight 1
    // each), and the launch at two seeds of its category times the prior.
    let mut want: BTreeMap<String, f64> = BTreeMap::new();
    for p in pairs.iter().filter(|p| p.0 == *seen[0] || p.0 == first) {
        *want.entry(p.1.clone()).or_default() += p.2;
    }
    want.insert("p-launch".into(), 2.0 * prior);
    let mut want: Vec<(String, f64)> = want.into_iter().collect();
    want.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    want.truncate(10);
    assert!(want.iter().any(|w| w.0 == "p-launch"), "the prior puts the launch among the first ten: {want:?}");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let looker = loop {
        let (products, source) = recommend("u-looker").await;
        if products.iter().any(|p| p.0 == "p-launch") {
            assert_eq!(source, "personalized");
            break products;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the launch never reached u-looker: {products:?}; speed layer log:\n{}",
            log_tail(&log_path, 20)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(looker.len(), want.len(), "{looker:?} vs {want:?}");
    for (got, want) in looker.iter().zip(&want) {
        assert!(got.0 == want.0 && (got.1 - want.1).abs() < 1e-9, "{looker:?} vs {want:?}");
    }

    // The buyer: the products most similar to the purchase, weight 2.
    let (products, source) = recommend("u-buyer").await;
    assert_eq!(source, "personalized", "{products:?}");
    let mut want: Vec<(String, f64)> =
        pairs.iter().filter(|p| &p.0 == bought).map(|p| (p.1.clone(), 2.0 * p.2)).collect();
    want.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    want.truncate(10);
    assert_eq!(products.len(), 10, "padded with popular products: {products:?}");
    for (got, want) in products.iter().zip(&want) {
        assert!(got.0 == want.0 && (got.1 - want.1).abs() < 1e-9, "{products:?} vs {want:?}");
    }
    assert!(products.iter().all(|p| &p.0 != bought), "the purchase itself is not recommended");
    stop.cancel();
}
