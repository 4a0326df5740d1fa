//! The engines a worker's tasks send to: the default one (launched by the
//! worker, or given by URL) and named ones (`--engine-url judge=URL`), each
//! with its own concurrency limit, oldest task first, and its own metrics.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::limiter::{Permit, PriorityLimiter};
use crate::engine::{Engine, RequestError};
use crate::metrics::{Answered, EngineSeries, WorkerMetrics};

/// The name of the default engine in metrics and logs.
pub const DEFAULT_ENGINE: &str = "default";

/// The engines of one worker; cheap to clone.
#[derive(Debug, Clone)]
pub struct Engines {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    default: Route,
    named: BTreeMap<String, Route>,
    /// Unit tests of tasks: every name goes to the default engine.
    any_name_is_default: bool,
}

/// One engine, its request slots and its counters.
#[derive(Debug)]
pub(crate) struct Route {
    name: String,
    engine: Arc<dyn Engine>,
    /// `None`: unlimited (unit tests of tasks).
    limiter: Option<Arc<PriorityLimiter>>,
    limit: usize,
    in_flight: AtomicU64,
    requests: AtomicU64,
    series: Option<EngineSeries>,
}

/// What one engine is doing, for the progress line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineLoad {
    /// `default`, or the engine's name.
    pub name: String,
    /// Requests sent and not answered.
    pub in_flight: u64,
    /// Its concurrency limit.
    pub limit: usize,
    /// Requests answered (or failed) so far.
    pub requests: u64,
}

/// Why a set of engines cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum EnginesError {
    /// Two engines with one name.
    #[error("two engines are named {0:?}: give each --engine-url NAME=URL its own name")]
    Duplicate(String),
    /// A name that is not a plain word.
    #[error("{0:?} is not an engine name: use letters, digits, '-' and '_' (and not \"default\", the launched engine's name)")]
    BadName(String),
}

impl Route {
    fn new(
        name: &str,
        engine: Arc<dyn Engine>,
        limit: Option<usize>,
        metrics: Option<&WorkerMetrics>,
    ) -> Route {
        Route {
            name: name.to_string(),
            engine,
            limiter: limit.map(|n| PriorityLimiter::new(n.max(1))),
            limit: limit.unwrap_or(usize::MAX),
            in_flight: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            series: metrics.map(|m| m.engine(name)),
        }
    }

    /// The engine's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn engine(&self) -> &dyn Engine {
        &*self.engine
    }

    /// Waits for one of this engine's request slots; tasks that started
    /// first (lower `priority`) are served first.
    pub(crate) async fn slot(&self, priority: u64) -> Slot<'_> {
        let permit = match &self.limiter {
            Some(l) => Some(l.acquire(priority).await),
            None => None,
        };
        self.in_flight.fetch_add(1, Relaxed);
        if let Some(series) = &self.series {
            series.request_started();
        }
        Slot {
            route: self,
            _permit: permit,
            start: std::time::Instant::now(),
            done: false,
        }
    }
}

/// A request slot of one engine, held while its request runs; counts the
/// request when it ends (or is cancelled).
#[derive(Debug)]
pub(crate) struct Slot<'a> {
    route: &'a Route,
    _permit: Option<Permit>,
    start: std::time::Instant,
    done: bool,
}

impl Slot<'_> {
    /// The request ended: answered (with what), or not.
    pub(crate) fn ended(mut self, answered: Option<Answered<'_>>) {
        self.finish(answered);
    }

    fn finish(&mut self, answered: Option<Answered<'_>>) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        self.route.in_flight.fetch_sub(1, Relaxed);
        self.route.requests.fetch_add(1, Relaxed);
        if let Some(series) = &self.route.series {
            series.request_ended(self.start.elapsed(), answered);
        }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        // A task stopped mid-request (its item finished elsewhere, or the
        // worker is stopping).
        self.finish(None);
    }
}

impl Engines {
    /// The default engine with at most `workers` requests in flight, its
    /// requests counted in `metrics`.
    pub fn new(default: Arc<dyn Engine>, workers: usize, metrics: &WorkerMetrics) -> Engines {
        Engines {
            inner: Arc::new(Inner {
                default: Route::new(DEFAULT_ENGINE, default, Some(workers), Some(metrics)),
                named: BTreeMap::new(),
                any_name_is_default: false,
            }),
        }
    }

    /// One engine for every request, whatever engine it names, without a
    /// concurrency limit or metrics: for unit tests of tasks, where the
    /// scripted engine sees each request's [`engine`](crate::engine::Request::engine).
    pub fn single(engine: Arc<dyn Engine>) -> Engines {
        Engines {
            inner: Arc::new(Inner {
                default: Route::new(DEFAULT_ENGINE, engine, None, None),
                named: BTreeMap::new(),
                any_name_is_default: true,
            }),
        }
    }

    /// Adds the engine `name` with at most `workers` requests in flight.
    /// Call before the engines are shared (cloned).
    pub fn with_named(
        mut self,
        name: &str,
        engine: Arc<dyn Engine>,
        workers: usize,
        metrics: &WorkerMetrics,
    ) -> Result<Engines, EnginesError> {
        if !is_engine_name(name) || name == DEFAULT_ENGINE {
            return Err(EnginesError::BadName(name.to_string()));
        }
        let inner =
            Arc::get_mut(&mut self.inner).expect("engines are added before they are shared");
        if inner.named.contains_key(name) {
            return Err(EnginesError::Duplicate(name.to_string()));
        }
        inner.named.insert(
            name.to_string(),
            Route::new(name, engine, Some(workers), Some(metrics)),
        );
        Ok(self)
    }

