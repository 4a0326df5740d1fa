//! Starting, watching and stopping the local inference engine.
//!
//! Each engine kind knows its launch command, its health endpoint and how to
//! stop it. The engine runs in its own process group so that stopping it also
//! stops the workers it forked (vLLM's tensor-parallel ranks).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::echo::{self, EchoOptions};
use super::log_tail::{keep_tail, LogTail, LAST_WORDS};

/// Which inference engine a worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineKind {
    /// vLLM's OpenAI-compatible server (`vllm serve`).
    #[default]
    Vllm,
    /// SGLang (`python3 -m sglang.launch_server`).
    Sglang,
    /// llama.cpp's `llama-server`.
    Llamacpp,
    /// The built-in echo engine, in the worker's own process.
    Echo,
}

impl EngineKind {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Vllm => "vllm",
            EngineKind::Sglang => "sglang",
            EngineKind::Llamacpp => "llamacpp",
            EngineKind::Echo => "echo",
        }
    }
}

/// Where the engine's own output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineLog {
    /// Appended to this file.
    File(PathBuf),
    /// Discarded.
    Silent,
    /// Mixed into the worker's stderr.
    Inherit,
}

/// How to launch an engine.
#[derive(Debug, Clone)]
pub struct SpawnConfig {
    /// Which engine.
    pub kind: EngineKind,
    /// Model path or name (required for all but echo).
    pub model: Option<String>,
    /// The name to serve the model under (vLLM and SGLang
    /// `--served-model-name`, llama.cpp `--alias`).
    pub served_model_name: Option<String>,
    /// Address the engine binds; workers talk to it on loopback.
    pub host: String,
    /// Port the engine binds; 0 picks a free one.
    pub port: u16,
    /// GPUs per engine (tensor parallelism).
    pub tensor_parallel: u32,
    /// Context length per request.
    pub max_model_len: Option<u32>,
    /// Share of GPU memory the engine may take.
    pub gpu_memory_utilization: Option<f64>,
    /// Disable CUDA graphs (vLLM `--enforce-eager`, SGLang `--disable-cuda-graph`).
    pub enforce_eager: bool,
    /// A chat template file.
    pub chat_template: Option<String>,
    /// LoRA adapters to serve beside the model, as (name, path): requests
    /// name one as their `model` (vLLM `--lora-modules`, SGLang
    /// `--lora-paths`); llama.cpp loads each (`--lora`) and applies them to
    /// every request.
    pub loras: Vec<(String, String)>,
    /// Extra arguments for the engine, already split.
    pub extra_args: Vec<String>,
    /// A command prefix (a container, an environment), already split.
    pub engine_cmd: Vec<String>,
    /// The engine executable, when not the default one on PATH.
    pub engine_bin: Option<String>,
    /// llama.cpp: parallel slots (requests processed at once).
    pub parallel_slots: u32,
    /// llama.cpp: CPU threads.
    pub threads: Option<u32>,
    /// How long to wait for `/health`.
    pub startup_timeout: Duration,
    /// Where the engine's output goes.
    pub log: EngineLog,
    /// The echo engine's behaviour.
    pub echo: EchoOptions,
}

impl Default for SpawnConfig {
    fn default() -> Self {
        SpawnConfig {
            kind: EngineKind::Vllm,
            model: None,
            served_model_name: None,
            host: "127.0.0.1".into(),
            port: 0,
            tensor_parallel: 1,
            max_model_len: None,
            gpu_memory_utilization: None,
            enforce_eager: false,
            chat_template: None,
            loras: Vec::new(),
            extra_args: Vec::new(),
            engine_cmd: Vec::new(),
            engine_bin: None,
            parallel_slots: 4,
            threads: None,
            startup_timeout: Duration::from_secs(1800),
            log: EngineLog::Silent,
            echo: EchoOptions::default(),
        }
    }
}

