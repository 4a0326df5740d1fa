//! `dispatcher run-batch`: a file in the OpenAI Batch API's format, run as a
//! built-in task on the same runtime as every task (order, retries,
//! preemption release, resume), locally or through a dispatcher server.
//!
//! Each input line is `{"custom_id", "method": "POST", "url", "body"}`; its
//! body goes to the engine's endpoint as it is. Each output line is
//! `{"id", "custom_id", "response": {"status_code", "request_id", "body"},
//! "error"}`: an engine's error answer is a `response` with its status; a line
//! that cannot be sent is `"response": null` with an `error`.

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use dispatcher_core::engine::{BoxFuture, RawRequest, RequestError};
use dispatcher_core::job::files::check_distinct;
use dispatcher_core::job::JobFiles;
use dispatcher_core::record;
use dispatcher_core::task::{DynTask, LineOutcome, OutcomeKind, TaskContext, TaskError};
use serde_json::{json, Value};

use crate::worker::{self, EngineArgs, WorkArgs};

/// The endpoints a batch line may name, and where each goes under the API base.
const ENDPOINTS: [(&str, &str); 3] = [
    ("/v1/chat/completions", "/chat/completions"),
    ("/v1/completions", "/completions"),
    ("/v1/embeddings", "/embeddings"),
];

/// Flags of `dispatcher run-batch`.
#[derive(Debug, Clone, Args)]
pub struct RunBatchArgs {
    /// Send each body's own `model` instead of the engine's served model.
    #[arg(long)]
    pub keep_model: bool,
    /// Local mode: also write the lines that failed (an `error`, or a
    /// response status of 400 or more: what `dispatcher report` counts as
    /// failed) to this file, once the output is complete. It must be a file
    /// of its own, not the input, the output or one of the job's files.
    #[arg(long, value_name = "PATH")]
    pub error_file: Option<PathBuf>,
    /// Where items come from: -i/--input-file and -o/--output-file (local), or
    /// --dispatcher HOST:PORT.
    #[command(flatten)]
    pub work: WorkArgs,
    /// The engine.
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// The built-in task of `dispatcher run-batch`.
#[derive(Debug, Clone, Default)]
pub struct RunBatch {
    /// Send each body's own `model`.
    pub keep_model: bool,
}

/// A batch line that cannot be sent: its `error.code` and message.
struct LineError {
    code: &'static str,
    message: String,
}

fn line_error(code: &'static str, message: impl Into<String>) -> LineError {
    LineError {
        code,
        message: message.into(),
    }
}

/// The parts of a batch line: its custom_id (for the error line too, when
/// there is one), and what to send.
fn parse_line(content: &str, work_id: u64) -> (Value, Result<(String, Value), LineError>) {
    let line = work_id + 1;
    let v: Value = match serde_json::from_str(content) {
        Ok(v) => v,
        Err(e) => {
            return (
                Value::Null,
                Err(line_error(
                    "invalid_json",
                    format!("input line {line} is not JSON: {e}"),
                )),
            )
        }
    };
    let custom_id = v.get("custom_id").cloned().unwrap_or(Value::Null);
    let parts = (|| {
        if !v.is_object() {
            return Err(line_error(
                "invalid_request",
                format!("input line {line} is not a JSON object"),
            ));
        }
        if !custom_id.is_string() {
            return Err(line_error(
                "missing_custom_id",
                format!("input line {line} has no \"custom_id\" string"),
            ));
        }
        let method = v.get("method").and_then(Value::as_str).unwrap_or("");
        if !method.eq_ignore_ascii_case("POST") {
            return Err(line_error(
                "unsupported_method",
                format!("input line {line}: \"method\" must be \"POST\", not {method:?}"),
            ));
        }
        let url = v.get("url").and_then(Value::as_str).unwrap_or("");
        let Some((_, path)) = ENDPOINTS.iter().find(|(u, _)| *u == url) else {
            return Err(line_error(
                "unsupported_url",
                format!(
                    "input line {line}: \"url\" must be one of {}, not {url:?}",
                    ENDPOINTS.map(|(u, _)| u).join(", ")
                ),
            ));
        };
        match v.get("body") {
            Some(body @ Value::Object(_)) => Ok((path.to_string(), body.clone())),
            _ => Err(line_error(
                "invalid_body",
                format!("input line {line}: \"body\" must be a JSON object"),
            )),
        }
    })();
    (custom_id, parts)
}

impl RunBatch {
    async fn run(self, content: String, ctx: TaskContext) -> LineOutcome {
        let id = format!("batch_req_{}", ctx.work_id());
        let (custom_id, parts) = parse_line(&content, ctx.work_id());
        let failed = |e: LineError| LineOutcome::Line {
            line: record::batch_line(&id, &custom_id, Value::Null, Some((e.code, &e.message))),
            kind: OutcomeKind::Failed,
        };
        let (path, body) = match parts {
            Ok(parts) => parts,
            Err(e) => return failed(e),
        };
        let request = RawRequest {
            path,
            body,
            keep_model: self.keep_model,
            engine: None,
        };
        match ctx.post(request).await {
            Ok(answer) => {
                let request_id = answer
                    .body
                    .get("id")
                    .and_then(Value::as_str)
                    .map_or_else(|| format!("req_{}", ctx.work_id()), String::from);
                let ok = (200..300).contains(&answer.status);
                let response = json!({"status_code": answer.status, "request_id": request_id, "body": answer.body});
                LineOutcome::Line {
                    line: record::batch_line(&id, &custom_id, response, None),
                    kind: if ok {
                        OutcomeKind::Ok
                    } else {
                        OutcomeKind::Failed
                    },
                }
            }
            // The engine is gone: the line goes back to the dispatcher (and
            // the worker stops), as for every task; it is not written as failed.
            Err(e @ RequestError::Unavailable(_)) => {
                LineOutcome::EngineUnavailable(TaskError::from(e).to_string())
            }
            Err(e) => failed(line_error("engine_error", e.to_string())),
        }
    }
}

impl DynTask for RunBatch {
    fn name(&self) -> &'static str {
        "run-batch"
    }

