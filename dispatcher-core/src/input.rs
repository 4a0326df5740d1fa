//! Lazy, offset-addressed reading of the input JSONL file.
//!
//! Lines are read sequentially as work is handed out, so memory does not grow with
//! the file's size. An item that must be read again (a reissue, a tombstone) is read
//! back by its byte range with a positioned read, without disturbing the sequential
//! reader.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::IoContext;

/// Where one input line sits in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineSpan {
    /// Byte offset of the line's first byte.
    pub offset: u64,
    /// Length of the line's content, without its line terminator.
    pub len: u32,
    /// Byte offset just past the line's terminator: where the next line starts.
    pub end: u64,
}

/// One line read from the input.
#[derive(Debug)]
pub struct Line {
    /// Where it sits.
    pub span: LineSpan,
    /// Its content without terminator, or the raw bytes when not valid UTF-8.
    pub content: Result<String, Vec<u8>>,
}

/// The sequential reader over the input plus positioned reads for reissues.
#[derive(Debug)]
pub struct InputReader {
    /// The input's path, for error messages.
    path: PathBuf,
    /// Sequential reader; its position is always `next_offset`.
    reader: BufReader<File>,
    /// A second handle for positioned reads of earlier lines.
    random: File,
    /// Byte offset of the next line the sequential reader returns.
    next_offset: u64,
    /// What the file was when opened, to notice it changing under us.
    identity: FileIdentity,
    /// The dataset shards the file was staged from, watched with it.
    sources: Option<std::sync::Arc<dyn Watched>>,
}

/// Files an input was made from (a dataset's shards, staged into it),
/// watched with it: a change to one is a change to the input.
pub trait Watched: Send + Sync + std::fmt::Debug {
    /// Fails, naming the file and what changed, when one did.
    fn check(&self) -> io::Result<()>;
}

/// What identifies a file's content without reading it: which file it is
/// (device and inode), its size and its modification time.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileIdentity {
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl FileIdentity {
    fn of(meta: &std::fs::Metadata) -> FileIdentity {
        use std::os::unix::fs::MetadataExt;
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            modified: meta.modified().ok(),
        }
    }
}

/// Longest input line accepted: a work item's span stores its length as `u32`.
pub const MAX_LINE_BYTES: u64 = u32::MAX as u64;

impl InputReader {
    /// Opens `path` and positions the sequential reader at `offset`.
    pub fn open(path: &Path, offset: u64) -> io::Result<Self> {
        let file = File::open(path).with_path("open the input file", path)?;
        let random = file.try_clone().with_path("open the input file", path)?;
        let identity = FileIdentity::of(&file.metadata().with_path("stat the input file", path)?);
        let mut reader = BufReader::with_capacity(256 * 1024, file);
        reader
            .seek(SeekFrom::Start(offset))
            .with_path("seek in the input file", path)?;
        Ok(InputReader {
            path: path.to_owned(),
            reader,
            random,
            next_offset: offset,
            identity,
            sources: None,
        })
    }

    /// Watches the dataset shards the input was staged from: a change to
    /// one fails [`check_unchanged`](Self::check_unchanged) too.
    pub fn watch(&mut self, sources: Option<std::sync::Arc<dyn Watched>>) {
        self.sources = sources;
    }

    /// Fails, naming the file and what changed, when the input is no longer
    /// the file that was opened: replaced (another file at its path), or
    /// written to (its size or modification time changed). Lines read from a
    /// changed file could be other lines than the work ids say, so the job
    /// must stop before any is handed out or written.
    pub fn check_unchanged(&self) -> io::Result<()> {
        let changed = |what: String| {
            io::Error::other(format!(
                "the input {} {what} while the server was running; stopped so that no line is handed out under the wrong work id. Restore the original input and restart to resume (lines appended at its end are picked up then)",
                self.path.display()
            ))
        };
        let at_path =
            std::fs::metadata(&self.path).map_err(|e| changed(format!("is gone ({e})")))?;
        let now = FileIdentity::of(&at_path);
        if (now.dev, now.ino) != (self.identity.dev, self.identity.ino) {
            return Err(changed("was replaced by another file".into()));
        }
        if now.len != self.identity.len {
            return Err(changed(format!(
                "changed size from {} to {} bytes",
                self.identity.len, now.len
            )));
        }
        if now.modified != self.identity.modified {
            return Err(changed("was modified".into()));
        }
        match &self.sources {
            Some(sources) => sources.check(),
            None => Ok(()),
        }
    }

