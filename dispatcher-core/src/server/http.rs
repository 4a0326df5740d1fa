//! The HTTP layer: the router, one handler per endpoint, the error answers
//! and the optional middleware (token check, logging of refused requests).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::time::Instant;

use super::state::AppState;
use crate::ledger::{Cause, LedgerStats};
use crate::metrics::Endpoint;
use crate::protocol::{
    check_results, ErrorResponse, HeartbeatRequest, HeartbeatResponse, MessageResponse,
    ReleaseRequest, ReleaseResponse, ResultsResponse, StatusResponse, SubmittedResults,
    WorkResponse, WorkTimeoutRequest,
};

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
            let _t = state.metrics.time(Endpoint::Health);
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

/// The one error type of the HTTP layer.
#[derive(Debug)]
pub(super) enum ApiError {
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
    let _t = state.metrics.time(Endpoint::Work);
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
            l.work_timeout(),
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
    let _t = state.metrics.time(Endpoint::Results);
    let req: SubmittedResults = parse_body(
        &body,
        r#"{"items": [work items with "work_id" and "result"]}"#,
    )?;
    // Parsing every result is the costliest per-item step: done here, outside
    // the ledger's lock, on whichever core is free.
    let (valid, refused) = check_results(req.items.into_iter().map(|r| (r.work_id, r.result)));
    let reply = state.with_ledger(|l| l.complete_checked(valid))?;
    if let Some(first) = refused.first() {
        let first = format!("work_id {}: {}", first.work_id, first.reason);
        let work_ids: Vec<u64> = refused.iter().map(|r| r.work_id).collect();
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
    let _t = state.metrics.time(Endpoint::Release);
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
    let _t = state.metrics.time(Endpoint::Heartbeat);
    let req: HeartbeatRequest = parse_body(&body, r#"{"work_ids": [integers]}"#)?;
    let (extended, done, lease) = state.with_ledger(|l| {
        let (extended, done) = l.heartbeat(&req.work_ids, Instant::now());
        Ok((extended, done, l.work_timeout()))
    })?;
    Ok(Json(HeartbeatResponse {
        status: "OK".into(),
        extended,
        done,
        lease_secs: lease.as_secs_f64(),
    }))
}

async fn get_metrics(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let _t = state.metrics.time(Endpoint::Metrics);
    let stats = state.with_ledger(|l| Ok(l.stats(Instant::now())))?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(&stats),
    )
        .into_response())
}

async fn get_status(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let _t = state.metrics.time(Endpoint::Status);
    let stats = state.with_ledger(|l| Ok(l.stats(Instant::now())))?;
    Ok(Json(status_response(&stats)).into_response())
}

async fn post_work_timeout(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Json<MessageResponse>, ApiError> {
    let _t = state.metrics.time(Endpoint::WorkTimeout);
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

/// The `GET /status` answer: the protocol's fields (some of them the Python
/// server's names for the same counts) and then this server's.
pub fn status_response(s: &LedgerStats) -> StatusResponse {
    StatusResponse {
        last_processed_work_id: s.lines_written as i64 - 1,
        next_work_id: s.next_work_id,
        issued: s.in_flight,
        pending: s.reorder_lines,
        heap_size: s.lease_entries,
        expired_reissues: s.reissues.timeout,
        lines_done: s.lines_written,
        lines_total: s.lines_total,
        input_bytes_consumed: s.input_bytes_consumed,
        input_bytes_total: s.input_bytes_total,
        in_flight: s.in_flight,
        queued_for_reissue: s.queued_for_reissue,
        reorder_buffer: s.reorder_lines,
        reorder_buffer_bytes: s.reorder_bytes,
        reissues: s.reissues,
        tombstones: s.tombstones,
        invalid_lines: s.invalid_lines,
        ignored_results: s.ignored_results,
        issued_total: s.issued_total,
        completed_total: s.completed_total,
        oldest_in_flight: s.oldest_in_flight.clone(),
        blocking: s.blocking.clone(),
        reorder_buffer_spilled: s.reorder_spilled,
        backups_issued: s.backups_issued,
        work_timeout_secs: s.work_timeout.as_secs_f64(),
        max_retries: s.max_retries.map_or(-1, i64::from),
        complete: s.complete,
        uptime_secs: s.uptime.as_secs_f64(),
    }
}
