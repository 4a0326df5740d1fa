//! `dispatcher export`: a finished output (one JSONL file, or an `--outdir`
//! folder of shards) as one Parquet file, streaming: two passes over the
//! lines, one to infer the schema from every line, one to write row groups of
//! a set size, so memory is one row group whatever the output's size.
//!
//! The schema is arrow-json's inference over all lines: a field missing from
//! a line is null there; integers and floats in one field make a float
//! column; a field whose lines mix other types (a number here, a string
//! there) becomes a string column. A field that is an object in some lines
//! and a scalar in others has no column type and is refused.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_schema::ArrowError;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde_json::Value;

use super::outdir::Manifest;
use super::{DatasetError, Format};
use crate::error::IoContext;
use crate::job::files::{rename_durably, with_suffix};

/// How to export.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Rows per Parquet row group.
    pub row_group_rows: usize,
    /// The job's input (a plain JSONL file, as [`super::prepare`] gives it):
    /// each output line gets its input line's fields, the output's winning
    /// where both have one.
    pub join_input: Option<PathBuf>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            row_group_rows: 10_000,
            join_input: None,
        }
    }
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    /// Rows written.
    pub rows: u64,
    /// Columns of the schema.
    pub columns: usize,
}

/// The files of an output, in order: the file itself, or the shards of an
/// `--outdir` folder (all of them complete).
pub fn output_files(output: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    if !output.is_dir() {
        if !output.is_file() {
            return Err(DatasetError::NotFound {
                input: output.display().to_string(),
            });
        }
        return Ok(vec![output.to_owned()]);
    }
    let manifest_path = output.join("manifest.json");
    let text = std::fs::read(&manifest_path).map_err(|e| {
        DatasetError::shard(
            &manifest_path,
            format!(
                "cannot be read ({e}); is {} an --outdir folder?",
                output.display()
            ),
        )
    })?;
    let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| {
        DatasetError::shard(&manifest_path, format!("is not an output manifest: {e}"))
    })?;
    if !manifest.complete {
        let done = manifest.shards.iter().filter(|s| s.complete).count();
        return Err(DatasetError::shard(
            &manifest_path,
            format!(
                "{done} of {} shards are complete: export once the job is (its output is being written)",
                manifest.shards.len()
            ),
        ));
    }
    Ok(manifest
        .shards
        .iter()
        .map(|s| output.join(&s.name))
        .collect())
}

/// Every line of `files` in order, with its file and line number.
struct OutputLines<'a> {
    files: std::slice::Iter<'a, PathBuf>,
    /// The file being read, its reader and the lines read from it.
    current: Option<(&'a Path, Decoded, u64)>,
}

/// A file's content, decompressed where it is compressed.
type Decoded = BufReader<Box<dyn Read>>;

impl<'a> OutputLines<'a> {
    fn new(files: &'a [PathBuf]) -> OutputLines<'a> {
        OutputLines {
            files: files.iter(),
            current: None,
        }
    }

    fn open(path: &Path) -> Result<Decoded, DatasetError> {
        let format = Format::of(path, true)
            .map_err(|e| DatasetError::shard(path, e))?
            .unwrap_or(Format::Jsonl);
        super::open_jsonl(path, format)
    }

    /// The next line into `line` (without its terminator): its file and
    /// number, or `None` at the end.
    fn next_into(&mut self, line: &mut Vec<u8>) -> Result<Option<(&'a Path, u64)>, DatasetError> {
        loop {
            if self.current.is_none() {
                let Some(path) = self.files.next() else {
                    return Ok(None);
                };
                self.current = Some((path, OutputLines::open(path)?, 0));
            }
            let (path, reader, n) = self.current.as_mut().expect("opened above");
            line.clear();
            if reader
                .read_until(b'\n', line)
                .with_path("read the output", path)?
                == 0
            {
                self.current = None;
                continue;
            }
            *n += 1;
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(Some((path, *n)));
        }
    }
}

/// Reads the job's input alongside the output, for `--join-input`.
struct Joiner {
    path: PathBuf,
    lines: std::io::Lines<BufReader<File>>,
}

impl Joiner {
    fn open(path: &Path) -> Result<Joiner, DatasetError> {
        let file = File::open(path).with_path("open the input", path)?;
        Ok(Joiner {
            path: path.to_owned(),
            lines: BufReader::with_capacity(1 << 20, file).lines(),
        })
    }

