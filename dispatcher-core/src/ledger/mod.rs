//! The ledger: which input line is where (unread, in flight, queued for reissue,
//! waiting in the reorder buffer, written), and the files behind it.
//!
//! It is a plain state machine driven by the HTTP layer and a ticker, with the
//! current time passed in, so it can be tested without a clock or a socket.
//!
//! Invariants, for every work id `i`:
//! - `i < next_write_id`: its output line is written (it is in no other map);
//! - `next_write_id <= i < next_work_id`: slot `i - next_write_id` of the window
//!   says whether it is issued and without a result (its `Item` is in `items`)
//!   or done and waiting for an earlier line (its result in memory or spilled);
//! - `i >= next_work_id`: not read yet.
//!
//! A result is accepted only for an id whose slot holds an item, so the first
//! result wins and nothing in the reorder buffer is ever reissued.
//!
//! `Ledger` composes its parts: the input cursor and the items issued from it
//! (here), the leases of items in flight (`leases.rs`), the window of lines
//! read and not written with the reorder buffer, its spill file and the output
//! (`window.rs`), and counters for its stats.

mod journal;
mod leases;
mod redo;
#[cfg(test)]
mod tests;
mod window;

pub use crate::job::redo::RedoConfig;
use journal::Journal;
pub use journal::JournalStats;
use redo::{Decision, Previous};

/// Kept lines (`--redo-errors`) a work request reads past at most before it
/// answers: the ledger's lock is not held for long.
const KEEP_PER_REQUEST: u64 = 65_536;
/// Kept lines the ticker reads past at most each second, when no worker asks.
const KEEP_PER_TICK: u64 = 262_144;

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use slab::Slab;
use tokio::time::Instant;

use crate::error::{path_error, IoContext};
use crate::input::{InputReader, LineSpan};
use crate::job::checkpoint::{Checkpoint, ResumeError};
use crate::job::files::JobLock;
use crate::job::JobFiles;
use crate::output::OutputWriter;
use crate::protocol::{
    check_results, BlockingLine, JournalRecord, OldestInFlight, RefusedResult, ReissueCounts,
    ReleaseReason, ResultLine, WorkItem, WorkStatus,
};
use leases::{Lease, Leases};
use window::Window;

/// What the ledger needs to know about the job.
#[derive(Debug, Clone)]
pub struct LedgerConfig {
    /// Input JSONL.
    pub infile: PathBuf,
    /// Output JSONL.
    pub outfile: PathBuf,
    /// Checkpoint file.
    pub checkpoint: PathBuf,
    /// How long an issued item may stay without a result before it is reissued.
    pub work_timeout: Duration,
    /// Reissues before an item is tombstoned; `None` never tombstones.
    pub max_retries: Option<u32>,
    /// `retry_in` told to workers when nothing is issuable (an upper bound: the
    /// ledger answers sooner when an in-flight item expires sooner).
    pub retry_secs: u64,
    /// Releases (preemptions) before an item is tombstoned; `None` never. A
    /// budget separate from `max_retries`, so heavy preemption does not
    /// tombstone good items.
    pub max_releases: Option<u32>,
    /// Bytes of finished results kept in memory while they wait for an earlier
    /// line; past it they are spilled to `<outfile>.pending`.
    pub max_pending_bytes: u64,
    /// Backup copies of straggling items handed out at most at once (0: none).
    /// Only idle workers get them: a work request that finds no new line and
    /// no reissue, from a worker that does not hold the item itself.
    pub max_backups: u32,
    /// How long an item must have been in flight before it gets a backup.
    pub backup_after: Duration,
    /// `--redo-errors`: the previous output, whose lines are kept unless they
    /// are error records to redo. `outfile` is then the new output.
    pub redo: Option<RedoConfig>,
    /// Keep a journal of the engine responses of unfinished lines
    /// (`<outfile>.journal`), handed back with a line issued again.
    pub journal: bool,
    /// Bytes of journal entries held at most (`--max-journal-mib`).
    pub max_journal_bytes: u64,
}

impl LedgerConfig {
    /// A configuration with the defaults of `dispatcher serve` for everything
    /// but the three paths.
    pub fn new(infile: PathBuf, outfile: PathBuf, checkpoint: PathBuf) -> LedgerConfig {
        LedgerConfig {
            infile,
            outfile,
            checkpoint,
            work_timeout: Duration::from_secs(1200),
            max_retries: Some(3),
            retry_secs: 300,
            max_releases: Some(DEFAULT_MAX_RELEASES),
            max_pending_bytes: DEFAULT_MAX_PENDING_BYTES,
            max_backups: 0,
            backup_after: Duration::from_secs(60),
            redo: None,
            journal: true,
            max_journal_bytes: DEFAULT_MAX_JOURNAL_BYTES,
        }
    }

    /// The files of the job this ledger writes.
    pub fn files(&self) -> JobFiles {
        JobFiles::new(self.outfile.clone(), Some(self.checkpoint.clone()))
    }

