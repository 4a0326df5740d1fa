//! The task manager: pulls items, runs one task per item, keeps each engine
//! saturated with at most its `workers` requests in flight, hands results back
//! in batches, and on a signal or a dead engine releases what it holds.
//!
//! Everything here waits on events (a task finishing, a fetch answering, a
//! deadline); there is no polling loop.

use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio::time::Instant;

use super::handback::{first_failure, hand_back, Failure, Handback};
use super::journal::{JournalEvent, JournalSink, TaskJournal};
use super::reachability::Reachability;
use super::source::{Heartbeat, SourceError, WorkSource};
use super::{DynTask, Engines, LineOutcome, OutcomeKind, TaskContext};
use crate::engine::BoxFuture;
use crate::metrics::WorkerMetrics;
use crate::protocol::{ReleaseReason, WorkItem, WorkResponse, WorkStatus};

/// How the manager runs.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Items asked for per work request.
    pub batch_size: usize,
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
    /// Replay the journal an item comes with, and hand in entries for the
    /// requests tasks complete (`--no-journal` turns it off).
    pub journal: bool,
    /// Exit once the server says no unissued line remains (`drained` on a
    /// `retry` answer) and this worker holds nothing, instead of polling
    /// while other workers finish the last lines: `dispatcher launch`
    /// starts its workers so, and starts another if a line comes back.
    pub exit_when_drained: bool,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            batch_size: 16,
            server_wait: Duration::from_secs(120),
            vanish_wait: Duration::from_secs(10),
            max_submit_batch: 1024,
            max_retry_wait: Duration::from_secs(5),
            journal: true,
            exit_when_drained: false,
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
    /// The source failed and the job cannot go on (a local run's files:
    /// an input changed or gone, a full disk); the message says why.
    SourceFailed(String),
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
    /// Engine requests answered from journals instead of the engine.
    pub replayed: u64,
    /// Engine tokens those replayed requests had cost.
    pub tokens_saved: u64,
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
    /// Requests answered from journals.
    pub replayed: std::sync::atomic::AtomicU64,
    /// Engine tokens those had cost.
    pub tokens_saved: std::sync::atomic::AtomicU64,
}

/// How long a stopping worker waits for a work request already sent.
const FETCH_GRACE: Duration = Duration::from_secs(5);

/// Runs `task` over the items of `source`, sending to `engines`, until the
/// work is done, `shutdown` resolves, or `engine_died` does.
pub async fn run(
    task: &'static dyn DynTask,
    source: Arc<dyn WorkSource>,
    engines: Engines,
    config: ManagerConfig,
    progress: Arc<Progress>,
    shutdown: impl Future<Output = ()>,
    engine_died: impl Future<Output = String>,
) -> (Exit, Summary) {
    Manager::new(task, source, engines, config, progress)
        .run(shutdown, engine_died)
        .await
}

/// A call to the server that is under way.
type Call<T> = BoxFuture<'static, Result<T, SourceError>>;

/// What the manager waits for, one at a time.
enum Event {
    Shutdown,
    EngineDied(String),
    TaskDone(Result<(WorkItem, LineOutcome), tokio::task::JoinError>),
    Work(Result<WorkResponse, SourceError>),
    /// The wait before the next work request is over (or cut short).
    MayFetch,
    HeartbeatDue,
    Heartbeat(Result<Option<Heartbeat>, SourceError>),
    /// Handing something back failed for good (see [`SourceError::is_fatal`]).
    SourceFailed(String),
}

/// The task manager of one worker: its tasks, the items they hold, and its
/// conversation with the source.
struct Manager {
    task: &'static dyn DynTask,
    source: Arc<dyn WorkSource>,
    /// Each shares its request slots among tasks, oldest first.
    engines: Engines,
    config: ManagerConfig,
    progress: Arc<Progress>,
    /// Items asked for per work request.
    batch: usize,
    /// Tasks at most: enough to keep every request slot of the default
    /// engine busy while a batch is fetched.
    max_tasks: usize,
    tasks: JoinSet<(WorkItem, LineOutcome)>,
    /// Items this worker holds, with the handle that stops their task.
    held: HashMap<u64, AbortHandle>,
    /// Tasks started, the age order the limiter serves them in.
    started: u64,
    /// Results and releases on their way to the submitter.
    handback: mpsc::UnboundedSender<Handback>,
    /// Where tasks' journals report (to the submitter); `None` without journals.
    journal_sink: Option<JournalSink>,
    submitter: JoinHandle<()>,
    /// Why the job cannot go on: set once, by a work request or by the
    /// submitter (a hand-back), when the source fails for good.
    failure: Failure,
    failure_seen: tokio::sync::watch::Receiver<Option<String>>,
    /// Signalled after each delivery: our own results may have completed the
    /// job or made work issuable.
    delivered: Arc<Notify>,
    /// No work request before this (after a `retry` answer or a failure).
    fetch_after: Option<Instant>,
    /// The source has no more work for us (all done, or the server is gone).
    no_more_work: bool,
    server: Reachability,
    /// The server's lease, once it told one: heartbeats keep held items.
    lease: Option<Duration>,
    /// The last heartbeat's answer said the server renews every item this
    /// worker holds: heartbeats list none (an older server needs them all).
    renews_held: bool,
    next_heartbeat: Instant,
    summary: Summary,
}

