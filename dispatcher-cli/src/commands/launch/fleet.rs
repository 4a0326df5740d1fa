//! The fleet loop: look at the server and the worker jobs, submit as many
//! as the backlog deserves, replace those that end early, stop a job
//! whose workers fail at start.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use dispatcher_core::client::DispatcherClient;
use dispatcher_core::protocol::StatusResponse;

use super::*;

pub(super) enum Ending {
    Complete,
    /// Complete at the first look: an earlier run did the job.
    AlreadyComplete,
    Interrupted,
}

/// The loop's memory between looks.
pub(super) struct Loop<'a> {
    pub(super) options: &'a LaunchOptions,
    pub(super) client: DispatcherClient,
    pub(super) backend: Backend,
    pub(super) spec: WorkerSpec,
    pub(super) failures_in_a_row: u32,
    /// Submissions refused in a row (sbatch failed: a drained partition, a
    /// submit limit, slurmctld busy).
    pub(super) refused_in_a_row: u32,
    /// The last failed worker: its id and log.
    pub(super) last_failure: Option<(String, PathBuf, String)>,
    /// No submission before this (backoff after a failure).
    pub(super) submit_after: Option<Instant>,
    /// Workers that ended early while the job was unfinished, not yet
    /// replaced.
    pub(super) owed: u64,
    pub(super) capacity: u64,
    /// Results handed in at the last look (lines written, and those waiting
    /// in the reorder buffer for an earlier one).
    pub(super) handed_in: Option<u64>,
    pub(super) reported_pending: HashSet<String>,
    /// Jobs whose worker said hello to the server (it names its job).
    pub(super) reached: HashSet<String>,
    /// Jobs warned about for running without reaching the server.
    pub(super) warned_silent: HashSet<String>,
    /// Whether the server saw workers that send no hello (the Python
    /// client), which can therefore not be told from silent ones.
    pub(super) anonymous_workers: bool,
    pub(super) unreachable_since: Option<Instant>,
    /// (time, lines done) over the last minute, for the rate.
    pub(super) samples: VecDeque<(Instant, u64)>,
}

