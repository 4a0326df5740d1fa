//! Progress of a worker: a log line every so often with lines done and rate.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use dispatcher_core::task::manager::Progress;

/// Seconds between progress lines: often enough to see a stall in a job log,
/// rarely enough not to flood it over days.
const EVERY: Duration = Duration::from_secs(30);

/// Logs progress every 30 s until aborted.
pub async fn report(progress: Arc<Progress>) {
    let start = tokio::time::Instant::now();
    let mut interval = tokio::time::interval(EVERY);
    interval.tick().await;
    let mut last = 0;
    loop {
        interval.tick().await;
        let lines = progress.lines.load(Relaxed);
        let rate = (lines - last) as f64 / EVERY.as_secs_f64();
        last = lines;
        tracing::info!(
            lines,
            active = progress.active.load(Relaxed),
            lines_per_sec = format!("{rate:.1}"),
            elapsed_secs = start.elapsed().as_secs(),
            "progress"
        );
    }
}
