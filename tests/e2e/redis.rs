//! Rate limits shared through Redis: several gateway processes, one budget; Redis going away
//! and coming back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{
    FakeUpstream, GatewayProcess, RedisServer, Reply, TestGateway, chat_body, header, temp_dir,
};

fn limited_config(upstream: &str, redis: &str, on_error: &str, rule: &str) -> String {
    format!(
        r#"
        [limits_store]
        kind = "redis"
        url = "{redis}"
        on_error = "{on_error}"
        timeout_ms = 2000
        [[limits]]
        {rule}
        [providers.fake]
        kind = "openai"
        base_url = "{upstream}"
        [routes.main]
        targets = [{{ provider = "fake", model = "m" }}]
        retries = 0
        [[endpoints]]
        name = "chat"
        route = "main"
        "#
    )
}

#[tokio::test]
async fn three_gateway_processes_share_one_budget() {
    let redis = RedisServer::start();
    let upstream = FakeUpstream::start(vec![]).await;
    let dir = temp_dir("redis-replicas");
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        limited_config(
            &upstream.base_url,
            &redis.url(),
            "deny",
            "scope = [\"global\"]\nrequests_per_minute = 5\nburst = 2",
        ),
    )
    .unwrap();
    let replicas: Vec<GatewayProcess> = (0..3)
        .map(|_| GatewayProcess::start(&config, &[]))
        .collect();

    let client = reqwest::Client::new();
    let mut admitted = 0;
    let mut refused = 0;
    let mut remaining = Vec::new();
    for i in 0..21 {
        let response = client
            .post(replicas[i % 3].url("/v1/chat/completions"))
            .json(&chat_body("x"))
            .send()
            .await
            .unwrap();
        match response.status().as_u16() {
            200 => {
                admitted += 1;
                remaining.push(header(&response, "x-ratelimit-remaining-requests"));
            }
            429 => {
                refused += 1;
                let retry_after: u64 = header(&response, "retry-after").parse().unwrap();
                assert!(
                    (1..=12).contains(&retry_after),
                    "one request every 12 s: {retry_after}"
                );
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(
        (admitted, refused),
        (7, 14),
        "limit 5 + burst 2 across all replicas"
    );
    assert_eq!(
        remaining,
        ["6", "5", "4", "3", "2", "1", "0"],
        "one counter, whichever replica answered"
    );
    assert_eq!(upstream.requests().len(), 7);
}

#[tokio::test]
async fn remaining_requests_are_whole_with_an_interval_that_is_not_whole_microseconds() {
    let redis = RedisServer::start();
    let upstream = FakeUpstream::start(vec![]).await;
    // 7 per minute: one request every 8 571 428.57 µs, on a clock near 1.8e15 µs.
    let gateway = TestGateway::start(&limited_config(
        &upstream.base_url,
        &redis.url(),
        "deny",
        "scope = [\"global\"]\nrequests_per_minute = 7\nburst = 5",
    ))
    .await;
    let mut remaining = Vec::new();
    for _ in 0..3 {
        let response = gateway.post("/v1/chat/completions", &chat_body("x")).await;
        assert_eq!(response.status(), 200);
        remaining.push(header(&response, "x-ratelimit-remaining-requests"));
    }
    // 12 in all; the seconds these requests may take refill less than one. (Before the script
    // rounded, this rate and burst showed 10 first, whatever the clock said.)
    assert_eq!(remaining, ["11", "10", "9"]);
}

#[tokio::test]
async fn while_redis_is_down_the_policy_holds_and_limits_return_with_it() {
    let mut redis = RedisServer::start();
    let upstream = FakeUpstream::start(vec![]).await;
    let rule = "scope = [\"endpoint\"]\nrequests_per_minute = 3";
    let deny = limited_gateway(&upstream, &redis.url(), "deny", rule).await;
    let allow = limited_gateway(&upstream, &redis.url(), "allow", rule).await;
    let ready = |gateway: &TestGateway| {
        let request = gateway.client.get(gateway.url("/ready")).send();
        async move { request.await.unwrap().json::<Value>().await.unwrap()["rate_limiter"].clone() }
    };

    assert_eq!(status(&deny).await, 200);
    assert_eq!(ready(&deny).await, json!("ok"));

    redis.stop();
    // `/ready` asks Redis itself (once a second at most): it knows without any request.
    let deadline = Instant::now() + Duration::from_secs(15);
    while ready(&deny).await != json!("degraded") {
        assert!(Instant::now() < deadline, "/ready did not notice");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = deny.post("/v1/chat/completions", &chat_body("x")).await;
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limiter_unavailable");
    for _ in 0..5 {
        assert_eq!(status(&allow).await, 200, "on_error = allow");
    }
    assert_eq!(ready(&deny).await, json!("degraded"));
    assert_eq!(ready(&allow).await, json!("degraded"));
    assert_eq!(
        deny.client
            .get(deny.url("/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // Redis comes back (empty): `/ready` sees it without any request, the deny gateway
    // recovers by itself, and limits hold again.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    while ready(&deny).await != json!("ok") {
        assert!(
            Instant::now() < deadline,
            "the gateway did not reconnect to Redis"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status(&deny).await, 200);
    assert_eq!(status(&deny).await, 200);
    assert_eq!(status(&deny).await, 200);
    assert_eq!(status(&deny).await, 429, "3 per minute again");
}

#[tokio::test]
async fn a_redis_restarted_while_idle_costs_no_request() {
    let mut redis = RedisServer::start();
    let upstream = FakeUpstream::start(vec![]).await;
    let rule = "scope = [\"global\"]\nrequests_per_minute = 2";
    let gateway = limited_gateway(&upstream, &redis.url(), "deny", rule).await;
    assert_eq!(status(&gateway).await, 200);
    // The pooled connection dies with this Redis; the next request finds that out and retries
    // on a new connection instead of failing with on_error's 503.
    redis.stop();
    redis.restart();
    assert_eq!(status(&gateway).await, 200);
    assert_eq!(
        status(&gateway).await,
        200,
        "a new, empty Redis: 2 per minute again"
    );
    assert_eq!(status(&gateway).await, 429);
}

/// A "Redis" that accepts connections and never answers (hung, or its packets dropped): its
/// URL, and how many connections it has accepted.
async fn silent_redis() -> (String, tokio::sync::watch::Receiver<usize>) {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}", silent.local_addr().unwrap());
    let (counter, accepted) = tokio::sync::watch::channel(0);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            counter.send_modify(|n| *n += 1);
            held.push(socket);
        }
    });
    (url, accepted)
}

#[tokio::test]
async fn a_redis_that_stops_answering_holds_one_request_not_every_one() {
    let upstream = FakeUpstream::start(vec![]).await;
    let rule = "scope = [\"global\"]\nrequests_per_minute = 600";
    for (on_error, status) in [("allow", 200), ("deny", 503)] {
        let (url, accepted) = silent_redis().await;
        let config = limited_config(&upstream.base_url, &url, on_error, rule)
            .replace("timeout_ms = 2000", "timeout_ms = 300");
        let gateway = TestGateway::start(&config).await;
        let started = Instant::now();
        for _ in 0..20 {
            let response = gateway.post("/v1/chat/completions", &chat_body("x")).await;
            assert_eq!(response.status(), status, "on_error = {on_error}");
        }
        let elapsed = started.elapsed();
        // The first request waited out `timeout_ms`; the next ones found Redis unreachable and
        // went on at once, one of them trying Redis again every 100 ms (and waiting its 300 ms).
        // (Waiting on Redis each, the 20 would have opened 20 connections in 6 s.)
        let tries_allowed = 2 + elapsed.as_millis() / 400;
        let tries = *accepted.borrow() as u128;
        assert!(
            (1..=tries_allowed).contains(&tries),
            "on_error = {on_error}: {tries} connections in {elapsed:?}"
        );
    }
    assert_eq!(upstream.requests().len(), 20, "only the allowed ones");
}

#[tokio::test]
async fn while_one_request_tries_a_hung_redis_again_the_others_do_not_wait() {
    let upstream = FakeUpstream::start(vec![]).await;
    let (url, mut accepted) = silent_redis().await;
    let rule = "scope = [\"global\"]\nrequests_per_minute = 600";
    // timeout_ms = 2000: a request that asks Redis waits 2 s.
    let gateway = Arc::new(
        TestGateway::start(&limited_config(&upstream.base_url, &url, "allow", rule)).await,
    );
    // The first request finds Redis hung: it waits out timeout_ms (as does the PING the
    // gateway sends at start-up, on a connection of its own).
    assert_eq!(status(&gateway).await, 200);
    let tried = *accepted.borrow();
    // Past RETRY_EVERY (100 ms) one request tries Redis again, and waits 2 s in turn...
    tokio::time::sleep(Duration::from_millis(150)).await;
    let retry = tokio::spawn({
        let gateway = gateway.clone();
        async move { status(&gateway).await }
    });
    accepted.wait_for(|n| *n == tried + 1).await.unwrap();
    // ...and a request past RETRY_EVERY again, while that retry runs, does not try as well: it
    // goes on at once (on_error = "allow"), before the retry has its answer.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(status(&gateway).await, 200);
    assert!(!retry.is_finished());
    assert_eq!(
        *accepted.borrow(),
        tried + 1,
        "a second retry while the first ran"
    );
    assert_eq!(retry.await.unwrap(), 200);
}

#[tokio::test]
async fn a_reload_onto_a_redis_that_does_not_answer_says_so() {
    let redis = RedisServer::start();
    let upstream = FakeUpstream::start(vec![]).await;
    let rule = "scope = [\"global\"]\nrequests_per_minute = 600";
    let path = temp_dir("redis-reload").join("gateway.toml");
    let with_store = |url: &str| limited_config(&upstream.base_url, url, "allow", rule);
    std::fs::write(&path, with_store(&redis.url())).unwrap();
    let gateway = TestGateway::start_from_file(&path).await;

    // Onto a Redis where nothing listens: reloaded (on_error applies), and the answer says so.
    let nowhere = crate::common::closed_port_url()
        .await
        .replace("http://", "redis://")
        .replace("/v1", "");
    std::fs::write(&path, with_store(&nowhere)).unwrap();
    let reload = gateway.reload().await;
    assert_eq!(reload.status(), 200);
    let answer: Value = reload.json().await.unwrap();
    assert_eq!(
        answer["warnings"],
        json!([
            "limits_store: the new store does not answer (the log says why): decisions apply its \
             on_error until it does"
        ])
    );
    assert_eq!(status(&gateway).await, 200, "on_error = allow");

    // Back onto one that answers: no warning.
    std::fs::write(&path, with_store(&redis.url())).unwrap();
    let answer: Value = gateway.reload().await.json().await.unwrap();
    assert_eq!(answer["warnings"], json!([]), "{answer}");
}

async fn limited_gateway(
    upstream: &FakeUpstream,
    redis: &str,
    on_error: &str,
    rule: &str,
) -> TestGateway {
    TestGateway::start(&limited_config(&upstream.base_url, redis, on_error, rule)).await
}

/// The status of one chat request.
async fn status(gateway: &TestGateway) -> u16 {
    gateway
        .post("/v1/chat/completions", &chat_body("x"))
        .await
        .status()
        .as_u16()
}

#[tokio::test]
async fn a_password_a_database_and_a_unix_socket_reach_one_budget() {
    let dir = temp_dir("redis-auth");
    let socket = dir.join("redis.sock");
    let socket = socket.to_str().unwrap();
    let redis = RedisServer::start_with(&[
        "--requirepass",
        "test-only-pw",
        "--unixsocket",
        socket,
        "--unixsocketperm",
        "700",
    ]);
    let upstream = FakeUpstream::start(vec![]).await;
    let rule = "scope = [\"global\"]\nrequests_per_minute = 2";
    let over_tcp = format!("redis://:test-only-pw@127.0.0.1:{}/3", redis.port);
    let over_unix = format!("unix://{socket}?db=3&pass=test-only-pw");
    // URLs with passwords come from the environment (a literal one is refused).
    let with_url = |url: String| {
        let config = limited_config(&upstream.base_url, "${TEST_REDIS_URL}", "deny", rule);
        async move { TestGateway::start_with_env(&config, &[("TEST_REDIS_URL", &url)]).await }
    };
    let tcp = with_url(over_tcp).await;
    let unix = with_url(over_unix).await;
    // Or a URL without credentials and the password alone from the environment.
    let url = format!("redis://127.0.0.1:{}/3", redis.port);
    let config = limited_config(&upstream.base_url, &url, "deny", rule).replace(
        "timeout_ms = 2000",
        "timeout_ms = 2000\npassword = \"${TEST_REDIS_PASSWORD}\"",
    );
    let password_alone =
        TestGateway::start_with_env(&config, &[("TEST_REDIS_PASSWORD", "test-only-pw")]).await;
    // All three authenticate and count in database 3: one budget of 2 between them.
    assert_eq!(status(&tcp).await, 200);
    assert_eq!(status(&unix).await, 200);
    assert_eq!(status(&tcp).await, 429);
    assert_eq!(status(&unix).await, 429);
    assert_eq!(status(&password_alone).await, 429);
    assert_eq!(
        redis.query(&["AUTH test-only-pw", "DBSIZE", "SELECT 3", "DBSIZE"]),
        ["+OK", ":0", "+OK", ":1"],
        "the one counter is in database 3"
    );

    // Same database, other password: refused by Redis, so on_error = deny answers 503 (what
    // Redis said goes to the log, not to the client), and `/ready` says so before that.
    let wrong = format!("redis://:not-the-pw@127.0.0.1:{}/3", redis.port);
    let wrong = with_url(wrong).await;
    let refused = wrong.post("/v1/chat/completions", &chat_body("x")).await;
    assert_eq!(refused.status(), 503);
    let ready: Value = wrong.get_json("/ready").await;
    assert_eq!(ready["rate_limiter"], "degraded");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limiter_unavailable");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        !message.contains("not-the-pw") && !message.contains("WRONGPASS"),
        "{message}"
    );
    assert_eq!(upstream.requests().len(), 2);
}

#[tokio::test]
async fn sigterm_waits_for_a_token_settlement_still_on_its_way_to_redis() {
    let redis = RedisServer::start();
    // The fake reports 10 prompt tokens per message and 1 per word: 11 tokens used.
    let upstream = FakeUpstream::start(vec![Reply::Delay(
        Duration::from_secs(1),
        Box::new(Reply::Text("one")),
    )])
    .await;
    let rule = "scope = [\"global\"]\ntokens_per_minute = 10000\ndefault_max_tokens = 5000";
    let config_text = limited_config(&upstream.base_url, &redis.url(), "deny", rule)
        .replace("timeout_ms = 2000", "timeout_ms = 20000");
    let config = temp_dir("redis-settle").join("gateway.toml");
    std::fs::write(&config, &config_text).unwrap();
    let mut gateway = GatewayProcess::start(&config, &[]);

    let request = reqwest::Client::new()
        .post(gateway.url("/v1/chat/completions"))
        .json(&chat_body("12345678"))
        .send();
    let in_flight = tokio::spawn(request);
    // Admitted: 2 (8 characters / 4) + 5000 tokens are reserved in Redis.
    upstream.wait_for_requests(1).await;
    // Redis holds back scripts from here on, so the settlement that follows the answer cannot
    // finish yet (a client that goes away meanwhile loses its command).
    assert_eq!(redis.query(&["CLIENT PAUSE 20000 WRITE"]), ["+OK"]);
    let terminated = std::process::Command::new("kill")
        .args(["-TERM", &gateway.child.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-ratelimit-remaining-tokens"], "4998");
    assert_eq!(redis.query(&["CLIENT UNPAUSE"]), ["+OK"]);
    let exit = gateway.child.wait().unwrap();
    assert!(exit.success(), "exit status {exit:?}");

    // Settled to the real 11 tokens before the gateway exited, so after the next request's 5002
    // at least 4987 are left (unsettled: 4998 + the refill of those few seconds − 5002).
    let next = TestGateway::start(&config_text).await;
    let response = next
        .post("/v1/chat/completions", &chat_body("12345678"))
        .await;
    assert_eq!(response.status(), 200);
    let remaining: u64 = header(&response, "x-ratelimit-remaining-tokens")
        .parse()
        .unwrap();
    assert!(
        remaining >= 10_000 - 11 - 5002,
        "10000 - 11 - 5002 = 4987 (+ refill): {remaining}"
    );
}
