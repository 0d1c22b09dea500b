//! Client errors: every one in OpenAI's error shape with the right status.

use serde_json::{Value, json};

use crate::common::{FakeUpstream, Reply, TestGateway, chat_body};

async fn error_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].is_string(), "{body}");
    assert!(error.as_object().unwrap().contains_key("param"), "{body}");
    assert!(error.as_object().unwrap().contains_key("code"), "{body}");
    (status, error.clone())
}

async fn post_raw(gateway: &TestGateway, body: impl Into<reqwest::Body>) -> reqwest::Response {
    gateway
        .client
        .post(gateway.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn malformed_json_is_400() {
    let upstream = FakeUpstream::start(vec![]).await;
    let gateway = TestGateway::over(&[&upstream.base_url], "").await;
    let (status, error) =
        error_of(post_raw(&gateway, "{\"model\": \"chat\", \"messages\": [").await).await;
    assert_eq!(status, 400);
    assert_eq!(error["type"], "invalid_request_error");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("could not parse the JSON body")
    );
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn missing_or_mistyped_messages_is_400_naming_the_field() {
    let upstream = FakeUpstream::start(vec![]).await;
    let gateway = TestGateway::over(&[&upstream.base_url], "").await;

    let (status, error) = error_of(
        gateway
            .post("/v1/chat/completions", &json!({"model": "chat"}))
            .await,
    )
    .await;
    assert_eq!((status, error["param"].as_str()), (400, Some("messages")));

    let not_a_list = json!({"model": "chat", "messages": "hello"});
    let (status, error) = error_of(gateway.post("/v1/chat/completions", &not_a_list).await).await;
    assert_eq!((status, error["param"].as_str()), (400, Some("messages")));

    let empty = json!({"model": "chat", "messages": []});
    let (status, error) = error_of(gateway.post("/v1/chat/completions", &empty).await).await;
    assert_eq!((status, error["param"].as_str()), (400, Some("messages")));

    let bad_role = json!({"model": "chat", "messages": [{"role": 7, "content": "x"}]});
    let (status, error) = error_of(gateway.post("/v1/chat/completions", &bad_role).await).await;
    assert_eq!(
        (status, error["param"].as_str()),
        (400, Some("messages[0].role"))
    );

    let bad_stream =
        json!({"model": "chat", "stream": "yes", "messages": [{"role": "user", "content": "x"}]});
    let (status, error) = error_of(gateway.post("/v1/chat/completions", &bad_stream).await).await;
    assert_eq!((status, error["param"].as_str()), (400, Some("stream")));

    assert!(
        upstream.requests().is_empty(),
        "no bad request reaches the upstream"
    );
}

#[tokio::test]
async fn unknown_model_is_404() {
    let upstream = FakeUpstream::start(vec![]).await;
    let gateway = TestGateway::over(&[&upstream.base_url], "").await;
    let mut body = chat_body("hi");
    body["model"] = json!("gpt-5-does-not-exist");
    let (status, error) = error_of(gateway.post("/v1/chat/completions", &body).await).await;
    assert_eq!(status, 404);
    assert_eq!(error["code"], "model_not_found");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("gpt-5-does-not-exist")
    );
}

#[tokio::test]
async fn oversize_body_is_413() {
    let upstream = FakeUpstream::start(vec![]).await;
    let gateway = TestGateway::start(&format!(
        "[server]\nmax_body_bytes = 1024\n{}",
        crate::common::config_over(&[&upstream.base_url], "")
    ))
    .await;
    let (status, error) = error_of(
        gateway
            .post("/v1/chat/completions", &chat_body(&"x".repeat(2000)))
            .await,
    )
    .await;
    assert_eq!(status, 413);
    assert_eq!(error["code"], "request_too_large");
    assert!(error["message"].as_str().unwrap().contains("1024 bytes"));
    // Just under the limit still works.
    let ok = gateway
        .post("/v1/chat/completions", &chat_body(&"x".repeat(900)))
        .await;
    assert_eq!(ok.status(), 200);

    // A body declared too large is refused at once, without waiting for it.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(gateway.address)
        .await
        .unwrap();
    socket
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
              content-length: 999999999\r\n\r\n{",
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    socket.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("request_too_large"), "{answer}");
}

#[tokio::test]
async fn unknown_path_is_404_in_openai_shape() {
    let upstream = FakeUpstream::start(vec![]).await;
    let gateway = TestGateway::over(&[&upstream.base_url], "").await;
    let response = gateway
        .client
        .get(gateway.url("/v1/engines"))
        .send()
        .await
        .unwrap();
    let (status, error) = error_of(response).await;
    assert_eq!(status, 404);
    assert_eq!(error["code"], "unknown_url");
}

#[tokio::test]
async fn an_upstream_that_quotes_the_gateways_key_back_does_not_reveal_it() {
    let upstream = FakeUpstream::start(vec![
        Reply::QuoteAuthorization(500),
        Reply::QuoteAuthorization(400),
    ])
    .await;
    let gateway = TestGateway::over(&[&upstream.base_url], "retries = 0").await;
    for status in [502, 400] {
        let response = gateway.post("/v1/chat/completions", &chat_body("x")).await;
        let (got, error) = error_of(response).await;
        assert_eq!(got, status);
        let text = error.to_string();
        assert!(text.contains("no quota left for [redacted]"), "{text}");
        // `${TEST_OPENAI_KEY}` is `sk-test-key`.
        assert!(!text.contains("sk-test-key"), "{text}");
    }
    assert_eq!(
        upstream.requests()[0].authorization.as_deref(),
        Some("Bearer sk-test-key")
    );
}
