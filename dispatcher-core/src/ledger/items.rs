//! The lines issued and without a result: each one's [`Item`] (its attempts,
//! holder and state), why it went back to the queue ([`Cause`]), and
//! [`Items`], which holds them and keeps the counts of queued items and
//! backup copies in one place.

use std::collections::VecDeque;
use std::io;

use slab::Slab;
use tokio::time::Instant;

use super::leases::Lease;
use super::Ledger;
use crate::input::LineSpan;
use crate::protocol::{ReissueCounts, ReleaseReason};

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
    pub(super) fn is_failure(self) -> bool {
        !matches!(self, Cause::Release)
    }

    /// Counts one reissue by this cause in `counts`.
    pub(super) fn tally(self, counts: &mut ReissueCounts) {
        match self {
            Cause::Timeout => counts.timeout += 1,
            Cause::Release | Cause::LegacyRelease => counts.release += 1,
            Cause::Retry => counts.retry += 1,
        }
    }
}

/// An issued line that has no result yet.
#[derive(Debug)]
pub(super) struct Item {
    /// Its work id.
    pub(super) id: u64,
    pub(super) span: LineSpan,
    /// Failures so far (expiries, task retries): the `retry_count` of its next
    /// issue, checked against `max_retries`.
    pub(super) retry_count: u32,
    /// Releases so far, checked against `max_releases`.
    pub(super) releases: u32,
    /// Reissues by cause, for the tombstone's history.
    pub(super) reissues: ReissueCounts,
    /// When it was first issued, for the blocking line's age.
    pub(super) first_issued: Instant,
    /// The worker of its current issue, when the worker says who it is.
    pub(super) holder: Option<u64>,
    /// The worker whose task asked for another attempt: another worker gets
    /// the retry when one asks.
    pub(super) avoid: Option<u64>,
    /// `Some` while a backup copy of it is out: the worker the copy went to,
    /// when it says who it is (its heartbeats keep the lease too, and it
    /// learns when the other copy wins). Changed only by [`Items`].
    backup: Option<Option<u64>>,
    /// Changed only by [`Items`], which counts the queued items.
    state: ItemState,
}

/// Where an item is.
#[derive(Debug)]
pub(super) enum ItemState {
    /// With a worker, under a lease.
    InFlight(Lease),
    /// Waiting in the queue to be issued again.
    Queued,
    /// Read ahead with grouping on (`--group-by`), not issued yet: its
    /// key's lines wait in [`super::groups`] for the worker that has it.
    /// (Boxed: every item, in flight or not, stays the size of a lease.)
    Waiting(Box<ReadAhead>),
}

/// What a line read ahead keeps until it is issued, so that issuing it
/// neither reads the input again nor evaluates the group filter again.
#[derive(Debug)]
pub(super) struct ReadAhead {
    /// Its group key.
    pub(super) key: Option<u64>,
    /// Its text, while the texts kept stay under [`READ_AHEAD_TEXT_BYTES`]
    /// (a line past that is read again from the input when issued).
    text: Option<String>,
}

/// Bytes of read-ahead line texts kept in memory at most: with lines of a
/// few KiB, the whole lookahead; with huge lines, this much, and the rest
/// are read again from the input when they go out.
pub(super) const READ_AHEAD_TEXT_BYTES: usize = 64 << 20;

impl Item {
    /// A line issued for the first time, to `holder`, under `lease`.
    pub(super) fn issued(id: u64, span: LineSpan, holder: Option<u64>, lease: Lease) -> Item {
        Item {
            id,
            span,
            retry_count: 0,
            releases: 0,
            reissues: ReissueCounts::default(),
            first_issued: lease.issued_at,
            holder,
            avoid: None,
            backup: None,
            state: ItemState::InFlight(lease),
        }
    }

    /// A line read ahead at `now`, not issued yet (grouping).
    fn waiting(id: u64, span: LineSpan, read: Box<ReadAhead>, now: Instant) -> Item {
        Item {
            id,
            span,
            retry_count: 0,
            releases: 0,
            reissues: ReissueCounts::default(),
            first_issued: now,
            holder: None,
            avoid: None,
            backup: None,
            state: ItemState::Waiting(read),
        }
    }

    /// Where it is.
    pub(super) fn state(&self) -> &ItemState {
        &self.state
    }

    /// Its lease, while it is in flight.
    pub(super) fn lease(&self) -> Option<&Lease> {
        match &self.state {
            ItemState::InFlight(lease) => Some(lease),
            ItemState::Queued | ItemState::Waiting(_) => None,
        }
    }

    /// Its lease, to renew, while it is in flight.
    pub(super) fn lease_mut(&mut self) -> Option<&mut Lease> {
        match &mut self.state {
            ItemState::InFlight(lease) => Some(lease),
            ItemState::Queued | ItemState::Waiting(_) => None,
        }
    }

    /// Whether a backup copy of it is out.
    pub(super) fn backed_up(&self) -> bool {
        self.backup.is_some()
    }

