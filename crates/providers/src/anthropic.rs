//! Client for Anthropic's Messages API (`POST <base_url>/v1/messages`). Routes and chains speak
//! OpenAI's chat format, so a request is translated on its way out and the answer, or the
//! stream, on its way back: a route may mix Anthropic and OpenAI-compatible targets, and clients
//! see one format.
//!
//! Translated: system and developer messages → `system` (joined, wherever they stand); user and
//! assistant messages with text and image parts; `max_completion_tokens` or `max_tokens` (else
//! [`DEFAULT_MAX_TOKENS`]: Anthropic requires one); `temperature`, `top_p`, `stop` →
//! `stop_sequences`, `user` → `metadata.user_id`; the usage (cache reads and writes count as
//! prompt tokens) and the stop reason. Tool calling: function `tools` → `tools` with an
//! `input_schema`, `tool_choice` (`auto`, `none`, `required` → `any`, a named function → `tool`),
//! `parallel_tool_calls: false` → `disable_parallel_tool_use`, an assistant message's
//! `tool_calls` → `tool_use` blocks, `tool` messages → `tool_result` blocks (consecutive ones in
//! one user turn), and back: `tool_use` blocks → `tool_calls` (streamed as OpenAI streams them:
//! id and name first, then the arguments in pieces). JSON mode: `response_format` `json_schema`
//! (or `json_object`, any object) becomes one tool whose input schema is the schema, forced with
//! `tool_choice`, and its input comes back as the message's text — Anthropic's tools are how it
//! is made to answer in a schema on every model. Fields that do not change the answer's shape
//! and have no Anthropic counterpart (`seed`, penalties, `store`, a function's `strict`, …) are
//! dropped. Anything else — legacy `functions`, `response_format` together with `tools` or with a
//! schema that is not an object, `n` > 1, log probabilities,
//! `temperature` above 1, fields this module does not know — is refused before the call as
//! [`LlmErrorKind::Unsupported`] rather than silently answered differently: a route falls back
//! to its next target, and with none left the client gets a 400 naming the field.

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
use crate::upstream::{MAX_ANSWER, Upstream, finish_in_background, sse_events, stream_error};

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
    "prediction",
    "prompt_cache_key",
];

/// One Anthropic upstream. Cheap to clone: the HTTP clients are shared.
#[derive(Debug, Clone)]
pub struct AnthropicProvider {
    /// `<base_url>/v1/messages`, with `x-api-key` (sensitive) and `anthropic-version`.
    upstream: Arc<Upstream>,
}

impl AnthropicProvider {
    /// `base_url` is the API root, e.g. `https://api.anthropic.com` (a trailing `/v1`, as
    /// OpenAI base URLs have, is allowed).
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
        let root = base_url.trim_end_matches('/');
        let root = root.strip_suffix("/v1").unwrap_or(root);
        let upstream = Upstream::new(name, "anthropic", client, root, "v1/messages", headers)?;
        Ok(Self {
            upstream: Arc::new(upstream),
        })
    }

    async fn send(
        &self,
        request: &ChatRequest,
        stream: bool,
    ) -> Result<http::Response<UpstreamBody>, LlmError> {
        let body = messages_request(request, stream).map_err(|e| LlmError {
            message: format!(
                "provider '{}' (Anthropic): {}",
                self.upstream.name, e.message
            ),
            ..e
        })?;
        self.upstream.post(&request.model, &body).await
    }
}

#[async_trait]
impl Llm for AnthropicProvider {
    async fn chat(&self, request: ChatRequest) -> Result<ChatResponse, LlmError> {
        let response = self.send(&request, false).await?;
        let body = self.upstream.read_answer(response).await?;
        let message: MessageResponse = switchyard_core::json_from_bytes(&body)
            .map_err(|e| self.upstream.invalid("a body that is not a message", &e))?;
        Ok(message.into_chat_response(json_tool_name(&request).as_deref()))
    }

    async fn chat_stream(&self, request: ChatRequest) -> Result<ChunkStream, LlmError> {
        let response = self.send(&request, true).await?;
        Ok(Box::pin(chat_chunks(
            self.upstream.clone(),
            response,
            request.wants_stream_usage(),
            json_tool_name(&request),
        )))
    }
}

/// A valid request this API cannot serve (`param` is the field at fault): the next target may.
fn unsupported(param: impl Into<String>, message: impl Into<String>) -> LlmError {
    LlmError {
        param: Some(param.into()),
        ..LlmError::new(LlmErrorKind::Unsupported, message)
    }
}

/// A request no target can serve (`param` is the field at fault).
fn invalid(param: impl Into<String>, message: impl Into<String>) -> LlmError {
    LlmError {
        param: Some(param.into()),
        ..LlmError::new(LlmErrorKind::BadRequest, message)
    }
}

