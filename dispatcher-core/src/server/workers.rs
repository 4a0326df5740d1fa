//! The workers a server has seen: who said hello, when each was last heard
//! from. What each has done and holds comes from the ledger.
//!
//! A long job on preemptible nodes meets a new worker id at every restart of
//! a worker, so the ids seen grow with the job's age, not its size. Memory
//! is bounded ([`REMEMBERED`]) and `/status`, which every open page reads
//! each second, lists the live workers and only the last [`GONE_LISTED`] gone.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::protocol::{Hello, PrefixCache, TokenCounts, WorkerStatus};

/// A worker not heard from for this long is not counted as active.
pub const ACTIVE_WITHIN: Duration = Duration::from_secs(60);

/// A worker's tokens per second are measured over at least this long (once
/// it has reported for that long), and at most twice it.
const RATE_OVER: Duration = Duration::from_secs(30);

/// Workers remembered at most. A new one past this forgets the tenth
/// heard from longest ago (gone, unless a job has thousands of live
/// workers); the totals keep what they reported.
pub const REMEMBERED: usize = 10_000;

/// Gone workers listed by [`Workers::status`] at most: those heard from last.
pub const GONE_LISTED: usize = 100;

/// The bytes kept to show of a worker's id (its key hashes all of it) and
/// of each string of its hello.
const SHOWN: usize = 256;

/// `text` cut to [`SHOWN`] bytes, at a character boundary.
fn shown(text: &mut String) {
    let end = crate::text::head(text, SHOWN).len();
    text.truncate(end);
}

/// The workers seen, by the key of their `worker` id (see `worker_key`).
#[derive(Debug, Default)]
pub struct Workers {
    seen: HashMap<u64, Seen>,
    /// Tokens reported to this run, by every worker.
    tokens: TokenCounts,
    /// Workers no longer remembered (past [`REMEMBERED`]).
    forgotten: u64,
    /// Their engines' last prefix cache counters, summed.
    forgotten_cache: Option<PrefixCache>,
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
            id: crate::text::head(id, SHOWN).to_string(),
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
        } else if quiet >= work_timeout.min(ACTIVE_WITHIN) {
            // Quiet past a short work timeout, its lines were taken back:
            // not idle, whatever it holds now.
            "silent"
        } else if in_flight > 0 {
            "active"
        } else {
            "idle"
        }
    }
}

/// Two workers' (or sums of) prefix cache counters added.
fn add_cache(a: Option<PrefixCache>, b: PrefixCache) -> PrefixCache {
    let a = a.unwrap_or_default();
    PrefixCache {
        queries: a.queries.saturating_add(b.queries),
        hits: a.hits.saturating_add(b.hits),
    }
}

impl Workers {
    /// The worker `id` (with key `key`) made a request at `now`.
    pub fn contact(&mut self, key: u64, id: &str, now: Instant) {
        self.entry(key, id, now).last_contact = now;
    }

    /// The worker with key `key`, remembered anew (as `id`, first heard
    /// from at `now`) if it was not.
    fn entry(&mut self, key: u64, id: &str, now: Instant) -> &mut Seen {
        if self.seen.len() >= REMEMBERED && !self.seen.contains_key(&key) {
            self.forget_longest_silent();
        }
        self.seen.entry(key).or_insert_with(|| Seen::new(id, now))
    }

