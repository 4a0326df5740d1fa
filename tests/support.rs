//! What the end-to-end tests share: built binaries, a server on loopback in a
//! temporary directory, waiting for processes, signals.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dispatcher::ledger::LedgerConfig;
use dispatcher::server::{self, ServeOptions, StopReason};

/// A server task running on 127.0.0.1:0.
pub type ServerHandle = tokio::task::JoinHandle<Result<StopReason, server::ServerError>>;

/// Serves `dir/in.jsonl` into `dir/out.jsonl` on 127.0.0.1:0 with a 600 s
/// work timeout (changed by `adjust`), exiting `grace` after completion.
pub async fn serve(
    dir: &Path,
    grace: Duration,
    adjust: impl FnOnce(&mut LedgerConfig),
) -> (String, ServerHandle) {
    let mut config = LedgerConfig {
        work_timeout: Duration::from_secs(600),
        retry_secs: 1,
        ..LedgerConfig::new(
            dir.join("in.jsonl"),
            dispatcher::job::JobFiles::new(
                dir.join("out.jsonl"),
                Some(dir.join("out.jsonl.checkpoint")),
            ),
        )
    };
    adjust(&mut config);
    let options = ServeOptions {
        exit_grace: grace,
        ..ServeOptions::default()
    };
    let listener = server::bind("127.0.0.1", 0).await.unwrap();
    let addr = server::local_addr(&listener).unwrap().to_string();
    let handle = tokio::spawn(server::serve(
        listener,
        config,
        options,
        std::future::pending(),
    ));
    (addr, handle)
}

