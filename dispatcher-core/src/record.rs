//! What an output line is: the one place that writes failure records and the
//! one place that reads them.
//!
//! A job's output line is one of three things ([`LineKind`]):
//! - **failed**, with a kind: an error record `{"__ERROR__": {"error": KIND,
//!   ...}}` (written by the server, the task runtime or a task), or a line of
//!   an OpenAI batch output (`{"id", "custom_id", "response", "error"}`, all
//!   four keys) whose `error` is an object (its `code` is the kind) or whose
//!   `response.status_code` is 400 or more (kind `http_<status>`);
//! - **not JSON** (a damaged output);
//! - **ok**: anything else, whatever fields a task's own output has: a task
//!   may well write `"error": "..."` or `"response": "..."` of its own.
//!
//! `dispatcher report`, `serve --redo-errors`, `run-batch --error-file` and
//! the server's counts all ask [`classify`] (or [`OutputLine::kind`]), so
//! they agree line by line. [`KINDS`] lists the kinds dispatcher itself
//! writes; the book's table (`docs/src/reference/records.md`) is checked against it.

use std::borrow::Cow;

use serde::de::IgnoredAny;
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use crate::protocol::ReissueCounts;

/// The key of a failure record.
pub const ERROR_KEY: &str = "__ERROR__";

/// Kind of a line that is not JSON.
pub const NOT_JSON: &str = "not_json";

/// The kinds of failure dispatcher itself writes, with what each means.
/// Tasks add their own (`TaskError::failed(kind, ..)`, `.or_fail(kind)`), and
/// a batch line whose engine answered with an error status is `http_<status>`.
pub const KINDS: &[(&str, &str)] = &[
    (
        "max_retries_exceeded",
        "the server gave the line up: it failed (lease expiries, task retries) more than `--max-retries` times",
    ),
    (
        "max_releases_exceeded",
        "the server gave the line up: preempted workers released it more than `--max-releases` times",
    ),
    (
        "invalid_utf8",
        "the input line is not UTF-8; it was sent to no worker",
    ),
    (
        "invalid_result",
        "the worker's result was not one JSON value; retrying cannot fix that",
    ),
    (
        "invalid_input",
        "the input line does not deserialize into the task's input type",
    ),
    ("task_panicked", "the task panicked on this line"),
    (
        "retries_exhausted",
        "the task asked for another attempt on its last one",
    ),
    (
        "request_rejected",
        "the engine refused a request with a 4xx (a prompt over the context length, ...)",
    ),
    (
        "engine_response_invalid",
        "the engine's answer was not the OpenAI shape",
    ),
    (
        "response_not_json",
        "the task read an answer as JSON (`r.json()?`) and it was not",
    ),
    (
        "json_error",
        "the task's own JSON failed (`?` on a `serde_json::Error`)",
    ),
    (
        "prompt_missing",
        "`infer`: `--prompt-path` selects nothing, or null, in the line",
    ),
    (
        "prompt_not_string",
        "`infer`: `--prompt-path` selects something that is not a prompt (a number, an object, ...)",
    ),
    (
        "prompt_path_error",
        "`infer`: `--prompt-path` fails on the line (a jq error)",
    ),
    (
        "prompt_too_long",
        "`infer --skip-over-length`: the prompt leaves no room in the model's context; it was sent to no engine",
    ),
    (
        "prompt_not_tokenized",
        "`infer --skip-over-length`: the prompt could not be counted (the chat template refused its messages)",
    ),
    ("invalid_json", "`run-batch`, `infer`: the input line is not JSON"),
    (
        "invalid_request",
        "`run-batch`: the input line is not a JSON object",
    ),
    (
        "missing_custom_id",
        "`run-batch`: the input line has no `custom_id` string",
    ),
    (
        "unsupported_method",
        "`run-batch`: the line's `method` is not POST",
    ),
    (
        "unsupported_url",
        "`run-batch`: the line's `url` is not an endpoint dispatcher serves",
    ),
    (
        "invalid_body",
        "`run-batch`: the line's `body` is not a JSON object",
    ),
    (
        "engine_error",
        "`run-batch`: the request failed without an answer from the engine",
    ),
    (
        "http_<status>",
        "`run-batch`: the engine answered with this error status (400 or more)",
    ),
    (
        NOT_JSON,
        "the output line is not JSON (a damaged output); always redone",
    ),
];

