//! The dashboard's JSON API against PostgreSQL: hourly demand by category
//! and by product over a time range, active spikes, the popular list with
//! catalog names, per-layer freshness; and the page and its assets.

use std::net::SocketAddr;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use integration_tests::fixture::Stack;
use integration_tests::serving::{DashboardData, dashboard_views, get, seed_dashboard, wait_ready};
use serde_json::{Value, json};
use serving_layer::server::{self, ServeConfig};
use tokio_util::sync::CancellationToken;

async fn serve(test: &str) -> (SocketAddr, CancellationToken, DashboardData) {
    let (url, pool) = Stack::from_env().migrated_database(test, None).await.unwrap();
    let data = seed_dashboard(&pool).await.unwrap();
    let stop = CancellationToken::new();
    let config = ServeConfig::any_port(url);
    let running = server::start(config, stop.clone()).await.unwrap();
    integration_tests::serving::sign_requests(running.addr, &pool).await.unwrap();
    wait_ready(running.ops_addr).await;
    (running.addr, stop, data)
}

async fn json_at(addr: SocketAddr, path: &str) -> Value {
    let a = get(addr, path).await.unwrap();
    assert_eq!(a.status, 200, "{path}: {}", a.body);
    a.json()
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Views of `category` `ago` hours back, summed over its products.
fn category_views(data: &DashboardData, category: &str, ago: i64) -> i64 {
    data.products.iter().filter(|p| p.category == category).map(|p| dashboard_views(&p.id, ago)).sum()
}

#[tokio::test]
async fn demand_by_category_and_product_over_a_time_range() {
    let (addr, stop, data) = serve("dashboard_demand").await;
    let h = data.hour;

    // Every category, the three hours before the current one: [from, to).
    let from = h - TimeDelta::hours(3);
    let v = json_at(addr, &format!("/api/demand/hourly?from={}&to={}", ts(from), ts(h))).await;
    let rows = v["rows"].as_array().unwrap();
    let got: Vec<(DateTime<Utc>, &str, i64)> = rows
        .iter()
        .map(|r| {
            (
                r["hour"].as_str().unwrap().parse().unwrap(),
                r["category"].as_str().unwrap(),
                r["views"].as_i64().unwrap(),
            )
        })
        .collect();
    let mut want = Vec::new();
    for ago in [3, 2, 1] {
        for category in &data.categories {
            want.push((h - TimeDelta::hours(ago), *category, category_views(&data, category, ago)));
        }
    }
    assert_eq!(got, want);
    assert!(rows.iter().all(|r| r.get("product_id").is_none()));

    // One category, default range (the last 24 hours up to now).
    let v = json_at(addr, "/api/demand/hourly?category=Garden%20%26%20Outdoor").await;
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 6);
    assert_eq!(
        rows.last().unwrap(),
        &json!({"hour": ts(h), "category": "Garden & Outdoor", "views": 30 + 80, "cart_adds": 0,
                "cart_removes": 0, "purchases": 0, "units": 0, "revenue_cents": 0})
    );

    // One product, from an hour back.
    let v = json_at(addr, &format!("/api/demand/hourly?product_id=p-3&from={}", ts(h - TimeDelta::hours(1)))).await;
    let got: Vec<(&str, &str, i64)> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["hour"].as_str().unwrap(), r["product_id"].as_str().unwrap(), r["views"].as_i64().unwrap()))
        .collect();
    let (h1, h0) = (ts(h - TimeDelta::hours(1)), ts(h));
    assert_eq!(got, [(h1.as_str(), "p-3", 100), (h0.as_str(), "p-3", 100)]);
    // A product nobody looked at: no rows, not an error.
    assert_eq!(json_at(addr, "/api/demand/hourly?product_id=p-404").await["rows"], json!([]));
    stop.cancel();
}

#[tokio::test]
async fn spikes_popular_and_freshness() {
    let (addr, stop, data) = serve("dashboard_lists").await;
    let h = data.hour;

    // The hour's level is 100 (the products that do not spike show their
    // share of 100), so both expect 10% of it: p-3 has 100 views from three
    // hours back, p-5 80 from one hour back.
    let spikes = json_at(addr, "/api/spikes").await;
    let spikes = spikes.as_array().unwrap();
    let ids: Vec<&str> = spikes.iter().map(|s| s["product_id"].as_str().unwrap()).collect();
    assert_eq!(ids, data.spikes);
    let expected = [("p-3", "Wooden train", "Toys", 3, 100.0), ("p-5", "Seed mix", "Garden & Outdoor", 1, 80.0)];
    for (spike, (id, name, category, since, demand)) in spikes.iter().zip(expected) {
        let baseline: f64 = 10.0;
        assert_eq!(
            spike,
            &json!({"product_id": id, "name": name, "category": category,
                    "spike_start": ts(h - TimeDelta::hours(since)), "latest_hour": ts(h),
                    "current_demand": demand, "baseline_demand": baseline,
                    "score": spike["score"]})
        );
        let z = (demand - baseline) / baseline.sqrt();
        assert!((spike["score"].as_f64().unwrap() - z).abs() < 1e-9, "{spike}");
    }
    assert_eq!(json_at(addr, "/api/spikes?limit=1").await.as_array().unwrap().len(), 1);

    // Popular: the view's order, with catalog names.
    let popular = json_at(addr, "/api/popular?limit=3").await;
    let got: Vec<(i64, &str)> = popular
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["rank"].as_i64().unwrap(), p["product_id"].as_str().unwrap()))
        .collect();
    let want: Vec<(i64, &str)> =
        data.popular.iter().take(3).enumerate().map(|(i, p)| (i as i64 + 1, p.as_str())).collect();
    assert_eq!(got, want);
    assert_eq!(data.popular[0], "p-3", "the spiking product leads");
    assert_eq!(popular[0]["name"], "Wooden train");
    assert_eq!(popular[0]["category"], "Toys");
    assert_eq!(json_at(addr, "/api/popular").await.as_array().unwrap().len(), data.popular.len());

    let fresh = json_at(addr, "/api/freshness").await;
    let layers: Vec<(&str, &str)> = fresh
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["layer"].as_str().unwrap(), l["status"].as_str().unwrap()))
        .collect();
    assert_eq!(layers, [("batch", "fresh"), ("speed", "fresh")]);
    let batch_age = fresh[0]["update_age_seconds"].as_f64().unwrap();
    assert!((1190.0..1300.0).contains(&batch_age), "batch published {batch_age} s ago");
    assert_eq!(fresh[1]["lag_records"], 0);
    assert_eq!(fresh[0]["lag_records"], 500, "speed rows above the batch cut");
    stop.cancel();
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_by_the_binary() {
    let (addr, stop, _) = serve("dashboard_assets").await;
    for (path, content_type, marker) in [
        ("/", "text/html; charset=utf-8", "data-testid=\"spikes-table\""),
        ("/assets/dashboard.js", "text/javascript; charset=utf-8", "/api/demand/hourly"),
        ("/assets/dashboard.css", "text/css; charset=utf-8", ".badge.fresh"),
    ] {
        let a = get(addr, path).await.unwrap();
        assert_eq!(a.status, 200, "{path}");
        assert_eq!(a.content_type.as_deref(), Some(content_type), "{path}");
        assert!(a.body.contains(marker), "{path} lacks {marker}");
        assert!(!a.body.contains("http://") || path == "/assets/dashboard.js", "{path} loads from elsewhere");
        assert!(!a.body.contains("https://"), "{path} loads from elsewhere");
    }
    stop.cancel();
}
