//! `dispatcher export`: a finished output (one JSONL file, or an `--outdir`
//! folder of shards) as one Parquet file, streaming: two passes over the
//! lines, one to learn the columns from every line (the book's "Datasets", "Export"
//! says which type a field gets), one to write row groups, so memory is one
//! row group (at most `--row-group-rows` rows, and about 256 MiB) whatever
//! the output's size.
//!
//! Every value is read as its text: numbers are exact whatever
//! their size, and `--join-input` joins the two lines' texts, never
//! reading a value into a float and writing it back.

mod columns;
mod raw;

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;

use arrow_array::RecordBatch;

use arrow_schema::{ArrowError, DataType};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use self::columns::Columns;
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
    /// A note for each field written in a form its values may not suggest
    /// (JSON text, digits as text), naming the field and why.
    pub notes: Vec<String>,
}

/// A file of an output, and its lines where a manifest states them.
#[derive(Debug, Clone)]
struct OutputFile {
    path: PathBuf,
    lines: Option<u64>,
}

/// The files of an output, in order: the file itself, or the shards of an
/// `--outdir` folder (all of them complete).
fn output_files(output: &Path) -> Result<Vec<OutputFile>, DatasetError> {
    if !output.is_dir() {
        if !output.is_file() {
            return Err(DatasetError::NotFound {
                input: output.display().to_string(),
            });
        }
        return Ok(vec![OutputFile {
            path: output.to_owned(),
            lines: None,
        }]);
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
        .map(|s| OutputFile {
            path: output.join(&s.name),
            lines: Some(s.lines),
        })
        .collect())
}

/// Every line of `files` in order, with its file and line number; a file
/// with another number of lines than stated is an error.
struct OutputLines<'a> {
    files: std::slice::Iter<'a, OutputFile>,
    /// The file being read, its reader and the lines read from it.
    current: Option<(&'a OutputFile, Decoded, u64)>,
}

/// A file's content, decompressed where it is compressed.
type Decoded = BufReader<Box<dyn Read>>;

impl<'a> OutputLines<'a> {
    fn new(files: &'a [OutputFile]) -> OutputLines<'a> {
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
                let Some(file) = self.files.next() else {
                    return Ok(None);
                };
                self.current = Some((file, OutputLines::open(&file.path)?, 0));
            }
            let (file, reader, n) = self.current.as_mut().expect("opened above");
            line.clear();
            if reader
                .read_until(b'\n', line)
                .with_path("read the output", &file.path)?
                == 0
            {
                if let Some(lines) = file.lines.filter(|lines| lines != n) {
                    return Err(DatasetError::shard(
                        &file.path,
                        format!("has {n} lines where the folder's manifest.json says {lines}: the shard changed after its job wrote it (cut short by a copy?); run the job again to write it anew"),
                    ));
                }
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
            return Ok(Some((&file.path, *n)));
        }
    }
}

/// Reads the job's input alongside the output, for `--join-input`.
struct Joiner {
    path: PathBuf,
    lines: std::io::Lines<BufReader<File>>,
    /// The input line being joined.
    line: String,
}

impl Joiner {
    fn open(path: &Path) -> Result<Joiner, DatasetError> {
        let file = File::open(path).with_path("open the input", path)?;
        Ok(Joiner {
            path: path.to_owned(),
            lines: BufReader::with_capacity(1 << 20, file).lines(),
            line: String::new(),
        })
    }

    /// Reads the input line of the output's `n`th line; its text with
    /// Python's constants quoted (see [`raw`]).
    fn next(&mut self, n: u64) -> Result<Cow<'_, str>, DatasetError> {
        self.line = self
            .lines
            .next()
            .transpose()
            .with_path("read the input", &self.path)?
            .ok_or_else(|| {
                DatasetError::shard(&self.path, format!("has fewer lines than the output (none for its line {n}); is it the job's input?"))
            })?;
        Ok(raw::quote_constants(&self.line))
    }
}

/// Output line `n` of `path` as text, with Python's constants quoted (see
/// [`raw`]) when `constants` says to look for them; borrowed from `line`
/// when it has none.
fn line_text<'a>(
    path: &Path,
    n: u64,
    line: &'a [u8],
    constants: bool,
) -> Result<Cow<'a, str>, DatasetError> {
    let text = std::str::from_utf8(line)
        .map_err(|e| DatasetError::shard(path, format!("line {n} is not UTF-8 ({e})")))?;
    Ok(if constants {
        raw::quote_constants(text)
    } else {
        Cow::Borrowed(text)
    })
}

/// One output line read as its fields, joined with its input line's when
/// there is one (an input line that is no object carries nothing to join).
fn read_line<'a>(line: &'a str, input: Option<&'a str>) -> Result<raw::Fields<'a>, String> {
    let output = raw::object(line).map_err(|e| not_an_object(&e))?;
    Ok(match input.map(raw::object) {
        Some(Ok(input)) => raw::joined(input, output),
        _ => output,
    })
}