/// The Messages API body for `request`, or why it cannot be translated.
fn messages_request(request: &ChatRequest, stream: bool) -> Result<Value, LlmError> {
    let mut system = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    // Whether the last message is a user turn of tool results, which the next result joins.
    let mut in_results = false;
    // Empty turns left out, and whose turns the conversation began and ended with.
    let mut dropped = false;
    let (mut first_turn, mut last_turn) = (None, None);
    for (i, message) in request.messages.iter().enumerate() {
        if message
            .extra
            .get("function_call")
            .is_some_and(|v| !v.is_null())
        {
            return Err(unsupported(
                format!("messages[{i}].function_call"),
                format!("messages[{i}]: legacy function calls are not supported (use tool_calls)"),
            ));
        }
        let role = message.role.as_str();
        let turn = match role {
            "assistant" => Some("assistant"),
            "user" | "tool" => Some("user"),
            _ => None,
        };
        first_turn = first_turn.or(turn);
        last_turn = turn.or(last_turn);
        match role {
            "system" | "developer" => system.push(system_text(i, message)?),
            // Anthropic refuses empty text (OpenAI takes it): an empty turn is left out.
            "user" | "assistant" => {
                let content = match role {
                    "user" => content(i, message)?,
                    _ => assistant_content(i, message)?,
                };
                match non_empty(content) {
                    Some(content) => messages.push(json!({"role": role, "content": content})),
                    None => dropped = true,
                }
            }
            "tool" => {
                let result = tool_result(i, message)?;
                match messages.last_mut() {
                    Some(Value::Object(turn)) if in_results => {
                        if let Some(Value::Array(blocks)) = turn.get_mut("content") {
                            blocks.push(result);
                        }
                    }
                    _ => messages.push(json!({"role": "user", "content": [result]})),
                }
            }
            "function" => {
                return Err(unsupported(
                    format!("messages[{i}].role"),
                    format!(
                        "messages[{i}]: legacy function results (role 'function') are not supported"
                    ),
                ));
            }
            other => {
                return Err(invalid(
                    format!("messages[{i}].role"),
                    format!("messages[{i}]: unknown role '{other}'"),
                ));
            }
        }
        in_results = role == "tool" || (in_results && matches!(role, "system" | "developer"));
    }
    if messages.is_empty() {
        return Err(unsupported(
            "messages",
            "a conversation without a user or assistant message with content is not supported",
        ));
    }
    // Leaving an empty turn out must not make a conversation that ended on the user end on
    // the assistant (which asks Anthropic to continue that answer), nor one that began with the
    // user begin with the assistant.
    let first = messages.first().and_then(|m| m["role"].as_str());
    let last = messages.last().and_then(|m| m["role"].as_str());
    let now_assistant =
        |turn: Option<&str>, was: Option<&str>| turn == Some("assistant") && was == Some("user");
    if dropped && (now_assistant(last, last_turn) || now_assistant(first, first_turn)) {
        return Err(unsupported(
            "messages",
            "an empty message that begins or ends the conversation is not supported (Anthropic \
             refuses empty text)",
        ));
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
    let mut tool_choice = None;
    let mut parallel_tool_calls = true;
    let mut json_tool = None;
    for (field, value) in &request.extra {
        match field.as_str() {
            _ if value.is_null() || DROPPED.contains(&field.as_str()) => {}
            "tools" => {
                body.insert("tools".into(), tools(value)?);
            }
            "tool_choice" => tool_choice = Some(translate_tool_choice(value)?),
            "response_format" => json_tool = response_format_tool(value)?,
            "parallel_tool_calls" => parallel_tool_calls = value.as_bool() != Some(false),
            // OpenAI's range is 0 to 2, Anthropic's 0 to 1.
            "temperature" if value.as_f64().is_some_and(|t| t > 1.0) => {
                return Err(unsupported(
                    "temperature",
                    "'temperature' above 1 is not supported",
                ));
            }
            // Anthropic's newer models refuse both at once ("use only one"): temperature wins.
            "top_p"
                if request
                    .extra
                    .get("temperature")
                    .is_some_and(|t| !t.is_null()) => {}
            "temperature" | "top_p" => {
                body.insert(field.clone(), value.clone());
            }
            "stop" => {
                let stops = match value {
                    Value::String(stop) => vec![Value::String(stop.clone())],
                    Value::Array(stops) => stops.clone(),
                    _ => {
                        return Err(invalid(
                            "stop",
                            "'stop' must be a string or an array of strings",
                        ));
                    }
                };
                body.insert("stop_sequences".into(), stops.into());
            }
            // OpenAI's end-user id (`safety_identifier` succeeds `user`; `user` wins if both).
            "user" | "safety_identifier"
                if field == "user" || request.extra.get("user").is_none_or(Value::is_null) =>
            {
                let user = value.as_str().ok_or_else(|| {
                    invalid(field.as_str(), format!("'{field}' must be a string"))
                })?;
                body.insert("metadata".into(), json!({"user_id": user}));
            }
            "safety_identifier" => {}
            "n" if value.as_u64() == Some(1) => {}
            "logprobs" if value == &Value::Bool(false) => {}
            other => return Err(unsupported(other, format!("'{other}' is not supported"))),
        }
    }
    if let Some(tool) = json_tool {
        if body.contains_key("tools") {
            return Err(unsupported(
                "response_format",
                "'response_format' together with 'tools' is not supported",
            ));
        }
        tool_choice = Some(json!({"type": "tool", "name": tool["name"]}));
        body.insert("tools".into(), json!([tool]));
    }
    if !parallel_tool_calls && body.contains_key("tools") {
        let choice = tool_choice.get_or_insert_with(|| json!({"type": "auto"}));
        if choice["type"] != "none" {
            choice["disable_parallel_tool_use"] = true.into();
        }
    }
    if let Some(choice) = tool_choice {
        body.insert("tool_choice".into(), choice);
    }
    Ok(Value::Object(body))
}

/// OpenAI function tools as Anthropic tools.
fn tools(value: &Value) -> Result<Value, LlmError> {
    let tools = value
        .as_array()
        .ok_or_else(|| invalid("tools", "'tools' must be an array"))?;
    tools
        .iter()
        .enumerate()
        .map(|(k, tool)| {
            let kind = tool.get("type").and_then(Value::as_str).unwrap_or_default();
            if kind != "function" {
                return Err(unsupported(
                    format!("tools[{k}].type"),
                    format!("tools[{k}]: tools of type '{kind}' are not supported"),
                ));
            }
            let function = &tool["function"];
            let name = function["name"].as_str().ok_or_else(|| {
                invalid(
                    format!("tools[{k}].function.name"),
                    format!("tools[{k}]: function.name is missing"),
                )
            })?;
            // Anthropic requires an object schema; OpenAI allows leaving it out.
            let mut schema = function
                .get("parameters")
                .cloned()
                .unwrap_or_else(|| json!({}));
            if let Value::Object(schema) = &mut schema {
                schema.entry("type").or_insert_with(|| "object".into());
            }
            let mut translated = json!({"name": name, "input_schema": schema});
            if let Some(description) = function.get("description").filter(|d| !d.is_null()) {
                translated["description"] = description.clone();
            }
            Ok(translated)
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

/// The tool name JSON mode uses when the schema has none.
const JSON_TOOL: &str = "json_response";

/// The tool that makes Anthropic answer in JSON for a `response_format`; `None` for text.
fn response_format_tool(format: &Value) -> Result<Option<Value>, LlmError> {
    let (name, schema) = match format["type"].as_str() {
        Some("text") => return Ok(None),
        Some("json_object") => (JSON_TOOL, json!({"type": "object"})),
        Some("json_schema") => {
            let spec = &format["json_schema"];
            let schema = spec
                .get("schema")
                .cloned()
                .unwrap_or(json!({"type": "object"}));
            if schema["type"] != "object" {
                return Err(unsupported(
                    "response_format",
                    "'response_format': a JSON schema whose top level is not an object is not supported",
                ));
            }
            (spec["name"].as_str().unwrap_or(JSON_TOOL), schema)
        }
        _ => {
            return Err(invalid(
                "response_format",
                format!(
                    "'response_format' must have type \"text\", \"json_object\" or \"json_schema\", not {format}"
                ),
            ));
        }
    };
    Ok(Some(json!({
        "name": name,
        "description": "Answer with JSON that matches this schema.",
        "input_schema": schema,
    })))
}

/// The name of the tool JSON mode forces for `request`, if it asks for JSON.
fn json_tool_name(request: &ChatRequest) -> Option<String> {
    let format = request.extra.get("response_format")?;
    let tool = response_format_tool(format).ok()??;
    tool["name"].as_str().map(str::to_owned)
}

/// OpenAI's `tool_choice` as Anthropic's.
fn translate_tool_choice(value: &Value) -> Result<Value, LlmError> {
    match value {
        Value::String(choice) if choice == "auto" || choice == "none" => {
            Ok(json!({"type": choice}))
        }
        Value::String(choice) if choice == "required" => Ok(json!({"type": "any"})),
        _ => match value.pointer("/function/name").and_then(Value::as_str) {
            Some(name) if value["type"] == "function" => Ok(json!({"type": "tool", "name": name})),
            // A choice among tools OpenAI has and Anthropic does not (allowed_tools, custom).
            _ if value["type"].is_string() && value["type"] != "function" => Err(unsupported(
                "tool_choice",
                format!("'tool_choice' of type {} is not supported", value["type"]),
            )),
            _ => Err(invalid(
                "tool_choice",
                format!(
                    "'tool_choice' must be \"auto\", \"none\", \"required\" or a function, not {value}"
                ),
            )),
        },
    }
}

/// An assistant message's content: its text, and a `tool_use` block per tool call.
fn assistant_content(i: usize, message: &Message) -> Result<Value, LlmError> {
    // `null` and `[]` are no calls (SDKs that dump every field send them).
    let calls = match message.extra.get("tool_calls") {
        None | Some(Value::Null) => return content(i, message),
        Some(Value::Array(calls)) if calls.is_empty() => return content(i, message),
        Some(Value::Array(calls)) => calls,
        Some(_) => {
            return Err(invalid(
                format!("messages[{i}].tool_calls"),
                format!("messages[{i}].tool_calls must be an array"),
            ));
        }
    };
    let text = message.text();
    let mut blocks: Vec<Value> = Vec::new();
    if !text.is_empty() {
        blocks.push(json!({"type": "text", "text": text}));
    }
    for (j, call) in calls.iter().enumerate() {
        let at = format!("messages[{i}].tool_calls[{j}]");
        let kind = call["type"].as_str().unwrap_or("function");
        if kind != "function" {
            return Err(unsupported(
                format!("{at}.type"),
                format!("{at}: tool calls of type '{kind}' are not supported"),
            ));
        }
        let (Some(id), Some(name)) = (call["id"].as_str(), call["function"]["name"].as_str())
        else {
            return Err(invalid(
                at.as_str(),
                format!("{at}: id and function.name are required"),
            ));
        };
        let not_an_object = || {
            invalid(
                format!("{at}.function.arguments"),
                format!(
                    "{at}: function.arguments must be a JSON object (Anthropic takes the input as one)"
                ),
            )
        };
        let input = match &call["function"]["arguments"] {
            // No arguments at all (`""`, as some servers stream a call without parameters).
            Value::Null => json!({}),
            Value::String(arguments) if arguments.trim().is_empty() => json!({}),
            Value::String(arguments) => serde_json::from_str(arguments)
                .ok()
                .filter(Value::is_object)
                .ok_or_else(not_an_object)?,
            // OpenAI sends a string; an object is taken as what that string would hold.
            object @ Value::Object(_) => object.clone(),
            _ => return Err(not_an_object()),
        };
        blocks.push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
    }
    Ok(Value::Array(blocks))
}

/// A `tool` message as a `tool_result` block.
fn tool_result(i: usize, message: &Message) -> Result<Value, LlmError> {
    let id = message
        .extra
        .get("tool_call_id")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            invalid(
                format!("messages[{i}].tool_call_id"),
                format!("messages[{i}]: a tool message needs tool_call_id"),
            )
        })?;
    // Parts (text and images) go as blocks, which a tool result may hold (not empty ones).
    let content = match &message.content {
        Some(Content::Parts(_)) => non_empty(content(i, message)?).unwrap_or_else(|| "".into()),
        _ => Value::String(message.text()),
    };
    Ok(json!({"type": "tool_result", "tool_use_id": id, "content": content}))
}

/// The text of a system message (Anthropic's `system` is text only).
fn system_text(i: usize, message: &Message) -> Result<String, LlmError> {
    match &message.content {
        Some(Content::Text(text)) => Ok(text.clone()),
        Some(Content::Parts(parts))
            if parts
                .iter()
                .all(|p| p.get("type").and_then(Value::as_str) == Some("text")) =>
        {
            // Parts are kept apart as separate system messages are.
            let texts: Vec<&str> = parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect();
            Ok(texts.join("\n\n"))
        }
        _ => Err(unsupported(
            format!("messages[{i}].content"),
            format!("messages[{i}]: a system message must be text (a string or text parts)"),
        )),
    }
}

/// A user or assistant message's content: a string, or text and image blocks.
fn content(i: usize, message: &Message) -> Result<Value, LlmError> {
    let parts = match &message.content {
        Some(Content::Text(text)) => return Ok(Value::String(text.clone())),
        Some(Content::Parts(parts)) => parts,
        Some(Content::Null) | None => {
            return Err(invalid(
                format!("messages[{i}].content"),
                format!("messages[{i}]: content is missing"),
            ));
        }
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
                        .ok_or_else(|| {
                            invalid(
                                format!("messages[{i}].content"),
                                format!("messages[{i}]: an image_url part has no url"),
                            )
                        })?;
                    Ok(json!({"type": "image", "source": image_source(url)}))
                }
                other => Err(unsupported(
                    format!("messages[{i}].content"),
                    format!("messages[{i}]: content parts of type '{other}' are not supported"),
                )),
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

/// `content` without its empty (or blank) text blocks, or `None` if nothing is left (Anthropic
/// refuses text without a non-whitespace character).
fn non_empty(content: Value) -> Option<Value> {
    let blank = |text: &str| text.trim().is_empty();
    match content {
        Value::String(text) if blank(&text) => None,
        Value::Array(blocks) => {
            let blocks: Vec<Value> = blocks
                .into_iter()
                .filter(|block| {
                    block["type"] != "text" || !block["text"].as_str().is_some_and(blank)
                })
                .collect();
            (!blocks.is_empty()).then_some(Value::Array(blocks))
        }
        content => Some(content),
    }
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
    /// A `tool_use` block's call id, tool name and input object.
    #[serde(default)]
    id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    input: Value,
}

/// An OpenAI tool call: `arguments` is the input as JSON text.
fn tool_call(id: &str, name: &str, arguments: &str) -> Value {
    json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}})
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
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
    /// Takes the counts `newer` has; keeps the others.
    fn merge(&mut self, newer: AnthropicUsage) {
        let take = |old: &mut Option<u64>, new: Option<u64>| {
            if new.is_some() {
                *old = new;
            }
        };
        take(&mut self.input_tokens, newer.input_tokens);
        take(&mut self.output_tokens, newer.output_tokens);
        take(
            &mut self.cache_creation_input_tokens,
            newer.cache_creation_input_tokens,
        );
        take(
            &mut self.cache_read_input_tokens,
            newer.cache_read_input_tokens,
        );
    }

    /// As OpenAI counts: every input token, cached or not, is a prompt token, and those read
    /// from the cache are `prompt_tokens_details.cached_tokens`.
    fn into_usage(self) -> Usage {
        let mut usage = Usage::new(
            self.prompt_tokens().unwrap_or(0),
            self.output_tokens.unwrap_or(0),
        );
        if let Some(cached) = self.cache_read_input_tokens {
            usage.extra.insert(
                "prompt_tokens_details".into(),
                json!({ "cached_tokens": cached }),
            );
        }
        usage
    }

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
    /// The message as a chat completion; `json_tool` is the tool JSON mode forced, whose input
    /// is the answer's text.
    fn into_chat_response(mut self, json_tool: Option<&str>) -> ChatResponse {
        if let Some(json_tool) = json_tool
            && let Some(answer) = self
                .content
                .iter()
                .position(|block| block.kind == "tool_use" && block.name == json_tool)
        {
            // The forced tool's input is the whole answer.
            let mut block = self.content.swap_remove(answer);
            block.kind = "text".to_owned();
            block.text = block.input.to_string();
            self.content = vec![block];
            if self.stop_reason.as_deref() == Some("tool_use") {
                self.stop_reason = Some("end_turn".to_owned());
            }
        }
        let text: String = self
            .content
            .iter()
            .filter(|block| block.kind == "text")
            .map(|block| block.text.as_str())
            .collect();
        let usage = self.usage.into_usage();
        let calls: Vec<Value> = self
            .content
            .iter()
            .filter(|block| block.kind == "tool_use")
            .map(|block| tool_call(&block.id, &block.name, &block.input.to_string()))
            .collect();
        let mut response = ChatResponse::assistant(self.id, self.model, unix_now(), text, usage);
        if let Some(choice) = response.choices.first_mut() {
            choice.finish_reason =
                Some(finish_reason(self.stop_reason.as_deref().unwrap_or("")).into());
            if !calls.is_empty() {
                // As OpenAI answers a call without text: `content: null`.
                if choice.message.text().is_empty() {
                    choice.message.content = Some(Content::Null);
                }
                choice
                    .message
                    .extra
                    .insert("tool_calls".into(), calls.into());
            }
        }
        response
    }
}

