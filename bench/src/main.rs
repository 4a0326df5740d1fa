//! Benchmarks of dispatcher (see BENCHMARKS.md for the commands and figures).
//!
//! - `load`: W concurrent workers speaking the work protocol over lean
//!   keep-alive HTTP/1.1 connections, batch B, echoing each item's content as
//!   its result; reports items/s and p50/p99 of GET /work and POST /results.
//! - `standin`: a stateless server that speaks the protocol, for the load
//!   generator's ceiling.
//! - `gen-input`: writes an N-line input JSONL.
//! - `saturation`: the task manager against a 100 ms engine at W requests in flight.

mod http;
mod load;
mod saturation;
mod standin;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "dispatcher-bench", about = "Benchmarks of dispatcher")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Drive a server with W workers at batch B for a while.
    Load(load::LoadArgs),
    /// Serve the protocol statelessly (the ceiling).
    Standin(standin::StandinArgs),
    /// Write an N-line input file.
    GenInput {
        /// Lines to write.
        #[arg(long)]
        lines: u64,
        /// Where.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Engine saturation of the task manager.
    Saturation(saturation::SaturationArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Load(args) => rt.block_on(load::run(args)),
        Command::Standin(args) => rt.block_on(standin::run(args)),
        Command::GenInput { lines, out } => gen_input(lines, &out),
        Command::Saturation(args) => rt.block_on(saturation::run(args)),
    }
}

/// Lines shaped like a real prompt file: `{"id": N, "prompt": "..."}`, ~80 bytes.
fn gen_input(lines: u64, out: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Write;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(out)?);
    for i in 0..lines {
        writeln!(
            w,
            "{{\"id\": {i}, \"prompt\": \"Summarize document number {i} in one sentence.\"}}"
        )?;
    }
    w.flush()?;
    Ok(())
}
