//! What the ledger reports: [`LedgerStats`] for `GET /status` and the
//! metrics, and the counters kept for it (nothing reads them to decide
//! anything).

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use super::items::ItemState;
use super::journal::JournalStats;
use super::Ledger;
use crate::protocol::{BlockingLine, FailureExample, OldestInFlight, ReissueCounts};

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
    pub failed_by_kind: BTreeMap<String, u64>,
    /// The first failed line of each kind this run finished.
    pub failure_examples: BTreeMap<String, FailureExample>,
    /// Failed lines of kinds past the first [`MAX_FAILURE_KINDS`], counted
    /// but not listed by kind.
    pub failed_unlisted: u64,
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
    /// Grouping (`--group-by`): lines read ahead and where they went;
    /// `None` without it.
    pub groups: Option<crate::protocol::GroupStatus>,
}

/// Counts kept for [`LedgerStats`]; nothing reads them to decide anything.
#[derive(Debug)]
pub(super) struct Counters {
    pub(super) started: Instant,
    pub(super) reissues: ReissueCounts,
    pub(super) tombstones: u64,
    pub(super) invalid_lines: u64,
    pub(super) ignored_results: u64,
    pub(super) issued_total: u64,
    pub(super) completed_total: u64,
    pub(super) backups_issued: u64,
    /// Output lines found past the checkpoint at open.
    pub(super) recovered_past_checkpoint: u64,
    /// Results accepted, by the worker (key) the item was last issued to.
    pub(super) done_by: rustc_hash::FxHashMap<u64, u64>,
    /// Lines of the previous output kept as they were (`--redo-errors`).
    pub(super) kept: u64,
    /// Failed lines finished by this run, by kind.
    pub(super) failed_by_kind: BTreeMap<String, u64>,
    /// The first of them of each kind.
    pub(super) failure_examples: BTreeMap<String, FailureExample>,
    /// Failed lines of kinds not listed (past [`MAX_FAILURE_KINDS`]).
    pub(super) failed_unlisted: u64,
}

/// Failure kinds listed by kind, at most: a kind can come from the input (a
/// line with an `__ERROR__` key, a batch line's error code), and every kind
/// listed is a row of every `/status` answer, a metrics series and a row of
/// the page. Lines of further kinds are counted together.
pub const MAX_FAILURE_KINDS: usize = 100;

/// The longest failure kind kept, in bytes (cut at a character).
pub const MAX_KIND_BYTES: usize = 128;

impl Counters {
    /// Nothing counted yet, for a ledger opened at `started` that found
    /// `recovered_past_checkpoint` output lines past its checkpoint.
    pub(super) fn new(started: Instant, recovered_past_checkpoint: u64) -> Counters {
        Counters {
            started,
            reissues: ReissueCounts::default(),
            tombstones: 0,
            invalid_lines: 0,
            ignored_results: 0,
            issued_total: 0,
            completed_total: 0,
            backups_issued: 0,
            recovered_past_checkpoint,
            done_by: rustc_hash::FxHashMap::default(),
            kept: 0,
            failed_by_kind: BTreeMap::new(),
            failure_examples: BTreeMap::new(),
            failed_unlisted: 0,
        }
    }

    /// Counts line `id`'s output `line` (one JSON value) when it is a
    /// failure; the first of its kind is kept as an example.
    pub(super) fn finished(&mut self, id: u64, line: &str) {
        let Some(mut kind) = crate::record::failure_of_json(line) else {
            return;
        };
        kind.truncate(crate::text::head(&kind, MAX_KIND_BYTES).len());
        if let Some(n) = self.failed_by_kind.get_mut(&kind) {
            *n += 1;
        } else if self.failed_by_kind.len() < MAX_FAILURE_KINDS {
            self.failure_examples
                .insert(kind.clone(), FailureExample::of(id, line));
            self.failed_by_kind.insert(kind, 1);
        } else {
            self.failed_unlisted += 1;
        }
    }
}

impl Ledger {
    /// Where the job stands.
    pub fn stats(&self, now: Instant) -> LedgerStats {
        let in_flight = self.items.in_flight();
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
            queued_for_reissue: self.items.queued(),
            reorder_lines: self.window.finished(),
            reorder_bytes: self.window.mem_bytes(),
            reorder_spilled: self.window.spilled(),
            lease_entries: self.leases.entries() as u64,
            reissues: c.reissues,
            tombstones: c.tombstones,
            invalid_lines: c.invalid_lines,
            kept_lines: c.kept,
            failed_by_kind: c.failed_by_kind.clone(),
            failure_examples: c.failure_examples.clone(),
            failed_unlisted: c.failed_unlisted,
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
                state: match item.state() {
                    ItemState::InFlight(_) => "in_flight".into(),
                    ItemState::Queued => "queued".into(),
                    ItemState::Waiting(_) => "lookahead".into(),
                },
                waiting_lines: self.window.finished(),
            }),
            work_timeout: self.leases.timeout(),
            max_retries: self.config.max_retries,
            complete: self.is_complete(),
            uptime: now.saturating_duration_since(c.started),
            groups: self.groups.as_ref().map(super::groups::Groups::stats),
        }
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
        for (_, item) in self.items.iter() {
            if let (Some(w), ItemState::InFlight(_)) = (item.holder, item.state()) {
                load.entry(w).or_default().1 += 1;
            }
        }
        load
    }

    /// What the journal holds; `None` with `--no-journal`.
    pub fn journal_stats(&self) -> Option<JournalStats> {
        self.journal.as_ref().map(super::journal::Journal::stats)
    }
}
