//! `dispatcher report OUTPUT`: what a job produced. Lines, lines without an
//! error, error records by type (tombstones also by what reissued them), and
//! for `infer` (`--include-usage`) and `run-batch` outputs the token totals and
//! how many responses stopped at the length limit (`finish_reason: "length"`,
//! the cut-off answers users miss most often).
//!
//! One streaming pass; each line is read into the classifier's small struct
//! ([`dispatcher_core::record::OutputLine`]), and serde skips the fields it
//! does not name (prompts, responses) without allocating them.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use dispatcher_core::dataset::Format;
use dispatcher_core::record::{LineKind, OutputLine};
use serde::{Deserialize, Serialize};

/// Flags of `dispatcher report`.
#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    /// The output JSONL of a job (finished or not).
    pub output: PathBuf,
    /// The job's input: also say how many of its lines have no output line
    /// yet. A dataset's lines are those its staged copy was made with.
    #[arg(long, value_name = "PATH")]
    pub input: Option<PathBuf>,
    /// The split of a dataset --input that has several.
    #[arg(long, value_name = "NAME", requires = "input")]
    pub split: Option<String>,
    /// Print the figures as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// The figures of one output.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Output lines.
    pub lines: u64,
    /// Lines that are not error records (nor failed batch lines).
    pub ok: u64,
    /// Failed lines by type: `__ERROR__.error`; for batch lines the `error.code`,
    /// or `http_<status>` for an engine's error answer.
    pub errors: BTreeMap<String, u64>,
    /// Reissues of the tombstoned lines (`max_retries_exceeded`, ...), by cause.
    pub tombstone_reissues: BTreeMap<String, u64>,
    /// Lines that are not JSON (a damaged output).
    pub not_json: u64,
    /// Prompt tokens, where lines say (`usage`).
    pub prompt_tokens: u64,
    /// Generated tokens, where lines say.
    pub completion_tokens: u64,
    /// Responses whose finish reason is known.
    pub responses: u64,
    /// Of those, responses that stopped at the length limit.
    pub finished_at_length: u64,
    /// Input lines, with `--input`.
    pub input_lines: Option<u64>,
    /// The first line of each failure kind: its line number (from 1) and
    /// first bytes.
    #[serde(default)]
    pub examples: BTreeMap<String, Example>,
    /// Seconds lines' engine requests took, where lines say
    /// (`infer --include-usage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<Latency>,
    /// Engine tokens the job's workers reported to its server, and the
    /// seconds its runs took, from the manifest beside the output (absent
    /// without one, or when no worker reported tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<Reported>,
    /// The latencies read, kept as a histogram (fixed memory however many
    /// lines).
    #[serde(skip)]
    latencies: LatencyHistogram,
}

/// What the job's workers reported to its server (the manifest's runs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Reported {
    /// Engine requests and tokens, over every run.
    pub tokens: dispatcher_core::protocol::TokenCounts,
    /// Seconds of the runs that recorded their stop.
    pub run_secs: f64,
}

impl Reported {
    /// From the manifest of the job whose output is `output`, if any.
    fn of_job(output: &Path) -> Option<Reported> {
        let path = dispatcher_core::job::manifest::manifest_path(output);
        let doc: dispatcher_core::job::manifest::ManifestDoc =
            serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        let mut reported = Reported::default();
        for run in &doc.runs {
            reported.tokens += run.tokens;
            let time = |t: &str| humantime::parse_rfc3339(t).ok();
            if let (Some(start), Some(stop)) = (
                time(&run.started_at),
                run.stopped_at.as_deref().and_then(time),
            ) {
                reported.run_secs += stop.duration_since(start).map_or(0.0, |d| d.as_secs_f64());
            }
        }
        (!reported.tokens.is_empty()).then_some(reported)
    }
}

/// A line of a failure kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// Its line number in the output, from 1.
    pub line: u64,
    /// Its first bytes.
    pub head: String,
}

/// Latency figures, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Lines that said theirs.
    pub lines: u64,
    /// Their mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// The longest.
    pub max: f64,
}

/// Latencies in buckets 2% wide (log scale) from a millisecond up: a
/// percentile read from it is within 2% of the exact one.
#[derive(Debug, Clone, Default, PartialEq)]
struct LatencyHistogram {
    counts: Vec<u64>,
    n: u64,
    sum: f64,
    max: f64,
}

impl LatencyHistogram {
    const BASE: f64 = 1.02;
    const FLOOR_SECS: f64 = 0.001;

