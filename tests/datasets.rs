//! Datasets in: files written by the tools users have (pyarrow, `datasets`,
//! `gzip`, `zstd`), run through the `dispatcher` binary, locally and through
//! a server: rows as lines in the dataset's order, splits, a run killed and
//! resumed exact, a shard changed between runs or while the job runs.
//!
//! pyarrow and `datasets` come from the venv `scripts/setup-datasets.sh`
//! makes (its python in `DATASETS_PYTHON`); without it these tests say so and
//! do nothing, unless `DISPATCHER_REQUIRE_DATASETS=1` (scripts/test.sh sets
//! it), which makes it a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{dispatcher_bin, jsonl, ServerProcess};

/// The python with pyarrow and `datasets`, if there is one here.
pub(crate) fn python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DATASETS_PYTHON") {
        return Some(PathBuf::from(p));
    }
    assert!(
        std::env::var_os("DISPATCHER_REQUIRE_DATASETS").is_none(),
        "DATASETS_PYTHON is not set: run scripts/setup-datasets.sh"
    );
    eprintln!("SKIPPED: no python with pyarrow and datasets; run scripts/setup-datasets.sh and set DATASETS_PYTHON");
    None
}

/// Runs a python script with `args`; fails the test with its stderr.
pub(crate) fn run_python(python: &Path, script: &str, args: &[&Path]) {
    let out = Command::new(python)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `dispatcher infer` on local files with the echo engine.
fn infer(args: &[&str]) -> Output {
    Command::new(dispatcher_bin())
        .arg("infer")
        .args(["--engine", "echo"])
        .args(args)
        .output()
        .unwrap()
}

pub(crate) fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `infer` over the snapshot's train split into zstd shards in `outdir`.
fn run_sharded(snapshot: &Path, outdir: &Path) {
    let run = infer(&[
        "--input",
        path(snapshot),
        "--split",
        "train",
        "--prompt-path",
        ".messages",
        "--outdir",
        path(outdir),
        "--compress",
        "zstd",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

/// Three Parquet shards of a train split (7 rows each, row groups of 3) and
/// a test split, in a Hugging Face snapshot's layout, with nested messages,
/// nulls, a timestamp, binary and floats; and the rows as JSON the way the
/// README says they are read.
const PARQUET_SNAPSHOT: &str = r#"
import base64, datetime, json, os, sys
import pyarrow as pa, pyarrow.parquet as pq
root = sys.argv[1]
os.makedirs(f"{root}/data")
open(f"{root}/README.md", "w").write("---\nlicense: mit\n---\n")
schema = pa.schema([
    ("id", pa.int64()),
    ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("note", pa.string()),
    ("created", pa.timestamp("ms", tz="UTC")),
    ("blob", pa.binary()),
    ("score", pa.float32()),
    ("tags", pa.list_(pa.string())),
])
expected = []
for shard in range(3):
    rows = []
    for j in range(7):
        i = shard * 7 + j
        created = datetime.datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=datetime.timezone.utc) + datetime.timedelta(days=i)
        row = {
            "id": i,
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Question {i}?"}],
            "note": None if i % 3 == 0 else f"note {i}",
            "created": created,
            "blob": bytes([i, 0, 255]),
            "score": None if i % 4 == 0 else i / 4,
            "tags": ["a", "b"][: i % 3],
        }
        rows.append(row)
        as_json = dict(row)
        as_json["created"] = created.strftime("%Y-%m-%dT%H:%M:%S.") + f"{created.microsecond // 1000:03d}Z"
        as_json["blob"] = base64.b64encode(row["blob"]).decode()
        expected.append(as_json)
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, f"{root}/data/train-{shard:05d}-of-00003.parquet", row_group_size=3)
test = [{"id": 100, "messages": [{"role": "user", "content": "A test question?"}]}]
pq.write_table(pa.Table.from_pylist(test), f"{root}/data/test-00000-of-00001.parquet")
with open(sys.argv[2], "w") as f:
    for e in expected:
        f.write(json.dumps(e) + "\n")
"#;

/// [`PARQUET_SNAPSHOT`] written in `dir`: the snapshot folder and the rows
/// as JSON.
fn parquet_snapshot(python: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    let (snapshot, expected) = (dir.join("snapshot"), dir.join("expected.jsonl"));
    run_python(python, PARQUET_SNAPSHOT, &[&snapshot, &expected]);
    (snapshot, expected)
}

#[test]
fn a_parquet_snapshot_s_split_runs_as_one_job_of_its_rows_in_order() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (snapshot, expected) = parquet_snapshot(&python, dir.path());
    let output = dir.path().join("out.jsonl");

    let refused = infer(&["--input", path(&snapshot), "--output", path(&output)]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("holds several splits (test, train); pick one with --split"),
        "{stderr}"
    );

    let run = infer(&[
        "--input",
        path(&snapshot),
        "--split",
        "train",
        "--prompt-path",
        ".messages",
        "--output",
        path(&output),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let out = jsonl(&output);
    let expected = jsonl(&expected);
    assert_eq!(out.len(), 21);
    for (i, (line, row)) in out.iter().zip(&expected).enumerate() {
        let mut line = line.clone();
        let responses = line.as_object_mut().unwrap().remove("responses");
        assert_eq!(
            &line, row,
            "line {i}: the row as JSON, every column in place"
        );
        assert_eq!(
            responses,
            Some(json!([format!("Question {i}?")])),
            "line {i}"
        );
    }
    // The job's input was staged beside the output, and says from what.
    let record: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("out.jsonl.input.json")).unwrap())
            .unwrap();
    let lines: Vec<u64> = (record["shards"].as_array().unwrap().iter())
        .map(|s| s["lines"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, [7, 7, 7]);

    // The same job with its output as zstd shards named after the input's
    // (and the job's own output in the folder's `.job/`), read back by pyarrow.
    let outdir = dir.path().join("sharded");
    run_sharded(&snapshot, &outdir);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(outdir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["complete"], true);
    let names: Vec<&str> = (manifest["shards"].as_array().unwrap().iter())
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "train-00000-of-00003.jsonl.zst",
            "train-00001-of-00003.jsonl.zst",
            "train-00002-of-00003.jsonl.zst"
        ]
    );
    let read_back = Command::new(&python)
        .arg("-c")
        .arg(
            r#"
import json, sys
import pyarrow as pa, pyarrow.json as pj
for name in sys.argv[2:]:
    table = pj.read_json(pa.input_stream(f"{sys.argv[1]}/{name}", compression="zstd"))
    print(json.dumps(table.column("id").to_pylist()))
"#,
        )
        .arg(&outdir)
        .args(&names)
        .output()
        .unwrap();
    assert!(
        read_back.status.success(),
        "{}",
        String::from_utf8_lossy(&read_back.stderr)
    );
    let ids: Vec<Vec<u64>> = String::from_utf8_lossy(&read_back.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            (0..7).collect::<Vec<_>>(),
            (7..14).collect(),
            (14..21).collect()
        ]
    );
    assert_eq!(jsonl(outdir.join(".job/output.jsonl")).len(), 21);
}

