//! `dispatcher estimate`: what a job will cost before it runs. Counts every
//! line's prompt tokens with the model's own tokenizer and chat template (as
//! `infer` would send the line, as the engine would count it), and reports
//! the prompt tokens (total, p50, p99, max), the lines over the context
//! length, the worst case of generated tokens and the cost at given prices;
//! with `--engine-url`, it also sends a sample of lines to a running engine
//! and projects the wall time for a number of workers from what it measured.
//!
//! Lines are read once, in chunks counted in parallel on every core.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use dispatcher_core::protocol::TokenCounts;
use rayon::prelude::*;
use serde::Serialize;

use super::infer::{Infer, InferConfig, ModeArg, PromptArgs};
use super::serve::PriceArgs;
use crate::tokenize::{EnginePrompt, PromptTokenizer};

/// Flags of `dispatcher estimate`.
#[derive(Debug, Clone, Args)]
pub struct EstimateArgs {
    /// The job's input: JSONL (also .jsonl.gz/.zst), Parquet, Arrow, a
    /// folder or glob of shards, as `serve --infile` takes it.
    #[arg(long, visible_alias = "infile", value_name = "PATH")]
    pub input: PathBuf,
    /// The split of a dataset input that has several.
    #[arg(long)]
    pub split: Option<String>,
    /// The model's tokenizer: its directory (tokenizer.json,
    /// tokenizer_config.json with the chat template, config.json) or a
    /// tokenizer.json.
    #[arg(long, value_name = "MODEL_DIR_OR_FILE")]
    pub tokenizer: PathBuf,
    /// A chat template file to count with instead of the model's (what the
    /// engine is given with --chat-template).
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
    /// How a line becomes a prompt, as `infer` takes it.
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Tokens per response at most, as `infer --max-tokens`.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens: u32,
    /// Responses per line.
    #[arg(long, default_value_t = 1)]
    pub num_generations: u32,
    /// The engine's context length (default: the model's config.json).
    #[arg(long)]
    pub max_model_len: Option<u32>,
    /// Prices per million tokens.
    #[command(flatten)]
    pub prices: PriceArgs,
    /// A running engine (OpenAI-compatible) to send a sample of lines to,
    /// to measure its speed.
    #[arg(long, value_name = "URL")]
    pub engine_url: Option<String>,
    /// Lines sent to --engine-url, spread over the input.
    #[arg(long, default_value_t = 100, requires = "engine_url")]
    pub sample: usize,
    /// Requests to --engine-url at once (a worker's --max-in-flight).
    #[arg(long, default_value_t = 64, requires = "engine_url")]
    pub concurrency: usize,
    /// Workers (engines) the wall time is projected for.
    #[arg(long, default_value_t = 1)]
    pub workers: u32,
    /// The model name for --engine-url (default: the first it serves).
    #[arg(long, requires = "engine_url")]
    pub model: Option<String>,
    /// Print the figures as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// What `estimate` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Estimate {
    /// Input lines.
    pub lines: u64,
    /// Lines whose prompt was counted.
    pub counted: u64,
    /// Lines `infer` would fail before any request, by kind.
    pub failing: std::collections::BTreeMap<String, u64>,
    /// Prompt tokens of the counted lines.
    pub prompt_tokens: u64,
    /// Per line: median, 99th percentile, largest.
    pub prompt_tokens_p50: u64,
    /// 99th percentile.
    pub prompt_tokens_p99: u64,
    /// Largest.
    pub prompt_tokens_max: u64,
    /// The context length lines were checked against, if known.
    pub max_model_len: Option<u32>,
    /// Lines whose prompt leaves no room for one generated token.
    pub over_length: u64,
    /// Content parts that are not text (images, audio): not counted, their
    /// tokens depend on the model's encoder.
    #[serde(default)]
    pub parts_not_counted: u64,
    /// Generated tokens at worst: every response to `--max-tokens` (or to
    /// the end of the context, when that comes first).
    pub completion_tokens_worst: u64,
    /// The cost of the prompt tokens, with prices.
    pub prompt_cost: Option<f64>,
    /// The cost of the worst-case generated tokens, with prices.
    pub completion_cost_worst: Option<f64>,
    /// The sample sent to `--engine-url`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample: Option<Sample>,
    /// Seconds spent counting.
    pub counting_secs: f64,
}