    fn add(&mut self, secs: f64) {
        let bucket = if secs <= Self::FLOOR_SECS {
            0
        } else {
            ((secs / Self::FLOOR_SECS).ln() / Self::BASE.ln()).ceil() as usize
        };
        if self.counts.len() <= bucket {
            self.counts.resize(bucket + 1, 0);
        }
        self.counts[bucket] += 1;
        self.n += 1;
        self.sum += secs;
        self.max = self.max.max(secs);
    }

    /// The upper edge of the bucket holding quantile `q`, at most the max.
    fn quantile(&self, q: f64) -> f64 {
        let rank = ((q * self.n as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (bucket, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return (Self::FLOOR_SECS * Self::BASE.powi(bucket as i32)).min(self.max);
            }
        }
        self.max
    }

    fn summary(&self) -> Option<Latency> {
        (self.n > 0).then(|| Latency {
            lines: self.n,
            mean: self.sum / self.n as f64,
            p50: self.quantile(0.5),
            p90: self.quantile(0.9),
            p99: self.quantile(0.99),
            max: self.max,
        })
    }
}

/// Bytes of a failed line an example keeps.
const EXAMPLE_BYTES: usize = 300;

impl Report {
    /// Adds one output line: what it is comes from the one classifier
    /// ([`dispatcher_core::record`]), shared with `--redo-errors` and
    /// `run-batch --error-file`.
    pub fn add(&mut self, line: &[u8]) {
        self.lines += 1;
        let Some(parsed) = OutputLine::parse(line) else {
            self.not_json += 1;
            self.failed(LineKind::NotJson.name(), line);
            return;
        };
        match parsed.kind() {
            LineKind::Ok => self.ok += 1,
            kind => self.failed(kind.name(), line),
        }
        if let Some(secs) = parsed.latency_secs() {
            self.latencies.add(secs);
        }
        for (cause, n) in parsed.reissues() {
            *self.tombstone_reissues.entry(cause.into()).or_default() += n;
        }
        if let Some((prompt, completion)) = parsed.usage() {
            self.prompt_tokens += prompt;
            self.completion_tokens += completion;
        }
        for reason in parsed.finish_reasons() {
            self.responses += 1;
            if reason == "length" {
                self.finished_at_length += 1;
            }
        }
    }

    /// Counts the current line, `line`, as failed with `kind`; the first
    /// of its kind is its example.
    fn failed(&mut self, kind: &str, line: &[u8]) {
        if !self.examples.contains_key(kind) {
            let head = String::from_utf8_lossy(&line[..line.len().min(EXAMPLE_BYTES)]);
            self.examples.insert(
                kind.to_string(),
                Example {
                    line: self.lines,
                    // A character cut in two at the end is dropped.
                    head: head.trim_end_matches('\u{fffd}').to_string(),
                },
            );
        }
        *self.errors.entry(kind.to_string()).or_default() += 1;
    }

    /// Reads the output at `path`, calling `progress` with the bytes read so far.
    /// `path` is an output as jobs write it: a JSONL file, plain or `.gz`/
    /// `.zst` (by its first bytes), or an `--outdir` folder (see
    /// [`output_files`]).
    pub fn of_file(path: &Path, mut progress: impl FnMut(u64)) -> anyhow::Result<Report> {
        let mut report = Report::default();
        let mut line = Vec::new();
        let mut read = 0u64;
        for (file, format) in output_files(path)? {
            let mut reader = dispatcher_core::dataset::open_jsonl(&file, format)
                .with_context(|| format!("{}: could not open it", file.display()))?;
            loop {
                line.clear();
                let n = reader
                    .read_until(b'\n', &mut line)
                    .with_context(|| format!("{}: could not read it", file.display()))?;
                if n == 0 {
                    break;
                }
                read += n as u64;
                report.add(line.strip_suffix(b"\n").unwrap_or(&line));
                if report.lines % 65_536 == 0 {
                    progress(read);
                }
            }
        }
        progress(read);
        report.latency = report.latencies.summary();
        Ok(report)
    }

