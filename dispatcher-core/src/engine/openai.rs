//! The OpenAI-compatible HTTP backend: vLLM, SGLang, llama.cpp, the echo
//! engine, and hosted APIs over TLS with an API key and rate limits.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use reqwest::StatusCode;

use super::rate::{estimated_tokens, raw_estimated_tokens, RateLimit, RateLimiter};
use super::{BoxFuture, Engine, RawRequest, RawResponse, Request, RequestError, Response, Usage};
use crate::metrics::WorkerMetrics;

/// How the backend retries connection errors, 429 and 5xx answers.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts after the first.
    pub retries: u32,
    /// Wait before the first retry; doubles each time.
    pub initial_backoff: Duration,
    /// Longest wait between retries, unless the engine asks for more.
    pub max_backoff: Duration,
    /// Longest wait a `Retry-After` header is honoured for.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            retries: 5,
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(8),
            max_retry_after: Duration::from_secs(120),
        }
    }
}

/// An API key, sent as a bearer token; its `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// A key; empty keys are `None` (an unset variable exported as empty).
    pub fn new(key: impl Into<String>) -> Option<ApiKey> {
        let key = key.into();
        (!key.trim().is_empty()).then(|| ApiKey(key.trim().to_string()))
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Why an engine could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EngineSetupError {
    /// The URL is not an http(s) URL.
    #[error("{url:?} is not an http:// or https:// URL")]
    BadUrl {
        /// As given.
        url: String,
    },
    /// The API key cannot be sent in a header (the key itself is not shown).
    #[error(
        "the API key is not a valid HTTP header value (a line break or a control character in it?)"
    )]
    BadApiKey,
    /// A CA certificate did not read as PEM.
    #[error("the CA certificate is not a PEM certificate: {0}")]
    BadCertificate(String),
    /// The HTTP client could not be built.
    #[error("could not set up the HTTP client: {0}")]
    Client(String),
}

/// The API base of an engine from the URL a user gives: `http://host:port`
/// (what launched engines and `--no-launch` have) gets `/v1`; a URL with a
/// path (`https://api.example.com/v1`, `https://host/openai/v1`) is the base
/// as it is, like the OpenAI clients' `base_url`.
pub fn api_base(url: &str) -> Result<String, EngineSetupError> {
    let bad = || EngineSetupError::BadUrl {
        url: url.to_string(),
    };
    let trimmed = url.trim().trim_end_matches('/');
    let rest = trimmed
        .strip_prefix("http://")
        .or_else(|| trimmed.strip_prefix("https://"))
        .ok_or_else(bad)?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(bad());
    }
    Ok(if rest.contains('/') {
        trimmed.to_string()
    } else {
        format!("{trimmed}/v1")
    })
}

/// Sends requests to `{api_base}/chat/completions` or `/completions`.
#[derive(Debug, Clone)]
pub struct OpenAiEngine {
    /// `http://host:port/v1`, without a trailing slash.
    api_base: String,
    /// Filled into requests that name no model.
    model: Option<String>,
    /// Without a model: the first the engine lists, asked at the first
    /// request (the engine may still be starting when the worker does).
    discovered: Option<Arc<tokio::sync::OnceCell<String>>>,
    http: reqwest::Client,
    retry: RetryPolicy,
    rate: Option<Arc<RateLimiter>>,
    /// Where retries and rate-limit waits are counted, under which engine name.
    metrics: Option<(Arc<WorkerMetrics>, String)>,
}

/// Builds an [`OpenAiEngine`] with TLS roots, an API key and rate limits.
#[derive(Debug)]
pub struct OpenAiEngineBuilder {
    url: String,
    timeout: Duration,
    retry: RetryPolicy,
    api_key: Option<ApiKey>,
    ca_certs: Vec<Vec<u8>>,
    rate: RateLimit,
    model: Option<String>,
    discover_model: bool,
}

impl OpenAiEngineBuilder {
    /// Seconds one request may take before it counts as failed (600 by default).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How failed requests are retried.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Sends `Authorization: Bearer <key>` with every request.
    pub fn api_key(mut self, key: Option<ApiKey>) -> Self {
        self.api_key = key;
        self
    }

    /// Trusts this PEM certificate (a site CA, or a test's own) besides the
    /// system's roots.
    pub fn ca_cert_pem(mut self, pem: Vec<u8>) -> Self {
        self.ca_certs.push(pem);
        self
    }

    /// Limits requests and tokens per minute on the client side.
    pub fn rate_limit(mut self, rate: RateLimit) -> Self {
        self.rate = rate;
        self
    }

