//! Running a task without any server or engine, for unit tests of tasks.
//!
//! ```
//! # mod dispatcher {
//! #     pub use dispatcher_core::engine::Request;
//! #     pub use dispatcher_core::task::{testing, Task, TaskContext, TaskError};
//! # }
//! use dispatcher::testing::TaskTest;
//! use dispatcher::{Request, Task, TaskContext, TaskError};
//!
//! // What `#[task] async fn shout(input: String) -> Result<String, TaskError>`
//! // expands to, written out.
//! #[allow(non_camel_case_types)]
//! struct shout;
//!
//! impl Task for shout {
//!     type Input = String;
//!     type Output = String;
//!     const NAME: &'static str = "shout";
//!     fn run(&self, input: String, ctx: TaskContext)
//!         -> impl std::future::Future<Output = Result<String, TaskError>> + Send + 'static
//!     {
//!         async move { Ok(ctx.send(Request::chat().user(input)).await?.text().to_uppercase()) }
//!     }
//! }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let run = TaskTest::new(shout).replies(["hello"]).run(serde_json::json!("hi")).await;
//! assert_eq!(run.output, serde_json::json!("HELLO"));
//! assert_eq!(run.requests[0].to_json()["messages"][0]["content"], "hi");
//! # });
//! ```

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::journal::{JournalEvent, JournalSink, TaskJournal};
use super::{DynTask, LineOutcome, TaskContext};
use crate::engine::{BoxFuture, Choice, Engine, Request, RequestError, Response};
use crate::protocol::JournalEntry;

type Responder = dyn Fn(&Request) -> Result<Response, RequestError> + Send + Sync;

/// A response with one choice of `text` and finish reason `stop`.
pub fn reply(text: impl Into<String>) -> Response {
    Response {
        model: "scripted".into(),
        choices: vec![Choice {
            index: 0,
            text: text.into(),
            finish_reason: Some("stop".into()),
            ..Default::default()
        }],
        usage: None,
        ..Default::default()
    }
}

/// An engine that answers from a script and records every request.
pub struct ScriptedEngine {
    responder: Box<Responder>,
    requests: Mutex<Vec<Request>>,
    model: Option<String>,
}

impl std::fmt::Debug for ScriptedEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptedEngine").finish_non_exhaustive()
    }
}

impl ScriptedEngine {
    /// Answers each request with the next text of `texts`; past the end, with
    /// a `Rejected` error that says the script ran out.
    pub fn replies<I: IntoIterator<Item = S>, S: Into<String>>(texts: I) -> ScriptedEngine {
        let queue: Mutex<VecDeque<String>> =
            Mutex::new(texts.into_iter().map(Into::into).collect());
        ScriptedEngine::from_fn(move |_| {
            queue
                .lock()
                .expect("not poisoned")
                .pop_front()
                .map(reply)
                .ok_or_else(|| RequestError::Rejected {
                    status: 599,
                    message: "the test script has no more replies".into(),
                })
        })
    }

    /// Answers each request with `f(request)`.
    pub fn from_fn(
        f: impl Fn(&Request) -> Result<Response, RequestError> + Send + Sync + 'static,
    ) -> ScriptedEngine {
        ScriptedEngine {
            responder: Box::new(f),
            requests: Mutex::new(Vec::new()),
            model: None,
        }
    }

    /// Says it serves `model` (the journal keys replayed answers by it).
    pub fn with_model(mut self, model: impl Into<String>) -> ScriptedEngine {
        self.model = Some(model.into());
        self
    }

    /// The requests received so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().expect("not poisoned").clone()
    }
}

impl Engine for ScriptedEngine {
    fn model_name(&self) -> Option<String> {
        self.model.clone()
    }

    fn send(&self, request: Request) -> BoxFuture<'_, Result<Response, RequestError>> {
        let answer = (self.responder)(&request);
        self.requests.lock().expect("not poisoned").push(request);
        Box::pin(std::future::ready(answer))
    }
}