    /// The report as text.
    pub fn render(&self) -> String {
        let pct = |n: u64, of: u64| {
            if of == 0 {
                String::new()
            } else {
                format!(" ({:.2}%)", 100.0 * n as f64 / of as f64)
            }
        };
        let failed: u64 = self.errors.values().sum();
        let mut out = format!(
            "lines            {}\nok               {}{}\nfailed           {}{}\n",
            self.lines,
            self.ok,
            pct(self.ok, self.lines),
            failed,
            pct(failed, self.lines)
        );
        let mut by_count: Vec<(&String, &u64)> = self.errors.iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (kind, n) in by_count {
            out.push_str(&format!("  {kind:<30} {n}\n"));
            if let Some(e) = self.examples.get(kind) {
                out.push_str(&format!(
                    "    e.g. line {}: {}\n",
                    e.line,
                    super::status::one_line(&e.head, 110)
                ));
            }
        }
        if !self.tombstone_reissues.is_empty() {
            let causes: Vec<String> = self
                .tombstone_reissues
                .iter()
                .map(|(c, n)| format!("{c} {n}"))
                .collect();
            out.push_str(&format!(
                "  (reissues of the tombstoned lines: {})\n",
                causes.join(", ")
            ));
        }
        if self.prompt_tokens + self.completion_tokens > 0 {
            out.push_str(&format!(
                "tokens           prompt {}, completion {}\n",
                self.prompt_tokens, self.completion_tokens
            ));
        }
        if let Some(r) = &self.reported {
            let t = &r.tokens;
            let rate = if r.run_secs > 0.0 {
                format!(
                    " over {} of runs: {:.0} tokens/s",
                    super::status::human_secs(r.run_secs),
                    (t.prompt_tokens + t.completion_tokens) as f64 / r.run_secs
                )
            } else {
                String::new()
            };
            out.push_str(&format!(
                "engine           prompt {}, completion {} in {} requests, as the workers reported them{rate}\n",
                t.prompt_tokens, t.completion_tokens, t.requests
            ));
        }
        if let Some(l) = &self.latency {
            out.push_str(&format!(
                "latency          {} lines: mean {:.2}s, p50 {:.2}s, p90 {:.2}s, p99 {:.2}s, max {:.2}s\n",
                l.lines, l.mean, l.p50, l.p90, l.p99, l.max
            ));
        }
        if self.responses > 0 {
            out.push_str(&format!(
                "responses        {}; stopped at the length limit: {}{}\n",
                self.responses,
                self.finished_at_length,
                pct(self.finished_at_length, self.responses)
            ));
        }
        if let Some(input) = self.input_lines {
            let missing = input.saturating_sub(self.lines);
            out.push_str(&if missing == 0 && input == self.lines {
                format!("input            {input} lines: every one has its output line\n")
            } else if self.lines > input {
                format!(
                    "input            {input} lines, but the output has {}: is it this job's output?\n",
                    self.lines
                )
            } else {
                format!("input            {input} lines: {missing} have no output line yet\n")
            });
        }
        out
    }
}

/// The files of the output at `path`, in order, with their format: the
/// file itself (JSONL, `.gz` or `.zst`, told by its first bytes), or for an
/// `--outdir` folder the job's whole output (`.job/output.jsonl`), else its
/// JSONL shards in name order.
pub fn output_files(path: &Path) -> anyhow::Result<Vec<(PathBuf, Format)>> {
    let format_of = |p: &Path| -> anyhow::Result<Format> {
        Ok(match Format::of(p, true)
            .with_context(|| format!("{}: could not open it", p.display()))?
        {
            Some(f @ (Format::Jsonl | Format::JsonlGz | Format::JsonlZst)) => f,
            Some(other) => anyhow::bail!(
                "{}: this is {other:?}, not JSON lines; `dispatcher report` reads a job's output (JSONL, .gz, .zst, or an --outdir folder)",
                p.display()
            ),
            None => Format::Jsonl,
        })
    };
    if !path.is_dir() {
        return Ok(vec![(path.to_owned(), format_of(path)?)]);
    }
    let whole = path.join(".job").join("output.jsonl");
    if whole.is_file() {
        return Ok(vec![(whole.clone(), format_of(&whole)?)]);
    }
    let mut shards: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("{}: could not list it", path.display()))?
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| {
            let name = p
                .file_name()
                .map_or(String::new(), |n| n.to_string_lossy().into_owned());
            p.is_file()
                && [".jsonl", ".jsonl.gz", ".jsonl.zst"]
                    .iter()
                    .any(|e| name.ends_with(e))
        })
        .collect();
    if shards.is_empty() {
        anyhow::bail!(
            "{}: a folder without .job/output.jsonl or .jsonl shards; give a job's output file or its --outdir folder",
            path.display()
        );
    }
    shards.sort();
    shards
        .into_iter()
        .map(|p| format_of(&p).map(|f| (p, f)))
        .collect()
}

