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
mod learn;
mod lines;
mod raw;

use std::borrow::Cow;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::{ArrowError, DataType};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use self::columns::Columns;
use self::lines::{line_text, output_files, read_line, Joiner, OutputFile, OutputLines};
use super::DatasetError;
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

/// Exports the output at `output` to the Parquet file `parquet` (written
/// through a temporary file, renamed into place when complete).
pub fn export(
    output: &Path,
    parquet: &Path,
    options: &ExportOptions,
) -> Result<Exported, DatasetError> {
    let files = output_files(output)?;

    // Pass 1: the columns, from every line.
    let learn::Learnt {
        mut columns,
        lines,
        constants,
    } = learn::learn(&files, options.join_input.as_deref())?;
    if lines == 0 {
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
        let quoted = line_text(&line, constants).map_err(|e| at_line(path, n, &e))?;
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
