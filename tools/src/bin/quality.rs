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
//!   before: the recommender leaves those out on purpose). Two baselines:
//!   the popular list, what everyone gets without personalisation, and the
//!   previous release's recommender ([`PREVIOUS_SQL`]: seeds from views and
//!   carts only, no launches), asked over the same database.
//!
//! `--seeds 7,8,9` repeats all of it per seed (each its own shop, spikes
//! and traffic) and ends with the median and the worst of each figure. The
//! week ends at `--history-end`, a fixed time by default, so a seed's data
//! is the same on every run and two versions compare on the same spikes.

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
    /// Random seeds, one whole measurement each (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "7")]
    seeds: Vec<u64>,
    /// Hours at the end held out for the recommendation hit-rate.
    #[arg(long, default_value_t = 12)]
    holdout_hours: i64,
    /// Most users asked for recommendations.
    #[arg(long, default_value_t = 500)]
    max_users: usize,
    /// Print only the figures, not each false alarm and missed spike.
    #[arg(long)]
    quiet_spikes: bool,
    /// End of the generated week (RFC 3339), or `now`. A fixed time (the
    /// default) makes each seed's week the same on every run, so two
    /// versions of the platform are measured on the same data.
    #[arg(long, default_value = "2026-11-30T00:00:00Z")]
    history_end: String,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    platform::logging::init();
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => platform::logging::report(&e),
    }
}

