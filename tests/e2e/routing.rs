//! Retries, fallbacks, deadlines and broken streams.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{
    FakeUpstream, Reply, TestGateway, chat_body, closed_port_url, read_stream, sse_data,
    stream_text,
};

fn stream_body(content: &str) -> Value {
    let mut body = chat_body(content);
    body["stream"] = json!(true);
    body
}

#[tokio::test]
async fn upstream_500_is_retried_then_succeeds() {
    let upstream = FakeUpstream::start(vec![Reply::Status(500, vec![])]).await;
    let gateway = TestGateway::over(&[&upstream.base_url], "retries = 2").await;
    let response = gateway
        .post("/v1/chat/completions", &chat_body("again"))
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "again");
    assert_eq!(upstream.requests().len(), 2);
}

#[tokio::test]
async fn persistent_5xx_is_502_naming_the_upstream_status() {
    let upstream = FakeUpstream::start(vec![Reply::Status(503, vec![]); 3]).await;
    let gateway = TestGateway::over(&[&upstream.base_url], "retries = 2").await;
    let response = gateway.post("/v1/chat/completions", &chat_body("x")).await;
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("HTTP 503"), "{message}");
    assert!(message.contains("fake upstream says 503"), "{message}");
    assert_eq!(upstream.requests().len(), 3, "first try + 2 retries");
}

#[tokio::test]
async fn first_target_down_falls_back_to_the_second() {
    let down = closed_port_url().await;
    let upstream = FakeUpstream::start(vec![]).await;
    let gateway = TestGateway::over(&[&down, &upstream.base_url], "retries = 1").await;
    let response = gateway
        .post("/v1/chat/completions", &chat_body("fallback please"))
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "fallback please");
    let requests = upstream.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0].body["model"], "model-1",
        "the second target's model"
    );
}

#[tokio::test]
async fn a_429_retry_after_is_honoured_on_retry() {
    let upstream =
        FakeUpstream::start(vec![Reply::Status(429, vec![("retry-after-ms", "300")])]).await;
    let gateway = TestGateway::over(&[&upstream.base_url], "retries = 1").await;
    let started = Instant::now();
    let response = gateway
        .post("/v1/chat/completions", &chat_body("patience"))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.requests().len(), 2);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "waited {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_429_that_outlasts_the_retries_reaches_the_client_with_retry_after() {
    let upstream = FakeUpstream::start(vec![Reply::Status(429, vec![("retry-after", "7")])]).await;
    let gateway = TestGateway::over(&[&upstream.base_url], "retries = 0").await;
    let response = gateway.post("/v1/chat/completions", &chat_body("x")).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
}

#[tokio::test]
async fn a_retry_after_longer_than_the_deadline_moves_on_to_the_next_target() {
    let limited = FakeUpstream::start(vec![Reply::Status(429, vec![("retry-after", "60")])]).await;
    let spare = FakeUpstream::start(vec![]).await;
    let gateway = TestGateway::over(
        &[&limited.base_url, &spare.base_url],
        "retries = 3\ntimeout_ms = 5000",
    )
    .await;
    let started = Instant::now();
    let response = gateway.post("/v1/chat/completions", &chat_body("x")).await;
    assert_eq!(response.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(limited.requests().len(), 1);
    assert_eq!(spare.requests().len(), 1);
}

#[tokio::test]
async fn upstream_client_errors_pass_through_without_retry() {
    let upstream = FakeUpstream::start(vec![Reply::Status(400, vec![])]).await;
    let spare = FakeUpstream::start(vec![]).await;
    let gateway = TestGateway::over(&[&upstream.base_url, &spare.base_url], "retries = 2").await;
    let response = gateway.post("/v1/chat/completions", &chat_body("x")).await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("fake upstream says 400")
    );
    // The field at fault and the code, as the upstream named them.
    assert_eq!(body["error"]["param"], "messages");
    assert_eq!(body["error"]["code"], "fake_client_error");
    assert_eq!(upstream.requests().len(), 1);
    assert!(spare.requests().is_empty());
}

