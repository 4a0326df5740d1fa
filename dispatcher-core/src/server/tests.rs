//! The HTTP layer without a socket, with the exact JSON bodies the Python
//! client sends.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::Router;
use tokio::time::Instant;

use super::*;
use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use tower::ServiceExt;

pub(super) struct Fixture {
    _dir: tempfile::TempDir,
    outfile: std::path::PathBuf,
    state: Arc<AppState>,
    pub(super) router: Router,
}

pub(super) fn fixture(input: &str, options: ServeOptions) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let infile = dir.path().join("in.jsonl");
    std::fs::write(&infile, input).unwrap();
    let outfile = dir.path().join("out.jsonl");
    let config = LedgerConfig {
        work_timeout: Duration::from_secs(60),
        ..LedgerConfig::new(
            infile,
            crate::job::JobFiles::new(outfile.clone(), Some(dir.path().join("cp"))),
        )
    };
    let ledger = Ledger::open(config, Instant::now()).unwrap();
    let state = AppState::new(ledger, &options);
    let router = app(state.clone());
    Fixture {
        _dir: dir,
        outfile,
        state,
        router,
    }
}

pub(super) async fn call(
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
    let in_flight = ledger.stats(Instant::now()).in_flight;
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
        ("/work_timeout", r#"{"timeout": 1e-300}"#),
        ("/work_timeout", r#"{"timeout": 0.5}"#),
        ("/work_timeout", r#"{"timeout": 1e999}"#),
    ] {
        let (code, r) = call(&f.router, "POST", uri, body).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{uri} {body}");
        assert!(!r["error"].as_str().unwrap().is_empty());
    }
    let big = format!(r#"{{"work_ids": [{}]}}"#, vec!["1"; 1000].join(","));
    for uri in ["/release", "/results", "/heartbeat"] {
        let (code, r) = call(&f.router, "POST", uri, &big).await;
        assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE, "{uri}");
        assert_eq!(r["status"], "error", "a JSON answer: {r}");
        assert!(
            r["error"].as_str().unwrap().contains("--max-request-mib"),
            "{r}"
        );
    }
    // Nothing above changed the job.
    let (_, status) = call(&f.router, "GET", "/status", "").await;
    assert_eq!(
        (status["next_work_id"].as_u64(), status["pending"].as_u64()),
        (Some(0), Some(0))
    );
}

#[tokio::test]
async fn a_result_that_is_not_one_json_value_becomes_an_invalid_result_record_at_once() {
    let f = fixture("a\nb\nc\nd\n", ServeOptions::default());
    call(&f.router, "GET", "/work?batch_size=4", "").await;
    let (code, r) = call(
        &f.router,
        "POST",
        "/results",
        r#"{"items": [
            {"work_id": 0, "content": "a", "result": "{\"x\": tru"},
            {"work_id": 1, "content": "b", "result": "2"},
            {"work_id": 2, "content": "c", "result": null},
            {"work_id": 3, "content": "d", "result": {"an": "object"}},
            {"work_id": 99, "content": "?", "result": "not json"}
        ]}"#,
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{r}");
    assert_eq!(
        (r["count"].as_u64(), &r["invalid"]),
        (Some(4), &serde_json::json!([0, 2, 3]))
    );
    assert_eq!(
        r["ignored"], 1,
        "a result for a line never issued writes nothing"
    );
    let out = std::fs::read_to_string(&f.outfile).unwrap();
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert_eq!(lines[1], 2);
    for (i, line) in [(0, &lines[0]), (2, &lines[2]), (3, &lines[3])] {
        let e = &line["__ERROR__"];
        assert_eq!(
            (e["error"].as_str(), e["work_id"].as_u64()),
            (Some("invalid_result"), Some(i)),
            "{line}"
        );
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains(&format!("work_id {i}")),
            "{line}"
        );
    }
    assert_eq!(lines[0]["__ERROR__"]["result_head"], "{\"x\": tru");
    assert!(lines[3]["__ERROR__"]["message"]
        .as_str()
        .unwrap()
        .contains("an object"));
}

