//! The built-in echo engine: an OpenAI-compatible server that answers every
//! request with its own prompt, for dry runs, tests and benchmarks.
//!
//! Deterministic: the answer is the last chat message (or the completion
//! prompt), cut to `max_tokens` words (finish reason `length`) or at the first
//! stop sequence (finish reason `stop`). Samples differ as a model's would:
//! the variant `seed + i` of choice `i` (seed 0 without one) is appended as
//! ` #variant` when it is not 0, so `n` choices differ, and so do requests with
//! different seeds. A [`script`] replaces the echo with scripted replies. A
//! `json_schema` request without a scripted reply gets the smallest value the
//! schema allows. Usage counts words. With an error rate `r`, exactly every
//! `1/r`-th request gets a 500.

pub mod script;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use script::{EchoScript, ReplyContext};

/// How the echo engine behaves.
#[derive(Debug, Clone)]
pub struct EchoOptions {
    /// Model name it reports.
    pub model: String,
    /// Time each request takes.
    pub latency: Duration,
    /// Requests processed at once; more wait (as on a real engine's batch).
    pub max_concurrency: Option<usize>,
    /// Share of requests answered with a 500, from 0 to 1.
    pub error_rate: f64,
    /// Scripted replies instead of the echo, where a rule matches.
    pub script: Option<Arc<EchoScript>>,
}

impl Default for EchoOptions {
    fn default() -> Self {
        EchoOptions {
            model: "echo".into(),
            latency: Duration::ZERO,
            max_concurrency: None,
            error_rate: 0.0,
            script: None,
        }
    }
}

#[derive(Debug)]
struct EchoState {
    options: EchoOptions,
    limit: Option<Semaphore>,
    /// Requests seen, for the deterministic error pattern.
    count: AtomicU64,
}

/// The echo engine's router.
pub fn app(options: EchoOptions) -> Router {
    let state = Arc::new(EchoState {
        limit: options.max_concurrency.map(Semaphore::new),
        options,
        count: AtomicU64::new(0),
    });
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completion))
        .with_state(state)
}

/// Serves the echo engine on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    options: EchoOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(options))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn models(State(state): State<Arc<EchoState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{"id": state.options.model, "object": "model"}]}))
}

async fn chat(State(state): State<Arc<EchoState>>, Json(body): Json<Value>) -> Response {
    let Some(text) = body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .map(String::from)
    else {
        return bad_request("\"messages\" must be a non-empty array of {role, content}");
    };
    answer(&state, &body, text, true).await
}

async fn completion(State(state): State<Arc<EchoState>>, Json(body): Json<Value>) -> Response {
    let Some(text) = body["prompt"].as_str().map(String::from) else {
        return bad_request("\"prompt\" must be a string");
    };
    answer(&state, &body, text, false).await
}

fn bad_request(message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": {"code": 400, "message": message, "type": "invalid_request_error"}})),
    )
        .into_response()
}

