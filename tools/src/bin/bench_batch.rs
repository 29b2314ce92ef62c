//! `bench_batch` (`make bench-batch`): the batch layer's whole-system
//! figures on a lake of at least 20 million events.
//!
//! 1. **The lake.** The shop model's events, a week of them by default,
//!    decoded by the platform's own decoder and appended to a real Delta
//!    table `events` by the ingest's own write path
//!    ([`batch_layer::ingest::append_events`]): one commit per hour, each
//!    carrying the `txn` actions `batch-layer ingest` records (the next
//!    offset and the newest event time of every Kafka partition, the
//!    partition count), exactly as the ingest leaves a lake. Only Kafka
//!    itself is skipped. The lake is cached under `$LAMBDA_CACHE/bench/`,
//!    keyed by its parameters; the benchmark works on a hard-linked copy.
//! 2. **DataFusion against DuckDB.** The full recompute of
//!    `product_demand_hourly`: the batch layer's SQL (from the one view
//!    definition, restricted to the offset cut a full run takes) in-process
//!    with DataFusion over the Delta snapshot, and the same SQL text in
//!    DuckDB over the same Parquet files (the snapshot's current files),
//!    interleaved repetitions; both results must agree.
//! 3. **Full against incremental.** `batch-layer run --full` end to end into
//!    a fresh database, then, `--incremental-runs` times, one new hour of
//!    events appended, what a running speed layer would hold of it written
//!    (its `user_product_state`, its positions), a `CHECKPOINT`, and an
//!    incremental `batch-layer run`. Those runs leave the user-product
//!    state to the speed layer (`--fold-every`), and one more hour's run
//!    folds them all, as the run after `--fold-every` does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use batch_layer::ingest::append_events;
use batch_layer::lake::{self, EVENTS_TABLE, Lake};
use batch_layer::recompute::{self, RunConfig, RunOutcome};
use chrono::{DateTime, TimeDelta, TimeZone as _, Utc};
use clap::Parser;
use datafusion::arrow::array::{AsArray as _, RecordBatch};
use datafusion::arrow::datatypes::Int64Type;
use datafusion::prelude::{SessionConfig, SessionContext};
use deltalake::DeltaTable;
use indicatif::{ProgressBar, ProgressStyle};
use integration_tests::fixture::Stack;
use integration_tests::shop::{Shop, ShopConfig, Spike};
use rand::SeedableRng as _;
use rand::rngs::StdRng;
use shared_schema::cut::{Offset, OffsetCut, Partition, SegmentSize};
use shared_schema::schema::PARTITION_COLUMNS;
use shared_schema::views::product_demand_hourly;
use shared_schema::{EventDecoder, RawRecord, events_schema};
use tools::bench::{calibrated_rate, group};

/// Batch-layer benchmark: DataFusion vs DuckDB, full vs incremental run.
#[derive(Debug, Parser)]
#[command(name = "bench_batch", about)]
struct Args {
    /// Events in the lake (at least; the shop model's traffic is random).
    #[arg(long, default_value_t = 20_000_000)]
    events: u64,
    /// Hours of history they span.
    #[arg(long, default_value_t = 168)]
    hours: u32,
    /// Kafka partitions the events are spread over (by user, as the key does).
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long, default_value_t = 500)]
    products: usize,
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// Repetitions of the DataFusion / DuckDB comparison.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// DataFusion settings for the comparison, on top of the batch layer's
    /// defaults (e.g. `datafusion.execution.target_partitions=4`); repeatable.
    #[arg(long = "datafusion-set", value_name = "KEY=VALUE")]
    datafusion_set: Vec<String>,
    /// Also time DataFusion over the bare Parquet files, without the Delta
    /// provider (a diagnosis of where DataFusion's time goes).
    #[arg(long)]
    plain_parquet: bool,
    /// Skip the end-to-end full and incremental runs.
    #[arg(long)]
    no_runs: bool,
    /// Also time `run --full` on this Ballista scheduler (`make cluster-up`),
    /// on the same lake snapshot, against the in-process run.
    #[arg(long, value_name = "ballista://HOST:PORT")]
    ballista: Option<String>,
    /// Cache folder (the lake is kept under `bench/`).
    #[arg(long, env = "LAMBDA_CACHE")]
    cache: Option<PathBuf>,
    /// Python with the `duckdb` package.
    #[arg(long, env = "BENCH_PYTHON", default_value = "python3")]
    python: PathBuf,
    /// The DuckDB side of the comparison.
    #[arg(long, default_value = "scripts/bench_duckdb.py")]
    duckdb_script: PathBuf,
    /// Topic name the lake's `txn` actions record.
    #[arg(long, default_value = "events")]
    topic: String,
    /// Instead of the engine comparison and the runs: time `forget-user`
    /// for each of these numbers of users (one request each, ids spread
    /// over the shop's users) on a fresh copy of the lake, e.g. 1,100,1000.
    #[arg(long, value_delimiter = ',', value_name = "N,N,...")]
    forget: Vec<usize>,
    /// Write the lake as the real ingest does, in this many commits an hour
    /// (the default 60 s flush: 60), instead of one.
    #[arg(long, default_value_t = 1)]
    flushes_per_hour: u32,
    /// Only time `run --full` before and after `batch-layer maintain`
    /// compacts the lake (with --flushes-per-hour, the real cadence).
    #[arg(long)]
    maintain: bool,
    /// Incremental runs after the full one, each after one more appended
    /// hour; the report gives their median (the runs vary by more than a
    /// change often moves them).
    #[arg(long, default_value_t = 3)]
    incremental_runs: u32,
    /// Leave the speed layer out of the incremental runs: empty speed
    /// tables and no positions (so each publish writes the duplicates seed
    /// and prunes nothing). By default the runs meet what a running speed
    /// layer leaves: each appended hour's `(user, product)` state folded
    /// into `speed.user_product_state`, and its positions at the lake's end.
    #[arg(long)]
    without_speed_layer: bool,
    /// `batch-layer run --fold-every` for the incremental runs: with the
    /// speed layer modelled they leave the hour's user-product state to it,
    /// and one more hour's run then folds all of them (`0s`: every run
    /// folds, as before the fold could wait).
    #[arg(long, default_value = "6h", value_parser = humantime::parse_duration)]
    fold_every: Duration,
}

