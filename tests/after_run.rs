//! After (and around) the run: workers that say hello and are listed by
//! `/status` and `dispatcher status`, the provenance manifest across a resume,
//! and `dispatcher report` on an output made for the test.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dispatcher::client::DispatcherClient;
use dispatcher::job::manifest::{manifest_path, ManifestDoc};
use serde_json::{json, Value};

use crate::support::{dispatcher_bin, example, serve, wait_exit};

fn prompts(n: usize) -> String {
    (0..n)
        .map(|i| json!({"prompt": format!("Question {i}. End with DONE.")}).to_string() + "\n")
        .collect()
}

fn spawn(mut cmd: Command) -> std::process::Child {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_two_workers_of_different_tasks_and_the_manifest_says_how_lines_were_made() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), prompts(300)).unwrap();
    let (addr, server) = serve(dir.path(), Duration::from_secs(2), |_| {}).await;
    let slow = [
        "--engine",
        "echo",
        "--echo-latency-ms",
        "40",
        "--workers",
        "4",
        "-q",
    ];
    let mut infer = Command::new(dispatcher_bin());
    infer
        .args(["infer", "--dispatcher", &addr, "--prompt-path", ".prompt"])
        .args(["--temperature", "0.3"])
        .args(slow);
    let mut task = Command::new(example("validated_response"));
    task.args(["--dispatcher", &addr]).args(slow);
    let workers = [spawn(infer), spawn(task)];
    // Both at work: /status lists them with what they said.
    let client = DispatcherClient::new(&addr);
    let start = Instant::now();
    let status = loop {
        let s = client.status().await.unwrap();
        let busy = s
            .workers
            .iter()
            .filter(|w| w.hello.is_some() && w.lines_done > 0)
            .count();
        if busy == 2 {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{:?}", s.workers);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut tasks: Vec<&str> = status
        .workers
        .iter()
        .filter_map(|w| w.hello.as_ref().map(|h| h.task.as_str()))
        .collect();
    tasks.sort();
    assert_eq!(tasks, ["infer", "validated_response"]);
    for w in &status.workers {
        let hello = w.hello.as_ref().unwrap();
        assert_eq!(hello.engine, "echo");
        assert_eq!(hello.model.as_deref(), Some("echo"));
        assert!(!hello.host.is_empty() && !hello.version.is_empty());
        assert!(w.last_contact_secs < 30.0);
    }
    // And `dispatcher status` says the same in words.
    let text = Command::new(dispatcher_bin())
        .args(["status", "--server", &addr])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("workers      2 seen"), "{text}");
    assert!(
        text.contains("infer on ") && text.contains("validated_response on "),
        "{text}"
    );
    for w in workers {
        let (code, stderr) = wait_exit(w, Duration::from_secs(120)).await;
        assert_eq!(code, 0, "{stderr}");
    }
    server.await.unwrap().unwrap();
    // The lines done add up to the job.
    let manifest: ManifestDoc = serde_json::from_slice(
        &std::fs::read(manifest_path(&dir.path().join("out.jsonl"))).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest.runs.len(), 1);
    assert_eq!(manifest.runs[0].stop.as_deref(), Some("complete"));
    assert_eq!(manifest.runs[0].lines_done_at_stop, Some(300));
    let configs = &manifest.worker_configurations;
    assert_eq!(configs.len(), 2, "{configs:?}");
    let infer = configs.iter().find(|c| c.task == "infer").unwrap();
    assert_eq!(infer.settings["temperature"], 0.3);
    assert_eq!(infer.settings["prompt_path"], ".prompt");
    assert!(configs.iter().any(|c| c.task == "validated_response"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manifest_after_a_resume_has_both_runs_and_the_inputs_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let input = prompts(200);
    std::fs::write(dir.path().join("in.jsonl"), &input).unwrap();
    let run = |addr: &str| {
        let mut c = Command::new(dispatcher_bin());
        c.args(["infer", "--dispatcher", addr, "--prompt-path", ".prompt"])
            .args([
                "--engine",
                "echo",
                "--echo-latency-ms",
                "20",
                "--workers",
                "2",
                "-q",
            ])
            .args(["--vanish-wait", "1"]);
        spawn(c)
    };
    // First run: stopped (as by SIGTERM) once some lines are done.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let listener = dispatcher::server::bind("127.0.0.1", 0).await.unwrap();
    let addr = dispatcher::server::local_addr(&listener)
        .unwrap()
        .to_string();
    let config = dispatcher::ledger::LedgerConfig::new(
        dir.path().join("in.jsonl"),
        dispatcher::job::JobFiles::new(
            dir.path().join("out.jsonl"),
            Some(dir.path().join("out.jsonl.checkpoint")),
        ),
    );
    let server = tokio::spawn(dispatcher::server::serve(
        listener,
        config,
        dispatcher::server::ServeOptions::default(),
        async {
            let _ = rx.await;
        },
    ));
    let worker = run(&addr);
    let client = DispatcherClient::new(&addr);
    crate::support::wait_for_progress(&client).await;
    tx.send(()).unwrap();
    server.await.unwrap().unwrap();
    let _ = wait_exit(worker, Duration::from_secs(60)).await;
    // Second run: resumes and completes.
    let (addr, server) = serve(dir.path(), Duration::from_secs(2), |_| {}).await;
    let worker = run(&addr);
    server.await.unwrap().unwrap();
    let _ = wait_exit(worker, Duration::from_secs(60)).await;
    let m: ManifestDoc = serde_json::from_slice(
        &std::fs::read(manifest_path(&dir.path().join("out.jsonl"))).unwrap(),
    )
    .unwrap();
    assert_eq!(m.runs.len(), 2, "{m:?}");
    assert_eq!(m.runs[0].stop.as_deref(), Some("shutdown"));
    let stopped_at = m.runs[0].lines_done_at_stop.unwrap();
    assert!(stopped_at > 0 && stopped_at < 200, "{m:?}");
    assert_eq!(m.runs[1].lines_done_at_start, stopped_at);
    assert_eq!(m.runs[1].stop.as_deref(), Some("complete"));
    assert_eq!(m.runs[1].lines_done_at_stop, Some(200));
    assert!(m.runs[1].started_at.ends_with('Z') && m.runs[1].stopped_at.is_some());
    assert_eq!(m.input.lines, Some(200));
    assert_eq!(
        m.input.crc32,
        Some(format!("{:08x}", crc32fast::hash(input.as_bytes())))
    );
    assert_eq!(m.input.size_bytes, input.len() as u64);
    assert_eq!(m.worker_configurations.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_counts_an_outputs_lines_failures_tokens_and_cut_off_responses() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    // 20 prompts, and two lines infer cannot use.
    let mut lines = prompts(20);
    lines.push_str("{\"no_prompt\": 1}\nnot json\n");
    std::fs::write(&input, &lines).unwrap();
    let out = Command::new(dispatcher_bin())
        .args([
            "infer",
            "--prompt-path",
            ".prompt",
            "--engine",
            "echo",
            "--include-usage",
        ])
        .args(["--max-tokens", "3", "--num-generations", "2", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap();
    // Complete, with two error records: exit status 3.
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One more input line than the output has: the report says so.
    std::fs::write(&input, lines + "{\"prompt\": \"late\"}\n").unwrap();
    let out = Command::new(dispatcher_bin())
        .arg("report")
        .arg(&output)
        .arg("--input")
        .arg(&input)
        .arg("--json")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["lines"], 22);
    assert_eq!(r["ok"], 20);
    assert_eq!(r["errors"], json!({"invalid_json": 1, "prompt_missing": 1}));
    // Two responses a line; the echo engine stops at --max-tokens 3 for
    // prompts of more words ("Question N. End with DONE." is five).
    assert_eq!(r["responses"], 40);
    assert_eq!(r["finished_at_length"], 40);
    assert_eq!(r["completion_tokens"], 20 * 2 * 3);
    assert_eq!(r["input_lines"], 23);
    let text = Command::new(dispatcher_bin())
        .arg("report")
        .arg(&output)
        .arg("--input")
        .arg(&input)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("stopped at the length limit: 40 (100.00%)"),
        "{text}"
    );
    assert!(
        text.contains("23 lines: 1 have no output line yet"),
        "{text}"
    );
}
