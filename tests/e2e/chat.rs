//! Chat completions through a route: bodies, streams, pass-through fields, request ids.

use serde_json::{Value, json};

use crate::common::{
    FakeUpstream, Reply, TestGateway, chat_body, config_over, parse_config, read_stream, sse_data,
    stream_text,
};

#[tokio::test]
async fn non_stream_reply_comes_from_the_upstream_with_the_target_model_and_key() {
    let upstream = FakeUpstream::start(vec![Reply::Text("Paris is the capital of France.")]).await;
    let gateway = TestGateway::over(&[&upstream.base_url], "").await;

    let response = gateway
        .post("/v1/chat/completions", &chat_body("Capital of France?"))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Paris is the capital of France."
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 10, "completion_tokens": 6, "total_tokens": 16})
    );
    // Fields the gateway does not know pass back to the client too.
    assert_eq!(body["system_fingerprint"], "fp_fake");

    let requests = upstream.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0].body["model"], "model-0",
        "the target's model replaces the endpoint name"
    );
    assert_eq!(
        requests[0].authorization.as_deref(),
        Some("Bearer sk-test-key")
    );
    let upstream_host = upstream.base_url.trim_start_matches("http://");
    let upstream_host = upstream_host.split('/').next().unwrap();
    assert_eq!(requests[0].host.as_deref(), Some(upstream_host));
}

