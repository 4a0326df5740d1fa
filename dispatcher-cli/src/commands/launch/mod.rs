//! `dispatcher launch [job flags] -- WORKER_COMMAND...`: a job that runs
//! itself. It starts the server (or attaches to one), submits workers as
//! Slurm jobs (or local processes), keeps as many running as the backlog
//! deserves, replaces those that end early, stops a job whose workers fail
//! at start, and ends with the job's report.
//!
//! - [`plan`]: how many workers to submit, from `/status` (pure, tested);
//! - [`backend`]: Slurm jobs or local processes, and their states;
//! - [`state`]: `<output>.launch/`, the state file, lock and logs;
//! - here: the flags and the loop that ties them together.

pub mod backend;
pub mod plan;
pub mod state;

use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{ArgMatches, Args, ValueEnum};
use dispatcher_core::client::DispatcherClient;
use dispatcher_core::job::files::with_suffix;
use dispatcher_core::protocol::StatusResponse;

use super::report::Report;
use super::serve::ServeArgs;
use super::status::human_secs;
use backend::{Backend, EndKind, JobState, Local, Slurm, WorkerSpec};
use plan::{Backlog, Fleet};
use state::{unix_now, JobRecord, LaunchDir, LaunchState, ServerRecord};

/// Where the workers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// Slurm jobs, submitted with sbatch.
    Slurm,
    /// Processes on this machine, under the same logic: to try a job out,
    /// or on one big node.
    Local,
}

/// `launch`'s own flags (the job's are `serve`'s).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Launch")]
pub struct LaunchOptions {
    /// Where the workers run.
    #[arg(long, value_enum, default_value = "slurm")]
    pub backend: BackendChoice,
    /// Workers at once at most (Slurm jobs pending or running).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub max_workers: u32,
    /// Attach to a server already running at HOST:PORT instead of starting
    /// one (it is left running at the end).
    #[arg(long, value_name = "HOST:PORT", value_parser = dispatcher_core::client::check_addr)]
    pub server: Option<String>,
    /// The host workers reach the server at (default: this machine's host
    /// name with Slurm, 127.0.0.1 with --backend local, or --host when it
    /// is not 0.0.0.0).
    #[arg(long, value_name = "HOST")]
    pub advertise: Option<String>,
    /// sbatch options of every worker job, shell-quoted:
    /// "--partition=gpu --gres=gpu:1 --time=4:00:00 --qos=normal".
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub sbatch_args: Option<String>,
    /// A batch script of your own for the worker jobs, with `{worker}`
    /// where the worker command goes (e.g. `srun {worker}` after your
    /// `module load` lines).
    #[arg(long, value_name = "FILE")]
    pub sbatch_template: Option<PathBuf>,
    /// The Slurm job name of the workers.
    #[arg(long, value_name = "NAME", default_value = "dispatcher-worker")]
    pub job_name: String,
    /// Seconds a worker job may stay pending before launch reports it
    /// (with Slurm's reason).
    #[arg(long, value_name = "SECS", default_value_t = 1800.0)]
    pub pending_timeout: f64,
    /// Worker jobs that fail in a row (a non-zero exit, out of memory)
    /// before launch stops the job: every job it submitted is cancelled and
    /// the last one's log quoted. Progress of the job resets the count.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub max_worker_failures: u32,
    /// Seconds to wait before submitting again after a worker failed; it
    /// doubles with each failure in a row (up to ten minutes).
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub failure_backoff: f64,
    /// Seconds between looks at the server and at the workers.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    pub poll: f64,
    /// The folder of the server's and the workers' logs and of the state
    /// file (default `<output>.launch/`).
    #[arg(long, value_name = "DIR")]
    pub launch_dir: Option<PathBuf>,
}

/// Flags of `dispatcher launch`.
#[derive(Debug, Clone, Args)]
pub struct LaunchArgs {
    /// Launch's own flags.
    #[command(flatten)]
    pub launch: LaunchOptions,
    /// The job: every flag of `dispatcher serve`.
    #[command(flatten)]
    pub serve: ServeArgs,
    /// The worker command, after `--`: `dispatcher infer ...`, `dispatcher
    /// run-batch ...` or a task binary with its flags. Launch points it at
    /// the server (DISPATCHER_SERVER); it must not name --dispatcher or an
    /// --input of its own.
    #[arg(last = true, required = true, value_name = "WORKER_COMMAND")]
    pub worker: Vec<String>,
}

