//! Opening a job's files (or resuming them) and making them durable:
//! [`Ledger::open`] reads the checkpoint, repairs the output's tail and
//! positions the input; checkpoints are taken under the ledger's lock and
//! written without it ([`PendingCheckpoint`]); [`Ledger::finish`] cleans up
//! once the job is complete.

use std::io;
use std::path::PathBuf;

use tokio::time::Instant;

use super::journal::Journal;
use super::leases::Leases;
use super::redo::Previous;
use super::stats::Counters;
use super::window::Window;
use super::{Groups, Items, Ledger, LedgerConfig};
use crate::error::{path_error, IoContext};
use crate::input::InputReader;
use crate::job::checkpoint::{Checkpoint, ResumeError};
use crate::job::files::JobLock;
use crate::output::OutputWriter;

/// A checkpoint whose state was taken by [`Ledger::begin_checkpoint`] and
/// which is not written yet.
#[derive(Debug)]
#[must_use = "nothing is written until `commit`"]
pub struct PendingCheckpoint {
    /// A handle on the output, for its fsync.
    output: std::fs::File,
    /// A handle on the journal and its path, for its fsync.
    journal: Option<(std::fs::File, PathBuf)>,
    job_id: String,
    infile: PathBuf,
    outfile: PathBuf,
    checkpoint: PathBuf,
    lines_written: u64,
    input_offset: u64,
    output_offset: u64,
}

impl PendingCheckpoint {
    /// Makes the output durable (at least up to the length taken; lines
    /// appended since are synced too, harmlessly) and then writes the
    /// checkpoint that names it. The output only grows past the length taken
    /// while this runs, so the checkpoint's fingerprint of it stays true.
    ///
    /// The checkpoints of one job must be committed one at a time and in the
    /// order they were begun, or an older one could replace a newer one.
    pub fn commit(self) -> io::Result<()> {
        self.output
            .sync_data()
            .with_path("sync the output file", &self.outfile)?;
        if let Some((journal, path)) = &self.journal {
            journal.sync_data().with_path("sync the journal", path)?;
        }
        Checkpoint::capture(
            &self.job_id,
            &self.infile,
            &self.outfile,
            self.lines_written,
            self.input_offset,
            self.output_offset,
        )?
        .save(&self.checkpoint)
    }
}

impl Ledger {
    /// Opens the job's files, resuming from the checkpoint and the output file
    /// when there is one. See [`ResumeError`] for what is refused.
    pub fn open(config: LedgerConfig, now: Instant) -> Result<Ledger, ResumeError> {
        let files = &config.files;
        // A redo holds the old job's lock too, and checks that the input is
        // the one its output was made from; a plain run refuses to start over
        // a half-done redo.
        let previous_lock = match &config.redo {
            Some(redo) => {
                let lock = JobLock::acquire(
                    &config.infile,
                    redo.previous.output(),
                    redo.previous.checkpoint(),
                )?;
                redo.check_input(&config.infile)?;
                Some(lock)
            }
            None => {
                crate::job::redo::refuse_unfinished(files)?;
                None
            }
        };
        let opened = files.open(&config.infile)?;
        let loaded = opened.checkpoint;
        let (lines, input_offset, output_offset) = loaded.as_ref().map_or((0, 0, 0), |cp| {
            (cp.lines_written, cp.input_offset, cp.output_offset)
        });
        let input_offset = resume_offset(&config, input_offset)?;
        let (recovered, output) = OutputWriter::recover(files.output(), output_offset)?;
        if recovered.torn_bytes > 0 {
            tracing::warn!(
                output = %files.output().display(),
                bytes = recovered.torn_bytes,
                "cut off a torn last output line; its input line will be redone"
            );
        }
        if let Some(bad) = &recovered.invalid {
            tracing::warn!(
                output = %files.output().display(),
                line = lines + recovered.extra_lines,
                bytes_cut = bad.bytes_cut,
                reason = %bad.reason,
                "the output past the last checkpoint holds a line that is not one JSON value (a page the file system never wrote?); cut it off there, and those lines will be redone"
            );
        }
        let mut input = InputReader::open(&config.infile, input_offset)?;
        input.watch(
            config
                .sources
                .clone()
                .map(|s| s as std::sync::Arc<dyn crate::input::Watched>),
        );
        let skipped = input.skip_lines(recovered.extra_lines)?;
        if skipped < recovered.extra_lines {
            return Err(ResumeError::OutputLongerThanInput {
                input: config.infile.clone(),
                output: files.output().to_owned(),
                output_lines: lines + recovered.extra_lines,
                input_lines: lines + skipped,
            });
        }
        let lines = lines + recovered.extra_lines;
        let window = Window::new(
            output,
            lines,
            input.next_offset(),
            files.pending(),
            config.max_pending_bytes,
        );
        let mut ledger = Ledger {
            lock: Some(opened.lock),
            previous_lock,
            fresh: loaded.is_none(),
            input_prefix: opened.input_prefix,
            leases: Leases::new(config.work_timeout),
            input,
            input_exhausted: false,
            next_work_id: lines,
            next_input_check: now,
            items: Items::default(),
            window,
            counters: Counters::new(now, recovered.extra_lines),
            previous: match &config.redo {
                Some(redo) => Some(Previous::open(redo.clone(), lines)?),
                None => None,
            },
            journal: if config.journal {
                Some(Journal::open(
                    files.journal(),
                    config.max_journal_bytes,
                    lines,
                    &opened.job_id,
                )?)
            } else {
                None
            },
            job_id: opened.job_id,
            alive: rustc_hash::FxHashMap::default(),
            finished_elsewhere: rustc_hash::FxHashMap::default(),
            groups: config.grouping.clone().map(Groups::new),
            config,
        };
        // A checkpoint exists from the start, so an output without one is
        // foreign. Otherwise the one on disk stays true: it names a prefix of
        // the output (a torn tail was cut off past it). Lines recovered past it
        // are named by the next checkpoint, which a server takes right away
        // (see `recovered_past_checkpoint`) but without making the restart
        // wait for the fsync of everything the last run wrote.
        if loaded.is_none() {
            ledger.checkpoint()?;
        }
        ledger.check_eof()?;
        Ok(ledger)
    }

