//! The sbatch scripts of examples/slurm on a real one-node Slurm cluster
//! (scripts/slurm/up.sh starts it; scripts/test.sh does that), with the echo
//! engine in place of vLLM: a plain run, a preemption, and a requeue.
//!
//! Where Slurm is not running these tests say so and do nothing, unless
//! `DISPATCHER_REQUIRE_SLURM=1` (scripts/test.sh sets it).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dispatcher::client::DispatcherClient;
use serde_json::{json, Value};

use crate::support::{built_binary, check_echo_answers, example, question_lines};

/// The cluster has one node: its tests run one at a time.
pub(crate) static CLUSTER: Mutex<()> = Mutex::new(());

pub(crate) fn slurm_up() -> bool {
    let up = Command::new("sinfo")
        .arg("-h")
        .output()
        .is_ok_and(|o| o.status.success());
    if !up {
        assert!(
            std::env::var_os("DISPATCHER_REQUIRE_SLURM").is_none(),
            "Slurm is not running: start it with scripts/slurm/up.sh"
        );
        eprintln!("SKIPPED: no Slurm cluster here; scripts/slurm/up.sh starts one");
    }
    up
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

struct SlurmJob {
    dir: tempfile::TempDir,
    lines: usize,
}

impl SlurmJob {
    fn new(lines: usize) -> SlurmJob {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("in.jsonl"), question_lines(lines)).unwrap();
        SlurmJob { dir, lines }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Submits one of examples/slurm's scripts from this repository, as its
    /// README says, with the echo engine.
    fn submit(&self, script: &str, env: &[(&str, &str)]) -> String {
        let job_sh = repo().join("examples/slurm/job.sh");
        let dispatcher = built_binary("", "dispatcher");
        let mut env = env.to_vec();
        env.push(("DISPATCHER_SLURM_JOB", job_sh.to_str().unwrap()));
        env.push(("DISPATCHER_BIN", dispatcher.to_str().unwrap()));
        self.sbatch(&repo().join("examples/slurm").join(script), repo(), &env)
    }

    /// Submits `script` from the directory `from`, with this job's input and
    /// output and the echo engine: nothing else of the environment tells it
    /// where the repository is.
    fn sbatch(&self, script: &Path, from: &Path, env: &[(&str, &str)]) -> String {
        let out = Command::new("sbatch")
            .args(["--parsable", "--chdir"])
            .arg(self.dir.path())
            .arg(script)
            .current_dir(from)
            .env_remove("DISPATCHER_SLURM_JOB")
            .env_remove("DISPATCHER_BIN")
            .env("INPUT", self.path("in.jsonl"))
            .env("OUTPUT", self.path("out.jsonl"))
            .env("ENGINE", "echo")
            .env("DISPATCHER_HOST", "127.0.0.1")
            .env("ENGINE_BASE_PORT", "0")
            .env("EXIT_GRACE", "3")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "sbatch: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    fn log(&self, job: &str) -> String {
        std::fs::read_to_string(self.path(&format!("dispatcher-{job}.log"))).unwrap_or_default()
    }

    fn client(&self) -> DispatcherClient {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(addr) = std::fs::read_to_string(self.path("out.jsonl.addr")) {
                return DispatcherClient::new(addr.trim());
            }
            assert!(
                Instant::now() < deadline,
                "the job never started its server"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn output(&self) -> Vec<Value> {
        crate::support::jsonl(self.path("out.jsonl"))
    }

    /// Every line answered by the echo engine, in order, no failure records.
    fn check_infer_output(&self) {
        check_echo_answers(&self.path("out.jsonl"), self.lines);
    }
}

fn state(job: &str) -> String {
    let out = Command::new("scontrol")
        .args(["show", "job", job])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("JobState="))
        .unwrap_or("GONE")
        .to_string()
}

fn wait_state(job: &str, wanted: &[&str], limit: Duration) -> String {
    let start = Instant::now();
    loop {
        let s = state(job);
        if wanted.contains(&s.as_str()) {
            return s;
        }
        assert!(
            start.elapsed() < limit,
            "job {job} is {s}, not {wanted:?}, after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Requeues a job and makes it start again now (instead of ~120 s later).
fn requeue_now(job: &str) {
    wait_state(job, &["PENDING"], Duration::from_secs(60));
    // A same-second restart fails with "Job credential revoked".
    std::thread::sleep(Duration::from_secs(2));
    run(
        "scontrol",
        &["update", &format!("JobId={job}"), "StartTime=now"],
    );
}

fn wait_lines(client: &DispatcherClient, rt: &tokio::runtime::Runtime, at_least: u64) {
    let start = Instant::now();
    loop {
        if let Ok(s) = rt.block_on(client.status()) {
            if s.lines_done >= at_least {
                return;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the job made no progress"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A 600-line job slow enough to interrupt (4 requests in flight per worker,
/// 200 ms each), once 40 lines are done.
fn slow_job_under_way(rt: &tokio::runtime::Runtime) -> (SlurmJob, String, DispatcherClient) {
    let job = SlurmJob::new(600);
    let id = job.submit(
        "infer.sbatch",
        &[
            ("WORKERS", "4"),
            ("BATCH_SIZE", "4"),
            ("EXTRA_ARGS", "--echo-latency-ms 200"),
        ],
    );
    let client = job.client();
    wait_lines(&client, rt, 40);
    (job, id, client)
}

/// Waits for the job to end, checks it completed, returns its log.
fn wait_completed(job: &SlurmJob, id: &str) -> String {
    wait_state(
        id,
        &["COMPLETED", "FAILED", "CANCELLED", "GONE"],
        Duration::from_secs(180),
    );
    let log = job.log(id);
    assert_eq!(state(id), "COMPLETED", "{log}");
    log
}

#[test]
fn a_job_with_two_worker_tasks_processes_every_line() {
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    if !slurm_up() {
        return;
    }
    let job = SlurmJob::new(300);
    let id = job.submit("infer.sbatch", &[]);
    let log = wait_completed(&job, &id);
    job.check_infer_output();
    assert!(
        log.contains("worker 0 on") && log.contains("worker 1 on"),
        "two workers: {log}"
    );
    assert!(log.contains("GPUs 0,") || log.contains("GPUs 0\n"), "{log}");

    // The task-binary script, with an example task.
    let job = SlurmJob::new(100);
    let bin = example("compare_responses");
    let id = job.submit("task.sbatch", &[("TASK_BIN", bin.to_str().unwrap())]);
    wait_completed(&job, &id);
    let out = job.output();
    assert_eq!(out.len(), 100);
    for (i, line) in out.iter().enumerate() {
        // The echo engine's sample of seed 1, which the echoed judge prompt
        // (naming A first) prefers.
        assert_eq!(
            line["preferred_text"],
            format!("question {i} #1"),
            "line {i}"
        );
    }

    // The same script with COMMAND=run-batch, on an OpenAI batch file.
    let job = SlurmJob::new(0);
    let batch: String = (0..120)
        .map(|i| {
            json!({"custom_id": format!("r{i}"), "method": "POST", "url": "/v1/chat/completions",
                   "body": {"messages": [{"role": "user", "content": format!("batch question {i}")}]}})
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(job.path("in.jsonl"), batch).unwrap();
    let id = job.submit("infer.sbatch", &[("COMMAND", "run-batch")]);
    wait_completed(&job, &id);
    let out = job.output();
    assert_eq!(out.len(), 120);
    for (i, line) in out.iter().enumerate() {
        assert_eq!(line["custom_id"], format!("r{i}"), "line {i}");
        assert_eq!(
            line["response"]["body"]["choices"][0]["message"]["content"],
            format!("batch question {i}"),
            "line {i}"
        );
    }
}

#[test]
fn preemption_releases_items_and_the_requeued_job_completes_without_tombstones() {
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    if !slurm_up() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (job, id, client) = slow_job_under_way(&rt);
    // What a preemption does: SIGTERM to every task of the job.
    run("scancel", &["--signal=TERM", &id]);
    let start = Instant::now();
    let status = loop {
        let s = rt.block_on(client.status()).unwrap();
        if s.reissues.release > 0 && s.in_flight == 0 {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the workers did not release their items: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.lines_done < 600, "{status:?}");
    run("scontrol", &["requeue", &id]);
    requeue_now(&id);
    let log = wait_completed(&job, &id);
    assert!(log.contains("(restart 1)"), "{log}");
    job.check_infer_output();
}

#[test]
fn a_requeued_job_resumes_its_server_and_redoes_nothing() {
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    if !slurm_up() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (job, id, _client) = slow_job_under_way(&rt);
    run("scontrol", &["requeue", &id]);
    wait_state(&id, &["PENDING"], Duration::from_secs(60));
    // The first run is gone: what it wrote is final.
    let written = job.output().len();
    assert!((40..600).contains(&written), "{written}");
    requeue_now(&id);
    let log = wait_completed(&job, &id);
    assert!(
        log.contains(&format!("resumed_at_line={written}")),
        "the second run starts after the {written} lines of the first: {log}"
    );
    job.check_infer_output();
}

#[test]
fn a_script_from_dispatcher_slurm_script_runs_when_submitted_from_any_directory() {
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    if !slurm_up() {
        return;
    }
    let job = SlurmJob::new(120);
    // Written and submitted in a directory of its own, far from this
    // repository, with neither DISPATCHER_SLURM_JOB nor DISPATCHER_BIN set:
    // the script carries its body and the path of the binary that wrote it.
    let elsewhere = tempfile::tempdir().unwrap();
    let written = Command::new(built_binary("", "dispatcher"))
        .args(["slurm-script", "infer"])
        .output()
        .unwrap();
    assert!(written.status.success());
    let script = elsewhere.path().join("job.sbatch");
    std::fs::write(&script, &written.stdout).unwrap();
    let id = job.sbatch(&script, elsewhere.path(), &[]);
    wait_completed(&job, &id);
    job.check_infer_output();
}
