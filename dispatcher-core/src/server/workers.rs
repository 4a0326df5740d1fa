//! The workers a server has seen: who said hello, when each was last heard
//! from. What each has done and holds comes from the ledger.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::protocol::{Hello, PrefixCache, WorkerStatus};

/// A worker not heard from for this long is not counted as active.
pub const ACTIVE_WITHIN: Duration = Duration::from_secs(60);

/// The workers seen, by the key of their `worker` id (see `worker_key`).
#[derive(Debug, Default)]
pub struct Workers {
    seen: HashMap<u64, Seen>,
}

#[derive(Debug)]
struct Seen {
    id: String,
    hello: Option<Hello>,
    last_contact: Instant,
    prefix_cache: Option<PrefixCache>,
}

impl Workers {
    /// The worker `id` (with key `key`) made a request at `now`.
    pub fn contact(&mut self, key: u64, id: &str, now: Instant) {
        self.seen
            .entry(key)
            .and_modify(|s| s.last_contact = now)
            .or_insert_with(|| Seen {
                id: id.to_string(),
                hello: None,
                last_contact: now,
                prefix_cache: None,
            });
    }

    /// The worker's engine reported its prefix cache counters.
    pub fn prefix_cache(&mut self, key: u64, counts: PrefixCache) {
        if let Some(seen) = self.seen.get_mut(&key) {
            seen.prefix_cache = Some(counts);
        }
    }

    /// The prefix cache counters of every worker that reports them, summed.
    pub fn prefix_cache_total(&self) -> Option<PrefixCache> {
        self.seen
            .values()
            .filter_map(|s| s.prefix_cache)
            .reduce(|a, b| PrefixCache {
                queries: a.queries + b.queries,
                hits: a.hits + b.hits,
            })
    }

    /// The worker said hello.
    pub fn hello(&mut self, key: u64, hello: Hello, now: Instant) {
        let seen = self.seen.entry(key).or_insert_with(|| Seen {
            id: hello.worker.clone(),
            hello: None,
            last_contact: now,
            prefix_cache: None,
        });
        seen.last_contact = now;
        seen.hello = Some(hello);
    }

    /// Workers seen, and those heard from within [`ACTIVE_WITHIN`].
    pub fn counts(&self, now: Instant) -> (usize, usize) {
        let active = self
            .seen
            .values()
            .filter(|s| now.saturating_duration_since(s.last_contact) < ACTIVE_WITHIN)
            .count();
        (self.seen.len(), active)
    }

    /// Every worker seen, with its load from `load` (key -> (lines done,
    /// in flight)), most recently heard from first.
    pub fn status(
        &self,
        now: Instant,
        load: &rustc_hash::FxHashMap<u64, (u64, u64)>,
    ) -> Vec<WorkerStatus> {
        let mut out: Vec<WorkerStatus> = self
            .seen
            .iter()
            .map(|(key, s)| {
                let (lines_done, in_flight) = load.get(key).copied().unwrap_or_default();
                WorkerStatus {
                    worker: s.id.clone(),
                    hello: s.hello.clone(),
                    last_contact_secs: now.saturating_duration_since(s.last_contact).as_secs_f64(),
                    lines_done,
                    in_flight,
                    prefix_cache: s.prefix_cache,
                }
            })
            .collect();
        out.sort_by(|a, b| {
            a.last_contact_secs
                .total_cmp(&b.last_contact_secs)
                .then_with(|| a.worker.cmp(&b.worker))
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(worker: &str, task: &str) -> Hello {
        Hello {
            worker: worker.into(),
            task: task.into(),
            ..Hello::default()
        }
    }

    #[test]
    fn workers_are_listed_with_their_load() {
        let t0 = Instant::now();
        let mut w = Workers::default();
        w.contact(1, "old-python-worker", t0);
        w.hello(2, hello("a", "infer"), t0);
        w.hello(3, hello("b", "infer"), t0);
        w.hello(4, hello("c", "judge"), t0);
        let later = t0 + ACTIVE_WITHIN + Duration::from_secs(1);
        w.contact(4, "c", later);
        assert_eq!(w.counts(later), (4, 1));
        let mut load = rustc_hash::FxHashMap::default();
        load.insert(4, (7, 2));
        let status = w.status(later, &load);
        assert_eq!(status[0].worker, "c");
        assert_eq!((status[0].lines_done, status[0].in_flight), (7, 2));
        assert!(status
            .iter()
            .any(|s| s.worker == "old-python-worker" && s.hello.is_none()));
        assert_eq!(status.iter().filter(|s| s.hello.is_some()).count(), 3);
    }
}
