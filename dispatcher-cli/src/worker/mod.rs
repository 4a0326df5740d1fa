//! The worker side of the command line: engine flags, source flags, task
//! manager flags, and running a task with them. Task binaries,
//! `dispatcher infer` and `dispatcher run-batch` share all of it.
//!
//! Here: the flags and [`run_task`]; [`engines`]: the engines given by URL
//! (hosted, named), their keys, limits and backends; `hello.rs`: who the
//! worker says it is.

pub mod engines;
mod hello;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use dispatcher_core::client::DispatcherClient;
use dispatcher_core::engine::cache::PrefixCacheMeter;
use dispatcher_core::engine::echo::script::EchoScript;
use dispatcher_core::engine::echo::EchoOptions;
use dispatcher_core::engine::spawn::{EngineKind, EngineLog, SpawnConfig};
use dispatcher_core::engine::RetryPolicy;
use dispatcher_core::task::manager::{self, Exit, ManagerConfig, Progress};
use dispatcher_core::task::source::{FileSource, ServerSource, WorkSource};
use dispatcher_core::task::DynTask;

use engines::{EngineSpec, EngineSpecs, EngineUrlArgs, Place};
pub(crate) use hello::hostname;
use hello::say_hello;

/// The engine to run (`--engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineChoice {
    /// vLLM (`vllm serve`): a GPU build, or vLLM's CPU backend.
    Vllm,
    /// SGLang (`python3 -m sglang.launch_server`); needs a GPU.
    Sglang,
    /// llama.cpp's `llama-server`; runs on CPU with a GGUF model.
    Llamacpp,
    /// The built-in echo engine: answers with the prompt. For dry runs and tests.
    Echo,
}

impl From<EngineChoice> for EngineKind {
    fn from(c: EngineChoice) -> EngineKind {
        match c {
            EngineChoice::Vllm => EngineKind::Vllm,
            EngineChoice::Sglang => EngineKind::Sglang,
            EngineChoice::Llamacpp => EngineKind::Llamacpp,
            EngineChoice::Echo => EngineKind::Echo,
        }
    }
}

/// Which inference engine to use and how to start it.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Engine")]
pub struct EngineArgs {
    /// The engine to launch (ignored with --no-launch).
    #[arg(long, value_enum, default_value = "vllm", env = "DISPATCHER_ENGINE")]
    pub engine: EngineChoice,
    /// Connect to an engine already running at --host/--port instead of launching one.
    #[arg(long)]
    pub no_launch: bool,
    /// Engine address (the launched engine binds it; with --no-launch, where it runs).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Engine port; 0 picks a free one (required with --no-launch).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Model path or name (vLLM/SGLang: HF id or directory; llama.cpp: a .gguf file).
    #[arg(long, env = "DISPATCHER_MODEL")]
    pub model: Option<String>,
    /// GPUs per engine (tensor parallelism).
    #[arg(long, visible_alias = "tensor-parallel-size", default_value_t = 1)]
    pub tensor_parallel: u32,
    /// The name the engine serves the model under, and the name requests use
    /// (default: --model as given).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Context length per request.
    #[arg(long)]
    pub max_model_len: Option<u32>,
    /// Share of GPU memory the engine may use (0-1).
    #[arg(long)]
    pub gpu_memory_utilization: Option<f64>,
    /// Disable CUDA graphs (faster start, slower decode).
    #[arg(long)]
    pub enforce_eager: bool,
    /// A chat template file for the engine.
    #[arg(long)]
    pub chat_template: Option<String>,
    /// A LoRA adapter to serve beside the model (repeatable): requests (or
    /// `infer --request-path` lines) name it as their `model`. vLLM and
    /// SGLang serve each under its NAME; llama.cpp applies every one to
    /// every request.
    #[arg(long, value_name = "NAME=PATH")]
    pub lora: Vec<String>,
    /// Extra engine arguments, shell-quoted: --vllm-extra-args "--seed 1 --dtype half".
    #[arg(long, visible_alias = "engine-extra-args", allow_hyphen_values = true)]
    pub vllm_extra_args: Option<String>,
    /// A prefix to run the engine inside, shell-quoted: --engine-cmd "apptainer exec --nv img.sif".
    #[arg(long, allow_hyphen_values = true)]
    pub engine_cmd: Option<String>,
    /// The engine executable, when not the default on PATH (vllm, python3, llama-server).
    #[arg(long)]
    pub engine_bin: Option<String>,
    /// llama.cpp: requests processed at once (slots).
    #[arg(long, default_value_t = 4)]
    pub parallel_slots: u32,
    /// llama.cpp: CPU threads.
    #[arg(long)]
    pub threads: Option<u32>,
    /// Seconds to wait for the engine's /health after launch.
    #[arg(long, default_value_t = 1800)]
    pub startup_timeout: u64,
    /// Where the engine's output goes: a file path, `-` for stderr, `none` to discard.
    #[arg(long, default_value = "none")]
    pub engine_log: String,
    /// Seconds one engine request may take before it counts as failed.
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout: f64,
    /// Retries of a request after a connection error or 5xx, with backoff.
    #[arg(long, default_value_t = 5)]
    pub engine_retries: u32,
    /// Echo engine: latency of each request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub echo_latency_ms: u64,
    /// Echo engine: requests processed at once (more wait).
    #[arg(long)]
    pub echo_max_concurrency: Option<usize>,
    /// Echo engine: share of requests answered with a 500 (0-1).
    #[arg(long, default_value_t = 0.0)]
    pub echo_error_rate: f64,
    /// Echo engine: answer every request with TEXT, a template ({prompt},
    /// {seed}, {index}, {variant}, {request}, {pick:a|b|c}; see the book, "Writing a task").
    #[arg(long, value_name = "TEXT", conflicts_with = "echo_script")]
    pub echo_reply: Option<String>,
    /// Echo engine: scripted replies, rules of `match: REGEX` (on the last
    /// message) and `reply: TEMPLATE`; unmatched requests are echoed.
    #[arg(long, value_name = "FILE")]
    pub echo_script: Option<PathBuf>,
    /// Engines given by URL: hosted, or several in one task.
    #[command(flatten)]
    pub urls: EngineUrlArgs,
}

