//! Five requests in a row, each building on the last: outline, draft,
//! critique, revision, title. A long chain like this is where a preempted
//! worker costs most, and where the journal saves most: a line issued again
//! replays the steps its earlier issue completed (see the book, "Durable
//! tasks"). `scripts/bench-journal.sh` measures it.
//!
//! ```sh
//! cargo run --example five_steps -- --engine echo --input examples/data/questions.jsonl --output /tmp/five.jsonl
//! ```

use dispatcher::prelude::*;
use serde::{Deserialize, Serialize};

/// One input line: `{"question": "..."}`.
#[derive(Debug, Deserialize)]
pub struct Question {
    /// What to write about.
    pub question: String,
}

/// One output line: every step's text.
#[derive(Debug, Serialize)]
pub struct Written {
    /// The question, as given.
    pub question: String,
    /// The text of each step, in order.
    pub steps: Vec<String>,
    /// Steps answered from the journal (an earlier issue of the line had
    /// completed them).
    pub replayed: u32,
}

const STEPS: [&str; 5] = [
    "Write an outline of an answer.",
    "Write the answer from the outline.",
    "Critique the answer: what is wrong or missing?",
    "Revise the answer after the critique.",
    "Give the revised answer a short title.",
];

/// Runs the five steps as one conversation.
#[task]
pub async fn five_steps(input: Question, ctx: TaskContext) -> Result<Written, TaskError> {
    let mut chat = Request::chat().user(&input.question).max_tokens(512);
    let mut steps = Vec::with_capacity(STEPS.len());
    for step in STEPS {
        chat.push(Message::user(step));
        let reply = yield_request!(chat.clone())?;
        chat.push(&reply);
        steps.push(reply.text().to_string());
    }
    Ok(Written {
        question: input.question,
        steps,
        replayed: ctx.replayed_requests(),
    })
}

fn main() -> std::process::ExitCode {
    dispatcher::run_tasks(&[&five_steps])
}
