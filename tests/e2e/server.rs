//! The gateway's connections: `[server]` timeouts on slow or stalled clients, and answers to
//! methods a path does not serve.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::common::{FakeUpstream, Reply, TestGateway, chat_body, config_over, temp_dir};

/// A gateway over `upstream` whose `[server]` timeouts are `header_ms` and `client_ms`.
async fn gateway(upstream: &FakeUpstream, header_ms: u64, client_ms: u64) -> TestGateway {
    TestGateway::start(&format!(
        "[server]\nheader_timeout_ms = {header_ms}\nclient_timeout_ms = {client_ms}\n{}",
        config_over(&[&upstream.base_url], "retries = 0\ntimeout_ms = 60000")
    ))
    .await
}

/// Reads until the gateway closes the connection (or resets it); fails if that takes 10 s.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let mut buffer = [0u8; 64 * 1024];
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await
    .expect("the gateway did not close the connection");
    received
}

#[tokio::test]
async fn a_request_head_that_does_not_arrive_in_time_closes_the_connection_as_does_idling() {
    let upstream = FakeUpstream::start(vec![]).await;
    let gateway = gateway(&upstream, 300, 60_000).await;

    // Half a request head, then nothing (a slowloris client).
    let started = Instant::now();
    let mut slow = TcpStream::connect(gateway.address).await.unwrap();
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut slow).await;
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    assert!(started.elapsed() >= Duration::from_millis(300));

    // A keep-alive connection is served, then closed once it idles that long.
    let mut idle = TcpStream::connect(gateway.address).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nhost: gateway\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let answer = String::from_utf8(read_until_closed(&mut idle).await).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with(r#"{"status":"ok"}"#), "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn a_request_body_that_does_not_arrive_in_time_is_a_408() {
    let upstream = FakeUpstream::start(vec![]).await;
    let gateway = gateway(&upstream, 60_000, 300).await;
    let mut slow = TcpStream::connect(gateway.address).await.unwrap();
    slow.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\"",
    )
    .await
    .unwrap();
    let answer = String::from_utf8(read_until_closed(&mut slow).await).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{answer}"
    );
    let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "request_timeout");
    assert_eq!(
        body["error"]["message"],
        "the request body did not arrive within 300 ms"
    );
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn a_stream_whose_client_stops_reading_is_cut_off_and_frees_the_provider_slot() {
    // 16 MB of content, more than the socket buffers between the gateway and a client that reads
    // nothing, and then an upstream that never ends its stream: only the client timeout can end
    // this request. The next request waits for the provider's one slot.
    let piece: &'static str = Box::leak("x".repeat(1 << 20).into_boxed_str());
    let upstream =
        FakeUpstream::start(vec![Reply::StreamThenStall(vec![piece; 16]), Reply::Echo]).await;
    let gateway = TestGateway::start(&format!(
        r#"
        [server]
        client_timeout_ms = 300
        [providers.fake]
        kind = "openai"
        base_url = "{}"
        max_concurrency = 1
        queue_timeout_ms = 20000
        [routes.main]
        targets = [{{ provider = "fake", model = "m" }}]
        retries = 0
        timeout_ms = 60000
        [[endpoints]]
        name = "chat"
        route = "main"
        "#,
        upstream.base_url
    ))
    .await;

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(gateway.address).await.unwrap();
    let body =
        r#"{"model": "chat", "stream": true, "messages": [{"role": "user", "content": "x"}]}"#;
    stalled
        .write_all(
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    upstream.wait_for_requests(1).await;

    // Served once the stalled stream's slot is free, well before the queue timeout.
    let started = Instant::now();
    let next = gateway
        .post("/v1/chat/completions", &chat_body("next"))
        .await;
    assert_eq!(next.status(), 200);
    let next: Value = next.json().await.unwrap();
    assert_eq!(next["choices"][0]["message"]["content"], "next");
    assert!(started.elapsed() < Duration::from_secs(20));

    // The stalled client gets what was buffered, and no end of stream.
    let received = read_until_closed(&mut stalled).await;
    assert!(received.starts_with(b"HTTP/1.1 200 OK\r\n"));
    assert!(received.len() < 16 << 20);
    assert!(!received.windows(12).any(|w| w == b"data: [DONE]"));
}

#[tokio::test]
async fn a_method_a_path_does_not_serve_is_a_405_in_the_path_s_error_shape() {
    let upstream = FakeUpstream::start(vec![]).await;
    let gateway = gateway(&upstream, 60_000, 60_000).await;

    // (method, path, status, `Allow`, error code, message): OpenAI's shape under /v1/, MLflow's
    // under /endpoints/ and /api/2.0/. Under /endpoints/ only …/invocations exists, so any other
    // path there is a 404 whatever the method.
    let cases = [
        (
            "GET",
            "/v1/chat/completions",
            405,
            Some("POST"),
            "method_not_allowed",
            "GET is not allowed on /v1/chat/completions",
        ),
        (
            "GET",
            "/endpoints/chat/invocations",
            405,
            Some("POST"),
            "BAD_REQUEST",
            "GET is not allowed on /endpoints/chat/invocations",
        ),
        (
            "GET",
            "/endpoints/chat",
            404,
            None,
            "RESOURCE_DOES_NOT_EXIST",
            "no such path: /endpoints/chat",
        ),
        (
            "POST",
            "/api/2.0/endpoints/",
            405,
            Some("GET,HEAD"),
            "BAD_REQUEST",
            "POST is not allowed on /api/2.0/endpoints/",
        ),
        (
            "GET",
            "/api/2.0/gateway/routes",
            404,
            None,
            "RESOURCE_DOES_NOT_EXIST",
            "no such path: /api/2.0/gateway/routes",
        ),
    ];
    for (method, path, status, allow, code, message) in cases {
        let response = gateway
            .client
            .request(method.parse().unwrap(), gateway.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{method} {path}");
        let allowed = response.headers().get("allow").map(|v| v.to_str().unwrap());
        assert_eq!(allowed, allow, "{method} {path}");
        let body: Value = response.json().await.unwrap();
        let (got_code, got_message) = if path.starts_with("/v1/") {
            (&body["error"]["code"], &body["error"]["message"])
        } else {
            (&body["error_code"], &body["message"])
        };
        assert_eq!(
            (got_code.as_str(), got_message.as_str()),
            (Some(code), Some(message))
        );
    }
}

#[tokio::test]
async fn a_reload_says_that_server_settings_wait_for_a_restart() {
    let upstream = FakeUpstream::start(vec![]).await;
    let path = temp_dir("server-reload").join("gateway.toml");
    let config = |max: u32| {
        format!(
            "[server]\nmax_body_bytes = {max}\n[providers.fake]\nkind = \"openai\"\nbase_url = \"{}\"\n\
             [routes.main]\ntargets = [{{ provider = \"fake\", model = \"m\" }}]\n\
             [[endpoints]]\nname = \"chat\"\nroute = \"main\"\n",
            upstream.base_url
        )
    };
    std::fs::write(&path, config(1000)).unwrap();
    let gateway = TestGateway::start_from_file(&path).await;
    std::fs::write(&path, config(5000)).unwrap();
    let reload = gateway.reload().await;
    assert_eq!(reload.status(), 200);
    let answer: Value = reload.json().await.unwrap();
    assert_eq!(
        answer["warnings"][0],
        "[server] changed in the config file: it applies at the next restart, not on reload"
    );
    // The old limit still holds.
    let big = gateway
        .post("/v1/chat/completions", &chat_body(&"x".repeat(2000)))
        .await;
    assert_eq!(big.status(), 413);
}

/// Sends `GET /health` on `stream` and reads its answer (the connection stays open).
async fn health_on(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET /health HTTP/1.1\r\nhost: gateway\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer))
        .await
        .expect("no answer within 10 s")
        .unwrap();
    String::from_utf8_lossy(&buffer[..read]).into_owned()
}

