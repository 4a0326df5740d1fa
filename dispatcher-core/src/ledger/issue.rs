//! How lines go out: read ahead for grouping, read as new lines, reissued
//! from the queue, or handed out again as straggler backups.

use std::io;

use tokio::time::Instant;

use crate::input::LineSpan;

use super::*;

impl Ledger {
    /// With grouping on: reads lines ahead until `lookahead` wait (or the
    /// input ends), each keyed by the group filter; returns how many kept
    /// lines (`--redo-errors`) it read past.
    pub(super) fn read_ahead(&mut self, now: Instant) -> io::Result<u64> {
        let mut kept = 0;
        while !self.input_exhausted
            && kept < KEEP_PER_REQUEST
            && self
                .groups
                .as_ref()
                .is_some_and(|g| g.has_room(self.window.finished()))
        {
            match self.read_next()? {
                None => break,
                Some(Read::Kept) => kept += 1,
                Some(Read::Invalid) => {}
                Some(Read::Line(id, span, content)) => {
                    let groups = self.groups.as_mut().expect("checked above");
                    let group = groups.key_of(&content);
                    groups.push(id, group);
                    let key = self.items.insert_waiting(id, span, group, content, now);
                    self.window.push_issued(key);
                }
            }
        }
        Ok(kept)
    }

    /// With grouping on: the line the output waits for, when it waits
    /// unissued (its key's owner busy elsewhere) while the results behind
    /// it pile up (see [`Groups::head_is_overdue`]), issued to `worker`.
    pub(super) fn take_overdue_head(
        &mut self,
        worker: Option<u64>,
        now: Instant,
    ) -> io::Result<Option<Issue>> {
        let held = self.window.finished();
        if !self
            .groups
            .as_ref()
            .is_some_and(|g| g.head_is_overdue(held))
        {
            return Ok(None);
        }
        let id = self.window.next_write_id();
        let Some(key) = self.key_of(id) else {
            return Ok(None);
        };
        let ItemState::Waiting(read) = self.items[key].state() else {
            return Ok(None);
        };
        let groups = self.groups.as_mut().expect("checked above");
        if !groups.take_line(id, read.key, worker) {
            return Ok(None);
        }
        self.issue_read_ahead(key, id, worker, now).map(Some)
    }

    /// Issues waiting item `key` (line `id`, read ahead) to `worker`, with
    /// the text it kept or, past the bound on those, read again.
    pub(super) fn issue_read_ahead(
        &mut self,
        key: usize,
        id: u64,
        worker: Option<u64>,
        now: Instant,
    ) -> io::Result<Issue> {
        let lease = self.leases.grant(id, now);
        let (item, text) = self.items.issue_waiting(key, worker, lease);
        match text {
            Some(text) => Ok(self.issue(id, text, 0)),
            None => {
                let span = item.span;
                self.work_item(id, span, 0)
            }
        }
    }

    /// Reads the next input line and takes its id: `None` at the end of the
    /// input. A line whose previous output is kept (`--redo-errors`) is
    /// kept, and one that is not UTF-8 gets its error record, here.
    pub(super) fn read_next(&mut self) -> io::Result<Option<Read>> {
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
    pub(super) fn invalid_line(&mut self, id: u64, span: LineSpan, bytes: &[u8]) -> io::Result<()> {
        self.counters.invalid_lines += 1;
        self.window.push_open();
        let record = crate::record::invalid_utf8(id, span.offset, &self.config.infile, bytes);
        self.counters.finished(id, &record);
        self.window.finish(id, record.into(), span.end)
    }

    /// Issues queued item `key` (line `id`) again, to `worker`.
    pub(super) fn reissue(
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
    pub(super) fn issue(&self, id: u64, content: String, retry_count: u32) -> Issue {
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
    pub(super) fn work_item(&self, id: u64, span: LineSpan, retry_count: u32) -> io::Result<Issue> {
        Ok(self.issue(id, self.input.read_span(span)?, retry_count))
    }

    /// Hands idle workers backup copies of the oldest in-flight items that have
    /// none yet, up to `max_backups` out at once. The primary keeps its lease;
    /// whichever result comes first wins.
    pub(super) fn issue_backups(
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
}
