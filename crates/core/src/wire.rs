//! OpenAI chat-completions wire types.
//!
//! The gateway reads the fields it acts on (`model`, `messages`, `stream`, `stream_options`,
//! token limits) and keeps every other field in `extra`, so that `tools`, `response_format`,
//! `seed`, `logprobs` and whatever OpenAI adds next pass through to the upstream untouched.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `POST /v1/chat/completions` request body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u64>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatRequest {
    /// A request with just a model and messages; handy for chains and tests.
    pub fn new(model: impl Into<String>, messages: Vec<Message>) -> Self {
        Self {
            model: model.into(),
            messages,
            stream: None,
            stream_options: None,
            max_tokens: None,
            max_completion_tokens: None,
            extra: Map::new(),
        }
    }

    pub fn is_stream(&self) -> bool {
        self.stream == Some(true)
    }

    /// How many choices the client asked for (`n`, 1 when absent or not a positive number).
    pub fn choices_asked(&self) -> u64 {
        self.extra
            .get("n")
            .and_then(Value::as_u64)
            .unwrap_or(1)
            .max(1)
    }

    /// The conversation with `system` as its system prompt: the client's own system messages
    /// are replaced, every other message is kept in order.
    pub fn messages_with_system(&self, system: impl Into<String>) -> Vec<Message> {
        std::iter::once(Message::system(system))
            .chain(self.messages.iter().filter(|m| m.role != "system").cloned())
            .collect()
    }

    /// Whether the client asked for a final usage chunk on a stream.
    pub fn wants_stream_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }
}

/// `stream_options` of a chat request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One chat message. `content` is a string or an array of content parts (text, image, audio…);
/// parts are kept as JSON so that every part type passes through.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    /// Absent stays absent and `null` stays `null` (assistant tool-call messages send it).
    #[serde(
        default,
        deserialize_with = "present_content",
        skip_serializing_if = "Option::is_none"
    )]
    pub content: Option<Content>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: Some(Content::Text(content.into())),
            extra: Map::new(),
        }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }

    /// The message's text: the string content, or its text parts joined together.
    pub fn text(&self) -> String {
        self.content.as_ref().map(Content::text).unwrap_or_default()
    }
}

/// Message content: a plain string or a list of typed parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Value>),
    /// An explicit `"content": null`.
    Null,
}

/// A present `content` field, `null` included (serde's `Option` would turn `null` into absent).
fn present_content<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Content>, D::Error> {
    Content::deserialize(deserializer).map(Some)
}

impl Content {
    /// The text of the content; for parts, the `text` of every `{"type":"text"}` part joined.
    pub fn text(&self) -> String {
        match self {
            Content::Text(text) => text.clone(),
            Content::Parts(parts) => parts
                .iter()
                .filter(|part| part.get("type").and_then(Value::as_str) == Some("text"))
                .filter_map(|part| part.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(""),
            Content::Null => String::new(),
        }
    }
}

/// Token usage of a completion.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Usage {
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
            extra: Map::new(),
        }
    }

    /// Adds another call's counts to these.
    /// (Counts come from upstreams: saturating, never overflowing.)
    pub fn add(&mut self, other: &Usage) {
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(other.completion_tokens);
        self.total_tokens = self.total_tokens.saturating_add(other.total_tokens);
    }
}

/// A `chat.completion` object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatResponse {
    #[serde(default)]
    pub id: String,
    #[serde(default = "chat_completion_object")]
    pub object: String,
    #[serde(default)]
    pub created: u64,
    #[serde(default)]
    pub model: String,
    pub choices: Vec<Choice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatResponse {
    /// A one-choice assistant reply.
    pub fn assistant(
        id: impl Into<String>,
        model: impl Into<String>,
        created: u64,
        text: impl Into<String>,
        usage: Usage,
    ) -> Self {
        Self {
            id: id.into(),
            object: chat_completion_object(),
            created,
            model: model.into(),
            choices: vec![Choice {
                index: 0,
                message: Message::assistant(text),
                finish_reason: Some("stop".to_owned()),
                extra: Map::new(),
            }],
            usage: Some(usage),
            extra: Map::new(),
        }
    }

    /// The text of the first choice's message (empty when there is none).
    pub fn text(&self) -> String {
        self.choices
            .first()
            .map(|c| c.message.text())
            .unwrap_or_default()
    }
}

