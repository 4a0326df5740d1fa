//! `dispatcher run-batch` on the echo engine: the format's failure lines, a
//! local run killed halfway and resumed, and the same file through a server.
//! (Against vLLM's own `vllm run-batch`: `tests/vllm.rs`; on llama.cpp:
//! `tests/llama.rs`.)

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{dispatcher_bin, send_signal, wait_exit, Served};

/// `n` batch lines, every tenth a chat line whose custom_id repeats an
/// earlier one, line 7 not JSON, line 8 an unsupported url.
fn batch(n: usize) -> String {
    (0..n)
        .map(|i| match i {
            6 => "{\"custom_id\": \"broken\", \"method\": \"POST\"".to_string(),
            7 => json!({"custom_id": "img", "method": "POST", "url": "/v1/images/generations", "body": {}})
                .to_string(),
            i if i % 10 == 9 => json!({"custom_id": "req-0", "method": "POST", "url": "/v1/chat/completions",
                                       "body": {"messages": [{"role": "user", "content": format!("again {i}")}]}})
            .to_string(),
            i if i % 2 == 0 => json!({"custom_id": format!("req-{i}"), "method": "POST", "url": "/v1/chat/completions",
                                      "body": {"model": "m", "messages": [{"role": "user", "content": format!("line {i}")}]}})
            .to_string(),
            i => json!({"custom_id": format!("req-{i}"), "method": "POST", "url": "/v1/completions",
                        "body": {"model": "m", "prompt": format!("line {i}")}})
            .to_string(),
        } + "\n")
        .collect()
}

/// The output lines without what differs from run to run (the engine's own ids).
fn stable(path: &std::path::Path) -> Vec<Value> {
    crate::support::jsonl(path)
        .into_iter()
        .map(|mut v| {
            if let Some(r) = v["response"].as_object_mut() {
                r.remove("request_id");
                if let Some(b) = r.get_mut("body").and_then(Value::as_object_mut) {
                    b.remove("id");
                }
            }
            v
        })
        .collect()
}

fn run_batch(args: &[&str]) -> std::process::Child {
    Command::new(dispatcher_bin())
        .arg("run-batch")
        .args(["--engine", "echo"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_killed_halfway_resumes_to_the_output_of_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    std::fs::write(path("in.jsonl"), batch(120)).unwrap();
    // Uninterrupted, with the failed lines in an error file.
    let (code, stderr) = wait_exit(
        run_batch(&[
            "-i",
            &path("in.jsonl"),
            "-o",
            &path("whole.jsonl"),
            "--error-file",
            &path("errors.jsonl"),
        ]),
        Duration::from_secs(60),
    )
    .await;
    // Complete, with error lines (`invalid_json`, `unsupported_url`): 3.
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("custom_id \"req-0\" of input line 10 was seen before"),
        "{stderr}"
    );
    let whole = stable(dir.path().join("whole.jsonl").as_path());
    assert_eq!(whole.len(), 120);
    assert_eq!(whole[0]["custom_id"], "req-0");
    assert_eq!(
        whole[0]["response"]["body"]["choices"][0]["message"]["content"],
        "line 0"
    );
    assert_eq!(whole[0]["id"], "batch_req_0");
    assert_eq!(whole[1]["response"]["body"]["choices"][0]["text"], "line 1");
    assert_eq!(whole[6]["response"], Value::Null);
    assert_eq!(whole[6]["error"]["code"], "invalid_json");
    assert_eq!(whole[7]["custom_id"], "img");
    assert_eq!(whole[7]["error"]["code"], "unsupported_url");
    let errors = crate::support::lines(path("errors.jsonl"));
    assert_eq!(errors.len(), 2);
    // Killed (SIGKILL, no chance to clean up) once some lines are written,
    // then run again with the same flags.
    let slow = [
        "--echo-latency-ms",
        "30",
        "--workers",
        "4",
        "--batch-size",
        "4",
    ];
    let args = |out: &str| -> Vec<String> {
        let mut a: Vec<String> = ["-i", &path("in.jsonl"), "-o", out]
            .map(String::from)
            .to_vec();
        a.extend(slow.map(String::from));
        a
    };
    let first = run_batch(
        &args(&path("resumed.jsonl"))
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let start = Instant::now();
    while crate::support::lines(path("resumed.jsonl")).len() < 20 {
        assert!(start.elapsed() < Duration::from_secs(60), "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    send_signal(first.id() as i32, libc::SIGKILL);
    let (_, _) = wait_exit(first, Duration::from_secs(10)).await;
    let partial = stable(dir.path().join("resumed.jsonl").as_path()).len();
    assert!(partial < 120, "the kill came too late to test a resume");
    let (code, stderr) = wait_exit(
        run_batch(
            &args(&path("resumed.jsonl"))
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        ),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(code, 3, "{stderr}");
    assert_eq!(stable(dir.path().join("resumed.jsonl").as_path()), whole);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_through_a_server_gives_the_local_output() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, batch(40)).unwrap();
    let local = dir.path().join("local.jsonl");
    let (code, stderr) = wait_exit(
        run_batch(&[
            "-i",
            &input.display().to_string(),
            "-o",
            &local.display().to_string(),
        ]),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(code, 3, "{stderr}");
    let served = Served::start(&batch(40), Duration::from_secs(2)).await;
    let workers: Vec<_> = (0..2)
        .map(|_| run_batch(&["--dispatcher", &served.addr, "--workers", "3"]))
        .collect();
    for w in workers {
        let (code, stderr) = wait_exit(w, Duration::from_secs(60)).await;
        assert_eq!(code, 0, "{stderr}");
    }
    let out_dir = tempfile::tempdir().unwrap();
    let kept = out_dir.path().join("out.jsonl");
    let lines = served.finish().await;
    assert_eq!(lines.len(), 40);
    std::fs::write(
        &kept,
        lines
            .iter()
            .map(|l| l.to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    assert_eq!(stable(&kept), stable(&local));
}

#[test]
fn the_error_file_needs_local_mode() {
    let out = Command::new(dispatcher_bin())
        .args([
            "run-batch",
            "--dispatcher",
            "127.0.0.1:9",
            "--error-file",
            "/tmp/e.jsonl",
            "--engine",
            "echo",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--error-file needs local mode"), "{stderr}");
}

/// An `--error-file` that is the output, the input, or a link to either is
/// refused before anything runs, and both are left as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_file_that_is_the_input_or_the_output_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("b.jsonl"), dir.path().join("o.jsonl"));
    std::fs::write(&input, batch(12)).unwrap();
    let link = dir.path().join("link.jsonl");
    std::os::unix::fs::symlink(&input, &link).unwrap();
    // A finished output, to show it is not wiped either.
    let (code, stderr) = wait_exit(
        run_batch(&[
            "-i",
            input.to_str().unwrap(),
            "-o",
            output.to_str().unwrap(),
        ]),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(code, 3, "{stderr}");
    let output_before = std::fs::read(&output).unwrap();
    for clash in [&output, &input, &link] {
        let (code, stderr) = wait_exit(
            run_batch(&[
                "-i",
                input.to_str().unwrap(),
                "-o",
                output.to_str().unwrap(),
                "--error-file",
                clash.to_str().unwrap(),
            ]),
            Duration::from_secs(60),
        )
        .await;
        assert_ne!(code, 0, "--error-file {}: {stderr}", clash.display());
        assert!(
            stderr.contains("--error-file") && stderr.contains("name the same file"),
            "{stderr}"
        );
        assert_eq!(std::fs::read_to_string(&input).unwrap(), batch(12));
        assert_eq!(std::fs::read(&output).unwrap(), output_before);
    }
}
