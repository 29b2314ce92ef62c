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
use integration_tests::fixture::{Stack, log_tail, role_url, speed_layer};
use integration_tests::generator::{self, Args, event_record};
use integration_tests::serving::{get, sign_requests, wait_ready};
use serde_json::Value;
use serving_layer::server::{self, ServeConfig};
use sqlx::PgPool;
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

/// `(product, similar product, score, product's category, similar's category)`.
type Pair = (String, String, f64, Option<String>, Option<String>);

/// A day of generated traffic with its catalog, published by a full batch
/// run (similarity, catalog, popularity); then, with [`Self::serve`], the
/// speed layer and the API under their roles.
struct Platform {
    stack: Stack,
    topic: String,
    url: String,
    pool: PgPool,
    sales: PgPool,
    lake: Lake,
    run: RunConfig,
    /// The published similarity.
    pairs: Vec<Pair>,
    logs: tempfile::TempDir,
    _dir: tempfile::TempDir,
    services: Vec<tokio::process::Child>,
    server: Option<(std::net::SocketAddr, std::net::SocketAddr, CancellationToken)>,
}

impl Platform {
    async fn published(name: &str, seed: u64) -> Self {
        let stack = Stack::from_env();
        let topic = stack.fresh_topic(name, 2).await.unwrap();
        let (url, pool) = stack.migrated_database(name, Some(1)).await.unwrap();
        let (sales_url, sales) = stack.fresh_database(&format!("{name}_sales")).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::parse(dir.path().join("lake").to_str().unwrap()).unwrap();
        let args = Args {
            backfill_hours: 24,
            products: 40,
            users: 300,
            no_catalog: false,
            sales_database_url: sales_url.clone(),
            ..Args::for_tests(stack.brokers(), &topic, seed)
        };
        generator::run(args).await.unwrap();
        let run = RunConfig {
            full: true,
            sales_database_url: Some(sales_url),
            ..RunConfig::new(url.clone(), lake.clone(), topic.clone())
        };
        let mut platform = Self {
            stack,
            topic,
            url,
            pool,
            sales,
            lake,
            run,
            pairs: Vec::new(),
            logs: tempfile::tempdir().unwrap(),
            _dir: dir,
            services: Vec::new(),
            server: None,
        };
        platform.ingest_and_run(true).await;
        platform.pairs = sqlx::query_as(
            "SELECT s.product_id, s.similar_product_id, s.score, a.category, b.category
             FROM batch.item_similarity AS s
             LEFT JOIN batch.products AS a ON a.product_id = s.product_id
             LEFT JOIN batch.products AS b ON b.product_id = s.similar_product_id",
        )
        .fetch_all(&platform.pool)
        .await
        .unwrap();
        assert!(platform.pairs.len() > 100, "too little similarity to mean something: {}", platform.pairs.len());
        platform
    }

    /// Ingests what was sent and publishes a batch run; returns the batch
    /// tables it recomputed.
    async fn ingest_and_run(&self, full: bool) -> Vec<&'static str> {
        let config = IngestConfig::catch_up(self.stack.brokers(), &self.topic, &self.lake);
        ingest::run(config, CancellationToken::new()).await.unwrap();
        match recompute::run(&RunConfig { full, ..self.run.clone() }).await.unwrap() {
            RunOutcome::Published { tables, .. } => tables,
            other => panic!("the run did not publish: {other:?}"),
        }
    }

    /// Starts the speed layer (group mode) and the API, each under its role.
    async fn serve(&mut self) {
        let dlq = self.stack.fresh_topic(&format!("{}_dlq", self.topic.replace('.', "_")), 1).await.unwrap();
        let speed =
            speed_layer(self.stack.brokers(), &self.url, &self.topic, &dlq, &self.logs.path().join("speed.log"));
        self.services.push(speed);
        let config = ServeConfig {
            recommender_url: role_url(&self.url, "recommender_reader"),
            dashboard_url: role_url(&self.url, "dashboard_reader"),
            budget: Duration::from_secs(2),
            ..ServeConfig::any_port(&self.url)
        };
        let stop = CancellationToken::new();
        let running = server::start(config, stop.clone()).await.unwrap();
        sign_requests(running.addr, &self.pool).await.unwrap();
        wait_ready(running.ops_addr).await;
        self.server = Some((running.addr, running.ops_addr, stop));
    }

    fn send(&self, records: &[(String, String)]) {
        generator::send_records(self.stack.brokers(), &self.topic, records).unwrap();
    }

    /// The top 10 for `user`: products with scores, source, model version.
    async fn recommend(&self, user: &str) -> (Vec<(String, f64)>, String, Option<String>) {
        let (addr, _, _) = self.server.as_ref().expect("serving");
        let a = get(*addr, &format!("/api/recommendations/{user}?k=10")).await.unwrap();
        assert_eq!(a.status, 200, "{}", a.body);
        let v = a.json();
        let (products, source) = answer(&v);
        (products, source, v["model_version"].as_str().map(str::to_string))
    }

    /// Polls `user`'s recommendations until `done` holds (90 s at most).
    async fn wait_for(
        &self,
        user: &str,
        what: &str,
        done: impl Fn(&[(String, f64)], &str) -> bool,
    ) -> (Vec<(String, f64)>, String, Option<String>) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            let answer = self.recommend(user).await;
            if done(&answer.0, &answer.1) {
                return answer;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what} never showed for {user}: {answer:?}; speed layer log:\n{}",
                log_tail(&self.logs.path().join("speed.log"), 20)
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The personal list from `seeds` (product, weight) as the recommender
    /// defines it: `Σ weight × similarity`, best first, ties by id, top 10.
    fn similar_to(&self, seeds: &[(&str, f64)]) -> Vec<(String, f64)> {
        let mut sums: BTreeMap<String, f64> = BTreeMap::new();
        for (seed, weight) in seeds {
            for p in self.pairs.iter().filter(|p| p.0 == *seed) {
                *sums.entry(p.1.clone()).or_default() += weight * p.2;
            }
        }
        let mut list: Vec<(String, f64)> = sums.into_iter().collect();
        list.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        list.truncate(10);
        list
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        if let Some((_, _, stop)) = &self.server {
            stop.cancel();
        }
    }
}

