//! `quality`: measures how well the platform's results match the truth on
//! generated data.
//!
//! It generates history with injected spikes into a fresh topic, ingests it
//! into a fresh lake and runs a full batch into a fresh database. Then:
//!
//! * **spikes**: `serving.demand_spike_history` against the injected spikes
//!   (precision, recall, start error);
//! * **recommendations**: hit-rate@10 on held-out purchases. The last
//!   `--holdout-hours` of the lake are held out; the views the recommender
//!   reads are computed from the events before them (with the same view
//!   definitions) into a second database, and the real serving layer is
//!   asked for each user who buys in the held-out hours; a hit is a
//!   recommended product they bought then (and had not carted or bought
//!   before: the recommender leaves those out on purpose). The popular list,
//!   what everyone gets without personalisation, is the baseline.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::TimestampMicrosecondType;
use chrono::{DateTime, DurationRound, TimeDelta};
use datafusion::prelude::SessionContext;
use integration_tests::serving::get;
use serving_layer::server::{self, ServeConfig};
use shared_schema::derived::ITEM_SIMILARITY;
use shared_schema::views::{product_demand_hourly, user_product_state};

use batch_layer::ingest::{self, IngestConfig};
use batch_layer::lake::{EVENTS_TABLE, Lake};
use batch_layer::recompute::{self, RunConfig};
use batch_layer::scope;
use clap::Parser;
use integration_tests::fixture::Stack;
use integration_tests::generator::{self, Args as GeneratorArgs};
use tokio_util::sync::CancellationToken;

/// Measure result quality on generated data.
#[derive(Debug, Parser)]
#[command(name = "quality")]
struct Args {
    /// Hours of history to generate.
    #[arg(long, default_value_t = 168)]
    hours: u32,
    /// Spikes to inject (default: one per 12 hours, as the generator does).
    #[arg(long)]
    spikes: Option<usize>,
    /// Products in the shop.
    #[arg(long, default_value_t = 300)]
    products: usize,
    /// Users of the shop.
    #[arg(long, default_value_t = 5000)]
    users: usize,
    /// Average events per second of generated time.
    #[arg(long, default_value_t = 2.0)]
    rate: f64,
    /// Random seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Hours at the end held out for the recommendation hit-rate.
    #[arg(long, default_value_t = 12)]
    holdout_hours: i64,
    /// Most users asked for recommendations.
    #[arg(long, default_value_t = 500)]
    max_users: usize,
    /// Print only the figures, not each false alarm and missed spike.
    #[arg(long)]
    quiet_spikes: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    platform::logging::init();
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => platform::logging::report(&e),
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let stack = Stack::local();
    let name = format!("quality_{}", args.seed);
    let topic = stack.fresh_topic(&name, 4).await?;
    let (url, pool) = stack.fresh_database(&name).await?;
    platform::db::migrate(&pool, Some(1)).await?;
    let dir = tempfile::tempdir()?;
    let lake = Lake::parse(dir.path().to_str().unwrap_or("."))?;

    let generated = GeneratorArgs {
        backfill_hours: args.hours,
        spikes: Some(args.spikes.unwrap_or((args.hours as usize / 12).max(1))),
        products: args.products,
        categories: 12,
        users: args.users,
        rate: args.rate,
        quiet: true,
        ..GeneratorArgs::for_tests(stack.brokers(), &topic, args.seed)
    };
    let truth = generator::run(generated).await?;
    ingest::run(IngestConfig::catch_up(stack.brokers(), &topic, &lake), CancellationToken::new()).await?;
    let config = RunConfig { full: true, ..RunConfig::new(url, lake.clone(), topic) };
    recompute::run(&config).await?;

    let score = integration_tests::quality::score_spikes(&pool, &truth.spikes).await?;
    let mut errors = score.start_errors_hours.clone();
    errors.sort_by_key(|e| e.abs());
    let median = errors.get(errors.len() / 2).copied().unwrap_or(0);
    println!(
        "spikes: {} events over {} h, {} products; {} injected spikes ({} detectable), {} detected",
        truth.events_sent,
        args.hours,
        args.products,
        truth.spikes.len(),
        score.detectable,
        score.detected
    );
    println!(
        "spikes: precision {:.3} ({}/{}), recall {:.3} ({}/{}), median start error {median} h; took {:.0} s",
        score.precision(),
        score.correct,
        score.detected,
        score.recall(),
        score.found,
        score.detectable,
        started.elapsed().as_secs_f64()
    );
    for e in score.false_alarms.iter().filter(|_| !args.quiet_spikes) {
        println!("  false alarm: {} from {} to {}", e.0, e.1, e.2);
    }
    for s in score.missed.iter().filter(|_| !args.quiet_spikes) {
        println!("  missed: {} x{} from {} to {}", s.product_id, s.multiplier, s.start, s.end);
    }

    let hits = recommendation_hits(&stack, &lake, &name, &args).await?;
    println!(
        "recommendations: hit-rate@10 {:.3} personalised vs {:.3} popular-only, over {} users who bought in the last {} h \
         ({} answers personalised)",
        hits.personal as f64 / hits.users.max(1) as f64,
        hits.popular as f64 / hits.users.max(1) as f64,
        hits.users,
        args.holdout_hours,
        hits.personalised_answers,
    );
    Ok(())
}

