//! The journal: the engine responses of lines not written yet, so that a line
//! issued again replays what an earlier issue already paid for.
//!
//! Entries live in memory by line and in `<outfile>.journal`, an append-only
//! JSONL file made durable with each checkpoint. Its first line names the job
//! it belongs to (`{"journal_of_job": ID}`, the checkpoint's `job_id`): a
//! journal of another job is never replayed. A line's entries are dropped
//! once it is written, and when its task asks for another attempt (a
//! `{"forget": ID}` line records that), so a retry asks the engine again.
//!
//! `max_bytes` (`--max-journal-mib`) bounds the file: entries are held up to
//! half of it, and the file is rewritten with only the live entries before an
//! append would take it past the bound, so a rewrite comes at most once per
//! half of the bound appended. Entries past that are not recorded (their lines
//! are redone in full if reissued, and the job still completes exactly).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::IoContext;
use crate::protocol::{JournalEntry, JournalRecord};

/// Entries and their bytes, per line: each response kept as the JSON text
/// it came in (read into values, a response takes several times the memory
/// of its text, and the bound is on the text), read into a value only when
/// its line is issued again.
#[derive(Debug, Default)]
struct Line {
    entries: Vec<JournalRecord>,
    bytes: u64,
}

/// A line of the journal file that is not an entry.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Mark {
    /// The first line: the job the journal belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    journal_of_job: Option<String>,
    /// The entries before this line of this work id are void.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    forget: Option<u64>,
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
    /// Bytes of the file, live entries or not.
    pub file_bytes: u64,
}

/// The journal of one job.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    job_id: String,
    lines: BTreeMap<u64, Line>,
    stats: JournalStats,
    /// The bound on the file; entries are held up to half of it.
    max_bytes: u64,
}

impl Journal {
    /// Opens the journal of job `job_id`, whose first `written` lines are
    /// written: reads back the entries of the lines after them (up to a torn
    /// or damaged line, where the file is cut), unless the file belongs to
    /// another job, and rewrites the file with just those.
    pub fn open(path: PathBuf, max_bytes: u64, written: u64, job_id: &str) -> io::Result<Journal> {
        let existing = match File::open(&path) {
            Ok(file) => Some(file),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_path("open the journal", &path),
        };
        // Created (or emptied) first, so the journal always has a file.
        let tmp = crate::job::files::with_suffix(&path, ".tmp");
        let mut journal = Journal {
            file: File::create(&tmp).with_path("create the journal", &tmp)?,
            path,
            job_id: job_id.to_string(),
            lines: BTreeMap::new(),
            stats: JournalStats::default(),
            max_bytes,
        };
        if let Some(file) = existing {
            journal.read_back(file, written)?;
        }
        journal.file = journal.rewrite()?;
        Ok(journal)
    }

    fn read_back(&mut self, file: File, written: u64) -> io::Result<()> {
        let path = self.path.clone();
        for (i, line) in BufReader::new(file).split(b'\n').enumerate() {
            let line = line.with_path("read the journal", &path)?;
            if let Ok(record) = serde_json::from_slice::<JournalRecord>(&line) {
                // A journal without a header predates job ids: it is read
                // only by a job whose checkpoint predates them too.
                if i == 0 && !self.job_id.is_empty() {
                    self.ignore_foreign(&path, "names no job");
                    return Ok(());
                }
                if record.work_id >= written {
                    self.admit(record, line.len() as u64 + 1);
                }
                continue;
            }
            match serde_json::from_slice::<Mark>(&line) {
                Ok(Mark {
                    journal_of_job: Some(job),
                    ..
                }) if i == 0 => {
                    if job != self.job_id {
                        self.ignore_foreign(&path, &format!("belongs to job {job}"));
                        return Ok(());
                    }
                }
                Ok(Mark {
                    forget: Some(id), ..
                }) => self.forget(id),
                _ => {
                    tracing::warn!(
                        journal = %path.display(),
                        "the journal ends in a line that is not an entry (torn by a crash?); the entries before it are kept"
                    );
                    break;
                }
            }
        }
        Ok(())
    }

