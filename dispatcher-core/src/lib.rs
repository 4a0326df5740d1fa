//! The engine room of `dispatcher`: protocol, dispatcher server, client, task
//! runtime and inference backends.
//!
//! # Layout
//! - [`protocol`]: the JSON of the work protocol (the book's "The wire
//!   protocol", `docs/src/reference/protocol.md`), and the check that a result
//!   is one JSON value on one line.
//! - [`record`]: failure records, and what an output line is (ok, failed
//!   with a kind, not JSON): the one classifier every reader uses.
//! - [`input`]: lazy, offset-addressed reading of the input JSONL.
//! - [`output`]: the in-order output JSONL, and its repair on resume.
//! - [`dataset`]: a dataset as a job's input (compressed JSONL, and with the
//!   `parquet` feature Parquet and Arrow; folders and globs of shards, Hugging
//!   Face snapshots) staged as one JSONL file; `--outdir` shards; `export`.
//! - [`process`]: signals to, and liveness of, the processes started here.
//! - [`job`]: a job's files, owned in one place: their paths, locks, the
//!   checkpoint (the atomic resume state and its checks), the manifest,
//!   cleaning, and the `--redo-errors` swap.
//! - [`ledger`]: where every line is; issue, complete, release, expire,
//!   tombstone. Its parts: the leases of items in flight and the window of lines
//!   read and not written (reorder buffer, spill file, output).
//! - [`server`]: `dispatcher serve`: its lifecycle (ticker, checkpoints,
//!   shutdown), the shared state and its lock rule, and the HTTP layer.
//! - [`metrics`]: Prometheus metrics of the server and of workers.
//! - [`client`]: the work protocol as workers call it.
//! - [`engine`]: requests, responses and messages, the OpenAI-compatible
//!   backend, the echo engine, and [`engine::spawn`], which starts a local
//!   engine process.
//! - [`task`]: the `Task` trait, task context and errors, the task manager, work sources.
//! - [`text`]: text from outside made safe for a terminal or a log.

pub mod client;
pub mod dataset;
pub mod engine;
mod error;
pub mod input;
pub mod job;
pub mod ledger;
pub mod metrics;
pub mod output;
pub mod process;
pub mod protocol;
pub mod record;
pub mod server;
pub mod task;
pub mod text;