pub use crate::exit::{Exit, EXIT_ERRORS, EXIT_INTERRUPTED};

/// Runs `dispatcher launch`; `matches` are its own (for the job's flags,
/// passed on to `serve` as given).
pub async fn run(args: LaunchArgs, matches: &ArgMatches) -> anyhow::Result<()> {
    let options = &args.launch;
    check_options(&args)?;
    let files = args.serve.files();
    let dir = LaunchDir::create(
        options
            .launch_dir
            .clone()
            .unwrap_or_else(|| with_suffix(files.output(), ".launch")),
    )?;
    let token = args.serve.access.resolve()?;
    let mut ui = Ui::new();
    let signal = crate::termination_signal();
    tokio::pin!(signal);

    let Some(_lock) = dir.lock()? else {
        // Another launch runs this job: watch it.
        let saved = dir.load()?;
        let addr = options
            .server
            .clone()
            .or_else(|| saved.and_then(|s| s.server).map(|s| s.addr))
            .context(
                "another launch holds this job's lock but has no server yet; try again in a moment",
            )?;
        ui.event(&format!(
            "another launch runs this job ({}); watching its server at {addr}",
            dir.path().display()
        ));
        let client = DispatcherClient::with_token(&addr, token.as_deref());
        return watch(&client, &args, &mut ui, signal).await;
    };

    let mut backend = match options.backend {
        BackendChoice::Local => Backend::Local(Local::default()),
        BackendChoice::Slurm => Backend::Slurm(Slurm {
            sbatch_args: split_args(options.sbatch_args.as_deref())?,
            job_name: options.job_name.clone(),
            script: dir.script(),
        }),
    };
    let mut state = match dir.load()? {
        Some(saved) => {
            if saved.backend != backend.name() && saved.alive().next().is_some() {
                bail!(
                    "{}: the workers of this job were started with --backend {}; launch it again with that backend",
                    dir.state_file().display(),
                    saved.backend
                );
            }
            for job in saved.alive() {
                backend.adopt(&job.id, job.pid);
            }
            let alive = saved.alive().count();
            if alive > 0 {
                ui.event(&format!(
                    "taking back {alive} worker(s) of an earlier launch of this job"
                ));
            }
            LaunchState {
                backend: backend.name().into(),
                ..saved
            }
        }
        None => LaunchState::new(backend.name()),
    };

    let mut server =
        match start_or_attach(&args, matches, &dir, &mut state, &mut ui, &mut signal).await? {
            Started::Server(s) => *s,
            Started::AlreadyComplete => {
                ui.event("the job is complete already");
                return finish(&args, &state, &mut ui);
            }
            Started::Interrupted => return Err(Exit(EXIT_INTERRUPTED).into()),
        };
    state.server = Some(server.record.clone());
    dir.save(&state)?;

    let spec = WorkerSpec {
        command: args.worker.clone(),
        env: vec![
            ("DISPATCHER_SERVER".into(), server.record.addr.clone()),
            ("DISPATCHER_EXIT_WHEN_DRAINED".into(), "1".into()),
        ],
        secret_env: token
            .iter()
            .map(|t| ("DISPATCHER_TOKEN".to_string(), t.clone()))
            .collect(),
        log_dir: dir.path().to_path_buf(),
    };
    if let Backend::Slurm(_) = backend {
        let template = options
            .sbatch_template
            .as_ref()
            .map(|p| {
                std::fs::read_to_string(p).with_context(|| {
                    format!("--sbatch-template {}: could not read it", p.display())
                })
            })
            .transpose()?;
        let script = Slurm::script_text(&spec, template.as_deref())?;
        std::fs::write(dir.script(), script)
            .with_context(|| format!("{}: could not write it", dir.script().display()))?;
    }
    ui.event(&format!(
        "server at {} ({}); workers: up to {} on {} (logs in {})",
        server.record.addr,
        if server.owned {
            "started by launch"
        } else {
            "attached"
        },
        options.max_workers,
        backend.name(),
        dir.path().display()
    ));

    let mut looper = Loop {
        options,
        client: DispatcherClient::with_token(&server.record.addr, token.as_deref()),
        backend,
        spec,
        failures_in_a_row: 0,
        last_failure: None,
        submit_after: None,
        owed: 0,
        capacity: plan::stated_capacity(&args.worker),
        lines_done: None,
        reported_pending: HashSet::new(),
        reached: HashSet::new(),
        unreachable_since: None,
        samples: VecDeque::new(),
    };
    let outcome = looper
        .run(&mut state, &dir, &mut server, &mut ui, &mut signal)
        .await;
    let Loop { mut backend, .. } = looper;
    match outcome {
        Ok(Ending::Complete) => {
            wind_down(&mut backend, &mut state, &dir, &mut server, &mut ui, true).await;
            finish(&args, &state, &mut ui)
        }
        Ok(Ending::Interrupted) => {
            ui.event("stopping: cancelling the workers launch submitted, then the server");
            wind_down(&mut backend, &mut state, &dir, &mut server, &mut ui, false).await;
            ui.event(&format!(
                "stopped; the output is resumable: run the same command again to go on ({})",
                files.output().display()
            ));
            Err(Exit(EXIT_INTERRUPTED).into())
        }
        Err(e) => {
            ui.event("stopping the job: cancelling the workers launch submitted, then the server");
            wind_down(&mut backend, &mut state, &dir, &mut server, &mut ui, false).await;
            Err(e)
        }
    }
}

