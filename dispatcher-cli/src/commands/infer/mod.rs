//! `dispatcher infer`: prompt in, responses out, without writing a task.
//!
//! Its flags and command are here; the task itself is in `task.rs`, the
//! output line it writes (the input line kept exactly) in `output.rs`.

mod output;
mod settings;
mod task;

use clap::{Args, ValueEnum};

pub use task::{EnginePrompt, Infer, InferConfig, InputFormat, Mode, PromptCheck};

use crate::worker::{self, EngineArgs, WorkArgs};

/// `--mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Chat completions: the prompt is the user message.
    Chat,
    /// Text completions: the prompt is continued.
    Completion,
}

/// `--input-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// JSON lines; --prompt-path selects the prompt.
    Jsonl,
    /// Plain text: each line is a prompt.
    Text,
}

/// How a line becomes a prompt: the flags `infer` and `estimate` share.
#[derive(Debug, Clone, Args)]
pub struct PromptArgs {
    /// jq filter selecting each line's prompt: `.prompt`, `.a.b[2]`, or any jq
    /// expression (`.messages | last | .content`). In chat mode it may select an
    /// array of {role, content} messages.
    #[arg(long, default_value = ".messages[0].content")]
    pub prompt_path: String,
    /// How input lines are read.
    #[arg(long, value_enum, default_value = "jsonl")]
    pub input_format: FormatArg,
    /// Chat or text completion.
    #[arg(long, value_enum, default_value = "chat")]
    pub mode: ModeArg,
    /// A system message (chat mode).
    #[arg(long)]
    pub system: Option<String>,
    /// jq filter selecting an object of request fields in each line, set
    /// over the flags for that line: its own `temperature`, `max_tokens`,
    /// `seed`, `stop`, `response_format`, or `model` (a LoRA adapter the
    /// engine serves). A bad value fails that line as
    /// `request_field_invalid`, naming the field.
    #[arg(long, value_name = "JQ")]
    pub request_path: Option<String>,
}

impl PromptArgs {
    /// The configuration these flags set (the rest at `infer`'s defaults).
    pub fn config(&self) -> anyhow::Result<InferConfig> {
        if self.system.is_some() && self.mode == ModeArg::Completion {
            anyhow::bail!("--system needs --mode chat");
        }
        Ok(InferConfig {
            prompt_path: self.prompt_path.clone(),
            input_format: match self.input_format {
                FormatArg::Jsonl => InputFormat::Jsonl,
                FormatArg::Text => InputFormat::Text,
            },
            mode: match self.mode {
                ModeArg::Chat => Mode::Chat,
                ModeArg::Completion => Mode::Completion,
            },
            system: self.system.clone(),
            request_path: self.request_path.clone(),
            ..InferConfig::default()
        })
    }
}

/// Flags of `dispatcher infer`.
#[derive(Debug, Clone, Args)]
pub struct InferArgs {
    /// How a line becomes a prompt.
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Responses per line.
    #[arg(long, default_value_t = 1)]
    pub num_generations: u32,
    /// Sampling temperature.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// Nucleus sampling.
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f64,
    /// Min-p sampling.
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f64,
    /// Tokens per response at most.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens: u32,
    /// A stop sequence (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Sampling seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Add each line's token usage as `usage`, and each response's finish reason as `finish_reasons`.
    #[arg(long)]
    pub include_usage: bool,
    /// Keep each generated token's log-probability, and the N most likely
    /// tokens at its place (0: none), as `logprobs`: one list per response
    /// of `{"token", "logprob", "bytes", "top": [{"token", "logprob"}]}`.
    #[arg(long, value_name = "N")]
    pub logprobs: Option<u32>,
    /// Keep the prompt's tokens' log-probabilities, with N alternatives
    /// each, as `prompt_logprobs`, in the engine's own form (vLLM's
    /// `prompt_logprobs`: a list per prompt token, `null` for the first).
    #[arg(long, value_name = "N")]
    pub prompt_logprobs: Option<u32>,
    /// More fields for every request, as a JSON object merged into its body
    /// (engine-specific ones the flags above do not set):
    /// --extra-body '{"ignore_eos": true, "repetition_penalty": 1.1}'.
    #[arg(long, value_name = "JSON")]
    pub extra_body: Option<String>,
    /// Fail a line whose prompt leaves no room for one generated token in
    /// the model's context (--max-model-len, else the model's config.json)
    /// at once, as `prompt_too_long`, without sending it: counted with the
    /// model's own tokenizer and chat template (--tokenizer).
    #[arg(long)]
    pub skip_over_length: bool,
    /// The tokenizer --skip-over-length counts with: a model directory
    /// (tokenizer.json, tokenizer_config.json) or a tokenizer.json (default:
    /// --model, when it is a directory).
    #[arg(long, value_name = "PATH", requires = "skip_over_length")]
    pub tokenizer: Option<std::path::PathBuf>,
    /// Where items come from.
    #[command(flatten)]
    pub work: WorkArgs,
    /// The engine.
    #[command(flatten)]
    pub engine: EngineArgs,
}