/// Whether `kind` is one dispatcher writes (any `http_<3 digits>` included).
pub fn is_builtin_kind(kind: &str) -> bool {
    KINDS.iter().any(|(k, _)| *k == kind)
        || kind
            .strip_prefix("http_")
            .is_some_and(|s| s.len() == 3 && s.bytes().all(|b| b.is_ascii_digit()))
}

/// What an output line is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineKind<'a> {
    /// A result.
    Ok,
    /// A failure of this kind.
    Failed(Cow<'a, str>),
    /// Not JSON.
    NotJson,
}

impl LineKind<'_> {
    /// The kind as `report` prints it: `ok`, the failure's kind, or `not_json`.
    pub fn name(&self) -> &str {
        match self {
            LineKind::Ok => "ok",
            LineKind::Failed(kind) => kind,
            LineKind::NotJson => NOT_JSON,
        }
    }

    /// Whether the line is a failure or not JSON.
    pub fn is_failure(&self) -> bool {
        !matches!(self, LineKind::Ok)
    }

    /// The same kind, owning its name.
    pub fn into_owned(self) -> LineKind<'static> {
        match self {
            LineKind::Ok => LineKind::Ok,
            LineKind::Failed(kind) => LineKind::Failed(Cow::Owned(kind.into_owned())),
            LineKind::NotJson => LineKind::NotJson,
        }
    }
}

/// What `line` (without its newline) is. Most lines name neither a record
/// nor a batch line's keys, and are only checked to be JSON.
pub fn classify(line: &[u8]) -> LineKind<'static> {
    if !may_fail(line) {
        let python_json = || {
            std::str::from_utf8(line).is_ok_and(|t| crate::protocol::check_json_value(t).is_ok())
        };
        return match serde_json::from_slice::<IgnoredAny>(line) {
            Ok(_) => LineKind::Ok,
            Err(_) if python_json() => LineKind::Ok,
            Err(_) => LineKind::NotJson,
        };
    }
    match OutputLine::parse(line) {
        Some(parsed) => parsed.kind().into_owned(),
        None => LineKind::NotJson,
    }
}

/// The kind of failure of `line`, known to be one JSON value (a result the
/// server checked): [`classify`] without checking the JSON again, for the
/// server's counts. `None` for a line that did not fail.
pub fn failure_of_json(line: &str) -> Option<String> {
    if !may_fail(line.as_bytes()) {
        return None;
    }
    match OutputLine::parse(line.as_bytes())?.kind() {
        LineKind::Failed(kind) => Some(kind.into_owned()),
        LineKind::Ok | LineKind::NotJson => None,
    }
}

/// Whether `line` names a failure record's or a batch line's key: only such
/// lines can be failures (most lines are not, and are not parsed further).
/// The searchers are built once: building one per call was most of the
/// search's cost on the server's results path (#42's profile).
fn may_fail(line: &[u8]) -> bool {
    use memchr::memmem::Finder;
    use std::sync::LazyLock;
    static ERROR: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(ERROR_KEY));
    static CUSTOM_ID: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"custom_id\""));
    ERROR.find(line).is_some() || CUSTOM_ID.find(line).is_some()
}

/// A key that may be absent, `null`, or hold a value.
#[derive(Debug, Default)]
enum Field<T> {
    #[default]
    Absent,
    Present(Option<T>),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Field<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Option::<T>::deserialize(d).map(Field::Present)
    }
}

impl<T> Field<T> {
    fn present(&self) -> bool {
        matches!(self, Field::Present(_))
    }

    fn value(&self) -> Option<&T> {
        match self {
            Field::Present(Some(v)) => Some(v),
            _ => None,
        }
    }
}

/// The fields of an output line that say what it is and what it cost, read
/// leniently: a field of an unexpected type never makes a line "not JSON",
/// and the fields it does not name (prompts, answers) are skipped without
/// being allocated.
#[derive(Debug, Default, Deserialize)]
pub struct OutputLine {
    #[serde(rename = "__ERROR__", default)]
    record: Field<Value>,
    #[serde(default)]
    id: Field<IgnoredAny>,
    #[serde(default)]
    custom_id: Field<IgnoredAny>,
    #[serde(default)]
    response: Field<Value>,
    #[serde(default)]
    error: Field<Value>,
    /// `infer --include-usage`.
    #[serde(default)]
    usage: Field<Value>,
    /// `infer --include-usage`.
    #[serde(default)]
    finish_reasons: Field<Value>,
    /// `infer --include-usage`: seconds the line's engine requests took.
    #[serde(default)]
    latency_secs: Field<Value>,
}