/// A chat completion as JSON, with the token usage read out of it: what a route endpoint sends
/// its client. An upstream's body is passed on as it came, without decoding it into a
/// [`ChatResponse`] and encoding it again.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionBody {
    pub json: bytes::Bytes,
    pub usage: Option<Usage>,
}

impl CompletionBody {
    pub fn encode(response: &ChatResponse) -> Self {
        Self {
            // A `ChatResponse` is maps, strings and numbers: encoding it cannot fail.
            json: serde_json::to_vec(response).unwrap_or_default().into(),
            usage: response.usage.clone(),
        }
    }

    /// Checks that `json` is a chat completion (an object whose `choices` each have a `message`
    /// with a `role`) and reads its usage; every other field is skipped, not decoded.
    pub fn parse(json: bytes::Bytes) -> Result<Self, serde_json::Error> {
        #[derive(Deserialize)]
        struct Completion {
            #[allow(dead_code)]
            choices: Vec<ChoiceShape>,
            #[serde(default)]
            usage: Option<Counts>,
        }
        #[derive(Deserialize)]
        struct ChoiceShape {
            #[allow(dead_code)]
            message: MessageShape,
        }
        #[derive(Deserialize)]
        struct MessageShape {
            #[allow(dead_code)]
            role: serde::de::IgnoredAny,
        }
        // `from_slice`, not `json_from_bytes`: the strings skipped here (the content above all)
        // are not checked as UTF-8 by serde_json, so checking the whole body first would cost
        // more than it saves on answers of a few KB.
        let completion: Completion = serde_json::from_slice(&json)?;
        Ok(Self {
            json,
            usage: completion.usage.map(Counts::into_usage),
        })
    }
}

/// One chunk of a stream as JSON, with what the gateway reads out of it: what a route endpoint
/// sends its client as one SSE event. An upstream's chunk is passed on as it came, like a
/// [`CompletionBody`] (decoding every chunk into a [`ChatChunk`] and encoding it again was a
/// third of the instructions of a proxied stream).
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkBody {
    pub json: String,
    /// Whether it carries choices; the usage chunk at the end of a stream has none.
    pub has_choices: bool,
    /// The choices that finish in it (have a `finish_reason`), as a set of their indexes:
    /// bit `i` for choice `i` (OpenAI's `n` goes to 128).
    pub finished: u128,
    pub usage: Option<Usage>,
}

impl ChunkBody {
    pub fn encode(chunk: &ChatChunk) -> Self {
        Self {
            // A `ChatChunk` is maps, strings and numbers: encoding it cannot fail.
            json: serde_json::to_string(chunk).unwrap_or_default(),
            has_choices: !chunk.choices.is_empty(),
            finished: chunk.finished_choices(),
            usage: chunk.usage.clone(),
        }
    }

    /// Checks that `json` is a chunk (an object with an array of `choices`, or none, and no
    /// `error`: some servers send an error object mid-stream) and reads its usage; every other
    /// field is skipped, not decoded. What is not a chunk is handed back, for the error message.
    pub fn parse(json: String) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Chunk {
            #[serde(default)]
            choices: Choices,
            #[serde(default)]
            usage: Option<Counts>,
            #[serde(default)]
            error: Option<serde::de::IgnoredAny>,
        }
        match serde_json::from_str::<Chunk>(&json) {
            Ok(chunk) if chunk.error.is_none() => Ok(Self {
                has_choices: chunk.choices.any,
                finished: chunk.choices.finished,
                usage: chunk.usage.map(Counts::into_usage),
                json,
            }),
            _ => Err(json),
        }
    }

    /// The content text the chunk adds to its first choice (decoded on demand: for
    /// `log_payloads`).
    pub fn text(&self) -> String {
        serde_json::from_str::<ChatChunk>(&self.json)
            .map(|chunk| chunk.text().to_owned())
            .unwrap_or_default()
    }
}