/// What one task run produced.
#[derive(Debug, Clone)]
pub struct TaskRun {
    /// What became of the line.
    pub outcome: LineOutcome,
    /// The output line parsed (`Value::Null` for a retry or a dead engine).
    pub output: Value,
    /// The requests the task sent to the engine, in order (not those
    /// answered from the journal).
    pub requests: Vec<Request>,
    /// The journal entries of this run's requests: give them to
    /// [`TaskTest::journal`] to replay them in another run.
    pub journal: Vec<JournalEntry>,
    /// Requests answered from the journal given.
    pub replayed: u32,
}

impl TaskRun {
    /// The `__ERROR__.error` of a failure record, if the output is one.
    pub fn error_type(&self) -> Option<&str> {
        self.output["__ERROR__"]["error"].as_str()
    }
}

/// Runs a task (a `#[task]`, or any [`DynTask`]) on one input with scripted responses.
#[derive(Debug)]
pub struct TaskTest<T> {
    task: T,
    engine: Option<ScriptedEngine>,
    model: Option<String>,
    work_id: u64,
    retry_count: u32,
    max_retries: Option<u32>,
    journal: Vec<JournalEntry>,
}

impl<T: DynTask> TaskTest<T> {
    /// A test of `task` with no replies scripted yet.
    pub fn new(task: T) -> TaskTest<T> {
        TaskTest {
            task,
            engine: None,
            model: None,
            work_id: 0,
            retry_count: 0,
            max_retries: Some(3),
            journal: Vec::new(),
        }
    }

    /// Runs as an issue of a line whose earlier issue completed the requests
    /// of `entries` (a [`TaskRun::journal`]): matching requests are answered
    /// from them, as on a worker.
    pub fn journal(mut self, entries: Vec<JournalEntry>) -> Self {
        self.journal = entries;
        self
    }

    /// Replies with these texts, in order.
    pub fn replies<I: IntoIterator<Item = S>, S: Into<String>>(mut self, texts: I) -> Self {
        self.engine = Some(ScriptedEngine::replies(texts));
        self
    }

    /// The engine says it serves `model`: answers recorded under another
    /// model are not replayed.
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// Replies with `f(request)`. Requests to every engine come here, named
    /// or not: `request.engine` says which one a task asked for.
    pub fn respond_with(
        mut self,
        f: impl Fn(&Request) -> Result<Response, RequestError> + Send + Sync + 'static,
    ) -> Self {
        self.engine = Some(ScriptedEngine::from_fn(f));
        self
    }

    /// Runs as the line of this work id (0 by default): line `work_id + 1`
    /// of the input.
    pub fn work_id(mut self, work_id: u64) -> Self {
        self.work_id = work_id;
        self
    }

    /// Runs as this attempt: `retry_count` of `max_retries`.
    pub fn attempt(mut self, retry_count: u32, max_retries: Option<u32>) -> Self {
        self.retry_count = retry_count;
        self.max_retries = max_retries;
        self
    }

    /// Runs the task on `input` (one input line, as JSON).
    pub async fn run(self, input: Value) -> TaskRun {
        self.run_line(&input.to_string()).await
    }

    /// Runs the task on a raw input line.
    pub async fn run_line(self, line: &str) -> TaskRun {
        let mut engine = self
            .engine
            .unwrap_or_else(|| ScriptedEngine::replies(Vec::<String>::new()));
        engine.model = self.model;
        let engine = Arc::new(engine);
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink: JournalSink = {
            let events = events.clone();
            Arc::new(move |e| events.lock().expect("not poisoned").push(e))
        };
        let journal = Arc::new(TaskJournal::new(self.work_id, self.journal, sink));
        let ctx = TaskContext::new(
            self.work_id,
            self.retry_count,
            self.max_retries,
            super::Engines::single(engine.clone()),
            0,
        )
        .with_journal(journal.clone());
        let outcome = self.task.run_line(line.to_string(), ctx).await;
        let entries = events
            .lock()
            .expect("not poisoned")
            .iter()
            .filter_map(|e| match e {
                JournalEvent::Entry(record) => Some(record.entry()),
                JournalEvent::Replayed { .. } => None,
            })
            .collect();
        let output = match &outcome {
            LineOutcome::Line { line, .. } => {
                serde_json::from_str(line).expect("output lines are JSON")
            }
            _ => Value::Null,
        };
        TaskRun {
            outcome,
            output,
            requests: engine.requests(),
            journal: entries,
            replayed: journal.replayed(),
        }
    }
}
