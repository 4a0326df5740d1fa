//! `dispatcher serve`: the HTTP layer over the [`Ledger`], its ticker and
//! checkpointer, and how the server stops (all work complete, a signal, or an
//! I/O failure).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::checkpoint::ResumeError;
use crate::ledger::{check_results, Cause, Ledger, LedgerConfig};
use crate::metrics::ServerMetrics;
use crate::protocol::{
    ErrorResponse, HeartbeatRequest, HeartbeatResponse, MessageResponse, ReleaseRequest,
    ReleaseResponse, ResultsResponse, SubmittedResults, WorkResponse, WorkTimeoutRequest,
};

/// How the server runs, beyond the job itself.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Seconds between checkpoints.
    pub checkpoint_interval: Duration,
    /// How long to keep answering `all_work_complete` before exiting.
    pub exit_grace: Duration,
    /// Largest `batch_size` a work request may ask for.
    pub max_batch_size: usize,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// A shared secret every endpoint but `/health` requires as
    /// `Authorization: Bearer <token>`; `None` (the default) requires nothing, as
    /// the Python server did.
    pub token: Option<String>,
    /// Log the peer and the first bytes of every request answered with a 4xx.
    pub log_invalid_http: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            checkpoint_interval: Duration::from_secs(30),
            exit_grace: Duration::from_secs(5),
            max_batch_size: 10_000,
            max_body_bytes: 64 << 20,
            token: None,
            log_invalid_http: false,
        }
    }
}

/// Why the server stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// Every line has its output line, and the grace period is over.
    Complete,
    /// The caller's shutdown future resolved (SIGTERM, SIGINT).
    Shutdown,
}

/// Why the server could not run or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The job's files could not be resumed from.
    #[error(transparent)]
    Resume(#[from] ResumeError),
    /// A file could not be read or written while serving (the message names it);
    /// the output is intact up to the last line written.
    #[error("stopped after an I/O failure: {0}")]
    Io(String),
    /// The listening socket failed.
    #[error("could not listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// The error.
        source: std::io::Error,
    },
}

/// State shared by the handlers and background tasks.
#[derive(Debug)]
pub struct AppState {
    /// The job. Locked briefly by each request, never across an `.await`. (An
    /// async mutex measured slower at small batches and no faster at large ones:
    /// the lock is not where the time goes; see BENCHMARKS.md.)
    ledger: std::sync::Mutex<Ledger>,
    /// Set, under the ledger's lock, by the first failure: no request touches
    /// the ledger after it. (`failure` carries the message to whoever waits.)
    stopped: AtomicBool,
    /// Limits from [`ServeOptions`].
    max_batch_size: usize,
    /// The first fatal I/O error. Once set, every request gets 503 and the server
    /// stops; it is never cleared.
    failure: watch::Sender<Option<String>>,
    /// Becomes true once every line has its output line.
    complete: watch::Sender<bool>,
    /// The access token, if one is required.
    token: Option<String>,
    /// Prometheus metrics, rendered by `GET /metrics`.
    metrics: ServerMetrics,
    /// Log the peer and first bytes of requests answered with a 4xx.
    log_invalid_http: bool,
    /// Held while a checkpoint is taken and written, so that checkpoints are
    /// written one at a time, in the order their state was taken. Taken before
    /// the ledger's lock, never while holding it.
    checkpointing: std::sync::Mutex<()>,
}

impl AppState {
    /// Wraps an opened ledger.
    pub fn new(ledger: Ledger, options: &ServeOptions) -> Arc<AppState> {
        let complete = ledger.is_complete();
        Arc::new(AppState {
            ledger: std::sync::Mutex::new(ledger),
            stopped: AtomicBool::new(false),
            max_batch_size: options.max_batch_size,
            failure: watch::channel(None).0,
            complete: watch::channel(complete).0,
            token: options.token.clone(),
            metrics: ServerMetrics::default(),
            log_invalid_http: options.log_invalid_http,
            checkpointing: std::sync::Mutex::new(()),
        })
    }

