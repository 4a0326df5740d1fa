//! Where `launch` runs its workers: Slurm jobs (`sbatch`, `squeue`,
//! `scancel`), or local processes (`--backend local`) under the same logic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// How long a Slurm command may take: a slurmctld that does not answer
/// must not hang `launch`.
const SLURM_TIMEOUT: Duration = Duration::from_secs(60);

/// How a worker job ended, as far as replacing it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndKind {
    /// Exit status 0: it finished (the job was complete, or it had nothing
    /// left to do), or released its lines when told to stop.
    Done,
    /// A non-zero exit or out of memory: what the worker itself did wrong
    /// (a bad model path, a task binary that cannot start). Counts toward
    /// `--max-worker-failures`.
    Failed,
    /// Ended from outside: cancelled, preempted, out of time, its node
    /// failed, or gone from Slurm's records. Replaced, not counted.
    Lost,
}

/// A worker job's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Queued (or requeued, or suspended), with Slurm's reason.
    Pending(String),
    /// Running.
    Running,
    /// Ended: how, and in words (`FAILED, exit code 1:0`).
    Ended(EndKind, String),
}

/// One worker to start: the command and what it must find in its
/// environment.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// The worker command: `dispatcher infer ...`, a task binary, ...
    pub command: Vec<String>,
    /// `DISPATCHER_SERVER` and the like: written into the job's command.
    pub env: Vec<(String, String)>,
    /// Environment only passed on (the token): never written to a file.
    pub secret_env: Vec<(String, String)>,
    /// Where the workers' logs (and the Slurm batch script) go.
    pub log_dir: PathBuf,
}

impl WorkerSpec {
    /// `env NAME=VALUE ... COMMAND...`, shell-quoted.
    pub fn shell_command(&self) -> String {
        let mut words = vec!["env".to_string()];
        words.extend(self.env.iter().map(|(k, v)| format!("{k}={v}")));
        words.extend(self.command.iter().cloned());
        shell_words::join(words)
    }
}

/// A submitted worker.
#[derive(Debug, Clone)]
pub struct Submitted {
    /// The Slurm job id, or `local-N`.
    pub id: String,
    /// The process id of a local worker.
    pub pid: Option<u32>,
    /// Its log file.
    pub log: PathBuf,
    /// Whether it runs already: a local worker does from its start, a
    /// Slurm job once the scheduler starts it.
    pub running: bool,
}

/// The Slurm options and script of `--backend slurm`.
#[derive(Debug, Clone)]
pub struct Slurm {
    /// `--sbatch-args`, split.
    pub sbatch_args: Vec<String>,
    /// `--job-name`.
    pub job_name: String,
    /// The batch script, written once into the log folder.
    pub script: PathBuf,
}

/// Local processes of `--backend local`.
#[derive(Debug, Default)]
pub struct Local {
    /// Workers started by this process, by id.
    children: HashMap<String, tokio::process::Child>,
    /// Workers of an earlier `launch` (from the state file): only their
    /// process ids (and when those processes started) are known.
    adopted: HashMap<String, (u32, Option<u64>)>,
}

/// Where the workers run.
#[derive(Debug)]
pub enum Backend {
    /// Slurm jobs.
    Slurm(Slurm),
    /// Local processes.
    Local(Local),
}

impl Backend {
    /// The `--backend` name.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Slurm(_) => "slurm",
            Backend::Local(_) => "local",
        }
    }

    /// Takes over a worker an earlier `launch` started: process `pid`
    /// that started at `pid_start`, for a local one.
    pub fn adopt(&mut self, id: &str, pid: Option<u32>, pid_start: Option<u64>) {
        if let (Backend::Local(local), Some(pid)) = (self, pid) {
            local.adopted.insert(id.to_string(), (pid, pid_start));
        }
    }

    /// Starts worker number `ordinal`.
    pub async fn submit(&mut self, spec: &WorkerSpec, ordinal: u64) -> anyhow::Result<Submitted> {
        match self {
            Backend::Slurm(slurm) => slurm.submit(spec, ordinal).await,
            Backend::Local(local) => local.submit(spec, ordinal),
        }
    }

    /// The state of each of `ids`.
    pub async fn poll(&mut self, ids: &[String]) -> anyhow::Result<HashMap<String, JobState>> {
        match self {
            Backend::Slurm(_) => slurm_poll(ids).await,
            Backend::Local(local) => {
                Ok(ids.iter().map(|id| (id.clone(), local.state(id))).collect())
            }
        }
    }

    /// Stops `ids`: SIGTERM first (workers release their lines), SIGKILL
    /// after Slurm's KillWait, or after `grace` for local workers.
    pub async fn cancel(&mut self, ids: &[String], grace: Duration) -> anyhow::Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        match self {
            Backend::Slurm(_) => {
                let out = run_slurm("scancel", ids.iter().map(String::as_str)).await?;
                if !out.status.success() {
                    bail!(
                        "scancel {}: {}",
                        ids.join(" "),
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                Ok(())
            }
            Backend::Local(local) => {
                local.cancel(ids, grace).await;
                Ok(())
            }
        }
    }
}

