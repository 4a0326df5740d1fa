//! `--redo-errors`: a run that writes a new output beside a job's output
//! (`<output>.redo`), keeping every line of the old one except the failures
//! to redo, and puts it in place of the old one once complete.
//!
//! Before it starts, a redo checks that the input is the one the old output
//! was made from (the old checkpoint's fingerprints, as a resume does) and
//! that the old output is not longer than the input; [`RedoConfig::prepare`]
//! also reads the old output once to count what it will redo and to refuse a
//! kind that is neither dispatcher's nor found in it.

use std::collections::BTreeMap;
use std::io::{self, BufRead};
use std::path::Path;

use super::checkpoint::{Checkpoint, ResumeError};
use super::files::{remove_if_present, rename_durably, with_suffix};
use super::JobFiles;
use crate::error::IoContext;
use crate::record::{self, LineKind};

/// What to redo, and in which job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedoConfig {
    /// The job whose output is redone: its output and checkpoint.
    pub previous: JobFiles,
    /// The kinds of failure to redo, as `dispatcher report` names them
    /// ([`crate::record`]); `None`: every failure. A line that is not JSON is
    /// always redone.
    pub kinds: Option<Vec<String>>,
}

/// What the old output holds, read once before a redo.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Survey {
    /// Complete lines of the old output.
    pub lines: u64,
    /// Of those, the lines the redo hands out again.
    pub to_redo: u64,
    /// Failed (and not-JSON) lines by kind.
    pub failed: BTreeMap<String, u64>,
}

impl Survey {
    /// The failures as `kind n, kind n`, most first.
    pub fn describe(&self) -> String {
        if self.failed.is_empty() {
            return "none".into();
        }
        let mut by_count: Vec<(&String, &u64)> = self.failed.iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        by_count
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What a `--redo-errors` run is to do, decided before it starts
/// ([`RedoConfig::decide`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedoDecision {
    /// A redo had moved its new output into place but not its checkpoint
    /// (it died between the two renames); that is now done, and the output
    /// is complete.
    FinishedInterrupted,
    /// No line of the old output is a failure of the kinds asked for and
    /// none is missing: the output is left as it is.
    Nothing(Survey),
    /// Run the redo: `survey.to_redo` lines to hand out again, and `missing`
    /// lines the old output does not have yet.
    Run {
        /// What the old output holds.
        survey: Survey,
        /// Input lines past the old output's end.
        missing: u64,
    },
}

impl RedoConfig {
    /// Every decision a redo makes before it starts: refuses an old output
    /// that is missing or empty (nothing to redo), finishes a redo that died
    /// between its two renames, makes the checks of [`prepare`](Self::prepare),
    /// and says whether there is anything to run.
    pub fn decide(&self, input: &Path) -> Result<RedoDecision, ResumeError> {
        let output = self.previous.output();
        if !self.previous.redo().checkpoint().exists()
            && std::fs::metadata(output).map_or(true, |m| m.len() == 0)
        {
            return Err(ResumeError::NothingToRedo {
                output: output.to_owned(),
            });
        }
        if self.finish_interrupted(input)? {
            return Ok(RedoDecision::FinishedInterrupted);
        }
        let input_lines = crate::input::count_lines(input)?;
        let survey = self.prepare(input, input_lines)?;
        let missing = input_lines - survey.lines;
        Ok(if survey.to_redo + missing == 0 {
            RedoDecision::Nothing(survey)
        } else {
            RedoDecision::Run { survey, missing }
        })
    }

    /// Whether a line of the old output is redone.
    pub fn redoes(&self, kind: &LineKind<'_>) -> bool {
        match kind {
            LineKind::Ok => false,
            LineKind::NotJson => true,
            LineKind::Failed(kind) => self
                .kinds
                .as_ref()
                .is_none_or(|kinds| kinds.iter().any(|k| k == kind)),
        }
    }

    /// The checks a redo makes before it starts, and what it will do: the
    /// input must be the old output's (see [`check_input`](Self::check_input)),
    /// the old output no longer than the input (`input_lines`), and every
    /// kind asked for one that dispatcher writes or that the old output holds.
    pub fn prepare(&self, input: &Path, input_lines: u64) -> Result<Survey, ResumeError> {
        self.check_input(input)?;
        let output = self.previous.output();
        let survey = survey(output, self)?;
        if survey.lines > input_lines {
            return Err(ResumeError::OutputLongerThanInput {
                input: input.to_owned(),
                output: output.to_owned(),
                output_lines: survey.lines,
                input_lines,
            });
        }
        for kind in self.kinds.iter().flatten() {
            if !record::is_builtin_kind(kind) && !survey.failed.contains_key(kind) {
                return Err(ResumeError::UnknownKind {
                    kind: kind.clone(),
                    output: output.to_owned(),
                    found: survey.describe(),
                });
            }
        }
        Ok(survey)
    }

