//! Request bodies: read in full within `--request-timeout` and at most
//! `--max-request-mib`, parsed as JSON, and with `--log-invalid-http` the
//! first bytes of a refused one logged.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::response::Response;

use super::error::ApiError;
use super::state::AppState;

/// With `--log-invalid-http`: logs the peer and first bytes of requests
/// answered with a 4xx.
pub(super) async fn log_invalid(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map_or_else(|| "?".to_string(), |c| c.0.to_string());
    let (parts, body) = request.into_parts();
    let method = parts.method.clone();
    let uri = parts.uri.clone();
    // Read only as much of the body as is logged, then hand the handler that
    // prefix followed by the rest, unread: a huge body from a stranger costs
    // no memory here.
    let (prefix, rest) = body_prefix(body, LOGGED_BYTES).await;
    let head = String::from_utf8_lossy(&prefix[..prefix.len().min(LOGGED_BYTES)]).into_owned();
    let body = match rest {
        Some(rest) => {
            use futures_util::StreamExt;
            let first = futures_util::stream::once(std::future::ready(Ok(prefix.clone())));
            axum::body::Body::from_stream(first.chain(rest.into_data_stream()))
        }
        None => axum::body::Body::from(prefix.clone()),
    };
    let response = next
        .run(axum::extract::Request::from_parts(parts, body))
        .await;
    if response.status().is_client_error() {
        tracing::warn!(%peer, %method, %uri, status = response.status().as_u16(), first_bytes = %crate::text::Escaped(&head), "invalid request");
    }
    response
}

/// How much of a refused request's body `--log-invalid-http` logs.
const LOGGED_BYTES: usize = 200;

/// Reads `body` until `want` bytes (or its end): the bytes read, and the rest
/// of the body when there is more.
async fn body_prefix(mut body: axum::body::Body, want: usize) -> (Bytes, Option<axum::body::Body>) {
    use http_body_util::BodyExt;
    let mut prefix = Vec::new();
    while prefix.len() < want {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    prefix.extend_from_slice(&data);
                }
            }
            // The handler gets the error where the body broke off.
            Some(Err(e)) => {
                let error = futures_util::stream::once(std::future::ready(Err::<Bytes, _>(e)));
                return (prefix.into(), Some(axum::body::Body::from_stream(error)));
            }
            None => return (prefix.into(), None),
        }
    }
    (prefix.into(), Some(body))
}

/// The body as JSON of type `T` (described as `shape` in the 400 when it is
/// not), or a JSON 413 that names `--max-request-mib` when it is too large.
pub(super) fn parse_body<T: serde::de::DeserializeOwned>(
    body: Body,
    shape: &str,
) -> Result<T, ApiError> {
    let body = body.0?;
    // A body without a content type is read as JSON, as the Python server
    // did; one of another type was refused already (`NotCrossSite`).
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("the body must be {shape}: {e}")))
}

/// A request's body, read in full within `--request-timeout` and at most
/// `--max-request-mib` long, or why it was not. The idle timeout closes a
/// connection that stops making progress, but a body trickled one byte at a
/// time makes progress forever: its own deadline ends it (one timer per
/// request that has a body).
pub(super) struct Body(pub(super) Result<Bytes, ApiError>);

impl axum::extract::FromRequest<Arc<AppState>> for Body {
    type Rejection = std::convert::Infallible;

    async fn from_request(
        request: axum::extract::Request,
        state: &Arc<AppState>,
    ) -> Result<Body, Self::Rejection> {
        let read = read_within(request.into_body(), state.max_body_bytes);
        Ok(Body(match tokio::time::timeout(state.request_timeout, read).await {
            Ok(Ok(Some(bytes))) => Ok(bytes),
            Err(_) => Err(ApiError::Timeout(format!(
                "the request body did not arrive in full within {} s (--request-timeout)",
                state.request_timeout.as_secs_f64()
            ))),
            Ok(Ok(None)) => Err(ApiError::TooLarge(format!(
                "the request body is over the server's limit of {} MiB (--max-request-mib); send fewer results per request, or raise the limit",
                state.max_body_bytes >> 20
            ))),
            Ok(Err(e)) => Err(ApiError::BadRequest(format!(
                "the body could not be read: {e}"
            ))),
        }))
    }
}

/// The body, or `None` when it is longer than `limit` bytes. A body over the
/// limit is read to its end and dropped (within the caller's timeout) before
/// the 413 goes out: a client still sending when the server closed the
/// connection would see a reset, not the answer, and could not tell a body
/// too large (to send in parts) from a server gone.
async fn read_within(body: axum::body::Body, limit: usize) -> Result<Option<Bytes>, axum::Error> {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut parts: Vec<Bytes> = Vec::new();
    let (mut len, mut over) = (0_usize, false);
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        len = len.saturating_add(data.len());
        if len > limit {
            over = true;
            parts = Vec::new();
        } else {
            parts.push(data);
        }
    }
    Ok((!over).then(|| match parts.len() {
        // One frame, as most bodies arrive: no copy.
        1 => parts.pop().expect("one part"),
        _ => Bytes::from(parts.concat()),
    }))
}
