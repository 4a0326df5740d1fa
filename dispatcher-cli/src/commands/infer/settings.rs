//! Request fields a line sets for itself (`--request-path`): its own
//! sampling settings, output format or model (a LoRA adapter the engine
//! serves), checked line by line. A bad value fails that line, with a kind
//! of its own and a message naming the field; the job goes on.

use serde_json::{Map, Value};

use dispatcher_core::engine::Request;
use dispatcher_core::task::TaskError;

/// The kind of a line whose request fields are not usable.
pub const INVALID: &str = "request_field_invalid";

/// Fields a line may not set: infer sets them from the prompt and its flags.
const NOT_SETTABLE: [(&str, &str); 4] = [
    ("messages", "the prompt comes from --prompt-path"),
    ("prompt", "the prompt comes from --prompt-path"),
    ("n", "responses per line are --num-generations"),
    ("stream", "infer reads whole answers"),
];

/// The fields selected in a line (`selected`, by `--request-path path`),
/// checked: `None` for `null` (the line sets none).
pub fn check(selected: Value, path: &str) -> Result<Option<Map<String, Value>>, TaskError> {
    let fields = match selected {
        Value::Null => return Ok(None),
        Value::Object(fields) => fields,
        other => {
            return Err(invalid(
                path,
                &format!(
                    "selects {}, not an object of request fields",
                    crate::jq::kind(&other)
                ),
            ))
        }
    };
    for (key, value) in &fields {
        if let Some((_, why)) = NOT_SETTABLE.iter().find(|(k, _)| k == key) {
            return Err(invalid(
                path,
                &format!("sets {key:?}, which a line cannot: {why}"),
            ));
        }
        if let Some(wanted) = wanted(key, value) {
            return Err(invalid(path, &format!("sets {key:?} to {value}, {wanted}")));
        }
    }
    Ok(Some(fields))
}

/// `req` with `fields` set over what the flags set.
pub fn apply(mut req: Request, fields: &Map<String, Value>) -> Request {
    for (key, value) in fields {
        match key.as_str() {
            "temperature" => req.temperature = value.as_f64(),
            "top_p" => req.top_p = value.as_f64(),
            "max_tokens" => req.max_tokens = value.as_u64().and_then(|n| u32::try_from(n).ok()),
            "seed" => req.seed = value.as_u64(),
            "stop" => {
                req.stop = match value {
                    Value::String(s) => vec![s.clone()],
                    _ => value
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect(),
                }
            }
            "model" => req.model = value.as_str().map(String::from),
            "presence_penalty" => req.presence_penalty = value.as_f64(),
            "frequency_penalty" => req.frequency_penalty = value.as_f64(),
            "response_format" => req.response_format = Some(value.clone()),
            _ => {
                req.extra.insert(key.clone(), value.clone());
            }
        }
    }
    req
}

/// What field `key` must hold, where `value` is not that; `None` where it
/// is, or for a field infer passes on as it is. One rule per field: its
/// check and its message side by side, and no value taken that `apply`
/// cannot set exactly.
fn wanted(key: &str, value: &Value) -> Option<&'static str> {
    let (ok, wanted) = match key {
        "temperature" | "presence_penalty" | "frequency_penalty" | "repetition_penalty" => (
            value.as_f64().is_some_and(f64::is_finite),
            "not a finite number",
        ),
        "top_p" | "min_p" => (
            value.as_f64().is_some_and(|p| (0.0..=1.0).contains(&p)),
            "not a number from 0 to 1",
        ),
        "max_tokens" | "max_completion_tokens" => (
            value
                .as_u64()
                .is_some_and(|n| n >= 1 && u32::try_from(n).is_ok()),
            "not a whole number of at least 1 and at most 4294967295",
        ),
        "seed" => (value.is_u64(), "not a whole number of at least 0"),
        "top_k" => (value.is_u64() || value.is_i64(), "not a whole number"),
        "top_logprobs" => (
            value.as_u64().is_some_and(|n| n <= 20),
            "not a whole number from 0 to 20",
        ),
        "logprobs" => (
            value.is_boolean() || value.is_u64(),
            "not true, false or a count",
        ),
        "stop" => (
            value.is_string()
                || value
                    .as_array()
                    .is_some_and(|a| a.iter().all(Value::is_string)),
            "not a string or a list of strings",
        ),
        "model" => (
            value.as_str().is_some_and(|m| !m.is_empty()),
            "not a model name",
        ),
        "response_format" => (value.is_object(), "not an object"),
        _ => return None,
    };
    (!ok).then_some(wanted)
}

fn invalid(path: &str, why: &str) -> TaskError {
    TaskError::failed(INVALID, format!("--request-path {path} {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn why(v: Value) -> String {
        match check(v, ".params") {
            Err(e) => e.to_string(),
            Ok(f) => panic!("taken: {f:?}"),
        }
    }

    #[test]
    fn a_lines_fields_are_checked_and_set_over_the_flags() {
        let fields = check(
            json!({"temperature": 0.2, "max_tokens": 64, "stop": "END", "seed": 7,
                   "model": "sql-lora", "response_format": {"type": "json_object"}, "top_k": 5}),
            ".params",
        )
        .unwrap()
        .unwrap();
        let req = apply(
            Request::chat().user("q").temperature(0.8).max_tokens(4096),
            &fields,
        );
        let body = req.to_json();
        assert_eq!(
            (
                &body["temperature"],
                &body["max_tokens"],
                &body["stop"],
                &body["seed"]
            ),
            (&json!(0.2), &json!(64), &json!(["END"]), &json!(7))
        );
        assert_eq!(
            (&body["model"], &body["top_k"]),
            (&json!("sql-lora"), &json!(5))
        );
        assert_eq!(body["response_format"]["type"], "json_object");
        assert_eq!(check(Value::Null, ".params").unwrap(), None);
    }

    #[test]
    fn a_bad_value_names_its_field_and_what_was_wanted() {
        let e = why(json!({"max_tokens": 0}));
        assert!(
            e.contains("\"max_tokens\"") && e.contains("at least 1"),
            "{e}"
        );
        // Values the request cannot hold exactly are refused, not dropped.
        let e = why(json!({"max_tokens": 5_000_000_000_u64}));
        assert!(e.contains("\"max_tokens\""), "{e}");
        let e = why(json!({"seed": -1}));
        assert!(e.contains("\"seed\"") && e.contains("at least 0"), "{e}");
        let e = why(json!({"top_p": 1.5}));
        assert!(e.contains("\"top_p\"") && e.contains("from 0 to 1"), "{e}");
        let e = why(json!({"temperature": "hot"}));
        assert!(e.contains("\"temperature\""), "{e}");
        let e = why(json!({"stop": [1]}));
        assert!(e.contains("list of strings"), "{e}");
        let e = why(json!({"messages": []}));
        assert!(e.contains("--prompt-path"), "{e}");
        let e = why(json!({"n": 2}));
        assert!(e.contains("--num-generations"), "{e}");
        let e = why(json!("fast"));
        assert!(e.contains("a string, not an object"), "{e}");
        assert!(e.contains("--request-path .params"), "{e}");
    }
}
