//! A client of the dispatcher server's work protocol, as workers use it.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::protocol::{
    HeartbeatRequest, HeartbeatResponse, Hello, JournalRecord, JournalRequest, JournalResponse,
    MessageResponse, ReleaseReason, ReleaseRequest, ReleaseResponse, ResultsRequest,
    ResultsResponse, StatusResponse, TokenCounts, WorkItem, WorkResponse, WorkTimeoutRequest,
};

/// Why a call to the server failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server could not be reached (refused, reset, timed out).
    #[error(
        "could not reach the dispatcher server at {url}: {}",
        root_cause(error)
    )]
    Unavailable {
        /// The URL of the call, naming the server and endpoint.
        url: String,
        /// Why it could not be reached (refused, reset, timed out). Not a
        /// `source`: the message says its root cause once, where the chain
        /// of reqwest's errors would repeat the URL three times.
        error: reqwest::Error,
    },
    /// The server refused the access token (or its absence).
    #[error("the dispatcher server at {url} refused the token ({status}): pass the server's --token (or set DISPATCHER_TOKEN)")]
    Unauthorized {
        /// The URL of the call, naming the server and endpoint.
        url: String,
        /// 401 or 403.
        status: reqwest::StatusCode,
    },
    /// The server answered with an error status.
    #[error("the dispatcher server answered {status} to {url}: {body}")]
    Status {
        /// The URL of the call, naming the server and endpoint.
        url: String,
        /// The HTTP status it answered with.
        status: reqwest::StatusCode,
        /// The answer's body.
        body: String,
    },
    /// The answer was not the JSON the protocol promises.
    #[error(
        "the dispatcher server's answer to {url} is not valid: {}",
        root_cause(error)
    )]
    Decode {
        /// The URL of the call, naming the server and endpoint.
        url: String,
        /// The decoding error (its root cause is in the message).
        error: reqwest::Error,
    },
}

impl ClientError {
    /// Whether the server could not be reached at all.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, ClientError::Unavailable { .. })
    }
}