impl Manager {
    fn new(
        task: &'static dyn DynTask,
        source: Arc<dyn WorkSource>,
        engines: Engines,
        config: ManagerConfig,
        progress: Arc<Progress>,
    ) -> Manager {
        let batch = config.batch_size.max(1);
        let (handback, rx) = mpsc::unbounded_channel();
        let delivered = Arc::new(Notify::new());
        let (failure, failure_seen) = tokio::sync::watch::channel(None);
        let submitter = tokio::spawn(hand_back(
            source.clone(),
            rx,
            config.max_submit_batch,
            delivered.clone(),
            failure.clone(),
        ));
        let journal_sink = config.journal.then(|| {
            let (tx, progress) = (handback.clone(), progress.clone());
            Arc::new(move |event: JournalEvent| {
                if let JournalEvent::Replayed { tokens } = &event {
                    progress.replayed.fetch_add(1, Relaxed);
                    progress.tokens_saved.fetch_add(*tokens, Relaxed);
                    progress.metrics.journal_replayed(*tokens);
                }
                let _ = tx.send(Handback::Journal(event));
            }) as JournalSink
        });
        Manager {
            journal_sink,
            task,
            batch,
            max_tasks: engines.default_limit().max(batch) + batch,
            source,
            engines,
            config,
            progress,
            tasks: JoinSet::new(),
            held: HashMap::new(),
            started: 0,
            handback,
            submitter,
            failure,
            failure_seen,
            delivered,
            fetch_after: None,
            no_more_work: false,
            server: Reachability::new(),
            lease: None,
            renews_held: false,
            next_heartbeat: Instant::now(),
            summary: Summary::default(),
        }
    }

    async fn run(
        mut self,
        shutdown: impl Future<Output = ()>,
        engine_died: impl Future<Output = String>,
    ) -> (Exit, Summary) {
        let mut shutdown = pin!(shutdown);
        let mut engine_died = pin!(engine_died);
        let mut fetch: Option<Call<WorkResponse>> = None;
        let mut heartbeat: Option<Call<Option<Heartbeat>>> = None;
        let exit = loop {
            if self.no_more_work && self.tasks.is_empty() {
                break if self.server.is_unreachable() {
                    Exit::ServerGone
                } else {
                    Exit::Complete
                };
            }
            if fetch.is_none() && self.wants_work() {
                let (source, batch) = (self.source.clone(), self.batch);
                fetch = Some(Box::pin(async move { source.get_work(batch).await }));
            }
            let waiting = self.fetch_after.is_some() && fetch.is_none();
            let event = tokio::select! {
                biased;
                () = &mut shutdown => Event::Shutdown,
                why = &mut engine_died => Event::EngineDied(why),
                // Before work and tasks: a failed source is asked nothing more.
                Ok(()) = self.failure_seen.changed() => Event::SourceFailed(
                    self.failure_seen.borrow().clone().unwrap_or_default()
                ),
                Some(joined) = self.tasks.join_next(), if !self.tasks.is_empty() => Event::TaskDone(joined),
                r = answer(&mut fetch), if fetch.is_some() => Event::Work(r),
                () = sleep_until(self.fetch_after), if waiting => Event::MayFetch,
                () = self.delivered.notified(), if waiting => Event::MayFetch,
                () = tokio::time::sleep_until(self.next_heartbeat), if self.lease.is_some() && heartbeat.is_none() => Event::HeartbeatDue,
                r = answer(&mut heartbeat), if heartbeat.is_some() => Event::Heartbeat(r),
            };
            match event {
                Event::Shutdown => break Exit::Interrupted,
                Event::EngineDied(why) => {
                    break Exit::EngineFailed(format!("the engine exited ({why})"))
                }
                Event::TaskDone(joined) => {
                    if let Some(exit) = self.on_task_done(joined) {
                        break exit;
                    }
                }
                Event::Work(r) => {
                    fetch = None;
                    self.on_work(r);
                }
                Event::MayFetch => self.fetch_after = None,
                Event::HeartbeatDue => heartbeat = self.heartbeat_due(),
                Event::Heartbeat(r) => {
                    heartbeat = None;
                    self.on_heartbeat(r);
                }
                Event::SourceFailed(why) => break Exit::SourceFailed(why),
            }
        };
        drop(heartbeat);
        self.stop(exit, fetch).await
    }