/// Why an engine could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpawnError {
    /// A required option is missing.
    #[error("{0}")]
    Config(String),
    /// The engine process could not be spawned.
    #[error("could not start the {kind} engine `{program}`: {source}; is it installed and on PATH (or pass --engine-bin)?")]
    Spawn {
        /// Which engine (`vllm`, `sglang`, `llama.cpp`).
        kind: &'static str,
        /// The program that was to be run.
        program: String,
        /// Why spawning it failed.
        source: std::io::Error,
    },
    /// The engine exited before it became healthy.
    #[error("the {kind} engine exited with {status} before it became healthy (is --model a model it can load?); {log_hint}")]
    Exited {
        /// Which engine (`vllm`, `sglang`, `llama.cpp`).
        kind: &'static str,
        /// Its exit status.
        status: String,
        /// Its last lines, or where to look.
        log_hint: String,
    },
    /// `/health` did not answer 200 within the startup timeout.
    #[error("the {kind} engine at {url} was not healthy within {secs} s (--startup-timeout); {log_hint}")]
    Timeout {
        /// Which engine (`vllm`, `sglang`, `llama.cpp`).
        kind: &'static str,
        /// Its health URL.
        url: String,
        /// The timeout.
        secs: u64,
        /// Its last lines, or where to look.
        log_hint: String,
    },
    /// A socket or log file problem.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl SpawnConfig {
    /// The full command line that launches the engine on `port` (not for echo).
    pub fn command_line(&self, port: u16) -> Result<Vec<String>, SpawnError> {
        let model = || {
            self.model.clone().ok_or_else(|| {
                SpawnError::Config(format!(
                    "--model is required to launch {} (or pass --no-launch with --host/--port of a running engine)",
                    self.kind.name()
                ))
            })
        };
        let bin = |default: &str| {
            self.engine_bin
                .clone()
                .unwrap_or_else(|| default.to_string())
        };
        let mut cmd: Vec<String> = self.engine_cmd.clone();
        let host = self.host.clone();
        match self.kind {
            EngineKind::Vllm => {
                cmd.extend([bin("vllm"), "serve".into(), model()?]);
                cmd.extend(["--host".into(), host, "--port".into(), port.to_string()]);
                cmd.extend([
                    "--tensor-parallel-size".into(),
                    self.tensor_parallel.to_string(),
                ]);
                if let Some(l) = self.max_model_len {
                    cmd.extend(["--max-model-len".into(), l.to_string()]);
                }
                if let Some(g) = self.gpu_memory_utilization {
                    cmd.extend(["--gpu-memory-utilization".into(), g.to_string()]);
                }
                if self.enforce_eager {
                    cmd.push("--enforce-eager".into());
                }
                if let Some(t) = &self.chat_template {
                    cmd.extend(["--chat-template".into(), t.clone()]);
                }
                if let Some(name) = &self.served_model_name {
                    cmd.extend(["--served-model-name".into(), name.clone()]);
                }
                if !self.loras.is_empty() {
                    cmd.extend(["--enable-lora".into(), "--lora-modules".into()]);
                    cmd.extend(self.loras.iter().map(|(n, p)| format!("{n}={p}")));
                }
            }
            EngineKind::Sglang => {
                let python = bin("python3");
                cmd.extend([python, "-m".into(), "sglang.launch_server".into()]);
                cmd.extend(["--model-path".into(), model()?]);
                cmd.extend(["--host".into(), host, "--port".into(), port.to_string()]);
                cmd.extend(["--tp-size".into(), self.tensor_parallel.to_string()]);
                if let Some(l) = self.max_model_len {
                    cmd.extend(["--context-length".into(), l.to_string()]);
                }
                if let Some(g) = self.gpu_memory_utilization {
                    cmd.extend(["--mem-fraction-static".into(), g.to_string()]);
                }
                if self.enforce_eager {
                    cmd.push("--disable-cuda-graph".into());
                }
                if let Some(t) = &self.chat_template {
                    cmd.extend(["--chat-template".into(), t.clone()]);
                }
                if let Some(name) = &self.served_model_name {
                    cmd.extend(["--served-model-name".into(), name.clone()]);
                }
                if !self.loras.is_empty() {
                    cmd.push("--lora-paths".into());
                    cmd.extend(self.loras.iter().map(|(n, p)| format!("{n}={p}")));
                }
            }
            EngineKind::Llamacpp => {
                let model = model()?;
                let alias = self.served_model_name.clone().unwrap_or_else(|| {
                    std::path::Path::new(&model)
                        .file_stem()
                        .map_or_else(|| model.clone(), |s| s.to_string_lossy().into_owned())
                });
                cmd.extend([bin("llama-server"), "-m".into(), model]);
                cmd.extend(["--host".into(), host, "--port".into(), port.to_string()]);
                // llama.cpp splits its context among the slots: give each slot
                // the per-request length asked for.
                let per_slot = self.max_model_len.unwrap_or(2048);
                cmd.extend([
                    "-c".into(),
                    (per_slot * self.parallel_slots.max(1)).to_string(),
                ]);
                cmd.extend(["--parallel".into(), self.parallel_slots.max(1).to_string()]);
                if let Some(t) = self.threads {
                    cmd.extend(["-t".into(), t.to_string()]);
                }
                cmd.extend(["--alias".into(), alias]);
                if let Some(t) = &self.chat_template {
                    cmd.extend(["--chat-template-file".into(), t.clone()]);
                }
                for (_, path) in &self.loras {
                    cmd.extend(["--lora".into(), path.clone()]);
                }
            }
            EngineKind::Echo => {
                return Err(SpawnError::Config(
                    "the echo engine runs in-process and has no command line".into(),
                ))
            }
        }
        cmd.extend(self.extra_args.iter().cloned());
        Ok(cmd)
    }
}