    fn ignore_foreign(&mut self, path: &Path, why: &str) {
        tracing::warn!(
            journal = %path.display(),
            job = %self.job_id,
            "the journal {why}, not this job: none of it is replayed"
        );
        self.lines.clear();
        self.stats = JournalStats::default();
    }

    /// Holds `record` unless it repeats one or the entries are full.
    fn admit(&mut self, record: JournalRecord, len: u64) -> bool {
        let at = self.lines.entry(record.work_id).or_default();
        if at.entries.iter().any(|e| e.seq == record.seq) {
            return false;
        }
        if self.stats.bytes + len > self.max_bytes / 2 {
            if at.entries.is_empty() {
                self.lines.remove(&record.work_id);
            }
            self.stats.dropped += 1;
            return false;
        }
        at.entries.push(record);
        at.entries.sort_by_key(|e| e.seq);
        at.bytes += len;
        self.stats.bytes += len;
        self.stats.entries += 1;
        true
    }

    /// Records `records` of lines not written yet (the first `written` are),
    /// except repeats and what does not fit. Returns how many were recorded.
    pub fn record(&mut self, records: Vec<JournalRecord>, written: u64) -> io::Result<u64> {
        let mut candidates = Vec::with_capacity(records.len());
        for record in records {
            if record.work_id < written {
                continue;
            }
            let mut bytes = serde_json::to_vec(&record).map_err(io::Error::other)?;
            bytes.push(b'\n');
            candidates.push((record, bytes));
        }
        // Room is made before the new entries are held, so that a rewrite
        // writes only the entries already in the file; and only for what can
        // be held (a full journal, or --max-journal-mib 0, rewrites nothing).
        let mut room = (self.max_bytes / 2).saturating_sub(self.stats.bytes);
        let mut total = 0u64;
        for (_, bytes) in &candidates {
            let len = bytes.len() as u64;
            if len <= room {
                room -= len;
                total += len;
            }
        }
        if total > 0 {
            self.make_room(total)?;
        }
        let mut buf = Vec::with_capacity(total as usize);
        let mut recorded = 0;
        for (record, bytes) in candidates {
            if self.admit(record, bytes.len() as u64) {
                buf.extend_from_slice(&bytes);
                recorded += 1;
            }
        }
        self.append(&buf)?;
        Ok(recorded)
    }

    /// Voids the entries of line `id`: its task asked for another attempt,
    /// which must not replay the answers it rejected.
    pub fn forget_line(&mut self, id: u64) -> io::Result<()> {
        if !self.lines.contains_key(&id) {
            return Ok(());
        }
        self.forget(id);
        let mut mark = serde_json::to_vec(&Mark {
            forget: Some(id),
            ..Mark::default()
        })
        .map_err(io::Error::other)?;
        mark.push(b'\n');
        self.make_room(mark.len() as u64)?;
        self.append(&mark)
    }

    fn forget(&mut self, id: u64) {
        if let Some(line) = self.lines.remove(&id) {
            self.stats.entries -= line.entries.len() as u64;
            self.stats.bytes -= line.bytes;
        }
    }

