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

/// Product search, a product's page and the spike history (issue 19,
/// item 2): what the analyst's pages read.
#[tokio::test]
async fn search_product_pages_and_spike_history() {
    let (addr, stop, data) = serve("dashboard_products").await;
    let h = data.hour;
    assert_eq!(json_at(addr, "/api/meta").await["currency"], "USD");

    // Search: by part of a name (any case) or the exact id first; LIKE's
    // wildcards are plain characters.
    let ids = |v: Value| -> Vec<String> {
        v.as_array().unwrap().iter().map(|p| p["product_id"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(ids(json_at(addr, "/api/products?q=TRAIN").await), ["p-3"]);
    assert_eq!(ids(json_at(addr, "/api/products?q=garden").await), ["p-2"]);
    assert_eq!(ids(json_at(addr, "/api/products?q=p-4").await), ["p-4"]);
    assert!(ids(json_at(addr, "/api/products?q=%25").await).is_empty(), "% matches itself only");
    let hit = &json_at(addr, "/api/products?q=Kite").await[0];
    assert_eq!((hit["name"].as_str(), hit["category"].as_str()), (Some("Kite"), Some("Toys")));

    // p-3's page: six hours of views against its baseline (share 0.1 of a
    // level of 100: 10 expected), spiking for the last four.
    let range = format!("from={}&to={}", ts(h - TimeDelta::hours(6)), ts(h + TimeDelta::hours(1)));
    let page = json_at(addr, &format!("/api/products/p-3?{range}")).await;
    assert_eq!(page["product"]["name"], "Wooden train");
    let hours = page["hours"].as_array().unwrap();
    assert_eq!(hours.len(), 6, "{page}");
    for (i, hour) in hours.iter().enumerate() {
        let ago = 5 - i as i64;
        assert_eq!(hour["hour"].as_str().unwrap().parse::<DateTime<Utc>>().unwrap(), h - TimeDelta::hours(ago));
        assert_eq!(hour["views"].as_i64(), Some(dashboard_views("p-3", ago)));
        assert_eq!(hour["demand"].as_i64(), Some(dashboard_views("p-3", ago)));
        assert_eq!(hour["basis"], "product");
        assert!(hour["expected"].as_f64().unwrap() > 0.0, "{hour}");
    }
    let spiking: Vec<bool> = hours.iter().map(|h| h["is_spike"].as_bool().unwrap()).collect();
    assert_eq!(spiking, [false, false, true, true, true, true]);
    let spikes = page["spikes"].as_array().unwrap();
    assert_eq!(spikes.len(), 1, "{page}");
    let spike = &spikes[0];
    assert_eq!(spike["spike_start"].as_str().unwrap().parse::<DateTime<Utc>>().unwrap(), h - TimeDelta::hours(3));
    assert_eq!((spike["duration_hours"].as_i64(), spike["peak_demand"].as_f64()), (Some(4), Some(100.0)));
    assert!(spike["peak_expected"].as_f64().unwrap() > 0.0);

    // A product nobody viewed: no hours, no spikes, its catalog entry.
    let quiet = json_at(
        addr,
        &format!("/api/products/p-4?from={}&to={}", ts(h - TimeDelta::days(30)), ts(h - TimeDelta::days(29))),
    )
    .await;
    assert_eq!((quiet["product"]["name"].as_str(), quiet["hours"].as_array().unwrap().len()), (Some("Kite"), 0));
    // A product the catalog does not know: no entry, still a page.
    assert_eq!(json_at(addr, "/api/products/p-unknown").await["product"], Value::Null);

    // The history of the range: both spikes, with their peaks; by category.
    let history = json_at(addr, &format!("/api/spikes/history?{range}")).await;
    let mut products: Vec<&str> =
        history.as_array().unwrap().iter().map(|s| s["product_id"].as_str().unwrap()).collect();
    products.sort_unstable();
    assert_eq!(products, ["p-3", "p-5"]);
    let toys = json_at(addr, &format!("/api/spikes/history?{range}&category=Toys")).await;
    assert_eq!(toys.as_array().unwrap().len(), 1);
    assert_eq!(toys[0]["name"], "Wooden train");

    // Bad input is a 400 with one line.
    for (path, message) in [
        ("/api/products?q=", "q must be 1 to 100 characters"),
        ("/api/products", "q must be 1 to 100 characters"),
        ("/api/products/p-3?from=yesterday", "from must be an RFC 3339 time"),
        ("/api/spikes/history?from=2026-11-02T00:00:00Z&to=2026-11-01T00:00:00Z", "from must be before to"),
        (
            "/api/spikes/history?from=2026-01-01T00:00:00Z&to=2026-12-01T00:00:00Z",
            "the range from..to may cover at most",
        ),
    ] {
        let a = get(addr, path).await.unwrap();
        assert_eq!(a.status, 400, "{path}: {}", a.body);
        let error = a.json()["error"].as_str().unwrap().to_string();
        assert!(error.starts_with(message) && !error.contains('\n'), "{path}: {error}");
    }
    stop.cancel();
}
