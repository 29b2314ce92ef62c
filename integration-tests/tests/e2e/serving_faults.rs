//! The serving layer while PostgreSQL is stopped, on a private server
//! (stopping it must not disturb the shared stack): recommendations keep
//! coming from the in-memory popular list, marked `popular`, quickly, and
//! personal answers return once the server is back.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use integration_tests::private_stack::PrivateStack;
use integration_tests::serving::{self, Did, get, record, wait_ready};
use serde_json::Value;
use serving_layer::server::{self, ServeConfig};
use tokio_util::sync::CancellationToken;

async fn recommend(addr: SocketAddr, user: &str) -> Value {
    let a = get(addr, &format!("/api/recommendations/{user}?k=2")).await.unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    a.json()
}

fn ids(v: &Value) -> Vec<&str> {
    v["products"].as_array().unwrap().iter().map(|p| p["product_id"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn recommendations_fall_back_to_the_cached_popular_list_while_postgres_is_down() {
    let mut stack = PrivateStack::start().await.expect("private stack");
    let (url, pool) = stack.create_database("lambda").await.unwrap();
    platform::db::migrate(&pool, None).await.unwrap();
    serving::insert_popular(&pool, &["p-1", "p-2", "p-3"]).await.unwrap();
    serving::insert_similarity(&pool, &[("p-10", "p-11", 0.9), ("p-10", "p-12", 0.5)]).await.unwrap();
    record(&pool, "u-1", "p-10", Did::Viewed, Utc::now() - TimeDelta::minutes(5)).await.unwrap();
    pool.close().await;

    let stop = CancellationToken::new();
    let config = ServeConfig::any_port(url.clone());
    let running = server::start(config, stop.clone()).await.unwrap();
    let (addr, ops) = (running.addr, running.ops_addr);
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    serving::sign_requests(addr, &pool).await.unwrap();
    pool.close().await;
    wait_ready(ops).await;
    let v = recommend(addr, "u-1").await;
    // Both keys checked once before the outage: they stay valid while
    // PostgreSQL is away.
    assert_eq!(get(addr, "/api/popular").await.unwrap().status, 200);
    assert_eq!((v["source"].as_str(), ids(&v)), (Some("personalized"), vec!["p-11", "p-12"]));

    stack
        .restart_postgres(async {
            // Down for longer than several popular-list reloads.
            let until = Instant::now() + Duration::from_secs(4);
            let mut answers = 0;
            while Instant::now() < until {
                let started = Instant::now();
                let v = recommend(addr, "u-1").await;
                let took = started.elapsed();
                assert_eq!(v["source"], "popular", "{v}");
                assert_eq!(ids(&v), ["p-1", "p-2"]);
                // Never a hang on the dead database (a loose bound: latency
                // is `make bench-serving`'s to measure).
                assert!(took < Duration::from_secs(3), "fallback took {took:?}");
                answers += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(answers >= 2, "only {answers} answers while PostgreSQL was down");
            // Still ready: the fallback answers.
            assert_eq!(get(ops, "/readyz").await.unwrap().status, 200);
            let page = get(ops, "/metrics").await.unwrap().body;
            assert!(page.contains("serving_fallbacks_total{reason=\"database_error\"}"), "{page}");
            // The dashboard API says the database is unavailable, as JSON.
            let a = get(addr, "/api/popular").await.unwrap();
            assert_eq!(a.status, 503, "{}", a.body);
            assert!(a.json()["error"].as_str().unwrap().contains("database is unavailable"));
        })
        .await
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = recommend(addr, "u-1").await;
        if v["source"] == "personalized" {
            assert_eq!(ids(&v), ["p-11", "p-12"]);
            break;
        }
        assert!(Instant::now() < deadline, "personal answers did not return after the restart: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
}
