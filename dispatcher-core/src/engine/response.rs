//! Responses from the engine, and the errors a request can end in.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Token counts the engine reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Tokens generated.
    #[serde(default)]
    pub completion_tokens: u64,
    /// Their sum.
    #[serde(default)]
    pub total_tokens: u64,
}

/// One generated choice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Choice {
    /// Its position among the choices.
    #[serde(default)]
    pub index: u32,
    /// The generated text.
    pub text: String,
    /// Why generation stopped (`stop`, `length`, ...).
    #[serde(default)]
    pub finish_reason: Option<String>,
}

/// A successful answer of the engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The model that answered.
    pub model: String,
    /// The choices, in index order (at least one).
    pub choices: Vec<Choice>,
    /// Token counts, when the engine reports them.
    pub usage: Option<Usage>,
}

/// A response's text could not be read as the JSON type asked for.
#[derive(Debug, thiserror::Error)]
#[error("the model's answer is not the JSON expected ({source}): {text:?}")]
pub struct JsonError {
    /// The text that did not parse (first choice).
    pub text: String,
    /// Why.
    pub source: serde_json::Error,
}

impl Response {
    /// The first choice's text.
    pub fn text(&self) -> &str {
        self.choices.first().map_or("", |c| c.text.as_str())
    }

    /// Every choice's text, in index order.
    pub fn texts(&self) -> Vec<&str> {
        self.choices.iter().map(|c| c.text.as_str()).collect()
    }

    /// The first choice's finish reason.
    pub fn finish_reason(&self) -> Option<&str> {
        self.choices
            .first()
            .and_then(|c| c.finish_reason.as_deref())
    }

    /// Parses the first choice's text as JSON (for `response_format` requests).
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, JsonError> {
        serde_json::from_str(self.text()).map_err(|source| JsonError {
            text: self.text().to_string(),
            source,
        })
    }

    /// Reads an OpenAI-compatible chat or completion answer.
    pub fn from_openai(v: &serde_json::Value) -> Result<Response, String> {
        let choices = v["choices"]
            .as_array()
            .ok_or_else(|| format!("no \"choices\" array in {v}"))?;
        let mut out: Vec<Choice> = choices
            .iter()
            .enumerate()
            .map(|(i, c)| Choice {
                index: c["index"].as_u64().unwrap_or(i as u64) as u32,
                text: c["message"]["content"]
                    .as_str()
                    .or_else(|| c["text"].as_str())
                    .unwrap_or_default()
                    .to_string(),
                finish_reason: c["finish_reason"].as_str().map(String::from),
            })
            .collect();
        if out.is_empty() {
            return Err(format!("an empty \"choices\" array in {v}"));
        }
        out.sort_by_key(|c| c.index);
        Ok(Response {
            model: v["model"].as_str().unwrap_or_default().to_string(),
            choices: out,
            usage: serde_json::from_value(v["usage"].clone()).ok(),
        })
    }
}

/// Why a request to the engine did not give a response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The engine refused the request (a 4xx: over the context length, a bad
    /// parameter). Retrying the same request will not help; the task decides.
    #[error("the engine refused the request ({status}): {message}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// The engine's message.
        message: String,
    },
    /// The engine failed or could not be reached even after retries. The worker
    /// treats this as the engine being down: it releases its items and exits.
    #[error("the engine is unavailable: {0}")]
    Unavailable(String),
    /// The engine answered something that is not an OpenAI-compatible response.
    #[error("the engine's answer could not be read: {0}")]
    Malformed(String),
}