    /// The input's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Byte offset of the next line [`next_line`](Self::next_line) returns.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// The input file's current size.
    pub fn len(&self) -> io::Result<u64> {
        Ok(self
            .random
            .metadata()
            .with_path("stat the input file", &self.path)?
            .len())
    }

    /// The input file's size when it was opened.
    pub fn len_when_opened(&self) -> u64 {
        self.identity.len
    }

    /// Whether the input file is empty.
    pub fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Reads the next line, or `None` at the end of the file. The last line may
    /// lack its newline; a `\r\n` terminator counts as one.
    pub fn next_line(&mut self) -> io::Result<Option<Line>> {
        let available = self
            .reader
            .fill_buf()
            .with_path("read the input file", &self.path)?;
        if available.is_empty() {
            return Ok(None);
        }
        // Usually the whole line is in the reader's buffer: copy it out once.
        if let Some(i) = memchr::memchr(b'\n', available) {
            let line = make_line(&self.path, self.next_offset, &available[..=i])?;
            self.reader.consume(i + 1);
            self.next_offset = line.span.end;
            return Ok(Some(line));
        }
        // It runs past the buffer (or is the last line without a newline).
        // Read into a buffer of its own that becomes the line's content, so a
        // line of hundreds of megabytes is held once, not copied.
        let mut raw = Vec::new();
        self.reader
            .read_until(b'\n', &mut raw)
            .with_path("read the input file", &self.path)?;
        let line = make_owned_line(&self.path, self.next_offset, raw)?;
        self.next_offset = line.span.end;
        Ok(Some(line))
    }

    /// Whether the sequential reader is at the end of the file.
    pub fn at_eof(&mut self) -> io::Result<bool> {
        Ok(self
            .reader
            .fill_buf()
            .with_path("read the input file", &self.path)?
            .is_empty())
    }

    /// Skips `n` lines; returns how many were there to skip. A last line
    /// without its newline counts as a line, as in [`next_line`](Self::next_line).
    ///
    /// Counts line breaks in the reader's buffer without copying lines out: a
    /// resume after a crash skips every line written since the last checkpoint.
    pub fn skip_lines(&mut self, n: u64) -> io::Result<u64> {
        let mut done = 0;
        // Whether bytes were consumed since the last line break: a line
        // without its newline yet, which counts if the file ends there.
        let mut partial = false;
        while done < n {
            let available = self
                .reader
                .fill_buf()
                .with_path("read the input file", &self.path)?;
            if available.is_empty() {
                return Ok(done + u64::from(partial));
            }
            let mut consumed = available.len();
            for i in memchr::memchr_iter(b'\n', available) {
                done += 1;
                if done == n {
                    consumed = i + 1;
                    break;
                }
            }
            partial = available[consumed - 1] != b'\n';
            self.reader.consume(consumed);
            self.next_offset += consumed as u64;
        }
        Ok(done)
    }

    /// Reads back the content of an earlier line by its span, checking that
    /// it still ends where it ended (the input may have changed under us).
    pub fn read_span(&self, span: LineSpan) -> io::Result<String> {
        let terminated = (span.end - span.offset) as usize;
        let mut bytes = self.read_at(span.offset, terminated)?;
        let terminator = bytes.get(span.len as usize..).unwrap_or_default();
        let intact = bytes.len() == terminated && matches!(terminator, b"" | b"\n" | b"\r\n");
        bytes.truncate(span.len as usize);
        match String::from_utf8(bytes) {
            Ok(content) if intact => Ok(content),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: the line at byte offset {} changed since it was first read (the input file must not be modified while the server runs); restore it and restart to resume",
                    self.path.display(),
                    span.offset
                ),
            )),
        }
    }

    /// Reads `len` bytes at `offset` (fewer at the end of the file).
    pub fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        read_exact_at(&self.random, offset, len).with_path("read the input file", &self.path)
    }
}

