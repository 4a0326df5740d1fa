//! Responses from the engine, and the errors a request can end in.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Token counts the engine reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Tokens generated.
    #[serde(default)]
    pub completion_tokens: u64,
    /// Their sum.
    #[serde(default)]
    pub total_tokens: u64,
}

/// One generated choice: everything the engine said of it that a task may
/// read typed; the rest is in [`Response::raw`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    /// Its position among the choices.
    #[serde(default)]
    pub index: u32,
    /// The generated text; empty where the engine gave none, which
    /// [`text_missing`](Choice::text_missing) tells apart from an empty text.
    pub text: String,
    /// The engine gave no text at all (`"content": null`): a reasoning model
    /// cut at `max_tokens` while it was still thinking, or an answer that is
    /// only tool calls.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub text_missing: bool,
    /// The model's reasoning, where the engine returns it beside the text
    /// (`reasoning_content`, as vLLM's and SGLang's reasoning parsers and
    /// llama.cpp write it, or `reasoning`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    /// The log-probabilities of the generated tokens, where the request asked
    /// for them (`logprobs`, `top_logprobs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// The tool calls the model made, as the engine wrote them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// Why generation stopped (`stop`, `length`, ...).
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// What stopped it, where the engine says (vLLM's `stop_reason`: the
    /// stop string, or the id of the stop token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<serde_json::Value>,
}

/// A generated token and how likely it was.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The token as text.
    pub token: String,
    /// Its log-probability (natural logarithm).
    pub logprob: f64,
    /// Its bytes, where the engine gives them (a token may be part of a
    /// character).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<Vec<u8>>,
    /// The most likely tokens at its place, the most likely first (as many
    /// as `top_logprobs` asked for).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<TopLogprob>,
}

/// One of the most likely tokens at a place.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    /// The token as text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f64,
    /// Its bytes, where the engine gives them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<Vec<u8>>,
}

/// A successful answer of the engine: its choices read into types, and the
/// whole answer as it came ([`raw`](Response::raw)), so that a field no type
/// names is still there.
///
/// It is written (to a task's journal, by serde) as the engine's own JSON,
/// and read back from it, so a replayed answer is the answer, field for
/// field.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Response {
    /// The model that answered.
    pub model: String,
    /// The choices, in index order (at least one).
    pub choices: Vec<Choice>,
    /// Token counts, when the engine reports them.
    pub usage: Option<Usage>,
    /// The answer's JSON as the engine sent it; `None` for a response made
    /// otherwise (a test's), whose [`raw`](Response::raw) is built from the
    /// fields.
    pub body: Option<serde_json::Value>,
}

/// A response's text could not be read as the JSON type asked for.
#[derive(Debug, thiserror::Error)]
#[error("the model's answer is not the JSON expected ({source}): {text:?}")]
pub struct JsonError {
    /// The text that did not parse (first choice).
    pub text: String,
    /// Why.
    pub source: serde_json::Error,
}

impl Response {
    /// The first choice's text.
    pub fn text(&self) -> &str {
        self.choices.first().map_or("", |c| c.text.as_str())
    }

    /// The first choice's text; `None` where the engine gave none (see
    /// [`Choice::text_missing`]).
    pub fn content(&self) -> Option<&str> {
        self.choices
            .first()
            .filter(|c| !c.text_missing)
            .map(|c| c.text.as_str())
    }

    /// Every choice's text, in index order.
    pub fn texts(&self) -> Vec<&str> {
        self.choices.iter().map(|c| c.text.as_str()).collect()
    }

    /// The first choice's reasoning, where the engine returned one.
    pub fn reasoning(&self) -> Option<&str> {
        self.choices.first().and_then(|c| c.reasoning.as_deref())
    }

    /// The first choice's token log-probabilities, where asked for.
    pub fn logprobs(&self) -> Option<&[TokenLogprob]> {
        self.choices.first().and_then(|c| c.logprobs.as_deref())
    }

    /// The first choice's finish reason.
    pub fn finish_reason(&self) -> Option<&str> {
        self.choices
            .first()
            .and_then(|c| c.finish_reason.as_deref())
    }

    /// The whole answer as JSON: the engine's own, or, for a response made
    /// otherwise, a chat completion built from the fields.
    pub fn raw(&self) -> serde_json::Value {
        match &self.body {
            Some(body) => body.clone(),
            None => self.built(),
        }
    }

    /// A chat completion of the fields.
    fn built(&self) -> serde_json::Value {
        let choices: Vec<serde_json::Value> = self
            .choices
            .iter()
            .map(|c| {
                let mut message = serde_json::json!({
                    "role": "assistant",
                    "content": if c.text_missing { serde_json::Value::Null } else { c.text.clone().into() },
                });
                if let Some(r) = &c.reasoning {
                    message["reasoning_content"] = r.clone().into();
                }
                if let Some(t) = &c.tool_calls {
                    message["tool_calls"] = t.clone();
                }
                let mut choice = serde_json::json!({
                    "index": c.index,
                    "message": message,
                    "finish_reason": c.finish_reason,
                });
                if let Some(lp) = &c.logprobs {
                    choice["logprobs"] = serde_json::json!({ "content": lp.iter().map(TokenLogprob::to_openai).collect::<Vec<_>>() });
                }
                choice
            })
            .collect();
        serde_json::json!({
            "object": "chat.completion",
            "model": self.model,
            "choices": choices,
            "usage": self.usage,
        })
    }

