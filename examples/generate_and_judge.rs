//! Two models in one task: the worker's own engine answers, a judge (a larger
//! model on another node, or a hosted API) grades the answer. One job, one
//! output line per question, instead of two jobs and a script in between.
//!
//! ```sh
//! cargo run --example generate_and_judge -- --engine echo \
//!     --engine-url judge=http://judge-node:8000/v1 --engine-workers judge=16 \
//!     --input examples/data/questions.jsonl --output /tmp/judged.jsonl
//! ```
//!
//! The judge's requests wait for the judge's own request slots
//! (`--engine-workers judge=N`); the answers', for the launched engine's
//! (`--workers`).

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
pub struct Judged {
    /// The question, as given.
    pub question: String,
    /// The answer of the default engine's model.
    pub answer: String,
    /// The judge's model, as it names itself.
    pub judge_model: String,
    /// The judge's verdict, as it wrote it.
    pub verdict: String,
    /// The first whole number from 1 to 10 in the verdict; `None` when the
    /// judge gave none (the line still says what it wrote).
    pub score: Option<u8>,
}

const JUDGE: &str = "You grade answers. Reply with a score from 1 (wrong) to 10 (perfect) \
                     and one sentence of reason, as: Score: N. Reason: ...";

/// The first whole number from 1 to 10 in `text`.
pub fn score_of(text: &str) -> Option<u8> {
    text.split(|c: char| !c.is_ascii_digit())
        .filter_map(|digits| digits.parse::<u8>().ok())
        .find(|n| (1..=10).contains(n))
}

/// Answers with the default engine, grades the answer with the `judge` engine.
#[task]
pub async fn generate_and_judge(input: Question) -> Result<Judged, TaskError> {
    let answer = yield_request!(Request::chat().user(&input.question).max_tokens(512))?;
    let grading = Request::chat()
        .engine("judge")
        .system(JUDGE)
        .user(format!(
            "Question: {}\n\nAnswer: {}",
            input.question,
            answer.text()
        ))
        .temperature(0.0)
        .max_tokens(64);
    let verdict = yield_request!(grading)?;
    Ok(Judged {
        question: input.question,
        answer: answer.text().to_string(),
        score: score_of(verdict.text()),
        judge_model: verdict.model.clone(),
        verdict: verdict.text().to_string(),
    })
}

fn main() -> std::process::ExitCode {
    dispatcher::run_tasks(&[&generate_and_judge])
}