    /// The workers that hold a copy of it and said who they are.
    pub(super) fn holders(&self) -> impl Iterator<Item = u64> {
        [self.holder, self.backup.flatten()].into_iter().flatten()
    }
}

/// The issued lines without a result, addressed by slab key (the window's
/// slots hold the keys), the queue of those waiting to be issued again, and
/// the counts that follow from their states, kept here and nowhere else.
#[derive(Debug, Default)]
pub(super) struct Items {
    slab: Slab<Item>,
    /// Ids waiting to be issued again, in order; may hold ids finished
    /// meanwhile, which are skipped.
    queue: VecDeque<u64>,
    /// Items in [`ItemState::Queued`].
    queued: u64,
    /// Items in [`ItemState::Waiting`].
    waiting: u64,
    /// Bytes of the texts those keep.
    waiting_text_bytes: usize,
    /// Items with a backup copy out.
    backups_out: u32,
}

impl Items {
    /// Adds an item issued for the first time; returns its key.
    pub(super) fn insert(&mut self, item: Item) -> usize {
        debug_assert!(matches!(item.state, ItemState::InFlight(_)) && item.backup.is_none());
        self.slab.insert(item)
    }

    /// Adds line `id`, read ahead at `now` with group key `group`, as a
    /// waiting item that keeps `text` while the kept texts stay under
    /// [`READ_AHEAD_TEXT_BYTES`]; returns its key.
    pub(super) fn insert_waiting(
        &mut self,
        id: u64,
        span: LineSpan,
        group: Option<u64>,
        text: String,
        now: Instant,
    ) -> usize {
        let text = (self.waiting_text_bytes + text.len() <= READ_AHEAD_TEXT_BYTES).then(|| {
            self.waiting_text_bytes += text.len();
            text
        });
        self.waiting += 1;
        let read = Box::new(ReadAhead { key: group, text });
        self.slab.insert(Item::waiting(id, span, read, now))
    }

    /// Waiting item `key` is issued for the first time, to `holder`, under
    /// `lease`; returns it and the text it kept, if it kept it.
    pub(super) fn issue_waiting(
        &mut self,
        key: usize,
        holder: Option<u64>,
        lease: Lease,
    ) -> (&Item, Option<String>) {
        let item = &mut self.slab[key];
        item.holder = holder;
        item.first_issued = lease.issued_at;
        let ItemState::Waiting(read) =
            std::mem::replace(&mut item.state, ItemState::InFlight(lease))
        else {
            unreachable!("issue_waiting of an item that is not waiting");
        };
        self.waiting -= 1;
        if let Some(text) = &read.text {
            self.waiting_text_bytes -= text.len();
        }
        (item, read.text)
    }

    /// Takes item `key` out, for good.
    pub(super) fn remove(&mut self, key: usize) -> Item {
        let item = self.slab.remove(key);
        match item.state {
            ItemState::Queued => self.queued -= 1,
            ItemState::Waiting(ref read) => {
                self.waiting -= 1;
                if let Some(text) = &read.text {
                    self.waiting_text_bytes -= text.len();
                }
            }
            ItemState::InFlight(_) => {}
        }
        if item.backup.is_some() {
            self.backups_out -= 1;
        }
        item
    }

    /// Item `key` is issued again, to `holder`, under `lease`.
    pub(super) fn reissue(&mut self, key: usize, holder: Option<u64>, lease: Lease) -> &Item {
        let item = &mut self.slab[key];
        debug_assert!(matches!(item.state, ItemState::Queued));
        item.holder = holder;
        item.state = ItemState::InFlight(lease);
        self.queued -= 1;
        item
    }

    /// Item `key` waits to be issued again (the caller queues its id).
    pub(super) fn unissue(&mut self, key: usize) {
        let item = &mut self.slab[key];
        debug_assert!(matches!(item.state, ItemState::InFlight(_)));
        item.state = ItemState::Queued;
        self.queued += 1;
    }

    /// A backup copy of item `key` goes to `worker`.
    pub(super) fn back_up(&mut self, key: usize, worker: Option<u64>) {
        let item = &mut self.slab[key];
        debug_assert!(item.backup.is_none());
        item.backup = Some(worker);
        self.backups_out += 1;
    }

    /// Item `key`'s backup copy no longer counts: the item is open to a new
    /// one (the copy may still answer).
    pub(super) fn forget_backup(&mut self, key: usize) {
        if self.slab[key].backup.take().is_some() {
            self.backups_out -= 1;
        }
    }

    /// Next id waiting to be issued again (it may be finished meanwhile).
    pub(super) fn pop_queued(&mut self) -> Option<u64> {
        self.queue.pop_front()
    }

    /// Queues `id` to be issued again after the others.
    pub(super) fn queue_back(&mut self, id: u64) {
        self.queue.push_back(id);
    }

    /// Queues `ids` to be issued again before the others, in their order.
    pub(super) fn queue_front(&mut self, ids: &[u64]) {
        for &id in ids.iter().rev() {
            self.queue.push_front(id);
        }
    }

