//! The task manager against the real server on loopback: saturation within the
//! request limit, release on shutdown and on a dead engine, CPU-heavy tasks,
//! and local file mode's resume.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dispatcher::client::DispatcherClient;
use dispatcher::engine::{BoxFuture, Engine, RequestError, Response};
use dispatcher::ledger::LedgerConfig;
use dispatcher::manager::{self, Exit, ManagerConfig, Progress};

use crate::support::{self, JobDir};
use dispatcher::server;
use dispatcher::source::{FileSource, ServerSource, WorkSource};
use dispatcher::testing::reply;
use dispatcher::{task, Engines, Request, TaskContext, TaskError};
use serde_json::json;

/// An engine that answers after `delay`, echoing the prompt, and records how
/// many requests it held at once.
#[derive(Debug, Default)]
struct SlowEngine {
    delay: Duration,
    now: AtomicUsize,
    max: AtomicUsize,
    total: AtomicUsize,
    dead: AtomicBool,
    /// A prompt this engine never answers (a straggler).
    hang_on: Option<&'static str>,
}

impl Engine for SlowEngine {
    fn send(&self, request: Request) -> BoxFuture<'_, Result<Response, RequestError>> {
        Box::pin(async move {
            if self.dead.load(Ordering::SeqCst) {
                return Err(RequestError::Unavailable("connection refused".into()));
            }
            let prompt = request.to_json()["prompt"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if self.hang_on == Some(prompt.as_str()) {
                return std::future::pending().await;
            }
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.max.fetch_max(n, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            self.total.fetch_add(1, Ordering::SeqCst);
            let prompt = request.to_json()["prompt"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            Ok(reply(prompt))
        })
    }
}

/// Runs [`two_steps`] over `source` with `engine` until the work is done or
/// `shutdown` resolves (the engine never dies here).
async fn run_two_steps(
    source: Arc<dyn WorkSource>,
    engine: Arc<SlowEngine>,
    config: Config,
    progress: Arc<Progress>,
    shutdown: impl std::future::Future<Output = ()>,
) -> (Exit, manager::Summary) {
    manager::run(
        &two_steps,
        source,
        engines(engine, config.workers, &progress),
        config.manager,
        progress,
        shutdown,
        std::future::pending(),
    )
    .await
}

/// [`run_two_steps`] as a worker of the server behind `client`, with its own
/// progress counters.
async fn run_worker(
    client: DispatcherClient,
    engine: Arc<SlowEngine>,
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> (Exit, manager::Summary) {
    run_two_steps(
        Arc::new(ServerSource::new(client)),
        engine,
        config,
        Arc::new(Progress::default()),
        shutdown,
    )
    .await
}

/// Resolves once the manager has finished `n` lines.
async fn lines_done(progress: Arc<Progress>, n: u64) {
    while progress.lines.load(Ordering::SeqCst) < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Two sequential requests per line; the output names its work id.
#[task]
async fn two_steps(
    input: serde_json::Value,
    ctx: TaskContext,
) -> Result<serde_json::Value, TaskError> {
    let n = input["n"].as_u64().unwrap_or_default();
    let first = yield_request!(Request::completion(format!("first {n}")))?;
    let second = yield_request!(Request::completion(format!("second {n}")))?;
    Ok(json!({"n": n, "work_id": ctx.work_id(), "texts": [first.text(), second.text()]}))
}

/// A job's directory (see [`JobDir`]), served in-process.
struct Job(JobDir);

impl std::ops::Deref for Job {
    type Target = JobDir;
    fn deref(&self) -> &JobDir {
        &self.0
    }
}

impl Job {
    fn new(lines: usize) -> Job {
        Job(JobDir::new(lines))
    }

    async fn serve(
        &self,
    ) -> (
        DispatcherClient,
        tokio::task::JoinHandle<Result<server::StopReason, server::ServerError>>,
    ) {
        self.serve_with(|_| {}).await
    }

    async fn serve_with(
        &self,
        adjust: impl FnOnce(&mut LedgerConfig),
    ) -> (
        DispatcherClient,
        tokio::task::JoinHandle<Result<server::StopReason, server::ServerError>>,
    ) {
        // Longer than the 1 s retry_in, so workers see all_work_complete.
        let (addr, handle) =
            support::serve(self.dir.path(), Duration::from_millis(1500), adjust).await;
        (DispatcherClient::new(&addr), handle)
    }

    fn check_output(&self) {
        let lines = self.output_values();
        assert_eq!(lines.len(), self.input.len());
        for (i, v) in lines.iter().enumerate() {
            assert_eq!(
                v,
                &json!({"n": i, "work_id": i, "texts": [format!("first {i}"), format!("second {i}")]}),
                "line {i}"
            );
        }
    }
}

/// A worker's settings: `workers` requests in flight at most, `batch` items per work request.
#[derive(Clone)]
struct Config {
    workers: usize,
    manager: ManagerConfig,
}

fn config(workers: usize, batch: usize) -> Config {
    Config {
        workers,
        manager: ManagerConfig {
            batch_size: batch,
            server_wait: Duration::from_secs(5),
            ..ManagerConfig::default()
        },
    }
}

/// `engine` as a worker's only engine, with `workers` request slots.
fn engines(engine: Arc<dyn Engine>, workers: usize, progress: &Progress) -> Engines {
    Engines::new(engine, workers, &progress.metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_is_kept_at_exactly_the_request_limit() {
    let job = Job::new(200);
    let (client, served) = job.serve().await;
    let engine = Arc::new(SlowEngine {
        delay: Duration::from_millis(20),
        ..SlowEngine::default()
    });
    let (exit, summary) =
        run_worker(client, engine.clone(), config(8, 3), std::future::pending()).await;
    assert_eq!(exit, Exit::Complete);
    assert_eq!(summary.outcomes.get("ok"), Some(&200));
    assert_eq!(engine.total.load(Ordering::SeqCst), 400);
    assert_eq!(
        engine.max.load(Ordering::SeqCst),
        8,
        "saturated, never above --workers"
    );
    served.await.unwrap().unwrap();
    job.check_output();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_in_flight_items_and_another_worker_finishes_the_job() {
    let job = Job::new(60);
    let (client, served) = job.serve().await;
    let engine = Arc::new(SlowEngine {
        delay: Duration::from_millis(100),
        ..SlowEngine::default()
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let first = tokio::spawn({
        let (client, engine) = (client.clone(), engine.clone());
        async move {
            run_worker(client, engine, config(4, 4), async {
                let _ = stop_rx.await;
            })
            .await
        }
    });
    // Stop it once it holds items and some lines are done.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = client.status().await.unwrap();
        if status.in_flight > 0 && status.lines_done > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker made no progress: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_tx.send(()).unwrap();
    let (exit, summary) = first.await.unwrap();
    assert_eq!(exit, Exit::Interrupted);
    assert!(summary.released > 0, "{summary:?}");
    let status = client.status().await.unwrap();
    assert_eq!(
        status.reissues.release, summary.released,
        "the server saw every release"
    );
    assert_eq!(status.in_flight, 0);
    assert!(status.lines_done < 60);

    let (exit, _) = run_worker(
        client,
        Arc::new(SlowEngine {
            delay: Duration::from_millis(1),
            ..SlowEngine::default()
        }),
        config(16, 8),
        std::future::pending(),
    )
    .await;
    assert_eq!(exit, Exit::Complete);
    served.await.unwrap().unwrap();
    job.check_output();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_engine_releases_everything_and_reports_failure() {
    let job = Job::new(30);
    let (client, _served) = job.serve().await;
    let engine = Arc::new(SlowEngine {
        delay: Duration::from_millis(5),
        ..SlowEngine::default()
    });
    engine.dead.store(true, Ordering::SeqCst);
    let (exit, summary) =
        run_worker(client.clone(), engine, config(4, 4), std::future::pending()).await;
    assert!(
        matches!(exit, Exit::EngineFailed(ref why) if why.contains("connection refused")),
        "{exit:?}"
    );
    let status = client.status().await.unwrap();
    assert_eq!(status.in_flight, 0, "nothing left stranded");
    assert_eq!(status.lines_done, 0);
    assert_eq!(status.reissues.release, summary.released);
}

static LIGHT_DONE: AtomicBool = AtomicBool::new(false);

/// "heavy" spins on the CPU until a "light" task has finished.
#[task]
async fn cpu_bound(input: String) -> Result<String, TaskError> {
    if input == "heavy" {
        let start = std::time::Instant::now();
        while !LIGHT_DONE.load(Ordering::SeqCst) {
            if start.elapsed() > Duration::from_secs(20) {
                return Err(TaskError::failed("starved", "the light task never ran"));
            }
            std::hint::spin_loop();
        }
        return Ok("heavy done".into());
    }
    let r = yield_request!(Request::completion("light"))?;
    LIGHT_DONE.store(true, Ordering::SeqCst);
    Ok(r.text().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_heavy_task_does_not_stall_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    std::fs::write(&input, "\"heavy\"\n\"light\"\n").unwrap();
    let source = Arc::new(FileSource::open(&input, &output, Some(3)).unwrap());
    let engine = Arc::new(SlowEngine {
        delay: Duration::from_millis(50),
        ..SlowEngine::default()
    });
    let progress = Arc::new(Progress::default());
    let config = config(4, 1);
    let (exit, _) = manager::run(
        &cpu_bound,
        source,
        engines(engine, config.workers, &progress),
        config.manager,
        progress,
        std::future::pending(),
        std::future::pending(),
    )
    .await;
    assert_eq!(exit, Exit::Complete);
    assert_eq!(
        std::fs::read_to_string(&output).unwrap(),
        "\"heavy done\"\n\"light\"\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_file_mode_writes_in_order_and_resumes_after_an_interruption() {
    let job = Job::new(40);
    let open = || -> Arc<dyn WorkSource> {
        Arc::new(FileSource::open(&job.path("in.jsonl"), &job.path("out.jsonl"), Some(3)).unwrap())
    };
    let engine = Arc::new(SlowEngine {
        delay: Duration::from_millis(30),
        ..SlowEngine::default()
    });
    // Interrupted once a few lines are done, however slow the machine is.
    let progress = Arc::new(Progress::default());
    let (exit, first) = run_two_steps(
        open(),
        engine.clone(),
        config(4, 2),
        progress.clone(),
        lines_done(progress.clone(), 5),
    )
    .await;
    assert_eq!(exit, Exit::Interrupted);
    let written = job.output_lines().len();
    assert!(
        written > 0 && written < 40,
        "{written} lines after the first run"
    );
    let (exit, second) = run_two_steps(
        open(),
        engine,
        config(4, 2),
        Arc::new(Progress::default()),
        std::future::pending(),
    )
    .await;
    assert_eq!(exit, Exit::Complete);
    assert!(
        second.lines() <= 40 - written as u64,
        "written lines are not redone: {first:?} {second:?}"
    );
    job.check_output();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_metrics_count_requests_tokens_and_outcomes() {
    let job = Job::new(20);
    let (client, served) = job.serve().await;
    let progress = Arc::new(Progress::default());
    let engine = Arc::new(SlowEngine {
        delay: Duration::from_millis(2),
        ..SlowEngine::default()
    });
    let (exit, _) = run_two_steps(
        Arc::new(ServerSource::new(client)),
        engine,
        config(4, 4),
        progress.clone(),
        std::future::pending(),
    )
    .await;
    assert_eq!(exit, Exit::Complete);
    served.await.unwrap().unwrap();
    let text = progress.metrics.render();
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    assert_eq!(
        value("dispatcher_worker_task_outcomes_total{kind=\"ok\"}"),
        20.0
    );
    assert_eq!(
        value("dispatcher_worker_engine_request_duration_seconds_count{engine=\"default\"}"),
        40.0
    );
    assert_eq!(
        value("dispatcher_worker_engine_requests_in_flight{engine=\"default\"}"),
        0.0
    );
    assert_eq!(
        value("dispatcher_worker_engine_errors_total{engine=\"default\"}"),
        0.0
    );
    // As vLLM names them: answers by finish reason, per engine and model.
    assert_eq!(
        value(
            "dispatcher_worker_request_success_total{engine=\"default\",model_name=\"scripted\",finished_reason=\"stop\"}"
        ),
        40.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_long_requests_alive_under_a_short_lease() {
    let job = Job::new(8);
    let (client, served) = job
        .serve_with(|c| c.work_timeout = Duration::from_millis(1000))
        .await;
    // A worker written for the Python server takes a line and goes silent.
    let silent = client.get_work(1).await.unwrap();
    assert_eq!(silent.items[0].work_id, 0);
    assert_eq!(silent.lease_secs, Some(1.0));
    // Ours needs 1.5 s per request, longer than the lease: its heartbeats keep it.
    let (exit, summary) = run_worker(
        client.clone(),
        Arc::new(SlowEngine {
            delay: Duration::from_millis(1500),
            ..SlowEngine::default()
        }),
        config(16, 16),
        std::future::pending(),
    )
    .await;
    assert_eq!(exit, Exit::Complete);
    assert_eq!(summary.outcomes.get("ok"), Some(&8));
    let status = client.status().await;
    served.await.unwrap().unwrap();
    // Only the silent worker's line expired (and came to ours).
    if let Ok(s) = status {
        assert_eq!(s.reissues.timeout, 1, "{s:?}");
    }
    job.check_output();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_backs_up_a_straggler_and_its_holder_drops_it() {
    let job = Job::new(6);
    let (client, served) = job
        .serve_with(|c| {
            c.work_timeout = Duration::from_secs(3);
            c.max_backups = 1;
            c.backup_after = Duration::from_millis(200);
        })
        .await;
    // Worker A's engine never answers line 0's first request.
    let a = tokio::spawn({
        let client = client.clone();
        async move {
            run_worker(
                client,
                Arc::new(SlowEngine {
                    delay: Duration::from_millis(5),
                    hang_on: Some("first 0"),
                    ..SlowEngine::default()
                }),
                config(8, 8),
                std::future::pending(),
            )
            .await
        }
    });
    // Wait until A has done everything but line 0.
    let start = std::time::Instant::now();
    loop {
        let s = client.status().await.unwrap();
        if s.reorder_buffer == 5 {
            assert_eq!(s.blocking.as_ref().map(|b| b.work_id), Some(0));
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Worker B (another process: another client) is idle: it gets a backup
    // copy of line 0 and finishes it.
    let (exit, b) = run_worker(
        DispatcherClient::new(client.base_url()),
        Arc::new(SlowEngine {
            delay: Duration::from_millis(5),
            ..SlowEngine::default()
        }),
        config(8, 8),
        std::future::pending(),
    )
    .await;
    assert_eq!(exit, Exit::Complete);
    assert_eq!(b.outcomes.get("ok"), Some(&1));
    // A learns from its next heartbeat that line 0 is done, drops it and ends.
    let (exit, a) = tokio::time::timeout(Duration::from_secs(20), a)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit, Exit::Complete);
    assert_eq!((a.dropped, a.released), (1, 0));
    served.await.unwrap().unwrap();
    job.check_output();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_preemption_never_tombstones_good_items() {
    let job = Job::new(200);
    // Not a single failure allowed per item: any release counted as one would tombstone.
    let (client, served) = job.serve_with(|c| c.max_retries = Some(0)).await;
    let mut released = 0;
    for round in 0..12u64 {
        let (exit, summary) = run_worker(
            DispatcherClient::new(client.base_url()),
            Arc::new(SlowEngine {
                delay: Duration::from_millis(100),
                ..SlowEngine::default()
            }),
            config(8, 8),
            tokio::time::sleep(Duration::from_millis(60 + 20 * round)),
        )
        .await;
        assert_eq!(exit, Exit::Interrupted, "round {round}");
        released += summary.released;
    }
    let status = client.status().await.unwrap();
    assert!(
        released >= 12,
        "preempted while holding items: {released} releases"
    );
    assert_eq!(status.reissues.release, released, "{status:?}");
    assert_eq!(status.tombstones, 0);
    let (exit, _) = run_worker(
        DispatcherClient::new(client.base_url()),
        Arc::new(SlowEngine::default()),
        config(16, 16),
        std::future::pending(),
    )
    .await;
    assert_eq!(exit, Exit::Complete);
    served.await.unwrap().unwrap();
    job.check_output();
}
