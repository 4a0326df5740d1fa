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
//! Work ids are handed out in input order and written in input order, so one
//! window indexed by `id - next_write_id` finds every line that is not written
//! yet without hashing; items live in a slab so that a window slot stays small
//! when millions of finished lines wait behind a stuck one.

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use slab::Slab;
use tokio::time::Instant;

use crate::checkpoint::{Checkpoint, JobLock, ResumeError};
use crate::error::{path_error, IoContext};
use crate::input::{InputReader, LineSpan};
use crate::output::OutputWriter;
use crate::protocol::{
    error_record, tombstone, BlockingLine, OldestInFlight, ReissueCounts, ReleaseReason,
    StatusResponse, WorkItem, WorkStatus,
};

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
        }
    }

    /// Where results past `max_pending_bytes` go.
    pub fn spill_path(&self) -> PathBuf {
        crate::checkpoint::with_suffix(&self.outfile, ".pending")
    }
}

/// Default `--max-releases`: preemptions are not the item's fault; only an item
/// released this often (a poison item that kills workers) is given up.
pub const DEFAULT_MAX_RELEASES: u32 = 50;
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
    /// The worker of its current issue, when the worker says who it is.
    holder: Option<u64>,
    state: ItemState,
}

#[derive(Debug)]
enum ItemState {
    /// With a worker since `issued_at`; `seq` tells its heap entry from stale ones.
    InFlight { issued_at: Instant, seq: u64 },
    /// Waiting in `queue` to be issued again.
    Queued,
}

/// A finished line waiting for an earlier one.
#[derive(Debug)]
struct Done {
    line: Box<str>,
    /// Where the next input line starts: the resume offset once this is written.
    input_end: u64,
}

/// One line of the window.
#[derive(Debug)]
enum Slot {
    /// Issued (or queued for reissue) without a result: its item is
    /// `items[key]`.
    Issued(usize),
    /// Without an item and not finished: only between taking an item out and
    /// finishing its line.
    Open,
    /// Finished, kept in memory.
    Mem(Done),
    /// Finished, spilled to the pending file at `offset` (`len` bytes).
    Disk {
        offset: u64,
        len: u32,
        input_end: u64,
    },
}

// Every line between the last written and the last read costs one slot: keep
// it at the 32 bytes that README.md and BENCHMARKS.md state.
const _: () = assert!(std::mem::size_of::<Slot>() == 32);

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
    /// Results refused, with why; their items stay in flight.
    pub refused: Vec<(u64, String)>,
}

/// The state of one job: see the module docs for its invariants.
#[derive(Debug)]
pub struct Ledger {
    config: LedgerConfig,
    /// Held while the ledger lives: no second process touches these files.
    _lock: JobLock,
    /// Sequential reader positioned at line `next_work_id`.
    input: InputReader,
    /// Output positioned after line `next_write_id - 1`.
    output: OutputWriter,
    /// Whether the reader has seen the end of the input.
    input_exhausted: bool,
    /// Id of the next line to read from the input.
    next_work_id: u64,
    /// Issued lines without a result, addressed by their window slot.
    items: Slab<Item>,
    /// Ids waiting to be reissued, in order; may hold ids finished meanwhile,
    /// which are skipped.
    queue: VecDeque<u64>,
    /// How many `items` are [`ItemState::Queued`].
    queued: u64,
    /// Deadlines of in-flight items, `(deadline, id, seq)` in deadline order:
    /// every issue gets `now + work_timeout`, so appending keeps the order (a
    /// timeout change rebuilds it). Entries whose `seq` no longer matches the
    /// item's issue are stale and skipped.
    deadlines: VecDeque<(Instant, u64, u64)>,
    /// Issue counter, to tell deadline entries of successive issues apart.
    seq: u64,
    /// The window: slot `k` is line `next_write_id + k`, for every line read and
    /// not written yet. Its finished slots are the reorder buffer; its front is
    /// unfinished until line `next_write_id` is done.
    window: VecDeque<Slot>,
    /// How many slots of `window` are finished (in memory or spilled).
    reorder_len: u64,
    /// Bytes of results in `window` kept in memory (at most `max_pending_bytes`).
    reorder_bytes: u64,
    /// How many finished slots are spilled.
    spilled: u64,
    /// The spill file, opened on the first spill; emptied whenever nothing in
    /// it is waiting any more. Never read on resume: a restart redoes lines
    /// that were not written yet.
    spill: Option<SpillFile>,
    /// Backup copies out (items with `backed_up`).
    backups_out: u32,
    /// Backup copies handed out by this run.
    backups_issued: u64,
    /// Id of the next line to write.
    next_write_id: u64,
    /// Input offset of line `next_write_id`.
    written_input_offset: u64,
    /// The input's size when opened.
    input_len: u64,
    started: Instant,
    reissues: ReissueCounts,
    tombstones: u64,
    invalid_lines: u64,
    ignored_results: u64,
    /// Issues made by this run (reissues included), for metrics.
    issued_total: u64,
    /// Results accepted by this run, for metrics.
    completed_total: u64,
    /// Output lines found past the checkpoint at open.
    recovered_past_checkpoint: u64,
}