impl Slurm {
    /// Checks an `--sbatch-template`'s text: it must say where the worker
    /// command goes.
    pub fn check_template(template: &str) -> anyhow::Result<()> {
        if !template.contains("{worker}") {
            bail!("--sbatch-template: the template has no {{worker}}, the place where the worker command goes (e.g. `srun {{worker}}`)");
        }
        Ok(())
    }

    /// The batch script every worker job runs: the worker as one task
    /// (`srun`, so that `scancel --signal=TERM` and preemption reach it).
    pub fn script_text(spec: &WorkerSpec, template: Option<&str>) -> anyhow::Result<String> {
        let worker = spec.shell_command();
        match template {
            Some(t) => {
                Self::check_template(t)?;
                Ok(t.replace("{worker}", &worker))
            }
            None => Ok(format!(
                "#!/bin/bash\n\
                 # Written by `dispatcher launch` (dispatcher {}): one worker of its job,\n\
                 # run as one task so that signals (scancel, preemption) reach it.\n\
                 exec srun --ntasks=1 --kill-on-bad-exit=1 -- {worker}\n",
                env!("CARGO_PKG_VERSION")
            )),
        }
    }

    async fn submit(&self, spec: &WorkerSpec, ordinal: u64) -> anyhow::Result<Submitted> {
        let log_pattern = spec.log_dir.join("worker-%j.log");
        let mut cmd = tokio::process::Command::new("sbatch");
        cmd.arg("--parsable")
            .arg(format!("--job-name={}", self.job_name))
            .arg(format!("--output={}", log_pattern.display()))
            .arg("--open-mode=append")
            .args(&self.sbatch_args)
            .arg(&self.script)
            .env("DISPATCHER_LAUNCH_WORKER", ordinal.to_string())
            .envs(spec.secret_env.iter().map(|(k, v)| (k, v)));
        let out = run_slurm_command("sbatch", cmd).await?;
        if !out.status.success() {
            bail!(
                "sbatch refused the worker job: {} (--sbatch-args {})",
                String::from_utf8_lossy(&out.stderr).trim(),
                shell_words::join(&self.sbatch_args)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let id = text
            .trim()
            .split(';')
            .next()
            .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit() || b == b'_'))
            .with_context(|| format!("sbatch --parsable printed {text:?}, not a job id"))?
            .to_string();
        let log = spec.log_dir.join(format!("worker-{id}.log"));
        Ok(Submitted {
            id,
            pid: None,
            log,
            running: false,
        })
    }
}

/// Runs a Slurm command with [`SLURM_TIMEOUT`].
async fn run_slurm<'a>(
    program: &str,
    args: impl IntoIterator<Item = &'a str>,
) -> anyhow::Result<std::process::Output> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args);
    run_slurm_command(program, cmd).await
}

/// Runs `cmd` (Slurm's `program`) with [`SLURM_TIMEOUT`], without input,
/// in a process group of its own: a Ctrl-C at the terminal reaches
/// `launch` alone, which lets an `sbatch` finish (and records its job)
/// and an `scancel` end, instead of killing either mid-way.
async fn run_slurm_command(
    program: &str,
    mut cmd: tokio::process::Command,
) -> anyhow::Result<std::process::Output> {
    cmd.stdin(Stdio::null()).kill_on_drop(true).process_group(0);
    tokio::time::timeout(SLURM_TIMEOUT, cmd.output())
        .await
        .with_context(|| format!("{program} did not answer within 60 s: is slurmctld up?"))?
        .with_context(|| format!("could not run {program}: is Slurm installed here? (--backend local runs the workers on this machine)"))
}

