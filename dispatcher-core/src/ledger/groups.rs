//! Prefix affinity (`--group-by`): lines read ahead of issue, by group key,
//! and which worker each key was handed to, so that lines sharing a prompt
//! prefix reach the engine that has it cached.
//!
//! With grouping on, the ledger reads up to `lookahead` lines ahead into
//! waiting items (no lease; their slots sit in the window like issued
//! ones, so the output stays in input order). A work request then takes,
//! in this order: lines of keys the worker already had; lines of keys no
//! worker has (oldest first), which become the worker's, together; lines
//! without a key; and when none of those is left, a share of the largest
//! group another worker has (so a huge group spreads over several workers
//! once the rest of the job runs dry). A worker that asks for no work for
//! a work timeout loses its keys.
//!
//! The lookahead also bounds what the job holds: lines stop being read
//! ahead while `lookahead` results wait behind a line not written yet, and
//! once half that many wait, the line they wait for goes out first to any
//! worker that asks (its key's owner may be busy with other lines for
//! long). What a crash would lose stays about the lookahead.
//!
//! Everything here is bookkeeping of ids and keys: the items themselves
//! (their spans, states and leases) stay in [`super::items::Items`].

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rustc_hash::{FxHashMap, FxHashSet};
use smallvec::SmallVec;
use tokio::time::Instant;

use crate::protocol::GroupStatus;

/// A line's group key: a hash of what the group filter selects, or `None`
/// for a line that has none (it is handed out like any line, in order).
pub type KeyFn = Arc<dyn Fn(&str) -> Option<u64> + Send + Sync>;

/// How lines are grouped (`--group-by`, `--group-by-prefix`, `--lookahead`).
#[derive(Clone)]
pub struct Grouping {
    /// The key of an input line.
    pub key: KeyFn,
    /// Lines read ahead of issue at most.
    pub lookahead: usize,
}

impl fmt::Debug for Grouping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grouping")
            .field("lookahead", &self.lookahead)
            .finish_non_exhaustive()
    }
}

/// Lines read without a key, none with one, after which the server says
/// that its `--group-by` filter finds nothing in this input.
const KEYLESS_WARNING: u64 = 1_000;

/// Who has a key, and where its waiting lines are.
#[derive(Debug, Default)]
struct Key {
    /// Waiting lines, in input order.
    waiting: VecDeque<u64>,
    /// Workers that were handed lines of it (usually one: kept inline).
    owners: SmallVec<[u64; 1]>,
    /// The last line of it read: keys not seen for long are forgotten.
    last_seen: u64,
}

/// Lines read ahead, by key, and the keys' workers.
#[derive(Debug)]
pub(super) struct Groups {
    grouping: Grouping,
    keys: FxHashMap<u64, Key>,
    /// Keys with waiting lines and no owner, by their oldest waiting line.
    unowned: BTreeSet<(u64, u64)>,
    /// Per worker, its keys with waiting lines, by their oldest waiting line.
    ready: FxHashMap<u64, BTreeSet<(u64, u64)>>,
    /// Keys with waiting lines (a few hundred where `keys` remembers tens
    /// of thousands): where [`Groups::largest_share`] looks.
    pending: FxHashSet<u64>,
    /// Waiting lines without a key.
    loose: VecDeque<u64>,
    /// When each worker last asked for work.
    last_ask: FxHashMap<u64, Instant>,
    waiting: usize,
    stats: GroupStatus,
}

impl Groups {
    /// Nothing read ahead yet.
    pub(super) fn new(grouping: Grouping) -> Groups {
        Groups {
            grouping,
            keys: FxHashMap::default(),
            unowned: BTreeSet::new(),
            ready: FxHashMap::default(),
            pending: FxHashSet::default(),
            loose: VecDeque::new(),
            last_ask: FxHashMap::default(),
            waiting: 0,
            stats: GroupStatus::default(),
        }
    }

    /// Lines waiting (read ahead, not issued).
    pub(super) fn waiting(&self) -> usize {
        self.waiting
    }

    /// Whether another line may be read ahead: fewer than `lookahead` lines
    /// wait, and fewer than `lookahead` results are `held` behind a line
    /// not written yet (a key whose owner is busy must not make the
    /// reorder buffer grow while the rest of the job goes out).
    pub(super) fn has_room(&self, held: u64) -> bool {
        let lookahead = self.grouping.lookahead;
        self.waiting < lookahead && held < lookahead as u64
    }

