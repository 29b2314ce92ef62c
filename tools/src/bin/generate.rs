//! `generate`: realistic shop traffic into Kafka. See `--help`.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = integration_tests::generator::Args::parse();
    platform::logging::init();
    match integration_tests::generator::run(args).await {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(e) => platform::logging::report(&e),
    }
}