    /// Whether to ask for work now: there is room for a batch, and nothing
    /// said to wait.
    fn wants_work(&self) -> bool {
        !self.no_more_work
            && self.fetch_after.is_none()
            && self.tasks.len() + self.batch <= self.max_tasks
    }

    /// A task ended. Returns the exit when its outcome stops the worker.
    fn on_task_done(
        &mut self,
        joined: Result<(WorkItem, LineOutcome), tokio::task::JoinError>,
    ) -> Option<Exit> {
        // Aborted tasks (items finished elsewhere) were accounted for then.
        let Ok((item, outcome)) = joined else {
            return None;
        };
        self.progress.active.store(self.tasks.len() as u64, Relaxed);
        // A finished task may free what the source was waiting on.
        self.fetch_after = None;
        match outcome {
            LineOutcome::Line { line, kind } => self.record_line(item, line, kind),
            LineOutcome::Retry(why) => {
                self.held.remove(&item.work_id);
                self.summary.retries += 1;
                self.progress.metrics.outcome("retry");
                tracing::info!(work_id = item.work_id, %why, "task asked for a retry; releasing");
                self.hand_back(Handback::Release(item.work_id, ReleaseReason::Retry));
            }
            LineOutcome::EngineUnavailable(why) => return Some(Exit::EngineFailed(why)),
        }
        None
    }

    /// The one place a finished line is counted and handed back.
    fn record_line(&mut self, mut item: WorkItem, line: String, kind: OutcomeKind) {
        self.held.remove(&item.work_id);
        *self.summary.outcomes.entry(kind.label()).or_default() += 1;
        self.progress.lines.fetch_add(1, Relaxed);
        self.progress.metrics.outcome(kind.label());
        if kind != OutcomeKind::Ok {
            tracing::debug!(work_id = item.work_id, kind = kind.label(), "line failed");
        }
        item.result = Some(line);
        self.hand_back(Handback::Result(item));
    }

    fn hand_back(&self, what: Handback) {
        // The submitter lives until the sender is dropped in `stop`.
        let _ = self.handback.send(what);
    }

    /// The answer to a work request.
    fn on_work(&mut self, answer: Result<WorkResponse, SourceError>) {
        let now = Instant::now();
        let response = match answer {
            Ok(response) => response,
            Err(e) if e.is_transient() => {
                match self.server.unreachable(now, &self.config) {
                    Some(wait) => self.fetch_after = Some(now + wait),
                    None => self.no_more_work = true,
                }
                return;
            }
            Err(e) if e.is_fatal() => {
                first_failure(&self.failure, e.to_string());
                return;
            }
            Err(e) => {
                tracing::error!("work request failed: {e}");
                self.fetch_after = Some(now + self.server.next_backoff());
                return;
            }
        };
        self.server.answered();
        match response.status {
            WorkStatus::Ok => {
                if let Some(secs) = response.lease_secs.filter(|s| s.is_finite() && *s > 0.0) {
                    if self.lease.replace(Duration::from_secs_f64(secs)).is_none() {
                        self.next_heartbeat = now + heartbeat_every(secs);
                    }
                }
                for item in response.items {
                    self.start(item);
                }
                self.progress.active.store(self.tasks.len() as u64, Relaxed);
            }
            WorkStatus::Retry
                if response.drained && self.config.exit_when_drained && self.tasks.is_empty() =>
            {
                tracing::info!(
                    "no unissued line is left and this worker holds none: exiting while other workers finish theirs (--exit-when-drained)"
                );
                self.no_more_work = true;
            }
            WorkStatus::Retry => {
                let wait = Duration::from_secs(response.retry_in.unwrap_or(1).max(1))
                    .min(self.config.max_retry_wait);
                self.fetch_after = Some(now + wait);
            }
            WorkStatus::AllWorkComplete => self.no_more_work = true,
        }
    }

