//! `dispatcher export OUTPUT --parquet FILE`: a finished output as Parquet
//! ([`dispatcher_core::dataset::export`]).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use dispatcher_core::dataset::export::{export, ExportOptions};
use dispatcher_core::job::JobFiles;

/// Flags of `dispatcher export`.
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// The finished output: a JSONL file (plain, `.gz` or `.zst`), or an
    /// `--outdir` folder whose shards are all complete.
    pub output: PathBuf,
    /// The Parquet file to write (replaced when it exists).
    #[arg(long, value_name = "FILE")]
    pub parquet: PathBuf,
    /// Rows per Parquet row group (memory holds about one).
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub row_group_rows: usize,
    /// Carry the input's columns: each row gets its input line's fields (the
    /// output's win where both have one). The job's input as given to it: a
    /// JSONL file or a dataset (its staged copy beside the output is read).
    #[arg(long, value_name = "INPUT")]
    pub join_input: Option<PathBuf>,
    /// The split of a dataset --join-input that has several.
    #[arg(long, value_name = "NAME", requires = "join_input")]
    pub split: Option<String>,
    /// Export an output whose job is not complete (stopped, or still
    /// running): the lines written so far. Without it such an output is
    /// refused, saying how many lines it has of how many.
    #[arg(long)]
    pub partial: bool,
}

/// Refuses the output of a job that is not complete: one that has fewer
/// lines than its input (the input given with --join-input, else the one
/// its checkpoint names). An output without a checkpoint beside it (copied
/// elsewhere) cannot be checked and is taken as it is.
fn check_complete(job_output: &Path, input: Option<&Path>) -> anyhow::Result<()> {
    use dispatcher_core::dataset::Format;
    // Lines are counted in a plain file (a compressed copy has no job beside it).
    if !matches!(Format::of(job_output, true), Ok(Some(Format::Jsonl))) {
        return Ok(());
    }
    let input = match input {
        Some(input) => input.to_owned(),
        None => {
            let checkpoint = JobFiles::new(job_output, None).checkpoint().to_owned();
            match dispatcher_core::job::checkpoint::Checkpoint::load(&checkpoint) {
                Ok(Some(c)) => PathBuf::from(c.infile),
                _ => return Ok(()),
            }
        }
    };
    let Ok(expected) = dispatcher_core::input::count_lines(&input) else {
        return Ok(());
    };
    let written = dispatcher_core::input::count_lines(job_output)
        .with_context(|| format!("{}: could not read it", job_output.display()))?;
    if written < expected {
        bail!(
            "{} has {written} of its input's {expected} lines ({}): its job is not complete (stopped, or still running). Finish it (run the same command again), or pass --partial to export the lines written so far",
            job_output.display(),
            input.display()
        );
    }
    Ok(())
}

/// Runs `dispatcher export`.
pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    if args.row_group_rows == 0 {
        bail!("--row-group-rows must be at least 1");
    }
    // The job's own output file: the file itself, or an --outdir folder's
    // `.job/output.jsonl`.
    let job_output = if args.output.is_dir() {
        args.output.join(".job").join("output.jsonl")
    } else {
        args.output.clone()
    };
    let join_input = match &args.join_input {
        Some(input) => {
            let prepared = dispatcher_core::dataset::prepare(
                input,
                args.split.as_deref(),
                &JobFiles::new(&job_output, None),
            )
            .context("--join-input")?;
            Some(prepared.path)
        }
        None => None,
    };
    if !args.partial {
        check_complete(&job_output, join_input.as_deref())?;
    }
    let started = std::time::Instant::now();
    let exported = export(
        &args.output,
        &args.parquet,
        &ExportOptions {
            row_group_rows: args.row_group_rows,
            join_input,
        },
    )?;
    for note in &exported.notes {
        tracing::warn!(parquet = %args.parquet.display(), "{note}");
    }
    tracing::info!(
        output = %args.output.display(),
        parquet = %args.parquet.display(),
        rows = exported.rows,
        columns = exported.columns,
        seconds = started.elapsed().as_secs_f64(),
        "exported"
    );
    Ok(())
}
