//! The journal: the engine responses of lines not written yet, so that a line
//! issued again replays what an earlier issue already paid for.
//!
//! Entries live in memory by line and in `<outfile>.journal`, an append-only
//! JSONL file made durable with each checkpoint. A line's entries are dropped
//! once it is written; the file is rewritten with only the live entries when
//! it holds much more than them (and at every open). `max_bytes` bounds the
//! entries held: past it, new entries are not recorded (those lines are then
//! redone in full if reissued, and the job still completes exactly).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use crate::error::IoContext;
use crate::protocol::{JournalEntry, JournalRecord};

/// The journal's path for `outfile`.
pub fn journal_path(outfile: &Path) -> PathBuf {
    crate::checkpoint::with_suffix(outfile, ".journal")
}

/// Entries and their bytes, per line.
#[derive(Debug, Default)]
struct Line {
    entries: Vec<JournalEntry>,
    bytes: u64,
}

/// What the journal holds and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Entries held.
    pub entries: u64,
    /// Their bytes (as written to the file).
    pub bytes: u64,
    /// Entries refused because the journal was full.
    pub dropped: u64,
}

/// The journal of one job.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    lines: BTreeMap<u64, Line>,
    stats: JournalStats,
    max_bytes: u64,
    /// Bytes in the file, live or not.
    file_bytes: u64,
}

