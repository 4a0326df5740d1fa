//! Run with: cargo run --example compare_responses -- --engine echo --input examples/data/chat.jsonl --output /tmp/compare.jsonl
//!
//! Two generations for the same conversation, in parallel, then a judge request
//! that picks the better one: a preference pair per input line. The judge must
//! answer A or B; anything else fails the line with `judge_response_invalid`.

use dispatcher::{task, Message, Request, TaskError};
use serde::{Deserialize, Serialize};

/// One input line: a conversation to continue.
#[derive(Debug, Deserialize)]
pub struct Conversation {
    /// The conversation so far; the model answers its last message.
    pub messages: Vec<Message>,
}

/// One output line: the conversation and a preference pair.
#[derive(Debug, Serialize)]
pub struct Preference {
    /// The conversation, as given.
    pub messages: Vec<Message>,
    /// The response the judge preferred.
    pub preferred_text: String,
    /// The other response.
    pub dispreferred_text: String,
    /// The model that judged.
    pub judge_model: String,
}

/// Reads the judge's verdict: a bare `A`/`B` (with quotes, a period or an
/// `Answer:` prefix), or else the first standalone `A` or `B` in its answer.
pub fn verdict(answer: &str) -> Option<char> {
    let trimmed = answer
        .trim()
        .trim_start_matches("Answer:")
        .trim()
        .trim_matches(|c: char| c == '"' || c == '\'' || c == '.' || c == '*');
    match trimmed {
        "A" => return Some('A'),
        "B" => return Some('B'),
        _ => {}
    }
    answer
        .split(|c: char| !c.is_alphanumeric())
        .find_map(|word| match word {
            "A" => Some('A'),
            "B" => Some('B'),
            _ => None,
        })
}

/// Generates two responses and asks the model which is better.
#[task]
pub async fn compare_responses(input: Conversation) -> Result<Preference, TaskError> {
    let candidate = |seed| {
        Request::chat_messages(input.messages.clone())
            .temperature(1.0)
            .seed(seed)
            .max_tokens(512)
    };
    let [a, b] = yield_request!([candidate(1), candidate(2)])?;
    let (a, b) = (a.text().to_string(), b.text().to_string());
    let question = input.messages.last().map_or("", |m| m.content.as_str());
    let judge = Request::chat()
        .system("You compare two responses to the same request and say which is better.")
        .user(format!(
            "Answer A or B: which response serves the request better?\n\n\
             Request:\n{question}\n\nResponse A:\n{a}\n\nResponse B:\n{b}"
        ))
        .temperature(0.0)
        .max_tokens(8);
    let judged = yield_request!(judge)?;
    let (preferred_text, dispreferred_text) = match verdict(judged.text()) {
        Some('A') => (a, b),
        Some(_) => (b, a),
        None => {
            return Err(TaskError::failed(
                "judge_response_invalid",
                format!("the judge answered {:?}, not A or B", judged.text()),
            ))
        }
    };
    Ok(Preference {
        messages: input.messages,
        preferred_text,
        dispreferred_text,
        judge_model: judged.model,
    })
}

fn main() -> std::process::ExitCode {
    dispatcher::run_tasks(&[&compare_responses])
}