/// What a stream has said so far.
struct StreamState {
    id: String,
    model: String,
    created: u64,
    /// Each count as last reported (`message_delta`'s are cumulative).
    usage: AnthropicUsage,
    /// Whether a chunk went out: the first carries the role.
    started: bool,
    /// The content block index of each `tool_use` block so far: its position is the OpenAI
    /// tool call's `index`.
    /// With it, whether any of its arguments went out (a call without parameters streams none,
    /// and gets `{}` when its block ends).
    tool_blocks: Vec<(u64, bool)>,
    /// JSON mode: the forced tool's name, and the block of its input, streamed as text (and
    /// whether any of it went out).
    json_tool: Option<String>,
    json_block: Option<(u64, bool)>,
    include_usage: bool,
    /// Whether the finish chunk went out.
    finished: bool,
    /// A chunk that follows the one just returned (one event can end the stream with two).
    pending: Option<ChatChunk>,
    done: bool,
}

impl StreamState {
    /// A chunk with `content`, or the finish chunk. No chunk is made for `message_start`: a
    /// route takes its first chunk as the answer begun (no retry or fallback after it), and an
    /// overloaded Anthropic may still send an `error` event before any text.
    fn chunk(&mut self, content: Option<&str>, finish_reason: Option<&str>) -> ChatChunk {
        let delta = Delta {
            content: content.map(str::to_owned),
            ..Delta::default()
        };
        self.chunk_of(delta, finish_reason)
    }