fn not_an_object(e: &serde_json::Error) -> String {
    if e.is_data() {
        "is not a JSON object; export takes a finished output, whose every line is one".into()
    } else {
        format!("is not JSON ({e}); export takes a finished output")
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
    let at_line = |path: &Path, n: u64, e: &dyn std::fmt::Display| {
        DatasetError::shard(path, format!("line {n} {e}"))
    };

    // Pass 1: the columns, from every line.
    let mut columns = Columns::default();
    let mut joiner = options
        .join_input
        .as_deref()
        .map(Joiner::open)
        .transpose()?;
    let mut lines = OutputLines::new(&files);
    let mut line = Vec::new();
    let mut count = 0u64;
    // Whether any line has Python's constants: when none has, pass 2 does
    // not look for them again.
    let mut constants = false;
    while let Some((path, n)) = lines.next_into(&mut line)? {
        count += 1;
        let quoted = line_text(path, n, &line, true)?;
        constants |= matches!(quoted, Cow::Owned(_));
        let input = joiner.as_mut().map(|j| j.next(count)).transpose()?;
        let fields = read_line(&quoted, input.as_deref()).map_err(|e| at_line(path, n, &e))?;
        columns.observe(&fields).map_err(|e| at_line(path, n, &e))?;
    }
    if count == 0 {
        return Err(DatasetError::shard(output, "has no lines to export"));
    }
    let (schema, notes) = columns.schema();
    let schema = Arc::new(schema);

    // Pass 2: the rows.
    let tmp = with_suffix(parquet, ".tmp");
    // A failed export leaves no partial file behind.
    let written = std::thread::scope(|scope| -> Result<u64, DatasetError> {
        let file = File::create(&tmp).with_path("create the Parquet file", &tmp)?;
        let properties = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(options.row_group_rows.max(1)))
            .build();
        let parquet_error = |e: parquet::errors::ParquetError| DatasetError::shard(parquet, e);
        let mut writer =
            ArrowWriter::try_new(file, schema.clone(), Some(properties)).map_err(parquet_error)?;
        // Encoding and compressing batches (half the pass's work) runs on
        // a thread of its own, beside the decoding of the next ones.
        let (batches, received) = std::sync::mpsc::sync_channel::<RecordBatch>(2);
        let encoder = scope.spawn(move || {
            for batch in received {
                writer.write(&batch)?;
                // A row group is held in memory until written: ended
                // early when its rows are large.
                if writer.in_progress_size() >= ROW_GROUP_BYTES {
                    writer.flush()?;
                }
            }
            writer.into_inner()
        });
        let decoded = decode_rows(
            &files, &columns, constants, &schema, options, parquet, &batches,
        );
        drop(batches);
        let encoded = encoder
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        // A batch the encoder refused ended the decoding: its error first.
        let file = encoded.map_err(parquet_error)?;
        let rows = decoded?;
        file.sync_all().with_path("sync the Parquet file", &tmp)?;
        Ok(rows)
    });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    let rows = written?;
    rename_durably(&tmp, parquet)?;
    Ok(Exported {
        rows,
        columns: schema.fields().len(),
        notes,
    })
}

/// Pass 2's reading half: every line of `files` decoded into record
/// batches of `schema`, sent to `batches`; the rows read. Stops early,
/// without an error, when the encoder is gone (its error is the one to
/// tell).
fn decode_rows(
    files: &[OutputFile],
    columns: &Columns,
    constants: bool,
    schema: &Arc<arrow_schema::Schema>,
    options: &ExportOptions,
    parquet: &Path,
    batches: &SyncSender<RecordBatch>,
) -> Result<u64, DatasetError> {
    let at_line = |path: &Path, n: u64, e: &dyn std::fmt::Display| {
        DatasetError::shard(path, format!("line {n} {e}"))
    };
    let arrow = |e: ArrowError| DatasetError::shard(parquet, e);
    // A batch holds every column of its rows: fewer rows where there
    // are many columns.
    let leaves = leaf_columns(schema).max(1);
    let batch_rows = options
        .row_group_rows
        .clamp(1, 8192)
        .min((1 << 22) / leaves)
        .max(1);
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
    let (mut rows, mut pending) = (0u64, 0usize);
    let (mut line, mut buffer) = (Vec::new(), Vec::new());
    let mut lines = OutputLines::new(files);
    while let Some((path, n)) = lines.next_into(&mut line)? {
        rows += 1;
        let decode_error = |e: ArrowError| at_line(path, n, &format!("cannot be decoded: {e}"));
        let quoted = line_text(path, n, &line, constants)?;
        let bytes: &[u8] = if joiner.is_none()
            && columns.reads_lines_as_they_are()
            && matches!(quoted, Cow::Borrowed(_))
        {
            &line
        } else {
            let input = joiner.as_mut().map(|j| j.next(rows)).transpose()?;
            let fields = read_line(&quoted, input.as_deref()).map_err(|e| at_line(path, n, &e))?;
            buffer.clear();
            columns.write_line(&fields, &mut buffer);
            &buffer
        };
        pending += bytes.len();
        let mut rest = bytes;
        loop {
            let used = decoder.decode(rest).map_err(decode_error)?;
            rest = &rest[used..];
            if decoder.len() >= batch_rows || !rest.is_empty() || pending >= BATCH_BYTES {
                if let Some(batch) = decoder.flush().map_err(decode_error)? {
                    if batches.send(batch).is_err() {
                        return Ok(rows);
                    }
                }
                pending = 0;
            }
            if rest.is_empty() {
                break;
            }
        }
    }
    if let Some(batch) = decoder.flush().map_err(arrow)? {
        // An encoder gone has its own error to tell.
        let _ = batches.send(batch);
    }
    Ok(rows)
}

/// JSON text decoded before a batch is flushed, whatever its rows.
const BATCH_BYTES: usize = 64 << 20;
/// Encoded size at which a row group is written before its row count.
const ROW_GROUP_BYTES: usize = 256 << 20;

/// The leaf columns of a schema (a struct's fields each count).
fn leaf_columns(schema: &arrow_schema::Schema) -> usize {
    fn leaves(t: &DataType) -> usize {
        match t {
            DataType::Struct(fields) => fields.iter().map(|f| leaves(f.data_type())).sum(),
            DataType::List(item) => leaves(item.data_type()),
            _ => 1,
        }
    }
    schema.fields().iter().map(|f| leaves(f.data_type())).sum()
}
