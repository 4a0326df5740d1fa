//! How a launch ends: the workers and the server wound down, the report
//! and the tail's cost, and watching a job another launch runs.

use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use dispatcher_core::client::DispatcherClient;
use dispatcher_core::protocol::StatusResponse;

use super::*;

/// Ends the workers and the server: at the end of a complete job the
/// workers exit by themselves (pending ones are cancelled at once, running
/// ones after a minute); when stopping early every worker is cancelled
/// (they release their lines), then the server checkpoints and exits. A
/// Ctrl-C (or SIGTERM) meanwhile stops the waiting: the workers are killed
/// outright (their lines come back after the work timeout).
pub(super) async fn wind_down(
    backend: &mut Backend,
    state: &mut LaunchState,
    dir: &LaunchDir,
    server: &mut ServerHandle,
    ui: &mut Ui,
    complete: bool,
) {
    let again = crate::termination_signal();
    let hurried = {
        let workers = end_workers(backend, state, dir, ui, complete);
        tokio::pin!(workers);
        tokio::select! {
            () = &mut workers => false,
            () = again => true,
        }
    };
    if hurried {
        let alive = state.alive_ids();
        ui.event(&format!(
            "signalled again: not waiting for the workers; killing {} of them",
            alive.len()
        ));
        if let Err(e) = backend.cancel(&alive, Duration::ZERO).await {
            ui.event(&format!(
                "could not cancel {} ({e:#}): cancel them by hand",
                alive.join(" ")
            ));
        }
    }
    if server.owned && server.exited().is_none() {
        if complete && !hurried {
            // It exits by itself after its grace period.
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline && server.exited().is_none() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        server.stop().await;
    }
    let _ = dir.save(state);
}

/// The workers' part of [`wind_down`]: waits for them to end, cancelling
/// them (at once when stopping early) and retrying a cancel that failed.
async fn end_workers(
    backend: &mut Backend,
    state: &mut LaunchState,
    dir: &LaunchDir,
    ui: &mut Ui,
    complete: bool,
) {
    let grace = Duration::from_secs(30);
    let deadline = Instant::now() + Duration::from_secs(if complete { 60 } else { 0 });
    let mut cancelled = false;
    let give_up = Instant::now() + Duration::from_secs(180);
    loop {
        let ids = state.alive_ids();
        if ids.is_empty() {
            break;
        }
        let states = backend.poll(&ids).await.unwrap_or_default();
        let now = unix_now();
        let mut pending = Vec::new();
        for job in state.jobs.iter_mut().filter(|j| j.alive()) {
            match states.get(&job.id) {
                Some(JobState::Ended(kind, detail)) => job.ended_as(now, *kind, detail),
                Some(JobState::Pending(_)) => pending.push(job.id.clone()),
                _ => {}
            }
        }
        let _ = dir.save(state);
        let alive = state.alive_ids();
        if alive.is_empty() {
            break;
        }
        if Instant::now() > give_up {
            ui.event(&format!(
                "workers still there after 3 minutes: {}; cancel them by hand if they stay",
                alive.join(" ")
            ));
            break;
        }
        if !cancelled && Instant::now() >= deadline {
            // Tried again on the next round until it goes through (scancel
            // may time out, or be killed).
            match backend.cancel(&alive, grace).await {
                Ok(()) => cancelled = true,
                Err(e) => ui.event(&format!(
                    "could not cancel the workers ({e:#}); trying again"
                )),
            }
        } else if !pending.is_empty() {
            let _ = backend.cancel(&pending, grace).await;
        }
        ui.status(&format!(
            "waiting for {} worker(s) to end (Ctrl-C again: kill them)",
            alive.len()
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Cancels the workers an earlier launch left running when the server
/// they were started against (at `gone`) is gone and another serves the
/// job now: they would never reach it. They end as lost (replaced, not
/// counted as failures).
pub(super) async fn cancel_orphans(
    backend: &mut Backend,
    state: &mut LaunchState,
    gone: &str,
    ui: &mut Ui,
) {
    let ids = state.alive_ids();
    if ids.is_empty() {
        return;
    }
    ui.event(&format!(
        "cancelling {} worker(s) of the earlier launch: they were started against its server at {gone}, which is gone",
        ids.len()
    ));
    if let Err(e) = backend.cancel(&ids, Duration::from_secs(10)).await {
        ui.event(&format!(
            "could not cancel them ({e:#}): they end by themselves once they give up on {gone}"
        ));
    }
    let now = unix_now();
    let detail = format!("cancelled: started against the server at {gone}, which is gone");
    for job in state.jobs.iter_mut().filter(|j| j.alive()) {
        job.ended_as(now, EndKind::Lost, &detail);
    }
}

/// Prints the job's report and the tail's cost; the exit status says
/// whether every line was written without an error record.
pub(super) fn finish(args: &LaunchArgs, state: &LaunchState, ui: &mut Ui) -> anyhow::Result<()> {
    let files = args.serve.files();
    let mut report = Report::of_file(files.output(), |_| {})?;
    let input = dispatcher_core::dataset::input_lines(
        &args.serve.infile,
        args.serve.split.as_deref(),
        &files,
    )
    .context("--input")?;
    report.input_lines = Some(input);
    ui.clear();
    print!("{}", report.render());
    if let Some(tail) = tail_figures(state) {
        println!("{tail}");
    }
    let _ = std::io::stdout().flush();
    let failed: u64 = report.errors.values().sum();
    if report.lines == input && failed == 0 {
        Ok(())
    } else if report.lines == input {
        Err(Exit(EXIT_ERRORS).into())
    } else {
        bail!(
            "{} of {input} lines have an output line: the server stopped before the job was complete; run the same command to go on",
            report.lines
        )
    }
}

/// Worker-seconds spent after the last line was handed out, against the
/// seconds that tail lasted: what workers idling at the tail cost.
pub(super) fn tail_figures(state: &LaunchState) -> Option<String> {
    let drained = state.drained_at?;
    let end = state
        .jobs
        .iter()
        .filter_map(|j| j.ended)
        .fold(f64::NAN, f64::max);
    if !end.is_finite() || end < drained {
        return None;
    }
    let worker_secs: f64 = state
        .jobs
        .iter()
        .filter_map(|j| Some((j.started.unwrap_or(j.submitted).max(drained), j.ended?)))
        .map(|(from, to)| (to - from).max(0.0))
        .sum();
    Some(format!(
        "tail             {:.1} s from the last line handed out to the last worker's end; {worker_secs:.1} worker-seconds in it",
        end - drained
    ))
}

/// Watches a job another launch runs: its status line until the end.
pub(super) async fn watch(
    client: &DispatcherClient,
    args: &LaunchArgs,
    ui: &mut Ui,
    mut signal: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> anyhow::Result<()> {
    let poll = Duration::from_secs_f64(args.launch.poll);
    let mut last: Option<StatusResponse> = None;
    loop {
        match client.status().await {
            Ok(s) if s.complete => break,
            Ok(s) => {
                ui.status(&format!(
                    "{} / {} lines (watching; the other launch runs the workers)",
                    s.lines_done,
                    s.lines_total.map_or_else(|| "?".into(), |t| t.to_string())
                ));
                last = Some(s);
            }
            Err(e) if last.is_some() => {
                ui.event(&format!("the server is gone ({e})"));
                break;
            }
            Err(e) => return Err(e.into()),
        }
        if wait_or_signal(poll, &mut signal).await {
            return Err(Exit(EXIT_INTERRUPTED).into());
        }
    }
    // Give the other launch a moment to let the output settle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    finish(args, &LaunchState::new(""), ui)
}
