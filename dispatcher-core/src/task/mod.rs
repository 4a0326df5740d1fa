//! Typed tasks: the [`Task`] trait that `#[task]` implements, the context a task
//! runs in, how its outcome becomes an output line, and the task manager that
//! runs many tasks at once against one engine.
//!
//! Where what lives: here the [`Task`] and [`DynTask`] traits and a line's
//! outcome; `context.rs` the [`TaskContext`] (sending, replaying from the
//! journal); `error.rs` [`TaskError`]; [`engines`] the engines a worker sends
//! to, with their request slots; [`limiter`] those slots; [`journal`] a
//! task's journal on the worker; [`manager`] the task manager;
//! `reachability.rs` its patience with an unreachable server;
//! `handback.rs` what it hands back (batched, retried, split to the
//! server's request limit); [`source`]
//! where items come from (a server, or a local file pair); [`testing`]
//! running a task with scripted replies.

mod context;
pub mod engines;
mod error;
mod handback;
pub mod journal;
pub mod limiter;
pub mod manager;
mod reachability;
pub mod source;
pub mod testing;

use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

pub use context::{Requests, TaskContext};
pub use engines::Engines;
pub use error::{OrFail, TaskError, TaskErrorKind};

use crate::engine::BoxFuture;

/// A task: turns one input line into one output line, sending requests to the
/// model on the way. `#[task]` writes this impl for an `async fn`; writing it by
/// hand is the same thing without the macro:
///
/// ```
/// # mod dispatcher {
/// #     pub use dispatcher_core::engine::Request;
/// #     pub use dispatcher_core::task::{Task, TaskContext, TaskError};
/// # }
/// use dispatcher::{Request, Task, TaskContext, TaskError};
///
/// #[derive(serde::Deserialize)]
/// struct In { prompt: String }
/// #[derive(serde::Serialize)]
/// struct Out { answer: String }
///
/// #[allow(non_camel_case_types)]
/// struct answer;
///
/// impl Task for answer {
///     type Input = In;
///     type Output = Out;
///     const NAME: &'static str = "answer";
///     fn run(&self, input: In, ctx: TaskContext)
///         -> impl std::future::Future<Output = Result<Out, TaskError>> + Send + 'static
///     {
///         async move {
///             // `yield_request!(req)` expands to exactly this.
///             let r = ctx.send(Request::chat().user(input.prompt)).await?;
///             Ok(Out { answer: r.text().to_string() })
///         }
///     }
/// }
/// ```
pub trait Task: Send + Sync + 'static {
    /// One input line, as JSON.
    type Input: DeserializeOwned + Send + 'static;
    /// One output line, as JSON.
    type Output: Serialize + Send + 'static;
    /// The name `--task` selects it by.
    const NAME: &'static str;
    /// Runs the task on one input.
    fn run(
        &self,
        input: Self::Input,
        ctx: TaskContext,
    ) -> impl Future<Output = Result<Self::Output, TaskError>> + Send + 'static;
}

/// A fn that makes a task is that task. `#[task] async fn answer` defines a
/// struct `answer` (in the type namespace only) and `fn answer() -> answer`,
/// so the value `answer` that `run_tasks(&[&answer])` and
/// `TaskTest::new(answer)` take is a function, which a local binding of the
/// same name may shadow (`let answer = yield_request!(..)?;`), where a unit
/// struct would be a pattern and fail to compile.
impl<F, T> Task for F
where
    F: Fn() -> T + Send + Sync + 'static,
    T: Task,
{
    type Input = T::Input;
    type Output = T::Output;
    const NAME: &'static str = T::NAME;

    fn run(
        &self,
        input: Self::Input,
        ctx: TaskContext,
    ) -> impl Future<Output = Result<Self::Output, TaskError>> + Send + 'static {
        let task = self();
        async move { task.run(input, ctx).await }
    }
}

/// What became of one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineOutcome {
    /// The output line: the task's output, or a failure record.
    Line {
        /// One JSON value on one line.
        line: String,
        /// How it ended, for counts and logs.
        kind: OutcomeKind,
    },
    /// The task asked for another attempt.
    Retry(String),
    /// The engine is down: the item must go back to the dispatcher.
    EngineUnavailable(String),
}

/// How a task ended, for counts and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutcomeKind {
    /// It returned its output.
    Ok,
    /// It failed with [`TaskError::failed`] (or a refused request).
    Failed,
    /// Its input did not deserialize.
    InvalidInput,
    /// It panicked.
    Panicked,
    /// It asked for a retry on its last attempt.
    RetriesExhausted,
}

