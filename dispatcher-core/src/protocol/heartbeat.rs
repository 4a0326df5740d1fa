//! `POST /heartbeat`, the token counts and prefix cache counters workers
//! report, and the small answers (release, work timeout).

use serde::{Deserialize, Serialize};

use super::results::{distinct_ids, lenient_prefix_cache, lenient_usage};

/// The body of `POST /heartbeat` (extension): the worker is alive and still
/// working on these items.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    /// Items the worker holds (repeats are read once).
    #[serde(deserialize_with = "distinct_ids")]
    pub work_ids: Vec<u64>,
    /// Extension: who holds them (the `worker` of its work requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Extension: the prefix cache counters of the worker's engine, where
    /// the engine reports them (vLLM), as read lately. A malformed one is
    /// ignored.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_prefix_cache"
    )]
    pub prefix_cache: Option<PrefixCache>,
    /// Extension: engine tokens the worker used since its last report. A
    /// malformed one is ignored.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_usage"
    )]
    pub usage: Option<TokenCounts>,
}

/// Engine requests answered and the tokens they took, as the engine's
/// `usage` says. Workers report what they used since their last report
/// that was answered (with results and heartbeats), so a server adds each
/// report once and a restarted server loses nothing a worker had not sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCounts {
    /// Engine requests answered.
    #[serde(default)]
    pub requests: u64,
    /// Prompt tokens.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Generated tokens.
    #[serde(default)]
    pub completion_tokens: u64,
}

impl TokenCounts {
    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        *self == TokenCounts::default()
    }
}

/// Saturating: counts come from workers, and a broken one may send anything.
impl std::ops::AddAssign for TokenCounts {
    fn add_assign(&mut self, other: TokenCounts) {
        self.requests = self.requests.saturating_add(other.requests);
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(other.completion_tokens);
    }
}

impl std::ops::Add for TokenCounts {
    type Output = TokenCounts;
    fn add(mut self, other: TokenCounts) -> TokenCounts {
        self += other;
        self
    }
}

/// An engine's prefix cache counters (vLLM's `prefix_cache_queries` and
/// `prefix_cache_hits`): prompt tokens looked up, and those found cached,
/// since the engine started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefixCache {
    /// Prompt tokens looked up in the cache.
    pub queries: u64,
    /// Of those, tokens found cached (not computed again).
    pub hits: u64,
}

impl PrefixCache {
    /// `hits / queries`, 0 before any query.
    pub fn hit_rate(&self) -> f64 {
        if self.queries == 0 {
            0.0
        } else {
            (self.hits as f64 / self.queries as f64).min(1.0)
        }
    }
}

/// The answer to `POST /heartbeat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// `"OK"`.
    pub status: String,
    /// How many leases were extended (by the work timeout, from now).
    pub extended: u64,
    /// Items already done (by another worker, or tombstoned): drop them.
    #[serde(default)]
    pub done: Vec<u64>,
    /// The lease length in seconds: heartbeat well within it.
    pub lease_secs: f64,
    /// Extension: a heartbeat that names its `worker` renews every lease
    /// that worker holds, listed or not, so later heartbeats need not list
    /// them (an older server leaves it out: list them all).
    #[serde(default)]
    pub renews_held: bool,
}

/// The answer to `POST /release`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseResponse {
    /// `"OK"`.
    pub status: String,
    /// How many of the ids were in flight and went back to the queue.
    pub released_count: u64,
}

/// The body of `POST /work_timeout`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkTimeoutRequest {
    /// The new work timeout in seconds.
    pub timeout: f64,
}

/// The answer to `POST /work_timeout`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageResponse {
    /// `"OK"`.
    pub status: String,
    /// What changed, in words.
    pub message: String,
}
