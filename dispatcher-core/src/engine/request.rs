//! Typed requests to an OpenAI-compatible engine: chat and text completion.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::message::{Content, Message};

/// Which endpoint a request goes to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Body {
    /// `/v1/chat/completions`.
    Chat {
        /// The conversation so far.
        messages: Vec<Message>,
    },
    /// `/v1/completions`.
    Completion {
        /// The text to continue.
        prompt: String,
    },
}

/// A request to the model, built with chained setters:
///
/// ```
/// # mod dispatcher { pub use dispatcher_core::engine::Request; }
/// use dispatcher::Request;
/// let req = Request::chat()
///     .system("You are terse.")
///     .user("Name a prime.")
///     .temperature(0.7)
///     .max_tokens(16)
///     .extra("min_p", 0.05);
/// assert_eq!(req.to_json()["messages"][1]["content"], "Name a prime.");
/// assert_eq!(req.to_json()["min_p"], 0.05);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Chat messages or a completion prompt.
    #[serde(flatten)]
    pub body: Body,
    /// The model name; the worker fills in its engine's model when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Sampling temperature.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Maximum tokens to generate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Number of choices to generate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    /// Stop sequences.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub stop: Vec<String>,
    /// Sampling seed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Presence penalty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    /// Frequency penalty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
    /// Structured output, e.g. `{"type": "json_schema", ...}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_format: Option<Value>,
    /// Engine-specific fields sent as they are (`min_p`, `top_k`, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
    /// The worker's engine it goes to: one named by `--engine-url NAME=URL`,
    /// or the default engine when `None`. Not sent.
    #[serde(skip)]
    pub engine: Option<String>,
}

impl Request {
    fn with_body(body: Body) -> Request {
        Request {
            body,
            model: None,
            temperature: None,
            top_p: None,
            max_tokens: None,
            n: None,
            stop: Vec::new(),
            seed: None,
            presence_penalty: None,
            frequency_penalty: None,
            response_format: None,
            extra: Map::new(),
            engine: None,
        }
    }

    /// An empty chat request; add messages with [`system`](Self::system),
    /// [`user`](Self::user), [`assistant`](Self::assistant).
    pub fn chat() -> Request {
        Request::with_body(Body::Chat {
            messages: Vec::new(),
        })
    }

    /// A chat request with these messages.
    pub fn chat_messages(messages: Vec<Message>) -> Request {
        Request::with_body(Body::Chat { messages })
    }

    /// A text completion request.
    pub fn completion(prompt: impl Into<String>) -> Request {
        Request::with_body(Body::Completion {
            prompt: prompt.into(),
        })
    }

    /// Appends a message (chat requests; ignored for completions).
    pub fn message(mut self, role: &str, content: impl Into<Content>) -> Request {
        if let Body::Chat { messages } = &mut self.body {
            messages.push(Message::new(role, content));
        }
        self
    }

    /// Appends a system message.
    pub fn system(self, content: impl Into<Content>) -> Request {
        self.message("system", content)
    }

    /// Appends a user message.
    pub fn user(self, content: impl Into<Content>) -> Request {
        self.message("user", content)
    }

    /// Appends an assistant message.
    pub fn assistant(self, content: impl Into<Content>) -> Request {
        self.message("assistant", content)
    }

    /// Sends it to the engine the worker knows as `name` (`--engine-url
    /// name=URL`) instead of the default one:
    ///
    /// ```
    /// # mod dispatcher { pub use dispatcher_core::engine::Request; }
    /// use dispatcher::Request;
    /// let verdict = Request::chat().engine("judge").user("Is this answer right? ...");
    /// assert_eq!(verdict.engine.as_deref(), Some("judge"));
    /// // The engine's name is the worker's business, not the engine's.
    /// assert!(verdict.to_json().get("engine").is_none());
    /// ```
    pub fn engine(mut self, name: impl Into<String>) -> Request {
        self.engine = Some(name.into());
        self
    }

    /// Sets the model name.
    pub fn model(mut self, model: impl Into<String>) -> Request {
        self.model = Some(model.into());
        self
    }

    /// Sets the temperature.
    pub fn temperature(mut self, t: f64) -> Request {
        self.temperature = Some(t);
        self
    }

    /// Sets top-p.
    pub fn top_p(mut self, p: f64) -> Request {
        self.top_p = Some(p);
        self
    }

    /// Sets the maximum tokens to generate.
    pub fn max_tokens(mut self, n: u32) -> Request {
        self.max_tokens = Some(n);
        self
    }

    /// Sets how many choices to generate.
    pub fn n(mut self, n: u32) -> Request {
        self.n = Some(n);
        self
    }

