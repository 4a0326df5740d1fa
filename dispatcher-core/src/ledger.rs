//! The ledger: which input line is where (unread, in flight, queued for reissue,
//! waiting in the reorder buffer, written), and the files behind it.
//!
//! It is a plain state machine driven by the HTTP layer and a ticker, with the
//! current time passed in, so it can be tested without a clock or a socket.
//!
//! Invariants, for every work id `i`:
//! - `i < next_write_id`: its output line is written (it is in no other map);
//! - `next_write_id <= i < next_work_id`: it is in exactly one of `items` (issued,
//!   no result yet) and `reorder` (done, waiting for an earlier line);
//! - `i >= next_work_id`: not read yet.
//!
//! A result is accepted only for an id in `items`, so the first result wins and
//! nothing in the reorder buffer is ever reissued.

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use rustc_hash::FxHashMap as HashMap;
use tokio::time::Instant;

use crate::checkpoint::{Checkpoint, JobLock, ResumeError};
use crate::input::{InputReader, LineSpan};
use crate::output::OutputWriter;
use crate::protocol::{
    error_record, tombstone, OldestInFlight, ReissueCounts, StatusResponse, WorkItem, WorkStatus,
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
}

/// Why an item went back to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Its work timeout expired.
    Timeout,
    /// Its worker released it.
    Release,
}

/// An issued line that has no result yet.
#[derive(Debug)]
struct Item {
    span: LineSpan,
    /// Reissues so far: the `retry_count` of its next issue.
    retry_count: u32,
    reissues: ReissueCounts,
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
    /// Issued lines without a result.
    items: HashMap<u64, Item>,
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
    /// The reorder buffer: slot `k` is line `next_write_id + k`, `Some` once
    /// finished. Its front is `None` until line `next_write_id` is done.
    reorder: VecDeque<Option<Done>>,
    /// How many slots of `reorder` are `Some`.
    reorder_len: u64,
    /// Bytes of results in `reorder`.
    reorder_bytes: u64,
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
}

