//! Durable tasks, end to end: a three-request task (`critique_and_revise`)
//! whose first worker stops after its second request; the line, issued again
//! to another worker, sends only its third request. Requests are counted at
//! the engine: a test engine whose answers differ every time (as at
//! temperature > 0), so a replayed answer is visibly the recorded one.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dispatcher::client::DispatcherClient;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{json, Value};

use crate::support::{
    example, jsonl, last_message, lines, send_signal, serve_process, wait_exit, HttpEngine,
    ServerProcess,
};

/// The third turn of `critique_and_revise`.
const REVISE: &str = "Now write the improved answer";

/// One answered request, as the engine saw it.
#[derive(Debug, Clone)]
struct Seen {
    last_message: String,
    answer: String,
}

#[derive(Debug, Default)]
struct EngineState {
    /// While set, third-turn requests wait.
    hold: AtomicBool,
    answered: Mutex<Vec<Seen>>,
    counter: AtomicU64,
}

/// An OpenAI-compatible engine on 127.0.0.1 whose every answer is new.
struct Engine {
    url: String,
    state: Arc<EngineState>,
}

impl Engine {
    async fn start() -> Engine {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(EngineState::default());
        let shared = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(&state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Engine { url, state }
    }

    fn answered(&self) -> Vec<Seen> {
        self.state.answered.lock().unwrap().clone()
    }
}

async fn answer(
    state: &EngineState,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let body: Value = serde_json::from_slice(&req.into_body().collect().await.unwrap().to_bytes())
        .unwrap_or(Value::Null);
    let reply = |v: Value| {
        hyper::Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(v.to_string())))
            .unwrap()
    };
    if path.ends_with("/models") {
        return reply(json!({"data": [{"id": "sampler"}]}));
    }
    let last = body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_string();
    while last.contains(REVISE) && state.hold.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let k = state.counter.fetch_add(1, Ordering::SeqCst);
    let answer = format!(
        "sample {k}-{}",
        std::process::id() as u64 * 31 + k * 7919 % 997
    );
    state.answered.lock().unwrap().push(Seen {
        last_message: last,
        answer: answer.clone(),
    });
    reply(json!({
        "model": "sampler",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}
    }))
}

/// `dispatcher serve` in `dir` with a 2 s work timeout.
fn serve(dir: &std::path::Path, extra: &[&str]) -> ServerProcess {
    let mut flags = vec![
        "--work-timeout",
        "2",
        "--checkpoint-interval",
        "0.2",
        "--exit-grace",
        "1",
    ];
    flags.extend(extra);
    serve_process(dir, &flags)
}

