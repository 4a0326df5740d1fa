//! Who may ask: the access token (`--token`), and no browser page of another
//! origin, token or not.
//!
//! A server without a token (the default, as the Python server had none)
//! still must not be driven by a web page that the operator happens to have
//! open while the job's port is reachable from the browser (an SSH tunnel, a
//! private network, a notebook on the head node): `GET /work` changes state,
//! and a form or a `no-cors` fetch can POST. Browsers say where a request
//! comes from (`Sec-Fetch-Site`, `Origin`); workers, `curl` and scripts send
//! neither, so they are not affected. A POST body a browser could send
//! cross-site without asking first (a form's or `text/plain`) is refused as
//! well, for browsers that say nothing.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::{header, request::Parts, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::ApiError;
use super::state::AppState;
use crate::protocol::ErrorResponse;

/// Extracted by every handler that reads or changes the job: refuses, before
/// anything is read or changed, a request that a browser made for a page of
/// another origin, and a POST whose body is not declared JSON.
#[derive(Debug)]
pub(super) struct NotCrossSite;

impl<S: Send + Sync> FromRequestParts<S> for NotCrossSite {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        check(&parts.method, &parts.headers)?;
        Ok(NotCrossSite)
    }
}

/// Why the request may not be served, if it may not.
fn check(method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
    let text = |name: header::HeaderName| headers.get(name).map(|v| v.to_str().unwrap_or("?"));
    // Sent by every current browser with every request: `same-origin` for
    // the job's own page, `none` for an address typed or bookmarked.
    if let Some(site) = text(header::HeaderName::from_static("sec-fetch-site")) {
        if !site.eq_ignore_ascii_case("same-origin") && !site.eq_ignore_ascii_case("none") {
            return Err(ApiError::Forbidden(format!(
                "refused: a browser sent this request for a page of another origin (Sec-Fetch-Site: {site}); only the job's own page (/) may read or change the job from a browser"
            )));
        }
    }
    // Sent by browsers with POSTs and cross-origin requests, also older ones.
    if let Some(origin) = text(header::ORIGIN) {
        let host = text(header::HOST).unwrap_or_default();
        if !same_authority(origin, host) {
            return Err(ApiError::Forbidden(format!(
                "refused: a browser sent this request for a page of another origin (Origin: {}, this server: {}); only the job's own page (/) may read or change the job from a browser",
                crate::text::escaped(origin, 200),
                crate::text::escaped(host, 200)
            )));
        }
    }
    if method == Method::POST {
        if let Some(kind) = text(header::CONTENT_TYPE) {
            if !is_json(kind) {
                return Err(ApiError::UnsupportedMediaType(format!(
                    "the body must be JSON, sent with Content-Type: application/json (not {}); with curl: -H 'Content-Type: application/json'",
                    crate::text::escaped(kind, 100)
                )));
            }
        }
    }
    Ok(())
}

/// Whether `origin` (`scheme://host[:port]`, or `null`) names the server
/// that the request's `Host` header names.
fn same_authority(origin: &str, host: &str) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false; // `null`: a sandboxed page, a file, a redirect
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => "80",
        "https" => "443",
        _ => return false,
    };
    let with_port = |a: &str| -> String {
        let a = a.to_ascii_lowercase();
        // `[::1]:8000`, `[::1]`, `host:8000`, `host`.
        let has_port = match a.rfind(']') {
            Some(close) => a[close..].contains(':'),
            None => a.contains(':'),
        };
        if has_port {
            a
        } else {
            format!("{a}:{default_port}")
        }
    };
    !host.is_empty() && with_port(authority) == with_port(host)
}

/// Whether a `Content-Type` declares JSON (`application/json`, or a
/// `+json` type), whatever its parameters.
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Refuses requests without the access token (when one is set) with a 401
/// that changes nothing.
pub(super) async fn require_token(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(token) = &state.token {
        // The scheme is case-insensitive (RFC 7235); the token is not.
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim_start());
        if !given.is_some_and(|g| same_secret(g.as_bytes(), token.as_bytes())) {
            state.refused.note(&request, given.is_some());
            return (
                StatusCode::UNAUTHORIZED,
                Json(ErrorResponse {
                    status: "error".into(),
                    error: "this server requires its access token: pass --token-file or set DISPATCHER_TOKEN".into(),
                    work_ids: Vec::new(),
                    count: None,
                }),
            )
                .into_response();
        }
    }
    next.run(request).await
}

