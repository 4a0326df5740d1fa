//! A launch that comes back after its host lost everything (#38 items 3, 7):
//! the server it finds recorded is gone, and its process id may belong to
//! another process by now.

use super::*;

/// Launch and its server die together (a login node crash); by the rerun
/// the server's process id belongs to an unrelated process. The rerun takes
/// that process for no server (nor signals it): it starts a new server,
/// cancels the workers still pointed at the dead one without counting them
/// as failures, and the job completes exactly.
#[test]
fn a_rerun_after_launch_and_its_server_died_starts_afresh_without_false_failures() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let job = LaunchJob::new(300);
    let worker = echo_worker(300);
    let flags = [
        "--backend",
        "local",
        "--max-workers",
        "2",
        "--max-worker-failures",
        "1",
    ];
    let first = job.start(0, &flags, &args(&worker));
    job.wait_lines(&rt, 20);
    let state = job.crash_with_server(first);
    let workers: Vec<u64> = state["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|j| j["pid"].as_u64())
        .collect();
    assert!(workers.iter().all(|&w| alive(w)), "{state}");
    // The server's id now names another process (its id reused).
    let mut stranger = Command::new("sleep").arg("600").spawn().unwrap();
    let mut reused = state.clone();
    reused["server"]["pid"] = stranger.id().into();
    std::fs::write(
        job.path("out.jsonl.launch/state.json"),
        serde_json::to_vec_pretty(&reused).unwrap(),
    )
    .unwrap();

    let mut again = job.start(1, &flags, &args(&worker));
    let code = wait(&mut again, Duration::from_secs(180));
    let said = job.said(1);
    assert_eq!(code, 0, "{said}");
    assert!(
        stranger.try_wait().unwrap().is_none(),
        "the process that took the server's id was signalled"
    );
    stranger.kill().unwrap();
    stranger.wait().unwrap();
    assert!(!said.contains("attaching"), "{said}");
    assert!(
        said.contains("cancelling 2 worker(s) of the earlier launch"),
        "{said}"
    );
    assert!(!said.contains(" failed ("), "{said}");
    job.check_output();
    let after = job.state();
    assert_ne!(after["server"]["pid"], state["server"]["pid"]);
    for j in after["jobs"].as_array().unwrap() {
        assert_ne!(j["end"], "failed", "{j}");
    }
    assert!(
        workers.iter().all(|&w| !alive(w)),
        "old workers left running"
    );
}

/// A server killed under a running launch (SIGKILL: by hand, or the
/// out-of-memory killer) is reported as killed, by which signal, not as a
/// server error to look for in its log; the same command resumes the job.
#[test]
fn a_server_killed_under_launch_is_said_to_be_killed_and_the_job_resumes() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let job = LaunchJob::new(200);
    let worker = echo_worker(200);
    let flags = ["--backend", "local", "--max-workers", "2"];
    let mut first = job.start(0, &flags, &args(&worker));
    job.wait_lines(&rt, 20);
    let server = job.state()["server"]["pid"].as_u64().unwrap();
    send_signal(i32::try_from(server).unwrap(), libc::SIGKILL);
    assert_eq!(wait(&mut first, Duration::from_secs(120)), 1);
    let said = job.said(0);
    assert!(
        said.contains("the server was killed by signal 9 (SIGKILL"),
        "{said}"
    );
    assert!(!said.contains("fix what"), "{said}");
    let mut again = job.start(1, &flags, &args(&worker));
    assert_eq!(
        wait(&mut again, Duration::from_secs(120)),
        0,
        "{}",
        job.said(1)
    );
    job.check_output();
}

/// A second Ctrl-C while launch waits for its workers to end (here: workers
/// that ignore SIGTERM, so the first only starts a 30 s grace) stops the
/// waiting: the workers are killed at once and launch exits 130.
#[test]
fn a_second_ctrl_c_stops_waiting_for_the_workers() {
    let job = LaunchJob::new(200);
    let mut launch = job.start(
        0,
        &["--backend", "local", "--max-workers", "2"],
        &["sh", "-c", "trap '' TERM; exec sleep 600"],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while job.state()["jobs"].as_array().map_or(0, Vec::len) < 2 {
        assert!(Instant::now() < deadline, "{}", job.said(0));
        std::thread::sleep(Duration::from_millis(100));
    }
    let pids: Vec<u64> = job.state()["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["pid"].as_u64().unwrap())
        .collect();
    let launch_pid = i32::try_from(launch.id()).unwrap();
    send_signal(launch_pid, libc::SIGINT);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !job.said(0).contains("stopping") {
        assert!(Instant::now() < deadline, "{}", job.said(0));
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(pids.iter().all(|&p| alive(p)), "the workers ignore SIGTERM");
    send_signal(launch_pid, libc::SIGINT);
    // Well within the 30 s grace the first Ctrl-C gave them.
    assert_eq!(
        wait(&mut launch, Duration::from_secs(15)),
        130,
        "{}",
        job.said(0)
    );
    let said = job.said(0);
    assert!(said.contains("signalled again"), "{said}");
    assert!(pids.iter().all(|&p| !alive(p)), "workers left running");
}

/// A server taken over from a killed launch and then killed itself is said
/// to be gone (its exit status is not the new launch's to read), at once:
/// not "the server has exited" after waiting a minute for the workers.
#[test]
fn a_taken_over_server_that_dies_is_said_to_be_gone() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let job = LaunchJob::new(400);
    let worker = echo_worker(300);
    let flags = ["--backend", "local", "--max-workers", "2"];
    let mut first = job.start(0, &flags, &args(&worker));
    job.wait_lines(&rt, 20);
    first.kill().unwrap();
    first.wait().unwrap();
    let mut again = job.start(1, &flags, &args(&worker));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !job.said(1).contains("attaching to the server") {
        assert!(Instant::now() < deadline, "{}", job.said(1));
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    let server = job.state()["server"]["pid"].as_u64().unwrap();
    send_signal(i32::try_from(server).unwrap(), libc::SIGKILL);
    assert_eq!(
        wait(&mut again, Duration::from_secs(50)),
        1,
        "{}",
        job.said(1)
    );
    let said = job.said(1);
    assert!(
        said.contains("started by an earlier launch) is gone"),
        "{said}"
    );
    assert!(!said.contains("the server has exited"), "{said}");
}