/// A checkpoint whose state was taken by [`Ledger::begin_checkpoint`] and
/// which is not written yet.
#[derive(Debug)]
#[must_use = "nothing is written until `commit`"]
pub struct PendingCheckpoint {
    /// A handle on the output, for its fsync.
    output: std::fs::File,
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
        Checkpoint::capture(
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
        let lock = JobLock::acquire(&config.checkpoint)?;
        // Results spilled by an earlier run were never written: those lines are
        // redone, so the file is stale.
        match std::fs::remove_file(config.spill_path()) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(path_error(
                    e,
                    "remove the stale pending-results file",
                    &config.spill_path(),
                )
                .into())
            }
            _ => {}
        }
        let loaded = Checkpoint::load(&config.checkpoint)?;
        let (lines, input_offset, output_offset) = match &loaded {
            Some(cp) => {
                cp.verify(&config.checkpoint, &config.infile, &config.outfile)?;
                (cp.lines_written, cp.input_offset, cp.output_offset)
            }
            None => match std::fs::metadata(&config.outfile) {
                Ok(m) if m.len() > 0 => {
                    return Err(ResumeError::OutputWithoutCheckpoint {
                        output: config.outfile.clone(),
                        checkpoint: config.checkpoint.clone(),
                        len: m.len(),
                    })
                }
                _ => (0, 0, 0),
            },
        };
        let (recovered, output) = OutputWriter::recover(&config.outfile, output_offset)?;
        if recovered.torn_bytes > 0 {
            tracing::warn!(
                output = %config.outfile.display(),
                bytes = recovered.torn_bytes,
                "cut off a torn last output line; its input line will be redone"
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
        let input_len = input.len()?;
        let mut ledger = Ledger {
            _lock: lock,
            output,
            written_input_offset: input.next_offset(),
            input,
            config,
            input_exhausted: false,
            next_work_id: lines,
            items: Slab::new(),
            queue: VecDeque::new(),
            queued: 0,
            deadlines: VecDeque::new(),
            seq: 0,
            window: VecDeque::new(),
            reorder_len: 0,
            reorder_bytes: 0,
            spilled: 0,
            spill: None,
            backups_out: 0,
            backups_issued: 0,
            next_write_id: lines,
            input_len,
            started: now,
            reissues: ReissueCounts::default(),
            tombstones: 0,
            invalid_lines: 0,
            ignored_results: 0,
            issued_total: 0,
            completed_total: 0,
            recovered_past_checkpoint: recovered.extra_lines,
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

    /// Output lines written so far.
    pub fn lines_written(&self) -> u64 {
        self.next_write_id
    }

    /// Whether every input line has its output line.
    pub fn is_complete(&self) -> bool {
        self.input_exhausted && self.next_write_id == self.next_work_id
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
        while items.len() < batch {
            if let Some(id) = self.queue.pop_front() {
                if let Some(key) = self.key_of(id) {
                    let item = &mut self.items[key];
                    debug_assert!(matches!(item.state, ItemState::Queued));
                    let content = self.input.read_span(item.span)?;
                    self.queued -= 1;
                    self.seq += 1;
                    item.holder = worker;
                    item.state = ItemState::InFlight {
                        issued_at: now,
                        seq: self.seq,
                    };
                    self.deadlines
                        .push_back((now + self.config.work_timeout, id, self.seq));
                    items.push(WorkItem {
                        work_id: id,
                        content,
                        result: None,
                        retry_count: item.retry_count,
                        max_retries: self.config.max_retries,
                    });
                }
                continue;
            }
            if self.input_exhausted {
                break;
            }
            let Some(line) = self.input.next_line()? else {
                self.input_exhausted = true;
                break;
            };
            let id = self.next_work_id;
            self.next_work_id += 1;
            match line.content {
                Ok(content) => {
                    self.seq += 1;
                    let key = self.items.insert(Item {
                        id,
                        span: line.span,
                        retry_count: 0,
                        releases: 0,
                        reissues: ReissueCounts::default(),
                        first_issued: now,
                        backed_up: false,
                        holder: worker,
                        state: ItemState::InFlight {
                            issued_at: now,
                            seq: self.seq,
                        },
                    });
                    self.window.push_back(Slot::Issued(key));
                    self.deadlines
                        .push_back((now + self.config.work_timeout, id, self.seq));
                    items.push(WorkItem {
                        work_id: id,
                        content,
                        result: None,
                        retry_count: 0,
                        max_retries: self.config.max_retries,
                    });
                }
                Err(bytes) => {
                    self.invalid_lines += 1;
                    self.window.push_back(Slot::Open);
                    let record = invalid_utf8_record(
                        id,
                        line.span,
                        &self.config.infile.display().to_string(),
                        &bytes,
                    );
                    self.finish(id, record.into(), line.span.end)?;
                }
            }
        }
        if items.is_empty() && self.queued == 0 && self.input_exhausted {
            self.issue_backups(batch, now, worker, &mut items)?;
        }
        self.write_ready()?;
        self.check_eof()?;
        self.issued_total += items.len() as u64;
        Ok(if !items.is_empty() {
            WorkReply {
                status: WorkStatus::Ok,
                retry_in: None,
                items,
            }
        } else if self.is_complete() {
            WorkReply {
                status: WorkStatus::AllWorkComplete,
                retry_in: None,
                items,
            }
        } else {
            WorkReply {
                status: WorkStatus::Retry,
                retry_in: Some(self.retry_in(now)),
                items,
            }
        })
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
        let mut candidates: Vec<(Instant, u64, usize)> = self
            .items
            .iter()
            .filter(|(_, item)| !item.backed_up && (worker.is_none() || item.holder != worker))
            .filter_map(|(key, item)| match item.state {
                ItemState::InFlight { issued_at, .. }
                    if now.saturating_duration_since(issued_at) >= self.config.backup_after =>
                {
                    Some((issued_at, item.id, key))
                }
                _ => None,
            })
            .collect();
        candidates.sort_unstable();
        for (_, id, key) in candidates.into_iter().take(allowed) {
            let item = &mut self.items[key];
            item.backed_up = true;
            self.backups_out += 1;
            self.backups_issued += 1;
            items.push(WorkItem {
                work_id: id,
                content: self.input.read_span(item.span)?,
                result: None,
                retry_count: item.retry_count,
                max_retries: self.config.max_retries,
            });
        }
        Ok(())
    }

    /// A worker is alive and still working on `ids`: their leases run for the
    /// work timeout from `now`. Returns how many were extended and which ids
    /// are already done (the worker may drop them).
    pub fn heartbeat(&mut self, ids: &[u64], now: Instant) -> (u64, Vec<u64>) {
        let mut extended = 0;
        let mut done = Vec::new();
        for &id in ids {
            match self.key_of(id) {
                Some(key) => {
                    let item = &mut self.items[key];
                    if let ItemState::InFlight { issued_at, .. } = item.state {
                        self.seq += 1;
                        item.state = ItemState::InFlight {
                            issued_at,
                            seq: self.seq,
                        };
                        self.deadlines
                            .push_back((now + self.config.work_timeout, id, self.seq));
                        extended += 1;
                    }
                }
                None if id < self.next_work_id => done.push(id),
                None => {}
            }
        }
        self.compact_deadlines();
        (extended, done)
    }

    /// Records results; the first result of an item wins. A result must be one
    /// JSON value on one line, else it is refused and its item stays in flight.
    pub fn complete(&mut self, results: Vec<WorkItem>) -> io::Result<CompleteReply> {
        let (valid, refused) = check_results(results.into_iter().map(|r| (r.work_id, r.result)));
        let mut reply = self.complete_valid(valid)?;
        reply.refused = refused;
        Ok(reply)
    }

    /// [`complete`](Self::complete) for results already checked with
    /// [`check_results`] (the HTTP layer checks outside the ledger's lock).
    pub fn complete_valid(&mut self, results: Vec<IdLine>) -> io::Result<CompleteReply> {
        let mut reply = CompleteReply::default();
        for (id, line) in results {
            match self.take_item(id) {
                Some(item) => {
                    if matches!(item.state, ItemState::Queued) {
                        self.queued -= 1;
                    }
                    if item.backed_up {
                        self.backups_out -= 1;
                    }
                    self.finish(id, line.into_boxed_str(), item.span.end)?;
                    reply.accepted += 1;
                }
                None => {
                    reply.ignored += 1;
                    if id < self.next_work_id {
                        reply.already_done.push(id);
                    }
                }
            }
        }
        self.ignored_results += reply.ignored;
        self.completed_total += reply.accepted;
        self.compact_deadlines();
        self.write_ready()?;
        Ok(reply)
    }

    /// Puts in-flight items back at the front of the queue, in the given order.
    /// Returns how many were in flight. `cause` is [`Cause::Release`]
    /// (preemption) or [`Cause::Retry`] (the task asked for another attempt).
    pub fn release(&mut self, ids: &[u64], cause: Cause) -> io::Result<u64> {
        let mut released = 0;
        let mut front = Vec::new();
        for &id in ids {
            if self.is_in_flight(id) {
                released += 1;
                if self.requeue(id, cause)? {
                    front.push(id);
                }
            }
        }
        for &id in front.iter().rev() {
            self.queue.push_front(id);
        }
        self.write_ready()?;
        Ok(released)
    }

    /// Reissues (or tombstones) items whose work timeout has passed, and writes
    /// what became ready.
    pub fn tick(&mut self, now: Instant) -> io::Result<()> {
        self.expire(now)?;
        self.write_ready()?;
        self.check_eof()
    }

    /// Changes the work timeout; in-flight items get deadlines from it too.
    pub fn set_work_timeout(&mut self, timeout: Duration) {
        self.config.work_timeout = timeout;
        let mut live: Vec<(Instant, u64, u64)> = self
            .items
            .iter()
            .filter_map(|(_, item)| match item.state {
                ItemState::InFlight { issued_at, seq } => Some((issued_at + timeout, item.id, seq)),
                ItemState::Queued => None,
            })
            .collect();
        live.sort_unstable();
        self.deadlines = live.into();
    }

    /// Makes the output durable and records it in the checkpoint.
    pub fn checkpoint(&mut self) -> io::Result<()> {
        self.begin_checkpoint()?.commit()
    }

    /// Takes the state a checkpoint records (flushing the output); its slow
    /// part, [`PendingCheckpoint::commit`], needs no access to the ledger, so
    /// a server runs it without holding the ledger's lock.
    pub fn begin_checkpoint(&mut self) -> io::Result<PendingCheckpoint> {
        Ok(PendingCheckpoint {
            output: self.output.flush_for_sync()?,
            infile: self.config.infile.clone(),
            outfile: self.config.outfile.clone(),
            checkpoint: self.config.checkpoint.clone(),
            lines_written: self.next_write_id,
            input_offset: self.written_input_offset,
            output_offset: self.output.len(),
        })
    }

    /// Output lines the last run wrote after its last checkpoint, found in the
    /// output when this ledger was opened (after a crash). Until the next
    /// checkpoint names them, another crash recounts them.
    pub fn recovered_past_checkpoint(&self) -> u64 {
        self.recovered_past_checkpoint
    }

    /// The counts of `GET /status`.
    pub fn status(&self, now: Instant) -> StatusResponse {
        let in_flight = self.items.len() as u64 - self.queued;
        let oldest_in_flight = self
            .items
            .iter()
            .filter_map(|(_, item)| match item.state {
                ItemState::InFlight { issued_at, .. } => {
                    Some((issued_at, item.id, item.retry_count))
                }
                ItemState::Queued => None,
            })
            .min()
            .map(|(issued_at, work_id, retry_count)| OldestInFlight {
                work_id,
                age_secs: now.saturating_duration_since(issued_at).as_secs_f64(),
                retry_count,
            });
        StatusResponse {
            last_processed_work_id: self.next_write_id as i64 - 1,
            next_work_id: self.next_work_id,
            issued: in_flight,
            pending: self.reorder_len,
            heap_size: self.deadlines.len() as u64,
            expired_reissues: self.reissues.timeout,
            lines_done: self.next_write_id,
            lines_total: self.input_exhausted.then_some(self.next_work_id),
            input_bytes_consumed: self.input.next_offset(),
            input_bytes_total: self.input_len,
            in_flight,
            queued_for_reissue: self.queued,
            reorder_buffer: self.reorder_len,
            reorder_buffer_bytes: self.reorder_bytes,
            reissues: self.reissues,
            tombstones: self.tombstones,
            invalid_lines: self.invalid_lines,
            ignored_results: self.ignored_results,
            issued_total: self.issued_total,
            completed_total: self.completed_total,
            oldest_in_flight,
            blocking: self.item(self.next_write_id).map(|item| BlockingLine {
                work_id: self.next_write_id,
                age_secs: now
                    .saturating_duration_since(item.first_issued)
                    .as_secs_f64(),
                state: match item.state {
                    ItemState::InFlight { .. } => "in_flight".into(),
                    ItemState::Queued => "queued".into(),
                },
                waiting_lines: self.reorder_len,
            }),
            reorder_buffer_spilled: self.spilled,
            backups_issued: self.backups_issued,
            work_timeout_secs: self.config.work_timeout.as_secs_f64(),
            max_retries: self.config.max_retries.map_or(-1, i64::from),
            complete: self.is_complete(),
            uptime_secs: now.saturating_duration_since(self.started).as_secs_f64(),
        }
    }

    /// Seconds a worker should wait when nothing is issuable: `--retry`, or less
    /// when an in-flight item expires sooner.
    fn retry_in(&self, now: Instant) -> u64 {
        let until_expiry = self
            .deadlines
            .front()
            .map(|(deadline, _, _)| deadline.saturating_duration_since(now).as_secs() + 1);
        until_expiry
            .map_or(self.config.retry_secs, |s| s.min(self.config.retry_secs))
            .max(1)
    }

    /// Drops deadline entries of items that are no longer in flight once they
    /// outnumber the live ones, so the queue stays proportional to what is in
    /// flight rather than to the issue rate times the timeout. Amortized O(1).
    fn compact_deadlines(&mut self) {
        let live = self.items.len() - self.queued as usize;
        if self.deadlines.len() > 2 * live + 1024 {
            let mut deadlines = std::mem::take(&mut self.deadlines);
            deadlines.retain(|&(_, id, seq)| self.is_current(id, seq));
            self.deadlines = deadlines;
        }
    }

    fn expire(&mut self, now: Instant) -> io::Result<()> {
        while let Some(&(deadline, id, seq)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            if self.is_current(id, seq) && self.requeue(id, Cause::Timeout)? {
                self.queue.push_back(id);
            }
        }
        Ok(())
    }

    fn is_in_flight(&self, id: u64) -> bool {
        self.issue_seq(id).is_some()
    }

    /// Whether deadline entry `(id, seq)` is the live issue of an in-flight item.
    fn is_current(&self, id: u64, seq: u64) -> bool {
        self.issue_seq(id) == Some(seq)
    }

    /// The issue sequence number of line `id` when it is in flight.
    fn issue_seq(&self, id: u64) -> Option<u64> {
        match self.item(id)?.state {
            ItemState::InFlight { seq, .. } => Some(seq),
            ItemState::Queued => None,
        }
    }

    /// The slab key of line `id`'s item, when it is issued or queued without a
    /// result. A key rather than a reference, so that callers can borrow the
    /// item (`&mut self.items[key]`) beside the ledger's other fields.
    fn key_of(&self, id: u64) -> Option<usize> {
        self.issued_slot(id).map(|(_, key)| key)
    }

    /// The window index and slab key of line `id`, when it is issued or
    /// queued without a result.
    fn issued_slot(&self, id: u64) -> Option<(usize, usize)> {
        let slot = usize::try_from(id.checked_sub(self.next_write_id)?).ok()?;
        match *self.window.get(slot)? {
            Slot::Issued(key) => Some((slot, key)),
            _ => None,
        }
    }

    /// The item of line `id`, when it is issued or queued without a result.
    fn item(&self, id: u64) -> Option<&Item> {
        self.key_of(id).map(|key| &self.items[key])
    }

    /// Takes the item of line `id` out, leaving its slot open for
    /// [`finish`](Self::finish).
    fn take_item(&mut self, id: u64) -> Option<Item> {
        let (slot, key) = self.issued_slot(id)?;
        self.window[slot] = Slot::Open;
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
            self.tombstones += 1;
            tracing::warn!(work_id = id, error, history = ?item.reissues, "tombstoned");
            self.finish(
                id,
                tombstone(error, id, &content, item.reissues).into(),
                item.span.end,
            )?;
            return Ok(false);
        }
        if cause.is_failure() {
            item.retry_count += 1;
        } else {
            item.releases += 1;
        }
        item.state = ItemState::Queued;
        self.queued += 1;
        cause.tally(&mut self.reissues);
        Ok(true)
    }

    /// Puts a finished line into the reorder window: in memory while the
    /// buffer is under `max_pending_bytes` (or when it is next to write),
    /// spilled to the pending file otherwise.
    fn finish(&mut self, id: u64, line: Box<str>, input_end: u64) -> io::Result<()> {
        let slot = (id - self.next_write_id) as usize;
        debug_assert!(
            matches!(self.window[slot], Slot::Open),
            "line {id} finished twice or without taking its item"
        );
        self.reorder_len += 1;
        let len = line.len() as u64;
        if slot == 0 || self.reorder_bytes + len <= self.config.max_pending_bytes {
            self.reorder_bytes += len;
            self.window[slot] = Slot::Mem(Done { line, input_end });
            return Ok(());
        }
        if self.spill.is_none() {
            self.spill = Some(SpillFile::create(self.config.spill_path())?);
        }
        let offset = self.spill.as_mut().expect("created above").append(&line)?;
        self.spilled += 1;
        self.window[slot] = Slot::Disk {
            offset,
            len: len as u32,
            input_end,
        };
        Ok(())
    }

    /// Writes every result that is next in order, then flushes.
    fn write_ready(&mut self) -> io::Result<()> {
        let mut wrote = false;
        loop {
            let (line, input_end) = match self.window.front() {
                Some(Slot::Mem(_)) => match self.window.pop_front() {
                    Some(Slot::Mem(done)) => {
                        self.reorder_bytes -= done.line.len() as u64;
                        (done.line, done.input_end)
                    }
                    _ => unreachable!("checked above"),
                },
                Some(&Slot::Disk {
                    offset,
                    len,
                    input_end,
                }) => {
                    self.window.pop_front();
                    let spill = self.spill.as_mut().expect("a spilled slot has a file");
                    self.spilled -= 1;
                    (spill.read(offset, len)?.into_boxed_str(), input_end)
                }
                _ => break,
            };
            self.reorder_len -= 1;
            self.output.write_line(&line)?;
            self.next_write_id += 1;
            self.written_input_offset = input_end;
            wrote = true;
        }
        if self.spilled == 0 {
            if let Some(spill) = self.spill.as_mut() {
                spill.clear()?;
            }
        }
        if wrote {
            self.output.flush()?;
        }
        Ok(())
    }

    /// Notices the end of the input once everything read is written, so that
    /// completion does not wait for another work request.
    fn check_eof(&mut self) -> io::Result<()> {
        if !self.input_exhausted && self.next_write_id == self.next_work_id {
            self.input_exhausted = self.input.at_eof()?;
        }
        Ok(())
    }
}

/// Results spilled out of the reorder buffer. Append-only while anything in it
/// waits; truncated when nothing does, so it never outgrows what is waiting.
#[derive(Debug)]
struct SpillFile {
    path: PathBuf,
    file: std::fs::File,
    len: u64,
}

impl SpillFile {
    fn create(path: PathBuf) -> io::Result<SpillFile> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .with_path("create the pending-results file", &path)?;
        Ok(SpillFile { path, file, len: 0 })
    }

    /// Appends `line`; returns its offset.
    fn append(&mut self, line: &str) -> io::Result<u64> {
        use std::os::unix::fs::FileExt;
        let offset = self.len;
        self.file
            .write_all_at(line.as_bytes(), offset)
            .with_path("write the pending-results file", &self.path)?;
        self.len += line.len() as u64;
        Ok(offset)
    }

    fn read(&self, offset: u64, len: u32) -> io::Result<String> {
        let bytes = crate::input::read_exact_at(&self.file, offset, len as usize)
            .with_path("read the pending-results file", &self.path)?;
        String::from_utf8(bytes).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: a spilled result changed on disk", self.path.display()),
            )
        })
    }

    fn clear(&mut self) -> io::Result<()> {
        if self.len > 0 {
            self.file
                .set_len(0)
                .with_path("truncate the pending-results file", &self.path)?;
            self.len = 0;
        }
        Ok(())
    }
}

