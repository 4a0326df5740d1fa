//! The built-in task behind `dispatcher infer`: take a prompt out of each line
//! with a jq filter, generate N responses, write the line back with
//! `responses` added. It runs on the same task runtime as user tasks, so
//! ordering, retries, preemption and resume behave the same.

use std::sync::Arc;

use jaq_json::Val;
use serde_json::{Map, Value};

use dispatcher_core::engine::{BoxFuture, Message, Request, Response, Usage};
use dispatcher_core::task::{line_outcome_of_line, DynTask, LineOutcome, TaskContext, TaskError};

/// How input lines are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    /// Each line is JSON; `--prompt-path` selects the prompt.
    Jsonl,
    /// Each line is the prompt itself, as plain text.
    Text,
}

/// Which endpoint the prompt goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `/v1/chat/completions`: the prompt is the user message.
    Chat,
    /// `/v1/completions`: the prompt is continued.
    Completion,
}

/// What `dispatcher infer` does with each line.
#[derive(Debug, Clone)]
pub struct InferConfig {
    /// A jq filter selecting the prompt (a string; in chat mode also an array of
    /// `{role, content}` messages).
    pub prompt_path: String,
    /// How lines are read.
    pub input_format: InputFormat,
    /// Chat or completion.
    pub mode: Mode,
    /// A system message (chat mode).
    pub system: Option<String>,
    /// Responses per line.
    pub num_generations: u32,
    /// Sampling temperature.
    pub temperature: f64,
    /// Nucleus sampling.
    pub top_p: f64,
    /// Min-p sampling (sent as an engine-specific field).
    pub min_p: f64,
    /// Tokens per response at most.
    pub max_tokens: u32,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// Sampling seed.
    pub seed: Option<u64>,
    /// Add the line's token usage as `usage`.
    pub include_usage: bool,
    /// Keep each generated token's log-probability, with this many of the
    /// most likely alternatives at its place, as `logprobs`.
    pub logprobs: Option<u32>,
    /// Keep the prompt's tokens' log-probabilities, with this many
    /// alternatives each, as `prompt_logprobs` (vLLM).
    pub prompt_logprobs: Option<u32>,
    /// A jq filter selecting each line's own request fields (`--request-path`).
    pub request_path: Option<String>,
    /// Fields merged into every request's body: engine-specific sampling
    /// parameters such as `ignore_eos`, not the fields above.
    pub extra_body: Map<String, Value>,
}

impl Default for InferConfig {
    /// The Python tool's defaults.
    fn default() -> Self {
        InferConfig {
            prompt_path: ".messages[0].content".into(),
            input_format: InputFormat::Jsonl,
            mode: Mode::Chat,
            system: None,
            num_generations: 1,
            temperature: 0.8,
            top_p: 0.95,
            min_p: 0.05,
            max_tokens: 4096,
            stop: Vec::new(),
            seed: None,
            include_usage: false,
            logprobs: None,
            prompt_logprobs: None,
            request_path: None,
            extra_body: Map::new(),
        }
    }
}

use crate::jq::{compile, Filter};

/// The built-in inference task.
#[derive(Clone)]
pub struct Infer {
    config: Arc<InferConfig>,
    filter: Arc<Filter>,
    /// `--request-path`, compiled.
    request_filter: Option<Arc<Filter>>,
    /// `--skip-over-length`: fails prompts the engine would refuse here,
    /// without a request.
    prompt_check: Option<Arc<PromptCheck>>,
}

pub use crate::prompt::{EnginePrompt, PromptCheck};

impl std::fmt::Debug for Infer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Infer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What the prompt path selected in one line.
enum Prompt {
    Text(String),
    Messages(Vec<Message>),
}

