//! The job page at the server's `/`, in a real headless Chromium (Debian's
//! `chromium` and `chromium-driver`, which scripts/setup-browser.sh
//! installs), against a live server and real `infer` workers. Without a
//! browser these tests say so and pass, unless `DISPATCHER_REQUIRE_BROWSER=1`
//! (scripts/test.sh sets it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dispatcher_testkit::browser::Browser;
use serde_json::Value;

use crate::support::{dispatcher_bin, jsonl, serve_process};

/// `lines` prompts; line 7 has none, so `infer --prompt-path .prompt` fails
/// it (`prompt_missing`).
fn write_input(dir: &Path, lines: usize) {
    let text: String = (0..lines)
        .map(|i| {
            if i == 7 {
                format!("{{\"id\": {i}}}\n")
            } else {
                format!("{{\"id\": {i}, \"prompt\": \"question number {i}\"}}\n")
            }
        })
        .collect();
    std::fs::write(dir.join("in.jsonl"), text).unwrap();
}

/// An `infer` worker on the echo engine, slowed so that a page sees the job
/// move: `concurrency` requests at a time, each `latency_ms`.
fn infer_worker(addr: &str, latency_ms: u32, concurrency: u32, extra: &[&str]) -> Child {
    Command::new(dispatcher_bin())
        .args([
            "infer",
            "--dispatcher",
            addr,
            "--engine",
            "echo",
            "--prompt-path",
            ".prompt",
        ])
        .args(["--echo-latency-ms", &latency_ms.to_string()])
        .args(["--echo-max-concurrency", &concurrency.to_string()])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Where the tests keep their screenshots.
fn artifact(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/test-artifacts")
        .join(name)
}

/// A number the page shows, as it shows it (`1,234`).
fn number_of(id: &str) -> String {
    format!("Number(document.getElementById('{id}').textContent.replace(/,/g, ''))")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_progress_workers_tokens_and_failures_live() {
    let Some(browser) = Browser::for_test(1400, 1100).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let lines = 400;
    write_input(dir.path(), lines);
    let server = serve_process(
        dir.path(),
        &[
            "--exit-grace",
            "60",
            "--price-per-mtok-in",
            "0.5",
            "--price-per-mtok-out",
            "2",
        ],
    );
    let origin = format!("http://{}", server.addr);
    let mut workers = [
        infer_worker(&server.addr, 400, 4, &[]),
        infer_worker(&server.addr, 600, 4, &[]),
    ];

    browser.goto(&format!("{origin}/")).await;
    let done = number_of("done");
    let first = browser
        .wait_for(
            "lines done",
            &format!("const n = {done}; return n > 0 ? n : null;"),
            Duration::from_secs(30),
        )
        .await;
    let later = browser
        .wait_for(
            "the number of lines growing",
            &format!("const n = {done}; return n > {first} ? n : null;"),
            Duration::from_secs(30),
        )
        .await;
    assert!(later.as_u64() > first.as_u64());
    assert_eq!(
        browser
            .eval("return document.getElementById('total').textContent;")
            .await,
        "400"
    );

    // Both workers, one row each, as they said hello.
    let rows = browser
        .wait_for(
            "both workers",
            "const rows = [...document.querySelectorAll('#workers tr')]; \
             return rows.length == 2 ? rows.map(r => [...r.cells].map(c => c.textContent)) : null;",
            Duration::from_secs(30),
        )
        .await;
    for row in rows.as_array().unwrap() {
        let cells: Vec<&str> = row
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(
            (cells[1], cells[2], cells[3]),
            ("infer", "echo", "echo"),
            "{cells:?}"
        );
        assert!(["active", "idle"].contains(&cells[8]), "{cells:?}");
    }

    // The failing line's kind, with the line as its example.
    let failure = browser
        .wait_for(
            "the error kind of line 7",
            "const row = document.querySelector('#failures tr[data-kind=\"prompt_missing\"]'); \
             return row ? row.textContent : null;",
            Duration::from_secs(30),
        )
        .await;
    let failure = failure.as_str().unwrap();
    assert!(failure.contains("line 7:"), "{failure}");

    // Tokens and what they cost, from the workers' reports.
    let tokens = browser
        .wait_for(
            "tokens",
            "const t = document.getElementById('tokens-total').textContent; \
             return /^0 /.test(t) ? null : t;",
            Duration::from_secs(30),
        )
        .await;
    assert!(tokens.as_str().unwrap().ends_with("tokens"), "{tokens}");
    let cost = browser
        .eval("const c = document.getElementById('cost'); return c.hidden ? null : c.textContent;")
        .await;
    assert!(
        cost.as_str().is_some_and(|c| c.contains("projected")),
        "{cost}"
    );

    browser.screenshot(&artifact("page-running.png")).await;

    // To the end: the page says so, and agrees with the output.
    browser
        .wait_for(
            "the job complete",
            "return document.getElementById('headline').textContent == 'complete';",
            Duration::from_secs(60),
        )
        .await;
    browser.screenshot(&artifact("page.png")).await;
    let shown = browser.eval(&format!("return {done};")).await;
    assert_eq!(shown, Value::from(lines));
    assert_eq!(jsonl(dir.path().join("out.jsonl")).len(), lines);

    // The page asked nothing of any host but the server (and did ask it).
    let urls = browser.requested_urls().await;
    assert!(
        urls.iter()
            .any(|u| u.starts_with(&format!("{origin}/status"))),
        "{urls:?}"
    );
    let elsewhere: Vec<&String> = urls
        .iter()
        .filter(|u| !u.starts_with(&format!("{origin}/")))
        .collect();
    assert!(
        elsewhere.is_empty(),
        "the page asked other hosts: {elsewhere:?}"
    );

    for w in &mut workers {
        let _ = w.kill();
        let _ = w.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_page_asks_for_it_and_shows_nothing_before() {
    let Some(browser) = Browser::for_test(1000, 800).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    write_input(dir.path(), 200);
    let server = serve_process(dir.path(), &["--exit-grace", "60", "--token", "s3cret"]);
    let origin = format!("http://{}", server.addr);
    let mut worker = infer_worker(&server.addr, 500, 2, &["--token", "s3cret"]);

    browser.goto(&format!("{origin}/")).await;
    browser
        .wait_for(
            "the token prompt",
            "return !document.getElementById('login').hidden;",
            Duration::from_secs(20),
        )
        .await;
    let shown = browser
        .eval(
            "return [document.getElementById('job').hidden, \
                     document.getElementById('total').textContent, \
                     document.querySelectorAll('#workers tr').length];",
        )
        .await;
    assert_eq!(
        shown,
        serde_json::json!([true, "?", 0]),
        "nothing of the job before the token"
    );

    browser.type_into("#token", "wrong").await;
    browser.click("#login button").await;
    browser
        .wait_for(
            "the wrong token refused",
            "return document.getElementById('login-error').textContent.includes('refused');",
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(
        browser
            .eval("return document.getElementById('job').hidden;")
            .await,
        true
    );

    browser.type_into("#token", "s3cret").await;
    browser.click("#login button").await;
    browser
        .wait_for(
            "the job after the token",
            "return !document.getElementById('job').hidden && \
                    document.getElementById('total').textContent == '200';",
            Duration::from_secs(20),
        )
        .await;
    let done = number_of("done");
    browser
        .wait_for(
            "lines done",
            &format!("return {done} > 0;"),
            Duration::from_secs(30),
        )
        .await;
    browser.screenshot(&artifact("page-token.png")).await;

    // The token went as a header, never in a URL.
    let urls = browser.requested_urls().await;
    assert!(urls.iter().any(|u| u.contains("/status")), "{urls:?}");
    assert!(!urls.iter().any(|u| u.contains("s3cret")), "{urls:?}");
    let _ = worker.kill();
    let _ = worker.wait();
}

/// Serves `html` to every request on a port of its own: a page of another
/// origin, as a site the operator has open would be. Answers at most
/// `requests` requests.
fn other_origin(html: String, requests: usize) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(requests) {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut head = [0_u8; 4096];
            let _ = stream.read(&mut head);
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{html}",
                html.len()
            );
        }
    });
    addr
}

/// A page on another origin, opened in the operator's browser while the
/// job's port is reachable, tries what a page can do without asking the
/// server first: take work, hand in results, change the work timeout. The
/// server (without a token, the default) refuses all of it; the job's own
/// page still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_another_origin_cannot_drive_the_job() {
    let Some(browser) = Browser::for_test(1000, 800).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    write_input(dir.path(), 20);
    let server = serve_process(dir.path(), &["--exit-grace", "60"]);
    let target = format!("http://{}", server.addr);
    let attack = format!(
        r#"<!doctype html><title>loading</title><script>
const t = "{target}";
const tries = [
  fetch(t + "/work?batch_size=20", {{mode: "no-cors"}}),
  fetch(t + "/work_timeout", {{method: "POST", mode: "no-cors", body: '{{"timeout": 1}}'}}),
  fetch(t + "/results", {{method: "POST", mode: "no-cors",
    body: new Blob(['{{"items": [{{"work_id": 0, "result": "{{\\"pwned\\": 1}}"}}]}}'])}}),
  fetch(t + "/release", {{method: "POST", mode: "no-cors",
    headers: {{"Content-Type": "text/plain"}}, body: '{{"work_ids": [0]}}'}}),
];
Promise.allSettled(tries).then(() => {{ document.title = "sent"; }});
</script>"#
    );
    let site = other_origin(attack, 8);
    browser.goto(&format!("http://{site}/")).await;
    browser
        .wait_for(
            "the cross-site requests sent",
            "return document.title == 'sent';",
            Duration::from_secs(20),
        )
        .await;
    let urls = browser.requested_urls().await;
    assert!(
        urls.iter()
            .any(|u| u.starts_with(&format!("{target}/work"))),
        "the browser did send the requests: {urls:?}"
    );

    let status: Value = reqwest::get(format!("{target}/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["next_work_id"], 0, "no work was taken: {status}");
    assert_eq!(status["issued_total"], 0, "{status}");
    assert_eq!(status["work_timeout_secs"], 1200.0, "{status}");
    assert_eq!(status["lines_done"], 0, "{status}");

    // The job's own page reads the job.
    browser.goto(&format!("{target}/")).await;
    browser
        .wait_for(
            "the job's own page",
            "return !document.getElementById('job').hidden && \
                    document.getElementById('total').textContent == '20';",
            Duration::from_secs(20),
        )
        .await;
}

/// Text from workers and input lines (a long host name, a long failure
/// kind, 150 kinds) neither widens the page past its window nor pushes a
/// worker's state out of view; kinds past the server's 100 are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_names_and_many_failure_kinds_keep_the_page_in_its_window() {
    let Some(browser) = Browser::for_test(1400, 1000).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    write_input(dir.path(), 150);
    let server = serve_process(dir.path(), &["--exit-grace", "60"]);
    let target = format!("http://{}", server.addr);
    let http = reqwest::Client::new();
    let host = format!("node-{}.cluster.example", "x".repeat(180));
    let hello = serde_json::json!({"worker": "w1", "host": host, "task": "infer",
        "version": "1", "engine": "echo", "model": "m"});
    let r = http
        .post(format!("{target}/hello"))
        .json(&hello)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let work: Value = http
        .get(format!("{target}/work?batch_size=150&worker=w1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let items: Vec<Value> = work["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| {
            let id = item["work_id"].as_u64().unwrap();
            let kind = format!("kind_{id}_{}", "long".repeat(if id == 0 { 30 } else { 1 }));
            let result = serde_json::json!({"__ERROR__": {"error": kind}}).to_string();
            serde_json::json!({"work_id": id, "result": result})
        })
        .collect();
    let r = http
        .post(format!("{target}/results"))
        .json(&serde_json::json!({"items": items, "worker": "w1"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());

    browser.goto(&format!("{target}/")).await;
    browser
        .wait_for(
            "the kinds not listed",
            "return document.getElementById('failure-count').textContent.includes('50 lines');",
            Duration::from_secs(20),
        )
        .await;
    let rows = browser
        .eval("return document.querySelectorAll('#failures tr').length;")
        .await;
    assert_eq!(rows, 100);
    let fits = browser
        .eval(
            "const state = document.querySelector('#workers tr td:last-child').getBoundingClientRect(); \
             return [document.documentElement.scrollWidth <= window.innerWidth, \
                     state.right <= window.innerWidth, state.width > 0];",
        )
        .await;
    browser.screenshot(&artifact("page-long-names.png")).await;
    assert_eq!(fits, serde_json::json!([true, true, true]));
}