    /// Refuses a redo whose input is not the one the old output was made
    /// from, as a resume would: the old checkpoint must exist and match the
    /// input and the old output.
    pub fn check_input(&self, input: &Path) -> Result<(), ResumeError> {
        let (output, checkpoint) = (self.previous.output(), self.previous.checkpoint());
        match Checkpoint::load(checkpoint)? {
            Some(cp) => cp.verify(checkpoint, input, output).map(drop),
            None => Err(ResumeError::OutputWithoutCheckpoint {
                output: output.to_owned(),
                checkpoint: checkpoint.to_owned(),
                len: std::fs::metadata(output).map_or(0, |m| m.len()),
            }),
        }
    }

    /// A redo whose new output was moved into place but not its checkpoint
    /// (the process died between the two renames): moves the checkpoint once
    /// it is checked against the output now in place, and cleans up.
    /// `Ok(true)` when it did: the redo is complete.
    pub fn finish_interrupted(&self, input: &Path) -> Result<bool, ResumeError> {
        let new = self.previous.redo();
        if new.output().exists() || !new.checkpoint().exists() {
            return Ok(false);
        }
        let cp =
            Checkpoint::load(new.checkpoint())?.ok_or_else(|| ResumeError::CorruptCheckpoint {
                path: new.checkpoint().to_owned(),
                reason: "it vanished while being read".into(),
            })?;
        cp.verify(new.checkpoint(), input, self.previous.output())?;
        self.replace_checkpoint()?;
        Ok(true)
    }

    /// Puts the complete new output and its checkpoint in place of the old
    /// ones and removes the redo's other files. Each rename is atomic and
    /// durable; a crash between the two is finished by the next run
    /// ([`finish_interrupted`](Self::finish_interrupted)), and a plain serve
    /// refuses to start meanwhile ([`refuse_unfinished`]).
    pub fn replace(&self) -> io::Result<()> {
        let new = self.previous.redo();
        rename_durably(new.output(), self.previous.output())?;
        self.replace_checkpoint()
    }

    fn replace_checkpoint(&self) -> io::Result<()> {
        let new = self.previous.redo();
        rename_durably(new.checkpoint(), self.previous.checkpoint())?;
        remove_if_present(&new.journal())?;
        remove_if_present(&new.pending())?;
        remove_if_present(&with_suffix(new.checkpoint(), ".lock"))
    }
}

/// Refuses to start a plain run over a job whose redo is unfinished: the
/// redo's files would be left to trip over later.
pub fn refuse_unfinished(job: &JobFiles) -> Result<(), ResumeError> {
    let redo = job.redo();
    let leftover = [redo.output(), redo.checkpoint()]
        .into_iter()
        .find(|p| p.exists())
        .map(Path::to_owned);
    match leftover {
        Some(leftover) => Err(ResumeError::UnfinishedRedo {
            leftover,
            output: job.output().to_owned(),
            redo_output: redo.output().to_owned(),
            redo_checkpoint: redo.checkpoint().to_owned(),
        }),
        None => Ok(()),
    }
}

/// Reads the old output once: its lines, its failures by kind, and how many
/// lines `redo` hands out again.
fn survey(output: &Path, redo: &RedoConfig) -> io::Result<Survey> {
    let file = std::fs::File::open(output).with_path("open the output to redo", output)?;
    let mut reader = io::BufReader::with_capacity(1 << 20, file);
    let mut survey = Survey::default();
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .with_path("read the output to redo", output)?;
        // A torn last line is redone like a missing one: not a line.
        if n == 0 || line.last() != Some(&b'\n') {
            return Ok(survey);
        }
        survey.lines += 1;
        let kind = record::classify(&line[..n - 1]);
        if redo.redoes(&kind) {
            survey.to_redo += 1;
        }
        if kind.is_failure() {
            *survey.failed.entry(kind.name().to_string()).or_default() += 1;
        }
    }
}