    /// The engine a request naming `name` goes to.
    pub(crate) fn route(&self, name: Option<&str>) -> Result<&Route, RequestError> {
        let inner = &*self.inner;
        match name {
            None | Some(DEFAULT_ENGINE) => Ok(&inner.default),
            Some(_) if inner.any_name_is_default => Ok(&inner.default),
            Some(name) => inner.named.get(name).ok_or_else(|| {
                let known: Vec<&str> = inner.named.keys().map(String::as_str).collect();
                RequestError::Unavailable(format!(
                    "a request names the engine {name:?}, which this worker does not have \
                     (it has {}): start the worker with --engine-url {name}=URL",
                    if known.is_empty() {
                        "only the default engine".to_string()
                    } else {
                        format!("the default engine and {}", known.join(", "))
                    }
                ))
            }),
        }
    }

    /// The model of the default engine's requests, when known.
    pub fn default_model(&self) -> Option<String> {
        self.inner.default.engine.model_name()
    }

    /// The default engine's concurrency limit.
    pub fn default_limit(&self) -> usize {
        self.inner.default.limit
    }

    /// What each engine is doing, the default first.
    pub fn load(&self) -> Vec<EngineLoad> {
        std::iter::once(&self.inner.default)
            .chain(self.inner.named.values())
            .map(|r| EngineLoad {
                name: r.name.clone(),
                in_flight: r.in_flight.load(Relaxed),
                limit: r.limit,
                requests: r.requests.load(Relaxed),
            })
            .collect()
    }
}

/// Whether `name` can name an engine: a non-empty word of ASCII letters,
/// digits, `-` and `_`.
pub fn is_engine_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Request;
    use crate::task::testing::ScriptedEngine;
    use crate::task::TaskContext;

    fn scripted(answer: &'static str) -> Arc<ScriptedEngine> {
        Arc::new(ScriptedEngine::from_fn(move |_| {
            Ok(crate::task::testing::reply(answer))
        }))
    }

    #[tokio::test]
    async fn requests_go_to_the_engine_they_name_and_are_counted_there() {
        let metrics = WorkerMetrics::default();
        let (main, judge) = (scripted("main"), scripted("judge"));
        let engines = Engines::new(main.clone(), 4, &metrics)
            .with_named("judge", judge.clone(), 2, &metrics)
            .unwrap();
        let ctx = TaskContext::new(0, 0, None, engines.clone(), 0);
        let a = ctx.send(Request::chat().user("x")).await.unwrap();
        let b = ctx
            .send(Request::chat().engine("judge").user("y"))
            .await
            .unwrap();
        let c = ctx
            .send(Request::chat().engine("default").user("z"))
            .await
            .unwrap();
        assert_eq!((a.text(), b.text(), c.text()), ("main", "judge", "main"));
        assert_eq!((main.requests().len(), judge.requests().len()), (2, 1));
        let load = engines.load();
        assert_eq!(
            load.iter()
                .map(|l| (l.name.as_str(), l.requests, l.limit, l.in_flight))
                .collect::<Vec<_>>(),
            vec![("default", 2, 4, 0), ("judge", 1, 2, 0)]
        );
        let text = metrics.render();
        assert!(text.contains(
            "dispatcher_worker_engine_request_duration_seconds_count{engine=\"judge\"} 1"
        ));
        assert!(text.contains(
            "dispatcher_worker_engine_request_duration_seconds_count{engine=\"default\"} 2"
        ));
    }

    #[tokio::test]
    async fn an_unknown_engine_name_is_an_unavailable_engine_that_says_which_flag_is_missing() {
        let metrics = WorkerMetrics::default();
        let engines = Engines::new(scripted("main"), 4, &metrics);
        let ctx = TaskContext::new(0, 0, None, engines, 0);
        let err = ctx
            .send(Request::chat().engine("judge").user("y"))
            .await
            .unwrap_err();
        let RequestError::Unavailable(message) = err else {
            panic!("{err:?}")
        };
        assert!(message.contains("--engine-url judge=URL"), "{message}");
    }

    #[test]
    fn names_are_plain_words_and_unique() {
        let metrics = WorkerMetrics::default();
        let engines = || Engines::new(scripted("main"), 1, &metrics);
        for bad in ["", "de fault", "a=b", "default", "x/y"] {
            assert!(
                matches!(
                    engines().with_named(bad, scripted("x"), 1, &metrics),
                    Err(EnginesError::BadName(_))
                ),
                "{bad:?}"
            );
        }
        let twice = engines()
            .with_named("judge", scripted("x"), 1, &metrics)
            .unwrap()
            .with_named("judge", scripted("y"), 1, &metrics);
        assert!(matches!(twice, Err(EnginesError::Duplicate(_))));
    }

    #[tokio::test]
    async fn each_engine_has_its_own_slots() {
        let metrics = WorkerMetrics::default();
        let engines = Engines::new(scripted("main"), 1, &metrics)
            .with_named("judge", scripted("judge"), 1, &metrics)
            .unwrap();
        let main = engines.route(None).unwrap();
        let judge = engines.route(Some("judge")).unwrap();
        let _held = main.slot(0).await;
        // The default engine's only slot is taken; the judge's is free.
        let slot = tokio::time::timeout(std::time::Duration::from_secs(5), judge.slot(1))
            .await
            .expect("the judge has a free slot");
        slot.ended(Some(Answered::default()));
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), main.slot(2))
                .await
                .is_err()
        );
    }
}