fn check_options(args: &LaunchArgs) -> anyhow::Result<()> {
    let o = &args.launch;
    if o.max_workers == 0 {
        bail!("--max-workers must be at least 1");
    }
    for (flag, v) in [
        ("poll", o.poll),
        ("pending-timeout", o.pending_timeout),
        ("failure-backoff", o.failure_backoff),
    ] {
        super::serve::secs(flag, v)?;
    }
    if o.max_worker_failures == 0 {
        bail!("--max-worker-failures must be at least 1");
    }
    for word in &args.worker {
        let flag = word.split('=').next().unwrap_or(word);
        if matches!(
            flag,
            "--dispatcher"
                | "--input"
                | "-i"
                | "--input-file"
                | "--output"
                | "-o"
                | "--output-file"
        ) {
            bail!(
                "the worker command names {flag}: launch points its workers at the job's server itself (DISPATCHER_SERVER), and the job's input and output are launch's own --input/--output; remove it from the worker command"
            );
        }
    }
    let sbatch = split_args(o.sbatch_args.as_deref())?;
    for word in &sbatch {
        let flag = word.split('=').next().unwrap_or(word);
        match flag {
            "--array" | "-a" => bail!("--sbatch-args: launch submits one job per worker and replaces them one by one; leave out {flag} and set --max-workers"),
            "--output" | "-o" | "--error" | "-e" => bail!("--sbatch-args: launch names each worker's log itself (<output>.launch/worker-<job id>.log); leave out {flag}"),
            "--parsable" | "--wrap" => bail!("--sbatch-args: {flag} is launch's to set; leave it out"),
            _ => {}
        }
    }
    if o.backend == BackendChoice::Local && (o.sbatch_args.is_some() || o.sbatch_template.is_some())
    {
        bail!("--sbatch-args and --sbatch-template are for --backend slurm");
    }
    // Read now, before anything is started: a template that cannot serve
    // stops launch with nothing to clean up.
    if let Some(path) = &o.sbatch_template {
        let template = std::fs::read_to_string(path)
            .with_context(|| format!("--sbatch-template {}: could not read it", path.display()))?;
        Slurm::check_template(&template)?;
    }
    Ok(())
}

fn split_args(args: Option<&str>) -> anyhow::Result<Vec<String>> {
    args.map(shell_words::split)
        .transpose()
        .context("--sbatch-args: unbalanced quotes")
        .map(Option::unwrap_or_default)
}

/// The job's flags as given on `launch`'s command line, for `serve`: every
/// flag of [`ServeArgs`] that came from the command line, as `--flag=VALUE`
/// (an environment variable such as DISPATCHER_TOKEN reaches the server
/// through its own environment).
pub fn serve_argv(matches: &ArgMatches) -> Vec<OsString> {
    use clap::parser::ValueSource;
    let serve = <ServeArgs as Args>::augment_args(clap::Command::new("serve"));
    let mut argv = Vec::new();
    for arg in serve.get_arguments() {
        let id = arg.get_id().as_str();
        if matches.value_source(id) != Some(ValueSource::CommandLine) {
            continue;
        }
        let Some(long) = arg.get_long() else { continue };
        if arg.get_action().takes_values() {
            for value in matches.get_raw(id).into_iter().flatten() {
                let mut word = OsString::from(format!("--{long}="));
                word.push(value);
                argv.push(word);
            }
        } else {
            argv.push(OsString::from(format!("--{long}")));
        }
    }
    argv
}