impl InferArgs {
    /// The built-in task these flags describe.
    pub fn task(&self) -> anyhow::Result<Infer> {
        Infer::new(InferConfig {
            num_generations: self.num_generations,
            temperature: self.temperature,
            top_p: self.top_p,
            min_p: self.min_p,
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            seed: self.seed,
            include_usage: self.include_usage,
            logprobs: self.logprobs,
            prompt_logprobs: self.prompt_logprobs,
            extra_body: match &self.extra_body {
                None => serde_json::Map::new(),
                Some(text) => match serde_json::from_str(text) {
                    Ok(serde_json::Value::Object(fields)) => {
                        const OWN_FLAGS: [&str; 9] = [
                            "model", "messages", "prompt", "n", "temperature", "top_p",
                            "max_tokens", "stop", "seed",
                        ];
                        if let Some(key) = fields.keys().find(|k| OWN_FLAGS.contains(&k.as_str())) {
                            anyhow::bail!(
                                "--extra-body sets {key:?}, which infer sets itself: use its own flag (--max-tokens, --temperature, ...) instead"
                            );
                        }
                        if let Some(key) = fields.keys().find(|k| {
                            self.logprobs.is_some() && (*k == "logprobs" || *k == "top_logprobs")
                        }) {
                            anyhow::bail!("--extra-body sets {key:?}, which --logprobs sets: give one of them");
                        }
                        if self.prompt_logprobs.is_some() && fields.contains_key("prompt_logprobs") {
                            anyhow::bail!("--extra-body sets \"prompt_logprobs\", which --prompt-logprobs sets: give one of them");
                        }
                        fields
                    }
                    _ => anyhow::bail!(
                        "--extra-body must be a JSON object, like '{{\"ignore_eos\": true}}', not {text:?}"
                    ),
                },
            },
            ..self.prompt.config()?
        })
        .map_err(anyhow::Error::msg)
        .and_then(|task| match self.prompt_check()? {
            Some(check) => Ok(task.with_prompt_check(check)),
            None => Ok(task),
        })
    }

    /// With --skip-over-length: the check of each prompt against the
    /// model's context, counted with its tokenizer.
    #[cfg(feature = "tokenizer")]
    fn prompt_check(&self) -> anyhow::Result<Option<std::sync::Arc<PromptCheck>>> {
        use anyhow::Context;
        if !self.skip_over_length {
            return Ok(None);
        }
        let path = match (&self.tokenizer, &self.engine.model) {
            (Some(path), _) => path.clone(),
            (None, Some(model)) if std::path::Path::new(model).is_dir() => model.into(),
            _ => anyhow::bail!(
                "--skip-over-length counts prompts with the model's tokenizer: give --tokenizer (a model directory or its tokenizer.json), or a --model that is a local directory"
            ),
        };
        let chat_template = self
            .engine
            .chat_template
            .as_deref()
            .map(std::path::Path::new);
        let tokenizer = crate::tokenize::PromptTokenizer::load(&path, chat_template)
            .context("--skip-over-length")?;
        let max_model_len = self.engine.max_model_len.or(tokenizer.context_len()).with_context(|| {
            format!(
                "--skip-over-length needs the model's context length: give --max-model-len ({} has no config.json saying max_position_embeddings)",
                path.display()
            )
        })?;
        tokenizer
            .check_mode(self.prompt.mode == ModeArg::Chat)
            .context("--skip-over-length")?;
        let limit = crate::tokenize::LengthLimit {
            tokenizer,
            max_model_len,
        };
        Ok(Some(std::sync::Arc::new(move |prompt: &EnginePrompt| {
            limit.check(prompt)
        })))
    }

    /// A build without the tokenizer (a task crate's, which runs no
    /// `infer`) cannot count prompts.
    #[cfg(not(feature = "tokenizer"))]
    fn prompt_check(&self) -> anyhow::Result<Option<std::sync::Arc<PromptCheck>>> {
        if self.skip_over_length {
            anyhow::bail!("--skip-over-length needs the `tokenizer` feature of dispatcher-cli, which this build lacks (the `dispatcher` binary has it)");
        }
        Ok(None)
    }
}

/// Runs `dispatcher infer`.
pub async fn run(args: InferArgs) -> anyhow::Result<()> {
    // The task lives as long as the process; leaking it gives the manager the
    // `'static` reference it takes for compiled-in tasks too.
    let task: &'static Infer = Box::leak(Box::new(args.task()?));
    worker::run_task(task, &args.engine, &args.work).await
}