    /// Where results past `max_pending_bytes` go.
    pub fn spill_path(&self) -> PathBuf {
        self.files().pending()
    }
}

/// Default `--max-releases`: preemptions are not the item's fault; only an item
/// released this often (a poison item that kills workers) is given up.
pub const DEFAULT_MAX_RELEASES: u32 = 50;
/// Default `--max-journal-mib`: 1 GiB of engine responses of unfinished lines.
pub const DEFAULT_MAX_JOURNAL_BYTES: u64 = 1 << 30;
/// Default `--max-pending-mib`: 256 MiB of results waiting for a stuck line.
pub const DEFAULT_MAX_PENDING_BYTES: u64 = 256 << 20;

/// Why an item went back to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Its lease (work timeout) expired: a failure.
    Timeout,
    /// Its worker released it unprocessed (preemption): not a failure.
    Release,
    /// Its task asked for another attempt: a failure.
    Retry,
    /// A release that gives no reason (a worker written for the Python
    /// server): counted as a release, but on the `max_retries` budget and in
    /// `retry_count`, exactly as that server did.
    LegacyRelease,
}

impl Cause {
    /// The cause of a `POST /release`, from its (optional) reason.
    pub fn of_release(reason: Option<ReleaseReason>) -> Cause {
        match reason {
            Some(ReleaseReason::Retry) => Cause::Retry,
            Some(ReleaseReason::Preempted) => Cause::Release,
            None => Cause::LegacyRelease,
        }
    }

    /// Whether it draws on the `max_retries` budget (and `retry_count`) rather
    /// than on `max_releases`.
    fn is_failure(self) -> bool {
        !matches!(self, Cause::Release)
    }

    /// Counts one reissue by this cause in `counts`.
    fn tally(self, counts: &mut ReissueCounts) {
        match self {
            Cause::Timeout => counts.timeout += 1,
            Cause::Release | Cause::LegacyRelease => counts.release += 1,
            Cause::Retry => counts.retry += 1,
        }
    }
}

/// An issued line that has no result yet.
#[derive(Debug)]
struct Item {
    /// Its work id.
    id: u64,
    span: LineSpan,
    /// Failures so far (expiries, task retries): the `retry_count` of its next
    /// issue, checked against `max_retries`.
    retry_count: u32,
    /// Releases so far, checked against `max_releases`.
    releases: u32,
    /// Reissues by cause, for the tombstone's history.
    reissues: ReissueCounts,
    /// When it was first issued, for the blocking line's age.
    first_issued: Instant,
    /// Whether a backup copy of it is out.
    backed_up: bool,
    /// The worker the backup copy went to, when it says who it is: its
    /// heartbeats keep the lease too, and it learns when the other copy wins.
    backup_holder: Option<u64>,
    /// The worker of its current issue, when the worker says who it is.
    holder: Option<u64>,
    /// The worker whose task asked for another attempt: another worker gets
    /// the retry when one asks.
    avoid: Option<u64>,
    state: ItemState,
}

#[derive(Debug)]
enum ItemState {
    /// With a worker, under a lease.
    InFlight(Lease),
    /// Waiting in `queue` to be issued again.
    Queued,
}

impl Item {
    fn lease(&self) -> Option<&Lease> {
        match &self.state {
            ItemState::InFlight(lease) => Some(lease),
            ItemState::Queued => None,
        }
    }
}

/// The answer to a work request.
#[derive(Debug, PartialEq, Eq)]
pub struct WorkReply {
    /// What the worker should do.
    pub status: WorkStatus,
    /// Seconds to wait, with [`WorkStatus::Retry`].
    pub retry_in: Option<u64>,
    /// Items issued, with [`WorkStatus::Ok`].
    pub items: Vec<WorkItem>,
}

/// The outcome of submitting results.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CompleteReply {
    /// Results accepted as the first of their item.
    pub accepted: u64,
    /// Results ignored: their item was done already or never issued.
    pub ignored: u64,
    /// Ids among the ignored whose item is done (the sender may drop them).
    pub already_done: Vec<u64>,
    /// Ids among the ignored that were never issued.
    pub never_issued: Vec<u64>,
    /// Results refused; their items stay in flight.
    pub refused: Vec<RefusedResult>,
}

