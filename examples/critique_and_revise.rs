//! A multi-turn conversation: the model answers, critiques its answer, then
//! revises it. Each turn is the conversation so far plus one message.
//!
//! ```sh
//! cargo run --example critique_and_revise -- --input questions.jsonl --output out.jsonl --engine echo
//! ```

use dispatcher::prelude::*;
use serde::{Deserialize, Serialize};

/// One input line: `{"question": "..."}`.
#[derive(Debug, Deserialize)]
pub struct Question {
    /// What to answer.
    pub question: String,
}

/// One output line.
#[derive(Debug, Serialize)]
pub struct Revised {
    /// The question, as given.
    pub question: String,
    /// The first answer.
    pub draft: String,
    /// The model's critique of it.
    pub critique: String,
    /// The answer after the critique.
    pub answer: String,
}

const CRITIQUE: &str = "Critique your answer: what is wrong or missing?";
const REVISE: &str = "Now write the improved answer, and only that.";

/// Answers, critiques the answer, revises it.
#[task]
pub async fn critique_and_revise(input: Question) -> Result<Revised, TaskError> {
    let mut chat = Request::chat().user(&input.question).max_tokens(1024);
    let mut turns = Vec::new();
    for follow_up in [CRITIQUE, REVISE] {
        let reply = yield_request!(chat.clone())?;
        chat.push(&reply);
        chat.push(Message::user(follow_up));
        turns.push(reply.text().to_string());
    }
    let answer = yield_request!(chat)?.text().to_string();
    let [draft, critique] = <[String; 2]>::try_from(turns).expect("two turns");
    Ok(Revised {
        question: input.question,
        draft,
        critique,
        answer,
    })
}

fn main() -> std::process::ExitCode {
    dispatcher::run_tasks(&[&critique_and_revise])
}