#[tokio::test]
async fn results_as_python_json_writes_them_are_accepted_and_kept_on_one_line() {
    let f = fixture("a\nb\nc\n", ServeOptions::default());
    call(&f.router, "GET", "/work?batch_size=3", "").await;
    let body = serde_json::json!({"items": [
        {"work_id": 0, "result": "{\"score\": NaN, \"hi\": Infinity, \"lo\": -Infinity, \"s\": \"NaN stays\"}"},
        {"work_id": 1, "result": "{\n  \"a\": [\r\n    1,\n    2\n  ]\n}"},
        {"work_id": 2, "result": "[1]"}
    ]});
    let (code, r) = call(&f.router, "POST", "/results", &body.to_string()).await;
    assert_eq!(
        (code, r["count"].as_u64()),
        (StatusCode::OK, Some(3)),
        "{r}"
    );
    assert!(r.get("invalid").is_none(), "{r}");
    let out = std::fs::read_to_string(&f.outfile).unwrap();
    assert_eq!(
        out,
        "{\"score\": NaN, \"hi\": Infinity, \"lo\": -Infinity, \"s\": \"NaN stays\"}\n{  \"a\": [    1,    2  ]}\n[1]\n"
    );
}

#[tokio::test]
async fn an_item_without_a_usable_work_id_is_refused_alone() {
    let f = fixture("a\nb\n", ServeOptions::default());
    call(&f.router, "GET", "/work?batch_size=2", "").await;
    let (code, r) = call(
        &f.router,
        "POST",
        "/results",
        r#"{"items": [{"work_id": "zero", "result": "0"}, {"work_id": -1, "result": "0"}, {"work_id": 1, "result": "1"}]}"#,
    )
    .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r["count"], 1, "the good item is accepted: {r}");
    assert!(r["error"].as_str().unwrap().contains("items[0]"), "{r}");
    let (_, status) = call(&f.router, "GET", "/status", "").await;
    assert_eq!(
        (status["issued"].as_u64(), status["pending"].as_u64()),
        (Some(1), Some(1))
    );
}

