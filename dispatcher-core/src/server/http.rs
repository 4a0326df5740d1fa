//! The HTTP layer: the router, one handler per endpoint, the error answers
//! and the optional middleware (token check, logging of refused requests).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::time::Instant;

use super::access::NotCrossSite;
use super::body::{log_invalid, parse_body, Body};
use super::error::ApiError;
use super::state::AppState;
use super::status::get_status;
use crate::ledger::{Ask, Cause, WorkReply};
use crate::metrics::Endpoint;
use crate::protocol::{
    check_result_line, HeartbeatRequest, HeartbeatResponse, Hello, InvalidResult, JournalRequest,
    JournalResponse, MessageResponse, ReleaseRequest, ReleaseResponse, ResultLine, ResultsResponse,
    SubmittedResults, SubmittedValue, WorkItem, WorkResponse, WorkTimeoutRequest,
};

/// The router of all endpoints over `state`.
///
/// Middleware costs a few microseconds per request, so layers are added only
/// when their option is on (the token check, `--log-invalid-http`); latencies
/// are recorded in the handlers themselves.
pub fn app(state: Arc<AppState>) -> Router {
    let mut router = Router::new()
        .route("/work", get(get_work))
        .route("/results", post(post_results))
        .route("/release", post(post_release))
        .route("/status", get(get_status))
        .route("/work_timeout", post(post_work_timeout))
        .route("/metrics", get(get_metrics))
        .route("/heartbeat", post(post_heartbeat))
        .route("/hello", post(post_hello))
        .route("/journal", post(post_journal));
    if state.token.is_some() {
        router = router.route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            super::access::require_token,
        ));
    }
    // The page holds nothing of the job (it asks /status, with the token
    // when one is set), so it is served to anyone.
    router = router
        .route("/", get(page_html))
        .route("/page.js", get(page_js));
    router = router.route(
        "/health",
        get(|State(state): State<Arc<AppState>>| async move {
            let _t = state.metrics.time(Endpoint::Health);
            Json(serde_json::json!({"status": "OK"}))
        }),
    );
    // Every error is JSON, an unknown path's and a wrong method's too.
    router = router
        .fallback(not_found)
        .method_not_allowed_fallback(wrong_method);
    if state.log_invalid_http {
        router = router.layer(axum::middleware::from_fn(log_invalid));
    }
    router.with_state(state)
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(
        StatusCode::NOT_FOUND,
        format!(
            "no endpoint {}: see the wire protocol in the book, docs/src/reference/protocol.md (/work, /results, /release, /status, ...)",
            crate::text::escaped(uri.path(), 200)
        ),
    )
}

async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{} does not take {}: see the wire protocol in the book, docs/src/reference/protocol.md",
            crate::text::escaped(uri.path(), 200),
            crate::text::escaped(method.as_str(), 20)
        ),
    )
}

/// The job page: one HTML file and its script, embedded in the binary.
const PAGE_HTML: &str = include_str!("page/index.html");
const PAGE_JS: &str = include_str!("page/page.js");

/// Headers of the page: it may load nothing but its own script and talk to
/// nothing but this server, whatever a worker's name or a failed line holds.
fn page_headers(content_type: &'static str) -> [(axum::http::HeaderName, &'static str); 4] {
    use axum::http::header;
    [
        (header::CONTENT_TYPE, content_type),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::CACHE_CONTROL, "no-cache"),
    ]
}

async fn page_html(State(state): State<Arc<AppState>>) -> Response {
    let _t = state.metrics.time(Endpoint::Page);
    (page_headers("text/html; charset=utf-8"), PAGE_HTML).into_response()
}

async fn page_js(State(state): State<Arc<AppState>>) -> Response {
    let _t = state.metrics.time(Endpoint::Page);
    (page_headers("text/javascript; charset=utf-8"), PAGE_JS).into_response()
}

/// Notes that the worker a request names made contact; returns its key.
fn contact(state: &AppState, worker: Option<&str>) -> Option<u64> {
    contact_with(state, worker, None)
}

/// [`contact`], adding the tokens the request reports.
fn contact_with(
    state: &AppState,
    worker: Option<&str>,
    usage: Option<crate::protocol::TokenCounts>,
) -> Option<u64> {
    let key = worker_key(worker);
    if key.is_none() && usage.is_none() {
        return None;
    }
    let now = Instant::now();
    let mut workers = state.workers();
    if let Some(key) = key {
        workers.contact(key, worker.unwrap_or_default(), now);
    }
    if let Some(usage) = usage {
        workers.tokens(key, usage, now);
    }
    key
}

/// The worker id a request names, hashed: what the ledger remembers of it.
fn worker_key(worker: Option<&str>) -> Option<u64> {
    worker.map(|w| {
        use std::hash::{Hash, Hasher};
        let mut h = rustc_hash::FxHasher::default();
        w.hash(&mut h);
        h.finish()
    })
}

#[derive(Debug, Deserialize)]
struct WorkQuery {
    batch_size: Option<String>,
    /// Extension: who asks, so it never gets a backup of its own item.
    worker: Option<String>,
}

