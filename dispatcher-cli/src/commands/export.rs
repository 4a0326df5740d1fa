//! `dispatcher export OUTPUT --parquet FILE`: a finished output as Parquet
//! ([`dispatcher_core::dataset::export`]).

use std::path::PathBuf;

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
}

/// Runs `dispatcher export`.
pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    if args.row_group_rows == 0 {
        bail!("--row-group-rows must be at least 1");
    }
    let join_input = match &args.join_input {
        Some(input) => {
            // The job's own output file: the file itself, or an --outdir
            // folder's `.job/output.jsonl`.
            let job_output = if args.output.is_dir() {
                args.output.join(".job").join("output.jsonl")
            } else {
                args.output.clone()
            };
            let prepared = dispatcher_core::dataset::prepare(
                input,
                args.split.as_deref(),
                &JobFiles::new(job_output, None),
            )
            .context("--join-input")?;
            Some(prepared.path)
        }
        None => None,
    };
    let started = std::time::Instant::now();
    let exported = export(
        &args.output,
        &args.parquet,
        &ExportOptions {
            row_group_rows: args.row_group_rows,
            join_input,
        },
    )?;
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