/// A gateway over `upstream` that keeps at most `max` client connections open.
async fn gateway_with_connections(upstream: &FakeUpstream, max: usize) -> TestGateway {
    TestGateway::start(&format!(
        "[server]\nmax_connections = {max}\n{}",
        config_over(&[&upstream.base_url], "")
    ))
    .await
}

/// Sends `GET /health` on `stream`; `None` if the gateway has closed the connection.
async fn health_if_open(stream: &mut TcpStream) -> Option<String> {
    let request = b"GET /health HTTP/1.1\r\nhost: gateway\r\n\r\n";
    stream.write_all(request).await.ok()?;
    let mut buffer = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer))
        .await
        .expect("no answer within 10 s");
    match read {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(String::from_utf8_lossy(&buffer[..n]).into_owned()),
    }
}

/// Starts a streamed chat request on a new connection and reads the head of its answer: the
/// stream then waits for its release (the fake upstream's script).
async fn busy_with_a_stream(gateway: &TestGateway) -> TcpStream {
    let mut stream = TcpStream::connect(gateway.address).await.unwrap();
    start_a_stream(&mut stream).await;
    stream
}

/// Sends a streamed chat request on `stream`, but for its first `sent` bytes (sent already);
/// returns what has come of the answer (its head).
async fn start_a_stream_sent_from(stream: &mut TcpStream, sent: usize) -> String {
    let body =
        r#"{"model": "chat", "stream": true, "messages": [{"role": "user", "content": "x"}]}"#;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(&request.as_bytes()[sent..]).await.unwrap();
    let mut buffer = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer))
        .await
        .expect("no stream within 10 s")
        .unwrap();
    let head = String::from_utf8_lossy(&buffer[..read]).into_owned();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    head
}

