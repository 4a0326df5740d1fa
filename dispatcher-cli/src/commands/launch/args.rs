//! `launch`'s flags, their checks before anything starts, and the job's
//! flags passed on to `serve` as given.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{ArgMatches, Args, ValueEnum};

use super::*;

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
    /// Seconds a running worker may go without reaching the server before
    /// it is cancelled and counted as failed: a worker that cannot reach
    /// the advertised address, lacks the job's token, or hangs. A worker
    /// says hello once its engine is up, so this must cover loading the
    /// model. A warning comes at a quarter of it. Not applied while
    /// workers that send no hello (the Python client) are at work.
    #[arg(long, value_name = "SECS", default_value_t = 3600.0)]
    pub hello_timeout: f64,
    /// Seconds between looks at the server and at the workers.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    pub poll: f64,
    /// The folder of the server's and the workers' logs and of the state
    /// file (default `<output>.launch/`).
    #[arg(long, value_name = "DIR")]
    pub launch_dir: Option<PathBuf>,
    /// Without --token, launch makes the job a token of its own (in
    /// `<launch dir>/token`), so that only its own workers take its lines:
    /// not one left over from another job on the same port, nor one
    /// started by hand. This leaves the job open instead, for workers that
    /// cannot send a token (the Python client).
    #[arg(long)]
    pub no_job_token: bool,
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

pub(super) fn check_options(args: &LaunchArgs) -> anyhow::Result<()> {
    let o = &args.launch;
    if o.max_workers == 0 {
        bail!("--max-workers must be at least 1");
    }
    for (flag, v) in [
        ("poll", o.poll),
        ("pending-timeout", o.pending_timeout),
        ("failure-backoff", o.failure_backoff),
        ("hello-timeout", o.hello_timeout),
    ] {
        crate::commands::serve::secs(flag, v)?;
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

pub(super) fn split_args(args: Option<&str>) -> anyhow::Result<Vec<String>> {
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
