//! A dataset whose columns a JSON line cannot hold as they are (two
//! columns of one name, a map with a key twice) is refused before any line
//! is sent, naming the shard, column and key; nothing is dropped silently.
//! Needs the venv of `scripts/setup-datasets.sh` (see `datasets.rs`).

use crate::datasets::{python, run_python};
use crate::export::infer_prompts;

const WRITE: &str = r#"
import sys, pyarrow as pa, pyarrow.parquet as pq
dup_columns, dup_keys, dup_fields = sys.argv[1], sys.argv[2], sys.argv[3]
prompts = pa.array(["a", "b"])
pq.write_table(pa.Table.from_arrays([prompts, pa.array([1, 2]), pa.array([3, 4])], names=["prompt", "x", "x"]), dup_columns)
maps = pa.array([[("k", 1)], [("k", 1), ("k", 2)]], pa.map_(pa.string(), pa.int64()))
pq.write_table(pa.Table.from_arrays([prompts, maps], names=["prompt", "m"]), dup_keys)
struct = pa.StructArray.from_arrays([pa.array([1, 2]), pa.array([3, 4])], names=["y", "y"])
pq.write_table(pa.Table.from_arrays([prompts, struct], names=["prompt", "s"]), dup_fields)
"#;

#[test]
fn columns_a_json_line_cannot_hold_are_refused_by_name() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let files =
        ["dup_columns", "dup_keys", "dup_fields"].map(|f| dir.path().join(format!("{f}.parquet")));
    run_python(&python, WRITE, &[&files[0], &files[1], &files[2]]);
    let expected = [
        "has two columns named \"x\"",
        "column \"m\" has a map with the key \"k\" twice",
        "column \"s\" has two fields named \"y\"",
    ];
    for (file, expected) in files.iter().zip(expected) {
        let output = dir.path().join("out.jsonl");
        let run = infer_prompts(file, "--output", &output).output().unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{stderr}");
        let name = file.file_name().unwrap().to_str().unwrap();
        assert!(
            stderr.contains(name) && stderr.contains(expected),
            "{expected}: {stderr}"
        );
        assert!(!output.exists(), "{name}: an output was started");
    }
}
