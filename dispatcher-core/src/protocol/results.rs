//! `POST /results` and `POST /release`: what workers hand in, read leniently
//! so that one bad item costs nothing else; and the check that a result is
//! one JSON value on one line.

use serde::{Deserialize, Serialize};

use super::*;

/// The body of `POST /results`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultsRequest {
    /// Items with `result` set.
    pub items: Vec<WorkItem>,
    /// Extension: who sends them (the `worker` of its work requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Extension: engine tokens the worker used since its last report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<TokenCounts>,
}

/// What the server reads of a `POST /results` body: `{"items": [...]}` where
/// each item needs only `work_id` and `result`. Every other field is skipped
/// without being copied, so a worker may send each issued item back whole (as
/// the Python client does, prompt included) or just those two fields. An item
/// whose fields have the wrong types is read too (see [`SubmittedResult`]), so
/// that one bad item does not cost the rest of the batch.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SubmittedResults {
    /// The results.
    pub items: Vec<SubmittedResult>,
    /// Extension: who sends them (anything but a string is taken as no one).
    #[serde(default, deserialize_with = "lenient_string")]
    pub worker: Option<String>,
    /// Extension: engine tokens the worker used since its last report. A
    /// malformed one is ignored: counts never cost a batch of results.
    #[serde(default, deserialize_with = "lenient_usage")]
    pub usage: Option<TokenCounts>,
}

/// Reads an optional string, taking anything else as none.
fn lenient_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Some(s),
        _ => None,
    })
}

/// Reads an optional [`TokenCounts`], taking anything else (an array, a
/// negative or fractional count) as none.
pub(super) fn lenient_usage<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<TokenCounts>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        value @ serde_json::Value::Object(_) => serde_json::from_value(value).ok(),
        _ => None,
    })
}

/// Reads an optional [`PrefixCache`], taking anything else (not an object
/// of two counts, or more hits than queries) as none: a heartbeat renews
/// its leases whatever its optional fields hold.
pub(super) fn lenient_prefix_cache<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<PrefixCache>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        value @ serde_json::Value::Object(_) => serde_json::from_value::<PrefixCache>(value)
            .ok()
            .filter(|c| c.hits <= c.queries),
        _ => None,
    })
}

/// One item of [`SubmittedResults`], as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmittedResult {
    /// The work id it is for; `None` when it is missing or not a work id.
    pub work_id: Option<u64>,
    /// The result.
    pub result: SubmittedValue,
}

/// The `result` of a submitted item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmittedValue {
    /// A string: what the protocol asks for (it must hold one JSON value).
    Text(String),
    /// `null` or missing.
    Null,
    /// Some other JSON type, named (`"an object"`, `"a number"`, ...).
    Other(&'static str),
}

impl<'de> Deserialize<'de> for SubmittedResult {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(lenient::ResultVisitor)
    }
}

/// Readers that take any JSON type where the protocol wants one, so a wrong
/// type becomes a per-item problem instead of a refused body.
mod lenient {
    use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
    use serde::Deserialize;

    use super::{SubmittedResult, SubmittedValue};

    #[derive(Deserialize)]
    #[serde(field_identifier, rename_all = "snake_case")]
    enum Field {
        WorkId,
        Result,
        #[serde(other)]
        Other,
    }

    pub(super) struct ResultVisitor;

    impl<'de> Visitor<'de> for ResultVisitor {
        type Value = SubmittedResult;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a work item object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SubmittedResult, A::Error> {
            let mut work_id = None;
            let mut result = SubmittedValue::Null;
            while let Some(field) = map.next_key::<Field>()? {
                match field {
                    Field::WorkId => work_id = map.next_value::<AnyId>()?.0,
                    Field::Result => result = map.next_value::<AnyResult>()?.0,
                    Field::Other => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(SubmittedResult { work_id, result })
        }
    }

    /// A work id if the value is one (a non-negative integer), else `None`.
    struct AnyId(Option<u64>);

    impl<'de> Deserialize<'de> for AnyId {
        fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(AnyIdVisitor)
        }
    }

