//! Chat messages as the chat API holds them: content as text or as a list of
//! parts (text, images, audio, and parts no type here names, passed through
//! untouched), a speaker's `name`, an assistant's tool calls and reasoning,
//! a tool's answer to a call.

use std::borrow::Cow;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// One chat message.
///
/// ```
/// # mod dispatcher { pub use dispatcher_core::engine::{Message, Part}; }
/// use dispatcher::{Message, Part};
/// let plain = Message::user("Name a prime.");
/// assert_eq!(plain.content.as_str(), "Name a prime.");
/// let with_image = Message::user(vec![
///     Part::text("What is in this picture?"),
///     Part::image_url("https://example.com/cat.png"),
/// ]);
/// assert_eq!(with_image.content.text(), "What is in this picture?");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, `tool`, ...
    pub role: String,
    /// Its text, or its parts. An assistant's turn that is only tool calls
    /// has none (`null` on the wire).
    #[serde(default)]
    pub content: Content,
    /// The speaker's name, where several share a role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An assistant's tool calls, as the engine wrote them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Value>,
    /// A `tool` message: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// An assistant's reasoning, where a conversation carries it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
}

/// A message's content: text, or a list of parts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Parts (`{"type": "text", "text": ..}`, `{"type": "image_url", ..}`,
    /// `{"type": "input_audio", ..}`, ...), each sent as it is.
    Parts(Vec<Value>),
    /// None: an assistant's turn of tool calls only.
    #[default]
    None,
}

impl Content {
    /// The text of plain content; of parts, the first text part's; of none,
    /// `""`. [`text`](Content::text) joins every text part.
    pub fn as_str(&self) -> &str {
        match self {
            Content::Text(text) => text,
            Content::Parts(parts) => parts
                .iter()
                .find_map(|p| (p["type"] == "text").then(|| p["text"].as_str()).flatten())
                .unwrap_or(""),
            Content::None => "",
        }
    }

    /// All its text: plain content, or its text parts joined by newlines.
    pub fn text(&self) -> Cow<'_, str> {
        match self {
            Content::Text(text) => Cow::Borrowed(text),
            Content::Parts(parts) => Cow::Owned(
                parts
                    .iter()
                    .filter(|p| p["type"] == "text")
                    .filter_map(|p| p["text"].as_str())
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
            Content::None => Cow::Borrowed(""),
        }
    }

    /// Parts that are not text (images, audio, ...).
    pub fn other_parts(&self) -> usize {
        match self {
            Content::Parts(parts) => parts.iter().filter(|p| p["type"] != "text").count(),
            _ => 0,
        }
    }
}

impl From<String> for Content {
    fn from(text: String) -> Content {
        Content::Text(text)
    }
}

impl From<&str> for Content {
    fn from(text: &str) -> Content {
        Content::Text(text.to_string())
    }
}

impl From<&String> for Content {
    fn from(text: &String) -> Content {
        Content::Text(text.clone())
    }
}

impl From<Vec<Value>> for Content {
    fn from(parts: Vec<Value>) -> Content {
        Content::Parts(parts)
    }
}

/// Builders of content parts.
#[derive(Debug, Clone, Copy)]
pub struct Part;

/// The largest image file [`Part::image_file`] takes by default: 20 MiB,
/// the limit of the common hosted APIs.
pub const DEFAULT_MAX_IMAGE_BYTES: u64 = 20 << 20;

/// Why an image file could not become a part.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// It could not be read.
    #[error("{path}: could not read the image: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// It is larger than the limit.
    #[error("{path}: the image is {bytes} bytes, over the limit of {limit} (raise it, or make the image smaller)")]
    TooLarge {
        /// The file.
        path: String,
        /// Its size.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// Its type is not one of the image types the chat API takes.
    #[error("{path}: not a PNG, JPEG, GIF or WebP image (by its first bytes)")]
    NotAnImage {
        /// The file.
        path: String,
    },
}

impl Part {
    /// A text part.
    pub fn text(text: impl Into<String>) -> Value {
        json!({"type": "text", "text": text.into()})
    }

    /// An image by URL (`https://...` or a `data:` URL).
    pub fn image_url(url: impl Into<String>) -> Value {
        json!({"type": "image_url", "image_url": {"url": url.into()}})
    }

