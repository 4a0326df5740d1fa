//! How a task says it did not produce its output.

use crate::engine::{JsonError, RequestError};

/// A task's failure: written as a failure record, handed back for a retry, or
/// (for a dead engine) ending the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskError {
    kind: TaskErrorKind,
}

/// What kind of failure a [`TaskError`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TaskErrorKind {
    /// Give up on this line: write `{"__ERROR__": {"error": error_type, "message", "task_data"}}`.
    Failed {
        /// A short snake_case name of what went wrong.
        error_type: String,
        /// What went wrong, in words.
        message: String,
    },
    /// Hand the line back to the dispatcher for another attempt (the server
    /// prefers another worker for it; its retry budget applies). On the last
    /// attempt the line gets a `retries_exhausted` failure record instead.
    Retry {
        /// Why, for the log and the final record.
        message: String,
    },
    /// The engine could not be reached: the worker releases its items and exits.
    EngineUnavailable {
        /// What failed.
        message: String,
    },
}

impl TaskError {
    /// Gives up on this line with a failure record of type `error_type`.
    pub fn failed(error_type: impl Into<String>, message: impl Into<String>) -> TaskError {
        TaskError {
            kind: TaskErrorKind::Failed {
                error_type: error_type.into(),
                message: message.into(),
            },
        }
    }

    /// Asks the dispatcher for another attempt at this line.
    pub fn retry(message: impl Into<String>) -> TaskError {
        TaskError {
            kind: TaskErrorKind::Retry {
                message: message.into(),
            },
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> &TaskErrorKind {
        &self.kind
    }

    /// Takes the kind out.
    pub fn into_kind(self) -> TaskErrorKind {
        self.kind
    }
}

impl std::fmt::Display for TaskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            TaskErrorKind::Failed {
                error_type,
                message,
            } => write!(f, "{error_type}: {message}"),
            TaskErrorKind::Retry { message } => write!(f, "retry requested: {message}"),
            TaskErrorKind::EngineUnavailable { message } => {
                write!(f, "engine unavailable: {message}")
            }
        }
    }
}

impl std::error::Error for TaskError {}

/// `?` on a request: a refused request fails the line (`request_rejected`), an
/// unreadable answer fails it (`engine_response_invalid`), a dead engine stops
/// the worker.
impl From<RequestError> for TaskError {
    fn from(e: RequestError) -> TaskError {
        let message = e.to_string();
        match e {
            RequestError::Rejected { .. } => TaskError::failed("request_rejected", message),
            RequestError::Malformed(_) => TaskError::failed("engine_response_invalid", message),
            RequestError::Unavailable(_) => TaskError {
                kind: TaskErrorKind::EngineUnavailable { message },
            },
        }
    }
}

/// `?` on [`Response::json`](crate::engine::Response::json): fails the line
/// with `response_not_json`.
impl From<JsonError> for TaskError {
    fn from(e: JsonError) -> TaskError {
        TaskError::failed("response_not_json", e.to_string())
    }
}

/// `?` on a [`serde_json::Error`] (a task parsing an answer with
/// `serde_json::from_str`, or building a value): fails the line with
/// `json_error`. Other foreign errors name their kind with
/// [`.or_fail("kind")?`](OrFail::or_fail).
impl From<serde_json::Error> for TaskError {
    fn from(e: serde_json::Error) -> TaskError {
        TaskError::failed("json_error", format!("JSON: {e}"))
    }
}

/// `.or_fail("error_type")?`: turns an `Err` or a `None` into a failure of
/// the line, with a record of type `error_type`.
///
/// ```
/// # mod dispatcher { pub use dispatcher_core::task::{OrFail, TaskError}; }
/// use dispatcher::{OrFail, TaskError};
///
/// fn score(text: &str) -> Result<u32, TaskError> {
///     let digits = text.split_whitespace().last().or_fail("no_score")?;
///     let score: u32 = digits.parse().or_fail("score_not_a_number")?;
///     Ok(score)
/// }
/// assert_eq!(score("Score: 7"), Ok(7));
/// assert!(score("Score: seven").unwrap_err().to_string().starts_with("score_not_a_number: "));
/// assert!(score("").is_err());
/// ```
pub trait OrFail<T> {
    /// The value, or a [`TaskError::failed`] of type `error_type` whose message
    /// is the error's (or says the value is missing).
    fn or_fail(self, error_type: &str) -> Result<T, TaskError>;
}

impl<T, E: std::fmt::Display> OrFail<T> for Result<T, E> {
    fn or_fail(self, error_type: &str) -> Result<T, TaskError> {
        self.map_err(|e| TaskError::failed(error_type, e.to_string()))
    }
}

impl<T> OrFail<T> for Option<T> {
    fn or_fail(self, error_type: &str) -> Result<T, TaskError> {
        self.ok_or_else(|| TaskError::failed(error_type, format!("{error_type}: no value")))
    }
}