    struct AnyIdVisitor;

    impl<'de> Visitor<'de> for AnyIdVisitor {
        type Value = AnyId;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a work id")
        }
        fn visit_u64<E>(self, v: u64) -> Result<AnyId, E> {
            Ok(AnyId(Some(v)))
        }
        fn visit_i64<E>(self, v: i64) -> Result<AnyId, E> {
            Ok(AnyId(u64::try_from(v).ok()))
        }
        fn visit_f64<E>(self, _: f64) -> Result<AnyId, E> {
            Ok(AnyId(None))
        }
        fn visit_bool<E>(self, _: bool) -> Result<AnyId, E> {
            Ok(AnyId(None))
        }
        fn visit_str<E>(self, _: &str) -> Result<AnyId, E> {
            Ok(AnyId(None))
        }
        fn visit_unit<E>(self) -> Result<AnyId, E> {
            Ok(AnyId(None))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<AnyId, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(AnyId(None))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AnyId, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(AnyId(None))
        }
    }

    /// A result of any JSON type.
    struct AnyResult(SubmittedValue);

    impl<'de> Deserialize<'de> for AnyResult {
        fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(AnyResultVisitor)
        }
    }

    struct AnyResultVisitor;

    impl<'de> Visitor<'de> for AnyResultVisitor {
        type Value = AnyResult;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a result")
        }
        fn visit_str<E>(self, v: &str) -> Result<AnyResult, E> {
            Ok(AnyResult(SubmittedValue::Text(v.to_owned())))
        }
        fn visit_string<E>(self, v: String) -> Result<AnyResult, E> {
            Ok(AnyResult(SubmittedValue::Text(v)))
        }
        fn visit_unit<E>(self) -> Result<AnyResult, E> {
            Ok(AnyResult(SubmittedValue::Null))
        }
        fn visit_none<E>(self) -> Result<AnyResult, E> {
            Ok(AnyResult(SubmittedValue::Null))
        }
        fn visit_bool<E>(self, _: bool) -> Result<AnyResult, E> {
            Ok(AnyResult(SubmittedValue::Other("a boolean")))
        }
        fn visit_u64<E>(self, _: u64) -> Result<AnyResult, E> {
            Ok(AnyResult(SubmittedValue::Other("a number")))
        }
        fn visit_i64<E>(self, _: i64) -> Result<AnyResult, E> {
            Ok(AnyResult(SubmittedValue::Other("a number")))
        }
        fn visit_f64<E>(self, _: f64) -> Result<AnyResult, E> {
            Ok(AnyResult(SubmittedValue::Other("a number")))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<AnyResult, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(AnyResult(SubmittedValue::Other("an array")))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AnyResult, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(AnyResult(SubmittedValue::Other("an object")))
        }
    }
}

/// Reads a list of work ids keeping only the first of each: a body that
/// repeats one id millions of times costs memory for one.
pub(super) fn distinct_ids<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
    struct Ids;
    impl<'de> serde::de::Visitor<'de> for Ids {
        type Value = Vec<u64>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list of work ids (non-negative integers)")
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u64>, A::Error> {
            let mut seen = rustc_hash::FxHashSet::default();
            let mut ids = Vec::new();
            while let Some(id) = seq.next_element::<u64>()? {
                if seen.insert(id) {
                    ids.push(id);
                }
            }
            Ok(ids)
        }
    }
    d.deserialize_seq(Ids)
}

/// The answer to `POST /results`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultsResponse {
    /// `"OK"`.
    pub status: String,
    /// How many results were accepted as the first result of their item.
    pub count: u64,
    /// Extension: results ignored because their item was already done or never issued.
    #[serde(default)]
    pub ignored: u64,
    /// Extension: work ids of results whose item was already done elsewhere (or was
    /// tombstoned): the worker that holds them may drop them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub already_done: Vec<u64>,
    /// Extension: work ids whose result was not one JSON value: each got an
    /// `invalid_result` error record as its output line (counted in `count`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub invalid: Vec<u64>,
}

