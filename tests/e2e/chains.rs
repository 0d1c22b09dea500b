//! Chain endpoints over HTTP, with the upstream LLM a fake OpenAI server: the prompts the
//! upstream receives prove the templates rendered with the config.

use std::time::Instant;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Value, json};
use switchyard_core::{
    Chain, ChainContext, ChainDefinition, ChainEntry, ChainError, ChainOutput, ChatRequest,
    Registry,
};

use crate::common::{
    FakeUpstream, Reply, TestGateway, chat_body, header, read_stream, refilled_since, sse_data,
    stream_text, temp_dir,
};

fn chains_config(upstream: &str, endpoints: &str) -> String {
    format!(
        r#"
        [providers.fake]
        kind = "openai"
        base_url = "{upstream}"
        [routes.chat]
        targets = [{{ provider = "fake", model = "gpt-test" }}]
        retries = 0
        {endpoints}
        "#
    )
}

fn repo_path(relative: &str) -> String {
    format!("{}/{relative}", env!("CARGO_MANIFEST_DIR"))
}

async fn support_gateway(upstream: &FakeUpstream) -> TestGateway {
    TestGateway::start(&chains_config(
        &upstream.base_url,
        &format!(
            "[[endpoints]]\nname = \"support\"\nchain_dir = \"{}\"\nconfig = {{ tone = \"formal\" }}\n",
            repo_path("chains/support_bot")
        ),
    ))
    .await
}

