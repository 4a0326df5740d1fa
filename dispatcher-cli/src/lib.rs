//! The `dispatcher` command line, reused by task binaries.
//!
//! # Layout
//! - `commands/`: one module per subcommand, re-exported here:
//!   - [`serve`]: `dispatcher serve`, the head-node server;
//!   - [`infer`]: `dispatcher infer`, prompt in, responses out: its flags and
//!     its built-in task ([`infer::Infer`]);
//!   - [`batch`]: `dispatcher run-batch`, OpenAI batch files as a built-in task;
//!   - [`report`]: `dispatcher report`, the figures of a job's output;
//!   - [`status`]: `dispatcher status` and `dispatcher work-timeout`;
//!   - [`slurm`]: `dispatcher slurm-script`, a self-contained sbatch script;
//!   - [`export`]: `dispatcher export`, a finished output as Parquet;
//!   - [`launch`]: `dispatcher launch`, the server and its workers as Slurm
//!     jobs (or local processes), sized by the backlog;
//!   - [`estimate`]: `dispatcher estimate`, a job's tokens and cost before it runs;
//!   - [`docs`]: `dispatcher completions`, and the man and reference pages
//!     generated from these definitions.
//! - [`worker`]: the worker runtime that task binaries, `infer` and
//!   `run-batch` share: engine, work and manager flags, running a task with
//!   them; [`worker::engines`]: the engines as specs (launched, by URL,
//!   named), their keys and limits.
//! - [`progress`]: periodic progress lines of a worker.
//! - [`prompt`]: what a line sends to an engine (`infer` makes it, the
//!   tokenizer counts it).
//! - [`tokenize`]: a model's tokenizer and chat template, for `estimate`.
//! - [`outdir`]: `--outdir`, the output as shards cut while the job runs.
//! - [`grouping`]: `--group-by`, prefix affinity; [`jq`]: the jq filters
//!   it and `infer`'s `--prompt-path` run on input lines.
//! - [`access`]: the job's access token flags (`--token-file`).
//! - [`exit`]: exit statuses, one rule for every command that runs or reads a job.
//! - [`logging`]: tracing set-up shared by every subcommand.
//! - here: the command line's types and [`run_tasks`], the whole CLI of a
//!   task binary in one call.

pub mod access;
mod commands;
pub mod exit;
pub mod grouping;
pub mod jq;
pub mod logging;
pub mod outdir;
pub mod progress;
pub mod prompt;
#[cfg(feature = "tokenizer")]
pub mod tokenize;
pub mod worker;

#[cfg(feature = "tokenizer")]
pub use commands::estimate;
#[cfg(feature = "parquet")]
pub use commands::export;
pub use commands::{batch, docs, infer, launch, report, serve, slurm, status};

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use dispatcher_core::task::DynTask;

/// Batch LLM inference on HPC clusters.
#[derive(Debug, Parser)]
#[command(name = "dispatcher", version, about, long_about = None)]
pub struct Cli {
    /// Logging verbosity.
    #[command(flatten)]
    pub log: logging::LogArgs,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands of `dispatcher`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve an input JSONL file to workers and write the output JSONL in order.
    Serve(Box<serve::ServeArgs>),
    /// Generate responses for a prompt in each line (a built-in task).
    Infer(Box<infer::InferArgs>),
    /// Run a file in the OpenAI Batch API format (`custom_id`, `url`, `body` per line), resumably.
    RunBatch(Box<batch::RunBatchArgs>),
    /// Show a running server's progress: lines, rate, ETA, in flight, reissues.
    Status(status::StatusArgs),
    /// What a job's output holds: lines, failures by type, tokens, responses cut at the length limit.
    Report(report::ReportArgs),
    /// Change a running server's work timeout.
    WorkTimeout(status::WorkTimeoutArgs),
    /// Print a self-contained sbatch script (`infer` or `task`) to submit from any directory.
    SlurmScript(slurm::SlurmScriptArgs),
    /// Write a finished output (a JSONL file or an --outdir folder) as one Parquet file.
    #[cfg(feature = "parquet")]
    Export(export::ExportArgs),
    /// Run a job on Slurm: the server, and worker jobs as many as its backlog deserves, to the report.
    Launch(Box<launch::LaunchArgs>),
    #[cfg(feature = "tokenizer")]
    /// Before a job: its prompt tokens (with the model's tokenizer), lines over the context, worst-case tokens and cost, and with --engine-url its wall time.
    Estimate(Box<estimate::EstimateArgs>),
    /// Print a shell's completion script (bash, zsh, fish, elvish, powershell).
    Completions(docs::CompletionsArgs),
    /// Write a man page per command to a folder (for packagers; in every release archive).
    #[command(hide = true)]
    Man(docs::OutArgs),
    /// Write the book's reference page per command to a folder (docs/src/reference/commands).
    #[command(hide = true)]
    Reference(docs::OutArgs),
}

