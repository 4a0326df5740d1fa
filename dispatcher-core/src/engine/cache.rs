//! An engine's own prefix cache counters, read from its Prometheus
//! `/metrics` (vLLM's `vllm:prefix_cache_queries_total` and
//! `vllm:prefix_cache_hits_total`), for workers to report with their
//! heartbeats: what `--group-by` is for, seen from the engine.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use crate::protocol::PrefixCache;

/// The counters last read, shared between the reader and the heartbeats.
#[derive(Debug, Default)]
pub struct PrefixCacheMeter {
    queries: AtomicU64,
    hits: AtomicU64,
    known: AtomicBool,
}

impl PrefixCacheMeter {
    /// The counters last read; `None` until the engine reported some.
    pub fn get(&self) -> Option<PrefixCache> {
        self.known.load(Relaxed).then(|| PrefixCache {
            queries: self.queries.load(Relaxed),
            hits: self.hits.load(Relaxed),
        })
    }

    fn set(&self, counts: PrefixCache) {
        self.queries.store(counts.queries, Relaxed);
        self.hits.store(counts.hits, Relaxed);
        self.known.store(true, Relaxed);
    }
}

/// The prefix cache counters in a Prometheus text exposition, summed over
/// their label sets (one per model); `None` when it has neither.
pub fn parse(text: &str) -> Option<PrefixCache> {
    let mut counts = PrefixCache::default();
    let mut found = false;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap_or("");
        let value = || {
            line.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .map_or(0, |v| v.max(0.0) as u64)
        };
        match name {
            "vllm:prefix_cache_queries_total" => {
                counts.queries += value();
                found = true;
            }
            "vllm:prefix_cache_hits_total" => {
                counts.hits += value();
                found = true;
            }
            _ => {}
        }
    }
    found.then_some(counts)
}

/// Reads `metrics_url` every `every` into `meter`, while the engine reports
/// the counters; gives up after three reads without them (an engine that
/// has none, such as llama.cpp).
pub fn watch(
    metrics_url: String,
    meter: Arc<PrefixCacheMeter>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let http = match reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
        {
            Ok(h) => h,
            Err(_) => return,
        };
        let mut misses = 0;
        while misses < 3 {
            let read = async {
                let text = http
                    .get(&metrics_url)
                    .send()
                    .await
                    .ok()?
                    .error_for_status()
                    .ok()?
                    .text()
                    .await
                    .ok()?;
                parse(&text)
            };
            match read.await {
                Some(counts) => {
                    meter.set(counts);
                    misses = 0;
                }
                None if meter.get().is_none() => misses += 1,
                None => {}
            }
            tokio::time::sleep(every).await;
        }
        tracing::debug!(url = %metrics_url, "the engine reports no prefix cache counters");
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllms_counters_are_summed_over_models_and_others_ignored() {
        let text = "# HELP vllm:prefix_cache_queries_total Prefix cache queries\n\
                    # TYPE vllm:prefix_cache_queries_total counter\n\
                    vllm:prefix_cache_queries_total{engine=\"0\",model_name=\"tiny\"} 2773090.0\n\
                    vllm:prefix_cache_hits_total{engine=\"0\",model_name=\"tiny\"} 2496000.0\n\
                    vllm:prefix_cache_hits_total{engine=\"0\",model_name=\"other\"} 4.0\n\
                    vllm:num_requests_running{model_name=\"tiny\"} 3.0\n";
        assert_eq!(
            parse(text),
            Some(PrefixCache {
                queries: 2_773_090,
                hits: 2_496_004
            })
        );
        assert_eq!(parse("llamacpp:prompt_tokens_total 5\n"), None);
        let meter = PrefixCacheMeter::default();
        assert_eq!(meter.get(), None);
        meter.set(PrefixCache {
            queries: 10,
            hits: 9,
        });
        assert_eq!(meter.get().map(|c| c.hit_rate()), Some(0.9));
    }
}
