//! Client-side rate limits of one engine: requests and tokens per minute, as
//! hosted APIs count them.
//!
//! Each limit is a token bucket that refills continuously at `limit / 60` per
//! second and holds one second's worth, so a worker never bursts a minute's
//! budget at once (providers enforce their limits over windows much shorter
//! than a minute). Requests take their turn in arrival order; a request's
//! token cost is estimated before it is sent (prompt characters / 4, plus
//! `max_tokens` per choice) and corrected by the usage the engine reports, so
//! an underestimate is paid back by the requests after it.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::{Body, Request};

/// The limits of one engine; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests started per minute at most (retries count).
    pub requests_per_minute: Option<u32>,
    /// Prompt and completion tokens per minute at most.
    pub tokens_per_minute: Option<u64>,
}

impl RateLimit {
    /// Whether any limit is set.
    pub fn is_limited(&self) -> bool {
        self.requests_per_minute.is_some() || self.tokens_per_minute.is_some()
    }
}

/// A rate limiter shared by every request to one engine.
#[derive(Debug)]
pub struct RateLimiter {
    requests: Option<Mutex<Bucket>>,
    tokens: Option<Mutex<Bucket>>,
    /// Held while a request waits for its turn, so requests go in arrival
    /// order (tokio's mutex is fair) and a large one is not starved by small ones.
    turn: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
struct Bucket {
    per_sec: f64,
    capacity: f64,
    /// May go below zero: a request that cost more than estimated, or more
    /// than the bucket holds, is paid back by the wait of the next ones.
    level: f64,
    at: Instant,
}

impl Bucket {
    fn new(per_minute: f64) -> Bucket {
        let per_sec = per_minute / 60.0;
        let capacity = per_sec.max(1.0);
        Bucket {
            per_sec,
            capacity,
            level: capacity,
            at: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + secs * self.per_sec).min(self.capacity);
        self.at = now;
    }

    /// How long until `amount` (at most a full bucket) is available.
    fn wait_for(&self, amount: f64) -> Duration {
        let short = amount.min(self.capacity) - self.level;
        if short <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(short / self.per_sec)
        }
    }
}

fn lock(bucket: &Mutex<Bucket>) -> std::sync::MutexGuard<'_, Bucket> {
    // Nothing under this lock can panic midway.
    bucket.lock().unwrap_or_else(|e| e.into_inner())
}

impl RateLimiter {
    /// A limiter for `limit`; `None` when nothing is limited.
    pub fn new(limit: RateLimit) -> Option<RateLimiter> {
        limit.is_limited().then(|| RateLimiter {
            requests: limit
                .requests_per_minute
                .filter(|&n| n > 0)
                .map(|n| Mutex::new(Bucket::new(f64::from(n)))),
            tokens: limit
                .tokens_per_minute
                .filter(|&n| n > 0)
                .map(|n| Mutex::new(Bucket::new(n as f64))),
            turn: tokio::sync::Mutex::new(()),
        })
    }

