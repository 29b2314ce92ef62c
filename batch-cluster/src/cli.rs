//! Command line of `batch-cluster`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::executor::{self, ExecutorError, ExecutorOptions};
use crate::scheduler::{self, SchedulerError, SchedulerOptions};

/// The Ballista cluster of the batch layer: a scheduler and its executors,
/// for `batch-layer run --engine ballista://HOST:PORT`.
#[derive(Debug, Parser)]
#[command(name = "batch-cluster", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// A Ballista scheduler for `run --engine ballista://…` (runs until SIGTERM).
    Scheduler {
        /// Address to listen on (gRPC, plus /healthz and /readyz over HTTP).
        #[arg(long, env = "BALLISTA_SCHEDULER_BIND", default_value = "127.0.0.1:50050")]
        bind: SocketAddr,
        /// The host name executors and clients reach the scheduler by
        /// (default: the --bind address).
        #[arg(long, env = "BALLISTA_SCHEDULER_EXTERNAL_HOST")]
        external_host: Option<String>,
        /// /readyz answers 200 once this many executors have registered.
        #[arg(long, env = "BALLISTA_MIN_EXECUTORS", default_value_t = 1)]
        min_executors: usize,
    },
    /// A Ballista executor that registers with --scheduler and reads the
    /// lake (local, or s3:// with the AWS_* variables); runs until SIGTERM.
    Executor {
        /// The scheduler's HOST:PORT.
        #[arg(long, env = "BALLISTA_SCHEDULER", default_value = "127.0.0.1:50050")]
        scheduler: String,
        /// Address to listen on (0.0.0.0: every interface).
        #[arg(long, env = "BALLISTA_EXECUTOR_BIND_HOST", default_value = "127.0.0.1")]
        bind_host: String,
        /// The host name the scheduler and other executors reach this one by
        /// (default: --bind-host).
        #[arg(long, env = "BALLISTA_EXECUTOR_EXTERNAL_HOST")]
        external_host: Option<String>,
        /// Port for data (Arrow Flight); the next port serves gRPC.
        #[arg(long, env = "BALLISTA_EXECUTOR_PORT", default_value_t = 50051)]
        port: u16,
        /// Folder for shuffle files.
        #[arg(long, env = "BALLISTA_EXECUTOR_WORK_DIR", default_value = ".local/ballista/executor")]
        work_dir: PathBuf,
        /// Tasks run at once (default: the number of cores).
        #[arg(long, env = "BALLISTA_EXECUTOR_VCORES")]
        vcores: Option<usize>,
    },
}

/// Why a `batch-cluster` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error(transparent)]
    Executor(#[from] ExecutorError),
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Scheduler { bind, external_host, min_executors } => {
            let options = SchedulerOptions { bind, external_host, min_executors };
            Ok(scheduler::run(options, platform::shutdown::on_signals()).await?)
        }
        Command::Executor { scheduler, bind_host, external_host, port, work_dir, vcores } => {
            let vcores = vcores.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let options = ExecutorOptions { scheduler, bind_host, external_host, port, work_dir, vcores };
            Ok(executor::run(options).await?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }

    #[test]
    fn both_processes_bind_loopback_by_default() {
        let Command::Scheduler { bind, .. } = Cli::parse_from(["batch-cluster", "scheduler"]).command else {
            panic!("not the scheduler")
        };
        assert!(bind.ip().is_loopback(), "{bind}");
        let Command::Executor { bind_host, scheduler, .. } = Cli::parse_from(["batch-cluster", "executor"]).command
        else {
            panic!("not the executor")
        };
        assert_eq!(bind_host, "127.0.0.1");
        assert_eq!(scheduler, "127.0.0.1:50050");
    }
}
