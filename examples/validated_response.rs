//! Run with: cargo run --example validated_response -- --engine echo --input examples/data/prompts.jsonl --output /tmp/validated.jsonl
//!
//! Asks for an answer that ends with a marker and hands the line back for
//! another attempt (on another worker, within the server's retry budget) when
//! the marker is missing. The output carries the conventional `task_metadata`.

use dispatcher::{task, Request, TaskContext, TaskError};
use serde::{Deserialize, Serialize};

/// What a valid answer must contain.
pub const MARKER: &str = "DONE";

/// One input line.
#[derive(Debug, Deserialize)]
pub struct Prompt {
    /// The question.
    pub prompt: String,
}

/// One output line.
#[derive(Debug, Serialize)]
pub struct Answer {
    /// The question, as given.
    pub prompt: String,
    /// The validated answer.
    pub response: String,
}

/// Answers the prompt; retries when the answer lacks the marker.
#[task]
pub async fn validated_response(
    input: Prompt,
    ctx: TaskContext,
) -> Result<serde_json::Value, TaskError> {
    let request = Request::chat()
        .system(format!("Answer, then end with the word {MARKER}."))
        .user(&input.prompt)
        .max_tokens(256);
    let response = yield_request!(request)?;
    if !response.text().contains(MARKER) {
        return Err(TaskError::retry(format!(
            "attempt {} of work_id {}: the answer lacks {MARKER}",
            ctx.retry_count() + 1,
            ctx.work_id()
        )));
    }
    Ok(ctx.with_metadata(&Answer {
        prompt: input.prompt,
        response: response.text().to_string(),
    }))
}

fn main() -> std::process::ExitCode {
    dispatcher::run_tasks(&[&validated_response])
}
