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
//! Where what lives:
//! - here: [`Ledger`] and the calls the server and the local source make
//!   (take work, complete, release, heartbeat, tick), and its configuration;
//! - `open.rs`: opening or resuming the job's files, checkpoints, finishing;
//! - `items.rs`: the issued lines without a result, why they go back to the
//!   queue, and the counts that follow from their states;
//! - `leases.rs`: the lease of every item in flight, in deadline order;
//! - `window.rs`: the lines read and not written (the reorder buffer, its
//!   spill file) and the output;
//! - `journal.rs`: the engine responses of unfinished lines;
//! - `redo.rs`: the previous output of a `--redo-errors` run, read in step;
//! - `groups.rs`: prefix affinity (`--group-by`): lines read ahead by group
//!   key, and the worker each key went to;
//! - `stats.rs`: [`LedgerStats`] and the counters behind it.

mod groups;
mod items;
mod journal;
mod leases;
mod open;
mod redo;
mod stats;
#[cfg(test)]
mod tests;
mod window;

pub use crate::job::redo::RedoConfig;
use groups::Groups;
pub use groups::{Grouping, KeyFn};
pub use items::Cause;
use items::{Item, ItemState, Items};
use journal::Journal;
pub use journal::JournalStats;
pub use open::PendingCheckpoint;
use redo::{Decision, Previous};
use stats::Counters;
pub use stats::{LedgerStats, MAX_FAILURE_KINDS, MAX_KIND_BYTES};

/// Kept lines (`--redo-errors`) a work request reads past at most before it
/// answers: the ledger's lock is not held for long.
const KEEP_PER_REQUEST: u64 = 65_536;
/// Kept lines the ticker reads past at most each second, when no worker asks.
const KEEP_PER_TICK: u64 = 262_144;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

use crate::input::{InputReader, LineSpan};
use crate::job::files::JobLock;
use crate::job::JobFiles;
use crate::protocol::{JournalEntry, JournalRecord, ResultLine};
use leases::Leases;
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
    /// The dataset shards `infile` was staged from
    /// ([`crate::dataset::prepare`]): watched with the input, so that a shard
    /// changed while the job runs stops it, naming the shard.
    pub sources: Option<std::sync::Arc<crate::dataset::Sources>>,
    /// Prefix affinity (`--group-by`): lines are read ahead and handed to
    /// the worker that had their group key; `None` hands lines out in input
    /// order to whoever asks.
    pub grouping: Option<Grouping>,
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
            sources: None,
            grouping: None,
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

/// Who asks for work, and how much: a work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    /// Items wanted at most.
    pub batch: usize,
    /// The worker asking, when it says who it is (a hash of its id): it is
    /// never handed a backup of an item it holds itself, and a retry its own
    /// task asked for goes to another worker when one asks.
    pub worker: Option<u64>,
}

impl Ask {
    /// A request for up to `batch` items from a worker that does not say who
    /// it is.
    pub fn batch(batch: usize) -> Ask {
        Ask {
            batch,
            worker: None,
        }
    }

    /// The same request, from `worker`.
    pub fn by(self, worker: Option<u64>) -> Ask {
        Ask { worker, ..self }
    }
}

/// One line handed out, in the ledger's terms (the HTTP layer and the local
/// source make a work item of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// The line's work id: its 0-based index in the input.
    pub work_id: u64,
    /// The line, without its newline.
    pub content: String,
    /// Failures (lease expiries, task retries) before this issue.
    pub retry_count: u32,
    /// The engine responses earlier issues of the line completed.
    pub journal: Option<Vec<JournalEntry>>,
}

/// The answer to a work request.
#[derive(Debug, PartialEq, Eq)]
pub enum WorkReply {
    /// Lines to work on.
    Issued(Vec<Issue>),
    /// Nothing to hand out now: ask again in this many seconds.
    Retry {
        /// Seconds to wait (at least 1).
        after_secs: u64,
        /// No unissued line remains: every line is done or in flight, none
        /// is queued for reissue, and no backup copy may be handed out
        /// (`--backups 0`). Only a line that comes back (a lease expiry, a
        /// release) is left to hand out.
        drained: bool,
    },
    /// Every line has its output line.
    Complete,
}