/// First hour of the generated history: fixed, so a cached lake is the
/// same lake whenever it was made.
fn history_start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 10, 5, 0, 0, 0).single().unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    platform::logging::init();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => platform::logging::report(&e),
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    ensure!(
        args.reps > 0
            && args.hours > 0
            && args.partitions > 0
            && args.flushes_per_hour > 0
            && args.incremental_runs > 0,
        "--reps, --hours, --partitions and --flushes-per-hour must be positive"
    );
    let cache = match &args.cache {
        Some(c) => c.clone(),
        None => PathBuf::from(std::env::var("HOME").context("HOME is not set; give --cache")?)
            .join(".cache/lambda-platform"),
    };
    let bench_dir = cache.join("bench");
    let traffic = Traffic::new(&args);
    let base = ensure_lake(&args, &traffic, &bench_dir).await?;
    // The runs append an hour: they work on a copy, the cached lake stays as made.
    let work = bench_dir.join("batch-work");
    link_copy(&base, &work.join(EVENTS_TABLE), &work)
        .with_context(|| format!("copying the lake to {}", work.display()))?;
    let lake = Lake::parse(work.to_str().context("cache path is not UTF-8")?)?;
    let table = lake.open(EVENTS_TABLE).await?.context("the cached lake has no events table")?;
    let shape = LakeShape::of(&table, &work)?;
    println!(
        "lake: {} events in {} hours, {} Delta commits, {} Parquet files, {:.2} GB ({})",
        group(shape.events),
        args.hours,
        table.version().unwrap_or_default() + 1,
        shape.files.len(),
        shape.bytes as f64 / 1e9,
        base.display()
    );

    if !args.forget.is_empty() {
        return forget_users(&args, &base, &bench_dir, &shape).await;
    }
    if args.maintain {
        return before_and_after_maintenance(&args, &lake).await;
    }

    // The cut a full run over this snapshot takes, and the query it runs.
    let next = lake::committed_offsets(&table, &args.topic, (0..args.partitions).map(Partition)).await?;
    let segment = SegmentSize::new(platform::db::DEFAULT_SEGMENT_SIZE).context("segment size")?;
    let cut = OffsetCut::from_lake(next.iter().map(|(p, o)| (*p, *o)), segment);
    // Both engines run one SQL text: the view over the lake restricted to
    // the cut, the same expression `run` applies, unparsed for DuckDB.
    let below = datafusion::sql::unparser::expr_to_sql(&batch_layer::scope::below(&cut))?;
    let with_cut = |view_sql: String| {
        format!("WITH events AS (SELECT * FROM {} WHERE {below})\n{view_sql}", batch_layer::scope::LAKE_EVENTS)
    };
    let sql = Queries {
        view: with_cut(product_demand_hourly().batch_sql()),
        duckdb: with_cut(duckdb_spelling(&product_demand_hourly().batch_sql())),
        former: with_cut(former_sql(product_demand_hourly())),
    };

    let comparison = compare_engines(&args, &table, &shape.files, &sql, &bench_dir).await?;
    let runs =
        if args.no_runs { None } else { Some(full_and_incremental(&args, &traffic, &lake, &comparison.totals).await?) };
    report(&args, &shape, &comparison, runs.as_ref());
    Ok(())
}

/// The shop whose traffic fills the lake, paced so `hours` of it hold at
/// least `events` events. Cheap to clone: the shop itself is built where
/// its events are made.
#[derive(Debug, Clone)]
struct Traffic {
    shop: ShopConfig,
    spikes: Vec<Spike>,
    partitions: i32,
}

impl Traffic {
    fn new(args: &Args) -> Self {
        let start = history_start();
        let history = start + TimeDelta::hours(i64::from(args.hours));
        let shape =
            ShopConfig { seed: args.seed, products: args.products, categories: 12, users: args.users, rate: 1.0 };
        // 1% more: the model's traffic is random.
        let rate = calibrated_rate(&shape, start, history, args.events) * 1.01;
        let config = ShopConfig { rate, ..shape };
        let end = history + TimeDelta::hours(1);
        let spikes = Shop::new(config.clone()).plan_spikes(
            (args.hours as usize / 12).max(1),
            start,
            end,
            &mut StdRng::seed_from_u64(args.seed),
        );
        Self { shop: config, spikes, partitions: args.partitions }
    }

    /// The events of sessions starting in hour `h` of the history, as the
    /// ingest would decode them after reading them from Kafka: keyed by
    /// user to a partition, offsets continuing from `next`.
    fn hour(
        &self,
        shop: &Shop,
        h: u32,
        next: &mut BTreeMap<Partition, Offset>,
        decoder: &mut EventDecoder,
    ) -> anyhow::Result<RecordBatch> {
        let from = history_start() + TimeDelta::hours(i64::from(h));
        let mut rng = StdRng::seed_from_u64(self.shop.seed ^ (u64::from(h) << 32));
        let events =
            shop.events_between(from, from + TimeDelta::hours(1), &self.spikes, DateTime::<Utc>::MAX_UTC, &mut rng);
        let records: Vec<(i32, i64, String)> = events
            .iter()
            .map(|e| {
                let p = partition_of(&e.user_id, self.partitions);
                let offset = next.entry(Partition(p)).or_insert(Offset(0));
                offset.0 += 1;
                (p, offset.0 - 1, e.to_json())
            })
            .collect();
        let raw: Vec<RawRecord<'_>> = records
            .iter()
            .map(|(partition, offset, json)| RawRecord {
                partition: *partition,
                offset: *offset,
                // The history is produced as it happens: never in the future.
                timestamp: None,
                payload: json.as_bytes(),
            })
            .collect();
        let decoded = decoder.decode(&raw)?;
        ensure!(decoded.rejected.is_empty(), "the shop model produced {} invalid events", decoded.rejected.len());
        Ok(decoded.batch)
    }
}

