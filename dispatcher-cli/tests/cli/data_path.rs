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
    dispatcher_testkit::succeed(Command::new(BIN).args([
        "infer",
        "-q",
        "--engine",
        "echo",
        "--dispatcher",
        &server.addr,
    ]));
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

/// `report` reads an output as jobs and users store it: compressed with
/// gzip or zstd, or as an `--outdir` folder; all say the same.
#[test]
fn report_reads_compressed_outputs_and_outdir_folders() {
    let job = Job::new(0);
    let lines: Vec<String> = (0..50)
        .map(|i| {
            serde_json::json!({"messages": [{"role": "user", "content": format!("q{i}")}]})
                .to_string()
        })
        .chain(["{\"no\": \"prompt\"}".to_string()])
        .collect();
    std::fs::write(job.path("in.jsonl"), lines.join("\n") + "\n").unwrap();
    let out = Command::new(BIN)
        .args(["infer", "-q", "--engine", "echo", "--input"])
        .arg(job.path("in.jsonl"))
        .arg("--outdir")
        .arg(job.path("sharded"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let whole = job.path("sharded/.job/output.jsonl");
    std::fs::copy(&whole, job.path("out.jsonl")).unwrap();
    for (tool, ext) in [("gzip", "gz"), ("zstd", "zst")] {
        let status = Command::new(tool)
            .args(["-k", "-q"])
            .arg(job.path("out.jsonl"))
            .status();
        match status {
            Ok(s) => assert!(s.success(), "{tool}"),
            // zstd's command is installed by scripts/setup-datasets.sh.
            Err(_)
                if tool == "zstd" && std::env::var_os("DISPATCHER_REQUIRE_DATASETS").is_none() =>
            {
                continue
            }
            Err(e) => panic!("{tool}: {e}"),
        }
        assert!(job.path(&format!("out.jsonl.{ext}")).exists());
    }
    let report = |path: &str| {
        let out = Command::new(BIN)
            .args(["report", "--json"])
            .arg(job.path(path))
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(3),
            "{path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (r["lines"].clone(), r["ok"].clone(), r["errors"].clone())
    };
    let plain = report("out.jsonl");
    assert_eq!(
        plain,
        (
            51.into(),
            50.into(),
            serde_json::json!({"prompt_missing": 1})
        )
    );
    for other in ["out.jsonl.gz", "out.jsonl.zst", "sharded"] {
        if job.path(other).exists() {
            assert_eq!(report(other), plain, "{other}");
        }
    }
}

/// What a job passes over is said, not lost without a word: `.json` files
/// in a dataset folder, and a `--group-by` filter that finds no key.
#[test]
fn what_a_job_passes_over_is_said() {
    let job = Job::new(0);
    let folder = job.path("ds");
    std::fs::create_dir(&folder).unwrap();
    let line = |i: usize| {
        serde_json::json!({"messages": [{"role": "user", "content": format!("q{i}")}]}).to_string()
            + "\n"
    };
    std::fs::write(folder.join("part-0.jsonl"), line(0)).unwrap();
    std::fs::write(folder.join("part-1.json"), line(1)).unwrap();
    std::fs::write(folder.join("dataset_info.json"), "{}").unwrap();
    let out = Command::new(BIN)
        .args(["infer", "--engine", "echo", "--input"])
        .arg(&folder)
        .arg("--output")
        .arg(job.path("out.jsonl"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("passed over .json files") && stderr.contains("part-1.json"),
        "{stderr}"
    );
    assert!(!stderr.contains("dataset_info.json"), "{stderr}");

    let lines: String = (0..1_200).map(line).collect();
    std::fs::write(job.path("in.jsonl"), lines).unwrap();
    let server = job.serve(&[
        "--exit-grace",
        "0",
        "--group-by",
        ".no_such_field",
        "--lookahead",
        "2000",
    ]);
    dispatcher_testkit::succeed(Command::new(BIN).args([
        "infer",
        "-q",
        "--engine",
        "echo",
        "--dispatcher",
        &server.addr,
    ]));
    let (code, stderr) = server.wait(Duration::from_secs(30));
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("--group-by gave no key"), "{stderr}");
}

/// A start or an export that fails leaves nothing behind: no partial
/// staged copy, lock file or empty output; no partial Parquet file.
#[test]
fn a_failed_staging_or_export_leaves_no_files_behind() {
    let job = Job::new(0);
    let ds = job.path("ds");
    std::fs::create_dir(&ds).unwrap();
    let text: String = (0..20_000)
        .map(|i| format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"q{i}\"}}]}}\n"))
        .collect();
    std::fs::write(ds.join("a.jsonl"), text).unwrap();
    let status = Command::new("gzip")
        .arg(ds.join("a.jsonl"))
        .status()
        .unwrap();
    assert!(status.success());
    let gz = std::fs::read(ds.join("a.jsonl.gz")).unwrap();
    // Cut in the middle: it cannot be read to its end.
    std::fs::write(ds.join("a.jsonl.gz"), &gz[..gz.len() / 2]).unwrap();
    let out_dir = job.path("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = Command::new(BIN)
        .args(["infer", "-q", "--engine", "echo", "--input"])
        .arg(&ds)
        .arg("--output")
        .arg(out_dir.join("out.jsonl"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("a.jsonl.gz"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");

    // A refused start with --outdir leaves no folder it made.
    let out = Command::new(BIN)
        .args(["infer", "-q", "--engine", "echo", "--input"])
        .arg(&ds)
        .arg("--outdir")
        .arg(job.path("shards/new"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(!job.path("shards").exists(), "the --outdir folder was left");

    // Failure records of every kind, whose task_data is an object or (the
    // line was not JSON) a string: exported, task_data as its JSON text.
    let records = [
        r#"{"id": 1, "responses": ["a"]}"#,
        r#"{"__ERROR__": {"error": "invalid_json", "message": "m", "task_data": "not json"}}"#,
        r#"{"__ERROR__": {"error": "prompt_missing", "message": "m", "task_data": {"id": 3}}}"#,
    ];
    std::fs::write(job.path("records.jsonl"), records.join("\n") + "\n").unwrap();
    dispatcher_testkit::succeed(
        Command::new(BIN)
            .arg("export")
            .arg(job.path("records.jsonl"))
            .arg("--parquet")
            .arg(job.path("records.parquet")),
    );

    // An output Parquet cannot hold (a field of its own for each line,
    // past any table's columns): refused, naming the line, no partial file.
    let keyed: String = (1..=10_001)
        .map(|i| format!("{{\"id_{i}\": 1}}\n"))
        .collect();
    std::fs::write(job.path("done.jsonl"), keyed).unwrap();
    let out = Command::new(BIN)
        .arg("export")
        .arg(job.path("done.jsonl"))
        .arg("--parquet")
        .arg(job.path("done.parquet"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("line 10001"), "{stderr}");
    assert!(!job.path("done.parquet").exists());
    assert!(!job.path("done.parquet.tmp").exists());
}

/// A local run whose input shard is deleted or rewritten under it stops,
/// saying which and why, as `serve` does, instead of asking for work again
/// and again while its engine idles; what it wrote is kept for a resume.
#[test]
fn a_local_run_stops_when_its_input_changes_under_it() {
    for change in ["delete", "rewrite"] {
        let job = Job::new(0);
        let ds = job.path("ds");
        std::fs::create_dir(&ds).unwrap();
        let shard = |first: usize| -> String {
            (first..first + 200)
                .map(|i| {
                    serde_json::json!({"messages": [{"role": "user", "content": format!("q{i}")}]})
                        .to_string()
                        + "\n"
                })
                .collect()
        };
        std::fs::write(ds.join("a.jsonl"), shard(0)).unwrap();
        std::fs::write(ds.join("b.jsonl"), shard(200)).unwrap();
        let mut run = Command::new(BIN)
            .args(["infer", "-q", "--engine", "echo", "--echo-latency-ms", "50"])
            .args(["--max-in-flight", "4", "--batch-size", "4", "--input"])
            .arg(&ds)
            .arg("--output")
            .arg(job.path("out.jsonl"))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while dispatcher_testkit::lines(job.path("out.jsonl")).len() < 20 {
            assert!(start.elapsed() < Duration::from_secs(60), "no progress");
            std::thread::sleep(Duration::from_millis(20));
        }
        match change {
            "delete" => std::fs::remove_file(ds.join("b.jsonl")).unwrap(),
            _ => std::fs::write(ds.join("b.jsonl"), shard(1000)).unwrap(),
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = run.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "{change}: the run did not stop");
            std::thread::sleep(Duration::from_millis(50));
        };
        let out = run.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(status.code(), Some(1), "{change}: {stderr}");
        assert!(
            stderr.contains("the job stopped") && stderr.contains("b.jsonl"),
            "{change}: {stderr}"
        );
        let written = dispatcher_testkit::lines(job.path("out.jsonl")).len();
        assert!((20..400).contains(&written), "{change}: {written} lines");
    }
}

/// The output of a job that was stopped is not exported as if it were
/// the dataset: refused, saying how many lines it has of how many, unless
/// `--partial` asks for the lines written so far.
#[test]
fn export_refuses_an_incomplete_output_unless_asked_for_part_of_it() {
    let job = Job::new(0);
    let lines: String = (0..400)
        .map(|i| {
            serde_json::json!({"id": i, "messages": [{"role": "user", "content": format!("q{i}")}]})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(job.path("in.jsonl"), lines).unwrap();
    let mut run = Command::new(BIN)
        .args(["infer", "-q", "--engine", "echo", "--echo-latency-ms", "50"])
        .args(["--max-in-flight", "4", "--batch-size", "4", "--input"])
        .arg(job.path("in.jsonl"))
        .arg("--output")
        .arg(job.path("out.jsonl"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while dispatcher_testkit::lines(job.path("out.jsonl")).len() < 40 {
        assert!(start.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGTERM: the run stops and checkpoints, part of the job done.
    dispatcher_testkit::send_signal(run.id() as i32, libc::SIGTERM);
    run.wait().unwrap();
    let written = dispatcher_testkit::lines(job.path("out.jsonl")).len();
    assert!(written < 400, "stopped too late ({written} lines)");
    let export = |extra: &[&str]| {
        Command::new(BIN)
            .arg("export")
            .arg(job.path("out.jsonl"))
            .arg("--parquet")
            .arg(job.path("out.parquet"))
            .args(extra)
            .output()
            .unwrap()
    };
    let refused = export(&[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("has {written} of its input's 400 lines"))
            && stderr.contains("--partial"),
        "{stderr}"
    );
    assert!(!job.path("out.parquet").exists());
    let partial = export(&["--partial"]);
    assert!(
        partial.status.success(),
        "{}",
        String::from_utf8_lossy(&partial.stderr)
    );
    assert!(job.path("out.parquet").exists());
}
