//! The engine room of `dispatcher`: protocol, dispatcher server, client, task
//! runtime and inference backends.
//!
//! # Layout
//! - [`protocol`]: the JSON of the work protocol (shared/PROTOCOL.md).
//! - [`input`]: lazy, offset-addressed reading of the input JSONL.
//! - [`output`]: the in-order output JSONL, and its repair on resume.
//! - [`checkpoint`]: the atomic resume state and its checks against the files.
//! - [`ledger`]: where every line is; issue, complete, release, expire, tombstone.
//! - [`server`]: `dispatcher serve`: the HTTP layer, ticker, checkpoints, shutdown.
//! - [`metrics`]: Prometheus metrics of the server and of workers.
//! - [`client`]: the work protocol as workers call it.
//! - [`engine`]: requests, responses, the OpenAI-compatible backend, the echo engine, the launcher.
//! - [`task`]: the `Task` trait, task context and errors, the task manager, work sources.

pub mod checkpoint;
pub mod client;
pub mod engine;
mod error;
pub mod input;
pub mod ledger;
pub mod metrics;
pub mod output;
pub mod protocol;
pub mod server;
pub mod task;