impl EngineArgs {
    /// Validates the flags into a launch configuration.
    fn launch_config(&self) -> anyhow::Result<SpawnConfig> {
        let split = |flag: &str, v: &Option<String>| -> anyhow::Result<Vec<String>> {
            v.as_deref()
                .map(shell_words::split)
                .transpose()
                .with_context(|| format!("--{flag}: unbalanced quotes"))
                .map(Option::unwrap_or_default)
        };
        if !(0.0..=1.0).contains(&self.echo_error_rate) {
            bail!(
                "--echo-error-rate must be between 0 and 1, not {}",
                self.echo_error_rate
            );
        }
        if !(self.request_timeout.is_finite() && self.request_timeout > 0.0) {
            bail!("--request-timeout must be a positive number of seconds");
        }
        if self.no_launch && self.port == 0 {
            bail!("--no-launch needs the --port of the running engine");
        }
        let script = match (&self.echo_reply, &self.echo_script) {
            (Some(text), _) => Some(EchoScript::reply(text)?),
            (None, Some(path)) => Some(EchoScript::load(path)?),
            (None, None) => None,
        };
        if script.is_some() && self.engine != EngineChoice::Echo {
            bail!("--echo-reply and --echo-script script the echo engine: add --engine echo");
        }
        let log = match self.engine_log.as_str() {
            "none" => EngineLog::Silent,
            "-" => EngineLog::Inherit,
            path => EngineLog::File(PathBuf::from(path)),
        };
        Ok(SpawnConfig {
            kind: self.engine.into(),
            model: self.model.clone(),
            served_model_name: self.served_model_name.clone(),
            host: self.host.clone(),
            port: self.port,
            tensor_parallel: self.tensor_parallel.max(1),
            max_model_len: self.max_model_len,
            gpu_memory_utilization: self.gpu_memory_utilization,
            enforce_eager: self.enforce_eager,
            chat_template: self.chat_template.clone(),
            loras: self
                .lora
                .iter()
                .map(|l| match l.split_once('=') {
                    Some((name, path)) if !name.is_empty() && !path.is_empty() => {
                        Ok((name.to_string(), path.to_string()))
                    }
                    _ => bail!("--lora {l:?}: give NAME=PATH, the name requests use and the adapter's path"),
                })
                .collect::<anyhow::Result<_>>()?,
            extra_args: split("vllm-extra-args", &self.vllm_extra_args)?,
            engine_cmd: split("engine-cmd", &self.engine_cmd)?,
            engine_bin: self.engine_bin.clone(),
            parallel_slots: self.parallel_slots.max(1),
            threads: self.threads,
            startup_timeout: Duration::from_secs(self.startup_timeout),
            log,
            echo: EchoOptions {
                model: self.model.clone().unwrap_or_else(|| "echo".into()),
                latency: Duration::from_millis(self.echo_latency_ms),
                max_concurrency: self.echo_max_concurrency,
                error_rate: self.echo_error_rate,
                script: script.map(Arc::new),
            },
        })
    }

