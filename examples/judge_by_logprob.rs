//! Run with: cargo run --example judge_by_logprob -- --engine echo --input examples/data/judged.jsonl --output /tmp/judged.jsonl
//!
//! An LLM-as-judge that scores by probability instead of by the word the
//! model happens to sample: it asks one token with its log-probability and
//! the five most likely alternatives, and scores the answer by how likely
//! "Yes" is against "No" at that place. A model that gives neither among its
//! alternatives fails the line with `no_verdict_tokens`.

use dispatcher::{task, Request, TaskError};
use serde::{Deserialize, Serialize};

/// One input line: a question and an answer to judge.
#[derive(Debug, Deserialize)]
pub struct Judged {
    /// The question.
    pub question: String,
    /// The answer to judge.
    pub answer: String,
}

/// One output line: the pair and the judge's confidence that it is right.
#[derive(Debug, Serialize)]
pub struct Scored {
    /// The question.
    pub question: String,
    /// The answer.
    pub answer: String,
    /// P(Yes) / (P(Yes) + P(No)) at the verdict's token, from 0 to 1.
    pub score: f64,
}

/// The share of "Yes" among "Yes" and "No", from their log-probabilities
/// (a token's leading space and case ignored); `None` if neither is there.
pub fn yes_share(alternatives: &[(String, f64)]) -> Option<f64> {
    let p = |word: &str| -> f64 {
        alternatives
            .iter()
            .filter(|(t, _)| t.trim().eq_ignore_ascii_case(word))
            .map(|(_, lp)| lp.exp())
            .sum()
    };
    let (yes, no) = (p("yes"), p("no"));
    (yes + no > 0.0).then(|| yes / (yes + no))
}

/// Asks for one token and reads the verdict from its alternatives.
#[task]
pub async fn judge_by_logprob(input: Judged) -> Result<Scored, TaskError> {
    let request = Request::chat()
        .system("You grade answers. Reply with one word: Yes or No.")
        .user(format!(
            "Question: {}\nAnswer: {}\nIs the answer correct?",
            input.question, input.answer
        ))
        .temperature(0.0)
        .max_tokens(1)
        .extra("logprobs", true)
        .extra("top_logprobs", 5);
    let response = yield_request!(request)?;
    let first = response
        .logprobs()
        .and_then(|tokens| tokens.first())
        .ok_or_else(|| {
            TaskError::failed(
                "no_logprobs",
                "the engine returned no log-probabilities (does it take `logprobs`?)",
            )
        })?;
    let mut alternatives: Vec<(String, f64)> = first
        .top
        .iter()
        .map(|t| (t.token.clone(), t.logprob))
        .collect();
    if alternatives.is_empty() {
        alternatives.push((first.token.clone(), first.logprob));
    }
    let score = yes_share(&alternatives).ok_or_else(|| {
        TaskError::failed(
            "no_verdict_tokens",
            format!("neither Yes nor No among the likeliest tokens: {alternatives:?}"),
        )
    })?;
    Ok(Scored {
        question: input.question,
        answer: input.answer,
        score,
    })
}

fn main() -> std::process::ExitCode {
    dispatcher::run_tasks(&[&judge_by_logprob])
}
