//! The workers a server has seen: who said hello, when each was last heard
//! from. What each has done and holds comes from the ledger.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::protocol::{Hello, PrefixCache, TokenCounts, WorkerStatus};

/// A worker not heard from for this long is not counted as active.
pub const ACTIVE_WITHIN: Duration = Duration::from_secs(60);

/// A worker's tokens per second are measured over at least this long (once
/// it has reported for that long), and at most twice it.
const RATE_OVER: Duration = Duration::from_secs(30);

/// The workers seen, by the key of their `worker` id (see `worker_key`).
#[derive(Debug, Default)]
pub struct Workers {
    seen: HashMap<u64, Seen>,
    /// Tokens reported to this run, by every worker.
    tokens: TokenCounts,
}

#[derive(Debug)]
struct Seen {
    id: String,
    hello: Option<Hello>,
    last_contact: Instant,
    prefix_cache: Option<PrefixCache>,
    tokens: TokenCounts,
    /// Its tokens (prompt and generated) at some of its reports, for its
    /// tokens per second; `None` before its first report.
    rate: Option<RateWindow>,
}

/// A report's time and the worker's tokens (prompt and generated) then.
type Mark = (Instant, u64);

/// Tokens per second from `base` to `last`: once it has reported for
/// [`RATE_OVER`], over the last [`RATE_OVER`] to twice that. `next` is the
/// first report [`RATE_OVER`] after `base`, which becomes the base once it
/// is [`RATE_OVER`] old itself.
#[derive(Debug, Clone, Copy)]
struct RateWindow {
    base: Mark,
    next: Option<Mark>,
    last: Mark,
}

impl RateWindow {
    /// A window at a first report: what it counts was used over an unknown
    /// time, so the rate starts from it.
    fn new(at: Mark) -> RateWindow {
        RateWindow {
            base: at,
            next: None,
            last: at,
        }
    }

    fn report(&mut self, at: Mark) {
        match self.next {
            Some(next) if at.0.saturating_duration_since(next.0) >= RATE_OVER => {
                self.base = next;
                self.next = Some(at);
            }
            None if at.0.saturating_duration_since(self.base.0) >= RATE_OVER => {
                self.next = Some(at);
            }
            _ => {}
        }
        self.last = at;
    }
}

impl Seen {
    fn new(id: &str, now: Instant) -> Seen {
        Seen {
            id: id.to_string(),
            hello: None,
            last_contact: now,
            prefix_cache: None,
            tokens: TokenCounts::default(),
            rate: None,
        }
    }

    /// Tokens per second between its rate's two reports; 0 once it has
    /// reported none for [`ACTIVE_WITHIN`].
    fn tokens_per_sec(&self, now: Instant) -> Option<f64> {
        let RateWindow {
            base: (t0, n0),
            last: (t1, n1),
            ..
        } = self.rate?;
        if now.saturating_duration_since(t1) >= ACTIVE_WITHIN {
            return Some(0.0);
        }
        let secs = t1.saturating_duration_since(t0).as_secs_f64();
        (secs > 0.0).then(|| n1.saturating_sub(n0) as f64 / secs)
    }

    /// `active`, `idle`, `silent` or `gone` (see [`WorkerStatus::state`]).
    fn state(&self, now: Instant, in_flight: u64, work_timeout: Duration) -> &'static str {
        let quiet = now.saturating_duration_since(self.last_contact);
        if quiet >= work_timeout.max(ACTIVE_WITHIN) {
            "gone"
        } else if quiet >= ACTIVE_WITHIN {
            "silent"
        } else if in_flight > 0 {
            "active"
        } else {
            "idle"
        }
    }
}

impl Workers {
    /// The worker `id` (with key `key`) made a request at `now`.
    pub fn contact(&mut self, key: u64, id: &str, now: Instant) {
        self.seen
            .entry(key)
            .and_modify(|s| s.last_contact = now)
            .or_insert_with(|| Seen::new(id, now));
    }

    /// A worker (`key`, when it named itself) reported `tokens` used since
    /// its last report.
    pub fn tokens(&mut self, key: Option<u64>, tokens: TokenCounts, now: Instant) {
        self.tokens += tokens;
        let Some(seen) = key.and_then(|k| self.seen.get_mut(&k)) else {
            return;
        };
        seen.tokens += tokens;
        let total = seen
            .tokens
            .prompt_tokens
            .saturating_add(seen.tokens.completion_tokens);
        match &mut seen.rate {
            Some(window) => window.report((now, total)),
            None => seen.rate = Some(RateWindow::new((now, total))),
        }
    }