/// Kafka's default partitioner hashes the key (murmur2); any stable hash
/// spreads users the same way for this purpose.
fn partition_of(user_id: &str, partitions: i32) -> i32 {
    let hash =
        user_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    (hash % partitions as u64) as i32
}

/// The cached lake for these parameters, generated when missing.
async fn ensure_lake(args: &Args, traffic: &Traffic, bench_dir: &Path) -> anyhow::Result<PathBuf> {
    // v3: the commits record the partition count and the newest times too.
    let mut key = format!(
        "lake-v3-e{}-h{}-k{}-s{}-p{}-u{}",
        args.events, args.hours, args.partitions, args.seed, args.products, args.users
    );
    if args.flushes_per_hour > 1 {
        key.push_str(&format!("-f{}", args.flushes_per_hour));
    }
    let done = bench_dir.join(&key);
    if done.join(EVENTS_TABLE).join("_delta_log").is_dir() {
        println!("reusing the cached lake {}", done.display());
        return Ok(done.join(EVENTS_TABLE));
    }
    let partial = bench_dir.join(format!("{key}.partial"));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).with_context(|| format!("removing {}", partial.display()))?;
    }
    std::fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    println!("generating the lake {} (once; later runs reuse it)", done.display());
    let lake = Lake::parse(partial.to_str().context("cache path is not UTF-8")?)?;
    let table = lake.open_or_create(EVENTS_TABLE, &events_schema(), &PARTITION_COLUMNS).await?;

    let bar = ProgressBar::new(u64::from(args.hours));
    bar.set_style(
        ProgressStyle::with_template("lake [{elapsed_precise}] {wide_bar} {pos}/{len} hours {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let events = append_hours(traffic, table, &args.topic, 0..args.hours, args.flushes_per_hour, &bar, None).await?;
    bar.finish_and_clear();
    if events < args.events {
        println!("note: the shop model made {} events, fewer than the {} asked for", group(events), group(args.events));
    }
    println!(
        "generated {} events in {:.0} s ({:.0} events/s)",
        group(events),
        started.elapsed().as_secs_f64(),
        events as f64 / started.elapsed().as_secs_f64()
    );
    std::fs::rename(&partial, &done)
        .with_context(|| format!("renaming {} to {}", partial.display(), done.display()))?;
    Ok(done.join(EVENTS_TABLE))
}

/// Appends the given hours to `table`, `flushes` commits each (the hour's
/// events in arrival order, cut in equal parts, each commit with the
/// offsets it reaches, as the ingest's flushes are); the shop model and the
/// decoder run on a blocking thread while the previous hour is written.
/// Returns the number of events appended.
async fn append_hours(
    traffic: &Traffic,
    mut table: DeltaTable,
    topic: &str,
    hours: std::ops::Range<u32>,
    flushes: u32,
    bar: &ProgressBar,
    mut speed: Option<&mut SpeedState>,
) -> anyhow::Result<u64> {
    let partitions = (0..traffic.partitions).map(Partition);
    let mut next = lake::committed_offsets(&table, topic, partitions.clone()).await?;
    let mut newest = batch_layer::dedup::committed_newest(&table, topic, partitions).await?;
    let mut reached = next.clone();
    let partition_count = traffic.partitions;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<anyhow::Result<(RecordBatch, BTreeMap<Partition, Offset>)>>(2);
    let traffic = traffic.clone();
    let maker = tokio::task::spawn_blocking(move || {
        let shop = Shop::new(traffic.shop.clone());
        let mut decoder = EventDecoder::new();
        for h in hours {
            let hour = traffic.hour(&shop, h, &mut next, &mut decoder).map(|b| (b, next.clone()));
            if tx.blocking_send(hour).is_err() {
                return; // the writer stopped
            }
        }
    });
    let mut events = 0u64;
    while let Some(hour) = rx.recv().await {
        let (batch, offsets) = hour?;
        events += batch.num_rows() as u64;
        let rows = batch.num_rows();
        let parts = (flushes as usize).min(rows.max(1));
        for i in 0..parts {
            let (from, to) = (rows * i / parts, rows * (i + 1) / parts);
            let part = batch.slice(from, to - from);
            if i + 1 == parts {
                reached = offsets.clone();
            } else {
                advance(&mut reached, &part)?;
            }
            newest_times(&mut newest, &part)?;
            if let Some(state) = speed.as_deref_mut() {
                state.fold(&part)?;
            }
            table = append_events(table, part, topic, &reached, partition_count, &newest).await?;
        }
        bar.inc(1);
        bar.set_message(format!("{} events", group(events)));
    }
    maker.await?;
    Ok(events)
}

/// What the speed layer folds of `user_product_state` from the events it
/// reads: per `(user, product)`, the newest time (µs) of each event type
/// the view keeps (`views/user_product_state.sql`).
#[derive(Default)]
struct SpeedState(std::collections::HashMap<(String, String), [Option<i64>; 4]>);

impl SpeedState {
    const TYPES: [&'static str; 4] = ["page_view", "add_to_cart", "remove_from_cart", "purchase"];

    fn fold(&mut self, batch: &RecordBatch) -> anyhow::Result<()> {
        use datafusion::arrow::array::AsArray;
        use datafusion::arrow::datatypes::TimestampMicrosecondType;
        use shared_schema::schema::col;
        let text = |name: &str| batch.column_by_name(name).map(|c| c.as_string::<i32>()).context(name.to_string());
        let (users, products, kinds) = (text(col::USER_ID)?, text(col::PRODUCT_ID)?, text(col::EVENT_TYPE)?);
        let times =
            batch.column_by_name(col::EVENT_TIME).context("no event_time")?.as_primitive::<TimestampMicrosecondType>();
        for i in 0..batch.num_rows() {
            let Some(k) = Self::TYPES.iter().position(|t| *t == kinds.value(i)) else { continue };
            let row = self.0.entry((users.value(i).to_string(), products.value(i).to_string())).or_default();
            row[k] = row[k].max(Some(times.value(i)));
        }
        Ok(())
    }

    /// Folds the state into `speed.user_product_state` (greatest wins, as
    /// the speed layer's upsert does) and empties it.
    async fn write(&mut self, pool: &sqlx::PgPool) -> anyhow::Result<usize> {
        let time = |t: Option<i64>| t.and_then(DateTime::<Utc>::from_timestamp_micros);
        let (mut users, mut products) = (Vec::new(), Vec::new());
        let mut times: [Vec<Option<DateTime<Utc>>>; 4] = Default::default();
        for ((user, product), row) in self.0.drain() {
            users.push(user);
            products.push(product);
            for (column, t) in times.iter_mut().zip(row) {
                column.push(time(t));
            }
        }
        let [viewed, carted, removed, purchased] = times;
        sqlx::query(
            "INSERT INTO speed.user_product_state AS t
                 (user_id, product_id, last_viewed_at, last_carted_at, last_removed_at, last_purchased_at)
             SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::timestamptz[],
                                  $6::timestamptz[])
             ON CONFLICT (user_id, product_id) DO UPDATE SET
                 last_viewed_at = GREATEST(t.last_viewed_at, EXCLUDED.last_viewed_at),
                 last_carted_at = GREATEST(t.last_carted_at, EXCLUDED.last_carted_at),
                 last_removed_at = GREATEST(t.last_removed_at, EXCLUDED.last_removed_at),
                 last_purchased_at = GREATEST(t.last_purchased_at, EXCLUDED.last_purchased_at)",
        )
        .bind(&users)
        .bind(&products)
        .bind(viewed)
        .bind(carted)
        .bind(removed)
        .bind(purchased)
        .execute(pool)
        .await?;
        Ok(users.len())
    }
}

/// Raises each partition's newest event time (µs) to the newest in
/// `batch` (lake schema), as the ingest's duplicates history does.
fn newest_times(newest: &mut BTreeMap<Partition, i64>, batch: &RecordBatch) -> anyhow::Result<()> {
    use datafusion::arrow::datatypes::TimestampMicrosecondType;
    for (p, t) in by_partition::<TimestampMicrosecondType>(batch, shared_schema::schema::col::EVENT_TIME)? {
        let n = newest.entry(p).or_insert(t);
        *n = (*n).max(t);
    }
    Ok(())
}

/// Moves `next` past the Kafka offsets of `batch` (lake schema).
fn advance(next: &mut BTreeMap<Partition, Offset>, batch: &RecordBatch) -> anyhow::Result<()> {
    use datafusion::arrow::datatypes::Int64Type;
    for (p, o) in by_partition::<Int64Type>(batch, shared_schema::schema::col::KAFKA_OFFSET)? {
        let n = next.entry(p).or_insert(Offset(0));
        n.0 = n.0.max(o + 1);
    }
    Ok(())
}

/// Each row's Kafka partition with its value of the primitive `column`
/// (lake schema).
fn by_partition<'b, T: datafusion::arrow::datatypes::ArrowPrimitiveType>(
    batch: &'b RecordBatch,
    column: &str,
) -> anyhow::Result<impl Iterator<Item = (Partition, T::Native)> + 'b> {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::Int32Type;
    let partitions = batch
        .column_by_name(shared_schema::schema::col::KAFKA_PARTITION)
        .context("no kafka_partition column")?
        .as_primitive::<Int32Type>();
    let values = batch.column_by_name(column).with_context(|| format!("no {column} column"))?.as_primitive::<T>();
    Ok(partitions.values().iter().zip(values.values()).map(|(p, v)| (Partition(*p), *v)))
}