async fn get_work(
    _: NotCrossSite,
    State(state): State<Arc<AppState>>,
    query: Result<Query<WorkQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let _t = state.metrics.time(Endpoint::Work);
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    // Any positive size is accepted, as the Python server did; more than
    // --max-batch-size gets that many.
    let batch = match query.batch_size.as_deref() {
        None => 1,
        Some(s) => match s.parse::<u64>() {
            Ok(n) if n >= 1 => {
                usize::try_from(n).map_or(state.max_batch_size, |n| n.min(state.max_batch_size))
            }
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "batch_size must be a whole number of 1 or more, not {s:?}"
                )))
            }
        },
    };
    let worker = contact(&state, query.worker.as_deref());
    let (reply, lease, max_retries) = state.with_ledger(|l| {
        Ok((
            l.take_work(Ask::batch(batch).by(worker), Instant::now())?,
            l.work_timeout(),
            l.config().max_retries,
        ))
    })?;
    // Sized up front: a batch of prompts is tens of kilobytes, which axum's
    // `Json` would reach by doubling a 128-byte buffer, copying at each step.
    let capacity = 96
        + reply
            .items()
            .iter()
            .map(|i| 96 + i.content.len() + i.content.len() / 8)
            .sum::<usize>();
    let mut body = Vec::with_capacity(capacity);
    let response = work_response(reply, max_retries, Some(lease.as_secs_f64()));
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
    _: NotCrossSite,
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Json<ResultsResponse>, ApiError> {
    let _t = state.metrics.time(Endpoint::Results);
    let req: SubmittedResults = parse_body(
        body,
        r#"{"items": [work items with "work_id" and "result"]}"#,
    )?;
    // Counts are taken whatever becomes of the results (the client puts
    // them back only when the whole body was refused).
    contact_with(&state, req.worker.as_deref(), req.usage);
    // Checking every result is the costliest per-item step: done here,
    // outside the ledger's lock, on whichever core is free.
    let mut lines = Vec::with_capacity(req.items.len());
    let mut invalid = Vec::new();
    let mut unattributed = Vec::new();
    for (index, item) in req.items.into_iter().enumerate() {
        let Some(work_id) = item.work_id else {
            unattributed.push(index);
            continue;
        };
        let checked = match item.result {
            SubmittedValue::Text(text) => check_result_line(text),
            SubmittedValue::Null => Err(InvalidResult {
                reason: "its result is null".into(),
                text: String::new(),
            }),
            SubmittedValue::Other(kind) => Err(InvalidResult {
                reason: format!("its result is {kind}, not a string holding one JSON value"),
                text: String::new(),
            }),
        };
        match checked {
            Ok(line) => lines.push(ResultLine { work_id, line }),
            Err(e) => {
                tracing::warn!(work_id, reason = %crate::text::Escaped(&e.reason), "invalid result; recording it as the line's output");
                invalid.push(work_id);
                lines.push(ResultLine {
                    work_id,
                    line: crate::record::invalid_result(work_id, &e.reason, &e.text),
                });
            }
        }
    }
    let reply = state.with_ledger(|l| l.complete(lines))?;
    // Only results the ledger took as the first of their item became records.
    invalid.retain(|id| !reply.already_done.contains(id) && !reply.never_issued.contains(id));
    if let Some(&first) = unattributed.first() {
        return Err(ApiError::Refused {
            error: format!(
                "{} item(s) without a usable work_id were refused (first: items[{first}]; a work_id is a non-negative integer); {} result(s) accepted",
                unattributed.len(),
                reply.accepted
            ),
            work_ids: Vec::new(),
            count: reply.accepted,
        });
    }
    Ok(Json(ResultsResponse {
        status: "OK".into(),
        count: reply.accepted,
        ignored: reply.ignored,
        already_done: reply.already_done,
        invalid,
    }))
}

