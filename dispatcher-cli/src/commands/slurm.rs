//! `dispatcher slurm-script infer|task`: a self-contained sbatch script.
//!
//! Slurm copies a batch script to its spool directory before running it, so
//! the scripts in `examples/slurm/` find their shared body (`job.sh`) only when
//! submitted from the repository root. The script written here has the body
//! inlined and this `dispatcher` binary as its default `DISPATCHER_BIN`:
//! `dispatcher slurm-script infer > job.sbatch` in a data directory, then
//! `INPUT=prompts.jsonl sbatch job.sbatch` from anywhere.

use clap::{Args, ValueEnum};

/// Which job the script runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScriptKind {
    /// `dispatcher infer` (a prompt in each line, responses added).
    Infer,
    /// A compiled task binary, named by `TASK_BIN`.
    Task,
}

/// Flags of `dispatcher slurm-script`.
#[derive(Debug, Clone, Args)]
pub struct SlurmScriptArgs {
    /// Which job the script runs.
    #[arg(value_enum)]
    pub kind: ScriptKind,
}

const INFER: &str = include_str!("../../../examples/slurm/infer.sbatch");
const TASK: &str = include_str!("../../../examples/slurm/task.sbatch");
const BODY: &str = include_str!("../../../examples/slurm/job.sh");

/// The script of `kind`, with the job body inlined and `dispatcher_bin` as the
/// default `DISPATCHER_BIN`.
pub fn script(kind: ScriptKind, dispatcher_bin: &str) -> String {
    let template = match kind {
        ScriptKind::Infer => INFER,
        ScriptKind::Task => TASK,
    };
    let default_bin = format!(
        "DISPATCHER_BIN=${{DISPATCHER_BIN:-{}}}",
        shell_words::quote(dispatcher_bin)
    );
    let mut out = String::with_capacity(template.len() + BODY.len() + 256);
    for line in template.lines() {
        if line.starts_with("# Submit from the repository root") {
            out.push_str(&format!(
                "# Self-contained: written by `dispatcher slurm-script {}` (dispatcher {}); submit it from any directory.\n",
                kind.to_possible_value()
                    .map_or_else(String::new, |v| v.get_name().to_owned()),
                env!("CARGO_PKG_VERSION"),
            ));
        } else if line.starts_with("source \"${DISPATCHER_SLURM_JOB") {
            out.push_str("# ---- the job body, shared by the infer and task scripts ----\n");
            // Without its shebang: it continues this script.
            for body_line in BODY.lines().skip_while(|l| l.starts_with("#!")) {
                out.push_str(body_line);
                out.push('\n');
            }
        } else if line.starts_with("DISPATCHER_BIN=${DISPATCHER_BIN:-") {
            out.push_str(&default_bin);
            out.push('\n');
        } else if line.starts_with("#   ") {
            // The usage lines name the script they were in.
            out.push_str(
                &line
                    .replace("examples/slurm/infer.sbatch", "job.sbatch")
                    .replace("examples/slurm/task.sbatch", "job.sbatch"),
            );
            out.push('\n');
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Prints the script.
pub fn run(args: SlurmScriptArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let bin = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "dispatcher".into());
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(script(args.kind, &bin).as_bytes())?;
    stdout.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_is_self_contained_and_valid_bash() {
        for kind in [ScriptKind::Infer, ScriptKind::Task] {
            let s = script(kind, "/opt/my dispatcher/bin/dispatcher");
            assert!(!s.contains("DISPATCHER_SLURM_JOB"), "{s}");
            assert!(!s.contains("examples/slurm"), "{s}");
            assert!(s.contains("#SBATCH --requeue"), "{s}");
            assert!(s.contains("serve --infile"), "the body is inlined: {s}");
            assert!(
                s.contains("DISPATCHER_BIN=${DISPATCHER_BIN:-'/opt/my dispatcher/bin/dispatcher'}"),
                "{s}"
            );
            assert_eq!(s.matches("#!/bin/bash").count(), 1, "one shebang");
            let check = std::process::Command::new("bash")
                .args(["-n", "-c", &s])
                .output()
                .unwrap();
            assert!(
                check.status.success(),
                "{}",
                String::from_utf8_lossy(&check.stderr)
            );
        }
    }
}