/// A binary `cargo test` built next to this test binary.
pub fn built_binary(dir: &str, name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let path = target.join(dir).join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build --workspace --bins --examples` (scripts/test.sh does)",
        path.display()
    );
    path
}

pub fn example(name: &str) -> PathBuf {
    built_binary("examples", name)
}

#[derive(Debug)]
pub struct Served {
    pub dir: tempfile::TempDir,
    pub addr: String,
    pub handle: ServerHandle,
}

impl Served {
    pub async fn start(input: &str, grace: Duration) -> Served {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("in.jsonl"), input).unwrap();
        let (addr, handle) = serve(dir.path(), grace, |_| {}).await;
        Served { dir, addr, handle }
    }

    /// Waits for the server to exit by itself and returns the output lines.
    pub async fn finish(self) -> Vec<serde_json::Value> {
        let reason = tokio::time::timeout(Duration::from_secs(60), self.handle)
            .await
            .expect("the server finishes")
            .unwrap()
            .unwrap();
        assert_eq!(reason, StopReason::Complete);
        jsonl(self.dir.path().join("out.jsonl"))
    }
}

pub fn worker(binary: &PathBuf, addr: &str, extra: &[&str]) -> Child {
    Command::new(binary)
        .args(["--dispatcher", addr, "--engine", "echo", "-q"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

pub async fn wait_exit(mut child: Child, limit: Duration) -> (i32, String) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            return (status.code().unwrap_or(-1), err);
        }
        assert!(
            start.elapsed() < limit,
            "the worker did not exit within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub use dispatcher_testkit::{
    complete_with_errors, jsonl, last_message, lines, send_signal, succeed, HttpEngine, JobDir,
    ServerProcess,
};

/// The `dispatcher` binary.
pub fn dispatcher_bin() -> PathBuf {
    built_binary("", "dispatcher")
}

/// Owned arguments.
pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// `n` chat lines `{"id": i, "messages": [user "question i"]}`.
pub fn question_lines(n: usize) -> String {
    (0..n)
        .map(|i| {
            serde_json::json!({"id": i, "messages": [{"role": "user", "content": format!("question {i}")}]})
                .to_string()
                + "\n"
        })
        .collect()
}

/// The output of [`question_lines`] through `dispatcher infer` on the echo
/// engine: every line answered with its question, in order, none failed.
pub fn check_echo_answers(output: &Path, n: usize) {
    let out = jsonl(output);
    assert_eq!(out.len(), n);
    for (i, line) in out.iter().enumerate() {
        assert_eq!(line["id"], i, "line {i}: {line}");
        assert_eq!(
            line["responses"],
            serde_json::json!([format!("question {i}")]),
            "line {i}"
        );
    }
}

/// `n` chat lines `{"id", "messages"}`, and their questions.
pub fn chat_lines(n: usize) -> (String, Vec<String>) {
    let qs: Vec<String> = (0..n)
        .map(|i| format!("Question number {i}: name a river."))
        .collect();
    let input = qs
        .iter()
        .map(|q| {
            serde_json::json!({"id": q, "messages": [{"role": "user", "content": q}]}).to_string()
                + "\n"
        })
        .collect();
    (input, qs)
}

/// The engine a worker launched: the worker's child, which leads its own
/// process group.
pub fn engine_of(worker: &Child) -> i32 {
    let start = Instant::now();
    loop {
        let out = Command::new("pgrep")
            .args(["-P", &worker.id().to_string()])
            .output()
            .unwrap();
        if let Some(pid) = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.trim().parse().ok())
        {
            return pid;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the worker started no engine"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the job has lines done and items in flight.
pub async fn wait_for_progress(client: &dispatcher::client::DispatcherClient) {
    let start = Instant::now();
    loop {
        let s = client.status().await.unwrap();
        if s.in_flight > 0 && s.lines_done > 0 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "the worker made no progress: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An `infer` worker (`spawn` starts one, launching its own engine) whose
/// engine is killed mid-run hands back what it holds and fails; a second one
/// finishes the job of `lines` chat lines exactly, one response each.
pub async fn an_engine_killed_mid_run(lines: usize, spawn: impl Fn(&str) -> Child) {
    let (input, qs) = chat_lines(lines);
    let served = Served::start(&input, Duration::from_secs(3)).await;
    let client = dispatcher::client::DispatcherClient::new(&served.addr);
    let first = spawn(&served.addr);
    let engine = engine_of(&first);
    wait_for_progress(&client).await;
    // The whole engine: it and whatever it forked.
    assert_eq!(send_signal(-engine, libc::SIGKILL), 0);
    let (code, stderr) = wait_exit(first, Duration::from_secs(120)).await;
    assert_ne!(code, 0, "a dead engine is a failure: {stderr}");
    assert!(stderr.contains("engine"), "{stderr}");
    let status = client.status().await.unwrap();
    assert_eq!(
        status.in_flight, 0,
        "everything was handed back: {status:?}"
    );
    assert!(status.reissues.release > 0);
    assert!(status.lines_done < lines as u64);

    let (code, stderr) = wait_exit(spawn(&served.addr), Duration::from_secs(600)).await;
    assert_eq!(code, 0, "{stderr}");
    let out = served.finish().await;
    assert_eq!(out.len(), lines);
    for (i, line) in out.iter().enumerate() {
        assert_eq!(line["id"], qs[i].as_str(), "line {i}");
        assert_eq!(
            line["responses"].as_array().map(Vec::len),
            Some(1),
            "line {i}: {line}"
        );
    }
}

/// `dispatcher infer` through a server (`spawn` starts it with these infer
/// arguments, launching its own engine), in chat and in completion mode, with
/// two generations a line over ten chat lines and one prompt (`long`) far over
/// the engine's context: every line keeps its fields and gets two responses
/// and its usage (`usage_field` above 0); the long one is a `request_rejected`
/// record whose message says `rejected_says`, and the job goes on.
pub async fn infer_in_both_modes_with_an_over_long_prompt(
    long: &str,
    usage_field: &str,
    rejected_says: &str,
    spawn: impl Fn(Vec<String>) -> Child,
) {
    use serde_json::{json, Value};
    for mode in ["chat", "completion"] {
        let (mut input, _) = chat_lines(10);
        input.push_str(
            &(json!({"id": "long", "messages": [{"role": "user", "content": long}]}).to_string()
                + "\n"),
        );
        let served = Served::start(&input, Duration::from_secs(2)).await;
        let args = strings(&[
            "infer",
            "--dispatcher",
            &served.addr,
            "--mode",
            mode,
            "--num-generations",
            "2",
            "--max-tokens",
            "8",
            "--include-usage",
        ]);
        let (code, stderr) = wait_exit(spawn(args), Duration::from_secs(600)).await;
        assert_eq!(code, 0, "{mode}: {stderr}");
        let out = served.finish().await;
        assert_eq!(out.len(), 11, "{mode}");
        let (input_lines, _) = chat_lines(10);
        for (i, (line, original)) in out.iter().zip(input_lines.lines()).enumerate() {
            let original: Value = serde_json::from_str(original).unwrap();
            assert_eq!(line["id"], original["id"], "{mode} line {i}");
            assert_eq!(line["messages"], original["messages"], "{mode} line {i}");
            let responses = line["responses"]
                .as_array()
                .unwrap_or_else(|| panic!("{mode} line {i}: {line}"));
            assert_eq!(responses.len(), 2, "{mode} line {i}");
            assert!(responses.iter().all(Value::is_string));
            assert!(
                line["usage"][usage_field].as_u64().unwrap() > 0,
                "{mode} line {i}: {line}"
            );
        }
        let e = &out[10]["__ERROR__"];
        assert_eq!(e["error"], "request_rejected", "{mode}: {}", out[10]);
        assert!(
            e["message"].as_str().unwrap().contains(rejected_says),
            "{mode}: {e}"
        );
        assert_eq!(e["task_data"]["id"], "long");
    }
}

/// `dispatcher serve` of `dir/in.jsonl` into `dir/out.jsonl` as a process on
/// 127.0.0.1, with `extra` flags.
pub fn serve_process(dir: &Path, extra: &[&str]) -> ServerProcess {
    let mut command = Command::new(dispatcher_bin());
    command
        .arg("serve")
        .arg("--infile")
        .arg(dir.join("in.jsonl"))
        .arg("--outfile")
        .arg(dir.join("out.jsonl"))
        .args(["--host", "127.0.0.1", "--port", "0"])
        .args(extra);
    ServerProcess::start(command)
}
