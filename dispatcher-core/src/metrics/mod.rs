//! Prometheus metrics of the server and of workers (`GET /metrics`), through
//! the official `prometheus-client` crate.
//!
//! - `server.rs`: [`ServerMetrics`], the server's, from the ledger's status;
//! - `worker.rs`: [`WorkerMetrics`], a worker's engine requests and outcomes;
//! - [`usage`]: the engine tokens a worker used and has not reported yet;
//! - here: what both share (label sets, histograms, rendering).

mod server;
pub mod usage;
mod worker;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

pub use server::{Endpoint, RequestTimer, ServerMetrics};
pub use worker::{Answered, EngineSeries, WorkerMetrics};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabel {
    pub(crate) kind: String,
}

/// The `kind` label of failed lines whose kind `/status` does not list
/// (past the first [`crate::ledger::MAX_FAILURE_KINDS`]): one series for
/// them all, however many kinds the input brings.
pub const UNLISTED_KIND: &str = "_unlisted";

/// 100 µs to ~3 s (server requests) or 6.5 min (engine requests), doubling.
pub(crate) fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

pub(crate) fn engine_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 16))
}

pub(crate) fn text(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry).expect("writing to a String");
    out
}
