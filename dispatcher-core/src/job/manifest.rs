//! `<outfile>.manifest.json`: how the output was made. The server's command
//! line and version, the input's path, size, line count and checksum, each
//! start and stop of the server (resumes included), and the distinct worker
//! configurations that contributed lines. Kept current as the job runs, and
//! replaced atomically (written beside, then renamed) so a reader never sees
//! half of it.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::protocol::{Hello, TokenCounts};

/// The manifest's path for `outfile`.
pub fn manifest_path(outfile: &Path) -> PathBuf {
    super::JobFiles::new(outfile, None).manifest()
}

/// The manifest as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ManifestDoc {
    /// The version of the server that last wrote it.
    pub dispatcher_version: String,
    /// The input.
    pub input: InputInfo,
    /// The output, as the server was given it.
    pub output: String,
    /// Each run of the server on this job, oldest first.
    pub runs: Vec<Run>,
    /// The distinct worker configurations that said hello, in the order
    /// first seen: the first [`MAX_CONFIGURATIONS`].
    pub worker_configurations: Vec<WorkerConfiguration>,
    /// Hellos of a configuration not among those, when there were more (a
    /// task whose settings differ from worker to worker).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub worker_configurations_unrecorded: u64,
}

/// Worker configurations a manifest records at most: each new one rewrites
/// the file, and a task whose settings name the worker would add one per
/// worker.
pub const MAX_CONFIGURATIONS: usize = 1000;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The input file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InputInfo {
    /// As the server was given it.
    pub path: String,
    /// Its size when the run started.
    pub size_bytes: u64,
    /// Its lines, once counted.
    pub lines: Option<u64>,
    /// CRC-32 of its bytes, 8 hex digits, once read.
    pub crc32: Option<String>,
}

/// One run of the server.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// Its command line.
    pub command_line: Vec<String>,
    /// Its version.
    pub version: String,
    /// When it started (RFC 3339, UTC).
    pub started_at: String,
    /// Output lines already written when it started (more than 0: a resume).
    pub lines_done_at_start: u64,
    /// When it stopped; `None` while it runs (or if it was killed).
    pub stopped_at: Option<String>,
    /// Why: `complete`, `shutdown`, or the failure.
    pub stop: Option<String>,
    /// Output lines written when it stopped.
    pub lines_done_at_stop: Option<u64>,
    /// A `--redo-errors` run: the error types it redoes (`all`, or a list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redo_errors: Option<String>,
    /// Engine tokens its workers reported, as of its last checkpoint (or
    /// its stop).
    #[serde(default, skip_serializing_if = "TokenCounts::is_empty")]
    pub tokens: TokenCounts,
}

/// How some of the lines were made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerConfiguration {
    /// The task.
    pub task: String,
    /// The version of the worker's binary.
    pub version: String,
    /// The engine.
    pub engine: String,
    /// The model.
    pub model: Option<String>,
    /// Sampling settings and the like.
    pub settings: serde_json::Map<String, serde_json::Value>,
    /// When a worker with it first said hello.
    pub first_seen_at: String,
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// The manifest of one job, in memory and on disk.
#[derive(Debug)]
pub struct Manifest {
    path: PathBuf,
    doc: ManifestDoc,
}

