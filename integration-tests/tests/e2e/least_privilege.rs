//! Every service under its own role (issue 15), started the way a
//! deployment starts it: the schema owner migrates once, then each binary
//! runs with exactly its unit's environment file from `deploy/env/` (the
//! database, broker and lake swapped for the test's own) and nothing else
//! in its environment. Each one works, and its role cannot write what is
//! not its own. A service started before the migrations exits with one line
//! naming the command to run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use integration_tests::checks::{assert_demand_eq, serving_demand, wait_for_speed};
use integration_tests::fixture::{Stack, binary, free_port, log_tail};
use integration_tests::generator::{self, Args};
use integration_tests::serving::{get, wait_ready, write_model_file};
use sqlx::{AssertSqlSafe, PgPool};

const DENIED: &str = "42501";

/// The test's database, broker and lake, to put in place of the local
/// stack's values in the env files.
struct Target {
    database: String,
    brokers: String,
    lake: PathBuf,
}

/// `deploy/env/<unit>.env` as key/value pairs, pointed at `target`.
fn env_file(unit: &str, target: &Target) -> BTreeMap<String, String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/env").join(format!("{unit}.env"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("{}: not KEY=VALUE: {l}", path.display()));
            let v = v
                .replace("127.0.0.1:5433/lambda", &format!("127.0.0.1:5433/{}", target.database))
                .replace("127.0.0.1:9092", &target.brokers)
                .replace("/var/lib/lambda/lake", target.lake.to_str().unwrap())
                .replace("change-me-to-a-long-random-secret", "a-test-forget-key-of-some-length");
            (k.to_string(), v)
        })
        .collect()
}

/// `bin args…` with exactly `env` (and PATH) in its environment.
fn command(bin: &str, args: &[&str], env: &BTreeMap<String, String>) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(binary(bin));
    c.args(args).env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).envs(env).kill_on_drop(true);
    c
}