impl WorkReply {
    /// The lines issued (none unless [`WorkReply::Issued`]).
    pub fn items(&self) -> &[Issue] {
        match self {
            WorkReply::Issued(items) => items,
            _ => &[],
        }
    }

    /// The lines issued, owned.
    pub fn into_items(self) -> Vec<Issue> {
        match self {
            WorkReply::Issued(items) => items,
            _ => Vec::new(),
        }
    }
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
    /// Issued lines without a result (addressed by their window slot), and
    /// the queue of those waiting to be issued again.
    items: Items,
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
    /// Lines read ahead by group key, with grouping on.
    groups: Option<Groups>,
    counters: Counters,
}

impl Ledger {
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

    /// Hands out up to `ask.batch` items: queued reissues first, then new
    /// lines, then (to an idle worker, when configured) backup copies.
    pub fn take_work(&mut self, ask: Ask, now: Instant) -> io::Result<WorkReply> {
        let Ask { batch, worker } = ask;
        self.expire(now)?;
        let mut items = Vec::with_capacity(batch.min(1024));
        // Retries this worker asked for, left for another worker.
        let mut avoided = Vec::new();
        let mut kept = 0;
        while items.len() < batch && kept < KEEP_PER_REQUEST {
            if let Some(id) = self.items.pop_queued() {
                if let Some(key) = self.key_of(id) {
                    if worker.is_some() && self.items[key].avoid == worker {
                        avoided.push(id);
                    } else {
                        items.push(self.reissue(key, id, now, worker)?);
                    }
                }
                continue;
            }
            if self.input_exhausted || self.groups.is_some() {
                break;
            }
            match self.read_next()? {
                None => break,
                Some(Read::Kept) => kept += 1,
                Some(Read::Invalid) => {}
                Some(Read::Line(id, span, content)) => {
                    let lease = self.leases.grant(id, now);
                    let key = self.items.insert(Item::issued(id, span, worker, lease));
                    self.window.push_issued(key);
                    items.push(self.issue(id, content, 0));
                }
            }
        }
        if self.groups.is_some() && items.len() < batch {
            kept += self.read_ahead(now)?;
            let ids = self
                .groups
                .as_mut()
                .map(|g| g.take(worker, batch - items.len(), now))
                .unwrap_or_default();
            for id in ids {
                let key = self.key_of(id).expect("a waiting line has its item");
                let lease = self.leases.grant(id, now);
                let span = self.items.issue_waiting(key, worker, lease).span;
                items.push(self.work_item(id, span, 0)?);
            }
        }
        self.items.queue_front(&avoided);
        // Nothing else is left for this worker: it gets its own retries back
        // rather than wait for another worker that may never come.
        if items.is_empty() {
            for _ in 0..avoided.len().min(batch) {
                let id = self.items.pop_queued().expect("put back above");
                let key = self.key_of(id).expect("still queued");
                items.push(self.reissue(key, id, now, worker)?);
            }
        }
        if items.is_empty() && self.items.queued() == 0 && self.input_exhausted {
            self.issue_backups(batch, now, worker, &mut items)?;
        }
        self.window.write_ready()?;
        self.check_eof()?;
        self.counters.issued_total += items.len() as u64;
        Ok(if !items.is_empty() {
            WorkReply::Issued(items)
        } else if self.is_complete() {
            WorkReply::Complete
        } else if kept >= KEEP_PER_REQUEST {
            // More kept lines to read past: ask again at once.
            WorkReply::Retry {
                after_secs: 1,
                drained: false,
            }
        } else {
            WorkReply::Retry {
                after_secs: self.retry_in(now),
                drained: self.input_exhausted
                    && self.items.queued() == 0
                    && self.groups.as_ref().is_none_or(|g| g.waiting() == 0)
                    && self.config.max_backups == 0,
            }
        })
    }

    /// With grouping on: reads lines ahead until `lookahead` wait (or the
    /// input ends), each keyed by the group filter; returns how many kept
    /// lines (`--redo-errors`) it read past.
    fn read_ahead(&mut self, now: Instant) -> io::Result<u64> {
        let mut kept = 0;
        while !self.input_exhausted
            && kept < KEEP_PER_REQUEST
            && self.groups.as_ref().is_some_and(Groups::has_room)
        {
            match self.read_next()? {
                None => break,
                Some(Read::Kept) => kept += 1,
                Some(Read::Invalid) => {}
                Some(Read::Line(id, span, content)) => {
                    let key = self.items.insert(Item::waiting(id, span, now));
                    self.window.push_issued(key);
                    if let Some(groups) = &mut self.groups {
                        groups.push_line(id, &content);
                    }
                }
            }
        }
        Ok(kept)
    }