#[test]
fn a_save_to_disk_dataset_dict_runs_by_split() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("saved");
    run_python(
        &python,
        r#"
import sys
from datasets import Dataset, DatasetDict
train = Dataset.from_dict({"prompt": [f"p{i}" for i in range(10)], "n": list(range(10))})
test = Dataset.from_dict({"prompt": ["t0", "t1"], "n": [0, 1]})
DatasetDict({"train": train, "test": test}).save_to_disk(sys.argv[1], num_shards={"train": 3, "test": 1})
"#,
        &[&saved],
    );
    for (split, expected, prefix) in [("train", 10, "p"), ("test", 2, "t")] {
        let output = dir.path().join(format!("{split}.jsonl"));
        let run = infer(&[
            "--input",
            path(&saved),
            "--split",
            split,
            "--prompt-path",
            ".prompt",
            "--output",
            path(&output),
        ]);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let out = jsonl(&output);
        assert_eq!(out.len(), expected);
        for (i, line) in out.iter().enumerate() {
            assert_eq!(line["prompt"], format!("{prefix}{i}"), "{split} line {i}");
            assert_eq!(line["n"], i, "{split} line {i}");
            assert_eq!(line["responses"], json!([format!("{prefix}{i}")]));
        }
    }
}

/// `n` JSONL lines `{"id": first + i, "prompt": ...}`.
fn prompts(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| json!({"id": i, "prompt": format!("prompt {i}")}).to_string() + "\n")
        .collect()
}