/// Lines in the file at `path`: its line breaks, plus one for a last line
/// without its newline. Reads it once, in 1 MiB chunks.
pub fn count_lines(path: &Path) -> io::Result<u64> {
    count_lines_with(path, &mut |_| {})
}

/// [`count_lines`] and the file's CRC-32 (of every byte), in the one read.
pub fn count_lines_and_crc32(path: &Path) -> io::Result<(u64, u32)> {
    count_lines_and_crc32_after(path, &InputPrefix::default())
}

/// What one read of the first `len` bytes of the input found: its line
/// breaks and CRC-32. A resume's check of its checkpoint reads this prefix
/// anyway; the count of the whole input goes on from there instead of
/// reading it again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InputPrefix {
    /// Bytes read.
    pub len: u64,
    /// Line breaks in them.
    pub line_breaks: u64,
    /// CRC-32 of them.
    pub crc32: u32,
}

/// [`count_lines_and_crc32`] of a file whose first bytes were read already
/// (`prefix`): reads only the rest.
pub fn count_lines_and_crc32_after(path: &Path, prefix: &InputPrefix) -> io::Result<(u64, u32)> {
    let file = File::open(path).with_path("open the input file", path)?;
    let len = file
        .metadata()
        .with_path("stat the input file", path)?
        .len();
    let mut crc = crc32fast::Hasher::new_with_initial_len(prefix.crc32, prefix.len);
    let (breaks, ends_in_newline) =
        scan_line_breaks(&file, prefix.len, len, &mut |chunk| crc.update(chunk))
            .with_path("read the input file", path)?;
    // Past the prefix, nothing read: the prefix's own last byte says.
    let ends_in_newline = if len == prefix.len {
        prefix.len == 0 || read_exact_at(&file, len - 1, 1)?.first() == Some(&b'\n')
    } else {
        ends_in_newline
    };
    Ok((
        prefix.line_breaks + breaks + u64::from(!ends_in_newline),
        crc.finalize(),
    ))
}

fn count_lines_with(path: &Path, visit: &mut dyn FnMut(&[u8])) -> io::Result<u64> {
    let file = File::open(path).with_path("open the input file", path)?;
    let len = file
        .metadata()
        .with_path("stat the input file", path)?
        .len();
    let (breaks, ends_in_newline) =
        scan_line_breaks(&file, 0, len, visit).with_path("read the input file", path)?;
    Ok(breaks + u64::from(!ends_in_newline))
}

/// Line breaks in the first `len` bytes of `file`, and whether those bytes
/// end with one (or are none). Reads them once, in 1 MiB chunks; a file
/// shorter than `len` is an error.
pub(crate) fn count_line_breaks(file: &File, len: u64) -> io::Result<(u64, bool)> {
    scan_line_breaks(file, 0, len, &mut |_| {})
}

/// [`count_line_breaks`] that also takes the CRC-32 of those bytes.
pub(crate) fn scan_prefix(file: &File, len: u64) -> io::Result<(InputPrefix, bool)> {
    let mut crc = crc32fast::Hasher::new();
    let (line_breaks, ends_in_newline) = scan_line_breaks(file, 0, len, &mut |c| crc.update(c))?;
    let prefix = InputPrefix {
        len,
        line_breaks,
        crc32: crc.finalize(),
    };
    Ok((prefix, ends_in_newline))
}

/// [`count_line_breaks`] of bytes `from..len`, showing `visit` each chunk read.
fn scan_line_breaks(
    file: &File,
    from: u64,
    len: u64,
    visit: &mut dyn FnMut(&[u8]),
) -> io::Result<(u64, bool)> {
    let mut buf = vec![0u8; (1 << 20).min(len.saturating_sub(from) as usize)];
    let (mut at, mut breaks, mut last) = (from, 0u64, b'\n');
    while at < len {
        let want = buf.len().min((len - at) as usize);
        let n = match file.read_at(&mut buf[..want], at) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("it ends before byte {len}"),
                ))
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        breaks += memchr::memchr_iter(b'\n', &buf[..n]).count() as u64;
        visit(&buf[..n]);
        last = buf[n - 1];
        at += n as u64;
    }
    Ok((breaks, last == b'\n'))
}

