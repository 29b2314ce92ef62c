//! `quality`: measures how well the platform's results match the truth on
//! generated data: demand spikes found (precision, recall, start error).
//!
//! It generates history with injected spikes into a fresh topic, ingests it
//! into a fresh lake, runs a full batch into a fresh database, and scores
//! `serving.demand_spike_history` against the generator's ground truth.

use std::time::Instant;

use batch_layer::ingest::{self, IngestConfig};
use batch_layer::lake::Lake;
use batch_layer::recompute::{self, RunConfig};
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
    let stack = Stack::from_env();
    let name = format!("quality_{}", args.seed);
    let topic = stack.fresh_topic(&name, 4).await?;
    let (url, pool) = stack.fresh_database(&name).await?;
    platform::db::prepare(&pool, Some(1)).await?;
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
        ..GeneratorArgs::for_tests(&stack.brokers, &topic, args.seed)
    };
    let truth = generator::run(generated).await?;
    ingest::run(IngestConfig::catch_up(&stack.brokers, &topic, &lake), CancellationToken::new()).await?;
    let config = RunConfig { full: true, ..RunConfig::new(url, lake, topic) };
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
    for e in &score.false_alarms {
        println!("  false alarm: {} from {} to {}", e.0, e.1, e.2);
    }
    for s in &score.missed {
        println!("  missed: {} x{} from {} to {}", s.product_id, s.multiplier, s.start, s.end);
    }
    Ok(())
}