/// `run --full` into a fresh database before and after `maintain`
/// compacts every hour of the lake (all of it lies in the past), on the
/// work copy.
async fn before_and_after_maintenance(args: &Args, lake: &Lake) -> anyhow::Result<()> {
    let stack = Stack::local();
    let mut full = Vec::new();
    let mut maintained = None;
    for round in ["before", "after"] {
        if round == "after" {
            let config = batch_layer::maintain::MaintainConfig {
                closed_after: Duration::ZERO,
                retention: Duration::ZERO,
                ..batch_layer::maintain::MaintainConfig::new(lake.clone())
            };
            println!("batch-layer maintain ...");
            let (_, pool) = stack.migrated_database("bench_batch_maintain", None).await?;
            let started = Instant::now();
            let report = batch_layer::maintain::maintain(&config, &pool, Utc::now()).await?;
            pool.close().await;
            maintained = Some((started.elapsed(), report));
        }
        let table = lake.open(EVENTS_TABLE).await?.context("the events table vanished")?;
        let files = batch_layer::lake_files::LakeFiles::from_snapshot(EVENTS_TABLE, &table).await?.len();
        let (url, pool) = stack.migrated_database(&format!("bench_batch_{round}"), None).await?;
        println!("batch-layer run --full into a fresh database ({round} maintenance, {files} files) ...");
        let started = Instant::now();
        let outcome =
            recompute::run(&RunConfig { full: true, ..RunConfig::new(url, lake.clone(), args.topic.clone()) }).await?;
        let took = started.elapsed();
        let RunOutcome::Published { run_id, .. } = outcome else { bail!("the full run did not publish: {outcome:?}") };
        let breakdown = breakdown(&pool, run_id).await?;
        let totals = published_totals(&pool).await?;
        println!("  {:.1} s ({breakdown}); {}", took.as_secs_f64(), totals.describe());
        full.push((round, files, took, breakdown, totals));
        pool.close().await;
    }
    ensure!(full[0].4 == full[1].4, "the runs before and after maintenance published different totals");
    let (took, report) = maintained.context("no maintenance")?;
    println!();
    println!(
        "lake written at {} commits an hour; maintenance took {:.1} s: {report:?}",
        args.flushes_per_hour,
        took.as_secs_f64()
    );
    for (round, files, took, breakdown, _) in &full {
        println!(
            "  run --full {round:<6} maintenance ({files:>6} files) {:>7.2} s   ({breakdown})",
            took.as_secs_f64()
        );
    }
    println!("  results agree: {}", full[0].4.describe());
    Ok(())
}

