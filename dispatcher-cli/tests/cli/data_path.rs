//! Nothing lost on the data path: `infer` keeps every input line's fields
//! exactly, and a line it cannot read fails alone.

use super::*;

/// Input lines of every shape that once lost or changed data, each with a
/// prompt, and what the output line must hold.
fn hostile_lines() -> Vec<String> {
    let msg = r#""messages": [{"role": "user", "content": "q"}]"#;
    let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
    vec![
        format!(r#"{{{msg}, "x": 90.33333333333333, "y": 0.1000000000000000055511151231257827}}"#),
        format!(
            r#"{{{msg}, "big": 18446744073709551615, "bigger": 123456789012345678901234567890}}"#
        ),
        format!(r#"{{{msg}, "score": NaN, "hi": Infinity, "lo": -Infinity}}"#),
        format!(r#"{{{msg}, "responses": ["from an earlier run"], "usage": {{"mine": 1}}}}"#),
        format!(r#"{{{msg}, "__ERROR__": "a column of the dataset"}}"#),
        format!(r#"{{{msg}, "deep": {}}}"#, deep(200)),
        format!(r#"{{{msg}, "deeper": {}}}"#, deep(6_000)),
        format!(r#"{{{msg}, "ok": true}}"#),
    ]
}

/// What the output must be for `hostile_lines()[i]`.
fn check(input: &[String], output: &[String]) {
    assert_eq!(output.len(), input.len(), "one output line per input line");
    // The input's text is kept byte for byte, infer's fields after it.
    for i in [0, 1, 2, 7] {
        let kept = &input[i][..input[i].len() - 1];
        assert!(
            output[i].starts_with(kept) && output[i][kept.len()..].starts_with(",\"responses\""),
            "line {i}: {}",
            output[i]
        );
    }
    // Fields infer writes, or a failure record's key: the line kept whole
    // as `input`, both values there.
    for i in [3, 4] {
        let v: serde_json::Value = serde_json::from_str(&output[i]).unwrap();
        let original: serde_json::Value = serde_json::from_str(&input[i]).unwrap();
        assert_eq!(v["input"], original, "line {i}");
        assert!(v["responses"].is_array(), "line {i}: {v}");
        assert!(v.get("__ERROR__").is_none(), "line {i}: {v}");
    }
    // Nested past what the readers take: that line fails, saying why.
    for i in [5, 6] {
        let v: serde_json::Value = serde_json::from_str(&output[i]).unwrap();
        assert_eq!(v["__ERROR__"]["error"], "input_too_deep", "line {i}: {v}");
    }
}

/// A local job and a served job (with `--group-by`, whose key reads every
/// line on the server) over lines that once changed or crashed: exact, and
/// only the two over-deep lines failed; `report` agrees.
#[test]
fn infer_keeps_every_field_exactly_and_fails_only_lines_it_cannot_read() {
    let job = Job::new(0);
    let input = hostile_lines();
    std::fs::write(job.path("in.jsonl"), input.join("\n") + "\n").unwrap();
    let out = Command::new(BIN)
        .args(["infer", "-q", "--engine", "echo", "--input"])
        .arg(job.path("in.jsonl"))
        .arg("--output")
        .arg(job.path("out.jsonl"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("2 of 8 lines"), "{stderr}");
    check(&input, &job.output_lines());
    let report = Command::new(BIN)
        .args(["report", "--json"])
        .arg(job.path("out.jsonl"))
        .output()
        .unwrap();
    let r: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    assert_eq!(r["ok"], 6, "{r}");
    assert_eq!(r["errors"], serde_json::json!({"input_too_deep": 2}), "{r}");

    let served = Job::new(0);
    std::fs::write(served.path("in.jsonl"), input.join("\n") + "\n").unwrap();
    let server = served.serve(&["--exit-grace", "1", "--group-by", ".ok"]);
    let worker = Command::new(BIN)
        .args([
            "infer",
            "-q",
            "--engine",
            "echo",
            "--dispatcher",
            &server.addr,
        ])
        .output()
        .unwrap();
    assert!(
        worker.status.success(),
        "{}",
        String::from_utf8_lossy(&worker.stderr)
    );
    let (code, stderr) = server.wait(Duration::from_secs(20));
    assert_eq!(code, 0, "{stderr}");
    check(&input, &served.output_lines());
}

/// Results larger than the server takes in one request are handed in in
/// smaller parts, each answer once: none is computed again, none is lost;
/// one result too large alone becomes a `result_too_large` record instead
/// of being reissued until its retries run out.
#[test]
fn results_over_the_servers_request_limit_are_split_not_thrown_away() {
    let job = Job::new(0);
    let prompt = |bytes: usize| {
        serde_json::json!({"messages": [{"role": "user", "content": "x".repeat(bytes)}]})
            .to_string()
    };
    let mut lines: Vec<String> = (0..12).map(|_| prompt(300_000)).collect();
    lines.insert(5, prompt(1_500_000));
    std::fs::write(job.path("in.jsonl"), lines.join("\n") + "\n").unwrap();
    let server = job.serve(&[
        "--max-request-mib",
        "1",
        "--max-retries",
        "1",
        "--exit-grace",
        "1",
    ]);
    let worker = Command::new(BIN)
        .args(["infer", "--engine", "echo", "--dispatcher", &server.addr])
        .args(["--batch-size", "13", "--max-tokens", "100000"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&worker.stderr);
    assert!(worker.status.success(), "{said}");
    assert!(said.contains("smaller parts"), "{said}");
    let (code, stderr) = server.wait(Duration::from_secs(30));
    assert_eq!(code, 0, "{stderr}");
    let out = job.output_values();
    assert_eq!(out.len(), 13);
    for (i, line) in out.iter().enumerate() {
        if i == 5 {
            assert_eq!(
                line["__ERROR__"]["error"], "result_too_large",
                "{line:.200}"
            );
            continue;
        }
        assert_eq!(
            line["responses"][0].as_str().map(str::len),
            Some(300_000),
            "line {i}"
        );
    }
    // Each line was answered once: nothing timed out or was released.
    assert!(!stderr.contains("tombstoned"), "{stderr}");
}
