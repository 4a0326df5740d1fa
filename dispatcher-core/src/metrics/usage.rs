//! The engine tokens a worker used and has not reported yet: added as
//! engine answers arrive, taken by each results or heartbeat request, and
//! put back when that request got no answer, so that the server adds every
//! token once (a report lost with its request is sent again with the next).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::protocol::TokenCounts;

/// Tokens used and not reported yet.
#[derive(Debug, Default)]
pub struct UsageMeter {
    requests: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
}

impl UsageMeter {
    /// An engine request was answered, with the tokens its `usage` names.
    pub fn add(&self, prompt_tokens: u64, completion_tokens: u64) {
        self.requests.fetch_add(1, Relaxed);
        self.prompt_tokens.fetch_add(prompt_tokens, Relaxed);
        self.completion_tokens.fetch_add(completion_tokens, Relaxed);
    }

    /// Takes what was counted since the last take; `None` when nothing was.
    pub fn take(&self) -> Option<TokenCounts> {
        let taken = TokenCounts {
            requests: self.requests.swap(0, Relaxed),
            prompt_tokens: self.prompt_tokens.swap(0, Relaxed),
            completion_tokens: self.completion_tokens.swap(0, Relaxed),
        };
        (!taken.is_empty()).then_some(taken)
    }

    /// Puts back what a request that got no answer had taken.
    pub fn put_back(&self, counts: TokenCounts) {
        self.requests.fetch_add(counts.requests, Relaxed);
        self.prompt_tokens.fetch_add(counts.prompt_tokens, Relaxed);
        self.completion_tokens
            .fetch_add(counts.completion_tokens, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_taken_is_gone_until_put_back() {
        let meter = UsageMeter::default();
        assert_eq!(meter.take(), None);
        meter.add(10, 3);
        meter.add(5, 0);
        let taken = meter.take().unwrap();
        assert_eq!(
            taken,
            TokenCounts {
                requests: 2,
                prompt_tokens: 15,
                completion_tokens: 3
            }
        );
        assert_eq!(meter.take(), None);
        meter.add(1, 1);
        meter.put_back(taken);
        assert_eq!(meter.take().unwrap().prompt_tokens, 16);
    }
}