/// What the sample sent to an engine measured, and what it projects.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    /// Lines sent (and answered).
    pub lines: u64,
    /// Lines whose requests failed.
    pub failed: u64,
    /// Wall time of the sample, in seconds.
    pub secs: f64,
    /// Prompt tokens the engine reported for them.
    pub engine_prompt_tokens: u64,
    /// Prompt tokens the tokenizer counted for the same lines.
    pub counted_prompt_tokens: u64,
    /// Generated tokens the engine reported.
    pub completion_tokens: u64,
    /// Lines per second one engine did at `--concurrency`.
    pub lines_per_sec: f64,
    /// Generated tokens per second one engine did.
    pub completion_tokens_per_sec: f64,
    /// The whole input on `--workers` engines at that speed, in seconds.
    pub projected_secs: f64,
    /// Generated tokens for the whole input at the sample's mean per line.
    pub projected_completion_tokens: u64,
    /// Their cost, with prices.
    pub projected_cost: Option<f64>,
}

/// Lines counted per parallel chunk.
const CHUNK: usize = 16_384;

/// Runs `dispatcher estimate`.
pub async fn run(args: EstimateArgs) -> anyhow::Result<()> {
    let prices = args.prices.prices()?;
    let infer = Infer::new(InferConfig {
        num_generations: args.num_generations,
        max_tokens: args.max_tokens,
        ..args.prompt.config()?
    })
    .map_err(anyhow::Error::msg)?;
    let tokenizer = PromptTokenizer::load(&args.tokenizer, args.chat_template.as_deref())
        .context("--tokenizer")?;
    tokenizer.check_mode(args.prompt.mode == ModeArg::Chat)?;
    let max_model_len = args.max_model_len.or(tokenizer.context_len());

    // A dataset is staged as JSONL in a scratch directory (a JSONL file is
    // read where it is).
    let scratch = tempfile::tempdir().context("a scratch directory for the staged input")?;
    let files = dispatcher_core::job::JobFiles::new(scratch.path().join("estimate.jsonl"), None);
    let prepared = dispatcher_core::dataset::prepare(&args.input, args.split.as_deref(), &files)
        .with_context(|| format!("--input {}", args.input.display()))?;
    let started = Instant::now();
    let counter = Counter {
        infer: &infer,
        tokenizer: &tokenizer,
        max_model_len,
        max_tokens: args.max_tokens,
        num_generations: args.num_generations,
    };
    let sampled_every = args.engine_url.as_ref().map(|_| args.sample.max(1));
    let Counted {
        mut estimate,
        per_line,
        sample: sampled,
    } = counter.count_file(&prepared.path, sampled_every, &args.input)?;
    estimate.counting_secs = started.elapsed().as_secs_f64();
    estimate.max_model_len = max_model_len;
    set_percentiles(&mut estimate, per_line);
    if let Some(p) = prices {
        estimate.prompt_cost = Some(p.of(&tokens(estimate.prompt_tokens, 0)));
        estimate.completion_cost_worst = Some(p.of(&tokens(0, estimate.completion_tokens_worst)));
    }
    if let Some(url) = &args.engine_url {
        let sample = measure(&args, url, &infer, sampled).await?;
        estimate.sample = Some(project(sample, &estimate, &args, prices));
    }
    if args.json {
        println!("{}", serde_json::to_string(&estimate)?);
    } else {
        print!("{}", render(&estimate, &args));
    }
    Ok(())
}

/// Counts lines.
struct Counter<'a> {
    infer: &'a Infer,
    tokenizer: &'a PromptTokenizer,
    max_model_len: Option<u32>,
    max_tokens: u32,
    num_generations: u32,
}

/// One line, counted: its prompt tokens, or the kind it would fail with.
type LineCount = Result<(EnginePrompt, u32), String>;