    /// Starts the task of one item.
    fn start(&mut self, mut item: WorkItem) {
        if self.held.contains_key(&item.work_id) {
            // A backup copy of an item this worker runs already.
            return;
        }
        self.started += 1;
        // Not handed back with the result.
        let recorded = item.journal.take().unwrap_or_default();
        let mut ctx = TaskContext::new(
            item.work_id,
            item.retry_count,
            item.max_retries,
            self.engines.clone(),
            self.started,
        );
        if let Some(sink) = &self.journal_sink {
            ctx = ctx.with_journal(Arc::new(TaskJournal::new(
                item.work_id,
                recorded,
                sink.clone(),
            )));
        }
        let run = self.task.run_line(item.content.clone(), ctx);
        let id = item.work_id;
        let handle = self.tasks.spawn(async move { (item, run.await) });
        self.held.insert(id, handle);
    }

    /// A heartbeat is due: the call that sends it, when anything is held.
    fn heartbeat_due(&mut self) -> Option<Call<Option<Heartbeat>>> {
        if self.held.is_empty() {
            self.schedule_heartbeat();
            return None;
        }
        // A source that renews what this worker holds needs no list: the
        // heartbeat stays a few bytes however many items are held.
        let ids: Vec<u64> = if self.renews_held {
            Vec::new()
        } else {
            self.held.keys().copied().collect()
        };
        let source = self.source.clone();
        Some(Box::pin(async move { source.heartbeat(ids).await }))
    }

    fn schedule_heartbeat(&mut self) {
        let lease_secs = self.lease.map_or(30.0, |l| l.as_secs_f64());
        self.next_heartbeat = Instant::now() + heartbeat_every(lease_secs);
    }

    /// The answer to a heartbeat: drops the items finished elsewhere.
    fn on_heartbeat(&mut self, answer: Result<Option<Heartbeat>, SourceError>) {
        self.schedule_heartbeat();
        match answer {
            Ok(Some(Heartbeat { done, renews_held })) => {
                self.renews_held = renews_held;
                for id in done {
                    if let Some(handle) = self.held.remove(&id) {
                        handle.abort();
                        self.summary.dropped += 1;
                        tracing::debug!(work_id = id, "finished elsewhere; dropped");
                    }
                }
            }
            // The source has no leases.
            Ok(None) => self.lease = None,
            Err(e) => tracing::warn!("heartbeat failed: {e}"),
        }
    }

    /// Stops: unless the work is done, stops the tasks, keeps the lines that
    /// finished meanwhile and releases everything else it holds (and what a
    /// work request still under way brings); then waits for every result and
    /// release to be handed in.
    async fn stop(mut self, exit: Exit, fetch: Option<Call<WorkResponse>>) -> (Exit, Summary) {
        let mut unstarted = Vec::new();
        // A work request already sent may have been answered with items: wait
        // for it briefly, so they are released now rather than after the work
        // timeout.
        if let Some(pending) = fetch {
            if let Ok(Ok(response)) = tokio::time::timeout(FETCH_GRACE, pending).await {
                if response.status == WorkStatus::Ok && exit != Exit::Complete {
                    unstarted.extend(response.items.iter().map(|i| i.work_id));
                }
            }
        }
        if !matches!(exit, Exit::Complete | Exit::ServerGone) {
            self.tasks.abort_all();
            while let Some(joined) = self.tasks.join_next().await {
                if let Ok((item, LineOutcome::Line { line, kind })) = joined {
                    self.record_line(item, line, kind);
                }
            }
            let ids: Vec<u64> = self
                .held
                .drain()
                .map(|(id, _)| id)
                .chain(unstarted)
                .collect();
            self.summary.released = ids.len() as u64;
            for id in ids {
                self.hand_back(Handback::Release(id, ReleaseReason::Preempted));
            }
        }
        self.progress.active.store(0, Relaxed);
        self.summary.replayed = self.progress.replayed.load(Relaxed);
        self.summary.tokens_saved = self.progress.tokens_saved.load(Relaxed);
        // Every sender goes, so the submitter ends once it has delivered all.
        drop(self.journal_sink);
        drop(self.handback);
        if let Err(e) = self.submitter.await {
            tracing::error!("the result submitter failed: {e}");
        }
        if let Err(e) = self.source.finish().await {
            tracing::error!("{e}");
        }
        (exit, self.summary)
    }
}

/// The answer of a call under way (the caller's guard checks there is one).
async fn answer<T>(call: &mut Option<Call<T>>) -> Result<T, SourceError> {
    match call.as_mut() {
        Some(call) => call.await,
        None => std::future::pending().await,
    }
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
