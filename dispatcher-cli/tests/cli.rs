//! Process-level tests of the `dispatcher` binary: what only a process shows
//! (SIGKILL and restart, signals, exit codes, messages on stderr).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dispatcher_core::client::DispatcherClient;
use dispatcher_core::protocol::{WorkItem, WorkStatus};
use dispatcher_testkit::{JobDir, ServerProcess};

const BIN: &str = env!("CARGO_BIN_EXE_dispatcher");

// The server at cluster scale: connections, open-file limits, changed files.
#[path = "cli/hardening.rs"]
mod hardening;

// Redoing the failed lines of an output in place.
#[path = "cli/redo.rs"]
mod redo;

// A job's files: nothing of one job reused by another; readers that agree.
#[path = "cli/job_files.rs"]
mod job_files;

// Nothing lost on the data path: infer keeps lines exactly.
#[path = "cli/data_path.rs"]
mod data_path;

// The token out of sight; text from workers escaped on terminals and logs.
#[path = "cli/access.rs"]
mod access;

// `estimate`: prompts counted as the engine counts them.
#[path = "cli/estimate.rs"]
mod estimate;

/// A job's directory (see [`JobDir`]), with what these tests do with it.
struct Job(JobDir);

impl std::ops::Deref for Job {
    type Target = JobDir;
    fn deref(&self) -> &JobDir {
        &self.0
    }
}

impl Job {
    fn new(lines: usize) -> Job {
        Job(JobDir::new(lines))
    }

    /// `dispatcher serve` on this job's files, on 127.0.0.1 with a free port.
    fn serve_command(&self) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--infile")
            .arg(self.path("in.jsonl"))
            .arg("--outfile")
            .arg(self.path("out.jsonl"))
            .args(["--host", "127.0.0.1", "--port", "0"]);
        cmd
    }

    fn serve(&self, extra: &[&str]) -> Server {
        let mut cmd = self.serve_command();
        cmd.args(extra);
        ServerProcess::start(cmd)
    }

    /// [`serve`](Self::serve) with at most `nofile` open files (soft and hard
    /// limit), as on a cluster node with a low limit it may not raise.
    fn serve_with_open_file_limit(&self, nofile: u64, extra: &[&str]) -> Server {
        let serve = self.serve_command();
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
            .arg(serve.get_program())
            .args(serve.get_args())
            .args(extra);
        ServerProcess::start(cmd)
    }
}

impl Job {
    /// `lines_written` of the checkpoint on disk.
    fn checkpointed_lines(&self) -> u64 {
        let cp: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.path("out.jsonl.checkpoint")).unwrap())
                .unwrap();
        cp["lines_written"].as_u64().unwrap()
    }

    /// Writes the checkpoint of a job that has written the first `lines`
    /// lines of the output now on disk, as a server would have.
    fn checkpoint_output(&self, lines: usize) {
        let input_offset: usize = self.input[..lines].iter().map(|l| l.len() + 1).sum();
        let output_len = std::fs::metadata(self.path("out.jsonl")).unwrap().len();
        dispatcher_core::job::checkpoint::Checkpoint::capture(
            "test-job",
            &self.path("in.jsonl"),
            &self.path("out.jsonl"),
            lines as u64,
            input_offset as u64,
            output_len,
        )
        .unwrap()
        .save(&self.path("out.jsonl.checkpoint"))
        .unwrap();
    }

    fn expected_line(&self, i: usize) -> String {
        serde_json::json!({"n": i, "seen": self.input[i]}).to_string()
    }

    /// Checks the output is exactly one right line per input line.
    fn check_output(&self) {
        let lines = self.output_lines();
        assert_eq!(
            lines.len(),
            self.input.len(),
            "one output line per input line"
        );
        for (i, line) in lines.iter().enumerate() {
            assert_eq!(*line, self.expected_line(i), "line {i}");
        }
    }
}

/// A `dispatcher serve` process (see [`ServerProcess`]).
type Server = ServerProcess;