/// What a pass over the input found.
struct Counted {
    estimate: Estimate,
    /// Each counted line's prompt tokens.
    per_line: Vec<u32>,
    /// The lines drawn for the engine, with their prompt tokens.
    sample: Vec<(EnginePrompt, u32)>,
}

impl Counter<'_> {
    fn count_line(&self, line: &str) -> LineCount {
        let prompt = self
            .infer
            .engine_prompt_of(line)
            .map_err(|e| match e.into_kind() {
                dispatcher_core::task::TaskErrorKind::Failed { error_type, .. } => error_type,
                _ => "prompt_error".to_string(),
            })?;
        let tokens = self
            .tokenizer
            .count(&prompt)
            .map_err(|_| "prompt_not_tokenized".to_string())?;
        Ok((prompt, u32::try_from(tokens).unwrap_or(u32::MAX)))
    }

    /// Every line of the JSONL file at `path` (`shown` in messages): the
    /// figures, each counted line's prompt tokens, and with `sample` a
    /// sample of that many counted lines that fit the context, drawn evenly
    /// from the whole input (reservoir sampling, seeded: the same input
    /// gives the same sample).
    fn count_file(
        &self,
        path: &std::path::Path,
        sample: Option<usize>,
        shown: &std::path::Path,
    ) -> anyhow::Result<Counted> {
        use std::io::BufRead;
        let file = std::fs::File::open(path)
            .with_context(|| format!("{}: could not open it", path.display()))?;
        let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
        let mut estimate = Estimate::default();
        let mut per_line = Vec::new();
        let mut reservoir: Vec<(EnginePrompt, u32)> = Vec::new();
        // Lines that fit the context so far: the ones the sample is drawn from.
        let mut fitting = 0_u64;
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        // `None`: a line that is not UTF-8.
        let mut chunk: Vec<Option<String>> = Vec::with_capacity(CHUNK);
        let mut done = false;
        while !done {
            chunk.clear();
            while chunk.len() < CHUNK {
                let mut bytes = Vec::new();
                let n = reader
                    .read_until(b'\n', &mut bytes)
                    .with_context(|| format!("{}: could not read it", shown.display()))?;
                if n == 0 {
                    done = true;
                    break;
                }
                if bytes.ends_with(b"\n") {
                    bytes.pop();
                }
                chunk.push(String::from_utf8(bytes).ok());
            }
            let counted: Vec<LineCount> = chunk
                .par_iter()
                .map(|line| match line {
                    Some(line) => self.count_line(line),
                    // The server writes its error record, sending it nowhere.
                    None => Err("invalid_utf8".to_string()),
                })
                .collect();
            for result in counted {
                estimate.lines += 1;
                let (prompt, tokens) = match result {
                    Ok(counted) => counted,
                    Err(kind) => {
                        *estimate.failing.entry(kind).or_default() += 1;
                        continue;
                    }
                };
                estimate.counted += 1;
                estimate.prompt_tokens += u64::from(tokens);
                if let EnginePrompt::Chat(messages) = &prompt {
                    estimate.parts_not_counted += messages
                        .iter()
                        .map(|m| m.content.other_parts() as u64)
                        .sum::<u64>();
                }
                per_line.push(tokens);
                let room = match self.max_model_len {
                    Some(len) if tokens >= len => {
                        estimate.over_length += 1;
                        continue;
                    }
                    Some(len) => (len - tokens).min(self.max_tokens),
                    None => self.max_tokens,
                };
                estimate.completion_tokens_worst +=
                    u64::from(room) * u64::from(self.num_generations);
                fitting += 1;
                if let Some(size) = sample {
                    // Algorithm R, with a xorshift generator.
                    if reservoir.len() < size {
                        reservoir.push((prompt, tokens));
                    } else {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let slot = rng % fitting;
                        if let Some(kept) = reservoir.get_mut(slot as usize) {
                            *kept = (prompt, tokens);
                        }
                    }
                }
            }
        }
        Ok(Counted {
            estimate,
            per_line,
            sample: reservoir,
        })
    }
}