    /// A chunk carrying one piece of a tool call (`call` holds its `index`).
    fn tool_call_chunk(&mut self, call: Value) -> ChatChunk {
        let mut delta = Delta::default();
        delta.extra.insert("tool_calls".into(), json!([call]));
        self.chunk_of(delta, None)
    }

    fn chunk_of(&mut self, mut delta: Delta, finish_reason: Option<&str>) -> ChatChunk {
        if !self.started {
            delta.role = Some("assistant".to_owned());
        }
        self.started = true;
        self.finished |= finish_reason.is_some();
        ChatChunk::delta(
            self.id.clone(),
            self.model.clone(),
            self.created,
            delta,
            finish_reason,
        )
    }

    /// A piece of JSON mode's answer, as text.
    fn json_piece(&mut self, piece: &str) -> Option<ChatChunk> {
        if piece.is_empty() {
            return None;
        }
        self.json_block = self.json_block.map(|(block, _)| (block, true));
        Some(self.chunk(Some(piece), None))
    }

    /// A piece of the arguments of the tool call in content block `block`.
    fn arguments_piece(&mut self, block: Option<u64>, arguments: &str) -> Option<ChatChunk> {
        let index = self
            .tool_blocks
            .iter()
            .position(|&(b, _)| Some(b) == block)?;
        if arguments.is_empty() {
            return None;
        }
        self.tool_blocks[index].1 = true;
        Some(self.tool_call_chunk(json!({"index": index, "function": {"arguments": arguments}})))
    }

    /// A tool block that ends without any arguments had an empty input: `{}`, as a complete
    /// answer says it (and as OpenAI streams it).
    fn block_stop(&mut self, block: Option<u64>) -> Option<ChatChunk> {
        if let Some((json_block, false)) = self.json_block
            && Some(json_block) == block
        {
            return self.json_piece("{}");
        }
        let silent = self
            .tool_blocks
            .iter()
            .any(|&(b, sent)| Some(b) == block && !sent);
        if silent {
            self.arguments_piece(block, "{}")
        } else {
            None
        }
    }

    /// The end of the stream: the finish chunk if none went out yet, and the usage chunk if
    /// asked for.
    fn stop(&mut self) -> Option<ChatChunk> {
        self.done = true;
        let usage = self.include_usage.then(|| {
            ChatChunk::usage(
                self.id.clone(),
                self.model.clone(),
                self.created,
                self.usage.into_usage(),
            )
        });
        if self.finished {
            usage
        } else {
            // A stream that never said why it stopped still gets its finish chunk; the usage
            // chunk waits its turn.
            self.pending = usage;
            let reason = if self.tool_blocks.is_empty() {
                "stop"
            } else {
                "tool_calls"
            };
            Some(self.chunk(None, Some(reason)))
        }
    }