    /// Adds a stop sequence.
    pub fn stop(mut self, s: impl Into<String>) -> Request {
        self.stop.push(s.into());
        self
    }

    /// Sets the seed.
    pub fn seed(mut self, seed: u64) -> Request {
        self.seed = Some(seed);
        self
    }

    /// Sets the presence penalty.
    pub fn presence_penalty(mut self, p: f64) -> Request {
        self.presence_penalty = Some(p);
        self
    }

    /// Sets the frequency penalty.
    pub fn frequency_penalty(mut self, p: f64) -> Request {
        self.frequency_penalty = Some(p);
        self
    }

    /// Asks for JSON that follows `schema` (OpenAI's `json_schema` response format).
    pub fn json_schema(self, name: &str, schema: Value) -> Request {
        self.json_schema_with(name, schema, true)
    }

    /// [`json_schema`](Self::json_schema) with `strict` chosen: `false` lets
    /// engines that cannot enforce every keyword of the schema take it as a
    /// hint (the OpenAI API's `strict: false`).
    pub fn json_schema_with(mut self, name: &str, schema: Value, strict: bool) -> Request {
        self.response_format = Some(serde_json::json!({
            "type": "json_schema",
            "json_schema": {"name": name, "schema": schema, "strict": strict},
        }));
        self
    }

    /// [`json_schema`](Self::json_schema) with the schema derived from the
    /// type the answer is parsed into (`#[derive(schemars::JsonSchema)]`),
    /// named after it: the schema and the `json::<T>()` that reads the answer
    /// cannot drift apart. With the `schemars` feature of `dispatcher`.
    #[cfg(feature = "schemars")]
    pub fn json_schema_for<T: schemars::JsonSchema>(self) -> Request {
        let schema = schemars::SchemaGenerator::default().into_root_schema_for::<T>();
        let name = T::schema_name();
        self.json_schema(
            &name,
            serde_json::to_value(schema).expect("a schema serializes"),
        )
    }

    /// Sets an engine-specific field, sent as it is.
    pub fn extra(mut self, key: impl Into<String>, value: impl Into<Value>) -> Request {
        self.extra.insert(key.into(), value.into());
        self
    }

    /// Adds a message to a chat (a [`Response`](crate::engine::Response)
    /// becomes the assistant's turn), so a conversation grows in a loop:
    ///
    /// ```
    /// # mod dispatcher { pub use dispatcher_core::engine::{Message, Request, Response}; }
    /// use dispatcher::{Message, Request};
    /// # let answer = dispatcher_core::task::testing::reply("Paris.");
    /// let mut chat = Request::chat().user("Capital of France?");
    /// // let answer = yield_request!(chat.clone())?;
    /// chat.push(&answer);
    /// chat.push(Message::user("Are you sure?"));
    /// assert_eq!(chat.to_json()["messages"][1]["content"], "Paris.");
    /// assert_eq!(chat.to_json()["messages"][2]["role"], "user");
    /// ```
    ///
    /// On a completion request the message's text is appended to the prompt.
    pub fn push(&mut self, message: impl Into<Message>) -> &mut Request {
        let message = message.into();
        match &mut self.body {
            Body::Chat { messages } => messages.push(message),
            Body::Completion { prompt } => prompt.push_str(&message.content.text()),
        }
        self
    }

    /// Whether this is a chat request.
    pub fn is_chat(&self) -> bool {
        matches!(self.body, Body::Chat { .. })
    }

    /// The endpoint path under the engine's API base (`.../v1`).
    pub fn endpoint(&self) -> &'static str {
        if self.is_chat() {
            "/chat/completions"
        } else {
            "/completions"
        }
    }

    /// The JSON body sent to the engine.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("a request serializes")
    }
}

#[cfg(all(test, feature = "schemars"))]
mod schemars_tests {
    use super::*;

    #[derive(schemars::JsonSchema, serde::Deserialize)]
    #[allow(dead_code)]
    struct Rating {
        /// From 0 to 9.
        score: u8,
        label: String,
    }

    #[test]
    fn a_schema_derived_from_the_answer_type_is_sent_strict_and_named_after_it() {
        let req = Request::chat().user("rate").json_schema_for::<Rating>();
        let format = &req.to_json()["response_format"];
        assert_eq!(format["type"], "json_schema");
        assert_eq!(format["json_schema"]["name"], "Rating");
        assert_eq!(format["json_schema"]["strict"], true);
        let schema = &format["json_schema"]["schema"];
        assert_eq!(schema["properties"]["score"]["type"], "integer");
        assert_eq!(schema["required"], serde_json::json!(["score", "label"]));
        // And the echo engine answers it with a value that reads back.
        let value = crate::engine::echo::minimal_value(schema);
        let _: Rating = serde_json::from_value(value).unwrap();
    }
}
