//! `dispatcher serve --redo-errors`: only the failed lines of an output are
//! handed out again; every other line stays byte for byte; the old output is
//! untouched until the new one is complete; a redo resumes like any job.

use super::*;

/// A previous output of `job`'s first `lines` lines: lines 3, 5 and 7 of each
/// ten are error records of three kinds; the others are odd-looking (spacing
/// no serializer writes) so that a rewritten line would show.
pub(super) fn previous_output(job: &Job, lines: usize) -> Vec<String> {
    let out: Vec<String> = (0..lines)
        .map(|i| match i % 10 {
            3 => format!(r#"{{"__ERROR__": {{"error": "request_rejected", "message": "too long", "task_data": {{"n": {i}}}}}}}"#),
            5 => format!(r#"{{"__ERROR__": {{"error": "max_retries_exceeded", "work_id": {i}, "original_content": "{{}}", "reissues": {{"timeout": 4}}}}}}"#),
            7 => format!(r#"{{"__ERROR__": {{"error": "task_panicked", "message": "boom", "task_data": {{"n": {i}}}}}}}"#),
            _ => format!(r#"{{ "n" :{i},   "kept": "as it was" }}"#),
        })
        .collect();
    std::fs::write(job.path("out.jsonl"), out.join("\n") + "\n").unwrap();
    job.checkpoint_output(lines);
    out
}

/// Answers every item the server hands out until it says all work is
/// complete (or is gone); returns the work ids it was given.
fn work_until_done(server: &Server, rt: &tokio::runtime::Runtime) -> Vec<u64> {
    rt.block_on(dispatcher_testkit::work_until_done(
        &server.addr,
        8,
        result_of,
    ))
}

fn output_lines(job: &Job) -> Vec<String> {
    job.output_lines()
}

#[test]
fn redo_errors_hands_out_only_error_records_and_keeps_every_other_byte() {
    let job = Job::new(100);
    let previous = previous_output(&job, 100);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = job.serve(&["--redo-errors", "--exit-grace", "0.3"]);
    let mut ids = work_until_done(&server, &rt);
    let (code, stderr) = server.wait(Duration::from_secs(30));
    assert_eq!(code, 0, "{stderr}");
    ids.sort_unstable();
    let errors: Vec<u64> = (0..100).filter(|i| [3, 5, 7].contains(&(i % 10))).collect();
    assert_eq!(ids, errors, "only the error records were handed out");
    let out = output_lines(&job);
    assert_eq!(out.len(), 100);
    for (i, line) in out.iter().enumerate() {
        if errors.contains(&(i as u64)) {
            assert_eq!(*line, job.expected_line(i), "line {i} redone");
        } else {
            assert_eq!(*line, previous[i], "line {i} kept byte for byte");
        }
    }
    // The new output is in place with its checkpoint; nothing of the redo is left.
    assert!(!job.path("out.jsonl.redo").exists());
    assert!(!job.path("out.jsonl.redo.checkpoint").exists());
    assert_eq!(job.checkpointed_lines(), 100);
    // A plain restart finds the job complete.
    let again = job.serve(&["--exit-grace", "0.1"]);
    assert_eq!(again.wait(Duration::from_secs(30)).0, 0);
}

#[test]
fn redo_errors_of_listed_types_also_does_the_lines_a_partial_output_lacks() {
    let job = Job::new(100);
    let previous = previous_output(&job, 80);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = job.serve(&[
        "--redo-errors",
        "request_rejected, task_panicked",
        "--exit-grace",
        "0.3",
    ]);
    let mut ids = work_until_done(&server, &rt);
    let (code, stderr) = server.wait(Duration::from_secs(30));
    assert_eq!(code, 0, "{stderr}");
    ids.sort_unstable();
    let wanted: Vec<u64> = (0..100)
        .filter(|&i| i >= 80 || [3, 7].contains(&(i % 10)))
        .collect();
    assert_eq!(ids, wanted);
    let out = output_lines(&job);
    assert_eq!(out.len(), 100);
    for (i, line) in out.iter().enumerate() {
        if wanted.contains(&(i as u64)) {
            assert_eq!(*line, job.expected_line(i), "line {i}");
        } else {
            // Tombstones were not asked for: kept, like the good lines.
            assert_eq!(*line, previous[i], "line {i}");
        }
    }
}

#[test]
fn a_redo_killed_halfway_leaves_the_old_output_whole_and_resumes() {
    let job = Job::new(3000);
    let previous = previous_output(&job, 3000);
    let before = std::fs::read(job.path("out.jsonl")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = job.serve(&["--redo-errors", "--checkpoint-interval", "0.1"]);
    // Some of the 900 redone lines, then SIGKILL.
    let client = DispatcherClient::new(&server.addr);
    rt.block_on(async {
        for _ in 0..20 {
            let work = client.get_work(8).await.unwrap();
            client
                .submit(work.items.iter().map(answer).collect())
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    });
    server.signal(libc::SIGKILL);
    let _ = server.wait(Duration::from_secs(10));
    // The old output is as it was; the new one is beside it.
    assert_eq!(std::fs::read(job.path("out.jsonl")).unwrap(), before);
    assert!(job.path("out.jsonl.redo").exists());
    // A plain restart would write over a job half redone: refused, saying how to go on.
    let (code, stderr) = job
        .serve_command()
        .output()
        .map(|o| {
            (
                o.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&o.stderr).to_string(),
            )
        })
        .unwrap();
    assert_ne!(code, 0);
    assert!(
        stderr.contains("unfinished --redo-errors run") && stderr.contains("--redo-errors"),
        "{stderr}"
    );
    // The redo again: resumes, and hands out only what is left to redo.
    let server = job.serve(&["--redo-errors", "--exit-grace", "0.3"]);
    let ids = work_until_done(&server, &rt);
    let (code, stderr) = server.wait(Duration::from_secs(60));
    assert_eq!(code, 0, "{stderr}");
    assert!(ids.len() < 900, "{} handed out again", ids.len());
    let out = output_lines(&job);
    assert_eq!(out.len(), 3000);
    for (i, line) in out.iter().enumerate() {
        if [3, 5, 7].contains(&(i % 10)) {
            assert_eq!(*line, job.expected_line(i), "line {i}");
        } else {
            assert_eq!(*line, previous[i], "line {i}");
        }
    }
}

#[test]
fn a_redo_that_died_between_its_two_renames_is_finished_by_the_next_run() {
    let job = Job::new(30);
    previous_output(&job, 30);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = job.serve(&["--redo-errors", "--exit-grace", "0.2"]);
    work_until_done(&server, &rt);
    assert_eq!(server.wait(Duration::from_secs(30)).0, 0);
    let done = std::fs::read(job.path("out.jsonl")).unwrap();
    // As if the process died after moving the output and before the checkpoint.
    std::fs::rename(
        job.path("out.jsonl.checkpoint"),
        job.path("out.jsonl.redo.checkpoint"),
    )
    .unwrap();
    let out = job.serve_command().arg("--redo-errors").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(job.path("out.jsonl")).unwrap(), done);
    assert_eq!(job.checkpointed_lines(), 30);
    assert!(!job.path("out.jsonl.redo.checkpoint").exists());
}

#[test]
fn redo_errors_without_an_output_says_there_is_nothing_to_redo() {
    let job = Job::new(3);
    let out = job.serve_command().arg("--redo-errors").output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nothing to redo"), "{stderr}");
}