    /// The model filled into requests that name none.
    pub fn model(mut self, model: Option<String>) -> Self {
        self.model = model;
        self
    }

    /// Without a [`model`](Self::model): fills in the first model the engine
    /// lists at `/models`, asked when the first request is sent.
    pub fn discover_model(mut self, discover: bool) -> Self {
        self.discover_model = discover;
        self
    }

    /// The engine, or why it cannot be set up.
    pub fn build(self) -> Result<OpenAiEngine, EngineSetupError> {
        let api_base = api_base(&self.url)?;
        let mut headers = HeaderMap::new();
        if let Some(ApiKey(key)) = &self.api_key {
            let mut value = HeaderValue::from_str(&format!("Bearer {key}"))
                .map_err(|_| EngineSetupError::BadApiKey)?;
            // Shown as "Sensitive" wherever the client's headers are printed.
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        let mut http = reqwest::Client::builder()
            .timeout(self.timeout)
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(4096)
            .default_headers(headers);
        for pem in &self.ca_certs {
            let cert = reqwest::Certificate::from_pem(pem)
                .map_err(|e| EngineSetupError::BadCertificate(e.to_string()))?;
            http = http.add_root_certificate(cert);
        }
        let http = http
            .build()
            .map_err(|e| EngineSetupError::Client(e.to_string()))?;
        Ok(OpenAiEngine {
            api_base,
            discovered: (self.discover_model && self.model.is_none())
                .then(|| Arc::new(tokio::sync::OnceCell::new())),
            model: self.model,
            http,
            retry: self.retry,
            rate: RateLimiter::new(self.rate).map(Arc::new),
            metrics: None,
        })
    }
}

impl OpenAiEngine {
    /// A backend for the engine at `url` (see [`api_base`]), with a
    /// per-request `timeout`.
    ///
    /// # Panics
    /// When `url` is not an http(s) URL; [`OpenAiEngine::builder`] returns
    /// that as an error instead.
    pub fn new(url: &str, timeout: Duration, retry: RetryPolicy) -> OpenAiEngine {
        OpenAiEngine::builder(url)
            .timeout(timeout)
            .retry(retry)
            .build()
            .unwrap_or_else(|e| panic!("engine at {url}: {e}"))
    }

    /// A builder for the engine at `url`.
    pub fn builder(url: &str) -> OpenAiEngineBuilder {
        OpenAiEngineBuilder {
            url: url.to_string(),
            timeout: Duration::from_secs(600),
            retry: RetryPolicy::default(),
            api_key: None,
            ca_certs: Vec::new(),
            rate: RateLimit::default(),
            model: None,
            discover_model: false,
        }
    }

    /// Sets the model filled into requests that name none.
    pub fn with_model(mut self, model: Option<String>) -> OpenAiEngine {
        if model.is_some() {
            self.discovered = None;
        }
        self.model = model;
        self
    }

    /// Counts retries and rate-limit waits in `metrics` under engine `name`.
    pub fn with_metrics(mut self, metrics: Arc<WorkerMetrics>, name: &str) -> OpenAiEngine {
        self.metrics = Some((metrics, name.to_string()));
        self
    }

    /// The engine's API base URL (`.../v1`).
    pub fn api_base(&self) -> &str {
        &self.api_base
    }

    /// The model filled into requests that name none, when set (or
    /// discovered already).
    pub fn model(&self) -> Option<&str> {
        self.model
            .as_deref()
            .or_else(|| self.discovered.as_ref()?.get().map(String::as_str))
    }

    /// Asks `/models` for the first model the engine serves.
    pub async fn discover_model(&self) -> Option<String> {
        let v: serde_json::Value = self
            .http
            .get(format!("{}/models", self.api_base))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        v["data"][0]["id"].as_str().map(String::from)
    }

    /// The model for requests that name none: the one set, or the one
    /// discovered (asked again at the next request while discovery fails).
    async fn default_model(&self) -> Option<String> {
        match &self.discovered {
            Some(cell) => cell
                .get_or_try_init(|| async { self.discover_model().await.ok_or(()) })
                .await
                .ok()
                .cloned(),
            None => self.model.clone(),
        }
    }

    /// One HTTP exchange: the answer, or why there was none.
    async fn exchange(&self, url: &str, body: &serde_json::Value) -> Result<Answer, String> {
        let resp = self
            .http
            .post(url)
            .json(body)
            .send()
            .await
            // `{e}` names the URL; no header is part of it.
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let retry_after = retry_after(resp.headers());
        let text = resp
            .text()
            .await
            .map_err(|e| format!("{url}: reading the answer: {e}"))?;
        Ok(Answer {
            status,
            retry_after,
            text,
        })
    }

