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
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender};
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
        let (batches, received) = sync_channel::<RecordBatch>(2);
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
        if rows != lines {
            return Err(DatasetError::shard(
                output,
                format!("had {lines} lines when export read it first and {rows} when it wrote them: it changed during the export; export it again once it is finished"),
            ));
        }
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
    let new_decoder = || {
        arrow_json::ReaderBuilder::new(schema.clone())
            .with_batch_size(batch_rows)
            .with_coerce_primitive(true)
            .build_decoder()
    };
    let mut joiner = options
        .join_input
        .as_deref()
        .map(Joiner::open)
        .transpose()?;
    if joiner.is_none() && columns.reads_lines_as_they_are() && !constants {
        return decode_files(files, new_decoder, batches);
    }
    let mut decoder = new_decoder().map_err(arrow)?;
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

/// [`decode_rows`] where every line goes to the decoder as it is (no
/// join, no value rewritten, no Python constant): the files are read in
/// chunks of whole lines (about a MiB) by this thread, decoded by
/// [`decoders`] decoders in turn (chunk *k* by decoder *k* mod their
/// number, each on a thread of its own), and their batches sent on in the
/// chunks' order. The first pass read every line already, so an error here
/// means a file changed since; the caller checks the rows against that
/// pass's.
fn decode_files<F>(
    files: &[OutputFile],
    new_decoder: F,
    batches: &SyncSender<RecordBatch>,
) -> Result<u64, DatasetError>
where
    F: Fn() -> Result<arrow_json::reader::Decoder, ArrowError> + Sync,
{
    let changed = |e: ArrowError| {
        DatasetError::shard(
            &files[0].path,
            format!("cannot be decoded ({e}): did it change since export began? Export it again"),
        )
    };
    let decoders = decoders();
    std::thread::scope(|scope| {
        let (mut chunks, mut decoded) = (Vec::new(), Vec::new());
        for _ in 0..decoders {
            let (chunk_to, chunk_from) = sync_channel::<Vec<u8>>(1);
            let (decoded_to, decoded_from) = sync_channel(1);
            let new_decoder = &new_decoder;
            scope.spawn(move || {
                let mut decoder = match new_decoder() {
                    Ok(decoder) => decoder,
                    Err(e) => return drop(decoded_to.send(Err(e))),
                };
                for chunk in chunk_from {
                    if decoded_to.send(decode_chunk(&mut decoder, &chunk)).is_err() {
                        return;
                    }
                }
            });
            chunks.push(chunk_to);
            decoded.push(decoded_from);
        }
        // The chunks' batches, in the chunks' order; the rows.
        let forwarder = scope.spawn(move || -> Result<u64, ArrowError> {
            let mut rows = 0;
            for turn in (0..decoders).cycle() {
                let Ok(chunk) = decoded[turn].recv() else {
                    // Every chunk decoded: the reader is done.
                    return Ok(rows);
                };
                let (chunk, n) = chunk?;
                rows += n;
                for batch in chunk {
                    if batches.send(batch).is_err() {
                        return Ok(rows);
                    }
                }
            }
            unreachable!("the turns cycle")
        });
        let read = read_chunks(files, |k, chunk| chunks[k % decoders].send(chunk).is_ok());
        drop(chunks);
        let forwarded = forwarder
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        // A decoder's error ended the reading early: it is the one to tell.
        let rows = forwarded.map_err(changed)?;
        read?;
        Ok(rows)
    })
}

/// Decoders of [`decode_files`]: half the cores (the encoder and the
/// reader need the rest), up to four. One on this project's two-core VM,
/// where two were measured no faster (BENCHMARKS.md); two in this crate's
/// tests, which then check the chunks' order.
fn decoders() -> usize {
    if cfg!(test) {
        return 2;
    }
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    (cores / 2).clamp(1, 4)
}

/// Bytes of a chunk of [`read_chunks`], before it is cut after its last
/// whole line (a few lines in this crate's tests).
const CHUNK_BYTES: usize = if cfg!(test) { 64 } else { 1 << 20 };

