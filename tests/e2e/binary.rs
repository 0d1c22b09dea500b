//! The `switchyard` binary as an operator runs it: start, serve, SIGTERM, graceful exit.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use crate::common::{FakeUpstream, Reply, chat_body, config_over};

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

    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "--log-format",
            "json",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(&config_path)
        .env("TEST_OPENAI_KEY", "sk-test-key-must-not-be-logged")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            if lines_tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let mut log = Vec::new();
    let address = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(20))
            .expect("the server did not start");
        let parsed: Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("not a JSON log line: {line}"));
        log.push(line);
        if parsed["message"] == "switchyard listening" {
            break parsed["address"].as_str().unwrap().to_owned();
        }
    };

    let client = reqwest::Client::new();
    let url = format!("http://{address}/v1/chat/completions");
    let in_flight = tokio::spawn(client.post(&url).json(&chat_body("finish me")).send());
    upstream.wait_for_requests(1).await;

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
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

    let exit = child.wait().unwrap();
    assert!(exit.success(), "exit status {exit:?}");
    log.extend(lines.try_iter());
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
