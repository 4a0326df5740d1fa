//! What makes a running job the one this launch was asked for: its input
//! (a launch that would watch or take over the job of this output checks
//! that the input given is the one it runs on, as a fresh server does), and
//! the token its workers prove themselves with.
//!
//! Without `--token` (or `--token-file`), launch makes the job a token of
//! its own, kept in `<launch dir>/token` (mode 0600; a later launch of the
//! same job, taking over its server and workers, reads it back) and given
//! to the server and the workers in their environment, never on a command
//! line. The server refuses, and logs, every request without it: a worker
//! left over from another job on the same port, or one started by hand.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use dispatcher_core::job::checkpoint::Checkpoint;

use super::*;

/// The file of the token launch made for the job.
fn token_file(dir: &LaunchDir) -> PathBuf {
    dir.path().join("token")
}

/// The job's token: the user's, else (unless `--no-job-token`) the one an
/// earlier launch of this job made, else a new one, made when `make` (the
/// launch that runs the job; one that watches only reads).
pub(super) fn job_token(
    args: &LaunchArgs,
    dir: &LaunchDir,
    make: bool,
) -> anyhow::Result<Option<String>> {
    if let Some(token) = args.serve.access.resolve()? {
        return Ok(Some(token));
    }
    if args.launch.no_job_token {
        return Ok(None);
    }
    let path = token_file(dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let token = text.lines().next().unwrap_or("").trim().to_string();
            if token.is_empty() {
                bail!("{}: the job's token is empty; remove the file to make a new one (the workers still running need a new launch then)", path.display());
            }
            return Ok(Some(token));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("{}: could not read the job's token", path.display()))
        }
    }
    if !make {
        return Ok(None);
    }
    let token = new_token()?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("{}: could not create the job's token", path.display()))?;
    file.write_all(format!("{token}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("{}: could not write the job's token", path.display()))?;
    Ok(Some(token))
}

/// 128 random bits from the kernel, as hex.
fn new_token() -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("could not make the job's token (reading /dev/urandom)")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Refuses a job of this output that runs on another input than `--input`
/// (checked against its checkpoint; a job without one yet has nothing to
/// compare).
pub(super) fn check_same_input(args: &LaunchArgs) -> anyhow::Result<()> {
    let files = args.serve.files();
    let Some(checkpoint) = Checkpoint::load(files.checkpoint())? else {
        return Ok(());
    };
    let input = &args.serve.infile;
    let plain = matches!(
        dispatcher_core::dataset::Format::of(input, false),
        Ok(Some(dispatcher_core::dataset::Format::Jsonl))
    ) && input.is_file();
    let refused = |why: String| {
        anyhow::anyhow!(
            "--input {}: the job of {} runs on another input ({why}); give the input it was started with, or another --output for a new job",
            input.display(),
            files.output().display()
        )
    };
    if plain {
        if let Err(e) = checkpoint.verify_input(files.checkpoint(), input) {
            return Err(refused(e.to_string()));
        }
        return Ok(());
    }
    // A dataset: the job reads its staged copy, made from the shards the
    // staging record lists.
    if Path::new(&checkpoint.infile) != files.staged_input() {
        return Err(refused(format!(
            "its checkpoint names {}",
            checkpoint.infile
        )));
    }
    dispatcher_core::dataset::input_lines(input, args.serve.split.as_deref(), &files)
        .map_err(|e| refused(e.to_string()))?;
    Ok(())
}
