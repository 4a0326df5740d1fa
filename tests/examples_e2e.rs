//! The example task binaries as real worker processes, against the real server
//! on loopback and the echo engine: every output line checked, and SIGTERM in
//! the middle of a run hands the items back for a second worker.

use std::process::Command;
use std::time::{Duration, Instant};

use dispatcher::client::DispatcherClient;

use crate::support::{example, send_signal, wait_exit, worker, Served};

fn chat_input(n: usize) -> (String, Vec<String>) {
    let questions: Vec<String> = (0..n).map(|i| format!("Question {i}: why?")).collect();
    let input = questions
        .iter()
        .map(|q| {
            serde_json::json!({"messages": [{"role": "user", "content": q}]}).to_string() + "\n"
        })
        .collect();
    (input, questions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_responses_runs_end_to_end_through_the_server() {
    let (input, questions) = chat_input(40);
    let served = Served::start(&input, Duration::from_secs(2)).await;
    let w = worker(
        &example("compare_responses"),
        &served.addr,
        &["--workers", "8", "--batch-size", "4"],
    );
    let (code, stderr) = wait_exit(w, Duration::from_secs(60)).await;
    assert_eq!(code, 0, "{stderr}");
    let out = served.finish().await;
    assert_eq!(out.len(), 40);
    for (i, line) in out.iter().enumerate() {
        assert_eq!(line["messages"][0]["content"], questions[i], "line {i}");
        // The echo engine answers with the prompt, each sample marked with
        // its seed; the echoed judge prompt names A first.
        assert_eq!(
            line["preferred_text"],
            format!("{} #1", questions[i]),
            "line {i}"
        );
        assert_eq!(
            line["dispreferred_text"],
            format!("{} #2", questions[i]),
            "line {i}"
        );
        assert_eq!(line["judge_model"], "echo");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_run_releases_items_and_a_second_worker_finishes() {
    let (input, questions) = chat_input(60);
    let served = Served::start(&input, Duration::from_secs(2)).await;
    let client = DispatcherClient::new(&served.addr);
    let binary = example("compare_responses");
    let first = worker(
        &binary,
        &served.addr,
        &[
            "--workers",
            "4",
            "--batch-size",
            "4",
            "--echo-latency-ms",
            "200",
        ],
    );
    // Wait until it holds items and has handed in results, then preempt it.
    let start = Instant::now();
    loop {
        let status = client.status().await.unwrap();
        if status.in_flight > 0 && status.completed_total > 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the worker never made progress: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let signalled = Instant::now();
    assert_eq!(send_signal(first.id() as i32, libc::SIGTERM), 0);
    let (code, stderr) = wait_exit(first, Duration::from_secs(10)).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "it stopped within seconds"
    );
    let status = client.status().await.unwrap();
    assert!(
        status.reissues.release > 0,
        "items were handed back: {status:?}"
    );
    assert_eq!(status.in_flight, 0);
    assert!(status.lines_done < 60);

    let second = worker(&binary, &served.addr, &["--workers", "16"]);
    let (code, stderr) = wait_exit(second, Duration::from_secs(60)).await;
    assert_eq!(code, 0, "{stderr}");
    let out = served.finish().await;
    assert_eq!(out.len(), 60);
    for (i, line) in out.iter().enumerate() {
        assert_eq!(line["messages"][0]["content"], questions[i], "line {i}");
        assert!(line.get("__ERROR__").is_none(), "line {i}: {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validated_response_runs_in_local_file_mode() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out.jsonl");
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/data/prompts.jsonl");
    let status = Command::new(example("validated_response"))
        .args(["--engine", "echo", "-q", "--input", data, "--output"])
        .arg(&output)
        .status()
        .unwrap();
    // Complete, with the prompts that never get their marker failed
    // (`retries_exhausted`): exit status 3.
    assert_eq!(status.code(), Some(3));
    let out: Vec<serde_json::Value> = crate::support::jsonl(&output);
    let prompts: Vec<serde_json::Value> = crate::support::jsonl(data);
    assert_eq!(out.len(), prompts.len());
    for (line, prompt) in out.iter().zip(&prompts) {
        let has_marker = prompt["prompt"].as_str().unwrap().contains("DONE");
        if has_marker {
            assert_eq!(line["response"], prompt["prompt"]);
            assert_eq!(line["task_metadata"]["success"], true);
        } else {
            assert_eq!(line["__ERROR__"]["error"], "retries_exhausted", "{line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_steps_runs_its_chain_in_local_file_mode() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out.jsonl");
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/data/questions.jsonl");
    let status = Command::new(example("five_steps"))
        .args(["--engine", "echo", "-q", "--input", data, "--output"])
        .arg(&output)
        .status()
        .unwrap();
    assert!(status.success());
    let questions = std::fs::read_to_string(data).unwrap();
    let out: Vec<serde_json::Value> = crate::support::jsonl(&output);
    assert_eq!(out.len(), questions.lines().count());
    for line in &out {
        // The echo engine answers each step with its last message: the step.
        let steps = line["steps"].as_array().unwrap();
        assert_eq!(steps.len(), 5, "{line}");
        assert_eq!(steps[4], "Give the revised answer a short title.");
        assert_eq!(line["replayed"], 0);
    }
}
