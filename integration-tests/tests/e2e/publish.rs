//! A publish readers never notice (issue 17): while a full run loads its
//! shadow tables, and while its swap waits for a reader that holds the
//! batch views, the recommendations and the dashboard API keep answering in
//! full and in time, from the views as they were; after the commit they
//! read the new tables.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use batch_layer::ingest::{self, IngestConfig};
use batch_layer::lake::Lake;
use batch_layer::recompute::{self, PublishPause, RunConfig, RunOutcome};
use integration_tests::checks::{assert_demand_eq, merged, serving_demand};
use integration_tests::fixture::{FreshStream, Stack};
use integration_tests::generator::{self, Args};
use integration_tests::serving::{self, get, wait_ready};
use serving_layer::server::{self, ServeConfig};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// The recommender's budget in this test: past it an answer is the popular
/// list. Generous, so only a lock (held for seconds by the pause below),
/// not a busy machine, can exceed it.
const BUDGET: Duration = Duration::from_secs(2);
/// How long the run holds its load transaction open.
const PAUSE: Duration = Duration::from_secs(3);

/// What the readers met: answers by endpoint, and anything unexpected.
#[derive(Default, Debug)]
struct Seen {
    answers: usize,
    slowest: Duration,
    problems: Vec<String>,
}

/// Polls the recommendations of `users` and every dashboard endpoint until
/// `stop`, counting the answers in `answered` as they come.
fn poll(
    addr: SocketAddr,
    users: Vec<String>,
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<Seen> {
    tokio::spawn(async move {
        let mut seen = Seen::default();
        let paths: Vec<String> = users
            .iter()
            .map(|u| format!("/api/recommendations/{u}?k=5"))
            .chain(["/api/demand/hourly", "/api/spikes", "/api/popular", "/api/freshness"].map(String::from))
            .collect();
        while !stop.load(Ordering::Relaxed) {
            for path in &paths {
                let started = Instant::now();
                let answer = get(addr, path).await;
                seen.slowest = seen.slowest.max(started.elapsed());
                seen.answers += 1;
                answered.fetch_add(1, Ordering::Relaxed);
                match answer {
                    Ok(a) if a.status != 200 => seen.problems.push(format!("{path}: {} {}", a.status, a.body)),
                    Ok(a) if path.starts_with("/api/recommendations/") && a.json()["source"] != "personalized" => {
                        seen.problems.push(format!("{path}: {}", a.body))
                    }
                    Ok(_) => {}
                    Err(e) => seen.problems.push(format!("{path}: {e}")),
                }
            }
        }
        seen
    })
}

async fn active_tables(pool: &PgPool) -> Vec<(String, String)> {
    sqlx::query_as("SELECT name, active FROM ops.batch_shadows ORDER BY name").fetch_all(pool).await.unwrap()
}

#[tokio::test]
async fn readers_never_wait_for_a_full_publish() {
    let stack = Stack::from_env();
    // Segment size 1: the cut is the lake's end, the batch holds every event.
    let FreshStream { topic, url, pool, .. } = stack.fresh_stream("shadow_publish", 2, 1).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::parse(dir.path().to_str().unwrap()).unwrap();
    let full = RunConfig { full: true, ..RunConfig::new(url.clone(), lake.clone(), topic.clone()) };
    let ingest = || async {
        ingest::run(IngestConfig::catch_up(stack.brokers(), &topic, &lake), CancellationToken::new()).await.unwrap()
    };
    let traffic = |seed| Args { users: 200, ..Args::for_tests(stack.brokers(), &topic, seed) };
    let sent_first = generator::run(traffic(71)).await.unwrap();
    ingest().await;
    assert!(matches!(recompute::run(&full).await.unwrap(), RunOutcome::Published { .. }));
    let first = active_tables(&pool).await;
    assert_eq!(first.len(), 5, "every batch relation has a pair of tables: {first:?}");

    let token = CancellationToken::new();
    let running =
        server::start(ServeConfig { budget: BUDGET, ..ServeConfig::any_port(&url) }, token.clone()).await.unwrap();
    serving::sign_requests(running.addr, &pool).await.unwrap();
    wait_ready(running.ops_addr).await;
    // Users with a personal list before the run.
    let candidates: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT user_id FROM serving.user_product_state ORDER BY 1 LIMIT 40")
            .fetch_all(&pool)
            .await
            .unwrap();
    let mut users = Vec::new();
    for u in candidates {
        let a = get(running.addr, &format!("/api/recommendations/{u}?k=5")).await.unwrap();
        if a.status == 200 && a.json()["source"] == "personalized" {
            users.push(u);
        }
        if users.len() == 4 {
            break;
        }
    }
    assert_eq!(users.len(), 4, "users with personal recommendations before the run");
    let before = serving_totals(&pool).await;
    assert_demand_eq(&serving_demand(&pool).await, &merged(&[&sent_first]), "serving after the first run");
    // New events for the run under test to publish.
    let sent_second = generator::run(traffic(72)).await.unwrap();
    ingest().await;

    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let readers = poll(running.addr, users.clone(), Arc::clone(&stop), Arc::clone(&answered));
    let pause = PublishPause::default();
    let run = {
        let config = RunConfig { pause_while_loading: Some(pause.clone()), ..full.clone() };
        tokio::spawn(async move { recompute::run(&config).await })
    };
    pause.reached.notified().await;
    // The shadows are loaded and their transaction is open: the readers go
    // on meanwhile, reading the tables the views show.
    let answered_before = answered.load(Ordering::Relaxed);
    tokio::time::sleep(PAUSE).await;
    let answered_during = answered.load(Ordering::Relaxed) - answered_before;
    assert!(answered_during >= 20, "{answered_during} answers while the shadows were loaded");
    assert_eq!(active_tables(&pool).await, first, "nothing swapped before the publish");
    assert_eq!(serving_totals(&pool).await, before, "the readers' views are the published ones, not the new events");

    // A reader that holds a batch view for a while: the swap waits for it,
    // letting the other readers through meanwhile.
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT count(*) FROM serving.product_demand_hourly").execute(&mut *holder).await.unwrap();
    let held = Instant::now();
    pause.resume.notify_one();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    holder.commit().await.unwrap();
    let outcome = run.await.unwrap().unwrap();
    let published_after = held.elapsed();
    stop.store(true, Ordering::Relaxed);
    let seen = readers.await.unwrap();
    token.cancel();

    let RunOutcome::Published { rows, tables, .. } = outcome else { panic!("{outcome:?}") };
    assert!(published_after >= Duration::from_millis(1500), "the swap waited for the reader: {published_after:?}");
    eprintln!("readers: {} answers, the slowest in {:?}", seen.answers, seen.slowest);
    assert!(seen.problems.is_empty(), "readers noticed the publish: {:?}", seen.problems);
    assert!(seen.answers >= 40, "the readers kept asking: {seen:?}");
    assert!(seen.slowest < BUDGET, "a reader waited {:?}", seen.slowest);
    let swapped = active_tables(&pool).await;
    for ((name, was), (_, is)) in first.iter().zip(&swapped) {
        assert_ne!(was, is, "{name} swapped onto its other table");
    }
    // Every relation written whole (the catalog is empty: no shop database).
    assert!(rows.iter().all(|(name, n)| *n > 0 || name == "products"), "{rows:?}");
    let both = merged(&[&sent_first, &sent_second]);
    assert_demand_eq(&serving_demand(&pool).await, &both, "serving reads the swapped-in tables");
    assert!(tables.contains(&"products"), "a full run republishes the catalog");

    // An incremental run leaves an unchanged catalog (none here) alone.
    generator::run(traffic(73)).await.unwrap();
    ingest().await;
    let incremental = RunConfig::new(url.clone(), lake.clone(), topic.clone());
    let RunOutcome::Published { tables, .. } = recompute::run(&incremental).await.unwrap() else { panic!() };
    assert!(!tables.contains(&"products"), "{tables:?}");
}

/// The serving demand totals: views, purchases, revenue.
async fn serving_totals(pool: &PgPool) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT sum(views)::bigint, sum(purchases)::bigint, sum(revenue_cents)::bigint FROM serving.product_demand_hourly",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}