/// Sends a streamed chat request on `stream`; returns what has come of the answer (its head).
async fn start_a_stream(stream: &mut TcpStream) -> String {
    start_a_stream_sent_from(stream, 0).await
}

/// Sends `GET /health` on a new connection, which must wait: both slots are taken.
async fn waiting_client(gateway: &TestGateway) -> TcpStream {
    let mut third = TcpStream::connect(gateway.address).await.unwrap();
    third
        .write_all(b"GET /health HTTP/1.1\r\nhost: gateway\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = [0u8; 4096];
    let waited = tokio::time::timeout(Duration::from_millis(300), third.read(&mut buffer)).await;
    assert!(waited.is_err(), "a third connection was served: {waited:?}");
    third
}

/// Reads the answer of a client that waited for a connection slot; fails unless it is a 200
/// within 10 s.
async fn served_at_last(waiting: &mut TcpStream) -> String {
    let mut buffer = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(10), waiting.read(&mut buffer))
        .await
        .expect("the waiting client was not served after a connection closed")
        .unwrap();
    let answer = String::from_utf8_lossy(&buffer[..read]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    answer
}

/// Reads a stream's frames up to its `[DONE]`, the connection staying open.
async fn read_to_the_end_of_the_stream(stream: &mut TcpStream) {
    let mut buffer = [0u8; 4096];
    let mut received = String::new();
    while !received.contains("data: [DONE]") {
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer))
            .await
            .expect("the stream did not end")
            .unwrap();
        assert!(read > 0, "closed before the end of the stream: {received}");
        received.push_str(&String::from_utf8_lossy(&buffer[..read]));
    }
}

/// With two slots: a connection busy with a stream, one whose request has begun to arrive
/// (its first byte, `first_byte`: not idle, so not closed for another), and a third client
/// waiting for a slot.
async fn busy_arriving_and_waiting(
    gateway: &TestGateway,
    first_byte: u8,
) -> (TcpStream, TcpStream, TcpStream) {
    let first = busy_with_a_stream(gateway).await;
    let mut second = TcpStream::connect(gateway.address).await.unwrap();
    second.write_all(&[first_byte]).await.unwrap();
    let mut third = waiting_client(gateway).await;
    // Still waiting after the second call for room, half a second after the first: the
    // connection whose request has begun to arrive is not closed for it.
    let mut buffer = [0u8; 4096];
    let waited = tokio::time::timeout(Duration::from_millis(400), third.read(&mut buffer)).await;
    assert!(waited.is_err(), "a third connection was served: {waited:?}");
    (first, second, third)
}

/// Reads a released stream to its end, then checks that its connection still serves a request.
async fn stays_open_after_its_stream(stream: &mut TcpStream) {
    read_to_the_end_of_the_stream(stream).await;
    let answer = health_on(stream).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
}