    /// Checks every engine flag into one spec per engine, before anything
    /// is launched.
    pub fn specs(&self) -> anyhow::Result<EngineSpecs> {
        let config = self.launch_config()?;
        let urls = self.urls.specs()?;
        // The name requests use: --served-model-name, else --model as given
        // (llama.cpp serves its model under an alias: asked at /models).
        let model = match (&self.served_model_name, &self.model) {
            (Some(name), _) => Some(name.clone()),
            (None, Some(m)) if self.no_launch || config.kind != EngineKind::Llamacpp => {
                Some(m.clone())
            }
            _ => None,
        };
        let default = match urls.default {
            Some(_) if self.no_launch => bail!(
                "--engine-url URL and --no-launch both say where the default engine is: give one"
            ),
            Some(spec) => EngineSpec { model, ..spec },
            None => EngineSpec {
                name: None,
                place: if self.no_launch {
                    Place::Running {
                        host: self.host.clone(),
                        port: self.port,
                    }
                } else {
                    Place::Launch(Box::new(config))
                },
                model,
                max_in_flight: None,
                // The launched engine gets no key; one given by URL does.
                api_key: None,
                rate: urls.default_rate,
            },
        };
        let specs = EngineSpecs {
            default,
            named: urls.named,
            request_timeout: Duration::from_secs_f64(self.request_timeout),
            retry: RetryPolicy {
                retries: self.engine_retries,
                ..RetryPolicy::default()
            },
            ca_cert: urls.ca_cert,
        };
        specs.check_backends()?;
        Ok(specs)
    }
}

/// Where items come from, and how many at once.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Work")]
pub struct WorkArgs {
    /// The dispatcher server to pull items from, HOST:PORT.
    #[arg(
        long,
        value_name = "HOST:PORT",
        env = "DISPATCHER_SERVER",
        conflicts_with = "input",
        value_parser = dispatcher_core::client::check_addr
    )]
    pub dispatcher: Option<String>,
    /// The dispatcher's access token, if it requires one.
    #[command(flatten)]
    pub access: crate::access::TokenArgs,
    /// Local mode: read this input (no server): a JSONL file, plain or
    /// `.gz`/`.zst`, a Parquet or Arrow file, or a folder or quoted glob of
    /// them (a Hugging Face snapshot, a `save_to_disk` folder); see the
    /// the book's "Datasets".
    #[arg(short = 'i', long, visible_alias = "input-file", value_name = "PATH")]
    pub input: Option<PathBuf>,
    /// Local mode: the split of a dataset input that has several (`train`).
    #[arg(long, value_name = "NAME", requires = "input")]
    pub split: Option<String>,
    /// Local mode: write this output JSONL, in input order; rerun to resume.
    #[arg(
        short = 'o',
        long,
        visible_alias = "output-file",
        value_name = "PATH",
        requires = "input"
    )]
    pub output: Option<PathBuf>,
    /// Local mode: attempts after the first before a retried line is given up.
    #[arg(long, default_value_t = 3)]
    pub max_retries: u32,
    /// Items asked for per work request.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Requests in flight to the default engine at most: size it to the
    /// engine's batch (vLLM batches up to its --max-num-seqs, 256 by
    /// default: give 256 to keep it full); named engines have
    /// --engine-max-in-flight. `--workers` is its older name, kept as an
    /// alias: it never meant worker processes.
    #[arg(long, visible_alias = "workers", default_value_t = 64)]
    pub max_in_flight: usize,
    /// Seconds to keep trying a dispatcher that has not answered yet (it may be starting).
    #[arg(long, default_value_t = 120)]
    pub server_wait: u64,
    /// Seconds to keep trying a dispatcher that answered before: past this it has
    /// finished (it exits shortly after all work is complete) and the worker exits 0.
    #[arg(long, default_value_t = 10)]
    pub vanish_wait: u64,
    /// Longest wait, in seconds, when the dispatcher answers `retry` (whatever its
    /// retry_in): idle workers notice the end of the job this soon.
    #[arg(long, default_value_t = 5)]
    pub max_retry_wait: u64,
    /// Exit once the dispatcher says no unissued line is left and this
    /// worker holds none, instead of waiting while others finish the last
    /// lines (`dispatcher launch` sets it, and starts a worker again if a
    /// line comes back). Servers without the hint never trigger it.
    #[arg(long, env = "DISPATCHER_EXIT_WHEN_DRAINED", value_parser = clap::builder::BoolishValueParser::new())]
    pub exit_when_drained: bool,
    /// Serve this worker's Prometheus metrics on this port (0 picks one; the log says which).
    #[arg(long)]
    pub metrics_port: Option<u16>,
    /// Seconds to wait for the engine to stop before killing it.
    #[arg(long, default_value_t = 10)]
    pub engine_stop_grace: u64,
    /// Neither replay the journal a reissued line comes with nor hand in
    /// journal entries (local mode: keep no `<output>.journal`).
    #[arg(long)]
    pub no_journal: bool,
    /// Local mode: run the job again from the start, moving its output and
    /// every file beside it aside first (renamed `<file>.<time>`, nothing is
    /// deleted).
    #[arg(long, requires = "input")]
    pub overwrite: bool,
    /// Local mode: sharded output.
    #[command(flatten)]
    pub outdir: crate::outdir::OutdirArgs,
    /// Local mode: prefix affinity (with --dispatcher, the server's flags).
    #[command(flatten)]
    pub group: crate::grouping::GroupArgs,
}