    /// Tokens reported to this run of the server.
    pub fn tokens_total(&self) -> TokenCounts {
        self.tokens
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
        let seen = self
            .seen
            .entry(key)
            .or_insert_with(|| Seen::new(&hello.worker, now));
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
    /// in flight)), most recently heard from first; gone after
    /// `work_timeout` without a word.
    pub fn status(
        &self,
        now: Instant,
        load: &rustc_hash::FxHashMap<u64, (u64, u64)>,
        work_timeout: Duration,
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
                    tokens: s.tokens,
                    tokens_per_sec: s.tokens_per_sec(now),
                    state: s.state(now, in_flight, work_timeout).into(),
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

    fn tokens(prompt: u64, completion: u64) -> TokenCounts {
        TokenCounts {
            requests: 1,
            prompt_tokens: prompt,
            completion_tokens: completion,
        }
    }

    /// Once a worker has reported for [`RATE_OVER`], its rate is over at
    /// least that long: a burst in one report moves it by little.
    #[test]
    fn a_workers_rate_is_over_at_least_the_rate_window() {
        let t0 = Instant::now();
        let mut w = Workers::default();
        w.contact(1, "a", t0);
        // 10 tokens a second, reported every 5 s for 200 s.
        for i in 0..=40 {
            w.tokens(Some(1), tokens(50, 0), t0 + Duration::from_secs(5 * i));
        }
        let at = t0 + Duration::from_secs(200);
        let rate = |w: &Workers, now| {
            w.status(now, &Default::default(), Duration::from_secs(1200))[0]
                .tokens_per_sec
                .unwrap()
        };
        assert_eq!(rate(&w, at), 10.0);
        // 100 more tokens a second later: over a window of 30 s or more that
        // is at most 100 / 30 more per second.
        let burst = at + Duration::from_secs(1);
        w.tokens(Some(1), tokens(100, 0), burst);
        let r = rate(&w, burst);
        assert!(r > 10.0 && r <= 10.0 + 100.0 / 30.0 + 1e-9, "{r}");
    }

    #[test]
    fn tokens_are_summed_per_worker_and_over_all() {
        let t0 = Instant::now();
        let mut w = Workers::default();
        w.hello(1, hello("a", "infer"), t0);
        w.contact(2, "b", t0);
        w.tokens(Some(1), tokens(100, 10), t0);
        // A report of a worker that never named itself still counts.
        w.tokens(None, tokens(1, 1), t0);
        let t1 = t0 + Duration::from_secs(10);
        w.tokens(Some(1), tokens(200, 20), t1);
        w.tokens(Some(2), tokens(5, 5), t1);
        assert_eq!(
            w.tokens_total(),
            TokenCounts {
                requests: 4,
                prompt_tokens: 306,
                completion_tokens: 36
            }
        );
        let status = w.status(t1, &Default::default(), Duration::from_secs(1200));
        let a = status.iter().find(|s| s.worker == "a").unwrap();
        assert_eq!(
            (a.tokens.prompt_tokens, a.tokens.completion_tokens),
            (300, 30)
        );
        // 220 tokens over the 10 s between its two reports.
        assert_eq!(a.tokens_per_sec, Some(22.0));
        assert_eq!(a.state, "idle");
        // Quiet for a minute: its rate is 0, and it is silent.
        let quiet = t1 + ACTIVE_WITHIN;
        let status = w.status(quiet, &Default::default(), Duration::from_secs(1200));
        let a = status.iter().find(|s| s.worker == "a").unwrap();
        assert_eq!((a.tokens_per_sec, a.state.as_str()), (Some(0.0), "silent"));
    }

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
        let status = w.status(later, &load, Duration::from_secs(1200));
        assert_eq!(status[0].worker, "c");
        assert_eq!(status[0].state, "active");
        let state_of = |name: &str| {
            status
                .iter()
                .find(|s| s.worker == name)
                .map(|s| s.state.clone())
        };
        assert_eq!(state_of("a").as_deref(), Some("silent"));
        let much_later = t0 + Duration::from_secs(1300);
        let status = w.status(much_later, &load, Duration::from_secs(1200));
        assert!(status.iter().all(|s| s.state == "gone"), "{status:?}");
        assert_eq!((status[0].lines_done, status[0].in_flight), (7, 2));
        assert!(status
            .iter()
            .any(|s| s.worker == "old-python-worker" && s.hello.is_none()));
        assert_eq!(status.iter().filter(|s| s.hello.is_some()).count(), 3);
    }
}