#[tokio::test]
async fn drop_in_details_of_the_python_server() {
    let options = ServeOptions {
        max_batch_size: 2,
        ..ServeOptions::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let infile = dir.path().join("in.jsonl");
    std::fs::write(&infile, "a\nb\nc\n").unwrap();
    let config = LedgerConfig {
        max_retries: None,
        ..LedgerConfig::new(
            infile,
            crate::job::JobFiles::new(dir.path().join("out"), Some(dir.path().join("cp"))),
        )
    };
    let state = AppState::new(Ledger::open(config, Instant::now()).unwrap(), &options);
    let router = app(state);
    // A batch_size above --max-batch-size gets that many, with 200.
    let (code, r) = call(&router, "GET", "/work?batch_size=500", "").await;
    assert_eq!(code, StatusCode::OK, "{r}");
    assert_eq!(r["items"].as_array().unwrap().len(), 2);
    // Unlimited retries are -1 on the wire, as the Python server writes them.
    assert_eq!(r["items"][0]["max_retries"], -1);
}

#[tokio::test]
async fn the_token_scheme_is_case_insensitive_and_the_token_exact() {
    let options = ServeOptions {
        token: Some("s3cret".into()),
        ..ServeOptions::default()
    };
    let f = fixture("a\n", options);
    for (header, ok) in [
        ("Bearer s3cret", true),
        ("bearer s3cret", true),
        ("BEARER s3cret", true),
        ("Bearer s3cre", false),
        ("Bearer s3cret2", false),
        ("Bearer S3CRET", false),
        ("Basic s3cret", false),
        ("s3cret", false),
        ("Bearer ", false),
    ] {
        let req = axum::http::Request::builder()
            .uri("/status")
            .header("authorization", header)
            .body(axum::body::Body::empty())
            .unwrap();
        let resp = tower::ServiceExt::oneshot(f.router.clone(), req)
            .await
            .unwrap();
        let expected = if ok {
            StatusCode::OK
        } else {
            StatusCode::UNAUTHORIZED
        };
        assert_eq!(resp.status(), expected, "{header:?}");
    }
}

#[tokio::test]
async fn heartbeats_and_releases_read_a_repeated_id_once() {
    let f = fixture("a\nb\n", ServeOptions::default());
    call(&f.router, "GET", "/work?batch_size=2", "").await;
    let repeated = format!(r#"{{"work_ids": [{}]}}"#, vec!["1"; 100_000].join(","));
    let (code, r) = call(&f.router, "POST", "/heartbeat", &repeated).await;
    assert_eq!(
        (code, r["extended"].as_u64()),
        (StatusCode::OK, Some(1)),
        "{r}"
    );
    let (code, r) = call(&f.router, "POST", "/release", &repeated).await;
    assert_eq!(
        (code, r["released_count"].as_u64()),
        (StatusCode::OK, Some(1)),
        "{r}"
    );
}

#[tokio::test]
async fn a_release_from_a_worker_that_no_longer_holds_the_item_is_ignored() {
    let options = ServeOptions::default();
    let dir = tempfile::tempdir().unwrap();
    let infile = dir.path().join("in.jsonl");
    std::fs::write(&infile, "a\n").unwrap();
    let config = LedgerConfig {
        work_timeout: Duration::from_secs(1),
        max_retries: Some(1),
        ..LedgerConfig::new(
            infile,
            crate::job::JobFiles::new(dir.path().join("out"), Some(dir.path().join("cp"))),
        )
    };
    let state = AppState::new(Ledger::open(config, Instant::now()).unwrap(), &options);
    let router = app(state);
    let (_, r) = call(&router, "GET", "/work?worker=a", "").await;
    assert_eq!(r["items"][0]["work_id"], 0);
    // A's lease runs out; B gets the item.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, r) = call(&router, "GET", "/work?worker=b", "").await;
    assert_eq!(r["items"][0]["work_id"], 0, "{r}");
    // A releases it as a retry: ignored, so B's run is neither cut short nor
    // counted as a second failure (which would tombstone it).
    let (code, r) = call(
        &router,
        "POST",
        "/release",
        r#"{"work_ids": [0], "reason": "retry", "worker": "a"}"#,
    )
    .await;
    assert_eq!(
        (code, r["released_count"].as_u64()),
        (StatusCode::OK, Some(0))
    );
    let (_, status) = call(&router, "GET", "/status", "").await;
    assert_eq!(
        (status["in_flight"].as_u64(), status["tombstones"].as_u64()),
        (Some(1), Some(0))
    );
    // B's result is written.
    let (_, r) = call(
        &router,
        "POST",
        "/results",
        r#"{"items": [{"work_id": 0, "result": "\"b\""}]}"#,
    )
    .await;
    assert_eq!(r["count"], 1);
}

#[tokio::test]
async fn the_total_is_known_before_the_input_is_read_to_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let infile = dir.path().join("in.jsonl");
    // 1,000 lines, the last without its newline.
    let input: String = (0..1000).map(|i| format!("{i}\n")).collect();
    std::fs::write(&infile, input.trim_end()).unwrap();
    let options = ServeOptions::default();
    let config = LedgerConfig::new(
        infile,
        crate::job::JobFiles::new(dir.path().join("out"), Some(dir.path().join("cp"))),
    );
    let state = open(config, &options).unwrap();
    let router = app(state);
    call(&router, "GET", "/work?batch_size=3", "").await;
    let start = std::time::Instant::now();
    let status = loop {
        let (_, status) = call(&router, "GET", "/status", "").await;
        if !status["lines_total"].is_null() || start.elapsed() > Duration::from_secs(10) {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(status["lines_total"], 1000, "{status}");
    assert_eq!(status["next_work_id"], 3, "only three lines were read");
}

/// The server counts the failed lines it writes by kind, with the classifier
/// `report` uses: results that are error records, and invalid results.
#[tokio::test]
async fn failed_lines_are_counted_by_kind_in_status_and_metrics() {
    let f = fixture("a\nb\nc\nd\n", ServeOptions::default());
    call(&f.router, "GET", "/work?batch_size=4", "").await;
    let rejected =
        serde_json::json!({"__ERROR__": {"error": "request_rejected", "message": "too long"}})
            .to_string();
    let own_error_field = serde_json::json!({"error": "a task's own field"}).to_string();
    let body = serde_json::json!({"items": [
        {"work_id": 0, "content": "", "result": rejected},
        {"work_id": 1, "content": "", "result": own_error_field},
        {"work_id": 2, "content": "", "result": "{not json"},
    ]});
    call(&f.router, "POST", "/results", &body.to_string()).await;
    let (_, status) = call(&f.router, "GET", "/status", "").await;
    assert_eq!(
        status["failed_by_kind"],
        serde_json::json!({"invalid_result": 1, "request_rejected": 1})
    );
    let (_, text) = call(&f.router, "GET", "/metrics", "").await;
    let m = series(text.as_str().unwrap());
    assert_eq!(
        m["dispatcher_failed_lines_total{kind=\"request_rejected\"}"],
        1.0
    );
    assert_eq!(
        m["dispatcher_failed_lines_total{kind=\"invalid_result\"}"],
        1.0
    );
}

/// Workers report their engine's prefix cache counters with heartbeats;
/// `/status` lists them per worker and summed, and leaves them out while
/// no worker reports any.
#[tokio::test]
async fn heartbeats_carry_the_engines_prefix_cache_counters_into_status() {
    let f = fixture("a\nb\nc\n", ServeOptions::default());
    let (_, s) = call(&f.router, "GET", "/status", "").await;
    assert!(s.get("prefix_cache").is_none(), "{s}");
    for (worker, queries, hits) in [("w1", 1000, 900), ("w2", 500, 100)] {
        call(
            &f.router,
            "GET",
            &format!("/work?batch_size=1&worker={worker}"),
            "",
        )
        .await;
        let body = format!(
            r#"{{"work_ids": [], "worker": "{worker}", "prefix_cache": {{"queries": {queries}, "hits": {hits}}}}}"#
        );
        let (code, r) = call(&f.router, "POST", "/heartbeat", &body).await;
        assert_eq!(code, StatusCode::OK, "{r}");
    }
    // A heartbeat without counters (an older worker) changes nothing.
    call(
        &f.router,
        "POST",
        "/heartbeat",
        r#"{"work_ids": [], "worker": "w1"}"#,
    )
    .await;
    let (_, s) = call(&f.router, "GET", "/status", "").await;
    assert_eq!(
        s["prefix_cache"],
        serde_json::json!({"queries": 1500, "hits": 1000})
    );
    let w1 = s["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["worker"] == "w1")
        .unwrap();
    assert_eq!(w1["prefix_cache"]["hits"], 900, "{s}");
}

/// A long job on preemptible nodes meets a new worker at every restart:
/// `/status` (which every open page reads each second) lists the live
/// workers and the last gone ones, and counts the others.
#[tokio::test(start_paused = true)]
async fn status_lists_live_workers_and_only_the_last_gone_ones() {
    let f = fixture("a\nb\n", ServeOptions::default());
    let heartbeat = |worker: String| {
        let router = f.router.clone();
        async move {
            let body = format!(r#"{{"work_ids": [], "worker": "{worker}"}}"#);
            let (code, r) = call(&router, "POST", "/heartbeat", &body).await;
            assert_eq!(code, StatusCode::OK, "{r}");
        }
    };
    for i in 0..130 {
        heartbeat(format!("preempted-{i:03}")).await;
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    // Past the work timeout (60 s here) they are gone; two are alive.
    tokio::time::advance(Duration::from_secs(120)).await;
    heartbeat("live-a".into()).await;
    heartbeat("live-b".into()).await;
    let (_, s) = call(&f.router, "GET", "/status", "").await;
    let rows = s["workers"].as_array().unwrap();
    assert_eq!(rows.len(), 2 + 100, "{s}");
    assert_eq!(s["workers_unlisted"], 30);
    let names: Vec<&str> = rows.iter().map(|w| w["worker"].as_str().unwrap()).collect();
    assert_eq!(&names[..3], ["live-a", "live-b", "preempted-129"]);
    assert_eq!(names.last(), Some(&"preempted-030"));
    assert!(rows[2..].iter().all(|w| w["state"] == "gone"), "{s}");
    let (_, metrics) = call(&f.router, "GET", "/metrics", "").await;
    let metrics = metrics.as_str().unwrap();
    assert!(
        metrics.lines().any(|l| l == "dispatcher_workers_seen 132"),
        "{metrics}"
    );
}

/// What the server keeps of each worker is small: a hello of at most 1 MiB,
/// its settings (a long few-shot prompt) left to the manifest and not
/// repeated in every `/status` row, its strings and id shown cut to 256 bytes.
#[tokio::test]
async fn a_hello_is_bounded_and_status_rows_leave_its_settings_to_the_manifest() {
    let f = fixture("a\n", ServeOptions::default());
    let system = "You are a careful translator. ".repeat(4000);
    let hello = serde_json::json!({
        "worker": "w1", "host": "gpu-7", "task": "infer", "version": "v".repeat(1000),
        "engine": "vllm", "model": "m", "settings": {"system": system, "temperature": 0.3},
    });
    let (code, r) = call(&f.router, "POST", "/hello", &hello.to_string()).await;
    assert_eq!(code, StatusCode::OK, "{r}");
    let huge = serde_json::json!({
        "worker": "w2", "task": "infer", "settings": {"data": "x".repeat(1 << 20)},
    });
    let (code, r) = call(&f.router, "POST", "/hello", &huge.to_string()).await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE, "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("at most 1 MiB"),
        "{r}"
    );
    let long_id = "n".repeat(10_000);
    let body = format!(r#"{{"work_ids": [], "worker": "{long_id}"}}"#);
    assert_eq!(
        call(&f.router, "POST", "/heartbeat", &body).await.0,
        StatusCode::OK
    );

    let (_, s) = call(&f.router, "GET", "/status", "").await;
    let rows = s["workers"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "the refused hello registered nothing: {s}");
    let w1 = rows.iter().find(|w| w["worker"] == "w1").unwrap();
    assert_eq!(w1["hello"]["host"], "gpu-7");
    assert_eq!(w1["hello"]["version"], "v".repeat(256));
    assert!(w1["hello"].get("settings").is_none(), "{w1}");
    assert!(rows.iter().any(|w| w["worker"] == "n".repeat(256)), "{s}");
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(crate::job::manifest::manifest_path(&f.outfile)).unwrap(),
    )
    .unwrap();
    let configs = manifest["worker_configurations"].as_array().unwrap();
    assert_eq!(configs.len(), 1, "{configs:?}");
    assert_eq!(configs[0]["settings"]["system"], system.as_str());
}

/// Workers report the tokens they used since their last report with
/// results and heartbeats; `/status` adds each report once, per worker and
/// over all, prices them, and a malformed report costs none of the results
/// it came with.
#[tokio::test]
async fn tokens_reported_with_results_and_heartbeats_add_up_in_status() {
    let options = ServeOptions {
        prices: Some(crate::protocol::Prices {
            per_mtok_in: 1.0,
            per_mtok_out: 4.0,
        }),
        ..ServeOptions::default()
    };
    let f = fixture("a\nb\nc\nd\n", options);
    f.state.input_lines.set(4).unwrap();
    call(&f.router, "GET", "/work?batch_size=2&worker=w1", "").await;
    call(&f.router, "GET", "/work?batch_size=2&worker=w2", "").await;
    let (code, r) = call(
        &f.router,
        "POST",
        "/results",
        r#"{"items": [{"work_id": 0, "result": "1"}], "worker": "w1",
            "usage": {"requests": 2, "prompt_tokens": 1000, "completion_tokens": 100}}"#,
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{r}");
    let (code, r) = call(
        &f.router,
        "POST",
        "/heartbeat",
        r#"{"work_ids": [], "worker": "w2",
            "usage": {"requests": 1, "prompt_tokens": 500, "completion_tokens": 50}}"#,
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{r}");
    // A malformed report: the result is taken, the counts are not.
    let (code, r) = call(
        &f.router,
        "POST",
        "/results",
        r#"{"items": [{"work_id": 2, "result": "3"}], "worker": "w2", "usage": "lots"}"#,
    )
    .await;
    assert_eq!((code, &r["count"]), (StatusCode::OK, &1.into()), "{r}");
    let (_, s) = call(&f.router, "GET", "/status", "").await;
    assert_eq!(
        s["tokens"],
        serde_json::json!({"requests": 3, "prompt_tokens": 1500, "completion_tokens": 150})
    );
    let worker = |id: &str| {
        s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["worker"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(worker("w1")["tokens"]["prompt_tokens"], 1000);
    assert_eq!(worker("w2")["tokens"]["completion_tokens"], 50);
    assert_eq!(worker("w1")["state"], "active", "it holds line 1");
    // 1500 prompt tokens at 1 and 150 generated at 4 per million; one line
    // in four is written (line 0: line 2 waits for line 1).
    assert_eq!(s["cost"]["so_far"], 0.0021);
    assert_eq!(s["cost"]["projected"], 0.0084);
    // The manifest keeps this run's tokens once they are saved (at each
    // checkpoint and at the stop).
    f.state.save_tokens();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(crate::job::manifest::manifest_path(&f.outfile)).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["runs"][0]["tokens"], s["tokens"]);
}

/// The first failed line of each kind is kept as its example.
#[tokio::test]
async fn status_keeps_the_first_failed_line_of_each_kind() {
    let f = fixture("a\nb\nc\n", ServeOptions::default());
    call(&f.router, "GET", "/work?batch_size=3", "").await;
    let record = |n: u32| {
        serde_json::json!({"__ERROR__": {"error": "request_rejected", "message": format!("too long {n}")}})
            .to_string()
    };
    let body = serde_json::json!({"items": [
        {"work_id": 2, "result": record(2)},
        {"work_id": 0, "result": record(0)},
        {"work_id": 1, "result": "{not json"},
    ]});
    call(&f.router, "POST", "/results", &body.to_string()).await;
    let (_, s) = call(&f.router, "GET", "/status", "").await;
    let examples = &s["failure_examples"];
    assert_eq!(examples["request_rejected"]["work_id"], 2, "{s}");
    assert!(examples["request_rejected"]["line"]
        .as_str()
        .unwrap()
        .contains("too long 2"));
    assert_eq!(examples["invalid_result"]["work_id"], 1);
}

/// `?max_age` lets any number of pages share one answer a second; without
/// it every answer is made fresh. `?history=1` adds the samples.
#[tokio::test]
async fn status_answers_from_its_cache_only_when_asked_and_adds_the_history() {
    let f = fixture("a\nb\nc\n", ServeOptions::default());
    f.state.sample_progress(0);
    let (_, cached) = call(&f.router, "GET", "/status?max_age=30", "").await;
    assert_eq!(cached["lines_done"], 0);
    call(&f.router, "GET", "/work?batch_size=1", "").await;
    call(
        &f.router,
        "POST",
        "/results",
        r#"{"items": [{"work_id": 0, "result": "1"}]}"#,
    )
    .await;
    let (_, again) = call(&f.router, "GET", "/status?max_age=30", "").await;
    assert_eq!(again["lines_done"], 0, "an answer up to 30 s old will do");
    let (_, fresh) = call(&f.router, "GET", "/status", "").await;
    assert_eq!(fresh["lines_done"], 1);
    assert!(fresh.get("history").is_none());
    let (_, with_history) = call(&f.router, "GET", "/status?history=1", "").await;
    let samples = with_history["history"].as_array().unwrap();
    // The sample taken, and now.
    assert_eq!(samples.len(), 2, "{with_history}");
    assert_eq!(samples[0]["lines_done"], 0);
    assert_eq!(samples[1]["lines_done"], 1);
}

/// The page is served to anyone (it holds nothing of the job) and may load
/// nothing from elsewhere; the job itself stays behind the token.
#[tokio::test]
async fn the_page_is_served_without_the_token_and_confined_to_this_server() {
    let options = ServeOptions {
        token: Some("s3cret".into()),
        ..ServeOptions::default()
    };
    let f = fixture("a\n", options);
    for path in ["/", "/page.js"] {
        let req = Request::builder().uri(path).body(Body::empty()).unwrap();
        let resp = f.router.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let csp = resp.headers()["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"));
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8(body.to_vec()).unwrap();
        // No address but the SVG namespace (a name, never fetched).
        let text = text.replace("\"http://www.w3.org/2000/svg\"", "");
        assert!(
            !text.contains("http://") && !text.contains("https://"),
            "{path}"
        );
    }
    let (code, _) = call(&f.router, "GET", "/status?max_age=1", "").await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
}