/// Copies a Delta table folder: data files as hard links (Delta never
/// rewrites a data file), the log as real copies (it is appended to).
/// `root` (the copy's lake) is emptied first.
fn link_copy(from: &Path, to: &Path, root: &Path) -> std::io::Result<()> {
    if root.exists() {
        std::fs::remove_dir_all(root)?;
    }
    copy_tree(from, to, true)
}

fn copy_tree(from: &Path, to: &Path, link: bool) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &dest, link && entry.file_name() != "_delta_log")?;
        } else if link {
            std::fs::hard_link(entry.path(), &dest)?;
        } else {
            std::fs::copy(entry.path(), &dest)?;
        }
    }
    Ok(())
}

struct LakeShape {
    events: u64,
    files: Vec<String>,
    bytes: u64,
}

impl LakeShape {
    fn of(table: &DeltaTable, dir: &Path) -> anyhow::Result<Self> {
        let files: Vec<String> = table.get_file_uris()?.collect();
        let mut bytes = 0;
        for f in &files {
            bytes += std::fs::metadata(f).with_context(|| format!("reading {f} under {}", dir.display()))?.len();
        }
        let events =
            table.snapshot()?.log_data().into_iter().filter_map(|add| add.num_records()).map(|n| n as u64).sum();
        Ok(Self { events, files, bytes })
    }
}

/// Row count and the sum of every measure of a `product_demand_hourly` result.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
struct Totals {
    rows: u64,
    sums: Vec<i64>,
}

impl Totals {
    fn of(batches: &[RecordBatch]) -> Self {
        let measures = product_demand_hourly().measures.len();
        let keys = product_demand_hourly().keys.len();
        let mut sums = vec![0i64; measures];
        let mut rows = 0;
        for b in batches {
            rows += b.num_rows() as u64;
            for (i, sum) in sums.iter_mut().enumerate() {
                *sum += b.column(keys + i).as_primitive::<Int64Type>().iter().flatten().sum::<i64>();
            }
        }
        Self { rows, sums }
    }

    fn describe(&self) -> String {
        let names = product_demand_hourly().measures.iter().map(|m| m.name);
        let sums: Vec<String> = names.zip(&self.sums).map(|(n, s)| format!("{n} {}", group(*s as u64))).collect();
        format!("{} rows; {}", group(self.rows), sums.join(", "))
    }
}

/// The texts one comparison runs.
struct Queries {
    /// The batch layer's SQL for the view.
    view: String,
    /// The same in DuckDB's spelling: its `date_trunc` for the hour key
    /// (`arrow_cast` is DataFusion's own).
    duckdb: String,
    /// The view as the batch layer wrote it before issue 17: the hour by
    /// `date_trunc` on the time-zoned column, and each measure a `sum` of a
    /// `CASE` per row instead of an aggregate with `FILTER`.
    former: String,
}

/// `sql` with the hour key spelled for DuckDB.
fn duckdb_spelling(sql: &str) -> String {
    sql.replace(shared_schema::views::HOUR_EXPR, "date_trunc('hour', e.event_time)")
}

/// The former SQL of `view`: what its measures and hour key were before
/// issue 17 (same results, measured side by side).
fn former_sql(view: &shared_schema::views::ViewDef) -> String {
    let mut sql = view.batch_sql();
    for m in view.measures {
        let former = match (m.merge, m.only) {
            (shared_schema::views::Merge::Sum, Some(only)) => {
                format!("sum(CASE WHEN {only} THEN {} ELSE 0 END)", m.expr)
            }
            (shared_schema::views::Merge::Max, Some(only)) => format!("max(CASE WHEN {only} THEN {} END)", m.expr),
            _ => continue,
        };
        sql = sql.replace(&m.aggregate_sql(), &former);
    }
    duckdb_spelling(&sql)
}

struct Comparison {
    datafusion: Vec<Duration>,
    /// DataFusion on [`Queries::former`].
    former: Vec<Duration>,
    duckdb: Vec<Duration>,
    /// DataFusion over the bare Parquet files (`--plain-parquet`).
    parquet: Vec<Duration>,
    totals: Totals,
}

/// A session as the batch layer makes one (`SessionContext::new()`), with
/// `settings` applied on top when given.
fn session(settings: &[(String, String)]) -> anyhow::Result<SessionContext> {
    if settings.is_empty() {
        return Ok(SessionContext::new());
    }
    let mut config = SessionConfig::new();
    for (k, v) in settings {
        config.options_mut().set(k, v).with_context(|| format!("DataFusion setting {k}={v}"))?;
    }
    Ok(SessionContext::new_with_config(config))
}

/// One DataFusion execution as the batch layer does it: a session, the
/// snapshot registered as `events`, the view's SQL collected.
async fn datafusion_once(
    table: &DeltaTable,
    sql: &str,
    settings: &[(String, String)],
) -> anyhow::Result<(Duration, Totals)> {
    let started = Instant::now();
    let ctx = session(settings)?;
    lake::register(&ctx, batch_layer::scope::LAKE_EVENTS, table).await?;
    let batches = ctx.sql(sql).await?.collect().await?;
    Ok((started.elapsed(), Totals::of(&batches)))
}