/// The body of `POST /release`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRequest {
    /// The work ids to put back at the front of the queue (repeats are read
    /// once).
    #[serde(deserialize_with = "distinct_ids")]
    pub work_ids: Vec<u64>,
    /// Extension: why. `"retry"` (a task asked for another attempt) counts
    /// against `--max-retries`; `"preempted"` draws on the separate
    /// `--max-releases` budget. Without a reason (workers written for the
    /// Python server) a release counts against `--max-retries`, as it did there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<ReleaseReason>,
    /// Extension: who releases (the `worker` of its work requests). An item
    /// that was reissued to another worker since is not taken from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
}

/// Why items are released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseReason {
    /// The worker stops (preemption, SIGTERM, a dead engine): not the item's fault.
    Preempted,
    /// The task asked for another attempt: a failure of the item.
    Retry,
}

/// A result that passed [`check_results`]: one JSON value on one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultLine {
    /// The work id it is for.
    pub work_id: u64,
    /// The output line, without its line break.
    pub line: String,
}

/// A result refused by [`check_results`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedResult {
    /// The work id it is for.
    pub work_id: u64,
    /// Why, in words a worker's author can act on.
    pub reason: String,
}

/// Splits `(work_id, result)` pairs into results that fit on one output line
/// and refusals.
pub fn check_results(
    results: impl ExactSizeIterator<Item = (u64, Option<String>)>,
) -> (Vec<ResultLine>, Vec<RefusedResult>) {
    let mut valid = Vec::with_capacity(results.len());
    let mut refused = Vec::new();
    for (work_id, result) in results {
        let checked = match result {
            Some(text) => check_result_line(text).map_err(|e| e.reason),
            None => Err("its result is null".into()),
        };
        match checked {
            Ok(line) => valid.push(ResultLine { work_id, line }),
            Err(reason) => refused.push(RefusedResult { work_id, reason }),
        }
    }
    (valid, refused)
}

/// A submitted result that is not one JSON value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidResult {
    /// Why, in words a worker's author can act on.
    pub reason: String,
    /// The result as submitted.
    pub text: String,
}

/// Checks that a result is one JSON value and returns it as one output line.
///
/// JSON as Python's `json` module writes it is accepted: `NaN`, `Infinity`
/// and `-Infinity` (its readers take them back), and line breaks between
/// tokens (`json.dumps(indent=2)`), which are removed: in valid JSON a line
/// break can only be whitespace, so the value is unchanged.
pub fn check_result_line(text: String) -> Result<String, InvalidResult> {
    if let Err(e) = check_json_value(&text) {
        return Err(InvalidResult {
            reason: format!("its result is not one JSON value ({e})"),
            text,
        });
    }
    if memchr::memchr2(b'\n', b'\r', text.as_bytes()).is_none() {
        return Ok(text);
    }
    let mut bytes = text.into_bytes();
    bytes.retain(|&b| b != b'\n' && b != b'\r');
    Ok(String::from_utf8(bytes).expect("removing ASCII bytes keeps UTF-8"))
}

/// Checks that `text` is one JSON value, as Python's `json` module reads it
/// (`NaN`, `Infinity` and `-Infinity` included).
pub fn check_json_value(text: &str) -> Result<(), serde_json::Error> {
    let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(text) else {
        return Ok(());
    };
    match without_python_constants(text) {
        Some(t) if serde_json::from_str::<serde::de::IgnoredAny>(&t).is_ok() => Ok(()),
        _ => Err(e),
    }
}

/// `text` with the constants Python's `json` writes outside strings (`NaN`,
/// `Infinity`, `-Infinity`) replaced by numbers, to check the rest is JSON;
/// `None` when it has none.
pub(crate) fn without_python_constants(text: &str) -> Option<String> {
    match replace_python_constants(text, |_| "0") {
        std::borrow::Cow::Owned(out) => Some(out),
        std::borrow::Cow::Borrowed(_) => None,
    }
}

