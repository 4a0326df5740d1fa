//! The `dispatcher` command line, reused by task binaries.
//!
//! # Layout
//! - [`serve`]: `dispatcher serve`, the head-node server.
//! - [`logging`]: tracing set-up shared by every subcommand.

pub mod logging;
pub mod serve;

use clap::{Parser, Subcommand};

/// Batch LLM inference on HPC clusters.
#[derive(Debug, Parser)]
#[command(name = "dispatcher", version, about, long_about = None)]
pub struct Cli {
    /// Logging verbosity.
    #[command(flatten)]
    pub log: logging::LogArgs,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands of `dispatcher`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve an input JSONL file to workers and write the output JSONL in order.
    Serve(serve::ServeArgs),
}

/// Entry point of the `dispatcher` binary: parses flags, runs, and returns the
/// process exit code.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    logging::init(&cli.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::run(args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Resolves when the process receives SIGTERM or SIGINT.
pub async fn termination_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot listen for SIGTERM: {e}");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