impl OutputLine {
    /// Reads `line`; `None` when it is not JSON. A JSON value that is not an
    /// object (a string, an array) is a line like any other, of kind ok.
    pub fn parse(line: &[u8]) -> Option<OutputLine> {
        match serde_json::from_slice::<OutputLine>(line) {
            Ok(parsed) => Some(parsed),
            Err(_) => serde_json::from_slice::<IgnoredAny>(line)
                .ok()
                .map(|_| OutputLine::default())
                // JSON as Python writes it (`NaN`, `Infinity`), which the
                // server takes as a result: the line it is, not "not JSON".
                .or_else(|| {
                    let text = std::str::from_utf8(line).ok()?;
                    let t = crate::protocol::without_python_constants(text)?;
                    serde_json::from_str::<OutputLine>(&t).ok()
                }),
        }
    }

    /// The failure record's fields, when the line is one.
    fn record(&self) -> Option<&Map<String, Value>> {
        self.record.value()?.as_object()
    }

    /// Whether the line has the shape of an OpenAI batch output line: all of
    /// `id`, `custom_id`, `response` (null or an object) and `error` (null or
    /// an object).
    fn is_batch_line(&self) -> bool {
        let null_or_object = |f: &Field<Value>| match f {
            Field::Absent => false,
            Field::Present(None) => true,
            Field::Present(Some(v)) => v.is_object(),
        };
        self.id.present()
            && self.custom_id.present()
            && null_or_object(&self.response)
            && null_or_object(&self.error)
    }

    /// What the line is.
    pub fn kind(&self) -> LineKind<'_> {
        if let Some(record) = self.record() {
            return LineKind::Failed(Cow::Borrowed(
                record
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown"),
            ));
        }
        if !self.is_batch_line() {
            return LineKind::Ok;
        }
        if let Some(error) = self.error.value() {
            return LineKind::Failed(match &error["code"] {
                Value::String(code) => Cow::Borrowed(code.as_str()),
                Value::Number(n) => Cow::Owned(n.to_string()),
                _ => Cow::Borrowed("unknown"),
            });
        }
        match self.batch_status() {
            Some(status) if status >= 400 => LineKind::Failed(Cow::Owned(format!("http_{status}"))),
            _ => LineKind::Ok,
        }
    }

    fn batch_status(&self) -> Option<u64> {
        self.response.value()?.get("status_code")?.as_u64()
    }

    /// The batch response's body, on a batch line.
    fn batch_body(&self) -> Option<&Value> {
        if !self.is_batch_line() {
            return None;
        }
        self.response.value()?.get("body")
    }

    /// A tombstone's reissues by cause (`"reissues"` of the record).
    pub fn reissues(&self) -> impl Iterator<Item = (&str, u64)> {
        self.record()
            .and_then(|r| r.get("reissues"))
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .filter_map(|(cause, n)| Some((cause.as_str(), n.as_u64()?)))
    }

    /// Prompt and completion tokens the line says it used: `usage` of an
    /// `infer --include-usage` line, or of a batch response's body.
    pub fn usage(&self) -> Option<(u64, u64)> {
        let usage = self
            .usage
            .value()
            .or_else(|| self.batch_body()?.get("usage"))?;
        let count = |key: &str| usage.get(key).and_then(Value::as_u64).unwrap_or(0);
        usage
            .is_object()
            .then(|| (count("prompt_tokens"), count("completion_tokens")))
    }

    /// Seconds the line's engine requests took, where it says
    /// (`latency_secs` of an `infer --include-usage` line).
    pub fn latency_secs(&self) -> Option<f64> {
        self.latency_secs
            .value()?
            .as_f64()
            .filter(|s| s.is_finite() && *s >= 0.0)
    }

    /// The finish reasons of the line's responses, where it says them.
    pub fn finish_reasons(&self) -> Vec<&str> {
        let listed = self.finish_reasons.value().and_then(Value::as_array);
        let choices = self
            .batch_body()
            .and_then(|b| b.get("choices"))
            .and_then(Value::as_array);
        listed
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .chain(
                choices
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c.get("finish_reason").and_then(Value::as_str)),
            )
            .collect()
    }
}

/// The output line of a failure record: `{"__ERROR__": {...fields}}`.
pub fn error_record(fields: Map<String, Value>) -> String {
    let mut outer = Map::with_capacity(1);
    outer.insert(ERROR_KEY.into(), Value::Object(fields));
    Value::Object(outer).to_string()
}