/// Prompt and generated tokens, to price.
fn tokens(prompt_tokens: u64, completion_tokens: u64) -> TokenCounts {
    TokenCounts {
        requests: 0,
        prompt_tokens,
        completion_tokens,
    }
}

/// Sets the p50, p99 and max of the prompt tokens per line.
fn set_percentiles(estimate: &mut Estimate, mut per_line: Vec<u32>) {
    if per_line.is_empty() {
        return;
    }
    let at = |v: &mut Vec<u32>, q: f64| -> u64 {
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        u64::from(*v.select_nth_unstable(rank).1)
    };
    estimate.prompt_tokens_p50 = at(&mut per_line, 0.5);
    estimate.prompt_tokens_p99 = at(&mut per_line, 0.99);
    estimate.prompt_tokens_max = u64::from(per_line.iter().copied().max().unwrap_or(0));
}

/// Sends the sampled lines to the engine at `url`, `--concurrency` at a
/// time, as `infer` would send them.
async fn measure(
    args: &EstimateArgs,
    url: &str,
    infer: &Infer,
    sampled: Vec<(EnginePrompt, u32)>,
) -> anyhow::Result<Sample> {
    use dispatcher_core::engine::Engine;
    use futures_util::StreamExt;
    let engine = dispatcher_core::engine::OpenAiEngine::builder(url)
        .model(args.model.clone())
        .discover_model(args.model.is_none())
        .timeout(Duration::from_secs(600))
        .build()
        .with_context(|| format!("--engine-url {url}"))?;
    let started = Instant::now();
    let answers: Vec<_> = futures_util::stream::iter(sampled)
        .map(|(prompt, counted)| {
            let engine = &engine;
            let request = infer.sample_request(&prompt);
            async move { (counted, engine.send(request).await) }
        })
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;
    let mut sample = Sample {
        secs: started.elapsed().as_secs_f64(),
        ..Sample::default()
    };
    let mut first_error = None;
    for (counted, answer) in answers {
        match answer {
            Ok(response) => {
                sample.lines += 1;
                sample.counted_prompt_tokens += u64::from(counted);
                if let Some(u) = response.usage {
                    sample.engine_prompt_tokens += u.prompt_tokens;
                    sample.completion_tokens += u.completion_tokens;
                }
            }
            Err(e) => {
                sample.failed += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    if sample.lines == 0 {
        bail!(
            "--engine-url {url}: none of the {} sampled lines was answered (first error: {})",
            sample.failed,
            first_error.unwrap_or_else(|| "no line was counted".into())
        );
    }
    Ok(sample)
}

/// The whole job at the sample's speed.
fn project(
    mut sample: Sample,
    estimate: &Estimate,
    args: &EstimateArgs,
    prices: Option<dispatcher_core::protocol::Prices>,
) -> Sample {
    let secs = sample.secs.max(1e-9);
    sample.lines_per_sec = sample.lines as f64 / secs;
    sample.completion_tokens_per_sec = sample.completion_tokens as f64 / secs;
    let runnable = estimate.counted.saturating_sub(estimate.over_length);
    sample.projected_secs =
        runnable as f64 / (sample.lines_per_sec * f64::from(args.workers.max(1))).max(1e-9);
    let per_line = sample.completion_tokens as f64 / sample.lines as f64;
    sample.projected_completion_tokens = (per_line * runnable as f64).round() as u64;
    sample.projected_cost = prices.map(|p| {
        p.of(&tokens(
            estimate.prompt_tokens,
            sample.projected_completion_tokens,
        ))
    });
    sample
}

/// The estimate as text.
fn render(e: &Estimate, args: &EstimateArgs) -> String {
    let n = |v: u64| group_digits(v);
    let mut out = format!(
        "input            {}: {} lines\n",
        args.input.display(),
        n(e.lines)
    );
    let how = match args.prompt.mode {
        ModeArg::Chat => "the chat template applied",
        ModeArg::Completion => "as completion prompts",
    };
    out.push_str(&format!(
        "prompts          {} counted with {} ({how})",
        n(e.counted),
        args.tokenizer.display()
    ));
    if !e.failing.is_empty() {
        let kinds: Vec<String> = e
            .failing
            .iter()
            .map(|(k, v)| format!("{k} {}", n(*v)))
            .collect();
        out.push_str(&format!(
            "; {} would fail without a request: {}",
            n(e.failing.values().sum()),
            kinds.join(", ")
        ));
    }
    out.push('\n');
    out.push_str(&format!(
        "prompt tokens    {} in all; per line p50 {}, p99 {}, max {}\n",
        n(e.prompt_tokens),
        n(e.prompt_tokens_p50),
        n(e.prompt_tokens_p99),
        n(e.prompt_tokens_max)
    ));
    if e.parts_not_counted > 0 {
        out.push_str(&format!(
            "not counted      {} content parts that are not text (images, audio): their tokens depend on the model's encoder, so the figures above are short of them\n",
            n(e.parts_not_counted)
        ));
    }
    match e.max_model_len {
        Some(len) => out.push_str(&format!(
            "context          {} lines leave no room in {} tokens (the engine refuses them; `infer --skip-over-length` fails them without a request)\n",
            n(e.over_length),
            n(u64::from(len))
        )),
        None => out.push_str(
            "context          unknown (no --max-model-len, no max_position_embeddings in the model's config.json)\n",
        ),
    }
    out.push_str(&format!(
        "completion       at most {} tokens x {} per line: {} tokens at worst\n",
        n(u64::from(args.max_tokens)),
        args.num_generations,
        n(e.completion_tokens_worst)
    ));
    if let (Some(p), Some(c)) = (e.prompt_cost, e.completion_cost_worst) {
        out.push_str(&format!(
            "cost             prompt {p:.2} + completion at most {c:.2} = at most {:.2}\n",
            p + c
        ));
    }
    if let Some(s) = &e.sample {
        out.push_str(&format!(
            "sample           {} lines sent to {} ({} at a time){}: {:.1} s, {:.2} lines/s, {:.0} generated tokens/s, {:.0} generated tokens per line\n",
            s.lines,
            args.engine_url.as_deref().unwrap_or("?"),
            args.concurrency,
            if s.failed > 0 { format!(", {} failed", s.failed) } else { String::new() },
            s.secs,
            s.lines_per_sec,
            s.completion_tokens_per_sec,
            s.completion_tokens as f64 / s.lines.max(1) as f64,
        ));
        out.push_str(&format!(
            "                 prompt tokens of the sample: the engine counted {}, the tokenizer {}\n",
            n(s.engine_prompt_tokens),
            n(s.counted_prompt_tokens)
        ));
        let cost = s
            .projected_cost
            .map_or_else(String::new, |c| format!(", cost ~{c:.2}"));
        out.push_str(&format!(
            "projection       {} on {} worker(s); ~{} generated tokens{cost}\n",
            super::status::human_secs(s.projected_secs),
            args.workers,
            n(s.projected_completion_tokens)
        ));
    }
    out.push_str(&format!(
        "                 counted in {:.1} s ({:.0} lines/s)\n",
        e.counting_secs,
        e.lines as f64 / e.counting_secs.max(1e-9)
    ));
    out
}

/// `1234567` as `1,234,567`.
fn group_digits(v: u64) -> String {
    let digits = v.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_are_grouped_in_thousands() {
        assert_eq!(group_digits(0), "0");
        assert_eq!(group_digits(999), "999");
        assert_eq!(group_digits(1000), "1,000");
        assert_eq!(group_digits(1_234_567), "1,234,567");
    }

    #[test]
    fn percentiles_are_of_the_lines_counted() {
        let mut e = Estimate::default();
        set_percentiles(&mut e, (1..=100).rev().collect());
        assert_eq!(
            (
                e.prompt_tokens_p50,
                e.prompt_tokens_p99,
                e.prompt_tokens_max
            ),
            (50, 99, 100)
        );
        let mut empty = Estimate::default();
        set_percentiles(&mut empty, Vec::new());
        assert_eq!(empty.prompt_tokens_max, 0);
    }
}
