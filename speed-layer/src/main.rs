use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = speed_layer::cli::Cli::parse();
    platform::logging::init();
    match speed_layer::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => platform::logging::report(&e),
    }
}