/// A task's failure record (the wire protocol): `{"__ERROR__": {"error", "message",
/// "task_data"}}`, where `task_data` is the input line as JSON (or as a
/// string when it is not JSON).
pub fn task_failure(kind: &str, message: &str, content: &str) -> String {
    let task_data =
        serde_json::from_str::<Value>(content).unwrap_or_else(|_| Value::String(content.into()));
    let mut f = Map::new();
    f.insert("error".into(), kind.into());
    f.insert("message".into(), message.into());
    f.insert("task_data".into(), task_data);
    error_record(f)
}

/// The tombstone the server writes for a line it gives up on: `kind` is
/// `max_retries_exceeded` (failures) or `max_releases_exceeded` (releases),
/// and `reissues` the attempt history by cause.
pub fn tombstone(
    kind: &str,
    work_id: u64,
    original_content: &str,
    reissues: ReissueCounts,
) -> String {
    let mut f = Map::new();
    f.insert("error".into(), kind.into());
    f.insert("work_id".into(), work_id.into());
    f.insert("original_content".into(), original_content.into());
    f.insert(
        "reissues".into(),
        serde_json::to_value(reissues).expect("counts serialize"),
    );
    error_record(f)
}

/// The record of a submitted result that is not one JSON value: retrying
/// cannot fix a worker's encoding bug, so the line records it at once.
pub fn invalid_result(work_id: u64, reason: &str, result: &str) -> String {
    let mut f = Map::new();
    f.insert("error".into(), "invalid_result".into());
    f.insert("work_id".into(), work_id.into());
    f.insert(
        "message".into(),
        format!("work_id {work_id}: the worker's result was not written: {reason}").into(),
    );
    f.insert("result_head".into(), head(result, 200).into());
    error_record(f)
}

/// Kept where readers of records found it: [`crate::text::head`].
pub use crate::text::head;

/// The record of an input line that is not UTF-8.
pub fn invalid_utf8(work_id: u64, offset: u64, infile: &std::path::Path, bytes: &[u8]) -> String {
    let mut f = Map::new();
    f.insert("error".into(), "invalid_utf8".into());
    f.insert("work_id".into(), work_id.into());
    f.insert(
        "message".into(),
        format!(
            "input line {work_id} (byte offset {offset}) of {} is not valid UTF-8; it was not sent to any worker",
            infile.display()
        )
        .into(),
    );
    f.insert(
        "original_content".into(),
        String::from_utf8_lossy(bytes).into_owned().into(),
    );
    error_record(f)
}

