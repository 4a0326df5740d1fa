//! A job's files around the core: nothing of one job is reused by another,
//! a redo is refused on an input that is not its output's, and every reader
//! of an output agrees on what failed.

use super::*;
use dispatcher_core::protocol::{JournalEntry, JournalRecord};

/// Hands in a journal entry for each of `ids`, as a worker does.
fn hand_in_journal(addr: &str, rt: &tokio::runtime::Runtime, ids: &[u64]) {
    let client = DispatcherClient::new(addr);
    let entries = ids
        .iter()
        .map(|&work_id| {
            JournalRecord::new(
                work_id,
                JournalEntry::new(
                    0,
                    "00000000000000aa",
                    &serde_json::json!({"text": "an answer of the old job"}),
                ),
            )
        })
        .collect();
    rt.block_on(client.journal(entries, 0, 0)).unwrap();
}

/// Takes `n` items; returns them.
fn take(addr: &str, rt: &tokio::runtime::Runtime, n: usize) -> Vec<WorkItem> {
    rt.block_on(DispatcherClient::new(addr).get_work(n))
        .unwrap()
        .items
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_fresh_start_beside_an_old_jobs_journal_and_manifest_reuses_neither() {
    let job = Job::new(20);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = job.serve(&["--checkpoint-interval", "0.1"]);
    let items = take(&server.addr, &rt, 5);
    hand_in_journal(&server.addr, &rt, &[0, 1, 2, 3, 4]);
    // The entries are durable once a checkpoint has synced them.
    std::thread::sleep(Duration::from_millis(400));
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait(Duration::from_secs(10)).0, 0);
    assert_eq!(items.len(), 5);
    assert!(
        std::fs::metadata(job.path("out.jsonl.journal"))
            .unwrap()
            .len()
            > 0
    );
    // The README's way to start over: move the output and checkpoint away.
    for name in ["out.jsonl", "out.jsonl.checkpoint"] {
        std::fs::rename(job.path(name), job.path(&format!("old-{name}"))).unwrap();
    }
    let server = job.serve(&[]);
    let items = take(&server.addr, &rt, 5);
    assert_eq!(items.len(), 5);
    for item in &items {
        assert!(
            item.journal.is_none(),
            "line {} carries an old journal",
            item.work_id
        );
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(job.path("out.jsonl.manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["runs"].as_array().unwrap().len(), 1, "{manifest}");
    // A resume of this new job does replay its own journal.
    hand_in_journal(&server.addr, &rt, &[0]);
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait(Duration::from_secs(10)).0, 0);
    let server = job.serve(&[]);
    let items = take(&server.addr, &rt, 1);
    assert_eq!(items[0].work_id, 0);
    assert_eq!(items[0].journal.as_ref().map(Vec::len), Some(1));
}

#[test]
fn a_new_redo_does_not_replay_the_journal_of_a_redo_dropped_before_it() {
    let job = Job::new(50);
    super::redo::previous_output(&job, 50);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = job.serve(&["--redo-errors", "--checkpoint-interval", "0.1"]);
    let items = take(&server.addr, &rt, 3);
    let ids: Vec<u64> = items.iter().map(|i| i.work_id).collect();
    hand_in_journal(&server.addr, &rt, &ids);
    std::thread::sleep(Duration::from_millis(400));
    server.signal(libc::SIGKILL);
    let _ = server.wait(Duration::from_secs(10));
    assert!(job.path("out.jsonl.redo.journal").exists());
    // Dropped as the refusal of a plain serve says: remove the redo's output
    // and checkpoint.
    std::fs::remove_file(job.path("out.jsonl.redo")).unwrap();
    std::fs::remove_file(job.path("out.jsonl.redo.checkpoint")).unwrap();
    let server = job.serve(&["--redo-errors", "--exit-grace", "0.2"]);
    let items = take(&server.addr, &rt, 3);
    assert_eq!(items.iter().map(|i| i.work_id).collect::<Vec<_>>(), ids);
    for item in &items {
        assert!(
            item.journal.is_none(),
            "line {} carries the dropped redo's journal",
            item.work_id
        );
    }
}

#[test]
fn a_redo_with_an_input_that_is_not_the_outputs_is_refused() {
    let job = Job::new(50);
    super::redo::previous_output(&job, 50);
    let before = std::fs::read(job.path("out.jsonl")).unwrap();
    let first_ten = job.path("first10.jsonl");
    std::fs::write(&first_ten, job.input[..10].join("\n") + "\n").unwrap();
    let other: Vec<String> = (0..50)
        .map(|i| format!("{{\"n\": {i}, \"other\": 1}}"))
        .collect();
    let same_length = job.path("other.jsonl");
    std::fs::write(&same_length, other.join("\n") + "\n").unwrap();
    for input in [&first_ten, &same_length] {
        let out = Command::new(BIN)
            .arg("serve")
            .arg("--infile")
            .arg(input)
            .arg("--outfile")
            .arg(job.path("out.jsonl"))
            .args(["--host", "127.0.0.1", "--port", "0", "--redo-errors"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains(&input.display().to_string()) && stderr.contains("does not match"),
            "{stderr}"
        );
        assert_eq!(std::fs::read(job.path("out.jsonl")).unwrap(), before);
        assert!(!job.path("out.jsonl.redo").exists());
    }
}

#[test]
fn a_redo_names_an_unknown_kind_and_leaves_an_output_with_nothing_to_redo_alone() {
    let job = Job::new(30);
    super::redo::previous_output(&job, 30);
    let run = |kinds: &str| {
        let out = job
            .serve_command()
            .args(["--redo-errors", kinds, "--exit-grace", "0.1"])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stderr) = run("request_rejectd");
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("--redo-errors request_rejectd") && stderr.contains("request_rejected 3"),
        "{stderr}"
    );
    // A kind dispatcher writes, but no line of this output has: nothing to do.
    let before = std::fs::read(job.path("out.jsonl")).unwrap();
    let (ok, stderr) = run("http_500");
    assert!(ok, "{stderr}");
    assert!(stderr.contains("nothing to redo"), "{stderr}");
    assert!(!stderr.contains("replaced"), "{stderr}");
    assert_eq!(std::fs::read(job.path("out.jsonl")).unwrap(), before);
    assert!(!job.path("out.jsonl.redo").exists());
}

/// One line of every kind an output can hold, and whether it failed.
fn every_kind_of_line() -> Vec<(String, bool)> {
    use serde_json::json;
    [
        (json!({"n": 0, "responses": ["a"], "usage": {"prompt_tokens": 5, "completion_tokens": 7}, "finish_reasons": ["stop"]}), false),
        // validated_response's output: a top-level `response` string.
        (json!({"prompt": "p", "response": "an answer DONE", "task_metadata": {"success": true}}), false),
        // A task's own `error` and `usage` fields of other types.
        (json!({"error": "none", "usage": "n/a", "finish_reasons": 3}), false),
        (json!("a bare string"), false),
        (json!([1, 2]), false),
        (json!({"__ERROR__": {"error": "request_rejected", "message": "too long", "task_data": {}}}), true),
        (json!({"__ERROR__": {"error": "max_retries_exceeded", "work_id": 6, "original_content": "x", "reissues": {"timeout": 4}}}), true),
        (json!({"__ERROR__": {"error": "no_score", "message": "a task's own kind"}}), true),
        (json!({"id": "batch_req_8", "custom_id": "a", "response": {"status_code": 200, "request_id": "r", "body": {"choices": []}}, "error": null}), false),
        (json!({"id": "batch_req_9", "custom_id": "b", "response": {"status_code": 400, "request_id": "r", "body": {"error": "too long"}}, "error": null}), true),
        (json!({"id": "batch_req_10", "custom_id": "c", "response": {"status_code": 500, "request_id": "r", "body": "not json"}, "error": null}), true),
        (json!({"id": "batch_req_11", "custom_id": null, "response": null, "error": {"code": "invalid_json", "message": "..."}}), true),
    ]
    .into_iter()
    .map(|(v, failed)| (v.to_string(), failed))
    .chain([("{cut off".to_string(), true)])
    .collect()
}

/// `report`, `--redo-errors` and `run-batch --error-file` agree line by line
/// on what failed in one output.
#[test]
fn report_redo_and_the_error_file_agree_on_every_kind_of_line() {
    let lines = every_kind_of_line();
    let job = Job::new(lines.len());
    let text: String = lines.iter().map(|(l, _)| format!("{l}\n")).collect();
    std::fs::write(job.path("out.jsonl"), &text).unwrap();
    job.checkpoint_output(lines.len());
    let failed: Vec<u64> = (0..lines.len() as u64)
        .filter(|&i| lines[i as usize].1)
        .collect();

    let mut report = dispatcher_cli::report::Report::default();
    let mut reported = Vec::new();
    for (i, (line, _)) in lines.iter().enumerate() {
        let before = report.ok;
        report.add(line.as_bytes());
        if report.ok == before {
            reported.push(i as u64);
        }
    }
    assert_eq!(reported, failed, "report");
    assert_eq!(report.errors["http_500"], 1);
    assert_eq!(report.errors["no_score"], 1);

    let error_file = job.path("errors.jsonl");
    dispatcher_cli::batch::finish_output(&job.path("out.jsonl"), Some(&error_file)).unwrap();
    let in_error_file: Vec<u64> = dispatcher_testkit::lines(&error_file)
        .iter()
        .map(|l| lines.iter().position(|(x, _)| x == l).unwrap() as u64)
        .collect();
    assert_eq!(in_error_file, failed, "--error-file");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = job.serve(&["--redo-errors", "--exit-grace", "0.2"]);
    let client = DispatcherClient::new(&server.addr);
    let mut redone = Vec::new();
    wait_for("the redo hands out every failed line", || {
        let work = rt.block_on(client.get_work(100)).unwrap();
        redone.extend(work.items.iter().map(|i| i.work_id));
        redone.len() >= failed.len()
    });
    redone.sort_unstable();
    assert_eq!(redone, failed, "--redo-errors");
}

#[test]
fn status_names_a_refused_token_and_a_server_address_without_a_port_is_refused() {
    let job = Job::new(3);
    let server = job.serve(&["--token", "right"]);
    let out = Command::new(BIN)
        .args(["status", "--server", &server.addr, "--token", "wrong"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("refused the token"), "{stderr}");
    assert!(!stderr.contains("could not reach"), "{stderr}");

    let out = Command::new(BIN)
        .args(["status", "--server", "127.0.0.1:"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--server") && stderr.contains("port"),
        "{stderr}"
    );

    // A server that is not there: said once, with the cause.
    drop(server);
    let out = Command::new(BIN)
        .args(["status", "--server", "127.0.0.1:9"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("127.0.0.1:9").count(), 1, "{stderr}");
    assert!(stderr.contains("refused"), "{stderr}");
}

fn files_in(job: &Job) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(job.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A finished job, and a finished redo of it, leave the output, its
/// checkpoint and the manifest beside the input, and nothing else.
#[test]
fn a_finished_job_and_a_finished_redo_leave_only_the_output_its_checkpoint_and_manifest() {
    let job = Job::new(40);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = job.serve(&["--exit-grace", "0.2", "--checkpoint-interval", "0.1"]);
    let client = DispatcherClient::new(&server.addr);
    let items = take(&server.addr, &rt, 40);
    let ids: Vec<u64> = items.iter().map(|i| i.work_id).collect();
    hand_in_journal(&server.addr, &rt, &ids);
    // Line 7 fails, so that a redo has something to do.
    let results = items
        .iter()
        .map(|item| match item.work_id {
            7 => WorkItem {
                result: Some(r#"{"__ERROR__": {"error": "request_rejected"}}"#.into()),
                ..item.clone()
            },
            _ => answer(item),
        })
        .collect();
    rt.block_on(client.submit(results)).unwrap();
    let (code, stderr) = server.wait(Duration::from_secs(30));
    assert_eq!(code, 0, "{stderr}");
    let left = [
        "in.jsonl",
        "out.jsonl",
        "out.jsonl.checkpoint",
        "out.jsonl.manifest.json",
    ];
    assert_eq!(files_in(&job), left);

    let server = job.serve(&["--redo-errors", "--exit-grace", "0.2"]);
    let items = take(&server.addr, &rt, 10);
    assert_eq!(items.iter().map(|i| i.work_id).collect::<Vec<_>>(), [7]);
    hand_in_journal(&server.addr, &rt, &[7]);
    rt.block_on(DispatcherClient::new(&server.addr).submit(items.iter().map(answer).collect()))
        .unwrap();
    let (code, stderr) = server.wait(Duration::from_secs(30));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(files_in(&job), left);
    job.check_output();
}
