//! What a browser page of another origin, a broken worker or a hostile input
//! can make the server do: nothing it should not.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

use super::tests::{call, fixture};
use super::*;

/// A request with `headers`, answered: its status and JSON body.
async fn call_with(
    router: &axum::Router,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, serde_json::Value) {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = router
        .clone()
        .oneshot(req.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)));
    (status, json)
}

/// A page on another origin (another site, or another port of this host)
/// opened in the operator's browser can neither take work, hand in results,
/// nor change the work timeout of a server without a token; what browsers
/// send for the job's own page, and what workers and curl send, still works.
#[tokio::test]
async fn pages_of_other_origins_change_nothing() {
    let f = fixture("{\"q\": 1}\n{\"q\": 2}\n", ServeOptions::default());
    let host = ("host", "127.0.0.1:8000");
    type Attack<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, &'a str);
    let attacks: [Attack<'_>; 6] = [
        (
            "GET",
            "/work?batch_size=2",
            vec![("sec-fetch-site", "cross-site")],
            "",
        ),
        (
            "GET",
            "/work",
            vec![("origin", "http://127.0.0.1:8888"), host],
            "",
        ),
        (
            "POST",
            "/results",
            vec![
                ("sec-fetch-site", "same-site"),
                ("content-type", "application/json"),
            ],
            r#"{"items": [{"work_id": 0, "result": "1"}]}"#,
        ),
        (
            "POST",
            "/work_timeout",
            vec![("origin", "null"), ("content-type", "text/plain"), host],
            r#"{"timeout": 1}"#,
        ),
        // An old browser that says nothing of where it comes from still
        // cannot send JSON without asking first.
        (
            "POST",
            "/work_timeout",
            vec![("content-type", "application/x-www-form-urlencoded")],
            r#"{"timeout": 1}"#,
        ),
        ("GET", "/status", vec![("sec-fetch-site", "cross-site")], ""),
    ];
    for (method, uri, headers, body) in &attacks {
        let (code, r) = call_with(&f.router, method, uri, headers, body).await;
        assert!(
            code == StatusCode::FORBIDDEN || code == StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{method} {uri} {headers:?}: {code} {r}"
        );
        assert_eq!(r["status"], "error", "{r}");
    }
    let own_page = [("sec-fetch-site", "same-origin"), host];
    let (code, s) = call_with(&f.router, "GET", "/status", &own_page, "").await;
    assert_eq!(code, StatusCode::OK, "{s}");
    assert_eq!(
        (&s["next_work_id"], &s["work_timeout_secs"]),
        (&0.into(), &60.0.into()),
        "nothing was issued and the timeout is unchanged: {s}"
    );
    // A worker (no browser headers) and a script posting JSON.
    let (code, w) = call(&f.router, "GET", "/work?batch_size=2", "").await;
    assert_eq!(
        (code, w["items"].as_array().map(Vec::len)),
        (StatusCode::OK, Some(2))
    );
    let (code, r) = call_with(
        &f.router,
        "POST",
        "/work_timeout",
        &[("content-type", "application/json")],
        r#"{"timeout": 30}"#,
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{r}");
}

/// The optional fields of a heartbeat never cost its lease renewal: a
/// malformed `prefix_cache` or `usage` is ignored, as are more hits than
/// queries, and counts given as an array are not counts.
#[tokio::test]
async fn a_heartbeat_with_malformed_optional_fields_still_renews() {
    let f = fixture("a\n", ServeOptions::default());
    call(&f.router, "GET", "/work?worker=w", "").await;
    for extra in [
        r#""prefix_cache": [1, 2]"#,
        r#""prefix_cache": {"queries": 10, "hits": 50}"#,
        r#""prefix_cache": {"queries": -1, "hits": 0}"#,
        r#""prefix_cache": "lots""#,
        r#""usage": [1, 2, 3]"#,
        r#""usage": {"requests": 1.5}"#,
    ] {
        let body = format!(r#"{{"work_ids": [0], "worker": "w", {extra}}}"#);
        let (code, r) = call(&f.router, "POST", "/heartbeat", &body).await;
        assert_eq!(
            (code, &r["extended"]),
            (StatusCode::OK, &1.into()),
            "{extra}: {r}"
        );
    }
    let (_, s) = call(&f.router, "GET", "/status", "").await;
    assert!(s.get("prefix_cache").is_none(), "{s}");
    assert_eq!(s["tokens"]["requests"], 0, "{s}");
}

/// Journal counts near `u64::MAX` stop there instead of starting again
/// from zero.
#[tokio::test]
async fn journal_counts_saturate() {
    let f = fixture("a\n", ServeOptions::default());
    for _ in 0..2 {
        let body = format!(
            r#"{{"entries": [], "replayed": {}, "tokens_saved": {}}}"#,
            u64::MAX - 1,
            u64::MAX
        );
        let (code, r) = call(&f.router, "POST", "/journal", &body).await;
        assert_eq!(code, StatusCode::OK, "{r}");
    }
    let (_, s) = call(&f.router, "GET", "/status", "").await;
    assert_eq!(s["journal_replayed"], u64::MAX, "{s}");
    assert_eq!(s["journal_tokens_saved"], u64::MAX, "{s}");
    let (_, text) = call(&f.router, "GET", "/metrics", "").await;
    assert!(
        text.as_str().unwrap().contains(&format!(
            "dispatcher_journal_replayed_requests_total {}",
            u64::MAX
        )),
        "{text}"
    );
}

/// Every error is JSON: a repeated query key, an unknown path, a method an
/// endpoint does not take.
#[tokio::test]
async fn every_error_is_json() {
    let f = fixture("a\n", ServeOptions::default());
    for (method, uri, code) in [
        (
            "GET",
            "/status?history=1&history=2",
            StatusCode::BAD_REQUEST,
        ),
        (
            "GET",
            "/work?batch_size=1&batch_size=2",
            StatusCode::BAD_REQUEST,
        ),
        ("GET", "/nothing-here", StatusCode::NOT_FOUND),
        ("DELETE", "/work", StatusCode::METHOD_NOT_ALLOWED),
    ] {
        let (got, r) = call_with(&f.router, method, uri, &[], "").await;
        assert_eq!(got, code, "{method} {uri}: {r}");
        assert_eq!(r["status"], "error", "{r}");
        assert!(!r["error"].as_str().unwrap().is_empty(), "{r}");
    }
}

/// Kinds come from the input (a line with an `__ERROR__` key): 5,000 of
/// them list 100 in `/status` and as metrics series, count the rest, and
/// a kind is kept at most 128 bytes long.
#[tokio::test]
async fn failure_kinds_are_bounded_in_status_and_metrics() {
    let lines = 5_000_u64;
    let input: String = (0..lines).map(|i| format!("{i}\n")).collect();
    let f = fixture(&input, ServeOptions::default());
    call(&f.router, "GET", &format!("/work?batch_size={lines}"), "").await;
    let long = "k".repeat(10_000);
    let items: Vec<serde_json::Value> = (0..lines)
        .map(|i| {
            let kind = if i == 0 {
                long.clone()
            } else {
                format!("kind-{i}")
            };
            let result = serde_json::json!({"__ERROR__": {"error": kind}}).to_string();
            serde_json::json!({"work_id": i, "result": result})
        })
        .collect();
    let body = serde_json::json!({ "items": items }).to_string();
    let (code, r) = call(&f.router, "POST", "/results", &body).await;
    assert_eq!(code, StatusCode::OK, "{r}");
    let (_, s) = call(&f.router, "GET", "/status", "").await;
    let kinds = s["failed_by_kind"].as_object().unwrap();
    assert_eq!(kinds.len(), crate::ledger::MAX_FAILURE_KINDS);
    assert_eq!(
        s["failure_examples"].as_object().unwrap().len(),
        kinds.len()
    );
    let listed: u64 = kinds.values().map(|n| n.as_u64().unwrap()).sum();
    assert_eq!(
        listed + s["failed_unlisted"].as_u64().unwrap(),
        lines,
        "{s}"
    );
    assert!(kinds
        .keys()
        .all(|k| k.len() <= crate::ledger::MAX_KIND_BYTES));
    assert!(kinds.contains_key(&"k".repeat(crate::ledger::MAX_KIND_BYTES)));
    let (_, text) = call(&f.router, "GET", "/metrics", "").await;
    let text = text.as_str().unwrap();
    let series = text
        .lines()
        .filter(|l| l.starts_with("dispatcher_failed_lines_total{"))
        .count();
    assert_eq!(series, crate::ledger::MAX_FAILURE_KINDS + 1, "{text}");
    assert!(text.contains(&format!(
        "dispatcher_failed_lines_total{{kind=\"{}\"}} {}",
        crate::metrics::UNLISTED_KIND,
        lines - crate::ledger::MAX_FAILURE_KINDS as u64
    )));
}