    /// Rewrites the file with only the live entries when appending `bytes`
    /// more would take it past the bound. Live entries take at most half of
    /// it, so the appends that follow have at least the other half.
    fn make_room(&mut self, bytes: u64) -> io::Result<()> {
        if self.stats.file_bytes + bytes > self.max_bytes {
            self.file = self.rewrite()?;
        }
        Ok(())
    }

    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.file
            .write_all(bytes)
            .with_path("append to the journal", &self.path)?;
        self.stats.file_bytes += bytes.len() as u64;
        Ok(())
    }

    /// The entries of line `id`, in request order.
    pub fn entries(&self, id: u64) -> Option<Vec<JournalEntry>> {
        Some(
            self.lines
                .get(&id)?
                .entries
                .iter()
                .map(JournalRecord::entry)
                .collect(),
        )
    }

    /// Drops the entries of the lines written (the first `written`).
    pub fn drop_written(&mut self, written: u64) {
        let live = self.lines.split_off(&written);
        for line in std::mem::replace(&mut self.lines, live).into_values() {
            self.stats.entries -= line.entries.len() as u64;
            self.stats.bytes -= line.bytes;
        }
    }

    /// Before a checkpoint: rewrites the file when it holds much more than
    /// the live entries (64 MiB more, and twice them; just its header when
    /// none is live). Returns a handle on the file, whose `sync_data` makes
    /// what was appended durable.
    pub fn for_checkpoint(&mut self) -> io::Result<File> {
        let header = self.header()?.len() as u64;
        let dead = self.stats.file_bytes > header && self.stats.entries == 0;
        if dead || self.stats.file_bytes > 2 * self.stats.bytes + header + (64 << 20) {
            self.file = self.rewrite()?;
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

    fn header(&self) -> io::Result<Vec<u8>> {
        let mut header = serde_json::to_vec(&Mark {
            journal_of_job: Some(self.job_id.clone()),
            ..Mark::default()
        })
        .map_err(io::Error::other)?;
        header.push(b'\n');
        Ok(header)
    }

    /// Writes the header and the live entries to a new file beside the
    /// journal, makes it durable and puts it in place; returns it open for
    /// appending.
    fn rewrite(&mut self) -> io::Result<File> {
        let tmp = crate::job::files::with_suffix(&self.path, ".tmp");
        let mut out = io::BufWriter::new(File::create(&tmp).with_path("create the journal", &tmp)?);
        let header = self.header()?;
        out.write_all(&header)
            .with_path("write the journal", &tmp)?;
        let mut written = header.len() as u64;
        for line in self.lines.values() {
            for record in &line.entries {
                let mut bytes = serde_json::to_vec(record).map_err(io::Error::other)?;
                bytes.push(b'\n');
                out.write_all(&bytes).with_path("write the journal", &tmp)?;
                written += bytes.len() as u64;
            }
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_data().with_path("sync the journal", &tmp)?;
        std::fs::rename(&tmp, &self.path).with_path("put the journal in place", &self.path)?;
        self.stats.file_bytes = written;
        OpenOptions::new()
            .append(true)
            .open(&self.path)
            .with_path("open the journal", &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(work_id: u64, seq: u32) -> JournalRecord {
        JournalRecord::new(
            work_id,
            JournalEntry::new(
                seq,
                format!("{seq:016x}"),
                &serde_json::json!({"text": format!("answer {work_id}.{seq}")}),
            ),
        )
    }

    fn seqs(j: &Journal, id: u64) -> Vec<u32> {
        j.entries(id)
            .unwrap_or_default()
            .iter()
            .map(|e| e.seq)
            .collect()
    }

    #[test]
    fn entries_survive_a_reopen_are_dropped_once_written_and_cut_at_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl.journal");
        let mut j = Journal::open(path.clone(), 1 << 20, 0, "job").unwrap();
        let n = j
            .record(
                vec![record(3, 1), record(3, 0), record(5, 0), record(3, 1)],
                0,
            )
            .unwrap();
        assert_eq!(n, 3, "the repeat is not recorded twice");
        // A line already written gets none.
        assert_eq!(j.record(vec![record(1, 0)], 2).unwrap(), 0);
        j.for_checkpoint().unwrap().sync_data().unwrap();
        assert_eq!(seqs(&j, 3), vec![0, 1]);
        // Reopened with line 3 written: only line 5's entry is read back.
        drop(j);
        let j = Journal::open(path.clone(), 1 << 20, 4, "job").unwrap();
        assert_eq!(seqs(&j, 3), Vec::<u32>::new());
        assert_eq!(seqs(&j, 5), vec![0]);
        assert_eq!(j.stats().entries, 1);
        // A torn last line (a crash mid-append) is cut off, the rest kept.
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"work_id\": 9, \"se")
            .unwrap();
        drop(j);
        let mut j = Journal::open(path.clone(), 1 << 20, 4, "job").unwrap();
        assert_eq!(seqs(&j, 5), vec![0]);
        j.drop_written(6);
        assert_eq!((j.stats().entries, j.stats().bytes), (0, 0));
    }

    #[test]
    fn a_journal_of_another_job_or_of_none_is_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl.journal");
        let mut j = Journal::open(path.clone(), 1 << 20, 0, "old-job").unwrap();
        j.record(vec![record(0, 0), record(1, 0)], 0).unwrap();
        drop(j);
        let j = Journal::open(path.clone(), 1 << 20, 0, "new-job").unwrap();
        assert_eq!(j.stats().entries, 0);
        assert!(j.entries(0).is_none());
        // And the file now belongs to the new job: the old entries are gone.
        drop(j);
        let j = Journal::open(path.clone(), 1 << 20, 0, "old-job").unwrap();
        assert_eq!(j.stats().entries, 0);
        // A file without a header (written before job ids) is read only by a
        // job without one.
        std::fs::write(&path, serde_json::to_string(&record(2, 0)).unwrap() + "\n").unwrap();
        drop(j);
        let j = Journal::open(path.clone(), 1 << 20, 0, "").unwrap();
        assert_eq!(seqs(&j, 2), vec![0]);
        std::fs::write(&path, serde_json::to_string(&record(2, 0)).unwrap() + "\n").unwrap();
        drop(j);
        let j = Journal::open(path, 1 << 20, 0, "a-job").unwrap();
        assert_eq!(j.stats().entries, 0);
    }

    #[test]
    fn a_forgotten_line_stays_forgotten_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut j = Journal::open(path.clone(), 1 << 20, 0, "job").unwrap();
        j.record(vec![record(0, 0), record(1, 0), record(1, 1)], 0)
            .unwrap();
        j.forget_line(1).unwrap();
        assert!(j.entries(1).is_none());
        assert_eq!(j.stats().entries, 1);
        // A later attempt's entries are recorded again.
        j.record(vec![record(1, 0)], 0).unwrap();
        drop(j);
        let j = Journal::open(path, 1 << 20, 0, "job").unwrap();
        assert_eq!(seqs(&j, 0), vec![0]);
        assert_eq!(seqs(&j, 1), vec![0]);
        assert_eq!(j.entries(1).unwrap()[0].response()["text"], "answer 1.0");
    }

    /// `--max-journal-mib` bounds the file, however many entries come and go.
    #[test]
    fn the_file_never_grows_past_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let max = 4096;
        let mut j = Journal::open(path.clone(), max, 0, "job").unwrap();
        for round in 0..200u64 {
            // Lines are written in order: at most a few stay live.
            j.drop_written(round);
            j.record(vec![record(round, 0), record(round + 1, 1)], round)
                .unwrap();
            let on_disk = std::fs::metadata(&path).unwrap().len();
            assert!(on_disk <= max, "round {round}: {on_disk} bytes");
            assert_eq!(on_disk, j.stats().file_bytes);
            assert!(j.stats().bytes <= max / 2);
        }
        // Held entries past half the bound are refused and counted.
        let mut full = Journal::open(dir.path().join("full"), 600, 0, "job").unwrap();
        let n = full
            .record((0..10).map(|i| record(i, 0)).collect(), 0)
            .unwrap();
        assert!((1..10).contains(&n), "{n}");
        assert_eq!(full.stats().dropped, 10 - n);
        assert!(full.stats().bytes <= 300);
    }
}