/// A running engine: stop it with [`RunningEngine::stop`]. Dropped without
/// being stopped (a worker that stops while the engine still loads), it kills
/// the engine's whole process group, so nothing it forked outlives it.
#[derive(Debug)]
pub struct RunningEngine {
    kind: EngineKind,
    base_url: String,
    /// The engine process, for external engines; `None` once it was reaped.
    child: Option<Child>,
    /// The last lines the engine wrote, for error messages.
    log: LogTail,
    /// The in-process echo server and the sender that stops it.
    echo: Option<(JoinHandle<std::io::Result<()>>, oneshot::Sender<()>)>,
    /// The engine's `TMPDIR`: a directory of its own under the worker's,
    /// removed (with what the engine left there, such as vLLM's
    /// `vllm_dist_*` rendezvous files) when the engine is stopped or dropped.
    tmp: Option<tempfile::TempDir>,
}

impl RunningEngine {
    /// Where the engine's OpenAI-compatible API is: `http://host:port` of a
    /// launched engine, or the URL connected to.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Which engine runs.
    pub fn kind(&self) -> EngineKind {
        self.kind
    }

    /// Resolves when the engine process exits by itself (never for echo),
    /// with its exit status and the last lines it wrote.
    pub async fn exited(&mut self) -> String {
        match &mut self.child {
            Some(child) => match child.wait().await {
                Ok(status) => {
                    self.child = None;
                    tokio::time::sleep(LAST_WORDS).await;
                    format!("{status}; {}", self.log.describe())
                }
                Err(e) => e.to_string(),
            },
            None => std::future::pending().await,
        }
    }

    /// The engine's process id (the leader of its process group), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Stops the engine: SIGTERM to its process group, and SIGKILL to what is
    /// left of the group once the engine exited or `grace` passed.
    pub async fn stop(mut self, grace: Duration) {
        if let Some((task, tx)) = self.echo.take() {
            let _ = tx.send(());
            let _ = task.await;
        }
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                crate::process::signal_group(pid, libc::SIGTERM);
                if tokio::time::timeout(grace, child.wait()).await.is_err() {
                    tracing::warn!(pid, "the engine ignored SIGTERM; killing it");
                }
                // The engine is gone or ignored SIGTERM: whatever of its group
                // is still running (processes it forked and did not wait for)
                // would outlive the worker.
                crate::process::signal_group(pid, libc::SIGKILL);
                // SIGKILL is delivered, not awaited: a process of the group
                // may still be running (in the middle of a write to disk, say)
                // when kill(2) returns. The worker must not exit before it is
                // gone, or it would outlive the worker.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                while crate::process::group_running(pid) {
                    if tokio::time::Instant::now() >= deadline {
                        tracing::warn!(
                            pid,
                            "processes of the engine's group are still running 5 s after SIGKILL"
                        );
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let _ = child.kill().await;
        }
        if let Some(tmp) = self.tmp.take() {
            let path = tmp.path().to_owned();
            if let Err(e) = tmp.close() {
                tracing::warn!(
                    "could not remove the engine's temporary directory {}: {e}",
                    path.display()
                );
            }
        }
    }
}