    /// Parses the first choice's text as JSON (for `response_format` requests).
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, JsonError> {
        serde_json::from_str(self.text()).map_err(|source| JsonError {
            text: self.text().to_string(),
            source,
        })
    }

    /// Reads an OpenAI-compatible chat or completion answer, keeping it.
    pub fn from_openai(v: serde_json::Value) -> Result<Response, String> {
        let choices = v["choices"]
            .as_array()
            .ok_or_else(|| format!("no \"choices\" array in {}", snippet(&v)))?;
        let mut out: Vec<Choice> = choices
            .iter()
            .enumerate()
            .map(|(i, c)| choice(i, c))
            .collect();
        if out.is_empty() {
            return Err(format!("an empty \"choices\" array in {}", snippet(&v)));
        }
        out.sort_by_key(|c| c.index);
        Ok(Response {
            model: v["model"].as_str().unwrap_or_default().to_string(),
            choices: out,
            usage: serde_json::from_value(v["usage"].clone()).ok(),
            body: Some(v),
        })
    }
}

/// The start of a JSON value, for an error message: cut short, control
/// characters escaped (it is the engine's text).
fn snippet(v: &serde_json::Value) -> String {
    crate::text::escaped(&v.to_string(), 300)
}

/// Choice `i` of a chat (`message`) or completion (`text`) answer.
fn choice(i: usize, c: &serde_json::Value) -> Choice {
    let message = &c["message"];
    let text = message["content"].as_str().or_else(|| c["text"].as_str());
    let reasoning = message["reasoning_content"]
        .as_str()
        .or_else(|| message["reasoning"].as_str())
        .map(String::from);
    Choice {
        index: c["index"].as_u64().unwrap_or(i as u64) as u32,
        text: text.unwrap_or_default().to_string(),
        text_missing: text.is_none(),
        reasoning,
        logprobs: logprobs(&c["logprobs"]),
        tool_calls: Some(message["tool_calls"].clone()).filter(|t| !t.is_null()),
        finish_reason: c["finish_reason"].as_str().map(String::from),
        stop_reason: Some(c["stop_reason"].clone()).filter(|r| !r.is_null()),
    }
}

/// A choice's `logprobs`: the chat form (`{"content": [{"token", "logprob",
/// "bytes", "top_logprobs": [...]}]}`) or the completion form (`{"tokens",
/// "token_logprobs", "top_logprobs": [{token: logprob}]}`).
fn logprobs(v: &serde_json::Value) -> Option<Vec<TokenLogprob>> {
    if let Some(content) = v["content"].as_array() {
        return Some(
            content
                .iter()
                .map(|t| {
                    let mut top: Vec<TopLogprob> = t["top_logprobs"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|a| TopLogprob {
                            token: a["token"].as_str().unwrap_or_default().to_string(),
                            logprob: a["logprob"].as_f64().unwrap_or(f64::NEG_INFINITY),
                            bytes: bytes(&a["bytes"]),
                        })
                        .collect();
                    // vLLM lists the sampled token first, likeliest or not.
                    top.sort_by(|a, b| b.logprob.total_cmp(&a.logprob));
                    TokenLogprob {
                        token: t["token"].as_str().unwrap_or_default().to_string(),
                        logprob: t["logprob"].as_f64().unwrap_or(f64::NEG_INFINITY),
                        bytes: bytes(&t["bytes"]),
                        top,
                    }
                })
                .collect(),
        );
    }
    let tokens = v["tokens"].as_array()?;
    let lps = v["token_logprobs"].as_array();
    let tops = v["top_logprobs"].as_array();
    Some(
        tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let mut top: Vec<TopLogprob> = tops
                    .and_then(|t| t.get(i))
                    .and_then(serde_json::Value::as_object)
                    .into_iter()
                    .flatten()
                    .map(|(token, lp)| TopLogprob {
                        token: token.clone(),
                        logprob: lp.as_f64().unwrap_or(f64::NEG_INFINITY),
                        bytes: None,
                    })
                    .collect();
                top.sort_by(|a, b| b.logprob.total_cmp(&a.logprob));
                TokenLogprob {
                    token: t.as_str().unwrap_or_default().to_string(),
                    logprob: lps
                        .and_then(|l| l.get(i))
                        .and_then(serde_json::Value::as_f64)
                        .unwrap_or(f64::NEG_INFINITY),
                    bytes: None,
                    top,
                }
            })
            .collect(),
    )
}

fn bytes(v: &serde_json::Value) -> Option<Vec<u8>> {
    v.as_array()?
        .iter()
        .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
        .collect()
}

impl TokenLogprob {
    /// The chat form of one entry.
    fn to_openai(&self) -> serde_json::Value {
        serde_json::json!({
            "token": self.token,
            "logprob": self.logprob,
            "bytes": self.bytes,
            "top_logprobs": self.top.iter().map(|t| serde_json::json!({
                "token": t.token, "logprob": t.logprob, "bytes": t.bytes,
            })).collect::<Vec<_>>(),
        })
    }
}

