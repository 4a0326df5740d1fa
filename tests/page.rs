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