#[tokio::test]
async fn at_max_connections_an_idle_connection_closes_to_make_room() {
    let upstream = FakeUpstream::start(vec![]).await;
    let gateway = gateway_with_connections(&upstream, 2).await;
    let mut first = TcpStream::connect(gateway.address).await.unwrap();
    assert!(health_on(&mut first).await.starts_with("HTTP/1.1 200 OK"));
    let mut second = TcpStream::connect(gateway.address).await.unwrap();
    assert!(health_on(&mut second).await.starts_with("HTTP/1.1 200 OK"));

    // A third client is served once one of the two idle connections has been idle for half a
    // second: that one closes for it (not after `header_timeout_ms`, 2 minutes here).
    let mut third = TcpStream::connect(gateway.address).await.unwrap();
    let answer = health_if_open(&mut third).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    let answers = [
        health_if_open(&mut first).await,
        health_if_open(&mut second).await,
    ];
    let open: Vec<&String> = answers.iter().flatten().collect();
    assert_eq!(open.len(), 1, "exactly one connection closes: {answers:?}");
    // With nobody waiting, the other is kept alive.
    assert!(open[0].starts_with("HTTP/1.1 200 OK"), "{}", open[0]);
    assert!(!open[0].contains("connection: close"), "{}", open[0]);

    // The metrics request's connection makes room the same way: open are it and one other.
    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains("\nswitchyard_connections_open 2\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn at_max_connections_a_connection_that_has_sent_nothing_closes_to_make_room() {
    let upstream = FakeUpstream::start(vec![]).await;
    let gateway = gateway_with_connections(&upstream, 1).await;
    let mut silent = TcpStream::connect(gateway.address).await.unwrap();
    // The second client is served once the first has sent nothing for half a second (not
    // after `header_timeout_ms`, 2 minutes here), and the first is closed without an answer.
    let mut second = TcpStream::connect(gateway.address).await.unwrap();
    second
        .write_all(b"GET /health HTTP/1.1\r\nhost: gateway\r\n\r\n")
        .await
        .unwrap();
    served_at_last(&mut second).await;
    assert!(read_until_closed(&mut silent).await.is_empty());
}

#[tokio::test]
async fn at_max_connections_a_connection_whose_next_request_has_started_is_not_idle() {
    let upstream = FakeUpstream::start(vec![]).await;
    let gateway = gateway_with_connections(&upstream, 1).await;
    let mut first = TcpStream::connect(gateway.address).await.unwrap();
    assert!(health_on(&mut first).await.starts_with("HTTP/1.1 200 OK"));
    // Half of the next request head: this connection is no longer idle... (The gateway reads
    // it before it accepts the second client: on the test's single-threaded runtime, tasks run
    // in the order their sockets became ready.)
    first
        .write_all(b"GET /health HTTP/1.1\r\nhost: gat")
        .await
        .unwrap();
    let mut second = TcpStream::connect(gateway.address).await.unwrap();
    second
        .write_all(b"GET /health HTTP/1.1\r\nhost: gateway\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = [0u8; 4096];
    let waited = tokio::time::timeout(Duration::from_millis(300), second.read(&mut buffer)).await;
    assert!(waited.is_err(), "the second client was served: {waited:?}");
    // ...and once it is whole, its answer closes the connection for the waiting client.
    first.write_all(b"eway\r\n\r\n").await.unwrap();
    let received = String::from_utf8(read_until_closed(&mut first).await).unwrap();
    assert!(received.starts_with("HTTP/1.1 200 OK"), "{received}");
    assert!(received.contains("\r\nconnection: close\r\n"), "{received}");
    served_at_last(&mut second).await;
}

#[tokio::test]
async fn at_max_connections_a_stream_that_starts_while_a_client_waits_closes_after_it() {
    let (release_first, release_second) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let upstream = FakeUpstream::start(vec![
        Reply::StreamThenWait(vec!["one"], release_first.clone()),
        Reply::StreamThenWait(vec!["two"], release_second.clone()),
    ])
    .await;
    let gateway = gateway_with_connections(&upstream, 2).await;
    let (mut first, mut second, mut third) = busy_arriving_and_waiting(&gateway, b'P').await;

    // A stream that starts while a client waits says it will close: its client will not send
    // another request on it.
    let head = start_a_stream_sent_from(&mut second, 1).await;
    assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
    // It ends whole, then closes, and the third client is served.
    release_second.notify_one();
    let received = String::from_utf8(read_until_closed(&mut second).await).unwrap();
    assert!(received.contains("data: [DONE]"), "{received}");
    served_at_last(&mut third).await;

    // The first stream's connection stays open after it: nobody waits.
    release_first.notify_one();
    stays_open_after_its_stream(&mut first).await;
}

#[tokio::test]
async fn at_max_connections_a_response_closes_its_connection_while_a_client_waits() {
    let release = Arc::new(Notify::new());
    let upstream =
        FakeUpstream::start(vec![Reply::StreamThenWait(vec!["one"], release.clone())]).await;
    let gateway = gateway_with_connections(&upstream, 2).await;
    let (mut first, mut second, mut third) = busy_arriving_and_waiting(&gateway, b'G').await;

    // A request that arrives while a client waits is answered with `Connection: close`.
    second
        .write_all(b"ET /health HTTP/1.1\r\nhost: gateway\r\n\r\n")
        .await
        .unwrap();
    let answer = String::from_utf8(read_until_closed(&mut second).await).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
    let answer = served_at_last(&mut third).await;
    assert!(!answer.contains("connection: close"), "{answer}");

    // With nobody waiting, the stream's connection stays open after it.
    release.notify_one();
    stays_open_after_its_stream(&mut first).await;
}
