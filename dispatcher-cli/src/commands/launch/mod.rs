//! `dispatcher launch [job flags] -- WORKER_COMMAND...`: a job that runs
//! itself. It starts the server (or attaches to one), submits workers as
//! Slurm jobs (or local processes), keeps as many running as the backlog
//! deserves, replaces those that end early, stops a job whose workers fail
//! at start, and ends with the job's report.
//!
//! - [`plan`]: how many workers to submit, from `/status` (pure, tested);
//! - [`backend`]: Slurm jobs or local processes, and their states;
//! - [`state`]: `<output>.launch/`, the state file, lock and logs;
//! - `args.rs`: the flags, their checks, and the job's flags for `serve`;
//! - `server.rs`: starting or attaching to the server;
//! - `fleet.rs`: the loop that keeps the workers the backlog deserves;
//! - `end.rs`: winding down, the report, watching another launch's job;
//! - `ui.rs`: events and the status line;
//! - here: [`run`], which ties them together.

mod args;
pub mod backend;
mod end;
mod fleet;
mod identity;
pub mod plan;
mod server;
pub mod state;
mod ui;

use std::collections::{HashSet, VecDeque};

use anyhow::{bail, Context};
use clap::ArgMatches;
use dispatcher_core::client::DispatcherClient;
use dispatcher_core::job::files::with_suffix;

use super::report::Report;
use super::serve::ServeArgs;
use super::status::human_secs;
use backend::{Backend, EndKind, JobState, Local, Slurm, WorkerSpec};
use plan::{Backlog, Fleet};
use state::{unix_now, LaunchDir, LaunchState, ServerRecord, WorkerRecord};

use args::*;
pub use args::{serve_argv, BackendChoice, LaunchArgs, LaunchOptions};
use end::*;
use fleet::*;
use server::*;
use ui::*;

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
    let mut ui = Ui::new();
    let signal = crate::termination_signal();
    tokio::pin!(signal);

    let Some(_lock) = dir.lock()? else {
        // Another launch runs this job: watch it, if it is this job.
        identity::check_same_input(&args)?;
        let token = identity::job_token(&args, &dir, false)?;
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

    let token = identity::job_token(&args, &dir, true)?;
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
                backend.adopt(&job.id, job.pid, job.pid_start);
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

    let earlier_server = state.server.as_ref().map(|s| s.addr.clone());
    let mut server = match start_or_attach(
        &args,
        matches,
        &dir,
        &mut state,
        token.as_deref(),
        &mut ui,
        &mut signal,
    )
    .await?
    {
        Started::Server(s) => *s,
        Started::AlreadyComplete => {
            ui.event("the job is complete already");
            // No tail figures: they were an earlier run's.
            return finish(&args, &LaunchState::new(""), &mut ui);
        }
        Started::Interrupted => return Err(Exit(EXIT_INTERRUPTED).into()),
    };
    state.server = Some(server.record.clone());
    dir.save(&state)?;
    if let Some(gone) =
        earlier_server.filter(|a| server.child.is_some() && *a != server.record.addr)
    {
        cancel_orphans(&mut backend, &mut state, &gone, &mut ui).await;
        dir.save(&state)?;
    }

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
        // Absolute: Slurm resolves a relative --output in the job's working
        // directory, which `--chdir` in --sbatch-args moves.
        log_dir: std::path::absolute(dir.path())
            .with_context(|| format!("{}: could not make it absolute", dir.path().display()))?,
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
        "server at {addr} ({}); the job page: http://{addr}/; workers: up to {} on {} (logs in {})",
        if server.owned {
            "started by launch"
        } else {
            "attached"
        },
        options.max_workers,
        backend.name(),
        dir.path().display(),
        addr = server.record.addr,
    ));

    let mut looper = Loop {
        options,
        client: DispatcherClient::with_token(&server.record.addr, token.as_deref()),
        backend,
        spec,
        failures_in_a_row: 0,
        refused_in_a_row: 0,
        last_failure: None,
        submit_after: None,
        owed: 0,
        capacity: plan::stated_capacity(&args.worker),
        handed_in: None,
        reported_pending: HashSet::new(),
        reached: HashSet::new(),
        warned_silent: HashSet::new(),
        anonymous_workers: false,
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
        Ok(Ending::AlreadyComplete) => {
            wind_down(&mut backend, &mut state, &dir, &mut server, &mut ui, true).await;
            finish(&args, &LaunchState::new(""), &mut ui)
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

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::path::PathBuf;

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
            state.jobs.push(WorkerRecord {
                id: format!("local-{started}"),
                ordinal: 0,
                pid: None,
                pid_start: None,
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