/// A work id with a text: a result line, or why it was refused.
pub type IdLine = (u64, String);

/// Splits `(work_id, result)` pairs into `(work_id, line)` pairs whose result
/// is one JSON value on one line, and refusals `(work_id, why)`.
pub fn check_results(
    results: impl ExactSizeIterator<Item = (u64, Option<String>)>,
) -> (Vec<IdLine>, Vec<IdLine>) {
    let mut valid = Vec::with_capacity(results.len());
    let mut refused = Vec::new();
    for (id, result) in results {
        match result {
            Some(s) => match check_result_line(&s) {
                Ok(()) => valid.push((id, s)),
                Err(why) => refused.push((id, why)),
            },
            None => refused.push((id, "its result is null".into())),
        }
    }
    (valid, refused)
}

/// Checks that a result is one JSON value that fits on one output line.
pub fn check_result_line(s: &str) -> Result<(), String> {
    if memchr::memchr2(b'\n', b'\r', s.as_bytes()).is_some() {
        return Err("its result contains a line break; serialize it as compact JSON".into());
    }
    serde_json::from_str::<serde::de::IgnoredAny>(s)
        .map(|_| ())
        .map_err(|e| format!("its result is not one JSON value ({e})"))
}

fn invalid_utf8_record(id: u64, span: LineSpan, infile: &str, bytes: &[u8]) -> String {
    let mut f = serde_json::Map::new();
    f.insert("error".into(), "invalid_utf8".into());
    f.insert("work_id".into(), id.into());
    f.insert(
        "message".into(),
        format!(
            "input line {id} (byte offset {}) of {infile} is not valid UTF-8; it was not sent to any worker",
            span.offset
        )
        .into(),
    );
    f.insert(
        "original_content".into(),
        String::from_utf8_lossy(bytes).into_owned().into(),
    );
    error_record(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const TIMEOUT: Duration = Duration::from_secs(10);

    struct Job {
        dir: tempfile::TempDir,
        config: LedgerConfig,
    }

    impl Job {
        fn new(input: &[u8], max_retries: Option<u32>) -> Job {
            let dir = tempfile::tempdir().unwrap();
            let infile = dir.path().join("in.jsonl");
            std::fs::write(&infile, input).unwrap();
            let config = LedgerConfig {
                work_timeout: TIMEOUT,
                max_retries,
                ..LedgerConfig::new(
                    infile,
                    dir.path().join("out.jsonl"),
                    dir.path().join("out.jsonl.checkpoint"),
                )
            };
            Job { dir, config }
        }

        fn open(&self, now: Instant) -> Result<Ledger, ResumeError> {
            Ledger::open(self.config.clone(), now)
        }

        fn output(&self) -> String {
            std::fs::read_to_string(&self.config.outfile).unwrap_or_default()
        }

        fn path(&self, name: &str) -> std::path::PathBuf {
            self.dir.path().join(name)
        }
    }

    fn lines(n: u64) -> Vec<u8> {
        (0..n)
            .map(|i| format!("{{\"i\":{i}}}\n"))
            .collect::<String>()
            .into_bytes()
    }

    fn ids(reply: &WorkReply) -> Vec<u64> {
        reply.items.iter().map(|i| i.work_id).collect()
    }

    fn result(id: u64, value: &str) -> WorkItem {
        WorkItem {
            work_id: id,
            content: String::new(),
            result: Some(value.to_string()),
            retry_count: 0,
            max_retries: None,
        }
    }

    #[test]
    fn issues_in_order_and_writes_results_in_input_order() {
        let job = Job::new(&lines(3), Some(3));
        let t = Instant::now();
        let mut l = job.open(t).unwrap();
        let r = l.take_work(2, t).unwrap();
        assert_eq!((r.status, ids(&r)), (WorkStatus::Ok, vec![0, 1]));
        assert_eq!(r.items[1].content, r#"{"i":1}"#);
        assert_eq!(r.items[0].max_retries, Some(3));
        let r = l.take_work(5, t).unwrap();
        assert_eq!(ids(&r), vec![2]);
        let done = l.complete(vec![result(2, "2"), result(1, "1")]).unwrap();
        assert_eq!(done.accepted, 2);
        assert_eq!(
            job.output(),
            "",
            "line 0 is not done: nothing may be written"
        );
        assert_eq!(l.status(t).pending, 2);
        let r = l.take_work(1, t).unwrap();
        assert_eq!((r.status, r.retry_in.is_some()), (WorkStatus::Retry, true));
        l.complete(vec![result(0, "0")]).unwrap();
        assert_eq!(job.output(), "0\n1\n2\n");
        assert!(l.is_complete());
        assert_eq!(
            l.take_work(1, t).unwrap().status,
            WorkStatus::AllWorkComplete
        );
    }

    #[test]
    fn first_result_wins_and_unknown_ids_are_ignored() {
        let job = Job::new(&lines(2), Some(3));
        let t = Instant::now();
        let mut l = job.open(t).unwrap();
        l.take_work(1, t).unwrap();
        let r = l
            .complete(vec![
                result(0, "\"first\""),
                result(0, "\"second\""),
                result(1, "1"),
                result(99, "9"),
            ])
            .unwrap();
        assert_eq!((r.accepted, r.ignored, r.already_done), (1, 3, vec![0]));
        l.take_work(1, t).unwrap();
        l.complete(vec![result(1, "\"one\"")]).unwrap();
        assert_eq!(job.output(), "\"first\"\n\"one\"\n");
        assert_eq!(l.status(t).ignored_results, 3);
    }

    #[test]
    fn timeout_reissues_with_the_same_id_and_then_tombstones() {
        let job = Job::new(b"{\"i\":0}\n", Some(1));
        let t = Instant::now();
        let mut l = job.open(t).unwrap();
        assert_eq!(l.take_work(1, t).unwrap().items[0].retry_count, 0);
        let t = t + TIMEOUT;
        let r = l.take_work(1, t).unwrap();
        assert_eq!((ids(&r), r.items[0].retry_count), (vec![0], 1));
        assert_eq!(l.status(t).expired_reissues, 1);
        l.tick(t + TIMEOUT).unwrap();
        let out: serde_json::Value = serde_json::from_str(job.output().trim_end()).unwrap();
        assert_eq!(out["__ERROR__"]["error"], "max_retries_exceeded");
        assert_eq!(out["__ERROR__"]["work_id"], 0);
        assert_eq!(out["__ERROR__"]["original_content"], "{\"i\":0}");
        assert_eq!(l.status(t).tombstones, 1);
        assert!(l.is_complete());
    }

    #[test]
    fn unlimited_retries_never_tombstone() {
        let job = Job::new(&lines(1), None);
        let mut t = Instant::now();
        let mut l = job.open(t).unwrap();
        for round in 0..50 {
            let r = l.take_work(1, t).unwrap();
            assert_eq!(r.items[0].retry_count, round);
            t += TIMEOUT;
        }
        assert_eq!(l.status(t).tombstones, 0);
    }

    #[test]
    fn released_items_go_first_in_the_order_given() {
        let job = Job::new(&lines(6), Some(3));
        let t = Instant::now();
        let mut l = job.open(t).unwrap();
        l.take_work(4, t).unwrap();
        assert_eq!(
            l.release(&[2, 0, 7, 2], Cause::Release).unwrap(),
            2,
            "only items in flight count"
        );
        let r = l.take_work(3, t).unwrap();
        assert_eq!(ids(&r), vec![2, 0, 4]);
        assert_eq!(r.items[0].retry_count, 0, "a preemption is not a failure");
        l.release(&[2], Cause::Retry).unwrap();
        assert_eq!(
            l.take_work(1, t).unwrap().items[0].retry_count,
            1,
            "a task retry is"
        );
        assert_eq!(
            l.status(t).reissues,
            ReissueCounts {
                timeout: 0,
                release: 2,
                retry: 1,
            }
        );
    }

    #[test]
    fn a_result_for_a_queued_item_is_accepted_and_not_reissued() {
        let job = Job::new(&lines(2), Some(3));
        let t = Instant::now();
        let mut l = job.open(t).unwrap();
        l.take_work(1, t).unwrap();
        l.release(&[0], Cause::Release).unwrap();
        assert_eq!(l.complete(vec![result(0, "0")]).unwrap().accepted, 1);
        assert_eq!(ids(&l.take_work(5, t).unwrap()), vec![1]);
    }

    #[test]
    fn finished_items_in_the_reorder_buffer_are_never_reissued() {
        let job = Job::new(&lines(2), Some(3));
        let t = Instant::now();
        let mut l = job.open(t).unwrap();
        l.take_work(2, t).unwrap();
        l.complete(vec![result(1, "1")]).unwrap();
        let r = l.take_work(5, t + TIMEOUT).unwrap();
        assert_eq!(ids(&r), vec![0], "only the unfinished item comes back");
    }

    #[test]
    fn results_that_break_the_line_or_are_not_json_are_refused_and_stay_in_flight() {
        let job = Job::new(&lines(1), Some(3));
        let t = Instant::now();
        let mut l = job.open(t).unwrap();
        l.take_work(1, t).unwrap();
        for bad in ["{\"a\":\n1}", "not json", "1 2", ""] {
            let r = l.complete(vec![result(0, bad)]).unwrap();
            assert_eq!((r.accepted, r.refused.len()), (0, 1), "{bad:?}");
        }
        let mut null = result(0, "");
        null.result = None;
        assert_eq!(l.complete(vec![null]).unwrap().refused.len(), 1);
        assert_eq!(l.status(t).in_flight, 1);
        assert_eq!(
            l.complete(vec![result(0, " {\"ok\": true} ")])
                .unwrap()
                .accepted,
            1
        );
        assert_eq!(job.output(), " {\"ok\": true} \n");
    }

    #[test]
    fn blank_lines_invalid_utf8_and_a_missing_last_newline_keep_alignment() {
        let job = Job::new(b"a\n\n\xc3\x28\nlast", Some(3));
        let t = Instant::now();
        let mut l = job.open(t).unwrap();
        let r = l.take_work(10, t).unwrap();
        assert_eq!(ids(&r), vec![0, 1, 3]);
        assert_eq!(r.items[1].content, "");
        assert_eq!(r.items[2].content, "last");
        l.complete(vec![result(0, "0"), result(1, "1"), result(3, "3")])
            .unwrap();
        let out: Vec<String> = job.output().lines().map(String::from).collect();
        assert_eq!(out.len(), 4);
        assert!(
            out[2].contains("\"invalid_utf8\"") && out[2].contains("\"work_id\":2"),
            "{}",
            out[2]
        );
        assert_eq!(l.status(t).invalid_lines, 1);
        assert!(l.is_complete());
    }

    #[test]
    fn an_empty_input_is_complete_at_once() {
        let job = Job::new(b"", Some(3));
        let t = Instant::now();
        let l = job.open(t).unwrap();
        assert!(l.is_complete());
    }

    #[test]
    fn a_checkpoint_names_the_state_when_begun_while_lines_are_written_before_commit() {
        let job = Job::new(&lines(6), Some(3));
        let t = Instant::now();
        let mut l = job.open(t).unwrap();
        l.take_work(6, t).unwrap();
        l.complete(vec![result(0, "0"), result(1, "1")]).unwrap();
        let pending = l.begin_checkpoint().unwrap();
        // Requests go on while the checkpoint's fsyncs run.
        l.complete(vec![result(2, "2"), result(3, "3")]).unwrap();
        pending.commit().unwrap();
        drop(l);
        let cp = Checkpoint::load(&job.config.checkpoint).unwrap().unwrap();
        assert_eq!((cp.lines_written, cp.output_offset), (2, 4));
        let l = job.open(t).unwrap();
        assert_eq!(l.lines_written(), 4);
        assert_eq!(l.recovered_past_checkpoint(), 2);
        assert_eq!(job.output(), "0\n1\n2\n3\n");
    }

    #[test]
    fn resume_skips_lines_written_after_the_checkpoint_and_redoes_a_torn_one() {
        let job = Job::new(&lines(5), Some(3));
        let t = Instant::now();
        let mut l = job.open(t).unwrap();
        l.take_work(5, t).unwrap();
        l.complete(vec![result(0, "0")]).unwrap();
        l.checkpoint().unwrap();
        l.complete(vec![result(1, "1"), result(2, "2")]).unwrap();
        drop(l);
        // A crash in the middle of writing line 3.
        let mut out = job.output();
        out.push_str("{\"tor");
        std::fs::write(&job.config.outfile, out).unwrap();

        let l = job.open(t).unwrap();
        assert_eq!(l.lines_written(), 3);
        assert_eq!(l.recovered_past_checkpoint(), 2);
        // Opening writes no checkpoint (a server takes one right after): the
        // one on disk still names line 0 only and still matches the files.
        drop(l);
        let mut l = job.open(t).unwrap();
        assert_eq!((l.lines_written(), l.recovered_past_checkpoint()), (3, 2));
        let r = l.take_work(5, t).unwrap();
        assert_eq!(ids(&r), vec![3, 4]);
        assert_eq!(r.items[0].content, "{\"i\":3}");
        l.complete(vec![result(4, "4"), result(3, "3")]).unwrap();
        assert_eq!(job.output(), "0\n1\n2\n3\n4\n");
    }

    #[test]
    fn resume_refuses_a_truncated_output_a_foreign_output_and_a_different_input() {
        let job = Job::new(&lines(3), Some(3));
        let t = Instant::now();
        let mut l = job.open(t).unwrap();
        l.take_work(2, t).unwrap();
        l.complete(vec![result(0, "0"), result(1, "1")]).unwrap();
        l.checkpoint().unwrap();
        drop(l);

        std::fs::write(&job.config.outfile, "0\n").unwrap();
        let e = job.open(t).unwrap_err();
        assert!(matches!(e, ResumeError::OutputMismatch { .. }), "{e}");
        assert!(e.to_string().contains("out.jsonl"), "{e}");

        std::fs::write(&job.config.outfile, "0\n1\n").unwrap();
        std::fs::write(
            &job.config.infile,
            lines(3).into_iter().rev().collect::<Vec<u8>>(),
        )
        .unwrap();
        let e = job.open(t).unwrap_err();
        assert!(matches!(e, ResumeError::InputMismatch { .. }), "{e}");

        let mut other = job.config.clone();
        other.checkpoint = job.path("other.checkpoint");
        let e = Ledger::open(other, t).unwrap_err();
        assert!(
            matches!(e, ResumeError::OutputWithoutCheckpoint { .. }),
            "{e}"
        );
    }

    #[test]
    fn a_second_ledger_on_the_same_files_is_refused_while_the_first_lives() {
        let job = Job::new(&lines(2), Some(3));
        let t = Instant::now();
        let first = job.open(t).unwrap();
        let e = job.open(t).unwrap_err();
        assert!(matches!(e, ResumeError::Locked { .. }), "{e}");
        assert!(e.to_string().contains("out.jsonl.checkpoint"), "{e}");
        drop(first);
        job.open(t).unwrap();
    }

    #[test]
    fn resume_refuses_an_output_with_more_lines_than_the_input() {
        let job = Job::new(&lines(2), Some(3));
        let t = Instant::now();
        drop(job.open(t).unwrap());
        std::fs::write(&job.config.outfile, "0\n1\n2\n").unwrap();
        let e = job.open(t).unwrap_err();
        assert!(
            matches!(
                e,
                ResumeError::OutputLongerThanInput {
                    output_lines: 3,
                    input_lines: 2,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn changing_the_work_timeout_applies_to_items_in_flight() {
        let job = Job::new(&lines(2), Some(3));
        let t = Instant::now();
        let mut l = job.open(t).unwrap();
        l.take_work(1, t).unwrap();
        l.set_work_timeout(Duration::from_secs(1));
        let r = l.take_work(2, t + Duration::from_secs(1)).unwrap();
        assert_eq!(ids(&r), vec![0, 1]);
        assert_eq!(r.items[0].retry_count, 1);
    }

    #[test]
    fn the_timeout_heap_stays_proportional_to_what_is_in_flight() {
        let job = Job::new(&lines(20_000), Some(3));
        let t = Instant::now();
        let mut l = job.open(t).unwrap();
        for _ in 0..2_000 {
            let r = l.take_work(10, t).unwrap();
            let done = r.items.iter().map(|i| result(i.work_id, "0")).collect();
            l.complete(done).unwrap();
        }
        let s = l.status(t);
        assert_eq!(s.lines_done, 20_000);
        assert!(
            s.heap_size <= 2 * s.in_flight + 1024 + 10,
            "heap_size {}",
            s.heap_size
        );
    }

    #[test]
    fn status_names_the_oldest_item_in_flight() {
        let job = Job::new(&lines(3), Some(3));
        let t = Instant::now();
        let mut l = job.open(t).unwrap();
        l.take_work(1, t).unwrap();
        l.take_work(1, t + Duration::from_secs(2)).unwrap();
        let s = l.status(t + Duration::from_secs(5));
        let oldest = s.oldest_in_flight.unwrap();
        assert_eq!((oldest.work_id, oldest.age_secs), (0, 5.0));
        assert_eq!(
            (
                s.in_flight,
                s.issued,
                s.next_work_id,
                s.last_processed_work_id
            ),
            (2, 2, 2, -1)
        );
        assert_eq!(s.input_bytes_total, lines(3).len() as u64);
        assert_eq!(s.lines_total, None);
    }

    #[test]
    fn heartbeats_keep_leases_and_silent_workers_lose_their_items() {
        let job = Job::new(&lines(2), Some(3));
        let mut t = Instant::now();
        let mut l = job.open(t).unwrap();
        l.take_work(2, t).unwrap();
        // Item 0's worker heartbeats every third of the lease; item 1's is silent.
        for _ in 0..9 {
            t += TIMEOUT / 3;
            assert_eq!(l.heartbeat(&[0], t), (1, vec![]));
            l.tick(t).unwrap();
        }
        let s = l.status(t);
        assert_eq!(
            (s.in_flight, s.queued_for_reissue, s.reissues.timeout),
            (1, 1, 1)
        );
        let r = l.take_work(5, t).unwrap();
        assert_eq!(ids(&r), vec![1], "only the silent worker's item comes back");
        l.complete(vec![result(0, "0")]).unwrap();
        assert_eq!(
            l.heartbeat(&[0, 1, 9], t),
            (1, vec![0]),
            "0 is done: drop it"
        );
    }

    #[test]
    fn preemptions_draw_on_their_own_budget_and_the_tombstone_has_the_history() {
        let mut job = Job::new(&lines(2), Some(1));
        job.config.max_releases = Some(DEFAULT_MAX_RELEASES);
        let mut t = Instant::now();
        let mut l = job.open(t).unwrap();
        // Forty preemptions of both items: far over --max-retries 1, no tombstone.
        for _ in 0..40 {
            let r = l.take_work(2, t).unwrap();
            assert_eq!(r.items.len(), 2);
            assert!(r.items.iter().all(|i| i.retry_count == 0));
            assert_eq!(l.release(&[0, 1], Cause::Release).unwrap(), 2);
        }
        assert_eq!(l.status(t).tombstones, 0);
        // Item 0 then fails twice (an expiry, a task retry): over --max-retries 1.
        l.take_work(2, t).unwrap();
        l.complete(vec![result(1, "1")]).unwrap();
        t += TIMEOUT;
        let r = l.take_work(1, t).unwrap();
        assert_eq!(r.items[0].retry_count, 1);
        l.release(&[0], Cause::Retry).unwrap();
        let out: Vec<serde_json::Value> = job
            .output()
            .lines()
            .map(|x| serde_json::from_str(x).unwrap())
            .collect();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0]["__ERROR__"]["error"], "max_retries_exceeded");
        assert_eq!(
            out[0]["__ERROR__"]["reissues"],
            serde_json::json!({"timeout": 1, "release": 40, "retry": 1})
        );

        // A poison item that kills every worker is still given up, by releases.
        let mut job = Job::new(&lines(1), Some(1));
        job.config.max_releases = Some(3);
        let mut l = job.open(t).unwrap();
        for _ in 0..4 {
            l.take_work(1, t).unwrap();
            l.release(&[0], Cause::Release).unwrap();
        }
        assert!(job.output().contains("max_releases_exceeded"));
    }

    #[test]
    fn a_stuck_line_spills_later_results_and_memory_stays_under_the_cap() {
        const LATER: u64 = 1_000_000;
        const CAP: u64 = 1 << 20;
        let input: Vec<u8> = (0..=LATER)
            .flat_map(|i| format!("{i}\n").into_bytes())
            .collect();
        let mut job = Job::new(&input, Some(3));
        job.config.max_pending_bytes = CAP;
        let t = Instant::now();
        let mut l = job.open(t).unwrap();
        // Line 0 goes to a worker that never answers.
        assert_eq!(ids(&l.take_work(1, t).unwrap()), vec![0]);
        let mut peak = 0;
        loop {
            let r = l.take_work(10_000, t).unwrap();
            if r.items.is_empty() {
                break;
            }
            let done = r
                .items
                .iter()
                .map(|i| (i.work_id, format!("\"result {}\"", i.content)))
                .collect();
            l.complete_valid(done).unwrap();
            let s = l.status(t);
            peak = peak.max(s.reorder_buffer_bytes);
            assert!(
                s.reorder_buffer_bytes <= CAP,
                "{} bytes in memory",
                s.reorder_buffer_bytes
            );
        }
        let s = l.status(t);
        assert_eq!((s.lines_done, s.reorder_buffer), (0, LATER));
        assert!(
            s.reorder_buffer_spilled > LATER / 2,
            "most results went to disk: {s:?}"
        );
        let blocking = s.blocking.expect("line 0 blocks the rest");
        assert_eq!(
            (
                blocking.work_id,
                blocking.state.as_str(),
                blocking.waiting_lines
            ),
            (0, "in_flight", LATER)
        );
        assert!(peak > CAP / 2, "the memory was used up to the cap first");
        assert!(job.config.spill_path().metadata().unwrap().len() > 0);
        // The stuck line finally comes back: everything is written, in order.
        l.complete(vec![result(0, "\"result 0\"")]).unwrap();
        assert!(l.is_complete());
        let out = job.output();
        let mut n = 0;
        for (i, line) in out.lines().enumerate() {
            assert_eq!(line, format!("\"result {i}\""));
            n += 1;
        }
        assert_eq!(n, LATER + 1);
        assert_eq!(
            job.config.spill_path().metadata().unwrap().len(),
            0,
            "the spill file is emptied"
        );
    }

    #[test]
    fn idle_workers_get_backups_of_stragglers_and_the_first_result_wins() {
        let mut job = Job::new(&lines(3), Some(3));
        job.config.max_backups = 2;
        job.config.backup_after = Duration::from_secs(5);
        let t = Instant::now();
        let mut l = job.open(t).unwrap();
        let (a, b) = (Some(1), Some(2));
        assert_eq!(ids(&l.take_work_for(2, t, a).unwrap()), vec![0, 1]);
        assert_eq!(
            ids(&l.take_work_for(5, t, b).unwrap()),
            vec![2],
            "no backups beside new lines"
        );
        let later = t + Duration::from_secs(1);
        assert_eq!(
            l.take_work_for(5, later, b).unwrap().status,
            WorkStatus::Retry,
            "too young for a backup"
        );
        let later = t + Duration::from_secs(6);
        assert_eq!(
            ids(&l.take_work_for(5, later, a).unwrap()),
            vec![2],
            "never one's own items"
        );
        assert_eq!(
            ids(&l.take_work_for(5, later, b).unwrap()),
            vec![0],
            "the oldest straggler"
        );
        assert_eq!(
            l.take_work_for(5, later, None).unwrap().status,
            WorkStatus::Retry,
            "two backups at most"
        );
        l.complete(vec![result(2, "2"), result(0, "\"from B\"")])
            .unwrap();
        let r = l
            .complete(vec![result(0, "\"from A\""), result(1, "1")])
            .unwrap();
        assert_eq!((r.accepted, r.already_done), (1, vec![0]));
        assert_eq!(job.output(), "\"from B\"\n1\n2\n");
        assert_eq!(l.status(t).backups_issued, 2);
    }

    #[test]
    fn a_restart_while_results_are_spilled_resumes_exactly() {
        let mut job = Job::new(&lines(50), Some(3));
        job.config.max_pending_bytes = 10;
        let t = Instant::now();
        let mut l = job.open(t).unwrap();
        l.take_work(50, t).unwrap();
        l.complete((1..50).map(|i| result(i, &i.to_string())).collect())
            .unwrap();
        assert!(l.status(t).reorder_buffer_spilled >= 40);
        drop(l); // a crash: line 0 was never answered
        let mut l = job.open(t).unwrap();
        assert_eq!(l.lines_written(), 0);
        let r = l.take_work(100, t).unwrap();
        assert_eq!(r.items.len(), 50, "unwritten lines are redone");
        l.complete(
            r.items
                .iter()
                .map(|i| result(i.work_id, &i.work_id.to_string()))
                .collect(),
        )
        .unwrap();
        let expected: String = (0..50).map(|i| format!("{i}\n")).collect();
        assert_eq!(job.output(), expected);
    }

    mod interleavings {
        //! Random interleavings of issue, complete, duplicate, release, timeout,
        //! crash and restart always end in an output whose line i is the result
        //! for line i or its tombstone.
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Take(usize),
            Complete(usize),
            Duplicate(usize),
            Release(usize),
            Expire,
            Heartbeat,
            /// Takes a checkpoint's state; it is written by a later `Commit`
            /// (or lost in a crash), as a server does beside its requests.
            Checkpoint,
            Commit,
            Crash {
                torn: bool,
            },
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => (1usize..5).prop_map(Op::Take),
                4 => any::<usize>().prop_map(Op::Complete),
                1 => any::<usize>().prop_map(Op::Duplicate),
                1 => any::<usize>().prop_map(Op::Release),
                1 => Just(Op::Expire),
                1 => Just(Op::Heartbeat),
                1 => Just(Op::Checkpoint),
                1 => Just(Op::Commit),
                1 => any::<bool>().prop_map(|torn| Op::Crash { torn }),
            ]
        }

        /// The result a worker computes for a line: its content as a JSON string.
        fn answer(item: &WorkItem) -> WorkItem {
            let mut done = item.clone();
            done.result = Some(serde_json::to_string(&item.content).unwrap());
            done
        }

        fn check_output(job: &Job, n: u64) {
            let out = job.output();
            let got: Vec<&str> = out.lines().collect();
            assert_eq!(got.len() as u64, n, "one output line per input line");
            for (i, line) in got.iter().enumerate() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                let expected = format!("{{\"i\":{i}}}");
                match v {
                    serde_json::Value::String(s) => assert_eq!(s, expected, "line {i}"),
                    other => {
                        assert_eq!(other["__ERROR__"]["work_id"], i as u64, "line {i}");
                        assert_eq!(other["__ERROR__"]["original_content"], expected);
                    }
                }
            }
        }

        /// Budgets and limits drawn at random with the operations.
        #[derive(Debug, Clone)]
        struct Limits {
            max_retries: Option<u32>,
            max_releases: Option<u32>,
            /// Tiny caps make the reorder buffer spill constantly.
            max_pending_bytes: u64,
            max_backups: u32,
        }

        fn limits() -> impl Strategy<Value = Limits> {
            (
                prop_oneof![Just(None), (0u32..3).prop_map(Some)],
                prop_oneof![Just(None), (0u32..3).prop_map(Some)],
                prop_oneof![Just(u64::MAX), 0u64..40],
                0u32..3,
            )
                .prop_map(
                    |(max_retries, max_releases, max_pending_bytes, max_backups)| Limits {
                        max_retries,
                        max_releases,
                        max_pending_bytes,
                        max_backups,
                    },
                )
        }

        fn run(n: u64, limits: Limits, ops: Vec<Op>) {
            let mut job = Job::new(&lines(n), limits.max_retries);
            job.config.max_releases = limits.max_releases;
            job.config.max_pending_bytes = limits.max_pending_bytes;
            job.config.max_backups = limits.max_backups;
            job.config.backup_after = Duration::ZERO;
            let mut t = Instant::now();
            let mut l = job.open(t).unwrap();
            // Items held by workers, which outlive server restarts.
            let mut held: Vec<WorkItem> = Vec::new();
            let mut sent: Vec<WorkItem> = Vec::new();
            let mut pending: Option<PendingCheckpoint> = None;
            for op in ops {
                match op {
                    Op::Take(b) => held.extend(l.take_work(b, t).unwrap().items),
                    Op::Complete(k) if !held.is_empty() => {
                        let item = held.swap_remove(k % held.len());
                        l.complete(vec![answer(&item)]).unwrap();
                        sent.push(item);
                    }
                    Op::Duplicate(k) if !sent.is_empty() => {
                        let r = l.complete(vec![answer(&sent[k % sent.len()])]).unwrap();
                        assert_eq!(r.accepted + r.ignored, 1);
                    }
                    Op::Release(k) if !held.is_empty() => {
                        let item = held.swap_remove(k % held.len());
                        let cause = if k % 2 == 0 {
                            Cause::Release
                        } else {
                            Cause::Retry
                        };
                        l.release(&[item.work_id], cause).unwrap();
                    }
                    Op::Heartbeat => {
                        let ids: Vec<u64> = held.iter().map(|i| i.work_id).collect();
                        l.heartbeat(&ids, t);
                    }
                    Op::Expire => {
                        t += TIMEOUT;
                        l.tick(t).unwrap();
                    }
                    Op::Checkpoint => {
                        // One at a time, in order, as the server commits them.
                        if let Some(p) = pending.take() {
                            p.commit().unwrap();
                        }
                        pending = Some(l.begin_checkpoint().unwrap());
                    }
                    Op::Commit => {
                        if let Some(p) = pending.take() {
                            p.commit().unwrap();
                        }
                    }
                    Op::Crash { torn } => {
                        // A checkpoint not committed yet dies with the process.
                        pending = None;
                        drop(l);
                        if torn {
                            let mut f = std::fs::OpenOptions::new()
                                .append(true)
                                .open(&job.config.outfile)
                                .unwrap();
                            std::io::Write::write_all(&mut f, b"\"{\\\"i\\\":").unwrap();
                        }
                        l = job.open(t).unwrap();
                    }
                    _ => {}
                }
            }
            // Drain: stale holders finish first, then fresh workers take the rest.
            let stale: Vec<WorkItem> = held.iter().map(answer).collect();
            l.complete(stale).unwrap();
            for _ in 0..(n * 10 + 10) {
                if l.is_complete() {
                    break;
                }
                let r = l.take_work(7, t).unwrap();
                match r.status {
                    WorkStatus::Ok => {
                        l.complete(r.items.iter().map(answer).collect()).unwrap();
                    }
                    _ => {
                        t += TIMEOUT;
                        l.tick(t).unwrap();
                    }
                }
            }
            assert!(l.is_complete(), "the job must finish");
            check_output(&job, n);
            // And a restart of a finished job changes nothing.
            drop(l);
            let l = job.open(t).unwrap();
            assert!(l.is_complete());
            check_output(&job, n);
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]
            #[test]
            fn output_line_i_is_always_the_result_or_tombstone_of_line_i(
                n in 0u64..25,
                limits in limits(),
                ops in proptest::collection::vec(op(), 0..80),
            ) {
                run(n, limits, ops);
            }
        }

        #[test]
        fn job_path_helper_is_inside_the_temp_dir() {
            let job = Job::new(b"", None);
            assert!(job.path("x").starts_with(job.dir.path()));
            assert!(Path::new(&job.config.infile).exists());
        }
    }
}