/// Runs to completion; panics with its output unless it succeeded.
async fn run_ok(bin: &str, args: &[&str], env: &BTreeMap<String, String>) -> Output {
    let out = command(bin, args, env).stdin(Stdio::null()).output().await.unwrap();
    assert!(
        out.status.success(),
        "{bin} {args:?} as {:?} failed with {}:\n{}",
        env.get("DATABASE_URL"),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

async fn pool_as(owner_url: &str, role: &str) -> PgPool {
    let url = integration_tests::fixture::role_url(owner_url, role);
    PgPool::connect(&url).await.unwrap()
}

/// The SQLSTATE of `sql` under `pool`'s role (`None` when it ran).
async fn sqlstate(pool: &PgPool, sql: &str) -> Option<String> {
    match sqlx::raw_sql(AssertSqlSafe(sql.to_owned())).execute(pool).await {
        Ok(_) => None,
        Err(sqlx::Error::Database(e)) => Some(e.code().map(|c| c.into_owned()).unwrap_or_default()),
        Err(e) => panic!("{sql}: {e}"),
    }
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(sql.to_owned())).fetch_one(pool).await.unwrap()
}

#[tokio::test]
async fn every_service_runs_under_its_own_role_and_writes_only_its_own() {
    let stack = Stack::from_env();
    let (owner_url, owner) = stack.fresh_database("least_privilege").await.unwrap();
    let database = owner_url.rsplit_once('/').unwrap().1.to_string();
    let lake = tempfile::tempdir().unwrap();
    let target = Target { database, brokers: stack.brokers().to_string(), lake: lake.path().join("lake") };
    let topic = stack.fresh_topic("least_privilege", 2).await.unwrap();
    let dlq = stack.fresh_topic("least_privilege_dlq", 1).await.unwrap();

    // The owner's one step.
    let migrate = env_file("lambda-migrate", &target);
    let views = integration_tests::fixture::views_dir();
    let views = views.to_str().unwrap();
    run_ok("serving-layer", &["migrate", "--segment-size", "100", "--views-dir", views], &migrate).await;

    let truth =
        generator::run(Args { backfill_hours: 3, bad_fraction: 0.02, ..Args::for_tests(&target.brokers, &topic, 61) })
            .await
            .unwrap();

    // Batch: ingest and a full run as batch_writer.
    let batch = env_file("lambda-batch", &target);
    assert!(batch["DATABASE_URL"].contains("batch_writer@"));
    let ingest = env_file("lambda-ingest", &target);
    run_ok("batch-layer", &["ingest", "--topic", &topic, "--until-caught-up"], &ingest).await;
    run_ok("batch-layer", &["run", "--full", "--no-catalog", "--topic", &topic], &batch).await;
    assert!(count(&owner, "SELECT count(*) FROM batch.product_demand_hourly").await > 0);

    // Speed: the default (consumer-group) mode, as speed_writer.
    let speed = env_file("lambda-speed", &target);
    assert!(speed["DATABASE_URL"].contains("speed_writer@"));
    let logs = tempfile::tempdir().unwrap();
    let speed_log = logs.path().join("speed.log");
    let mut speed_child = command(
        "speed-layer",
        &[
            "run",
            "--topic",
            &topic,
            "--dlq-topic",
            &dlq,
            "--group-id",
            &format!("{topic}.speed"),
            "--ops-addr",
            "127.0.0.1:0",
        ],
        &speed,
    )
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&speed_log).unwrap())
    .spawn()
    .unwrap();
    let total = (truth.events_sent + truth.bad_sent) as i64;
    tokio::select! {
        () = wait_for_speed(&owner, total) => {}
        status = speed_child.wait() => panic!("speed layer exited ({status:?}):\n{}", log_tail(&speed_log, 20)),
        // Its log, should it stall (the wait panics at 300 s).
        () = tokio::time::sleep(Duration::from_secs(240)) => panic!(
            "the speed layer read {} of {total} records in 240 s:\n{}",
            integration_tests::checks::speed_consumed(&owner).await,
            log_tail(&speed_log, 40)
        ),
    }
    assert_demand_eq(&serving_demand(&owner).await, &truth.demand_map(), "serving.product_demand_hourly");

    // The long-running ingest and the schedule, as services: new events
    // reach the lake (the ingest's /metrics count them, its lag falls to
    // 0), a run on the schedule's clock publishes them (its /metrics say
    // so), then SIGTERM stops both cleanly.
    let port = || std::net::SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()));
    let (ingest_ops, schedule_ops) = (port(), port());
    let ingest_log = logs.path().join("ingest.log");
    let mut ingest_child = command(
        "batch-layer",
        &["ingest", "--topic", &topic, "--flush-interval", "1s", "--ops-addr", &ingest_ops.to_string()],
        &ingest,
    )
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&ingest_log).unwrap())
    .spawn()
    .unwrap();
    wait_ready(ingest_ops).await;
    let more =
        generator::run(Args { backfill_hours: 1, ..Args::for_tests(&target.brokers, &topic, 62) }).await.unwrap();
    let expected = (more.events_sent + more.bad_sent) as f64;
    let metric = |addr, name: &'static str| async move {
        integration_tests::checks::metric_sum(&get(addr, "/metrics").await.map(|a| a.body).unwrap_or_default(), name)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while metric(ingest_ops, "batch_ingest_records_total").await < expected
        || metric(ingest_ops, "batch_ingest_partition_lag_records").await > 0.0
    {
        assert!(tokio::time::Instant::now() < deadline, "the ingest did not catch up:\n{}", log_tail(&ingest_log, 20));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(metric(ingest_ops, "batch_ingest_commits_total").await >= 1.0);
    assert!(metric(ingest_ops, "batch_ingest_bytes_total").await > 0.0);

    let finished = "SELECT count(*) FROM ops.batch_runs WHERE status = 'published'";
    let runs_before = count(&owner, finished).await;
    let schedule_log = logs.path().join("schedule.log");
    let mut schedule = command(
        "batch-layer",
        &["schedule", "--every", "2s", "--no-catalog", "--topic", &topic, "--ops-addr", &schedule_ops.to_string()],
        &batch,
    )
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&schedule_log).unwrap())
    .spawn()
    .unwrap();
    wait_ready(schedule_ops).await;
    assert!(metric(schedule_ops, "batch_last_success_timestamp_seconds").await > 0.0, "the last run, read at start");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while count(&owner, finished).await <= runs_before {
        assert!(tokio::time::Instant::now() < deadline, "no scheduled run:\n{}", log_tail(&schedule_log, 20));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let page = get(schedule_ops, "/metrics").await.unwrap().body;
    assert!(page.contains("batch_runs_total{outcome=\"published\"} 1"), "{page}");
    for phase in ["prepare", "compute", "check", "publish", "total"] {
        assert!(page.contains(&format!("batch_run_seconds_count{{phase=\"{phase}\"}} 1")), "{phase}: {page}");
    }
    assert!(integration_tests::checks::metric_sum(&page, "batch_rows_published") > 0.0, "{page}");
    let cut: f64 =
        sqlx::query_scalar::<_, i64>("SELECT sum(cut_offset)::bigint FROM ops.cut").fetch_one(&owner).await.unwrap()
            as f64;
    assert_eq!(integration_tests::checks::metric_sum(&page, "batch_cut_offset"), cut, "{page}");
    // Whether the run left user_product_state to the speed layer or folded it.
    let pending = count(&owner, "SELECT count(*) FROM ops.view_folds WHERE view_name = 'user_product_state'").await;
    let gauge = format!("batch_fold_pending{{view=\"user_product_state\"}} {pending}");
    assert!(page.contains(&gauge), "{gauge}: {page}");
    // After its first run the schedule maintains the lake, under its role.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let page = get(schedule_ops, "/metrics").await.unwrap().body;
        if page.contains("batch_maintain_runs_total{outcome=\"done\"}") {
            assert!(integration_tests::checks::metric_sum(&page, "batch_lake_files") > 0.0, "{page}");
            break;
        }
        assert!(
            !page.contains("batch_maintain_runs_total{outcome=\"failed\"}"),
            "maintenance failed:\n{}",
            log_tail(&schedule_log, 20)
        );
        assert!(tokio::time::Instant::now() < deadline, "no maintenance:\n{}", log_tail(&schedule_log, 20));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (child, log) in [(&mut schedule, &schedule_log), (&mut ingest_child, &ingest_log)] {
        let pid = child.id().unwrap().to_string();
        assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let status = tokio::time::timeout(Duration::from_secs(60), child.wait()).await.unwrap().unwrap();
        assert!(status.success(), "exited with {status}:\n{}", log_tail(log, 20));
    }

    // Serve: each pool as its reader role; DATABASE_URL is not set at all.
    let serving = env_file("lambda-serving", &target);
    assert!(!serving.contains_key("DATABASE_URL"));
    let port = || std::net::SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()));
    let (addr, ops) = (port(), port());
    let serve_log = logs.path().join("serve.log");
    let _serve =
        command("serving-layer", &["serve", "--addr", &addr.to_string(), "--ops-addr", &ops.to_string()], &serving)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&serve_log).unwrap())
            .spawn()
            .unwrap();
    wait_ready(ops).await;
    // Keys, made by the owner's command and printed once.
    let mut keys = Vec::new();
    for scope in ["recommendations", "dashboard"] {
        let out =
            run_ok("serving-layer", &["keys", "create", "--scope", scope, "--name", "least-privilege"], &migrate).await;
        keys.push(String::from_utf8(out.stdout).unwrap().trim().to_string());
    }
    integration_tests::serving::use_keys(addr, keys[0].clone(), keys[1].clone());
    let user: String =
        sqlx::query_scalar("SELECT user_id FROM batch.user_product_state LIMIT 1").fetch_one(&owner).await.unwrap();
    for path in [
        format!("/api/recommendations/{user}"),
        "/api/demand/hourly".into(),
        "/api/freshness".into(),
        "/api/spikes".into(),
    ] {
        let answer = get(addr, &path).await.unwrap();
        assert_eq!(answer.status, 200, "{path}: {}\n{}", answer.body, log_tail(&serve_log, 20));
    }

    // Import as serving_writer.
    let import = env_file("lambda-import", &target);
    let model = logs.path().join("model.parquet");
    write_model_file(&model, &[(&user, "p-model-1", 0.9, None), (&user, "p-model-2", 0.8, None)]).unwrap();
    let out =
        run_ok("serving-layer", &["import-recommendations", model.to_str().unwrap(), "--model-version", "m1"], &import)
            .await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("imported 2 recommendations"));
    let answer = get(addr, &format!("/api/recommendations/{user}")).await.unwrap();
    assert!(answer.body.contains("p-model-1"), "{}", answer.body);

    // Forget-user and export-training as batch_writer.
    let forget = env_file("lambda-forget", &target);
    let mut child = command(
        "batch-layer",
        &["forget-user", "--ids-file", "-", "--topics", &format!("{topic},{dlq}"), "--orphan-grace", "10m"],
        &forget,
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    use tokio::io::AsyncWriteExt as _;
    child.stdin.take().unwrap().write_all(format!("{user}\n").as_bytes()).await.unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success(), "forget-user: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(count(&owner, "SELECT count(*) FROM ops.forgotten_users WHERE completed_at IS NOT NULL").await, 1);
    let export = logs.path().join("export");
    run_ok("batch-layer", &["export-training", "--out", export.to_str().unwrap()], &forget).await;
    assert_eq!(count(&owner, "SELECT count(*) FROM ops.training_exports").await, 1);

    speed_child.start_kill().unwrap();
    speed_child.wait().await.unwrap();

    // Nothing outside each role's own.
    let refused: &[(&str, &[&str])] = &[
        (
            "batch_writer",
            &[
                "CREATE TABLE batch.intruder (x int)",
                "CREATE TABLE ops.intruder (x int)",
                "INSERT INTO speed.product_demand_hourly SELECT * FROM speed.product_demand_hourly LIMIT 1",
                "UPDATE ops.speed_offsets SET next_offset = 0",
                "DELETE FROM ops.model_imports",
            ],
        ),
        (
            "speed_writer",
            &[
                "CREATE TABLE speed.intruder (x int)",
                "DELETE FROM batch.product_demand_hourly",
                "UPDATE ops.cut SET cut_offset = 0",
                "DELETE FROM ops.forgotten_users",
                "DELETE FROM serving.model_recommendations",
            ],
        ),
        (
            "serving_writer",
            &["CREATE TABLE serving.intruder (x int)", "DELETE FROM batch.products", "DELETE FROM speed.event_keys"],
        ),
        ("recommender_reader", &["DELETE FROM serving.model_recommendations", "CREATE TABLE serving.intruder (x int)"]),
        ("dashboard_reader", &["CREATE TABLE serving.intruder (x int)", "SELECT * FROM serving.user_product_state"]),
    ];
    for (role, statements) in refused {
        let pool = pool_as(&owner_url, role).await;
        for sql in *statements {
            assert_eq!(sqlstate(&pool, sql).await.as_deref(), Some(DENIED), "{role} may {sql}");
        }
    }
}

