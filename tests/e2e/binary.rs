//! The `switchyard` binary as an operator runs it: start, serve, SIGTERM, graceful exit.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Notify;

use serde_json::Value;

use crate::common::{
    FakeUpstream, GatewayProcess, Reply, chat_body, config_over, read_stream, sse_data, stdout,
    stream_text, switchyard, temp_dir,
};

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish_and_refuses_new_ones() {
    let upstream = FakeUpstream::start(vec![Reply::Delay(
        Duration::from_secs(5),
        Box::new(Reply::Echo),
    )])
    .await;
    let config_path = std::env::temp_dir().join(format!(
        "switchyard-binary-test-{}.toml",
        std::process::id()
    ));
    std::fs::write(
        &config_path,
        config_over(&[&upstream.base_url], "timeout_ms = 20000"),
    )
    .unwrap();

    // One event-loop thread: connections are served in the order they came, so the two
    // unfinished requests below have been read as far as they go once the third is upstream.
    let mut gateway = GatewayProcess::start(
        &config_path,
        &[
            ("TEST_OPENAI_KEY", "sk-test-key-must-not-be-logged"),
            ("TOKIO_WORKER_THREADS", "1"),
        ],
    );
    let address = gateway.address.clone();
    let mut log = gateway.startup_log.clone();

    // A client that sends nothing, one that never finishes its request head, and one that never
    // finishes its body: none may hold the shutdown up (header_timeout_ms and client_timeout_ms
    // are 120 s and 60 s here).
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let silent = tokio::net::TcpStream::connect(&address).await.unwrap();
    let mut partial_head = tokio::net::TcpStream::connect(&address).await.unwrap();
    partial_head
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut partial_body = tokio::net::TcpStream::connect(&address).await.unwrap();
    partial_body
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
        .await
        .unwrap();

    let client = reqwest::Client::new();
    let url = format!("http://{address}/v1/chat/completions");
    let in_flight = tokio::spawn(client.post(&url).json(&chat_body("finish me")).send());
    upstream.wait_for_requests(1).await;

    let status = Command::new("kill")
        .args(["-TERM", &gateway.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let killed = std::time::Instant::now();
    // The request whose body had not arrived is refused at once; the other connection closes.
    let mut refused = Vec::new();
    partial_body.read_to_end(&mut refused).await.unwrap();
    let refused = String::from_utf8_lossy(&refused);
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("\"code\":\"shutting_down\""), "{refused}");
    for mut unanswered in [partial_head, silent] {
        let mut nothing = Vec::new();
        unanswered.read_to_end(&mut nothing).await.unwrap();
        assert!(nothing.is_empty());
    }
    // New connections are refused while the in-flight request is still being served.
    wait_until_refused(&address).await;
    assert!(
        !in_flight.is_finished(),
        "the upstream answers only after 5 s"
    );

    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "finish me");

    let exit = gateway.child.wait().unwrap();
    assert!(exit.success(), "exit status {exit:?}");
    // Gone once the in-flight request (5 s upstream) was answered, not after a client timeout.
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "{:?}",
        killed.elapsed()
    );
    // The reader thread ends at the end of stderr, after the last line the gateway wrote.
    log.extend(gateway.log.iter());
    std::fs::remove_file(&config_path).unwrap();

    let request_lines: Vec<Value> = log
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["message"] == "request")
        .collect();
    let statuses: Vec<&Value> = request_lines.iter().map(|l| &l["status"]).collect();
    assert_eq!(statuses, [503, 200], "the refused body first");
    let request_line = &request_lines[1];
    assert_eq!(request_line["endpoint"], "chat");
    // Start-up says what each endpoint serves.
    let loaded = log
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["message"] == "endpoint loaded")
        .unwrap_or_else(|| panic!("no endpoint line in {log:#?}"));
    assert_eq!(loaded["endpoint"], "chat");
    assert_eq!(loaded["kind"], "route");
    assert_eq!(loaded["source"], "main");
    assert!(loaded["load_ms"].is_u64());
    assert!(request_line["upstream_ms"].as_f64().unwrap() >= 5000.0);
    assert!(log.iter().any(|l| l.contains("shutdown signal received")));
    assert!(log.iter().any(|l| l.contains("switchyard stopped")));
    assert!(
        !log.iter()
            .any(|l| l.contains("sk-test-key-must-not-be-logged")),
        "a secret reached the log"
    );
}

#[tokio::test]
async fn sigterm_lets_a_stream_in_flight_finish() {
    let release = Arc::new(Notify::new());
    let upstream = FakeUpstream::start(vec![Reply::StreamThenWait(
        vec!["before ", "shutdown, "],
        release.clone(),
    )])
    .await;
    let work = temp_dir("sigterm-stream");
    let config = work.join("gateway.toml");
    std::fs::write(
        &config,
        config_over(&[&upstream.base_url], "timeout_ms = 20000"),
    )
    .unwrap();
    let mut gateway = GatewayProcess::start(&config, &[("TEST_OPENAI_KEY", "sk-test")]);
    let (mut chunks, mut received) = stream_until(&gateway, "shutdown, ").await;

    // Mid-stream: SIGTERM, and the gateway stops accepting; the stream goes on to its end.
    sigterm(&gateway);
    wait_until_refused(&gateway.address).await;
    release.notify_one();
    while let Some(piece) = chunks.next().await {
        received.push_str(std::str::from_utf8(&piece.unwrap()).unwrap());
    }
    let frames = sse_data(&received);
    assert_eq!(stream_text(&frames), "before shutdown, ");
    assert_eq!(frames.last().unwrap(), "[DONE]");
    let log = exit_log(&mut gateway);
    let request = log.iter().find(|l| l["message"] == "request").unwrap();
    assert_eq!(request["status"], 200);
    assert_eq!(request["stream"], true);
    std::fs::remove_dir_all(&work).unwrap();
}