    /// Whether `held` results behind the line the output waits for are
    /// enough for that line to go out first, to whoever asks (see
    /// [`Groups::take_line`]): half the lookahead.
    pub(super) fn head_is_overdue(&self, held: u64) -> bool {
        held >= (self.grouping.lookahead as u64 / 2).max(1)
    }

    /// The group key of a line.
    pub(super) fn key_of(&self, content: &str) -> Option<u64> {
        (self.grouping.key)(content)
    }

    /// Takes waiting line `id` (group key `key`), the oldest that waits,
    /// for `worker`, whoever has its key: the output waits for it. The key's
    /// owners stay as they are. `false` when it is not the oldest waiting.
    pub(super) fn take_line(&mut self, id: u64, key: Option<u64>, worker: Option<u64>) -> bool {
        match key {
            None => {
                if self.loose.front() != Some(&id) {
                    return false;
                }
                self.loose.pop_front();
                self.waiting -= 1;
                true
            }
            Some(k) => {
                let Some(entry) = self.keys.get(&k) else {
                    return false;
                };
                if entry.waiting.front() != Some(&id) {
                    return false;
                }
                let owner = worker.is_some_and(|w| entry.owners.contains(&w));
                let mut out = Vec::with_capacity(1);
                let took = self.take_lines(k, 1, &mut out);
                if owner {
                    self.stats.to_owner += took;
                } else {
                    self.stats.spread += took;
                }
                true
            }
        }
    }

    /// What grouping did so far.
    pub(super) fn stats(&self) -> GroupStatus {
        GroupStatus {
            waiting: self.waiting as u64,
            keys: self.keys.len() as u64,
            ..self.stats
        }
    }

    /// Line `id` was read ahead, with its key: it waits under it.
    pub(super) fn push(&mut self, id: u64, key: Option<u64>) {
        self.waiting += 1;
        let Some(k) = key else {
            self.loose.push_back(id);
            self.stats.keyless += 1;
            if self.stats.keyless == KEYLESS_WARNING && self.keys.is_empty() {
                tracing::warn!(
                    lines = KEYLESS_WARNING,
                    "--group-by gave no key for any of the first lines read: grouping does nothing for this job (lines go out in input order). Check the filter against a line of the input, e.g. with jq"
                );
            }
            return;
        };
        let entry = self.keys.entry(k).or_default();
        entry.last_seen = id;
        entry.waiting.push_back(id);
        if entry.waiting.len() == 1 {
            // It has a waiting line now: ready for its owners, or unowned.
            self.pending.insert(k);
            if entry.owners.is_empty() {
                self.unowned.insert((id, k));
            } else {
                for w in &entry.owners {
                    self.ready.entry(*w).or_default().insert((id, k));
                }
            }
        }
    }

    /// Up to `n` waiting lines for `worker` (in the order the module docs
    /// give), recorded as issued to it.
    pub(super) fn take(&mut self, worker: Option<u64>, n: usize, now: Instant) -> Vec<u64> {
        let mut out = Vec::with_capacity(n.min(self.waiting));
        if let Some(w) = worker {
            self.last_ask.insert(w, now);
            // Its own keys, oldest line first.
            while out.len() < n {
                let Some(&(_, k)) = self.ready.get(&w).and_then(|r| r.first()) else {
                    break;
                };
                self.take_from(k, n - out.len(), &mut out, Took::Own);
            }
        }
        // Keys nobody has, and lines without a key, oldest first.
        while out.len() < n {
            let unowned = self.unowned.first().copied();
            let loose = self.loose.front().copied();
            let key = match (unowned, loose) {
                (Some((first, k)), Some(l)) if first < l => Some(k),
                (Some((_, k)), None) => Some(k),
                _ => None,
            };
            match (key, worker) {
                (Some(k), Some(w)) => self.open(k, w, n - out.len(), &mut out),
                // A worker that does not say who it is owns nothing.
                (Some(k), None) => self.take_anonymous(k, n - out.len(), &mut out),
                (None, _) => match self.loose.pop_front() {
                    Some(id) => {
                        self.waiting -= 1;
                        out.push(id);
                    }
                    None => break,
                },
            }
        }
        // Nothing else: a share of the largest group others have.
        if out.is_empty() && self.waiting > 0 {
            if let Some((k, share)) = self.largest_share(worker) {
                match worker {
                    Some(w) => {
                        self.claim(k, w);
                        self.take_from(k, share.min(n), &mut out, Took::Spread);
                    }
                    None => self.take_anonymous(k, share.min(n), &mut out),
                }
            }
        }
        out
    }

