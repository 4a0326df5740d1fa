//! Prefix affinity end to end: a five-request task over lines of six
//! groups, served with `--group-by`, one worker preempted mid-line (its
//! journal handed in with the lines it releases), another taking over. The
//! output is in input order and equal to the ungrouped local run's.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dispatcher::client::DispatcherClient;
use serde_json::json;

use crate::support::{example, jsonl, send_signal, serve_process, wait_exit};

const LINES: usize = 120;

fn input() -> String {
    (0..LINES)
        .map(|i| json!({"question": format!("Prefix {}: question {i}?", i % 6)}).to_string() + "\n")
        .collect()
}

fn worker(addr: &str) -> std::process::Child {
    Command::new(example("five_steps"))
        .args([
            "--dispatcher",
            addr,
            "--engine",
            "echo",
            "--echo-latency-ms",
            "30",
        ])
        .args([
            "--max-in-flight",
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_lines_survive_preemption_with_their_journal_and_match_the_ungrouped_run() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), input()).unwrap();

    // The reference: the same task, ungrouped, in local mode.
    let status = Command::new(example("five_steps"))
        .args(["--engine", "echo", "-q", "--input"])
        .arg(dir.path().join("in.jsonl"))
        .arg("--output")
        .arg(dir.path().join("reference.jsonl"))
        .status()
        .unwrap();
    assert!(status.success());
    let reference = jsonl(dir.path().join("reference.jsonl"));
    assert_eq!(reference.len(), LINES);

    let server = serve_process(
        dir.path(),
        &[
            "--group-by",
            ".question",
            "--group-by-prefix",
            "8",
            "--lookahead",
            "40",
            "--exit-grace",
            "1",
        ],
    );
    let client = DispatcherClient::new(&server.addr);
    let first = worker(&server.addr);
    let second = worker(&server.addr);
    // Preempt the first once lines are done and others are mid-chain.
    let start = Instant::now();
    loop {
        let s = client.status().await.unwrap();
        if s.lines_done >= 20 && s.journal_entries > 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no progress: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    send_signal(first.id() as i32, libc::SIGTERM);
    let (code, stderr) = wait_exit(first, Duration::from_secs(30)).await;
    assert_eq!(code, 0, "{stderr}");
    let third = worker(&server.addr);
    let mut last: Option<dispatcher::protocol::StatusResponse> = None;
    while let Ok(s) = client.status().await {
        last = Some(s);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for w in [second, third] {
        let (code, stderr) = wait_exit(w, Duration::from_secs(60)).await;
        assert_eq!(code, 0, "{stderr}");
    }
    let (code, stderr) = server.wait(Duration::from_secs(30));
    assert_eq!(code, 0, "{stderr}");

    let last = last.expect("a status before the end");
    let groups = last.groups.expect("grouping is on");
    assert!(
        last.reissues.release > 0,
        "the preempted worker released lines: {last:?}"
    );
    assert!(
        last.journal_replayed > 0,
        "released lines replayed their journal: {last:?}"
    );
    assert!(
        groups.to_owner * 2 > groups.issued,
        "most lines went to the worker that had their group: {groups:?}"
    );

    let output = jsonl(dir.path().join("out.jsonl"));
    assert_eq!(output.len(), LINES);
    for (i, (got, want)) in output.iter().zip(&reference).enumerate() {
        assert_eq!(got["question"], want["question"], "line {i}");
        assert_eq!(got["steps"], want["steps"], "line {i}");
    }
    let replayed: u64 = output.iter().map(|l| l["replayed"].as_u64().unwrap()).sum();
    assert!(replayed > 0, "some steps came from the journal");
}