    /// Writes a checkpoint. Its state is taken under the ledger's lock; the
    /// fsyncs that make it durable run on a blocking thread without the lock,
    /// so requests are served meanwhile (on a shared file system an fsync of
    /// 30 s of output can take seconds). A failure stops the server.
    async fn checkpoint(self: &Arc<Self>) -> Result<(), ApiError> {
        let state = Arc::clone(self);
        match tokio::task::spawn_blocking(move || state.checkpoint_blocking()).await {
            Ok(outcome) => outcome,
            Err(_) => {
                self.fail_locked("a bug: writing the checkpoint panicked; stopping".into());
                Err(ApiError::Stopped)
            }
        }
    }

    fn checkpoint_blocking(&self) -> Result<(), ApiError> {
        let _one_at_a_time = self.checkpointing.lock().unwrap_or_else(|e| e.into_inner());
        let pending = self.with_ledger(|l| l.begin_checkpoint())?;
        pending.commit().map_err(|e| {
            self.fail_locked(e.to_string());
            ApiError::Stopped
        })
    }

    /// [`fail`](Self::fail) from outside the ledger's lock: takes it, so that
    /// the stopped flag is set under it as requests expect.
    fn fail_locked(&self, message: String) {
        let _ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        self.fail(message);
    }

    /// Runs `f` on the ledger under its (std) lock; an I/O error stops the
    /// server. Synchronous, so the lock can never be held across an `.await`.
    fn with_ledger<T>(
        &self,
        f: impl FnOnce(&mut Ledger) -> std::io::Result<T>,
    ) -> Result<T, ApiError> {
        // A panic inside `f` is caught below, so the lock is never poisoned by
        // one; the stopped flag keeps everyone out of the ledger instead.
        let mut ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        // Checked under the lock: whoever failed set it before unlocking, so
        // nothing runs on a ledger whose output may be missing a write.
        if self.stopped.load(Ordering::Acquire) {
            return Err(ApiError::Stopped);
        }
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut ledger)));
        match outcome {
            Ok(Ok(v)) => {
                if ledger.is_complete() {
                    self.complete
                        .send_if_modified(|c| !std::mem::replace(c, true));
                }
                Ok(v)
            }
            Ok(Err(e)) => {
                self.fail(e.to_string());
                Err(ApiError::Stopped)
            }
            Err(_) => {
                self.fail(
                    "a bug: the ledger panicked; stopping rather than risk a misaligned output"
                        .into(),
                );
                Err(ApiError::Stopped)
            }
        }
    }

    /// Stops the server after a failure. Called with the ledger's lock held
    /// (see [`with_ledger`](Self::with_ledger) and [`fail_locked`](Self::fail_locked)),
    /// so that no request runs on the ledger after it.
    fn fail(&self, message: String) {
        self.stopped.store(true, Ordering::Release);
        tracing::error!("{message}");
        self.failure.send_if_modified(|f| {
            if f.is_none() {
                *f = Some(message);
                true
            } else {
                false
            }
        });
    }
}

/// The router of all endpoints over `state`.
///
/// Middleware costs a few microseconds per request, so layers are added only
/// when their option is on (the token check, `--log-invalid-http`); latencies
/// are recorded in the handlers themselves.
pub fn app(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    let mut router = Router::new()
        .route("/work", get(get_work))
        .route("/results", post(post_results))
        .route("/release", post(post_release))
        .route("/status", get(get_status))
        .route("/work_timeout", post(post_work_timeout))
        .route("/metrics", get(get_metrics))
        .route("/heartbeat", post(post_heartbeat));
    if state.token.is_some() {
        router = router.route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ));
    }
    router = router.route(
        "/health",
        get(|State(state): State<Arc<AppState>>| async move {
            let _t = state.metrics.time(HEALTH);
            Json(serde_json::json!({"status": "OK"}))
        }),
    );
    if state.log_invalid_http {
        router = router.layer(axum::middleware::from_fn(log_invalid));
    }
    router
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// Indices into [`crate::metrics::ENDPOINTS`].
const WORK: usize = 0;
const RESULTS: usize = 1;
const RELEASE: usize = 2;
const STATUS: usize = 3;
const WORK_TIMEOUT: usize = 4;
const METRICS: usize = 5;
const HEARTBEAT: usize = 6;
const HEALTH: usize = 7;