impl Manifest {
    /// Reads the manifest of `outfile` (a resume or a redo adds to it) or
    /// starts one, and adds this run to it. A `fresh` job (one that started
    /// without a checkpoint) starts a new manifest whatever an earlier job
    /// left at its path.
    pub fn start(
        infile: &Path,
        outfile: &Path,
        lines_done: u64,
        redo: Option<&crate::job::redo::RedoConfig>,
        fresh: bool,
    ) -> Manifest {
        let path = manifest_path(outfile);
        let mut doc = match std::fs::read(&path) {
            Ok(_) if fresh => {
                tracing::info!(
                    manifest = %path.display(),
                    "a fresh start: the manifest left beside the output describes an earlier job and is replaced"
                );
                ManifestDoc::default()
            }
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(
                    "{}: not a manifest this server can read ({e}); starting a new one",
                    path.display()
                );
                ManifestDoc::default()
            }),
            Err(_) => ManifestDoc::default(),
        };
        let version = env!("CARGO_PKG_VERSION").to_string();
        doc.dispatcher_version.clone_from(&version);
        let size_bytes = std::fs::metadata(infile).map_or(0, |m| m.len());
        let input_path = infile.display().to_string();
        if doc.input.path != input_path || doc.input.size_bytes != size_bytes {
            doc.input = InputInfo {
                path: input_path,
                size_bytes,
                lines: None,
                crc32: None,
            };
        }
        doc.output = outfile.display().to_string();
        doc.runs.push(Run {
            command_line: redacted(std::env::args()),
            version,
            started_at: now(),
            lines_done_at_start: lines_done,
            redo_errors: redo.map(|r| {
                r.kinds
                    .as_ref()
                    .map_or_else(|| "all".into(), |t| t.join(","))
            }),
            ..Run::default()
        });
        let manifest = Manifest { path, doc };
        manifest.save();
        manifest
    }

    /// The input was read to its end: its lines and checksum.
    pub fn input_read(&mut self, lines: u64, crc32: u32) {
        self.doc.input.lines = Some(lines);
        self.doc.input.crc32 = Some(format!("{crc32:08x}"));
        self.save();
    }

    /// A worker said hello: its configuration (task, version, engine,
    /// model, settings) is recorded unless a worker of this run or an
    /// earlier one had it.
    pub fn configuration(&mut self, hello: &Hello) {
        let known = self.doc.worker_configurations.iter().any(|c| {
            (&c.task, &c.version, &c.engine, &c.model, &c.settings)
                == (
                    &hello.task,
                    &hello.version,
                    &hello.engine,
                    &hello.model,
                    &hello.settings,
                )
        });
        if known {
            return;
        }
        if self.doc.worker_configurations.len() >= MAX_CONFIGURATIONS {
            // Saved with the manifest's next write (a checkpoint's).
            self.doc.worker_configurations_unrecorded += 1;
            return;
        }
        self.doc.worker_configurations.push(WorkerConfiguration {
            task: hello.task.clone(),
            version: hello.version.clone(),
            engine: hello.engine.clone(),
            model: hello.model.clone(),
            settings: hello.settings.clone(),
            first_seen_at: now(),
        });
        self.save();
    }

    /// The server stops, for `why`, with `lines_done` written.
    pub fn stop(&mut self, why: &str, lines_done: u64) {
        if let Some(run) = self.doc.runs.last_mut() {
            run.stopped_at = Some(now());
            run.stop = Some(why.to_string());
            run.lines_done_at_stop = Some(lines_done);
        }
        self.save();
    }

    /// This run's workers reported `tokens` so far: written when they
    /// changed since the last time.
    pub fn save_tokens(&mut self, tokens: TokenCounts) {
        if let Some(run) = self.doc.runs.last_mut().filter(|r| r.tokens != tokens) {
            run.tokens = tokens;
            self.save();
        }
    }

    /// Tokens of the job's earlier runs.
    pub fn earlier_tokens(&self) -> TokenCounts {
        let runs = &self.doc.runs;
        runs[..runs.len().saturating_sub(1)]
            .iter()
            .fold(TokenCounts::default(), |sum, r| sum + r.tokens)
    }

    /// What it says now.
    pub fn doc(&self) -> &ManifestDoc {
        &self.doc
    }

    /// Writes it beside and renames it into place. A manifest that cannot be
    /// written is logged, not fatal: the output is what the job is for.
    fn save(&self) {
        let written = serde_json::to_vec_pretty(&self.doc)
            .map_err(std::io::Error::other)
            .and_then(|bytes| super::files::write_atomically(&self.path, &bytes, "the manifest"));
        if let Err(e) = written {
            tracing::warn!("could not write {}: {e}", self.path.display());
        }
    }
}

/// Flags whose value is a secret: never written into a job's files.
pub const SECRET_FLAGS: &[&str] = &["--token"];

/// A command line as a job's files record it: the value of every secret
/// flag ([`SECRET_FLAGS`], as `--token T` or `--token=T`, a worker command's
/// after `--` too) replaced by `<redacted>`. The manifest travels with the
/// dataset; the token is the job's only protection.
pub fn redacted(args: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut secret_next = false;
    for arg in args {
        if std::mem::take(&mut secret_next) {
            out.push("<redacted>".into());
            continue;
        }
        if SECRET_FLAGS.contains(&arg.as_str()) {
            secret_next = true;
            out.push(arg);
        } else if let Some(flag) = SECRET_FLAGS.iter().find(|f| {
            arg.strip_prefix(**f)
                .is_some_and(|rest| rest.starts_with('='))
        }) {
            out.push(format!("{flag}=<redacted>"));
        } else {
            out.push(arg);
        }
    }
    out
}