impl Journal {
    /// Opens the journal of a job whose first `written` lines are written:
    /// reads back the entries of the lines after them (up to a torn or
    /// damaged line, where the file is cut), and rewrites the file with just those.
    pub fn open(path: PathBuf, max_bytes: u64, written: u64) -> io::Result<Journal> {
        let mut lines: BTreeMap<u64, Line> = BTreeMap::new();
        let mut stats = JournalStats::default();
        match File::open(&path) {
            Ok(file) => {
                for line in BufReader::new(file).split(b'\n') {
                    let line = line.with_path("read the journal", &path)?;
                    let Ok(record) = serde_json::from_slice::<JournalRecord>(&line) else {
                        tracing::warn!(
                            journal = %path.display(),
                            "the journal ends in a line that is not an entry (torn by a crash?); the entries before it are kept"
                        );
                        break;
                    };
                    if record.work_id < written {
                        continue;
                    }
                    let len = line.len() as u64 + 1;
                    let at = lines.entry(record.work_id).or_default();
                    if stats.bytes + len <= max_bytes
                        && !at.entries.iter().any(|e| e.seq == record.entry.seq)
                    {
                        at.entries.push(record.entry);
                        at.bytes += len;
                        stats.bytes += len;
                        stats.entries += 1;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_path("open the journal", &path),
        }
        lines.retain(|_, l| !l.entries.is_empty());
        let file = rewrite(&path, &lines)?;
        Ok(Journal {
            path,
            file,
            file_bytes: stats.bytes,
            lines,
            stats,
            max_bytes,
        })
    }

    /// Records `records` of lines not written yet (the first `written` are),
    /// except repeats and what does not fit. Returns how many were recorded.
    pub fn record(&mut self, records: Vec<JournalRecord>, written: u64) -> io::Result<u64> {
        let mut buf = Vec::new();
        let mut recorded = 0;
        for record in records {
            if record.work_id < written {
                continue;
            }
            let at = self.lines.entry(record.work_id).or_default();
            if at.entries.iter().any(|e| e.seq == record.entry.seq) {
                continue;
            }
            let start = buf.len();
            serde_json::to_writer(&mut buf, &record).map_err(io::Error::other)?;
            buf.push(b'\n');
            let len = (buf.len() - start) as u64;
            if self.stats.bytes + len > self.max_bytes {
                buf.truncate(start);
                self.stats.dropped += 1;
                continue;
            }
            at.entries.push(record.entry);
            at.bytes += len;
            self.stats.bytes += len;
            self.stats.entries += 1;
            recorded += 1;
        }
        self.lines.retain(|_, l| !l.entries.is_empty());
        if !buf.is_empty() {
            self.file
                .write_all(&buf)
                .with_path("append to the journal", &self.path)?;
            self.file_bytes += buf.len() as u64;
        }
        Ok(recorded)
    }

    /// The entries of line `id`, in request order.
    pub fn entries(&self, id: u64) -> Option<Vec<JournalEntry>> {
        let line = self.lines.get(&id)?;
        let mut entries = line.entries.clone();
        entries.sort_by_key(|e| e.seq);
        Some(entries)
    }

    /// Drops the entries of the lines written (the first `written`).
    pub fn drop_written(&mut self, written: u64) {
        let live = self.lines.split_off(&written);
        for line in std::mem::replace(&mut self.lines, live).into_values() {
            self.stats.entries -= line.entries.len() as u64;
            self.stats.bytes -= line.bytes;
        }
    }

    /// Before a checkpoint: empties the file when no entry is live, rewrites
    /// it when it holds much more than the live entries (64 MiB more, and
    /// twice them). Returns a handle on
    /// the file, whose `sync_data` makes what was appended durable.
    pub fn for_checkpoint(&mut self) -> io::Result<File> {
        if self.stats.entries == 0 && self.file_bytes > 0 {
            // Every line with entries is written: nothing to keep.
            self.file
                .set_len(0)
                .with_path("empty the journal", &self.path)?;
            self.file_bytes = 0;
        } else if self.file_bytes > 2 * self.stats.bytes + (64 << 20) {
            self.file = rewrite(&self.path, &self.lines)?;
            self.file_bytes = self.stats.bytes;
        }
        self.file
            .try_clone()
            .with_path("open the journal", &self.path)
    }

    /// The journal's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What it holds.
    pub fn stats(&self) -> JournalStats {
        self.stats
    }
}

/// Writes `lines` to a new file beside `path`, makes it durable and puts it in
/// place; returns it open for appending.
fn rewrite(path: &Path, lines: &BTreeMap<u64, Line>) -> io::Result<File> {
    let tmp = crate::checkpoint::with_suffix(path, ".tmp");
    let mut out = io::BufWriter::new(File::create(&tmp).with_path("create the journal", &tmp)?);
    for (&work_id, line) in lines {
        for entry in &line.entries {
            let record = JournalRecord {
                work_id,
                entry: entry.clone(),
            };
            serde_json::to_writer(&mut out, &record).map_err(io::Error::other)?;
            out.write_all(b"\n").with_path("write the journal", &tmp)?;
        }
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_data().with_path("sync the journal", &tmp)?;
    std::fs::rename(&tmp, path).with_path("put the journal in place", path)?;
    OpenOptions::new()
        .append(true)
        .open(path)
        .with_path("open the journal", path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(work_id: u64, seq: u32) -> JournalRecord {
        JournalRecord {
            work_id,
            entry: JournalEntry {
                seq,
                fingerprint: format!("{seq:016x}"),
                response: serde_json::json!({"text": format!("answer {work_id}.{seq}")}),
            },
        }
    }

    #[test]
    fn entries_survive_a_reopen_are_dropped_once_written_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl.journal");
        let mut j = Journal::open(path.clone(), 1 << 20, 0).unwrap();
        let n = j
            .record(
                vec![record(3, 0), record(3, 1), record(5, 0), record(3, 1)],
                0,
            )
            .unwrap();
        assert_eq!(n, 3, "the repeat is not recorded twice");
        // A line already written gets none.
        assert_eq!(j.record(vec![record(1, 0)], 2).unwrap(), 0);
        j.for_checkpoint().unwrap().sync_data().unwrap();
        let seqs = |j: &Journal, id| -> Vec<u32> {
            j.entries(id)
                .unwrap_or_default()
                .iter()
                .map(|e| e.seq)
                .collect()
        };
        assert_eq!(seqs(&j, 3), vec![0, 1]);
        // Reopened with line 3 written: only line 5's entry is read back.
        drop(j);
        let j = Journal::open(path.clone(), 1 << 20, 4).unwrap();
        assert_eq!(seqs(&j, 3), Vec::<u32>::new());
        assert_eq!(seqs(&j, 5), vec![0]);
        assert_eq!(j.stats().entries, 1);
        // A torn last line (a crash mid-append) is cut off, the rest kept.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"work_id\": 9, \"se")
            .unwrap();
        drop(j);
        let mut j = Journal::open(path.clone(), 1 << 20, 4).unwrap();
        assert_eq!(seqs(&j, 5), vec![0]);
        j.drop_written(6);
        assert_eq!(j.stats(), JournalStats::default());
        // Full: entries past the bound are dropped and counted.
        let mut small = Journal::open(dir.path().join("small.journal"), 150, 0).unwrap();
        let n = small
            .record((0..10).map(|i| record(i, 0)).collect(), 0)
            .unwrap();
        assert!((1..10).contains(&n), "{n}");
        assert_eq!(small.stats().dropped, 10 - n);
        assert!(small.stats().bytes <= 150);
    }
}
