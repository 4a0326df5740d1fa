//! Engine saturation: the task manager with one 100 ms request per task and W
//! requests allowed in flight should complete W / 0.1 s requests per second.
//! Items come from an endless in-memory source, so only the manager (and, with
//! `--http`, the HTTP path to the echo engine) is measured.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dispatcher_core::engine::echo::EchoOptions;
use dispatcher_core::engine::spawn::{self, EngineKind, SpawnConfig};
use dispatcher_core::engine::{
    BoxFuture, Choice, Engine, OpenAiEngine, Request, RequestError, Response, RetryPolicy,
};
use dispatcher_core::protocol::{ReleaseReason, WorkItem, WorkResponse, WorkStatus};
use dispatcher_core::task::manager::{self, ManagerConfig, Progress};
use dispatcher_core::task::source::{SourceError, WorkSource};
use dispatcher_core::task::Engines;
use dispatcher_core::task::{Task, TaskContext, TaskError};

#[derive(Debug, clap::Args)]
pub struct SaturationArgs {
    /// Requests in flight to try, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "16,64,256,1024,4096")]
    workers: Vec<usize>,
    /// Engine latency per request, ms.
    #[arg(long, default_value_t = 100)]
    latency_ms: u64,
    /// Seconds measured per W, after one second of warm-up.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Go through the echo engine over HTTP (OpenAI backend) instead of an
    /// in-process engine with the same latency.
    #[arg(long)]
    http: bool,
}

/// Hands out items forever; counts what comes back.
#[derive(Debug, Default)]
struct Endless {
    next: AtomicU64,
    done: AtomicU64,
}

impl WorkSource for Endless {
    fn get_work(&self, batch: usize) -> BoxFuture<'_, Result<WorkResponse, SourceError>> {
        let first = self.next.fetch_add(batch as u64, Ordering::Relaxed);
        let items = (first..first + batch as u64)
            .map(|i| WorkItem {
                work_id: i,
                content: format!("{{\"prompt\": \"Summarize document {i}.\"}}"),
                result: None,
                retry_count: 0,
                max_retries: Some(3),
                journal: None,
            })
            .collect();
        Box::pin(std::future::ready(Ok(WorkResponse {
            status: WorkStatus::Ok,
            retry_in: None,
            items,
            lease_secs: None,
            drained: false,
        })))
    }

    fn submit(&self, items: Vec<WorkItem>) -> BoxFuture<'_, Result<(), SourceError>> {
        self.done.fetch_add(items.len() as u64, Ordering::Relaxed);
        Box::pin(std::future::ready(Ok(())))
    }

    fn release(
        &self,
        _ids: Vec<u64>,
        _reason: ReleaseReason,
    ) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// Answers after a fixed latency, like the echo engine, without HTTP.
#[derive(Debug)]
struct Sleepy(Duration);

impl Engine for Sleepy {
    fn send(&self, request: Request) -> BoxFuture<'_, Result<Response, RequestError>> {
        Box::pin(async move {
            tokio::time::sleep(self.0).await;
            let text = request.to_json()["prompt"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            Ok(Response {
                model: "sleepy".into(),
                choices: vec![Choice {
                    index: 0,
                    text,
                    finish_reason: Some("stop".into()),
                    ..Default::default()
                }],
                usage: None,
                ..Default::default()
            })
        })
    }
}

#[derive(Debug, serde::Deserialize)]
struct In {
    prompt: String,
}

/// One request per line.
#[derive(Debug)]
struct OneRequest;

impl Task for OneRequest {
    type Input = In;
    type Output = String;
    const NAME: &'static str = "one_request";
    // Not `async fn`: the future must not borrow `self` (`Task::run` returns 'static).
    #[allow(clippy::manual_async_fn)]
    fn run(
        &self,
        input: In,
        ctx: TaskContext,
    ) -> impl std::future::Future<Output = Result<String, TaskError>> + Send + 'static {
        async move {
            Ok(ctx
                .send(Request::completion(input.prompt).max_tokens(16))
                .await?
                .text()
                .to_string())
        }
    }
}

fn cpu_secs() -> f64 {
    // SAFETY: getrusage writes into the struct we pass and nothing else.
    #[allow(unsafe_code)]
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

fn rss_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

pub async fn run(args: SaturationArgs) -> anyhow::Result<()> {
    let latency = Duration::from_millis(args.latency_ms);
    let (engine, _running): (Arc<dyn Engine>, Option<spawn::RunningEngine>) = if args.http {
        let config = SpawnConfig {
            kind: EngineKind::Echo,
            echo: EchoOptions {
                latency,
                ..EchoOptions::default()
            },
            ..SpawnConfig::default()
        };
        let running = spawn::spawn(&config).await?;
        let backend = OpenAiEngine::new(
            running.base_url(),
            Duration::from_secs(60),
            RetryPolicy::default(),
        );
        (Arc::new(backend), Some(running))
    } else {
        (Arc::new(Sleepy(latency)), None)
    };
    for &w in &args.workers {
        let source = Arc::new(Endless::default());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let config = ManagerConfig {
            batch_size: (w / 4).clamp(16, 512),
            ..ManagerConfig::default()
        };
        let progress = Arc::new(Progress::default());
        let engines = Engines::new(engine.clone(), w, &progress.metrics);
        let rss_before = rss_kb("VmRSS");
        let run = tokio::spawn(manager::run(
            &OneRequest,
            source.clone(),
            engines,
            config,
            progress,
            async {
                let _ = stop_rx.await;
            },
            std::future::pending(),
        ));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (d0, c0, t0) = (
            source.done.load(Ordering::Relaxed),
            cpu_secs(),
            Instant::now(),
        );
        let mut peak_rss = 0;
        let end = t0 + Duration::from_secs_f64(args.secs);
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(100)).await;
            peak_rss = peak_rss.max(rss_kb("VmRSS"));
        }
        let (d1, c1, t1) = (
            source.done.load(Ordering::Relaxed),
            cpu_secs(),
            Instant::now(),
        );
        let _ = stop_tx.send(());
        run.await?;
        let rate = (d1 - d0) as f64 / (t1 - t0).as_secs_f64();
        let ideal = w as f64 / latency.as_secs_f64();
        println!(
            "{} W={w} requests_per_sec={rate:.0} ideal={ideal:.0} ratio={:.3} cpu_us_per_request={:.1} rss_kb_per_inflight={:.2}",
            if args.http { "http-echo" } else { "in-process" },
            rate / ideal,
            (c1 - c0) / (d1 - d0).max(1) as f64 * 1e6,
            peak_rss.saturating_sub(rss_before) as f64 / w as f64,
        );
    }
    Ok(())
}