/// Where the job stands: what `GET /status` and the metrics report, in the
/// ledger's own terms (the server maps it to the wire).
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerStats {
    /// Output lines written.
    pub lines_written: u64,
    /// The work id the next new input line will get.
    pub next_work_id: u64,
    /// Input lines in all, once the whole input has been read.
    pub lines_total: Option<u64>,
    /// Input bytes read so far.
    pub input_bytes_consumed: u64,
    /// Size of the input file when it was opened.
    pub input_bytes_total: u64,
    /// Items issued and without a result.
    pub in_flight: u64,
    /// Items waiting to be issued again.
    pub queued_for_reissue: u64,
    /// Finished lines waiting for an earlier one.
    pub reorder_lines: u64,
    /// Bytes of those results held in memory.
    pub reorder_bytes: u64,
    /// Of those lines, how many are spilled to disk.
    pub reorder_spilled: u64,
    /// Entries of the lease deadline queue, stale ones included.
    pub lease_entries: u64,
    /// Reissues by cause.
    pub reissues: ReissueCounts,
    /// Lines given up (tombstoned).
    pub tombstones: u64,
    /// Input lines that were not valid UTF-8.
    pub invalid_lines: u64,
    /// Lines of the previous output kept as they were (`--redo-errors`), by
    /// this run.
    pub kept_lines: u64,
    /// Failed lines this run finished (results, tombstones, invalid input
    /// lines), by kind ([`crate::record`]).
    pub failed_by_kind: std::collections::BTreeMap<String, u64>,
    /// What the journal holds (zeros with `--no-journal`).
    pub journal: JournalStats,
    /// Results ignored (duplicates, unknown ids).
    pub ignored_results: u64,
    /// Issues made by this run, reissues included.
    pub issued_total: u64,
    /// Results accepted by this run.
    pub completed_total: u64,
    /// Backup copies handed out by this run.
    pub backups_issued: u64,
    /// The oldest item in flight.
    pub oldest_in_flight: Option<OldestInFlight>,
    /// The unfinished line that later finished lines wait for.
    pub blocking: Option<BlockingLine>,
    /// The current work timeout.
    pub work_timeout: Duration,
    /// `--max-retries`.
    pub max_retries: Option<u32>,
    /// Whether every input line has its output line.
    pub complete: bool,
    /// Time since the ledger was opened.
    pub uptime: Duration,
}

/// Counts kept for [`LedgerStats`]; nothing reads them to decide anything.
#[derive(Debug)]
struct Counters {
    started: Instant,
    reissues: ReissueCounts,
    tombstones: u64,
    invalid_lines: u64,
    ignored_results: u64,
    issued_total: u64,
    completed_total: u64,
    backups_issued: u64,
    /// Output lines found past the checkpoint at open.
    recovered_past_checkpoint: u64,
    /// Results accepted, by the worker (key) the item was last issued to.
    done_by: rustc_hash::FxHashMap<u64, u64>,
    /// Lines of the previous output kept as they were (`--redo-errors`).
    kept: u64,
    /// Failed lines finished by this run, by kind.
    failed_by_kind: std::collections::BTreeMap<String, u64>,
}

impl Counters {
    /// Counts `line` (one JSON value) when it is a failure.
    fn finished(&mut self, line: &str) {
        if let Some(kind) = crate::record::failure_of_json(line) {
            *self.failed_by_kind.entry(kind).or_default() += 1;
        }
    }
}

