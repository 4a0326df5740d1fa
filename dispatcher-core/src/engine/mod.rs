//! Inference engines: the [`Engine`] trait tasks send requests through, the
//! OpenAI-compatible HTTP backend, the built-in echo engine, and the launcher
//! that starts and stops vLLM, SGLang or llama.cpp.

pub mod echo;
pub mod launch;
mod openai;
pub mod rate;
mod request;
mod response;

use std::fmt;
use std::future::Future;
use std::pin::Pin;

pub use openai::{
    api_base, ApiKey, EngineSetupError, OpenAiEngine, OpenAiEngineBuilder, RetryPolicy,
};
pub use rate::RateLimit;
pub use request::{Body, Message, Request};
pub use response::{Choice, JsonError, RequestError, Response, Usage};

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Something that answers requests: an HTTP engine, or a script in tests.
pub trait Engine: Send + Sync + fmt::Debug {
    /// Sends one request and waits for its response.
    fn send(&self, request: Request) -> BoxFuture<'_, Result<Response, RequestError>>;
}