/// Reads up to `len` bytes at `offset`, fewer only at the end of the file.
pub(crate) fn read_exact_at(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut out = vec![0; len];
    let mut filled = 0;
    while filled < len {
        match file.read_at(&mut out[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    out.truncate(filled);
    Ok(out)
}

/// The line at `offset` whose bytes, terminator included, are `raw`.
/// [`make_line`] that keeps `raw`'s allocation as the content.
fn make_owned_line(path: &Path, offset: u64, mut raw: Vec<u8>) -> io::Result<Line> {
    let raw_len = raw.len();
    let content_len = check_len(path, offset, content_len(&raw))?;
    raw.truncate(content_len);
    raw.shrink_to_fit();
    let content = String::from_utf8(raw).map_err(|e| e.into_bytes());
    Ok(Line {
        span: LineSpan {
            offset,
            len: content_len as u32,
            end: offset + raw_len as u64,
        },
        content,
    })
}

fn check_len(path: &Path, offset: u64, content_len: usize) -> io::Result<usize> {
    if content_len as u64 > MAX_LINE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: the line at byte offset {offset} is longer than {MAX_LINE_BYTES} bytes",
                path.display()
            ),
        ));
    }
    Ok(content_len)
}

fn make_line(path: &Path, offset: u64, raw: &[u8]) -> io::Result<Line> {
    let content_len = check_len(path, offset, content_len(raw))?;
    let bytes = &raw[..content_len];
    let content = match std::str::from_utf8(bytes) {
        Ok(s) => Ok(s.to_owned()),
        Err(_) => Err(bytes.to_vec()),
    };
    Ok(Line {
        span: LineSpan {
            offset,
            len: content_len as u32,
            end: offset + raw.len() as u64,
        },
        content,
    })
}