    /// Waits until one request costing `tokens` may start, and takes it out
    /// of the budget. Returns how long it waited.
    pub async fn acquire(&self, tokens: u64) -> Duration {
        let _turn = self.turn.lock().await;
        let start = Instant::now();
        loop {
            let now = Instant::now();
            let mut wait = Duration::ZERO;
            for (bucket, amount) in [(&self.requests, 1.0), (&self.tokens, tokens as f64)] {
                if let Some(bucket) = bucket {
                    let mut b = lock(bucket);
                    b.refill(now);
                    wait = wait.max(b.wait_for(amount));
                }
            }
            if wait.is_zero() {
                for (bucket, amount) in [(&self.requests, 1.0), (&self.tokens, tokens as f64)] {
                    if let Some(bucket) = bucket {
                        lock(bucket).level -= amount;
                    }
                }
                return now - start;
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Corrects the token budget once the engine reported what a request
    /// estimated at `estimated` tokens really cost.
    pub fn settle(&self, estimated: u64, actual: u64) {
        if let Some(bucket) = &self.tokens {
            let mut b = lock(bucket);
            b.level = (b.level + estimated as f64 - actual as f64).min(b.capacity);
        }
    }
}

/// What a request will cost in tokens, before the engine says: a quarter of
/// its prompt's characters (the usual ratio for English text with BPE
/// tokenizers), plus `max_tokens` for each choice.
pub fn estimated_tokens(request: &Request) -> u64 {
    let chars: usize = match &request.body {
        Body::Chat { messages } => messages
            .iter()
            .map(|m| m.content.text().chars().count() + 4)
            .sum(),
        Body::Completion { prompt } => prompt.chars().count(),
    };
    let completion = u64::from(request.max_tokens.unwrap_or(0)) * u64::from(request.n.unwrap_or(1));
    (chars as u64).div_ceil(4) + completion
}

/// [`estimated_tokens`] of a request body as sent (a batch file's line):
/// the characters of its messages, prompt or embedding input, plus
/// `max_tokens` (or `max_completion_tokens`) per choice.
pub fn raw_estimated_tokens(body: &serde_json::Value) -> u64 {
    fn chars(v: &serde_json::Value) -> usize {
        match v {
            serde_json::Value::String(s) => s.chars().count(),
            serde_json::Value::Array(items) => items.iter().map(chars).sum(),
            serde_json::Value::Object(m) => m.get("content").map_or(0, chars) + 4,
            _ => 0,
        }
    }
    let prompt = ["messages", "prompt", "input"]
        .iter()
        .filter_map(|k| body.get(*k))
        .map(chars)
        .sum::<usize>();
    let max_tokens = body
        .get("max_tokens")
        .or_else(|| body.get("max_completion_tokens"))
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    let n = body
        .get("n")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(1);
    (prompt as u64).div_ceil(4) + max_tokens.saturating_mul(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rpm: Option<u32>, tpm: Option<u64>) -> std::sync::Arc<RateLimiter> {
        std::sync::Arc::new(
            RateLimiter::new(RateLimit {
                requests_per_minute: rpm,
                tokens_per_minute: tpm,
            })
            .expect("limited"),
        )
    }

    #[test]
    fn no_limit_means_no_limiter() {
        assert!(RateLimiter::new(RateLimit::default()).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn requests_per_minute_spread_requests_evenly_after_one_seconds_burst() {
        // 120/min: two at once (one second's worth), then one every 0.5 s.
        let l = limiter(Some(120), None);
        let start = Instant::now();
        let mut starts = Vec::new();
        for _ in 0..6 {
            l.acquire(0).await;
            starts.push((Instant::now() - start).as_millis());
        }
        assert_eq!(starts, vec![0, 0, 500, 1000, 1500, 2000]);
    }

    #[tokio::test(start_paused = true)]
    async fn sixty_requests_per_minute_take_a_minute_whatever_the_concurrency() {
        let l = limiter(Some(60), None);
        let start = Instant::now();
        let tasks: Vec<_> = (0..61)
            .map(|_| {
                let l = l.clone();
                tokio::spawn(async move { l.acquire(0).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!((Instant::now() - start).as_secs(), 60);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_larger_than_the_bucket_goes_when_it_is_full_and_the_next_ones_pay() {
        // 6,000 tokens/min: 100/s, a bucket of 100.
        let l = limiter(None, Some(6_000));
        let start = Instant::now();
        l.acquire(400).await; // goes at once, leaves -300
        assert_eq!(Instant::now() - start, Duration::ZERO);
        l.acquire(50).await; // waits until the level is back to 50: 3.5 s
        assert_eq!((Instant::now() - start).as_millis(), 3500);
    }

    #[tokio::test(start_paused = true)]
    async fn reported_usage_corrects_the_estimate() {
        let l = limiter(None, Some(6_000));
        l.acquire(100).await; // level 0
                              // The request cost 300, not the 100 estimated: 2 s more to wait.
        l.settle(100, 300);
        let start = Instant::now();
        l.acquire(100).await;
        assert_eq!((Instant::now() - start).as_millis(), 3000);
    }

    #[tokio::test(start_paused = true)]
    async fn both_limits_hold_at_once() {
        // Requests allow 10/s; tokens 100/s at 50 a request allow 2/s.
        let l = limiter(Some(600), Some(6_000));
        let start = Instant::now();
        for _ in 0..6 {
            l.acquire(50).await;
        }
        // 2 from the full bucket, then one every 0.5 s.
        assert_eq!((Instant::now() - start).as_millis(), 2000);
    }

    #[test]
    fn estimates_count_prompt_characters_and_the_completion_budget() {
        let chat = Request::chat().user("x".repeat(396)).max_tokens(100).n(2);
        assert_eq!(estimated_tokens(&chat), 100 + 200);
        let completion = Request::completion("abcdefgh");
        assert_eq!(estimated_tokens(&completion), 2);
        // The same count from the body as sent.
        assert_eq!(raw_estimated_tokens(&chat.to_json()), 300);
        assert_eq!(raw_estimated_tokens(&completion.to_json()), 2);
        let embedding = serde_json::json!({"input": ["abcd", "efgh"]});
        assert_eq!(raw_estimated_tokens(&embedding), 2);
    }
}
