//! Chaos: the whole pipeline under faults, on a private stack.
//!
//! While the generator streams live traffic, the lake ingest, the speed
//! layer, the `schedule` process and batch runs are killed with SIGKILL at
//! random moments and restarted; PostgreSQL is restarted while a batch run
//! computes, and the broker is restarted. Batch runs keep the quality gate
//! on. A checker
//! reads the serving totals all along: they never go backwards and never
//! exceed what was sent. At the end the lake holds every offset exactly once
//! and `serving.product_demand_hourly` equals the generator's own count.
//!
//! The speed layer takes every partition itself (`--assignment all`): with
//! two members of a consumer group, tansu 0.6's group coordinator left
//! partitions unassigned after these faults (the stream stopped at 1,002
//! of 1,315 records), a broker defect, not one of the platform's; group
//! mode is tested on its own (`faults::a_restart_after_kill_9_in_group_mode_resumes`,
//! `speed_faults`). A consumer-group rebalance happens here beside it: two
//! group members join one after the other and crash, their commits and the
//! main instance's fenced against each other. From round 2 on, a
//! `forget-user` request runs under the traffic, right after the ingest and
//! the scheduler were killed and restarted: it erases a sender of malformed
//! records (whose records live in `events_rejected`, the DLQ outbox and the
//! DLQ) while every writer works, and must leave no trace of them while the
//! exact counts of everyone else hold. (Forgetting a user of valid events
//! legitimately lowers the demand totals when a later run recomputes their
//! hours, which this test's monotone checker forbids; that race is tested
//! with exact scans in `forget_user::users_forgotten_under_traffic_never_come_back`.)
//!
//! `make test` runs a small size; `make chaos` a longer one (`CHAOS_ROUNDS`,
//! `CHAOS_RATE`, `CHAOS_SECONDS`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use batch_layer::lake::{EVENTS_TABLE, Lake, REJECTED_TABLE};
use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::Int64Type;
use datafusion::prelude::SessionContext;
use integration_tests::checks::{assert_demand_eq, serving_demand};
use integration_tests::fixture::{binary, log_tail};
use integration_tests::generator::{self, Args};
use integration_tests::private_stack::PrivateStack;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use tokio::process::{Child, Command};

const TOPIC: &str = "events";
/// Every process gets it, as a deployment's would.
const FORGET_KEY: &str = "chaos-forget-key-0123456789";
const DLQ: &str = "events.dlq";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One pipeline process, restartable.
struct Proc {
    name: &'static str,
    args: Vec<String>,
    /// The private stack's platform database.
    database_url: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn new(name: &'static str, args: Vec<String>, database_url: &str, logs: &Path) -> Self {
        Self { name, args, database_url: database_url.into(), log: logs.join(format!("{name}.log")), child: None }
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let bin = if self.name.starts_with("speed") { "speed-layer" } else { "batch-layer" };
        let child = Command::new(binary(bin))
            .args(&self.args)
            // Group members say when their partitions change.
            .env(
                "RUST_LOG",
                if self.name.starts_with("speed-group") { "warn,speed_layer::stream=info" } else { "warn" },
            )
            .env("DATABASE_URL", &self.database_url)
            .env("FORGET_KEY", FORGET_KEY)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// SIGKILL, as a crash would.
    async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.start_kill().ok();
            c.wait().await.ok();
        }
    }

    /// Fails the test if the process died on its own.
    fn assert_alive(&mut self) {
        if let Some(c) = self.child.as_mut()
            && let Some(status) = c.try_wait().unwrap()
        {
            panic!("{} exited by itself with {status}; its log ends:\n{}", self.name, log_tail(&self.log, 15));
        }
    }
}