/// A line of an OpenAI batch output: `{"id", "custom_id", "response",
/// "error"}`.
pub fn batch_line(
    id: &str,
    custom_id: &Value,
    response: Value,
    error: Option<(&str, &str)>,
) -> String {
    let error = match error {
        Some((code, message)) => serde_json::json!({"code": code, "message": message}),
        None => Value::Null,
    };
    serde_json::json!({"id": id, "custom_id": custom_id, "response": response, "error": error})
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_head_is_cut_at_a_character_boundary() {
        assert_eq!(head("abc", 10), "abc");
        assert_eq!(head("abc", 2), "ab");
        // "é" is two bytes: a cut inside it keeps what comes before.
        assert_eq!(head("aé", 2), "a");
        assert_eq!(head("aé", 3), "aé");
    }

    /// Every kind of line an output can hold, with what it is.
    pub(crate) fn every_kind_of_line() -> Vec<(String, &'static str)> {
        vec![
            (json!({"id": 1, "responses": ["a"], "usage": {"prompt_tokens": 5, "completion_tokens": 7}, "finish_reasons": ["stop"]}).to_string(), "ok"),
            // A task's own fields that share names with records are its own.
            (json!({"prompt": "p", "response": "an answer"}).to_string(), "ok"),
            (json!({"error": "my task's own field", "response": {"status_code": 500}}).to_string(), "ok"),
            (json!({"usage": "n/a", "finish_reasons": 3}).to_string(), "ok"),
            (json!("a bare string").to_string(), "ok"),
            (json!([1, 2]).to_string(), "ok"),
            (json!({"custom_id": "x", "answer": 1}).to_string(), "ok"),
            (task_failure("request_rejected", "too long", r#"{"n": 1}"#), "request_rejected"),
            (tombstone("max_retries_exceeded", 3, "x", ReissueCounts { timeout: 2, release: 1, retry: 1 }), "max_retries_exceeded"),
            (invalid_result(4, "not JSON", "{oops"), "invalid_result"),
            (json!({"__ERROR__": {"message": "no kind"}}).to_string(), "unknown"),
            (batch_line("batch_req_5", &json!("a"), json!({"status_code": 200, "request_id": "r", "body": {"choices": [{"finish_reason": "length"}], "usage": {"prompt_tokens": 3, "completion_tokens": 16}}}), None), "ok"),
            (batch_line("batch_req_6", &json!("b"), json!({"status_code": 400, "request_id": "r", "body": {"error": "too long"}}), None), "http_400"),
            (batch_line("batch_req_7", &json!("c"), json!({"status_code": 500, "request_id": "r", "body": "upstream died"}), None), "http_500"),
            (batch_line("batch_req_8", &json!(null), Value::Null, Some(("invalid_json", "..."))), "invalid_json"),
            ("{cut off".to_string(), NOT_JSON),
            // JSON as Python writes it, which the server takes as a result.
            (r#"{"score": NaN, "responses": ["a"]}"#.to_string(), "ok"),
            (r#"{"__ERROR__": {"error": "request_rejected", "x": -Infinity}}"#.to_string(), "request_rejected"),
        ]
    }

    #[test]
    fn each_line_is_what_it_is_and_the_fast_path_agrees_with_the_full_read() {
        for (line, kind) in every_kind_of_line() {
            assert_eq!(classify(line.as_bytes()).name(), kind, "{line}");
            let full = OutputLine::parse(line.as_bytes()).map(|l| l.kind().name().to_string());
            assert_eq!(full.as_deref().unwrap_or(NOT_JSON), kind, "{line}");
        }
    }

    #[test]
    fn the_servers_count_sees_the_same_failures() {
        for (line, kind) in every_kind_of_line() {
            if kind == NOT_JSON {
                continue;
            }
            let failed = failure_of_json(&line);
            assert_eq!(failed.as_deref().unwrap_or("ok"), kind, "{line}");
        }
    }

    #[test]
    fn tokens_finish_reasons_and_reissues_are_read_where_lines_carry_them() {
        let lines = every_kind_of_line();
        let parsed: Vec<OutputLine> = lines
            .iter()
            .filter_map(|(l, _)| OutputLine::parse(l.as_bytes()))
            .collect();
        let usage: Vec<(u64, u64)> = parsed.iter().filter_map(OutputLine::usage).collect();
        assert_eq!(usage, [(5, 7), (3, 16)]);
        let reasons: Vec<&str> = parsed.iter().flat_map(OutputLine::finish_reasons).collect();
        assert_eq!(reasons, ["stop", "length"]);
        let reissues: Vec<(&str, u64)> = parsed.iter().flat_map(OutputLine::reissues).collect();
        assert_eq!(reissues, [("timeout", 2), ("release", 1), ("retry", 1)]);
    }

    #[test]
    fn a_tombstone_has_the_protocol_shape() {
        let t: Value = serde_json::from_str(&tombstone(
            "max_retries_exceeded",
            4,
            "line \"four\"",
            ReissueCounts {
                timeout: 3,
                release: 1,
                retry: 0,
            },
        ))
        .unwrap();
        let e = &t[ERROR_KEY];
        assert_eq!(e["error"], "max_retries_exceeded");
        assert_eq!(e["work_id"], 4);
        assert_eq!(e["original_content"], "line \"four\"");
        assert_eq!(e["reissues"]["timeout"], 3);
    }

    #[test]
    fn builtin_kinds_include_every_http_status_and_nothing_else() {
        assert!(is_builtin_kind("http_503"));
        assert!(is_builtin_kind("prompt_path_error"));
        assert!(!is_builtin_kind("http_5"));
        assert!(!is_builtin_kind("no_score"));
    }

    /// The book's table of kinds (`docs/src/reference/records.md`, between
    /// its `kinds:begin`/`kinds:end` markers) lists exactly [`KINDS`].
    #[test]
    fn the_book_lists_exactly_the_kinds_dispatcher_writes() {
        let page = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../docs/src/reference/records.md"),
        )
        .unwrap();
        let table = page
            .split("<!-- kinds:begin -->")
            .nth(1)
            .and_then(|rest| rest.split("<!-- kinds:end -->").next())
            .expect("the records page has a table of kinds between its markers");
        let listed: Vec<&str> = table
            .lines()
            .filter_map(|l| l.strip_prefix("| `")?.split('`').next())
            .collect();
        let known: Vec<&str> = KINDS.iter().map(|(k, _)| *k).collect();
        assert_eq!(listed, known);
    }
}
