//! Staging: a dataset read once, streaming, into the plain JSONL file the job
//! reads (`<output>.input.jsonl`), with a record of what it was made from
//! (`<output>.input.json`) so that a resume reuses it and a changed shard is
//! noticed.
//!
//! Why a staged copy rather than reading the shards in place: the job reads
//! its input by byte offset (a reissue reads its line back by range; a resume
//! starts at the checkpoint's offset), and a compressed or columnar file has
//! no such offsets. The copy costs the disk of the dataset as JSON and one
//! pass at start; in exchange a resume, even of a 10M-line `.jsonl.zst`,
//! decompresses nothing, and memory stays one record batch or one buffer at a
//! time whatever the dataset's size.

use std::fs::File;
use std::io::{self, BufRead, BufWriter, Read, Write};
#[cfg(feature = "parquet")]
use std::io::{BufReader, Seek};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

#[cfg(feature = "parquet")]
use super::rows;
use super::{resolve, DatasetError, Format, Shard};
use crate::error::IoContext;
use crate::job::files::{check_distinct, rename_durably, write_atomically, JobLock};
use crate::job::JobFiles;

/// What the job reads, and what it was made from.
#[derive(Debug)]
pub struct Prepared {
    /// The plain JSONL file the job reads: the input itself, or the staged copy.
    pub path: PathBuf,
    /// The shards the staged copy was made from; `None` when the input is
    /// read as it is.
    pub sources: Option<Arc<Sources>>,
}

/// The shards a staged input was made from, to notice one changing.
#[derive(Debug)]
pub struct Sources {
    shards: Vec<StagedShard>,
    /// Where the next round-robin check starts.
    next: AtomicUsize,
    /// Per shard, a modification time found since with the staged content
    /// (a plain `cp` of the same file): not hashed again at every check.
    same_content_at: std::sync::Mutex<Vec<Option<u128>>>,
}

/// One shard of a staged input, as the staging record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedShard {
    /// Where it is.
    pub path: PathBuf,
    /// How it is stored.
    pub format: Format,
    /// Its size when staged.
    pub bytes: u64,
    /// Its modification time when staged, in nanoseconds since the epoch.
    pub modified_ns: u128,
    /// The CRC-32 of its bytes when staged: what tells a shard copied back
    /// in place (a new modification time, the same content) from one
    /// changed. Absent in the records of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32: Option<u32>,
    /// The input lines it gave.
    pub lines: u64,
}

/// `<output>.input.json`: written once the staged copy is complete.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    /// The input as given.
    dataset: String,
    split: Option<String>,
    shards: Vec<StagedShard>,
    /// Lines of the staged copy.
    lines: u64,
    /// Its size.
    bytes: u64,
}

/// Shards checked per call of [`Sources::check`]: a job of thousands of
/// shards does not stat them all every second.
const CHECK_PER_CALL: usize = 64;

impl Sources {
    /// The shards, in the job's order.
    pub fn shards(&self) -> &[StagedShard] {
        &self.shards
    }
}

impl crate::input::Watched for Sources {
    /// Fails, naming the shard, when one changed since it was staged; checks
    /// up to 64 shards a call, round robin.
    fn check(&self) -> io::Result<()> {
        let n = self.shards.len();
        let start = self
            .next
            .fetch_add(CHECK_PER_CALL.min(n), Ordering::Relaxed);
        for k in 0..CHECK_PER_CALL.min(n) {
            let i = (start + k) % n;
            let shard = &self.shards[i];
            let known = self
                .same_content_at
                .lock()
                .unwrap_or_else(|e| e.into_inner())[i];
            let Some(what) = changed(shard, known) else {
                // Unchanged; a new time with the staged bytes is kept, so
                // that the file is not hashed again at the next check.
                if let Ok((_, at)) = identity(&shard.path) {
                    if at != shard.modified_ns {
                        self.same_content_at
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())[i] = Some(at);
                    }
                }
                continue;
            };
            return Err(io::Error::other(format!(
                "the input shard {} {what} while the job runs; its lines were staged when the job started, but the output would no longer be the dataset's. Restore the shard and restart to resume, or start the job over",
                shard.path.display()
            )));
        }
        Ok(())
    }
}