/// The state of Slurm jobs: `squeue` for those it knows (ended ones stay
/// there for MinJobAge), `sacct` (where accounting runs) for the others.
async fn slurm_poll(ids: &[String]) -> anyhow::Result<HashMap<String, JobState>> {
    let mut states = HashMap::new();
    if ids.is_empty() {
        return Ok(states);
    }
    let list = ids.join(",");
    let out = run_slurm(
        "squeue",
        ["-h", "--states=all", "-o", "%i|%T|%r", "-j", list.as_str()],
    )
    .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Every id unknown makes squeue fail with "Invalid job id": none known.
    if !out.status.success() && !stderr.contains("Invalid job id") {
        bail!("squeue -j {list}: {}", stderr.trim());
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some((id, state)) = parse_squeue_line(line) {
            states.insert(id, state);
        }
    }
    for id in ids {
        if !states.contains_key(id) {
            states.insert(id.clone(), sacct_state(id).await);
        }
    }
    Ok(states)
}

/// A line of `squeue -o "%i|%T|%r"`.
fn parse_squeue_line(line: &str) -> Option<(String, JobState)> {
    let mut parts = line.trim().splitn(3, '|');
    let id = parts.next()?.trim().to_string();
    let state = parts.next()?.trim();
    let reason = parts.next().unwrap_or("").trim();
    Some((id, classify(state, reason)))
}

/// A Slurm job state (`squeue`'s `%T`, `sacct`'s `State`) in `launch`'s
/// terms.
pub fn classify(state: &str, detail: &str) -> JobState {
    // sacct says "CANCELLED by 0".
    let name = state.split_whitespace().next().unwrap_or("");
    let words = |kind| {
        let text = if detail.is_empty() || detail == "None" {
            name.to_string()
        } else {
            format!("{name}, {detail}")
        };
        JobState::Ended(kind, text)
    };
    match name {
        "PENDING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED" | "SUSPENDED" | "STOPPED"
        | "RESV_DEL_HOLD" => JobState::Pending(detail.to_string()),
        "RUNNING" | "CONFIGURING" | "COMPLETING" | "SIGNALING" | "STAGE_OUT" | "RESIZING" => {
            JobState::Running
        }
        "COMPLETED" => words(EndKind::Done),
        "FAILED" | "OUT_OF_MEMORY" => words(EndKind::Failed),
        _ => words(EndKind::Lost),
    }
}

/// A job `squeue` no longer lists: `sacct` where accounting runs, else
/// lost (it ended over MinJobAge ago, how is unknown).
async fn sacct_state(id: &str) -> JobState {
    let out = run_slurm(
        "sacct",
        ["-n", "-P", "-X", "-o", "State,ExitCode", "-j", id],
    )
    .await;
    let line = out.ok().filter(|o| o.status.success()).and_then(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .map(str::to_string)
    });
    match line.as_deref().and_then(|l| l.split_once('|')) {
        Some((state, exit)) => classify(state, &format!("exit code {exit}")),
        None => JobState::Ended(
            EndKind::Lost,
            "gone from squeue, and no sacct record says how it ended".into(),
        ),
    }
}

