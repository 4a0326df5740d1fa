//! A worker's metrics: its engine requests, tokens, retries and outcomes.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::{engine_histogram, text, KindLabel};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EngineLabel {
    engine: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    engine: String,
    model_name: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SuccessLabel {
    engine: String,
    model_name: String,
    finished_reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabel {
    engine: String,
    cause: String,
}

/// A worker's metrics: engine requests, tokens and retries per engine (the
/// `engine` label: `default`, or the name of an `--engine-url NAME=URL`),
/// task outcomes.
#[derive(Debug)]
pub struct WorkerMetrics {
    registry: Registry,
    requests_in_flight: Family<EngineLabel, Gauge>,
    engine_latency: Family<EngineLabel, Histogram, fn() -> Histogram>,
    engine_errors: Family<EngineLabel, Counter>,
    prompt_tokens: Family<ModelLabel, Counter>,
    generation_tokens: Family<ModelLabel, Counter>,
    request_success: Family<SuccessLabel, Counter>,
    retries: Family<RetryLabel, Counter>,
    rate_limit_wait: Family<EngineLabel, Counter<f64>>,
    journal_replayed: Counter,
    journal_tokens_saved: Counter,
    outcomes: Family<KindLabel, Counter>,
    /// Tokens used and not reported to the server yet.
    usage: std::sync::Arc<crate::metrics::usage::UsageMeter>,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("dispatcher_worker");
        let m = WorkerMetrics {
            registry: Registry::default(),
            requests_in_flight: Family::default(),
            engine_latency: Family::new_with_constructor(engine_histogram as fn() -> Histogram),
            engine_errors: Family::default(),
            prompt_tokens: Family::default(),
            generation_tokens: Family::default(),
            request_success: Family::default(),
            retries: Family::default(),
            rate_limit_wait: Family::default(),
            journal_replayed: Counter::default(),
            journal_tokens_saved: Counter::default(),
            outcomes: Family::default(),
            usage: std::sync::Arc::default(),
        };
        registry.register(
            "engine_requests_in_flight",
            "Requests sent to the engine and not answered",
            m.requests_in_flight.clone(),
        );
        registry.register(
            "engine_request_duration_seconds",
            "Time the engine took per request, retries included",
            m.engine_latency.clone(),
        );
        registry.register(
            "engine_errors",
            "Engine requests that ended in an error",
            m.engine_errors.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens, as the engine reports them (vLLM's prompt_tokens_total)",
            m.prompt_tokens.clone(),
        );
        registry.register(
            "generation_tokens",
            "Generated tokens, as the engine reports them; rate() gives tokens/s (vLLM's generation_tokens_total)",
            m.generation_tokens.clone(),
        );
        registry.register(
            "request_success",
            "Engine requests answered, by the first choice's finish reason (vLLM's request_success_total): `length` is a response cut at max_tokens",
            m.request_success.clone(),
        );
        registry.register(
            "engine_retries",
            "Engine requests sent again, by cause (connection, rate_limited: a 429, server_error: a 5xx or 408)",
            m.retries.clone(),
        );
        registry.register(
            "engine_rate_limit_wait_seconds",
            "Time requests waited for the client-side rate limits (--max-requests-per-minute, --max-tokens-per-minute)",
            m.rate_limit_wait.clone(),
        );
        registry.register(
            "journal_replayed_requests",
            "Engine requests answered from a line's journal instead of the engine",
            m.journal_replayed.clone(),
        );
        registry.register(
            "journal_tokens_saved",
            "Engine tokens (prompt and completion) the replayed requests had cost",
            m.journal_tokens_saved.clone(),
        );
        registry.register(
            "task_outcomes",
            "Lines finished, by how they ended",
            m.outcomes.clone(),
        );
        WorkerMetrics { registry, ..m }
    }
}

/// The series of one engine: those without a model label looked up once.
#[derive(Debug, Clone)]
pub struct EngineSeries {
    engine: String,
    in_flight: Gauge,
    latency: Histogram,
    errors: Counter,
    prompt_tokens: Family<ModelLabel, Counter>,
    generation_tokens: Family<ModelLabel, Counter>,
    request_success: Family<SuccessLabel, Counter>,
    usage: std::sync::Arc<crate::metrics::usage::UsageMeter>,
}

/// What the engine answered, for the metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct Answered<'a> {
    /// The model that answered.
    pub model: &'a str,
    /// Prompt tokens, when reported.
    pub prompt_tokens: Option<u64>,
    /// Generated tokens, when reported.
    pub completion_tokens: Option<u64>,
    /// The first choice's finish reason, when there is one.
    pub finish_reason: Option<&'a str>,
}