impl Drop for RunningEngine {
    fn drop(&mut self) {
        if let Some(pid) = self.child.as_ref().and_then(Child::id) {
            crate::process::signal_group(pid, libc::SIGKILL);
        }
    }
}

/// A free port on `host`, for an engine launched with port 0.
fn free_port(host: &str) -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind((host, 0))?.local_addr()?.port())
}

/// Starts the engine and waits until `/health` answers 200.
pub async fn spawn(config: &SpawnConfig) -> Result<RunningEngine, SpawnError> {
    if config.kind == EngineKind::Echo {
        let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port)).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let options = config.echo.clone();
        let task = tokio::spawn(echo::serve(listener, options, async {
            let _ = rx.await;
        }));
        return Ok(RunningEngine {
            kind: EngineKind::Echo,
            base_url: format!("http://{addr}"),
            child: None,
            log: LogTail::None,
            echo: Some((task, tx)),
            tmp: None,
        });
    }
    let port = if config.port == 0 {
        free_port(&config.host)?
    } else {
        config.port
    };
    let argv = config.command_line(port)?;
    let (stdout, stderr, log) = match &config.log {
        EngineLog::File(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("could not open the engine log {}: {e}", path.display()),
                    )
                })?;
            (
                Stdio::from(file.try_clone()?),
                Stdio::from(file),
                LogTail::File(path.clone()),
            )
        }
        // Not kept anywhere: keep its last lines for the error messages.
        EngineLog::Silent => (
            Stdio::piped(),
            Stdio::piped(),
            LogTail::Captured(Arc::default()),
        ),
        EngineLog::Inherit => (Stdio::inherit(), Stdio::inherit(), LogTail::Inherited),
    };
    tracing::info!(engine = config.kind.name(), command = ?argv, "starting the engine");
    let tmp = tempfile::Builder::new()
        .prefix("dispatcher-engine-")
        .tempdir()
        .map_err(|source| SpawnError::Spawn {
            kind: config.kind.name(),
            program: format!(
                "{} (its temporary directory in {})",
                argv[0],
                std::env::temp_dir().display()
            ),
            source,
        })?;
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .env("TMPDIR", tmp.path())
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| SpawnError::Spawn {
            kind: config.kind.name(),
            program: argv[0].clone(),
            source,
        })?;
    if let LogTail::Captured(tail) = &log {
        if let Some(out) = child.stdout.take() {
            tokio::spawn(keep_tail(out, tail.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(keep_tail(err, tail.clone()));
        }
    }
    let mut engine = RunningEngine {
        kind: config.kind,
        base_url: format!("http://{}:{port}", connect_host(&config.host)),
        child: Some(child),
        log,
        echo: None,
        tmp: Some(tmp),
    };
    let health = format!("{}/health", engine.base_url);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("a plain HTTP client builds");
    let deadline = tokio::time::Instant::now() + config.startup_timeout;
    let mut wait = Duration::from_millis(50);
    loop {
        if let Ok(r) = http.get(&health).send().await {
            if r.status().is_success() {
                tracing::info!(url = %engine.base_url, "engine healthy");
                return Ok(engine);
            }
        }
        if let Some(Ok(Some(status))) = engine.child.as_mut().map(Child::try_wait) {
            engine.child = None;
            tokio::time::sleep(LAST_WORDS).await;
            return Err(SpawnError::Exited {
                kind: config.kind.name(),
                status: status.to_string(),
                log_hint: engine.log.describe(),
            });
        }
        if tokio::time::Instant::now() >= deadline {
            let log_hint = engine.log.describe();
            engine.stop(Duration::from_secs(5)).await;
            return Err(SpawnError::Timeout {
                kind: config.kind.name(),
                url: health,
                secs: config.startup_timeout.as_secs(),
                log_hint,
            });
        }
        // Model loading takes seconds to minutes: back off to 1 s between probes.
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(1));
    }
}

