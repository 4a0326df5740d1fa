//! `launch` on the real cluster: sbatch, squeue, scancel.

use super::*;
use crate::slurm::{slurm_up, CLUSTER};

fn our_jobs(dir: &Path) -> Vec<String> {
    let state: Value =
        serde_json::from_slice(&std::fs::read(dir.join("out.jsonl.launch/state.json")).unwrap())
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
    // The preempted one exits 0, having released its lines: said, and
    // counted as replaced with the cancelled one.
    assert!(
        said.contains(&format!("worker {} stopped while lines were left", ids[1])),
        "{said}"
    );
    assert!(state["replaced"].as_u64().unwrap() >= 2, "{state}");
    assert!(our_jobs(job.dir.path()).is_empty(), "jobs left in squeue");
}

/// A task binary that exits 1 at start (its engine cannot start): launch
/// stops within a bounded time with that binary's error (quoted from its
/// log, also when `--chdir` runs it elsewhere), and no job of it is left in
/// squeue.
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
    // The job runs elsewhere (--chdir): its log is still where launch
    // reads it, so its error is quoted.
    let mut flags = slurm_flags();
    flags.push("--sbatch-args=--chdir=/tmp");
    let mut launch = job.start(0, &flags, &worker);
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

/// The jobs in squeue named `name`, recorded by launch or not.
fn jobs_named(name: &str) -> Vec<String> {
    let out = Command::new("squeue")
        .args(["-h", "-o", "%i", "-n", name])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Sets the test cluster's partition to `state` (`DRAIN`: sbatch refuses
/// new jobs); `UP` again when dropped, whatever the test did.
struct Partition;

impl Partition {
    fn set(state: &str) -> Partition {
        let out = Command::new("scontrol")
            .args(["update", "PartitionName=debug", &format!("State={state}")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Partition
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = Command::new("scontrol")
            .args(["update", "PartitionName=debug", "State=UP"])
            .status();
    }
}

/// sbatch refusing a replacement (the partition drained for a while) does
/// not stop the job: the workers there keep working, launch says so and
/// submits again later, and the job ends exact.
#[test]
fn a_refused_submission_keeps_the_workers_and_is_tried_again() {
    let _cluster = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    if !slurm_up() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let job = LaunchJob::new(500);
    let mut launch = job.start(0, &slurm_flags(), &args(&echo_worker(300)));
    job.wait_lines(&rt, 40);
    let drained = Partition::set("DRAIN");
    // A worker cancelled: launch submits a replacement, which is refused.
    let running: Vec<String> = job.state()["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["ended"].is_null() && !j["started"].is_null())
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect();
    assert!(running.len() >= 2, "{}", job.state());
    scancel(&[&running[0]]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !job.said(0).contains("could not submit a worker") {
        assert!(
            launch.try_wait().unwrap().is_none(),
            "launch stopped: {}",
            job.said(0)
        );
        assert!(Instant::now() < deadline, "{}", job.said(0));
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    drop(drained);
    let code = wait(&mut launch, Duration::from_secs(240));
    let said = job.said(0);
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("keep working"), "{said}");
    job.check_output();
    assert!(our_jobs(job.dir.path()).is_empty(), "jobs left in squeue");
}

/// A Ctrl-C at the terminal (SIGINT to launch's whole process group) while
/// sbatch runs reaches launch alone: the job sbatch submits is recorded
/// and cancelled with the others; none is left running unrecorded. sbatch
/// is slowed down here (a wrapper that waits after submitting) so that the
/// Ctrl-C falls while it runs.
#[test]
fn ctrl_c_while_sbatch_runs_leaves_no_job_behind() {
    use std::os::unix::process::CommandExt as _;
    let _cluster = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    if !slurm_up() {
        return;
    }
    let job = LaunchJob::new(200);
    let bin = job.path("bin");
    std::fs::create_dir(&bin).unwrap();
    let real = String::from_utf8(
        Command::new("sh")
            .args(["-c", "command -v sbatch"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let marker = job.path("sbatch-ran");
    std::fs::write(
        bin.join("sbatch"),
        format!(
            "#!/bin/sh\nout=$('{}' \"$@\") || exit $?\ntouch '{}'\nsleep 3\necho \"$out\"\n",
            real.trim(),
            marker.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        bin.join("sbatch"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let name = format!("ctrl-c-{}", std::process::id());
    let mut flags = slurm_flags();
    flags.extend(["--job-name", &name]);
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let mut launch = job
        .command(0, &flags, &args(&echo_worker(300)))
        .env("PATH", path)
        // Its own group, as a shell gives a command it runs.
        .process_group(0)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "{}", job.said(0));
        std::thread::sleep(Duration::from_millis(50));
    }
    // The terminal's Ctrl-C: the whole foreground group.
    send_signal(-i32::try_from(launch.id()).unwrap(), libc::SIGINT);
    assert_eq!(
        wait(&mut launch, Duration::from_secs(120)),
        130,
        "{}",
        job.said(0)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !jobs_named(&name).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let left = jobs_named(&name);
    if !left.is_empty() {
        scancel(&left.iter().map(String::as_str).collect::<Vec<_>>());
    }
    assert!(
        left.is_empty(),
        "jobs left in squeue: {left:?}\n{}",
        job.said(0)
    );
}

/// Launch and its server die together (a login node's crash) while worker
/// jobs run: the rerun starts a new server on a new port, cancels the jobs
/// still pointed at the dead one (lost, not failed: the job is not stopped
/// for "workers that never reached the server"), and completes exactly.
#[test]
fn a_rerun_after_launch_and_its_server_died_cancels_the_orphaned_jobs() {
    let _cluster = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    if !slurm_up() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let job = LaunchJob::new(400);
    let mut flags = slurm_flags();
    flags.extend(["--max-worker-failures", "1"]);
    let first = job.start(0, &flags, &args(&echo_worker(300)));
    job.wait_lines(&rt, 30);
    let state = job.crash_with_server(first);
    let orphans = our_jobs(job.dir.path());
    assert!(!orphans.is_empty(), "{state}");

    let mut again = job.start(1, &flags, &args(&echo_worker(100)));
    let code = wait(&mut again, Duration::from_secs(240));
    let said = job.said(1);
    assert_eq!(code, 0, "{said}");
    assert!(
        said.contains("of the earlier launch: they were started against its server"),
        "{said}"
    );
    job.check_output();
    let after = job.state();
    for j in after["jobs"].as_array().unwrap() {
        assert_ne!(j["end"], "failed", "{j}");
        if orphans.contains(&j["id"].as_str().unwrap().to_string()) {
            assert_eq!(j["end"], "lost", "{j}");
        }
    }
    assert!(our_jobs(job.dir.path()).is_empty(), "jobs left in squeue");
}
