//! API keys, rate limits in requests and tokens (in memory), provider concurrency caps.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use crate::common::{
    FakeUpstream, Reply, TestGateway, chat_body, header, read_stream, refilled_since, sse_data,
    stream_text, temp_dir,
};

/// A gateway over `upstream` with endpoints `chat` and `other`, keys `team-a` (any endpoint,
/// secret `sk-team-a` from the environment) and `team-b` (only `chat`, given as a SHA-256), and
/// the given extra config.
async fn gateway(upstream: &FakeUpstream, extra: &str) -> TestGateway {
    TestGateway::start(&keyed_config(&upstream.base_url, extra)).await
}

fn keyed_config(base_url: &str, extra: &str) -> String {
    format!(
        r#"
        [auth]
        keys = [
          {{ id = "team-a", key_env = "TEST_OPENAI_KEY" }},
          {{ id = "team-b", key_sha256 = "{}", endpoints = ["chat"] }},
        ]
        [providers.fake]
        kind = "openai"
        base_url = "{base_url}"
        [routes.main]
        targets = [{{ provider = "fake", model = "m" }}]
        retries = 0
        [[endpoints]]
        name = "chat"
        route = "main"
        [[endpoints]]
        name = "other"
        route = "main"
        {extra}
        "#,
        sha256_hex("sk-team-b")
    )
}

