//! `dispatcher`: large-scale batch LLM inference on HPC clusters.
//!
//! A head-node **dispatcher server** (`dispatcher serve`) turns an input JSONL
//! file into an output JSONL file, one line each and in input order, through any
//! number of preemptible workers, crashes and restarts. **Workers** run a local
//! inference engine and a **task manager** that keeps it saturated with many
//! concurrent **tasks**, written as async functions:
//!
//! ```no_run
//! use dispatcher::prelude::*;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize)]
//! struct In { prompt: String }
//!
//! #[derive(Serialize)]
//! struct Out { prompt: String, answer: String }
//!
//! /// Answers each prompt once.
//! #[task]
//! async fn answer(input: In) -> Result<Out, TaskError> {
//!     let response = yield_request!(Request::chat().user(&input.prompt).max_tokens(256))?;
//!     Ok(Out { answer: response.text().to_string(), prompt: input.prompt })
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     dispatcher::run_tasks(&[&answer])
//! }
//! ```
//!
//! # Writing a task
//! `#[task]` goes on `async fn name(input: In) -> Result<Out, TaskError>`, where
//! `In: Deserialize` is one input line and `Out: Serialize` one output line, both
//! taken and returned by value. A second parameter `ctx: TaskContext` gives the
//! work id, retry count, max retries and [`TaskContext::is_last_attempt`].
//! [`prelude`] has everything a task file needs, in one import.
//!
//! - `yield_request!(req)` sends one [`Request`] and evaluates to
//!   `Result<Response, RequestError>`; `yield_request!([a, b])` sends an array in
//!   parallel and evaluates to `Result<[Response; 2], _>` (a `Vec` gives a `Vec`),
//!   responses in request order. It works in the task's body, also inside other
//!   macros' arguments (`format!("{}", yield_request!(r)?.text())`), but not in
//!   closures, `async` blocks or nested functions: there, and in helper
//!   functions, send with the context: `async fn helper(ctx: &TaskContext, ..)`
//!   calls `ctx.send(request).await`, and `tokio::join!(helper(&ctx, a),
//!   helper(&ctx, b))` runs sub-flows side by side.
//! - A conversation grows with [`Request::push`]: `chat.push(&response)` adds
//!   the model's turn and `chat.push(Message::user(".."))` the next question
//!   (`examples/critique_and_revise.rs`).
//! - `?` on a request error writes a failure record (`request_rejected` for a
//!   4xx such as a prompt over the context length); a dead engine instead stops
//!   the worker, which hands its items back.
//! - [`TaskError::failed`]`(error_type, message)` writes
//!   `{"__ERROR__": {"error": error_type, "message", "task_data": <input>}}`;
//!   `.or_fail("error_type")?` ([`OrFail`]) does that for any `Result` or
//!   `Option`. [`TaskError::retry`]`(message)` hands the line back to the
//!   dispatcher for another attempt, which the server gives to another worker
//!   when one asks (on the last attempt it writes `retries_exhausted`).
//! - The error type may be your own: `Result<Out, MyError>` works when
//!   `TaskError: From<MyError>`.
//! - Input that does not deserialize gives `invalid_input` (naming the input
//!   line and column); a panic gives `task_panicked`; the worker keeps going
//!   either way.
//! - [`TaskContext::with_metadata`] adds the conventional `task_metadata`.
//! - A mistake in the signature is one compile error, on the mistake.
//!
//! # What `#[task]` expands to
//! The function becomes a struct of the same name implementing [`Task`], and a
//! function of that name that makes one. The struct has braces so that it is a
//! type only; the value `answer` is the function, which is a task too (`Task`
//! is implemented for every `Fn() -> T` where `T: Task`), and which a `let
//! answer = ..` elsewhere shadows, as it would any function:
//!
//! ```
//! # use dispatcher::{Request, Task, TaskContext, TaskError};
//! # #[derive(serde::Deserialize)] struct In { prompt: String }
//! # #[derive(serde::Serialize)] struct Out { answer: String }
//! #[allow(non_camel_case_types)]
//! #[derive(Debug, Clone, Copy, Default)]
//! struct answer {}
//!
//! impl Task for answer {
//!     type Input = In;
//!     type Output = Out;
//!     const NAME: &'static str = "answer";
//!     fn run(&self, input: In, ctx: TaskContext)
//!         -> impl std::future::Future<Output = Result<Out, TaskError>> + Send + 'static
//!     {
//!         async fn body(input: In, ctx: TaskContext) -> Result<Out, TaskError> {
//!             // yield_request!(req) is `ctx.send(req).await`:
//!             let response = ctx.send(Request::chat().user(&input.prompt)).await?;
//!             Ok(Out { answer: response.text().to_string() })
//!         }
//!         body(input, ctx)
//!     }
//! }
//!
//! /// The task `answer` as a value: `run_tasks(&[&answer])`, `TaskTest::new(answer)`.
//! const fn answer() -> answer {
//!     answer {}
//! }
//! # let _: &dyn dispatcher::DynTask = &answer;
//! ```
//!
//! # Testing a task
//! [`testing::TaskTest`] runs a task on one input with scripted replies, no
//! server or engine, and returns its output line and the requests it made.
//!
//! # Layout
//! - [`Task`], [`TaskContext`], [`TaskError`], [`task`], [`yield_request!`]: writing tasks.
//! - [`engine`]: requests, responses, the OpenAI-compatible backend, the echo engine, the launcher.
//! - [`testing`]: running a task with scripted replies.
//! - [`manager`], [`source`], [`engines`]: the task manager, where its items come from,
//!   and the engines its tasks send to.
//! - [`server`], [`ledger`], [`input`], [`output`]: `dispatcher serve`.
//! - [`job`]: a job's files (checkpoint, journal, manifest, locks, the redo's
//!   swap); [`record`]: failure records and what an output line is.
//! - [`protocol`], [`client`]: the work protocol and its client.
//! - [`cli`], [`run_tasks`]: the command line, whole, for task binaries;
//!   [`infer`]: the built-in task of `dispatcher infer`.

