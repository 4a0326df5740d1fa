//! Tokens and time end to end: what workers report to the server (its
//! `/status`, the manifest) against what the lines themselves say (`infer
//! --include-usage`), across a restart of the server; and what `dispatcher
//! report` and `dispatcher status` make of them.

use std::process::{Command, Stdio};
use std::time::Duration;

use dispatcher::client::DispatcherClient;
use dispatcher::protocol::TokenCounts;
use serde_json::Value;

use crate::support::{
    dispatcher_bin, jsonl, question_lines, serve_process, succeed, wait_exit, ServerProcess,
};

/// Prompt and completion tokens the output's lines say they used.
fn usage_of_lines(lines: &[Value]) -> (u64, u64) {
    lines.iter().fold((0, 0), |(p, c), l| {
        (
            p + l["usage"]["prompt_tokens"].as_u64().unwrap(),
            c + l["usage"]["completion_tokens"].as_u64().unwrap(),
        )
    })
}

/// `dispatcher infer` on the echo engine against the server at `addr`.
fn echo_worker(addr: &str, extra: &[&str]) -> std::process::Child {
    Command::new(dispatcher_bin())
        .args(["infer", "--dispatcher", addr, "--engine", "echo", "-q"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn manifest_runs(dir: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read(dir.join("out.jsonl.manifest.json")).unwrap();
    let doc: Value = serde_json::from_slice(&text).unwrap();
    doc["runs"].as_array().unwrap().clone()
}

/// Every engine request is counted once: a server stopped half way (SIGTERM)
/// and started again adds the tokens the worker could not report meanwhile,
/// and the runs' tokens in the manifest add up to what the lines say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_tokens_add_up_to_the_lines_usage_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let n = 300;
    std::fs::write(dir.path().join("in.jsonl"), question_lines(n)).unwrap();
    let server = serve_process(
        dir.path(),
        &["--exit-grace", "1", "--checkpoint-interval", "1"],
    );
    let port = server.addr.rsplit_once(':').unwrap().1.to_string();
    let worker = echo_worker(
        &server.addr,
        &[
            "--include-usage",
            "--echo-latency-ms",
            "20",
            "--echo-max-concurrency",
            "8",
        ],
    );
    let client = DispatcherClient::new(&server.addr);
    loop {
        let s = client.status().await.unwrap();
        if s.lines_done >= 60 {
            assert!(s.tokens.requests > 0, "tokens reported while the job runs");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.signal(libc::SIGTERM);
    let (code, err) = server.wait(Duration::from_secs(20));
    assert_eq!(code, 0, "{err}");
    // The worker keeps its lines and counts while the server is away.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut command = Command::new(dispatcher_bin());
    command
        .args(["serve", "--infile", "in.jsonl", "--outfile", "out.jsonl"])
        .args(["--host", "127.0.0.1", "--port", &port, "--exit-grace", "1"])
        .current_dir(dir.path());
    let again = ServerProcess::start(command);
    let (code, err) = wait_exit(worker, Duration::from_secs(120)).await;
    assert_eq!(code, 0, "{err}");
    let (code, err) = again.wait(Duration::from_secs(30));
    assert_eq!(code, 0, "{err}");

    let out = jsonl(dir.path().join("out.jsonl"));
    assert_eq!(out.len(), n);
    let (prompt, completion) = usage_of_lines(&out);
    let runs = manifest_runs(dir.path());
    assert_eq!(runs.len(), 2, "{runs:?}");
    let total = runs.iter().fold(TokenCounts::default(), |sum, r| {
        sum + serde_json::from_value::<TokenCounts>(r["tokens"].clone()).unwrap()
    });
    assert!(
        runs.iter()
            .all(|r| r["tokens"]["requests"].as_u64() > Some(0)),
        "both runs were reported tokens: {runs:?}"
    );
    // A line whose result was lost with the first server is done again:
    // its tokens were used twice.
    assert!(total.requests >= n as u64, "{total:?}");
    assert!(total.prompt_tokens >= prompt && total.completion_tokens >= completion);
    let redone = total.requests - n as u64;
    assert!(
        total.prompt_tokens <= prompt + redone * 3,
        "only redone lines count twice: {total:?} against {prompt} for {n} lines"
    );

    // `report` says what the lines used, and what the workers reported.
    let report = succeed(
        Command::new(dispatcher_bin())
            .args(["report", "--json"])
            .arg(dir.path().join("out.jsonl")),
    );
    let r: Value = serde_json::from_slice(&report.stdout).unwrap();
    assert_eq!(
        (r["prompt_tokens"].as_u64(), r["completion_tokens"].as_u64()),
        (Some(prompt), Some(completion))
    );
    assert_eq!(r["reported"]["tokens"]["requests"], total.requests);
    assert!(r["reported"]["run_secs"].as_f64().unwrap() > 0.0);
    let latency = &r["latency"];
    assert_eq!(latency["lines"], n);
    // Each line's request takes the engine's 20 ms at the least.
    assert!(latency["p50"].as_f64().unwrap() >= 0.019, "{latency}");
    let text = succeed(
        Command::new(dispatcher_bin())
            .arg("report")
            .arg(dir.path().join("out.jsonl")),
    );
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.contains("as the workers reported them over"), "{text}");
    assert!(text.contains("latency          300 lines: mean"), "{text}");
}

/// `dispatcher status` shows the tokens, their rate and cost, each worker's
/// state, and an example of each failure kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_tokens_cost_workers_and_failure_examples() {
    let dir = tempfile::tempdir().unwrap();
    let mut input = question_lines(40);
    input.push_str("{\"id\": 40}\n");
    std::fs::write(dir.path().join("in.jsonl"), input).unwrap();
    let server = serve_process(
        dir.path(),
        &[
            "--exit-grace",
            "30",
            "--price-per-mtok-in",
            "3",
            "--price-per-mtok-out",
            "15",
        ],
    );
    let worker = echo_worker(&server.addr, &[]);
    let client = DispatcherClient::new(&server.addr);
    while !client.status().await.unwrap().complete {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = succeed(Command::new(dispatcher_bin()).args([
        "status",
        "--interval",
        "0.2",
        "--server",
        &server.addr,
    ]));
    let text = String::from_utf8(status.stdout).unwrap();
    let s = client.status().await.unwrap();
    assert_eq!(
        s.tokens.requests, 40,
        "the line without a prompt sent no request"
    );
    let cost = (s.tokens.prompt_tokens * 3 + s.tokens.completion_tokens * 15) as f64 / 1e6;
    assert!(
        text.contains(&format!(
            "tokens       {} prompt (0/s), {} generated (0/s) in 40 engine requests; cost so far {cost:.4}",
            s.tokens.prompt_tokens, s.tokens.completion_tokens
        )),
        "{text}"
    );
    assert!(
        text.contains("prompt_missing             e.g. work_id 40: {\"__ERROR__\""),
        "{text}"
    );
    assert!(text.contains("infer on "), "{text}");
    assert!(
        text.contains(": active,") || text.contains(": idle,"),
        "{text}"
    );
    let _ = wait_exit(worker, Duration::from_secs(60)).await;
}