/// The server `launch` works with.
struct ServerHandle {
    record: ServerRecord,
    /// Started by this launch, or by an earlier one on this host: stopped
    /// (after its checkpoint) when the job is stopped.
    owned: bool,
    child: Option<tokio::process::Child>,
}

impl ServerHandle {
    /// Whether the server process is gone, and how it ended (`Some(true)`
    /// for exit status 0); `None` while it runs or when it is not ours.
    fn exited(&mut self) -> Option<bool> {
        if let Some(child) = &mut self.child {
            return child.try_wait().ok().flatten().map(|s| s.success());
        }
        match self.record.pid {
            Some(pid) if self.owned && !dispatcher_core::process::alive(pid) => Some(true),
            _ => None,
        }
    }

    /// SIGTERM (the server checkpoints and exits), then waits up to a minute.
    async fn stop(&mut self) {
        if !self.owned {
            return;
        }
        let Some(pid) = self.record.pid else {
            return;
        };
        dispatcher_core::process::signal(pid, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline && self.exited().is_none() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

enum Started {
    Server(Box<ServerHandle>),
    AlreadyComplete,
    Interrupted,
}

/// Attaches to `--server`, to the server an earlier launch started, or
/// starts `dispatcher serve` with the job's flags in the background.
async fn start_or_attach(
    args: &LaunchArgs,
    matches: &ArgMatches,
    dir: &LaunchDir,
    state: &mut LaunchState,
    ui: &mut Ui,
    signal: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> anyhow::Result<Started> {
    let token = args.serve.access.resolve()?;
    let token = token.as_deref();
    if let Some(addr) = &args.launch.server {
        let client = DispatcherClient::with_token(addr, token);
        client
            .status()
            .await
            .with_context(|| format!("--server {addr}"))?;
        return Ok(Started::Server(Box::new(ServerHandle {
            record: ServerRecord {
                addr: addr.clone(),
                pid: None,
                host: String::new(),
            },
            owned: false,
            child: None,
        })));
    }
    if let Some(saved) = state.server.clone() {
        let ours = saved.host == crate::worker::hostname()
            && saved.pid.is_some_and(dispatcher_core::process::alive);
        let client = DispatcherClient::with_token(&saved.addr, token);
        if ours || client.status().await.is_ok() {
            ui.event(&format!(
                "attaching to the server an earlier launch started at {}",
                saved.addr
            ));
            return Ok(Started::Server(Box::new(ServerHandle {
                owned: ours,
                record: saved,
                child: None,
            })));
        }
    }

    // Start `dispatcher serve` in its own process group (a Ctrl-C reaches
    // launch, which stops it after the workers), logging to server.log.
    // The token reaches the server through its environment, as the
    // workers': not in a command line any user of the node can list.
    let mut argv: Vec<OsString> = serve_argv(matches)
        .into_iter()
        .filter(|a| {
            !a.to_str()
                .is_some_and(|a| a.starts_with("--token=") || a.starts_with("--token-file="))
        })
        .collect();
    let given = |argv: &[OsString], flag: &str| {
        argv.iter().any(|a| {
            a.to_str()
                .is_some_and(|a| a.starts_with(&format!("--{flag}=")))
        })
    };
    let local = args.launch.backend == BackendChoice::Local;
    let host_given = given(&argv, "host");
    if !given(&argv, "port") {
        argv.push("--port=0".into());
    }
    if local && !host_given {
        argv.push("--host=127.0.0.1".into());
    }
    let log_path = dir.server_log();
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("{}: could not create the server's log", log_path.display()))?;
    let start = log.metadata().map_or(0, |m| m.len());
    let _ = writeln!(
        log,
        "==== dispatcher launch started the server at unix time {:.0} ====",
        unix_now()
    );
    let exe =
        std::env::current_exe().context("could not find the dispatcher binary to run `serve`")?;
    let mut cmd = std::process::Command::new(&exe);
    if let Some(token) = token {
        cmd.env("DISPATCHER_TOKEN", token);
    }
    cmd.env_remove("DISPATCHER_TOKEN_FILE");
    cmd.arg("serve")
        .args(&argv)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = tokio::process::Command::from(cmd)
        .spawn()
        .with_context(|| format!("could not start {} serve", exe.display()))?;
    let pid = child.id();
    let staged = dispatcher_core::dataset::Format::of(&args.serve.infile, false)
        .map_or(true, |f| f != Some(dispatcher_core::dataset::Format::Jsonl));
    ui.event(&format!(
        "starting the server (its log: {}){}",
        log_path.display(),
        if staged {
            "; a dataset input is staged first"
        } else {
            ""
        }
    ));
    let bound = loop {
        if let Some(addr) = listening_addr(&log_path, start) {
            break addr;
        }
        if let Some(status) = child.try_wait()? {
            if status.success() {
                // It had nothing to do: the job (or a redo) was complete.
                return Ok(Started::AlreadyComplete);
            }
            bail!(
                "the server exited ({status}) before it listened; its log ({}) ends with:\n{}",
                log_path.display(),
                backend::tail(&log_path, 15)
            );
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            () = signal.as_mut() => {
                if let Some(pid) = pid {
                    dispatcher_core::process::signal(pid, libc::SIGTERM);
                }
                let _ = child.wait().await;
                return Ok(Started::Interrupted);
            }
        }
    };
    let port = bound.rsplit_once(':').map_or("", |(_, p)| p);
    let bind_host = args.serve.host.as_str();
    let host = match (&args.launch.advertise, local) {
        (Some(h), _) => h.clone(),
        (None, _) if host_given && bind_host != "0.0.0.0" && bind_host != "::" => {
            bind_host.to_string()
        }
        (None, true) => "127.0.0.1".into(),
        (None, false) => Some(crate::worker::hostname())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into()),
    };
    let addr = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok(Started::Server(Box::new(ServerHandle {
        record: ServerRecord {
            addr,
            pid,
            host: crate::worker::hostname(),
        },
        owned: true,
        child: Some(child),
    })))
}

/// The address in the server's `listening on ADDR` line, written to its
/// log past byte `from`.
fn listening_addr(log: &Path, from: u64) -> Option<String> {
    let bytes = std::fs::read(log).ok()?;
    let text = String::from_utf8_lossy(bytes.get(usize::try_from(from).ok()?..)?);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("listening on "))
        .map(str::to_string)
}

enum Ending {
    Complete,
    Interrupted,
}

/// The loop's memory between looks.
struct Loop<'a> {
    options: &'a LaunchOptions,
    client: DispatcherClient,
    backend: Backend,
    spec: WorkerSpec,
    failures_in_a_row: u32,
    /// The last failed worker: its id and log.
    last_failure: Option<(String, PathBuf, String)>,
    /// No submission before this (backoff after a failure).
    submit_after: Option<Instant>,
    /// Workers that ended early while the job was unfinished, not yet
    /// replaced.
    owed: u64,
    capacity: u64,
    lines_done: Option<u64>,
    reported_pending: HashSet<String>,
    /// Jobs whose worker said hello to the server (it names its job).
    reached: HashSet<String>,
    unreachable_since: Option<Instant>,
    /// (time, lines done) over the last minute, for the rate.
    samples: VecDeque<(Instant, u64)>,
}