/// The innermost cause of an error ("Connection refused (os error 111)"):
/// reqwest's own message repeats the URL the caller names already.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// Checks a server address given as `HOST:PORT` (an IPv6 host in brackets)
/// or as an `http://`/`https://` URL, so that a typo is an error naming the
/// flag rather than a connection to port 80.
pub fn check_addr(addr: &str) -> Result<String, String> {
    let addr = addr.trim();
    if addr.starts_with("http://") || addr.starts_with("https://") {
        return match reqwest::Url::parse(addr) {
            Ok(url) if url.host_str().is_some_and(|h| !h.is_empty()) => Ok(addr.to_string()),
            _ => Err(format!("{addr:?} is not a URL with a host")),
        };
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(format!("{addr:?} is not HOST:PORT (no port)"));
    };
    if host.is_empty() || host.contains('/') {
        return Err(format!("{addr:?} is not HOST:PORT (no host)"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(addr.to_string()),
        _ => Err(format!(
            "{addr:?} is not HOST:PORT: the port must be a number from 1 to 65535, not {port:?}"
        )),
    }
}

/// Clients made by this process, to tell them apart in worker ids.
static WORKERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Talks to one dispatcher server.
#[derive(Debug, Clone)]
pub struct DispatcherClient {
    /// `http://host:port`, without a trailing slash.
    base: String,
    /// Sent with work requests, so the server never hands this worker a backup
    /// of an item it holds itself (an extension the Python server ignores).
    worker_id: String,
    http: reqwest::Client,
    /// Its engine's prefix cache counters, sent with heartbeats.
    prefix_cache: Option<std::sync::Arc<crate::engine::cache::PrefixCacheMeter>>,
    /// Engine tokens to report with results and heartbeats.
    usage: Option<std::sync::Arc<crate::metrics::usage::UsageMeter>>,
}

impl DispatcherClient {
    /// A client of the server at `addr`: `HOST:PORT` or an `http://` URL.
    pub fn new(addr: &str) -> DispatcherClient {
        DispatcherClient::with_token(addr, None)
    }

    /// A client that sends `token` (the server's `--token`) with every request.
    pub fn with_token(addr: &str, token: Option<&str>) -> DispatcherClient {
        let base = if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.trim_end_matches('/').to_string()
        } else {
            format!("http://{addr}")
        };
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(value) =
            token.and_then(|t| reqwest::header::HeaderValue::from_str(&format!("Bearer {t}")).ok())
        {
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .pool_max_idle_per_host(64)
            .build()
            .expect("a plain HTTP client builds");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let worker_id = format!(
            "{}-{}-{nanos}",
            std::process::id(),
            WORKERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        DispatcherClient {
            base,
            http,
            worker_id,
            prefix_cache: None,
            usage: None,
        }
    }

    /// The same client, sending `meter`'s counters with its heartbeats.
    pub fn with_prefix_cache(
        self,
        meter: std::sync::Arc<crate::engine::cache::PrefixCacheMeter>,
    ) -> DispatcherClient {
        DispatcherClient {
            prefix_cache: Some(meter),
            ..self
        }
    }

    /// The same client, reporting the tokens `meter` counts with its
    /// results and heartbeats.
    pub fn with_usage(
        self,
        meter: std::sync::Arc<crate::metrics::usage::UsageMeter>,
    ) -> DispatcherClient {
        DispatcherClient {
            usage: Some(meter),
            ..self
        }
    }

    /// Runs `call` with the tokens not reported yet; puts them back unless
    /// the server read them: it did when it answered 200 (however the answer
    /// reads) or 422 (results without a work id are refused after the rest
    /// was taken); a request without an answer, or refused whole, is sent
    /// again with the next.
    async fn reporting_usage<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: FnOnce(Option<TokenCounts>) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let usage = self.usage.as_ref().and_then(|m| m.take());
        let answer = call(usage).await;
        let read = match &answer {
            Ok(_) | Err(ClientError::Decode { .. }) => true,
            Err(ClientError::Status { status, .. }) => {
                *status == reqwest::StatusCode::UNPROCESSABLE_ENTITY
            }
            Err(_) => false,
        };
        if let (false, Some(meter), Some(usage)) = (read, &self.usage, usage) {
            meter.put_back(usage);
        }
        answer
    }

    /// The server's base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The `worker` this client names itself with.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// `POST /journal` (extension): entries of lines this worker works on,
    /// and what its journals saved since the last call.
    pub async fn journal(
        &self,
        entries: Vec<JournalRecord>,
        replayed: u64,
        tokens_saved: u64,
    ) -> Result<JournalResponse, ClientError> {
        self.post(
            "journal",
            &JournalRequest {
                worker: Some(self.worker_id.clone()),
                entries,
                replayed,
                tokens_saved,
            },
        )
        .await
    }

    /// `POST /hello` (extension): says who this worker is; `hello.worker` is
    /// set to this client's id. A server without the endpoint answers 404.
    pub async fn hello(&self, mut hello: Hello) -> Result<MessageResponse, ClientError> {
        hello.worker.clone_from(&self.worker_id);
        self.post("hello", &hello).await
    }

    /// `GET /work?batch_size=N`. An unreachable server is
    /// [`ClientError::Unavailable`] (see [`ClientError::is_unavailable`]).
    pub async fn get_work(&self, batch_size: usize) -> Result<WorkResponse, ClientError> {
        let url = format!(
            "{}/work?batch_size={batch_size}&worker={}",
            self.base, self.worker_id
        );
        self.send(self.http.get(&url), &url).await
    }

    /// `POST /results`.
    pub async fn submit(&self, items: Vec<WorkItem>) -> Result<ResultsResponse, ClientError> {
        self.reporting_usage(|usage| async move {
            self.post(
                "results",
                &ResultsRequest {
                    items,
                    worker: Some(self.worker_id.clone()),
                    usage,
                },
            )
            .await
        })
        .await
    }

    /// `POST /release`: returns how many items went back to the queue.
    pub async fn release(&self, work_ids: Vec<u64>) -> Result<u64, ClientError> {
        self.release_for(work_ids, None).await
    }

    /// `POST /release` with a reason (an extension older servers ignore).
    pub async fn release_for(
        &self,
        work_ids: Vec<u64>,
        reason: Option<ReleaseReason>,
    ) -> Result<u64, ClientError> {
        let r: ReleaseResponse = self
            .post(
                "release",
                &ReleaseRequest {
                    work_ids,
                    reason,
                    worker: Some(self.worker_id.clone()),
                },
            )
            .await?;
        Ok(r.released_count)
    }

    /// `POST /heartbeat` (extension): extends the leases of `work_ids`.
    pub async fn heartbeat(&self, work_ids: Vec<u64>) -> Result<HeartbeatResponse, ClientError> {
        self.reporting_usage(|usage| async move {
            self.post(
                "heartbeat",
                &HeartbeatRequest {
                    work_ids,
                    worker: Some(self.worker_id.clone()),
                    prefix_cache: self.prefix_cache.as_ref().and_then(|m| m.get()),
                    usage,
                },
            )
            .await
        })
        .await
    }

    /// `GET /status`.
    pub async fn status(&self) -> Result<StatusResponse, ClientError> {
        let url = format!("{}/status", self.base);
        self.send(self.http.get(&url), &url).await
    }

    /// `POST /work_timeout`.
    pub async fn set_work_timeout(&self, secs: f64) -> Result<MessageResponse, ClientError> {
        self.post("work_timeout", &WorkTimeoutRequest { timeout: secs })
            .await
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let url = format!("{}/{path}", self.base);
        self.send(self.http.post(&url).json(body), &url).await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<T, ClientError> {
        let resp = req.send().await.map_err(|error| ClientError::Unavailable {
            url: url.to_string(),
            error,
        })?;
        let status = resp.status();
        if matches!(
            status,
            reqwest::StatusCode::UNAUTHORIZED | reqwest::StatusCode::FORBIDDEN
        ) {
            return Err(ClientError::Unauthorized {
                url: url.to_string(),
                status,
            });
        }
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(ClientError::Status {
                url: url.to_string(),
                status,
                body,
            });
        }
        resp.json().await.map_err(|error| ClientError::Decode {
            url: url.to_string(),
            error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_without_a_port_or_a_host_are_refused() {
        for good in [
            "127.0.0.1:8000",
            "head-node:80",
            "[::1]:8000",
            "http://h:1/",
            "https://h",
        ] {
            assert!(check_addr(good).is_ok(), "{good}");
        }
        for bad in [
            "127.0.0.1:",
            "127.0.0.1",
            ":8000",
            "h:0",
            "h:99999",
            "h:x",
            "http://",
        ] {
            let e = check_addr(bad).unwrap_err();
            assert!(e.contains(bad.trim()), "{bad}: {e}");
        }
    }
}
