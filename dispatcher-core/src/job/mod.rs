//! A job's files, owned in one place: every path beside the output, the
//! locks, the checks that the files on disk belong to this job, their
//! cleaning when the job is done, and the redo's swap.
//!
//! A job writing `out.jsonl` (with the default `--checkpoint`) has:
//!
//! | file | what | when it goes away |
//! |---|---|---|
//! | `out.jsonl` | the output | never |
//! | `out.jsonl.checkpoint` | the resume state; names the job (`job_id`) | never (a finished job's is how a redo and `report` know the output) |
//! | `out.jsonl.manifest.json` | how the output was made | never |
//! | `out.jsonl.checkpoint.lock` | the lock of a running job | when the job stops |
//! | `out.jsonl.journal` | engine responses of unfinished lines; bound to the job's `job_id` | when the job is complete; a fresh start removes a stale one |
//! | `out.jsonl.pending` | results spilled past `--max-pending-mib` | when nothing waits, and at every start |
//! | `out.jsonl.input.jsonl`, `out.jsonl.input.json` | a dataset input (compressed, Parquet, Arrow, shards) staged as JSONL, and what it was made from | never: a resume, a redo and an `--overwrite` rerun of the same shards reuse it; delete it with the job |
//! | `out.jsonl.redo` (+ `.checkpoint`, `.journal`, ...) | a `--redo-errors` run's new output and its files | moved over the old ones when the redo is complete |
//!
//! Layout: [`checkpoint`] (the resume state and its checks), [`files`]
//! (locks, file identity, durable renames), [`manifest`], [`redo`] (what a
//! redo keeps, its checks and its swap).

pub mod checkpoint;
pub mod files;
pub mod manifest;
pub mod redo;

use std::io;
use std::path::{Path, PathBuf};

use checkpoint::{Checkpoint, ResumeError};
use files::{remove_if_present, with_suffix, JobLock};

/// The paths of one job, from its output (and its checkpoint, when one is
/// named).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFiles {
    output: PathBuf,
    checkpoint: PathBuf,
}

/// A job's files opened for writing: the lock is held, and the checkpoint
/// (if any) was checked against the input and the output.
#[derive(Debug)]
pub struct OpenedJob {
    /// Held while the job runs.
    pub lock: JobLock,
    /// The checkpoint on disk; `None` for a fresh start.
    pub checkpoint: Option<Checkpoint>,
    /// The job's identity: the checkpoint's, or a new one for a fresh start.
    pub job_id: String,
    /// What checking the checkpoint read of the input (nothing for a fresh
    /// start), so that counting the input goes on from there.
    pub input_prefix: crate::input::InputPrefix,
}

impl JobFiles {
    /// The files of the job writing `output`, checkpointing to `checkpoint`
    /// (default `<output>.checkpoint`).
    pub fn new(output: impl Into<PathBuf>, checkpoint: Option<PathBuf>) -> JobFiles {
        let output = output.into();
        let checkpoint = checkpoint.unwrap_or_else(|| with_suffix(&output, ".checkpoint"));
        JobFiles { output, checkpoint }
    }

    /// The output.
    pub fn output(&self) -> &Path {
        &self.output
    }

    /// The checkpoint.
    pub fn checkpoint(&self) -> &Path {
        &self.checkpoint
    }

    /// Results spilled while they wait for an earlier line.
    pub fn pending(&self) -> PathBuf {
        with_suffix(&self.output, ".pending")
    }

    /// The journal of engine responses.
    pub fn journal(&self) -> PathBuf {
        with_suffix(&self.output, ".journal")
    }

    /// The manifest.
    pub fn manifest(&self) -> PathBuf {
        with_suffix(&self.output, ".manifest.json")
    }

    /// A dataset input staged as JSONL (see [`crate::dataset`]).
    pub fn staged_input(&self) -> PathBuf {
        with_suffix(&self.output, ".input.jsonl")
    }

    /// What the staged input was made from: the dataset's shards, their
    /// sizes and times, their lines.
    pub fn staged_record(&self) -> PathBuf {
        with_suffix(&self.output, ".input.json")
    }

    /// The files of a `--redo-errors` run of this job: `<output>.redo` and
    /// its checkpoint `<output>.redo.checkpoint`.
    pub fn redo(&self) -> JobFiles {
        JobFiles::new(with_suffix(&self.output, ".redo"), None)
    }