/// One seed's figures.
#[derive(Debug, Clone, Copy)]
struct Figures {
    precision: f64,
    recall: f64,
    current: f64,
    previous: f64,
    popular: f64,
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut all = Vec::new();
    for &seed in &args.seeds {
        all.push(measure(&args, seed).await?);
    }
    if all.len() > 1 {
        let summary = |what: fn(&Figures) -> f64| {
            let mut v: Vec<f64> = all.iter().map(what).collect();
            v.sort_by(f64::total_cmp);
            let median = if v.len() % 2 == 1 { v[v.len() / 2] } else { (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0 };
            (median, v[0])
        };
        let (p, pw) = summary(|f| f.precision);
        let (r, rw) = summary(|f| f.recall);
        println!(
            "summary over {} seeds: spike precision median {p:.3}, worst {pw:.3}; recall median {r:.3}, worst {rw:.3} (goal: at least 0.9 each)",
            all.len()
        );
        let (c, cw) = summary(|f| f.current);
        let (v, vw) = summary(|f| f.previous);
        let (o, ow) = summary(|f| f.popular);
        println!(
            "summary over {} seeds: hit-rate@10 median {c:.3} (worst {cw:.3}) this release, {v:.3} ({vw:.3}) previous release, {o:.3} ({ow:.3}) popular-only",
            all.len()
        );
    }
    Ok(())
}

async fn measure(args: &Args, seed: u64) -> anyhow::Result<Figures> {
    let started = Instant::now();
    let stack = Stack::local();
    let name = format!("quality_{seed}");
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
        history_end: match args.history_end.as_str() {
            "now" => None,
            t => Some(t.parse().with_context(|| format!("--history-end {t:?} is not an RFC 3339 time or `now`"))?),
        },
        ..GeneratorArgs::for_tests(stack.brokers(), &topic, seed)
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
        "seed {seed}: spikes: {} events over {} h, {} products; {} injected spikes ({} detectable), {} detected",
        truth.events_sent,
        args.hours,
        args.products,
        truth.spikes.len(),
        score.detectable,
        score.detected
    );
    println!(
        "seed {seed}: spikes: precision {:.3} ({}/{}), recall {:.3} ({}/{}), median start error {median} h; took {:.0} s",
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

    let hits = recommendation_hits(&stack, &lake, &name, args).await?;
    let rate = |n: usize| n as f64 / hits.users.max(1) as f64;
    println!(
        "seed {seed}: recommendations: hit-rate@10 {:.3} this release vs {:.3} previous release vs {:.3} popular-only, \
         over {} users who bought in the last {} h ({} answers personalised now, {} before)",
        rate(hits.personal),
        rate(hits.previous),
        rate(hits.popular),
        hits.users,
        args.holdout_hours,
        hits.personalised_answers,
        hits.previous_personalised,
    );
    Ok(Figures {
        precision: score.precision(),
        recall: score.recall(),
        current: rate(hits.personal),
        previous: rate(hits.previous),
        popular: rate(hits.popular),
    })
}

/// The previous release's personal list (before purchases seeded it and
/// launches reached it): similar products to the latest viewed or carted
/// products, weight 2 in the cart, without what is in the cart or bought;
/// then the popular list. `$1` user, `$2` k, `$3` seeds. Rows: `excluded`
/// products and `similar` ones with their scores.
const PREVIOUS_SQL: &str = "
WITH state AS MATERIALIZED (
    SELECT product_id, last_viewed_at, last_carted_at, last_purchased_at,
           last_carted_at IS NOT NULL
             AND last_carted_at > COALESCE(last_removed_at, '-infinity'::timestamptz)
             AND last_carted_at > COALESCE(last_purchased_at, '-infinity'::timestamptz) AS in_cart
    FROM serving.user_product_state
    WHERE user_id = $1
), excluded AS (
    SELECT product_id FROM state WHERE in_cart OR last_purchased_at IS NOT NULL
), seeds AS (
    SELECT product_id, CASE WHEN in_cart THEN 2.0::float8 ELSE 1.0::float8 END AS weight
    FROM state
    WHERE last_viewed_at IS NOT NULL OR last_carted_at IS NOT NULL
    ORDER BY GREATEST(last_viewed_at, last_carted_at) DESC, product_id
    LIMIT $3
)
SELECT 'excluded' AS kind, product_id, NULL::float8 AS score FROM excluded
UNION ALL
(SELECT 'similar', s.similar_product_id, sum(seeds.weight * s.score)
 FROM seeds JOIN serving.item_similarity AS s ON s.product_id = seeds.product_id
 WHERE s.similar_product_id NOT IN (SELECT product_id FROM excluded)
 GROUP BY s.similar_product_id
 ORDER BY 3 DESC, 2
 LIMIT $2)";

/// The previous release's top 10 for `user`: its personal list, padded (or
/// replaced) by `popular` without excluded or listed products.
async fn previous_answer(pool: &sqlx::PgPool, user: &str, popular: &[String]) -> anyhow::Result<(Vec<String>, bool)> {
    let rows: Vec<(String, String, Option<f64>)> = sqlx::query_as(PREVIOUS_SQL)
        .bind(user)
        .bind(10_i64)
        .bind(serving_layer::recommend::SEEDS)
        .fetch_all(pool)
        .await?;
    let excluded: HashSet<&str> = rows.iter().filter(|r| r.0 == "excluded").map(|r| r.1.as_str()).collect();
    let mut similar: Vec<(&str, f64)> =
        rows.iter().filter(|r| r.0 == "similar").map(|r| (r.1.as_str(), r.2.unwrap_or(0.0))).collect();
    similar.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let personal = !similar.is_empty();
    let mut list: Vec<String> = similar.iter().map(|s| s.0.to_string()).collect();
    for p in popular {
        if list.len() >= 10 {
            break;
        }
        if !excluded.contains(p.as_str()) && !list.contains(p) {
            list.push(p.clone());
        }
    }
    Ok((list, personal))
}

#[derive(Debug, Default)]
struct Hits {
    users: usize,
    personal: usize,
    previous: usize,
    popular: usize,
    personalised_answers: usize,
    previous_personalised: usize,
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
        // `batch.<table>` is a view over the active one of its pair.
        let active: String = sqlx::query_scalar("SELECT active FROM ops.batch_shadows WHERE name = $1")
            .bind(table)
            .fetch_one(&pool)
            .await?;
        let mut conn = pool.acquire().await?;
        let mut copy = conn.copy_in_raw(&format!("COPY batch.{table}__{active} FROM STDIN (FORMAT binary)")).await?;
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
        popular = ids(&get(addr, "/api/recommendations/quality-nobody?k=100").await?.json());
        if !popular.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut hits = Hits::default();
    for (user, bought) in purchases.iter().take(args.max_users) {
        let answer = get(addr, &format!("/api/recommendations/{user}?k=10")).await?.json();
        hits.users += 1;
        hits.personalised_answers += usize::from(answer["source"] != "popular");
        hits.personal += usize::from(ids(&answer).iter().any(|p| bought.contains(p)));
        hits.popular += usize::from(popular.iter().take(10).any(|p| bought.contains(p)));
        let (previous, personal) = previous_answer(&pool, user, &popular).await?;
        hits.previous += usize::from(previous.iter().any(|p| bought.contains(p)));
        hits.previous_personalised += usize::from(personal);
    }
    stop.cancel();
    Ok(hits)
}