    /// Posts `body` to `url` until an answer that is not to be retried (a
    /// success, or a 4xx other than 408 and 429), within the rate limits and
    /// the retry policy. A request that costs `cost` tokens by estimate.
    async fn post_with_retries(
        &self,
        url: &str,
        body: &serde_json::Value,
        cost: u64,
    ) -> Result<Answer, Exhausted> {
        let mut attempt = 0;
        loop {
            if let Some(rate) = &self.rate {
                let waited = rate.acquire(cost).await;
                if let Some((metrics, name)) = &self.metrics {
                    metrics.rate_limit_wait(name, waited);
                }
            }
            let (cause, why, last) = match self.exchange(url, body).await {
                Ok(answer) => match RetryCause::of(answer.status) {
                    None => return Ok(answer),
                    Some(cause) => (
                        cause,
                        format!(
                            "{url} answered {}: {}",
                            answer.status,
                            snippet(&answer.text)
                        ),
                        Some(answer),
                    ),
                },
                Err(why) => (RetryCause::Connection, why, None),
            };
            if attempt >= self.retry.retries {
                return Err(Exhausted {
                    why: format!("{why} (after {} attempts)", attempt + 1),
                    last,
                });
            }
            let wait = self.wait_before_retry(attempt, last.as_ref().and_then(|a| a.retry_after));
            tracing::debug!(%why, attempt, wait_ms = wait.as_millis() as u64, "engine request failed; retrying");
            if let Some((metrics, name)) = &self.metrics {
                metrics.engine_retry(name, cause.label());
            }
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// Gives the tokens estimated at `cost` back, less what `usage` says the
    /// request took.
    fn settle(&self, cost: u64, usage: Option<Usage>) {
        if let (Some(rate), Some(usage)) = (&self.rate, usage) {
            rate.settle(cost, usage.prompt_tokens + usage.completion_tokens);
        }
    }

    /// The wait before retry number `attempt` (0-based): exponential backoff,
    /// or what the engine asked for when that is longer (up to its cap).
    fn wait_before_retry(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let backoff = self
            .retry
            .initial_backoff
            .saturating_mul(1 << attempt.min(16))
            .min(self.retry.max_backoff);
        match retry_after {
            Some(asked) => backoff.max(asked.min(self.retry.max_retry_after)),
            None => backoff,
        }
    }
}

/// Why an attempt is retried, as the metrics label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RetryCause {
    /// No answer: connection refused or reset, timeout.
    Connection,
    /// 429 Too Many Requests.
    RateLimited,
    /// 408, or a 5xx answer.
    ServerError,
}

impl RetryCause {
    fn of(status: StatusCode) -> Option<RetryCause> {
        if status == StatusCode::TOO_MANY_REQUESTS {
            Some(RetryCause::RateLimited)
        } else if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT {
            Some(RetryCause::ServerError)
        } else {
            None
        }
    }

    fn label(self) -> &'static str {
        match self {
            RetryCause::Connection => "connection",
            RetryCause::RateLimited => "rate_limited",
            RetryCause::ServerError => "server_error",
        }
    }
}

/// An HTTP answer of the engine.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    retry_after: Option<Duration>,
    text: String,
}

/// Retries ran out: why, and the last answer when there was one.
#[derive(Debug)]
struct Exhausted {
    why: String,
    last: Option<Answer>,
}

/// The wait an answer asks for: `retry-after-ms` (OpenAI, Azure), or
/// `Retry-After` in seconds. An HTTP date is not honoured (backoff applies).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| -> Option<f64> {
        let v: f64 = headers.get(name)?.to_str().ok()?.trim().parse().ok()?;
        (v.is_finite() && v >= 0.0).then_some(v)
    };
    number("retry-after-ms")
        .map(|ms| Duration::from_secs_f64(ms / 1000.0))
        .or_else(|| number("retry-after").map(Duration::from_secs_f64))
}

fn snippet(text: &str) -> String {
    text.chars().take(500).collect()
}

