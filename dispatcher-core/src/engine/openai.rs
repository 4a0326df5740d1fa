//! The OpenAI-compatible HTTP backend (vLLM, SGLang, llama.cpp, the echo engine).

use std::time::Duration;

use super::{BoxFuture, Engine, Request, RequestError, Response};

/// How the backend retries connection errors and 5xx answers.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts after the first.
    pub retries: u32,
    /// Wait before the first retry; doubles each time.
    pub initial_backoff: Duration,
    /// Longest wait between retries.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            retries: 5,
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(8),
        }
    }
}

/// Sends requests to `{base_url}/v1/chat/completions` or `/v1/completions`.
#[derive(Debug, Clone)]
pub struct OpenAiEngine {
    /// `http://host:port`, without a trailing slash.
    base_url: String,
    /// Filled into requests that name no model.
    model: Option<String>,
    http: reqwest::Client,
    retry: RetryPolicy,
}

impl OpenAiEngine {
    /// A backend for the engine at `base_url`, with a per-request `timeout`.
    pub fn new(base_url: &str, timeout: Duration, retry: RetryPolicy) -> OpenAiEngine {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(4096)
            .build()
            .expect("a plain HTTP client builds");
        OpenAiEngine {
            base_url: base_url.trim_end_matches('/').to_string(),
            model: None,
            http,
            retry,
        }
    }

    /// Sets the model filled into requests that name none.
    pub fn with_model(mut self, model: Option<String>) -> OpenAiEngine {
        self.model = model;
        self
    }

    /// The engine's base URL.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Asks `/v1/models` for the first model the engine serves.
    pub async fn discover_model(&self) -> Option<String> {
        let v: serde_json::Value = self
            .http
            .get(format!("{}/v1/models", self.base_url))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        v["data"][0]["id"].as_str().map(String::from)
    }

    async fn send_once(&self, body: &serde_json::Value, url: &str) -> Attempt {
        let resp = match self.http.post(url).json(body).send().await {
            Ok(r) => r,
            Err(e) => return Attempt::Retry(format!("{url}: {e}")),
        };
        let status = resp.status();
        let text = match resp.text().await {
            Ok(t) => t,
            Err(e) => return Attempt::Retry(format!("{url}: reading the answer: {e}")),
        };
        if status.is_server_error() {
            return Attempt::Retry(format!("{url} answered {status}: {}", snippet(&text)));
        }
        if !status.is_success() {
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| {
                    v["error"]["message"]
                        .as_str()
                        .or_else(|| v["message"].as_str())
                        .map(String::from)
                })
                .unwrap_or_else(|| snippet(&text));
            return Attempt::Done(Err(RequestError::Rejected {
                status: status.as_u16(),
                message,
            }));
        }
        let parsed = serde_json::from_str::<serde_json::Value>(&text)
            .map_err(|e| e.to_string())
            .and_then(|v| Response::from_openai(&v));
        Attempt::Done(parsed.map_err(|e| RequestError::Malformed(format!("{url}: {e}"))))
    }
}

enum Attempt {
    Done(Result<Response, RequestError>),
    Retry(String),
}

fn snippet(text: &str) -> String {
    text.chars().take(500).collect()
}

impl Engine for OpenAiEngine {
    fn send(&self, mut request: Request) -> BoxFuture<'_, Result<Response, RequestError>> {
        Box::pin(async move {
            if request.model.is_none() {
                request.model.clone_from(&self.model);
            }
            let url = format!("{}{}", self.base_url, request.endpoint());
            let body = request.to_json();
            let mut backoff = self.retry.initial_backoff;
            let mut attempt = 0;
            loop {
                match self.send_once(&body, &url).await {
                    Attempt::Done(r) => return r,
                    Attempt::Retry(why) if attempt >= self.retry.retries => {
                        return Err(RequestError::Unavailable(format!(
                            "{why} (after {} attempts)",
                            attempt + 1
                        )))
                    }
                    Attempt::Retry(why) => {
                        tracing::debug!(%why, attempt, "engine request failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(self.retry.max_backoff);
                        attempt += 1;
                    }
                }
            }
        })
    }
}
