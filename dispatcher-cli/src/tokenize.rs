//! Prompt tokens counted as the engine counts them: the model's own
//! tokenizer (`tokenizer.json`, Hugging Face's `tokenizers`) and, for chat
//! requests, its chat template rendered as vLLM renders it (transformers'
//! Jinja settings: blocks trimmed, Python string methods, `raise_exception`,
//! the special tokens as variables, the generation prompt added). Used by
//! `dispatcher estimate` and `infer --skip-over-length`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use dispatcher_core::engine::Message;
use dispatcher_core::task::TaskError;
use serde_json::Value;

pub use crate::prompt::EnginePrompt;

/// A model's tokenizer and chat template.
pub struct PromptTokenizer {
    tokenizer: tokenizers::Tokenizer,
    template: Option<minijinja::Environment<'static>>,
    /// The special tokens the template may name (`bos_token`, ...).
    specials: serde_json::Map<String, Value>,
    /// The model's context length, from its `config.json`, if it says.
    context_len: Option<u32>,
    /// Where the tokenizer was read from, for messages.
    source: PathBuf,
}

impl std::fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptTokenizer")
            .field("source", &self.source)
            .field("chat_template", &self.template.is_some())
            .finish_non_exhaustive()
    }
}

/// The name the chat template is added under.
const TEMPLATE: &str = "chat_template";

impl PromptTokenizer {
    /// Reads a model directory (its `tokenizer.json`, `tokenizer_config.json`,
    /// `chat_template.jinja`, `config.json`) or a `tokenizer.json` file (with
    /// those files beside it, where they are). `chat_template` (a file)
    /// replaces the model's template, as `--chat-template` does for vLLM.
    pub fn load(path: &Path, chat_template: Option<&Path>) -> anyhow::Result<PromptTokenizer> {
        let (dir, file) = if path.is_dir() {
            (path.to_path_buf(), path.join("tokenizer.json"))
        } else {
            (
                path.parent().map_or_else(PathBuf::new, Path::to_path_buf),
                path.to_path_buf(),
            )
        };
        if !file.is_file() {
            bail!(
                "{}: no tokenizer.json there; give a model directory with a tokenizer.json (as Hugging Face saves it) or the file itself",
                path.display()
            );
        }
        let tokenizer = tokenizers::Tokenizer::from_file(&file).map_err(|e| {
            anyhow::anyhow!("{}: not a tokenizer this can read: {e}", file.display())
        })?;
        let config: serde_json::Map<String, Value> = read_json(&dir.join("tokenizer_config.json"))?
            .and_then(|v| match v {
                Value::Object(m) => Some(m),
                _ => None,
            })
            .unwrap_or_default();
        let mut specials = serde_json::Map::new();
        for name in [
            "bos_token",
            "eos_token",
            "unk_token",
            "pad_token",
            "sep_token",
            "cls_token",
            "mask_token",
        ] {
            // A plain string, or an added token `{"content": ...}`.
            let token = match config.get(name) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Object(t)) => {
                    t.get("content").and_then(Value::as_str).map(String::from)
                }
                _ => None,
            };
            if let Some(token) = token {
                specials.insert(name.into(), token.into());
            }
        }
        let template_text = match chat_template {
            Some(file) => Some(std::fs::read_to_string(file).with_context(|| {
                format!("--chat-template {}: could not read it", file.display())
            })?),
            None => model_template(&dir, &config)?,
        };
        let template = template_text
            .map(|text| {
                let mut env = minijinja::Environment::new();
                // transformers renders with trim_blocks and lstrip_blocks.
                env.set_trim_blocks(true);
                env.set_lstrip_blocks(true);
                env.set_unknown_method_callback(
                    minijinja_contrib::pycompat::unknown_method_callback,
                );
                env.add_function(
                    "raise_exception",
                    |message: String| -> Result<String, minijinja::Error> {
                        Err(minijinja::Error::new(
                            minijinja::ErrorKind::InvalidOperation,
                            format!("the chat template refused the messages: {message}"),
                        ))
                    },
                );
                env.add_function("strftime_now", |format: String| strftime_now(&format));
                env.add_template_owned(TEMPLATE, text)
                    .map(|()| env)
                    .map_err(|e| anyhow::anyhow!("the chat template of {}: {e}", dir.display()))
            })
            .transpose()?;
        let context_len = read_json(&dir.join("config.json"))?.and_then(|c| {
            [
                "max_position_embeddings",
                "n_positions",
                "max_sequence_length",
                "seq_length",
            ]
            .iter()
            .find_map(|k| c.get(k)?.as_u64())
            .and_then(|n| u32::try_from(n).ok())
        });
        Ok(PromptTokenizer {
            tokenizer,
            template,
            specials,
            context_len,
            source: path.to_path_buf(),
        })
    }

    /// The model's context length as its `config.json` says
    /// (`max_position_embeddings`), which vLLM uses without `--max-model-len`.
    pub fn context_len(&self) -> Option<u32> {
        self.context_len
    }

    /// Whether it can count the prompts of chat requests (`chat`), or of
    /// completions: chat needs a chat template.
    pub fn check_mode(&self, chat: bool) -> anyhow::Result<()> {
        match (chat, &self.template) {
            (true, None) => Err(self.no_template()),
            _ => Ok(()),
        }
    }

    fn no_template(&self) -> anyhow::Error {
        anyhow::anyhow!(
            "{} has no chat template to count chat prompts with (no chat_template in tokenizer_config.json, no chat_template.jinja): give --chat-template FILE (what the engine is given), or --mode completion",
            self.source.display()
        )
    }

    /// The text a chat request's messages become, as the engine renders
    /// them for the model (with the generation prompt).
    pub fn render(&self, messages: &[Message]) -> anyhow::Result<String> {
        let Some(env) = &self.template else {
            return Err(self.no_template());
        };
        let template = env.get_template(TEMPLATE).expect("added at load");
        let mut context = self.specials.clone();
        context.insert(
            "messages".into(),
            serde_json::to_value(messages).expect("messages serialize"),
        );
        context.insert("add_generation_prompt".into(), true.into());
        template
            .render(minijinja::Value::from_serialize(&context))
            .map_err(|e| anyhow::anyhow!("rendering the chat template: {e:#}"))
    }

    /// The prompt's tokens, as the engine counts them: a chat request's
    /// rendered messages without added special tokens (the template has
    /// them), a completion prompt with them (vLLM's defaults).
    /// Of messages with content parts, their text parts alone are counted
    /// (an image's tokens depend on the model's vision encoder: see
    /// [`Content::other_parts`](dispatcher_core::engine::Content::other_parts)).
    pub fn count(&self, prompt: &EnginePrompt) -> anyhow::Result<usize> {
        let (text, add_special_tokens) = match prompt {
            EnginePrompt::Chat(messages)
                if messages.iter().any(|m| m.content.other_parts() > 0) =>
            {
                let text_only: Vec<Message> = messages
                    .iter()
                    .map(|m| Message {
                        content: m.content.text().into_owned().into(),
                        ..m.clone()
                    })
                    .collect();
                (self.render(&text_only)?, false)
            }
            EnginePrompt::Chat(messages) => (self.render(messages)?, false),
            EnginePrompt::Completion(text) => (text.clone(), true),
        };
        let encoding = self
            .tokenizer
            .encode_fast(text, add_special_tokens)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        Ok(encoding.len())
    }
}

