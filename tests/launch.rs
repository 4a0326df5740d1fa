//! `dispatcher launch`: the server and its workers as one command, with
//! local workers (`--backend local`, the same logic as Slurm's) and on the
//! real one-node Slurm cluster that scripts/test.sh starts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dispatcher::client::DispatcherClient;
use serde_json::Value;

mod identity;
mod on_slurm;
mod takeover;
mod unreachable;

use crate::support::{
    check_echo_answers, dispatcher_bin, example, jsonl, question_lines, send_signal,
};

/// A job directory with `lines` chat lines and the `launch` runs on it.
struct LaunchJob {
    dir: tempfile::TempDir,
    lines: usize,
}

impl LaunchJob {
    fn new(lines: usize) -> LaunchJob {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("in.jsonl"), question_lines(lines)).unwrap();
        LaunchJob { dir, lines }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts `dispatcher launch` with the job's input and output,
    /// `flags`, and `worker` after `--`; its stdout and stderr go to
    /// `launch-<n>.out`/`.err`.
    fn start(&self, n: u32, flags: &[&str], worker: &[&str]) -> Child {
        self.command(n, flags, worker).spawn().unwrap()
    }

    /// The command [`start`](Self::start) runs, to change before it does.
    fn command(&self, n: u32, flags: &[&str], worker: &[&str]) -> Command {
        let mut cmd = Command::new(dispatcher_bin());
        cmd.arg("launch")
            .args([
                "--input",
                "in.jsonl",
                "--output",
                "out.jsonl",
                "--poll",
                "0.3",
            ])
            .args(["--exit-grace", "1", "--host", "127.0.0.1"])
            .args(flags)
            .arg("--")
            .args(worker)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(self.path(&format!("launch-{n}.out"))).unwrap())
            .stderr(std::fs::File::create(self.path(&format!("launch-{n}.err"))).unwrap());
        cmd
    }

    fn said(&self, n: u32) -> String {
        let read = |ext| {
            std::fs::read_to_string(self.path(&format!("launch-{n}.{ext}"))).unwrap_or_default()
        };
        format!("{}{}", read("out"), read("err"))
    }

    /// The state file (`null` before launch wrote it).
    fn state(&self) -> Value {
        std::fs::read(self.path("out.jsonl.launch/state.json"))
            .map_or(Value::Null, |b| serde_json::from_slice(&b).unwrap())
    }

    /// The server's client, once the state file names it.
    fn client(&self) -> DispatcherClient {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(addr) = std::fs::read(self.path("out.jsonl.launch/state.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .and_then(|s| s["server"]["addr"].as_str().map(str::to_string))
            {
                // The token launch made for the job, when it made one.
                let token = std::fs::read_to_string(self.path("out.jsonl.launch/token")).ok();
                return DispatcherClient::with_token(&addr, token.as_deref().map(str::trim));
            }
            assert!(Instant::now() < deadline, "launch never started its server");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the server has written `at_least` lines.
    fn wait_lines(&self, rt: &tokio::runtime::Runtime, at_least: u64) {
        let client = self.client();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if rt
                .block_on(client.status())
                .is_ok_and(|s| s.lines_done >= at_least)
            {
                return;
            }
            assert!(Instant::now() < deadline, "no progress to {at_least} lines");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A login node's crash: `launch` and its server SIGKILLed together
    /// (its workers left running); the state file as they left it.
    fn crash_with_server(&self, mut launch: Child) -> Value {
        launch.kill().unwrap();
        launch.wait().unwrap();
        let state = self.state();
        let server = state["server"]["pid"].as_u64().unwrap();
        send_signal(i32::try_from(server).unwrap(), libc::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(server) {
            assert!(Instant::now() < deadline, "the server outlived SIGKILL");
            std::thread::sleep(Duration::from_millis(50));
        }
        state
    }

    /// Every line answered by the echo engine, in order, none failed.
    fn check_output(&self) {
        check_echo_answers(&self.path("out.jsonl"), self.lines);
    }
}

fn wait(child: &mut Child, limit: Duration) -> i32 {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("launch did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn alive(pid: u64) -> bool {
    dispatcher::process::alive(u32::try_from(pid).unwrap())
}

/// The echo worker: `dispatcher infer` with `latency` ms per request.
fn echo_worker(latency: u32) -> Vec<String> {
    vec![
        dispatcher_bin().display().to_string(),
        "infer".into(),
        "--engine".into(),
        "echo".into(),
        "--echo-latency-ms".into(),
        latency.to_string(),
        "--max-in-flight".into(),
        "8".into(),
    ]
}

/// Worker 0 (`DISPATCHER_LAUNCH_WORKER`) answers in `slow` ms and holds 5
/// lines at a time; the others answer in `fast` ms.
fn one_slow_worker(slow: u32, fast: u32) -> Vec<String> {
    let bin = dispatcher_bin().display().to_string();
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "if [ \"$DISPATCHER_LAUNCH_WORKER\" = 0 ]; then set -- {slow} 5; else set -- {fast} 8; fi; \
             exec '{bin}' infer --engine echo --echo-latency-ms \"$1\" --max-in-flight \"$2\" --batch-size \"$2\""
        ),
    ]
}

fn args(words: &[String]) -> Vec<&str> {
    words.iter().map(String::as_str).collect()
}

/// Three local workers, one of them slow: the job completes exactly, and
/// the two fast ones exit once no line is left to hand out instead of
/// waiting for the slow one's last lines; the report is printed and the
/// exit status is 0.
#[test]
fn local_workers_finish_the_job_and_idle_ones_leave_at_the_tail() {
    let job = LaunchJob::new(300);
    let worker = one_slow_worker(6000, 100);
    let mut launch = job.start(
        0,
        &["--backend", "local", "--max-workers", "3"],
        &args(&worker),
    );
    let code = wait(&mut launch, Duration::from_secs(120));
    let said = job.said(0);
    assert_eq!(code, 0, "{said}");
    job.check_output();
    assert!(
        said.contains("input            300 lines: every one has its output line"),
        "{said}"
    );
    assert!(said.contains("tail "), "{said}");
    // A plain JSONL input is not staged, and launch does not say it is.
    assert!(!said.contains("staged"), "{said}");
    let state = job.state();
    let jobs = state["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 3, "{state}");
    // A local worker runs from the moment it is started.
    for j in jobs {
        assert!(j["started"].as_f64() >= j["submitted"].as_f64(), "{j}");
    }
    let log = |j: &Value| {
        std::fs::read_to_string(job.dir.path().join(j["log"].as_str().unwrap())).unwrap()
    };
    let slow = jobs.iter().find(|j| j["ordinal"] == 0).unwrap();
    for fast in jobs.iter().filter(|j| j["ordinal"] != 0) {
        assert!(
            log(fast).contains("no unissued line is left"),
            "a fast worker waited: {}",
            log(fast)
        );
        assert!(
            fast["ended"].as_f64() < slow["ended"].as_f64(),
            "a fast worker ended after the slow one: {state}"
        );
        assert_eq!(fast["end"], "done");
    }
    // Nothing of the job is left running.
    for j in jobs {
        assert!(!alive(j["pid"].as_u64().unwrap()), "{j}");
    }
    assert!(!alive(state["server"]["pid"].as_u64().unwrap()));
    // The same command again: complete already, said so; no worker, and
    // no tail figures of the run before.
    let mut again = job.start(
        1,
        &["--backend", "local", "--max-workers", "3"],
        &args(&worker),
    );
    assert_eq!(
        wait(&mut again, Duration::from_secs(60)),
        0,
        "{}",
        job.said(1)
    );
    let said = job.said(1);
    assert!(said.contains("the job is complete already"), "{said}");
    assert!(
        !said.contains("submitted") && !said.contains("tail "),
        "{said}"
    );
}

/// At the tail the idle workers have left; when the last worker is then
/// preempted and hands its lines back, launch starts a worker for them.
#[test]
fn lines_handed_back_after_the_others_left_get_a_new_worker() {
    let job = LaunchJob::new(200);
    let worker = one_slow_worker(60_000, 100);
    let mut launch = job.start(
        0,
        &["--backend", "local", "--max-workers", "3"],
        &args(&worker),
    );
    // Wait for the two fast workers to leave, the slow one holding 5 lines.
    let deadline = Instant::now() + Duration::from_secs(60);
    let slow_pid = loop {
        let state = job.state();
        let jobs = state["jobs"].as_array().cloned().unwrap_or_default();
        let ended = jobs.iter().filter(|j| !j["ended"].is_null()).count();
        if ended == 2 {
            let slow = jobs.iter().find(|j| j["ordinal"] == 0).unwrap();
            assert!(slow["ended"].is_null(), "{state}");
            break slow["pid"].as_u64().unwrap();
        }
        assert!(Instant::now() < deadline, "{state}\n{}", job.said(0));
        std::thread::sleep(Duration::from_millis(100));
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = rt.block_on(job.client().status()).unwrap();
    let held = s.in_flight;
    assert!(
        held > 0 && s.queued_for_reissue == 0 && s.next_work_id == 200,
        "the slow worker holds the last unfinished lines: {s:?}"
    );
    // Preempted: SIGTERM to its process group (the worker and its engine).
    send_signal(-i32::try_from(slow_pid).unwrap(), libc::SIGTERM);
    let code = wait(&mut launch, Duration::from_secs(60));
    let said = job.said(0);
    assert_eq!(code, 0, "{said}");
    job.check_output();
    let state = job.state();
    let jobs = state["jobs"].as_array().unwrap();
    assert_eq!(
        jobs.len(),
        4,
        "one worker for the lines that came back: {state}"
    );
    assert!(
        said.contains(&format!("lines left to hand out: {held}")),
        "{said}"
    );
}

/// A `--sbatch-template` that cannot serve (missing, or without
/// `{worker}`) stops launch before anything is started: no server left
/// bound, no launch folder, no lock.
#[test]
fn a_bad_sbatch_template_stops_launch_before_anything_starts() {
    let job = LaunchJob::new(5);
    std::fs::write(job.path("no-worker.sh"), "#!/bin/bash\nsrun true\n").unwrap();
    for (template, says) in [
        ("missing.sh", "could not read it"),
        ("no-worker.sh", "has no {worker}"),
    ] {
        let mut launch = job.start(
            0,
            &["--backend", "slurm", "--sbatch-template", template],
            &args(&echo_worker(5)),
        );
        let code = wait(&mut launch, Duration::from_secs(30));
        let said = job.said(0);
        assert_eq!(code, 1, "{said}");
        assert!(
            said.contains("--sbatch-template") && said.contains(says),
            "{said}"
        );
        assert!(!job.path("out.jsonl.launch").exists(), "{said}");
        assert!(!job.path("out.jsonl").exists(), "{said}");
    }
}

/// A worker command that fails at start is retried up to
/// --max-worker-failures in a row, then launch stops everything it started
/// and quotes the worker's error; the output is left to resume.
#[test]
fn workers_that_fail_at_start_stop_the_job_with_their_error() {
    let job = LaunchJob::new(50);
    let failing = [
        "sh",
        "-c",
        "echo 'error: --model /models/nope: no such model folder' >&2; exit 1",
    ];
    let started = Instant::now();
    let mut launch = job.start(
        0,
        &[
            "--backend",
            "local",
            "--max-workers",
            "2",
            "--max-worker-failures",
            "3",
            "--failure-backoff",
            "0.2",
        ],
        &failing,
    );
    let code = wait(&mut launch, Duration::from_secs(60));
    let said = job.said(0);
    assert_eq!(code, 1, "{said}");
    assert!(started.elapsed() < Duration::from_secs(30), "{said}");
    assert!(
        said.contains("3 worker jobs failed in a row (--max-worker-failures 3)"),
        "{said}"
    );
    assert!(
        said.contains("| error: --model /models/nope: no such model folder"),
        "{said}"
    );
    let state = job.state();
    assert_eq!(
        state["jobs"].as_array().unwrap().len(),
        3,
        "no submission past the limit: {state}"
    );
    assert!(
        !alive(state["server"]["pid"].as_u64().unwrap()),
        "the server was stopped"
    );
    assert!(
        job.path("out.jsonl.checkpoint").exists(),
        "the server checkpointed on its way out"
    );
}

/// A job with an access token: launch's server requires it, and its
/// workers (given it through their environment, never a file) send it.
#[test]
fn a_job_with_a_token_runs_its_workers_with_it() {
    let job = LaunchJob::new(40);
    let mut launch = job.start(
        0,
        &[
            "--backend",
            "local",
            "--max-workers",
            "2",
            "--token",
            "s3cret-token",
        ],
        &args(&echo_worker(5)),
    );
    assert_eq!(
        wait(&mut launch, Duration::from_secs(60)),
        0,
        "{}",
        job.said(0)
    );
    job.check_output();
    let files: Vec<String> = std::fs::read_dir(job.path("out.jsonl.launch"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default())
        .collect();
    assert!(
        files.iter().all(|text| !text.contains("s3cret-token")),
        "the token is in no file of the launch folder"
    );
}

/// Ctrl-C stops the workers (they release their lines) and then the
/// server; the same command then resumes and completes the job exactly. A
/// second launch on the same output while the first runs watches it
/// instead of starting another server.
#[test]
fn ctrl_c_leaves_a_resumable_job_and_a_second_launch_attaches() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let job = LaunchJob::new(400);
    let worker = echo_worker(300);
    let flags = ["--backend", "local", "--max-workers", "2"];
    let mut first = job.start(0, &flags, &args(&worker));
    job.wait_lines(&rt, 40);
    let mut second = job.start(1, &flags, &args(&worker));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !job.said(1).contains("another launch runs this job") {
        assert!(Instant::now() < deadline, "{}", job.said(1));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        job.state()["jobs"].as_array().unwrap().len(),
        2,
        "the second launch submitted nothing"
    );
    send_signal(i32::try_from(second.id()).unwrap(), libc::SIGINT);
    assert_eq!(
        wait(&mut second, Duration::from_secs(10)),
        130,
        "{}",
        job.said(1)
    );

    send_signal(i32::try_from(first.id()).unwrap(), libc::SIGINT);
    let code = wait(&mut first, Duration::from_secs(90));
    let said = job.said(0);
    assert_eq!(code, 130, "{said}");
    assert!(said.contains("run the same command again"), "{said}");
    let state = job.state();
    for j in state["jobs"].as_array().unwrap() {
        assert!(!alive(j["pid"].as_u64().unwrap()), "a worker is left: {j}");
    }
    assert!(
        !alive(state["server"]["pid"].as_u64().unwrap()),
        "the server is left"
    );
    let written = jsonl(job.path("out.jsonl")).len();
    assert!(
        written < job.lines,
        "stopped before the end ({written} lines)"
    );

    let mut again = job.start(2, &flags, &args(&echo_worker(5)));
    assert_eq!(
        wait(&mut again, Duration::from_secs(120)),
        0,
        "{}",
        job.said(2)
    );
    job.check_output();
}

/// A launch killed outright (SIGKILL: no chance to stop anything) leaves
/// its server and workers running; the same command takes them back
/// instead of starting others, and the job completes exactly.
#[test]
fn a_killed_launch_is_started_again_without_losing_its_workers() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let job = LaunchJob::new(300);
    let worker = echo_worker(200);
    let flags = ["--backend", "local", "--max-workers", "2"];
    let mut first = job.start(0, &flags, &args(&worker));
    job.wait_lines(&rt, 20);
    first.kill().unwrap();
    first.wait().unwrap();
    let before = job.state();
    let server = before["server"]["pid"].as_u64().unwrap();
    assert!(alive(server), "the server outlives its launch");

    let mut again = job.start(1, &flags, &args(&worker));
    assert_eq!(
        wait(&mut again, Duration::from_secs(120)),
        0,
        "{}",
        job.said(1)
    );
    let said = job.said(1);
    assert!(said.contains("taking back 2 worker(s)"), "{said}");
    assert!(
        said.contains("attaching to the server an earlier launch started"),
        "{said}"
    );
    job.check_output();
    let after = job.state();
    assert_eq!(
        after["server"]["pid"].as_u64(),
        Some(server),
        "no second server"
    );
    assert!(!alive(server));
}

/// Workers that crash hard (SIGKILL) holding the first lines, one after
/// another, while the others make progress, do not stop the job: the
/// crashed ones' lines hold the written output back until their work
/// timeout, but results still come in, and that is what counts as the job
/// moving.
#[test]
fn hard_crashes_behind_which_results_still_come_in_do_not_stop_the_job() {
    // Enough lines that the fast worker is not done with them (and takes
    // no backup of the crashed ones' lines) before the third crash: line 0
    // stays unwritten until its work timeout, and only results handed in
    // show the job moving.
    let job = LaunchJob::new(2000);
    let bin = dispatcher_bin().display().to_string();
    let worker = vec![
        "sh".to_string(),
        "-c".into(),
        format!(
            "if [ \"$DISPATCHER_LAUNCH_WORKER\" -lt 3 ]; then \
               '{bin}' infer --engine echo --echo-latency-ms 100000 --max-in-flight 8 & p=$!; \
               if [ \"$DISPATCHER_LAUNCH_WORKER\" -lt 2 ]; then sleep 0.8; else sleep 2.5; fi; \
               kill -9 $p; exit 9; \
             fi; \
             exec '{bin}' infer --engine echo --echo-latency-ms 20 --max-in-flight 8"
        ),
    ];
    let mut launch = job.start(
        0,
        &[
            "--backend",
            "local",
            "--max-workers",
            "2",
            "--work-timeout",
            "15",
            "--failure-backoff",
            "0.2",
        ],
        &args(&worker),
    );
    let code = wait(&mut launch, Duration::from_secs(120));
    let said = job.said(0);
    assert_eq!(code, 0, "{said}");
    assert!(
        said.matches(" failed (").count() >= 3,
        "three workers crashed: {said}"
    );
    job.check_output();
}