/// What changed of `shard` since it was staged, if anything. A new
/// modification time with the same bytes (a plain `cp` back in place) is no
/// change; `known` is such a time found before, not hashed again.
fn changed(shard: &StagedShard, known: Option<u128>) -> Option<String> {
    let now = match identity(&shard.path) {
        Ok(now) => now,
        Err(e) => return Some(format!("is gone ({e})")),
    };
    if now.0 != shard.bytes {
        return Some(format!(
            "changed size from {} to {} bytes",
            shard.bytes, now.0
        ));
    }
    if now.1 == shard.modified_ns || Some(now.1) == known {
        return None;
    }
    match (shard.crc32, file_crc32(&shard.path)) {
        (Some(then), Ok(crc)) if then == crc => None,
        (Some(_), Ok(_)) => Some("was modified (same size, other content)".into()),
        (None, _) => Some("was modified (its modification time changed)".into()),
        (_, Err(e)) => Some(format!("could not be read ({e})")),
    }
}

/// The CRC-32 of the file at `path`.
fn file_crc32(path: &Path) -> io::Result<u32> {
    let mut file = File::open(path)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0_u8; 1 << 20];
    loop {
        match file.read(&mut buf)? {
            0 => return Ok(hasher.finalize()),
            n => hasher.update(&buf[..n]),
        }
    }
}

/// Whether two shard paths name the same file however they are spelled
/// (`ds`, `./ds`, an absolute path, a link).
fn same_path(a: &Path, b: &Path) -> bool {
    a == b
        || matches!(
            (a.canonicalize(), b.canonicalize()),
            (Ok(a), Ok(b)) if a == b
        )
}

fn identity(path: &Path) -> io::Result<(u64, u128)> {
    let meta = std::fs::metadata(path)?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok((meta.len(), modified))
}

/// The file the job at `files` reads for `input` (of `split`): the input
/// itself when it is one plain JSONL file, else its staged copy, made now
/// unless an earlier run made it from the same shards. A job with output to
/// resume refuses shards that changed since (naming the first); a fresh
/// start stages them again.
pub fn prepare(
    input: &Path,
    split: Option<&str>,
    files: &JobFiles,
) -> Result<Prepared, DatasetError> {
    let shards = resolve(input, split)?;
    if let Some(plain) = plain_jsonl(&shards) {
        return Ok(Prepared {
            path: plain.to_owned(),
            sources: None,
        });
    }
    if input.is_dir() {
        let output_dir = files
            .output()
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let (input_dir, output_dir) = (input.canonicalize()?, output_dir.canonicalize()?);
        if output_dir.starts_with(&input_dir) {
            return Err(DatasetError::OutputInsideInput {
                input: input.to_owned(),
                output: files.output().to_owned(),
            });
        }
    }
    for shard in &shards {
        check_distinct(&[
            ("--input", &shard.path),
            ("--output", files.output()),
            ("--checkpoint", files.checkpoint()),
        ])?;
    }
    let staged = files.staged_input();
    let record_path = files.staged_record();
    // The lock creates the output: a staging that fails removes it again
    // when this call made it (and nothing was written to it).
    let output_existed = files.output().exists();
    let lock = JobLock::acquire(&staged, files.output(), files.checkpoint())?;
    let resuming = files.checkpoint().exists();
    if let Some(record) = read_record(&record_path) {
        match compare(&record, &shards) {
            None if staged_intact(&staged, &record) => {
                tracing::info!(
                    input = %input.display(),
                    staged = %staged.display(),
                    shards = record.shards.len(),
                    lines = record.lines,
                    "the input was staged already, from the same shards"
                );
                lock.release();
                return Ok(Prepared {
                    path: staged,
                    sources: Some(Arc::new(Sources::new(record.shards))),
                });
            }
            Some((path, what)) if resuming => {
                return Err(DatasetError::Changed { path, what });
            }
            Some((path, what)) => tracing::info!(
                shard = %path.display(),
                "the input was staged from other shards ({what}); a fresh start stages it again"
            ),
            None => tracing::info!(
                staged = %staged.display(),
                "the staged input is missing or cut short; staging it again"
            ),
        }
    }
    crate::job::files::remove_if_present(&record_path)?;
    let record = match stage(input, split, &shards, &staged) {
        Ok(record) => record,
        Err(e) => {
            // Nothing of the failed start is left behind: not the partial
            // copy (removed by `stage`), the lock file, or an empty output.
            if !output_existed && std::fs::metadata(files.output()).is_ok_and(|m| m.len() == 0) {
                let _ = std::fs::remove_file(files.output());
            }
            lock.release();
            return Err(e);
        }
    };
    let json = serde_json::to_vec_pretty(&record).expect("the staging record serializes");
    write_atomically(&record_path, &json, "the staging record")?;
    lock.release();
    Ok(Prepared {
        path: staged,
        sources: Some(Arc::new(Sources::new(record.shards))),
    })
}