/// The same query in DataFusion over the Parquet files themselves (no
/// Delta provider): tells DataFusion's own time from the provider's.
async fn datafusion_parquet_once(
    files: &[String],
    sql: &str,
    settings: &[(String, String)],
) -> anyhow::Result<(Duration, Totals)> {
    let started = Instant::now();
    let ctx = session(settings)?;
    let events = ctx.read_parquet(files.to_vec(), datafusion::prelude::ParquetReadOptions::default()).await?;
    ctx.register_table(batch_layer::scope::LAKE_EVENTS, events.into_view())?;
    let batches = ctx.sql(sql).await?.collect().await?;
    Ok((started.elapsed(), Totals::of(&batches)))
}

#[derive(serde::Deserialize)]
struct DuckDbRun {
    seconds: f64,
    #[serde(flatten)]
    totals: Totals,
}

fn duckdb_once(args: &Args, files: &Path, sql: &Path) -> anyhow::Result<(Duration, Totals)> {
    let out = Command::new(&args.python)
        .arg(&args.duckdb_script)
        .arg("--files")
        .arg(files)
        .arg("--sql")
        .arg(sql)
        .output()
        .with_context(|| format!("running {} {}", args.python.display(), args.duckdb_script.display()))?;
    if !out.status.success() {
        bail!("DuckDB run failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let run: DuckDbRun = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("reading DuckDB's result {:?}", String::from_utf8_lossy(&out.stdout)))?;
    Ok((Duration::from_secs_f64(run.seconds), run.totals))
}

async fn compare_engines(
    args: &Args,
    table: &DeltaTable,
    files: &[String],
    sql: &Queries,
    bench_dir: &Path,
) -> anyhow::Result<Comparison> {
    let settings: Vec<(String, String)> = args
        .datafusion_set
        .iter()
        .map(|s| s.split_once('=').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())))
        .collect::<Option<_>>()
        .context("--datafusion-set takes KEY=VALUE")?;
    let files_path = bench_dir.join("batch-files.txt");
    let sql_path = bench_dir.join("batch-query.sql");
    std::fs::write(&files_path, files.join("\n")).with_context(|| format!("writing {}", files_path.display()))?;
    std::fs::write(&sql_path, &sql.duckdb).with_context(|| format!("writing {}", sql_path.display()))?;
    println!("product_demand_hourly full recompute, {} interleaved repetitions per engine:", args.reps);

    let mut out = Comparison {
        datafusion: Vec::new(),
        former: Vec::new(),
        duckdb: Vec::new(),
        parquet: Vec::new(),
        totals: Totals { rows: 0, sums: Vec::new() },
    };
    for rep in 1..=args.reps {
        let (df, df_totals) = datafusion_once(table, &sql.view, &settings).await?;
        let (former, former_totals) = datafusion_once(table, &sql.former, &settings).await?;
        let (duck, duck_totals) = duckdb_once(args, &files_path, &sql_path)?;
        println!(
            "  rep {rep}: DataFusion {:.2} s (former SQL {:.2} s), DuckDB {:.2} s",
            df.as_secs_f64(),
            former.as_secs_f64(),
            duck.as_secs_f64()
        );
        if df_totals != duck_totals {
            bail!("the engines disagree: DataFusion {}; DuckDB {}", df_totals.describe(), duck_totals.describe());
        }
        ensure!(former_totals == df_totals, "the former SQL disagrees: {}", former_totals.describe());
        out.former.push(former);
        if args.plain_parquet {
            let (plain, plain_totals) = datafusion_parquet_once(files, &sql.view, &settings).await?;
            println!("         DataFusion over the bare Parquet files {:.2} s", plain.as_secs_f64());
            ensure!(plain_totals == df_totals, "DataFusion over the bare files disagrees: {}", plain_totals.describe());
            out.parquet.push(plain);
        }
        out.datafusion.push(df);
        out.duckdb.push(duck);
        out.totals = df_totals;
    }
    Ok(out)
}

struct Runs {
    full: Duration,
    full_breakdown: String,
    /// `run --full` on the Ballista cluster, and its breakdown.
    ballista: Option<(Duration, String)>,
    /// One per incremental run, in order.
    incremental: Vec<Incremental>,
}

/// One incremental run after one appended hour.
struct Incremental {
    appended_events: u64,
    append: Duration,
    took: Duration,
    breakdown: String,
    /// The hours it recomputed.
    hours: usize,
    /// Whether it left the user-product state to the speed layer.
    deferred: bool,
}

/// `--forget`: one `forget-user` request per size, each on a fresh copy of
/// the lake (hard links: the request rewrites files, never the originals).
async fn forget_users(args: &Args, base: &Path, bench_dir: &Path, shape: &LakeShape) -> anyhow::Result<()> {
    let stack = Stack::local();
    let key = platform::forgotten::ForgetKey::new("bench-forget-key-0123456789")?;
    let mut rows = Vec::new();
    for &n in &args.forget {
        ensure!(n > 0 && n <= args.users, "--forget sizes must be from 1 to --users ({})", args.users);
        let work = bench_dir.join("forget-work");
        link_copy(base, &work.join(EVENTS_TABLE), &work)
            .with_context(|| format!("copying the lake to {}", work.display()))?;
        let (url, _pool) = stack.migrated_database("bench_forget", None).await?;
        let config = batch_layer::forget::ForgetConfig {
            database_url: url,
            lake: Lake::parse(work.to_str().context("cache path is not UTF-8")?)?,
            key: key.clone(),
            orphan_grace: Duration::from_secs(600),
            kafka: None,
        };
        // Spread over the shop's users, so the request touches as many files as such a request would.
        let ids: Vec<String> = (0..n).map(|i| format!("u-{:06}", i * args.users / n)).collect();
        println!("forget-user with {n} users ...");
        let started = Instant::now();
        let report = batch_layer::forget::forget_users(&config, &ids).await?;
        let took = started.elapsed();
        let deleted = report.lake_rows.get(EVENTS_TABLE).copied().unwrap_or_default();
        println!("  {:.1} s: {}", took.as_secs_f64(), report.summary());
        rows.push(format!(
            "| {n} | {:.1} s | {} | {} of {} | {} |",
            took.as_secs_f64(),
            group(deleted),
            report.files_removed,
            shape.files.len(),
            report.log_files_removed
        ));
    }
    println!("\n| users in the request | forget-user | lake rows deleted | data files rewritten | log files removed |");
    println!("| --- | --- | --- | --- | --- |");
    for r in rows {
        println!("{r}");
    }
    Ok(())
}