async fn answer(state: &EchoState, body: &Value, prompt: String, chat: bool) -> Response {
    let _permit = match &state.limit {
        Some(s) => Some(s.acquire().await.expect("never closed")),
        None => None,
    };
    if !state.options.latency.is_zero() {
        tokio::time::sleep(state.options.latency).await;
    }
    let k = state.count.fetch_add(1, Ordering::Relaxed);
    let rate = state.options.error_rate;
    if rate > 0.0 && ((k + 1) as f64 * rate).floor() > (k as f64 * rate).floor() {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": {"code": 500, "message": "echo engine: injected error", "type": "server_error"}})),
        )
            .into_response();
    }
    let n = body["n"].as_u64().unwrap_or(1).clamp(1, 128);
    let max_tokens = body["max_tokens"].as_u64();
    let stops: Vec<&str> = match &body["stop"] {
        Value::String(s) => vec![s.as_str()],
        Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let prompt_words = prompt.split_whitespace().count() as u64;
    let mut completion_words = 0;
    // Structured output: a dry run of a task that parses the answer needs an
    // answer that parses, so the echo is the smallest value the schema allows.
    let structured = match &body["response_format"]["type"] {
        Value::String(t) if t == "json_schema" => {
            Some(minimal_value(&body["response_format"]["json_schema"]["schema"]).to_string())
        }
        Value::String(t) if t == "json_object" => Some("{}".to_string()),
        _ => None,
    };
    let seed = body["seed"].as_u64().unwrap_or(0);
    let choices: Vec<Value> = (0..n)
        .map(|index| {
            let context = ReplyContext {
                seed,
                index,
                request: k,
            };
            let scripted = (state.options.script.as_deref())
                .and_then(|script| script.answer(&prompt, context));
            let (text, reason) = match (scripted, &structured) {
                (Some(reply), _) => cut(&reply, max_tokens, &stops),
                (None, Some(value)) => (value.clone(), "stop"),
                (None, None) => {
                    let full = match context.variant() {
                        0 => prompt.clone(),
                        v => format!("{prompt} #{v}"),
                    };
                    cut(&full, max_tokens, &stops)
                }
            };
            completion_words += text.split_whitespace().count() as u64;
            if chat {
                json!({"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": reason})
            } else {
                json!({"index": index, "text": text, "finish_reason": reason})
            }
        })
        .collect();
    Json(json!({
        "id": format!("echo-{k}"),
        "object": if chat { "chat.completion" } else { "text_completion" },
        "model": body["model"].as_str().unwrap_or(&state.options.model),
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_words,
            "completion_tokens": completion_words,
            "total_tokens": prompt_words + completion_words,
        },
    }))
    .into_response()
}

/// The smallest value `schema` (a JSON Schema) allows, as far as a dry run
/// needs: every required property, the first of an `enum` or `anyOf`, a
/// `const`, numbers at their minimum, strings and arrays at their minimum
/// length.
pub fn minimal_value(schema: &Value) -> Value {
    if let Some(v) = schema.get("const") {
        return v.clone();
    }
    if let Some(first) = schema.get("enum").and_then(|e| e.get(0)) {
        return first.clone();
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(first) = schema.get(key).and_then(|e| e.get(0)) {
            return minimal_value(first);
        }
    }
    let ty = match &schema["type"] {
        Value::String(t) => t.as_str(),
        // ["string", "null"]: the first type listed.
        Value::Array(types) => types.first().and_then(Value::as_str).unwrap_or("null"),
        _ if schema.get("properties").is_some() => "object",
        _ => "null",
    };
    match ty {
        "object" => {
            let mut object = serde_json::Map::new();
            for name in schema["required"].as_array().into_iter().flatten() {
                if let Some(name) = name.as_str() {
                    object.insert(name.into(), minimal_value(&schema["properties"][name]));
                }
            }
            Value::Object(object)
        }
        "array" => {
            let len = schema["minItems"].as_u64().unwrap_or(0);
            Value::Array((0..len).map(|_| minimal_value(&schema["items"])).collect())
        }
        "string" => {
            let len = schema["minLength"].as_u64().unwrap_or(0) as usize;
            Value::String("x".repeat(len))
        }
        "integer" => json!(schema["minimum"].as_i64().unwrap_or(0)),
        "number" => json!(schema["minimum"].as_f64().unwrap_or(0.0)),
        "boolean" => json!(false),
        _ => Value::Null,
    }
}

