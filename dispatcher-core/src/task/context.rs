//! What a running task can see and do: its work item's identity and the engine.

use std::sync::Arc;

use futures_util::future::join_all;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::engines::Engines;
use super::journal::{fingerprint, Step, TaskJournal};
use crate::engine::{BoxFuture, RawRequest, RawResponse, Request, RequestError, Response};
use crate::metrics::Answered;

/// The context of one task run; cheap to clone.
#[derive(Debug, Clone)]
pub struct TaskContext {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    work_id: u64,
    retry_count: u32,
    max_retries: Option<u32>,
    engines: Engines,
    /// When this task started relative to others: lower goes first.
    priority: u64,
    /// Replays what an earlier issue of the line completed, and records
    /// what this one completes; `None` without a journal.
    journal: Option<Arc<TaskJournal>>,
}

impl TaskContext {
    /// A context for work item `work_id` on its `retry_count`-th reissue,
    /// sending to `engines`; among tasks waiting for an engine's request
    /// slot, the lowest `priority` (the task started first) goes first.
    pub fn new(
        work_id: u64,
        retry_count: u32,
        max_retries: Option<u32>,
        engines: Engines,
        priority: u64,
    ) -> TaskContext {
        TaskContext {
            inner: Arc::new(Inner {
                work_id,
                retry_count,
                max_retries,
                engines,
                priority,
                journal: None,
            }),
        }
    }

    /// Replays from and records to `journal`. Call before the context is
    /// shared (cloned).
    pub fn with_journal(mut self, journal: Arc<TaskJournal>) -> TaskContext {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.journal = Some(journal),
            None => tracing::warn!("a journal given to a context already shared; ignored"),
        }
        self
    }

    /// Requests answered from the line's journal instead of the engine so
    /// far: an earlier issue of the line (preempted, or on a worker that
    /// died) had completed them.
    pub fn replayed_requests(&self) -> u32 {
        self.inner.journal.as_ref().map_or(0, |j| j.replayed())
    }

    /// How each of `keys` (requests sent together, with the engine each
    /// goes to) is answered. A key covers the model the engine serves, so
    /// that an answer is never replayed to a worker on another model.
    async fn steps(&self, keys: impl Iterator<Item = (Option<&str>, Value)>) -> Vec<Step> {
        let Some(journal) = &self.inner.journal else {
            return keys.map(|_| Step::Live(None)).collect();
        };
        let mut fingerprints = Vec::new();
        for (engine, mut key) in keys {
            let model = match self.inner.engines.route(engine) {
                Ok(route) => route.engine().resolve_model().await,
                Err(_) => None,
            };
            key["model"] = model.into();
            fingerprints.push(fingerprint(&key));
        }
        journal.steps(fingerprints)
    }

    /// Records a live `response` at its step, when there is a journal.
    fn record<T: Serialize>(&self, step: Step, response: &T) {
        if let (Step::Live(Some((seq, fp))), Some(j)) = (step, &self.inner.journal) {
            if let Ok(text) = serde_json::value::to_raw_value(response) {
                j.record(seq, fp, text);
            }
        }
    }

    /// The recorded response when `step` replays one, else `live`'s (which
    /// is then recorded).
    async fn replay_or<T: Serialize + DeserializeOwned>(
        &self,
        step: Step,
        live: impl std::future::Future<Output = Result<T, RequestError>>,
    ) -> Result<T, RequestError> {
        if let Step::Replay(recorded) = &step {
            if let Ok(response) = serde_json::from_str::<T>(recorded.get()) {
                return Ok(response);
            }
        }
        let result = live.await;
        if let Ok(response) = &result {
            self.record(step, response);
        }
        result
    }

    /// One typed request, replayed or sent as `step` says.
    async fn request_at(&self, request: Request, step: Step) -> Result<Response, RequestError> {
        self.replay_or(step, self.request_live(request)).await
    }

    /// The work item's id: its input line's 0-based index.
    pub fn work_id(&self) -> u64 {
        self.inner.work_id
    }

    /// How many times this item was reissued before this attempt.
    pub fn retry_count(&self) -> u32 {
        self.inner.retry_count
    }

    /// The server's `--max-retries`; `None` when unlimited.
    pub fn max_retries(&self) -> Option<u32> {
        self.inner.max_retries
    }

    /// Whether this is the last attempt: a retry now ends the line with a
    /// `retries_exhausted` record.
    pub fn is_last_attempt(&self) -> bool {
        self.inner
            .max_retries
            .is_some_and(|max| self.inner.retry_count >= max)
    }

    /// Sends one request, or several in parallel: what `yield_request!` expands to.
    pub fn send<R: Requests>(&self, requests: R) -> BoxFuture<'_, R::Output> {
        requests.send_all(self)
    }

    /// What `yield_request!(requests)` evaluates to, for type checking only:
    /// after a `#[task]` error, the macro type-checks the body with this in
    /// place of each send, so that the one error is the only message. Never
    /// called.
    #[doc(hidden)]
    pub fn stand_in<R: Requests>(requests: R) -> R::Output {
        drop(requests);
        unreachable!("a stand-in for a task that did not compile")
    }

    /// Sends one request to the engine it names (the default one when it
    /// names none), waiting for one of that engine's request slots; or
    /// answers it from the line's journal, when an earlier issue completed it.
    pub async fn request(&self, request: Request) -> Result<Response, RequestError> {
        let step = self
            .steps(std::iter::once(typed_key(&request)))
            .await
            .pop()
            .expect("one step");
        self.request_at(request, step).await
    }

    async fn request_live(&self, request: Request) -> Result<Response, RequestError> {
        let route = self.inner.engines.route(request.engine.as_deref())?;
        let slot = route.slot(self.inner.priority).await;
        let result = route.engine().send(request).await;
        slot.ended(result.as_ref().ok().map(|r| Answered {
            model: &r.model,
            prompt_tokens: r.usage.map(|u| u.prompt_tokens),
            completion_tokens: r.usage.map(|u| u.completion_tokens),
            finish_reason: r.finish_reason(),
        }));
        result.map_err(|e| named_unavailable(route.name(), e))
    }

    /// Posts a body as it is to the engine it names (see [`RawRequest`]),
    /// within that engine's request slots, and returns the engine's answer,
    /// error statuses included.
    pub async fn post(&self, request: RawRequest) -> Result<RawResponse, RequestError> {
        let key = serde_json::json!({
            "engine": request.engine, "path": request.path,
            "body": request.body, "keep_model": request.keep_model,
        });
        let step = self
            .steps(std::iter::once((request.engine.as_deref(), key)))
            .await
            .pop()
            .expect("one step");
        self.replay_or(step, self.post_live(request)).await
    }

    async fn post_live(&self, request: RawRequest) -> Result<RawResponse, RequestError> {
        let route = self.inner.engines.route(request.engine.as_deref())?;
        let slot = route.slot(self.inner.priority).await;
        let result = route.engine().post(request).await;
        slot.ended(match &result {
            Ok(r) if (200..300).contains(&r.status) => {
                let usage = &r.body["usage"];
                Some(Answered {
                    model: r.body["model"].as_str().unwrap_or(""),
                    prompt_tokens: usage["prompt_tokens"].as_u64(),
                    completion_tokens: usage["completion_tokens"].as_u64(),
                    finish_reason: r.body["choices"][0]["finish_reason"].as_str(),
                })
            }
            _ => None,
        });
        result.map_err(|e| named_unavailable(route.name(), e))
    }

    /// The conventional result: the output's JSON object with
    /// `task_metadata: {success, retry_count, max_retries}` added.
    pub fn with_metadata<T: Serialize>(&self, output: &T) -> Value {
        let mut v = serde_json::to_value(output).unwrap_or(Value::Null);
        let meta = serde_json::json!({
            "success": true,
            "retry_count": self.inner.retry_count,
            "max_retries": self.inner.max_retries,
        });
        match &mut v {
            Value::Object(map) => {
                map.insert("task_metadata".into(), meta);
            }
            other => {
                let output = std::mem::take(other);
                *other = serde_json::json!({"output": output, "task_metadata": meta});
            }
        }
        v
    }
}