/// Runs `dispatcher report`.
pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    if !args.output.exists() {
        anyhow::bail!("{}: no such output file or folder", args.output.display());
    }
    let files = output_files(&args.output)?;
    let size = files
        .iter()
        .map(|(f, _)| std::fs::metadata(f).map_or(0, |m| m.len()))
        .sum();
    // The job's own output file, beside which its manifest and staging
    // record are (an --outdir folder's is in its `.job`).
    let job_output = match files.as_slice() {
        [(whole, _)] => whole.clone(),
        _ => args.output.clone(),
    };
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(size),
            indicatif::ProgressDrawTarget::stderr(),
        );
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let mut report = Report::of_file(&args.output, |read| {
        if let Some(bar) = &bar {
            bar.set_position(read);
        }
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    report.reported = Reported::of_job(&job_output);
    if let Some(input) = &args.input {
        let files = dispatcher_core::job::JobFiles::new(&job_output, None);
        let lines = dispatcher_core::dataset::input_lines(input, args.split.as_deref(), &files)
            .context("--input")?;
        report.input_lines = Some(lines);
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.render());
    }
    // One rule with the commands that run a job (`crate::exit`): error
    // records in the output are exit status 3.
    if report.errors.values().any(|n| *n > 0) {
        return Err(crate::exit::Exit(crate::exit::EXIT_ERRORS).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_kind_of_line_is_counted_where_it_belongs() {
        let lines = [
            json!({"id": 1, "responses": ["a", "b"], "usage": {"prompt_tokens": 5, "completion_tokens": 7}, "finish_reasons": ["stop", "length"]}),
            json!({"__ERROR__": {"error": "request_rejected", "message": "too long", "task_data": {}}}),
            json!({"__ERROR__": {"error": "max_retries_exceeded", "work_id": 3, "original_content": "x", "reissues": {"timeout": 2, "release": 1, "retry": 1}}}),
            json!({"__ERROR__": {"error": "max_retries_exceeded", "work_id": 4, "original_content": "y", "reissues": {"timeout": 4, "release": 0, "retry": 0}}}),
            json!({"id": "batch_req_4", "custom_id": "a", "response": {"status_code": 200, "request_id": "r", "body": {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "length"}], "usage": {"prompt_tokens": 3, "completion_tokens": 16}}}, "error": null}),
            json!({"id": "batch_req_5", "custom_id": "b", "response": {"status_code": 400, "request_id": "r", "body": {"error": "too long"}}, "error": null}),
            json!({"id": "batch_req_6", "custom_id": null, "response": null, "error": {"code": "invalid_json", "message": "..."}}),
        ];
        let mut r = Report::default();
        for l in &lines {
            r.add(l.to_string().as_bytes());
        }
        r.add(b"{cut off");
        assert_eq!((r.lines, r.ok, r.not_json), (8, 2, 1));
        let errors: Vec<(&str, u64)> = r.errors.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(
            errors,
            [
                ("http_400", 1),
                ("invalid_json", 1),
                ("max_retries_exceeded", 2),
                ("not_json", 1),
                ("request_rejected", 1)
            ]
        );
        assert_eq!(r.tombstone_reissues["timeout"], 6);
        assert_eq!(r.tombstone_reissues["release"], 1);
        assert_eq!((r.prompt_tokens, r.completion_tokens), (8, 23));
        assert_eq!((r.responses, r.finished_at_length), (3, 2));
        let text = r.render();
        assert!(
            text.contains("stopped at the length limit: 2 (66.67%)"),
            "{text}"
        );
        assert!(text.contains("max_retries_exceeded           2"), "{text}");
        // The first line of each kind is its example.
        assert_eq!(r.examples["max_retries_exceeded"].line, 3);
        assert_eq!(r.examples["not_json"].head, "{cut off");
        assert!(text.contains("    e.g. line 3: {\"__ERROR__\""), "{text}");
    }

    #[test]
    fn latency_percentiles_are_within_two_percent() {
        let mut r = Report::default();
        // 1..=1000 ms, in a shuffled order, and a line without a latency.
        for i in 0..1000u64 {
            let ms = (i * 7919) % 1000 + 1;
            r.add(
                json!({"responses": ["a"], "latency_secs": ms as f64 / 1000.0})
                    .to_string()
                    .as_bytes(),
            );
        }
        r.add(br#"{"responses": ["a"]}"#);
        let l = r.latencies.summary().unwrap();
        assert_eq!(l.lines, 1000);
        assert!((l.mean - 0.5005).abs() < 1e-9, "{l:?}");
        for (got, exact) in [(l.p50, 0.5), (l.p90, 0.9), (l.p99, 0.99)] {
            assert!((got - exact).abs() <= 0.02 * exact, "{got} vs {exact}");
        }
        assert_eq!(l.max, 1.0);
    }
}