/// Reads `files` in chunks of whole lines (a last line without its break
/// gets one), handing chunk *k* to `send(k, chunk)`; stops early when
/// `send` says no one takes them any more.
fn read_chunks(
    files: &[OutputFile],
    mut send: impl FnMut(usize, Vec<u8>) -> bool,
) -> Result<(), DatasetError> {
    let mut k = 0;
    for file in files {
        let mut reader = file.open()?;
        let mut chunk: Vec<u8> = Vec::with_capacity(CHUNK_BYTES);
        loop {
            let start = chunk.len();
            let n = (&mut reader)
                .take(CHUNK_BYTES as u64)
                .read_to_end(&mut chunk)
                .with_path("read the output", &file.path)?;
            if n == 0 {
                if !chunk.is_empty() {
                    chunk.push(b'\n');
                    if !send(k, std::mem::take(&mut chunk)) {
                        return Ok(());
                    }
                    k += 1;
                }
                break;
            }
            // A line longer than the chunk: read on until it ends.
            let Some(last) = memchr::memrchr(b'\n', &chunk[start..]) else {
                continue;
            };
            let rest = chunk.split_off(start + last + 1);
            if !send(k, std::mem::replace(&mut chunk, rest)) {
                return Ok(());
            }
            k += 1;
        }
    }
    Ok(())
}

/// A chunk of whole lines decoded into batches (a batch at most the
/// decoder's batch size), and its rows.
fn decode_chunk(
    decoder: &mut arrow_json::reader::Decoder,
    chunk: &[u8],
) -> Result<(Vec<RecordBatch>, u64), ArrowError> {
    let (mut batches, mut rows) = (Vec::new(), 0);
    let mut rest = chunk;
    loop {
        let used = decoder.decode(rest)?;
        rest = &rest[used..];
        rows += decoder.len() as u64;
        batches.extend(decoder.flush()?);
        if rest.is_empty() {
            return Ok((batches, rows));
        }
    }
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

#[cfg(test)]
mod tests {
    use arrow_array::{Array, Int64Array, StringArray};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    use super::*;

    /// The `id` and `text` columns of a Parquet file, in order.
    fn read_back(path: &Path) -> Vec<(i64, String)> {
        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap())
            .unwrap()
            .build()
            .unwrap();
        let mut rows = Vec::new();
        for batch in reader {
            let batch = batch.unwrap();
            let ids = batch.column_by_name("id").unwrap();
            let ids = ids.as_any().downcast_ref::<Int64Array>().unwrap();
            let texts = batch.column_by_name("text").unwrap();
            let texts = texts.as_any().downcast_ref::<StringArray>().unwrap();
            rows.extend((0..batch.num_rows()).map(|i| (ids.value(i), texts.value(i).to_owned())));
        }
        rows
    }

    #[test]
    fn rows_come_out_in_input_order_through_chunks_and_decoders() {
        // In this crate's tests chunks are a few lines and two decoders
        // take them in turn; the first pass reads the file in two halves.
        let dir = tempfile::tempdir().unwrap();
        let lines: Vec<(i64, String)> = (0..500)
            .map(|i| (i, format!("line {i} {}", "é".repeat(i as usize % 7))))
            .collect();
        let text: String = lines
            .iter()
            .map(|(id, text)| format!("{{\"id\": {id}, \"text\": \"{text}\"}}\n"))
            .collect();
        for (name, text) in [("ended", &text[..]), ("unended", text.trim_end())] {
            let output = dir.path().join(format!("{name}.jsonl"));
            std::fs::write(&output, text).unwrap();
            let parquet = dir.path().join(format!("{name}.parquet"));
            let exported = export(&output, &parquet, &ExportOptions::default()).unwrap();
            assert_eq!(exported.rows, 500, "{name}");
            assert_eq!(read_back(&parquet), lines, "{name}: every row, in order");
        }
    }
}