impl Infer {
    /// Checks the configuration; a bad `--prompt-path` is named in the error.
    pub fn new(config: InferConfig) -> Result<Infer, String> {
        if config.num_generations == 0 {
            return Err("--num-generations must be at least 1".into());
        }
        let filter = compile(&config.prompt_path).map_err(|why| {
            format!(
                "--prompt-path {:?} is not a valid jq filter: {why}",
                config.prompt_path
            )
        })?;
        let request_filter = match &config.request_path {
            Some(path) if config.input_format == InputFormat::Text => {
                return Err(format!(
                "--request-path {path:?} reads JSON lines: it cannot go with --input-format text"
            ))
            }
            Some(path) => Some(Arc::new(compile(path).map_err(|why| {
                format!("--request-path {path:?} is not a valid jq filter: {why}")
            })?)),
            None => None,
        };
        Ok(Infer {
            config: Arc::new(config),
            filter: Arc::new(filter),
            request_filter,
            prompt_check: None,
        })
    }

    /// The same task, failing the lines whose prompt `check` refuses
    /// without a request.
    pub fn with_prompt_check(self, check: Arc<PromptCheck>) -> Infer {
        Infer {
            prompt_check: Some(check),
            ..self
        }
    }

    /// The request fields line `input` sets for itself (`--request-path`),
    /// checked; `None` without the flag or where the line sets none.
    fn line_settings(&self, input: &Val) -> Result<Option<Map<String, Value>>, TaskError> {
        let (Some(filter), Some(path)) = (&self.request_filter, &self.config.request_path) else {
            return Ok(None);
        };
        let selected = match crate::jq::first_output(filter, input.clone()) {
            None => return Ok(None),
            Some(Err(e)) => {
                return Err(TaskError::failed(
                    super::settings::INVALID,
                    format!("--request-path {path} failed on this line: {e}"),
                ))
            }
            Some(Ok(v)) => crate::jq::to_json(&v),
        };
        super::settings::check(selected, path)
    }

    /// Runs the prompt path on a line: the prompt, and the line as read.
    fn select(&self, line: &str) -> Result<(Prompt, Val), TaskError> {
        let path = &self.config.prompt_path;
        let input = crate::jq::parse_line(line).map_err(|e| match e {
            crate::jq::ParseError::TooDeep(_) => TaskError::failed(
                "input_too_deep",
                format!("the line is not read: {e}"),
            ),
            crate::jq::ParseError::NotJson(e) => TaskError::failed(
                "invalid_json",
                format!("the line is not JSON ({e}); --prompt-path {path} needs JSON lines (--input-format text takes plain text)"),
            ),
        })?;
        let value = match crate::jq::first_output(&self.filter, input.clone()) {
            None => return Err(missing(path, "it selects nothing")),
            Some(Err(e)) => {
                return Err(TaskError::failed(
                    "prompt_path_error",
                    format!("--prompt-path {path} failed on this line: {e}"),
                ))
            }
            Some(Ok(v)) => v,
        };
        // What was selected, as serde reads it (a prompt is a string or
        // messages; a value serde cannot hold is no prompt either).
        let json = crate::jq::to_json(&value);
        let prompt = match json {
            Value::String(s) => Ok(Prompt::Text(s)),
            Value::Null => Err(missing(path, "it selects null (no such field?)")),
            Value::Array(_) if self.config.mode == Mode::Chat => serde_json::from_value(json)
                .map(Prompt::Messages)
                .map_err(|e| {
                    TaskError::failed(
                        "prompt_not_string",
                        format!(
                            "--prompt-path {path} selects an array that is not chat messages ({e})"
                        ),
                    )
                }),
            other => Err(TaskError::failed(
                "prompt_not_string",
                format!(
                    "--prompt-path {path} selects {}, not a string",
                    crate::jq::kind(&other)
                ),
            )),
        }?;
        Ok((prompt, input))
    }