    /// The key with the most waiting lines that `worker` does not have,
    /// and the share of them it may take: an equal share among its owners
    /// and this worker.
    fn largest_share(&self, worker: Option<u64>) -> Option<(u64, usize)> {
        self.pending
            .iter()
            .map(|k| (k, &self.keys[k]))
            .filter(|(_, key)| worker.is_none_or(|w| !key.owners.contains(&w)))
            .max_by_key(|(k, key)| (key.waiting.len(), std::cmp::Reverse(**k)))
            .map(|(k, key)| (*k, key.waiting.len().div_ceil(key.owners.len() + 1)))
    }

    /// `worker` opens key `k`, which nobody has: it takes up to `n` of its
    /// waiting lines, and has the key from now on. (What [`Groups::claim`]
    /// and [`Groups::take_from`] would do, with one lookup of the key and
    /// the key put in the worker's ready set only if lines of it still
    /// wait: most keys open with all their lines taken.)
    fn open(&mut self, k: u64, worker: u64, n: usize, out: &mut Vec<u64>) {
        let key = self.keys.get_mut(&k).expect("a key with waiting lines");
        debug_assert!(key.owners.is_empty());
        let Some(&first) = key.waiting.front() else {
            return;
        };
        self.unowned.remove(&(first, k));
        let take = n.min(key.waiting.len());
        out.extend(key.waiting.drain(..take));
        self.waiting -= take;
        self.stats.issued += take as u64;
        // The first line opens the key; the rest go to its owner.
        self.stats.to_owner += take as u64 - 1;
        match key.waiting.front() {
            Some(&next) => {
                self.ready.entry(worker).or_default().insert((next, k));
            }
            None => {
                self.pending.remove(&k);
            }
        }
        key.owners.push(worker);
    }

    /// `worker` has key `k` from now on (besides its other owners).
    fn claim(&mut self, k: u64, worker: u64) {
        let key = self.keys.get_mut(&k).expect("a key with waiting lines");
        if key.owners.contains(&worker) {
            return;
        }
        if let Some(&first) = key.waiting.front() {
            if key.owners.is_empty() {
                self.unowned.remove(&(first, k));
            }
            self.ready.entry(worker).or_default().insert((first, k));
        }
        key.owners.push(worker);
    }

    /// Takes up to `n` waiting lines of key `k` for one of its owners.
    fn take_from(&mut self, k: u64, n: usize, out: &mut Vec<u64>, how: Took) {
        let took = self.take_lines(k, n, out);
        match how {
            Took::Own => self.stats.to_owner += took,
            Took::Spread => self.stats.spread += took,
        }
    }

    /// Lines of key `k` for a worker that does not say who it is: the key
    /// stays as it is (unowned, or its owners').
    fn take_anonymous(&mut self, k: u64, n: usize, out: &mut Vec<u64>) {
        self.take_lines(k, n, out);
    }

    /// Moves up to `n` waiting lines of key `k` to `out`, and the key to its
    /// new oldest line in the sets that order keys (its owners' ready sets,
    /// or the unowned one); returns how many.
    fn take_lines(&mut self, k: u64, n: usize, out: &mut Vec<u64>) -> u64 {
        let key = self.keys.get_mut(&k).expect("a key with waiting lines");
        let Some(&before) = key.waiting.front() else {
            return 0;
        };
        let take = n.min(key.waiting.len());
        out.extend(key.waiting.drain(..take));
        self.waiting -= take;
        self.stats.issued += take as u64;
        let after = key.waiting.front().copied();
        if after.is_none() {
            self.pending.remove(&k);
        }
        let moved = |set: &mut BTreeSet<(u64, u64)>| {
            set.remove(&(before, k));
            if let Some(a) = after {
                set.insert((a, k));
            }
        };
        if key.owners.is_empty() {
            moved(&mut self.unowned);
        } else {
            for w in &key.owners {
                if let Some(set) = self.ready.get_mut(w) {
                    moved(set);
                }
            }
        }
        take as u64
    }