/// A local job's source, and the follower cutting its output shards.
type LocalSource = (Arc<dyn WorkSource>, Option<crate::outdir::Follower>);

impl WorkArgs {
    /// Where items come from; `None` for a local job whose output is
    /// already complete (nothing to do: no engine is started for it).
    async fn source(
        &self,
        prefix_cache: Arc<PrefixCacheMeter>,
        usage: Arc<dispatcher_core::engine::usage::UsageMeter>,
    ) -> anyhow::Result<Option<LocalSource>> {
        if self.dispatcher.is_some() && self.group.group_by.is_some() {
            bail!("--group-by needs local mode (-i/-o): with --dispatcher the server hands out the lines; give --group-by to `dispatcher serve`");
        }
        if self.dispatcher.is_some() && self.outdir.outdir.is_some() {
            bail!("--outdir needs local mode (-i/-o): with --dispatcher the output is the server's; give --outdir to `dispatcher serve`");
        }
        match (&self.dispatcher, &self.input, self.outdir.output(self.output.as_deref())) {
            (Some(addr), None, None) => Ok(Some((
                Arc::new(ServerSource::new(
                    DispatcherClient::with_token(addr, self.access.resolve()?.as_deref())
                        .with_prefix_cache(prefix_cache)
                        .with_usage(usage),
                )),
                None,
            ))),
            (None, Some(input), Some(output)) => {
                let output = &output;
                let made = self.outdir.create_job_dir(output)?;
                let files = dispatcher_core::job::JobFiles::new(output, None);
                if self.overwrite {
                    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                        .to_string()
                        .replace(['-', ':'], "");
                    for moved in files.move_aside(input, &stamp)? {
                        tracing::info!(
                            "--overwrite: moved {} aside to {}.{stamp}",
                            moved.display(),
                            moved.display()
                        );
                    }
                }
                let prepared =
                    dispatcher_core::dataset::prepare(input, self.split.as_deref(), &files)?;
                let source = FileSource::open_prepared(
                    &prepared,
                    output,
                    Some(self.max_retries),
                    !self.no_journal,
                    self.group
                        .grouping(dispatcher_core::ledger::DEFAULT_MAX_PENDING_BYTES)?,
                )?;
                let follower = self.outdir.plan(&files, &prepared)?;
                made.keep();
                if let Some(lines) = source.complete_lines() {
                    tracing::warn!(
                        "the output {} is already complete ({lines} lines, one for each line of {}): nothing to do, and no engine was started. To run the job again from the start, pass --overwrite (or move {} and {} away)",
                        output.display(),
                        input.display(),
                        output.display(),
                        files.checkpoint().display()
                    );
                    source.finish().await?;
                    if let Some(follower) = follower {
                        follower.finish().await?;
                    }
                    return Ok(None);
                }
                Ok(Some((Arc::new(source), follower)))
            }
            _ => bail!(
                "pass --dispatcher HOST:PORT, or --input PATH and --output PATH (or --outdir DIR) for local mode"
            ),
        }
    }

    fn manager_config(&self) -> anyhow::Result<ManagerConfig> {
        if self.batch_size == 0 || self.max_in_flight == 0 {
            bail!("--batch-size and --max-in-flight (--workers) must be at least 1");
        }
        Ok(ManagerConfig {
            batch_size: self.batch_size,
            server_wait: Duration::from_secs(self.server_wait),
            vanish_wait: Duration::from_secs(self.vanish_wait),
            max_retry_wait: Duration::from_secs(self.max_retry_wait.max(1)),
            journal: !self.no_journal,
            exit_when_drained: self.exit_when_drained,
            ..ManagerConfig::default()
        })
    }
}