    /// What a selected prompt sends to the engine: the messages of a chat
    /// request (the system message first), or the text to complete.
    fn engine_prompt(&self, prompt: &Prompt) -> EnginePrompt {
        let c = &self.config;
        let system = || c.system.iter().map(|s| Message::new("system", s.clone()));
        match (c.mode, prompt) {
            (Mode::Chat, Prompt::Text(text)) => {
                EnginePrompt::Chat(system().chain([Message::user(text.clone())]).collect())
            }
            (Mode::Chat, Prompt::Messages(m)) => {
                EnginePrompt::Chat(system().chain(m.iter().cloned()).collect())
            }
            (Mode::Completion, Prompt::Text(text)) => EnginePrompt::Completion(text.clone()),
            (Mode::Completion, Prompt::Messages(_)) => {
                unreachable!("only chat mode selects messages")
            }
        }
    }

    /// What line `line` sends to the engine, or why it sends nothing.
    pub fn engine_prompt_of(&self, line: &str) -> Result<EnginePrompt, TaskError> {
        let prompt = match self.config.input_format {
            InputFormat::Text => Prompt::Text(line.to_string()),
            InputFormat::Jsonl => self.select(line)?.0,
        };
        Ok(self.engine_prompt(&prompt))
    }

    /// The request `infer` sends for `prompt` (all its generations at once).
    pub fn sample_request(&self, prompt: &EnginePrompt) -> Request {
        self.request(prompt, self.config.num_generations, None)
    }

    /// The request for `prompt` with `n` generations: the flags' settings,
    /// and over them the line's own `fields`.
    fn request(
        &self,
        prompt: &EnginePrompt,
        n: u32,
        fields: Option<&Map<String, Value>>,
    ) -> Request {
        let c = &self.config;
        let mut req = match prompt {
            EnginePrompt::Chat(messages) => Request::chat_messages(messages.clone()),
            EnginePrompt::Completion(text) => Request::completion(text.clone()),
        }
        .temperature(c.temperature)
        .top_p(c.top_p)
        .max_tokens(c.max_tokens)
        .extra("min_p", c.min_p);
        if n > 1 {
            req = req.n(n);
        }
        for s in &c.stop {
            req = req.stop(s.clone());
        }
        if let Some(seed) = c.seed {
            req = req.seed(seed);
        }
        match (c.logprobs, prompt) {
            (None, _) => {}
            (Some(top), EnginePrompt::Chat(_)) => {
                req = req.extra("logprobs", true);
                if top > 0 {
                    req = req.extra("top_logprobs", top);
                }
            }
            (Some(top), EnginePrompt::Completion(_)) => req = req.extra("logprobs", top),
        }
        if let Some(top) = c.prompt_logprobs {
            req = req.extra("prompt_logprobs", top);
        }
        for (key, value) in &c.extra_body {
            req = req.extra(key.clone(), value.clone());
        }
        match fields {
            Some(fields) => super::settings::apply(req, fields),
            None => req,
        }
    }