/// The lines of `input` as the job at `files` reads them, without staging
/// anything: a plain JSONL file's lines, or the lines its staged copy was made
/// with (refused when the shards changed since, or it was never staged).
pub fn input_lines(
    input: &Path,
    split: Option<&str>,
    files: &JobFiles,
) -> Result<u64, DatasetError> {
    let shards = resolve(input, split)?;
    if let Some(plain) = plain_jsonl(&shards) {
        return crate::input::count_lines(plain).map_err(|e| DatasetError::shard(plain, e));
    }
    let record_path = files.staged_record();
    let record = read_record(&record_path).ok_or_else(|| {
        DatasetError::shard(
            &record_path,
            format!(
                "is missing: {} is a dataset, and this job never staged it (run the job first)",
                input.display()
            ),
        )
    })?;
    match compare(&record, &shards) {
        None => Ok(record.lines),
        Some((path, what)) => Err(DatasetError::Changed { path, what }),
    }
}

impl Sources {
    fn new(shards: Vec<StagedShard>) -> Sources {
        Sources {
            same_content_at: std::sync::Mutex::new(vec![None; shards.len()]),
            shards,
            next: AtomicUsize::new(0),
        }
    }
}

/// The one plain JSONL file a job reads as it is, when the input is that.
fn plain_jsonl(shards: &[Shard]) -> Option<&Path> {
    match shards {
        [only] if only.format == Format::Jsonl => Some(&only.path),
        _ => None,
    }
}

fn read_record(path: &Path) -> Option<Record> {
    let text = std::fs::read(path).ok()?;
    serde_json::from_slice(&text).ok()
}

fn staged_intact(staged: &Path, record: &Record) -> bool {
    std::fs::metadata(staged).is_ok_and(|m| m.len() == record.bytes)
}

/// The first difference between the shards a record was made from and the
/// shards there are now.
fn compare(record: &Record, shards: &[Shard]) -> Option<(PathBuf, String)> {
    for (i, shard) in shards.iter().enumerate() {
        let Some(old) = record.shards.get(i) else {
            return Some((shard.path.clone(), "is new".into()));
        };
        if !same_path(&old.path, &shard.path) {
            return Some((
                shard.path.clone(),
                format!("is in the place of {}", old.path.display()),
            ));
        }
        if let Some(what) = changed(old, None) {
            return Some((old.path.clone(), what));
        }
    }
    record
        .shards
        .get(shards.len())
        .map(|gone| (gone.path.clone(), "is gone".into()))
}