fn assert_list_eq(got: &[(String, f64)], want: &[(String, f64)]) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!(g.0 == w.0 && (g.1 - w.1).abs() < 1e-9, "{got:?} vs {want:?}");
    }
}

/// A user who only bought gets what goes with the purchase, and a product
/// launched after the last similarity refresh reaches the users of its
/// category as soon as the speed layer has its first demand, before any
/// batch run saw it.
#[tokio::test]
async fn purchases_and_products_newer_than_the_similarity_are_recommended() {
    let mut platform = Platform::published("recs_launch", 61).await;
    let category_of: BTreeMap<String, String> =
        platform.pairs.iter().filter_map(|p| Some((p.0.clone(), p.3.clone()?))).collect();
    // u-looker will view two products of the launch's category: its list is
    // what is similar to either (weight 1 each), and the launch at two seeds
    // of its category times the category's prior (the median of its
    // products' best score with another product of the category). The
    // generated similarities depend on the clock's hour, so the category is
    // one whose prior puts the launch among the first ten.
    let expected_for = |first: &str, seen: &str, category: &str| {
        let mut best: BTreeMap<&str, f64> = BTreeMap::new();
        let same = |p: &&Pair| p.3.as_deref() == Some(category) && p.4.as_deref() == Some(category);
        for p in platform.pairs.iter().filter(same) {
            let b = best.entry(p.0.as_str()).or_insert(f64::MIN);
            *b = b.max(p.2);
        }
        let prior = median(best.into_values().collect());
        let mut want = platform.similar_to(&[(seen, 1.0), (first, 1.0)]);
        want.push(("p-launch".into(), 2.0 * prior));
        want.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        want.truncate(10);
        want
    };
    let mut categories: Vec<&String> = category_of.values().collect();
    categories.sort();
    categories.dedup();
    let (first, seen, category, want) = categories
        .iter()
        .filter_map(|category| {
            let mut members = category_of.iter().filter(|(_, c)| c == category).map(|(p, _)| p.clone());
            let (first, seen) = (members.next()?, members.next()?);
            let want = expected_for(&first, &seen, category);
            want.iter().any(|w| w.0 == "p-launch").then(|| (first, seen, (*category).clone(), want))
        })
        .next()
        .expect("a category whose prior puts the launch among the first ten");
    // The buyer's product is the first one of another category.
    let (bought, _) = category_of.iter().find(|(_, c)| **c != category).unwrap();

    // The launch enters the catalog; the next run copies the catalog but
    // leaves similarity alone (it refreshes every six hours).
    sqlx::query(
        "INSERT INTO products (product_id, name, category, price_cents) VALUES ('p-launch', 'Launch', $1, 4900)",
    )
    .bind(&category)
    .execute(&platform.sales)
    .await
    .unwrap();
    platform.send(&[event_record("u-x", &first, "page_view", Utc::now())]);
    let tables = platform.ingest_and_run(false).await;
    assert!(tables.contains(&"products") && !tables.contains(&"item_similarity"), "{tables:?}");
    platform.serve().await;

    // Shoppers discover the launch; one user looks at two products of its
    // category; another only buys a product of another category.
    let now = Utc::now();
    let mut records: Vec<_> =
        (0..20).map(|i| event_record(&format!("u-fan-{i}"), "p-launch", "page_view", now)).collect();
    records.push(event_record("u-looker", &seen, "page_view", now));
    records.push(event_record("u-looker", &first, "page_view", now));
    records.push(event_record("u-buyer", bought, "purchase", now));
    platform.send(&records);

    let (looker, source, _) =
        platform.wait_for("u-looker", "the launch", |products, _| products.iter().any(|p| p.0 == "p-launch")).await;
    assert_eq!(source, "personalized");
    assert_list_eq(&looker, &want);

    // The buyer: the products most similar to the purchase, weight 2,
    // padded with popular products.
    let (products, source, _) = platform.recommend("u-buyer").await;
    assert_eq!(source, "personalized", "{products:?}");
    let want = platform.similar_to(&[(bought, 2.0)]);
    assert_eq!(products.len(), 10, "padded with popular products: {products:?}");
    assert_list_eq(&products[..want.len()], &want);
    assert!(products.iter().all(|p| &p.0 != bought), "the purchase itself is not recommended");
}