/// A named engine that is unavailable says which it is.
fn named_unavailable(engine: &str, e: RequestError) -> RequestError {
    match e {
        RequestError::Unavailable(why) if engine != super::engines::DEFAULT_ENGINE => {
            RequestError::Unavailable(format!("the engine {engine:?}: {why}"))
        }
        e => e,
    }
}

/// What `yield_request!` accepts: one request, an array, or a `Vec` of them.
pub trait Requests: Send {
    /// `Result<Response, _>` for one request; the responses in request order for
    /// several (the first error fails them all).
    type Output: Send;
    /// Sends them, in parallel where there are several.
    fn send_all(self, ctx: &TaskContext) -> BoxFuture<'_, Self::Output>;
}

impl Requests for Request {
    type Output = Result<Response, RequestError>;
    fn send_all(self, ctx: &TaskContext) -> BoxFuture<'_, Self::Output> {
        Box::pin(ctx.request(self))
    }
}

impl Requests for Vec<Request> {
    type Output = Result<Vec<Response>, RequestError>;
    fn send_all(self, ctx: &TaskContext) -> BoxFuture<'_, Self::Output> {
        Box::pin(async move {
            // One group: replayed together, or sent together.
            let steps = ctx.steps(self.iter().map(typed_key)).await;
            join_all(
                self.into_iter()
                    .zip(steps)
                    .map(|(r, step)| ctx.request_at(r, step)),
            )
            .await
            .into_iter()
            .collect()
        })
    }
}

/// What a typed request's fingerprint covers: the request and its engine
/// (and, added by [`TaskContext::steps`], the engine's model).
fn typed_key(request: &Request) -> (Option<&str>, Value) {
    (
        request.engine.as_deref(),
        serde_json::json!({"engine": request.engine, "request": request.to_json()}),
    )
}

impl<const N: usize> Requests for [Request; N] {
    type Output = Result<[Response; N], RequestError>;
    fn send_all(self, ctx: &TaskContext) -> BoxFuture<'_, Self::Output> {
        Box::pin(async move {
            let all = Vec::from(self).send_all(ctx).await?;
            Ok(all
                .try_into()
                .unwrap_or_else(|_| unreachable!("N requests give N responses")))
        })
    }
}