impl OutcomeKind {
    /// A short label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            OutcomeKind::Ok => "ok",
            OutcomeKind::Failed => "failed",
            OutcomeKind::InvalidInput => "invalid_input",
            OutcomeKind::Panicked => "panicked",
            OutcomeKind::RetriesExhausted => "retries_exhausted",
        }
    }
}

/// A task with its types erased, so one binary can hold several.
pub trait DynTask: Send + Sync + 'static {
    /// The task's name.
    fn name(&self) -> &'static str;
    /// Runs the task on one raw input line; never panics.
    fn run_line(&self, content: String, ctx: TaskContext) -> BoxFuture<'static, LineOutcome>;
    /// What else decides its output (`infer`'s sampling settings), for the
    /// hello a worker sends and the job's manifest.
    fn settings(&self) -> Map<String, Value> {
        Map::new()
    }
}

impl<T: Task> DynTask for T {
    fn name(&self) -> &'static str {
        T::NAME
    }

    fn run_line(&self, content: String, ctx: TaskContext) -> BoxFuture<'static, LineOutcome> {
        let input = match serde_json::from_str::<T::Input>(&content) {
            Ok(input) => input,
            Err(e) => {
                // serde_json says "at line 1 column 25" of the one line it
                // read: name the input line instead, and keep the column.
                let what = e.to_string();
                let what = what
                    .rsplit_once(" at line ")
                    .map_or(what.as_str(), |(w, _)| w);
                let id = ctx.work_id();
                let line = crate::record::task_failure(
                    "invalid_input",
                    &format!(
                        "input line {} (work_id {id}) does not fit the task's input type: {what} (at column {})",
                        id + 1,
                        e.column()
                    ),
                    &content,
                );
                return Box::pin(std::future::ready(LineOutcome::Line {
                    line,
                    kind: OutcomeKind::InvalidInput,
                }));
            }
        };
        let last_attempt = ctx.is_last_attempt();
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.run(input, ctx))) {
            Ok(fut) => line_outcome_of(content, last_attempt, fut),
            Err(panic) => Box::pin(std::future::ready(panicked_line(&*panic, &content))),
        }
    }
}

/// Runs a task's future and turns whatever it ends in (output, failure, retry,
/// dead engine, panic) into a [`LineOutcome`]; `content` is the input line, for
/// failure records. Hand-written [`DynTask`]s use it to get the same semantics.
pub fn line_outcome_of<O: Serialize + Send + 'static>(
    content: String,
    last_attempt: bool,
    fut: impl Future<Output = Result<O, TaskError>> + Send + 'static,
) -> BoxFuture<'static, LineOutcome> {
    line_outcome_of_line(content, last_attempt, async move {
        let output = fut.await?;
        serde_json::to_string(&output).map_err(|e| {
            TaskError::failed(
                "output_not_serializable",
                format!("the task's output could not be written as JSON: {e}"),
            )
        })
    })
}

/// [`line_outcome_of`] for a future that makes its output line itself: one
/// JSON value on one line (as a result must be; the server checks it), for
/// a task that writes parts of its input line back exactly as they were
/// read (`infer`), which a value parsed and serialized again need not be.
pub fn line_outcome_of_line(
    content: String,
    last_attempt: bool,
    fut: impl Future<Output = Result<String, TaskError>> + Send + 'static,
) -> BoxFuture<'static, LineOutcome> {
    let fut = AssertUnwindSafe(fut);
    Box::pin(async move {
        match fut.catch_unwind().await {
            Ok(Ok(line)) => LineOutcome::Line {
                line,
                kind: OutcomeKind::Ok,
            },
            Ok(Err(e)) => match e.into_kind() {
                TaskErrorKind::Failed {
                    error_type,
                    message,
                } => LineOutcome::Line {
                    line: crate::record::task_failure(&error_type, &message, &content),
                    kind: OutcomeKind::Failed,
                },
                TaskErrorKind::Retry { message } if last_attempt => LineOutcome::Line {
                    line: crate::record::task_failure(
                        "retries_exhausted",
                        &format!("the task asked for a retry on its last attempt: {message}"),
                        &content,
                    ),
                    kind: OutcomeKind::RetriesExhausted,
                },
                TaskErrorKind::Retry { message } => LineOutcome::Retry(message),
                TaskErrorKind::EngineUnavailable { message } => {
                    LineOutcome::EngineUnavailable(message)
                }
            },
            Err(panic) => panicked_line(&*panic, &content),
        }
    })
}

fn panicked_line(panic: &(dyn std::any::Any + Send), content: &str) -> LineOutcome {
    LineOutcome::Line {
        line: crate::record::task_failure(
            "task_panicked",
            &format!("the task panicked: {}", panic_message(panic)),
            content,
        ),
        kind: OutcomeKind::Panicked,
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a panic payload that is not a string)".into())
}