/// What a chunk's `choices` array holds, read without keeping it (no allocation per chunk):
/// whether it has any choice, and which of them have a `finish_reason` (bit `i` for index `i`).
#[derive(Default)]
struct Choices {
    any: bool,
    finished: u128,
}

impl<'de> Deserialize<'de> for Choices {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Choice {
            // Absent or `null` is choice 0 (what the one choice of most streams is).
            #[serde(default)]
            index: Option<u64>,
            #[serde(default)]
            finish_reason: Option<serde::de::IgnoredAny>,
        }
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Choices;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an array of choices")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Choices, A::Error> {
                let mut choices = Choices::default();
                while let Some(choice) = seq.next_element::<Choice>()? {
                    choices.any = true;
                    if choice.finish_reason.is_some() {
                        choices.finished |= index_bit(choice.index.unwrap_or(0));
                    }
                }
                Ok(choices)
            }
        }
        deserializer.deserialize_seq(Visitor)
    }
}

/// The token counts of a `usage` object, read without its other fields.
#[derive(Deserialize)]
struct Counts {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

impl Counts {
    fn into_usage(self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: self.total_tokens,
            extra: Map::new(),
        }
    }
}

fn chat_completion_object() -> String {
    "chat.completion".to_owned()
}

fn chat_completion_chunk_object() -> String {
    "chat.completion.chunk".to_owned()
}

/// One choice of a `chat.completion`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    #[serde(default)]
    pub index: u32,
    pub message: Message,
    #[serde(default)]
    pub finish_reason: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A `chat.completion.chunk` object, one SSE frame of a stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChunk {
    #[serde(default)]
    pub id: String,
    #[serde(default = "chat_completion_chunk_object")]
    pub object: String,
    #[serde(default)]
    pub created: u64,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub choices: Vec<ChunkChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Choice `index` in a set of choices (indexes past 127 share the last bit).
fn index_bit(index: u64) -> u128 {
    1 << index.min(127)
}

impl ChatChunk {
    /// A chunk carrying one choice's delta.
    pub fn delta(
        id: impl Into<String>,
        model: impl Into<String>,
        created: u64,
        delta: Delta,
        finish_reason: Option<&str>,
    ) -> Self {
        Self {
            id: id.into(),
            object: chat_completion_chunk_object(),
            created,
            model: model.into(),
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                finish_reason: finish_reason.map(str::to_owned),
                extra: Map::new(),
            }],
            usage: None,
            extra: Map::new(),
        }
    }

    /// The final usage chunk of a stream: no choices, just usage.
    pub fn usage(
        id: impl Into<String>,
        model: impl Into<String>,
        created: u64,
        usage: Usage,
    ) -> Self {
        Self {
            id: id.into(),
            object: chat_completion_chunk_object(),
            created,
            model: model.into(),
            choices: Vec::new(),
            usage: Some(usage),
            extra: Map::new(),
        }
    }

    /// The choices that finish in this chunk (have a `finish_reason`), as a set of their
    /// indexes: bit `i` for choice `i`.
    pub fn finished_choices(&self) -> u128 {
        self.choices
            .iter()
            .filter(|c| c.finish_reason.is_some())
            .fold(0, |set, c| set | index_bit(u64::from(c.index)))
    }

    /// The content text this chunk adds to the first choice.
    pub fn text(&self) -> &str {
        self.choices
            .first()
            .and_then(|c| c.delta.content.as_deref())
            .unwrap_or("")
    }
}