    /// Items waiting to be issued again.
    pub(super) fn queued(&self) -> u64 {
        self.queued
    }

    /// Items in flight.
    pub(super) fn in_flight(&self) -> u64 {
        self.slab.len() as u64 - self.queued - self.waiting
    }

    /// Backup copies out.
    pub(super) fn backups_out(&self) -> u32 {
        self.backups_out
    }

    /// Every item, with its key.
    pub(super) fn iter(&self) -> slab::Iter<'_, Item> {
        self.slab.iter()
    }
}

impl std::ops::Index<usize> for Items {
    type Output = Item;
    fn index(&self, key: usize) -> &Item {
        &self.slab[key]
    }
}

impl std::ops::IndexMut<usize> for Items {
    /// Item `key`'s counts and holders; its state and backup change through
    /// [`Items`]' own methods, which keep the counts.
    fn index_mut(&mut self, key: usize) -> &mut Item {
        &mut self.slab[key]
    }
}

impl Ledger {
    /// The lease of line `id`, when it is in flight.
    pub(super) fn lease_of(&self, id: u64) -> Option<&Lease> {
        self.item(id)?.lease()
    }

    /// The slab key of line `id`'s item, when it is issued or queued without a
    /// result. A key rather than a reference, so that callers can borrow the
    /// item (`&mut self.items[key]`) beside the ledger's other fields.
    pub(super) fn key_of(&self, id: u64) -> Option<usize> {
        self.window.issued(id).map(|(_, key)| key)
    }

    /// The item of line `id`, when it is issued or queued without a result.
    pub(super) fn item(&self, id: u64) -> Option<&Item> {
        self.key_of(id).map(|key| &self.items[key])
    }

    /// Takes the item of line `id` out, leaving its slot open for the window's
    /// `finish`.
    pub(super) fn take_item(&mut self, id: u64) -> Option<Item> {
        let (slot, key) = self.window.issued(id)?;
        self.window.open(slot);
        Some(self.items.remove(key))
    }

    /// Marks an in-flight item as queued for reissue (the caller puts it in the
    /// queue, at the front or the back) and returns true, or tombstones it when
    /// its reissues are used up and returns false.
    pub(super) fn requeue(&mut self, id: u64, cause: Cause) -> io::Result<bool> {
        let key = self.key_of(id).expect("requeue of an issued item");
        self.items.forget_backup(key);
        let item = &mut self.items[key];
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
            self.counters.finished(id, &record);
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
        self.items.unissue(key);
        cause.tally(&mut self.counters.reissues);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::super::leases::Leases;
    use super::*;

    fn span(len: usize) -> LineSpan {
        LineSpan {
            offset: 0,
            len: len as u32,
            end: len as u64 + 1,
        }
    }

    #[test]
    fn an_item_read_ahead_costs_the_items_in_flight_nothing() {
        // The state of every item is no larger than a lease: the other
        // states live in its niche (a lease's nanoseconds), the read-ahead
        // line's key and text behind a box.
        assert!(
            std::mem::size_of::<ItemState>() <= std::mem::size_of::<Lease>(),
            "{} bytes",
            std::mem::size_of::<ItemState>()
        );
    }

    #[test]
    fn read_ahead_texts_are_kept_up_to_their_bound_and_the_rest_is_read_again() {
        let t = Instant::now();
        let mut leases = Leases::new(std::time::Duration::from_secs(60));
        let mut items = Items::default();
        let big = "x".repeat(READ_AHEAD_TEXT_BYTES - 1);
        let a = items.insert_waiting(0, span(big.len()), Some(7), big, t);
        // Two more bytes do not fit; one does.
        let b = items.insert_waiting(1, span(2), None, "ab".into(), t);
        let c = items.insert_waiting(2, span(1), None, "c".into(), t);
        let ItemState::Waiting(read) = items[a].state() else {
            panic!("waiting")
        };
        assert_eq!(read.key, Some(7), "the key stays with the line");
        let (_, text) = items.issue_waiting(b, Some(1), leases.grant(1, t));
        assert_eq!(text, None, "past the bound: read again when issued");
        let (item, text) = items.issue_waiting(c, Some(1), leases.grant(2, t));
        assert_eq!((text.as_deref(), item.holder), (Some("c"), Some(1)));
        // Issuing the big one frees its bytes for the next lines.
        let (_, text) = items.issue_waiting(a, None, leases.grant(0, t));
        assert_eq!(text.map(|t| t.len()), Some(READ_AHEAD_TEXT_BYTES - 1));
        let d = items.insert_waiting(3, span(2), None, "de".into(), t);
        assert_eq!(items.remove(d).id, 3);
        assert_eq!(
            items.waiting_text_bytes, 0,
            "a removed line frees its bytes"
        );
        let e = items.insert_waiting(4, span(2), None, "ef".into(), t);
        let (_, text) = items.issue_waiting(e, None, leases.grant(4, t));
        assert_eq!(text.as_deref(), Some("ef"));
        assert_eq!((items.waiting, items.in_flight()), (0, 4));
    }
}