/// A service started against a database the owner has not migrated (or not
/// fully) exits at once with one line naming the command, under every role.
#[tokio::test]
async fn services_refuse_a_schema_that_is_not_migrated_with_one_line() {
    let stack = Stack::from_env();
    let (owner_url, owner) = stack.fresh_database("least_privilege_pending").await.unwrap();
    let database = owner_url.rsplit_once('/').unwrap().1.to_string();
    let lake = tempfile::tempdir().unwrap();
    // No broker is needed: the check comes first.
    let target = Target { database, brokers: "127.0.0.1:9".into(), lake: lake.path().join("lake") };
    let services: &[(&str, &str, &[&str])] = &[
        ("lambda-ingest", "batch-layer", &["ingest"]),
        ("lambda-batch", "batch-layer", &["run", "--no-catalog"]),
        ("lambda-speed", "speed-layer", &["run", "--ops-addr", "127.0.0.1:0"]),
        ("lambda-serving", "serving-layer", &["serve", "--addr", "127.0.0.1:0"]),
        ("lambda-forget", "batch-layer", &["export-training", "--out", "/nonexistent/export"]),
    ];
    let expect_pending = |what: &str, out: &Output, unit: &str| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{unit} started on {what}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
        assert_eq!(
            errors,
            [format!(
                "error: {what}: run `serving-layer migrate` as the schema owner first (`make up` does it locally)"
            )],
            "{unit}:\n{stderr}"
        );
        assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{unit}:\n{stderr}");
    };
    for (unit, bin, args) in services {
        let out = command(bin, args, &env_file(unit, &target)).stdin(Stdio::null()).output().await.unwrap();
        expect_pending("the database has not been migrated", &out, unit);
    }
    // Migrated, then one migration taken back: pending from that version.
    platform::db::migrate(&owner, None).await.unwrap();
    let last: i64 = sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations").fetch_one(&owner).await.unwrap();
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1").bind(last).execute(&owner).await.unwrap();
    for (unit, bin, args) in services {
        let out = command(bin, args, &env_file(unit, &target)).stdin(Stdio::null()).output().await.unwrap();
        expect_pending(&format!("1 migration(s) pending, from version {last}"), &out, unit);
    }
}