/// Cuts `text` at the first stop sequence, then to `max_tokens` words.
fn cut(text: &str, max_tokens: Option<u64>, stops: &[&str]) -> (String, &'static str) {
    let mut reason = "stop";
    let mut out = text;
    if let Some(pos) = stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s))
        .min()
    {
        out = &text[..pos];
    }
    if let Some(max) = max_tokens {
        let words: Vec<&str> = out.split_whitespace().collect();
        if words.len() as u64 > max {
            reason = "length";
            return (words[..max as usize].join(" "), reason);
        }
    }
    (out.to_string(), reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_structured_output_request_is_answered_with_a_value_that_parses() {
        use http_body_util::BodyExt;
        let schema = json!({
            "type": "object",
            "properties": {"score": {"type": "integer", "minimum": 0}, "label": {"type": "string"}},
            "required": ["score", "label"],
        });
        let request = crate::engine::Request::chat()
            .user("Rate this.")
            .json_schema("rating", schema);
        let http = axum::http::Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(axum::body::Body::from(request.to_json().to_string()))
            .unwrap();
        let answer = tower::ServiceExt::oneshot(app(EchoOptions::default()), http)
            .await
            .unwrap();
        let bytes = answer.into_body().collect().await.unwrap().to_bytes();
        let response =
            crate::engine::Response::from_openai(serde_json::from_slice(&bytes).unwrap()).unwrap();
        #[derive(serde::Deserialize, Debug, PartialEq)]
        struct Rating {
            score: i64,
            label: String,
        }
        assert_eq!(
            response.json::<Rating>().unwrap(),
            Rating {
                score: 0,
                label: String::new()
            }
        );
    }

    async fn texts(options: EchoOptions, body: Value) -> Vec<String> {
        use http_body_util::BodyExt;
        let http = axum::http::Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body.to_string()))
            .unwrap();
        let answer = tower::ServiceExt::oneshot(app(options), http)
            .await
            .unwrap();
        let bytes = answer.into_body().collect().await.unwrap().to_bytes();
        let value: Value = serde_json::from_slice(&bytes).unwrap();
        (value["choices"].as_array().unwrap().iter())
            .map(|c| c["message"]["content"].as_str().unwrap().to_string())
            .collect()
    }

    #[tokio::test]
    async fn samples_differ_by_seed_and_by_choice_as_a_model_s_would() {
        let ask = |extra: Value| {
            let mut body = json!({"messages": [{"role": "user", "content": "Name a prime."}]});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            texts(EchoOptions::default(), body)
        };
        assert_eq!(ask(json!({})).await, ["Name a prime."]);
        assert_eq!(
            ask(json!({"n": 3})).await,
            ["Name a prime.", "Name a prime. #1", "Name a prime. #2"]
        );
        assert_eq!(ask(json!({"seed": 2})).await, ["Name a prime. #2"]);
        assert_eq!(
            ask(json!({"seed": 5, "n": 2})).await,
            ["Name a prime. #5", "Name a prime. #6"]
        );
    }

    #[tokio::test]
    async fn a_scripted_reply_is_cut_like_an_echo_and_wins_over_a_schema() {
        let options = EchoOptions {
            script: Some(Arc::new(
                script::EchoScript::reply("{pick:one two three|x} end").unwrap(),
            )),
            ..EchoOptions::default()
        };
        let body = json!({
            "messages": [{"role": "user", "content": "q"}],
            "n": 2, "max_tokens": 2,
            "response_format": {"type": "json_object"},
        });
        assert_eq!(texts(options, body).await, ["one two", "x end"]);
    }

    #[test]
    fn the_minimal_value_of_a_schema_is_valid_for_it() {
        let schema = json!({
            "type": "object",
            "properties": {
                "score": {"type": "integer", "minimum": 1, "maximum": 9},
                "label": {"type": "string", "enum": ["good", "bad"]},
                "tags": {"type": "array", "items": {"type": "string", "minLength": 2}, "minItems": 1},
                "note": {"type": ["string", "null"]},
                "nested": {"properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
                "optional": {"type": "string"}
            },
            "required": ["score", "label", "tags", "note", "nested"]
        });
        assert_eq!(
            minimal_value(&schema),
            json!({"score": 1, "label": "good", "tags": ["xx"], "note": "", "nested": {"ok": false}})
        );
        assert_eq!(
            minimal_value(&json!({"anyOf": [{"const": 3}, {"type": "string"}]})),
            json!(3)
        );
    }

    #[test]
    fn cut_stops_at_stop_sequences_then_at_max_tokens() {
        assert_eq!(cut("a b c", None, &[]), ("a b c".into(), "stop"));
        assert_eq!(cut("a b c", Some(2), &[]), ("a b".into(), "length"));
        assert_eq!(cut("a b. c", None, &["."]), ("a b".into(), "stop"));
    }
}