    /// The output line `line` (the `n`th of the whole output) with its
    /// input line's fields.
    fn join(&mut self, n: u64, output: Value) -> Result<Value, DatasetError> {
        let input = self
            .lines
            .next()
            .transpose()
            .with_path("read the input", &self.path)?
            .ok_or_else(|| {
                DatasetError::shard(&self.path, format!("has fewer lines than the output (none for its line {n}); is it the job's input?"))
            })?;
        let Ok(Value::Object(mut joined)) = serde_json::from_str::<Value>(&input) else {
            // An input line that is no object carries nothing to join.
            return Ok(output);
        };
        match output {
            Value::Object(fields) => {
                joined.extend(fields);
                Ok(Value::Object(joined))
            }
            other => Ok(other),
        }
    }
}

/// Exports the output at `output` to the Parquet file `parquet` (written
/// through a temporary file, renamed into place when complete).
pub fn export(
    output: &Path,
    parquet: &Path,
    options: &ExportOptions,
) -> Result<Exported, DatasetError> {
    let files = output_files(output)?;
    let not_json = |path: &Path, n: u64, e: &dyn std::fmt::Display| {
        DatasetError::shard(
            path,
            format!("line {n} is not JSON ({e}); export takes a finished output"),
        )
    };

    // Pass 1: the schema of every line.
    let mut joiner = options
        .join_input
        .as_deref()
        .map(Joiner::open)
        .transpose()?;
    let mut lines = OutputLines::new(&files);
    let mut line = Vec::new();
    let mut count = 0u64;
    // Inference pulls values; a failure to read one stops it, and is kept
    // here to be reported as itself.
    let mut failed = None;
    let values = std::iter::from_fn(|| {
        let read = lines.next_into(&mut line).and_then(|at| {
            let Some((path, n)) = at else { return Ok(None) };
            count += 1;
            let value: Value = serde_json::from_slice(&line).map_err(|e| not_json(path, n, &e))?;
            let value = records_as_text(value);
            Ok(Some(match &mut joiner {
                Some(j) => j.join(count, value)?,
                None => value,
            }))
        });
        match read {
            Ok(value) => value.map(Ok),
            Err(e) => {
                let message = e.to_string();
                failed = Some(e);
                Some(Err(ArrowError::JsonError(message)))
            }
        }
    });
    let inferred = arrow_json::reader::infer_json_schema_from_iterator(values);
    if let Some(e) = failed {
        return Err(e);
    }
    // Inference stops at the line whose value does not fit: the last read.
    let inferred = inferred.map_err(|e| incompatible(e, count))?;
    if count == 0 {
        return Err(DatasetError::shard(output, "has no lines to export"));
    }
    let schema = Arc::new(inferred);

    // Pass 2: the rows.
    let tmp = with_suffix(parquet, ".tmp");
    // A failed export leaves no partial file behind.
    let written = (|| -> Result<u64, DatasetError> {
        let file = File::create(&tmp).with_path("create the Parquet file", &tmp)?;
        let properties = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(options.row_group_rows.max(1)))
            .build();
        let arrow = |e: ArrowError| DatasetError::shard(parquet, e);
        let parquet_error = |e: parquet::errors::ParquetError| DatasetError::shard(parquet, e);
        let mut writer =
            ArrowWriter::try_new(file, schema.clone(), Some(properties)).map_err(parquet_error)?;
        let batch_rows = options.row_group_rows.clamp(1, 8192);
        let mut decoder = arrow_json::ReaderBuilder::new(schema.clone())
            .with_batch_size(batch_rows)
            .with_coerce_primitive(true)
            .build_decoder()
            .map_err(arrow)?;
        let mut joiner = options
            .join_input
            .as_deref()
            .map(Joiner::open)
            .transpose()?;
        let mut rows = 0u64;
        let mut buffer = Vec::new();
        let mut lines = OutputLines::new(&files);
        while let Some((path, n)) = lines.next_into(&mut line)? {
            rows += 1;
            let record = memchr::memmem::find(&line, crate::record::ERROR_KEY.as_bytes()).is_some();
            let bytes: &[u8] = match &mut joiner {
                Some(j) => {
                    let value: Value =
                        serde_json::from_slice(&line).map_err(|e| not_json(path, n, &e))?;
                    buffer.clear();
                    serde_json::to_writer(&mut buffer, &j.join(rows, records_as_text(value))?)
                        .expect("a JSON value serializes into a Vec");
                    &buffer
                }
                None if record => {
                    let value: Value =
                        serde_json::from_slice(&line).map_err(|e| not_json(path, n, &e))?;
                    buffer.clear();
                    serde_json::to_writer(&mut buffer, &records_as_text(value))
                        .expect("a JSON value serializes into a Vec");
                    &buffer
                }
                None => &line,
            };
            let at_line = |e: ArrowError| DatasetError::shard(path, format!("line {n}: {e}"));
            let mut rest = bytes;
            loop {
                let used = decoder.decode(rest).map_err(at_line)?;
                rest = &rest[used..];
                if decoder.len() >= batch_rows || !rest.is_empty() {
                    if let Some(batch) = decoder.flush().map_err(at_line)? {
                        writer.write(&batch).map_err(parquet_error)?;
                    }
                }
                if rest.is_empty() {
                    break;
                }
            }
        }
        if let Some(batch) = decoder.flush().map_err(arrow)? {
            writer.write(&batch).map_err(parquet_error)?;
        }
        let file = writer.into_inner().map_err(parquet_error)?;
        file.sync_all().with_path("sync the Parquet file", &tmp)?;
        Ok(rows)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    let rows = written?;
    rename_durably(&tmp, parquet)?;
    Ok(Exported {
        rows,
        columns: schema.fields().len(),
    })
}

fn incompatible(e: ArrowError, line: u64) -> DatasetError {
    DatasetError::Shard {
        path: PathBuf::from("the output"),
        message: format!(
            "has no single column type for a field at its line {line} (counting from 1; {e}); a field must be an object (or a list) in every line that has it, or a scalar in every one"
        ),
    }
}

/// A failure record's `task_data` (the input line as the task got it:
/// an object, or a string when it was not JSON) as its JSON text, so that
/// the records of one output share a column type: the column is a string
/// of JSON in every row (`json.loads` gives the value back).
fn records_as_text(mut value: Value) -> Value {
    if let Some(Value::Object(record)) = value.get_mut(crate::record::ERROR_KEY) {
        if let Some(data) = record.get_mut("task_data") {
            if !data.is_null() {
                *data = Value::String(data.to_string());
            }
        }
    }
    value
}