/// Just past the closing quote of the string whose content starts at
/// `i` in `bytes` (escapes skipped), or the end of `bytes` when it has none.
fn string_end(bytes: &[u8], mut i: usize) -> usize {
    while let Some(at) = memchr::memchr2(b'"', b'\\', &bytes[i..]) {
        if bytes[i + at] == b'"' {
            return i + at + 1;
        }
        i = (i + at + 2).min(bytes.len());
    }
    bytes.len()
}

/// Python's constants, as its `json` module writes them.
pub(crate) const PYTHON_CONSTANTS: [&str; 3] = ["-Infinity", "Infinity", "NaN"];

/// `text` with each of Python's constants outside strings replaced by
/// `with(constant)`; borrowed when it has none.
pub(crate) fn replace_python_constants<'a>(
    text: &'a str,
    with: impl Fn(&'static str) -> &'static str,
) -> std::borrow::Cow<'a, str> {
    let bytes = text.as_bytes();
    // Every constant has an `N` or an `I`: a line without either has none.
    if memchr::memchr2(b'N', b'I', bytes).is_none() {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::new();
    let (mut i, mut copied) = (0, 0);
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                // Past the string at once (most of a line is strings).
                i = string_end(bytes, i + 1);
                continue;
            }
            b'-' | b'I' | b'N' => {
                if let Some(constant) = PYTHON_CONSTANTS
                    .into_iter()
                    .find(|c| text[i..].starts_with(c))
                {
                    out.push_str(&text[copied..i]);
                    out.push_str(with(constant));
                    i += constant.len();
                    copied = i;
                    continue;
                }
            }
            _ => {}
        }
        i += 1;
    }
    if copied == 0 {
        return std::borrow::Cow::Borrowed(text);
    }
    out.push_str(&text[copied..]);
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The constants replaced byte by byte, tracking strings one byte at a
    /// time: what the fast scan must agree with.
    fn reference(text: &str) -> String {
        let bytes = text.as_bytes();
        let mut out = String::new();
        let (mut i, mut copied, mut in_string) = (0, 0, false);
        while i < bytes.len() {
            match bytes[i] {
                b'\\' if in_string => i += 1,
                b'"' => in_string = !in_string,
                b'-' | b'I' | b'N' if !in_string => {
                    if let Some(c) = PYTHON_CONSTANTS.iter().find(|c| text[i..].starts_with(*c)) {
                        out.push_str(&text[copied..i]);
                        out.push_str(&c.to_lowercase());
                        i += c.len();
                        copied = i;
                        continue;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        out.push_str(&text[copied.min(text.len())..]);
        out
    }

    fn replaced(text: &str) -> String {
        replace_python_constants(text, |c| match c {
            "-Infinity" => "-infinity",
            "Infinity" => "infinity",
            _ => "nan",
        })
        .into_owned()
    }

    #[test]
    fn constants_are_replaced_outside_strings_only() {
        let text = r#"{"a": NaN, "b": "NaN \" Infinity", "c": [-Infinity, Infinity], "d\\": NaN}"#;
        assert_eq!(
            replaced(text),
            r#"{"a": nan, "b": "NaN \" Infinity", "c": [-infinity, infinity], "d\\": nan}"#
        );
        assert!(matches!(
            replace_python_constants(r#"{"a": "NaN"}"#, |_| "0"),
            std::borrow::Cow::Borrowed(_)
        ));
        for cut in [r#"{"a": "NaN"#, r#"{"a": "x\"#, "NaN", r#""\"#, ""] {
            assert_eq!(replaced(cut), reference(cut), "{cut:?}");
        }
    }

    proptest! {
        #[test]
        fn the_fast_scan_agrees_with_the_byte_by_byte_one(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just("\""), Just("\\"), Just("NaN"), Just("-Infinity"), Just("Infinity"),
                    Just("-"), Just("N"), Just("I"), Just("é"), Just("{\"k\": "), Just(", "), Just("1"),
                ],
                0..24,
            )
        ) {
            let text: String = parts.concat();
            prop_assert_eq!(replaced(&text), reference(&text));
        }
    }
}
