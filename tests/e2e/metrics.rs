//! `/metrics` after a known sequence of requests: exact counters, histogram counts, bounded and
//! secret-free labels, and a valid Prometheus text exposition.

use std::collections::BTreeMap;

use serde_json::json;

use crate::common::{FakeUpstream, Reply, TestGateway, chat_body, read_stream};

fn config(upstream: &str) -> String {
    format!(
        r#"
        [providers.fake]
        kind = "openai"
        base_url = "{upstream}"
        api_key = "${{TEST_OPENAI_KEY}}"
        [routes.main]
        targets = [{{ provider = "fake", model = "m" }}]
        retries = 0
        [routes.flaky]
        targets = [{{ provider = "fake", model = "m" }}]
        retries = 1
        backoff_ms = 1
        [[endpoints]]
        name = "chat"
        route = "main"
        [[endpoints]]
        name = "flaky"
        route = "flaky"
        [[endpoints]]
        name = "limited"
        route = "main"
        [[endpoints]]
        name = "summarize"
        chain_dir = "{}"
        config = {{ keep_last = 1 }}
        llms = {{ summarizer = "main", answerer = "main" }}
        [[limits]]
        scope = ["endpoint"]
        endpoints = ["limited"]
        requests_per_minute = 1
        "#,
        switchyard_chains::chain_dir("summarize_then_answer").display()
    )
}

/// Every sample as `name{label="value",...}` -> value, labels sorted.
fn samples(text: &str) -> BTreeMap<String, f64> {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text format");
    scrape
        .samples
        .into_iter()
        .filter_map(|sample| {
            let value = match sample.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(buckets) => {
                    // The +Inf bucket is the count.
                    buckets.iter().map(|b| b.count).fold(0.0, f64::max)
                }
                _ => return None,
            };
            let labels: BTreeMap<String, String> = sample
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            Some((format!("{}{{{}}}", sample.metric, labels.join(",")), value))
        })
        .collect()
}

