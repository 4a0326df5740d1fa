//! `dispatcher export` keeps every value exactly, as pyarrow and `datasets`
//! read it back: integers past 64 bits, floats to the last digit, Python's
//! `NaN` and `Infinity`, maps with many keys, fields of changing type,
//! failure records, an input joined; and a folder whose shard was cut short
//! is refused. Needs the venv of `scripts/setup-datasets.sh` (see
//! `datasets.rs`).

use std::path::Path;
use std::process::Command;

use dispatcher_testkit::succeed;

use crate::datasets::{assert_same_rows, path, python, run_python};
use crate::support::dispatcher_bin;

/// `dispatcher export` with `args`.
fn export(args: &[&str]) -> Command {
    let mut command = Command::new(dispatcher_bin());
    command.arg("export").args(args);
    command
}

/// `dispatcher export` with `args`, which must fail: its stderr.
fn refused(args: &[&str]) -> String {
    let refused = export(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(!refused.status.success(), "{stderr}");
    stderr
}

/// `dispatcher infer` with the echo engine on the `prompt` field of each
/// line of `input`, writing to `output` (`--output` or `--outdir`).
pub(crate) fn infer_prompts(input: &Path, flag: &str, output: &Path) -> Command {
    let mut command = Command::new(dispatcher_bin());
    command
        .args([
            "infer",
            "-q",
            "--engine",
            "echo",
            "--prompt-path",
            ".prompt",
        ])
        .arg("--input")
        .arg(input)
        .arg(flag)
        .arg(output);
    command
}

/// Writes `values.jsonl` (an output as jobs write it, with Python's `json`)
/// and `expected.jsonl` (its rows as a reader of the Parquet file must get
/// them: JSON text where a field is written as text).
const VALUES: &str = r#"
import json, sys
out, expected = sys.argv[1], sys.argv[2]
lines, rows = [], []
def add(line, row=None):
    lines.append(json.dumps(line))
    rows.append(line if row is None else row)
huge = 10**42 + 1
for i in range(40):
    # A map: keys differ from line to line, 1,200 in all.
    scores = {f"k{i * 30 + j}": j for j in range(30)}
    line = {
        "id": i,
        "u64": [2**64 - 1, 0, 2**63][i % 3],
        "dec": [-(2**64), 10**38 - 1, 7][i % 3],
        "huge": [huge, -huge, 1][i % 3],
        "f": [90.33333333333333, 0.1, 1e308, 5e-324, -0.0][i % 5],
        "special": [float("nan"), float("inf"), float("-inf"), 1.5][i % 4],
        "big_among_floats": [9007199254740993, 0.5][i % 2],
        "either": [{"a": i}, "text", [1, 2]][i % 3],
        "scalars": [1, "one", True][i % 3],
        "scores": scores,
        "nested": {"deep": {"x": [2**64 - 1, i]}},
    }
    row = dict(line)
    row["huge"] = str(line["huge"])
    row["big_among_floats"] = str(line["big_among_floats"])
    row["either"] = json.dumps(line["either"])
    s = line["scalars"]
    row["scalars"] = s if isinstance(s, str) else json.dumps(s)
    row["scores"] = json.dumps(scores)
    add(line, row)
# Failure records dispatcher writes: `task_data` an object, or the text of
# a line that was not JSON.
for data in [{"id": 40, "prompt": "p"}, "{not json"]:
    record = {"__ERROR__": {"kind": "invalid_json", "message": "m", "task_data": data, "attempts": 1}}
    row = json.loads(json.dumps(record))
    row["__ERROR__"]["task_data"] = json.dumps(data)
    add(record, row)
with open(out, "w") as f:
    f.write("".join(l + "\n" for l in lines))
with open(expected, "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows))
"#;

#[test]
fn export_keeps_every_value_exactly() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (values, expected) = (
        dir.path().join("values.jsonl"),
        dir.path().join("expected.jsonl"),
    );
    run_python(&python, VALUES, &[&values, &expected]);
    let parquet = dir.path().join("values.parquet");
    let exported = succeed(&mut export(&[
        path(&values),
        "--parquet",
        path(&parquet),
        "--row-group-rows",
        "7",
    ]));
    let stderr = String::from_utf8_lossy(&exported.stderr);
    assert_same_rows(&python, &parquet, &expected, dir.path());
    // Fields written in a form their values do not suggest are named.
    for field in [
        "\"huge\"",
        "\"big_among_floats\"",
        "\"either\"",
        "\"scores\"",
    ] {
        assert!(
            stderr.contains(&format!("field {field}")),
            "{field}: {stderr}"
        );
    }
    run_python(
        &python,
        r#"
import sys, pyarrow.parquet as pq
types = {f.name: str(f.type) for f in pq.read_schema(sys.argv[1])}
assert types["u64"] == "uint64", types
assert types["dec"] == "decimal128(38, 0)", types
assert types["f"] == "double" and types["special"] == "double", types
"#,
        &[&parquet],
    );
}

/// A dataset's `uint64` column and floats, staged, run through `infer` and
/// exported joined with the dataset: every value as the dataset had it.
#[test]
fn a_datasets_values_come_back_exact_through_infer_and_a_join() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dataset = dir.path().join("data.parquet");
    run_python(
        &python,
        r#"
import sys, pyarrow as pa, pyarrow.parquet as pq
n = 300
pq.write_table(pa.table({
    "id": pa.array([2**64 - 1 - i for i in range(n)], pa.uint64()),
    "score": pa.array([i / 3 + 90 for i in range(n)], pa.float64()),
    "prompt": [f"q{i}" for i in range(n)],
}), sys.argv[1])
"#,
        &[&dataset],
    );
    let output = dir.path().join("out.jsonl");
    succeed(&mut infer_prompts(&dataset, "--output", &output));
    let joined = dir.path().join("joined.parquet");
    succeed(&mut export(&[
        path(&output),
        "--parquet",
        path(&joined),
        "--join-input",
        path(&dataset),
    ]));
    assert_same_rows(&python, &joined, &output, dir.path());
    run_python(
        &python,
        r#"
import sys, pyarrow.parquet as pq
source, joined = pq.read_table(sys.argv[1]), pq.read_table(sys.argv[2])
assert str(joined.schema.field("id").type) == "uint64", joined.schema
for name in ["id", "score", "prompt"]:
    assert joined[name].to_pylist() == source[name].to_pylist(), name
"#,
        &[&dataset, &joined],
    );
}