async fn full_and_incremental(args: &Args, traffic: &Traffic, lake: &Lake, expected: &Totals) -> anyhow::Result<Runs> {
    let stack = Stack::local();
    let (url, pool) = stack.migrated_database("bench_batch", None).await?;
    let config = RunConfig { full: true, ..RunConfig::new(url, lake.clone(), args.topic.clone()) };

    println!("batch-layer run --full into a fresh database ...");
    let started = Instant::now();
    let outcome = recompute::run(&config).await?;
    let full = started.elapsed();
    let RunOutcome::Published { run_id, .. } = outcome else { bail!("the full run did not publish: {outcome:?}") };
    let full_breakdown = breakdown(&pool, run_id).await?;
    let published = published_totals(&pool).await?;
    if published != *expected {
        bail!(
            "batch.product_demand_hourly after the full run ({}) differs from the engines' result ({})",
            published.describe(),
            expected.describe()
        );
    }
    println!("  {:.1} s ({full_breakdown})", full.as_secs_f64());

    let ballista = match &args.ballista {
        Some(engine) => Some(ballista_full(engine, &stack, lake, &args.topic, expected).await?),
        None => None,
    };

    let mut incremental = Vec::new();
    // With the fold deferred, one more run folds what the others left.
    let deferring = !args.without_speed_layer && !args.fold_every.is_zero();
    let runs = args.incremental_runs + u32::from(deferring && args.incremental_runs > 0);
    for i in 0..runs {
        let folds = deferring && i + 1 == runs;
        println!("appending one new hour of events ...");
        let started = Instant::now();
        let table = lake.open(EVENTS_TABLE).await?.context("the events table vanished")?;
        let hour = args.hours + i;
        let mut speed = (!args.without_speed_layer).then(SpeedState::default);
        let appended_events =
            append_hours(traffic, table, &args.topic, hour..hour + 1, 1, &ProgressBar::hidden(), speed.as_mut())
                .await?;
        let append = started.elapsed();
        if let Some(speed) = &mut speed {
            // What the speed layer, caught up, holds by now: the hour's
            // state folded in, its positions at the lake's end.
            let pairs = speed.write(&pool).await?;
            let table = lake.open(EVENTS_TABLE).await?.context("the events table vanished")?;
            let partitions = (0..args.partitions).map(Partition);
            for (p, o) in lake::committed_offsets(&table, &args.topic, partitions).await? {
                // It began where the full run's cut stood (as a speed layer
                // without a position does), so it holds all since.
                sqlx::query(
                    "INSERT INTO ops.speed_offsets (kafka_partition, next_offset, started_offset)
                     VALUES ($1, $2, COALESCE((SELECT cut_offset FROM ops.cut WHERE kafka_partition = $1), 0))
                     ON CONFLICT (kafka_partition) DO UPDATE SET next_offset = EXCLUDED.next_offset",
                )
                .bind(p.0)
                .bind(o.0)
                .execute(&pool)
                .await?;
            }
            let held: i64 =
                sqlx::query_scalar("SELECT count(*) FROM speed.user_product_state").fetch_one(&pool).await?;
            println!("  the speed layer folded {} pairs; it holds {} rows", group(pairs as u64), group(held as u64));
        }

        // Runs an hour apart each follow a checkpoint (every 5 min by
        // default): the first change to a page after one writes the whole
        // page to the WAL, which is most of an upsert's cost.
        sqlx::query("CHECKPOINT").execute(&pool).await.context("CHECKPOINT before the incremental run")?;
        println!("batch-layer run (incremental) ...");
        let started = Instant::now();
        let fold_every = if folds { Duration::ZERO } else { args.fold_every };
        let outcome = recompute::run(&RunConfig { full: false, fold_every, ..config.clone() }).await?;
        let took = started.elapsed();
        let RunOutcome::Published { run_id, hours: Some(hours), deferred, .. } = outcome else {
            bail!("the incremental run did not publish incrementally: {outcome:?}")
        };
        let breakdown = breakdown(&pool, run_id).await?;
        let deferred = !deferred.is_empty();
        ensure!(deferred == (deferring && !folds), "run {}: deferred {deferred}, expected otherwise", i + 1);
        println!("  {:.2} s ({breakdown}{})", took.as_secs_f64(), if deferred { "; fold deferred" } else { "" });
        incremental.push(Incremental { appended_events, append, took, breakdown, hours, deferred });
    }
    pool.close().await;
    Ok(Runs { full, full_breakdown, ballista, incremental })
}

/// `run --full` on a Ballista cluster into a fresh database: its time and
/// breakdown, after checking it published what the in-process run did.
async fn ballista_full(
    engine: &str,
    stack: &Stack,
    lake: &Lake,
    topic: &str,
    expected: &Totals,
) -> anyhow::Result<(Duration, String)> {
    let (url, pool) = stack.migrated_database("bench_batch_ballista", None).await?;
    let config = RunConfig {
        full: true,
        engine: batch_layer::engine::Engine::parse(engine)?,
        ..RunConfig::new(url, lake.clone(), topic.to_string())
    };
    println!("batch-layer run --full --engine {engine} into a fresh database ...");
    let started = Instant::now();
    let outcome = recompute::run(&config).await?;
    let elapsed = started.elapsed();
    let RunOutcome::Published { run_id, .. } = outcome else { bail!("the Ballista run did not publish: {outcome:?}") };
    let published = published_totals(&pool).await?;
    if published != *expected {
        bail!("the Ballista run published {} instead of {}", published.describe(), expected.describe());
    }
    let breakdown = breakdown(&pool, run_id).await?;
    println!("  {:.1} s ({breakdown})", elapsed.as_secs_f64());
    pool.close().await;
    Ok((elapsed, breakdown))
}