    /// Workers that asked for no work for `silence` lose their keys (they
    /// died, or finished); keys that were only theirs are open again.
    /// Keys without waiting lines not seen in the last four lookaheads'
    /// worth of lines (before `next_work_id`) are forgotten, so that the
    /// map stays as large as the recent input's distinct keys.
    ///
    /// `heard` is when each worker last sent a heartbeat: a worker busy
    /// with long lines asks for no work, and keeps its keys.
    pub(super) fn tidy(
        &mut self,
        now: Instant,
        silence: Duration,
        next_work_id: u64,
        heard: &FxHashMap<u64, Instant>,
    ) {
        let horizon = (self.grouping.lookahead as u64).saturating_mul(4);
        let forget_before = next_work_id.saturating_sub(horizon);
        let gone: FxHashSet<u64> = self
            .last_ask
            .iter()
            .filter(|(w, at)| {
                let last = heard.get(w).map_or(**at, |h| (*h).max(**at));
                now.saturating_duration_since(last) >= silence
            })
            .map(|(w, _)| *w)
            .collect();
        for w in &gone {
            self.last_ask.remove(w);
            self.ready.remove(w);
        }
        let unowned = &mut self.unowned;
        self.keys.retain(|k, key| {
            if !gone.is_empty() && key.owners.iter().any(|w| gone.contains(w)) {
                key.owners.retain(|w| !gone.contains(w));
                if key.owners.is_empty() {
                    if let Some(&first) = key.waiting.front() {
                        unowned.insert((first, *k));
                    }
                }
            }
            !key.waiting.is_empty() || key.last_seen >= forget_before
        });
    }
}

/// How lines were taken, for the counts.
#[derive(Debug, Clone, Copy)]
enum Took {
    /// A key the worker had.
    Own,
    /// A share of a key others have.
    Spread,
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Groups {
        /// The sets that index keys agree with the keys.
        pub(in crate::ledger) fn check(&self) {
            let pending: FxHashSet<u64> = self
                .keys
                .iter()
                .filter(|(_, key)| !key.waiting.is_empty())
                .map(|(k, _)| *k)
                .collect();
            assert_eq!(self.pending, pending, "keys with waiting lines");
            let waiting: usize = self.keys.values().map(|key| key.waiting.len()).sum();
            assert_eq!(self.waiting, waiting + self.loose.len());
            for (k, key) in &self.keys {
                let Some(&first) = key.waiting.front() else {
                    continue;
                };
                assert_eq!(self.unowned.contains(&(first, *k)), key.owners.is_empty());
                for w in &key.owners {
                    let ready = self.ready.get(w);
                    assert!(ready.is_some_and(|r| r.contains(&(first, *k))));
                }
            }
        }
    }

    /// Groups with a lookahead of one line (so keys are forgotten four
    /// lines after they were last seen); the tests push keys themselves.
    fn empty() -> Groups {
        Groups::new(Grouping {
            key: Arc::new(|_| None),
            lookahead: 1,
        })
    }

    fn groups(lines: &[(u64, Option<u64>)]) -> Groups {
        let mut g = empty();
        for &(id, key) in lines {
            g.push(id, key);
        }
        g
    }

    #[test]
    fn a_key_sticks_to_the_worker_that_opened_it() {
        let t = Instant::now();
        // Keys 7 and 9 interleaved.
        let mut g = groups(&[(0, Some(7)), (1, Some(9)), (2, Some(7)), (3, Some(9))]);
        assert_eq!(g.take(Some(1), 8, t), vec![0, 2, 1, 3], "A opens 7, then 9");
        let mut g = groups(&[(0, Some(7)), (1, Some(9)), (2, Some(7)), (3, Some(9))]);
        assert_eq!(g.take(Some(1), 1, t), vec![0], "A has key 7");
        assert_eq!(
            g.take(Some(2), 1, t),
            vec![1],
            "B gets key 9, not A's line 2"
        );
        g.push(4, Some(9));
        g.push(5, Some(7));
        assert_eq!(g.take(Some(2), 8, t), vec![3, 4], "B's key, in order");
        assert_eq!(g.take(Some(1), 8, t), vec![2, 5]);
        let s = g.stats();
        assert_eq!((s.issued, s.to_owner, s.spread, s.waiting), (6, 4, 0, 0));
        g.check();
    }

