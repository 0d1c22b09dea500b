//! Anthropic targets: OpenAI-shaped requests translated to the Messages API and its answers and
//! streams translated back, against a fake `/v1/messages` on 127.0.0.1.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

use crate::common::{
    FakeUpstream, Reply, TestGateway, header, read_stream, refilled_since, sse_data, stream_text,
};

/// What the fake answers, in order.
enum Answer {
    /// A message with this text (or, to a streaming request, a stream of its words).
    Text(&'static str),
    /// An error status with Anthropic's error body.
    Status(u16, &'static str),
    /// A call of the named tool with this input (streamed: the input in two pieces).
    ToolUse(&'static str, Value),
}

/// One request the fake received: its body, `x-api-key` and `anthropic-version`.
type Received = (Value, Option<String>, Option<String>);

#[derive(Clone, Default)]
struct FakeAnthropic {
    script: Arc<Mutex<VecDeque<Answer>>>,
    received: Arc<Mutex<Vec<Received>>>,
}

impl FakeAnthropic {
    /// Serves `script` on 127.0.0.1; returns the fake and its base URL.
    async fn start(script: Vec<Answer>) -> (Self, String) {
        let fake = Self {
            script: Arc::new(Mutex::new(script.into())),
            ..Self::default()
        };
        let app = Router::new()
            .route("/v1/messages", post(messages))
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (fake, format!("http://{address}"))
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

async fn messages(
    State(fake): State<FakeAnthropic>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    let header = |name| headers.get(name).map(|v| v.to_str().unwrap().to_owned());
    fake.received.lock().unwrap().push((
        body.clone(),
        header("x-api-key"),
        header("anthropic-version"),
    ));
    let answer = fake.script.lock().unwrap().pop_front();
    let text = match answer {
        Some(Answer::Text(text)) => text,
        Some(Answer::ToolUse(name, input)) => return tool_use(&body, name, &input),
        Some(Answer::Status(status, kind)) => {
            let error = json!({"type": "error", "error": {"type": kind, "message": format!("fake says {kind}")}});
            return (StatusCode::from_u16(status).unwrap(), axum::Json(error)).into_response();
        }
        None => "no script left",
    };
    let model = body["model"].clone();
    // The fake counts 10 input tokens per message and an output token per word.
    let input = body["messages"].as_array().map_or(0, Vec::len) * 10;
    let output = text.split_whitespace().count();
    if body["stream"] != json!(true) {
        return axum::Json(json!({
            "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": input, "output_tokens": output}
        }))
        .into_response();
    }
    let mut events = vec![
        (
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_fake", "type": "message", "role": "assistant",
                   "model": model, "content": [], "usage": {"input_tokens": input, "output_tokens": 1}}}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        ("ping", json!({"type": "ping"})),
    ];
    for word in text.split_inclusive(' ') {
        events.push((
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}}),
        ));
    }
    events.extend([
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                   "usage": {"output_tokens": output}}),
        ),
        ("message_stop", json!({"type": "message_stop"})),
    ]);
    let body: String = events
        .iter()
        .map(|(name, data)| format!("event: {name}\ndata: {data}\n\n"))
        .collect();
    ([("content-type", "text/event-stream")], body).into_response()
}

/// A `tool_use` answer, as a message or as a stream.
fn tool_use(request: &Value, name: &str, input: &Value) -> Response {
    let model = request["model"].clone();
    let block = json!({"type": "tool_use", "id": "toolu_fake", "name": name, "input": input});
    if request["stream"] != json!(true) {
        return axum::Json(json!({
            "id": "msg_tool", "type": "message", "role": "assistant", "model": model,
            "content": [block], "stop_reason": "tool_use",
            "usage": {"input_tokens": 20, "output_tokens": 7}
        }))
        .into_response();
    }
    let arguments = input.to_string();
    let (first, second) = arguments.split_at(arguments.len() / 2);
    let mut events = vec![
        json!({"type": "message_start", "message": {"id": "msg_tool", "type": "message", "role": "assistant",
               "model": model, "content": [], "usage": {"input_tokens": 20, "output_tokens": 1}}}),
        json!({"type": "content_block_start", "index": 0,
               "content_block": {"type": "tool_use", "id": "toolu_fake", "name": name, "input": {}}}),
    ];
    for piece in ["", first, second] {
        events.push(json!({"type": "content_block_delta", "index": 0,
                           "delta": {"type": "input_json_delta", "partial_json": piece}}));
    }
    events.extend([
        json!({"type": "content_block_stop", "index": 0}),
        json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 7}}),
        json!({"type": "message_stop"}),
    ]);
    let body: String = events
        .iter()
        .map(|data| {
            format!(
                "event: {}\ndata: {data}\n\n",
                data["type"].as_str().unwrap()
            )
        })
        .collect();
    ([("content-type", "text/event-stream")], body).into_response()
}