impl EngineSeries {
    /// A request to the engine starts.
    pub fn request_started(&self) {
        self.in_flight.inc();
    }

    /// A request to the engine ended after `elapsed`: answered, or not (`None`).
    pub fn request_ended(&self, elapsed: Duration, answered: Option<Answered<'_>>) {
        self.in_flight.dec();
        self.latency.observe(elapsed.as_secs_f64());
        let Some(a) = answered else {
            self.errors.inc();
            return;
        };
        let model = ModelLabel {
            engine: self.engine.clone(),
            model_name: a.model.to_string(),
        };
        if let Some(n) = a.prompt_tokens {
            self.prompt_tokens.get_or_create(&model).inc_by(n);
        }
        if let Some(n) = a.completion_tokens {
            self.generation_tokens.get_or_create(&model).inc_by(n);
        }
        self.usage.add(
            a.prompt_tokens.unwrap_or(0),
            a.completion_tokens.unwrap_or(0),
        );
        self.request_success
            .get_or_create(&SuccessLabel {
                engine: model.engine,
                model_name: model.model_name,
                finished_reason: a.finish_reason.unwrap_or("unknown").to_string(),
            })
            .inc();
    }
}

impl WorkerMetrics {
    /// The series of the engine called `engine`.
    pub fn engine(&self, engine: &str) -> EngineSeries {
        let label = EngineLabel {
            engine: engine.to_string(),
        };
        EngineSeries {
            engine: engine.to_string(),
            in_flight: self.requests_in_flight.get_or_create(&label).clone(),
            latency: self.engine_latency.get_or_create(&label).clone(),
            errors: self.engine_errors.get_or_create(&label).clone(),
            prompt_tokens: self.prompt_tokens.clone(),
            generation_tokens: self.generation_tokens.clone(),
            request_success: self.request_success.clone(),
            usage: self.usage.clone(),
        }
    }

    /// The tokens engines answered with and not reported yet: a client
    /// that reports them to its server takes them from here.
    pub fn usage(&self) -> std::sync::Arc<crate::metrics::usage::UsageMeter> {
        self.usage.clone()
    }

    /// A request to `engine` is sent again because of `cause`.
    pub fn engine_retry(&self, engine: &str, cause: &str) {
        self.retries
            .get_or_create(&RetryLabel {
                engine: engine.to_string(),
                cause: cause.to_string(),
            })
            .inc();
    }

    /// A request to `engine` waited this long for the client-side rate limits.
    pub fn rate_limit_wait(&self, engine: &str, waited: Duration) {
        self.rate_limit_wait
            .get_or_create(&EngineLabel {
                engine: engine.to_string(),
            })
            .inc_by(waited.as_secs_f64());
    }

    /// A request was answered from a journal; it had cost `tokens`.
    pub fn journal_replayed(&self, tokens: u64) {
        self.journal_replayed.inc();
        self.journal_tokens_saved.inc_by(tokens);
    }

    /// A line finished as `kind`.
    pub fn outcome(&self, kind: &str) {
        self.outcomes
            .get_or_create(&KindLabel {
                kind: kind.to_string(),
            })
            .inc();
    }

    /// The metrics as Prometheus text.
    pub fn render(&self) -> String {
        text(&self.registry)
    }
}