impl Loop<'_> {
    pub(super) async fn run(
        &mut self,
        state: &mut LaunchState,
        dir: &LaunchDir,
        server: &mut ServerHandle,
        ui: &mut Ui,
        signal: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> anyhow::Result<Ending> {
        let poll = Duration::from_secs_f64(self.options.poll);
        let mut first_look = true;
        loop {
            let status = self.client.status().await;
            let changed = self.look_at_jobs(state, status.as_ref().ok(), ui).await;
            if changed {
                dir.save(state)?;
            }
            let status = match status {
                Ok(s) => {
                    self.unreachable_since = None;
                    s
                }
                Err(e) => {
                    match server.exited() {
                        Some(Ok(())) => {
                            // It exits 0 once the job is complete (or on
                            // SIGTERM from outside: the report says which).
                            ui.event("the server has exited");
                            return Ok(Ending::Complete);
                        }
                        Some(Err(how)) => bail!(
                            "the server {how}; its log ({}) ends with:\n{}\nlaunch stopped the workers; run the same command to resume",
                            dir.server_log().display(),
                            backend::tail(&dir.server_log(), 15)
                        ),
                        None => {}
                    }
                    let since = *self.unreachable_since.get_or_insert_with(Instant::now);
                    if !server.owned
                        && self.handed_in.is_some()
                        && since.elapsed() > Duration::from_secs(30)
                    {
                        ui.event(&format!("the server at {} is gone ({e}); it exits by itself once the job is complete", server.record.addr));
                        return Ok(Ending::Complete);
                    }
                    ui.status(&format!("the server does not answer: {e}"));
                    if wait_or_signal(poll, signal).await {
                        return Ok(Ending::Interrupted);
                    }
                    continue;
                }
            };
            if status.complete && first_look {
                ui.event(&format!(
                    "the job is complete already: all {} lines have their output line; nothing to do",
                    status.lines_done
                ));
                return Ok(Ending::AlreadyComplete);
            }
            first_look = false;
            if status.complete {
                ui.event(&format!("all {} lines are written", status.lines_done));
                return Ok(Ending::Complete);
            }
            let backlog = Backlog::of(&status);
            if backlog.drained() && state.drained_at.is_none() {
                state.drained_at = Some(unix_now());
                dir.save(state)?;
            }
            if self.failures_in_a_row >= self.options.max_worker_failures {
                let (id, log, how) = self.last_failure.clone().unwrap_or_default();
                bail!(
                    "{} worker jobs failed in a row (--max-worker-failures {}); the last, {id} ({how}), logged ({}):\n{}\nlaunch stops here rather than keep submitting: fix the worker command and run the same launch again (the output resumes where it is)",
                    self.failures_in_a_row,
                    self.options.max_worker_failures,
                    log.display(),
                    backend::tail(&log, 20)
                );
            }
            self.submit(state, dir, backlog, ui).await?;
            ui.status(&self.status_line(&status, state));
            if wait_or_signal(poll, signal).await {
                return Ok(Ending::Interrupted);
            }
        }
    }

    /// Updates the workers' records from the backend; true when one changed.
    pub(super) async fn look_at_jobs(
        &mut self,
        state: &mut LaunchState,
        status: Option<&StatusResponse>,
        ui: &mut Ui,
    ) -> bool {
        if let Some(s) = status {
            self.note_reached(s);
            // The job moves when results come in, written or not (a crashed
            // worker's lines hold the written ones back until they time
            // out): failures before were not the workers' own.
            let handed_in = s.lines_done + s.reorder_buffer;
            if self.handed_in.is_some_and(|before| handed_in > before) {
                self.failures_in_a_row = 0;
            }
            self.handed_in = Some(handed_in);
            self.capacity = s
                .workers
                .iter()
                .map(|w| w.in_flight)
                .fold(self.capacity, u64::max);
            self.samples.push_back((Instant::now(), s.lines_done));
            while self
                .samples
                .front()
                .is_some_and(|(t, _)| t.elapsed() > Duration::from_secs(60))
            {
                self.samples.pop_front();
            }
        }
        let ids = state.alive_ids();
        if ids.is_empty() {
            return false;
        }
        let states = match self.backend.poll(&ids).await {
            Ok(s) => s,
            Err(e) => {
                ui.event(&format!("could not read the workers' state: {e:#}"));
                return false;
            }
        };
        let complete = status.is_some_and(|s| s.complete);
        // Workers exit 0 by themselves once nothing is left to hand out.
        let drained = status.is_none_or(|s| Backlog::of(s).drained());
        if states
            .values()
            .any(|s| matches!(s, JobState::Ended(EndKind::Done, _)))
        {
            // A worker may have said hello since the status above.
            if let Ok(s) = self.client.status().await {
                self.note_reached(&s);
            }
        }
        let now = unix_now();
        let mut changed = false;
        let silent = self.silent_too_long(state, &states, now, ui).await;
        for job in state.jobs.iter_mut().filter(|j| j.alive()) {
            let mut observed = match silent.get(&job.id) {
                Some(ended) => Some(ended.clone()),
                None => states.get(&job.id).cloned(),
            };
            if let Some(JobState::Ended(EndKind::Done, _)) = &observed {
                if !complete && !self.reached.contains(&job.id) {
                    // Exit 0 without ever reaching the server: it gave up
                    // on an address it could not reach.
                    observed = Some(JobState::Ended(
                        EndKind::Failed,
                        format!(
                            "it exited 0 after {} without ever reaching the server at {}: is the worker command a dispatcher worker (a task binary, `dispatcher infer`)? If it is, can its node reach that address (--advertise)?",
                            human_secs(now - job.started.unwrap_or(job.submitted)),
                            self.server_addr()
                        ),
                    ));
                }
            }
            match observed.as_ref() {
                Some(JobState::Running) if job.started.is_none() => {
                    job.started = Some(now);
                    changed = true;
                }
                Some(JobState::Pending(reason)) => {
                    let waited = now - job.submitted;
                    if waited > self.options.pending_timeout
                        && self.reported_pending.insert(job.id.clone())
                    {
                        ui.event(&format!(
                            "worker job {} has been pending for {} (Slurm's reason: {}); it still counts toward --max-workers: `scancel {}` has launch submit another",
                            job.id,
                            human_secs(waited),
                            if reason.is_empty() { "none given" } else { reason },
                            job.id
                        ));
                    }
                }
                Some(JobState::Ended(kind, detail)) => {
                    job.ended_as(now, *kind, detail);
                    changed = true;
                    match kind {
                        EndKind::Done if !complete && !drained => {
                            // Exit 0 with lines left to hand out: it was told
                            // to stop (scancel --signal=TERM, a preemption
                            // signal) and released its lines.
                            self.failures_in_a_row = 0;
                            ui.event(&format!(
                                "worker {} stopped while lines were left ({detail}: told to stop from outside?); it released its lines and is replaced; its log: {}",
                                job.id,
                                job.log.display()
                            ));
                        }
                        EndKind::Done => {
                            self.failures_in_a_row = 0;
                        }
                        EndKind::Failed => {
                            self.failures_in_a_row += 1;
                            self.last_failure =
                                Some((job.id.clone(), job.log.clone(), detail.clone()));
                            self.back_off(self.failures_in_a_row);
                            ui.event(&format!(
                                "worker {} failed ({detail}), {} in a row; its log: {}",
                                job.id,
                                self.failures_in_a_row,
                                job.log.display()
                            ));
                        }
                        EndKind::Lost => ui.event(&format!(
                            "worker {} ended from outside ({detail}); its log: {}",
                            job.id,
                            job.log.display()
                        )),
                    }
                    if !complete && (*kind != EndKind::Done || !drained) {
                        self.owed += 1;
                    }
                }
                _ => {}
            }
        }
        changed
    }

    /// Running workers that have not reached the server: warned about at a
    /// quarter of `--hello-timeout`, cancelled past it (returned as
    /// failed, by id).
    async fn silent_too_long(
        &mut self,
        state: &LaunchState,
        states: &std::collections::HashMap<String, JobState>,
        now: f64,
        ui: &mut Ui,
    ) -> std::collections::HashMap<String, JobState> {
        let limit = self.options.hello_timeout;
        let mut over = std::collections::HashMap::new();
        if self.anonymous_workers {
            return over;
        }
        for job in state.alive() {
            let (Some(started), Some(JobState::Running)) = (job.started, states.get(&job.id))
            else {
                continue;
            };
            let silent = now - started;
            if self.reached.contains(&job.id) || silent < limit / 4.0 {
                continue;
            }
            let why = format!(
                "it ran {} without reaching the server at {} (a worker does once its engine is up): is its engine still loading? can its node reach that address (--advertise)? does its command pass the job's token (DISPATCHER_TOKEN) on?",
                human_secs(silent),
                self.server_addr()
            );
            if silent >= limit {
                over.insert(
                    job.id.clone(),
                    JobState::Ended(EndKind::Failed, format!("{why} (--hello-timeout {limit})")),
                );
            } else if self.warned_silent.insert(job.id.clone()) {
                ui.event(&format!(
                    "worker {}: {why}; it is cancelled at --hello-timeout {} (its log: {})",
                    job.id,
                    human_secs(limit),
                    job.log.display()
                ));
            }
        }
        if !over.is_empty() {
            let ids: Vec<String> = over.keys().cloned().collect();
            if let Err(e) = self.backend.cancel(&ids, Duration::from_secs(10)).await {
                ui.event(&format!("could not cancel {}: {e:#}", ids.join(" ")));
            }
        }
        over
    }

    /// The server's address as the workers are given it.
    fn server_addr(&self) -> &str {
        self.spec
            .env
            .iter()
            .find(|(k, _)| k == "DISPATCHER_SERVER")
            .map_or("?", |(_, v)| v.as_str())
    }

    pub(super) fn note_reached(&mut self, status: &StatusResponse) {
        self.anonymous_workers |= status.workers.iter().any(|w| w.hello.is_none());
        self.reached.extend(
            status
                .workers
                .iter()
                .filter_map(|w| w.hello.as_ref()?.job.clone()),
        );
    }

    /// Submits the workers the plan asks for.
    pub(super) async fn submit(
        &mut self,
        state: &mut LaunchState,
        dir: &LaunchDir,
        backlog: Backlog,
        ui: &mut Ui,
    ) -> anyhow::Result<()> {
        if self.submit_after.is_some_and(|t| Instant::now() < t) {
            return Ok(());
        }
        let fleet = Fleet {
            alive: u32::try_from(state.alive().count()).unwrap_or(u32::MAX),
            max: self.options.max_workers,
            capacity: self.capacity,
        };
        let n = plan::to_submit(backlog, fleet);
        for _ in 0..n {
            let ordinal = state.next_ordinal;
            let submitted = match self.backend.submit(&self.spec, ordinal).await {
                Ok(submitted) => submitted,
                Err(e) => return self.refused(e, state, ui),
            };
            self.refused_in_a_row = 0;
            state.next_ordinal += 1;
            if self.owed > 0 {
                self.owed -= 1;
                state.replaced += 1;
            }
            let now = unix_now();
            state.jobs.push(WorkerRecord {
                id: submitted.id.clone(),
                ordinal,
                pid: submitted.pid,
                pid_start: submitted.pid.and_then(dispatcher_core::process::start_time),
                log: submitted.log,
                submitted: now,
                started: submitted.running.then_some(now),
                ended: None,
                end: None,
                end_detail: None,
            });
            dir.save(state)?;
            ui.event(&format!(
                "worker {} submitted ({} of --max-workers {}; lines left to hand out: {})",
                submitted.id,
                state.alive().count(),
                self.options.max_workers,
                backlog
                    .unissued
                    .map_or_else(|| "counting".to_string(), |n| n.to_string())
            ));
        }
        Ok(())
    }

    /// A submission was refused: the workers there keep working, and
    /// launch tries again after a backoff (doubling, up to ten minutes);
    /// it stops only once no worker is left and `--max-worker-failures`
    /// submissions in a row were refused.
    fn refused(
        &mut self,
        e: anyhow::Error,
        state: &LaunchState,
        ui: &mut Ui,
    ) -> anyhow::Result<()> {
        self.refused_in_a_row += 1;
        let alive = state.alive().count();
        let max = self.options.max_worker_failures;
        if alive == 0 && self.refused_in_a_row >= max {
            bail!(
                "{e:#}\n{} submissions in a row were refused and no worker is left (--max-worker-failures {max}); launch stops here: fix what the refusal says and run the same launch again (the output resumes where it is)",
                self.refused_in_a_row
            );
        }
        let backoff = self.back_off(self.refused_in_a_row);
        ui.event(&format!(
            "could not submit a worker ({e:#}); {alive} worker(s) keep working; trying again in {}",
            human_secs(backoff)
        ));
        Ok(())
    }

    /// Holds submissions back after the `in_a_row`-th failure in a row:
    /// `--failure-backoff` seconds, doubling with each, up to ten minutes.
    /// Returns the seconds.
    fn back_off(&mut self, in_a_row: u32) -> f64 {
        let secs = (self.options.failure_backoff
            * 2f64.powi(in_a_row.saturating_sub(1).min(10) as i32))
        .min(600.0);
        self.submit_after = Some(Instant::now() + Duration::from_secs_f64(secs));
        secs
    }

    pub(super) fn status_line(&self, s: &StatusResponse, state: &LaunchState) -> String {
        let rate = match (self.samples.front(), self.samples.back()) {
            (Some((t0, l0)), Some((t1, l1))) if t1 > t0 => {
                l1.saturating_sub(*l0) as f64 / (*t1 - *t0).as_secs_f64()
            }
            _ => 0.0,
        };
        let (done, total) = (s.lines_done, s.lines_total);
        let progress = match total {
            Some(t) if t > 0 => {
                format!("{done}/{t} lines ({:.1}%)", 100.0 * done as f64 / t as f64)
            }
            _ => format!("{done} lines"),
        };
        let eta = match total {
            Some(t) if rate > 0.0 => human_secs(t.saturating_sub(done) as f64 / rate),
            _ => "?".into(),
        };
        let (mut running, mut pending) = (0, 0);
        for job in state.alive() {
            if job.started.is_some() {
                running += 1;
            } else {
                pending += 1;
            }
        }
        let failed = state
            .jobs
            .iter()
            .filter(|j| j.end == Some(EndKind::Failed))
            .count();
        format!(
            "{progress}, {rate:.1} lines/s, ETA {eta} | workers: {running} running, {pending} pending, {failed} failed, {} replaced",
            state.replaced
        )
    }
}

/// Sleeps `d`; true when a termination signal came first.
pub(super) async fn wait_or_signal(
    d: Duration,
    signal: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => false,
        () = signal.as_mut() => true,
    }
}
