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
//!   (take work, complete, release, heartbeat, tick);
//! - `config.rs`: [`LedgerConfig`] and the defaults of its bounds;
//! - `reply.rs`: a work request ([`Ask`]) and the answers to the calls;
//! - `issue.rs`: how lines go out (read ahead, new, reissued, backups);
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

mod config;
mod groups;
mod issue;
mod items;
mod journal;
mod leases;
mod open;
mod redo;
mod reply;
mod stats;
#[cfg(test)]
mod tests;
mod window;

pub use crate::job::redo::RedoConfig;
pub use config::{
    LedgerConfig, DEFAULT_BACKUP_AFTER, DEFAULT_MAX_JOURNAL_BYTES, DEFAULT_MAX_PENDING_BYTES,
    DEFAULT_MAX_RELEASES, DEFAULT_MAX_RETRIES, DEFAULT_RETRY_SECS, DEFAULT_WORK_TIMEOUT,
};
use groups::Groups;
pub use groups::{Grouping, KeyFn};
pub use items::Cause;
use items::{Item, ItemState, Items};
use journal::Journal;
pub use journal::JournalStats;
pub use open::PendingCheckpoint;
use redo::{Decision, Previous};
pub use reply::{Ask, CompleteReply, Issue, WorkReply};
use stats::Counters;
pub use stats::{LedgerStats, MAX_FAILURE_KINDS, MAX_KIND_BYTES};

/// Kept lines (`--redo-errors`) a work request reads past at most before it
/// answers: the ledger's lock is not held for long.
const KEEP_PER_REQUEST: u64 = 65_536;

/// The bytes of lines and journal entries one work reply carries at most
/// (past its first item): a batch of reissued lines whose journals hold
/// large responses is handed out over several requests, not built in memory
/// at once.
pub const MAX_REPLY_BYTES: usize = 32 << 20;
/// Kept lines the ticker reads past at most each second, when no worker asks.
const KEEP_PER_TICK: u64 = 262_144;

use std::io;
use std::time::Duration;

use tokio::time::Instant;

use crate::input::{InputReader, LineSpan};
use crate::job::files::JobLock;
use crate::protocol::{JournalEntry, JournalRecord, ResultLine};
use leases::Leases;
use window::Window;

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

    /// Hands out up to `ask.batch` items (and about [`MAX_REPLY_BYTES`]):
    /// queued reissues first, then new lines, then (to an idle worker, when
    /// configured) backup copies.
    pub fn take_work(&mut self, ask: Ask, now: Instant) -> io::Result<WorkReply> {
        let Ask { batch, worker } = ask;
        self.expire(now)?;
        let mut items = Vec::with_capacity(batch.min(1024));
        // Fewer items once the reply's bytes reach the bound.
        let mut bytes = 0;
        // Retries this worker asked for, left for another worker.
        let mut avoided = Vec::new();
        let mut kept = 0;
        while items.len() < batch && kept < KEEP_PER_REQUEST && bytes < MAX_REPLY_BYTES {
            if let Some(id) = self.items.pop_queued() {
                if let Some(key) = self.key_of(id) {
                    if worker.is_some() && self.items[key].avoid == worker {
                        avoided.push(id);
                    } else {
                        let item = self.reissue(key, id, now, worker)?;
                        bytes += item.wire_bytes();
                        items.push(item);
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
                    let item = self.issue(id, content, 0);
                    bytes += item.wire_bytes();
                    items.push(item);
                }
            }
        }
        if self.groups.is_some() && items.len() < batch && bytes < MAX_REPLY_BYTES {
            items.extend(self.take_overdue_head(worker, now)?);
            kept += self.read_ahead(now)?;
            let ids = self
                .groups
                .as_mut()
                .map(|g| g.take(worker, batch - items.len(), now))
                .unwrap_or_default();
            for id in ids {
                let key = self.key_of(id).expect("a waiting line has its item");
                items.push(self.issue_read_ahead(key, id, worker, now)?);
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
                .is_some_and(|item| matches!(item.state(), ItemState::Waiting(_)));
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