#[tokio::test]
async fn a_reassembled_stream_equals_the_non_stream_reply() {
    let upstream = FakeUpstream::start(vec![]).await;
    let gateway = TestGateway::over(&[&upstream.base_url], "").await;
    let question = "Tell me about the history of the railway switchyard";

    let full: Value = gateway
        .post("/v1/chat/completions", &chat_body(question))
        .await
        .json()
        .await
        .unwrap();
    let mut body = chat_body(question);
    body["stream"] = json!(true);
    let response = gateway.post("/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let frames = sse_data(&read_stream(response).await);

    assert_eq!(frames.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(
        stream_text(&frames),
        full["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert_eq!(stream_text(&frames), question);
    // role chunk + 9 words + finish chunk + [DONE]; no usage chunk unless asked for.
    assert_eq!(frames.len(), 12, "{frames:#?}");
    let finish: Value = serde_json::from_str(&frames[10]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(upstream.requests()[1].body["stream"], json!(true));
}

#[tokio::test]
async fn include_usage_gives_a_final_usage_chunk() {
    let upstream = FakeUpstream::start(vec![Reply::Text("one two three")]).await;
    let gateway = TestGateway::over(&[&upstream.base_url], "").await;
    let mut body = chat_body("count");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});

    let frames = sse_data(&read_stream(gateway.post("/v1/chat/completions", &body).await).await);
    let n = frames.len();
    assert_eq!(frames[n - 1], "[DONE]");
    let usage_chunk: Value = serde_json::from_str(&frames[n - 2]).unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(
        usage_chunk["usage"],
        json!({"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13})
    );
    assert_eq!(
        upstream.requests()[0].body["stream_options"],
        json!({"include_usage": true})
    );
}

#[tokio::test]
async fn a_stream_asks_for_its_usage_unless_its_provider_says_the_server_refuses_that() {
    let upstream = FakeUpstream::start(vec![]).await;
    let mut body = chat_body("count");
    body["stream"] = json!(true);
    // The client did not ask: the gateway does (for the tokens it counts), and keeps the usage
    // chunk from the client.
    let gateway = TestGateway::over(&[&upstream.base_url], "").await;
    let frames = sse_data(&read_stream(gateway.post("/v1/chat/completions", &body).await).await);
    assert!(
        frames.iter().all(|frame| !frame.contains("\"usage\"")),
        "{frames:?}"
    );
    assert_eq!(
        upstream.requests()[0].body["stream_options"],
        json!({"include_usage": true})
    );
    // `stream_usage = false`: no `stream_options` at all, not even the client's own.
    let config = config_over(&[&upstream.base_url], "")
        .replace("[routes.main]", "stream_usage = false\n[routes.main]");
    let gateway = TestGateway::start(&config).await;
    body["stream_options"] = json!({"include_usage": true});
    let frames = sse_data(&read_stream(gateway.post("/v1/chat/completions", &body).await).await);
    assert_eq!(frames.last().unwrap(), "[DONE]");
    assert_eq!(upstream.requests()[1].body.get("stream_options"), None);
}

#[tokio::test]
async fn fields_the_gateway_does_not_interpret_reach_the_upstream_unchanged() {
    let upstream = FakeUpstream::start(vec![]).await;
    let gateway = TestGateway::over(&[&upstream.base_url], "").await;
    let body = json!({
        "model": "chat",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "name": "ann", "content": [
                {"type": "text", "text": "What is in this image?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}}
            ]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "lookup", "arguments": "{\"q\":\"x\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "42"}
        ],
        "tools": [{"type": "function", "function": {"name": "lookup", "description": "Look up",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}],
        "tool_choice": {"type": "function", "function": {"name": "lookup"}},
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}},
        "seed": 1234,
        "logprobs": true,
        "top_logprobs": 3,
        "temperature": 0.25,
        "max_completion_tokens": 77,
        "user": "user-17",
        "metadata": {"nested": {"deep": [1, 2.5, null, "x"]}},
    });
    let response = gateway.post("/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 200);

    let mut expected = body.clone();
    expected["model"] = json!("model-0");
    assert_eq!(upstream.requests()[0].body, expected);
}

#[tokio::test]
async fn every_response_carries_a_request_id_and_a_client_id_is_kept() {
    let upstream = FakeUpstream::start(vec![]).await;
    let gateway = TestGateway::over(&[&upstream.base_url], "").await;

    let ok = gateway.post("/v1/chat/completions", &chat_body("hi")).await;
    let generated = ok.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(generated.len(), 36, "a UUID: {generated}");

    let error = gateway
        .post(
            "/v1/chat/completions",
            &json!({"model": "nope", "messages": []}),
        )
        .await;
    assert_eq!(error.status(), 404);
    assert!(error.headers().contains_key("x-request-id"));
    assert_ne!(error.headers()["x-request-id"], generated.as_str());

    let mine = gateway
        .client
        .post(gateway.url("/v1/chat/completions"))
        .header("x-request-id", "req-from-client-1")
        .json(&chat_body("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(mine.headers()["x-request-id"], "req-from-client-1");

    // One too long for a log line, empty, or with a tab is replaced by one of ours.
    for unfit in ["x".repeat(129), String::new(), "a\tb".to_owned()] {
        let replaced = gateway
            .client
            .post(gateway.url("/v1/chat/completions"))
            .header("x-request-id", &unfit)
            .json(&chat_body("hi"))
            .send()
            .await
            .unwrap();
        assert_eq!(replaced.headers()["x-request-id"].len(), 36, "a UUID");
    }
}

#[tokio::test]
async fn models_lists_endpoints_in_config_order_and_health_answers() {
    let gateway = TestGateway::start(
        r#"
        [providers.m]
        kind = "mock"
        [routes.r]
        targets = [{ provider = "m", model = "x" }]
        [[endpoints]]
        name = "zeta"
        route = "r"
        [[endpoints]]
        name = "alpha"
        route = "r"
        [[endpoints]]
        name = "openai/gpt-4o-mini"
        route = "r"
        "#,
    )
    .await;
    // One model, as the OpenAI SDK's `models.retrieve` asks for it (names may hold slashes).
    let one: Value = gateway.get_json("/v1/models/openai/gpt-4o-mini").await;
    assert_eq!(one["id"], "openai/gpt-4o-mini");
    assert_eq!(one["object"], "model");
    let missing = gateway
        .client
        .get(gateway.url("/v1/models/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let error: Value = missing.json().await.unwrap();
    assert_eq!(error["error"]["code"], "model_not_found");
    // MLflow's deployments client lists and gets endpoints at /api/2.0/endpoints/.
    let mlflow: Value = gateway.get_json("/api/2.0/endpoints/").await;
    let alpha = json!({"name": "alpha", "endpoint_type": "llm/v1/chat",
        "model": {"name": "x", "provider": "m"},
        "endpoint_url": "/endpoints/alpha/invocations", "limit": null});
    assert_eq!(mlflow["endpoints"][1], alpha);
    assert_eq!(mlflow["endpoints"].as_array().unwrap().len(), 3);
    assert_eq!(gateway.get_json("/api/2.0/endpoints/alpha").await, alpha);
    // The URL an endpoint is given answers, slashes in its name included.
    let slashed: Value = gateway
        .get_json("/api/2.0/endpoints/openai/gpt-4o-mini")
        .await;
    let url = slashed["endpoint_url"].as_str().unwrap();
    assert_eq!(url, "/endpoints/openai/gpt-4o-mini/invocations");
    let answer = gateway
        .post(
            url,
            &json!({"messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(answer.status(), 200);
    let other = gateway
        .post("/endpoints/alpha/other", &json!({"messages": []}))
        .await;
    assert_eq!(other.status(), 404);
    let error: Value = other.json().await.unwrap();
    assert_eq!(error["error_code"], "RESOURCE_DOES_NOT_EXIST");
    let missing = gateway
        .client
        .get(gateway.url("/api/2.0/endpoints/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let error: Value = missing.json().await.unwrap();
    assert_eq!(error["error_code"], "RESOURCE_DOES_NOT_EXIST");
    let models: Value = gateway.get_json("/v1/models").await;
    assert_eq!(models["object"], "list");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["zeta", "alpha", "openai/gpt-4o-mini"]);
    assert_eq!(models["data"][0]["object"], "model");
    assert_eq!(models["data"][0]["owned_by"], "switchyard");

    let health = gateway
        .client
        .get(gateway.url("/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let ready: Value = gateway.get_json("/ready").await;
    assert_eq!(
        ready,
        json!({"status": "ready", "endpoints": 3, "rate_limiter": "ok"})
    );
}

/// The quickstart config (what the README runs) serves offline on the mock provider.
#[tokio::test]
async fn quickstart_config_serves_offline_on_the_mock() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/quickstart.toml"
    ))
    .unwrap();
    let gateway = TestGateway::start(&text).await;

    let mut body = chat_body("Is the mock deterministic?");
    body["model"] = json!("echo");
    let full: Value = gateway
        .post("/v1/chat/completions", &body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        full["choices"][0]["message"]["content"],
        "Is the mock deterministic?"
    );
    // 5 tokens each way: "Is the mock deterministic ?"
    assert_eq!(
        full["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10})
    );

    body["model"] = json!("greeter");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let frames = sse_data(&read_stream(gateway.post("/v1/chat/completions", &body).await).await);
    assert_eq!(
        stream_text(&frames),
        "Hello from Switchyard! This reply comes from the built-in mock provider."
    );
    // role + 6 content chunks + finish + usage + [DONE]
    assert_eq!(frames.len(), 10);
    let usage: Value = serde_json::from_str(&frames[8]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 15);

    // The example chains, on the mock routes.
    let assistant = "Thanks for your message! This answer comes from the offline mock provider: \
                     point the `chat` route at a real provider to get real answers.";
    for endpoint in ["support", "summarize", "router"] {
        let ask = json!({"model": endpoint, "messages": [{"role": "user", "content": "I was charged twice"}]});
        let response = gateway.post("/v1/chat/completions", &ask).await;
        assert_eq!(response.status(), 200, "{endpoint}");
        let reply: Value = response.json().await.unwrap();
        assert_eq!(
            reply["choices"][0]["message"]["content"], assistant,
            "{endpoint}"
        );
    }
    let mut ask = json!({"model": "router", "stream": true, "messages": [{"role": "user", "content": "Refund?"}]});
    let frames = sse_data(&read_stream(gateway.post("/v1/chat/completions", &ask).await).await);
    assert_eq!(stream_text(&frames), assistant);
    assert_eq!(
        frames.len(),
        1 + 8 + 1 + 1,
        "role, 8 content chunks, finish, [DONE]"
    );
    ask["stream"] = json!(false);
    let invoked = gateway.post("/endpoints/support/invocations", &ask).await;
    assert_eq!(invoked.status(), 200);
}

/// What `switchyard serve` runs: one single-threaded runtime per thread, connections handed to
/// them in turn, each thread with its own upstream connections.
#[tokio::test]
async fn event_loop_threads_serve_concurrent_connections_and_stop_when_asked() {
    let upstream = FakeUpstream::start(vec![]).await;
    let gateway = switchyard_gateway::Gateway::new(
        parse_config(&config_over(&[&upstream.base_url], "")),
        &switchyard_chains::registry(),
    )
    .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopping) = tokio::sync::oneshot::channel::<()>();
    let threads = std::num::NonZeroUsize::new(3).unwrap();
    let server = std::thread::spawn(move || {
        switchyard_gateway::serve_on_threads(listener, gateway, threads, async {
            let _ = stopping.await;
        })
    });

    // Each client has its own connection pool, so every request is a connection of its own.
    let url = format!("http://{address}/v1/chat/completions");
    let requests = (0..12).map(|i| {
        let url = url.clone();
        async move {
            let mut body = chat_body(&format!("hello {i}"));
            body["stream"] = json!(i % 3 == 0);
            let response = reqwest::Client::new()
                .post(&url)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "request {i}");
            if i % 3 == 0 {
                stream_text(&sse_data(&read_stream(response).await))
            } else {
                let body: Value = response.json().await.unwrap();
                body["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            }
        }
    });
    let answers = futures::future::join_all(requests).await;
    let expected: Vec<String> = (0..12).map(|i| format!("hello {i}")).collect();
    assert_eq!(answers, expected);
    assert_eq!(upstream.requests().len(), 12);

    stop.send(()).unwrap();
    let served = tokio::task::spawn_blocking(move || server.join().unwrap())
        .await
        .unwrap();
    assert!(served.is_ok(), "{served:?}");
    assert!(
        tokio::net::TcpStream::connect(address).await.is_err(),
        "still accepting after the shutdown"
    );
}
