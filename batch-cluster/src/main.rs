use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = batch_cluster::cli::Cli::parse();
    platform::logging::init();
    match batch_cluster::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => platform::logging::report(&e.into()),
    }
}
