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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
}

impl Report {
    /// Adds one output line: what it is comes from the one classifier
    /// ([`dispatcher_core::record`]), shared with `--redo-errors` and
    /// `run-batch --error-file`.
    pub fn add(&mut self, line: &[u8]) {
        self.lines += 1;
        let Some(parsed) = OutputLine::parse(line) else {
            self.not_json += 1;
            *self
                .errors
                .entry(LineKind::NotJson.name().into())
                .or_default() += 1;
            return;
        };
        match parsed.kind() {
            LineKind::Ok => self.ok += 1,
            kind => *self.errors.entry(kind.name().into()).or_default() += 1,
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

    /// Reads the output at `path`, calling `progress` with the bytes read so far.
    pub fn of_file(path: &Path, mut progress: impl FnMut(u64)) -> anyhow::Result<Report> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("{}: could not open it", path.display()))?;
        let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
        let mut report = Report::default();
        let mut line = Vec::new();
        let mut read = 0u64;
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .with_context(|| format!("{}: could not read it", path.display()))?;
            if n == 0 {
                break;
            }
            read += n as u64;
            report.add(line.strip_suffix(b"\n").unwrap_or(&line));
            if report.lines % 65_536 == 0 {
                progress(read);
            }
        }
        progress(read);
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

/// Runs `dispatcher report`.
pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    let size = std::fs::metadata(&args.output)
        .with_context(|| format!("{}: no such output file", args.output.display()))?
        .len();
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
    if let Some(input) = &args.input {
        let files = dispatcher_core::job::JobFiles::new(&args.output, None);
        let lines = dispatcher_core::dataset::input_lines(input, args.split.as_deref(), &files)
            .context("--input")?;
        report.input_lines = Some(lines);
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.render());
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
    }
}