    /// Takes the job's locks (refusing an input that is one of its files) and
    /// reads and checks its checkpoint. A fresh start (no checkpoint) refuses
    /// an output with content, and removes what an earlier job left beside
    /// it (a journal, spilled results), so nothing of another job is reused.
    pub fn open(&self, input: &Path) -> Result<OpenedJob, ResumeError> {
        let lock = JobLock::acquire(input, &self.output, &self.checkpoint)?;
        // Results spilled by an earlier run were never written: those lines
        // are redone, so the file is stale. So are the temporary files of a
        // replacement the last run died in the middle of.
        remove_if_present(&self.pending())?;
        for replaced in [self.checkpoint.clone(), self.journal(), self.manifest()] {
            remove_if_present(&with_suffix(&replaced, ".tmp"))?;
        }
        let checkpoint = Checkpoint::load(&self.checkpoint)?;
        let mut input_prefix = crate::input::InputPrefix::default();
        let job_id = match &checkpoint {
            Some(cp) => {
                input_prefix = cp.verify(&self.checkpoint, input, &self.output)?;
                cp.job_id.clone()
            }
            None => {
                match std::fs::metadata(&self.output) {
                    Ok(m) if m.len() > 0 => {
                        return Err(ResumeError::OutputWithoutCheckpoint {
                            output: self.output.clone(),
                            checkpoint: self.checkpoint.clone(),
                            len: m.len(),
                        })
                    }
                    _ => {}
                }
                if self.journal().exists() {
                    tracing::info!(
                        journal = %self.journal().display(),
                        "a fresh start: the journal left beside the output belongs to an earlier job and is removed"
                    );
                    remove_if_present(&self.journal())?;
                }
                new_job_id()
            }
        };
        Ok(OpenedJob {
            lock,
            checkpoint,
            job_id,
            input_prefix,
        })
    }

    /// Moves every file of the job that exists (the output, its checkpoint,
    /// manifest, journal, spilled results, and a redo's files) aside, each
    /// renamed `<file>.<stamp>` (`stamp`: the time, e.g. `20261204T042600Z`),
    /// so that the job starts over without losing anything; the job's lock is
    /// held meanwhile, so a running job is refused. Returns the files moved.
    pub fn move_aside(&self, input: &Path, stamp: &str) -> Result<Vec<PathBuf>, ResumeError> {
        let lock = JobLock::acquire(input, &self.output, &self.checkpoint)?;
        let redo = self.redo();
        let files = [
            self.output.clone(),
            self.checkpoint.clone(),
            self.manifest(),
            self.journal(),
            self.pending(),
            redo.output.clone(),
            redo.checkpoint.clone(),
            redo.journal(),
        ];
        let mut moved = Vec::new();
        for file in files {
            // The output was created by taking the lock; an empty one is no job.
            if file == self.output && std::fs::metadata(&file).map_or(true, |m| m.len() == 0) {
                continue;
            }
            if file.exists() {
                files::rename_durably(&file, &with_suffix(&file, &format!(".{stamp}")))?;
                moved.push(file);
            }
        }
        lock.release();
        Ok(moved)
    }

    /// The job is complete: removes what only a running job needs (the
    /// journal, spilled results) and releases the lock, leaving the output,
    /// its checkpoint and the manifest.
    pub fn finish(&self, lock: JobLock) -> io::Result<()> {
        remove_if_present(&self.journal())?;
        remove_if_present(&self.pending())?;
        lock.release();
        Ok(())
    }
}

/// A new job's identity: 16 hex digits from the clock, the process id and
/// the standard library's per-process random hash keys. Unique enough to
/// tell one job's files from another's; not a secret.
fn new_job_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    h.write_u128(now.as_nanos());
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_of_a_job_sits_beside_its_output() {
        let job = JobFiles::new("/data/out.jsonl", None);
        assert_eq!(job.checkpoint(), Path::new("/data/out.jsonl.checkpoint"));
        assert_eq!(job.journal(), Path::new("/data/out.jsonl.journal"));
        assert_eq!(job.pending(), Path::new("/data/out.jsonl.pending"));
        assert_eq!(job.manifest(), Path::new("/data/out.jsonl.manifest.json"));
        let redo = job.redo();
        assert_eq!(redo.output(), Path::new("/data/out.jsonl.redo"));
        assert_eq!(
            redo.checkpoint(),
            Path::new("/data/out.jsonl.redo.checkpoint")
        );
        let named = JobFiles::new("out.jsonl", Some("/ckpt/job.cp".into()));
        assert_eq!(named.checkpoint(), Path::new("/ckpt/job.cp"));
    }

    #[test]
    fn moving_a_job_aside_keeps_every_file_under_a_stamped_name() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.jsonl");
        std::fs::write(&input, "1\n").unwrap();
        let job = JobFiles::new(dir.path().join("out.jsonl"), None);
        std::fs::write(job.output(), "one\n").unwrap();
        std::fs::write(job.checkpoint(), "{}").unwrap();
        std::fs::write(job.manifest(), "{}").unwrap();
        let moved = job.move_aside(&input, "20261204T000000Z").unwrap();
        assert_eq!(moved.len(), 3);
        assert!(!job.output().exists() || std::fs::metadata(job.output()).unwrap().len() == 0);
        assert!(!job.checkpoint().exists());
        let kept = dir.path().join("out.jsonl.20261204T000000Z");
        assert_eq!(std::fs::read_to_string(kept).unwrap(), "one\n");
        assert!(dir
            .path()
            .join("out.jsonl.manifest.json.20261204T000000Z")
            .exists());
        // A job held by another process is not moved.
        let _running = JobLock::acquire(&input, job.output(), job.checkpoint()).unwrap();
        std::fs::write(job.checkpoint(), "{}").unwrap();
        assert!(job.move_aside(&input, "later").is_err());
        assert!(job.checkpoint().exists());
    }

    #[test]
    fn job_ids_differ() {
        assert_ne!(new_job_id(), new_job_id());
        assert_eq!(new_job_id().len(), 16);
    }
}