pub use dispatcher_cli as cli;
pub use dispatcher_cli::{infer, run_tasks};
pub use dispatcher_core::engine::{Message, Part, Request, RequestError, Response};
pub use dispatcher_core::task::{
    engines, manager, source, testing, DynTask, Engines, LineOutcome, OrFail, OutcomeKind, Task,
    TaskContext, TaskError,
};
pub use dispatcher_core::{
    client, engine, input, job, ledger, metrics, output, process, protocol, record, server,
};
/// Turns an `async fn` into a task: see [Writing a task](crate#writing-a-task)
/// and [what it expands to](crate#what-task-expands-to).
#[doc(inline)]
pub use dispatcher_macros::task;

/// What a task file needs, in one import: `use dispatcher::prelude::*;`.
///
/// A glob import never warns about the names a file does not use, and it
/// brings [`yield_request!`] into scope, so a misplaced one gets this crate's
/// own message rather than rustc's "cannot find macro".
pub mod prelude {
    pub use crate::{
        task, yield_request, Message, OrFail, Part, Request, RequestError, Response, TaskContext,
        TaskError,
    };
}

/// Sends requests to the model from inside a `#[task]` fn; see the [crate docs](crate).
///
/// `#[task]` rewrites every `yield_request!` in its body, so this definition is
/// reached only from somewhere it cannot work.
#[macro_export]
macro_rules! yield_request {
    // One argument: the error, and in its place a value of the type the
    // request's answer has (`TaskContext::stand_in`, never called), so that
    // the code using it draws no "unreachable" warning beside the error.
    ($requests:expr) => {{
        ::core::compile_error!(
            "`yield_request!` can only be used in the body of a `#[task]` async fn; in a helper, take `ctx: &TaskContext` and call `ctx.send(request).await`"
        );
        $crate::TaskContext::stand_in($requests)
    }};
    ($($tokens:tt)*) => {{
        ::core::compile_error!(
            "`yield_request!` can only be used in the body of a `#[task]` async fn; in a helper, take `ctx: &TaskContext` and call `ctx.send(request).await`"
        );
        // Keeps what the arguments name in use, so the error above is the
        // only message.
        #[allow(unreachable_code, unused)]
        let _requests = || ($($tokens)*);
        ::core::unreachable!()
    }};
}

/// The book's chapter on writing tasks (`docs/src/tasks.md`): its Rust blocks
/// compile, and those not marked `no_run` run, as this crate's doc tests, so
/// the guide's code cannot fall behind the API.
#[cfg(doctest)]
#[doc = include_str!("../docs/src/tasks.md")]
pub struct TasksChapter;