/// Entry point of the `dispatcher` binary: parses flags, runs, and returns the
/// process exit code.
pub fn main() -> std::process::ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    logging::init(&cli.log);
    run_async(async move {
        match cli.command {
            Command::Serve(args) => serve::run(*args).await,
            Command::Infer(args) => infer::run(*args).await,
            Command::RunBatch(args) => batch::run(*args).await,
            Command::Status(args) => status::status(args).await,
            Command::Report(args) => report::run(args),
            Command::WorkTimeout(args) => status::work_timeout(args).await,
            Command::SlurmScript(args) => slurm::run(args),
            #[cfg(feature = "parquet")]
            Command::Export(args) => export::run(args),
            Command::Completions(args) => docs::completions(args, Cli::command()),
            Command::Man(args) => docs::man(args, Cli::command()),
            Command::Reference(args) => docs::reference(args, Cli::command(), TaskCli::command()),
            #[cfg(feature = "tokenizer")]
            Command::Estimate(args) => estimate::run(*args).await,
            Command::Launch(args) => {
                let own = matches
                    .subcommand_matches("launch")
                    .expect("clap matched the launch subcommand");
                launch::run(*args, own).await
            }
        }
    })
}

/// The command line of a task binary.
#[derive(Debug, Parser)]
#[command(about = "A dispatcher task binary: runs its task on every line of the input, through a dispatcher server or on local files.", long_about = None)]
pub struct TaskCli {
    /// Logging verbosity.
    #[command(flatten)]
    pub log: logging::LogArgs,
    /// The task to run (required when the binary holds several).
    #[arg(long)]
    pub task: Option<String>,
    /// Where items come from.
    #[command(flatten)]
    pub work: worker::WorkArgs,
    /// The engine.
    #[command(flatten)]
    pub engine: worker::EngineArgs,
}

/// The whole CLI of a task binary: call it from `main` with the binary's tasks.
///
/// ```no_run
/// # mod dispatcher { pub use dispatcher_cli::run_tasks; pub use dispatcher_core::task::DynTask; }
/// # fn tasks() -> Vec<&'static dyn dispatcher::DynTask> { Vec::new() }
/// // With `#[task] async fn answer(..)` defined: `run_tasks(&[&answer])`.
/// fn main() -> std::process::ExitCode {
///     dispatcher::run_tasks(&tasks())
/// }
/// ```
pub fn run_tasks(tasks: &[&'static dyn DynTask]) -> std::process::ExitCode {
    let cli = TaskCli::parse();
    logging::init(&cli.log);
    let task = match select_task(tasks, cli.task.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            print_error(e);
            return std::process::ExitCode::from(2);
        }
    };
    run_async(async move { worker::run_task(task, &cli.engine, &cli.work).await })
}

fn select_task(
    tasks: &[&'static dyn DynTask],
    name: Option<&str>,
) -> anyhow::Result<&'static dyn DynTask> {
    let names: Vec<&str> = tasks.iter().map(|t| t.name()).collect();
    match (name, tasks) {
        (None, [only]) => Ok(*only),
        (None, []) => anyhow::bail!("this binary registers no task"),
        (None, _) => anyhow::bail!(
            "this binary holds several tasks; pick one with --task ({})",
            names.join(", ")
        ),
        (Some(n), _) => tasks
            .iter()
            .find(|t| t.name() == n)
            .copied()
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no task named {n:?}; --task takes one of: {}",
                    names.join(", ")
                )
            }),
    }
}

