//! The output line of `infer`: the input line as it was read, byte for byte,
//! with infer's fields added. Nothing of the input is parsed and written
//! again, so nothing changes: floats keep their last digit, integers past
//! 64 bits their value, `NaN` (as Python's `json` writes it) stays `NaN`.
//!
//! - An object gets the fields added before its closing brace.
//! - An object that already has a field infer adds (`responses`, and with
//!   `--include-usage` `usage`, `finish_reasons`, `latency_secs`), or a
//!   failure record's key (`__ERROR__`, which would make the line count as
//!   failed), is kept whole as `input`: `{"input": {...}, "responses": ...}`.
//!   Both values are there; neither is overwritten.
//! - A string is kept as `text`, any other value as `input`; a line of
//!   `--input-format text` is `text`.

use jaq_json::Val;
use serde_json::{Map, Value};

/// The output line for input `line`, read as `read` (`None`: a line of
/// plain text), with the fields `added`.
pub(super) fn line(line: &str, read: Option<&Val>, added: &Map<String, Value>) -> String {
    let fields = fields(added);
    let text = line.trim_matches(is_json_space);
    match read {
        None => wrapped(
            "text",
            &Value::String(line.to_string()).to_string(),
            &fields,
        ),
        Some(Val::Obj(map)) if !map.keys().any(|k| taken(k, added)) => {
            let open = &text[..text.len() - 1];
            let empty = open[1..].trim_matches(is_json_space).is_empty();
            let mut out = String::with_capacity(text.len() + fields.len() + 2);
            out.push_str(if empty { "{" } else { open });
            if !empty {
                out.push(',');
            }
            out.push_str(&fields);
            out.push('}');
            out
        }
        Some(Val::TStr(_)) => wrapped("text", text, &fields),
        Some(_) => wrapped("input", text, &fields),
    }
}

/// `{"key": raw, fields}`.
fn wrapped(key: &str, raw: &str, fields: &str) -> String {
    format!("{{\"{key}\":{raw},{fields}}}")
}

/// The fields as they go inside an object: `"k":v,"k2":v2`.
fn fields(added: &Map<String, Value>) -> String {
    let mut out = String::new();
    for (i, (k, v)) in added.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&Value::String(k.clone()).to_string());
        out.push(':');
        out.push_str(&v.to_string());
    }
    out
}

/// Whether key `k` of the input is one infer adds, or a failure record's.
fn taken(k: &Val, added: &Map<String, Value>) -> bool {
    let Val::TStr(bytes) = k else { return false };
    let bytes: &[u8] = bytes;
    bytes == dispatcher_core::record::ERROR_KEY.as_bytes()
        || added.keys().any(|name| name.as_bytes() == bytes)
}

/// JSON's whitespace (RFC 8259): space, tab, line feed, carriage return.
fn is_json_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(input: &str) -> String {
        let read = crate::jq::parse_line(input).unwrap();
        let mut added = Map::new();
        added.insert("responses".into(), serde_json::json!(["r"]));
        line(input, Some(&read), &added)
    }

    #[test]
    fn the_input_is_kept_byte_for_byte() {
        // Floats, integers past 64 bits, Python's constants, key order,
        // escapes: as they were.
        let input = r#"{"x": 90.33333333333333, "big": 18446744073709551616, "nan": NaN, "s": "a\u00e9\n", "z": 1e400}"#;
        assert_eq!(
            out(input),
            r#"{"x": 90.33333333333333, "big": 18446744073709551616, "nan": NaN, "s": "a\u00e9\n", "z": 1e400,"responses":["r"]}"#
        );
        assert_eq!(out(" {} "), r#"{"responses":["r"]}"#);
        assert_eq!(out("{ }"), r#"{"responses":["r"]}"#);
        assert_eq!(
            out(r#""just text""#),
            r#"{"text":"just text","responses":["r"]}"#
        );
        assert_eq!(out("[1.10, 2]"), r#"{"input":[1.10, 2],"responses":["r"]}"#);
    }

    #[test]
    fn fields_infer_writes_never_overwrite_the_inputs() {
        for input in [
            r#"{"responses": ["an earlier run's"], "q": 1}"#,
            r#"{"__ERROR__": "a column of the dataset"}"#,
        ] {
            let line = out(input);
            assert_eq!(line, format!(r#"{{"input":{input},"responses":["r"]}}"#));
            let v: Value = serde_json::from_str(&line).unwrap();
            assert!(v["input"].is_object(), "{line}");
        }
        // A field infer does not add this run is the line's own.
        assert_eq!(out(r#"{"usage": 1}"#), r#"{"usage": 1,"responses":["r"]}"#);
    }

    #[test]
    fn a_plain_text_line_is_text() {
        let mut added = Map::new();
        added.insert("responses".into(), serde_json::json!([]));
        assert_eq!(
            line("say \"hi\"", None, &added),
            r#"{"text":"say \"hi\"","responses":[]}"#
        );
    }
}