/// Passwords, webhook tokens and secrets stay out of `--help` (even when
/// set in the environment) and out of error messages.
#[tokio::test]
async fn secrets_stay_out_of_help_and_errors() {
    let secret_env: BTreeMap<String, String> = [
        ("DATABASE_URL", "postgres://batch_writer:pg-s3cr3t@127.0.0.1:9/lambda?sslpassword=key-s3cr3t"),
        ("SALES_DATABASE_URL", "postgres://reader:sales-s3cr3t@127.0.0.1:9/sales"),
        ("NOTIFY_WEBHOOK_URL", "https://hooks.example.com/T0/B0/hook-s3cr3t"),
        ("NOTIFY_WEBHOOK_SECRET", "signing-s3cr3t-long-enough"),
        ("FORGET_KEY", "forget-s3cr3t-long-enough"),
        ("RECOMMENDER_DATABASE_URL", "postgres://recommender_reader:rec-s3cr3t@127.0.0.1:9/lambda"),
        ("DASHBOARD_DATABASE_URL", "postgres://dashboard_reader:dash-s3cr3t@127.0.0.1:9/lambda"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let runs: &[(&str, &[&str])] = &[
        ("batch-layer", &["ingest", "--help"]),
        ("batch-layer", &["run", "--help"]),
        ("speed-layer", &["run", "--help"]),
        ("serving-layer", &["serve", "--help"]),
        ("serving-layer", &["import-recommendations", "--help"]),
        // Errors: PostgreSQL does not listen on port 9.
        ("speed-layer", &["run", "--ops-addr", "127.0.0.1:0"]),
        ("serving-layer", &["serve", "--addr", "127.0.0.1:0"]),
        ("batch-layer", &["export-training", "--out", "/nonexistent/export"]),
    ];
    // Concurrently: each failing connection retries for up to a minute.
    let outputs = futures::future::join_all(runs.iter().map(|(bin, args)| {
        let mut command = command(bin, args, &secret_env);
        async move { tokio::time::timeout(Duration::from_secs(120), command.stdin(Stdio::null()).output()).await }
    }))
    .await;
    for ((bin, args), out) in runs.iter().zip(outputs) {
        let out = out.expect("the command ends").unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!text.contains("s3cr3t"), "{bin} {args:?} shows a secret:\n{text}");
        if !args.contains(&"--help") {
            assert!(!out.status.success(), "{bin} {args:?}");
            assert!(text.contains("***"), "{bin} {args:?} names the database it could not reach, redacted:\n{text}");
        }
    }
}