/// With `--log-invalid-http`: logs the peer and first bytes of requests
/// answered with a 4xx.
async fn log_invalid(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map_or_else(|| "?".to_string(), |c| c.0.to_string());
    let (parts, body) = request.into_parts();
    let method = parts.method.clone();
    let uri = parts.uri.clone();
    // Buffer the body (the body limit still applies) to log its start.
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let head = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
    let response = next
        .run(axum::extract::Request::from_parts(
            parts,
            axum::body::Body::from(bytes),
        ))
        .await;
    if response.status().is_client_error() {
        tracing::warn!(%peer, %method, %uri, status = response.status().as_u16(), first_bytes = %head, "invalid request");
    }
    response
}

/// Refuses requests without the access token (when one is set) with a 401 that
/// changes nothing.
async fn require_token(
    State(state): State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(token) = &state.token {
        let given = request
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| same_secret(g.as_bytes(), token.as_bytes())) {
            return (
                StatusCode::UNAUTHORIZED,
                Json(ErrorResponse {
                    status: "error".into(),
                    error: "this server requires its access token: pass --token or set DISPATCHER_TOKEN".into(),
                    work_ids: Vec::new(),
                    count: None,
                }),
            )
                .into_response();
        }
    }
    next.run(request).await
}

/// Compares secrets in time independent of where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Opens the job and serves it on `listener` until it is complete, `shutdown`
/// resolves, or an I/O failure stops it. Writes a final checkpoint either way
/// it ends well.
pub async fn serve(
    listener: TcpListener,
    config: LedgerConfig,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<StopReason, ServerError> {
    let opening = Instant::now();
    let ledger = Ledger::open(config, opening)?;
    tracing::info!(took_ms = opening.elapsed().as_millis(), "job files opened");
    let state = AppState::new(ledger, &options);
    serve_state(listener, state, options, shutdown).await
}

/// [`serve`] over an already opened state.
pub async fn serve_state(
    listener: TcpListener,
    state: Arc<AppState>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<StopReason, ServerError> {
    let addr = listener
        .local_addr()
        .map_or_else(|_| "?".into(), |a| a.to_string());
    {
        let ledger = state.ledger.lock().unwrap_or_else(|e| e.into_inner());
        let s = ledger.status(Instant::now());
        tracing::info!(
            %addr,
            input = %ledger.config().infile.display(),
            output = %ledger.config().outfile.display(),
            resumed_at_line = s.lines_done,
            recovered_past_checkpoint = ledger.recovered_past_checkpoint(),
            "serving"
        );
    }
    let (stop_tx, mut stop_rx) = watch::channel(None::<StopReason>);
    let stop_tx = Arc::new(stop_tx);
    let stop = {
        let stop_tx = stop_tx.clone();
        move |reason| {
            stop_tx.send_if_modified(|r| r.is_none() && r.replace(reason).is_none());
        }
    };

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(ticker(state.clone()));
    tasks.spawn(checkpointer(state.clone(), options.checkpoint_interval));
    {
        let (state, stop) = (state.clone(), stop.clone());
        let grace = options.exit_grace;
        tasks.spawn(async move {
            let mut complete = state.complete.subscribe();
            if complete.wait_for(|c| *c).await.is_ok() {
                if let Err(e) = state.checkpoint().await {
                    tracing::debug!(?e, "final checkpoint failed");
                }
                tracing::info!(
                    grace_secs = grace.as_secs_f64(),
                    "all work complete; exiting after the grace period"
                );
                tokio::time::sleep(grace).await;
                stop(StopReason::Complete);
            }
        });
    }
    {
        let stop = stop.clone();
        tasks.spawn(async move {
            shutdown.await;
            stop(StopReason::Shutdown);
        });
    }
    let mut failure = state.failure.subscribe();
    let router = app(state.clone(), options.max_body_bytes);
    let graceful = async move {
        tokio::select! {
            _ = stop_rx.wait_for(|r| r.is_some()) => {}
            _ = failure.wait_for(|f| f.is_some()) => {}
        }
    };
    let served = axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(graceful)
    .await
    .map_err(|source| ServerError::Listen {
        addr: addr.clone(),
        source,
    });
    tasks.shutdown().await;
    served?;

    if let Some(message) = state.failure.borrow().clone() {
        return Err(ServerError::Io(message));
    }
    state
        .checkpoint()
        .await
        .map_err(|_| ServerError::Io(state.failure.borrow().clone().unwrap_or_default()))?;
    let reason = stop_tx.borrow().clone().unwrap_or(StopReason::Shutdown);
    tracing::info!(?reason, "stopped; checkpoint written");
    Ok(reason)
}

/// Expires items once a second, so tombstones and completion do not wait for a
/// work request.
async fn ticker(state: Arc<AppState>) {
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        if state.with_ledger(|l| l.tick(Instant::now())).is_err() {
            return;
        }
    }
}

/// Checkpoints every `every`, and at once when the ledger recovered output
/// lines past the last checkpoint (after a crash), so that another crash does
/// not count them again.
async fn checkpointer(state: Arc<AppState>, every: Duration) {
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let recovered = state
        .with_ledger(|l| Ok(l.recovered_past_checkpoint()))
        .unwrap_or(0);
    if recovered == 0 {
        interval.tick().await;
    }
    loop {
        interval.tick().await;
        if state.checkpoint().await.is_err() {
            return;
        }
    }
}

/// The one error type of the HTTP layer.
#[derive(Debug)]
enum ApiError {
    /// The request is malformed or asks for something absurd.
    BadRequest(String),
    /// Some results were refused (others may have been accepted).
    Refused {
        error: String,
        work_ids: Vec<u64>,
        count: u64,
    },
    /// The server stopped after a failure; nothing was changed.
    Stopped,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (code, body) = match self {
            ApiError::BadRequest(error) => (
                StatusCode::BAD_REQUEST,
                ErrorResponse {
                    status: "error".into(),
                    error,
                    work_ids: Vec::new(),
                    count: None,
                },
            ),
            ApiError::Refused {
                error,
                work_ids,
                count,
            } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorResponse {
                    status: "error".into(),
                    error,
                    work_ids,
                    count: Some(count),
                },
            ),
            // The cause is in the server's log; it names paths a client has no
            // business seeing.
            ApiError::Stopped => (
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorResponse {
                    status: "error".into(),
                    error: "the server is stopping after an internal failure; see its log".into(),
                    work_ids: Vec::new(),
                    count: None,
                },
            ),
        };
        (code, Json(body)).into_response()
    }
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes, shape: &str) -> Result<T, ApiError> {
    // The content type is not checked: scripts that post JSON without it worked
    // with the Python server.
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("the body must be {shape}: {e}")))
}