/// A folder of shards as a datatrove-style pipeline leaves them: gzip,
/// zstd (several frames) and plain, one without its last newline.
fn compressed_shards(dir: &Path, per_shard: usize) -> PathBuf {
    let shards = dir.join("shards");
    std::fs::create_dir(&shards).unwrap();
    std::fs::write(shards.join("00000.jsonl"), prompts(0, per_shard)).unwrap();
    std::fs::write(shards.join("00001.jsonl"), prompts(per_shard, per_shard)).unwrap();
    let third = prompts(2 * per_shard, per_shard);
    std::fs::write(shards.join("00002.jsonl"), third.trim_end()).unwrap();
    let status = Command::new("gzip")
        .arg(shards.join("00000.jsonl"))
        .status()
        .unwrap();
    assert!(status.success());
    // Two zstd frames, as a file appended to by two writers.
    let half = per_shard / 2;
    let frame = |text: String| {
        let mut child = Command::new("zstd")
            .args(["-q", "-c"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("zstd is installed (scripts/setup-datasets.sh)");
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
        child.wait_with_output().unwrap().stdout
    };
    let mut zst = frame(prompts(per_shard, half));
    zst.extend(frame(prompts(per_shard + half, per_shard - half)));
    std::fs::write(shards.join("00001.jsonl.zst"), zst).unwrap();
    std::fs::remove_file(shards.join("00001.jsonl")).unwrap();
    shards
}

fn assert_in_order(out: &[Value], n: usize) {
    assert_eq!(out.len(), n);
    for (i, line) in out.iter().enumerate() {
        assert_eq!(line["id"], i, "line {i}");
        assert_eq!(
            line["responses"],
            json!([format!("prompt {i}")]),
            "line {i}"
        );
    }
}

#[test]
fn gzip_and_zstd_shards_run_in_order_and_a_killed_run_resumes_exact() {
    if python().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let shards = compressed_shards(dir.path(), 400);
    let output = dir.path().join("out.jsonl");
    let outdir = dir.path().join("sharded");
    let args = [
        "--input",
        path(&shards),
        "--prompt-path",
        ".prompt",
        "--output",
        path(&output),
        "--echo-latency-ms",
        "5",
        "--max-in-flight",
        "4",
        "--outdir",
        path(&outdir),
    ];
    // Killed (SIGKILL: no checkpoint at exit) once part of the output is written.
    let mut first = Command::new(dispatcher_bin())
        .args(["infer", "--engine", "echo"])
        .args(args)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while crate::support::lines(&output).len() < 100 {
        assert!(start.elapsed() < Duration::from_secs(60), "no progress");
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first run ended by itself"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let staged = dir.path().join("out.jsonl.input.jsonl");
    let staged_at = std::fs::metadata(&staged).unwrap().modified().unwrap();
    let written = crate::support::lines(&output).len();
    assert!(written < 1200, "killed mid-way ({written} lines)");

    let second = infer(&args);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{stderr}");
    assert!(stderr.contains("the input was staged already"), "{stderr}");
    assert_eq!(
        std::fs::metadata(&staged).unwrap().modified().unwrap(),
        staged_at
    );
    assert_in_order(&jsonl(&output), 1200);
    // Its output shards, cut from the resumed output: exactly its lines.
    let mut joined = Vec::new();
    for name in ["00000.jsonl", "00001.jsonl", "00002.jsonl"] {
        let shard = crate::support::lines(outdir.join(name));
        assert_eq!(shard.len(), 400, "{name}");
        joined.extend(shard);
    }
    assert_eq!(joined, crate::support::lines(&output));
    // `report --input` counts the dataset's lines from its staging record.
    let report = Command::new(dispatcher_bin())
        .args(["report", path(&output), "--input", path(&shards)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&report.stdout);
    assert!(
        text.contains("1200 lines: every one has its output line"),
        "{text}"
    );

    // The same input spelled otherwise (`dir/./shards`, a link to it), and
    // a shard copied away and back with `cp` (a new time, the same bytes):
    // the same job, not "another input".
    let shard = shards.join("00002.jsonl");
    let copy = dir.path().join("copy.jsonl");
    std::fs::copy(&shard, &copy).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    std::fs::copy(&copy, &shard).unwrap();
    let link = dir.path().join("link-to-shards");
    std::os::unix::fs::symlink(&shards, &link).unwrap();
    for spelled in [dir.path().join(".").join("shards"), link] {
        let mut again = args;
        again[1] = path(&spelled);
        let rerun = infer(&again);
        let stderr = String::from_utf8_lossy(&rerun.stderr);
        assert!(rerun.status.success(), "{}: {stderr}", spelled.display());
        assert!(stderr.contains("the input was staged already"), "{stderr}");
    }
    assert_eq!(
        std::fs::metadata(&staged).unwrap().modified().unwrap(),
        staged_at,
        "not staged again"
    );

    // A shard changed after the job: a rerun (to resume, or a redo) refuses
    // it by name, and the output stays as it is.
    let before = std::fs::read(&output).unwrap();
    std::fs::write(shards.join("00002.jsonl"), prompts(0, 3)).unwrap();
    let third = infer(&args);
    let stderr = String::from_utf8_lossy(&third.stderr);
    assert!(!third.status.success());
    assert!(
        stderr.contains(&format!(
            "the input shard {} changed size",
            shards.join("00002.jsonl").display()
        )) && stderr.contains("since this job staged its input"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&output).unwrap(), before);
}

#[test]
fn a_server_serves_a_dataset_and_stops_when_a_shard_changes_under_it() {
    if python().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let shards = compressed_shards(dir.path(), 100);
    let output = dir.path().join("out.jsonl");
    let serve = |extra: &[&str]| {
        let mut command = Command::new(dispatcher_bin());
        command
            .args([
                "serve",
                "--port",
                "0",
                "--host",
                "127.0.0.1",
                "--exit-grace",
                "0",
            ])
            .args(["--infile", path(&shards), "--outfile", path(&output)])
            .args(extra);
        ServerProcess::start(command)
    };
    let worker = |addr: &str, latency: &str| {
        Command::new(dispatcher_bin())
            .args([
                "infer",
                "--engine",
                "echo",
                "--prompt-path",
                ".prompt",
                "-q",
            ])
            .args([
                "--dispatcher",
                addr,
                "--echo-latency-ms",
                latency,
                "--max-in-flight",
                "2",
            ])
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };

    // A slow worker; a shard rewritten while the job runs stops the server.
    let server = serve(&[]);
    let mut slow = worker(&server.addr, "100");
    let start = Instant::now();
    while crate::support::lines(&output).len() < 10 {
        assert!(start.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(shards.join("00002.jsonl"), prompts(0, 5)).unwrap();
    let (code, stderr) = server.wait(Duration::from_secs(30));
    let _ = slow.kill();
    let _ = slow.wait();
    assert_ne!(code, 0, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "the input shard {} changed size",
            shards.join("00002.jsonl").display()
        )),
        "{stderr}"
    );

    // Restored (the same bytes, a new modification time): as the message
    // says, the same command resumes the job, which completes.
    std::fs::write(shards.join("00002.jsonl"), prompts(200, 100).trim_end()).unwrap();
    let server = serve(&[]);
    let mut fast = worker(&server.addr, "0");
    let (code, stderr) = server.wait(Duration::from_secs(60));
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("the input was staged already"), "{stderr}");
    fast.wait().unwrap();
    assert_in_order(&jsonl(&output), 300);
}

/// Checks with pyarrow and `datasets` that a Parquet file holds exactly the
/// JSON lines of `jsonl` (a field a line lacks is null in its row).
const SAME_ROWS: &str = r#"
import json, math, os, sys
import pyarrow.parquet as pq
parquet, jsonl = sys.argv[1], sys.argv[2]
rows = pq.read_table(parquet).to_pylist()
lines = [json.loads(l) for l in open(jsonl)]
def same(row, line, at):
    if isinstance(row, dict):
        assert isinstance(line, dict) or line is None, (at, row, line)
        line = line or {}
        assert set(line) <= set(row), (at, set(line) - set(row))
        for k in row:
            same(row[k], line.get(k), f"{at}.{k}")
    elif isinstance(row, list):
        assert isinstance(line, list) and len(row) == len(line), (at, row, line)
        for i, (r, l) in enumerate(zip(row, line)):
            same(r, l, f"{at}[{i}]")
    elif isinstance(row, float) and math.isnan(row):
        assert isinstance(line, float) and math.isnan(line), (at, row, line)
    else:
        assert row == line, (at, row, line)
assert len(rows) == len(lines), (len(rows), len(lines))
for i, (row, line) in enumerate(zip(rows, lines)):
    same(row, line, f"line {i}")
os.environ["HF_HUB_OFFLINE"] = "1"  # read when `datasets` is imported
# Each check its own Hugging Face home: tests run at once share no cache or lock.
os.environ["HF_HOME"] = os.path.join(sys.argv[3], "hf-home")
import datasets
loaded = datasets.load_dataset("parquet", data_files=parquet, split="train", cache_dir=sys.argv[3])
assert loaded.num_rows == len(lines)
for i in range(loaded.num_rows):
    same(loaded[i], rows[i], f"datasets row {i}")
print(len(rows))
"#;

pub(crate) fn assert_same_rows(python: &Path, parquet: &Path, jsonl: &Path, cache: &Path) {
    run_python(python, SAME_ROWS, &[parquet, jsonl, cache]);
}

#[test]
fn export_writes_parquet_that_pyarrow_and_datasets_read_back_equal_to_the_json() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (snapshot, _) = parquet_snapshot(&python, dir.path());
    let outdir = dir.path().join("sharded");
    run_sharded(&snapshot, &outdir);
    let export = |args: &[&str]| {
        Command::new(dispatcher_bin())
            .arg("export")
            .args(args)
            .output()
            .unwrap()
    };
    // The folder of zstd shards, in small row groups: nested messages, nulls,
    // lists of varying length, floats.
    let parquet = dir.path().join("out.parquet");
    let done = export(&[
        path(&outdir),
        "--parquet",
        path(&parquet),
        "--row-group-rows",
        "4",
    ]);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert_same_rows(
        &python,
        &parquet,
        &outdir.join(".job/output.jsonl"),
        dir.path(),
    );

    // A task's output without the input's columns, joined with its input:
    // each row has both, the output's field winning.
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("task.jsonl"));
    std::fs::write(
        &input,
        (0..5)
            .map(|i| {
                json!({"id": i, "question": format!("q{i}"), "answer": "old"}).to_string() + "\n"
            })
            .collect::<String>(),
    )
    .unwrap();
    std::fs::write(
        &output,
        (0..5)
            .map(|i| json!({"answer": format!("a{i}"), "score": i}).to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    let joined = dir.path().join("joined.parquet");
    let done = export(&[
        path(&output),
        "--parquet",
        path(&joined),
        "--join-input",
        path(&input),
    ]);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let expected_joined = dir.path().join("joined.jsonl");
    std::fs::write(
        &expected_joined,
        (0..5)
            .map(|i| {
                json!({"id": i, "question": format!("q{i}"), "answer": format!("a{i}"), "score": i})
                    .to_string()
                    + "\n"
            })
            .collect::<String>(),
    )
    .unwrap();
    assert_same_rows(&python, &joined, &expected_joined, dir.path());

    // An unfinished folder is refused, saying how far it is.
    let mut manifest: Value =
        serde_json::from_slice(&std::fs::read(outdir.join("manifest.json")).unwrap()).unwrap();
    manifest["complete"] = json!(false);
    manifest["shards"][2]["complete"] = json!(false);
    std::fs::write(outdir.join("manifest.json"), manifest.to_string()).unwrap();
    let refused = export(&[path(&outdir), "--parquet", path(&parquet)]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("2 of 3 shards are complete"), "{stderr}");
}

/// A sharded input's progress is shown per shard: `/status` lists each shard
/// in the job's order with the lines of it written (plain JSONL shards in a
/// folder: nothing to install).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_lines_written_of_each_shard() {
    let dir = tempfile::tempdir().unwrap();
    let shards = dir.path().join("shards");
    std::fs::create_dir(&shards).unwrap();
    for (i, first) in [0, 50, 100].into_iter().enumerate() {
        std::fs::write(shards.join(format!("{i:05}.jsonl")), prompts(first, 50)).unwrap();
    }
    let output = dir.path().join("out.jsonl");
    let mut command = Command::new(dispatcher_bin());
    command
        .args(["serve", "--port", "0", "--host", "127.0.0.1"])
        .args(["--infile", path(&shards), "--outfile", path(&output)]);
    let server = ServerProcess::start(command);
    let answered =
        dispatcher_testkit::answer_batch(&server.addr, 60, |item| item.content.clone()).await;
    assert_eq!(answered.len(), 60);
    let status = dispatcher::client::DispatcherClient::new(&server.addr)
        .status()
        .await
        .unwrap();
    let shown: Vec<(String, u64, u64)> = status
        .shards
        .iter()
        .map(|s| {
            let name = Path::new(&s.path)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (name, s.lines, s.done)
        })
        .collect();
    assert_eq!(
        shown,
        [
            ("00000.jsonl".to_string(), 50, 50),
            ("00001.jsonl".to_string(), 50, 10),
            ("00002.jsonl".to_string(), 50, 0),
        ]
    );
    let text = Command::new(dispatcher_bin())
        .args(["status", "--interval", "0.1", "--server", &server.addr])
        .output()
        .unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.contains("shards       1 of 3 complete; writing "),
        "{text}"
    );
    assert!(text.contains("00001.jsonl (10 / 50)"), "{text}");
}