impl Engine for OpenAiEngine {
    fn send(&self, mut request: Request) -> BoxFuture<'_, Result<Response, RequestError>> {
        Box::pin(async move {
            if request.model.is_none() {
                request.model = self.default_model().await;
            }
            let url = format!("{}{}", self.api_base, request.endpoint());
            let cost = estimated_tokens(&request);
            let answer = self
                .post_with_retries(&url, &request.to_json(), cost)
                .await
                .map_err(|e| RequestError::Unavailable(e.why))?;
            if !answer.status.is_success() {
                let message = serde_json::from_str::<serde_json::Value>(&answer.text)
                    .ok()
                    .and_then(|v| {
                        v["error"]["message"]
                            .as_str()
                            .or_else(|| v["message"].as_str())
                            .map(String::from)
                    })
                    .unwrap_or_else(|| snippet(&answer.text));
                return Err(RequestError::Rejected {
                    status: answer.status.as_u16(),
                    message,
                });
            }
            let response = serde_json::from_str::<serde_json::Value>(&answer.text)
                .map_err(|e| e.to_string())
                .and_then(Response::from_openai)
                .map_err(|e| RequestError::Malformed(format!("{url}: {e}")))?;
            self.settle(cost, response.usage);
            Ok(response)
        })
    }

    fn model_name(&self) -> Option<String> {
        self.model().map(String::from)
    }

    fn resolve_model(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(self.default_model())
    }

    fn post(&self, request: RawRequest) -> BoxFuture<'_, Result<RawResponse, RequestError>> {
        Box::pin(async move {
            let mut body = request.body;
            if !request.keep_model {
                if let (serde_json::Value::Object(fields), Some(model)) =
                    (&mut body, self.default_model().await)
                {
                    fields.insert("model".into(), model.into());
                }
            }
            let url = format!("{}{}", self.api_base, request.path);
            let cost = raw_estimated_tokens(&body);
            let answer = match self.post_with_retries(&url, &body, cost).await {
                Ok(answer) => answer,
                // The engine's last answer after the retries is the answer.
                Err(Exhausted {
                    last: Some(answer), ..
                }) => answer,
                Err(Exhausted { why, last: None }) => return Err(RequestError::Unavailable(why)),
            };
            let body: serde_json::Value = serde_json::from_str(&answer.text)
                .unwrap_or(serde_json::Value::String(answer.text));
            self.settle(cost, serde_json::from_value(body["usage"].clone()).ok());
            Ok(RawResponse {
                status: answer.status.as_u16(),
                body,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_base_adds_v1_only_to_a_bare_host() {
        let base = |u: &str| api_base(u).unwrap();
        assert_eq!(base("http://127.0.0.1:8000"), "http://127.0.0.1:8000/v1");
        assert_eq!(base("http://node7:8000/"), "http://node7:8000/v1");
        assert_eq!(base("http://node7:8000/v1/"), "http://node7:8000/v1");
        assert_eq!(
            base("https://api.example.com/openai/v1"),
            "https://api.example.com/openai/v1"
        );
        assert_eq!(
            base("https://example.com/v1beta/openai"),
            "https://example.com/v1beta/openai"
        );
        for bad in ["node7:8000", "ftp://x", "http://", "http:///v1", ""] {
            assert!(api_base(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn retry_after_reads_milliseconds_first_then_seconds() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", HeaderValue::from_static("1500"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        let mut date = HeaderMap::new();
        date.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&date), None);
    }

    #[test]
    fn waits_grow_and_honour_retry_after_up_to_its_cap() {
        let e = OpenAiEngine::new(
            "http://127.0.0.1:1",
            Duration::from_secs(1),
            RetryPolicy::default(),
        );
        assert_eq!(e.wait_before_retry(0, None), Duration::from_millis(250));
        assert_eq!(e.wait_before_retry(2, None), Duration::from_secs(1));
        assert_eq!(e.wait_before_retry(30, None), Duration::from_secs(8));
        // An answer asking for more than the backoff gets it, up to the cap.
        let asked = Some(Duration::from_secs(3));
        assert_eq!(e.wait_before_retry(0, asked), Duration::from_secs(3));
        let asked = Some(Duration::from_secs(3600));
        assert_eq!(e.wait_before_retry(0, asked), Duration::from_secs(120));
        // Asking for less than the backoff does not shorten it.
        let asked = Some(Duration::from_millis(1));
        assert_eq!(e.wait_before_retry(3, asked), Duration::from_secs(2));
    }

    #[test]
    fn the_api_key_is_not_in_debug_output() {
        let key = ApiKey::new("sk-secret-123").unwrap();
        assert!(!format!("{key:?}").contains("secret"));
        let engine = OpenAiEngine::builder("https://api.example.com/v1")
            .api_key(Some(key))
            .build()
            .unwrap();
        assert!(!format!("{engine:?}").contains("secret"));
        assert!(ApiKey::new("  ").is_none());
        let bad = OpenAiEngine::builder("http://x:1").api_key(ApiKey::new("a\nb"));
        assert!(matches!(bad.build(), Err(EngineSetupError::BadApiKey)));
    }
}