/// An `--outdir` folder whose shard has fewer lines than its manifest
/// says (a copy cut short) is refused, naming the shard.
#[test]
fn a_folder_whose_shard_was_cut_short_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    for shard in 0..2 {
        let lines: String = (0..50)
            .map(|i| format!("{{\"id\": {}, \"prompt\": \"q\"}}\n", shard * 50 + i))
            .collect();
        std::fs::write(input.join(format!("part-{shard}.jsonl")), lines).unwrap();
    }
    let outdir = dir.path().join("out");
    succeed(&mut infer_prompts(&input, "--outdir", &outdir));
    let shard = outdir.join("part-1.jsonl");
    let text = std::fs::read_to_string(&shard).unwrap();
    let cut = &text[..text.trim_end().rfind('\n').unwrap() + 1];
    std::fs::write(&shard, cut).unwrap();
    let parquet = dir.path().join("out.parquet");
    let stderr = refused(&[path(&outdir), "--parquet", path(&parquet)]);
    assert!(
        stderr.contains("part-1.jsonl")
            && stderr.contains("has 49 lines where the folder's manifest.json says 50"),
        "{stderr}"
    );
    assert!(!parquet.exists() && !Path::new(&format!("{}.tmp", parquet.display())).exists());
}

/// Lines of a large plain output: ids in order, texts with escapes and
/// non-ASCII, a list, nulls, and fields first seen past the middle (the
/// second half of the file learns them).
const LARGE: &str = r#"
import json, sys
n = 180_000
with open(sys.argv[1], "w") as f:
    for i in range(n):
        row = {"id": i, "text": f"line {i}: \"quoted\" é ✓ \\ {'x' * (i % 50)}", "tags": [i % 3, i % 5]}
        if i % 7 == 0:
            row["maybe"] = None
        if i >= n * 3 // 4:
            row["late"] = {"n": i, "s": str(i)}
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
"#;

/// A plain output of 16 MiB and more is learnt in two halves side by side
/// and written from chunks of whole lines: every row comes back as it was,
/// in order, with a field first seen in the second half last among the
/// columns; a bad line in the second half is named by its line in the file.
#[test]
fn a_large_output_learnt_in_two_halves_comes_back_row_for_row() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("large.jsonl");
    run_python(&python, LARGE, &[&output]);
    assert!(
        std::fs::metadata(&output).unwrap().len() > 16 << 20,
        "past the split size"
    );
    let parquet = dir.path().join("large.parquet");
    succeed(&mut export(&[path(&output), "--parquet", path(&parquet)]));
    assert_same_rows(&python, &parquet, &output, dir.path());
    run_python(
        &python,
        r#"
import sys, pyarrow.parquet as pq
names = pq.read_schema(sys.argv[1]).names
assert names == ["id", "text", "tags", "maybe", "late"], names
"#,
        &[&parquet],
    );
    // Line 170,001 (in the second half) is not an object.
    let text = std::fs::read_to_string(&output).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines[170_000] = "[1, 2]";
    let broken = dir.path().join("broken.jsonl");
    std::fs::write(&broken, lines.join("\n") + "\n").unwrap();
    let stderr = refused(&[path(&broken), "--parquet", path(&parquet)]);
    assert!(
        stderr.contains("line 170001 is not a JSON object"),
        "{stderr}"
    );
}