    /// Forgets the tenth of [`REMEMBERED`] heard from longest ago: one
    /// pass over all of them for every `REMEMBERED / 10` new workers.
    fn forget_longest_silent(&mut self) {
        let mut by_contact: Vec<(Instant, u64)> = self
            .seen
            .iter()
            .map(|(&key, s)| (s.last_contact, key))
            .collect();
        let n = (REMEMBERED / 10).min(by_contact.len());
        if n < by_contact.len() {
            // The n heard from longest ago before index n.
            by_contact.select_nth_unstable(n);
        }
        for (_, key) in by_contact.into_iter().take(n) {
            if let Some(seen) = self.seen.remove(&key) {
                self.forgotten += 1;
                if let Some(cache) = seen.prefix_cache {
                    self.forgotten_cache = Some(add_cache(self.forgotten_cache, cache));
                }
            }
        }
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

    /// The prefix cache counters of every worker that reports them (the
    /// forgotten ones too), summed.
    pub fn prefix_cache_total(&self) -> Option<PrefixCache> {
        self.seen
            .values()
            .filter_map(|s| s.prefix_cache)
            .fold(self.forgotten_cache, |sum, c| Some(add_cache(sum, c)))
    }

    /// The worker said hello. Its settings are left to the manifest, which
    /// keeps each configuration once: `/status` lists who it is, each
    /// string cut to 256 bytes.
    pub fn hello(&mut self, key: u64, mut hello: Hello, now: Instant) {
        let seen = self.entry(key, &hello.worker, now);
        seen.last_contact = now;
        hello.settings = serde_json::Map::new();
        hello.worker.clone_from(&seen.id);
        let Hello {
            host,
            task,
            version,
            engine,
            model,
            job,
            ..
        } = &mut hello;
        for text in [host, task, version, engine]
            .into_iter()
            .chain(model.as_mut())
            .chain(job.as_mut())
        {
            shown(text);
        }
        seen.hello = Some(hello);
    }

    /// Workers seen (the forgotten ones too), and those heard from within
    /// [`ACTIVE_WITHIN`].
    pub fn counts(&self, now: Instant) -> (u64, usize) {
        let active = self
            .seen
            .values()
            .filter(|s| now.saturating_duration_since(s.last_contact) < ACTIVE_WITHIN)
            .count();
        (self.seen.len() as u64 + self.forgotten, active)
    }

    /// The workers seen, with their load from `load` (key -> (lines done,
    /// in flight)), most recently heard from first: every one not gone (not
    /// heard from for `work_timeout`) and the [`GONE_LISTED`] gone ones heard
    /// from last; and how many gone ones that leaves out (the forgotten ones
    /// too).
    pub fn status(
        &self,
        now: Instant,
        load: &rustc_hash::FxHashMap<u64, (u64, u64)>,
        work_timeout: Duration,
    ) -> (Vec<WorkerStatus>, u64) {
        // Most recently heard from first; only the rows listed are made (of
        // up to REMEMBERED, most may be gone).
        let mut by_contact: Vec<(&u64, &Seen)> = self.seen.iter().collect();
        by_contact.sort_by(|(_, a), (_, b)| {
            b.last_contact
                .cmp(&a.last_contact)
                .then_with(|| a.id.cmp(&b.id))
        });
        let mut out = Vec::new();
        let mut gone = 0;
        for (key, s) in by_contact {
            let (lines_done, in_flight) = load.get(key).copied().unwrap_or_default();
            let state = s.state(now, in_flight, work_timeout);
            if state == "gone" {
                gone += 1;
                if gone > GONE_LISTED {
                    continue;
                }
            }
            out.push(WorkerStatus {
                worker: s.id.clone(),
                hello: s.hello.clone(),
                last_contact_secs: now.saturating_duration_since(s.last_contact).as_secs_f64(),
                lines_done,
                in_flight,
                prefix_cache: s.prefix_cache,
                tokens: s.tokens,
                tokens_per_sec: s.tokens_per_sec(now),
                state: state.into(),
            });
        }
        let unlisted = gone.saturating_sub(GONE_LISTED) as u64 + self.forgotten;
        (out, unlisted)
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
            w.status(now, &Default::default(), Duration::from_secs(1200))
                .0[0]
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
        let status = w
            .status(t1, &Default::default(), Duration::from_secs(1200))
            .0;
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
        let status = w
            .status(quiet, &Default::default(), Duration::from_secs(1200))
            .0;
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
        let status = w.status(later, &load, Duration::from_secs(1200)).0;
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
        let status = w.status(much_later, &load, Duration::from_secs(1200)).0;
        assert!(status.iter().all(|s| s.state == "gone"), "{status:?}");
        assert_eq!((status[0].lines_done, status[0].in_flight), (7, 2));
        assert!(status
            .iter()
            .any(|s| s.worker == "old-python-worker" && s.hello.is_none()));
        assert_eq!(status.iter().filter(|s| s.hello.is_some()).count(), 3);
    }

    /// With a work timeout under a minute, a worker quiet for longer than it
    /// had its lines taken back: it shows as silent, not idle, until the
    /// minute after which it is gone.
    #[test]
    fn a_worker_quiet_past_a_short_work_timeout_is_silent_not_idle() {
        let t0 = Instant::now();
        let mut w = Workers::default();
        w.hello(1, hello("killed", "infer"), t0);
        let timeout = Duration::from_secs(10);
        let state = |at: Duration| {
            w.status(t0 + at, &Default::default(), timeout).0[0]
                .state
                .clone()
        };
        assert_eq!(state(Duration::from_secs(5)), "idle");
        assert_eq!(state(Duration::from_secs(11)), "silent");
        assert_eq!(state(Duration::from_secs(59)), "silent");
        assert_eq!(state(ACTIVE_WITHIN), "gone");
    }

    /// A long job meets a new worker id at every restart: `/status` lists
    /// the live ones and only the gone ones heard from last.
    #[test]
    fn gone_workers_past_the_listed_are_counted_not_listed() {
        let t0 = Instant::now();
        let mut w = Workers::default();
        let timeout = Duration::from_secs(300);
        for i in 0..GONE_LISTED as u64 + 50 {
            w.contact(i, &format!("old-{i:03}"), t0 + Duration::from_millis(i));
        }
        let later = t0 + Duration::from_secs(1000);
        for i in 0..3 {
            w.contact(1000 + i, &format!("live-{i}"), later);
        }
        let (rows, unlisted) = w.status(later, &Default::default(), timeout);
        assert_eq!((rows.len(), unlisted), (3 + GONE_LISTED, 50));
        assert!(rows[..3].iter().all(|r| r.state == "idle"), "{rows:?}");
        // The gone ones listed are those heard from last.
        assert_eq!(rows[3].worker, "old-149");
        assert_eq!(rows.last().unwrap().worker, "old-050");
        assert_eq!(w.counts(later), (153, 3));
    }

    /// Memory is bounded: past [`REMEMBERED`], those heard from longest ago
    /// are forgotten; the counts and sums keep them.
    #[test]
    fn past_remembered_the_longest_silent_are_forgotten_and_still_counted() {
        let t0 = Instant::now();
        let mut w = Workers::default();
        let cache = PrefixCache {
            queries: 10,
            hits: 4,
        };
        for i in 0..REMEMBERED as u64 {
            let at = t0 + Duration::from_millis(i);
            w.hello(i, hello(&format!("w{i}"), "infer"), at);
            w.prefix_cache(i, cache);
            w.tokens(Some(i), tokens(3, 2), at);
        }
        let now = t0 + Duration::from_millis(REMEMBERED as u64);
        // The newest is heard from again, the one more comes.
        w.contact(REMEMBERED as u64 - 1, "w9999", now);
        w.contact(u64::MAX, "newcomer", now);
        assert_eq!(w.seen.len(), REMEMBERED - REMEMBERED / 10 + 1);
        assert_eq!(w.counts(now).0, REMEMBERED as u64 + 1);
        assert!(!w.seen.contains_key(&0), "the longest silent is forgotten");
        assert!(w.seen.contains_key(&(REMEMBERED as u64 / 10)));
        assert!(w.seen[&(REMEMBERED as u64 - 1)].hello.is_some());
        let n = REMEMBERED as u64;
        assert_eq!(
            w.prefix_cache_total(),
            Some(PrefixCache {
                queries: 10 * n,
                hits: 4 * n
            })
        );
        assert_eq!(w.tokens_total().completion_tokens, 2 * n);
        // None remembered is gone (all were heard from in the last 10 s):
        // the forgotten are the ones left out.
        let (rows, unlisted) = w.status(now, &Default::default(), Duration::from_secs(60));
        assert_eq!((rows.len(), unlisted), (w.seen.len(), n / 10));
    }
}