#[derive(Debug, Deserialize)]
struct WorkQuery {
    batch_size: Option<String>,
    /// Extension: who asks, so it never gets a backup of its own item.
    worker: Option<String>,
}

async fn get_work(
    State(state): State<Arc<AppState>>,
    query: Result<Query<WorkQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let _t = state.metrics.time(WORK);
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let batch = match query.batch_size.as_deref() {
        None => 1,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=state.max_batch_size).contains(&n) => n,
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "batch_size must be a whole number from 1 to {} (the server's --max-batch-size), not {s:?}",
                    state.max_batch_size
                )))
            }
        },
    };
    let worker = query.worker.as_deref().map(|w| {
        use std::hash::{Hash, Hasher};
        let mut h = rustc_hash::FxHasher::default();
        w.hash(&mut h);
        h.finish()
    });
    let (reply, lease) = state.with_ledger(|l| {
        Ok((
            l.take_work_for(batch, Instant::now(), worker)?,
            l.config().work_timeout,
        ))
    })?;
    // Sized up front: a batch of prompts is tens of kilobytes, which axum's
    // `Json` would reach by doubling a 128-byte buffer, copying at each step.
    let capacity = 96
        + reply
            .items
            .iter()
            .map(|i| 96 + i.content.len() + i.content.len() / 8)
            .sum::<usize>();
    let mut body = Vec::with_capacity(capacity);
    let response = WorkResponse {
        status: reply.status,
        retry_in: reply.retry_in,
        items: reply.items,
        lease_secs: Some(lease.as_secs_f64()),
    };
    serde_json::to_writer(&mut body, &response).expect("a work response serializes");
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}