    /// Reads the next input line and takes its id: `None` at the end of the
    /// input. A line whose previous output is kept (`--redo-errors`) is
    /// kept, and one that is not UTF-8 gets its error record, here.
    fn read_next(&mut self) -> io::Result<Option<Read>> {
        let Some(line) = self.input.next_line()? else {
            // A file cut short under us also ends here: make sure this is
            // its real end before the job can complete on it.
            self.input.check_unchanged()?;
            self.input_exhausted = true;
            return Ok(None);
        };
        let id = self.next_work_id;
        self.next_work_id += 1;
        if let Some(Decision::Keep(old)) = self.previous.as_mut().map(Previous::take).transpose()? {
            self.keep(id, old, line.span.end)?;
            return Ok(Some(Read::Kept));
        }
        match line.content {
            Ok(content) => Ok(Some(Read::Line(id, line.span, content))),
            Err(bytes) => {
                self.invalid_line(id, line.span, &bytes)?;
                Ok(Some(Read::Invalid))
            }
        }
    }

    /// Line `id` is not UTF-8: its error record, at once.
    fn invalid_line(&mut self, id: u64, span: LineSpan, bytes: &[u8]) -> io::Result<()> {
        self.counters.invalid_lines += 1;
        self.window.push_open();
        let record = crate::record::invalid_utf8(id, span.offset, &self.config.infile, bytes);
        self.counters.finished(id, &record);
        self.window.finish(id, record.into(), span.end)
    }

    /// Issues queued item `key` (line `id`) again, to `worker`.
    fn reissue(
        &mut self,
        key: usize,
        id: u64,
        now: Instant,
        worker: Option<u64>,
    ) -> io::Result<Issue> {
        let lease = self.leases.grant(id, now);
        let item = self.items.reissue(key, worker, lease);
        let (span, retry_count) = (item.span, item.retry_count);
        self.work_item(id, span, retry_count)
    }

