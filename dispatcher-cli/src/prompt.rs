//! What a line sends to an engine, as `infer` makes it and `estimate` and
//! `--skip-over-length` count it: below both, so that neither depends on
//! the other.

use dispatcher_core::engine::Message;
use dispatcher_core::task::TaskError;

/// What a line sends to the engine: chat messages, or a text to complete.
#[derive(Debug, Clone, PartialEq)]
pub enum EnginePrompt {
    /// `/v1/chat/completions`: the messages, the system message included.
    Chat(Vec<Message>),
    /// `/v1/completions`: the prompt.
    Completion(String),
}

/// A check of each prompt before it is sent: `Err` fails the line.
pub type PromptCheck = dyn Fn(&EnginePrompt) -> Result<(), TaskError> + Send + Sync;
