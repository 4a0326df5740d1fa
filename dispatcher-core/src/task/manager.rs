//! The task manager: pulls items, runs one task per item, keeps the engine
//! saturated with at most `workers` requests in flight, hands results back in
//! batches, and on a signal or a dead engine releases what it holds.
//!
//! Everything here waits on events (a task finishing, a fetch answering, a
//! deadline); there is no polling loop.

use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

use super::limiter::PriorityLimiter;
use super::source::{SourceError, WorkSource};
use super::{DynTask, LineOutcome, OutcomeKind, TaskContext};
use crate::engine::{BoxFuture, Engine};
use crate::metrics::WorkerMetrics;
use crate::protocol::{ReleaseReason, WorkItem, WorkResponse, WorkStatus};

/// How the manager runs.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Items asked for per work request.
    pub batch_size: usize,
    /// Requests in flight to the engine at most.
    pub workers: usize,
    /// How long to keep trying a server that was never reached (it may still
    /// be starting) before giving up on it.
    pub server_wait: Duration,
    /// How long to keep trying a server that answered before: one that is gone
    /// for this long finished its job and exited (or died with its job).
    pub vanish_wait: Duration,
    /// Results handed in per `POST /results` at most.
    pub max_submit_batch: usize,
    /// Longest wait after a `retry` answer, whatever `retry_in` says: the server
    /// exits shortly after the last result, and an idle worker should notice.
    pub max_retry_wait: Duration,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            batch_size: 16,
            workers: 64,
            server_wait: Duration::from_secs(120),
            vanish_wait: Duration::from_secs(10),
            max_submit_batch: 1024,
            max_retry_wait: Duration::from_secs(5),
        }
    }
}

/// Why the manager stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The source has no more work and every task finished.
    Complete,
    /// The server could not be reached for `server_wait`: it is gone.
    ServerGone,
    /// The shutdown future resolved (SIGTERM): in-flight items were released.
    Interrupted,
    /// The engine died or stopped answering: in-flight items were released.
    EngineFailed(String),
}

/// What the manager did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Lines finished, by how they ended.
    pub outcomes: HashMap<&'static str, u64>,
    /// Items handed back for another attempt at the task's request.
    pub retries: u64,
    /// Items released at shutdown.
    pub released: u64,
    /// Items dropped because another worker finished them first (backups).
    pub dropped: u64,
}

impl Summary {
    /// Lines finished with an output line of any kind.
    pub fn lines(&self) -> u64 {
        self.outcomes.values().sum()
    }
}

/// Counters the manager updates as it goes, for progress and metrics.
#[derive(Debug, Default)]
pub struct Progress {
    /// Lines finished (any kind).
    pub lines: std::sync::atomic::AtomicU64,
    /// Tasks running.
    pub active: std::sync::atomic::AtomicU64,
    /// Engine requests, tokens and outcomes, for `/metrics`.
    pub metrics: Arc<WorkerMetrics>,
}

/// How long a stopping worker waits for a work request already sent.
const FETCH_GRACE: Duration = Duration::from_secs(5);

enum Handback {
    Result(WorkItem),
    Release(u64, ReleaseReason),
}