/// Connects to a wildcard bind address on loopback.
fn connect_host(host: &str) -> &str {
    match host {
        "0.0.0.0" | "::" | "" => "127.0.0.1",
        h => h,
    }
}

/// Connects to an engine that is already running (`--no-launch`).
pub fn connect(host: &str, port: u16) -> RunningEngine {
    connect_url(&format!("http://{}:{port}", connect_host(host)))
}

/// Connects to the engine at `url`, already running here or elsewhere (a
/// hosted API): nothing to start or stop.
pub fn connect_url(url: &str) -> RunningEngine {
    RunningEngine {
        kind: EngineKind::Vllm,
        base_url: url.to_string(),
        child: None,
        log: LogTail::None,
        echo: None,
        tmp: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_command_line_has_every_flag_asked_for() {
        let c = SpawnConfig {
            model: Some("/models/llama".into()),
            tensor_parallel: 2,
            max_model_len: Some(8192),
            gpu_memory_utilization: Some(0.9),
            enforce_eager: true,
            chat_template: Some("t.jinja".into()),
            extra_args: vec!["--seed".into(), "1".into()],
            engine_cmd: vec!["apptainer".into(), "exec".into(), "img.sif".into()],
            served_model_name: Some("llama-3".into()),
            loras: vec![
                ("sql".into(), "/loras/sql".into()),
                ("chat".into(), "/loras/chat".into()),
            ],
            ..SpawnConfig::default()
        };
        assert_eq!(
            c.command_line(9000).unwrap().join(" "),
            "apptainer exec img.sif vllm serve /models/llama --host 127.0.0.1 --port 9000 \
             --tensor-parallel-size 2 --max-model-len 8192 --gpu-memory-utilization 0.9 \
             --enforce-eager --chat-template t.jinja --served-model-name llama-3 \
             --enable-lora --lora-modules sql=/loras/sql chat=/loras/chat --seed 1"
        );
        let sglang = SpawnConfig {
            kind: EngineKind::Sglang,
            ..c.clone()
        };
        assert!(sglang
            .command_line(1)
            .unwrap()
            .join(" ")
            .contains(" --lora-paths sql=/loras/sql chat=/loras/chat"));
        let llama = SpawnConfig {
            kind: EngineKind::Llamacpp,
            model: Some("/m/tiny.gguf".into()),
            ..c
        };
        assert!(llama
            .command_line(1)
            .unwrap()
            .join(" ")
            .contains(" --lora /loras/sql --lora /loras/chat"));
    }

    #[test]
    fn llamacpp_gives_each_slot_the_requested_context() {
        let c = SpawnConfig {
            kind: EngineKind::Llamacpp,
            model: Some("/m/tiny.gguf".into()),
            max_model_len: Some(512),
            parallel_slots: 4,
            threads: Some(1),
            ..SpawnConfig::default()
        };
        assert_eq!(
            c.command_line(1).unwrap().join(" "),
            "llama-server -m /m/tiny.gguf --host 127.0.0.1 --port 1 -c 2048 --parallel 4 -t 1 --alias tiny"
        );
    }

    #[test]
    fn sglang_command_line_maps_the_common_flags() {
        let c = SpawnConfig {
            kind: EngineKind::Sglang,
            model: Some("org/m".into()),
            tensor_parallel: 4,
            max_model_len: Some(4096),
            gpu_memory_utilization: Some(0.8),
            enforce_eager: true,
            ..SpawnConfig::default()
        };
        assert_eq!(
            c.command_line(7).unwrap().join(" "),
            "python3 -m sglang.launch_server --model-path org/m --host 127.0.0.1 --port 7 \
             --tp-size 4 --context-length 4096 --mem-fraction-static 0.8 --disable-cuda-graph"
        );
    }

    #[test]
    fn a_missing_model_is_a_clear_error() {
        let e = SpawnConfig::default().command_line(1).unwrap_err();
        assert!(e.to_string().contains("--model"), "{e}");
    }
}
