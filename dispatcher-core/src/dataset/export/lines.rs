//! The lines of an output, as export reads them: its files (one JSONL
//! file, or the shards of an `--outdir` folder, checked against their
//! manifest), a part of a plain file, each line as text with Python's
//! constants quoted, and the job's input read alongside for
//! `--join-input`.

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::raw;
use crate::dataset::outdir::Manifest;
use crate::dataset::{DatasetError, Format};
use crate::error::IoContext;

/// A file of an output, and its lines where a manifest states them.
#[derive(Debug, Clone)]
pub(super) struct OutputFile {
    pub(super) path: PathBuf,
    lines: Option<u64>,
    /// The bytes of it to read, when only a part (see [`halves`]).
    part: Option<Range<u64>>,
}

impl OutputFile {
    /// Its content (its part), decompressed where it is compressed.
    pub(super) fn open(&self) -> Result<Decoded, DatasetError> {
        let path = &self.path;
        if let Some(part) = &self.part {
            let mut plain = File::open(path).with_path("open the output", path)?;
            plain
                .seek(SeekFrom::Start(part.start))
                .with_path("read the output", path)?;
            let part: Box<dyn Read> = Box::new(plain.take(part.end - part.start));
            return Ok(BufReader::with_capacity(1 << 20, part));
        }
        let format = Format::of(path, true)
            .map_err(|e| DatasetError::shard(path, e))?
            .unwrap_or(Format::Jsonl);
        crate::dataset::open_jsonl(path, format)
    }
}

/// The files of an output, in order: the file itself, or the shards of an
/// `--outdir` folder (all of them complete).
pub(super) fn output_files(output: &Path) -> Result<Vec<OutputFile>, DatasetError> {
    if !output.is_dir() {
        if !output.is_file() {
            return Err(DatasetError::NotFound {
                input: output.display().to_string(),
            });
        }
        return Ok(vec![OutputFile {
            path: output.to_owned(),
            lines: None,
            part: None,
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
            part: None,
        })
        .collect())
}

/// Every line of `files` in order, with its file and line number; a file
/// with another number of lines than stated is an error.
pub(super) struct OutputLines<'a> {
    files: std::slice::Iter<'a, OutputFile>,
    /// The file being read, its reader and the lines read from it.
    current: Option<(&'a OutputFile, Decoded, u64)>,
}

/// A file's content, decompressed where it is compressed.
pub(super) type Decoded = BufReader<Box<dyn Read>>;

impl<'a> OutputLines<'a> {
    pub(super) fn new(files: &'a [OutputFile]) -> OutputLines<'a> {
        OutputLines {
            files: files.iter(),
            current: None,
        }
    }

    /// The next line into `line` (without its terminator): its file and
    /// number, or `None` at the end.
    pub(super) fn next_into(
        &mut self,
        line: &mut Vec<u8>,
    ) -> Result<Option<(&'a Path, u64)>, DatasetError> {
        loop {
            if self.current.is_none() {
                let Some(file) = self.files.next() else {
                    return Ok(None);
                };
                self.current = Some((file, file.open()?, 0));
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
pub(super) struct Joiner {
    path: PathBuf,
    lines: std::io::Lines<BufReader<File>>,
    /// The input line being joined.
    line: String,
}

impl Joiner {
    pub(super) fn open(path: &Path) -> Result<Joiner, DatasetError> {
        let file = File::open(path).with_path("open the input", path)?;
        Ok(Joiner {
            path: path.to_owned(),
            lines: BufReader::with_capacity(1 << 20, file).lines(),
            line: String::new(),
        })
    }

    /// Reads the input line of the output's `n`th line; its text with
    /// Python's constants quoted (see [`raw`]).
    pub(super) fn next(&mut self, n: u64) -> Result<Cow<'_, str>, DatasetError> {
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

/// An output line as text, with Python's constants quoted (see [`raw`])
/// when `constants` says to look for them; borrowed from `line` when it
/// has none. The error says why not, to follow the line's number.
pub(super) fn line_text(line: &[u8], constants: bool) -> Result<Cow<'_, str>, String> {
    let text = std::str::from_utf8(line).map_err(|e| format!("is not UTF-8 ({e})"))?;
    Ok(if constants {
        raw::quote_constants(text)
    } else {
        Cow::Borrowed(text)
    })
}

/// One output line read as its fields, joined with its input line's when
/// there is one (an input line that is no object carries nothing to join).
pub(super) fn read_line<'a>(
    line: &'a str,
    input: Option<&'a str>,
) -> Result<raw::Fields<'a>, String> {
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

/// Files smaller than this are read in one part (in this crate's tests,
/// files of a few lines are read in two).
const SPLIT_FROM_BYTES: u64 = if cfg!(test) { 64 } else { 16 << 20 };

/// `files` as two parts to read side by side, each in order: the halves of
/// one plain JSONL file, cut after a line break; `None` for anything else
/// (shards, compressed files, small ones), read in one part.
pub(super) fn halves(files: &[OutputFile]) -> Option<[Vec<OutputFile>; 2]> {
    let [file] = files else {
        return None;
    };
    let plain = matches!(Format::of(&file.path, true), Ok(None | Some(Format::Jsonl)));
    let size = std::fs::metadata(&file.path).ok()?.len();
    if !plain || size < SPLIT_FROM_BYTES {
        return None;
    }
    // The first line break at or after the middle: the second half starts
    // just past it.
    let mut reader = File::open(&file.path).ok()?;
    reader.seek(SeekFrom::Start(size / 2)).ok()?;
    let mut rest = BufReader::new(reader);
    let mut skipped = Vec::new();
    rest.read_until(b'\n', &mut skipped).ok()?;
    let cut = size / 2 + skipped.len() as u64;
    if skipped.last() != Some(&b'\n') || cut >= size {
        return None;
    }
    let part = |range: Range<u64>| {
        vec![OutputFile {
            part: Some(range),
            ..file.clone()
        }]
    };
    Some([part(0..cut), part(cut..size)])
}