#[tokio::test]
async fn metrics_count_exactly_what_happened() {
    let upstream = FakeUpstream::start(vec![
        Reply::Echo,                // 1. chat: ok
        Reply::Status(500, vec![]), // 2. flaky: fails, retried ...
        Reply::Status(500, vec![]), //    ... and fails again: 502
        Reply::Status(503, vec![]), // 3. flaky: fails, retried ...
    ])
    .await; //    ... then every other call echoes
    let gateway = TestGateway::start(&config(&upstream.base_url)).await;
    let post = |model: &str, content: &str| {
        let mut body = chat_body(content);
        body["model"] = json!(model);
        let request = gateway
            .client
            .post(gateway.url("/v1/chat/completions"))
            .json(&body);
        async move { request.send().await.unwrap() }
    };
    assert_eq!(post("chat", "one").await.status(), 200);
    assert_eq!(post("flaky", "two").await.status(), 502);
    assert_eq!(post("flaky", "three").await.status(), 200);
    assert_eq!(post("limited", "four").await.status(), 200);
    assert_eq!(post("limited", "five").await.status(), 429);
    assert_eq!(post("nope", "six").await.status(), 404);
    let conversation = json!({"model": "summarize", "messages": [
        {"role": "user", "content": "seven"}, {"role": "assistant", "content": "eight"}, {"role": "user", "content": "nine"}]});
    assert_eq!(
        gateway
            .post("/v1/chat/completions", &conversation)
            .await
            .status(),
        200
    );
    let stream =
        json!({"model": "chat", "stream": true, "messages": [{"role": "user", "content": "ten"}]});
    // The client does not ask for the stream's usage: the gateway asks for it (to count its
    // tokens) and keeps the usage chunk from the client.
    let streamed = read_stream(gateway.post("/v1/chat/completions", &stream).await).await;
    assert!(!streamed.contains("\"usage\""), "{streamed}");

    let response = gateway
        .client
        .get(gateway.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = response.text().await.unwrap();
    let samples = samples(&text);
    let value = |key: &str| {
        *samples
            .get(key)
            .unwrap_or_else(|| panic!("no sample {key} in\n{text}"))
    };

    assert_eq!(
        value(r#"switchyard_requests_total{endpoint="chat",kind="route",status="2xx"}"#),
        2.0
    );
    assert_eq!(
        value(r#"switchyard_requests_total{endpoint="flaky",kind="route",status="5xx"}"#),
        1.0
    );
    assert_eq!(
        value(r#"switchyard_requests_total{endpoint="flaky",kind="route",status="2xx"}"#),
        1.0
    );
    assert_eq!(
        value(r#"switchyard_requests_total{endpoint="limited",kind="route",status="2xx"}"#),
        1.0
    );
    assert_eq!(
        value(r#"switchyard_requests_total{endpoint="limited",kind="route",status="4xx"}"#),
        1.0
    );
    assert_eq!(
        value(r#"switchyard_requests_total{endpoint="",kind="",status="4xx"}"#),
        1.0,
        "unknown endpoint"
    );
    assert_eq!(
        value(r#"switchyard_requests_total{endpoint="summarize",kind="chain",status="2xx"}"#),
        1.0
    );
    assert_eq!(
        value(r#"switchyard_request_duration_seconds{endpoint="chat",kind="route"}"#),
        2.0,
        "observations"
    );

    assert_eq!(
        value(
            r#"switchyard_upstream_attempts_total{outcome="retry",provider="fake",route="flaky"}"#
        ),
        2.0
    );
    assert_eq!(
        value(
            r#"switchyard_upstream_attempts_total{outcome="error",provider="fake",route="flaky"}"#
        ),
        1.0
    );
    assert_eq!(
        value(r#"switchyard_upstream_attempts_total{outcome="ok",provider="fake",route="flaky"}"#),
        1.0
    );
    // chat, limited, two chain steps, the stream
    assert_eq!(
        value(r#"switchyard_upstream_attempts_total{outcome="ok",provider="fake",route="main"}"#),
        5.0
    );
    assert_eq!(
        value(r#"switchyard_upstream_duration_seconds{provider="fake",route="flaky"}"#),
        4.0
    );
    assert_eq!(
        value(r#"switchyard_upstream_time_to_first_token_seconds{provider="fake",route="main"}"#),
        1.0
    );

    assert_eq!(
        value(r#"switchyard_ratelimit_decisions_total{outcome="admitted",rule="limits[0]"}"#),
        1.0
    );
    assert_eq!(
        value(r#"switchyard_ratelimit_decisions_total{outcome="refused",rule="limits[0]"}"#),
        1.0
    );
    assert_eq!(value(r#"switchyard_ratelimit_backend_errors_total{}"#), 0.0);

    for step in ["summarizer", "answerer", "render:condense", "render:answer"] {
        let key = format!(
            r#"switchyard_chain_step_duration_seconds{{chain="summarize_then_answer",step="{step}"}}"#
        );
        assert_eq!(value(&key), 1.0, "{step}");
    }
    // Tokens of the non-streamed reply and of the stream (the fake: 10 per prompt message, 1
    // per word).
    assert_eq!(
        value(r#"switchyard_tokens_total{direction="prompt",endpoint="chat"}"#),
        20.0
    );
    assert_eq!(
        value(r#"switchyard_tokens_total{direction="completion",endpoint="chat"}"#),
        2.0
    );
    // A chain's tokens are those of all its calls: the summary's (one prompt message) and the
    // answer's (system and last message), though its answer reports the last call's only.
    assert_eq!(
        value(r#"switchyard_tokens_total{direction="prompt",endpoint="summarize"}"#),
        30.0
    );
    let overhead_count: f64 = samples
        .iter()
        .filter(|(k, _)| k.starts_with("switchyard_gateway_overhead_seconds{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(overhead_count, 7.0, "every request to a known endpoint");

    let info = samples
        .keys()
        .find(|k| {
            k.starts_with(r#"switchyard_endpoint_info{code_sha256=""#)
                && k.contains(r#"endpoint="summarize""#)
        })
        .unwrap();
    let compiled = switchyard_chains::registry()
        .get("summarize_then_answer")
        .unwrap()
        .code_sha256;
    assert!(info.contains(compiled), "{info}");

    // Labels carry neither keys nor prompts.
    for secret_or_prompt in ["sk-test-key", "one", "two", "seven", "ten", "nope"] {
        assert!(
            !samples
                .keys()
                .any(|k| k.contains(&format!("\"{secret_or_prompt}\""))),
            "a label carries {secret_or_prompt}"
        );
    }
    assert!(!text.contains("sk-test-key"));
}

#[tokio::test]
async fn metrics_can_require_the_admin_key() {
    let upstream = FakeUpstream::start(vec![]).await;
    let gateway = TestGateway::start(&format!(
        "[auth]\nadmin_key = \"${{TEST_ADMIN_KEY}}\"\nprotect_metrics = true\n{}",
        crate::common::config_over(&[&upstream.base_url], "")
    ))
    .await;
    let url = gateway.url("/metrics");
    assert_eq!(gateway.client.get(&url).send().await.unwrap().status(), 401);
    let allowed = gateway
        .client
        .get(&url)
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status(), 200);
    assert!(
        allowed
            .text()
            .await
            .unwrap()
            .contains("# TYPE switchyard_endpoint_info gauge")
    );
}

#[tokio::test]
async fn streams_that_break_off_after_their_200_are_counted_by_reason() {
    let upstream = FakeUpstream::start(vec![
        Reply::StreamThenDrop(vec!["one", "two"]),
        Reply::StreamThenStall(vec!["three"]),
    ])
    .await;
    let gateway = TestGateway::start(&format!(
        "[providers.fake]\nkind = \"openai\"\nbase_url = \"{}\"\n\
         [routes.main]\ntargets = [{{ provider = \"fake\", model = \"m\" }}]\nretries = 0\ntimeout_ms = 300\n\
         [[endpoints]]\nname = \"chat\"\nroute = \"main\"\n",
        upstream.base_url
    ))
    .await;
    let stream =
        json!({"model": "chat", "stream": true, "messages": [{"role": "user", "content": "x"}]});
    for _ in 0..2 {
        let response = gateway.post("/v1/chat/completions", &stream).await;
        assert_eq!(response.status(), 200);
        let text = response.text().await.unwrap();
        assert!(text.contains("\"error\""), "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    }
    let samples = samples(&gateway.metrics().await);
    let count = |reason: &str| {
        samples[&format!(
            r#"switchyard_stream_errors_total{{endpoint="chat",kind="route",reason="{reason}"}}"#
        )]
    };
    assert_eq!(count("upstream_error"), 1.0);
    assert_eq!(count("timeout"), 1.0);
    assert_eq!(
        samples[r#"switchyard_requests_total{endpoint="chat",kind="route",status="2xx"}"#],
        2.0
    );
}

#[tokio::test]
async fn waiting_out_an_upstreams_retry_after_is_not_gateway_overhead() {
    let upstream = FakeUpstream::start(vec![
        Reply::Status(429, vec![("retry-after-ms", "300")]),
        Reply::Echo,
    ])
    .await;
    let gateway = TestGateway::start(&config(&upstream.base_url)).await;
    let mut body = chat_body("x");
    body["model"] = json!("flaky");
    let started = std::time::Instant::now();
    assert_eq!(
        gateway.post("/v1/chat/completions", &body).await.status(),
        200
    );
    assert!(started.elapsed().as_secs_f64() >= 0.3);
    let text = gateway.metrics().await;
    let overhead: f64 = text
        .lines()
        .find_map(|line| {
            line.strip_prefix(
                r#"switchyard_gateway_overhead_seconds_sum{endpoint="flaky",kind="route"} "#,
            )
        })
        .unwrap_or_else(|| panic!("{text}"))
        .parse()
        .unwrap();
    assert!(
        overhead < 0.2,
        "the 300 ms backoff counted as overhead: {overhead}"
    );
}