/// `fuse` of the recommender: reciprocal-rank fusion with constant 60.
fn fused(lists: &[&[(String, f64)]]) -> Vec<(String, f64)> {
    let mut scores: BTreeMap<String, f64> = BTreeMap::new();
    for list in lists {
        for (i, (p, _)) in list.iter().enumerate() {
            *scores.entry(p.clone()).or_default() += 1.0 / (60.0 + (i + 1) as f64);
        }
    }
    let mut out: Vec<(String, f64)> = scores.into_iter().collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    out.truncate(10);
    out
}

fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines().find(|l| l.split([' ', '{']).next() == Some(name)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Imported model outputs and live behaviour together: a model covers a
/// user; what the user clicks after the import (through the speed layer)
/// is fused with the model's list (`blended`); once the import's validity
/// ends the user is served from live signals alone, everything they did
/// counting again. The model's coverage, age and validity are metrics. The
/// import is the real binary under `serving_writer`.
#[tokio::test]
async fn model_outputs_blend_with_clicks_since_the_import_and_expire() {
    let mut platform = Platform::published("recs_model", 62).await;
    platform.serve().await;
    let products: Vec<String> = {
        let mut p: Vec<String> = platform.pairs.iter().map(|p| p.0.clone()).collect();
        p.sort();
        p.dedup();
        p
    };
    let (before, after) = (&products[0], &products[1]);
    // A click before the import: the model is taken to know it.
    platform.send(&[event_record("u-model", before, "page_view", Utc::now())]);
    platform.wait_for("u-model", "the first click", |_, source| source == "personalized").await;

    let model: Vec<(String, f64)> =
        products[5..8].iter().enumerate().map(|(i, p)| (p.clone(), 0.9 - i as f64 / 10.0)).collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.parquet");
    let rows: Vec<(&str, &str, f64, Option<i64>)> =
        model.iter().map(|(p, s)| ("u-model", p.as_str(), *s, None)).collect();
    integration_tests::serving::write_model_file(&file, &rows).unwrap();
    const VALID_SECONDS: u64 = 25;
    let out = std::process::Command::new(integration_tests::fixture::binary("serving-layer"))
        .arg("import-recommendations")
        .arg(&file)
        .args(["--model-version", "m-1", "--valid-for", &format!("{VALID_SECONDS}s")])
        .env("DATABASE_URL", role_url(&platform.url, "serving_writer"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.starts_with("imported 3 recommendations for 1 users as model m-1, served until "), "{said}");
    let imported = tokio::time::Instant::now();

    // The model alone (padded with popular products at 0).
    let (list, source, version) = platform.recommend("u-model").await;
    assert_eq!((source.as_str(), version.as_deref()), ("model", Some("m-1")), "{list:?}");
    assert_list_eq(&list[..3], &model);

    // A click after the import complements it.
    platform.send(&[event_record("u-model", after, "page_view", Utc::now())]);
    let (list, _, version) = platform.wait_for("u-model", "the blend", |_, source| source == "blended").await;
    assert_eq!(version.as_deref(), Some("m-1"));
    let live = platform.similar_to(&[(after, 1.0)]);
    assert_list_eq(&list, &fused(&[&model, &live]));

    // Metrics: coverage, age, validity, and the blended answers.
    let (_, ops, _) = platform.server.as_ref().unwrap();
    let ops = *ops;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let page = loop {
        let page = get(ops, "/metrics").await.unwrap().body;
        if metric(&page, "serving_model_users") == Some(1.0) {
            break page;
        }
        assert!(tokio::time::Instant::now() < deadline, "no model metrics:\n{page}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let age = metric(&page, "serving_model_age_seconds").unwrap();
    let valid = metric(&page, "serving_model_valid_seconds").unwrap();
    assert!((0.0..30.0).contains(&age) && valid <= VALID_SECONDS as f64 && valid > -10.0, "{age} {valid}");
    assert!(metric(&page, "serving_recommendations_total").is_some(), "{page}");
    assert!(page.lines().any(|l| l.starts_with("serving_recommendations_total{source=\"blended\"}")), "{page}");

    // Past its validity the model is ignored: live signals only, both
    // clicks counting.
    tokio::time::sleep(
        (imported + Duration::from_secs(VALID_SECONDS + 1)).saturating_duration_since(tokio::time::Instant::now()),
    )
    .await;
    let (list, source, version) = platform.recommend("u-model").await;
    assert_eq!((source.as_str(), version), ("personalized", None), "{list:?}");
    assert_list_eq(&list, &platform.similar_to(&[(after, 1.0), (before, 1.0)]));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while metric(&get(ops, "/metrics").await.unwrap().body, "serving_model_valid_seconds").is_none_or(|v| v >= 0.0) {
        assert!(tokio::time::Instant::now() < deadline, "the expiry does not show in the metrics");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