/// The state of one job: see the module docs for its invariants.
#[derive(Debug)]
pub struct Ledger {
    config: LedgerConfig,
    /// Held while the ledger lives (no second process touches these files),
    /// and released by [`finish`](Self::finish).
    lock: Option<JobLock>,
    /// `--redo-errors`: the lock of the job whose output is redone, so that
    /// no server writes it meanwhile.
    previous_lock: Option<JobLock>,
    /// The job's identity (its checkpoint's), which its journal carries.
    job_id: String,
    /// Whether the job started without a checkpoint (this run or an earlier
    /// one): false on a resume.
    fresh: bool,
    /// What the check of the checkpoint read of the input.
    input_prefix: crate::input::InputPrefix,
    /// Sequential reader positioned at line `next_work_id`.
    input: InputReader,
    /// Whether the reader has seen the end of the input.
    input_exhausted: bool,
    /// Id of the next line to read from the input.
    next_work_id: u64,
    /// When to check next that the input has not changed.
    next_input_check: Instant,
    /// Issued lines without a result, addressed by their window slot.
    items: Slab<Item>,
    /// Ids waiting to be reissued, in order; may hold ids finished meanwhile,
    /// which are skipped.
    queue: VecDeque<u64>,
    /// How many `items` are [`ItemState::Queued`].
    queued: u64,
    /// Backup copies out (items with `backed_up`).
    backups_out: u32,
    /// The lease of every item in flight.
    leases: Leases,
    /// Lines read and not written, and the output.
    window: Window,
    /// `--redo-errors`: the previous output, in step with the input.
    previous: Option<Previous>,
    /// The engine responses of unfinished lines; `None` with `--no-journal`.
    journal: Option<Journal>,
    /// Workers whose heartbeats renew every lease they hold: the last
    /// heartbeat of each (by key). One entry per worker the job has seen.
    alive: rustc_hash::FxHashMap<u64, Instant>,
    /// Lines a worker held (or held a backup of) that another copy finished,
    /// told at its next heartbeat (by key).
    finished_elsewhere: rustc_hash::FxHashMap<u64, Vec<u64>>,
    counters: Counters,
}

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
        let files = config.files();
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
                crate::job::redo::refuse_unfinished(&files)?;
                None
            }
        };
        let opened = files.open(&config.infile)?;
        let loaded = opened.checkpoint;
        let (lines, input_offset, output_offset) = loaded.as_ref().map_or((0, 0, 0), |cp| {
            (cp.lines_written, cp.input_offset, cp.output_offset)
        });
        let input_offset = resume_offset(&config, input_offset)?;
        let (recovered, output) = OutputWriter::recover(&config.outfile, output_offset)?;
        if recovered.torn_bytes > 0 {
            tracing::warn!(
                output = %config.outfile.display(),
                bytes = recovered.torn_bytes,
                "cut off a torn last output line; its input line will be redone"
            );
        }
        if let Some(bad) = &recovered.invalid {
            tracing::warn!(
                output = %config.outfile.display(),
                line = lines + recovered.extra_lines,
                bytes_cut = bad.bytes_cut,
                reason = %bad.reason,
                "the output past the last checkpoint holds a line that is not one JSON value (a page the file system never wrote?); cut it off there, and those lines will be redone"
            );
        }
        let mut input = InputReader::open(&config.infile, input_offset)?;
        let skipped = input.skip_lines(recovered.extra_lines)?;
        if skipped < recovered.extra_lines {
            return Err(ResumeError::OutputLongerThanInput {
                input: config.infile.clone(),
                output: config.outfile.clone(),
                output_lines: lines + recovered.extra_lines,
                input_lines: lines + skipped,
            });
        }
        let lines = lines + recovered.extra_lines;
        let window = Window::new(
            output,
            lines,
            input.next_offset(),
            config.spill_path(),
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
            items: Slab::new(),
            queue: VecDeque::new(),
            queued: 0,
            backups_out: 0,
            window,
            counters: Counters {
                started: now,
                reissues: ReissueCounts::default(),
                tombstones: 0,
                invalid_lines: 0,
                ignored_results: 0,
                issued_total: 0,
                completed_total: 0,
                backups_issued: 0,
                recovered_past_checkpoint: recovered.extra_lines,
                done_by: rustc_hash::FxHashMap::default(),
                kept: 0,
                failed_by_kind: std::collections::BTreeMap::new(),
            },
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

    /// The job's configuration.
    pub fn config(&self) -> &LedgerConfig {
        &self.config
    }

    /// The current work timeout (the lease length).
    pub fn work_timeout(&self) -> Duration {
        self.leases.timeout()
    }

    /// Output lines written so far.
    pub fn lines_written(&self) -> u64 {
        self.window.next_write_id()
    }

    /// Whether every input line has its output line.
    pub fn is_complete(&self) -> bool {
        self.input_exhausted && self.window.next_write_id() == self.next_work_id
    }

    /// Hands out up to `batch` items: queued reissues first, then new lines.
    pub fn take_work(&mut self, batch: usize, now: Instant) -> io::Result<WorkReply> {
        self.take_work_for(batch, now, None)
    }

    /// [`take_work`](Self::take_work) for a worker that says who it is (a hash
    /// of its id): it is never handed a backup of an item it holds itself.
    pub fn take_work_for(
        &mut self,
        batch: usize,
        now: Instant,
        worker: Option<u64>,
    ) -> io::Result<WorkReply> {
        self.expire(now)?;
        let mut items = Vec::with_capacity(batch.min(1024));
        // Retries this worker asked for, left for another worker.
        let mut avoided = Vec::new();
        let mut kept = 0;
        while items.len() < batch && kept < KEEP_PER_REQUEST {
            if let Some(id) = self.queue.pop_front() {
                if let Some(key) = self.key_of(id) {
                    if worker.is_some() && self.items[key].avoid == worker {
                        avoided.push(id);
                    } else {
                        items.push(self.reissue(key, id, now, worker)?);
                    }
                }
                continue;
            }
            if self.input_exhausted {
                break;
            }
            let Some(line) = self.input.next_line()? else {
                // A file cut short under us also ends here: make sure this is
                // its real end before the job can complete on it.
                self.input.check_unchanged()?;
                self.input_exhausted = true;
                break;
            };
            let id = self.next_work_id;
            self.next_work_id += 1;
            if let Some(Decision::Keep(old)) =
                self.previous.as_mut().map(Previous::take).transpose()?
            {
                self.keep(id, old, line.span.end)?;
                kept += 1;
                continue;
            }
            match line.content {
                Ok(content) => {
                    let key = self.items.insert(Item {
                        id,
                        span: line.span,
                        retry_count: 0,
                        releases: 0,
                        reissues: ReissueCounts::default(),
                        first_issued: now,
                        backed_up: false,
                        backup_holder: None,
                        holder: worker,
                        avoid: None,
                        state: ItemState::InFlight(self.leases.grant(id, now)),
                    });
                    self.window.push_issued(key);
                    items.push(self.issue(id, content, 0));
                }
                Err(bytes) => {
                    self.counters.invalid_lines += 1;
                    self.window.push_open();
                    let record = crate::record::invalid_utf8(
                        id,
                        line.span.offset,
                        &self.config.infile,
                        &bytes,
                    );
                    self.counters.finished(&record);
                    self.window.finish(id, record.into(), line.span.end)?;
                }
            }
        }
        for &id in avoided.iter().rev() {
            self.queue.push_front(id);
        }
        // Nothing else is left for this worker: it gets its own retries back
        // rather than wait for another worker that may never come.
        if items.is_empty() {
            for _ in 0..avoided.len().min(batch) {
                let id = self.queue.pop_front().expect("put back above");
                let key = self.key_of(id).expect("still queued");
                items.push(self.reissue(key, id, now, worker)?);
            }
        }
        if items.is_empty() && self.queued == 0 && self.input_exhausted {
            self.issue_backups(batch, now, worker, &mut items)?;
        }
        self.window.write_ready()?;
        self.check_eof()?;
        self.counters.issued_total += items.len() as u64;
        let (status, retry_in) = if !items.is_empty() {
            (WorkStatus::Ok, None)
        } else if self.is_complete() {
            (WorkStatus::AllWorkComplete, None)
        } else if kept >= KEEP_PER_REQUEST {
            // More kept lines to read past: ask again at once.
            (WorkStatus::Retry, Some(1))
        } else {
            (WorkStatus::Retry, Some(self.retry_in(now)))
        };
        Ok(WorkReply {
            status,
            retry_in,
            items,
        })
    }

    /// Issues queued item `key` (line `id`) again, to `worker`.
    fn reissue(
        &mut self,
        key: usize,
        id: u64,
        now: Instant,
        worker: Option<u64>,
    ) -> io::Result<WorkItem> {
        let item = &mut self.items[key];
        debug_assert!(matches!(item.state, ItemState::Queued));
        item.holder = worker;
        item.state = ItemState::InFlight(self.leases.grant(id, now));
        self.queued -= 1;
        let (span, retry_count) = (item.span, item.retry_count);
        self.work_item(id, span, retry_count)
    }

    /// The work item of an issue of line `id`, with the journal of its
    /// earlier issues.
    fn issue(&self, id: u64, content: String, retry_count: u32) -> WorkItem {
        WorkItem {
            work_id: id,
            content,
            result: None,
            retry_count,
            max_retries: self.config.max_retries,
            journal: self.journal.as_ref().and_then(|j| j.entries(id)),
        }
    }

    /// Records journal entries of lines not written yet; returns how many.
    pub fn record_journal(&mut self, records: Vec<JournalRecord>) -> io::Result<u64> {
        let written = self.lines_written();
        match &mut self.journal {
            Some(journal) => {
                journal.drop_written(written);
                journal.record(records, written)
            }
            None => Ok(0),
        }
    }

    /// What the journal holds; `None` with `--no-journal`.
    pub fn journal_stats(&self) -> Option<JournalStats> {
        self.journal.as_ref().map(Journal::stats)
    }

    /// [`issue`](Self::issue) of a line read again from the input.
    fn work_item(&self, id: u64, span: LineSpan, retry_count: u32) -> io::Result<WorkItem> {
        Ok(self.issue(id, self.input.read_span(span)?, retry_count))
    }

    /// Hands idle workers backup copies of the oldest in-flight items that have
    /// none yet, up to `max_backups` out at once. The primary keeps its lease;
    /// whichever result comes first wins.
    fn issue_backups(
        &mut self,
        room: usize,
        now: Instant,
        worker: Option<u64>,
        items: &mut Vec<WorkItem>,
    ) -> io::Result<()> {
        let allowed = (self.config.max_backups.saturating_sub(self.backups_out) as usize).min(room);
        if allowed == 0 {
            return Ok(());
        }
        let backup_after = self.config.backup_after;
        let mut candidates: Vec<(Instant, u64, usize)> = self
            .items
            .iter()
            .filter(|(_, item)| !item.backed_up && (worker.is_none() || item.holder != worker))
            .filter_map(|(key, item)| {
                let issued_at = item.lease()?.issued_at;
                (now.saturating_duration_since(issued_at) >= backup_after)
                    .then_some((issued_at, item.id, key))
            })
            .collect();
        candidates.sort_unstable();
        for (_, id, key) in candidates.into_iter().take(allowed) {
            let item = &mut self.items[key];
            item.backed_up = true;
            item.backup_holder = worker;
            let (span, retry_count) = (item.span, item.retry_count);
            self.backups_out += 1;
            self.counters.backups_issued += 1;
            items.push(self.work_item(id, span, retry_count)?);
        }
        Ok(())
    }

    /// A worker is alive and still working on `ids`: their leases run for the
    /// work timeout from `now`. Returns how many were extended and which ids
    /// are already done (the worker may drop them).
    pub fn heartbeat(&mut self, ids: &[u64], now: Instant) -> (u64, Vec<u64>) {
        self.heartbeat_from(ids, None, now)
    }

    /// [`heartbeat`](Self::heartbeat) from a worker that says who it is (a
    /// hash of its id): every lease it holds, or holds a backup of, is
    /// renewed from `now` as well, named in `ids` or not (lazily: when the
    /// lease would end, see [`expire`](Self::expire)). The ids done include
    /// those of its lines another copy finished since its last heartbeat.
    pub fn heartbeat_from(
        &mut self,
        ids: &[u64],
        worker: Option<u64>,
        now: Instant,
    ) -> (u64, Vec<u64>) {
        let mut extended = 0;
        let mut done = Vec::new();
        if let Some(worker) = worker {
            self.alive.insert(worker, now);
            done.extend(self.finished_elsewhere.remove(&worker).unwrap_or_default());
        }
        for &id in ids {
            match self.key_of(id) {
                Some(key) => {
                    if let ItemState::InFlight(lease) = &mut self.items[key].state {
                        self.leases.renew(id, lease, now);
                        extended += 1;
                    }
                }
                None if id < self.next_work_id => done.push(id),
                None => {}
            }
        }
        self.compact_leases();
        (extended, done)
    }

    /// Records results; the first result of an item wins. A result must be one
    /// JSON value on one line, else it is refused and its item stays in flight.
    pub fn complete(&mut self, results: Vec<WorkItem>) -> io::Result<CompleteReply> {
        let (valid, refused) = check_results(results.into_iter().map(|r| (r.work_id, r.result)));
        let mut reply = self.complete_checked(valid)?;
        reply.refused = refused;
        Ok(reply)
    }

    /// [`complete`](Self::complete) for results already checked with
    /// [`check_results`] (the HTTP layer checks outside the ledger's lock).
    pub fn complete_checked(&mut self, results: Vec<ResultLine>) -> io::Result<CompleteReply> {
        let mut reply = CompleteReply::default();
        for ResultLine { work_id: id, line } in results {
            match self.take_item(id) {
                Some(item) => {
                    if matches!(item.state, ItemState::Queued) {
                        self.queued -= 1;
                    }
                    if item.backed_up {
                        self.backups_out -= 1;
                        // One copy won: the other's worker may drop it (the
                        // winner's own notice is harmless).
                        for worker in [item.holder, item.backup_holder].into_iter().flatten() {
                            let told = self.finished_elsewhere.entry(worker).or_default();
                            if told.len() < MAX_FINISHED_ELSEWHERE {
                                told.push(id);
                            }
                        }
                    }
                    self.counters.finished(&line);
                    self.window
                        .finish(id, line.into_boxed_str(), item.span.end)?;
                    reply.accepted += 1;
                    if let Some(worker) = item.holder {
                        *self.counters.done_by.entry(worker).or_default() += 1;
                    }
                }
                None => {
                    reply.ignored += 1;
                    if id < self.next_work_id {
                        reply.already_done.push(id);
                    } else {
                        reply.never_issued.push(id);
                    }
                }
            }
        }
        self.counters.ignored_results += reply.ignored;
        self.counters.completed_total += reply.accepted;
        self.compact_leases();
        self.window.write_ready()?;
        Ok(reply)
    }

    /// Per worker (the key of the `worker` its requests name): results
    /// accepted by this run of the ledger and items in flight with it.
    pub fn load_by_worker(&self) -> rustc_hash::FxHashMap<u64, (u64, u64)> {
        let mut load: rustc_hash::FxHashMap<u64, (u64, u64)> = self
            .counters
            .done_by
            .iter()
            .map(|(&w, &done)| (w, (done, 0)))
            .collect();
        for (_, item) in &self.items {
            if let (Some(w), ItemState::InFlight(_)) = (item.holder, &item.state) {
                load.entry(w).or_default().1 += 1;
            }
        }
        load
    }

    /// Puts in-flight items back at the front of the queue, in the given order.
    /// Returns how many were in flight. `cause` is one of the release causes
    /// ([`Cause::Release`], [`Cause::Retry`], [`Cause::LegacyRelease`]).
    pub fn release(&mut self, ids: &[u64], cause: Cause) -> io::Result<u64> {
        self.release_from(ids, cause, None)
    }

    /// [`release`](Self::release) by a worker that says who it is (a hash of
    /// its id): an item reissued to another worker since it was handed to
    /// this one stays with its current holder. A stale worker (its lease
    /// expired, the item went to another) cannot take the item back from
    /// under the worker that now runs it.
    pub fn release_from(
        &mut self,
        ids: &[u64],
        cause: Cause,
        worker: Option<u64>,
    ) -> io::Result<u64> {
        let mut released = 0;
        let mut front = Vec::new();
        for &id in ids {
            let held_by_another = worker.is_some()
                && self
                    .item(id)
                    .is_some_and(|item| item.holder.is_some() && item.holder != worker);
            if held_by_another {
                tracing::debug!(
                    work_id = id,
                    "release from a worker that no longer holds the item; ignored"
                );
                continue;
            }
            if self.lease_of(id).is_some() {
                released += 1;
                if self.requeue(id, cause)? {
                    front.push(id);
                }
            }
        }
        for &id in front.iter().rev() {
            self.queue.push_front(id);
        }
        self.window.write_ready()?;
        Ok(released)
    }

    /// Reissues (or tombstones) items whose work timeout has passed, reads
    /// past kept lines (`--redo-errors`), and writes what became ready.
    pub fn tick(&mut self, now: Instant) -> io::Result<()> {
        self.expire(now)?;
        self.keep_ahead(KEEP_PER_TICK)?;
        self.window.write_ready()?;
        let written = self.lines_written();
        if let Some(journal) = &mut self.journal {
            journal.drop_written(written);
        }
        self.check_eof()
    }

    /// Line `id` keeps its line of the previous output.
    fn keep(&mut self, id: u64, old: Box<str>, input_end: u64) -> io::Result<()> {
        self.window.push_open();
        self.window.finish(id, old, input_end)?;
        self.counters.kept += 1;
        Ok(())
    }

    /// Reads past up to `max` input lines whose previous output is kept, so
    /// that a redo with few lines to redo advances without workers asking.
    fn keep_ahead(&mut self, max: u64) -> io::Result<()> {
        for _ in 0..max {
            let Some(previous) = self.previous.as_mut() else {
                return Ok(());
            };
            if self.input_exhausted || !matches!(previous.peek()?, Decision::Keep(_)) {
                return Ok(());
            }
            let Some(line) = self.input.next_line()? else {
                self.input.check_unchanged()?;
                self.input_exhausted = true;
                return Ok(());
            };
            let Decision::Keep(old) = previous.take()? else {
                unreachable!("peeked above")
            };
            let id = self.next_work_id;
            self.next_work_id += 1;
            self.keep(id, old, line.span.end)?;
        }
        Ok(())
    }

    /// Changes the work timeout. Items in flight keep their leases, which now
    /// end the new timeout after their last renewal.
    pub fn set_work_timeout(&mut self, timeout: Duration) {
        self.config.work_timeout = timeout;
        let live = self
            .items
            .iter()
            .filter_map(|(_, item)| Some((item.id, *item.lease()?)));
        self.leases.set_timeout(timeout, live);
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
            outfile: self.config.outfile.clone(),
            checkpoint: self.config.checkpoint.clone(),
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
        self.config.files().finish(lock)?;
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

    /// Where the job stands.
    pub fn stats(&self, now: Instant) -> LedgerStats {
        let in_flight = self.items.len() as u64 - self.queued;
        let oldest_in_flight = self
            .items
            .iter()
            .filter_map(|(_, item)| Some((item.lease()?.issued_at, item.id, item.retry_count)))
            .min()
            .map(|(issued_at, work_id, retry_count)| OldestInFlight {
                work_id,
                age_secs: now.saturating_duration_since(issued_at).as_secs_f64(),
                retry_count,
            });
        let next_write_id = self.window.next_write_id();
        let c = &self.counters;
        LedgerStats {
            lines_written: next_write_id,
            next_work_id: self.next_work_id,
            lines_total: self.input_exhausted.then_some(self.next_work_id),
            input_bytes_consumed: self.input.next_offset(),
            input_bytes_total: self.input.len_when_opened(),
            in_flight,
            queued_for_reissue: self.queued,
            reorder_lines: self.window.finished(),
            reorder_bytes: self.window.mem_bytes(),
            reorder_spilled: self.window.spilled(),
            lease_entries: self.leases.entries() as u64,
            reissues: c.reissues,
            tombstones: c.tombstones,
            invalid_lines: c.invalid_lines,
            kept_lines: c.kept,
            failed_by_kind: c.failed_by_kind.clone(),
            journal: self.journal_stats().unwrap_or_default(),
            ignored_results: c.ignored_results,
            issued_total: c.issued_total,
            completed_total: c.completed_total,
            backups_issued: c.backups_issued,
            oldest_in_flight,
            blocking: self.item(next_write_id).map(|item| BlockingLine {
                work_id: next_write_id,
                age_secs: now
                    .saturating_duration_since(item.first_issued)
                    .as_secs_f64(),
                state: match item.state {
                    ItemState::InFlight(_) => "in_flight".into(),
                    ItemState::Queued => "queued".into(),
                },
                waiting_lines: self.window.finished(),
            }),
            work_timeout: self.leases.timeout(),
            max_retries: self.config.max_retries,
            complete: self.is_complete(),
            uptime: now.saturating_duration_since(c.started),
        }
    }

    /// Seconds a worker should wait when nothing is issuable: `--retry`, or less
    /// when an in-flight item expires sooner.
    fn retry_in(&self, now: Instant) -> u64 {
        let until_expiry = self
            .leases
            .next_deadline()
            .map(|deadline| deadline.saturating_duration_since(now).as_secs() + 1);
        until_expiry
            .map_or(self.config.retry_secs, |s| s.min(self.config.retry_secs))
            .max(1)
    }

    fn compact_leases(&mut self) {
        let live = self.items.len() - self.queued as usize;
        let (items, window) = (&self.items, &self.window);
        self.leases.compact(live, |id, seq| {
            window
                .issued(id)
                .and_then(|(_, key)| items[key].lease())
                .is_some_and(|lease| lease.is_current(seq))
        });
    }

    /// Requeues (or tombstones) every item whose lease has ended at `now`,
    /// after checking (once a second) that the input has not changed.
    fn expire(&mut self, now: Instant) -> io::Result<()> {
        if now >= self.next_input_check {
            self.input.check_unchanged()?;
            self.next_input_check = now + INPUT_CHECK_EVERY;
        }
        while let Some((id, seq)) = self.leases.pop_expired(now) {
            let Some(key) = self.key_of(id) else {
                continue;
            };
            let item = &mut self.items[key];
            let ItemState::InFlight(lease) = &mut item.state else {
                continue;
            };
            if !lease.is_current(seq) {
                continue;
            }
            // A worker that heartbeats keeps every lease it holds: renewed
            // from its last heartbeat, and expired only if that is too old.
            let heard = [item.holder, item.backup_holder]
                .into_iter()
                .flatten()
                .filter_map(|w| self.alive.get(&w).copied())
                .max();
            if heard.is_some_and(|at| self.leases.renew_from(id, lease, at)) {
                continue;
            }
            if self.requeue(id, Cause::Timeout)? {
                self.queue.push_back(id);
            }
        }
        Ok(())
    }

    /// The lease of line `id`, when it is in flight.
    fn lease_of(&self, id: u64) -> Option<&Lease> {
        self.item(id)?.lease()
    }

    /// The slab key of line `id`'s item, when it is issued or queued without a
    /// result. A key rather than a reference, so that callers can borrow the
    /// item (`&mut self.items[key]`) beside the ledger's other fields.
    fn key_of(&self, id: u64) -> Option<usize> {
        self.window.issued(id).map(|(_, key)| key)
    }

    /// The item of line `id`, when it is issued or queued without a result.
    fn item(&self, id: u64) -> Option<&Item> {
        self.key_of(id).map(|key| &self.items[key])
    }

    /// Takes the item of line `id` out, leaving its slot open for the window's
    /// `finish`.
    fn take_item(&mut self, id: u64) -> Option<Item> {
        let (slot, key) = self.window.issued(id)?;
        self.window.open(slot);
        Some(self.items.remove(key))
    }

    /// Marks an in-flight item as queued for reissue (the caller puts it in the
    /// queue, at the front or the back) and returns true, or tombstones it when
    /// its reissues are used up and returns false.
    fn requeue(&mut self, id: u64, cause: Cause) -> io::Result<bool> {
        let key = self.key_of(id).expect("requeue of an issued item");
        let item = &mut self.items[key];
        if item.backed_up {
            // The copy may still answer; the item is open to a new backup.
            item.backed_up = false;
            item.backup_holder = None;
            self.backups_out -= 1;
        }
        cause.tally(&mut item.reissues);
        let (used, budget, error) = if cause.is_failure() {
            (
                item.retry_count,
                self.config.max_retries,
                "max_retries_exceeded",
            )
        } else {
            (
                item.releases,
                self.config.max_releases,
                "max_releases_exceeded",
            )
        };
        if budget.is_some_and(|max| used >= max) {
            let item = self.take_item(id).expect("present");
            let content = self.input.read_span(item.span)?;
            self.counters.tombstones += 1;
            tracing::warn!(work_id = id, error, history = ?item.reissues, "tombstoned");
            let record = crate::record::tombstone(error, id, &content, item.reissues);
            self.counters.finished(&record);
            self.window.finish(id, record.into(), item.span.end)?;
            return Ok(false);
        }
        if cause.is_failure() {
            item.retry_count += 1;
        } else {
            item.releases += 1;
        }
        if cause == Cause::Retry {
            item.avoid = item.holder;
            // The attempt rejected what it got: the next one must ask the
            // engine again, not replay it.
            if let Some(journal) = &mut self.journal {
                journal.forget_line(id)?;
            }
        }
        item.state = ItemState::Queued;
        self.queued += 1;
        cause.tally(&mut self.counters.reissues);
        Ok(true)
    }

    /// Notices the end of the input once everything read is written, so that
    /// completion does not wait for another work request.
    fn check_eof(&mut self) -> io::Result<()> {
        if !self.input_exhausted && self.window.next_write_id() == self.next_work_id {
            self.input_exhausted = self.input.at_eof()?;
            if self.input_exhausted {
                self.input.check_unchanged()?;
            }
        }
        Ok(())
    }
}

/// Lines told to one worker at its next heartbeat at most: a worker that
/// never comes back must not make the list grow without bound.
const MAX_FINISHED_ELSEWHERE: usize = 4096;

/// How often the ledger checks that its input has not changed.
const INPUT_CHECK_EVERY: Duration = Duration::from_secs(1);

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
            checkpoint: config.checkpoint.clone(),
            reason: format!(
                "its line ending at byte {offset} had no newline (it was the last line) and has since been extended; lines appended to an input must start on a new line. Restore that line (cut what was appended to it, then add a newline before the new lines)"
            ),
        }),
    }
}
