//! Workers that never reach the server: they fail, and are said to, in
//! bounded time (#38 item 9).

use super::*;

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

/// Workers that run but never reach the server (a command that hangs, a
/// token not passed on) are warned about, then cancelled and counted as
/// failed at --hello-timeout: the job stops with the reason instead of
/// showing "1 running, 0 lines" forever.
#[test]
fn workers_that_run_without_reaching_the_server_are_failed_at_the_hello_timeout() {
    let job = LaunchJob::new(20);
    let mut launch = job.start(
        0,
        &[
            "--backend",
            "local",
            "--max-workers",
            "1",
            "--failure-backoff",
            "0.1",
            "--max-worker-failures",
            "2",
            "--hello-timeout",
            "3",
        ],
        &["sleep", "600"],
    );
    let code = wait(&mut launch, Duration::from_secs(90));
    let said = job.said(0);
    assert_eq!(code, 1, "{said}");
    assert!(
        said.contains("without reaching the server at 127.0.0.1:"),
        "{said}"
    );
    assert!(
        said.contains("it is cancelled at --hello-timeout"),
        "{said}"
    );
    assert!(said.contains("2 worker jobs failed in a row"), "{said}");
    for j in job.state()["jobs"].as_array().unwrap() {
        let pid = j["pid"].as_u64().unwrap();
        assert!(!alive(pid), "worker {j} left running");
    }
}
