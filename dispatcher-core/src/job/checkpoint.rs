//! The resume state: how far the output is known to be durable and how to check
//! that the files on disk are still the ones it describes.
//!
//! A checkpoint is written atomically (temporary file, fsync, rename, fsync of the
//! directory) only after the output it names has been synced, so the output is
//! never shorter than its checkpoint says unless someone changed it by hand.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::files::write_atomically;
use crate::error::{path_error, IoContext};
use crate::input::{count_line_breaks, read_exact_at, scan_prefix, InputPrefix};

/// The checkpoint file format's version.
const VERSION: u32 = 1;
/// Bytes of the input's start that identify the input file.
const HEAD_BYTES: u64 = 64 * 1024;
/// Bytes before a checkpointed offset that must still be the same on resume.
const TAIL_BYTES: u64 = 4 * 1024;

/// The resume state written to `--checkpoint`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Format version.
    pub version: u32,
    /// The job's identity, made at its fresh start: the journal beside the
    /// output must carry the same. Empty in checkpoints written before it was
    /// introduced.
    #[serde(default)]
    pub job_id: String,
    /// The input path the checkpoint was made for (informational).
    pub infile: String,
    /// The output path the checkpoint was made for (informational).
    pub outfile: String,
    /// Output lines known to be durable: lines `0..lines_written` are done.
    pub lines_written: u64,
    /// Byte offset in the input of line `lines_written`.
    pub input_offset: u64,
    /// Byte length of the output holding those lines.
    pub output_offset: u64,
    /// How many bytes of the input's start `input_head_crc` covers.
    pub input_head_len: u64,
    /// CRC-32 of the input's first `input_head_len` bytes.
    pub input_head_crc: u32,
    /// CRC-32 of up to 4 KiB of input before `input_offset`.
    pub input_tail_crc: u32,
    /// CRC-32 of up to 4 KiB of output before `output_offset`.
    pub output_tail_crc: u32,
}

/// Why a server cannot resume from what is on disk.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResumeError {
    /// A file could not be read or written (the message names it).
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The checkpoint file is not one this server wrote.
    #[error("the checkpoint {path} cannot be read ({reason}); if it is damaged, move it away together with the output file and start over")]
    CorruptCheckpoint {
        /// The checkpoint's path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The input file is not the one the checkpoint was made for.
    #[error("the input {input} does not match the checkpoint {checkpoint}: {reason}; restart with the original input, or move the checkpoint and output away to start over")]
    InputMismatch {
        /// The input's path.
        input: PathBuf,
        /// The checkpoint's path.
        checkpoint: PathBuf,
        /// What differs.
        reason: String,
    },
    /// The output file is not the one the checkpoint describes.
    #[error("the output {output} does not match the checkpoint {checkpoint}: {reason}; restore the output, or move the checkpoint and output away to start over")]
    OutputMismatch {
        /// The output's path.
        output: PathBuf,
        /// The checkpoint's path.
        checkpoint: PathBuf,
        /// What differs.
        reason: String,
    },
    /// An output file with content exists but there is no checkpoint for it.
    #[error("the output {output} already holds {len} bytes but there is no checkpoint {checkpoint}: it may belong to another job; move it away, or pass the --checkpoint of the run that wrote it")]
    OutputWithoutCheckpoint {
        /// The output's path.
        output: PathBuf,
        /// The checkpoint path that was looked for.
        checkpoint: PathBuf,
        /// The output's size.
        len: u64,
    },
    /// Another process serves the same files.
    #[error("another process is serving {checkpoint} (its lock on {lock} is held); stop it first, or give this job its own --outfile/--checkpoint")]
    Locked {
        /// The checkpoint's path.
        checkpoint: PathBuf,
        /// The file whose lock is held (`<checkpoint>.lock` or the output).
        lock: PathBuf,
    },
    /// Two of the job's files are one file.
    #[error("{first} and {second} name the same file ({path}): the job would overwrite one with the other; give each its own path")]
    SameFile {
        /// The first flag.
        first: &'static str,
        /// The second flag.
        second: &'static str,
        /// The path given to the second.
        path: PathBuf,
    },
    /// `--redo-errors` names a kind that no line has and dispatcher never writes.
    #[error("--redo-errors {kind}: no line of {output} failed with that kind, and it is none of the kinds dispatcher writes (the failures in it: {found}); `dispatcher report {output}` lists them")]
    UnknownKind {
        /// The kind asked for.
        kind: String,
        /// The output to redo.
        output: PathBuf,
        /// The failures the output holds, by kind.
        found: String,
    },
    /// `--redo-errors` over an output that is missing or empty.
    #[error("--redo-errors: {output} does not exist or is empty, so there is nothing to redo; run the job without --redo-errors")]
    NothingToRedo {
        /// The job's output.
        output: PathBuf,
    },
    /// A plain run over a job whose `--redo-errors` run is unfinished.
    #[error("{leftover} is left from an unfinished --redo-errors run of {output}: finish it by running again with --redo-errors (and the same kinds), or remove {redo_output} and {redo_checkpoint} to drop it")]
    UnfinishedRedo {
        /// The file found.
        leftover: PathBuf,
        /// The job's output.
        output: PathBuf,
        /// The redo's output.
        redo_output: PathBuf,
        /// The redo's checkpoint.
        redo_checkpoint: PathBuf,
    },
    /// The output has more lines than the input.
    #[error("the output {output} has {output_lines} lines but the input {input} has only {input_lines}: they do not belong together; move the output and checkpoint away to start over")]
    OutputLongerThanInput {
        /// The input's path.
        input: PathBuf,
        /// The output's path.
        output: PathBuf,
        /// Lines in the output.
        output_lines: u64,
        /// Lines in the input.
        input_lines: u64,
    },
}

