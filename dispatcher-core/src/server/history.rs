//! The job's progress over time: a sample every [`HISTORY_EVERY_SECS`] of
//! the lines written and tokens reported, for `/status`'s rates, its ETA
//! and the page's chart.

use std::collections::VecDeque;

use crate::protocol::{HistorySample, Rates, HISTORY_EVERY_SECS};

/// Samples kept: four hours' worth. Older ones are dropped.
const KEPT: usize = (4 * 3600 / HISTORY_EVERY_SECS) as usize;

/// Rates are measured over this many seconds.
const RATE_OVER_SECS: f64 = 60.0;

/// The samples, oldest first.
#[derive(Debug, Default)]
pub struct History {
    samples: VecDeque<HistorySample>,
}

impl History {
    /// Adds a sample.
    pub fn push(&mut self, sample: HistorySample) {
        if self.samples.len() == KEPT {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    /// Every sample, oldest first.
    pub fn samples(&self) -> Vec<HistorySample> {
        self.samples.iter().copied().collect()
    }

    /// Rates from the sample about a minute before `now` (the oldest one,
    /// early on) to `now`.
    pub fn rates(&self, now: &HistorySample) -> Rates {
        let since = self
            .samples
            .iter()
            .find(|s| s.secs >= now.secs - RATE_OVER_SECS)
            .filter(|s| now.secs - s.secs > 0.5);
        let Some(base) = since else {
            return Rates::default();
        };
        let secs = now.secs - base.secs;
        let per_sec = |now: u64, then: u64| now.saturating_sub(then) as f64 / secs;
        Rates {
            lines_per_sec: per_sec(now.lines_done, base.lines_done),
            prompt_tokens_per_sec: per_sec(now.tokens.prompt_tokens, base.tokens.prompt_tokens),
            completion_tokens_per_sec: per_sec(
                now.tokens.completion_tokens,
                base.tokens.completion_tokens,
            ),
        }
    }
}

/// Seconds until `left` lines are done at `rates`; `None` without a rate.
pub fn eta_secs(left: u64, rates: &Rates) -> Option<f64> {
    (rates.lines_per_sec > 0.0).then(|| left as f64 / rates.lines_per_sec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::TokenCounts;

    fn at(secs: f64, lines_done: u64, completion: u64) -> HistorySample {
        HistorySample {
            secs,
            lines_done,
            tokens: TokenCounts {
                requests: lines_done,
                prompt_tokens: 0,
                completion_tokens: completion,
            },
        }
    }

    #[test]
    fn rates_are_over_the_last_minute() {
        let mut h = History::default();
        assert_eq!(h.rates(&at(0.0, 0, 0)), Rates::default());
        for i in 0..30 {
            // 10 lines a second for the first 100 s, then 2.
            let secs = (i * 5) as f64;
            let lines = if secs <= 100.0 {
                10 * i * 5
            } else {
                1000 + 2 * (i * 5 - 100)
            };
            h.push(at(secs, lines, lines * 7));
        }
        let now = at(150.0, 1100, 7700);
        let r = h.rates(&now);
        // From the sample at 90 s (900 lines) to 150 s.
        assert_eq!(r.lines_per_sec, 200.0 / 60.0);
        assert_eq!(r.completion_tokens_per_sec, 1400.0 / 60.0);
        assert_eq!(eta_secs(100, &r), Some(30.0));
        assert_eq!(eta_secs(100, &Rates::default()), None);
    }

    #[test]
    fn only_four_hours_are_kept() {
        let mut h = History::default();
        for i in 0..KEPT + 10 {
            h.push(at(i as f64, i as u64, 0));
        }
        let samples = h.samples();
        assert_eq!(samples.len(), KEPT);
        assert_eq!(samples[0].lines_done, 10);
    }
}
