//! Leases: how long an issued line stays with its worker.
//!
//! Every issue grants a lease that runs for the work timeout; a heartbeat
//! renews it from the moment it arrives. The deadlines live in one queue in
//! deadline order: every entry is pushed as `now + timeout` with `now` never
//! going back, so appending keeps the order, and only a change of the timeout
//! rebuilds it. Renewing pushes a new entry rather than moving the old one;
//! each lease carries the sequence number of its newest entry, so older
//! entries are recognised as stale when they reach the front, and compaction
//! drops them once they outnumber the live ones.
//!
//! A worker's heartbeat can also renew every lease it holds without naming
//! them: the ledger renews such a lease when its deadline comes, from the
//! worker's last heartbeat. That renewal starts from a moment already past,
//! so its entry may belong before the queue's back: those few go to a small
//! heap beside the queue, and the earliest of the two fronts comes first.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

/// One line's lease: granted when it is issued, renewed by heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Lease {
    /// When the line was issued to its current holder.
    pub(super) issued_at: Instant,
    /// When the lease was granted or last renewed: it ends a work timeout
    /// later. Never earlier than `issued_at`.
    renewed_at: Instant,
    /// The sequence number of its newest deadline entry.
    seq: u64,
}

impl Lease {
    /// Whether deadline entry `seq` is this lease's newest, i.e. not stale.
    pub(super) fn is_current(&self, seq: u64) -> bool {
        self.seq == seq
    }
}

/// A deadline entry: line `id`'s lease `seq` ends at `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Deadline {
    at: Instant,
    id: u64,
    seq: u64,
}

/// The deadlines of every lease, in order.
#[derive(Debug)]
pub(super) struct Leases {
    timeout: Duration,
    /// Deadline entries in `at` order; may hold stale entries (see the module
    /// docs).
    deadlines: VecDeque<Deadline>,
    /// Entries that belong before the back of `deadlines` (renewals from a
    /// past heartbeat), earliest first.
    late: BinaryHeap<Reverse<Deadline>>,
    /// The last sequence number given out.
    seq: u64,
}

impl Leases {
    pub(super) fn new(timeout: Duration) -> Leases {
        Leases {
            timeout,
            deadlines: VecDeque::new(),
            late: BinaryHeap::new(),
            seq: 0,
        }
    }

    /// The work timeout: how long a lease runs from its grant or renewal.
    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A new lease on line `id` from `now`.
    pub(super) fn grant(&mut self, id: u64, now: Instant) -> Lease {
        Lease {
            issued_at: now,
            renewed_at: now,
            seq: self.push(id, now),
        }
    }

    /// Renews line `id`'s lease: it now runs a work timeout from `now`.
    pub(super) fn renew(&mut self, id: u64, lease: &mut Lease, now: Instant) {
        lease.renewed_at = now.max(lease.renewed_at);
        lease.seq = self.push(id, lease.renewed_at);
    }

    /// Renews line `id`'s lease from `at`, the last heartbeat of the worker
    /// that holds it, when that is later than its last renewal. Returns
    /// whether it did.
    pub(super) fn renew_from(&mut self, id: u64, lease: &mut Lease, at: Instant) -> bool {
        if at <= lease.renewed_at {
            return false;
        }
        self.renew(id, lease, at);
        true
    }

    fn push(&mut self, id: u64, from: Instant) -> u64 {
        self.seq += 1;
        let entry = Deadline {
            at: from + self.timeout,
            id,
            seq: self.seq,
        };
        match self.deadlines.back() {
            Some(back) if back.at > entry.at => self.late.push(Reverse(entry)),
            _ => self.deadlines.push_back(entry),
        }
        self.seq
    }

    /// Takes the earliest deadline entry that has passed at `now`, as
    /// `(id, seq)`; it may be stale (check with [`Lease::is_current`]).
    pub(super) fn pop_expired(&mut self, now: Instant) -> Option<(u64, u64)> {
        let queued = self.deadlines.front().copied();
        let late = self.late.peek().map(|r| r.0);
        let earliest = match (queued, late) {
            (Some(q), Some(l)) => q.min(l),
            (q, l) => q.or(l)?,
        };
        if earliest.at > now {
            return None;
        }
        if late == Some(earliest) {
            self.late.pop();
        } else {
            self.deadlines.pop_front();
        }
        Some((earliest.id, earliest.seq))
    }

    /// The earliest deadline, possibly of a stale entry (so possibly earlier
    /// than any live lease ends): a lower bound for when something may expire.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let queued = self.deadlines.front().map(|d| d.at);
        let late = self.late.peek().map(|r| r.0.at);
        match (queued, late) {
            (Some(q), Some(l)) => Some(q.min(l)),
            (q, l) => q.or(l),
        }
    }

    /// Entries in the queue, stale ones included.
    pub(super) fn entries(&self) -> usize {
        self.deadlines.len() + self.late.len()
    }

    /// Changes the work timeout. Every live lease (`(id, lease)` of each
    /// in-flight line) then ends the new timeout after its last renewal, never
    /// after its first issue: a line whose worker heartbeats does not expire
    /// because the timeout changed.
    pub(super) fn set_timeout(
        &mut self,
        timeout: Duration,
        live: impl Iterator<Item = (u64, Lease)>,
    ) {
        self.timeout = timeout;
        let mut deadlines: Vec<Deadline> = live
            .map(|(id, lease)| Deadline {
                at: lease.renewed_at + timeout,
                id,
                seq: lease.seq,
            })
            .collect();
        deadlines.sort_unstable_by_key(|d| (d.at, d.id));
        self.deadlines = deadlines.into();
        self.late.clear();
    }

    /// Drops stale entries once they outnumber the `live` leases, so the queue
    /// stays proportional to what is in flight rather than to the issue and
    /// heartbeat rate times the timeout. Amortized O(1) per entry.
    pub(super) fn compact(&mut self, live: usize, is_current: impl Fn(u64, u64) -> bool) {
        if self.entries() > 2 * live + 1024 {
            self.deadlines.retain(|d| is_current(d.id, d.seq));
            self.late.retain(|d| is_current(d.0.id, d.0.seq));
        }
    }
}