#[tokio::test]
async fn requests_still_running_at_the_shutdown_deadline_are_cut_off_logged_and_the_gateway_exits()
{
    let upstream = FakeUpstream::start(vec![
        Reply::StreamThenStall(vec!["never ", "ends"]),
        Reply::Delay(Duration::from_secs(600), Box::new(Reply::Echo)),
    ])
    .await;
    let work = temp_dir("sigterm-deadline");
    let config = work.join("gateway.toml");
    std::fs::write(
        &config,
        "[server]\nshutdown_timeout_ms = 300\n".to_owned()
            + &config_over(&[&upstream.base_url], "timeout_ms = 600000"),
    )
    .unwrap();
    let mut gateway = GatewayProcess::start(&config, &[("TEST_OPENAI_KEY", "sk-test")]);
    let (mut chunks, mut received) = stream_until(&gateway, "ends").await;
    let waiting = tokio::spawn(
        reqwest::Client::new()
            .post(gateway.url("/v1/chat/completions"))
            .json(&chat_body("slow"))
            .send(),
    );
    upstream.wait_for_requests(2).await;
    // Both upstream calls stall (their route would wait 10 minutes): SIGTERM, and 300 ms later
    // the stream ends with an error frame and [DONE], the other request's connection is closed,
    // and the gateway exits.
    sigterm(&gateway);
    while let Some(Ok(piece)) = chunks.next().await {
        received.push_str(std::str::from_utf8(&piece).unwrap());
    }
    let frames = sse_data(&received);
    assert_eq!(frames.last().unwrap(), "[DONE]", "{received}");
    let error: Value = serde_json::from_str(&frames[frames.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], "shutting_down");
    assert!(waiting.await.unwrap().is_err(), "closed without an answer");
    let log = exit_log(&mut gateway);
    let requests: Vec<&Value> = log.iter().filter(|l| l["message"] == "request").collect();
    let statuses: Vec<(bool, u64)> = requests
        .iter()
        .map(|r| {
            (
                r["stream"].as_bool().unwrap(),
                r["status"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(statuses.len(), 2, "{requests:?}");
    assert!(
        statuses.contains(&(true, 200)) && statuses.contains(&(false, 503)),
        "{statuses:?}"
    );
    assert!(
        requests.iter().all(|r| r["outcome"] == "shutdown"),
        "{requests:?}"
    );
    assert!(
        log.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.contains("shutdown_timeout_ms"))),
        "{log:#?}"
    );
    std::fs::remove_dir_all(&work).unwrap();
}

/// Starts a stream through `gateway` and reads it until it holds `text`: the open stream, and
/// what was read.
async fn stream_until(
    gateway: &GatewayProcess,
    text: &str,
) -> (
    impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + use<>,
    String,
) {
    let mut body = chat_body("x");
    body["stream"] = true.into();
    let response = reqwest::Client::new()
        .post(gateway.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut chunks = Box::pin(response.bytes_stream());
    let mut received = String::new();
    while !received.contains(text) {
        let piece = chunks
            .next()
            .await
            .expect("the stream ended early")
            .unwrap();
        received.push_str(std::str::from_utf8(&piece).unwrap());
    }
    (chunks, received)
}

/// Waits for the gateway to exit, successfully; its JSON log lines after start-up.
fn exit_log(gateway: &mut GatewayProcess) -> Vec<Value> {
    let exit = gateway.child.wait().unwrap();
    assert!(exit.success(), "exit status {exit:?}");
    gateway
        .log
        .iter()
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect()
}

fn sigterm(gateway: &GatewayProcess) {
    let terminated = Command::new("kill")
        .args(["-TERM", &gateway.child.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
}

/// Waits (10 s at most) until `address` refuses connections: the gateway has stopped accepting.
async fn wait_until_refused(address: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(address).await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "still accepting after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn the_cli_logs_lists_aliases_shows_and_restores() {
    let work = crate::common::temp_dir("cli");
    let store = work.join("store");
    let chain = switchyard_chains::chain_dir("router");
    let chain = chain.to_str().unwrap();

    let logged = switchyard(
        &store,
        &[
            "log", "chain", chain, "--name", "router", "--alias", "staging",
        ],
    );
    assert_eq!(stdout(&logged), "models:/router/1\n");
    assert!(
        String::from_utf8_lossy(&logged.stderr).contains("models:/router@staging -> version 1")
    );
    let again = switchyard(&store, &["log", "chain", chain, "--name", "router"]);
    assert_eq!(stdout(&again), "models:/router/1\n");
    assert!(String::from_utf8_lossy(&again.stderr).contains("content unchanged"));

    assert_eq!(
        stdout(&switchyard(
            &store,
            &["models", "alias", "router", "production", "1"]
        )),
        "models:/router@production -> models:/router/1\n"
    );
    assert_eq!(
        stdout(&switchyard(&store, &["models", "list"])),
        "router\tversions: 1\taliases: production=1,staging=1\n"
    );

    let shown = stdout(&switchyard(
        &store,
        &["models", "show", "models:/router@production"],
    ));
    assert!(shown.starts_with("# models:/router/1 ("), "{shown}");
    assert!(
        shown.contains("switchyard_chain:") && shown.contains("chain: router"),
        "{shown}"
    );
    assert!(
        shown.ends_with(
            "# files: intact (content_sha256 matches)\n\
             # code: the code compiled into this binary (code_sha256 matches)\n"
        ),
        "{shown}"
    );

    let restored = work.join("restored");
    stdout(&switchyard(
        &store,
        &[
            "models",
            "restore",
            "models:/router/latest",
            restored.to_str().unwrap(),
        ],
    ));
    assert_eq!(
        std::fs::read_to_string(restored.join("mod.rs")).unwrap(),
        std::fs::read_to_string(switchyard_chains::chain_dir("router").join("mod.rs")).unwrap()
    );

    // Code this binary was not built from is logged, but an alias is not moved to it (a gateway
    // built like this one would refuse it), unless asked to.
    let mut code = std::fs::read_to_string(restored.join("mod.rs")).unwrap();
    code.push_str("// an edit that was never compiled\n");
    std::fs::write(restored.join("mod.rs"), code).unwrap();
    let restored = restored.to_str().unwrap();
    let log_edited = |extra: &[&str]| {
        let mut args = vec![
            "log",
            "chain",
            restored,
            "--name",
            "router",
            "--alias",
            "production",
        ];
        args.extend(extra);
        switchyard(&store, &args)
    };
    let refused = log_edited(&[]);
    assert_eq!(refused.status.code(), Some(2), "logged, alias kept");
    assert_eq!(
        String::from_utf8_lossy(&refused.stdout),
        "models:/router/2\n"
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("models:/router@production was not moved")
            && stderr.contains("--allow-code-mismatch"),
        "{stderr}"
    );
    // It is the latest version now, which the warning says.
    assert!(
        stderr.contains("models:/router/latest is this version now"),
        "{stderr}"
    );
    assert_eq!(
        stdout(&switchyard(&store, &["models", "list"])),
        "router\tversions: 1,2\taliases: production=1,staging=1\n"
    );
    // `models alias` refuses it as well, and `models show` says why.
    let alias = |extra: &[&str]| {
        let mut args = vec!["models", "alias", "router", "canary", "2"];
        args.extend(extra);
        switchyard(&store, &args)
    };
    let refused = alias(&[]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains(
            "models:/router@canary was not moved: models:/router/2 has code that differs from \
             the 'router' chain compiled into this binary"
        ) && stderr.contains("--allow-code-mismatch"),
        "{stderr}"
    );
    let shown = stdout(&switchyard(&store, &["models", "show", "models:/router/2"]));
    assert!(
        shown.contains("# code: has code that differs from the 'router' chain"),
        "{shown}"
    );
    assert!(alias(&["--allow-code-mismatch"]).status.success());
    let forced = log_edited(&["--allow-code-mismatch"]);
    assert!(forced.status.success());
    assert!(String::from_utf8_lossy(&forced.stderr).contains("content unchanged"));
    assert_eq!(
        stdout(&switchyard(&store, &["models", "list"])),
        "router\tversions: 1,2\taliases: canary=2,production=2,staging=1\n"
    );

    // A version whose files changed after logging fails `show` (its manifest is still shown).
    let prompt = std::fs::read_dir(store.join("models/router/1/code/prompts"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut text = std::fs::read_to_string(&prompt).unwrap();
    text.push_str("tampered\n");
    std::fs::write(&prompt, text).unwrap();
    let tampered = switchyard(&store, &["models", "show", "models:/router/1"]);
    assert!(!tampered.status.success());
    assert!(String::from_utf8_lossy(&tampered.stdout).contains("chain: router"));
    let stderr = String::from_utf8_lossy(&tampered.stderr);
    assert!(
        stderr.contains("models:/router/1 is not intact"),
        "{stderr}"
    );

    let nowhere = switchyard(&work.join("nowhere"), &["models", "list"]);
    assert!(String::from_utf8_lossy(&nowhere.stderr).starts_with("no store at "));

    let bad = switchyard(&store, &["models", "show", "models:/router/9"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("model 'router' has no version 9"));
    let traversal = switchyard(&store, &["log", "chain", chain, "--name", "../../etc"]);
    assert!(!traversal.status.success());
    assert!(String::from_utf8_lossy(&traversal.stderr).contains("invalid model name"));
}

#[test]
fn predict_runs_a_chain_or_a_route_once_without_a_server() {
    let work = crate::common::temp_dir("predict-chat");
    let store = work.join("store");
    let quickstart = concat!(env!("CARGO_MANIFEST_DIR"), "/config/quickstart.toml");
    let predict = |target: &str, input: &str| {
        switchyard(
            &store,
            &["predict", target, "--config", quickstart, "--input", input],
        )
    };
    let answer =
        |output: std::process::Output| -> Value { serde_json::from_str(&stdout(&output)).unwrap() };
    let late = r#"{"messages":[{"role":"user","content":"my order is late"}]}"#;
    let mock_answer = "Thanks for your message! This answer comes from the offline mock provider: \
                       point the `chat` route at a real provider to get real answers.";

    // A chain endpoint of the config (a chain folder), on the config's mock provider.
    let support = answer(predict("support", late));
    assert_eq!(support["object"], "chat.completion");
    assert_eq!(support["choices"][0]["message"]["content"], mock_answer);
    assert_eq!(support["usage"]["total_tokens"], 74);
    // A route endpoint.
    let echo = answer(predict(
        "echo",
        r#"{"messages":[{"role":"user","content":"echo me"}]}"#,
    ));
    assert_eq!(echo["choices"][0]["message"]["content"], "echo me");
    // A stream prints its SSE frames as a client would read them.
    let streamed = stdout(&predict(
        "echo",
        r#"{"stream": true, "messages": [{"role": "user", "content": "echo me"}]}"#,
    ));
    let frames = sse_data(&streamed);
    assert_eq!(stream_text(&frames), "echo me");
    assert_eq!(frames.last().unwrap(), "[DONE]");
    // A logged chain no endpoint serves: its LLMs bound to the config's routes.
    let chain = switchyard_chains::chain_dir("support_bot");
    let logged = switchyard(
        &store,
        &["log", "chain", chain.to_str().unwrap(), "--name", "bot"],
    );
    assert_eq!(stdout(&logged), "models:/bot/1\n");
    let bot = answer(predict("models:/bot/1", late));
    assert_eq!(bot["choices"][0]["message"]["content"], mock_answer);

    // The endpoint's error answer is the command's error.
    let refused = predict("support", r#"{"messages":[]}"#);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("endpoint support answered 400 Bad Request")
            && stderr.contains("'messages' must contain at least one message"),
        "{stderr}"
    );
    // A production-style config whose keys, Redis store and unused providers are not set here:
    // the request needs none of them. A logged chain an endpoint serves takes the endpoint's
    // overrides (here its LLM bound to a route the chain's own chain.toml does not name).
    let production = work.join("production.toml");
    std::fs::write(
        &production,
        r#"
        [auth]
        admin_key = "${SWITCHYARD_TEST_UNSET_ADMIN_KEY}"
        keys = [{ id = "team", key_env = "SWITCHYARD_TEST_UNSET_TEAM_KEY" }]
        [[limits]]
        scope = ["api_key"]
        requests_per_minute = 1
        [limits_store]
        kind = "redis"
        url = "${SWITCHYARD_TEST_UNSET_REDIS_URL}"
        on_error = "deny"
        [providers.openai]
        kind = "openai"
        base_url = "http://127.0.0.1:1/v1"
        api_key = "${SWITCHYARD_TEST_UNSET_OPENAI_KEY}"
        [providers.other]
        kind = "openai"
        base_url = "http://127.0.0.1:1/v1"
        api_key = "${SWITCHYARD_TEST_UNSET_OTHER_KEY}"
        [providers.offline]
        kind = "mock"
        reply = "from the production config"
        [routes.assistant]
        targets = [{ provider = "offline", model = "m" }]
        [routes.gpt]
        targets = [{ provider = "openai", model = "gpt-4o-mini" }]
        [[endpoints]]
        name = "bot"
        model = "models:/bot/1"
        llms = { default = "assistant" }
        [[endpoints]]
        name = "gpt"
        route = "gpt"
        [[endpoints]]
        name = "bot-on-gpt"
        model = "models:/bot/1"
        llms = { default = "gpt" }
        "#,
    )
    .unwrap();
    let production = production.to_str().unwrap();
    for target in ["bot", "models:/bot/1"] {
        let output = switchyard(
            &store,
            &["predict", target, "--config", production, "--input", late],
        );
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert_eq!(
            answer(output)["choices"][0]["message"]["content"],
            "from the production config",
            "{target}"
        );
        // The keys, the Redis store and the provider `openai` are not used: nothing about them.
        assert!(!stderr.contains("warning:"), "{stderr}");
        assert!(!stderr.contains("not set"), "{stderr}");
        // Two endpoints serve the URI: the first one's overrides, and the command says so.
        let note = "note: several endpoints serve models:/bot/1; running it as endpoint 'bot'";
        assert_eq!(
            stderr.contains(note),
            target.starts_with("models:/"),
            "{stderr}"
        );
    }

    // A call that fails names the provider keys that are not set, of the providers it calls.
    let gpt = switchyard(
        &store,
        &["predict", "gpt", "--config", production, "--input", late],
    );
    assert!(!gpt.status.success());
    let stderr = String::from_utf8_lossy(&gpt.stderr);
    assert!(
        stderr.contains(
            "note: these providers' api_key variables are not set, and a provider refuses calls \
             without its key: SWITCHYARD_TEST_UNSET_OPENAI_KEY (provider 'openai')"
        ) && stderr.contains("endpoint gpt answered 502"),
        "{stderr}"
    );
    assert!(!stderr.contains("OTHER_KEY"), "{stderr}");

    // A chain's LLMs are routes of a config: without one it says so.
    let no_config = switchyard(&store, &["predict", "models:/bot/1", "--input", late]);
    assert!(!no_config.status.success());
    assert!(
        String::from_utf8_lossy(&no_config.stderr).contains("so give --config"),
        "{}",
        String::from_utf8_lossy(&no_config.stderr)
    );
}

#[test]
fn ten_concurrent_log_processes_get_ten_distinct_intact_versions() {
    let work = crate::common::temp_dir("cli-concurrent");
    let store = work.join("store");
    let source = switchyard_chains::chain_dir("support_bot");
    let children: Vec<_> = (0..10)
        .map(|i| {
            let folder = work.join(format!("bot-{i}"));
            for relative in switchyard_core::code_hash::all_files(&source).unwrap() {
                std::fs::create_dir_all(folder.join(&relative).parent().unwrap()).unwrap();
                std::fs::copy(source.join(&relative), folder.join(&relative)).unwrap();
            }
            let manifest = std::fs::read_to_string(folder.join("chain.toml")).unwrap();
            std::fs::write(
                folder.join("chain.toml"),
                manifest.replace("Switchyard", &format!("Product {i}")),
            )
            .unwrap();
            let child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
                .args(["log", "chain", folder.to_str().unwrap(), "--name", "bot"])
                .env("SWITCHYARD_STORE", &store)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            (i, child)
        })
        .collect();
    let store = switchyard_store::Store::new(&store);
    let mut versions = Vec::new();
    for (i, child) in children {
        let printed = stdout(&child.wait_with_output().unwrap());
        let uri: switchyard_store::ModelUri = printed.trim().parse().unwrap();
        let version = store.resolve(&uri).unwrap();
        let (flavor, _) = store.verify_chain(&version).unwrap();
        assert_eq!(
            flavor.config["product"],
            format!("Product {i}"),
            "{uri} holds another log's content"
        );
        versions.push(version.version);
    }
    versions.sort_unstable();
    assert_eq!(versions, (1..=10).collect::<Vec<u64>>());
}

/// An OTLP/HTTP collector stand-in: records the JSON bodies posted to `/v1/traces`.
async fn otlp_receiver() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    use axum::routing::post;
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                sink.lock()
                    .unwrap()
                    .push(serde_json::from_slice::<Value>(&body).unwrap());
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{address}"), received)
}

fn attribute<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| &a["value"])
}

#[tokio::test]
async fn traces_join_the_callers_and_carry_chain_steps_and_upstream_calls_as_children() {
    let (collector, received) = otlp_receiver().await;
    let upstream = FakeUpstream::start(vec![]).await;
    let slow = FakeUpstream::start(vec![Reply::Delay(
        Duration::from_secs(10),
        Box::new(Reply::Echo),
    )])
    .await;
    let hangs = FakeUpstream::start(vec![Reply::Delay(
        Duration::from_secs(10),
        Box::new(Reply::Echo),
    )])
    .await;
    let breaks = FakeUpstream::start(vec![Reply::StreamThenDrop(vec!["a", "b"])]).await;
    let hold = Arc::new(Notify::new());
    let waits =
        FakeUpstream::start(vec![Reply::StreamThenWait(vec!["first "], hold.clone())]).await;
    let dir = crate::common::temp_dir("otlp");
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[providers.mock]\nkind = \"mock\"\n[routes.chat]\ntargets = [{{ provider = \"mock\", model = \"m\" }}]\n\
             [[endpoints]]\nname = \"summarize\"\nchain_dir = \"{}\"\nconfig = {{ keep_last = 1 }}\n\
             [providers.down]\nkind = \"openai\"\nbase_url = \"{}\"\n\
             [routes.down]\ntargets = [{{ provider = \"down\", model = \"m\" }}]\nretries = 0\n\
             [[endpoints]]\nname = \"broken\"\nroute = \"down\"\n\
             [providers.up]\nkind = \"openai\"\nbase_url = \"{}\"\n\
             [routes.up]\ntargets = [{{ provider = \"up\", model = \"gpt-up\" }}]\n\
             [[endpoints]]\nname = \"proxied\"\nroute = \"up\"\n\
             [providers.slow]\nkind = \"openai\"\nbase_url = \"{}\"\n\
             [routes.slow]\ntargets = [{{ provider = \"slow\", model = \"gpt-slow\" }}]\n\
             attempt_timeout_ms = 100\nretries = 0\n\
             [[endpoints]]\nname = \"slow\"\nroute = \"slow\"\n\
             [providers.hangs]\nkind = \"openai\"\nbase_url = \"{}\"\n\
             [routes.hangs]\ntargets = [{{ provider = \"hangs\", model = \"m\" }}]\n\
             [[endpoints]]\nname = \"hangs\"\nroute = \"hangs\"\n\
             [providers.breaks]\nkind = \"openai\"\nbase_url = \"{}\"\n\
             [routes.breaks]\ntargets = [{{ provider = \"breaks\", model = \"m\" }}]\n\
             [[endpoints]]\nname = \"breaks\"\nroute = \"breaks\"\n\
             [providers.waits]\nkind = \"openai\"\nbase_url = \"{}\"\n\
             [routes.waits]\ntargets = [{{ provider = \"waits\", model = \"m\" }}]\n\
             [[endpoints]]\nname = \"waits\"\nroute = \"waits\"\n",
            switchyard_chains::chain_dir("summarize_then_answer").display(),
            crate::common::closed_port_url().await,
            upstream.base_url,
            slow.base_url,
            hangs.base_url,
            breaks.base_url,
            waits.base_url,
        ),
    )
    .unwrap();
    let gateway = GatewayProcess::start(
        &config,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &collector),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            // OTEL_SERVICE_NAME wins over a service.name among the resource attributes.
            ("OTEL_SERVICE_NAME", "support-gateway"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "service.name=from-attributes,deployment.environment=test",
            ),
        ],
    );
    let conversation = serde_json::json!({"model": "summarize", "messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]});
    // The caller's trace: the request joins it, as a child of the caller's span.
    let (caller_trace, caller_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let response = reqwest::Client::new()
        .post(gateway.url("/v1/chat/completions"))
        .header("traceparent", format!("00-{caller_trace}-{caller_span}-01"))
        .json(&conversation)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let trace_id = response.headers()["x-trace-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(trace_id, caller_trace);
    // The same chain streamed: its answering step streams.
    let mut streamed = conversation.clone();
    streamed["stream"] = true.into();
    let streamed = reqwest::Client::new()
        .post(gateway.url("/v1/chat/completions"))
        .json(&streamed)
        .send()
        .await
        .unwrap();
    let streamed_trace = streamed.headers()["x-trace-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(streamed.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    // One chat request to endpoint `model`, streamed or not.
    let send = |model: &str, stream: bool| {
        let mut body = chat_body("x");
        body["model"] = model.into();
        body["stream"] = stream.into();
        let request = reqwest::Client::new()
            .post(gateway.url("/v1/chat/completions"))
            .json(&body);
        async move { request.send().await.unwrap() }
    };
    let failed = send("broken", false).await;
    assert_eq!(failed.status(), 502);
    let failed_trace = failed.headers()["x-trace-id"].to_str().unwrap().to_owned();
    let mut proxied = chat_body("x");
    proxied["model"] = "proxied".into();
    let answered = reqwest::Client::new()
        .post(gateway.url("/v1/chat/completions"))
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .header("tracestate", "vendor=caller-private")
        .json(&proxied)
        .send()
        .await
        .unwrap();
    assert_eq!(answered.status(), 200);
    let proxied_trace = answered.headers()["x-trace-id"]
        .to_str()
        .unwrap()
        .to_owned();
    // The provider is sent the trace context of the call: `00-<trace>-<the call's span>-01`.
    let sent = upstream.requests()[0].traceparent.clone().unwrap();
    let sent: Vec<&str> = sent.split('-').collect();
    assert_eq!(sent.len(), 4, "{sent:?}");
    assert_eq!(
        (sent[0], sent[1], sent[3]),
        ("00", proxied_trace.as_str(), "01")
    );
    let call_span = sent[2].to_owned();
    // The ids only: not the caller's tracestate.
    assert_eq!(upstream.requests()[0].tracestate, None);
    // A call the route's deadline cut off.
    let timed_out = send("slow", false).await;
    assert_eq!(timed_out.status(), 504);
    let timed_out_trace = timed_out.headers()["x-trace-id"]
        .to_str()
        .unwrap()
        .to_owned();

    // A stream that breaks off after its 200: its request span lasts until then and says so.
    let broke = send("breaks", true).await;
    assert_eq!(broke.status(), 200);
    let broke_trace = broke.headers()["x-trace-id"].to_str().unwrap().to_owned();
    assert!(broke.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    // A stream that takes its time: its request span lasts until its end.
    let waited = send("waits", true).await;
    let waited_trace = waited.headers()["x-trace-id"].to_str().unwrap().to_owned();
    let mut chunks = waited.bytes_stream();
    let mut streamed = String::new();
    while !streamed.contains("first ") {
        streamed.push_str(std::str::from_utf8(&chunks.next().await.unwrap().unwrap()).unwrap());
    }
    // The stream's length, not a synchronisation: the span must cover it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    hold.notify_one();
    while let Some(piece) = chunks.next().await {
        streamed.push_str(std::str::from_utf8(&piece.unwrap()).unwrap());
    }
    assert!(streamed.ends_with("data: [DONE]\n\n"), "{streamed}");
    // A client that leaves before its answer: the request span still gets its attributes.
    let mut hanging = chat_body("x");
    hanging["model"] = "hangs".into();
    let left = reqwest::Client::new()
        .post(gateway.url("/v1/chat/completions"))
        .timeout(Duration::from_millis(300))
        .json(&hanging)
        .send()
        .await;
    assert!(left.unwrap_err().is_timeout());
    // Read off this runtime: the collector and the upstreams run on it.
    let (mut gateway, lines) = tokio::task::spawn_blocking(move || {
        let lines = gateway.request_lines(8);
        (gateway, lines)
    })
    .await
    .unwrap();
    let left_line = lines
        .iter()
        .find(|line| line["endpoint"] == "hangs")
        .unwrap_or_else(|| panic!("{lines:#?}"));
    assert_eq!(left_line["status"], 499);

    // Spans are flushed when the process exits; the collector runs on this test's runtime, so
    // wait for the exit off it.
    assert!(
        Command::new("kill")
            .args(["-TERM", &gateway.child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let exit = tokio::task::spawn_blocking(move || {
        let status = gateway.child.wait().unwrap();
        drop(gateway);
        status
    })
    .await
    .unwrap();
    assert!(exit.success());
    let resource_spans: Vec<Value> = received
        .lock()
        .unwrap()
        .iter()
        .flat_map(|body| {
            body["resourceSpans"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    let all_spans: Vec<Value> = resource_spans
        .iter()
        .flat_map(|rs| rs["scopeSpans"].as_array().cloned().unwrap_or_default())
        .flat_map(|ss| ss["spans"].as_array().cloned().unwrap_or_default())
        .collect();
    // The span named `name` of trace `trace`.
    let span = |trace: &str, name: &str| -> &Value {
        all_spans
            .iter()
            .find(|s| s["traceId"] == trace && s["name"] == name)
            .unwrap_or_else(|| panic!("no {name} span in trace {trace}: {all_spans:#?}"))
    };
    // A request that failed upstream: its span's status is an error (STATUS_CODE_ERROR).
    let failed = span(&failed_trace, "request");
    assert_eq!(failed["status"]["code"], 2, "{failed}");
    // Its upstream call (a refused connection) too, with the reason.
    let failed_call = span(&failed_trace, "chat m");
    assert_eq!(failed_call["status"]["code"], 2, "{failed_call}");
    assert_eq!(
        attribute(failed_call, "error.type").unwrap()["stringValue"],
        "connect"
    );
    // A stream that broke off: an error, with the outcome of its log line.
    let broke = span(&broke_trace, "request");
    assert_eq!(broke["status"]["code"], 2, "{broke}");
    assert_eq!(
        attribute(broke, "outcome").unwrap()["stringValue"],
        "upstream_error"
    );
    // A stream held for 300 ms: its span lasts as long.
    let waited = span(&waited_trace, "request");
    let nanos = |key: &str| -> u64 { waited[key].as_str().unwrap().parse().unwrap() };
    let lasted = nanos("endTimeUnixNano") - nanos("startTimeUnixNano");
    assert!(lasted >= 300_000_000, "the span ended after {lasted} ns");
    // A client that left: its endpoint and outcome, not an error of the gateway's.
    let left = all_spans
        .iter()
        .find(|s| {
            s["name"] == "request"
                && attribute(s, "endpoint").is_some_and(|e| e["stringValue"] == "hangs")
        })
        .unwrap_or_else(|| panic!("{all_spans:#?}"));
    assert_eq!(
        attribute(left, "outcome").unwrap()["stringValue"],
        "client_closed"
    );
    assert_ne!(left["status"]["code"], 2, "{left}");
    // An upstream call the route's deadline cut off.
    let cut_off = span(&timed_out_trace, "chat gpt-slow");
    assert_eq!(cut_off["status"]["code"], 2, "{cut_off}");
    assert_eq!(
        attribute(cut_off, "error.type").unwrap()["stringValue"],
        "cancelled"
    );
    // An upstream call is a client span, child of its request, named by OpenTelemetry's GenAI
    // conventions, and the span whose context the provider was sent.
    let proxied_spans: Vec<&Value> = all_spans
        .iter()
        .filter(|s| s["traceId"] == proxied_trace.as_str())
        .collect();
    let call = proxied_spans
        .iter()
        .find(|s| s["name"] == "chat gpt-up")
        .unwrap_or_else(|| panic!("{proxied_spans:#?}"));
    let proxied_request = proxied_spans
        .iter()
        .find(|s| s["name"] == "request")
        .unwrap();
    assert_eq!(call["spanId"], call_span.as_str());
    assert_eq!(call["parentSpanId"], proxied_request["spanId"]);
    // SPAN_KIND_CLIENT.
    assert_eq!(call["kind"], 3, "{call}");
    for (key, value) in [
        ("gen_ai.operation.name", "chat"),
        ("gen_ai.provider.name", "openai"),
        ("gen_ai.request.model", "gpt-up"),
        ("provider", "up"),
        ("server.address", "127.0.0.1"),
        ("http.request.method", "POST"),
    ] {
        assert_eq!(attribute(call, key).unwrap()["stringValue"], value, "{key}");
    }
    let spans: Vec<&Value> = all_spans
        .iter()
        .filter(|span| span["traceId"] == trace_id.as_str())
        .collect();
    let request = spans
        .iter()
        .find(|s| s["name"] == "request")
        .unwrap_or_else(|| panic!("{spans:#?}"));
    assert_eq!(request["parentSpanId"], caller_span);
    // SPAN_KIND_SERVER.
    assert_eq!(request["kind"], 2, "{request}");
    let service: Vec<Value> = resource_spans
        .iter()
        .filter_map(|rs| {
            rs["resource"]["attributes"]
                .as_array()?
                .iter()
                .find(|a| a["key"] == "service.name")
                .map(|a| a["value"]["stringValue"].clone())
        })
        .collect();
    assert!(!service.is_empty());
    assert!(
        service.iter().all(|name| name == "support-gateway"),
        "{service:?}"
    );
    assert_eq!(
        attribute(request, "endpoint").unwrap()["stringValue"],
        "summarize"
    );
    assert_eq!(
        attribute(request, "http.request.method").unwrap()["stringValue"],
        "POST"
    );
    assert_eq!(
        attribute(request, "url.path").unwrap()["stringValue"],
        "/v1/chat/completions"
    );
    // Integer attributes; OTLP/JSON writes 64-bit integers as strings (accept a number too).
    let integer = |span: &Value, name: &str| -> u64 {
        let value = &attribute(span, name).unwrap_or_else(|| panic!("no {name}"))["intValue"];
        value
            .to_string()
            .trim_matches('"')
            .parse()
            .unwrap_or_else(|_| panic!("{name} is not an integer: {value}"))
    };
    assert_eq!(integer(request, "http.response.status_code"), 200);
    // No tracing bookkeeping among the attributes.
    for key in [
        "code.file.path",
        "thread.id",
        "target",
        "busy_ns",
        "idle_ns",
    ] {
        assert!(attribute(request, key).is_none(), "{key}: {request}");
    }
    assert_eq!(integer(call, "http.response.status_code"), 200);
    assert_eq!(
        integer(call, "server.port"),
        u64::from(
            reqwest::Url::parse(&upstream.base_url)
                .unwrap()
                .port()
                .unwrap()
        )
    );
    let steps: Vec<&Value> = spans
        .iter()
        .copied()
        .filter(|s| s["name"] == "chain.llm")
        .collect();
    let names: Vec<&str> = steps
        .iter()
        .map(|s| {
            attribute(s, "step").unwrap()["stringValue"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(names.len(), 2, "{spans:#?}");
    assert!(
        names.contains(&"summarizer") && names.contains(&"answerer"),
        "{names:?}"
    );
    for step in steps {
        assert_eq!(
            step["parentSpanId"], request["spanId"],
            "a chain step is a child of its request"
        );
        assert_eq!(
            attribute(step, "gen_ai.operation.name").unwrap()["stringValue"],
            "chat"
        );
        assert!(integer(step, "gen_ai.usage.input_tokens") > 0);
        assert!(integer(step, "gen_ai.usage.output_tokens") > 0);
    }
    assert_eq!(
        spans.iter().filter(|s| s["name"] == "chain.render").count(),
        2
    );
    // A streamed step's span lasts until its stream's end, and so has its usage too.
    let answerer = all_spans
        .iter()
        .find(|s| {
            s["traceId"] == streamed_trace.as_str()
                && s["name"] == "chain.llm"
                && attribute(s, "step").is_some_and(|v| v["stringValue"] == "answerer")
        })
        .unwrap_or_else(|| panic!("{all_spans:#?}"));
    assert!(
        integer(answerer, "gen_ai.usage.output_tokens") > 0,
        "{answerer}"
    );
}

#[tokio::test]
async fn a_client_that_leaves_is_logged_with_the_upstream_time_it_waited() {
    let dir = crate::common::temp_dir("left-log");
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        "[providers.slow]\nkind = \"mock\"\nlatency_ms = 5000\n\
         [routes.r]\ntargets = [{ provider = \"slow\", model = \"m\" }]\n\
         [[endpoints]]\nname = \"slow\"\nroute = \"r\"\n",
    )
    .unwrap();
    let gateway = GatewayProcess::start(&config, &[]);
    let client = reqwest::Client::new();
    let mut slow = chat_body("x");
    slow["model"] = "slow".into();
    let left = client
        .post(gateway.url("/v1/chat/completions"))
        .json(&slow)
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(left.unwrap_err().is_timeout());
    // A stream request refused before it streams is logged as a stream request.
    let mut refused = chat_body("x");
    refused["model"] = "slow".into();
    refused["stream"] = true.into();
    refused["messages"] = serde_json::json!([]);
    let response = client
        .post(gateway.url("/v1/chat/completions"))
        .json(&refused)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);

    let lines = gateway.request_lines(2);
    let gone = lines.iter().find(|l| l["status"] == 499).unwrap();
    assert_eq!(gone["outcome"], "client_closed");
    let waited = gone["upstream_ms"].as_f64().unwrap();
    assert!((250.0..5000.0).contains(&waited), "{waited}");
    let stream = lines.iter().find(|l| l["status"] == 400).unwrap();
    assert_eq!(stream["stream"], true);
}

#[tokio::test]
async fn a_request_is_logged_with_the_key_it_came_with_refused_or_not() {
    let dir = crate::common::temp_dir("key-log");
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        "[auth]\nadmin_key = \"${ADMIN_KEY}\"\nkeys = [{ id = \"team-a\", key_env = \"TEAM_A_KEY\" }]\n\
         [providers.mock]\nkind = \"mock\"\n[routes.r]\ntargets = [{ provider = \"mock\", model = \"m\" }]\n\
         [[endpoints]]\nname = \"chat\"\nroute = \"r\"\n",
    )
    .unwrap();
    let gateway = GatewayProcess::start(
        &config,
        &[
            ("TEAM_A_KEY", "sk-team-a-secret"),
            ("ADMIN_KEY", "admin-secret-for-test"),
        ],
    );
    let client = reqwest::Client::new();
    let post = |body: &'static str| {
        client
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth("sk-team-a-secret")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    assert_eq!(post("{\"model\": ").await.unwrap().status(), 400);
    let unknown = r#"{"model": "nope", "messages": [{"role": "user", "content": "x"}]}"#;
    assert_eq!(post(unknown).await.unwrap().status(), 404);
    // Listing models (OpenAI's and MLflow's) is the key's too.
    for path in ["/v1/models", "/v1/models/chat", "/api/2.0/endpoints/"] {
        let listed = client
            .get(gateway.url(path))
            .bearer_auth("sk-team-a-secret")
            .send()
            .await
            .unwrap();
        assert_eq!(listed.status(), 200, "{path}");
    }
    let lines = gateway.request_lines(5);
    for line in &lines {
        assert_eq!(line["key_id"], "team-a", "{line}");
        assert!(!line.to_string().contains("sk-team-a-secret"));
    }
    // The admin API's requests, as the admin key's (an id no client key can have).
    let admin = client
        .get(gateway.url("/admin/endpoints"))
        .bearer_auth("admin-secret-for-test")
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), 200);
    let line = &gateway.request_lines(1)[0];
    assert_eq!(line["key_id"], "(admin)", "{line}");
    assert!(!line.to_string().contains("admin-secret-for-test"));
}

#[tokio::test]
async fn prompts_and_completions_are_logged_only_where_an_endpoint_asks_for_it() {
    let dir = crate::common::temp_dir("payload-log");
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        "[providers.mock]\nkind = \"mock\"\n[routes.r]\ntargets = [{ provider = \"mock\", model = \"m\" }]\n\
         [[endpoints]]\nname = \"private\"\nroute = \"r\"\n\
         [[endpoints]]\nname = \"audited\"\nroute = \"r\"\nlog_payloads = true\n",
    )
    .unwrap();
    let gateway = GatewayProcess::start(&config, &[]);
    let client = reqwest::Client::new();
    for (endpoint, secret) in [
        ("private", "my private diagnosis"),
        ("audited", "audited question"),
    ] {
        let body = serde_json::json!({"model": endpoint, "messages": [{"role": "user", "content": secret}]});
        let response = client
            .post(gateway.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let lines = gateway.request_lines(2);
    let private = lines.iter().find(|l| l["endpoint"] == "private").unwrap();
    assert_eq!(private.get("messages"), None);
    assert_eq!(private.get("completion"), None);
    assert!(!private.to_string().contains("diagnosis"));
    let audited = lines.iter().find(|l| l["endpoint"] == "audited").unwrap();
    assert_eq!(
        audited["messages"],
        r#"[{"role":"user","content":"audited question"}]"#
    );
    assert_eq!(audited["completion"], "audited question");
}

#[tokio::test]
async fn sighup_reloads_the_config_file() {
    let dir = crate::common::temp_dir("sighup");
    let config = dir.join("gateway.toml");
    let base = "[providers.mock]\nkind = \"mock\"\n[routes.r]\ntargets = [{ provider = \"mock\", model = \"m\" }]\n\
                [[endpoints]]\nname = \"first\"\nroute = \"r\"\n";
    std::fs::write(&config, base).unwrap();
    let gateway = GatewayProcess::start(&config, &[]);
    let client = reqwest::Client::new();
    let models = || {
        let request = client.get(gateway.url("/v1/models")).send();
        async move {
            let body: Value = request.await.unwrap().json().await.unwrap();
            body["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(models().await, ["first"]);

    std::fs::write(
        &config,
        format!("{base}[[endpoints]]\nname = \"second\"\nroute = \"r\"\n"),
    )
    .unwrap();
    assert!(
        Command::new("kill")
            .args(["-HUP", &gateway.child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while models().await != ["first", "second"] {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not reload the config"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A broken file is refused; the running config stays.
    std::fs::write(
        &config,
        "[[endpoints]]\nname = \"third\"\nroute = \"missing\"\n",
    )
    .unwrap();
    assert!(
        Command::new("kill")
            .args(["-HUP", &gateway.child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let refused = loop {
        let line = gateway
            .log
            .recv_timeout(Duration::from_secs(10))
            .expect("a log line about the reload");
        if line.contains("reload failed") {
            break line;
        }
    };
    assert!(refused.contains("unknown route 'missing'"), "{refused}");
    assert_eq!(models().await, ["first", "second"]);
}

#[tokio::test]
async fn upstream_calls_go_through_the_proxy_the_environment_names() {
    // The upstream's host does not resolve: only the proxy (the fake, which also answers an
    // absolute-form request for it) can get the request there.
    let proxy = FakeUpstream::start(vec![]).await;
    let proxy_url = proxy.base_url.trim_end_matches("/v1").to_owned();
    let dir = crate::common::temp_dir("proxy");
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        config_over(&["http://upstream.invalid/v1"], "retries = 0"),
    )
    .unwrap();
    let proxy_env = [
        ("HTTP_PROXY", proxy_url.as_str()),
        ("http_proxy", proxy_url.as_str()),
        ("NO_PROXY", ""),
        ("no_proxy", ""),
        ("TEST_OPENAI_KEY", "sk-test-key"),
    ];
    let gateway = GatewayProcess::start(&config, &proxy_env);
    let response = reqwest::Client::new()
        .post(gateway.url("/v1/chat/completions"))
        .json(&chat_body("via the proxy"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "via the proxy");
    let requests = proxy.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0].authorization.as_deref(),
        Some("Bearer sk-test-key")
    );

    // A proxy that cannot be reached: the error says the request went through a proxy.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_proxy = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let dead_env = proxy_env.map(|(name, value)| match name {
        "HTTP_PROXY" | "http_proxy" => (name, dead_proxy.as_str()),
        _ => (name, value),
    });
    let gateway = GatewayProcess::start(&config, &dead_env);
    let response = reqwest::Client::new()
        .post(gateway.url("/v1/chat/completions"))
        .json(&chat_body("nowhere"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("through the proxy"), "{message}");
}

/// A chat request and a streamed one to the gateway at `url`, each echoing `text`.
async fn chat_and_stream(client: &reqwest::Client, url: &str, text: &str) {
    let response = client
        .post(url)
        .json(&chat_body(text))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], text);
    let mut stream = chat_body(&format!("streamed {text}"));
    stream["stream"] = true.into();
    let response = client.post(url).json(&stream).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let frames = sse_data(&read_stream(response).await);
    assert_eq!(stream_text(&frames), format!("streamed {text}"));
    assert_eq!(frames.last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn https_upstreams_are_verified_against_the_system_trust_store() {
    let (upstream, ca_pem) = FakeUpstream::start_tls(vec![]).await;
    let dir = temp_dir("https");
    let ca_file = dir.join("test-ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let config = dir.join("gateway.toml");
    std::fs::write(&config, config_over(&[&upstream.base_url], "retries = 0")).unwrap();
    let key = ("TEST_OPENAI_KEY", "sk-test-key");
    let client = reqwest::Client::new();

    // The trust store the platform verifier reads on Linux may be replaced with SSL_CERT_FILE:
    // with the fake's CA in it, chat and streams go through, over HTTP/2 (ALPN).
    let trusting = GatewayProcess::start(
        &config,
        &[key, ("SSL_CERT_FILE", ca_file.to_str().unwrap())],
    );
    let url = trusting.url("/v1/chat/completions");
    chat_and_stream(&client, &url, "over TLS").await;
    let received = upstream.requests();
    assert_eq!(received.len(), 2);
    assert!(
        received
            .iter()
            .all(|r| r.version == axum::http::Version::HTTP_2)
    );
    assert_eq!(
        received[0].authorization.as_deref(),
        Some("Bearer sk-test-key")
    );

    // With the system's store, which does not hold that CA, the certificate is refused: a 502
    // that says why, and no request reaches the fake.
    let distrusting = GatewayProcess::start(&config, &[key]);
    let response = client
        .post(distrusting.url("/v1/chat/completions"))
        .json(&chat_body("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("certificate"), "{message}");
    assert_eq!(upstream.requests().len(), 2);
}

/// `switchyard:proxy-pass-must-not-be-logged`, base64: what a client of [`ConnectProxy`] must
/// present in `Proxy-Authorization`.
const PROXY_BASIC: &str = "c3dpdGNoeWFyZDpwcm94eS1wYXNzLW11c3Qtbm90LWJlLWxvZ2dlZA==";

#[tokio::test]
async fn https_upstreams_are_reached_through_a_connect_proxy_that_wants_credentials() {
    let (upstream, ca_pem) = FakeUpstream::start_tls(vec![]).await;
    let target = upstream.base_url["https://".len()..].trim_end_matches("/v1");
    let proxy = ConnectProxy::start().await;
    let dir = temp_dir("connect-proxy");
    let ca_file = dir.join("test-ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let config = dir.join("gateway.toml");
    std::fs::write(&config, config_over(&[&upstream.base_url], "retries = 0")).unwrap();
    let start = |credentials: &str| {
        let proxy_url = format!("http://{credentials}@{}", proxy.address);
        GatewayProcess::start(
            &config,
            &[
                ("HTTPS_PROXY", &proxy_url),
                ("https_proxy", &proxy_url),
                ("NO_PROXY", ""),
                ("no_proxy", ""),
                ("SSL_CERT_FILE", ca_file.to_str().unwrap()),
                ("TEST_OPENAI_KEY", "sk-test-key"),
            ],
        )
    };
    let client = reqwest::Client::new();

    // With the right credentials: a tunnel to the upstream, TLS verified end to end through it
    // (the certificate is the fake's, for 127.0.0.1), HTTP/2 inside; chat and streams.
    let mut trusted = start("switchyard:proxy-pass-must-not-be-logged");
    let url = trusted.url("/v1/chat/completions");
    chat_and_stream(&client, &url, "through the tunnel").await;
    let received = upstream.requests();
    assert_eq!(received.len(), 2);
    assert!(
        received
            .iter()
            .all(|r| r.version == axum::http::Version::HTTP_2
                && r.authorization.as_deref() == Some("Bearer sk-test-key"))
    );
    let tunnels = proxy.connects();
    assert!(!tunnels.is_empty());
    for tunnel in &tunnels {
        assert_eq!(tunnel.request_line, format!("CONNECT {target} HTTP/1.1"));
        assert!(tunnel.authorized);
    }

    // With wrong ones the proxy answers 407: a 502 that says the proxy wants credentials, and nothing
    // reaches the upstream.
    let mut refused = start("switchyard:wrong");
    let response = client
        .post(refused.url("/v1/chat/completions"))
        .json(&chat_body("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("tunnel error: proxy authorization required"),
        "{message}"
    );
    assert!(!message.contains("wrong"), "{message}");
    assert_eq!(upstream.requests().len(), 2);
    let last = proxy.connects().pop().unwrap();
    assert!(!last.authorized);

    // Neither gateway wrote a proxy password to its log, in clear or in base64.
    for gateway in [&mut trusted, &mut refused] {
        let log = gateway.stop();
        for secret in ["proxy-pass-must-not-be-logged", PROXY_BASIC, "wrong"] {
            assert!(!log.contains(secret), "{secret} in the log:\n{log}");
        }
    }
}

/// One CONNECT request a [`ConnectProxy`] received.
#[derive(Debug, Clone)]
struct Tunnel {
    request_line: String,
    /// Whether it carried `Proxy-Authorization: Basic` [`PROXY_BASIC`].
    authorized: bool,
}

/// An HTTP proxy that only opens tunnels (CONNECT, what clients use for HTTPS through a proxy),
/// and only for clients that present [`PROXY_BASIC`]; others get a 407.
struct ConnectProxy {
    address: std::net::SocketAddr,
    connects: std::sync::Arc<std::sync::Mutex<Vec<Tunnel>>>,
}

impl ConnectProxy {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let connects = std::sync::Arc::default();
        let seen = std::sync::Arc::clone(&connects);
        tokio::spawn(async move {
            loop {
                let (client, _) = listener.accept().await.unwrap();
                tokio::spawn(Self::tunnel(client, std::sync::Arc::clone(&seen)));
            }
        });
        Self { address, connects }
    }

    fn connects(&self) -> Vec<Tunnel> {
        self.connects.lock().unwrap().clone()
    }

    async fn tunnel(
        client: tokio::net::TcpStream,
        seen: std::sync::Arc<std::sync::Mutex<Vec<Tunnel>>>,
    ) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let mut reader = tokio::io::BufReader::new(client);
        let mut request_line = String::new();
        reader.read_line(&mut request_line).await.unwrap();
        let mut authorized = false;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).await.unwrap();
            if line.trim_end().is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                authorized |= name.eq_ignore_ascii_case("proxy-authorization")
                    && value.trim() == format!("Basic {PROXY_BASIC}");
            }
        }
        let request_line = request_line.trim_end().to_owned();
        seen.lock().unwrap().push(Tunnel {
            request_line: request_line.clone(),
            authorized,
        });
        // The client sends nothing after the head until the proxy answers, so the reader holds
        // no bytes of the tunnel.
        let mut client = reader.into_inner();
        if !authorized {
            let refusal = "HTTP/1.1 407 Proxy Authentication Required\r\nproxy-authenticate: Basic realm=\"test\"\r\ncontent-length: 0\r\n\r\n";
            let _ = client.write_all(refusal.as_bytes()).await;
            return;
        }
        let target = request_line.split(' ').nth(1).unwrap();
        let mut upstream = tokio::net::TcpStream::connect(target).await.unwrap();
        client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
            .unwrap();
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    }
}