/// The engine's context length, and the tokenizer that counts prompts
/// against it.
#[derive(Debug)]
pub struct LengthLimit {
    /// The model's tokenizer and chat template.
    pub tokenizer: PromptTokenizer,
    /// Tokens of context per request (`--max-model-len`, or the model's).
    pub max_model_len: u32,
}

impl LengthLimit {
    /// Fails a prompt that leaves no room for one generated token: the
    /// engine would answer it with a 400.
    pub fn check(&self, prompt: &EnginePrompt) -> Result<(), TaskError> {
        let tokens = self.tokenizer.count(prompt).map_err(|e| {
            TaskError::failed("prompt_not_tokenized", format!("--skip-over-length: {e:#}"))
        })?;
        if tokens >= self.max_model_len as usize {
            return Err(TaskError::failed(
                "prompt_too_long",
                format!(
                    "the prompt is {tokens} tokens and the model's context is {} (--max-model-len): skipped without a request (--skip-over-length)",
                    self.max_model_len
                ),
            ));
        }
        Ok(())
    }
}

/// The model's own chat template: `chat_template.jinja`, or
/// `tokenizer_config.json`'s `chat_template` (a string, or named templates
/// of which `default` is used).
fn model_template(
    dir: &Path,
    config: &serde_json::Map<String, Value>,
) -> anyhow::Result<Option<String>> {
    let file = dir.join("chat_template.jinja");
    if file.is_file() {
        return std::fs::read_to_string(&file)
            .map(Some)
            .with_context(|| format!("{}: could not read it", file.display()));
    }
    Ok(match config.get("chat_template") {
        Some(Value::String(t)) => Some(t.clone()),
        Some(Value::Array(named)) => named
            .iter()
            .find(|t| t["name"] == "default")
            .or_else(|| named.first())
            .and_then(|t| t["template"].as_str())
            .map(String::from),
        _ => None,
    })
}