/// Runs `task` over the items of `source` until the work is done, `shutdown`
/// resolves, or `engine_died` does.
pub async fn run(
    task: &'static dyn DynTask,
    source: Arc<dyn WorkSource>,
    engine: Arc<dyn Engine>,
    config: ManagerConfig,
    progress: Arc<Progress>,
    shutdown: impl Future<Output = ()>,
    engine_died: impl Future<Output = String>,
) -> (Exit, Summary) {
    use std::sync::atomic::Ordering::Relaxed;
    let limiter = PriorityLimiter::new(config.workers.max(1));
    let batch = config.batch_size.max(1);
    // Enough tasks to keep every request slot busy while a batch is fetched.
    let max_active = config.workers.max(batch) + batch;

    let (tx, rx) = mpsc::unbounded_channel::<Handback>();
    // Signalled after each delivery: our own results may have completed the job.
    let delivered = Arc::new(Notify::new());
    let submitter = tokio::spawn(hand_back(
        source.clone(),
        rx,
        config.max_submit_batch,
        delivered.clone(),
    ));

    let mut tasks: JoinSet<(WorkItem, LineOutcome)> = JoinSet::new();
    // Items this worker holds, with the handle that stops their task.
    let mut held: HashMap<u64, AbortHandle> = HashMap::new();
    // Leases: heartbeats every third of the server's lease keep held items.
    let mut lease: Option<Duration> = None;
    let mut heartbeat: Option<BoxFuture<'_, Result<Option<Vec<u64>>, SourceError>>> = None;
    let mut next_heartbeat = Instant::now();
    let mut summary = Summary::default();
    let mut started: u64 = 0;
    let mut fetch: Option<BoxFuture<'_, Result<WorkResponse, SourceError>>> = None;
    let mut wait_until: Option<Instant> = None;
    let mut exhausted = false;
    let mut unreachable_since: Option<Instant> = None;
    let mut ever_reached = false;
    let mut backoff = Duration::from_millis(100);
    let mut exit = None;
    let mut shutdown = pin!(shutdown);
    let mut engine_died = pin!(engine_died);

    while exit.is_none() {
        if exhausted && tasks.is_empty() {
            exit = Some(if unreachable_since.is_some() {
                Exit::ServerGone
            } else {
                Exit::Complete
            });
            break;
        }
        if fetch.is_none()
            && !exhausted
            && wait_until.is_none()
            && tasks.len() + batch <= max_active
        {
            fetch = Some(source.get_work(batch));
        }
        tokio::select! {
            biased;
            () = &mut shutdown => exit = Some(Exit::Interrupted),
            why = &mut engine_died => exit = Some(Exit::EngineFailed(format!("the engine exited ({why})"))),
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                let Ok((item, outcome)) = joined else { continue };
                progress.active.store(tasks.len() as u64, Relaxed);
                // A finished task may free what the source was waiting on.
                wait_until = None;
                match outcome {
                    LineOutcome::Line { line, kind } => {
                        held.remove(&item.work_id);
                        *summary.outcomes.entry(kind.label()).or_default() += 1;
                        progress.lines.fetch_add(1, Relaxed);
                        progress.metrics.outcome(kind.label());
                        if kind != OutcomeKind::Ok {
                            tracing::debug!(work_id = item.work_id, kind = kind.label(), "line failed");
                        }
                        let mut done = item;
                        done.result = Some(line);
                        let _ = tx.send(Handback::Result(done));
                    }
                    LineOutcome::Retry(why) => {
                        held.remove(&item.work_id);
                        summary.retries += 1;
                        progress.metrics.outcome("retry");
                        tracing::info!(work_id = item.work_id, %why, "task asked for a retry; releasing");
                        let _ = tx.send(Handback::Release(item.work_id, ReleaseReason::Retry));
                    }
                    LineOutcome::EngineUnavailable(why) => {
                        exit = Some(Exit::EngineFailed(why));
                    }
                }
            }
            r = async { fetch.as_mut().expect("guarded").await }, if fetch.is_some() => {
                fetch = None;
                match r {
                    Ok(resp) if resp.status == WorkStatus::ServerUnavailable => {
                        let limit = if ever_reached { config.vanish_wait } else { config.server_wait };
                        unreachable(&mut unreachable_since, &mut wait_until, &mut backoff, &mut exhausted, limit);
                    }
                    Ok(resp) => {
                        unreachable_since = None;
                        ever_reached = true;
                        backoff = Duration::from_millis(100);
                        match resp.status {
                            WorkStatus::Ok => {
                                if let Some(secs) = resp.lease_secs.filter(|s| s.is_finite() && *s > 0.0) {
                                    let was = lease.replace(Duration::from_secs_f64(secs));
                                    if was.is_none() {
                                        next_heartbeat = Instant::now() + heartbeat_every(secs);
                                    }
                                }
                                for item in resp.items {
                                    if held.contains_key(&item.work_id) {
                                        // A backup copy of an item this worker runs already.
                                        continue;
                                    }
                                    started += 1;
                                    let ctx = TaskContext::new(
                                        item.work_id,
                                        item.retry_count,
                                        item.max_retries,
                                        engine.clone(),
                                        Some(limiter.clone()),
                                        started,
                                    )
                                    .with_metrics(progress.metrics.clone());
                                    let run = task.run_line(item.content.clone(), ctx);
                                    let id = item.work_id;
                                    held.insert(id, tasks.spawn(async move { (item, run.await) }));
                                }
                                progress.active.store(tasks.len() as u64, Relaxed);
                            }
                            WorkStatus::Retry => {
                                let wait = Duration::from_secs(resp.retry_in.unwrap_or(1).max(1))
                                    .min(config.max_retry_wait);
                                wait_until = Some(Instant::now() + wait);
                            }
                            WorkStatus::AllWorkComplete => exhausted = true,
                            WorkStatus::ServerUnavailable => unreachable!("handled above"),
                        }
                    }
                    Err(e) if e.is_transient() => {
                        let limit = if ever_reached { config.vanish_wait } else { config.server_wait };
                        unreachable(&mut unreachable_since, &mut wait_until, &mut backoff, &mut exhausted, limit);
                    }
                    Err(e) => {
                        tracing::error!("work request failed: {e}");
                        wait_until = Some(Instant::now() + backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            }
            () = sleep_until(wait_until), if wait_until.is_some() && fetch.is_none() => {
                wait_until = None;
            }
            () = delivered.notified(), if wait_until.is_some() && fetch.is_none() => {
                wait_until = None;
            }
            () = tokio::time::sleep_until(next_heartbeat), if lease.is_some() && heartbeat.is_none() => {
                let ids: Vec<u64> = held.keys().copied().collect();
                if ids.is_empty() {
                    next_heartbeat = Instant::now() + heartbeat_every(lease.map_or(30.0, |l| l.as_secs_f64()));
                } else {
                    heartbeat = Some(source.heartbeat(ids));
                }
            }
            r = async { heartbeat.as_mut().expect("guarded").await }, if heartbeat.is_some() => {
                heartbeat = None;
                next_heartbeat = Instant::now() + heartbeat_every(lease.map_or(30.0, |l| l.as_secs_f64()));
                match r {
                    Ok(Some(done)) => {
                        for id in done {
                            if let Some(handle) = held.remove(&id) {
                                handle.abort();
                                summary.dropped += 1;
                                tracing::debug!(work_id = id, "finished elsewhere; dropped");
                            }
                        }
                    }
                    Ok(None) => lease = None,
                    Err(e) => tracing::warn!("heartbeat failed: {e}"),
                }
            }
        }
    }
    let exit = exit.expect("set before leaving the loop");
    drop(heartbeat);
    let mut pending_ids: Vec<u64> = Vec::new();
    // A work request already sent may have been answered with items: wait for
    // it briefly, so they are released now rather than after the work timeout.
    if let Some(pending) = fetch.take() {
        if let Ok(Ok(resp)) = tokio::time::timeout(FETCH_GRACE, pending).await {
            if resp.status == WorkStatus::Ok && exit != Exit::Complete {
                pending_ids.extend(resp.items.iter().map(|i| i.work_id));
            }
        }
    }
    if exit != Exit::Complete && exit != Exit::ServerGone {
        tasks.abort_all();
        // Lines that finished while we stopped still count.
        while let Some(joined) = tasks.join_next().await {
            if let Ok((mut item, LineOutcome::Line { line, kind })) = joined {
                held.remove(&item.work_id);
                *summary.outcomes.entry(kind.label()).or_default() += 1;
                item.result = Some(line);
                let _ = tx.send(Handback::Result(item));
            }
        }
        let ids: Vec<u64> = held.drain().map(|(id, _)| id).chain(pending_ids).collect();
        summary.released = ids.len() as u64;
        for id in ids {
            let _ = tx.send(Handback::Release(id, ReleaseReason::Preempted));
        }
    }
    drop(tx);
    if let Err(e) = submitter.await {
        tracing::error!("the result submitter failed: {e}");
    }
    if let Err(e) = source.finish().await {
        tracing::error!("{e}");
    }
    (exit, summary)
}

fn unreachable(
    since: &mut Option<Instant>,
    wait_until: &mut Option<Instant>,
    backoff: &mut Duration,
    exhausted: &mut bool,
    limit: Duration,
) {
    let now = Instant::now();
    let first = *since.get_or_insert(now);
    if now.duration_since(first) >= limit {
        tracing::warn!(
            secs = limit.as_secs(),
            "the dispatcher server is gone; finishing"
        );
        *exhausted = true;
        return;
    }
    tracing::debug!(
        backoff_ms = backoff.as_millis() as u64,
        "the dispatcher server is unreachable; retrying"
    );
    *wait_until = Some(now + *backoff);
    *backoff = (*backoff * 2).min(Duration::from_secs(10));
}

/// Heartbeats every third of the lease (at least every 100 ms, at most every
/// minute), so one lost heartbeat does not lose an item.
fn heartbeat_every(lease_secs: f64) -> Duration {
    Duration::from_secs_f64((lease_secs / 3.0).clamp(0.1, 60.0))
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Hands results and releases back, batching whatever piled up while the last
/// call was in flight. Retries unreachable servers for a while; what cannot be
/// delivered is reissued by the server after its work timeout.
async fn hand_back(
    source: Arc<dyn WorkSource>,
    mut rx: mpsc::UnboundedReceiver<Handback>,
    max: usize,
    delivered: Arc<Notify>,
) {
    let mut results = Vec::new();
    let mut preempted = Vec::new();
    let mut retried = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Handback::Result(item) => results.push(item),
                Handback::Release(id, ReleaseReason::Preempted) => preempted.push(id),
                Handback::Release(id, ReleaseReason::Retry) => retried.push(id),
            }
            if results.len() < max {
                next = rx.try_recv().ok();
            }
        }
        for (ids, reason) in [
            (std::mem::take(&mut retried), ReleaseReason::Retry),
            (std::mem::take(&mut preempted), ReleaseReason::Preempted),
        ] {
            if !ids.is_empty() {
                deliver("release", || source.release(ids.clone(), reason)).await;
            }
        }
        if !results.is_empty() {
            let items = std::mem::take(&mut results);
            deliver("results", || source.submit(items.clone())).await;
        }
        delivered.notify_one();
    }
}

async fn deliver<'a>(what: &str, call: impl Fn() -> BoxFuture<'a, Result<(), SourceError>>) {
    let mut backoff = Duration::from_millis(100);
    for attempt in 0..8 {
        match call().await {
            Ok(()) => return,
            Err(e) if e.is_transient() && attempt < 7 => {
                tracing::warn!("could not hand in {what} ({e}); retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                tracing::error!(
                    "could not hand in {what}: {e}; the server will reissue those items"
                );
                return;
            }
        }
    }
}