/// Serves `GET /metrics` of this worker on `port`.
async fn serve_metrics(
    port: u16,
    progress: Arc<Progress>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
        .await
        .with_context(|| format!("--metrics-port {port}: could not listen"))?;
    tracing::info!(addr = %listener.local_addr()?, "worker metrics at /metrics");
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let progress = progress.clone();
            async move { progress.metrics.render() }
        }),
    );
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("the metrics endpoint failed: {e}");
        }
    }))
}

/// Runs `task` with these flags until the work is done or a signal stops it.
pub async fn run_task(
    task: &'static dyn DynTask,
    engine_args: &EngineArgs,
    work: &WorkArgs,
) -> anyhow::Result<()> {
    let config = work.manager_config()?;
    // Every engine flag is checked before the job's files are opened or an
    // engine is launched.
    let engine_specs = engine_args.specs()?;
    let prefix_cache = Arc::new(PrefixCacheMeter::default());
    let progress = Arc::new(Progress::default());
    // A local job's output, whose error records set the exit status once
    // the job is complete (`crate::exit`).
    let local_output = work
        .dispatcher
        .is_none()
        .then(|| work.outdir.output(work.output.as_deref()))
        .flatten();
    let Some((source, mut follower)) = work
        .source(prefix_cache.clone(), progress.metrics.usage())
        .await?
    else {
        // Complete already: the same status as when it completed.
        return local_output.map_or(Ok(()), |o| crate::exit::of_complete_output(&o));
    };
    if let Some(f) = &mut follower {
        f.start();
    }
    // Listening from before the engine starts: a job preempted while vLLM still
    // loads (a minute or more) stops at once, and the engine with it.
    let mut stop = std::pin::pin!(crate::termination_signal());
    let (mut engine, engines) = tokio::select! {
        started = engine_specs.start(work.max_in_flight, &progress.metrics) => started?,
        () = &mut stop => {
            tracing::info!("stopped before the engine was ready; no work was taken");
            return Ok(());
        }
    };
    say_hello(task, engine_args, &engine, &engines, &source).await;
    // The prefix cache counters of a vLLM this worker launched, for the
    // heartbeats. An engine given by URL is not asked: it may be a hosted
    // API, or an engine other workers share.
    let cache_watch = (engine.pid().is_some() && engine.kind() == EngineKind::Vllm).then(|| {
        let base = engine.base_url().trim_end_matches('/');
        dispatcher_core::engine::cache::watch(
            format!("{}/metrics", base.strip_suffix("/v1").unwrap_or(base)),
            prefix_cache,
            Duration::from_secs(10),
        )
    });
    let reporter = tokio::spawn(crate::progress::report(
        progress.clone(),
        source.clone(),
        engines.clone(),
    ));
    let metrics_server = match work.metrics_port {
        Some(port) => Some(serve_metrics(port, progress.clone()).await?),
        None => None,
    };
    let (exit, summary) = manager::run(
        task,
        source,
        engines.clone(),
        config,
        progress,
        stop,
        engine.exited(),
    )
    .await;
    reporter.abort();
    if let Some(w) = cache_watch {
        w.abort();
    }
    if let Some(m) = metrics_server {
        m.abort();
    }
    engine
        .stop(Duration::from_secs(work.engine_stop_grace))
        .await;
    if let Some(follower) = follower {
        follower.finish().await?;
    }
    tracing::info!(
        task = task.name(),
        lines = summary.lines(),
        outcomes = ?summary.outcomes,
        retries = summary.retries,
        released = summary.released,
        replayed = summary.replayed,
        tokens_saved = summary.tokens_saved,
        engine_requests = crate::progress::engine_load(&engines),
        "worker finished: {exit:?}"
    );
    match exit {
        Exit::Complete => local_output.map_or(Ok(()), |o| crate::exit::of_complete_output(&o)),
        Exit::ServerGone | Exit::Interrupted => Ok(()),
        Exit::SourceFailed(why) => bail!(
            "the job stopped: {why}. What was written is kept; fix what the message names and run the same command to resume"
        ),
        Exit::EngineFailed(why) => bail!(
            "the engine failed ({why}); {} in-flight items were handed back",
            summary.released
        ),
    }
}