/// Writes every shard's lines into `staged` (through a temporary file,
/// renamed into place when complete).
fn stage(
    input: &Path,
    split: Option<&str>,
    shards: &[Shard],
    staged: &Path,
) -> Result<Record, DatasetError> {
    let tmp = crate::job::files::with_suffix(staged, ".tmp");
    let staged_or_not = stage_into(input, split, shards, staged, &tmp);
    if staged_or_not.is_err() {
        // A partial copy (on a full disk, as large as what fit) is of no use.
        let _ = std::fs::remove_file(&tmp);
    }
    staged_or_not
}

/// [`stage`]'s work, through `tmp`.
fn stage_into(
    input: &Path,
    split: Option<&str>,
    shards: &[Shard],
    staged: &Path,
    tmp: &Path,
) -> Result<Record, DatasetError> {
    let started = Instant::now();
    let tmp = tmp.to_owned();
    let file = File::create(&tmp).with_path("create the staged input", &tmp)?;
    let mut out = Counter {
        inner: BufWriter::with_capacity(1 << 20, file),
        path: tmp.clone(),
        bytes: 0,
        breaks: 0,
        last: b'\n',
    };
    let mut staged_shards = Vec::with_capacity(shards.len());
    for (i, shard) in shards.iter().enumerate() {
        let (bytes, modified_ns) =
            identity(&shard.path).map_err(|e| DatasetError::shard(&shard.path, e))?;
        let before = out.breaks;
        copy_shard(shard, &mut out)?;
        if out.last != b'\n' {
            // A shard whose last line has no newline: its line ends here, not
            // in the next shard's first.
            out.write_all(b"\n")?;
        }
        let lines = out.breaks - before;
        tracing::info!(
            shard = %shard.path.display(),
            n = i + 1,
            of = shards.len(),
            lines,
            elapsed_s = started.elapsed().as_secs(),
            "staged"
        );
        // What was read must be what is there: a shard written to while it
        // was read would be staged torn.
        if identity(&shard.path).ok() != Some((bytes, modified_ns)) {
            return Err(DatasetError::Changed {
                path: shard.path.clone(),
                what: "changed while it was read".into(),
            });
        }
        let crc32 = file_crc32(&shard.path).map_err(|e| DatasetError::shard(&shard.path, e))?;
        staged_shards.push(StagedShard {
            path: shard.path.clone(),
            format: shard.format,
            bytes,
            modified_ns,
            crc32: Some(crc32),
            lines,
        });
    }
    let (lines, bytes) = (out.breaks, out.bytes);
    let file = out
        .inner
        .into_inner()
        .map_err(|e| e.into_error())
        .with_path("write the staged input", &tmp)?;
    file.sync_all().with_path("sync the staged input", &tmp)?;
    drop(file);
    rename_durably(&tmp, staged)?;
    tracing::info!(
        input = %input.display(),
        staged = %staged.display(),
        shards = shards.len(),
        lines,
        bytes,
        seconds = started.elapsed().as_secs_f64(),
        "the input is staged as JSONL"
    );
    Ok(Record {
        dataset: input.display().to_string(),
        split: split.map(String::from),
        shards: staged_shards,
        lines,
        bytes,
    })
}

/// A writer that counts bytes and line breaks and keeps the last byte; its
/// errors name the file.
struct Counter<W> {
    inner: W,
    path: PathBuf,
    bytes: u64,
    breaks: u64,
    last: u8,
}

impl<W: Write> Write for Counter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self
            .inner
            .write(buf)
            .with_path("write the staged input", &self.path)?;
        let written = &buf[..n];
        self.bytes += n as u64;
        self.breaks += memchr::memchr_iter(b'\n', written).count() as u64;
        if let Some(&last) = written.last() {
            self.last = last;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner
            .flush()
            .with_path("write the staged input", &self.path)
    }
}