async fn post_release(
    _: NotCrossSite,
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Json<ReleaseResponse>, ApiError> {
    let _t = state.metrics.time(Endpoint::Release);
    let req: ReleaseRequest = parse_body(body, r#"{"work_ids": [integers]}"#)?;
    let cause = Cause::of_release(req.reason);
    let worker = contact(&state, req.worker.as_deref());
    let released = state.with_ledger(|l| l.release(&req.work_ids, cause, worker))?;
    Ok(Json(ReleaseResponse {
        status: "OK".into(),
        released_count: released,
    }))
}

async fn post_heartbeat(
    _: NotCrossSite,
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    let _t = state.metrics.time(Endpoint::Heartbeat);
    let req: HeartbeatRequest = parse_body(body, r#"{"work_ids": [integers]}"#)?;
    let worker = contact_with(&state, req.worker.as_deref(), req.usage);
    if let (Some(key), Some(counts)) = (worker, req.prefix_cache) {
        state.workers().prefix_cache(key, counts);
    }
    let (extended, done, lease) = state.with_ledger(|l| {
        let (extended, done) = l.heartbeat(&req.work_ids, worker, Instant::now());
        Ok((extended, done, l.work_timeout()))
    })?;
    Ok(Json(HeartbeatResponse {
        status: "OK".into(),
        extended,
        done,
        lease_secs: lease.as_secs_f64(),
        renews_held: worker.is_some(),
    }))
}

/// `POST /journal` (extension): entries of lines a worker works on, and
/// what its journals saved.
async fn post_journal(
    _: NotCrossSite,
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Json<JournalResponse>, ApiError> {
    let _t = state.metrics.time(Endpoint::Journal);
    let req: JournalRequest = parse_body(
        body,
        r#"{"entries": [{"work_id", "seq", "fingerprint", "response"}], "replayed", "tokens_saved"}"#,
    )?;
    contact(&state, req.worker.as_deref());
    // Saturating: a broken worker may send anything.
    let add = |counter: &std::sync::atomic::AtomicU64, n: u64| {
        use std::sync::atomic::Ordering::Relaxed;
        let _ = counter.fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_add(n)));
    };
    add(&state.journal_replayed, req.replayed);
    add(&state.journal_tokens_saved, req.tokens_saved);
    state
        .metrics
        .journal_replayed(req.replayed, req.tokens_saved);
    let recorded = state.with_ledger(|l| l.record_journal(req.entries))?;
    Ok(Json(JournalResponse {
        status: "OK".into(),
        recorded,
    }))
}

/// The longest hello taken. Its settings (a few-shot system prompt may be
/// long) go to the manifest, once per configuration; what the server keeps
/// of each worker is cut short (see `Workers::hello`).
const MAX_HELLO_BYTES: usize = 1 << 20;

/// `POST /hello` (extension): a worker says who it is.
async fn post_hello(
    _: NotCrossSite,
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Json<MessageResponse>, ApiError> {
    let _t = state.metrics.time(Endpoint::Hello);
    if let Body(Ok(bytes)) = &body {
        if bytes.len() > MAX_HELLO_BYTES {
            return Err(ApiError::TooLarge(format!(
                "a hello is at most {} MiB, this one is {} bytes: a task's settings() say how lines are made (sampling, prompts), they are not data",
                MAX_HELLO_BYTES >> 20,
                bytes.len()
            )));
        }
    }
    let hello: Hello = parse_body(body, r#"{"worker": "id", "task": "...", ...}"#)?;
    if hello.worker.is_empty() {
        return Err(ApiError::BadRequest(
            "\"worker\" must name the worker, as its work requests do".into(),
        ));
    }
    let key = worker_key(Some(&hello.worker)).expect("a worker is named");
    // Each field as the worker wrote it, but escaped: a hello is not to
    // write lines of its own into the log, or drive the terminal showing it.
    use crate::text::Escaped;
    tracing::info!(
        worker = %Escaped(crate::text::head(&hello.worker, 256)),
        host = %Escaped(crate::text::head(&hello.host, 256)),
        task = %Escaped(crate::text::head(&hello.task, 256)),
        version = %Escaped(crate::text::head(&hello.version, 256)),
        engine = %Escaped(crate::text::head(&hello.engine, 256)),
        model = %Escaped(crate::text::head(hello.model.as_deref().unwrap_or("-"), 256)),
        "worker said hello"
    );
    // The manifest keeps each configuration once, across runs too.
    state.manifest().configuration(&hello);
    state.workers().hello(key, hello, Instant::now());
    Ok(Json(MessageResponse {
        status: "OK".into(),
        message: "hello".into(),
    }))
}

async fn get_metrics(
    _: NotCrossSite,
    State(state): State<Arc<AppState>>,
) -> Result<Response, ApiError> {
    let _t = state.metrics.time(Endpoint::Metrics);
    let stats = state.with_ledger(|l| Ok(l.stats(Instant::now())))?;
    let (seen, active) = state.workers().counts(Instant::now());
    state.metrics.workers(seen, active);
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(&stats),
    )
        .into_response())
}

async fn post_work_timeout(
    _: NotCrossSite,
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Json<MessageResponse>, ApiError> {
    let _t = state.metrics.time(Endpoint::WorkTimeout);
    let req: WorkTimeoutRequest = parse_body(body, r#"{"timeout": seconds}"#)?;
    if !(req.timeout.is_finite() && (1.0..1e9).contains(&req.timeout)) {
        return Err(ApiError::BadRequest(format!(
            "timeout must be a number of seconds of at least 1, not {}",
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

/// The wire form of the ledger's answer to a work request: each issue a work
/// item carrying the server's `max_retries`, as the Python server's did.
pub fn work_response(
    reply: WorkReply,
    max_retries: Option<u32>,
    lease_secs: Option<f64>,
) -> WorkResponse {
    match reply {
        WorkReply::Issued(items) => WorkResponse::ok(
            items
                .into_iter()
                .map(|i| {
                    WorkItem::issued(i.work_id, i.content, i.retry_count, max_retries, i.journal)
                })
                .collect(),
            lease_secs,
        ),
        WorkReply::Retry {
            after_secs,
            drained,
        } => WorkResponse::retry(after_secs, lease_secs).with_drained(drained),
        WorkReply::Complete => WorkResponse::complete(lease_secs),
    }
}