fn config(anthropic: &str, extra: &str) -> String {
    format!(
        r#"
        [providers.claude]
        kind = "anthropic"
        base_url = "{anthropic}"
        api_key = "${{TEST_ANTHROPIC_KEY}}"
        [routes.main]
        targets = [{{ provider = "claude", model = "claude-test" }}]
        retries = 0
        [[endpoints]]
        name = "chat"
        route = "main"
        {extra}
        "#
    )
}

async fn gateway(config: &str) -> TestGateway {
    TestGateway::start_with_env(config, &[("TEST_ANTHROPIC_KEY", "sk-ant-test-key")]).await
}

#[tokio::test]
async fn an_anthropic_target_answers_in_openai_shape_as_json_and_as_a_stream() {
    let (fake, url) = FakeAnthropic::start(vec![
        Answer::Text("Bonjour !"),
        Answer::Text("streamed in words"),
        Answer::Text("counted not shown"),
        Answer::Text("fourth"),
    ])
    .await;
    let gateway = gateway(&config(
        &url,
        "[[limits]]\nscope = [\"global\"]\ntokens_per_minute = 1000\ndefault_max_tokens = 100\n",
    ))
    .await;
    let start = std::time::Instant::now();

    let response = gateway
        .post(
            "/v1/chat/completions",
            &json!({"model": "chat", "max_tokens": 50, "messages": [
                {"role": "system", "content": "Answer in French."},
                {"role": "user", "content": "Hello"}
            ]}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "claude-test");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"], "Bonjour !");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12})
    );
    let (sent, key, version) = fake.received()[0].clone();
    assert_eq!(
        sent,
        json!({"model": "claude-test", "max_tokens": 50, "system": "Answer in French.",
               "messages": [{"role": "user", "content": "Hello"}]})
    );
    assert_eq!(key.as_deref(), Some("sk-ant-test-key"));
    assert_eq!(version.as_deref(), Some("2023-06-01"));

    let response = gateway
        .post(
            "/v1/chat/completions",
            &json!({"model": "chat", "stream": true, "stream_options": {"include_usage": true},
                    "messages": [{"role": "user", "content": "Stream please"}]}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let frames = sse_data(&read_stream(response).await);
    assert_eq!(stream_text(&frames), "streamed in words");
    assert_eq!(frames.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = frames[..frames.len() - 1]
        .iter()
        .map(|f| serde_json::from_str(f).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        chunks.last().unwrap()["usage"],
        json!({"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13})
    );
    let (sent, _, _) = fake.received()[1].clone();
    assert_eq!(sent["stream"], true);
    assert_eq!(sent["max_tokens"], 4096, "the default when none is given");

    // Under a token rule the gateway needs the usage; a client that did not ask does not get it.
    let response = gateway
        .post(
            "/v1/chat/completions",
            &json!({"model": "chat", "stream": true, "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    let frames = sse_data(&read_stream(response).await);
    assert_eq!(stream_text(&frames), "counted not shown");
    assert!(
        !frames.iter().any(|f| f.contains("\"usage\"")),
        "{frames:#?}"
    );
    assert_eq!(frames.last().unwrap(), "[DONE]");

    // Each call was settled with Anthropic's usage: 12 + 13 + 13 tokens, so after this one's
    // reservation of 2 (8 characters / 4) + 1 there are 1000 - 38 - 3 = 959 left (+ refill).
    let next = gateway
        .post(
            "/v1/chat/completions",
            &json!({"model": "chat", "max_tokens": 1, "messages": [{"role": "user", "content": "12345678"}]}),
        )
        .await;
    let remaining: u64 = header(&next, "x-ratelimit-remaining-tokens")
        .parse()
        .unwrap();
    assert!(
        (959..=959 + refilled_since(start)).contains(&remaining),
        "{remaining}"
    );
}

#[tokio::test]
async fn overloaded_or_untranslatable_anthropic_calls_fall_back_and_are_400s_with_no_target_left() {
    let (fake, url) = FakeAnthropic::start(vec![Answer::Status(529, "overloaded_error")]).await;
    let openai = FakeUpstream::start(vec![Reply::Text("from the fallback")]).await;
    let gateway = gateway(&format!(
        r#"
        [providers.claude]
        kind = "anthropic"
        base_url = "{url}"
        api_key = "${{TEST_ANTHROPIC_KEY}}"
        [providers.fake]
        kind = "openai"
        base_url = "{}"
        [routes.main]
        targets = [{{ provider = "claude", model = "claude-test" }}, {{ provider = "fake", model = "m" }}]
        retries = 0
        [routes.claude_only]
        targets = [{{ provider = "claude", model = "claude-test" }}]
        [[endpoints]]
        name = "chat"
        route = "main"
        [[endpoints]]
        name = "claude"
        route = "claude_only"
        "#,
        openai.base_url
    ))
    .await;

    let response = gateway
        .post(
            "/v1/chat/completions",
            &json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "from the fallback"
    );
    assert_eq!(fake.received().len(), 1, "529 is Anthropic's overload");

    // Log probabilities cannot be translated: not sent to Anthropic, but the OpenAI target
    // serves them.
    let response = gateway
        .post(
            "/v1/chat/completions",
            &json!({"model": "chat", "logprobs": true, "messages": [{"role": "user", "content": "echo me"}]}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "echo me");
    assert_eq!(openai.requests()[1].body["logprobs"], true);
    // With no other target, the client learns why, naming the field.
    let response = gateway
        .post(
            "/v1/chat/completions",
            &json!({"model": "claude", "logprobs": true, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("provider 'claude' (Anthropic): 'logprobs' is not supported"),
        "{message}"
    );
    assert_eq!(body["error"]["param"], "logprobs");
    assert_eq!(fake.received().len(), 1, "nothing untranslatable was sent");
    assert_eq!(openai.requests().len(), 2);
}

#[tokio::test]
async fn tool_calls_go_to_anthropic_and_come_back_in_openai_shape() {
    let weather = json!({"city": "Paris"});
    let (fake, url) = FakeAnthropic::start(vec![
        Answer::ToolUse("weather", weather.clone()),
        Answer::ToolUse("weather", weather.clone()),
        Answer::Text("18 C in Paris."),
        Answer::ToolUse("place", weather.clone()),
        Answer::ToolUse("place", weather.clone()),
    ])
    .await;
    let gateway = gateway(&config(&url, "")).await;
    let tools = json!([{"type": "function", "function": {"name": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let ask = json!({"role": "user", "content": "Weather in Paris?"});

    let response = gateway
        .post(
            "/v1/chat/completions",
            &json!({"model": "chat", "tools": tools, "tool_choice": "auto", "messages": [ask]}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let call = json!({"id": "toolu_fake", "type": "function",
                      "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}});
    assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(body["choices"][0]["message"]["content"], Value::Null);
    assert_eq!(body["choices"][0]["message"]["tool_calls"], json!([call]));
    let (sent, _, _) = fake.received()[0].clone();
    assert_eq!(
        sent["tools"],
        json!([{"name": "weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}])
    );
    assert_eq!(sent["tool_choice"], json!({"type": "auto"}));

    // Streamed: the call's id and name first, then its arguments in pieces, as OpenAI streams.
    let response = gateway
        .post(
            "/v1/chat/completions",
            &json!({"model": "chat", "stream": true, "tools": tools, "messages": [ask]}),
        )
        .await;
    let frames = sse_data(&read_stream(response).await);
    assert_eq!(frames.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = frames[..frames.len() - 1]
        .iter()
        .map(|f| serde_json::from_str(f).unwrap())
        .collect();
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"].get("tool_calls"))
        .collect();
    assert_eq!(calls[0][0]["id"], "toolu_fake");
    assert_eq!(calls[0][0]["function"]["name"], "weather");
    let arguments: String = calls
        .iter()
        .map(|c| c[0]["function"]["arguments"].as_str().unwrap())
        .collect();
    assert_eq!(serde_json::from_str::<Value>(&arguments).unwrap(), weather);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "tool_calls"
    );

    // The call and its result go back: as tool_use and tool_result blocks.
    let response = gateway
        .post(
            "/v1/chat/completions",
            &json!({"model": "chat", "tools": tools, "messages": [
                ask,
                {"role": "assistant", "content": null, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "toolu_fake", "content": "18 C"}
            ]}),
        )
        .await;
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "18 C in Paris.");
    let (sent, _, _) = fake.received()[2].clone();
    assert_eq!(
        sent["messages"],
        json!([
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_fake", "name": "weather", "input": {"city": "Paris"}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_fake", "content": "18 C"}
            ]}
        ])
    );

    // JSON mode: a forced tool whose input is the answer's text.
    let json_mode = json!({"model": "chat", "messages": [ask], "response_format": {"type": "json_schema",
        "json_schema": {"name": "place", "schema": {"type": "object", "properties": {"city": {"type": "string"}}}}}});
    let body: Value = gateway
        .post("/v1/chat/completions", &json_mode)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(serde_json::from_str::<Value>(content).unwrap(), weather);
    assert!(body["choices"][0]["message"].get("tool_calls").is_none());
    let (sent, _, _) = fake.received()[3].clone();
    assert_eq!(
        sent["tool_choice"],
        json!({"type": "tool", "name": "place"})
    );
    let mut streamed = json_mode.clone();
    streamed["stream"] = json!(true);
    let response = gateway.post("/v1/chat/completions", &streamed).await;
    let frames = sse_data(&read_stream(response).await);
    assert_eq!(
        serde_json::from_str::<Value>(&stream_text(&frames)).unwrap(),
        weather
    );
}