/// The phases `ops.batch_runs` recorded for a run.
async fn breakdown(pool: &sqlx::PgPool, run_id: i64) -> anyhow::Result<String> {
    let durations: serde_json::Value = sqlx::query_scalar("SELECT durations_ms FROM ops.batch_runs WHERE run_id = $1")
        .bind(run_id)
        .fetch_one(pool)
        .await?;
    let ms = |k: &str| durations.get(k).and_then(serde_json::Value::as_f64).unwrap_or(f64::NAN) / 1000.0;
    Ok(format!(
        "prepare {:.2} s, compute {:.2} s, check {:.2} s, publish {:.2} s",
        ms("prepare"),
        ms("compute"),
        ms("check"),
        ms("publish")
    ))
}

/// `batch.product_demand_hourly` after the full run, as [`Totals`].
async fn published_totals(pool: &sqlx::PgPool) -> anyhow::Result<Totals> {
    let names: Vec<&str> = product_demand_hourly().measures.iter().map(|m| m.name).collect();
    let sums: Vec<String> = names.iter().map(|n| format!("COALESCE(sum({n}), 0)::bigint")).collect();
    let sql = format!("SELECT count(*)::bigint, {} FROM batch.product_demand_hourly", sums.join(", "));
    let row = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_one(pool).await?;
    use sqlx::Row as _;
    let rows: i64 = row.try_get(0)?;
    let sums = (1..=names.len()).map(|i| row.try_get::<i64, _>(i)).collect::<Result<Vec<_>, _>>()?;
    Ok(Totals { rows: rows as u64, sums })
}

fn median(times: &[Duration]) -> f64 {
    let mut s: Vec<f64> = times.iter().map(Duration::as_secs_f64).collect();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 }
}

fn best(times: &[Duration]) -> f64 {
    times.iter().map(Duration::as_secs_f64).fold(f64::INFINITY, f64::min)
}

fn report(args: &Args, shape: &LakeShape, c: &Comparison, runs: Option<&Runs>) {
    let (df, duck) = (median(&c.datafusion), median(&c.duckdb));
    println!();
    println!("batch layer, {} events in {} hours ({} files)", group(shape.events), args.hours, shape.files.len());
    println!("  {:<44} {:>10} {:>10}", "product_demand_hourly full recompute", "median", "best");
    println!("  {:<44} {:>8.2} s {:>8.2} s", "DataFusion (in-process, Delta snapshot)", df, best(&c.datafusion));
    println!(
        "  {:<44} {:>8.2} s {:>8.2} s",
        "DataFusion, former SQL (date_trunc, CASE sums)",
        median(&c.former),
        best(&c.former)
    );
    println!("  {:<44} {:>8.2} s {:>8.2} s", "DuckDB (same SQL, same Parquet files)", duck, best(&c.duckdb));
    if !c.parquet.is_empty() {
        println!(
            "  {:<44} {:>8.2} s {:>8.2} s",
            "DataFusion (bare Parquet files, diagnosis)",
            median(&c.parquet),
            best(&c.parquet)
        );
    }
    println!("  {:<44} {:>9.2}x   (goal <= 1.0x, aim 0.8x)", "DataFusion / DuckDB (median)", df / duck);
    if !args.datafusion_set.is_empty() {
        println!("  DataFusion settings on top of the batch layer's: {}", args.datafusion_set.join(", "));
    }
    println!("  results agree: {}", c.totals.describe());
    if let Some(r) = runs {
        println!(
            "  {:<44} {:>8.2} s   ({})",
            "batch-layer run --full (end to end)",
            r.full.as_secs_f64(),
            r.full_breakdown
        );
        if let Some((t, breakdown)) = &r.ballista {
            println!(
                "  {:<44} {:>8.2} s   ({breakdown}; {:.2}x the in-process run)",
                "batch-layer run --full on Ballista",
                t.as_secs_f64(),
                t.as_secs_f64() / r.full.as_secs_f64()
            );
        }
        let folding = r.incremental.iter().any(|i| i.deferred);
        // With deferred folds, the median is of the hourly runs; the run that
        // folds them is reported beside it.
        let times: Vec<Duration> = r.incremental.iter().filter(|i| i.deferred || !folding).map(|i| i.took).collect();
        for (n, i) in r.incremental.iter().enumerate() {
            let what = match (folding, i.deferred) {
                (false, _) => "",
                (true, true) => ", fold deferred",
                (true, false) => ", folds the hours before",
            };
            println!(
                "  {:<44} {:>8.2} s   ({}; {} events appended in {:.1} s)",
                format!("batch-layer run, incremental #{} ({} hours{what})", n + 1, i.hours),
                i.took.as_secs_f64(),
                i.breakdown,
                group(i.appended_events),
                i.append.as_secs_f64()
            );
        }
        println!("  {:<44} {:>8.2} s", "incremental run (median)", median(&times));
        if folding {
            let all: Duration = r.incremental.iter().map(|i| i.took).sum();
            println!(
                "  {:<44} {:>8.2} s   (every run, the fold included, over {} hours)",
                "incremental run (mean with its fold)",
                all.as_secs_f64() / r.incremental.len() as f64,
                r.incremental.len()
            );
        }
        println!(
            "  {:<44} {:>9.1}x   (goal >= 20x)",
            "full / incremental (median)",
            r.full.as_secs_f64() / median(&times)
        );
    }
}