    #[test]
    fn lines_without_a_key_go_out_in_order_between_new_keys() {
        let t = Instant::now();
        let mut g = groups(&[(0, None), (1, Some(3)), (2, None), (3, Some(3))]);
        assert_eq!(g.take(Some(1), 2, t), vec![0, 1]);
        // Worker 1 has key 3: its line 3 comes first.
        assert_eq!(g.take(Some(1), 2, t), vec![3, 2]);
        // Anonymous workers (no id) take in order and own nothing.
        let mut g = groups(&[(0, Some(3)), (1, Some(4)), (2, Some(3))]);
        assert_eq!(g.take(None, 1, t), vec![0]);
        assert_eq!(g.take(Some(5), 2, t), vec![1, 2], "key 3 is still open");
    }

    #[test]
    fn a_huge_group_spreads_once_the_rest_runs_dry() {
        let t = Instant::now();
        let mut lines: Vec<(u64, Option<u64>)> = (0..100).map(|i| (i, Some(1))).collect();
        lines.push((100, Some(2)));
        let mut g = groups(&lines);
        assert_eq!(g.take(Some(10), 4, t), vec![0, 1, 2, 3]);
        // B gets the open key 2 first, not a share of A's.
        assert_eq!(g.take(Some(11), 4, t), vec![100]);
        // Then half of what waits of key 1 (96), up to its batch.
        let share = g.take(Some(11), 64, t);
        assert_eq!(share.len(), 48, "{share:?}");
        assert_eq!(share[0], 4);
        // A third worker gets a third of the rest.
        assert_eq!(g.take(Some(12), 64, t).len(), 16);
        assert_eq!(g.stats().spread, 64);
        g.check();
        // Both A and B keep key 1: new lines of it go to whichever asks.
        g.push(101, Some(1));
        let left = g.waiting();
        assert_eq!(g.take(Some(10), 1000, t).len(), left);
        g.check();
    }

    #[test]
    fn a_silent_workers_keys_move_to_the_next_that_asks() {
        let t = Instant::now();
        let silence = Duration::from_secs(60);
        let mut g = groups(&[(0, Some(7)), (1, Some(7))]);
        assert_eq!(g.take(Some(1), 1, t), vec![0]);
        // Worker 2 asks: key 7 is worker 1's, and nothing else waits, so it
        // gets a share (half of one line, rounded up).
        g.tidy(
            t + Duration::from_secs(30),
            silence,
            2,
            &FxHashMap::default(),
        );
        g.push(2, Some(7));
        assert_eq!(g.take(Some(2), 8, t + Duration::from_secs(30)), vec![1]);
        assert_eq!(g.stats().spread, 1);
        // Worker 1 falls silent; worker 2, which asked since, keeps the key.
        g.push(3, Some(7));
        g.tidy(
            t + Duration::from_secs(61),
            silence,
            4,
            &FxHashMap::default(),
        );
        assert_eq!(g.take(Some(2), 8, t + Duration::from_secs(61)), vec![2, 3]);
        // Both silent: the key is open again, and the next worker opens it.
        g.push(4, Some(7));
        g.tidy(
            t + Duration::from_secs(200),
            silence,
            5,
            &FxHashMap::default(),
        );
        assert_eq!(g.take(Some(3), 8, t + Duration::from_secs(200)), vec![4]);
        g.check();
        // Keys without waiting lines, last seen over four lookaheads (of
        // one line here) ago, are forgotten; not before.
        g.tidy(
            t + Duration::from_secs(200),
            silence,
            8,
            &FxHashMap::default(),
        );
        assert_eq!(g.stats().keys, 1);
        g.tidy(
            t + Duration::from_secs(200),
            silence,
            9,
            &FxHashMap::default(),
        );
        assert_eq!(g.stats().keys, 0);
    }
}