/// Reads `(views, revenue)` of the serving view until stopped; every reading
/// must be at least the one before. Returns the readings.
fn checker(url: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<(i64, i64)>> {
    tokio::spawn(async move {
        let mut seen: Vec<(i64, i64)> = Vec::new();
        let options = sqlx::postgres::PgPoolOptions::new().max_connections(1).acquire_timeout(Duration::from_secs(1));
        let Ok(pool) = options.connect(&url).await else { return seen };
        while !stop.load(Ordering::Relaxed) {
            // PostgreSQL being restarted: no reading, not a failure.
            if let Ok(t) = sqlx::query_as::<_, (i64, i64)>(
                "SELECT COALESCE(sum(views), 0)::bigint, COALESCE(sum(revenue_cents), 0)::bigint
                 FROM serving.product_demand_hourly",
            )
            .fetch_one(&pool)
            .await
            {
                if let Some(last) = seen.last() {
                    assert!(t.0 >= last.0 && t.1 >= last.1, "serving totals went backwards: {last:?} then {t:?}");
                }
                seen.push(t);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        seen
    })
}

/// Runs `batch-layer run` to completion; another run holding the lock (the
/// scheduler's) is waited for.
async fn complete_a_run(args: &[String]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let out = Command::new(binary("batch-layer")).args(args).env("FORGET_KEY", FORGET_KEY).output().await.unwrap();
        if out.status.success() {
            return;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("holds the lock") && tokio::time::Instant::now() < deadline, "batch run: {stderr}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn consumed(pool: &PgPool) -> Option<i64> {
    integration_tests::checks::try_speed_consumed(pool).await.ok()
}

/// `(rows, distinct (partition, offset))` of a lake table.
async fn lake_offsets(lake: &Lake, table: &str) -> (i64, i64) {
    let Some(t) = lake.open(table).await.unwrap() else { return (0, 0) };
    let ctx = SessionContext::new();
    batch_layer::lake::register(&ctx, "t", &t).await.unwrap();
    let b = ctx
        .sql("SELECT count(*), count(DISTINCT (kafka_partition, kafka_offset)) FROM t")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let n = |i: usize| b[0].column(i).as_primitive::<Int64Type>().value(0);
    (n(0), n(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipeline_survives_kills_and_restarts_exactly() {
    let rounds: usize = env_or("CHAOS_ROUNDS", 3).max(3);
    let rate: f64 = env_or("CHAOS_RATE", 150.0);
    let seconds: u64 = env_or("CHAOS_SECONDS", 30);
    let mut rng = StdRng::seed_from_u64(env_or("CHAOS_SEED", 2026));

    let mut stack = PrivateStack::start().await.expect("private stack");
    stack.create_topic(TOPIC, 4).await.unwrap();
    stack.create_topic(DLQ, 1).await.unwrap();
    let (url, pool) = stack.create_database("lambda").await.unwrap();
    platform::db::migrate(&pool, Some(200)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake_dir = dir.path().join("lake");
    let lake = Lake::parse(lake_dir.to_str().unwrap()).unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let brokers = stack.brokers();
    let lake_arg = lake_dir.to_str().unwrap().to_string();
    let common = |cmd: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec!["--brokers".into(), brokers.clone(), "--lake-uri".into(), lake_arg.clone()];
        v.extend(cmd.iter().map(|s| s.to_string()));
        v
    };
    let speed_args = [
        "run",
        "--brokers",
        &brokers,
        "--topic",
        TOPIC,
        "--dlq-topic",
        DLQ,
        "--database-url",
        &url,
        "--ops-addr",
        "127.0.0.1:0",
        "--flush-interval",
        "100ms",
        "--assignment",
        "all",
    ];
    let mut speed = Proc::new("speed", speed_args.map(String::from).to_vec(), &url, &logs);
    let mut ingest = Proc::new(
        "ingest",
        common(&["ingest", "--topic", TOPIC, "--flush-interval", "2s", "--ops-addr", "127.0.0.1:0"]),
        &url,
        &logs,
    );
    // The quality gate stays on (the default --max-shrink).
    let run_args = common(&["run", "--topic", TOPIC, "--database-url", &url, "--no-catalog"]);
    let mut schedule_args = run_args.clone();
    schedule_args[4] = "schedule".to_string();
    schedule_args.extend(["--every", "7s", "--ops-addr", "127.0.0.1:0"].map(String::from));
    let mut schedule = Proc::new("schedule", schedule_args, &url, &logs);
    speed.start();
    ingest.start();
    schedule.start();

    // Live traffic for the whole run, with late and malformed records.
    let args = Args {
        backfill_hours: 0,
        rate,
        duration: Duration::from_secs(seconds),
        bad_fraction: 0.01,
        late_fraction: 0.05,
        ..Args::for_tests(&brokers, TOPIC, 2026)
    };
    // The generator's future is not Send: it gets a thread and a runtime of its own.
    let traffic = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(generator::run(args))
    });
    let stop = Arc::new(AtomicBool::new(false));
    let readings = checker(url.clone(), Arc::clone(&stop));

    let (mut kills, mut batch_runs, mut restarts) = ([0usize; 4], 0usize, Vec::new());
    let mut forgotten: Vec<String> = Vec::new();
    let round_time = Duration::from_secs(seconds) / (rounds as u32 + 1);
    for round in 0..rounds {
        tokio::time::sleep(round_time.mul_f64(rng.random_range(0.3..0.7))).await;
        speed.assert_alive();
        ingest.assert_alive();
        schedule.assert_alive();
        // A batch run, killed at a random moment (perhaps after it published).
        let mut run = Proc::new("run", run_args.clone(), &url, &logs);
        run.start();
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..3000))).await;
        run.kill().await;
        kills[2] += 1;
        batch_runs += 1;
        speed.kill().await;
        kills[0] += 1;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..1000))).await;
        speed.start();
        // Back at work before the next fault (a process still starting up
        // when PostgreSQL goes away exits, and is restarted by its supervisor).
        let before = consumed(&pool).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while consumed(&pool).await == before && tokio::time::Instant::now() < deadline {
            speed.assert_alive();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(round_time.mul_f64(rng.random_range(0.1..0.3))).await;
        ingest.kill().await;
        kills[1] += 1;
        ingest.start();
        schedule.kill().await;
        kills[3] += 1;
        schedule.start();
        if round >= 1 {
            // A sender of malformed records, forgotten while everything
            // writes (the ingest and the scheduler just restarted).
            let user = format!("u-bad-{}", 3 * round);
            let ids = dir.path().join(format!("forget-{round}.txt"));
            std::fs::write(&ids, format!("{user}\n")).unwrap();
            let mut forget = common(&["forget-user", "--ids-file", ids.to_str().unwrap(), "--database-url", &url]);
            forget.extend(["--topics".to_string(), format!("{TOPIC},{DLQ}")]);
            let out = Command::new(binary("batch-layer"))
                .args(&forget)
                .env("FORGET_KEY", FORGET_KEY)
                .env("RUST_LOG", "warn")
                .output()
                .await
                .unwrap();
            let said = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && said.contains("verified"),
                "forget-user under traffic: {said}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            forgotten.push(user);
        }
        match round {
            0 => {
                // PostgreSQL restarts while a batch run computes: the run
                // fails or is fenced off; it never publishes a stale cut.
                let mut run = Proc::new("run", run_args.clone(), &url, &logs);
                run.start();
                tokio::time::sleep(Duration::from_millis(rng.random_range(200..1500))).await;
                stack.restart_postgres(tokio::time::sleep(Duration::from_secs(2))).await.unwrap();
                if let Some(child) = run.child.as_mut() {
                    let _ = tokio::time::timeout(Duration::from_secs(120), child.wait()).await;
                }
                run.kill().await;
                batch_runs += 1;
                restarts.push("postgres during a batch run");
            }
            1 => {
                stack.restart_broker(tokio::time::sleep(Duration::from_secs(2))).await.unwrap();
                restarts.push("broker");
            }
            _ => {
                // A consumer-group rebalance mid-stream: a group member
                // joins, a second joins and takes partitions from it, then
                // both crash. They compete with the instance that takes
                // every partition, so each commit of theirs or its own is
                // fenced when another moved the offsets first; that
                // instance keeps the stream going whatever tansu's
                // coordinator does with the dead members (it never
                // expires them).
                // A group of its own each round: tansu never expires the
                // members that crashed in an earlier round, and a group
                // waits for every member it knows before it rebalances.
                let mut group_args: Vec<String> =
                    speed_args.iter().map(|a| if *a == "all" { "group".to_string() } else { a.to_string() }).collect();
                group_args.extend(["--group-id".to_string(), format!("speed-chaos-{round}")]);
                let mut first = Proc::new("speed-group-1", group_args.clone(), &url, &logs);
                let mut second = Proc::new("speed-group-2", group_args, &url, &logs);
                // Counted per round: the logs of earlier rounds go.
                for p in [&first, &second] {
                    let _ = std::fs::remove_file(&p.log);
                }
                let rebalances = |p: &Proc| {
                    std::fs::read_to_string(&p.log).unwrap_or_default().matches("partitions rebalanced").count()
                };
                first.start();
                tokio::time::sleep(Duration::from_millis(rng.random_range(1500..3000))).await;
                second.start();
                // Until the second member holds partitions (the first then
                // saw them assigned and moved), then a little longer.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                while (rebalances(&first) < 2 || rebalances(&second) < 1) && tokio::time::Instant::now() < deadline {
                    first.assert_alive();
                    second.assert_alive();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                tokio::time::sleep(Duration::from_millis(rng.random_range(500..2000))).await;
                first.assert_alive();
                second.assert_alive();
                first.kill().await;
                second.kill().await;
                let (a, b) = (rebalances(&first), rebalances(&second));
                eprintln!("chaos: group members saw {a} and {b} rebalances");
                assert!(a >= 2 && b >= 1, "no rebalance within a minute: the members saw {a} and {b}");
                restarts.push("a consumer-group rebalance");
            }
        }
        // A batch run that completes between the faults.
        complete_a_run(&run_args).await;
        batch_runs += 1;
    }
    let truth = tokio::task::spawn_blocking(move || traffic.join())
        .await
        .unwrap()
        .unwrap()
        .expect("the generator delivered everything");
    let total = (truth.events_sent + truth.bad_sent) as i64;

    // Drain: the speed layer reaches the end of the topic; the ingest catches up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    while consumed(&pool).await != Some(total) {
        speed.assert_alive();
        assert!(tokio::time::Instant::now() < deadline, "speed layer stuck at {:?} of {total}", consumed(&pool).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ingest.kill().await;
    schedule.kill().await;
    let caught_up = Command::new(binary("batch-layer"))
        .args(common(&["ingest", "--topic", TOPIC, "--until-caught-up"]))
        .env("DATABASE_URL", &url)
        .env("FORGET_KEY", FORGET_KEY)
        .output()
        .await
        .unwrap();
    assert!(caught_up.status.success(), "{}", String::from_utf8_lossy(&caught_up.stderr));
    complete_a_run(&run_args).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let readings = readings.await.expect("serving totals never went backwards");
    speed.kill().await;

    // The forgotten senders' records, as the topic holds them.
    let mentions = platform::forgotten::Mentions::new(forgotten.iter().map(String::as_str));
    let records = integration_tests::checks::topic_records(&brokers, TOPIC);
    assert_eq!(records.len() as i64, total, "the topic holds what was sent");
    let erased = records.iter().filter(|r| !mentions.in_record(r.key.as_deref(), &r.payload).is_empty()).count() as i64;
    assert!(forgotten.is_empty() || erased > 0, "the forgotten senders sent nothing: the forgets were vacuous");

    // The lake: every offset exactly once, good and rejected records
    // together, but for the forgotten senders' records, of which no trace
    // is left anywhere.
    let (events, distinct_events) = lake_offsets(&lake, EVENTS_TABLE).await;
    let (rejected, distinct_rejected) = lake_offsets(&lake, REJECTED_TABLE).await;
    assert_eq!((events, rejected), (distinct_events, distinct_rejected), "an offset landed twice in the lake");
    assert_eq!(events + rejected, total - erased, "the lake misses offsets, or holds a forgotten sender's");
    assert_eq!(events, truth.events_sent as i64);
    let outbox: Vec<(Option<Vec<u8>>, Vec<u8>)> =
        sqlx::query_as("SELECT kafka_key, payload FROM ops.dlq_outbox").fetch_all(&pool).await.unwrap();
    assert!(
        outbox.iter().all(|(k, p)| mentions.in_record(k.as_deref(), p).is_empty()),
        "a forgotten sender in the outbox"
    );
    let (requests, completed): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(completed_at) FROM ops.forgotten_users").fetch_one(&pool).await.unwrap();
    assert_eq!((requests, completed), (forgotten.len() as i64, forgotten.len() as i64));

    // Serving: exactly what was sent, and no reading ever above it.
    let expected = truth.demand_map();
    assert_demand_eq(&serving_demand(&pool).await, &expected, "serving.product_demand_hourly after chaos");
    let views: i64 = expected.values().map(|d| d.views).sum();
    let revenue: i64 = expected.values().map(|d| d.revenue_cents).sum();
    assert!(readings.iter().all(|(v, r)| *v <= views && *r <= revenue), "a reading exceeded what was sent");
    assert!(readings.len() > 10, "the checker read only {} times", readings.len());

    eprintln!(
        "chaos: {rounds} rounds; killed speed layer {}x, ingest {}x, batch run {}x ({batch_runs} runs), schedule {}x; \
         restarted {}; forgot {} senders ({erased} records) under traffic; {} events and {} malformed records \
         sent; {} checker readings, all monotone",
        kills[0],
        kills[1],
        kills[2],
        kills[3],
        restarts.join(" and "),
        forgotten.len(),
        truth.events_sent,
        truth.bad_sent,
        readings.len()
    );
}