    /// The chunk an event becomes, if any; `Err` for an event that ends the stream with an
    /// error, classified (an `error` event is classified like the status Anthropic gives the
    /// same error, so that before the first text a route retries an overloaded target).
    fn on_event(&mut self, data: &str) -> Result<Option<ChatChunk>, (LlmErrorKind, String)> {
        let event: Value = serde_json::from_str(data).map_err(|e| {
            (
                LlmErrorKind::StreamInterrupted,
                format!("sent an event that is not JSON ({e})"),
            )
        })?;
        let kind = event
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let text = |pointer| event.pointer(pointer).and_then(Value::as_str);
        Ok(match kind {
            "message_start" => {
                self.id = text("/message/id").unwrap_or_default().to_owned();
                self.model = text("/message/model").unwrap_or_default().to_owned();
                self.usage.merge(usage_of(event.pointer("/message/usage")));
                None
            }
            "content_block_start"
                if text("/content_block/type") == Some("tool_use")
                    && self.json_tool.is_some()
                    && text("/content_block/name") == self.json_tool.as_deref() =>
            {
                self.json_block = event["index"].as_u64().map(|block| (block, false));
                None
            }
            "content_block_delta"
                if text("/delta/type") == Some("input_json_delta")
                    && self.json_block.map(|(block, _)| block) == event["index"].as_u64() =>
            {
                self.json_piece(text("/delta/partial_json").unwrap_or_default())
            }
            "content_block_start" if text("/content_block/type") == Some("tool_use") => {
                let block = event["index"].as_u64().unwrap_or_default();
                let index = self.tool_blocks.len();
                self.tool_blocks.push((block, false));
                let mut call = tool_call(
                    text("/content_block/id").unwrap_or_default(),
                    text("/content_block/name").unwrap_or_default(),
                    "",
                );
                call["index"] = index.into();
                Some(self.tool_call_chunk(call))
            }
            "content_block_start" => text("/content_block/text")
                .filter(|text| !text.is_empty())
                .map(|text| self.chunk(Some(text), None)),
            "content_block_delta" if text("/delta/type") == Some("text_delta") => {
                // An empty delta is no chunk: a route takes the first chunk as the answer
                // begun.
                text("/delta/text")
                    .filter(|text| !text.is_empty())
                    .map(|text| self.chunk(Some(text), None))
            }
            "content_block_delta" if text("/delta/type") == Some("input_json_delta") => self
                .arguments_piece(
                    event["index"].as_u64(),
                    text("/delta/partial_json").unwrap_or_default(),
                ),
            "content_block_stop" => self.block_stop(event["index"].as_u64()),
            "message_delta" => {
                self.usage.merge(usage_of(event.get("usage")));
                let reason = text("/delta/stop_reason").map(|reason| match reason {
                    // JSON mode's forced tool is the answer, not a call.
                    "tool_use" if self.json_block.is_some() => "stop",
                    reason => finish_reason(reason),
                });
                reason.map(|reason| self.chunk(None, Some(reason)))
            }
            "message_stop" => self.stop(),
            "error" => return Err(stream_error(&event, data)),
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

/// An Anthropic event stream as OpenAI chat chunks: a chunk per text delta (the first with the
/// role), a finish chunk, and a usage chunk if `include_usage`. It ends at `message_stop`; an `error`
/// event, a broken stream or one that ends before `message_stop` is an error item.
fn chat_chunks(
    upstream: Arc<Upstream>,
    response: http::Response<UpstreamBody>,
    include_usage: bool,
    json_tool: Option<String>,
) -> impl futures::Stream<Item = Result<ChatChunk, LlmError>> + Send + 'static {
    // Taken out at `message_stop`, to be read to its end in the background.
    let mut events = Some(Box::pin(sse_events(response, MAX_ANSWER)));
    let mut state = StreamState {
        id: String::new(),
        model: String::new(),
        created: unix_now(),
        usage: AnthropicUsage::default(),
        started: false,
        tool_blocks: Vec::new(),
        json_tool,
        json_block: None,
        include_usage,
        finished: false,
        pending: None,
        done: false,
    };
    let mut failed = false;
    futures::stream::poll_fn(move |cx| {
        loop {
            if let Some(chunk) = state.pending.take() {
                return std::task::Poll::Ready(Some(Ok(chunk)));
            }
            let Some(stream) = events.as_mut().filter(|_| !state.done && !failed) else {
                return std::task::Poll::Ready(None);
            };
            let item = match futures::ready!(stream.poll_next_unpin(cx)) {
                // Closed after its finish reason but before `message_stop`: the answer is whole.
                None if state.finished => match state.stop() {
                    Some(usage) => Ok(usage),
                    None => continue,
                },
                None => Err(upstream.interrupted("closed the stream before message_stop")),
                Some(Err(e)) => Err(upstream.interrupted(format_args!("stream broke off: {e}"))),
                Some(Ok(event)) => {
                    let item = state.on_event(&event.data);
                    if state.done
                        && let Some(rest) = events.take()
                    {
                        finish_in_background(rest);
                    }
                    match item {
                        Ok(Some(chunk)) => Ok(chunk),
                        Ok(None) => continue,
                        Err((kind, message)) => Err(upstream.stream_fault(kind, message)),
                    }
                }
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
            client.clone(),
            "https://api.anthropic.com/",
            Some(Secret::new("sk-ant-do-not-show".to_owned())),
        )
        .unwrap();
        assert_eq!(
            provider.upstream.url,
            "https://api.anthropic.com/v1/messages"
        );
        // A base URL written OpenAI's way, with /v1, means the same.
        let with_v1 = AnthropicProvider::new("c", client, "http://127.0.0.1:9/v1/", None).unwrap();
        assert_eq!(with_v1.upstream.url, "http://127.0.0.1:9/v1/messages");
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
    fn what_anthropic_would_refuse_is_mended_where_the_meaning_stays() {
        let translated = |body: Value| messages_request(&request(body), false).unwrap();
        // Both sampling knobs: newer models take only one, and temperature wins.
        let both = translated(
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                     "temperature": 0.3, "top_p": 0.9}),
        );
        assert_eq!(
            (&both["temperature"], both.get("top_p")),
            (&json!(0.3), None)
        );
        let top_p = translated(
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                      "temperature": null, "top_p": 0.9}),
        );
        assert_eq!(top_p["top_p"], 0.9);
        // Empty text is left out (an empty refusal the gateway itself answered comes back so),
        // and system parts stay apart.
        let body = translated(json!({"model": "m", "messages": [
            {"role": "system", "content": [{"type": "text", "text": "A."}, {"type": "text", "text": "B."}]},
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": [{"type": "text", "text": ""}, {"type": "text", "text": "y"}]},
            {"role": "user", "content": []}
        ]}));
        assert_eq!(body["system"], "A.\n\nB.");
        assert_eq!(
            body["messages"],
            json!([{"role": "user", "content": "x"},
                   {"role": "user", "content": [{"type": "text", "text": "y"}]}])
        );
        // Not when leaving a turn out would change whose turn begins or ends the conversation
        // (ending on the assistant's asks Anthropic to continue its answer), or leaves none.
        for messages in [
            json!([{"role": "system", "content": "s"}]),
            json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"},
                   {"role": "user", "content": "  "}]),
            json!([{"role": "user", "content": ""}, {"role": "assistant", "content": "Hello"},
                   {"role": "user", "content": "hi"}]),
        ] {
            let error =
                messages_request(&request(json!({"model": "m", "messages": messages})), false)
                    .unwrap_err();
            assert_eq!(
                (error.kind, error.param.as_deref()),
                (LlmErrorKind::Unsupported, Some("messages")),
                "{messages}"
            );
        }
        // An empty assistant turn at either end is simply left out.
        for messages in [
            json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]),
            json!([{"role": "assistant", "content": ""}, {"role": "user", "content": "hi"}]),
        ] {
            let body = translated(json!({"model": "m", "messages": messages}));
            assert_eq!(body["messages"], json!([{"role": "user", "content": "hi"}]));
        }
        // A tool result of empty parts is an empty result.
        let body = translated(json!({"model": "m", "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": ""}]}
        ]}));
        assert_eq!(body["messages"][2]["content"][0]["content"], "");
        // Tool-call arguments sent as an object are the input; the successor of `user` is
        // the user id too; a prompt-cache hint OpenAI keeps is dropped.
        let body = translated(json!({"model": "m", "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "r"}
        ], "safety_identifier": "u-7", "prompt_cache_key": "k"}));
        assert_eq!(
            body["messages"][1]["content"][0]["input"],
            json!({"city": "Paris"})
        );
        assert_eq!(body["metadata"], json!({"user_id": "u-7"}));
        assert_eq!(body.get("prompt_cache_key"), None);
    }

    #[test]
    fn a_request_no_target_can_serve_names_the_field_at_fault() {
        let user = json!({"role": "user", "content": "x"});
        for (body, field) in [
            (json!({"model": "m", "messages": [user], "stop": 5}), "stop"),
            (
                json!({"model": "m", "messages": [user], "tool_choice": "bogus"}),
                "tool_choice",
            ),
            (
                json!({"model": "m", "messages": [user], "user": 123}),
                "user",
            ),
            (
                json!({"model": "m", "messages": [{"role": "bot", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"model": "m", "messages": [user, {"role": "tool", "content": "r"}]}),
                "messages[1].tool_call_id",
            ),
            (
                json!({"model": "m", "messages": [user, {"role": "assistant", "content": null,
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]}),
                "messages[1].tool_calls[0].function.arguments",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}]}),
                "messages[0].content",
            ),
        ] {
            let error = messages_request(&request(body.clone()), false).unwrap_err();
            assert_eq!(error.kind, LlmErrorKind::BadRequest, "{body}");
            assert_eq!(error.param.as_deref(), Some(field), "{body}");
        }
    }

    #[test]
    fn what_cannot_be_translated_is_refused_by_name() {
        // A valid request this API cannot serve: the next target of a route may.
        let refused = |body: Value| {
            let error = messages_request(&request(body), false).unwrap_err();
            assert_eq!(error.kind, LlmErrorKind::Unsupported, "{}", error.message);
            error.message
        };
        let user = json!([{"role": "user", "content": "x"}]);
        assert_eq!(
            refused(json!({"model": "m", "messages": user, "temperature": 1.5})),
            "'temperature' above 1 is not supported"
        );
        // Each refusal names the field at fault, for the client's `param`.
        let param = |body: Value| messages_request(&request(body), false).unwrap_err().param;
        for (body, field) in [
            (json!({"model": "m", "messages": user, "n": 2}), "n"),
            (
                json!({"model": "m", "messages": user, "tools": [{"type": "custom"}]}),
                "tools[0].type",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}),
                "messages[0].content",
            ),
        ] {
            assert_eq!(param(body).as_deref(), Some(field));
        }
        assert_eq!(
            refused(json!({"model": "m", "messages": user, "functions": []})),
            "'functions' is not supported"
        );
        assert_eq!(
            refused(
                json!({"model": "m", "messages": user, "tools": [{"type": "custom", "custom": {"name": "c"}}]})
            ),
            "tools[0]: tools of type 'custom' are not supported"
        );
        assert_eq!(
            refused(json!({"model": "m", "messages": user, "n": 2})),
            "'n' is not supported"
        );
        assert_eq!(
            refused(
                json!({"model": "m", "messages": user, "response_format": {"type": "json_object"},
                           "tools": [{"type": "function", "function": {"name": "f"}}]})
            ),
            "'response_format' together with 'tools' is not supported"
        );
        assert_eq!(
            refused(
                json!({"model": "m", "messages": user, "response_format": {"type": "json_schema",
                           "json_schema": {"name": "list", "schema": {"type": "array"}}}})
            ),
            "'response_format': a JSON schema whose top level is not an object is not supported"
        );
        assert_eq!(
            refused(json!({"model": "m", "messages": [
                {"role": "user", "content": "x"},
                {"role": "function", "name": "f", "content": "42"}
            ]})),
            "messages[1]: legacy function results (role 'function') are not supported"
        );
        assert_eq!(
            refused(json!({"model": "m", "messages": [
                {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}
            ]})),
            "messages[0]: content parts of type 'input_audio' are not supported"
        );
        // A request no target can serve is the client's error.
        let bad = messages_request(
            &request(json!({"model": "m", "messages": user, "stop": 5})),
            false,
        )
        .unwrap_err();
        assert_eq!(bad.kind, LlmErrorKind::BadRequest);
    }

    #[test]
    fn tools_calls_and_results_are_translated() {
        let body = messages_request(
            &request(json!({
                "model": "m",
                "tools": [
                    {"type": "function", "function": {"name": "weather", "description": "Weather in a city",
                     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}, "strict": true}},
                    {"type": "function", "function": {"name": "now"}}
                ],
                "tool_choice": "required",
                "parallel_tool_calls": false,
                "messages": [
                    {"role": "user", "content": "Weather in Paris and Rome?"},
                    {"role": "assistant", "content": null, "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                        {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Rome\"}"}}
                    ]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
                    {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "24 C"}]},
                    {"role": "assistant", "content": "Paris 18 C, Rome 24 C. Checking the time.", "tool_calls": [
                        {"id": "call_3", "type": "function", "function": {"name": "now", "arguments": "{}"}}
                    ]},
                    {"role": "tool", "tool_call_id": "call_3", "content": "noon"}
                ]
            })),
            false,
        )
        .unwrap();
        assert_eq!(
            body["tools"],
            json!([
                {"name": "weather", "description": "Weather in a city",
                 "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
                {"name": "now", "input_schema": {"type": "object"}}
            ])
        );
        assert_eq!(
            body["tool_choice"],
            json!({"type": "any", "disable_parallel_tool_use": true})
        );
        assert_eq!(
            body["messages"],
            json!([
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "call_2", "name": "weather", "input": {"city": "Rome"}}
                ]},
                // Both results in one user turn.
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "18 C"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "24 C"}]}
                ]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Paris 18 C, Rome 24 C. Checking the time."},
                    {"type": "tool_use", "id": "call_3", "name": "now", "input": {}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "call_3", "content": "noon"}
                ]}
            ])
        );

        let choice = |tool_choice: Value| {
            let body = messages_request(
                &request(
                    json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                "tools": [{"type": "function", "function": {"name": "f"}}],
                                "tool_choice": tool_choice}),
                ),
                false,
            );
            body.map(|b| b["tool_choice"].clone())
        };
        assert_eq!(choice(json!("auto")).unwrap(), json!({"type": "auto"}));
        assert_eq!(choice(json!("none")).unwrap(), json!({"type": "none"}));
        assert_eq!(
            choice(json!({"type": "function", "function": {"name": "f"}})).unwrap(),
            json!({"type": "tool", "name": "f"})
        );
        assert_eq!(
            choice(json!("sometimes")).unwrap_err().kind,
            LlmErrorKind::BadRequest
        );
        // Arguments Anthropic cannot take as an input object are the client's error.
        let bad_arguments = messages_request(
            &request(json!({"model": "m", "messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "not json"}}]}
            ]})),
            false,
        )
        .unwrap_err();
        assert_eq!(bad_arguments.kind, LlmErrorKind::BadRequest);
        assert_eq!(
            bad_arguments.message,
            "messages[1].tool_calls[0]: function.arguments must be a JSON object (Anthropic takes the input as one)"
        );
    }

    #[test]
    fn json_mode_is_a_forced_tool_whose_input_is_the_answer() {
        let schema = json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]});
        let ask = |format: Value| {
            request(
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
                           "response_format": format}),
            )
        };
        let with_schema = ask(json!({"type": "json_schema",
            "json_schema": {"name": "place", "schema": schema, "strict": true}}));
        let body = messages_request(&with_schema, false).unwrap();
        assert_eq!(
            body["tools"],
            json!([{"name": "place", "description": "Answer with JSON that matches this schema.",
                    "input_schema": schema}])
        );
        assert_eq!(
            body["tool_choice"],
            json!({"type": "tool", "name": "place"})
        );
        assert_eq!(json_tool_name(&with_schema).as_deref(), Some("place"));
        let any_object = ask(json!({"type": "json_object"}));
        let body = messages_request(&any_object, false).unwrap();
        assert_eq!(body["tools"][0]["name"], "json_response");
        assert_eq!(body["tools"][0]["input_schema"], json!({"type": "object"}));
        let text = ask(json!({"type": "text"}));
        assert!(
            messages_request(&text, false)
                .unwrap()
                .get("tools")
                .is_none()
        );
        assert_eq!(json_tool_name(&text), None);

        let message: MessageResponse = serde_json::from_value(json!({
            "id": "msg_j", "model": "c", "stop_reason": "tool_use",
            "content": [{"type": "text", "text": "Here it is:"},
                        {"type": "tool_use", "id": "toolu_j", "name": "place", "input": {"city": "Paris"}}],
            "usage": {"input_tokens": 10, "output_tokens": 5}
        }))
        .unwrap();
        let response = serde_json::to_value(message.into_chat_response(Some("place"))).unwrap();
        assert_eq!(
            response["choices"][0],
            json!({"index": 0, "finish_reason": "stop",
                   "message": {"role": "assistant", "content": "{\"city\":\"Paris\"}"}})
        );
    }

    /// A stream whose answer is a call of tool `name` with input `{"city": "Paris"}`, after
    /// some text if `text` is given.
    fn tool_use_stream(text: Option<&str>, name: &str) -> http::Response<UpstreamBody> {
        let event = |kind: &str, data: Value| (kind.to_owned(), data.to_string());
        let mut events = vec![event(
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_s", "model": "c", "usage": {"input_tokens": 5}}}),
        )];
        if let Some(text) = text {
            events.push(event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ));
            events.push(event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}),
            ));
        }
        let index = usize::from(text.is_some());
        events.push(event(
            "content_block_start",
            json!({"type": "content_block_start", "index": index,
                   "content_block": {"type": "tool_use", "id": "toolu_9", "name": name, "input": {}}}),
        ));
        for piece in ["", "{\"city\": ", "\"Paris\"}"] {
            events.push(event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index,
                       "delta": {"type": "input_json_delta", "partial_json": piece}}),
            ));
        }
        events.push(event(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}}),
        ));
        events.push(event("message_stop", json!({"type": "message_stop"})));
        let borrowed: Vec<(&str, &str)> = events
            .iter()
            .map(|(kind, data)| (kind.as_str(), data.as_str()))
            .collect();
        sse_response(&borrowed)
    }

    /// Each chunk's delta and finish reason.
    async fn deltas(
        response: http::Response<UpstreamBody>,
        json_tool: Option<&str>,
    ) -> Vec<(Value, Value)> {
        chat_chunks(upstream(), response, false, json_tool.map(str::to_owned))
            .map(|chunk| {
                let chunk = serde_json::to_value(chunk.unwrap()).unwrap();
                (
                    chunk["choices"][0]["delta"].clone(),
                    chunk["choices"][0]["finish_reason"].clone(),
                )
            })
            .collect()
            .await
    }

    #[tokio::test]
    async fn json_mode_streams_the_forced_tools_input_as_text() {
        let stream = tool_use_stream(None, JSON_TOOL);
        assert_eq!(
            deltas(stream, Some(JSON_TOOL)).await,
            [
                (
                    json!({"role": "assistant", "content": "{\"city\": "}),
                    Value::Null
                ),
                (json!({"content": "\"Paris\"}"}), Value::Null),
                (json!({}), json!("stop")),
            ]
        );
    }

    #[test]
    fn what_sdks_send_for_no_calls_or_no_arguments_is_taken_as_such() {
        // openai-python's `model_dump()` writes every field; some servers stream a call without
        // parameters as "" arguments.
        let body = messages_request(
            &request(json!({"model": "m",
                "tools": [{"type": "function", "function": {"name": "now", "description": null}}],
                "messages": [
                    {"role": "user", "content": "x", "function_call": null, "tool_calls": null},
                    {"role": "assistant", "content": "y", "tool_calls": []},
                    {"role": "assistant", "content": null, "function_call": null, "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "now", "arguments": ""}}]},
                    {"role": "tool", "tool_call_id": "c1", "content": "noon"}
                ]})),
            false,
        )
        .unwrap();
        assert_eq!(
            body["tools"],
            json!([{"name": "now", "input_schema": {"type": "object"}}])
        );
        assert_eq!(
            body["messages"][1],
            json!({"role": "assistant", "content": "y"})
        );
        assert_eq!(
            body["messages"][2]["content"],
            json!([{"type": "tool_use", "id": "c1", "name": "now", "input": {}}])
        );
        let allowed_tools = messages_request(
            &request(json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
                "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}})),
            false,
        )
        .unwrap_err();
        assert_eq!(allowed_tools.kind, LlmErrorKind::Unsupported);
        assert_eq!(
            allowed_tools.message,
            "'tool_choice' of type \"allowed_tools\" is not supported"
        );
    }

    #[tokio::test]
    async fn a_streamed_call_without_arguments_gets_an_empty_object() {
        let events = |name: &str| {
            let start = json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "tool_use", "id": "toolu_0", "name": name, "input": {}}});
            let empty = json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": ""}});
            vec![
                (
                    "message_start",
                    json!({"type": "message_start", "message": {"id": "m", "model": "c"}})
                        .to_string(),
                ),
                ("content_block_start", start.to_string()),
                ("content_block_delta", empty.to_string()),
                (
                    "content_block_stop",
                    json!({"type": "content_block_stop", "index": 0}).to_string(),
                ),
                ("message_stop", json!({"type": "message_stop"}).to_string()),
            ]
        };
        let stream = |name: &str| {
            let events = events(name);
            let borrowed: Vec<(&str, &str)> =
                events.iter().map(|(k, d)| (*k, d.as_str())).collect();
            sse_response(&borrowed)
        };
        assert_eq!(
            deltas(stream("now"), None).await,
            [
                (
                    json!({"role": "assistant", "tool_calls": [{"index": 0, "id": "toolu_0", "type": "function",
                                                                "function": {"name": "now", "arguments": ""}}]}),
                    Value::Null
                ),
                (
                    json!({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
                    Value::Null
                ),
                // No message_delta said why it stopped: message_stop still brings a finish,
                // which says the calls are the answer.
                (json!({}), json!("tool_calls")),
            ]
        );
        assert_eq!(
            deltas(stream(JSON_TOOL), Some(JSON_TOOL)).await,
            [
                (json!({"role": "assistant", "content": "{}"}), Value::Null),
                (json!({}), json!("stop")),
            ]
        );
        // The usage chunk, asked for, comes after that finish.
        let with_usage: Vec<ChatChunk> = chat_chunks(upstream(), stream("now"), true, None)
            .map(Result::unwrap)
            .collect()
            .await;
        let [.., finish, usage] = &with_usage[..] else {
            panic!("{with_usage:?}");
        };
        assert_eq!(
            finish.choices[0].finish_reason.as_deref(),
            Some("tool_calls")
        );
        assert!(
            usage.choices.is_empty() && usage.usage.is_some(),
            "{usage:?}"
        );
    }

    #[test]
    fn tool_use_answers_become_tool_calls() {
        let message: MessageResponse = serde_json::from_value(json!({
            "id": "msg_t", "type": "message", "role": "assistant", "model": "claude-test",
            "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}
            ],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 10, "output_tokens": 5}
        }))
        .unwrap();
        let response = serde_json::to_value(message.into_chat_response(None)).unwrap();
        assert_eq!(
            response["choices"][0],
            json!({"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": null, "tool_calls": [
                    {"id": "toolu_1", "type": "function",
                     "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}}
                ]
            }})
        );
    }

    #[tokio::test]
    async fn streamed_tool_use_becomes_streamed_tool_calls() {
        let stream = tool_use_stream(Some("Checking."), "weather");
        assert_eq!(
            deltas(stream, None).await,
            [
                (
                    json!({"role": "assistant", "content": "Checking."}),
                    Value::Null
                ),
                (
                    json!({"tool_calls": [{"index": 0, "id": "toolu_9", "type": "function",
                                           "function": {"name": "weather", "arguments": ""}}]}),
                    Value::Null
                ),
                (
                    json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\": "}}]}),
                    Value::Null
                ),
                (
                    json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}),
                    Value::Null
                ),
                (json!({}), json!("tool_calls")),
            ]
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
        let response = message.into_chat_response(None);
        assert_eq!(response.id, "msg_1");
        assert_eq!(response.model, "claude-test");
        assert_eq!(response.object, "chat.completion");
        assert_eq!(response.text(), "Bonjour !");
        assert_eq!(response.choices[0].finish_reason.as_deref(), Some("length"));
        let mut usage = Usage::new(15, 5);
        usage
            .extra
            .insert("prompt_tokens_details".into(), json!({"cached_tokens": 3}));
        assert_eq!(response.usage, Some(usage));
    }

    /// A stream as Anthropic sends it, `event:` lines included.
    fn anthropic_stream(with_stop: bool) -> http::Response<UpstreamBody> {
        let mut events = anthropic_events();
        if !with_stop {
            events.pop();
        }
        sse_response(&events)
    }

    /// The events of [`anthropic_stream`], ending with `message_stop`.
    fn anthropic_events() -> Vec<(&'static str, &'static str)> {
        vec![
            (
                "message_start",
                r#"{"type":"message_start","message":{"id":"msg_2","type":"message","role":"assistant","model":"claude-test","content":[],"stop_reason":null,"usage":{"input_tokens":12,"output_tokens":1,"cache_read_input_tokens":3}}}"#,
            ),
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            ),
            ("ping", r#"{"type":"ping"}"#),
            // An empty delta makes no chunk.
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":""}}"#,
            ),
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
                r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"input_tokens":12,"output_tokens":2}}"#,
            ),
            ("message_stop", r#"{"type":"message_stop"}"#),
        ]
    }

    fn upstream() -> Arc<Upstream> {
        crate::upstream::tests::test_upstream("claude")
    }

    #[tokio::test]
    async fn streams_become_chat_chunks_with_usage_when_asked() {
        let chunks: Vec<ChatChunk> = chat_chunks(upstream(), anthropic_stream(true), true, None)
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
                chunk(json!({"role": "assistant", "content": "Hel"}), Value::Null),
                chunk(json!({"content": "lo"}), Value::Null),
                chunk(json!({}), json!("stop")),
                // 12 input + 3 cache reads from message_start; 2 output from message_delta.
                json!({"id": "msg_2", "object": "chat.completion.chunk", "model": "claude-test",
                       "choices": [], "usage": {"prompt_tokens": 15, "completion_tokens": 2, "total_tokens": 17,
                                                "prompt_tokens_details": {"cached_tokens": 3}}}),
            ]
        );
        // Closed after the finish reason but before `message_stop`: the same answer, whole
        // (`created` aside: the clock may have ticked).
        let unstopped: Vec<ChatChunk> =
            chat_chunks(upstream(), anthropic_stream(false), true, None)
                .map(|chunk| ChatChunk {
                    created: chunks[0].created,
                    ..chunk.unwrap()
                })
                .collect()
                .await;
        assert_eq!(unstopped, chunks);

        let without_usage: Vec<_> = chat_chunks(upstream(), anthropic_stream(true), false, None)
            .collect()
            .await;
        assert_eq!(without_usage.len(), 3);
    }

    #[tokio::test]
    async fn a_stream_that_errs_or_ends_early_ends_with_an_error() {
        // Cut before its finish reason.
        let events = anthropic_events();
        let cut_at = events.iter().position(|(kind, _)| *kind == "message_delta");
        let cut = sse_response(&events[..cut_at.unwrap()]);
        let cut: Vec<_> = chat_chunks(upstream(), cut, true, None).collect().await;
        assert_eq!(cut.len(), 3);
        assert!(cut[..2].iter().all(Result::is_ok));
        let error = cut[2].as_ref().unwrap_err();
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
        // Before any text no chunk went out, so a route may still retry or fall back.
        let items: Vec<_> = chat_chunks(upstream(), overloaded, true, None)
            .collect()
            .await;
        assert_eq!(items.len(), 1);
        let error = items[0].as_ref().unwrap_err();
        assert_eq!(
            error.message,
            "provider 'claude' sent an error in the stream: Overloaded"
        );
        assert!(
            error.is_retryable(),
            "like Anthropic's 529: {:?}",
            error.kind
        );

        // An error event that quotes the key the gateway sent: cut out.
        let quoting = sse_response(&[(
            "error",
            r#"{"type":"error","error":{"type":"api_error","message":"bad x-api-key sk-ant-secret-123"}}"#,
        )]);
        let keyed = crate::upstream::tests::test_upstream_with_key(
            "claude",
            http::HeaderName::from_static("x-api-key"),
            "sk-ant-secret-123",
        );
        let items: Vec<_> = chat_chunks(keyed, quoting, true, None).collect().await;
        assert_eq!(
            items[0].as_ref().unwrap_err().message,
            "provider 'claude' sent an error in the stream: bad x-api-key [redacted]"
        );

        let too_large = sse_response(&[(
            "error",
            r#"{"type":"error","error":{"type":"request_too_large","message":"Too large"}}"#,
        )]);
        let items: Vec<_> = chat_chunks(upstream(), too_large, true, None)
            .collect()
            .await;
        let error = items[0].as_ref().unwrap_err();
        assert_eq!(
            error.kind,
            LlmErrorKind::Status {
                status: 413,
                retry_after: None
            }
        );
        assert!(!error.is_retryable(), "{:?}", error.kind);
        for (error_type, status) in [("timeout_error", 504), ("billing_error", 402)] {
            let (kind, _) = stream_error(&json!({ "error": { "type": error_type } }), "");
            let expected = LlmErrorKind::Status {
                status,
                retry_after: None,
            };
            assert_eq!(kind, expected);
        }
    }
}