fn sha256_hex(text: &str) -> String {
    use std::fmt::Write;
    let digest = <sha2::Sha256 as sha2::Digest>::digest(text.as_bytes());
    digest.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

// `${TEST_OPENAI_KEY}` resolves to this in the test harness.
const TEAM_A: &str = "sk-test-key";
const TEAM_B: &str = "sk-team-b";

async fn call(
    gateway: &TestGateway,
    key: Option<&str>,
    body: &Value,
    user: Option<&str>,
) -> reqwest::Response {
    let mut request = gateway
        .client
        .post(gateway.url("/v1/chat/completions"))
        .json(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if let Some(user) = user {
        request = request.header("x-switchyard-user", user);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn keys_are_required_checked_and_restricted_to_their_endpoints() {
    let upstream = FakeUpstream::start(vec![]).await;
    let gateway = gateway(&upstream, "").await;

    let missing = call(&gateway, None, &chat_body("x"), None).await;
    assert_eq!(missing.status(), 401);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert_eq!(
        call(&gateway, Some("sk-wrong"), &chat_body("x"), None)
            .await
            .status(),
        401
    );
    assert_eq!(
        call(&gateway, Some(TEAM_A), &chat_body("x"), None)
            .await
            .status(),
        200
    );
    let via_api_key_header = gateway
        .client
        .post(gateway.url("/v1/chat/completions"))
        .header("api-key", TEAM_B)
        .json(&chat_body("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(via_api_key_header.status(), 200);

    let mut other = chat_body("x");
    other["model"] = json!("other");
    let forbidden = call(&gateway, Some(TEAM_B), &other, None).await;
    assert_eq!(forbidden.status(), 403);
    assert!(
        forbidden
            .text()
            .await
            .unwrap()
            .contains("API key 'team-b' may not call endpoint 'other'")
    );
    assert_eq!(
        call(&gateway, Some(TEAM_A), &other, None).await.status(),
        200
    );
    // On MLflow's path too, and before anything else about the endpoint shows: a body it would
    // refuse with 415 (a route takes JSON only) is still a 403 for a key that may not call it.
    let forbidden_csv = gateway
        .client
        .post(gateway.url("/endpoints/other/invocations"))
        .bearer_auth(TEAM_B)
        .header("content-type", "text/csv")
        .body("a\n1\n")
        .send()
        .await
        .unwrap();
    assert_eq!(forbidden_csv.status(), 403);
    let error: Value = forbidden_csv.json().await.unwrap();
    assert_eq!(error["error_code"], "PERMISSION_DENIED");
    assert_eq!(
        error["message"],
        "API key 'team-b' may not call endpoint 'other'"
    );

    let models = |key: &'static str| {
        let request = gateway
            .client
            .get(gateway.url("/v1/models"))
            .bearer_auth(key);
        async move {
            let body: Value = request.send().await.unwrap().json().await.unwrap();
            body["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(models(TEAM_A).await, ["chat", "other"]);
    assert_eq!(models(TEAM_B).await, ["chat"]);
    // Retrieving one: a model the key may not call is as unknown as in the list.
    let retrieve = |key: &'static str| {
        let request = gateway
            .client
            .get(gateway.url("/v1/models/other"))
            .bearer_auth(key);
        async move { request.send().await.unwrap().status() }
    };
    assert_eq!(retrieve(TEAM_A).await, 200);
    assert_eq!(retrieve(TEAM_B).await, 404);
    assert_eq!(
        gateway
            .client
            .get(gateway.url("/v1/models"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    // Liveness stays open.
    assert_eq!(
        gateway
            .client
            .get(gateway.url("/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        upstream.requests().len(),
        3,
        "refused requests never reach the upstream"
    );
}

#[tokio::test]
async fn keys_are_checked_before_the_body_is_read_and_close_the_admin_api_without_an_admin_key() {
    let upstream = FakeUpstream::start(vec![]).await;
    let gateway = gateway(&upstream, "").await;
    let post = |path: &str, key: Option<&str>, body: &'static str| {
        let mut request = gateway.client.post(gateway.url(path)).body(body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };

    // Without a key the body is not even read: 401, not the 400 it would earn.
    let keyless = post("/v1/chat/completions", None, "{not json")
        .await
        .unwrap();
    assert_eq!(keyless.status(), 401);
    // Nor waited for: a head announcing a megabyte that never comes gets its 401 at once (a
    // gateway reading first would wait the default 60 s `client_timeout_ms`, then say 408).
    for path in ["/v1/chat/completions", "/endpoints/chat/invocations"] {
        let mut client = tokio::net::TcpStream::connect(gateway.address)
            .await
            .unwrap();
        client
            .write_all(
                format!("POST {path} HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\ncontent-length: 1000000\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
        let mut head = Vec::new();
        let mut buffer = [0u8; 4096];
        tokio::time::timeout(Duration::from_secs(10), async {
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = client.read(&mut buffer).await.unwrap();
                assert!(n > 0, "closed without an answer");
                head.extend_from_slice(&buffer[..n]);
            }
        })
        .await
        .expect("the gateway waited for the body");
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{head}");
    }
    let keyless = post("/endpoints/chat/invocations", None, "{not json")
        .await
        .unwrap();
    assert_eq!(keyless.status(), 401);
    let body: Value = keyless.json().await.unwrap();
    assert_eq!(body["error_code"], "UNAUTHENTICATED");
    // An endpoint that does not exist is a 404 before its body is looked at.
    let unknown = post(
        "/endpoints/nope/invocations",
        Some(TEAM_A),
        r#"{"inputs": [[1.0]]}"#,
    )
    .await
    .unwrap();
    assert_eq!(unknown.status(), 404);
    let body: Value = unknown.json().await.unwrap();
    assert_eq!(body["error_code"], "RESOURCE_DOES_NOT_EXIST");
    assert!(body["message"].as_str().unwrap().contains("nope"), "{body}");

    // Client keys but no admin key: the admin API is closed, not open.
    let admin = gateway
        .client
        .post(gateway.url("/admin/reload"))
        .bearer_auth(TEAM_A)
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), 403);
    let body: Value = admin.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no [auth] admin_key"),
        "{body}"
    );
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn request_limits_admit_limit_plus_burst_per_key_then_429_with_headers() {
    let upstream = FakeUpstream::start(vec![]).await;
    let gateway = gateway(
        &upstream,
        "[[limits]]\nscope = [\"api_key\"]\nrequests_per_minute = 3\nburst = 1\n",
    )
    .await;
    for expected_remaining in [3, 2, 1, 0] {
        let admitted = call(&gateway, Some(TEAM_A), &chat_body("x"), None).await;
        assert_eq!(admitted.status(), 200);
        assert_eq!(header(&admitted, "x-ratelimit-limit-requests"), "4");
        assert_eq!(
            header(&admitted, "x-ratelimit-remaining-requests"),
            expected_remaining.to_string()
        );
    }
    let refused = call(&gateway, Some(TEAM_A), &chat_body("x"), None).await;
    assert_eq!(refused.status(), 429);
    // One request every 20 s: the next is due in just under 20 s, rounded up (19 if these
    // requests took more than a second).
    let retry_after = header(&refused, "retry-after");
    assert!(
        ["19", "20"].contains(&retry_after.as_str()),
        "{retry_after}"
    );
    assert_eq!(header(&refused, "x-ratelimit-remaining-requests"), "0");
    assert!(
        header(&refused, "x-ratelimit-reset-requests").starts_with("1m"),
        "full again in ~80 s"
    );
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    // The message says which budget ran out.
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "Rate limit reached for endpoint 'chat' (limits[0]: requests per API key); retry after"
        ),
        "{message}"
    );
    // team-b has its own budget.
    assert_eq!(
        call(&gateway, Some(TEAM_B), &chat_body("x"), None)
            .await
            .status(),
        200
    );
    assert_eq!(upstream.requests().len(), 5);
}

#[tokio::test]
async fn user_limits_isolate_users_and_rules_can_be_limited_to_endpoints() {
    let upstream = FakeUpstream::start(vec![]).await;
    let gateway = gateway(
        &upstream,
        "[[limits]]\nscope = [\"user\"]\nendpoints = [\"chat\"]\nrequests_per_minute = 1\n",
    )
    .await;
    assert_eq!(
        call(&gateway, Some(TEAM_A), &chat_body("x"), Some("ann"))
            .await
            .status(),
        200
    );
    assert_eq!(
        call(&gateway, Some(TEAM_A), &chat_body("x"), Some("ann"))
            .await
            .status(),
        429
    );
    assert_eq!(
        call(&gateway, Some(TEAM_A), &chat_body("x"), Some("bob"))
            .await
            .status(),
        200
    );
    // The OpenAI `user` field counts as the user too.
    let mut as_field = chat_body("x");
    as_field["user"] = json!("ann");
    assert_eq!(
        call(&gateway, Some(TEAM_A), &as_field, None).await.status(),
        429
    );
    // So does its successor `safety_identifier`.
    let mut as_identifier = chat_body("x");
    as_identifier["safety_identifier"] = json!("bob");
    assert_eq!(
        call(&gateway, Some(TEAM_A), &as_identifier, None)
            .await
            .status(),
        429
    );
    // Requests without a user share one counter (so the request below uses it up); a user
    // literally named "-" is not one of them.
    assert_eq!(
        call(&gateway, Some(TEAM_A), &chat_body("x"), Some("-"))
            .await
            .status(),
        200
    );
    // A name that is not ASCII is a user of its own, not one of the requests without a user.
    let jose = || {
        gateway
            .client
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth(TEAM_A)
            .header(
                "x-switchyard-user",
                reqwest::header::HeaderValue::from_bytes("José".as_bytes()).unwrap(),
            )
            .json(&chat_body("x"))
            .send()
    };
    assert_eq!(jose().await.unwrap().status(), 200);
    assert_eq!(jose().await.unwrap().status(), 429);
    assert_eq!(
        call(&gateway, Some(TEAM_A), &chat_body("x"), None)
            .await
            .status(),
        200
    );
    // `other` is not under the rule.
    let mut other = chat_body("x");
    other["model"] = json!("other");
    for _ in 0..3 {
        assert_eq!(
            call(&gateway, Some(TEAM_A), &other, Some("ann"))
                .await
                .status(),
            200
        );
    }
}

#[tokio::test]
async fn token_limits_reserve_an_estimate_and_settle_with_the_real_usage() {
    // The fake reports usage: 10 prompt tokens per message, 1 completion token per word.
    let upstream = FakeUpstream::start(vec![Reply::Text("one two three")]).await;
    let gateway = gateway(
        &upstream,
        "[[limits]]\nscope = [\"global\"]\ntokens_per_minute = 1000\ndefault_max_tokens = 500\n",
    )
    .await;
    let start = Instant::now();
    let first = call(&gateway, Some(TEAM_A), &chat_body("12345678"), None).await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-ratelimit-limit-tokens"), "1000");
    // Reserved: 2 (8 characters / 4) + 500 = 502.
    assert_eq!(header(&first, "x-ratelimit-remaining-tokens"), "498");
    // Settled to the real 13 tokens, so the next request finds 987 (give or take a refill).
    let second = call(&gateway, Some(TEAM_A), &chat_body("12345678"), None).await;
    let remaining: u64 = header(&second, "x-ratelimit-remaining-tokens")
        .parse()
        .unwrap();
    assert!(
        (485..=485 + refilled_since(start)).contains(&remaining),
        "987 - 502 = 485 (+ refill): {remaining}"
    );

    // The second call settled at 11 tokens too, leaving about 976: a request that may need
    // more than that is refused.
    let mut big = chat_body("x");
    big["max_tokens"] = json!(995);
    let refused = call(&gateway, Some(TEAM_A), &big, None).await;
    assert_eq!(refused.status(), 429);
    assert!(
        refused
            .headers()
            .contains_key("x-ratelimit-remaining-tokens")
    );
}

#[tokio::test]
async fn a_failed_request_keeps_the_limit_headers_and_gets_back_tokens_nothing_was_generated_for() {
    let upstream = FakeUpstream::start(vec![
        Reply::Status(500, vec![]),
        // 200 but not a completion: the upstream may have generated (and billed) it.
        Reply::Body("{}"),
        Reply::Echo,
    ])
    .await;
    let gateway = gateway(
        &upstream,
        "[[limits]]\nscope = [\"global\"]\ntokens_per_minute = 1000\ndefault_max_tokens = 300\n",
    )
    .await;
    let start = Instant::now();
    let failed = call(&gateway, Some(TEAM_A), &chat_body("12345678"), None).await;
    assert_eq!(failed.status(), 502);
    assert_eq!(header(&failed, "x-ratelimit-limit-tokens"), "1000");
    // Reserved: 2 (8 characters / 4) + 300 = 302, as for a request that succeeds.
    assert_eq!(header(&failed, "x-ratelimit-remaining-tokens"), "698");
    // An upstream 500: nothing was generated, the whole reservation came back. An unreadable
    // answer (like a timeout or a stream that broke off) keeps it.
    let unreadable = call(&gateway, Some(TEAM_A), &chat_body("12345678"), None).await;
    assert_eq!(unreadable.status(), 502);
    let remaining = |response: &reqwest::Response| -> u64 {
        header(response, "x-ratelimit-remaining-tokens")
            .parse()
            .unwrap()
    };
    assert!(
        (698..=698 + refilled_since(start)).contains(&remaining(&unreadable)),
        "1000 - 302 (+ refill): {}",
        remaining(&unreadable)
    );
    let next = call(&gateway, Some(TEAM_A), &chat_body("12345678"), None).await;
    assert_eq!(next.status(), 200);
    assert!(
        (396..=396 + refilled_since(start)).contains(&remaining(&next)),
        "1000 - 302 kept - 302 (+ refill): {}",
        remaining(&next)
    );
}

#[tokio::test]
async fn streams_under_a_token_limit_report_usage_upstream_but_not_to_a_client_that_did_not_ask() {
    let upstream = FakeUpstream::start(vec![
        Reply::Text("streamed words here"),
        Reply::Text("again"),
    ])
    .await;
    let gateway = gateway(
        &upstream,
        "[[limits]]\nscope = [\"global\"]\ntokens_per_minute = 1000\ndefault_max_tokens = 100\n",
    )
    .await;
    let mut body = chat_body("12345678");
    body["stream"] = json!(true);
    let start = Instant::now();
    let response = call(&gateway, Some(TEAM_A), &body, None).await;
    assert_eq!(header(&response, "x-ratelimit-remaining-tokens"), "898");
    let frames = sse_data(&read_stream(response).await);
    assert_eq!(stream_text(&frames), "streamed words here");
    assert!(
        !frames.iter().any(|f| f.contains("\"usage\"")),
        "usage chunk stripped: {frames:#?}"
    );
    assert_eq!(frames.last().unwrap(), "[DONE]");
    assert_eq!(
        upstream.requests()[0].body["stream_options"],
        json!({"include_usage": true})
    );

    // Settled with the upstream's 13 tokens: 1000 - 13 - 102 = 885 (+ refill).
    let next = call(&gateway, Some(TEAM_A), &chat_body("12345678"), None).await;
    let remaining: u64 = header(&next, "x-ratelimit-remaining-tokens")
        .parse()
        .unwrap();
    assert!(
        (885..=885 + refilled_since(start)).contains(&remaining),
        "{remaining}"
    );
}

#[tokio::test]
async fn a_provider_at_its_concurrency_cap_fails_excess_calls_after_the_queue_timeout() {
    let upstream = FakeUpstream::start(vec![Reply::Delay(
        Duration::from_secs(2),
        Box::new(Reply::Echo),
    )])
    .await;
    let gateway = TestGateway::start(&format!(
        r#"
        [providers.fake]
        kind = "openai"
        base_url = "{}"
        max_concurrency = 1
        queue_timeout_ms = 100
        [routes.main]
        targets = [{{ provider = "fake", model = "m" }}]
        retries = 0
        [routes.short]
        targets = [{{ provider = "fake", model = "m" }}]
        retries = 0
        timeout_ms = 50
        [[endpoints]]
        name = "chat"
        route = "main"
        [[endpoints]]
        name = "short"
        route = "short"
        "#,
        upstream.base_url
    ))
    .await;
    let slow = tokio::spawn(
        gateway
            .client
            .post(gateway.url("/v1/chat/completions"))
            .json(&chat_body("slow"))
            .send(),
    );
    upstream.wait_for_requests(1).await;
    let started = Instant::now();
    let excess = gateway
        .post("/v1/chat/completions", &chat_body("excess"))
        .await;
    assert_eq!(excess.status(), 503);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "failed after the queue timeout, not after the slow call"
    );
    let body: Value = excess.json().await.unwrap();
    assert_eq!(body["error"]["code"], "provider_overloaded");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("concurrency cap of 1")
    );
    // A deadline that passes while the call waits for a slot says so.
    let mut short = chat_body("short");
    short["model"] = "short".into();
    let timed_out = gateway.post("/v1/chat/completions", &short).await;
    assert_eq!(timed_out.status(), 504);
    let body: Value = timed_out.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("route 'short' timed out after 50 ms (provider 'fake'), ")
            && message.ends_with(" ms of it queued for a max_concurrency slot"),
        "{message}"
    );
    assert_eq!(slow.await.unwrap().unwrap().status(), 200);
    assert_eq!(upstream.requests().len(), 1);

    // The cap shows in the metrics: nothing in flight now, three calls went through the queue.
    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains("switchyard_provider_in_flight{provider=\"fake\"} 0\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("switchyard_provider_queue_wait_seconds_count{provider=\"fake\"} 3\n"),
        "{metrics}"
    );
    // The call that never got a slot is no upstream failure.
    assert!(
        metrics.contains(
            "switchyard_upstream_attempts_total{route=\"main\",provider=\"fake\",outcome=\"overloaded\"} 1\n"
        ),
        "{metrics}"
    );
    // One did not wait, one waited 50 ms, one waited out the 100 ms: buckets tell them apart.
    for (le, count) in [("0.032", 1), ("0.064", 2), ("0.128", 3)] {
        let bucket = format!(
            "switchyard_provider_queue_wait_seconds_bucket{{le=\"{le}\",provider=\"fake\"}} {count}\n"
        );
        assert!(metrics.contains(&bucket), "{bucket}{metrics}");
    }
}

#[tokio::test]
async fn a_reload_that_raises_a_concurrency_cap_counts_the_calls_in_flight() {
    // Two streams that hold their slots until released: no timing to race with.
    let (hold_first, hold_second) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let upstream = FakeUpstream::start(vec![
        Reply::StreamThenWait(vec!["first"], hold_first.clone()),
        Reply::StreamThenWait(vec!["second"], hold_second.clone()),
    ])
    .await;
    let path = temp_dir("cap-reload").join("gateway.toml");
    let config = |max: u32| {
        format!(
            "[providers.fake]\nkind = \"openai\"\nbase_url = \"{}\"\nmax_concurrency = {max}\nqueue_timeout_ms = 100\n\
             [routes.main]\ntargets = [{{ provider = \"fake\", model = \"m\" }}]\nretries = 0\n\
             [[endpoints]]\nname = \"chat\"\nroute = \"main\"\n",
            upstream.base_url
        )
    };
    std::fs::write(&path, config(1)).unwrap();
    let gateway = TestGateway::start_from_file(&path).await;
    let stream = |text: &str| {
        let mut body = chat_body(text);
        body["stream"] = json!(true);
        gateway
            .client
            .post(gateway.url("/v1/chat/completions"))
            .json(&body)
            .send()
    };
    let first = stream("first").await.unwrap();
    assert_eq!(first.status(), 200);

    // 1 → 2 with one call in flight: one more call fits, a third does not.
    std::fs::write(&path, config(2)).unwrap();
    assert_eq!(gateway.reload().await.status(), 200);
    let second = stream("second").await.unwrap();
    assert_eq!(second.status(), 200);
    let third = gateway
        .post("/v1/chat/completions", &chat_body("third"))
        .await;
    assert_eq!(third.status(), 503);

    hold_first.notify_one();
    hold_second.notify_one();
    for (response, text) in [(first, "first"), (second, "second")] {
        assert_eq!(stream_text(&sse_data(&read_stream(response).await)), text);
    }
    assert_eq!(upstream.requests().len(), 2);
}

#[tokio::test]
async fn counters_survive_a_reload_of_an_unchanged_rule_and_reset_when_it_changes() {
    let upstream = FakeUpstream::start(vec![]).await;
    let dir = temp_dir("limits-reload");
    let path = dir.join("gateway.toml");
    let config = |per_minute: u32| {
        format!(
            "[providers.fake]\nkind = \"openai\"\nbase_url = \"{}\"\n[routes.main]\ntargets = [{{ provider = \"fake\", model = \"m\" }}]\n\
             [[endpoints]]\nname = \"chat\"\nroute = \"main\"\n[[limits]]\nscope = [\"global\"]\nrequests_per_minute = {per_minute}\n",
            upstream.base_url
        )
    };
    std::fs::write(&path, config(2)).unwrap();
    let gateway = TestGateway::start_from_file(&path).await;
    let status = || async {
        gateway
            .post("/v1/chat/completions", &chat_body("x"))
            .await
            .status()
            .as_u16()
    };
    assert_eq!(status().await, 200);
    assert_eq!(status().await, 200);
    assert_eq!(status().await, 429);
    assert_eq!(gateway.reload().await.status(), 200);
    assert_eq!(status().await, 429, "same rule, same counter");
    std::fs::write(&path, config(5)).unwrap();
    assert_eq!(gateway.reload().await.status(), 200);
    assert_eq!(status().await, 200, "a changed rule starts afresh");
    for _ in 0..4 {
        assert_eq!(status().await, 200);
    }
    // A token limit added to the rule leaves its request counter as it was.
    std::fs::write(&path, config(5) + "tokens_per_minute = 100000\n").unwrap();
    assert_eq!(gateway.reload().await.status(), 200);
    assert_eq!(status().await, 429, "5 of 5 still spent");
}

#[tokio::test]
async fn oversized_max_tokens_neither_panic_nor_slip_past_a_token_limit() {
    let upstream = FakeUpstream::start(vec![]).await;
    let gateway = gateway(
        &upstream,
        "[[limits]]\nscope = [\"global\"]\ntokens_per_minute = 1000\n",
    )
    .await;
    let mut huge = chat_body("x");
    huge["max_tokens"] = json!(u64::MAX);
    // Admitted against a full counter, charged the whole minute, then settled to the real use.
    let start = Instant::now();
    let first = call(&gateway, Some(TEAM_A), &huge, None).await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-ratelimit-remaining-tokens"), "0");
    // The settle keeps what was used (11 tokens), not a refund past it: a second huge request
    // must wait for the counter to refill completely.
    let second = call(&gateway, Some(TEAM_A), &huge, None).await;
    assert_eq!(second.status(), 429);
    let small = call(&gateway, Some(TEAM_A), &chat_body("x"), None).await;
    assert_eq!(
        small.status(),
        429,
        "1024 default tokens do not fit in the ~989 left"
    );
    let mut fits = chat_body("x");
    fits["max_tokens"] = json!(500);
    let fits = call(&gateway, Some(TEAM_A), &fits, None).await;
    assert_eq!(fits.status(), 200);
    let remaining: u64 = header(&fits, "x-ratelimit-remaining-tokens")
        .parse()
        .unwrap();
    assert!(
        (488..=488 + refilled_since(start)).contains(&remaining),
        "1000 - 11 - 501: {remaining}"
    );
}

#[tokio::test]
async fn an_answer_after_an_attempt_that_timed_out_keeps_the_estimate() {
    // The first attempt times out (the upstream may still generate, and bill, it); the retry
    // answers with a usage of 11 tokens.
    let upstream = FakeUpstream::start(vec![
        Reply::Delay(Duration::from_secs(2), Box::new(Reply::Echo)),
        Reply::Echo,
    ])
    .await;
    let gateway = TestGateway::start(&format!(
        "[providers.fake]\nkind = \"openai\"\nbase_url = \"{}\"\n\
         [routes.main]\ntargets = [{{ provider = \"fake\", model = \"m\" }}]\n\
         retries = 1\nbackoff_ms = 1\nattempt_timeout_ms = 200\ntimeout_ms = 10000\n\
         [[endpoints]]\nname = \"chat\"\nroute = \"main\"\n\
         [[limits]]\nscope = [\"global\"]\ntokens_per_minute = 1000\ndefault_max_tokens = 300\n",
        upstream.base_url
    ))
    .await;
    let start = Instant::now();
    let first = gateway
        .post("/v1/chat/completions", &chat_body("12345678"))
        .await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-ratelimit-remaining-tokens"), "698");
    let next = gateway
        .post("/v1/chat/completions", &chat_body("12345678"))
        .await;
    let remaining: u64 = header(&next, "x-ratelimit-remaining-tokens")
        .parse()
        .unwrap();
    assert!(
        (396..=396 + refilled_since(start)).contains(&remaining),
        "1000 - 302 kept - 302 (+ refill), not 1000 - 11 - 302: {remaining}"
    );
}
