//! The `switchyard` binary as an operator runs it: start, serve, SIGTERM, graceful exit.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::common::{FakeUpstream, GatewayProcess, Reply, chat_body, config_over};

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish_and_refuses_new_ones() {
    let upstream = FakeUpstream::start(vec![Reply::Delay(
        Duration::from_secs(2),
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

    let mut gateway = GatewayProcess::start(
        &config_path,
        &[("TEST_OPENAI_KEY", "sk-test-key-must-not-be-logged")],
    );
    let address = gateway.address.clone();
    let mut log = gateway.startup_log.clone();

    let client = reqwest::Client::new();
    let url = format!("http://{address}/v1/chat/completions");
    let in_flight = tokio::spawn(client.post(&url).json(&chat_body("finish me")).send());
    upstream.wait_for_requests(1).await;

    let status = Command::new("kill")
        .args(["-TERM", &gateway.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // New connections are refused while the in-flight request is still being served.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(&address).await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "still accepting after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !in_flight.is_finished(),
        "the upstream answers only after 2 s"
    );

    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "finish me");

    let exit = gateway.child.wait().unwrap();
    assert!(exit.success(), "exit status {exit:?}");
    log.extend(gateway.log.try_iter());
    std::fs::remove_file(&config_path).unwrap();

    let request_line = log
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["message"] == "request")
        .unwrap_or_else(|| panic!("no request log line in {log:#?}"));
    assert_eq!(request_line["endpoint"], "chat");
    assert_eq!(request_line["status"], 200);
    assert!(request_line["upstream_ms"].as_f64().unwrap() >= 2000.0);
    assert!(log.iter().any(|l| l.contains("shutdown signal received")));
    assert!(
        !log.iter()
            .any(|l| l.contains("sk-test-key-must-not-be-logged")),
        "a secret reached the log"
    );
}

fn switchyard(store: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .env("SWITCHYARD_STORE", store)
        .output()
        .unwrap()
}

fn stdout(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
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
        shown.ends_with("# files: intact (content_sha256 matches)\n"),
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

    let bad = switchyard(&store, &["models", "show", "models:/router/9"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("model 'router' has no version 9"));
    let traversal = switchyard(&store, &["log", "chain", chain, "--name", "../../etc"]);
    assert!(!traversal.status.success());
    assert!(String::from_utf8_lossy(&traversal.stderr).contains("invalid model name"));
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