#[cfg(test)]
mod tests {

    #[test]
    fn secrets_on_the_command_line_are_not_recorded() {
        let argv = [
            "dispatcher",
            "serve",
            "--token",
            "s3cret",
            "--port=8000",
            "--token=an0ther",
            "--",
            "w",
            "--token",
            "x",
        ];
        let kept = redacted(argv.iter().map(|s| s.to_string()));
        assert_eq!(
            kept.join(" "),
            "dispatcher serve --token <redacted> --port=8000 --token=<redacted> -- w --token <redacted>"
        );
        // `--tokenizer` is not `--token`.
        let kept = redacted(["infer", "--tokenizer=m", "--tokenizer", "m"].map(String::from));
        assert_eq!(kept.join(" "), "infer --tokenizer=m --tokenizer m");
    }

    use super::*;

    /// A fresh job in `dir` with `lines` as its input: its manifest, input
    /// and output paths.
    fn fresh_job(dir: &Path, lines: &str) -> (Manifest, PathBuf, PathBuf) {
        let (input, output) = (dir.join("in.jsonl"), dir.join("out.jsonl"));
        std::fs::write(&input, lines).unwrap();
        let m = Manifest::start(&input, &output, 0, None, true);
        (m, input, output)
    }

    #[test]
    fn a_resume_adds_a_run_and_keeps_what_was_known() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, input, output) = fresh_job(dir.path(), "1\n2\n");
        m.input_read(2, 0xdead_beef);
        let infer = Hello {
            task: "infer".into(),
            model: Some("m".into()),
            ..Hello::default()
        };
        m.configuration(&infer);
        // Another worker with the same configuration, and one with another.
        m.configuration(&Hello {
            worker: "another".into(),
            host: "elsewhere".into(),
            ..infer.clone()
        });
        m.configuration(&Hello {
            task: "judge".into(),
            ..infer.clone()
        });
        assert_eq!(m.doc().worker_configurations.len(), 2);
        m.stop("shutdown", 1);
        let again = Manifest::start(&input, &output, 1, None, false);
        let doc = again.doc();
        assert_eq!(doc.runs.len(), 2);
        assert_eq!(doc.runs[0].stop.as_deref(), Some("shutdown"));
        assert_eq!(doc.runs[0].lines_done_at_stop, Some(1));
        assert_eq!(doc.runs[1].lines_done_at_start, 1);
        assert_eq!(doc.runs[1].stopped_at, None);
        assert_eq!(doc.input.crc32.as_deref(), Some("deadbeef"));
        assert_eq!(doc.worker_configurations[0].task, "infer");
        // The file on disk says the same.
        let on_disk: ManifestDoc =
            serde_json::from_slice(&std::fs::read(manifest_path(&output)).unwrap()).unwrap();
        assert_eq!(&on_disk, doc);
        // A later run's worker of a known configuration adds nothing.
        let mut again = again;
        again.configuration(&infer);
        assert_eq!(again.doc().worker_configurations.len(), 2);
        // A fresh job at the same path starts its own.
        let fresh = Manifest::start(&input, &output, 0, None, true);
        assert_eq!(fresh.doc().runs.len(), 1);
        assert!(fresh.doc().worker_configurations.is_empty());
    }

    /// A task whose settings differ from worker to worker does not make the
    /// manifest grow with the workers: past [`MAX_CONFIGURATIONS`] they are
    /// counted, and the file says so.
    #[test]
    fn configurations_past_the_limit_are_counted_not_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, _, output) = fresh_job(dir.path(), "a\n");
        for pid in 0..MAX_CONFIGURATIONS + 5 {
            let mut settings = serde_json::Map::new();
            settings.insert("pid".into(), pid.into());
            m.configuration(&Hello {
                task: "mine".into(),
                settings,
                ..Hello::default()
            });
        }
        assert_eq!(m.doc().worker_configurations.len(), MAX_CONFIGURATIONS);
        assert_eq!(m.doc().worker_configurations_unrecorded, 5);
        m.stop("complete", 1);
        let on_disk: ManifestDoc =
            serde_json::from_slice(&std::fs::read(manifest_path(&output)).unwrap()).unwrap();
        assert_eq!(on_disk.worker_configurations_unrecorded, 5);
    }
}
