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

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

use crate::checkpoint::{Checkpoint, ResumeError};
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
    /// Deadlines of in-flight items; entries whose `seq` no longer matches are
    /// stale and skipped.
    heap: BinaryHeap<Reverse<(Instant, u64, u64)>>,
    /// Issue counter, to tell heap entries of successive issues apart.
    seq: u64,
    /// Finished lines waiting for an earlier line.
    reorder: BTreeMap<u64, Done>,
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
}

impl Ledger {
    /// Opens the job's files, resuming from the checkpoint and the output file
    /// when there is one. See [`ResumeError`] for what is refused.
    pub fn open(config: LedgerConfig, now: Instant) -> Result<Ledger, ResumeError> {
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
            output: OutputWriter::open(&config.outfile, output_len)?,
            written_input_offset: input.next_offset(),
            input,
            config,
            input_exhausted: false,
            next_work_id: lines,
            items: HashMap::new(),
            queue: VecDeque::new(),
            queued: 0,
            heap: BinaryHeap::new(),
            seq: 0,
            reorder: BTreeMap::new(),
            reorder_bytes: 0,
            next_write_id: lines,
            input_len,
            started: now,
            reissues: ReissueCounts::default(),
            tombstones: 0,
            invalid_lines: 0,
            ignored_results: 0,
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
                    self.heap
                        .push(Reverse((now + self.config.work_timeout, id, self.seq)));
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
                    self.heap
                        .push(Reverse((now + self.config.work_timeout, id, self.seq)));
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
        let mut reply = CompleteReply::default();
        for r in results {
            let id = r.work_id;
            let line = match r.result {
                Some(s) => match check_result_line(&s) {
                    Ok(()) => s,
                    Err(why) => {
                        reply.refused.push((id, why));
                        continue;
                    }
                },
                None => {
                    reply.refused.push((id, "its result is null".into()));
                    continue;
                }
            };
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
        self.write_ready()?;
        Ok(reply)
    }

    /// Puts in-flight items back at the front of the queue, in the given order.
    /// Returns how many were in flight.
    pub fn release(&mut self, ids: &[u64]) -> io::Result<u64> {
        let mut released = 0;
        for &id in ids.iter().rev() {
            if matches!(
                self.items.get(&id).map(|i| &i.state),
                Some(ItemState::InFlight { .. })
            ) {
                self.requeue(id, Cause::Release)?;
                released += 1;
            }
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
        self.heap.clear();
        for (&id, item) in &self.items {
            if let ItemState::InFlight { issued_at, seq } = item.state {
                self.heap.push(Reverse((issued_at + timeout, id, seq)));
            }
        }
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
            pending: self.reorder.len() as u64,
            heap_size: self.heap.len() as u64,
            expired_reissues: self.reissues.timeout,
            lines_done: self.next_write_id,
            lines_total: self.input_exhausted.then_some(self.next_work_id),
            input_bytes_consumed: self.input.next_offset(),
            input_bytes_total: self.input_len,
            in_flight,
            queued_for_reissue: self.queued,
            reorder_buffer: self.reorder.len() as u64,
            reorder_buffer_bytes: self.reorder_bytes,
            reissues: self.reissues,
            tombstones: self.tombstones,
            invalid_lines: self.invalid_lines,
            ignored_results: self.ignored_results,
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
            .heap
            .peek()
            .map(|Reverse((deadline, _, _))| deadline.saturating_duration_since(now).as_secs() + 1);
        until_expiry.map_or(self.config.retry_secs, |s| s.min(self.config.retry_secs)).max(1)
    }

    fn expire(&mut self, now: Instant) -> io::Result<()> {
        while let Some(&Reverse((deadline, id, seq))) = self.heap.peek() {
            if deadline > now {
                break;
            }
            self.heap.pop();
            let current = matches!(
                self.items.get(&id).map(|i| &i.state),
                Some(ItemState::InFlight { seq: s, .. }) if *s == seq
            );
            if current {
                self.requeue(id, Cause::Timeout)?;
            }
        }
        Ok(())
    }

    /// Moves an in-flight item back to the queue, or tombstones it when its
    /// reissues are used up.
    fn requeue(&mut self, id: u64, cause: Cause) -> io::Result<()> {
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
            tracing::warn!(work_id = id, retries = item.retry_count, "tombstoned after too many reissues");
            self.finish(id, tombstone(id, &content, item.reissues).into(), item.span.end);
            return Ok(());
        }
        item.retry_count += 1;
        item.state = ItemState::Queued;
        self.queued += 1;
        match cause {
            Cause::Timeout => {
                self.reissues.timeout += 1;
                self.queue.push_back(id);
            }
            Cause::Release => {
                self.reissues.release += 1;
                self.queue.push_front(id);
            }
        }
        Ok(())
    }

    fn finish(&mut self, id: u64, line: Box<str>, input_end: u64) {
        self.reorder_bytes += line.len() as u64;
        self.reorder.insert(id, Done { line, input_end });
    }

    /// Writes every result that is next in order, then flushes.
    fn write_ready(&mut self) -> io::Result<()> {
        let mut wrote = false;
        while let Some(entry) = self.reorder.first_entry() {
            if *entry.key() != self.next_write_id {
                break;
            }
            let done = entry.remove();
            self.reorder_bytes -= done.line.len() as u64;
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