#[tokio::test]
async fn support_bot_renders_its_prompt_from_config_and_answers() {
    let upstream = FakeUpstream::start(vec![Reply::Text("Please restart the device.")]).await;
    let gateway = support_gateway(&upstream).await;

    let response = gateway
        .client
        .post(gateway.url("/v1/chat/completions"))
        .header("x-switchyard-user", "Ada")
        .json(&json!({"model": "support", "messages": [{"role": "user", "content": "It is broken."}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Please restart the device."
    );

    let sent = &upstream.requests()[0].body;
    assert_eq!(sent["model"], "gpt-test");
    assert_eq!(sent["temperature"], json!(0.2));
    assert_eq!(
        sent["messages"],
        json!([
            {"role": "system", "content": "You are the support assistant for Switchyard. Your tone is formal.\n\
                You are talking to Ada.\nFollow these rules:\n- Answer only questions about the product.\n\
                - If you do not know, say so and suggest contacting support.\n"},
            {"role": "user", "content": "It is broken."}
        ])
    );
}

#[tokio::test]
async fn support_bot_streams_and_reports_usage() {
    let upstream =
        FakeUpstream::start(vec![Reply::Text("Step one: unplug it. Step two: wait.")]).await;
    let gateway = support_gateway(&upstream).await;
    let body = json!({"model": "support", "stream": true, "stream_options": {"include_usage": true},
                      "messages": [{"role": "user", "content": "Help"}]});
    let response = gateway.post("/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    let frames = sse_data(&read_stream(response).await);
    assert_eq!(stream_text(&frames), "Step one: unplug it. Step two: wait.");
    let n = frames.len();
    assert_eq!(frames[n - 1], "[DONE]");
    let usage: Value = serde_json::from_str(&frames[n - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 7);
    let sent = &upstream.requests()[0].body;
    assert_eq!(sent["stream"], json!(true));
    assert_eq!(sent["stream_options"], json!({"include_usage": true}));
}

#[tokio::test]
async fn summarize_then_answer_makes_two_calls_and_streams_only_the_second() {
    let upstream = FakeUpstream::start(vec![
        Reply::Text("Bo wants a refund for order 7."),
        Reply::Echo,
    ])
    .await;
    let gateway = TestGateway::start(&chains_config(
        &upstream.base_url,
        &format!(
            "[[endpoints]]\nname = \"summarize\"\nchain_dir = \"{}\"\nconfig = {{ keep_last = 2 }}\n",
            repo_path("chains/summarize_then_answer")
        ),
    ))
    .await;
    let body = json!({"model": "summarize", "stream": true, "messages": [
        {"role": "user", "content": "Hi, I'm Bo."},
        {"role": "assistant", "content": "Hello Bo."},
        {"role": "user", "content": "Order 7 arrived broken, I want a refund."},
        {"role": "assistant", "content": "I can help with that."},
        {"role": "user", "content": "How long will it take?"}
    ]});
    let frames = sse_data(&read_stream(gateway.post("/v1/chat/completions", &body).await).await);
    assert_eq!(
        stream_text(&frames),
        "How long will it take?",
        "the fake echoes the last user message"
    );

    let requests = upstream.requests();
    assert_eq!(requests.len(), 2);
    let condense = &requests[0].body;
    assert_eq!(
        condense.get("stream"),
        None,
        "the summary call does not stream"
    );
    assert_eq!(condense["max_tokens"], 200);
    let prompt = condense["messages"][0]["content"].as_str().unwrap();
    assert!(prompt.ends_with(
        "user: Hi, I'm Bo.\nassistant: Hello Bo.\nuser: Order 7 arrived broken, I want a refund.\n"
    ), "{prompt}");
    let answer = &requests[1].body;
    assert_eq!(answer["stream"], json!(true));
    assert_eq!(
        answer["messages"][0]["content"],
        "You are a helpful assistant. Answer the user's last message.\n\n\
         Summary of the earlier conversation:\nBo wants a refund for order 7.\n"
    );
    assert_eq!(
        answer["messages"].as_array().unwrap().len(),
        3,
        "system + the last 2 messages"
    );
}

#[tokio::test]
async fn a_chain_is_charged_the_tokens_its_calls_used_even_when_it_fails() {
    // The fake reports 10 prompt tokens per message and a completion token per word: the
    // summary call (one message, four words) uses 14; the answer call is refused.
    let upstream = FakeUpstream::start(vec![
        Reply::Text("Bo wants a refund."),
        Reply::Status(400, vec![]),
    ])
    .await;
    let gateway = TestGateway::start(&chains_config(
        &upstream.base_url,
        &format!(
            "[[endpoints]]\nname = \"summarize\"\nchain_dir = \"{}\"\nconfig = {{ keep_last = 2 }}\n\
             [[endpoints]]\nname = \"chat\"\nroute = \"chat\"\n\
             [[limits]]\nscope = [\"global\"]\ntokens_per_minute = 1000\ndefault_max_tokens = 100\n",
            repo_path("chains/summarize_then_answer")
        ),
    ))
    .await;
    let start = Instant::now();
    let body = json!({"model": "summarize", "messages": [
        {"role": "user", "content": "Hi, I'm Bo."},
        {"role": "assistant", "content": "Hello Bo."},
        {"role": "user", "content": "Order 7 arrived broken, I want a refund."},
        {"role": "assistant", "content": "I can help with that."},
        {"role": "user", "content": "How long will it take?"}
    ]});
    let failed = gateway.post("/v1/chat/completions", &body).await;
    assert_eq!(failed.status(), 400);
    assert_eq!(upstream.requests().len(), 2);

    // Not refunded: 1000 - 14, less the next request's reservation of 2 (8 characters / 4)
    // + 100 = 884 (+ refill).
    let next = gateway
        .post("/v1/chat/completions", &chat_body("12345678"))
        .await;
    assert_eq!(next.status(), 200);
    let remaining: u64 = header(&next, "x-ratelimit-remaining-tokens")
        .parse()
        .unwrap();
    assert!(
        (884..=884 + refilled_since(start)).contains(&remaining),
        "{remaining}"
    );
}

#[tokio::test]
async fn router_dispatches_on_the_classifier_and_falls_back_on_garbage() {
    let upstream = FakeUpstream::start(vec![
        Reply::Text(r#"{"topic": "billing"}"#),
        Reply::Text("Refund issued."),
        Reply::Text("I think it is about billing"),
        Reply::Text("Try turning it off and on."),
    ])
    .await;
    let gateway = TestGateway::start(&chains_config(
        &upstream.base_url,
        &format!(
            "[[endpoints]]\nname = \"router\"\nchain_dir = \"{}\"\n",
            repo_path("chains/router")
        ),
    ))
    .await;
    let ask = |content: &str| json!({"model": "router", "messages": [{"role": "user", "content": content}]});

    let billing: Value = gateway
        .post("/v1/chat/completions", &ask("Charged twice"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        billing["choices"][0]["message"]["content"],
        "Refund issued."
    );
    let fallback: Value = gateway
        .post("/v1/chat/completions", &ask("It crashes"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        fallback["choices"][0]["message"]["content"],
        "Try turning it off and on."
    );

    let requests = upstream.requests();
    assert_eq!(requests[0].body["max_tokens"], 20);
    let system = |i: usize| {
        requests[i].body["messages"][0]["content"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(system(1).starts_with("You are a billing specialist."));
    assert!(
        system(3).starts_with("You are a technical support engineer."),
        "default topic"
    );
}

#[tokio::test]
async fn mlflow_invocations_serve_chat_endpoints_with_mlflow_errors() {
    let upstream = FakeUpstream::start(vec![Reply::Text("Invoked.")]).await;
    let gateway = support_gateway(&upstream).await;

    let body = json!({"messages": [{"role": "user", "content": "hi"}]});
    let response = gateway.post("/endpoints/support/invocations", &body).await;
    assert_eq!(response.status(), 200);
    let reply: Value = response.json().await.unwrap();
    assert_eq!(reply["object"], "chat.completion");
    assert_eq!(reply["choices"][0]["message"]["content"], "Invoked.");

    let missing = gateway.post("/endpoints/nope/invocations", &body).await;
    assert_eq!(missing.status(), 404);
    let error: Value = missing.json().await.unwrap();
    assert_eq!(error["error_code"], "RESOURCE_DOES_NOT_EXIST");
    assert!(error["message"].as_str().unwrap().contains("nope"));

    let bad = gateway
        .post("/endpoints/support/invocations", &json!({"messages": "hi"}))
        .await;
    assert_eq!(bad.status(), 400);
    let error: Value = bad.json().await.unwrap();
    assert_eq!(error["error_code"], "INVALID_PARAMETER_VALUE");
    assert!(error["message"].as_str().unwrap().contains("messages"));

    let not_json = gateway
        .client
        .post(gateway.url("/endpoints/support/invocations"))
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), 400);
    let error: Value = not_json.json().await.unwrap();
    assert_eq!(error["error_code"], "BAD_REQUEST");
    // CSV is for models; a chat endpoint says what it takes.
    let csv = gateway
        .client
        .post(gateway.url("/endpoints/support/invocations"))
        .header("content-type", "text/csv")
        .body("role,content\nuser,hi\n")
        .send()
        .await
        .unwrap();
    assert_eq!(csv.status(), 415);
    let error: Value = csv.json().await.unwrap();
    assert_eq!(
        error["message"],
        "endpoint 'support' takes application/json, not text/csv"
    );
}

#[tokio::test]
async fn an_upstream_failure_in_a_step_is_502_naming_the_step() {
    let upstream = FakeUpstream::start(vec![Reply::Status(500, vec![])]).await;
    let gateway = support_gateway(&upstream).await;
    let response = gateway
        .post(
            "/v1/chat/completions",
            &json!({"model": "support", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("chain 'support_bot' step 'default':"),
        "{message}"
    );
    assert!(message.contains("HTTP 500"), "{message}");
}

/// A chain with a bug, to show that a panic is one request's 500 and not the gateway's end.
struct Panicky;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoConfig {}

impl ChainDefinition for Panicky {
    const NAME: &'static str = "panicky";
    const TEMPLATES: &'static [&'static str] = &[];
    const LLMS: &'static [&'static str] = &[];
    type Config = NoConfig;
    fn new(_: NoConfig) -> Self {
        Panicky
    }
}

#[async_trait]
impl Chain for Panicky {
    async fn invoke(
        &self,
        _: &ChainContext,
        request: ChatRequest,
    ) -> Result<ChainOutput, ChainError> {
        let index = request.messages.len() + 10;
        // An out-of-bounds index: the kind of bug a chain author might ship.
        let message = &request.messages[index];
        Ok(ChainOutput::Response(
            switchyard_core::ChatResponse::assistant("", "", 0, message.text(), Default::default()),
        ))
    }
}

#[tokio::test]
async fn a_panicking_chain_is_a_500_with_the_request_id_and_the_gateway_keeps_serving() {
    let dir = temp_dir("panicky");
    std::fs::write(dir.join("chain.toml"), "chain = \"panicky\"\n").unwrap();
    let mut entries = switchyard_chains::registry().entries().to_vec();
    entries.push(ChainEntry::of::<Panicky>(""));
    let upstream = FakeUpstream::start(vec![]).await;
    let config = chains_config(
        &upstream.base_url,
        &format!(
            "[[endpoints]]\nname = \"panicky\"\nchain_dir = \"{}\"\n[[endpoints]]\nname = \"support\"\nchain_dir = \"{}\"\n",
            dir.display(),
            repo_path("chains/support_bot")
        ),
    );
    let gateway = TestGateway::start_with_registry(&config, &Registry::new(entries)).await;

    let ask = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "x"}]});
    for _ in 0..2 {
        let response = gateway.post("/v1/chat/completions", &ask("panicky")).await;
        assert_eq!(response.status(), 500);
        let request_id = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let body: Value = response.json().await.unwrap();
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("chain 'panicky' panicked"), "{message}");
        assert!(message.contains(&request_id), "{message}");
        // The panic's message is for the log, not the client.
        assert!(!message.contains("out of bounds"), "{message}");
    }
    let healthy = gateway.post("/v1/chat/completions", &ask("support")).await;
    assert_eq!(healthy.status(), 200);
}

#[tokio::test]
async fn broken_chain_folders_fail_at_start_up_with_every_reason() {
    // A copy of support_bot's folder, to break.
    let copy = |name: &str| {
        let folder = temp_dir(name);
        std::fs::create_dir_all(folder.join("prompts")).unwrap();
        for file in ["mod.rs", "chain.toml", "prompts/system.tera"] {
            std::fs::copy(
                repo_path(&format!("chains/support_bot/{file}")),
                folder.join(file),
            )
            .unwrap();
        }
        folder
    };
    // One with a template syntax error.
    let broken = copy("broken-template");
    std::fs::write(broken.join("prompts/system.tera"), "Hello {{ product").unwrap();
    // One whose chain.toml maps an LLM the chain does not have (and whose prompts folder holds
    // a hidden file, which is no template).
    let extra_llm = copy("extra-llm");
    let manifest = std::fs::read_to_string(extra_llm.join("chain.toml")).unwrap();
    std::fs::write(
        extra_llm.join("chain.toml"),
        manifest.replace("[llms]\n", "[llms]\nsummariser = \"chat\"\n"),
    )
    .unwrap();
    std::fs::write(extra_llm.join("prompts/.draft.tera"), "{{ unclosed").unwrap();

    let upstream = FakeUpstream::start(vec![]).await;
    let config = chains_config(
        &upstream.base_url,
        &format!(
            "[[endpoints]]\nname = \"a\"\nchain_dir = \"{}\"\n\
             [[endpoints]]\nname = \"b\"\nchain_dir = \"{}\"\nconfig = {{ tonne = \"x\" }}\n\
             [[endpoints]]\nname = \"c\"\nchain_dir = \"/nonexistent/chain\"\n\
             [[endpoints]]\nname = \"d\"\nchain_dir = \"{}\"\nllms = {{ defualt = \"chat\" }}\n\
             [[endpoints]]\nname = \"e\"\nchain_dir = \"{}\"\n",
            broken.display(),
            repo_path("chains/support_bot"),
            repo_path("chains/support_bot"),
            extra_llm.display(),
        ),
    );
    let env = |_: &str| None;
    let config = switchyard_gateway::Config::parse("test.toml", &config, &env).unwrap();
    let error = match switchyard_gateway::Gateway::new(config, &switchyard_chains::registry()) {
        Ok(_) => panic!("broken chains must not load"),
        Err(error) => error.to_string(),
    };
    assert!(
        error.starts_with("5 endpoint(s) could not be loaded"),
        "{error}"
    );
    assert!(
        error.contains("endpoint 'a'") && error.contains("template 'system'"),
        "{error}"
    );
    assert!(
        error.contains("endpoint 'b'")
            && error
                .contains("config (the endpoint's config override): tonne: unknown field `tonne`"),
        "{error}"
    );
    assert!(
        error.contains("endpoint 'c'") && error.contains("/nonexistent/chain/chain.toml"),
        "{error}"
    );
    // A misspelt LLM override would have left `default` on chain.toml's route.
    assert!(
        error.contains("endpoint 'd'")
            && error.contains("llms: the chain has no LLM 'defualt' (its LLMs: default)"),
        "{error}"
    );
    assert!(
        error.contains(&format!(
            "endpoint 'e': {}: chain.toml [llms]: the chain has no LLM 'summariser' (its LLMs: \
             default)",
            extra_llm.display()
        )) && !error.contains(".draft"),
        "{error}"
    );
}