impl Checkpoint {
    /// Describes the state "lines `0..lines_written` are in the first
    /// `output_offset` bytes of `outfile`, and line `lines_written` starts at
    /// `input_offset` of `infile`", with fingerprints of both files.
    pub fn capture(
        job_id: &str,
        infile: &Path,
        outfile: &Path,
        lines_written: u64,
        input_offset: u64,
        output_offset: u64,
    ) -> io::Result<Checkpoint> {
        let input = File::open(infile).with_path("open the input file", infile)?;
        let input_len = input
            .metadata()
            .with_path("stat the input file", infile)?
            .len();
        let input_head_len = input_len.min(HEAD_BYTES);
        let input_head_crc = crc_at(&input, 0, input_head_len, infile)?;
        let input_tail_crc = crc_before(&input, input_offset, infile)?;
        let output_tail_crc = if output_offset == 0 {
            crc32fast::hash(&[])
        } else {
            let output = File::open(outfile).with_path("open the output file", outfile)?;
            crc_before(&output, output_offset, outfile)?
        };
        Ok(Checkpoint {
            version: VERSION,
            job_id: job_id.to_string(),
            infile: infile.display().to_string(),
            outfile: outfile.display().to_string(),
            lines_written,
            input_offset,
            output_offset,
            input_head_len,
            input_head_crc,
            input_tail_crc,
            output_tail_crc,
        })
    }