#[derive(Debug, Default)]
struct Hits {
    users: usize,
    personal: usize,
    popular: usize,
    personalised_answers: usize,
}

async fn query(ctx: &SessionContext, sql: &str) -> anyhow::Result<Vec<RecordBatch>> {
    Ok(ctx.sql(sql).await?.collect().await?)
}

/// Hit-rate@10 of the serving layer's recommendations, as of the start of
/// the held-out hours, against the purchases made in them.
async fn recommendation_hits(stack: &Stack, lake: &Lake, name: &str, args: &Args) -> anyhow::Result<Hits> {
    let table = lake.open(EVENTS_TABLE).await?.context("the lake has no events")?;
    let ctx = SessionContext::new();
    batch_layer::lake::register(&ctx, scope::LAKE_EVENTS, &table).await?;
    scope::register_events(&ctx, datafusion::prelude::lit(true)).await?;
    let newest = query(&ctx, "SELECT max(event_time) FROM events").await?;
    let newest = newest[0].column(0).as_primitive::<TimestampMicrosecondType>().value(0);
    let newest = DateTime::from_timestamp_micros(newest).context("a time")?;
    let cutoff = newest.duration_trunc(TimeDelta::hours(1))? - TimeDelta::hours(args.holdout_hours);
    let before = format!("e.event_time < CAST('{}' AS TIMESTAMP)", cutoff.format("%Y-%m-%dT%H:%M:%SZ"));

    // What the recommender would have read at the cut-off.
    let (url, pool) = stack.fresh_database(&format!("{name}_recs")).await?;
    platform::db::migrate(&pool, Some(1)).await?;
    let similarity_window = ITEM_SIMILARITY.window().context("item similarity reads events")?;
    let views = [
        (user_product_state().name, user_product_state().batch_sql(), scope::before(cutoff)),
        (product_demand_hourly().name, product_demand_hourly().batch_sql(), scope::before(cutoff)),
        (
            ITEM_SIMILARITY.name,
            ITEM_SIMILARITY.batch_sql(),
            scope::before(cutoff).and(scope::since(cutoff - similarity_window)),
        ),
    ];
    for (table, sql, events) in views {
        scope::register_events(&ctx, events).await?;
        let batches = query(&ctx, &sql).await?;
        let mut conn = pool.acquire().await?;
        let mut copy = conn.copy_in_raw(&format!("COPY batch.{table} FROM STDIN (FORMAT binary)")).await?;
        copy.send(platform::pgcopy::encode(&batches)?).await?;
        copy.finish().await?;
    }
    scope::register_events(&ctx, datafusion::prelude::lit(true)).await?;

    // Who bought what in the held-out hours: users known before them, and
    // products they had neither in the cart nor bought before (those the
    // recommender leaves out on purpose, so neither list may count them).
    let bought = query(
        &ctx,
        &format!(
            "SELECT DISTINCT p.user_id, p.product_id
             FROM (SELECT user_id, product_id FROM events e WHERE e.event_type = 'purchase' AND NOT ({before})) AS p
             JOIN (SELECT DISTINCT user_id FROM events e WHERE {before}) AS known ON known.user_id = p.user_id
             LEFT JOIN (SELECT DISTINCT user_id, product_id FROM events e
                        WHERE {before} AND e.event_type IN ('add_to_cart', 'purchase')) AS held
               ON held.user_id = p.user_id AND held.product_id = p.product_id
             WHERE held.user_id IS NULL"
        ),
    )
    .await?;
    let mut purchases: BTreeMap<String, HashSet<String>> = BTreeMap::new();
    for b in &bought {
        let cast = |i: usize| arrow::compute::cast(b.column(i), &arrow::datatypes::DataType::Utf8);
        let (users, products) = (cast(0)?, cast(1)?);
        for (u, p) in users.as_string::<i32>().iter().zip(products.as_string::<i32>().iter()) {
            if let (Some(u), Some(p)) = (u, p) {
                purchases.entry(u.to_string()).or_default().insert(p.to_string());
            }
        }
    }

    let stop = CancellationToken::new();
    let config = ServeConfig {
        budget: Duration::from_secs(2),
        popular_refresh: Duration::from_secs(60),
        ..ServeConfig::any_port(url)
    };
    let running = server::start(config, stop.clone()).await?;
    let addr = running.addr;
    integration_tests::serving::sign_requests(addr, &pool).await?;
    integration_tests::serving::wait_ready(running.ops_addr).await;
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v["products"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["product_id"].as_str().map(String::from))
            .collect()
    };
    let mut popular = Vec::new();
    for _ in 0..100 {
        popular = ids(&get(addr, "/api/recommendations/quality-nobody?k=10").await?.json());
        if !popular.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut hits = Hits::default();
    for (user, bought) in purchases.iter().take(args.max_users) {
        let answer = get(addr, &format!("/api/recommendations/{user}?k=10")).await?.json();
        hits.users += 1;
        hits.personalised_answers += usize::from(answer["source"] == "personalized");
        hits.personal += usize::from(ids(&answer).iter().any(|p| bought.contains(p)));
        hits.popular += usize::from(popular.iter().any(|p| bought.contains(p)));
    }
    stop.cancel();
    Ok(hits)
}
