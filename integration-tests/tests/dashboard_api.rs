//! The dashboard's JSON API against PostgreSQL: hourly demand by category
//! and by product over a time range, active spikes, the popular list with
//! catalog names, per-layer freshness; and the page and its assets.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use integration_tests::fixture::Stack;
use integration_tests::serving::{get, seed_dashboard, stand_in_relations};
use serde_json::{Value, json};
use serving_layer::server::{self, ServeConfig};
use tokio_util::sync::CancellationToken;

async fn serve(test: &str) -> (SocketAddr, CancellationToken, integration_tests::serving::DashboardData) {
    let (url, pool) = Stack::from_env().fresh_database(test).await.unwrap();
    platform::db::prepare(&pool, None).await.unwrap();
    stand_in_relations(&pool).await.unwrap();
    let data = seed_dashboard(&pool).await.unwrap();
    let stop = CancellationToken::new();
    let config = ServeConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        database_url: url,
        budget: Duration::from_millis(100),
        popular_refresh: Duration::from_secs(1),
        max_connections: 4,
    };
    let addr = server::start(config, stop.clone()).await.unwrap().addr;
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(addr, "/readyz").await.map(|a| a.status).unwrap_or(0) != 200 {
        assert!(Instant::now() < deadline, "not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (addr, stop, data)
}

async fn json_at(addr: SocketAddr, path: &str) -> Value {
    let a = get(addr, path).await.unwrap();
    assert_eq!(a.status, 200, "{path}: {}", a.body);
    a.json()
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

#[tokio::test]
async fn demand_by_category_and_product_over_a_time_range() {
    let (addr, stop, data) = serve("dashboard_demand").await;
    let h = data.hour;

    // Every category, the last three hours: [from, to) excludes `to`.
    let from = h - TimeDelta::hours(3);
    let v = json_at(addr, &format!("/api/demand/hourly?from={}&to={}", ts(from), ts(h))).await;
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 9, "{v}");
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
        for (c, category) in data.categories.iter().enumerate() {
            want.push((h - TimeDelta::hours(ago), *category, 10 * (c as i64 + 1) + ago));
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
        &json!({"hour": ts(h), "category": "Garden & Outdoor", "views": 20, "cart_adds": 10,
                "cart_removes": 0, "purchases": 4, "units": 4, "revenue_cents": 3996})
    );

    // One product.
    let v = json_at(addr, &format!("/api/demand/hourly?product_id=p-1&from={}", ts(h - TimeDelta::hours(1)))).await;
    let rows = v["rows"].as_array().unwrap();
    let got: Vec<(i64, i64, &str)> = rows
        .iter()
        .map(|r| (r["views"].as_i64().unwrap(), r["purchases"].as_i64().unwrap(), r["product_id"].as_str().unwrap()))
        .collect();
    assert_eq!(got, [(101, 8, "p-1"), (100, 7, "p-1")]);
    // A product nobody looked at: no rows, not an error.
    assert_eq!(json_at(addr, "/api/demand/hourly?product_id=p-404").await["rows"], json!([]));
    stop.cancel();
}

#[tokio::test]
async fn spikes_popular_and_freshness() {
    let (addr, stop, data) = serve("dashboard_lists").await;

    let spikes = json_at(addr, "/api/spikes").await;
    let spikes = spikes.as_array().unwrap();
    assert_eq!(spikes.len(), data.spikes.len());
    assert_eq!(
        spikes[0],
        json!({"product_id": "p-3", "name": "Wooden train", "category": "Toys",
               "spike_start": ts(data.hour - TimeDelta::hours(4)), "latest_hour": ts(data.hour),
               "current_demand": 120.0, "baseline_demand": 12.5, "score": 8.5})
    );
    assert_eq!(spikes[1]["product_id"], "p-5");
    assert_eq!(json_at(addr, "/api/spikes?limit=1").await.as_array().unwrap().len(), 1);

    let popular = json_at(addr, "/api/popular?limit=3").await;
    let got: Vec<(i64, &str, &str)> = popular
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["rank"].as_i64().unwrap(), p["product_id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    assert_eq!(got, [(1, "p-3", "Wooden train"), (2, "p-1", "Rust in Action"), (3, "p-2", "Garden hose <20 m>")]);
    assert_eq!(json_at(addr, "/api/popular").await.as_array().unwrap().len(), data.popular.len());

    let fresh = json_at(addr, "/api/freshness").await;
    let layers: Vec<(&str, &str)> = fresh
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["layer"].as_str().unwrap(), l["status"].as_str().unwrap()))
        .collect();
    assert_eq!(layers, [("batch", "fresh"), ("speed", "fresh")]);
    let speed_age = fresh[1]["update_age_seconds"].as_f64().unwrap();
    assert!((0.5..30.0).contains(&speed_age), "speed updated {speed_age} s ago");
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
