//! Client for Anthropic's Messages API (`POST <base_url>/v1/messages`). Routes and chains speak
//! OpenAI's chat format, so a request is translated on its way out and the answer, or the
//! stream, on its way back: a route may mix Anthropic and OpenAI-compatible targets, and clients
//! see one format.
//!
//! Translated: system and developer messages → `system` (joined, wherever they stand); user and
//! assistant messages with text and image parts; `max_completion_tokens` or `max_tokens` (else
//! [`DEFAULT_MAX_TOKENS`]: Anthropic requires one); `temperature`, `top_p`, `stop` →
//! `stop_sequences`, `user` → `metadata.user_id`; the usage (cache reads and writes count as
//! prompt tokens) and the stop reason. Fields that do not change the answer's shape and have no
//! Anthropic counterpart (`seed`, penalties, `store`, …) are dropped. Anything else — tools and
//! tool messages, `response_format`, `n` > 1, log probabilities, fields this module does not
//! know — is refused before the call, with a 400 naming it, rather than silently answered
//! differently.

use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use http::header::{HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use switchyard_core::wire::{ChatChunk, Content, Delta, Message};
use switchyard_core::{
    ChatRequest, ChatResponse, ChunkStream, Llm, LlmError, LlmErrorKind, Secret, Usage, unix_now,
};

use crate::http::{HttpClient, UpstreamBody};
use crate::upstream::{MAX_ANSWER, Upstream, sse_events};

/// The Messages API version this module speaks.
const API_VERSION: &str = "2023-06-01";
/// `max_tokens` when the request gives none.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// Request fields with no Anthropic counterpart that do not change what the answer looks like.
const DROPPED: &[&str] = &[
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "store",
    "metadata",
    "service_tier",
    "parallel_tool_calls",
    "prediction",
];

/// One Anthropic upstream. Cheap to clone: the HTTP clients are shared.
#[derive(Debug, Clone)]
pub struct AnthropicProvider {
    /// `<base_url>/v1/messages`, with `x-api-key` (sensitive) and `anthropic-version`.
    upstream: Arc<Upstream>,
}

impl AnthropicProvider {
    /// `base_url` is the API root, e.g. `https://api.anthropic.com`.
    pub fn new(
        name: impl Into<String>,
        client: Arc<HttpClient>,
        base_url: &str,
        api_key: Option<Secret>,
    ) -> Result<Self, String> {
        let name = name.into();
        let mut headers = vec![(
            HeaderName::from_static("anthropic-version"),
            HeaderValue::from_static(API_VERSION),
        )];
        if let Some(key) = api_key {
            let value = Upstream::secret_header(&name, key.expose().to_owned())?;
            headers.push((HeaderName::from_static("x-api-key"), value));
        }
        let upstream = Upstream::new(name, client, base_url, "v1/messages", headers)?;
        Ok(Self {
            upstream: Arc::new(upstream),
        })
    }

    async fn send(
        &self,
        request: &ChatRequest,
        stream: bool,
    ) -> Result<http::Response<UpstreamBody>, LlmError> {
        let body = messages_request(request, stream).map_err(|message| {
            LlmError::new(
                LlmErrorKind::BadRequest,
                format!("provider '{}' (Anthropic): {message}", self.upstream.name),
            )
        })?;
        let body = serde_json::to_vec(&body).map_err(|e| {
            LlmError::new(
                LlmErrorKind::BadRequest,
                format!(
                    "cannot encode the request for provider '{}': {e}",
                    self.upstream.name
                ),
            )
        })?;
        self.upstream.post(body).await
    }
}

#[async_trait]
impl Llm for AnthropicProvider {
    async fn chat(&self, request: ChatRequest) -> Result<ChatResponse, LlmError> {
        let response = self.send(&request, false).await?;
        let body = self.upstream.read_answer(response).await?;
        let message: MessageResponse = serde_json::from_slice(&body)
            .map_err(|e| self.upstream.invalid("a body that is not a message", &e))?;
        Ok(message.into_chat_response())
    }

    async fn chat_stream(&self, request: ChatRequest) -> Result<ChunkStream, LlmError> {
        let response = self.send(&request, true).await?;
        Ok(Box::pin(chat_chunks(
            self.upstream.clone(),
            response,
            request.wants_stream_usage(),
        )))
    }
}

/// The Messages API body for `request`, or what cannot be translated.
fn messages_request(request: &ChatRequest, stream: bool) -> Result<Value, String> {
    let mut system = Vec::new();
    let mut messages = Vec::new();
    for (i, message) in request.messages.iter().enumerate() {
        if message.extra.contains_key("tool_calls") || message.extra.contains_key("function_call") {
            return Err(format!("messages[{i}]: tool calls are not supported"));
        }
        match message.role.as_str() {
            "system" | "developer" => system.push(system_text(i, message)?),
            role @ ("user" | "assistant") => {
                messages.push(json!({"role": role, "content": content(i, message)?}));
            }
            "tool" | "function" => {
                return Err(format!(
                    "messages[{i}]: tool results (role '{}') are not supported",
                    message.role
                ));
            }
            other => return Err(format!("messages[{i}]: unknown role '{other}'")),
        }
    }
    let mut body = Map::new();
    body.insert("model".into(), request.model.clone().into());
    let max_tokens = request
        .max_completion_tokens
        .or(request.max_tokens)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    body.insert("max_tokens".into(), max_tokens.into());
    if !system.is_empty() {
        body.insert("system".into(), system.join("\n\n").into());
    }
    body.insert("messages".into(), messages.into());
    if stream {
        body.insert("stream".into(), true.into());
    }
    for (field, value) in &request.extra {
        match field.as_str() {
            _ if value.is_null() || DROPPED.contains(&field.as_str()) => {}
            "temperature" | "top_p" => {
                body.insert(field.clone(), value.clone());
            }
            "stop" => {
                let stops = match value {
                    Value::String(stop) => vec![Value::String(stop.clone())],
                    Value::Array(stops) => stops.clone(),
                    _ => return Err("'stop' must be a string or an array of strings".into()),
                };
                body.insert("stop_sequences".into(), stops.into());
            }
            "user" => {
                body.insert("metadata".into(), json!({"user_id": value}));
            }
            "n" if value.as_u64() == Some(1) => {}
            "logprobs" if value == &Value::Bool(false) => {}
            other => return Err(format!("'{other}' is not supported")),
        }
    }
    Ok(Value::Object(body))
}

/// The text of a system message (Anthropic's `system` is text only).
fn system_text(i: usize, message: &Message) -> Result<String, String> {
    match &message.content {
        Some(Content::Text(text)) => Ok(text.clone()),
        Some(Content::Parts(parts))
            if parts
                .iter()
                .all(|p| p.get("type").and_then(Value::as_str) == Some("text")) =>
        {
            Ok(message.text())
        }
        _ => Err(format!(
            "messages[{i}]: a system message must be text (a string or text parts)"
        )),
    }
}

/// A user or assistant message's content: a string, or text and image blocks.
fn content(i: usize, message: &Message) -> Result<Value, String> {
    let parts = match &message.content {
        Some(Content::Text(text)) => return Ok(Value::String(text.clone())),
        Some(Content::Parts(parts)) => parts,
        Some(Content::Null) | None => return Err(format!("messages[{i}]: content is missing")),
    };
    parts
        .iter()
        .map(|part| {
            let kind = part.get("type").and_then(Value::as_str).unwrap_or_default();
            match kind {
                "text" => Ok(
                    json!({"type": "text", "text": part.get("text").cloned().unwrap_or_default()}),
                ),
                "image_url" => {
                    let url = part
                        .pointer("/image_url/url")
                        .and_then(Value::as_str)
                        .ok_or_else(|| format!("messages[{i}]: an image_url part has no url"))?;
                    Ok(json!({"type": "image", "source": image_source(url)}))
                }
                other => Err(format!(
                    "messages[{i}]: content parts of type '{other}' are not supported"
                )),
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

/// An image given as a `data:` URL (sent inline) or a link (fetched by Anthropic).
fn image_source(url: &str) -> Value {
    let inline = url
        .strip_prefix("data:")
        .and_then(|rest| rest.split_once(";base64,"));
    match inline {
        Some((media_type, data)) => {
            json!({"type": "base64", "media_type": media_type, "data": data})
        }
        None => json!({"type": "url", "url": url}),
    }
}

/// OpenAI's `finish_reason` for an Anthropic `stop_reason`.
fn finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        // end_turn, stop_sequence, pause_turn
        _ => "stop",
    }
}

/// A Messages API answer, as far as it is read.
#[derive(Deserialize)]
struct MessageResponse {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    content: Vec<Block>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: AnthropicUsage,
}

#[derive(Deserialize)]
struct Block {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: String,
}

#[derive(Debug, Default, Deserialize)]
struct AnthropicUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

impl AnthropicUsage {
    /// Every input token, cached or not, as OpenAI counts prompt tokens.
    fn prompt_tokens(&self) -> Option<u64> {
        let input = self.input_tokens?;
        Some(
            input
                .saturating_add(self.cache_creation_input_tokens.unwrap_or(0))
                .saturating_add(self.cache_read_input_tokens.unwrap_or(0)),
        )
    }
}

impl MessageResponse {
    fn into_chat_response(self) -> ChatResponse {
        let text: String = self
            .content
            .iter()
            .filter(|block| block.kind == "text")
            .map(|block| block.text.as_str())
            .collect();
        let usage = Usage::new(
            self.usage.prompt_tokens().unwrap_or(0),
            self.usage.output_tokens.unwrap_or(0),
        );
        let mut response = ChatResponse::assistant(self.id, self.model, unix_now(), text, usage);
        if let Some(choice) = response.choices.first_mut() {
            choice.finish_reason =
                Some(finish_reason(self.stop_reason.as_deref().unwrap_or("")).into());
        }
        response
    }
}

/// What a stream has said so far.
struct StreamState {
    id: String,
    model: String,
    created: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    include_usage: bool,
    done: bool,
}

impl StreamState {
    fn chunk(&self, delta: Delta, finish_reason: Option<&str>) -> ChatChunk {
        ChatChunk::delta(
            self.id.clone(),
            self.model.clone(),
            self.created,
            delta,
            finish_reason,
        )
    }

    /// The chunk an event becomes, if any; `Err` with a message for an event that ends the
    /// stream with an error.
    fn on_event(&mut self, data: &str) -> Result<Option<ChatChunk>, String> {
        let event: Value = serde_json::from_str(data)
            .map_err(|e| format!("sent an event that is not JSON ({e})"))?;
        let kind = event
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let text = |pointer| event.pointer(pointer).and_then(Value::as_str);
        Ok(match kind {
            "message_start" => {
                self.id = text("/message/id").unwrap_or_default().to_owned();
                self.model = text("/message/model").unwrap_or_default().to_owned();
                let usage = usage_of(event.pointer("/message/usage"));
                self.prompt_tokens = usage.prompt_tokens().unwrap_or(0);
                self.completion_tokens = usage.output_tokens.unwrap_or(0);
                Some(self.chunk(
                    Delta {
                        role: Some("assistant".into()),
                        content: Some(String::new()),
                        ..Delta::default()
                    },
                    None,
                ))
            }
            "content_block_start" => text("/content_block/text")
                .filter(|text| !text.is_empty())
                .map(|text| self.chunk(Delta::content(text), None)),
            "content_block_delta" if text("/delta/type") == Some("text_delta") => Some(self.chunk(
                Delta::content(text("/delta/text").unwrap_or_default()),
                None,
            )),
            "message_delta" => {
                let usage = usage_of(event.get("usage"));
                // Counts in `message_delta` are cumulative.
                if let Some(prompt) = usage.prompt_tokens() {
                    self.prompt_tokens = prompt;
                }
                if let Some(output) = usage.output_tokens {
                    self.completion_tokens = output;
                }
                text("/delta/stop_reason")
                    .map(|reason| self.chunk(Delta::default(), Some(finish_reason(reason))))
            }
            "message_stop" => {
                self.done = true;
                self.include_usage.then(|| {
                    ChatChunk::usage(
                        self.id.clone(),
                        self.model.clone(),
                        self.created,
                        Usage::new(self.prompt_tokens, self.completion_tokens),
                    )
                })
            }
            "error" => {
                let message = text("/error/message").unwrap_or("(no message)");
                return Err(format!("sent an error in the stream: {message}"));
            }
            // ping, content_block_stop, non-text deltas (thinking), and event types added later.
            _ => None,
        })
    }
}

fn usage_of(value: Option<&Value>) -> AnthropicUsage {
    value
        .and_then(|usage| AnthropicUsage::deserialize(usage).ok())
        .unwrap_or_default()
}

/// An Anthropic event stream as OpenAI chat chunks: a role chunk first, a chunk per text delta,
/// a finish chunk, and a usage chunk if `include_usage`. It ends at `message_stop`; an `error`
/// event, a broken stream or one that ends before `message_stop` is an error item.
fn chat_chunks(
    upstream: Arc<Upstream>,
    response: http::Response<UpstreamBody>,
    include_usage: bool,
) -> impl futures::Stream<Item = Result<ChatChunk, LlmError>> + Send + 'static {
    let mut events = Box::pin(sse_events(response, MAX_ANSWER));
    let mut state = StreamState {
        id: String::new(),
        model: String::new(),
        created: unix_now(),
        prompt_tokens: 0,
        completion_tokens: 0,
        include_usage,
        done: false,
    };
    let mut failed = false;
    futures::stream::poll_fn(move |cx| {
        loop {
            if state.done || failed {
                return std::task::Poll::Ready(None);
            }
            let item = match futures::ready!(events.poll_next_unpin(cx)) {
                None => Err(upstream.interrupted("closed the stream before message_stop")),
                Some(Err(e)) => Err(upstream.interrupted(format_args!("stream broke off: {e}"))),
                Some(Ok(event)) => match state.on_event(&event.data) {
                    Ok(Some(chunk)) => Ok(chunk),
                    Ok(None) => continue,
                    Err(message) => Err(upstream.interrupted(message)),
                },
            };
            failed = item.is_err();
            return std::task::Poll::Ready(Some(item));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::tests::sse_response;

    fn request(body: Value) -> ChatRequest {
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn the_key_goes_in_x_api_key_and_is_never_shown() {
        let client = Arc::new(HttpClient::new().unwrap());
        let provider = AnthropicProvider::new(
            "claude",
            client,
            "https://api.anthropic.com/",
            Some(Secret::new("sk-ant-do-not-show".to_owned())),
        )
        .unwrap();
        assert_eq!(
            provider.upstream.url,
            "https://api.anthropic.com/v1/messages"
        );
        let key = provider
            .upstream
            .header(HeaderName::from_static("x-api-key"))
            .unwrap();
        assert_eq!(key, "sk-ant-do-not-show");
        assert!(key.is_sensitive());
        assert_eq!(
            provider
                .upstream
                .header(HeaderName::from_static("anthropic-version"))
                .unwrap(),
            API_VERSION
        );
        assert!(!format!("{provider:?}").contains("sk-ant-do-not-show"));
    }

    #[test]
    fn requests_are_translated_to_the_messages_api() {
        let chat = request(json!({
            "model": "claude-test",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}
                ]}
            ],
            "max_completion_tokens": 300,
            "temperature": 0.2,
            "stop": "END",
            "user": "u-42",
            "seed": 7,
            "n": 1,
            "stream_options": {"include_usage": true}
        }));
        assert_eq!(
            messages_request(&chat, true).unwrap(),
            json!({
                "model": "claude-test",
                "max_tokens": 300,
                "system": "Be brief.\n\nAnswer in French.",
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}
                    ]}
                ],
                "stream": true,
                "temperature": 0.2,
                "stop_sequences": ["END"],
                "metadata": {"user_id": "u-42"}
            })
        );
        // No max_tokens given: Anthropic needs one.
        let plain = request(json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}));
        assert_eq!(
            messages_request(&plain, false).unwrap()["max_tokens"],
            DEFAULT_MAX_TOKENS
        );
    }

    #[test]
    fn what_cannot_be_translated_is_refused_by_name() {
        let refused = |body: Value| messages_request(&request(body), false).unwrap_err();
        let user = json!([{"role": "user", "content": "x"}]);
        assert_eq!(
            refused(json!({"model": "m", "messages": user, "tools": []})),
            "'tools' is not supported"
        );
        assert_eq!(
            refused(json!({"model": "m", "messages": user, "n": 2})),
            "'n' is not supported"
        );
        assert_eq!(
            refused(
                json!({"model": "m", "messages": user, "response_format": {"type": "json_object"}})
            ),
            "'response_format' is not supported"
        );
        assert_eq!(
            refused(json!({"model": "m", "messages": [
                {"role": "user", "content": "x"},
                {"role": "tool", "tool_call_id": "1", "content": "42"}
            ]})),
            "messages[1]: tool results (role 'tool') are not supported"
        );
        assert_eq!(
            refused(json!({"model": "m", "messages": [
                {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}
            ]})),
            "messages[0]: content parts of type 'input_audio' are not supported"
        );
    }

    #[test]
    fn answers_become_chat_completions() {
        let message: MessageResponse = serde_json::from_value(json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test",
            "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "text", "text": "Bonjour"},
                {"type": "text", "text": " !"}
            ],
            "stop_reason": "max_tokens", "stop_sequence": null,
            "usage": {"input_tokens": 10, "output_tokens": 5,
                      "cache_creation_input_tokens": 2, "cache_read_input_tokens": 3}
        }))
        .unwrap();
        let response = message.into_chat_response();
        assert_eq!(response.id, "msg_1");
        assert_eq!(response.model, "claude-test");
        assert_eq!(response.object, "chat.completion");
        assert_eq!(response.text(), "Bonjour !");
        assert_eq!(response.choices[0].finish_reason.as_deref(), Some("length"));
        assert_eq!(response.usage, Some(Usage::new(15, 5)));
    }

    /// A stream as Anthropic sends it, `event:` lines included.
    fn anthropic_stream(with_stop: bool) -> http::Response<UpstreamBody> {
        let mut events = vec![
            (
                "message_start",
                r#"{"type":"message_start","message":{"id":"msg_2","type":"message","role":"assistant","model":"claude-test","content":[],"stop_reason":null,"usage":{"input_tokens":12,"output_tokens":1}}}"#,
            ),
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            ),
            ("ping", r#"{"type":"ping"}"#),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hel"}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"lo"}}"#,
            ),
            (
                "content_block_stop",
                r#"{"type":"content_block_stop","index":0}"#,
            ),
            (
                "message_delta",
                r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":2}}"#,
            ),
        ];
        if with_stop {
            events.push(("message_stop", r#"{"type":"message_stop"}"#));
        }
        sse_response(&events)
    }

    fn upstream() -> Arc<Upstream> {
        let client = Arc::new(HttpClient::new().unwrap());
        Arc::new(Upstream::new("claude".into(), client, "http://127.0.0.1:1", "x", vec![]).unwrap())
    }

    #[tokio::test]
    async fn streams_become_chat_chunks_with_usage_when_asked() {
        let chunks: Vec<ChatChunk> = chat_chunks(upstream(), anthropic_stream(true), true)
            .map(Result::unwrap)
            .collect()
            .await;
        let encoded: Vec<Value> = chunks
            .iter()
            .map(|c| {
                let mut value = serde_json::to_value(c).unwrap();
                value.as_object_mut().unwrap().remove("created");
                value
            })
            .collect();
        let chunk = |delta: Value, finish: Value| {
            json!({"id": "msg_2", "object": "chat.completion.chunk", "model": "claude-test",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        };
        assert_eq!(
            encoded,
            [
                chunk(json!({"role": "assistant", "content": ""}), Value::Null),
                chunk(json!({"content": "Hel"}), Value::Null),
                chunk(json!({"content": "lo"}), Value::Null),
                chunk(json!({}), json!("stop")),
                json!({"id": "msg_2", "object": "chat.completion.chunk", "model": "claude-test",
                       "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}}),
            ]
        );

        let without_usage: Vec<_> = chat_chunks(upstream(), anthropic_stream(true), false)
            .collect()
            .await;
        assert_eq!(without_usage.len(), 4);
    }

    #[tokio::test]
    async fn a_stream_that_errs_or_ends_early_ends_with_an_error() {
        let cut: Vec<_> = chat_chunks(upstream(), anthropic_stream(false), true)
            .collect()
            .await;
        assert_eq!(cut.len(), 5);
        let error = cut[4].as_ref().unwrap_err();
        assert_eq!(error.kind, LlmErrorKind::StreamInterrupted);
        assert_eq!(
            error.message,
            "provider 'claude' closed the stream before message_stop"
        );

        let overloaded = sse_response(&[
            (
                "message_start",
                r#"{"type":"message_start","message":{"id":"m","model":"c","usage":{"input_tokens":1}}}"#,
            ),
            (
                "error",
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            ),
        ]);
        let items: Vec<_> = chat_chunks(upstream(), overloaded, true).collect().await;
        assert_eq!(items.len(), 2);
        assert_eq!(
            items[1].as_ref().unwrap_err().message,
            "provider 'claude' sent an error in the stream: Overloaded"
        );
    }
}
