//! Exit statuses, one rule for every command that runs or reads a job:
//!
//! | status | meaning |
//! |---|---|
//! | 0 | the job is complete and no output line is an error record |
//! | 1 | a failure: the job could not go on, or the command could not do what it was asked; the message says why |
//! | 2 | the command line is wrong (clap's usage errors) |
//! | 3 | the job is complete and some output lines are error records (`--redo-errors` redoes them) |
//! | 130 | `launch` interrupted (Ctrl-C, SIGTERM) before the job was complete |
//!
//! `launch`, local-mode runs (`infer`, `run-batch`, task binaries with
//! `-i`/`-o`, a rerun of a finished one too) and `report` follow it.
//! `serve` exits 0 once the job is complete whatever its lines hold, as the
//! Python server did; so does a worker of a server told the job is
//! complete, and a worker or local run stopped by SIGTERM (a preemption)
//! once what it did is saved.

use std::io::BufRead as _;
use std::path::Path;

use anyhow::Context as _;

/// Exit status of a job that completed with error records in its output.
pub const EXIT_ERRORS: u8 = 3;
/// Exit status after Ctrl-C or SIGTERM.
pub const EXIT_INTERRUPTED: u8 = 130;

/// An error that only sets the exit status: what it means was printed.
#[derive(Debug)]
pub struct Exit(pub u8);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for Exit {}

/// After a local job completed: [`EXIT_ERRORS`] (saying so, by kind, on
/// stderr) when its `output` holds error records.
pub fn of_complete_output(output: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::open(output)
        .with_context(|| format!("{}: could not read the output", output.display()))?;
    let mut failed = std::collections::BTreeMap::<String, u64>::new();
    let mut lines = 0_u64;
    for line in std::io::BufReader::with_capacity(1 << 20, file).split(b'\n') {
        let line =
            line.with_context(|| format!("{}: could not read the output", output.display()))?;
        lines += 1;
        // The one classifier `report` and `--redo-errors` use.
        use dispatcher_core::record::{LineKind, OutputLine};
        let parsed = OutputLine::parse(&line);
        let kind = parsed.as_ref().map_or(LineKind::NotJson, OutputLine::kind);
        if !matches!(kind, LineKind::Ok) {
            *failed.entry(kind.name().to_string()).or_default() += 1;
        }
    }
    if failed.is_empty() {
        return Ok(());
    }
    let total: u64 = failed.values().sum();
    let mut kinds: Vec<(String, u64)> = failed.into_iter().collect();
    kinds.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let shown: Vec<String> = kinds
        .iter()
        .take(10)
        .map(|(k, n)| format!("{} {n}", dispatcher_core::text::escaped(k, 64)))
        .collect();
    eprintln!(
        "the job is complete: {total} of {lines} lines of {} are error records ({}{}); `dispatcher report` shows them, and the same command with --redo-errors redoes them (exit status 3)",
        output.display(),
        shown.join(", "),
        if kinds.len() > 10 { ", ..." } else { "" }
    );
    Err(Exit(EXIT_ERRORS).into())
}