    async fn run(self, line: String, ctx: TaskContext) -> Result<String, TaskError> {
        let c = self.config.clone();
        let (prompt, read) = match c.input_format {
            InputFormat::Text => (Prompt::Text(line.clone()), None),
            InputFormat::Jsonl => {
                let (prompt, read) = self.select(&line)?;
                (prompt, Some(read))
            }
        };
        let prompt = self.engine_prompt(&prompt);
        if let Some(check) = &self.prompt_check {
            check(&prompt)?;
        }
        let wanted = c.num_generations as usize;
        let mut usage = Usage::default();
        let started = std::time::Instant::now();
        let fields = match &read {
            Some(input) => self.line_settings(input)?,
            None => None,
        };
        let first: Response = ctx
            .send(self.request(&prompt, c.num_generations, fields.as_ref()))
            .await?;
        add_usage(&mut usage, &first);
        // vLLM puts them beside the choices of a chat answer, in each choice
        // of a completion's: the engine's own form, kept as it is.
        let prompt_logprobs = c.prompt_logprobs.map(|_| {
            let body = first.body.as_ref().unwrap_or(&Value::Null);
            match &body["prompt_logprobs"] {
                Value::Null => body["choices"][0]["prompt_logprobs"].clone(),
                found => found.clone(),
            }
        });
        let mut choices = first.choices;
        // Engines that ignore `n` answer once: ask for the rest one by one, in parallel.
        if choices.len() < wanted {
            let rest: Vec<Request> = (choices.len()..wanted)
                .map(|_| self.request(&prompt, 1, fields.as_ref()))
                .collect();
            for r in ctx.send(rest).await? {
                add_usage(&mut usage, &r);
                choices.extend(r.choices.into_iter().take(1));
            }
        }
        choices.truncate(wanted);
        let mut added = Map::new();
        // A response the engine gave no text for is null, not "" (a
        // reasoning model cut at max_tokens while thinking): its reasoning,
        // the job's product then, is beside it.
        let responses: Vec<Value> = choices
            .iter()
            .map(|c| match c.text_missing {
                true => Value::Null,
                false => c.text.clone().into(),
            })
            .collect();
        added.insert("responses".into(), responses.into());
        if choices.iter().any(|c| c.reasoning.is_some()) {
            let reasoning: Vec<Value> =
                choices.iter().map(|c| c.reasoning.clone().into()).collect();
            added.insert("reasoning".into(), reasoning.into());
        }
        if c.logprobs.is_some() {
            let logprobs: Vec<Value> = choices
                .iter()
                .map(|c| serde_json::to_value(&c.logprobs).expect("log-probabilities serialize"))
                .collect();
            added.insert("logprobs".into(), logprobs.into());
        }
        if let Some(prompt_logprobs) = prompt_logprobs {
            added.insert("prompt_logprobs".into(), prompt_logprobs);
        }
        let finish_reasons: Vec<Value> = choices
            .iter()
            .map(|c| c.finish_reason.clone().into())
            .collect();
        if c.include_usage {
            added.insert(
                "usage".into(),
                serde_json::to_value(usage).expect("usage serializes"),
            );
            added.insert("finish_reasons".into(), finish_reasons.into());
            // Milliseconds are enough: a line's requests take tens of them
            // at the least.
            let secs = (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
            added.insert("latency_secs".into(), secs.into());
        }
        Ok(super::output::line(&line, read.as_ref(), &added))
    }
}

fn add_usage(total: &mut Usage, r: &Response) {
    if let Some(u) = r.usage {
        total.prompt_tokens += u.prompt_tokens;
        total.completion_tokens += u.completion_tokens;
        total.total_tokens += u.total_tokens;
    }
}

fn missing(path: &str, why: &str) -> TaskError {
    TaskError::failed(
        "prompt_missing",
        format!("--prompt-path {path}: {why} in this line"),
    )
}

impl DynTask for Infer {
    fn name(&self) -> &'static str {
        "infer"
    }

    fn settings(&self) -> Map<String, Value> {
        let c = &self.config;
        let mut m = Map::new();
        m.insert("prompt_path".into(), c.prompt_path.clone().into());
        m.insert(
            "mode".into(),
            match c.mode {
                Mode::Chat => "chat",
                Mode::Completion => "completion",
            }
            .into(),
        );
        m.insert("system".into(), c.system.clone().into());
        m.insert("num_generations".into(), c.num_generations.into());
        m.insert("temperature".into(), c.temperature.into());
        m.insert("top_p".into(), c.top_p.into());
        m.insert("min_p".into(), c.min_p.into());
        m.insert("max_tokens".into(), c.max_tokens.into());
        m.insert("stop".into(), c.stop.clone().into());
        m.insert("seed".into(), c.seed.into());
        m.insert("extra_body".into(), Value::Object(c.extra_body.clone()));
        m
    }

    fn run_line(&self, content: String, ctx: TaskContext) -> BoxFuture<'static, LineOutcome> {
        let last_attempt = ctx.is_last_attempt();
        line_outcome_of_line(
            content.clone(),
            last_attempt,
            self.clone().run(content, ctx),
        )
    }
}