/// Now (UTC) in a `strftime` format, as templates stamp today's date into
/// system prompts: `%Y %m %d %B %b %H %M %S %%`; other directives are kept
/// as they are.
fn strftime_now(format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    // 2026-12-04T13:45:00Z
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let month = now[5..7].parse::<usize>().unwrap_or(1).clamp(1, 12) - 1;
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&now[..4]),
            Some('m') => out.push_str(&now[5..7]),
            Some('d') => out.push_str(&now[8..10]),
            Some('H') => out.push_str(&now[11..13]),
            Some('M') => out.push_str(&now[14..16]),
            Some('S') => out.push_str(&now[17..19]),
            Some('B') => out.push_str(MONTHS[month]),
            Some('b') => out.push_str(&MONTHS[month][..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// A JSON file, or `None` when there is none.
fn read_json(path: &Path) -> anyhow::Result<Option<Value>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("{}: not JSON", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("{}: could not read it", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A copy of the word-level test model (tests/data/word-model: nine
    /// words, a chat template in the style of the tiny test model's).
    fn model_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/word-model");
        for file in ["tokenizer.json", "tokenizer_config.json", "config.json"] {
            std::fs::copy(model.join(file), dir.path().join(file)).unwrap();
        }
        dir
    }

    #[test]
    fn chat_prompts_are_rendered_with_the_template_and_counted_without_added_specials() {
        let dir = model_dir();
        let t = PromptTokenizer::load(dir.path(), None).unwrap();
        assert_eq!(t.context_len(), Some(2048));
        let messages = vec![
            Message::new("system", "hello"),
            Message::user(" hello world "),
        ];
        let text = t.render(&messages).unwrap();
        assert_eq!(
            text,
            // trim_blocks drops the newline after a block tag only.
            "<|im_start|>system hello<|im_end|>\n<|im_start|>user hello world<|im_end|>\n<|im_start|>assistant"
        );
        // im_start system hello im_end, im_start user hello world im_end,
        // im_start assistant: 4 + 5 + 2, and no <s> added.
        assert_eq!(t.count(&EnginePrompt::Chat(messages)).unwrap(), 11);
        // A completion prompt gets the post-processor's <s>.
        assert_eq!(
            t.count(&EnginePrompt::Completion("hello world".into()))
                .unwrap(),
            3
        );
    }

    #[test]
    fn a_template_given_replaces_the_models_and_its_absence_is_explained() {
        let dir = model_dir();
        let own = dir.path().join("own.jinja");
        std::fs::write(
            &own,
            "{{ bos_token }}{% for m in messages %}{{ m.content }} {% endfor %}",
        )
        .unwrap();
        let t = PromptTokenizer::load(&dir.path().join("tokenizer.json"), Some(&own)).unwrap();
        assert_eq!(t.render(&[Message::user("hello")]).unwrap(), "<s>hello ");
        std::fs::write(dir.path().join("tokenizer_config.json"), "{}").unwrap();
        let bare = PromptTokenizer::load(dir.path(), None).unwrap();
        let e = bare
            .count(&EnginePrompt::Chat(vec![Message::user("hello")]))
            .unwrap_err();
        assert!(e.to_string().contains("--chat-template"), "{e}");
        let e = PromptTokenizer::load(&dir.path().join("nothing"), None).unwrap_err();
        assert!(e.to_string().contains("no tokenizer.json"), "{e}");
    }

    #[test]
    fn strftime_now_writes_the_date_as_templates_ask() {
        let today = strftime_now("%d %B %Y");
        let parts: Vec<&str> = today.split(' ').collect();
        assert_eq!(parts.len(), 3, "{today}");
        assert_eq!(parts[0].len(), 2);
        assert!(parts[1].chars().all(char::is_alphabetic), "{today}");
        assert_eq!(strftime_now("%Y-%m-%d").len(), 10);
        assert_eq!(strftime_now("100%% %q"), "100% %q");
    }

    #[test]
    fn templates_that_raise_say_why() {
        let dir = model_dir();
        let own = dir.path().join("strict.jinja");
        std::fs::write(
            &own,
            "{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}",
        )
        .unwrap();
        let t = PromptTokenizer::load(dir.path(), Some(&own)).unwrap();
        let e = t.render(&[Message::new("system", "x")]).unwrap_err();
        assert!(format!("{e:#}").contains("user first"), "{e:#}");
    }
}
