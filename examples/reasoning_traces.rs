//! Run with: cargo run --example reasoning_traces -- --engine echo --input examples/data/chat.jsonl --output /tmp/traces.jsonl
//!
//! Distilling a reasoning model: keep its trace and its answer for every
//! prompt. The engine must return the trace beside the answer (vLLM with
//! `--reasoning-parser`, SGLang, llama.cpp, most hosted APIs); an answer cut
//! at `max_tokens` while the model still thinks has a trace and no answer,
//! and is kept as such (`answer: null`, `complete: false`) rather than lost.

use dispatcher::{task, Message, Request, TaskError};
use serde::{Deserialize, Serialize};

/// One input line: a conversation to answer.
#[derive(Debug, Deserialize)]
pub struct Conversation {
    /// The conversation; the model answers its last message.
    pub messages: Vec<Message>,
}

/// One output line: the conversation, the trace and the answer.
#[derive(Debug, Serialize)]
pub struct Trace {
    /// The conversation, as given.
    pub messages: Vec<Message>,
    /// The model's reasoning, where the engine returned it.
    pub reasoning: Option<String>,
    /// Its answer; `None` where it gave none (cut while thinking).
    pub answer: Option<String>,
    /// Whether the model finished (not cut at `max_tokens`).
    pub complete: bool,
}

/// Answers the conversation and keeps the trace.
#[task]
pub async fn reasoning_traces(input: Conversation) -> Result<Trace, TaskError> {
    let request = Request::chat_messages(input.messages.clone())
        .temperature(0.6)
        .max_tokens(8192);
    let response = yield_request!(request)?;
    if response.reasoning().is_none() && response.content().is_none() {
        return Err(TaskError::failed(
            "empty_answer",
            "the engine returned neither a trace nor an answer",
        ));
    }
    Ok(Trace {
        messages: input.messages,
        reasoning: response.reasoning().map(String::from),
        answer: response.content().map(String::from),
        complete: response.finish_reason() != Some("length"),
    })
}

fn main() -> std::process::ExitCode {
    dispatcher::run_tasks(&[&reasoning_traces])
}