fn copy_shard<W: Write>(shard: &Shard, out: &mut Counter<W>) -> Result<(), DatasetError> {
    let path = &shard.path;
    let fail = |e: &dyn std::fmt::Display| DatasetError::shard(path, e);
    match shard.format {
        Format::Jsonl | Format::JsonlGz | Format::JsonlZst => {
            copy(super::open_jsonl(path, shard.format)?, out, path)
        }
        #[cfg(not(feature = "parquet"))]
        Format::Parquet | Format::Arrow => Err(fail(
            &"is Parquet or Arrow, which this build does not read (it was built without the `parquet` feature, as a task crate is by default): serve the dataset with `dispatcher serve` (its workers need no feature), or build with `dispatcher = { ..., features = [\"parquet\"] }`",
        )),
        #[cfg(feature = "parquet")]
        Format::Parquet => {
            let file = File::open(path).map_err(|e| fail(&e))?;
            let builder =
                parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
                    .map_err(|e| fail(&format!("not a Parquet file that can be read: {e}")))?;
            check_schema(path, builder.schema())?;
            let reader = builder
                .with_batch_size(1024)
                .build()
                .map_err(|e| fail(&e))?;
            write_batches(reader.map(|b| b.map_err(|e| e.to_string())), out, path)
        }
        #[cfg(feature = "parquet")]
        Format::Arrow => {
            let mut file = File::open(path).map_err(|e| fail(&e))?;
            let mut magic = [0u8; 6];
            let is_file_format = file.read_exact(&mut magic).is_ok() && &magic == b"ARROW1";
            file.rewind().map_err(|e| fail(&e))?;
            if is_file_format {
                let reader = arrow_ipc::reader::FileReader::try_new(BufReader::new(file), None)
                    .map_err(|e| fail(&format!("not an Arrow file that can be read: {e}")))?;
                check_schema(path, &reader.schema())?;
                write_batches(reader.map(|b| b.map_err(|e| e.to_string())), out, path)
            } else {
                let reader =
                    arrow_ipc::reader::StreamReader::try_new(BufReader::new(file), None)
                        .map_err(|e| fail(&format!("not an Arrow stream that can be read: {e}")))?;
                check_schema(path, &reader.schema())?;
                write_batches(reader.map(|b| b.map_err(|e| e.to_string())), out, path)
            }
        }
    }
}

fn copy<R: BufRead, W: Write>(
    mut reader: R,
    out: &mut Counter<W>,
    path: &Path,
) -> Result<(), DatasetError> {
    loop {
        let chunk = reader
            .fill_buf()
            .map_err(|e| DatasetError::shard(path, format!("cannot be read to its end: {e}")))?;
        if chunk.is_empty() {
            return Ok(());
        }
        let n = chunk.len();
        out.write_all(chunk)?;
        reader.consume(n);
    }
}

#[cfg(feature = "parquet")]
fn check_schema(path: &Path, schema: &arrow_schema::Schema) -> Result<(), DatasetError> {
    rows::distinct_names("columns", schema.fields().iter().map(|f| f.name().as_str()))
        .map_err(|e| DatasetError::shard(path, e))?;
    for field in schema.fields() {
        rows::check_type(field.data_type())
            .map_err(|e| DatasetError::shard(path, format!("column {:?} {e}", field.name())))?;
    }
    Ok(())
}

#[cfg(feature = "parquet")]
fn write_batches<W: Write>(
    batches: impl Iterator<Item = Result<arrow_array::RecordBatch, String>>,
    out: &mut Counter<W>,
    path: &Path,
) -> Result<(), DatasetError> {
    let mut buffer = Vec::with_capacity(1 << 20);
    let mut row = 0u64;
    for batch in batches {
        let batch = batch.map_err(|e| {
            DatasetError::shard(path, format!("cannot be read past row {row}: {e}"))
        })?;
        buffer.clear();
        rows::write_lines(&batch, &mut buffer).map_err(|e| {
            let last = row + batch.num_rows() as u64;
            DatasetError::shard(path, format!("rows {}..={last}: {e}", row + 1))
        })?;
        out.write_all(&buffer)?;
        row += batch.num_rows() as u64;
    }
    Ok(())
}
