//! The one error type of the HTTP layer, and its JSON answer. Its own
//! module, below both the handlers (`http.rs`) and the shared state
//! (`state.rs`), which both return it.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::protocol::ErrorResponse;

/// What went wrong with a request, as its answer says it.
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
    /// The body is over `--max-request-mib`.
    TooLarge(String),
    /// The request took longer than `--request-timeout` to arrive.
    Timeout(String),
    /// A browser page of another origin asked (see `access.rs`).
    Forbidden(String),
    /// A POST body not declared JSON.
    UnsupportedMediaType(String),
    /// No such endpoint, or not with this method.
    NotFound(StatusCode, String),
    /// The server stopped after a failure; nothing was changed.
    Stopped,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (code, error, work_ids, count) = match self {
            ApiError::BadRequest(error) => (StatusCode::BAD_REQUEST, error, Vec::new(), None),
            ApiError::Refused {
                error,
                work_ids,
                count,
            } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                error,
                work_ids,
                Some(count),
            ),
            ApiError::TooLarge(error) => (StatusCode::PAYLOAD_TOO_LARGE, error, Vec::new(), None),
            ApiError::Timeout(error) => (StatusCode::REQUEST_TIMEOUT, error, Vec::new(), None),
            ApiError::Forbidden(error) => (StatusCode::FORBIDDEN, error, Vec::new(), None),
            ApiError::UnsupportedMediaType(error) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, error, Vec::new(), None)
            }
            ApiError::NotFound(code, error) => (code, error, Vec::new(), None),
            // The cause is in the server's log; it names paths a client has
            // no business seeing.
            ApiError::Stopped => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is stopping after an internal failure; see its log".into(),
                Vec::new(),
                None,
            ),
        };
        let body = ErrorResponse {
            status: "error".into(),
            error,
            work_ids,
            count,
        };
        let mut response = (code, Json(body)).into_response();
        if code == StatusCode::REQUEST_TIMEOUT {
            // The rest of the body is never read: the connection goes.
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        response
    }
}