    fn run_line(&self, content: String, ctx: TaskContext) -> BoxFuture<'static, LineOutcome> {
        Box::pin(self.clone().run(content, ctx))
    }

    fn settings(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("keep_model".into(), self.keep_model.into());
        m
    }
}

/// Once a local run's output is complete: writes the failed lines to
/// `error_file` (when given) and warns about duplicate `custom_id`s (the
/// hosted API refuses a file with them; here each line still has its own
/// output line). Returns (failed lines, duplicate custom_ids).
pub fn finish_output(output: &Path, error_file: Option<&Path>) -> anyhow::Result<(u64, u64)> {
    let reader = std::io::BufReader::new(
        std::fs::File::open(output).with_context(|| format!("reading {}", output.display()))?,
    );
    let mut errors = match error_file {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("--error-file {}: could not create it", path.display()))?,
        )),
        None => None,
    };
    let mut seen = HashSet::new();
    let (mut failed, mut duplicates) = (0, 0);
    for (i, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", output.display()))?;
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if let Some(id) = v["custom_id"].as_str() {
            if !seen.insert(id.to_string()) {
                duplicates += 1;
                if duplicates <= 10 {
                    tracing::warn!(
                        "custom_id {id:?} of input line {} was seen before: the hosted Batch API refuses duplicate custom_ids",
                        i + 1
                    );
                }
            }
        }
        // What failed is what `report` and `--redo-errors` say failed.
        if record::classify(line.as_bytes()).is_failure() {
            failed += 1;
            if let Some(w) = &mut errors {
                writeln!(w, "{line}")?;
            }
        }
    }
    if let Some(mut w) = errors {
        w.flush()?;
    }
    if duplicates > 10 {
        tracing::warn!("{duplicates} lines in all repeat a custom_id seen before");
    }
    Ok((failed, duplicates))
}