/// Requests refused for want of the token: the server says so in its log,
/// at most every ten seconds (a worker of another job, left on this port,
/// or one started without the token, asks every few seconds).
/// Requests without a token and with a wrong one are told apart.
#[derive(Debug, Default)]
pub(super) struct Refusals {
    /// Refused without a token, and with another one.
    count: [std::sync::atomic::AtomicU64; 2],
    /// The count when last logged, and when, of each.
    logged: std::sync::Mutex<[Option<(u64, std::time::Instant)>; 2]>,
}

impl Refusals {
    fn note(&self, request: &axum::extract::Request, had_token: bool) {
        use std::sync::atomic::Ordering;
        let kind = usize::from(had_token);
        let count = self.count[kind].fetch_add(1, Ordering::Relaxed) + 1;
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        let last = &mut logged[kind];
        if last.is_some_and(|(_, at)| now.duration_since(at) < std::time::Duration::from_secs(10)) {
            return;
        }
        let since = last.map_or(0, |(n, _)| n);
        *last = Some((count, now));
        drop(logged);
        let worker = request
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("worker=")))
            .unwrap_or("");
        tracing::warn!(
            refused = count - since,
            method = %request.method(),
            path = %crate::text::escaped(request.uri().path(), 200),
            worker = %crate::text::escaped(worker, 200),
            "refused request(s) {} this job's token: a worker left over from another job on this port, or one started without the token (give it the job's token: --token-file or DISPATCHER_TOKEN)",
            if had_token { "with another token than" } else { "without" }
        );
    }
}

/// Compares a given token with the secret in a time that depends only on the
/// secret's length: neither where they differ nor the given token's length
/// shows in it.
fn same_secret(given: &[u8], secret: &[u8]) -> bool {
    let mut differ = u8::from(given.len() != secret.len());
    for (i, s) in secret.iter().enumerate() {
        differ |= given.get(i).copied().unwrap_or(!s) ^ s;
    }
    std::hint::black_box(differ) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn workers_scripts_and_the_own_page_pass() {
        // A worker or curl: no browser headers at all.
        assert!(check(&Method::GET, &headers(&[("host", "10.0.0.1:8000")])).is_ok());
        assert!(check(
            &Method::POST,
            &headers(&[("content-type", "application/json")])
        )
        .is_ok());
        // A body without a content type (the Python server read it as JSON).
        assert!(check(&Method::POST, &HeaderMap::new()).is_ok());
        assert!(check(
            &Method::POST,
            &headers(&[("content-type", "Application/JSON; charset=utf-8")])
        )
        .is_ok());
        // The job's own page, and an address typed into the browser.
        let own = [
            ("sec-fetch-site", "same-origin"),
            ("origin", "http://127.0.0.1:8000"),
            ("host", "127.0.0.1:8000"),
        ];
        assert!(check(&Method::GET, &headers(&own)).is_ok());
        assert!(check(&Method::GET, &headers(&[("sec-fetch-site", "none")])).is_ok());
        assert!(same_authority("http://Head-Node", "head-node:80"));
        assert!(same_authority("http://[::1]:9000", "[::1]:9000"));
        assert!(same_authority("https://h", "h:443"));
    }

    #[test]
    fn pages_of_other_origins_are_refused() {
        for site in ["cross-site", "same-site"] {
            let e = check(&Method::GET, &headers(&[("sec-fetch-site", site)])).unwrap_err();
            assert!(
                matches!(e, ApiError::Forbidden(ref m) if m.contains(site)),
                "{e:?}"
            );
        }
        // Another port of the same host is another origin (a notebook).
        for origin in [
            "http://127.0.0.1:8888",
            "null",
            "http://evil.example",
            "ftp://127.0.0.1:8000",
        ] {
            let h = headers(&[("origin", origin), ("host", "127.0.0.1:8000")]);
            assert!(
                matches!(check(&Method::POST, &h), Err(ApiError::Forbidden(_))),
                "{origin}"
            );
        }
        assert!(!same_authority("http://h:8000", ""));
        // What a form or a no-cors fetch can send without asking first.
        for kind in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
        ] {
            let h = headers(&[("content-type", kind)]);
            let e = check(&Method::POST, &h).unwrap_err();
            assert!(
                matches!(e, ApiError::UnsupportedMediaType(ref m) if m.contains("application/json")),
                "{e:?}"
            );
        }
    }

    #[test]
    fn the_token_comparison_needs_the_whole_secret() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        assert!(!same_secret(b"s3cre", b"s3cret"));
        assert!(!same_secret(b"s3cretx", b"s3cret"));
        assert!(!same_secret(b"", b"s3cret"));
    }
}
