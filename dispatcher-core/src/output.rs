//! The output JSONL file: appended in input order, scanned and repaired on resume.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::IoContext;

/// Appends output lines and tracks the file's logical length.
#[derive(Debug)]
pub struct OutputWriter {
    /// The output's path, for error messages.
    path: PathBuf,
    /// Buffered writer positioned at `len`; flushed at the end of every request.
    writer: BufWriter<File>,
    /// Bytes written so far, buffered ones included.
    len: u64,
}

/// What [`OutputWriter::recover`] found past the checkpointed length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Whole lines (ending in `\n`, each one JSON value) found past the
    /// checkpointed length.
    pub extra_lines: u64,
    /// Bytes of a torn last line that were cut off.
    pub torn_bytes: u64,
    /// A line past the checkpoint that is not one JSON value, where the
    /// output was cut off.
    pub invalid: Option<InvalidTail>,
}

/// Where recovery found a line that is not one JSON value: after a crash, a
/// file system can leave pages it never wrote as zeros or old bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidTail {
    /// What is wrong with the line.
    pub reason: String,
    /// Bytes cut off from its start to the end of the file.
    pub bytes_cut: u64,
}

impl OutputWriter {
    /// Opens the output to append after the checkpointed length `from`
    /// (creating the file when `from` is 0) and recovers the lines written
    /// after it: counts the whole lines past `from` that are one JSON value
    /// each, cuts the file off at the first that is not (or at a torn last
    /// line, one without its newline), and returns what it found with a
    /// writer positioned after the last good line.
    pub fn recover(path: &Path, from: u64) -> io::Result<(Recovered, OutputWriter)> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(from == 0)
            .truncate(false)
            .open(path)
            .with_path("open the output file", path)?;
        file.seek(SeekFrom::Start(from))
            .with_path("seek in the output file", path)?;
        let mut reader = BufReader::with_capacity(1 << 20, &file);
        let mut good_end = from;
        let mut extra_lines = 0;
        let mut invalid_reason = None;
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .with_path("read the output file", path)?;
            let Some((b'\n', content)) = line.split_last() else {
                break; // the end, or a torn last line
            };
            if let Err(reason) = check_output_line(content) {
                invalid_reason = Some(reason);
                break;
            }
            extra_lines += 1;
            good_end += n as u64;
        }
        drop(reader);
        let len = file
            .metadata()
            .with_path("stat the output file", path)?
            .len();
        let cut = len - good_end;
        if cut > 0 {
            file.set_len(good_end)
                .with_path("cut the output file after its last whole line", path)?;
            file.sync_all().with_path("sync the output file", path)?;
        }
        file.seek(SeekFrom::Start(good_end))
            .with_path("seek in the output file", path)?;
        let (torn_bytes, invalid) = match invalid_reason {
            Some(reason) => (
                0,
                Some(InvalidTail {
                    reason,
                    bytes_cut: cut,
                }),
            ),
            None => (cut, None),
        };
        Ok((
            Recovered {
                extra_lines,
                torn_bytes,
                invalid,
            },
            OutputWriter {
                path: path.to_owned(),
                writer: BufWriter::with_capacity(256 * 1024, file),
                len: good_end,
            },
        ))
    }

    /// The output's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends one line; `line` must not contain a newline.
    pub fn write_line(&mut self, line: &str) -> io::Result<()> {
        debug_assert!(!line.contains('\n'));
        self.writer
            .write_all(line.as_bytes())
            .and_then(|()| self.writer.write_all(b"\n"))
            .with_path("write the output file", &self.path)?;
        self.len += line.len() as u64 + 1;
        Ok(())
    }

    /// Hands buffered lines to the operating system.
    pub fn flush(&mut self) -> io::Result<()> {
        self.writer
            .flush()
            .with_path("write the output file", &self.path)
    }

    /// Flushes and returns a second handle on the file, to make what was
    /// written durable without holding this writer (an fsync covers the file,
    /// whichever handle it is called on).
    pub fn flush_for_sync(&mut self) -> io::Result<File> {
        self.flush()?;
        self.writer
            .get_ref()
            .try_clone()
            .with_path("open the output file", &self.path)
    }
}

/// Why an output line is not one JSON value, if it is not.
fn check_output_line(line: &[u8]) -> Result<(), String> {
    if let Some(at) = memchr::memchr(0, line) {
        return Err(format!("a NUL byte at column {}", at + 1));
    }
    let text = std::str::from_utf8(line).map_err(|e| format!("not UTF-8 ({e})"))?;
    crate::protocol::check_json_value(text).map_err(|e| format!("not one JSON value ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recover_counts_lines_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.jsonl");
        std::fs::write(&p, b"1\n2\n3\n{\"tor").unwrap();
        let (rec, mut w) = OutputWriter::recover(&p, 2).unwrap();
        assert_eq!(
            rec,
            Recovered {
                extra_lines: 2,
                torn_bytes: 5,
                invalid: None,
            }
        );
        assert_eq!(w.len(), 6);
        assert_eq!(std::fs::read(&p).unwrap(), b"1\n2\n3\n");
        w.write_line("4").unwrap();
        w.flush().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"1\n2\n3\n4\n");
        assert_eq!(w.len(), 8);
    }

    #[test]
    fn recover_counts_across_read_chunks_with_a_torn_tail_longer_than_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.jsonl");
        let mut text = Vec::new();
        for i in 0..3000usize {
            text.push(b'"');
            text.extend(std::iter::repeat_n(b'7', i % 1500));
            text.extend(b"\"\n");
        }
        let whole = text.len() as u64;
        text.extend(std::iter::repeat_n(b'x', 3 << 20));
        std::fs::write(&p, &text).unwrap();
        let (rec, w) = OutputWriter::recover(&p, 0).unwrap();
        assert_eq!(rec.extra_lines, 3000);
        assert_eq!(rec.torn_bytes, 3 << 20);
        assert_eq!(w.len(), whole);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), whole);
    }

    #[test]
    fn recover_of_a_missing_fresh_output_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none");
        let (rec, w) = OutputWriter::recover(&path, 0).unwrap();
        assert_eq!((rec.extra_lines, rec.torn_bytes, w.len()), (0, 0, 0));
        assert_eq!(std::fs::read(&path).unwrap(), b"", "created");
    }
}