/// Length of a line's bytes (as far as its `\n`, or to the end of the file)
/// without its `\n` or `\r\n`.
fn content_len(line: &[u8]) -> usize {
    match line {
        [rest @ .., b'\r', b'\n'] => rest.len(),
        [rest @ .., b'\n'] => rest.len(),
        _ => line.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resume's count goes on from the checkpointed part and finds what a
    /// count of the whole file finds, wherever the part ends.
    #[test]
    fn a_count_after_a_prefix_equals_a_count_of_the_whole() {
        let dir = tempfile::tempdir().unwrap();
        for content in [&b"a\nbb\n\nccc"[..], b"a\nbb\n", b"", b"x"] {
            let path = dir.path().join("in");
            std::fs::write(&path, content).unwrap();
            let whole = count_lines_and_crc32(&path).unwrap();
            let file = File::open(&path).unwrap();
            for len in 0..=content.len() as u64 {
                let (prefix, _) = scan_prefix(&file, len).unwrap();
                assert_eq!(
                    count_lines_and_crc32_after(&path, &prefix).unwrap(),
                    whole,
                    "{content:?} after {len} bytes"
                );
            }
        }
    }
    use std::io::Write;

    fn input(bytes: &[u8]) -> (tempfile::NamedTempFile, InputReader) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        let r = InputReader::open(f.path(), 0).unwrap();
        (f, r)
    }

    #[test]
    fn reads_lines_with_offsets_and_a_last_line_without_newline() {
        let (_f, mut r) = input(b"a\r\n\nbc\n\xff\xfe\nlast");
        let mut got = Vec::new();
        while let Some(l) = r.next_line().unwrap() {
            got.push((l.span, l.content));
        }
        let span = |offset, len, end| LineSpan { offset, len, end };
        assert_eq!(
            got,
            vec![
                (span(0, 1, 3), Ok("a".to_string())),
                (span(3, 0, 4), Ok(String::new())),
                (span(4, 2, 7), Ok("bc".to_string())),
                (span(7, 2, 10), Err(vec![0xff, 0xfe])),
                (span(10, 4, 14), Ok("last".to_string())),
            ]
        );
        assert_eq!(r.read_span(span(4, 2, 7)).unwrap(), "bc");
        assert_eq!(r.next_offset(), 14);
    }

    #[test]
    fn lines_longer_than_the_read_buffer_and_across_its_edge_are_whole() {
        // 256 KiB buffer: a 300,000-byte line, then lines that straddle the
        // next buffer edges.
        let long = "x".repeat(300_000);
        let mut text = format!("a\n{long}\n");
        let short: Vec<String> = (0..40_000).map(|i| format!("{i:07}")).collect();
        text.push_str(&short.join("\n"));
        let (_f, mut r) = input(text.as_bytes());
        assert_eq!(r.next_line().unwrap().unwrap().content, Ok("a".into()));
        let l = r.next_line().unwrap().unwrap();
        assert_eq!(
            (l.content, l.span.offset, l.span.end),
            (Ok(long), 2, 300_003)
        );
        for (i, want) in short.iter().enumerate() {
            let l = r.next_line().unwrap().unwrap();
            assert_eq!(l.content.as_deref(), Ok(want.as_str()), "line {i}");
            assert_eq!(l.span.offset, 300_003 + 8 * i as u64);
        }
        assert!(r.next_line().unwrap().is_none());
        assert_eq!(r.next_offset(), text.len() as u64);
    }

    #[test]
    fn skip_lines_reports_how_many_existed() {
        let (_f, mut r) = input(b"1\n2\n3\n");
        assert_eq!(r.skip_lines(2).unwrap(), 2);
        assert_eq!(r.next_offset(), 4);
        assert_eq!(r.skip_lines(5).unwrap(), 1);
        assert_eq!(r.next_offset(), 6);
        assert_eq!(r.skip_lines(1).unwrap(), 0);
    }

    #[test]
    fn skip_lines_counts_a_last_line_without_newline_and_lines_longer_than_the_buffer() {
        let (_f, mut r) = input(b"a\nb");
        assert_eq!(r.skip_lines(3).unwrap(), 2);
        assert_eq!(r.next_offset(), 3);

        // Lines of every length around the 256 KiB read buffer, so that line
        // breaks fall at its start, middle and end and lines span several fills.
        let mut text = Vec::new();
        let mut starts = Vec::new();
        for i in 0..40usize {
            starts.push(text.len() as u64);
            let len = [0, 1, 7, 100_000, 262_143, 262_144, 300_000, 3][i % 8] + i;
            text.extend(std::iter::repeat_n(b'x', len));
            text.push(b'\n');
        }
        text.extend_from_slice(b"tail");
        for skip in [0u64, 1, 3, 4, 5, 17, 39, 40] {
            let (_f, mut r) = input(&text);
            assert_eq!(r.skip_lines(skip).unwrap(), skip);
            assert_eq!(
                r.next_offset(),
                starts
                    .get(skip as usize)
                    .copied()
                    .unwrap_or(text.len() as u64 - 4),
                "skip {skip}"
            );
            let next = r.next_line().unwrap().unwrap();
            if skip < 40 {
                assert_eq!(next.span.offset, starts[skip as usize], "skip {skip}");
            } else {
                assert_eq!(next.content.as_deref(), Ok("tail"));
            }
        }
        let (_f, mut r) = input(&text);
        assert_eq!(r.skip_lines(3).unwrap(), 3);
        assert_eq!(
            r.skip_lines(100).unwrap(),
            38,
            "37 more whole lines and the tail"
        );
        assert_eq!(r.next_offset(), text.len() as u64);
        assert!(r.next_line().unwrap().is_none());
    }

    #[test]
    fn open_names_the_missing_path() {
        let err = InputReader::open(Path::new("/nonexistent/in.jsonl"), 0).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/in.jsonl"), "{err}");
    }
}
