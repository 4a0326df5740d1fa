//! Run with: cargo run --example describe_image -- --engine-url http://localhost:8000 --input images.jsonl --output /tmp/described.jsonl
//!
//! A vision task: each line names an image file and a question; the image
//! goes to the model inline (a `data:` URL), beside the question. An image
//! that cannot be read, is no image, or is over 20 MiB fails its line with
//! `image_unreadable`, naming the file; the job goes on.

use dispatcher::engine::DEFAULT_MAX_IMAGE_BYTES;
use dispatcher::{task, Message, Part, Request, TaskError};
use serde::{Deserialize, Serialize};

/// One input line: an image file and what to ask of it.
#[derive(Debug, Deserialize)]
pub struct Picture {
    /// The image's path (PNG, JPEG, GIF or WebP).
    pub image: String,
    /// The question.
    pub question: String,
}

/// One output line: the image, the question and the model's answer.
#[derive(Debug, Serialize)]
pub struct Described {
    /// The image's path.
    pub image: String,
    /// The question.
    pub question: String,
    /// The model's answer.
    pub answer: String,
}

/// Sends the image and the question in one user message.
#[task]
pub async fn describe_image(input: Picture) -> Result<Described, TaskError> {
    let image = Part::image_file(&input.image, DEFAULT_MAX_IMAGE_BYTES)
        .map_err(|e| TaskError::failed("image_unreadable", e.to_string()))?;
    let request = Request::chat_messages(vec![Message::user(vec![
        Part::text(&input.question),
        image,
    ])])
    .max_tokens(512);
    let response = yield_request!(request)?;
    Ok(Described {
        image: input.image,
        question: input.question,
        answer: response.text().to_string(),
    })
}

fn main() -> std::process::ExitCode {
    dispatcher::run_tasks(&[&describe_image])
}