/// Refuses an `--error-file` that is the input, the output or one of the
/// job's files (links and other spellings included): it is created anew, so
/// it would wipe them.
fn check_error_file(error_file: &Path, input: &Path, output: &Path) -> anyhow::Result<()> {
    let job = JobFiles::new(output, None);
    let (checkpoint, journal, manifest) = (job.checkpoint(), job.journal(), job.manifest());
    check_distinct(&[
        ("--input-file", input),
        ("--output-file", output),
        ("the output's checkpoint", checkpoint),
        ("the output's journal", &journal),
        ("the output's manifest", &manifest),
        ("--error-file", error_file),
    ])?;
    Ok(())
}

/// Runs `dispatcher run-batch`.
pub async fn run(args: RunBatchArgs) -> anyhow::Result<()> {
    let output = args.work.outdir.output(args.work.output.as_deref());
    if args.error_file.is_some() && output.is_none() {
        anyhow::bail!(
            "--error-file needs local mode (-i/-o): with --dispatcher the output is the server's; take the failed lines from it with `jq -c 'select(.error != null or .response.status_code >= 400)'`"
        );
    }
    if let (Some(error_file), Some(input), Some(output)) =
        (&args.error_file, &args.work.input, &output)
    {
        check_error_file(error_file, input, output)?;
    }
    let task: &'static RunBatch = Box::leak(Box::new(RunBatch {
        keep_model: args.keep_model,
    }));
    // A job complete with error lines ends with exit status 3
    // (`crate::exit`), after its error file is written.
    let ran = worker::run_task(task, &args.engine, &args.work).await;
    let with_errors = ran
        .as_ref()
        .err()
        .and_then(|e| e.downcast_ref::<crate::exit::Exit>())
        .is_some_and(|e| e.0 == crate::exit::EXIT_ERRORS);
    if !with_errors {
        ran?;
    }
    if let (Some(input), Some(output)) = (&args.work.input, &output) {
        // A dataset's lines are counted in its staging record.
        let lines = dispatcher_core::dataset::input_lines(
            input,
            args.work.split.as_deref(),
            &JobFiles::new(output, None),
        )?;
        let done = dispatcher_core::input::count_lines(output).unwrap_or(0);
        if done == lines {
            let (failed, duplicates) = finish_output(output, args.error_file.as_deref())?;
            tracing::info!(
                lines = done,
                failed,
                duplicate_custom_ids = duplicates,
                "batch complete"
            );
        }
    }
    if with_errors {
        return Err(crate::exit::Exit(crate::exit::EXIT_ERRORS).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(content: &str) -> (Value, &'static str) {
        let (id, parts) = parse_line(content, 4);
        (id, parts.err().map_or("", |e| e.code))
    }

    #[test]
    fn each_malformed_line_gets_its_own_error_code_and_keeps_its_custom_id() {
        let ok = r#"{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}"#;
        let (id, parts) = parse_line(ok, 0);
        assert_eq!(id, "a");
        assert_eq!(parts.ok().unwrap().0, "/chat/completions");
        assert_eq!(code("{not json").1, "invalid_json");
        assert_eq!(code("[1]").1, "invalid_request");
        assert_eq!(code(r#"{"method": "POST"}"#).1, "missing_custom_id");
        assert_eq!(
            code(r#"{"custom_id": "b", "method": "GET", "url": "/v1/completions", "body": {}}"#),
            (json!("b"), "unsupported_method")
        );
        assert_eq!(
            code(r#"{"custom_id": "c", "method": "POST", "url": "/v1/images", "body": {}}"#).1,
            "unsupported_url"
        );
        assert_eq!(
            code(r#"{"custom_id": "d", "method": "POST", "url": "/v1/embeddings", "body": "x"}"#).1,
            "invalid_body"
        );
        let (_, parts) = parse_line("{not json", 4);
        assert!(parts.err().unwrap().message.contains("input line 5"));
    }
}