impl Loop<'_> {
    async fn run(
        &mut self,
        state: &mut LaunchState,
        dir: &LaunchDir,
        server: &mut ServerHandle,
        ui: &mut Ui,
        signal: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> anyhow::Result<Ending> {
        let poll = Duration::from_secs_f64(self.options.poll);
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
                        Some(true) => {
                            // It exits 0 once the job is complete (or on
                            // SIGTERM from outside: the report says which).
                            ui.event("the server has exited");
                            return Ok(Ending::Complete);
                        }
                        Some(false) => bail!(
                            "the server exited with an error; its log ({}) ends with:\n{}\nlaunch stopped the workers; fix what the log says and run the same command to resume",
                            dir.server_log().display(),
                            backend::tail(&dir.server_log(), 15)
                        ),
                        None => {}
                    }
                    let since = *self.unreachable_since.get_or_insert_with(Instant::now);
                    if !server.owned
                        && self.lines_done.is_some()
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
    async fn look_at_jobs(
        &mut self,
        state: &mut LaunchState,
        status: Option<&StatusResponse>,
        ui: &mut Ui,
    ) -> bool {
        if let Some(s) = status {
            self.note_reached(s);
            if self.lines_done.is_some_and(|before| s.lines_done > before) {
                // The job moves: failures before were not the workers' own.
                self.failures_in_a_row = 0;
            }
            self.lines_done = Some(s.lines_done);
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
        for job in state.jobs.iter_mut().filter(|j| j.alive()) {
            let mut observed = states.get(&job.id).cloned();
            if let Some(JobState::Ended(EndKind::Done, _)) = &observed {
                if !complete && !self.reached.contains(&job.id) {
                    // Exit 0 without ever reaching the server: it gave up
                    // on an address it could not reach.
                    observed = Some(JobState::Ended(
                        EndKind::Failed,
                        format!(
                            "it exited 0 without ever reaching the server at {}: can the workers' nodes reach that address? (--advertise)",
                            self.spec
                                .env
                                .iter()
                                .find(|(k, _)| k == "DISPATCHER_SERVER")
                                .map_or("?", |(_, v)| v.as_str())
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
                        EndKind::Done => {
                            self.failures_in_a_row = 0;
                        }
                        EndKind::Failed => {
                            self.failures_in_a_row += 1;
                            self.last_failure =
                                Some((job.id.clone(), job.log.clone(), detail.clone()));
                            let backoff = self.options.failure_backoff
                                * 2f64
                                    .powi(self.failures_in_a_row.saturating_sub(1).min(10) as i32);
                            self.submit_after =
                                Some(Instant::now() + Duration::from_secs_f64(backoff.min(600.0)));
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
                    if !complete && *kind != EndKind::Done {
                        self.owed += 1;
                    }
                }
                _ => {}
            }
        }
        changed
    }

    fn note_reached(&mut self, status: &StatusResponse) {
        self.reached.extend(
            status
                .workers
                .iter()
                .filter_map(|w| w.hello.as_ref()?.job.clone()),
        );
    }

    /// Submits the workers the plan asks for.
    async fn submit(
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
            let submitted = self.backend.submit(&self.spec, ordinal).await?;
            state.next_ordinal += 1;
            if self.owed > 0 {
                self.owed -= 1;
                state.replaced += 1;
            }
            let now = unix_now();
            state.jobs.push(JobRecord {
                id: submitted.id.clone(),
                ordinal,
                pid: submitted.pid,
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

    fn status_line(&self, s: &StatusResponse, state: &LaunchState) -> String {
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
async fn wait_or_signal(
    d: Duration,
    signal: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => false,
        () = signal.as_mut() => true,
    }
}

/// Ends the workers and the server: at the end of a complete job the
/// workers exit by themselves (pending ones are cancelled at once, running
/// ones after a minute); when stopping early every worker is cancelled
/// (they release their lines), then the server checkpoints and exits.
async fn wind_down(
    backend: &mut Backend,
    state: &mut LaunchState,
    dir: &LaunchDir,
    server: &mut ServerHandle,
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
            if let Err(e) = backend.cancel(&alive, grace).await {
                ui.event(&format!("could not cancel the workers: {e:#}"));
            }
            cancelled = true;
        } else if !pending.is_empty() {
            let _ = backend.cancel(&pending, grace).await;
        }
        ui.status(&format!("waiting for {} worker(s) to end", alive.len()));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if server.owned && server.exited().is_none() {
        if complete {
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

/// Prints the job's report and the tail's cost; the exit status says
/// whether every line was written without an error record.
fn finish(args: &LaunchArgs, state: &LaunchState, ui: &mut Ui) -> anyhow::Result<()> {
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
fn tail_figures(state: &LaunchState) -> Option<String> {
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
async fn watch(
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

/// What `launch` shows: events as lines, the status as one line redrawn on
/// a terminal, or logged every 30 seconds otherwise.
struct Ui {
    tty: bool,
    shown: bool,
    last_plain: Option<Instant>,
}

impl Ui {
    fn new() -> Ui {
        Ui {
            tty: std::io::stderr().is_terminal(),
            shown: false,
            last_plain: None,
        }
    }

    fn clear(&mut self) {
        if self.tty && self.shown {
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
            self.shown = false;
        }
    }

    fn event(&mut self, message: &str) {
        self.clear();
        let _ = writeln!(std::io::stderr(), "launch: {message}");
    }

    fn status(&mut self, line: &str) {
        if self.tty {
            let _ = write!(std::io::stderr(), "\r\x1b[2K{line}");
            let _ = std::io::stderr().flush();
            self.shown = true;
        } else if self
            .last_plain
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(30))
        {
            self.last_plain = Some(Instant::now());
            let _ = writeln!(std::io::stderr(), "launch: {line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn parse(args: &[&str]) -> (LaunchArgs, ArgMatches) {
        use clap::{CommandFactory as _, FromArgMatches as _};
        let matches = crate::Cli::command().try_get_matches_from(args).unwrap();
        let sub = matches.subcommand_matches("launch").unwrap().clone();
        let cli = crate::Cli::from_arg_matches(&matches).unwrap();
        let crate::Command::Launch(launch) = cli.command else {
            panic!("not launch")
        };
        (*launch, sub)
    }

    #[test]
    fn the_job_flags_reach_serve_as_given_and_launch_keeps_its_own() {
        let (args, matches) = parse(&[
            "dispatcher",
            "-v",
            "launch",
            "--input",
            "in put.jsonl",
            "--output=out.jsonl",
            "--max-workers",
            "3",
            "--work-timeout",
            "60",
            "--no-journal",
            "--redo-errors",
            "--backend",
            "local",
            "--",
            "dispatcher",
            "infer",
            "--engine",
            "echo",
        ]);
        assert_eq!(args.launch.max_workers, 3);
        assert_eq!(args.worker, ["dispatcher", "infer", "--engine", "echo"]);
        let argv: Vec<String> = serve_argv(&matches)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            argv,
            [
                "--infile=in put.jsonl",
                "--outfile=out.jsonl",
                "--work-timeout=60",
                "--redo-errors=",
                "--no-journal"
            ]
        );
        // What serve makes of them is what launch parsed.
        let mut serve = vec![OsString::from("dispatcher"), "serve".into()];
        serve.extend(serve_argv(&matches));
        let crate::Command::Serve(parsed) = crate::Cli::try_parse_from(serve).unwrap().command
        else {
            panic!("not serve")
        };
        assert_eq!(format!("{:?}", *parsed), format!("{:?}", args.serve));
    }

    #[test]
    fn a_worker_command_that_names_its_own_server_or_input_is_refused() {
        for bad in ["--dispatcher=h:1", "--input", "-o"] {
            let (args, _) = parse(&[
                "dispatcher",
                "launch",
                "--input",
                "a",
                "--output",
                "b",
                "--",
                "my_task",
                bad,
                "x",
            ]);
            let e = check_options(&args).unwrap_err().to_string();
            assert!(
                e.contains("worker command") && e.contains(bad.split('=').next().unwrap()),
                "{e}"
            );
        }
        let (args, _) = parse(&[
            "dispatcher",
            "launch",
            "--input",
            "a",
            "--output",
            "b",
            "--sbatch-args",
            "--gres=gpu:1 --array=1-4",
            "--",
            "my_task",
        ]);
        let e = check_options(&args).unwrap_err().to_string();
        assert!(e.contains("--array") && e.contains("--max-workers"), "{e}");
    }

    #[test]
    fn the_tail_figures_count_worker_seconds_after_the_last_line_was_handed_out() {
        let mut state = LaunchState::new("local");
        state.drained_at = Some(100.0);
        for (started, ended) in [(10.0, 101.0), (10.0, 102.0), (50.0, 120.0)] {
            state.jobs.push(JobRecord {
                id: format!("local-{started}"),
                ordinal: 0,
                pid: None,
                log: PathBuf::new(),
                submitted: started,
                started: Some(started),
                ended: Some(ended),
                end: Some(EndKind::Done),
                end_detail: None,
            });
        }
        let t = tail_figures(&state).unwrap();
        assert!(
            t.contains("20.0 s") && t.contains("23.0 worker-seconds"),
            "{t}"
        );
    }
}
