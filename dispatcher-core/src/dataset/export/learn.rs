//! Export's first pass: the columns, learnt from every line. A large plain
//! file is read as two halves side by side, one per core, and what each
//! learnt merged ([`Columns::merge`]); where the merge cannot tell what
//! reading in order would have made of a field, the file is read again in
//! order. Either way the columns, and the first bad line reported, are
//! those of one reading in order.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use super::columns::Columns;
use super::lines::{halves, line_text, read_line, Joiner, OutputFile, OutputLines};
use crate::dataset::DatasetError;

/// What the first pass learnt.
#[derive(Debug)]
pub(super) struct Learnt {
    pub(super) columns: Columns,
    /// Lines read.
    pub(super) lines: u64,
    /// Whether a line has Python's constants (`NaN`, `Infinity`): when
    /// none has, the second pass does not look for them.
    pub(super) constants: bool,
}

/// Why a part of the lines could not be learnt: a line that is not a
/// table's row, numbered within the part, or another failure.
enum Failure {
    Line { path: PathBuf, n: u64, why: String },
    Other(DatasetError),
}

impl Failure {
    /// The error, its line numbered in the whole file: `before` lines come
    /// before the part.
    fn into_error(self, before: u64) -> DatasetError {
        match self {
            Failure::Line { path, n, why } => {
                DatasetError::shard(&path, format!("line {} {why}", before + n))
            }
            Failure::Other(e) => e,
        }
    }
}

impl From<DatasetError> for Failure {
    fn from(e: DatasetError) -> Failure {
        Failure::Other(e)
    }
}

/// The columns of every line of `files`, joined with the lines of
/// `join_input` when given.
pub(super) fn learn(
    files: &[OutputFile],
    join_input: Option<&Path>,
) -> Result<Learnt, DatasetError> {
    if join_input.is_none() {
        if let Some([first, second]) = halves(files) {
            let (first, second) = std::thread::scope(|scope| {
                let second = scope.spawn(|| learn_part(&second, None));
                let first = learn_part(&first, None);
                let second = second
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                (first, second)
            });
            let mut first = first.map_err(|f| f.into_error(0))?;
            let second = second.map_err(|f| f.into_error(first.lines))?;
            if first.columns.merge(second.columns) {
                return Ok(Learnt {
                    columns: first.columns,
                    lines: first.lines + second.lines,
                    constants: first.constants || second.constants,
                });
            }
            tracing::debug!("the halves' columns do not merge: reading the output in order");
        }
    }
    learn_part(files, join_input).map_err(|f| f.into_error(0))
}

/// The columns of the lines of `files` (a part of the output), in order.
fn learn_part(files: &[OutputFile], join_input: Option<&Path>) -> Result<Learnt, Failure> {
    let mut learnt = Learnt {
        columns: Columns::default(),
        lines: 0,
        constants: false,
    };
    let mut joiner = join_input.map(Joiner::open).transpose()?;
    let mut lines = OutputLines::new(files);
    let mut line = Vec::new();
    while let Some((path, n)) = lines.next_into(&mut line)? {
        learnt.lines += 1;
        let at_line = |why: String| Failure::Line {
            path: path.to_owned(),
            n,
            why,
        };
        let quoted = line_text(&line, true).map_err(at_line)?;
        learnt.constants |= matches!(quoted, Cow::Owned(_));
        let input = joiner.as_mut().map(|j| j.next(learnt.lines)).transpose()?;
        let fields = read_line(&quoted, input.as_deref()).map_err(at_line)?;
        learnt.columns.observe(&fields).map_err(at_line)?;
    }
    Ok(learnt)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Learns `text` (written to a file) in two halves, and in one part.
    fn both(text: &str) -> (Result<Learnt, DatasetError>, Result<Learnt, DatasetError>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, text).unwrap();
        let files = super::super::lines::output_files(&path).unwrap();
        assert!(halves(&files).is_some(), "read in two halves");
        let one = learn_part(&files, None).map_err(|f| f.into_error(0));
        (learn(&files, None), one)
    }

    fn lines(lines: &[&str]) -> String {
        lines.iter().map(|l| format!("{l}\n")).collect()
    }

    #[test]
    fn two_halves_learn_what_one_reading_in_order_does() {
        // Fields first seen in the second half come after the first's; the
        // halves' numbers make one column.
        let text = lines(&[
            r#"{"id": 1, "a": "x", "n": 1}"#,
            r#"{"id": 2, "a": "y", "n": -5}"#,
            r#"{"id": 3, "b": true, "n": 18446744073709551615}"#,
            r#"{"id": 4, "c": [1, 2], "n": NaN, "a": null}"#,
        ]);
        let (two, one) = both(&text);
        let (mut two, mut one) = (two.unwrap(), one.unwrap());
        assert_eq!((two.lines, two.constants), (4, true));
        assert_eq!(two.columns.schema(), one.columns.schema());
        // A field a list in one half and an object in both: the halves do
        // not say why it is text; read in order, it is.
        let text = lines(&[
            r#"{"a": {"k": 1}, "pad": "..............................."}"#,
            r#"{"a": [1]}"#,
            r#"{"a": {"j": 2}}"#,
        ]);
        let (two, one) = both(&text);
        let (mut two, mut one) = (two.unwrap(), one.unwrap());
        let (schema, notes) = two.columns.schema();
        assert_eq!((schema, notes.clone()), one.columns.schema());
        assert_eq!(notes.len(), 1, "{notes:?}");
    }

    #[test]
    fn a_bad_line_in_the_second_half_is_named_by_its_line_in_the_file() {
        let text = lines(&[
            r#"{"id": 1, "pad": "................................"}"#,
            r#"{"id": 2}"#,
            r#"{"id": 3}"#,
            r#"[4]"#,
            r#"{"id": 5"#,
        ]);
        let (two, one) = both(&text);
        let e = two.unwrap_err().to_string();
        assert!(e.contains("line 4 is not a JSON object"), "{e}");
        assert_eq!(e, one.unwrap_err().to_string());
        // A bad line in each half: the first half's is told.
        let text = lines(&[
            r#"{"id": 1"#,
            r#"{"id": 2, "pad": "......................................."}"#,
            "[3]",
        ]);
        let (two, one) = both(&text);
        let e = two.unwrap_err().to_string();
        assert!(e.contains("line 1 is not JSON"), "{e}");
        assert_eq!(e, one.unwrap_err().to_string());
    }
}