fn worker(addr: &str, engine: &Engine) -> Child {
    Command::new(example("critique_and_revise"))
        .args(["--dispatcher", addr, "--engine-url", &engine.url])
        .args([
            "--workers",
            "4",
            "--batch-size",
            "4",
            "--vanish-wait",
            "2",
            "-q",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until the server holds at least `n` journal entries.
async fn wait_entries(addr: &str, n: u64) {
    let client = DispatcherClient::new(addr);
    let start = Instant::now();
    loop {
        if let Ok(s) = client.status().await {
            if s.journal_entries >= n {
                return;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no journal entries"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How the first worker's run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interruption {
    /// The worker is SIGKILLed.
    Killed,
    /// The worker gets SIGTERM (preemption) and releases its lines.
    Preempted,
    /// The worker and the server are SIGKILLed; the server is restarted.
    BothKilled,
}

const LINES: usize = 3;

/// Runs the job: a first worker completes two requests of each line and is
/// interrupted; a second finishes. Returns the engine, the output, and the
/// engine's answers before the second worker started.
async fn interrupted_job(how: Interruption, serve_flags: &[&str]) -> (Engine, Vec<Value>, usize) {
    let dir = tempfile::tempdir().unwrap();
    let input: String = (0..LINES)
        .map(|i| json!({"question": format!("Question {i}?")}).to_string() + "\n")
        .collect();
    std::fs::write(dir.path().join("in.jsonl"), input).unwrap();
    let engine = Engine::start().await;
    engine.state.hold.store(true, Ordering::SeqCst);
    let mut server = serve(dir.path(), serve_flags);
    let first = worker(&server.addr, &engine);
    // Both first requests of every line answered; every third one waits.
    let start = Instant::now();
    while engine.answered().len() < 2 * LINES {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the first worker did not get going"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if serve_flags.contains(&"--max-journal-mib") {
        tokio::time::sleep(Duration::from_millis(500)).await;
    } else {
        wait_entries(&server.addr, 2 * LINES as u64).await;
    }
    match how {
        Interruption::Killed => {
            send_signal(first.id() as i32, libc::SIGKILL);
            wait_exit(first, Duration::from_secs(10)).await;
        }
        Interruption::Preempted => {
            send_signal(first.id() as i32, libc::SIGTERM);
            let (code, stderr) = wait_exit(first, Duration::from_secs(30)).await;
            assert_eq!(code, 0, "{stderr}");
        }
        Interruption::BothKilled => {
            // A checkpoint (every 0.2 s) has made the entries durable.
            tokio::time::sleep(Duration::from_millis(600)).await;
            send_signal(first.id() as i32, libc::SIGKILL);
            server.signal(libc::SIGKILL);
            wait_exit(first, Duration::from_secs(10)).await;
            let _ = server.wait(Duration::from_secs(10));
            server = serve(dir.path(), serve_flags);
        }
    }
    let before = engine.answered().len();
    engine.state.hold.store(false, Ordering::SeqCst);
    let second = worker(&server.addr, &engine);
    let (code, stderr) = wait_exit(second, Duration::from_secs(120)).await;
    assert_eq!(code, 0, "{stderr}");
    let (code, stderr) = server.wait(Duration::from_secs(30));
    assert_eq!(code, 0, "the server failed: {stderr}");
    (engine, jsonl(dir.path().join("out.jsonl")), before)
}

/// Each line's draft and critique are the answers the first worker got, and
/// the second worker sent only the third requests.
fn check_replayed(engine: &Engine, output: &[Value], before: usize) {
    let answered = engine.answered();
    let (first_run, second_run) = answered.split_at(before);
    assert_eq!(first_run.len(), 2 * LINES, "{first_run:?}");
    assert_eq!(
        second_run.len(),
        LINES,
        "only the third requests: {second_run:?}"
    );
    assert!(second_run.iter().all(|s| s.last_message.contains(REVISE)));
    assert_eq!(output.len(), LINES);
    for (i, line) in output.iter().enumerate() {
        assert_eq!(line["question"], format!("Question {i}?"));
        let got = |text: &Value| {
            let text = text.as_str().unwrap();
            first_run.iter().any(|s| s.answer == text)
        };
        assert!(got(&line["draft"]) && got(&line["critique"]), "{line}");
        assert!(second_run
            .iter()
            .any(|s| s.answer == line["answer"].as_str().unwrap()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_after_two_requests_leaves_only_the_third_to_the_next() {
    let (engine, output, before) = interrupted_job(Interruption::Killed, &[]).await;
    check_replayed(&engine, &output, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preempted_worker_hands_in_its_journal_with_the_lines_it_releases() {
    let (engine, output, before) = interrupted_job(Interruption::Preempted, &[]).await;
    check_replayed(&engine, &output, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_entries_covered_by_a_checkpoint_survive_a_server_killed_and_restarted() {
    let (engine, output, before) = interrupted_job(Interruption::BothKilled, &[]).await;
    check_replayed(&engine, &output, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_journal_records_nothing_more_and_the_job_still_completes_exactly() {
    let (engine, output, before) =
        interrupted_job(Interruption::Killed, &["--max-journal-mib", "0"]).await;
    // Nothing was recorded: the second worker sent all three requests again.
    let answered = engine.answered();
    assert_eq!(answered.len() - before, 3 * LINES);
    assert_eq!(output.len(), LINES);
    for (i, line) in output.iter().enumerate() {
        assert_eq!(line["question"], format!("Question {i}?"));
        assert!(line["answer"].is_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_knows_no_journal_works_unchanged_against_a_server_with_one() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), "{\"q\": 0}\n{\"q\": 1}\n").unwrap();
    let server = serve(dir.path(), &[]);
    let addr = server.addr.clone();
    let client = DispatcherClient::new(&addr);
    let http = reqwest::Client::new();
    // Entries for line 0, as one of our workers would have handed in.
    client
        .journal(
            vec![dispatcher::protocol::JournalRecord::new(
                0,
                dispatcher::protocol::JournalEntry::new(
                    0,
                    "00000000000000aa",
                    &json!({"model": "m", "choices": [{"index": 0, "text": "x"}], "usage": null}),
                ),
            )],
            0,
            0,
        )
        .await
        .unwrap();
    // A worker written for the Python server: plain JSON, extra keys ignored,
    // items posted back as they came with their result set.
    let work: Value = http
        .get(format!("http://{addr}/work?batch_size=2"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut items = work["items"].as_array().unwrap().clone();
    assert_eq!(items[0]["journal"][0]["seq"], 0, "the journal rides along");
    for item in &mut items {
        let q =
            serde_json::from_str::<Value>(item["content"].as_str().unwrap()).unwrap()["q"].clone();
        item["result"] = json!({"answer": q}).to_string().into();
    }
    let answer: Value = http
        .post(format!("http://{addr}/results"))
        .json(&json!({"items": items}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["status"], "OK", "{answer}");
    let (code, stderr) = server.wait(Duration::from_secs(30));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out.jsonl")).unwrap(),
        "{\"answer\":0}\n{\"answer\":1}\n"
    );
    // The job is complete: its journal is gone.
    assert!(!dir.path().join("out.jsonl.journal").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_local_run_resumes_mid_task_from_its_journal() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    let questions: String = (0..LINES)
        .map(|i| json!({"question": format!("Question {i}?")}).to_string() + "\n")
        .collect();
    std::fs::write(&input, questions).unwrap();
    let engine = Engine::start().await;
    engine.state.hold.store(true, Ordering::SeqCst);
    let run = || {
        Command::new(example("critique_and_revise"))
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .args(["--engine-url", &engine.url, "--workers", "4", "-q"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let first = run();
    let start = Instant::now();
    while engine.answered().len() < 2 * LINES {
        assert!(start.elapsed() < Duration::from_secs(60), "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The entries reach the journal file beside the output as they complete
    // (after its first line, which names the job).
    let journal = dir.path().join("out.jsonl.journal");
    let entries = || {
        lines(&journal)
            .iter()
            .filter(|l| l.contains("\"seq\""))
            .count()
    };
    while entries() < 2 * LINES {
        assert!(start.elapsed() < Duration::from_secs(60), "no journal");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    send_signal(first.id() as i32, libc::SIGKILL);
    wait_exit(first, Duration::from_secs(10)).await;
    let before = engine.answered().len();
    engine.state.hold.store(false, Ordering::SeqCst);
    let (code, stderr) = wait_exit(run(), Duration::from_secs(60)).await;
    assert_eq!(code, 0, "{stderr}");
    check_replayed(&engine, &jsonl(&output), before);
}

/// An engine that adds `validated_response`'s marker to every second answer
/// it gives to the same prompt.
async fn every_second_answer_valid() -> HttpEngine {
    let asked = Mutex::new(std::collections::HashMap::<String, u64>::new());
    HttpEngine::start(move |body| {
        let prompt = last_message(body);
        let mut asked = asked.lock().unwrap();
        let n = asked.entry(prompt.clone()).or_default();
        *n += 1;
        if n.is_multiple_of(2) {
            format!("answer {n} to {prompt} DONE")
        } else {
            format!("answer {n} to {prompt}")
        }
    })
    .await
}

fn prompts(n: usize) -> String {
    (0..n)
        .map(|i| json!({"prompt": format!("Question {i}?")}).to_string() + "\n")
        .collect()
}

/// Checks that every line ended valid after one retry: twenty lines, forty
/// engine requests (a retry that replayed its rejected answer would have
/// sent none and ended `retries_exhausted`).
fn check_each_line_asked_twice(output: &[Value], engine: &HttpEngine) {
    assert_eq!(output.len(), 20);
    for (i, line) in output.iter().enumerate() {
        let response = line["response"]
            .as_str()
            .unwrap_or_else(|| panic!("line {i}: {line}"));
        assert!(response.ends_with("DONE"), "line {i}: {line}");
        assert_eq!(line["task_metadata"]["retry_count"], 1, "line {i}: {line}");
    }
    assert_eq!(engine.answered().len(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_asks_the_engine_again_instead_of_replaying_the_answer_it_rejected() {
    let engine = every_second_answer_valid().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), prompts(20)).unwrap();
    let server = serve_process(dir.path(), &["--exit-grace", "0.5"]);
    let worker = Command::new(example("validated_response"))
        .args([
            "--dispatcher",
            &server.addr,
            "--engine-url",
            &engine.url,
            "-q",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (code, stderr) = wait_exit(worker, Duration::from_secs(60)).await;
    assert_eq!(code, 0, "{stderr}");
    let (code, stderr) = server.wait(Duration::from_secs(30));
    assert_eq!(code, 0, "{stderr}");
    check_each_line_asked_twice(&jsonl(dir.path().join("out.jsonl")), &engine);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_in_local_mode_asks_the_engine_again_too() {
    let engine = every_second_answer_valid().await;
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    std::fs::write(&input, prompts(20)).unwrap();
    let worker = Command::new(example("validated_response"))
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .args(["--engine-url", &engine.url, "-q"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (code, stderr) = wait_exit(worker, Duration::from_secs(60)).await;
    assert_eq!(code, 0, "{stderr}");
    check_each_line_asked_twice(&jsonl(&output), &engine);
    // A finished local job leaves its output, checkpoint and nothing else of
    // a running job.
    assert!(!dir.path().join("out.jsonl.journal").exists());
    assert!(!dir.path().join("out.jsonl.checkpoint.lock").exists());
    assert!(dir.path().join("out.jsonl.checkpoint").exists());
}
