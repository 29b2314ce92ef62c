//! Logging set-up and how a failed command reports itself.

use std::io::IsTerminal;
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

/// sqlx's URL parser, silenced but for errors.
const QUIET_URL_PARSER: &str = "sqlx_postgres::options::parse=error";

/// Structured logs through `tracing`: human-readable on a terminal, JSON
/// lines otherwise (services, CI). `RUST_LOG` filters; default `info`.
/// Whatever the filter, sqlx's parser of connection URLs stays quiet: it
/// logs a parameter it does not know with its value (a password, say).
pub fn init() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| {
            EnvFilter::new("info,sqlx::postgres::notice=warn,buoyant_kernel=off,delta_kernel=off,deltalake_core=warn")
        })
        .add_directive(QUIET_URL_PARSER.parse().unwrap_or_else(|_| unreachable!()));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second init (tests) is harmless; ignore the error it returns.
    let _ = if std::io::stderr().is_terminal() {
        builder.try_init()
    } else {
        builder.json().flatten_event(true).try_init()
    };
}

/// Prints a failed command as one line, `error: <what>: <why>`, without a
/// backtrace, and returns the process's failure code.
pub fn report(error: &anyhow::Error) -> ExitCode {
    eprintln!("error: {}", one_line(error));
    ExitCode::FAILURE
}

/// The error and its causes on one line, each cause once.
pub fn one_line(error: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in error.chain() {
        let text = cause.to_string().replace('\n', " ");
        // thiserror messages often embed their source; skip repeats.
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_is_one_line_without_repeats() {
        let inner = anyhow::anyhow!("connection refused\n(os error 111)");
        let e = inner.context("cannot reach PostgreSQL");
        assert_eq!(one_line(&e), "cannot reach PostgreSQL: connection refused (os error 111)");
    }
}