/// Runs `f` on a multi-threaded runtime and turns its result into an exit code.
pub fn run_async(
    f: impl std::future::Future<Output = anyhow::Result<()>>,
) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            print_error(format_args!("could not start the async runtime: {e}"));
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(f) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<exit::Exit>() {
            // Said already: only the status is left to set.
            Some(exit::Exit(code)) => std::process::ExitCode::from(*code),
            None => {
                print_error(format_args!("{e:#}"));
                std::process::ExitCode::FAILURE
            }
        },
    }
}

/// `error: <message>` on stderr. Unlike `eprintln!`, does not panic when
/// stderr is gone: the exit status still tells.
fn print_error(message: impl std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "error: {message}");
}

/// Resolves when the process receives SIGTERM or SIGINT. The handlers are
/// installed by this call, not when the future is first polled, so a signal
/// that arrives right after it (a job scheduler that stops a process as soon
/// as it announced itself) is not lost to the default action.
pub fn termination_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        let (mut term, mut int) = match (term, int) {
            (Ok(term), Ok(int)) => (term, int),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!("cannot listen for SIGTERM and SIGINT: {e}");
                return std::future::pending().await;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dispatcher_core::task::{Task, TaskContext, TaskError};

    macro_rules! unit_task {
        ($name:ident) => {
            #[allow(non_camel_case_types)]
            struct $name;
            impl Task for $name {
                type Input = String;
                type Output = String;
                const NAME: &'static str = stringify!($name);
                #[allow(clippy::manual_async_fn)]
                fn run(
                    &self,
                    input: String,
                    _ctx: TaskContext,
                ) -> impl std::future::Future<Output = Result<String, TaskError>> + Send + 'static
                {
                    async move { Ok(input) }
                }
            }
        };
    }
    unit_task!(first);
    unit_task!(second);

    #[test]
    fn task_selection_by_name_with_clear_errors() {
        let both: [&'static dyn DynTask; 2] = [&first, &second];
        assert_eq!(select_task(&both, Some("second")).unwrap().name(), "second");
        let e = select_task(&both, None).err().unwrap().to_string();
        assert!(e.contains("--task") && e.contains("first, second"), "{e}");
        let e = select_task(&both, Some("third")).err().unwrap().to_string();
        assert!(
            e.contains("\"third\"") && e.contains("first, second"),
            "{e}"
        );
        assert_eq!(select_task(&both[..1], None).unwrap().name(), "first");
    }

    /// `--workers` on `infer` and `run-batch` was always requests in flight;
    /// `--max-in-flight` says so, and the old name still works.
    #[test]
    fn max_in_flight_and_its_old_name_workers_are_one_flag() {
        let in_flight = |args: &[&str]| match Cli::try_parse_from(args).unwrap().command {
            Command::Infer(a) => a.work.max_in_flight,
            Command::RunBatch(a) => a.work.max_in_flight,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            in_flight(&["dispatcher", "infer", "--max-in-flight", "8"]),
            8
        );
        assert_eq!(in_flight(&["dispatcher", "infer", "--workers", "8"]), 8);
        assert_eq!(in_flight(&["dispatcher", "run-batch", "--workers", "3"]), 3);
        assert_eq!(in_flight(&["dispatcher", "run-batch"]), 64);
    }

    /// `serve` takes `--input`/`--output` as every other subcommand does.
    #[test]
    fn serve_takes_input_and_output_as_aliases() {
        let cli = Cli::try_parse_from([
            "dispatcher",
            "serve",
            "--input",
            "b.jsonl",
            "--output",
            "r.jsonl",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(
            (
                args.infile.to_str(),
                args.outfile.as_deref().and_then(|o| o.to_str())
            ),
            (Some("b.jsonl"), Some("r.jsonl"))
        );
    }

    #[test]
    fn the_cli_definitions_are_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        TaskCli::command().debug_assert();
    }
}