#[tokio::test]
async fn an_upstream_404_falls_back_without_retry_and_the_last_one_is_passed_on() {
    // A model the first provider does not have (retired, or a missing deployment): the next
    // target answers.
    let retired =
        FakeUpstream::start(vec![Reply::Status(404, vec![]), Reply::Status(404, vec![])]).await;
    let spare = FakeUpstream::start(vec![]).await;
    let gateway = TestGateway::over(&[&retired.base_url, &spare.base_url], "retries = 2").await;
    let response = gateway.post("/v1/chat/completions", &chat_body("x")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(retired.requests().len(), 1);
    assert_eq!(spare.requests().len(), 1);

    // With no other target, the 404 is the client's answer.
    let alone = TestGateway::over(&[&retired.base_url], "retries = 2").await;
    let response = alone.post("/v1/chat/completions", &chat_body("x")).await;
    assert_eq!(response.status(), 404);
    assert_eq!(retired.requests().len(), 2);
}

#[tokio::test]
async fn an_upstream_slower_than_the_timeout_is_504_within_the_deadline() {
    let upstream = FakeUpstream::start(vec![Reply::Delay(
        Duration::from_secs(30),
        Box::new(Reply::Echo),
    )])
    .await;
    let gateway = TestGateway::over(&[&upstream.base_url], "timeout_ms = 300\nretries = 0").await;
    let started = Instant::now();
    let response = gateway.post("/v1/chat/completions", &chat_body("x")).await;
    let elapsed = started.elapsed();
    assert_eq!(response.status(), 504);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_timeout");
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(
        elapsed < Duration::from_secs(3),
        "504 must come at the deadline, came after {elapsed:?}"
    );
}

#[tokio::test]
async fn a_stream_with_no_first_token_in_time_falls_back() {
    let slow = FakeUpstream::start(vec![Reply::Delay(
        Duration::from_secs(30),
        Box::new(Reply::Echo),
    )])
    .await;
    let fast = FakeUpstream::start(vec![]).await;
    let gateway = TestGateway::over(
        &[&slow.base_url, &fast.base_url],
        "timeout_ms = 10000\nfirst_token_timeout_ms = 1000\nretries = 0",
    )
    .await;
    let started = Instant::now();
    let response = gateway
        .post("/v1/chat/completions", &stream_body("quick now"))
        .await;
    assert_eq!(response.status(), 200);
    let frames = sse_data(&read_stream(response).await);
    assert_eq!(stream_text(&frames), "quick now");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(slow.requests().len(), 1);
    assert_eq!(fast.requests().len(), 1);
}

#[tokio::test]
async fn an_upstream_that_dies_mid_stream_ends_the_client_stream_with_an_error_and_done() {
    let upstream = FakeUpstream::start(vec![Reply::StreamThenDrop(vec!["Hello", " wor"])]).await;
    let spare = FakeUpstream::start(vec![]).await;
    let gateway = TestGateway::over(&[&upstream.base_url, &spare.base_url], "retries = 2").await;
    let response = gateway
        .post("/v1/chat/completions", &stream_body("x"))
        .await;
    assert_eq!(response.status(), 200);
    let frames = sse_data(&read_stream(response).await);

    assert_eq!(stream_text(&frames), "Hello wor");
    let n = frames.len();
    assert_eq!(frames[n - 1], "[DONE]");
    let error: Value = serde_json::from_str(&frames[n - 2]).unwrap();
    assert_eq!(error["error"]["type"], "api_error");
    assert_eq!(error["error"]["code"], "upstream_error");
    // Once bytes went to the client, nothing is retried or re-sent elsewhere.
    assert_eq!(upstream.requests().len(), 1);
    assert!(spare.requests().is_empty());
}

#[tokio::test]
async fn a_stream_past_the_route_deadline_ends_with_a_timeout_error() {
    // The first chunk is prompt; the upstream then stalls for longer than the route allows.
    let upstream = FakeUpstream::start(vec![Reply::StreamThenStall(vec!["first"])]).await;
    let gateway = TestGateway::over(&[&upstream.base_url], "timeout_ms = 1500\nretries = 0").await;
    let started = Instant::now();
    let response = gateway
        .post("/v1/chat/completions", &stream_body("x"))
        .await;
    assert_eq!(response.status(), 200);
    let frames = sse_data(&read_stream(response).await);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(stream_text(&frames), "first");
    let n = frames.len();
    assert_eq!(frames[n - 1], "[DONE]");
    let error: Value = serde_json::from_str(&frames[n - 2]).unwrap();
    assert_eq!(error["error"]["code"], "upstream_timeout");
    assert_eq!(upstream.requests().len(), 1);
}

#[tokio::test]
async fn an_upstream_auth_failure_is_502_without_quoting_the_upstream_body() {
    // OpenAI's 401 body quotes part of the key; the gateway must not pass it on.
    let upstream = FakeUpstream::start(vec![Reply::Status(401, vec![])]).await;
    let gateway = TestGateway::over(&[&upstream.base_url], "retries = 0").await;
    let response = gateway.post("/v1/chat/completions", &chat_body("x")).await;
    assert_eq!(response.status(), 502);
    let body = response.text().await.unwrap();
    assert!(
        body.contains("rejected the gateway's credentials"),
        "{body}"
    );
    assert!(!body.contains("fake upstream says"), "{body}");

    // A 407 comes from an HTTP proxy in between (HTTP_PROXY): said so, whatever its body.
    let upstream = FakeUpstream::start(vec![Reply::Status(407, vec![])]).await;
    let gateway = TestGateway::over(&[&upstream.base_url], "retries = 0").await;
    let response = gateway.post("/v1/chat/completions", &chat_body("x")).await;
    assert_eq!(response.status(), 502);
    let body = response.text().await.unwrap();
    assert!(body.contains("proxy authorization required"), "{body}");
}

#[tokio::test]
async fn a_route_answers_with_the_upstream_body_as_it_came_or_502_if_it_is_no_completion() {
    // Key order, spacing and fields the gateway does not know all survive: the body is passed
    // on, not decoded and encoded again.
    const COMPLETION: &str = r#"{"choices": [{"message": {"role": "assistant", "content": "hi"}, "index": 0, "finish_reason": "stop"}], "id": "c1", "usage": {"total_tokens": 5, "prompt_tokens": 3, "completion_tokens": 2}, "service_tier": "default"}"#;
    let upstream = FakeUpstream::start(vec![
        Reply::Body(COMPLETION),
        Reply::Body(r#"{"choices": [{"text": "a legacy completion"}]}"#),
    ])
    .await;
    let gateway = TestGateway::over(&[&upstream.base_url], "retries = 2").await;
    let response = gateway.post("/v1/chat/completions", &chat_body("x")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(response.text().await.unwrap(), COMPLETION);

    let response = gateway.post("/v1/chat/completions", &chat_body("x")).await;
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("not a chat completion"), "{message}");
    assert_eq!(
        upstream.requests().len(),
        2,
        "a malformed answer is not retried"
    );
}

#[tokio::test]
async fn a_route_streams_the_upstream_chunks_as_they_came_and_ends_at_an_error_object() {
    // Spacing, key order and fields the gateway does not know survive in every chunk.
    const FIRST: &str = r#"{"choices": [{"delta": {"role": "assistant", "content": "Hi"}, "index": 0}], "id": "c1", "x_vendor": {"k": 1}}"#;
    const USAGE: &str = r#"{"id": "c1", "choices": [], "usage": {"total_tokens": 5, "prompt_tokens": 3, "completion_tokens": 2}}"#;
    const ERROR: &str =
        r#"{"error": {"message": "overloaded mid-stream", "type": "server_error"}}"#;
    let upstream = FakeUpstream::start(vec![
        Reply::Sse(vec![FIRST, USAGE, "[DONE]"]),
        Reply::Sse(vec![FIRST, ERROR, USAGE, "[DONE]"]),
    ])
    .await;
    let gateway = TestGateway::over(&[&upstream.base_url], "retries = 2").await;
    let mut with_usage = stream_body("x");
    with_usage["stream_options"] = json!({"include_usage": true});
    let response = gateway.post("/v1/chat/completions", &with_usage).await;
    assert_eq!(response.status(), 200);
    let frames = sse_data(&read_stream(response).await);
    assert_eq!(frames, [FIRST, USAGE, "[DONE]"]);

    let response = gateway.post("/v1/chat/completions", &with_usage).await;
    let frames = sse_data(&read_stream(response).await);
    assert_eq!(frames.len(), 3, "{frames:?}");
    assert_eq!(frames[0], FIRST);
    assert_ne!(
        frames[1], ERROR,
        "the upstream's error object is not passed on as a chunk"
    );
    let error: Value = serde_json::from_str(&frames[1]).unwrap();
    assert_eq!(error["error"]["code"], "upstream_error");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("overloaded mid-stream"), "{message}");
    assert_eq!(frames[2], "[DONE]");
}

#[tokio::test]
async fn an_error_object_before_the_first_chunk_is_retried_or_passed_on_by_its_status() {
    // Some servers answer 200 and then say in the stream what they would have said with a
    // status: a server error is retried like a 500, a vLLM-style 400 goes to the client as one.
    const SERVER_ERROR: &str = r#"{"error": {"message": "try again", "type": "server_error"}}"#;
    const TOO_LONG: &str = r#"{"error": {"object": "error", "message": "prompt too long", "type": "BadRequestError", "param": "messages", "code": 400}}"#;
    let upstream = FakeUpstream::start(vec![
        Reply::Sse(vec![SERVER_ERROR]),
        Reply::Echo,
        Reply::Sse(vec![TOO_LONG]),
    ])
    .await;
    let gateway = TestGateway::over(&[&upstream.base_url], "retries = 2").await;
    let response = gateway
        .post("/v1/chat/completions", &stream_body("retried"))
        .await;
    assert_eq!(response.status(), 200);
    let frames = sse_data(&read_stream(response).await);
    assert_eq!(stream_text(&frames), "retried");
    assert_eq!(upstream.requests().len(), 2);

    let response = gateway
        .post("/v1/chat/completions", &stream_body("long"))
        .await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["param"], "messages");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("prompt too long"), "{message}");
    assert_eq!(
        upstream.requests().len(),
        3,
        "a client error is not retried"
    );
}

#[tokio::test]
async fn an_upstream_429_without_retry_after_still_gives_the_client_one() {
    let upstream = FakeUpstream::start(vec![Reply::Status(429, vec![])]).await;
    let gateway = TestGateway::over(&[&upstream.base_url], "retries = 0").await;
    let response = gateway.post("/v1/chat/completions", &chat_body("x")).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "1");
}

#[tokio::test]
async fn an_upstream_redirect_is_not_followed() {
    // Following it would re-send the request (and the provider key) to wherever Location says.
    let upstream = FakeUpstream::start(vec![Reply::Status(
        307,
        vec![("location", "/v1/chat/completions")],
    )])
    .await;
    let gateway = TestGateway::over(&[&upstream.base_url], "retries = 2").await;
    let response = gateway.post("/v1/chat/completions", &chat_body("x")).await;
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("HTTP 307"), "{message}");
    assert_eq!(upstream.requests().len(), 1, "neither followed nor retried");
}