async fn post_results(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Json<ResultsResponse>, ApiError> {
    let _t = state.metrics.time(RESULTS);
    let req: SubmittedResults = parse_body(
        &body,
        r#"{"items": [work items with "work_id" and "result"]}"#,
    )?;
    // Parsing every result is the costliest per-item step: done here, outside
    // the ledger's lock, on whichever core is free.
    let (valid, refused) = check_results(req.items.into_iter().map(|r| (r.work_id, r.result)));
    let reply = state.with_ledger(|l| l.complete_valid(valid))?;
    if !refused.is_empty() {
        let (work_ids, reasons): (Vec<u64>, Vec<String>) = refused.into_iter().unzip();
        let first = format!("work_id {}: {}", work_ids[0], reasons[0]);
        return Err(ApiError::Refused {
            error: format!(
                "{} result(s) refused and left in flight (first: {first}); {} accepted",
                work_ids.len(),
                reply.accepted
            ),
            work_ids,
            count: reply.accepted,
        });
    }
    Ok(Json(ResultsResponse {
        status: "OK".into(),
        count: reply.accepted,
        ignored: reply.ignored,
        already_done: reply.already_done,
    }))
}

async fn post_release(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Json<ReleaseResponse>, ApiError> {
    let _t = state.metrics.time(RELEASE);
    let req: ReleaseRequest = parse_body(&body, r#"{"work_ids": [integers]}"#)?;
    let cause = Cause::of_release(req.reason);
    let released = state.with_ledger(|l| l.release(&req.work_ids, cause))?;
    Ok(Json(ReleaseResponse {
        status: "OK".into(),
        released_count: released,
    }))
}

async fn post_heartbeat(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    let _t = state.metrics.time(HEARTBEAT);
    let req: HeartbeatRequest = parse_body(&body, r#"{"work_ids": [integers]}"#)?;
    let (extended, done, lease) = state.with_ledger(|l| {
        let (extended, done) = l.heartbeat(&req.work_ids, Instant::now());
        Ok((extended, done, l.config().work_timeout))
    })?;
    Ok(Json(HeartbeatResponse {
        status: "OK".into(),
        extended,
        done,
        lease_secs: lease.as_secs_f64(),
    }))
}

async fn get_metrics(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let _t = state.metrics.time(METRICS);
    let status = state.with_ledger(|l| Ok(l.status(Instant::now())))?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(&status),
    )
        .into_response())
}

async fn get_status(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let _t = state.metrics.time(STATUS);
    let status = state.with_ledger(|l| Ok(l.status(Instant::now())))?;
    Ok(Json(status).into_response())
}

async fn post_work_timeout(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Json<MessageResponse>, ApiError> {
    let _t = state.metrics.time(WORK_TIMEOUT);
    let req: WorkTimeoutRequest = parse_body(&body, r#"{"timeout": seconds}"#)?;
    if !(req.timeout.is_finite() && req.timeout > 0.0 && req.timeout < 1e9) {
        return Err(ApiError::BadRequest(format!(
            "timeout must be a positive number of seconds, not {}",
            req.timeout
        )));
    }
    let timeout = Duration::from_secs_f64(req.timeout);
    state.with_ledger(|l| {
        l.set_work_timeout(timeout);
        Ok(())
    })?;
    tracing::info!(secs = req.timeout, "work timeout changed");
    Ok(Json(MessageResponse {
        status: "OK".into(),
        message: format!(
            "work timeout set to {} s; it applies to items already in flight too",
            req.timeout
        ),
    }))
}

/// Binds `host:port`, naming the address when it fails.
pub async fn bind(host: &str, port: u16) -> Result<TcpListener, ServerError> {
    let addr = format!("{host}:{port}");
    TcpListener::bind(&addr)
        .await
        .map_err(|source| ServerError::Listen { addr, source })
}

/// The address a listener is bound to, for logs and tests.
pub fn local_addr(listener: &TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}

#[cfg(test)]
mod tests {
    //! The HTTP layer without a socket, with the exact JSON bodies the Python
    //! client sends.
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    struct Fixture {
        _dir: tempfile::TempDir,
        outfile: std::path::PathBuf,
        state: Arc<AppState>,
        router: Router,
    }

    fn fixture(input: &str, options: ServeOptions) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let infile = dir.path().join("in.jsonl");
        std::fs::write(&infile, input).unwrap();
        let outfile = dir.path().join("out.jsonl");
        let config = LedgerConfig {
            work_timeout: Duration::from_secs(60),
            ..LedgerConfig::new(infile, outfile.clone(), dir.path().join("cp"))
        };
        let ledger = Ledger::open(config, Instant::now()).unwrap();
        let state = AppState::new(ledger, &options);
        let router = app(state.clone(), options.max_body_bytes);
        Fixture {
            _dir: dir,
            outfile,
            state,
            router,
        }
    }

    async fn call(
        router: &Router,
        method: &str,
        uri: &str,
        body: &str,
    ) -> (StatusCode, serde_json::Value) {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::from(body.to_string()))
            .unwrap();
        let resp = router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
        });
        (status, json)
    }

    #[tokio::test]
    async fn python_client_bodies_work_unchanged() {
        let f = fixture("{\"q\": 1}\n{\"q\": 2}\n", ServeOptions::default());
        let (code, work) = call(&f.router, "GET", "/work?batch_size=2", "").await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(
            work,
            serde_json::json!({"status": "OK", "retry_in": null, "lease_secs": 60.0, "items": [
                {"work_id": 0, "content": "{\"q\": 1}", "result": null, "retry_count": 0, "max_retries": 3},
                {"work_id": 1, "content": "{\"q\": 2}", "result": null, "retry_count": 0, "max_retries": 3},
            ]})
        );
        let (code, r) = call(
            &f.router,
            "POST",
            "/results",
            r#"{"items": [{"work_id": 1, "content": "{\"q\": 2}", "result": "{\"a\": 2}", "retry_count": 0, "max_retries": 3}]}"#,
        )
        .await;
        assert_eq!(
            (code, &r["status"], &r["count"]),
            (StatusCode::OK, &"OK".into(), &1.into())
        );
        let (_, r) = call(&f.router, "POST", "/release", r#"{"work_ids": [0, 5]}"#).await;
        assert_eq!(r, serde_json::json!({"status": "OK", "released_count": 1}));
        let (_, status) = call(&f.router, "GET", "/status", "").await;
        for key in [
            "last_processed_work_id",
            "next_work_id",
            "issued",
            "pending",
            "heap_size",
            "expired_reissues",
        ] {
            assert!(
                status[key].is_i64() || status[key].is_u64(),
                "{key}: {status}"
            );
        }
        assert_eq!(status["pending"], 1);
        assert_eq!(status["reissues"]["release"], 1);
        let (_, work) = call(&f.router, "GET", "/work", "").await;
        assert_eq!(work["items"][0]["work_id"], 0);
        assert_eq!(work["items"][0]["retry_count"], 1);
        let (code, r) = call(&f.router, "POST", "/work_timeout", r#"{"timeout": 30}"#).await;
        assert_eq!((code, &r["status"]), (StatusCode::OK, &"OK".into()));
        assert!(r["message"].as_str().unwrap().contains("30"));
        call(
            &f.router,
            "POST",
            "/results",
            r#"{"items": [{"work_id": 0, "content": "", "result": "[1]", "retry_count": 1, "max_retries": 3}]}"#,
        )
        .await;
        assert_eq!(
            std::fs::read_to_string(&f.outfile).unwrap(),
            "[1]\n{\"a\": 2}\n"
        );
        let (_, work) = call(&f.router, "GET", "/work?batch_size=4", "").await;
        assert_eq!(
            work,
            serde_json::json!({"status": "all_work_complete", "retry_in": null, "items": [], "lease_secs": 30.0})
        );
    }

    #[tokio::test]
    async fn with_a_token_requests_without_it_get_401_and_change_nothing() {
        let options = ServeOptions {
            token: Some("s3cret".into()),
            ..ServeOptions::default()
        };
        let f = fixture("1\n", options);
        for (method, uri, body) in [
            ("GET", "/work", ""),
            ("POST", "/release", r#"{"work_ids": [0]}"#),
            ("GET", "/status", ""),
        ] {
            let (code, r) = call(&f.router, method, uri, body).await;
            assert_eq!(code, StatusCode::UNAUTHORIZED, "{uri}");
            assert!(r["error"].as_str().unwrap().contains("DISPATCHER_TOKEN"));
        }
        let (code, _) = call(&f.router, "GET", "/health", "").await;
        assert_eq!(code, StatusCode::OK, "/health stays open");
        let req = Request::builder()
            .uri("/status")
            .header("authorization", "Bearer s3cret")
            .body(Body::empty())
            .unwrap();
        let resp = f.router.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let status: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            status["next_work_id"], 0,
            "the refused requests issued nothing"
        );
        let wrong = Request::builder()
            .uri("/work")
            .header("authorization", "Bearer s3creT")
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            f.router.clone().oneshot(wrong).await.unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
    }

    /// Parses Prometheus text into `name{labels} -> value`.
    fn series(text: &str) -> std::collections::HashMap<String, f64> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_string(), value.parse().ok()?))
            })
            .collect()
    }

    #[tokio::test]
    async fn metrics_expose_the_expected_series() {
        let f = fixture("a\nb\nc\n", ServeOptions::default());
        call(&f.router, "GET", "/work?batch_size=3", "").await;
        call(&f.router, "POST", "/results", r#"{"items": [{"work_id": 1, "content": "", "result": "1"}, {"work_id": 1, "content": "", "result": "1"}]}"#).await;
        call(&f.router, "POST", "/release", r#"{"work_ids": [2]}"#).await;
        let (code, text) = call(&f.router, "GET", "/metrics", "").await;
        assert_eq!(code, StatusCode::OK);
        let m = series(text.as_str().unwrap());
        let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no series {k} in {m:?}"));
        assert_eq!(get("dispatcher_items_issued_total"), 3.0);
        assert_eq!(get("dispatcher_items_completed_total"), 1.0);
        assert_eq!(get("dispatcher_ignored_results_total"), 1.0);
        assert_eq!(get("dispatcher_reissues_total{cause=\"release\"}"), 1.0);
        assert_eq!(get("dispatcher_reissues_total{cause=\"timeout\"}"), 0.0);
        assert_eq!(get("dispatcher_tombstones_total"), 0.0);
        assert_eq!(get("dispatcher_in_flight"), 1.0);
        assert_eq!(get("dispatcher_queued_for_reissue"), 1.0);
        assert_eq!(get("dispatcher_reorder_buffer_lines"), 1.0);
        assert_eq!(get("dispatcher_lines_done"), 0.0);
        assert_eq!(
            get("dispatcher_http_request_duration_seconds_count{endpoint=\"/work\"}"),
            1.0
        );
        assert_eq!(
            get("dispatcher_http_request_duration_seconds_count{endpoint=\"/results\"}"),
            1.0
        );
        // Counters advance by differences between scrapes, never twice.
        call(&f.router, "GET", "/work", "").await;
        let (_, text) = call(&f.router, "GET", "/metrics", "").await;
        let m = series(text.as_str().unwrap());
        assert_eq!(m["dispatcher_items_issued_total"], 4.0);
        assert_eq!(m["dispatcher_reissues_total{cause=\"release\"}"], 1.0);
    }

    #[tokio::test]
    async fn work_is_json_results_need_only_id_and_result_and_a_failure_stops_all() {
        let f = fixture("{\"a\":1}\n{\"a\":2}\n", ServeOptions::default());
        let resp = f
            .router
            .clone()
            .oneshot(Request::get("/work").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "application/json");
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let work: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(work["items"][0]["content"], "{\"a\":1}");
        // Without the echoed content and retry fields: accepted.
        let body = r#"{"items": [{"work_id": 0, "result": "1"}]}"#;
        let (code, reply) = call(&f.router, "POST", "/results", body).await;
        assert_eq!(
            (code, &reply["count"]),
            (StatusCode::OK, &1.into()),
            "{reply}"
        );
        assert_eq!(std::fs::read_to_string(&f.outfile).unwrap(), "1\n");

        call(&f.router, "GET", "/work", "").await;
        f.state
            .fail_locked("the output file could not be written (test)".into());
        let body = r#"{"items": [{"work_id": 1, "result": "2"}]}"#;
        let (code, reply) = call(&f.router, "POST", "/results", body).await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{reply}");
        let (code, _) = call(&f.router, "GET", "/work", "").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(std::fs::read_to_string(&f.outfile).unwrap(), "1\n");
        let ledger = f.state.ledger.lock().unwrap();
        let in_flight = ledger.status(Instant::now()).in_flight;
        assert_eq!((ledger.lines_written(), in_flight), (1, 1));
    }

    #[tokio::test]
    async fn nothing_issuable_answers_retry_with_a_wait() {
        let f = fixture("1\n", ServeOptions::default());
        call(&f.router, "GET", "/work", "").await;
        let (_, work) = call(&f.router, "GET", "/work", "").await;
        assert_eq!(work["status"], "retry");
        let retry_in = work["retry_in"].as_u64().unwrap();
        assert!(
            (1..=61).contains(&retry_in),
            "{retry_in}: at most the time to the next expiry"
        );
    }

    #[tokio::test]
    async fn bad_requests_get_a_4xx_with_a_reason() {
        let options = ServeOptions {
            max_batch_size: 100,
            max_body_bytes: 1024,
            ..ServeOptions::default()
        };
        let f = fixture("1\n2\n", options);
        for uri in [
            "/work?batch_size=0",
            "/work?batch_size=-3",
            "/work?batch_size=x",
            "/work?batch_size=101",
        ] {
            let (code, r) = call(&f.router, "GET", uri, "").await;
            assert_eq!(code, StatusCode::BAD_REQUEST, "{uri}");
            assert!(
                r["error"].as_str().unwrap().contains("batch_size"),
                "{uri}: {r}"
            );
        }
        for (uri, body) in [
            ("/results", "{not json"),
            ("/results", r#"{"items": "nope"}"#),
            ("/release", r#"{"work_ids": [-1]}"#),
            ("/work_timeout", r#"{"timeout": -5}"#),
        ] {
            let (code, r) = call(&f.router, "POST", uri, body).await;
            assert_eq!(code, StatusCode::BAD_REQUEST, "{uri} {body}");
            assert!(!r["error"].as_str().unwrap().is_empty());
        }
        let big = format!(r#"{{"work_ids": [{}]}}"#, vec!["1"; 1000].join(","));
        let (code, _) = call(&f.router, "POST", "/release", &big).await;
        assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
        // Nothing above changed the job.
        let (_, status) = call(&f.router, "GET", "/status", "").await;
        assert_eq!(
            (status["next_work_id"].as_u64(), status["pending"].as_u64()),
            (Some(0), Some(0))
        );
    }

    #[tokio::test]
    async fn a_result_that_is_not_one_json_line_is_refused_naming_its_work_id() {
        let f = fixture("a\nb\n", ServeOptions::default());
        call(&f.router, "GET", "/work?batch_size=2", "").await;
        let (code, r) = call(
            &f.router,
            "POST",
            "/results",
            r#"{"items": [{"work_id": 0, "content": "a", "result": "{\"x\":\n1}"}, {"work_id": 1, "content": "b", "result": "2"}]}"#,
        )
        .await;
        assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(r["work_ids"], serde_json::json!([0]));
        assert_eq!(r["count"], 1);
        assert!(r["error"].as_str().unwrap().contains("work_id 0"), "{r}");
        let (_, status) = call(&f.router, "GET", "/status", "").await;
        assert_eq!(
            (status["issued"].as_u64(), status["pending"].as_u64()),
            (Some(1), Some(1))
        );
    }
}