impl Ledger {
    /// Opens the job's files, resuming from the checkpoint and the output file
    /// when there is one. See [`ResumeError`] for what is refused.
    pub fn open(config: LedgerConfig, now: Instant) -> Result<Ledger, ResumeError> {
        let lock = JobLock::acquire(&config.checkpoint)?;
        let (lines, input_offset, output_offset) = match Checkpoint::load(&config.checkpoint)? {
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
        let (recovered, output_len) = OutputWriter::recover(&config.outfile, output_offset)?;
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
            output: OutputWriter::open(&config.outfile, output_len)?,
            written_input_offset: input.next_offset(),
            input,
            config,
            input_exhausted: false,
            next_work_id: lines,
            items: HashMap::default(),
            queue: VecDeque::new(),
            queued: 0,
            deadlines: VecDeque::new(),
            seq: 0,
            reorder: VecDeque::new(),
            reorder_len: 0,
            reorder_bytes: 0,
            next_write_id: lines,
            input_len,
            started: now,
            reissues: ReissueCounts::default(),
            tombstones: 0,
            invalid_lines: 0,
            ignored_results: 0,
            issued_total: 0,
            completed_total: 0,
        };
        // A checkpoint exists from the start, so an output without one is foreign.
        ledger.checkpoint()?;
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
        self.expire(now)?;
        let mut items = Vec::with_capacity(batch.min(1024));
        while items.len() < batch {
            if let Some(id) = self.queue.pop_front() {
                if let Some(item) = self.items.get_mut(&id) {
                    debug_assert!(matches!(item.state, ItemState::Queued));
                    let content = self.input.read_span(item.span)?;
                    self.queued -= 1;
                    self.seq += 1;
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
                    self.items.insert(
                        id,
                        Item {
                            span: line.span,
                            retry_count: 0,
                            reissues: ReissueCounts::default(),
                            state: ItemState::InFlight {
                                issued_at: now,
                                seq: self.seq,
                            },
                        },
                    );
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
                    let record = invalid_utf8_record(
                        id,
                        line.span,
                        &self.config.infile.display().to_string(),
                        &bytes,
                    );
                    self.finish(id, record.into(), line.span.end);
                }
            }
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

    /// Records results; the first result of an item wins. A result must be one
    /// JSON value on one line, else it is refused and its item stays in flight.
    pub fn complete(&mut self, results: Vec<WorkItem>) -> io::Result<CompleteReply> {
        let (valid, refused) = check_results(results);
        let mut reply = self.complete_valid(valid)?;
        reply.refused = refused;
        Ok(reply)
    }

    /// [`complete`](Self::complete) for results already checked with
    /// [`check_results`] (the HTTP layer checks outside the ledger's lock).
    pub fn complete_valid(&mut self, results: Vec<IdLine>) -> io::Result<CompleteReply> {
        let mut reply = CompleteReply::default();
        for (id, line) in results {
            match self.items.remove(&id) {
                Some(item) => {
                    if matches!(item.state, ItemState::Queued) {
                        self.queued -= 1;
                    }
                    self.finish(id, line.into_boxed_str(), item.span.end);
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
    /// Returns how many were in flight.
    pub fn release(&mut self, ids: &[u64]) -> io::Result<u64> {
        let mut released = 0;
        let mut front = Vec::new();
        for &id in ids {
            if self.is_in_flight(id) {
                released += 1;
                if self.requeue(id, Cause::Release)? {
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
            .filter_map(|(&id, item)| match item.state {
                ItemState::InFlight { issued_at, seq } => Some((issued_at + timeout, id, seq)),
                ItemState::Queued => None,
            })
            .collect();
        live.sort_unstable();
        self.deadlines = live.into();
    }

    /// Makes the output durable and records it in the checkpoint.
    pub fn checkpoint(&mut self) -> io::Result<()> {
        self.output.sync()?;
        Checkpoint::capture(
            &self.config.infile,
            &self.config.outfile,
            self.next_write_id,
            self.written_input_offset,
            self.output.len(),
        )?
        .save(&self.config.checkpoint)
    }

    /// The counts of `GET /status`.
    pub fn status(&self, now: Instant) -> StatusResponse {
        let in_flight = self.items.len() as u64 - self.queued;
        let oldest_in_flight = self
            .items
            .iter()
            .filter_map(|(&id, item)| match item.state {
                ItemState::InFlight { issued_at, .. } => Some((issued_at, id, item.retry_count)),
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
            let items = &self.items;
            self.deadlines
                .retain(|(_, id, seq)| issue_seq(items, *id) == Some(*seq));
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
        issue_seq(&self.items, id).is_some()
    }

    /// Whether deadline entry `(id, seq)` is the live issue of an in-flight item.
    fn is_current(&self, id: u64, seq: u64) -> bool {
        issue_seq(&self.items, id) == Some(seq)
    }

    /// Marks an in-flight item as queued for reissue (the caller puts it in the
    /// queue, at the front or the back) and returns true, or tombstones it when
    /// its reissues are used up and returns false.
    fn requeue(&mut self, id: u64, cause: Cause) -> io::Result<bool> {
        let item = self.items.get_mut(&id).expect("requeue of an issued item");
        match cause {
            Cause::Timeout => item.reissues.timeout += 1,
            Cause::Release => item.reissues.release += 1,
        }
        if self
            .config
            .max_retries
            .is_some_and(|max| item.retry_count >= max)
        {
            let item = self.items.remove(&id).expect("present");
            let content = self.input.read_span(item.span)?;
            self.tombstones += 1;
            tracing::warn!(
                work_id = id,
                retries = item.retry_count,
                "tombstoned after too many reissues"
            );
            self.finish(
                id,
                tombstone(id, &content, item.reissues).into(),
                item.span.end,
            );
            return Ok(false);
        }
        item.retry_count += 1;
        item.state = ItemState::Queued;
        self.queued += 1;
        match cause {
            Cause::Timeout => self.reissues.timeout += 1,
            Cause::Release => self.reissues.release += 1,
        }
        Ok(true)
    }

    fn finish(&mut self, id: u64, line: Box<str>, input_end: u64) {
        let slot = (id - self.next_write_id) as usize;
        if slot >= self.reorder.len() {
            self.reorder.resize_with(slot + 1, || None);
        }
        debug_assert!(self.reorder[slot].is_none(), "line {id} finished twice");
        self.reorder_bytes += line.len() as u64;
        self.reorder_len += 1;
        self.reorder[slot] = Some(Done { line, input_end });
    }

    /// Writes every result that is next in order, then flushes.
    fn write_ready(&mut self) -> io::Result<()> {
        let mut wrote = false;
        while let Some(Some(_)) = self.reorder.front() {
            let done = self.reorder.pop_front().flatten().expect("checked above");
            self.reorder_bytes -= done.line.len() as u64;
            self.reorder_len -= 1;
            self.output.write_line(&done.line)?;
            self.next_write_id += 1;
            self.written_input_offset = done.input_end;
            wrote = true;
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

/// The issue sequence number of `id` when it is in flight.
fn issue_seq(items: &HashMap<u64, Item>, id: u64) -> Option<u64> {
    match items.get(&id)?.state {
        ItemState::InFlight { seq, .. } => Some(seq),
        ItemState::Queued => None,
    }
}

/// A work id with a text: a result line, or why it was refused.
pub type IdLine = (u64, String);

/// Splits results into `(work_id, line)` pairs that are one JSON value on one
/// line, and refusals `(work_id, why)`.
pub fn check_results(results: Vec<WorkItem>) -> (Vec<IdLine>, Vec<IdLine>) {
    let mut valid = Vec::with_capacity(results.len());
    let mut refused = Vec::new();
    for r in results {
        match r.result {
            Some(s) => match check_result_line(&s) {
                Ok(()) => valid.push((r.work_id, s)),
                Err(why) => refused.push((r.work_id, why)),
            },
            None => refused.push((r.work_id, "its result is null".into())),
        }
    }
    (valid, refused)
}

/// Checks that a result is one JSON value that fits on one output line.
pub fn check_result_line(s: &str) -> Result<(), String> {
    if s.contains(['\n', '\r']) {
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
                outfile: dir.path().join("out.jsonl"),
                checkpoint: dir.path().join("out.jsonl.checkpoint"),
                infile,
                work_timeout: TIMEOUT,
                max_retries,
                retry_secs: 300,
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
            l.release(&[2, 0, 7, 2]).unwrap(),
            2,
            "only items in flight count"
        );
        let r = l.take_work(3, t).unwrap();
        assert_eq!(ids(&r), vec![2, 0, 4]);
        assert_eq!(r.items[0].retry_count, 1);
        assert_eq!(
            l.status(t).reissues,
            ReissueCounts {
                timeout: 0,
                release: 2
            }
        );
    }

    #[test]
    fn a_result_for_a_queued_item_is_accepted_and_not_reissued() {
        let job = Job::new(&lines(2), Some(3));
        let t = Instant::now();
        let mut l = job.open(t).unwrap();
        l.take_work(1, t).unwrap();
        l.release(&[0]).unwrap();
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

        let mut l = job.open(t).unwrap();
        assert_eq!(l.lines_written(), 3);
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
            Checkpoint,
            Crash { torn: bool },
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => (1usize..5).prop_map(Op::Take),
                4 => any::<usize>().prop_map(Op::Complete),
                1 => any::<usize>().prop_map(Op::Duplicate),
                1 => any::<usize>().prop_map(Op::Release),
                1 => Just(Op::Expire),
                1 => Just(Op::Checkpoint),
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

        fn run(n: u64, max_retries: Option<u32>, ops: Vec<Op>) {
            let job = Job::new(&lines(n), max_retries);
            let mut t = Instant::now();
            let mut l = job.open(t).unwrap();
            // Items held by workers, which outlive server restarts.
            let mut held: Vec<WorkItem> = Vec::new();
            let mut sent: Vec<WorkItem> = Vec::new();
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
                        l.release(&[item.work_id]).unwrap();
                    }
                    Op::Expire => {
                        t += TIMEOUT;
                        l.tick(t).unwrap();
                    }
                    Op::Checkpoint => l.checkpoint().unwrap(),
                    Op::Crash { torn } => {
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
            #![proptest_config(ProptestConfig::with_cases(64))]
            #[test]
            fn output_line_i_is_always_the_result_or_tombstone_of_line_i(
                n in 0u64..25,
                max_retries in prop_oneof![Just(None), (0u32..3).prop_map(Some)],
                ops in proptest::collection::vec(op(), 0..80),
            ) {
                run(n, max_retries, ops);
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
