//! `dispatcher`: large-scale batch LLM inference on HPC clusters.
//!
//! A head-node **dispatcher server** turns an input JSONL file into an output JSONL
//! file, one line each and in order, through any number of preemptible workers,
//! crashes and restarts. See the README for the commands.
//!
//! # Layout
//! - [`protocol`]: the JSON of the work protocol.
//! - [`server`], [`ledger`], [`checkpoint`]: `dispatcher serve`.
//! - [`client`]: the work protocol as workers call it.
//! - [`cli`]: the command line, reusable by task binaries.

pub use dispatcher_cli as cli;
pub use dispatcher_core::{checkpoint, client, input, ledger, output, protocol, server};