    /// Reads the checkpoint at `path`; `Ok(None)` when there is none.
    pub fn load(path: &Path) -> Result<Option<Checkpoint>, ResumeError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(path_error(e, "read the checkpoint", path).into()),
        };
        let cp: Checkpoint =
            serde_json::from_slice(&bytes).map_err(|e| ResumeError::CorruptCheckpoint {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        if cp.version != VERSION {
            return Err(ResumeError::CorruptCheckpoint {
                path: path.to_owned(),
                reason: format!("format version {} is not {VERSION}", cp.version),
            });
        }
        Ok(Some(cp))
    }

    /// Checks that `infile` is the input this checkpoint was taken over
    /// (its first bytes and those before the checkpoint's offset), as
    /// [`verify`](Self::verify) does before a resume; returns it open.
    pub fn verify_input(&self, checkpoint: &Path, infile: &Path) -> Result<File, ResumeError> {
        let input_mismatch = |reason: String| ResumeError::InputMismatch {
            input: infile.to_owned(),
            checkpoint: checkpoint.to_owned(),
            reason,
        };
        let input = File::open(infile).with_path("open the input file", infile)?;
        let input_len = input
            .metadata()
            .with_path("stat the input file", infile)?
            .len();
        if input_len < self.input_offset.max(self.input_head_len) {
            return Err(input_mismatch(format!(
                "it has {input_len} bytes, the checkpoint expects at least {}",
                self.input_offset.max(self.input_head_len)
            )));
        }
        if crc_at(&input, 0, self.input_head_len, infile)? != self.input_head_crc
            || crc_before(&input, self.input_offset, infile)? != self.input_tail_crc
        {
            return Err(input_mismatch("its content differs".into()));
        }
        Ok(input)
    }

    /// Checks that `infile` and `outfile` are still the files this checkpoint
    /// describes. Returns what the one read of the input's checkpointed part
    /// found (its lines and CRC-32), so that nothing reads it again.
    pub fn verify(
        &self,
        checkpoint: &Path,
        infile: &Path,
        outfile: &Path,
    ) -> Result<InputPrefix, ResumeError> {
        let input_mismatch = |reason: String| ResumeError::InputMismatch {
            input: infile.to_owned(),
            checkpoint: checkpoint.to_owned(),
            reason,
        };
        let output_mismatch = |reason: String| ResumeError::OutputMismatch {
            output: outfile.to_owned(),
            checkpoint: checkpoint.to_owned(),
            reason,
        };
        let input = self.verify_input(checkpoint, infile)?;
        let output_len = match std::fs::metadata(outfile) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(path_error(e, "stat the output file", outfile).into()),
        };
        if output_len < self.output_offset {
            return Err(output_mismatch(format!(
                "it has {output_len} bytes, but {} lines in {} bytes were written (was it truncated?)",
                self.lines_written, self.output_offset
            )));
        }
        // Nothing of the output to check when the checkpoint names none of it.
        let output = match self.output_offset {
            0 => None,
            _ => Some(File::open(outfile).with_path("open the output file", outfile)?),
        };
        if let Some(output) = &output {
            if crc_before(output, self.output_offset, outfile)? != self.output_tail_crc {
                return Err(output_mismatch(format!(
                    "its content before byte {} differs from what was written",
                    self.output_offset
                )));
            }
        }
        // The counts must agree with the files: a checkpoint edited by hand
        // or damaged in a way its fingerprints do not cover would shift every
        // later work id. The two files are counted side by side.
        let (input_lines, output_lines) = std::thread::scope(|scope| {
            let input_lines = scope.spawn(|| scan_prefix(&input, self.input_offset));
            let output_lines = match &output {
                Some(output) => count_line_breaks(output, self.output_offset),
                None => Ok((0, true)),
            };
            (
                input_lines.join().expect("counting does not panic"),
                output_lines,
            )
        });
        let (output_lines, _) = output_lines.with_path("read the output file", outfile)?;
        if output_lines != self.lines_written {
            return Err(output_mismatch(format!(
                "its first {} bytes hold {output_lines} lines, but the checkpoint says {} were written",
                self.output_offset, self.lines_written
            )));
        }
        // The line before the input offset may lack its newline: the input's
        // last line.
        let (prefix, ends_in_newline) = input_lines.with_path("read the input file", infile)?;
        let input_lines = prefix.line_breaks + u64::from(!ends_in_newline);
        if input_lines != self.lines_written {
            return Err(input_mismatch(format!(
                "its first {} bytes hold {input_lines} lines, but the checkpoint says {} were done",
                self.input_offset, self.lines_written
            )));
        }
        Ok(prefix)
    }

    /// Writes the checkpoint atomically: temporary file, fsync, rename, fsync of
    /// the directory.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(self).expect("checkpoint serializes");
        write_atomically(path, &json, "the checkpoint")
    }
}

fn crc_at(file: &File, offset: u64, len: u64, path: &Path) -> io::Result<u32> {
    let bytes = read_exact_at(file, offset, len as usize).with_path("read", path)?;
    Ok(crc32fast::hash(&bytes))
}

fn crc_before(file: &File, offset: u64, path: &Path) -> io::Result<u32> {
    let len = offset.min(TAIL_BYTES);
    crc_at(file, offset - len, len, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_verify_round_trip_and_detects_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (inp, out, cp) = (
            dir.path().join("in"),
            dir.path().join("out"),
            dir.path().join("cp"),
        );
        std::fs::write(&inp, b"a\nb\nc\n").unwrap();
        std::fs::write(&out, b"1\n2\n").unwrap();
        let c = Checkpoint::capture("job", &inp, &out, 2, 4, 4).unwrap();
        c.save(&cp).unwrap();
        assert!(!super::super::files::with_suffix(&cp, ".tmp").exists());
        let loaded = Checkpoint::load(&cp).unwrap().unwrap();
        assert_eq!(loaded, c);
        let prefix = loaded.verify(&cp, &inp, &out).unwrap();
        assert_eq!((prefix.len, prefix.line_breaks), (4, 2));
        assert_eq!(prefix.crc32, crc32fast::hash(b"a\nb\n"));

        std::fs::write(&out, b"1\n").unwrap();
        let e = loaded.verify(&cp, &inp, &out).unwrap_err();
        assert!(matches!(e, ResumeError::OutputMismatch { .. }), "{e}");
        assert!(e.to_string().contains("truncated"), "{e}");

        std::fs::write(&out, b"1\n2\n").unwrap();
        std::fs::write(&inp, b"x\ny\nz\n").unwrap();
        let e = loaded.verify(&cp, &inp, &out).unwrap_err();
        assert!(matches!(e, ResumeError::InputMismatch { .. }), "{e}");
    }

    #[test]
    fn a_damaged_checkpoint_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let cp = dir.path().join("cp");
        std::fs::write(&cp, b"{not json").unwrap();
        let e = Checkpoint::load(&cp).unwrap_err();
        assert!(e.to_string().contains(&cp.display().to_string()), "{e}");
        assert!(Checkpoint::load(&dir.path().join("none"))
            .unwrap()
            .is_none());
    }
}