// Written and read as the engine's JSON: a journal replays the answer whole.
impl Serialize for Response {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.body {
            Some(body) => body.serialize(s),
            None => self.built().serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Response {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Response, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        Response::from_openai(v).map_err(serde::de::Error::custom)
    }
}

/// Why a request to the engine did not give a response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The engine refused the request (a 4xx: over the context length, a bad
    /// parameter). Retrying the same request will not help; the task decides.
    #[error("the engine refused the request ({status}): {message}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// The engine's message.
        message: String,
    },
    /// The engine failed or could not be reached even after retries. The worker
    /// treats this as the engine being down: it releases its items and exits.
    #[error("the engine is unavailable: {0}")]
    Unavailable(String),
    /// The engine answered something that is not an OpenAI-compatible response.
    #[error("the engine's answer could not be read: {0}")]
    Malformed(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_reasoning_answer_keeps_its_trace_and_tells_no_text_from_empty() {
        let cut = Response::from_openai(json!({
            "model": "r1", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": null,
                 "reasoning_content": "Let me think about 2+2"}, "finish_reason": "length"},
                {"index": 1, "message": {"role": "assistant", "content": "",
                 "reasoning": "short"}, "finish_reason": "stop"},
            ]
        }))
        .unwrap();
        assert_eq!(cut.content(), None);
        assert!(cut.choices[0].text_missing);
        assert_eq!(cut.reasoning(), Some("Let me think about 2+2"));
        assert!(!cut.choices[1].text_missing, "an empty text is a text");
        assert_eq!(cut.choices[1].reasoning.as_deref(), Some("short"));
    }

    #[test]
    fn log_probabilities_are_read_in_the_chat_and_the_completion_form() {
        let chat = Response::from_openai(json!({"model": "m", "choices": [{"index": 0,
            "message": {"role": "assistant", "content": "Yes"},
            "logprobs": {"content": [{"token": "Yes", "logprob": -0.01, "bytes": [89, 101, 115],
                "top_logprobs": [{"token": "Yes", "logprob": -0.01, "bytes": [89, 101, 115]},
                                 {"token": "No", "logprob": -4.6, "bytes": [78, 111]}]}]},
            "finish_reason": "stop"}]}))
        .unwrap();
        let lp = chat.logprobs().unwrap();
        assert_eq!(lp[0].token, "Yes");
        assert_eq!(lp[0].bytes.as_deref(), Some(&b"Yes"[..]));
        assert_eq!(lp[0].top[1].token, "No");
        assert_eq!(lp[0].top[1].logprob, -4.6);
        let completion = Response::from_openai(json!({"model": "m", "choices": [{"index": 0,
            "text": " Yes", "logprobs": {"tokens": [" Yes"], "token_logprobs": [-0.2],
            "top_logprobs": [{" No": -3.0, " Yes": -0.2}], "text_offset": [0]},
            "finish_reason": "stop"}]}))
        .unwrap();
        let lp = completion.logprobs().unwrap();
        assert_eq!((lp[0].token.as_str(), lp[0].logprob), (" Yes", -0.2));
        let top: Vec<&str> = lp[0].top.iter().map(|t| t.token.as_str()).collect();
        assert_eq!(top, [" Yes", " No"], "the most likely first");
        assert_eq!(
            Response::from_openai(json!({"model": "m", "choices": [{"text": "x"}]}))
                .unwrap()
                .logprobs(),
            None
        );
    }

    #[test]
    fn an_answer_is_written_and_read_back_as_the_engines_json_whole() {
        let body = json!({"id": "chatcmpl-1", "model": "m", "system_fingerprint": "fp",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": null,
                "reasoning_content": "hmm", "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "f", "arguments": "{}"}}]}, "finish_reason": "tool_calls",
                "stop_reason": 128}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
            "kv_transfer_params": null});
        let r = Response::from_openai(body.clone()).unwrap();
        assert_eq!(r.raw(), body, "a field no type names is there");
        assert_eq!(r.choices[0].stop_reason, Some(json!(128)));
        assert_eq!(
            r.choices[0].tool_calls.as_ref().unwrap()[0]["function"]["name"],
            "f"
        );
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&text).unwrap(),
            body
        );
        let back: Response = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        // A response made otherwise (a test's) round-trips through its
        // built form; so does a journal entry of the older typed form.
        let made = Response {
            model: "m".into(),
            choices: vec![Choice {
                text: "hi".into(),
                reasoning: Some("why".into()),
                finish_reason: Some("stop".into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let back: Response = serde_json::from_value(serde_json::to_value(&made).unwrap()).unwrap();
        assert_eq!((back.text(), back.reasoning()), ("hi", Some("why")));
        let old: Response = serde_json::from_value(json!({"model": "m", "choices":
            [{"index": 0, "text": "old", "finish_reason": "stop"}], "usage": null}))
        .unwrap();
        assert_eq!(old.text(), "old");
    }
}