/// What a test's fake worker does against a server.
trait AnswerBatch {
    /// A worker's round: takes up to `batch` items and answers them all.
    /// Returns the work ids it took.
    fn answer_batch(&self, rt: &tokio::runtime::Runtime, batch: usize) -> Vec<u64>;
}

impl AnswerBatch for ServerProcess {
    fn answer_batch(&self, rt: &tokio::runtime::Runtime, batch: usize) -> Vec<u64> {
        rt.block_on(dispatcher_testkit::answer_batch(
            &self.addr, batch, result_of,
        ))
    }
}

/// The result these tests' workers give an item: its `n` and the line seen.
fn result_of(item: &WorkItem) -> String {
    let n = serde_json::from_str::<serde_json::Value>(&item.content).unwrap()["n"]
        .as_u64()
        .unwrap();
    serde_json::json!({"n": n, "seen": item.content}).to_string()
}

fn answer(item: &WorkItem) -> WorkItem {
    WorkItem {
        result: Some(result_of(item)),
        ..item.clone()
    }
}

/// Workers that follow the server wherever the test restarts it (`addr`), and
/// stop once `done` is set.
fn spawn_workers(
    rt: &tokio::runtime::Runtime,
    n: usize,
    addr: Arc<Mutex<String>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|_| {
            let addr = addr.clone();
            rt.spawn(async move {
                loop {
                    let current = addr.lock().unwrap().clone();
                    if current.is_empty() {
                        return;
                    }
                    let client = DispatcherClient::new(&current);
                    let work = match client.get_work(16).await {
                        Ok(w) => w,
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    };
                    match work.status {
                        WorkStatus::Ok => {
                            let results = work.items.iter().map(answer).collect();
                            // A server killed meanwhile loses these; they come back.
                            let _ = client.submit(results).await;
                        }
                        _ => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            })
        })
        .collect()
}

#[test]
fn sigkill_during_a_run_and_restarts_lose_and_duplicate_nothing() {
    let job = Job::new(20_000);
    let flags = [
        "--checkpoint-interval",
        "0.05",
        "--work-timeout",
        "1",
        "--exit-grace",
        "0.3",
        "--retry",
        "1",
    ];
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut server = job.serve(&flags);
    let addr = Arc::new(Mutex::new(server.addr.clone()));
    let workers = spawn_workers(&rt, 4, addr.clone());
    let mut lines_at_kill = Vec::new();
    for round in 0..6u64 {
        std::thread::sleep(Duration::from_millis(120 + 37 * round));
        server.signal(libc::SIGKILL);
        let _ = server.wait(Duration::from_secs(10));
        lines_at_kill.push(job.output_lines().len());
        server = job.serve(&flags);
        *addr.lock().unwrap() = server.addr.clone();
    }
    let (code, stderr) = server.wait(Duration::from_secs(120));
    *addr.lock().unwrap() = String::new();
    for w in workers {
        rt.block_on(w).unwrap();
    }
    assert_eq!(code, 0, "exit status after completion; stderr: {stderr}");
    assert!(
        lines_at_kill.windows(2).all(|w| w[0] <= w[1]) && lines_at_kill[0] < job.input.len(),
        "the kills happened mid-run: {lines_at_kill:?}"
    );
    job.check_output();
}

#[test]
fn sigterm_writes_a_final_checkpoint_and_a_restart_resumes() {
    let job = Job::new(50);
    let server = job.serve(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    server.answer_batch(&rt, 20);
    server.signal(libc::SIGTERM);
    let (code, stderr) = server.wait(Duration::from_secs(10));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(job.checkpointed_lines(), 20);

    let server = job.serve(&["--exit-grace", "0.2"]);
    let taken = server.answer_batch(&rt, 100);
    assert_eq!(taken.first(), Some(&20), "resumes after line 19");
    let (code, stderr) = server.wait(Duration::from_secs(10));
    assert_eq!(code, 0, "{stderr}");
    job.check_output();
}

#[test]
fn a_restart_after_sigkill_checkpoints_the_recovered_lines_at_once() {
    let job = Job::new(100);
    let hourly = ["--checkpoint-interval", "3600", "--exit-grace", "0.2"];
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = job.serve(&hourly);
    server.answer_batch(&rt, 30);
    server.signal(libc::SIGKILL);
    let _ = server.wait(Duration::from_secs(10));
    assert_eq!(
        job.checkpointed_lines(),
        0,
        "killed before any periodic checkpoint"
    );

    // The restart finds 30 lines past the checkpoint and names them in a new
    // one right away, not an hour later.
    let server = job.serve(&hourly);
    let start = Instant::now();
    while job.checkpointed_lines() != 30 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the recovered lines were not checkpointed (lines_written {})",
            job.checkpointed_lines()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(server.answer_batch(&rt, 100).first(), Some(&30));
    let (code, stderr) = server.wait(Duration::from_secs(10));
    assert_eq!(code, 0, "{stderr}");
    job.check_output();
}

#[test]
fn a_server_whose_stderr_is_gone_still_stops_on_sigterm_and_on_completion() {
    // The log's reader died (a `| tee` that was killed, a closed terminal):
    // writing a log line fails. It must not take down the task that logs it.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let job = Job::new(10);
    let mut server = job.serve(&["--exit-grace", "0.2"]);
    drop(server.child.stderr.take());
    server.answer_batch(&rt, 10);
    let (code, _) = server.wait(Duration::from_secs(10));
    assert_eq!(code, 0, "exits by itself once the work is complete");

    let job = Job::new(10);
    let mut server = job.serve(&[]);
    drop(server.child.stderr.take());
    server.answer_batch(&rt, 4);
    server.signal(libc::SIGTERM);
    let (code, _) = server.wait(Duration::from_secs(10));
    assert_eq!(code, 0, "SIGTERM stops it");
    assert_eq!(job.checkpointed_lines(), 4, "with a final checkpoint");
}

#[test]
fn a_checkpoint_that_does_not_match_the_output_is_refused() {
    let job = Job::new(10);
    let server = job.serve(&["--exit-grace", "0"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    server.answer_batch(&rt, 10);
    assert_eq!(server.wait(Duration::from_secs(10)).0, 0);
    // Someone truncates the output by hand.
    let half: String = job
        .output_lines()
        .iter()
        .take(5)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(job.path("out.jsonl"), half).unwrap();
    let out = job.serve_command().output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("out.jsonl") && stderr.contains("truncated"),
        "{stderr}"
    );
}

#[test]
fn an_io_failure_stops_the_server_with_a_message_naming_the_path() {
    let job = Job::new(10);
    let cpdir = job.path("cp");
    std::fs::create_dir(&cpdir).unwrap();
    let cp = cpdir.join("job.checkpoint");
    let server = job.serve(&[
        "--checkpoint",
        cp.to_str().unwrap(),
        "--checkpoint-interval",
        "0.05",
    ]);
    // The directory disappears. (A rename, not remove_dir_all: the server
    // writes `job.checkpoint.tmp` there every 50 ms, so removing the entries
    // and then the directory races with it and can fail with "not empty".)
    std::fs::rename(&cpdir, job.path("cp-gone")).unwrap();
    let (code, stderr) = server.wait(Duration::from_secs(10));
    assert_ne!(code, 0);
    assert!(stderr.contains(&cpdir.display().to_string()), "{stderr}");
}

#[test]
fn bad_flags_fail_before_any_work_with_the_flag_named() {
    let job = Job::new(1);
    for (args, needle) in [
        (vec!["--max-retries", "-2"], "--max-retries"),
        (vec!["--work-timeout", "0"], "--work-timeout"),
        (vec!["--idle-timeout", "0"], "--idle-timeout"),
        (vec!["--max-connections", "0"], "--max-connections"),
        (vec!["--token", "two words"], "--token"),
        (vec!["--token", "tökén"], "--token"),
        (vec!["--token", ""], "empty"),
    ] {
        let out = job.serve_command().args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(needle),
            "{args:?}: {stderr}"
        );
    }
    let out = Command::new(BIN)
        .args(["serve", "--infile", "/nonexistent/in.jsonl", "--outfile"])
        .arg(job.path("o"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/in.jsonl"));
    assert!(
        !Path::new(&job.path("o")).exists(),
        "nothing written for a bad start"
    );
}

/// Runs `dispatcher infer` on local files with the echo engine.
fn infer_local(job: &Job, extra: &[&str]) -> (bool, String) {
    infer_local_on(job, &["--engine", "echo"], extra)
}

/// `dispatcher infer` in local mode on `job`'s files, with `engine`'s flags.
fn infer_local_on(job: &Job, engine: &[&str], extra: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .arg("infer")
        .arg("--input")
        .arg(job.path("in.jsonl"))
        .arg("--output")
        .arg(job.path("out.jsonl"))
        .arg("-q")
        .args(engine)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn infer_adds_responses_to_every_line_in_order() {
    let job = Job::new(0);
    let lines: Vec<String> = (0..30)
        .map(|i| serde_json::json!({"id": i, "messages": [{"role": "user", "content": format!("question {i}")}]}).to_string())
        .chain(["not json".to_string(), "{\"no\": \"prompt\"}".to_string()])
        .collect();
    std::fs::write(job.path("in.jsonl"), lines.join("\n") + "\n").unwrap();
    let run = || {
        Command::new(BIN)
            .arg("infer")
            .arg("--input")
            .arg(job.path("in.jsonl"))
            .arg("--output")
            .arg(job.path("out.jsonl"))
            .args(["-q", "--engine", "echo", "--num-generations", "2"])
            .args(["--include-usage", "--workers", "8"])
            .output()
            .unwrap()
    };
    // Complete, with two error records: exit status 3 (the one rule of
    // `dispatcher_cli::exit`), saying which; a rerun says the same.
    for _ in 0..2 {
        let out = run();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{stderr}");
        assert!(
            stderr.contains("2 of 32 lines") && stderr.contains("invalid_json 1"),
            "{stderr}"
        );
    }
    let report = Command::new(BIN)
        .arg("report")
        .arg(job.path("out.jsonl"))
        .output()
        .unwrap();
    assert_eq!(report.status.code(), Some(3));
    let out = job.output_values();
    assert_eq!(out.len(), 32);
    for (i, line) in out.iter().take(30).enumerate() {
        assert_eq!(line["id"], i, "line {i}");
        let q = format!("question {i}");
        assert_eq!(
            line["responses"],
            serde_json::json!([q, format!("{q} #1")]),
            "line {i}"
        );
        assert!(line["usage"]["total_tokens"].as_u64().unwrap() > 0);
    }
    assert_eq!(out[30]["__ERROR__"]["error"], "invalid_json");
    assert_eq!(out[31]["__ERROR__"]["error"], "prompt_missing");
    assert!(out[31]["__ERROR__"]["message"]
        .as_str()
        .unwrap()
        .contains(".messages[0].content"));
}

#[test]
fn infer_through_a_server_in_completion_mode_with_a_jq_path() {
    let job = Job::new(0);
    let lines: String = (0..20)
        .map(|i| {
            serde_json::json!({"doc": {"title": format!("t{i}"), "body": format!("body {i}")}})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(job.path("in.jsonl"), lines).unwrap();
    let server = job.serve(&["--exit-grace", "1"]);
    let out = Command::new(BIN)
        .args([
            "infer",
            "--dispatcher",
            &server.addr,
            "--engine",
            "echo",
            "-q",
        ])
        .args([
            "--mode",
            "completion",
            "--prompt-path",
            r#".doc | "\(.title): \(.body)""#,
            "--max-tokens",
            "2",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, stderr) = server.wait(Duration::from_secs(20));
    assert_eq!(code, 0, "{stderr}");
    let got = job.output_values();
    assert_eq!(got.len(), 20);
    for (i, line) in got.iter().enumerate() {
        // The echo engine cuts its echo to --max-tokens words.
        assert_eq!(
            line["responses"],
            serde_json::json!([format!("t{i}: body")]),
            "line {i}"
        );
        assert_eq!(line["doc"]["title"], format!("t{i}"));
    }
}

#[test]
fn infer_refuses_a_bad_prompt_path_before_any_work() {
    let job = Job::new(3);
    let (ok, stderr) = infer_local(&job, &["--prompt-path", ".messages[0"]);
    assert!(!ok);
    assert!(stderr.contains("--prompt-path"), "{stderr}");
    assert!(!job.path("out.jsonl").exists());
}

#[test]
fn status_and_work_timeout_talk_to_a_live_server_with_its_token() {
    let job = Job::new(30);
    let server = job.serve(&["--token", "tok", "--work-timeout", "600"]);
    let run = |args: &[&str], token: Option<&str>| {
        let mut cmd = Command::new(BIN);
        cmd.args(args).args(["--server", &server.addr]);
        match token {
            Some(t) => cmd.env("DISPATCHER_TOKEN", t),
            None => cmd.env_remove("DISPATCHER_TOKEN"),
        };
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    // Without the token: refused, and nothing changed.
    let (ok, text) = run(&["work-timeout", "5"], None);
    assert!(!ok && text.contains("401"), "{text}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = DispatcherClient::with_token(&server.addr, Some("tok"));
    rt.block_on(async {
        let work = client.get_work(10).await.unwrap();
        let results = work.items.iter().take(4).map(answer).collect();
        client.submit(results).await.unwrap();
    });
    let (ok, text) = run(&["status", "--interval", "0.2"], Some("tok"));
    assert!(ok, "{text}");
    assert!(text.contains("lines done   4 / 30"), "{text}");
    assert!(text.contains("in flight    6"), "{text}");
    assert!(text.contains("oldest       work_id 4"), "{text}");

    let (ok, text) = run(&["work-timeout", "1"], Some("tok"));
    assert!(ok && text.contains("set to 1 s"), "{text}");
    // The six items in flight expire under the new timeout and are reissued.
    let deadline = Instant::now() + Duration::from_secs(10);
    let v = loop {
        let (ok, text) = run(&["status", "--json", "--interval", "0.1"], Some("tok"));
        assert!(ok, "{text}");
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        if v["reissues"]["timeout"] != 0 || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(v["reissues"]["timeout"], 6, "{v}");
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait(Duration::from_secs(10)).0, 0);
}

#[test]
fn log_invalid_http_names_the_peer_and_the_first_bytes() {
    let job = Job::new(3);
    let server = job.serve(&["--log-invalid-http", "--exit-grace", "0"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let r = http
            .post(format!("http://{}/results", server.addr))
            .body("{\"items\": oops-not-json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400);
    });
    server.signal(libc::SIGTERM);
    let (code, stderr) = server.wait(Duration::from_secs(10));
    assert_eq!(code, 0);
    assert!(stderr.contains("invalid request"), "{stderr}");
    assert!(stderr.contains("peer=127.0.0.1:"), "{stderr}");
    assert!(stderr.contains("oops-not-json"), "{stderr}");
}

#[test]
fn a_worker_serves_its_metrics_and_the_echo_engine_errors_are_retried() {
    let job = Job::new(0);
    let lines: String = (0..40)
        .map(|i| {
            serde_json::json!({"messages": [{"role": "user", "content": format!("q{i}")}]})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(job.path("in.jsonl"), lines).unwrap();
    // Every 4th engine request fails with a 500: the backend retries it.
    let mut child = Command::new(BIN)
        .arg("infer")
        .arg("--input")
        .arg(job.path("in.jsonl"))
        .arg("--output")
        .arg(job.path("out.jsonl"))
        .args([
            "--engine",
            "echo",
            "--echo-error-rate",
            "0.25",
            "--echo-latency-ms",
            "150",
        ])
        .args(["--metrics-port", "0", "--workers", "4", "--batch-size", "4"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let addr = loop {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "no metrics address logged"
        );
        if let Some(rest) = line.split("addr=").nth(1) {
            if line.contains("worker metrics") {
                break rest
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .replace("0.0.0.0", "127.0.0.1");
            }
        }
    };
    let text = tokio::runtime::Runtime::new().unwrap().block_on(async {
        reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    assert!(
        text.contains("dispatcher_worker_engine_requests_in_flight"),
        "{text}"
    );
    assert!(
        text.contains("dispatcher_worker_engine_request_duration_seconds_bucket"),
        "{text}"
    );
    let status = child.wait().unwrap();
    assert!(status.success());
    let out = job.output_values();
    assert_eq!(out.len(), 40);
    for (i, l) in out.iter().enumerate() {
        assert_eq!(
            l["responses"],
            serde_json::json!([format!("q{i}")]),
            "line {i}: {l}"
        );
    }
}

#[test]
fn a_rerun_of_a_finished_local_job_says_so_and_names_the_files_to_move() {
    let job = Job::new(0);
    std::fs::write(
        job.path("in.jsonl"),
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
    )
    .unwrap();
    let (ok, stderr) = infer_local(&job, &[]);
    assert!(ok, "{stderr}");
    let before = std::fs::read(job.path("out.jsonl")).unwrap();
    let (ok, stderr) = infer_local(&job, &[]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("already complete (1 lines"), "{stderr}");
    for file in ["out.jsonl", "out.jsonl.checkpoint"] {
        assert!(
            stderr.contains(&job.path(file).display().to_string()),
            "names {file}: {stderr}"
        );
    }
    assert_eq!(std::fs::read(job.path("out.jsonl")).unwrap(), before);
}

/// A rerun of a finished local job starts no engine (an engine that cannot
/// start would fail the rerun); with `--overwrite` the old output and its
/// files are moved aside first, nothing is lost, and the job runs again.
#[test]
fn a_rerun_starts_no_engine_and_overwrite_moves_the_old_job_aside_first() {
    let job = Job::new(3);
    let run = |engine: &[&str], extra: &[&str]| {
        let prompt = [&["--prompt-path", ".n|tostring"], extra].concat();
        infer_local_on(&job, engine, &prompt)
    };
    let (ok, stderr) = run(&["--engine", "echo"], &[]);
    assert!(ok, "{stderr}");
    let first = std::fs::read(job.path("out.jsonl")).unwrap();
    let broken = [
        "--engine",
        "vllm",
        "--engine-bin",
        "/bin/false",
        "--model",
        "m",
    ];
    let (ok, stderr) = run(&broken, &[]);
    assert!(ok && stderr.contains("no engine was started"), "{stderr}");
    assert!(stderr.contains("--overwrite"), "{stderr}");
    let (ok, stderr) = run(&["--engine", "echo"], &["--overwrite"]);
    assert!(ok, "{stderr}");
    let aside: Vec<String> = std::fs::read_dir(job.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("out.jsonl.") && n.ends_with('Z'))
        .collect();
    let old_output = aside
        .iter()
        .find(|n| n.len() == "out.jsonl.20261204T000000Z".len())
        .unwrap_or_else(|| panic!("the old output is kept: {aside:?}"));
    assert_eq!(std::fs::read(job.path(old_output)).unwrap(), first);
    assert!(
        aside.iter().any(|n| n.starts_with("out.jsonl.checkpoint.")),
        "{aside:?}"
    );
    assert_eq!(job.output_lines().len(), 3, "the job ran again");
}

/// `dispatcher completions SHELL` prints a script each shell takes, and a
/// reader that stops early (`| head`) ends it quietly, with status 0.
#[test]
fn completions_print_for_each_shell_and_stop_quietly_when_the_reader_goes() {
    for (shell, marker) in [
        ("bash", "complete -F _dispatcher"),
        ("zsh", "#compdef dispatcher"),
        ("fish", "complete -c dispatcher"),
    ] {
        let out = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(
            out.status.success() && script.contains(marker),
            "{shell}: {script:.300}"
        );
        assert!(
            script.contains("work-timeout") && script.contains("run-batch"),
            "{shell}"
        );
    }
    let mut child = Command::new(BIN)
        .args(["completions", "bash"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Gone before the script is written (it is made after the process starts).
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.is_empty(),
        "{}: {stderr}",
        out.status
    );
}
