//! `deltastream-gateway`: serve (default) | check-config.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use deltastream_gateway::config::Config;

#[derive(Parser)]
#[command(name = "deltastream-gateway", version, about = "Resilience-first API gateway for DeltaStream")]
struct Cli {
    /// TOML config file (extends the embedded DeltaStream default).
    #[arg(long, global = true, env = "GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Validate a config file and print the effective configuration.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig { file } => check_config(&file),
        Command::Serve => {
            deltastream_gateway::observability::init_logging();
            let cfg = match Config::load(cli.config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("invalid configuration:\n{e}");
                    return ExitCode::from(2);
                }
            };
            run(deltastream_gateway::server::serve(cfg))
        }
    }
}

fn run(fut: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "gateway failed");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match Config::load(Some(file)) {
        Ok(cfg) => {
            println!("{file}: OK\n{}", cfg.summary(), file = file.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: invalid configuration:\n{e}", file.display());
            ExitCode::from(2)
        }
    }
}