    /// An issue of line `id`, with the journal of its earlier issues.
    fn issue(&self, id: u64, content: String, retry_count: u32) -> Issue {
        Issue {
            work_id: id,
            content,
            retry_count,
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

    /// [`issue`](Self::issue) of a line read again from the input.
    fn work_item(&self, id: u64, span: LineSpan, retry_count: u32) -> io::Result<Issue> {
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
        items: &mut Vec<Issue>,
    ) -> io::Result<()> {
        let allowed = (self
            .config
            .max_backups
            .saturating_sub(self.items.backups_out()) as usize)
            .min(room);
        if allowed == 0 {
            return Ok(());
        }
        let backup_after = self.config.backup_after;
        let mut candidates: Vec<(Instant, u64, usize)> = self
            .items
            .iter()
            .filter(|(_, item)| !item.backed_up() && (worker.is_none() || item.holder != worker))
            .filter_map(|(key, item)| {
                let issued_at = item.lease()?.issued_at;
                (now.saturating_duration_since(issued_at) >= backup_after)
                    .then_some((issued_at, item.id, key))
            })
            .collect();
        candidates.sort_unstable();
        for (_, id, key) in candidates.into_iter().take(allowed) {
            self.items.back_up(key, worker);
            let item = &self.items[key];
            let (span, retry_count) = (item.span, item.retry_count);
            self.counters.backups_issued += 1;
            items.push(self.work_item(id, span, retry_count)?);
        }
        Ok(())
    }

    /// A worker is alive and still working on `ids`: their leases run for the
    /// work timeout from `now`. Returns how many were extended and which ids
    /// are already done (the worker may drop them).
    ///
    /// A worker that says who it is (`worker`, a hash of its id) keeps every
    /// lease it holds, or holds a backup of, named in `ids` or not (lazily:
    /// renewed from this heartbeat when the lease would end, see
    /// `expire`); its done ids include those of its lines
    /// another copy finished since its last heartbeat.
    pub fn heartbeat(&mut self, ids: &[u64], worker: Option<u64>, now: Instant) -> (u64, Vec<u64>) {
        let mut extended = 0;
        let mut done = Vec::new();
        if let Some(worker) = worker {
            self.alive.insert(worker, now);
            done.extend(self.finished_elsewhere.remove(&worker).unwrap_or_default());
        }
        for &id in ids {
            match self.key_of(id) {
                Some(key) => {
                    if let Some(lease) = self.items[key].lease_mut() {
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

    /// Records results, each one JSON value on one line: checked beforehand
    /// with [`check_results`](crate::protocol::check_results), which the HTTP
    /// layer runs outside the ledger's lock. The first result of an item wins.
    pub fn complete(&mut self, results: Vec<ResultLine>) -> io::Result<CompleteReply> {
        let mut reply = CompleteReply::default();
        for ResultLine { work_id: id, line } in results {
            // A line read ahead but not issued takes no result.
            let waiting = self
                .item(id)
                .is_some_and(|item| matches!(item.state(), ItemState::Waiting));
            let taken = if waiting { None } else { self.take_item(id) };
            match taken {
                Some(item) => {
                    if item.backed_up() {
                        // One copy won: the other's worker may drop it (the
                        // winner's own notice is harmless).
                        for worker in item.holders() {
                            let told = self.finished_elsewhere.entry(worker).or_default();
                            if told.len() < MAX_FINISHED_ELSEWHERE {
                                told.push(id);
                            }
                        }
                    }
                    self.counters.finished(id, &line);
                    self.window
                        .finish(id, line.into_boxed_str(), item.span.end)?;
                    reply.accepted += 1;
                    if let Some(worker) = item.holder {
                        *self.counters.done_by.entry(worker).or_default() += 1;
                    }
                }
                None => {
                    reply.ignored += 1;
                    if id < self.next_work_id && !waiting {
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

    /// Puts in-flight items back at the front of the queue, in the given order.
    /// Returns how many were in flight. `cause` is one of the release causes
    /// ([`Cause::Release`], [`Cause::Retry`], [`Cause::LegacyRelease`]).
    ///
    /// From a worker that says who it is (`worker`, a hash of its id), an item
    /// reissued to another worker since it was handed to this one stays with
    /// its current holder: a stale worker (its lease expired, the item went
    /// to another) cannot take the item back from under the worker that now
    /// runs it.
    pub fn release(&mut self, ids: &[u64], cause: Cause, worker: Option<u64>) -> io::Result<u64> {
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
        self.items.queue_front(&front);
        self.window.write_ready()?;
        Ok(released)
    }

    /// Reissues (or tombstones) items whose work timeout has passed, reads
    /// past kept lines (`--redo-errors`), and writes what became ready.
    pub fn tick(&mut self, now: Instant) -> io::Result<()> {
        self.expire(now)?;
        if let Some(groups) = &mut self.groups {
            // Workers silent for a work timeout lose their keys.
            groups.tidy(now, self.leases.timeout(), self.next_work_id, &self.alive);
        }
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
        let live = self.items.in_flight() as usize;
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
            // A worker that heartbeats keeps every lease it holds: renewed
            // from its last heartbeat, and expired only if that is too old.
            let heard = item
                .holders()
                .filter_map(|w| self.alive.get(&w).copied())
                .max();
            let Some(lease) = item.lease_mut().filter(|l| l.is_current(seq)) else {
                continue;
            };
            if heard.is_some_and(|at| self.leases.renew_from(id, lease, at)) {
                continue;
            }
            if self.requeue(id, Cause::Timeout)? {
                self.items.queue_back(id);
            }
        }
        Ok(())
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

/// What [`Ledger::read_next`] read.
enum Read {
    /// A line whose previous output is kept: written (or waiting) already.
    Kept,
    /// A line that is not UTF-8: its error record is written (or waiting).
    Invalid,
    /// A line to hand out: its id, where it is, its content.
    Line(u64, LineSpan, String),
}

/// Lines told to one worker at its next heartbeat at most: a worker that
/// never comes back must not make the list grow without bound.
const MAX_FINISHED_ELSEWHERE: usize = 4096;

/// How often the ledger checks that its input has not changed.
const INPUT_CHECK_EVERY: Duration = Duration::from_secs(1);
