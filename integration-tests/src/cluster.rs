//! Beyond one machine, on loopback: a Ballista cluster of our own
//! `batch-cluster scheduler` and two `batch-cluster executor` processes, and a
//! local S3-compatible server (moto) for a lake on `s3://`. Each is started
//! by the test that needs it and stopped when dropped.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::fixture::{binary, free_port};
use crate::serving::get;

/// Two free ports in a row (an executor takes `port` and `port + 1`).
fn free_port_pair() -> anyhow::Result<u16> {
    for _ in 0..50 {
        let p = free_port()?;
        if p < u16::MAX && TcpListener::bind((Ipv4Addr::LOCALHOST, p + 1)).is_ok() {
            return Ok(p);
        }
    }
    bail!("no two free ports in a row on 127.0.0.1")
}

/// Child processes killed on drop, with their logs kept for failures.
struct Processes {
    children: Vec<(String, Child)>,
    logs: tempfile::TempDir,
}

impl Processes {
    fn new() -> anyhow::Result<Self> {
        Ok(Self { children: Vec::new(), logs: tempfile::tempdir()? })
    }

    fn spawn(&mut self, name: &str, cmd: &mut Command) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.logs.path().join(format!("{name}.log")))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    /// The process `name` exited, and its log contains `text`.
    fn exited_saying(&mut self, name: &str, text: &str) -> bool {
        let exited = self
            .children
            .iter_mut()
            .find(|(n, _)| n == name)
            .is_some_and(|(_, child)| child.try_wait().is_ok_and(|status| status.is_some()));
        exited && std::fs::read_to_string(self.logs.path().join(format!("{name}.log"))).is_ok_and(|l| l.contains(text))
    }

    /// Replaces the (exited) process `name` with a new one.
    fn respawn(&mut self, name: &str, cmd: &mut Command) -> anyhow::Result<()> {
        self.children.retain(|(n, _)| n != name);
        self.spawn(name, cmd)
    }

    /// Every process's log, for a failure message.
    fn logs(&self) -> String {
        self.children
            .iter()
            .map(|(name, _)| {
                let text = std::fs::read_to_string(self.logs.path().join(format!("{name}.log"))).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                format!("--- {name} ---\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A Ballista scheduler and `executors` executors of `batch-cluster`.
pub struct BallistaCluster {
    scheduler: SocketAddr,
    processes: Processes,
    _work: tempfile::TempDir,
}

impl BallistaCluster {
    /// Starts the cluster with `env` set for every process (the `AWS_*`
    /// variables of an s3:// lake) and waits until the scheduler reports
    /// every executor registered.
    pub async fn start(executors: usize, env: &[(&str, String)]) -> anyhow::Result<Self> {
        let bin = binary("batch-cluster");
        let work = tempfile::tempdir()?;
        let scheduler = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let mut processes = Processes::new()?;
        processes.spawn(
            "scheduler",
            Command::new(&bin)
                .args(["scheduler", "--bind", &scheduler.to_string(), "--min-executors", &executors.to_string()])
                .envs(env.iter().map(|(k, v)| (*k, v))),
        )?;
        let executor = |i: usize| -> anyhow::Result<Command> {
            let mut cmd = Command::new(&bin);
            cmd.args(["executor", "--scheduler", &scheduler.to_string(), "--port", &free_port_pair()?.to_string()])
                .arg("--work-dir")
                .arg(work.path().join(format!("executor-{i}")))
                .args(["--vcores", "2"])
                .envs(env.iter().map(|(k, v)| (*k, v)));
            Ok(cmd)
        };
        for i in 0..executors {
            processes.spawn(&format!("executor-{i}"), &mut executor(i)?)?;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut moves = 0;
        while !get(scheduler, "/readyz").await.is_ok_and(|a| a.status == 200) {
            if tokio::time::Instant::now() > deadline {
                bail!("the Ballista cluster did not become ready in 60 s:\n{}", processes.logs());
            }
            // A port picked free may be taken before the executor binds it
            // (another test, an outgoing connection): try other ports.
            for i in 0..executors {
                let name = format!("executor-{i}");
                if moves < 5 && processes.exited_saying(&name, "Address already in use") {
                    moves += 1;
                    processes.respawn(&name, &mut executor(i)?)?;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(Self { scheduler, processes, _work: work })
    }

    /// `ballista://HOST:PORT`, for `--engine`.
    pub fn engine(&self) -> String {
        format!("ballista://{}", self.scheduler)
    }

    /// The last lines of every process's log.
    pub fn logs(&self) -> String {
        self.processes.logs()
    }
}

/// Where `make test` installs moto (`scripts/stack.sh tools`).
fn moto_server() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("MOTO_SERVER") {
        return Ok(path.into());
    }
    let cache = std::env::var("LAMBDA_CACHE")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| PathBuf::from(h).join(".cache/lambda-platform")))
        .context("HOME is not set")?;
    let path = cache.join("tools/moto/bin/moto_server");
    if !path.exists() {
        bail!("{} is missing: run `scripts/stack.sh tools` (or `make test`) to install moto", path.display());
    }
    Ok(path)
}

/// A local S3-compatible server (moto) with one bucket.
pub struct S3Server {
    endpoint: String,
    bucket: String,
    _process: Processes,
}

impl S3Server {
    pub async fn start(bucket: &str) -> anyhow::Result<Self> {
        let port = free_port()?;
        let mut process = Processes::new()?;
        process.spawn("moto", Command::new(moto_server()?).args(["-H", "127.0.0.1", "-p", &port.to_string()]))?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !get(addr, "/").await.is_ok_and(|a| a.status == 200) {
            if tokio::time::Instant::now() > deadline {
                bail!("moto did not answer on {addr} in 60 s:\n{}", process.logs());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let server = Self { endpoint: format!("http://{addr}"), bucket: bucket.to_string(), _process: process };
        // moto creates a bucket on an unsigned PUT of its name.
        let status = Command::new("curl")
            .args(["-sf", "-X", "PUT", &format!("{}/{bucket}", server.endpoint)])
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("creating bucket {bucket} on {} failed", server.endpoint);
        }
        Ok(server)
    }

    /// The `AWS_*` variables that point delta-rs, object_store and our
    /// executors at this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    /// `s3://BUCKET/prefix`.
    pub fn uri(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// A client for the bucket (for reading what the lake wrote).
    pub fn store(&self) -> anyhow::Result<object_store::aws::AmazonS3> {
        Ok(object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_region("us-east-1")
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .with_allow_http(true)
            .with_bucket_name(&self.bucket)
            .build()?)
    }
}