    /// Makes the output durable and records it in the checkpoint (nothing
    /// once the job is [finished](Self::finish)).
    pub fn checkpoint(&mut self) -> io::Result<()> {
        if self.lock.is_none() {
            return Ok(());
        }
        self.begin_checkpoint()?.commit()
    }

    /// Takes the state a checkpoint records (flushing the output); its slow
    /// part, [`PendingCheckpoint::commit`], needs no access to the ledger, so
    /// a server runs it without holding the ledger's lock.
    pub fn begin_checkpoint(&mut self) -> io::Result<PendingCheckpoint> {
        if self.lock.is_none() {
            // After `finish` the files may have moved (a redo's swap): a
            // checkpoint now would bring back a file the job removed.
            return Err(io::Error::other("a bug: a checkpoint of a finished job"));
        }
        let lines_written = self.window.next_write_id();
        let input_offset = self.window.written_input_offset();
        let journal = match &mut self.journal {
            Some(j) => {
                j.drop_written(lines_written);
                Some((j.for_checkpoint()?, j.path().to_path_buf()))
            }
            None => None,
        };
        let output = self.window.output();
        Ok(PendingCheckpoint {
            journal,
            job_id: self.job_id.clone(),
            output: output.flush_for_sync()?,
            output_offset: output.len(),
            infile: self.config.infile.clone(),
            outfile: self.config.files.output().to_owned(),
            checkpoint: self.config.files.checkpoint().to_owned(),
            lines_written,
            input_offset,
        })
    }

    /// Whether the job started without a checkpoint (false on a resume).
    pub fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// The input's checkpointed part, as the check of the checkpoint read it
    /// at open (empty for a fresh start): a count of the whole input goes on
    /// from there.
    pub fn input_prefix(&self) -> crate::input::InputPrefix {
        self.input_prefix
    }

    /// Once the job is complete and its last checkpoint written: removes what
    /// only a running job needs (journal, spilled results, lock file), and,
    /// for a redo, puts the new output in place of the old. Does nothing
    /// before the job is complete, or a second time.
    pub fn finish(&mut self) -> io::Result<()> {
        if !self.is_complete() {
            return Ok(());
        }
        let Some(lock) = self.lock.take() else {
            return Ok(());
        };
        if let Some(redo) = &self.config.redo {
            redo.replace()?;
        }
        self.config.files.finish(lock)?;
        if let Some(previous) = self.previous_lock.take() {
            previous.release();
        }
        Ok(())
    }

    /// Output lines the last run wrote after its last checkpoint, found in the
    /// output when this ledger was opened (after a crash). Until the next
    /// checkpoint names them, another crash recounts them.
    pub fn recovered_past_checkpoint(&self) -> u64 {
        self.counters.recovered_past_checkpoint
    }
}

/// Where to resume reading the input: the checkpoint's `offset`, unless the
/// line before it had no newline (it was the input's last line) and lines
/// were appended since, starting with the newline it lacked: then just past
/// that newline. Appending to that line itself changes a line already
/// written, and is refused.
fn resume_offset(config: &LedgerConfig, offset: u64) -> Result<u64, ResumeError> {
    if offset == 0 {
        return Ok(0);
    }
    let file = std::fs::File::open(&config.infile)
        .map_err(|e| path_error(e, "open the input file", &config.infile))?;
    let around = crate::input::read_exact_at(&file, offset - 1, 3)
        .map_err(|e| path_error(e, "read the input file", &config.infile))?;
    match around.as_slice() {
        [b'\n', ..] | [_] => Ok(offset),
        [_, b'\n', ..] => Ok(offset + 1),
        [_, b'\r', b'\n'] => Ok(offset + 2),
        _ => Err(ResumeError::InputMismatch {
            input: config.infile.clone(),
            checkpoint: config.files.checkpoint().to_owned(),
            reason: format!(
                "its line ending at byte {offset} had no newline (it was the last line) and has since been extended; lines appended to an input must start on a new line. Restore that line (cut what was appended to it, then add a newline before the new lines)"
            ),
        }),
    }
}
