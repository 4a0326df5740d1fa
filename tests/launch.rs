//! `dispatcher launch`: the server and its workers as one command, with
//! local workers (`--backend local`, the same logic as Slurm's) and on the
//! real one-node Slurm cluster that scripts/test.sh starts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dispatcher::client::DispatcherClient;
use serde_json::Value;

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
        Command::new(dispatcher_bin())
            .arg("launch")
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
            .stderr(std::fs::File::create(self.path(&format!("launch-{n}.err"))).unwrap())
            .spawn()
            .unwrap()
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

/// Workers that exit 0 without ever reaching the server (an address their
/// nodes cannot reach) are failures too: launch stops instead of
/// submitting forever, and says which address they were given.
#[test]
fn workers_that_never_reach_the_server_stop_the_job() {
    let job = LaunchJob::new(20);
    let bin = dispatcher_bin().display().to_string();
    // Port 1 of this machine: nobody listens there.
    let script =
        format!("DISPATCHER_SERVER=127.0.0.1:1 exec '{bin}' infer --engine echo --server-wait 1");
    let mut launch = job.start(
        0,
        &[
            "--backend",
            "local",
            "--max-workers",
            "1",
            "--failure-backoff",
            "0.1",
        ],
        &["sh", "-c", &script],
    );
    let code = wait(&mut launch, Duration::from_secs(60));
    let said = job.said(0);
    assert_eq!(code, 1, "{said}");
    assert!(
        said.contains("without ever reaching the server at 127.0.0.1:"),
        "{said}"
    );
    assert!(said.contains("3 worker jobs failed in a row"), "{said}");
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
    let job = LaunchJob::new(400);
    let bin = dispatcher_bin().display().to_string();
    let worker = vec![
        "sh".to_string(),
        "-c".into(),
        format!(
            "if [ \"$DISPATCHER_LAUNCH_WORKER\" -lt 3 ]; then \
               '{bin}' infer --engine echo --echo-latency-ms 100000 --max-in-flight 8 & p=$!; \
               sleep 1.5; kill -9 $p; exit 9; \
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

/// A free port on 127.0.0.1.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A launched job takes lines only from its own workers: on a fixed port
/// where another job ran, workers of that job (holding its token) and a
/// worker started by hand (no token) are refused, and the server says so
/// in its log; every line is answered by the job's own worker command.
#[test]
fn a_launched_job_takes_no_lines_from_workers_not_its_own() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let job = LaunchJob::new(300);
    let port = free_port().to_string();
    let mut launch = job.start(
        0,
        &["--backend", "local", "--max-workers", "1", "--port", &port],
        &args(&echo_worker(400)),
    );
    job.wait_lines(&rt, 10);
    let token = std::fs::read_to_string(job.path("out.jsonl.launch/token")).unwrap();
    assert_eq!(token.trim().len(), 32, "a token of 128 bits: {token}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(job.path("out.jsonl.launch/token"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o077, 0, "only its owner reads the token");
    // Workers that would answer every line "intruder": one with another
    // job's token, one with none.
    let intruders: Vec<Child> = [Some("the-token-of-another-job"), None]
        .into_iter()
        .map(|token| {
            let mut cmd = Command::new(dispatcher_bin());
            cmd.args(["infer", "--engine", "echo", "--echo-reply", "intruder"])
                .args(["--dispatcher", &format!("127.0.0.1:{port}")])
                .env_remove("DISPATCHER_TOKEN")
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if let Some(token) = token {
                cmd.env("DISPATCHER_TOKEN", token);
            }
            cmd.spawn().unwrap()
        })
        .collect();
    // The server says it refused both.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = std::fs::read_to_string(job.path("out.jsonl.launch/server.log")).unwrap();
        if log.contains("refused request(s) without this job's token")
            && log.contains("refused request(s) with another token than this job's token")
        {
            break;
        }
        assert!(Instant::now() < deadline, "{log}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        wait(&mut launch, Duration::from_secs(120)),
        0,
        "{}",
        job.said(0)
    );
    for mut intruder in intruders {
        let _ = intruder.kill();
        let _ = intruder.wait();
    }
    job.check_output();
}

/// A launch whose output already has a running job of another input (a
/// launch of it running, or its server left after launch was killed) is
/// refused, naming the input, instead of watching or taking over a job
/// that answers another input.
#[test]
fn a_launch_of_another_input_neither_watches_nor_takes_over_the_job() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let job = LaunchJob::new(300);
    std::fs::write(
        job.path("other.jsonl"),
        question_lines(300).replace("question", "other question"),
    )
    .unwrap();
    let flags = ["--backend", "local", "--max-workers", "1"];
    let mut first = job.start(0, &flags, &args(&echo_worker(200)));
    job.wait_lines(&rt, 20);
    let other = |n: u32| {
        let mut child = Command::new(dispatcher_bin())
            .args([
                "launch",
                "--input",
                "other.jsonl",
                "--output",
                "out.jsonl",
                "--poll",
                "0.3",
            ])
            .args(flags)
            .arg("--")
            .args(echo_worker(5))
            .current_dir(job.dir.path())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(job.path(&format!("launch-{n}.out"))).unwrap())
            .stderr(std::fs::File::create(job.path(&format!("launch-{n}.err"))).unwrap())
            .spawn()
            .unwrap();
        let code = wait(&mut child, Duration::from_secs(30));
        let said = job.said(n);
        assert_eq!(code, 1, "{said}");
        assert!(
            said.contains("--input other.jsonl") && said.contains("runs on another input"),
            "{said}"
        );
    };
    // While the first launch runs: no watching.
    other(1);
    // Launch killed, its server and workers left: no taking over.
    first.kill().unwrap();
    first.wait().unwrap();
    other(2);
    // The job's own input takes it over and completes it.
    let mut again = job.start(3, &flags, &args(&echo_worker(5)));
    assert_eq!(
        wait(&mut again, Duration::from_secs(120)),
        0,
        "{}",
        job.said(3)
    );
    job.check_output();
}

mod on_slurm {
    //! The same on the real cluster: sbatch, squeue, scancel.
    use super::*;
    use crate::slurm::{slurm_up, CLUSTER};

    fn our_jobs(dir: &Path) -> Vec<String> {
        let state: Value = serde_json::from_slice(
            &std::fs::read(dir.join("out.jsonl.launch/state.json")).unwrap(),
        )
        .unwrap();
        let ids: Vec<String> = state["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_string())
            .collect();
        let out = Command::new("squeue")
            .args(["-h", "-o", "%i"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|id| ids.contains(id))
            .collect()
    }

    fn slurm_flags() -> Vec<&'static str> {
        vec![
            "--max-workers",
            "3",
            "--advertise",
            "127.0.0.1",
            "--failure-backoff",
            "1",
        ]
    }

    fn scancel(args: &[&str]) {
        let out = Command::new("scancel").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// 600 lines, three worker jobs: one is cancelled outright and replaced,
    /// another is preempted (SIGTERM) and releases its lines; the output is
    /// exact and nothing is left in squeue.
    #[test]
    fn workers_cancelled_or_preempted_are_replaced_and_the_output_is_exact() {
        let _cluster = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
        if !slurm_up() {
            return;
        }
        let rt = tokio::runtime::Runtime::new().unwrap();
        let job = LaunchJob::new(600);
        let mut launch = job.start(0, &slurm_flags(), &args(&echo_worker(400)));
        job.wait_lines(&rt, 60);
        let running = |state: &Value| -> Vec<String> {
            state["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|j| j["ended"].is_null() && !j["started"].is_null())
                .map(|j| j["id"].as_str().unwrap().to_string())
                .collect()
        };
        let ids = running(&job.state());
        assert!(ids.len() >= 2, "{}", job.state());
        scancel(&[&ids[0]]);
        scancel(&["--signal=TERM", &ids[1]]);
        let client = job.client();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = rt.block_on(client.status()).unwrap();
            if s.reissues.release > 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the preempted worker released nothing: {s:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let code = wait(&mut launch, Duration::from_secs(240));
        let said = job.said(0);
        assert_eq!(code, 0, "{said}");
        job.check_output();
        let state = job.state();
        assert!(state["replaced"].as_u64().unwrap() >= 1, "{state}");
        assert!(
            said.contains(&format!("worker {} ended from outside (CANCELLED", ids[0])),
            "{said}"
        );
        assert!(our_jobs(job.dir.path()).is_empty(), "jobs left in squeue");
    }

    /// A task binary that exits 1 at start (its engine cannot start): launch
    /// stops within a bounded time with that binary's error, and no job of
    /// it is left in squeue.
    #[test]
    fn a_task_binary_that_fails_at_start_stops_launch_and_leaves_no_job() {
        let _cluster = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
        if !slurm_up() {
            return;
        }
        let job = LaunchJob::new(50);
        let task = example("five_steps").display().to_string();
        let worker = [
            task.as_str(),
            "--engine",
            "llamacpp",
            "--engine-bin",
            "/nonexistent/llama-server",
            "--model",
            "/nonexistent/tiny.gguf",
        ];
        let started = Instant::now();
        let mut launch = job.start(0, &slurm_flags(), &worker);
        let code = wait(&mut launch, Duration::from_secs(120));
        let said = job.said(0);
        assert_eq!(code, 1, "{said}");
        assert!(started.elapsed() < Duration::from_secs(90), "{said}");
        assert!(
            said.contains("failed in a row (--max-worker-failures 3)"),
            "{said}"
        );
        assert!(
            said.contains("/nonexistent/llama-server"),
            "the binary's own error is quoted: {said}"
        );
        assert!(our_jobs(job.dir.path()).is_empty(), "jobs left in squeue");
    }

    /// A worker job that cannot start (here: not before an hour from now)
    /// is reported once it has been pending past --pending-timeout, with
    /// Slurm's reason; Ctrl-C then cancels it.
    #[test]
    fn a_job_pending_too_long_is_reported_with_slurms_reason() {
        let _cluster = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
        if !slurm_up() {
            return;
        }
        let job = LaunchJob::new(10);
        let mut launch = job.start(
            0,
            &[
                "--max-workers",
                "1",
                "--advertise",
                "127.0.0.1",
                "--pending-timeout",
                "1",
                "--sbatch-args",
                "--begin=now+1hour",
            ],
            &args(&echo_worker(5)),
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while !job.said(0).contains("has been pending for") {
            assert!(Instant::now() < deadline, "{}", job.said(0));
            std::thread::sleep(Duration::from_millis(200));
        }
        let said = job.said(0);
        assert!(said.contains("Slurm's reason: BeginTime"), "{said}");
        assert_eq!(our_jobs(job.dir.path()).len(), 1, "only --max-workers jobs");
        send_signal(i32::try_from(launch.id()).unwrap(), libc::SIGINT);
        assert_eq!(
            wait(&mut launch, Duration::from_secs(60)),
            130,
            "{}",
            job.said(0)
        );
        assert!(our_jobs(job.dir.path()).is_empty(), "jobs left in squeue");
    }

    /// A second launch on a running job watches it; Ctrl-C of the first:
    /// every worker job is cancelled, the server stops after a checkpoint,
    /// and the same command resumes to the end.
    #[test]
    fn ctrl_c_cancels_every_worker_job_and_the_job_resumes() {
        let _cluster = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
        if !slurm_up() {
            return;
        }
        let rt = tokio::runtime::Runtime::new().unwrap();
        let job = LaunchJob::new(400);
        let mut launch = job.start(0, &slurm_flags(), &args(&echo_worker(400)));
        job.wait_lines(&rt, 30);
        // A second launch on the same output watches; it submits nothing.
        let mut second = job.start(2, &slurm_flags(), &args(&echo_worker(400)));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !job.said(2).contains("another launch runs this job") {
            assert!(Instant::now() < deadline, "{}", job.said(2));
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(job.state()["jobs"].as_array().unwrap().len() <= 3);
        send_signal(i32::try_from(second.id()).unwrap(), libc::SIGINT);
        assert_eq!(wait(&mut second, Duration::from_secs(10)), 130);
        send_signal(i32::try_from(launch.id()).unwrap(), libc::SIGINT);
        let code = wait(&mut launch, Duration::from_secs(120));
        assert_eq!(code, 130, "{}", job.said(0));
        assert!(our_jobs(job.dir.path()).is_empty(), "jobs left in squeue");
        assert!(job.path("out.jsonl.checkpoint").exists());
        let mut again = job.start(1, &slurm_flags(), &args(&echo_worker(5)));
        assert_eq!(
            wait(&mut again, Duration::from_secs(180)),
            0,
            "{}",
            job.said(1)
        );
        job.check_output();
        assert!(our_jobs(job.dir.path()).is_empty());
    }
}