impl Local {
    fn submit(&mut self, spec: &WorkerSpec, ordinal: u64) -> anyhow::Result<Submitted> {
        use std::os::unix::process::CommandExt as _;
        let id = format!("local-{ordinal}");
        let log = spec.log_dir.join(format!("worker-{id}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("{}: could not create the worker's log", log.display()))?;
        let (program, args) = spec
            .command
            .split_first()
            .context("the worker command is empty")?;
        let mut cmd = std::process::Command::new(program);
        cmd.args(args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .envs(spec.secret_env.iter().map(|(k, v)| (k, v)))
            .env("DISPATCHER_LAUNCH_WORKER", ordinal.to_string())
            // What its hello names as its job (Slurm's workers name SLURM_JOB_ID).
            .env("DISPATCHER_LAUNCH_JOB", &id)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            // Its own process group: a Ctrl-C at the terminal reaches
            // `launch`, which stops the workers in order.
            .process_group(0);
        let child = tokio::process::Command::from(cmd)
            .spawn()
            .with_context(|| format!("could not start the worker command {program:?}"))?;
        let pid = child.id();
        self.children.insert(id.clone(), child);
        Ok(Submitted {
            id,
            pid,
            log,
            running: true,
        })
    }

    fn state(&mut self, id: &str) -> JobState {
        if let Some(child) = self.children.get_mut(id) {
            return match child.try_wait() {
                Ok(None) => JobState::Running,
                Ok(Some(status)) => {
                    self.children.remove(id);
                    exit_state(status)
                }
                Err(e) => JobState::Ended(EndKind::Lost, format!("could not wait for it: {e}")),
            };
        }
        match self.adopted.get(id) {
            Some(&(pid, started)) if dispatcher_core::process::running(pid, started) => {
                JobState::Running
            }
            Some(_) => JobState::Ended(
                EndKind::Lost,
                "ended while no launch watched it; its exit status is unknown".into(),
            ),
            None => JobState::Ended(EndKind::Lost, "not a worker of this launch".into()),
        }
    }

    async fn cancel(&mut self, ids: &[String], grace: Duration) {
        let pids: Vec<u32> = ids
            .iter()
            .filter_map(|id| {
                self.children
                    .get(id)
                    .and_then(tokio::process::Child::id)
                    .or_else(|| {
                        // Never a process that reused an ended worker's id.
                        let &(pid, started) = self.adopted.get(id)?;
                        dispatcher_core::process::running(pid, started).then_some(pid)
                    })
            })
            .collect();
        signal_groups(&pids, libc::SIGTERM);
        // Zombies count as ended: they need not be reaped to be seen gone.
        let deadline = tokio::time::Instant::now() + grace;
        while pids.iter().any(|&p| dispatcher_core::process::alive(p))
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        signal_groups(&pids, libc::SIGKILL);
    }
}

/// An exit status in `launch`'s terms.
fn exit_state(status: std::process::ExitStatus) -> JobState {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(0), _) => JobState::Ended(EndKind::Done, "exit status 0".into()),
        (Some(code), _) => JobState::Ended(EndKind::Failed, format!("exit status {code}")),
        (None, Some(sig)) => JobState::Ended(EndKind::Lost, format!("killed by signal {sig}")),
        (None, None) => JobState::Ended(EndKind::Lost, "ended, status unknown".into()),
    }
}

fn signal_groups(pids: &[u32], signal: i32) {
    for &pid in pids {
        dispatcher_core::process::signal_group(pid, signal);
    }
}

/// The last `n` lines of a log, for an error message.
pub fn tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            let start = lines.len().saturating_sub(n);
            lines[start..]
                .iter()
                .map(|l| format!("  | {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        }
        Err(e) => format!("  (could not read {}: {e})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slurm_states_become_pending_running_or_an_end_of_a_kind() {
        assert_eq!(
            parse_squeue_line("123|PENDING|Resources"),
            Some(("123".into(), JobState::Pending("Resources".into())))
        );
        assert_eq!(
            parse_squeue_line("7|COMPLETING|None").unwrap().1,
            JobState::Running
        );
        let end = |line: &str| match parse_squeue_line(line).unwrap().1 {
            JobState::Ended(kind, _) => kind,
            other => panic!("{other:?}"),
        };
        assert_eq!(end("8|COMPLETED|None"), EndKind::Done);
        assert_eq!(end("8|FAILED|NonZeroExitCode"), EndKind::Failed);
        assert_eq!(end("8|OUT_OF_MEMORY|OutOfMemory"), EndKind::Failed);
        for lost in [
            "CANCELLED",
            "PREEMPTED",
            "TIMEOUT",
            "NODE_FAIL",
            "BOOT_FAIL",
        ] {
            assert_eq!(end(&format!("9|{lost}|x")), EndKind::Lost, "{lost}");
        }
        assert_eq!(
            classify("CANCELLED by 0", "exit code 0:15"),
            JobState::Ended(EndKind::Lost, "CANCELLED, exit code 0:15".into())
        );
        assert!(matches!(classify("REQUEUED", ""), JobState::Pending(_)));
    }

    #[test]
    fn the_batch_script_runs_the_worker_as_one_task_with_its_environment() {
        let spec = WorkerSpec {
            command: vec!["/opt/my task".into(), "--engine".into(), "vllm".into()],
            env: vec![("DISPATCHER_SERVER".into(), "head:8000".into())],
            secret_env: vec![("DISPATCHER_TOKEN".into(), "s3cret".into())],
            log_dir: PathBuf::from("/tmp"),
        };
        let script = Slurm::script_text(&spec, None).unwrap();
        assert!(
            script.contains(
                "exec srun --ntasks=1 --kill-on-bad-exit=1 -- env 'DISPATCHER_SERVER=head:8000' '/opt/my task' --engine vllm\n"
            ),
            "{script}"
        );
        assert!(!script.contains("s3cret"), "the token stays out of files");
        let t = Slurm::script_text(
            &spec,
            Some("#!/bin/bash\n#SBATCH --gres=gpu:1\nmodule load cuda\nsrun {worker}\n"),
        )
        .unwrap();
        assert!(
            t.ends_with("srun env 'DISPATCHER_SERVER=head:8000' '/opt/my task' --engine vllm\n"),
            "{t}"
        );
        let e = Slurm::script_text(&spec, Some("#!/bin/bash\nsrun task\n")).unwrap_err();
        assert!(e.to_string().contains("{worker}"), "{e}");
    }
}