    /// An image from a file, sent inline as a `data:` URL: PNG, JPEG, GIF or
    /// WebP (told by its first bytes), at most `max_bytes`.
    pub fn image_file(path: impl AsRef<Path>, max_bytes: u64) -> Result<Value, ImageError> {
        use base64::Engine as _;
        let path = path.as_ref();
        let name = || path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| ImageError::Read {
            path: name(),
            source,
        })?;
        if meta.len() > max_bytes {
            return Err(ImageError::TooLarge {
                path: name(),
                bytes: meta.len(),
                limit: max_bytes,
            });
        }
        let bytes = std::fs::read(path).map_err(|source| ImageError::Read {
            path: name(),
            source,
        })?;
        let mime = image_type(&bytes).ok_or_else(|| ImageError::NotAnImage { path: name() })?;
        let data = base64::engine::general_purpose::STANDARD.encode(&bytes);
        Ok(Part::image_url(format!("data:{mime};base64,{data}")))
    }

    /// Audio, inline: `data` base64-encoded, `format` `wav` or `mp3`.
    pub fn input_audio(data: impl Into<String>, format: impl Into<String>) -> Value {
        json!({"type": "input_audio", "input_audio": {"data": data.into(), "format": format.into()}})
    }
}

/// The MIME type of an image by its first bytes.
fn image_type(bytes: &[u8]) -> Option<&'static str> {
    match bytes {
        [0x89, b'P', b'N', b'G', ..] => Some("image/png"),
        [0xff, 0xd8, 0xff, ..] => Some("image/jpeg"),
        [b'G', b'I', b'F', b'8', ..] => Some("image/gif"),
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => Some("image/webp"),
        _ => None,
    }
}

impl Message {
    /// A message with `role` and `content` (text, or parts).
    pub fn new(role: impl Into<String>, content: impl Into<Content>) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
            name: None,
            tool_calls: None,
            tool_call_id: None,
            reasoning_content: None,
        }
    }

    /// A `user` message.
    pub fn user(content: impl Into<Content>) -> Message {
        Message::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<Content>) -> Message {
        Message::new("assistant", content)
    }

    /// A `system` message.
    pub fn system(content: impl Into<Content>) -> Message {
        Message::new("system", content)
    }

    /// A `tool` message: the result of the call `tool_call_id`.
    pub fn tool(tool_call_id: impl Into<String>, content: impl Into<Content>) -> Message {
        Message {
            tool_call_id: Some(tool_call_id.into()),
            ..Message::new("tool", content)
        }
    }

    /// The same message, said by `name`.
    pub fn name(mut self, name: impl Into<String>) -> Message {
        self.name = Some(name.into());
        self
    }
}

/// A response as the next turn of the conversation: an `assistant` message
/// with its (first choice's) text, or none, and its tool calls.
impl From<&crate::engine::Response> for Message {
    fn from(response: &crate::engine::Response) -> Message {
        let first = response.choices.first();
        let content = match first {
            Some(c) if c.text_missing => Content::None,
            _ => Content::Text(response.text().to_string()),
        };
        Message {
            tool_calls: first.and_then(|c| c.tool_calls.clone()),
            ..Message::assistant(content)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_go_out_as_the_chat_api_holds_them() {
        let plain = serde_json::to_value(Message::user("hi")).unwrap();
        assert_eq!(
            plain,
            json!({"role": "user", "content": "hi"}),
            "no extra keys"
        );
        let parts = Message::user(vec![
            Part::text("look"),
            Part::image_url("data:image/png;base64,AAAA"),
            json!({"type": "video_url", "video_url": {"url": "v.mp4"}, "fps": 2}),
        ])
        .name("ann");
        let wire = serde_json::to_value(&parts).unwrap();
        assert_eq!(wire["content"][2]["fps"], 2, "a part no type names is kept");
        assert_eq!(wire["name"], "ann");
        let back: Message = serde_json::from_value(wire).unwrap();
        assert_eq!(back, parts);
        assert_eq!(
            (back.content.text().as_ref(), back.content.other_parts()),
            ("look", 2)
        );
        let tool = serde_json::to_value(Message::tool("call_1", "42")).unwrap();
        assert_eq!(
            tool,
            json!({"role": "tool", "content": "42", "tool_call_id": "call_1"})
        );
        let calls: Message = serde_json::from_value(json!({"role": "assistant", "content": null,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}))
        .unwrap();
        assert_eq!(calls.content, Content::None);
        assert_eq!(
            serde_json::to_value(&calls).unwrap()["content"],
            Value::Null
        );
    }

    #[test]
    fn an_image_file_becomes_a_data_url_within_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("a.png");
        std::fs::write(&png, [0x89, b'P', b'N', b'G', 13, 10, 26, 10, 0, 0]).unwrap();
        let part = Part::image_file(&png, 1 << 20).unwrap();
        assert_eq!(
            part["image_url"]["url"],
            "data:image/png;base64,iVBORw0KGgoAAA=="
        );
        let e = Part::image_file(&png, 4).unwrap_err().to_string();
        assert!(
            e.contains("a.png") && e.contains("over the limit of 4"),
            "{e}"
        );
        let txt = dir.path().join("a.txt");
        std::fs::write(&txt, "hello").unwrap();
        let e = Part::image_file(&txt, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("not a PNG"), "{e}");
        let e = Part::image_file(dir.path().join("none.png"), 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("none.png") && e.contains("could not read"),
            "{e}"
        );
    }
}
