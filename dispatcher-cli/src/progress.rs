//! Progress of a worker: a progress bar with rate and ETA on a terminal, a log
//! line every 30 s otherwise (job logs on a cluster are files).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use dispatcher_core::task::manager::Progress;
use dispatcher_core::task::source::{JobProgress, WorkSource};
use dispatcher_core::task::Engines;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Seconds between progress lines in a log: often enough to see a stall in a
/// job log, rarely enough not to flood it over days.
const LOG_EVERY: Duration = Duration::from_secs(30);
/// How often the bar asks the source for the job's progress.
const BAR_EVERY: Duration = Duration::from_secs(2);

/// Reports progress until aborted.
pub async fn report(progress: Arc<Progress>, source: Arc<dyn WorkSource>, engines: Engines) {
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar(progress, source, engines).await
    } else {
        log_lines(progress, source, engines).await
    }
}

/// Each engine's requests in flight of its limit and requests done:
/// `default 12/64 running 3400 done, judge 3/32 running 1200 done`.
pub fn engine_load(engines: &Engines) -> String {
    engines
        .load()
        .iter()
        .map(|e| {
            format!(
                "{} {}/{} running {} done",
                e.name, e.in_flight, e.limit, e.requests
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Job-wide figures from the source: percent of input read and an ETA from
/// the byte rate between two samples.
fn job_figures(before: Option<&JobProgress>, now: &JobProgress, secs: f64) -> (f64, String) {
    let percent = if now.input_bytes_total > 0 {
        100.0 * now.input_bytes_consumed as f64 / now.input_bytes_total as f64
    } else {
        100.0
    };
    let eta = before
        .map(|b| {
            now.input_bytes_consumed
                .saturating_sub(b.input_bytes_consumed) as f64
                / secs
        })
        .filter(|rate| *rate > 0.0)
        .map_or_else(
            || "unknown".to_string(),
            |rate| {
                let left = now
                    .input_bytes_total
                    .saturating_sub(now.input_bytes_consumed) as f64
                    / rate;
                format!("{}s", left.round() as u64)
            },
        );
    (percent, eta)
}

async fn bar(progress: Arc<Progress>, source: Arc<dyn WorkSource>, engines: Engines) {
    let bar = ProgressBar::with_draw_target(Some(100), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {percent:>3}% input read | {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut before: Option<JobProgress> = None;
    let mut last_lines = 0;
    let mut interval = tokio::time::interval(BAR_EVERY);
    loop {
        interval.tick().await;
        let lines = progress.lines.load(Relaxed);
        let rate = (lines - last_lines) as f64 / BAR_EVERY.as_secs_f64();
        last_lines = lines;
        let mut msg = format!(
            "{lines} lines here, {rate:.1}/s, {} tasks | {}",
            progress.active.load(Relaxed),
            engine_load(&engines)
        );
        if let Some(now) = source.progress().await {
            let (percent, eta) = job_figures(before.as_ref(), &now, BAR_EVERY.as_secs_f64());
            bar.set_position(percent as u64);
            msg.push_str(&format!(" | job: {} lines done, ETA {eta}", now.lines_done));
            before = Some(now);
        }
        bar.set_message(msg);
    }
}

async fn log_lines(progress: Arc<Progress>, source: Arc<dyn WorkSource>, engines: Engines) {
    let start = tokio::time::Instant::now();
    let mut interval = tokio::time::interval(LOG_EVERY);
    interval.tick().await;
    let mut last = 0;
    let mut before: Option<JobProgress> = None;
    loop {
        interval.tick().await;
        let lines = progress.lines.load(Relaxed);
        let rate = (lines - last) as f64 / LOG_EVERY.as_secs_f64();
        last = lines;
        let job = source.progress().await;
        let (percent, eta) = job.as_ref().map_or((0.0, "unknown".into()), |now| {
            job_figures(before.as_ref(), now, LOG_EVERY.as_secs_f64())
        });
        tracing::info!(
            lines,
            active = progress.active.load(Relaxed),
            lines_per_sec = format!("{rate:.1}"),
            job_lines_done = job.as_ref().map(|s| s.lines_done),
            job_input_read = format!("{percent:.1}%"),
            eta,
            engines = engine_load(&engines),
            elapsed_secs = start.elapsed().as_secs(),
            "progress"
        );
        before = job;
    }
}