/// One choice of a stream chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkChoice {
    #[serde(default)]
    pub index: u32,
    #[serde(default)]
    pub delta: Delta,
    #[serde(default)]
    pub finish_reason: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The incremental part of a stream chunk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Delta {
    pub fn role(role: impl Into<String>) -> Self {
        Self {
            role: Some(role.into()),
            ..Self::default()
        }
    }

    pub fn content(content: impl Into<String>) -> Self {
        Self {
            content: Some(content.into()),
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_request_fields_round_trip() {
        let body = json!({
            "model": "m",
            "messages": [
                            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "user", "content": [
                    {"type": "text", "text": "hi "},
                    {"type": "image_url", "image_url": {"url": "data:x"}},
                    {"type": "text", "text": "there"}
                ], "name": "ann"}
            ],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "tool_choice": "auto",
            "response_format": {"type": "json_object"},
            "seed": 7,
            "logprobs": true,
            "max_tokens": 5,
        });
        let request: ChatRequest = serde_json::from_value(body.clone()).unwrap();
        assert_eq!(request.messages[0].content, Some(Content::Null));
        assert_eq!(request.messages[1].text(), "hi there");
        assert_eq!(request.max_tokens, Some(5));
        assert_eq!(serde_json::to_value(&request).unwrap(), body);
    }

    #[test]
    fn chunk_serializes_null_finish_reason_like_openai() {
        let chunk = ChatChunk::delta("c1", "m", 1, Delta::content("hi"), None);
        let value = serde_json::to_value(&chunk).unwrap();
        assert_eq!(
            value,
            json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                   "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": null}]})
        );
    }

    #[test]
    fn completion_bodies_pass_through_byte_for_byte_with_their_usage_read() {
        let text = r#"{"id":"c9","choices":[{"index":0,"message":{"role":"assistant","content":"hi","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9,"prompt_tokens_details":{"cached_tokens":0}},"system_fingerprint":"fp_1"}"#;
        let body = CompletionBody::parse(bytes::Bytes::from_static(text.as_bytes())).unwrap();
        assert_eq!(body.json, text.as_bytes());
        assert_eq!(body.usage, Some(Usage::new(7, 2)));

        let no_usage =
            br#"{"choices":[{"message":{"role":"assistant","content":"x"}}],"usage":null}"#;
        let body = CompletionBody::parse(bytes::Bytes::from_static(no_usage)).unwrap();
        assert_eq!(body.usage, None);

        for not_a_completion in [
            &br#"{"error":{"message":"overloaded"}}"#[..],
            br#"{"choices":[{"text":"legacy completion"}]}"#,
            br#"{"choices":[{"message":{"content":"no role"}}]}"#,
            br#"{"choices":[],"usage":{"prompt_tokens":"seven"}}"#,
            b"<html>502</html>",
        ] {
            let error = CompletionBody::parse(bytes::Bytes::from_static(not_a_completion));
            assert!(
                error.is_err(),
                "{}",
                String::from_utf8_lossy(not_a_completion)
            );
        }
    }

    #[test]
    fn an_encoded_response_reads_back_as_the_same_response() {
        let response = ChatResponse::assistant("c1", "m", 5, "hello", Usage::new(3, 1));
        let body = CompletionBody::encode(&response);
        assert_eq!(body.usage, Some(Usage::new(3, 1)));
        let decoded: ChatResponse = serde_json::from_slice(&body.json).unwrap();
        assert_eq!(decoded, response);
        assert_eq!(CompletionBody::parse(body.json.clone()).unwrap(), body);
    }

    #[test]
    fn an_encoded_chunk_reads_back_with_its_usage_and_text() {
        let chunk = ChatChunk::delta("c1", "m", 5, Delta::content("hel"), None);
        let body = ChunkBody::encode(&chunk);
        assert!(body.has_choices);
        assert_eq!(body.text(), "hel");
        assert_eq!(
            serde_json::from_str::<ChatChunk>(&body.json).unwrap(),
            chunk
        );
        assert_eq!(ChunkBody::parse(body.json.clone()).unwrap(), body);

        let mut usage_only = ChatChunk::delta("c1", "m", 5, Delta::default(), None);
        usage_only.choices.clear();
        usage_only.usage = Some(Usage::new(3, 1));
        let body = ChunkBody::encode(&usage_only);
        assert!(!body.has_choices);
        assert_eq!(body.text(), "");
        assert_eq!(ChunkBody::parse(body.json.clone()).unwrap(), body);

        let error = r#"{"error":{"message":"overloaded"}}"#;
        assert_eq!(ChunkBody::parse(error.to_owned()).unwrap_err(), error);
        assert!(ChunkBody::parse(r#"{"choices":{}}"#.to_owned()).is_err());
    }
}
