//! Inference engines: the [`Engine`] trait tasks send requests through, the
//! OpenAI-compatible HTTP backend, the built-in echo engine, and the launcher
//! that starts and stops vLLM, SGLang or llama.cpp.
//!
//! Where what lives: here the [`Engine`] trait and raw requests; `request.rs`
//! and `response.rs` the typed request and response; `openai.rs` the HTTP
//! backend (retries, keys, TLS); [`rate`] client-side rate limits; [`echo`]
//! the echo engine; [`spawn`] starting and stopping a local engine
//! (`log_tail.rs` the last lines it wrote, to quote when it fails);
//! [`cache`] the engine's own prefix cache counters; [`usage`] the tokens a
//! worker reports to its server.

pub mod cache;
pub mod echo;
mod log_tail;
mod message;
mod openai;
pub mod rate;
mod request;
mod response;
pub mod spawn;
/// Where the token meter was first: it lives with the metrics now.
pub use crate::metrics::usage;

use std::fmt;
use std::future::Future;
use std::pin::Pin;

pub use message::{Content, ImageError, Message, Part, DEFAULT_MAX_IMAGE_BYTES};
pub use openai::{
    api_base, ApiKey, EngineSetupError, OpenAiEngine, OpenAiEngineBuilder, RetryPolicy,
};
pub use rate::RateLimit;
pub use request::{Body, Request};
pub use response::{Choice, JsonError, RequestError, Response, TokenLogprob, TopLogprob, Usage};

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A request body sent as it is to an endpoint of the engine: a line of an
/// OpenAI batch file (`dispatcher run-batch`).
#[derive(Debug, Clone, PartialEq)]
pub struct RawRequest {
    /// The endpoint under the API base: `/chat/completions`, `/completions`,
    /// `/embeddings`.
    pub path: String,
    /// The JSON body.
    pub body: serde_json::Value,
    /// Keep the body's `model` instead of setting the engine's.
    pub keep_model: bool,
    /// The engine it goes to, as [`Request::engine`].
    pub engine: Option<String>,
}

/// The engine's answer to a [`RawRequest`], whatever its status.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RawResponse {
    /// The HTTP status: 2xx, a 4xx the engine refused the request with, or
    /// the 429/5xx it still answered after the retries.
    pub status: u16,
    /// The answer's JSON (its text as a JSON string when it is not JSON).
    pub body: serde_json::Value,
}

/// Something that answers requests: an HTTP engine, or a script in tests.
pub trait Engine: Send + Sync + fmt::Debug {
    /// Sends one request and waits for its response.
    fn send(&self, request: Request) -> BoxFuture<'_, Result<Response, RequestError>>;

    /// The model requests that name none get, when known.
    fn model_name(&self) -> Option<String> {
        None
    }

    /// The model requests that name none get, asking the engine when it is
    /// not known yet (the journal keys replayed answers by it).
    fn resolve_model(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(std::future::ready(self.model_name()))
    }

    /// Posts a body as it is and returns the engine's answer, error answers
    /// included. Engines that only take typed requests refuse it.
    fn post(&self, request: RawRequest) -> BoxFuture<'_, Result<RawResponse, RequestError>> {
        Box::pin(std::future::ready(Err(RequestError::Rejected {
            status: 501,
            message: format!(
                "this engine takes typed requests only, not a body for {}",
                request.path
            ),
        })))
    }
}
