//! Test harness: a scriptable fake OpenAI upstream and a gateway started on an ephemeral port.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use switchyard_core::Registry;
use switchyard_gateway::{Config, Gateway};
use tokio::sync::{Notify, oneshot};

/// What the fake upstream does with one request.
#[derive(Clone, Debug)]
pub enum Reply {
    /// A normal completion (or stream, if the request asked for one) echoing the last user message.
    Echo,
    /// A completion (or stream) with this text.
    Text(&'static str),
    /// An error status with an OpenAI error body (naming `param` "messages" and a code
    /// "fake_client_error" for a 4xx) and optional extra headers.
    Status(u16, Vec<(&'static str, &'static str)>),
    /// Waits, then does the inner reply.
    Delay(Duration, Box<Reply>),
    /// An error status whose message quotes the `Authorization` header received (as some
    /// servers' errors do).
    QuoteAuthorization(u16),
    /// 200 with exactly this body, as `application/json`.
    Body(&'static str),
    /// 200 with an SSE stream of exactly these `data:` payloads (`[DONE]` only if listed).
    Sse(Vec<&'static str>),
    /// Streams these content pieces, then drops the connection without `[DONE]`.
    StreamThenDrop(Vec<&'static str>),
    /// Streams these content pieces, then sends nothing more and never ends.
    StreamThenStall(Vec<&'static str>),
    /// Streams these content pieces, waits for the notification, then finishes the stream.
    StreamThenWait(Vec<&'static str>, Arc<Notify>),
}

/// A fake OpenAI-compatible server that replays a script and records what it received.
#[derive(Clone)]
pub struct FakeUpstream {
    pub base_url: String,
    state: Arc<FakeState>,
}

struct FakeState {
    script: Mutex<VecDeque<Reply>>,
    requests: Mutex<Vec<Recorded>>,
    received: Notify,
}

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub body: Value,
    pub authorization: Option<String>,
    pub host: Option<String>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    pub version: axum::http::Version,
}

impl FakeUpstream {
    /// Starts a fake that answers with `script` in order, then with [`Reply::Echo`].
    pub async fn start(script: Vec<Reply>) -> Self {
        let (state, app) = fake_app(script);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            base_url: format!("http://{address}/v1"),
            state,
        }
    }

    /// Like [`FakeUpstream::start`], over HTTPS (HTTP/2 or HTTP/1.1, by ALPN) with a certificate
    /// for 127.0.0.1 from a CA made for this fake; also returns that CA's certificate as PEM.
    pub async fn start_tls(script: Vec<Reply>) -> (Self, String) {
        let (tls, ca_pem) = test_certificates();
        let (state, app) = fake_app(script);
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = tcp.local_addr().unwrap();
        let listener = TlsListener {
            tcp,
            tls: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
        };
        tokio::spawn(async move { axum::serve(listener, app).await });
        let upstream = Self {
            base_url: format!("https://{address}/v1"),
            state,
        };
        (upstream, ca_pem)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Waits until the fake has received `count` requests in all.
    pub async fn wait_for_requests(&self, count: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let notified = self.state.received.notified();
            if self.state.requests.lock().unwrap().len() >= count {
                return;
            }
            tokio::time::timeout_at(deadline, notified)
                .await
                .expect("fake upstream did not receive the expected requests in time");
        }
    }
}

fn fake_app(script: Vec<Reply>) -> (Arc<FakeState>, Router) {
    let state = Arc::new(FakeState {
        script: Mutex::new(script.into()),
        requests: Mutex::new(Vec::new()),
        received: Notify::new(),
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(fake_completions))
        .with_state(state.clone());
    (state, app)
}

/// A server certificate for 127.0.0.1 issued by a new CA, and that CA's certificate (PEM).
fn test_certificates() -> (rustls::ServerConfig, String) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "switchyard test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let certificate = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let key = rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der());
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![certificate.der().clone()], key.into())
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    (config, ca.pem())
}

/// TCP connections after their TLS handshake, as a listener for `axum::serve`.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    tls: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, peer)) = self.tcp.accept().await else {
                continue;
            };
            // A client that refuses the certificate ends its handshake: wait for the next one.
            if let Ok(stream) = self.tls.accept(stream).await {
                return (stream, peer);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

async fn fake_completions(
    State(state): State<Arc<FakeState>>,
    version: axum::http::Version,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap();
    let header = |name| headers.get(name).map(|v| v.to_str().unwrap().to_owned());
    state.requests.lock().unwrap().push(Recorded {
        body: body.clone(),
        authorization: header("authorization"),
        host: header("host"),
        traceparent: header("traceparent"),
        tracestate: header("tracestate"),
        version,
    });
    state.received.notify_waiters();
    let reply = state
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(Reply::Echo);
    answer(reply, &body, &header("authorization").unwrap_or_default()).await
}

async fn answer(reply: Reply, request: &Value, authorization: &str) -> Response {
    let text = match reply {
        Reply::Echo => last_user_text(request),
        Reply::Text(text) => text.to_owned(),
        Reply::Delay(wait, inner) => {
            tokio::time::sleep(wait).await;
            return Box::pin(answer(*inner, request, authorization)).await;
        }
        Reply::QuoteAuthorization(status) => {
            let message = format!("no quota left for {authorization}");
            return (
                StatusCode::from_u16(status).unwrap(),
                axum::Json(json!({"error": {"message": message, "type": "server_error", "param": authorization, "code": null}})),
            )
                .into_response();
        }
        Reply::Status(status, headers) => {
            let mut response = (
                StatusCode::from_u16(status).unwrap(),
                axum::Json(if status < 500 {
                    json!({"error": {"message": format!("fake upstream says {status}"), "type": "invalid_request_error", "param": "messages", "code": "fake_client_error"}})
                } else {
                    json!({"error": {"message": format!("fake upstream says {status}"), "type": "server_error"}})
                }),
            )
                .into_response();
            for (name, value) in headers {
                response.headers_mut().insert(name, value.parse().unwrap());
            }
            return response;
        }
        Reply::Body(body) => {
            return ([(header::CONTENT_TYPE, "application/json")], body).into_response();
        }
        Reply::Sse(payloads) => {
            let body: String = payloads
                .iter()
                .map(|data| format!("data: {data}\n\n"))
                .collect();
            return sse_response(Body::from(body));
        }
        Reply::StreamThenDrop(pieces) => {
            // The pieces go out first (the pause lets the server flush them), then the
            // connection is cut without `[DONE]`.
            let cut = futures::stream::once(async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(std::io::Error::other("connection dropped"))
            });
            let frames = futures::stream::iter(content_frames(request, pieces)).chain(cut);
            return sse_response(Body::from_stream(frames));
        }
        Reply::StreamThenStall(pieces) => {
            let frames = futures::stream::iter(content_frames(request, pieces))
                .chain(futures::stream::pending());
            return sse_response(Body::from_stream(frames));
        }
        Reply::StreamThenWait(pieces, release) => {
            let model = request["model"].as_str().unwrap_or_default().to_owned();
            let end = futures::stream::once(async move {
                release.notified().await;
                let finish = sse(&chunk(&model, json!({}), Some("stop")));
                Ok(Bytes::from(format!("{finish}data: [DONE]\n\n")))
            });
            let frames = futures::stream::iter(content_frames(request, pieces)).chain(end);
            return sse_response(Body::from_stream(frames));
        }
    };
    let model = request["model"].as_str().unwrap_or_default().to_owned();
    let prompt_tokens = request["messages"]
        .as_array()
        .map_or(0, |m| m.len() as u64 * 10);
    let completion_tokens = text.split_whitespace().count() as u64;
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                       "total_tokens": prompt_tokens + completion_tokens});
    if request["stream"] != json!(true) {
        return axum::Json(json!({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 1700000000, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": usage,
            "system_fingerprint": "fp_fake",
        }))
        .into_response();
    }
    // A stream as OpenAI sends it: role, one chunk per word, finish, optional usage, [DONE].
    let mut frames = vec![sse(&chunk(
        &model,
        json!({"role": "assistant", "content": ""}),
        None,
    ))];
    let words: Vec<String> = text.split_inclusive(' ').map(str::to_owned).collect();
    frames.extend(
        words
            .iter()
            .map(|w| sse(&chunk(&model, json!({"content": w}), None))),
    );
    frames.push(sse(&chunk(&model, json!({}), Some("stop"))));
    if request["stream_options"]["include_usage"] == json!(true) {
        frames.push(sse(
            &json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000,
                                "model": model, "choices": [], "usage": usage}),
        ));
    }
    frames.push("data: [DONE]\n\n".to_owned());
    let body = futures::stream::iter(
        frames
            .into_iter()
            .map(|f| Ok::<_, Infallible>(Bytes::from(f))),
    );
    sse_response(Body::from_stream(body))
}

fn content_frames(
    request: &Value,
    pieces: Vec<&'static str>,
) -> impl Iterator<Item = Result<Bytes, std::io::Error>> + Send + use<> {
    let model = request["model"].as_str().unwrap_or_default().to_owned();
    pieces.into_iter().map(move |piece| {
        Ok(Bytes::from(sse(&chunk(
            &model,
            json!({"content": piece}),
            None,
        ))))
    })
}

fn chunk(model: &str, delta: Value, finish_reason: Option<&str>) -> Value {
    json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000, "model": model,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})
}

fn sse(value: &Value) -> String {
    format!("data: {value}\n\n")
}

fn sse_response(body: Body) -> Response {
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(body)
        .unwrap()
}

fn last_user_text(request: &Value) -> String {
    request["messages"]
        .as_array()
        .and_then(|messages| messages.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// A running gateway; shuts down when dropped.
pub struct TestGateway {
    pub address: SocketAddr,
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
}

impl TestGateway {
    /// Starts a gateway from config text; `${TEST_OPENAI_KEY}` resolves to `sk-test-key` and
    /// `${TEST_ADMIN_KEY}` to `admin-secret`.
    pub async fn start(config: &str) -> Self {
        Self::start_with_registry(config, &switchyard_chains::registry()).await
    }

    /// Like [`TestGateway::start`], with more environment variables for `${VAR}` references.
    pub async fn start_with_env(config: &str, env: &[(&str, &str)]) -> Self {
        let config = parse_config_with_env(config, env);
        Self::serve(
            Gateway::new(config, &switchyard_chains::registry()).unwrap_or_else(|e| panic!("{e}")),
        )
        .await
    }

    /// Like [`TestGateway::start`], with the given compiled chains.
    pub async fn start_with_registry(config: &str, registry: &Registry) -> Self {
        Self::serve(Gateway::new(parse_config(config), registry).unwrap_or_else(|e| panic!("{e}")))
            .await
    }

    /// Serves a gateway started from a config file (so it can reload).
    pub async fn start_from_file(path: &std::path::Path) -> Self {
        let source = switchyard_gateway::ConfigSource {
            path: path.to_owned(),
            store_override: None,
            allow_code_mismatch: false,
        };
        let gateway = Gateway::from_file(source, &switchyard_chains::registry())
            .unwrap_or_else(|e| panic!("{e}"));
        Self::serve(gateway).await
    }

    async fn serve(gateway: Gateway) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (shutdown, signal) = oneshot::channel::<()>();
        tokio::spawn(switchyard_gateway::serve(listener, gateway, async {
            let _ = signal.await;
        }));
        Self {
            address,
            client: reqwest::Client::new(),
            shutdown: Some(shutdown),
        }
    }

    /// A gateway with one endpoint `chat` on a route over the given upstreams, in order.
    pub async fn over(upstreams: &[&str], route_settings: &str) -> Self {
        Self::start(&config_over(upstreams, route_settings)).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// `POST /admin/reload` without an admin key.
    pub async fn reload(&self) -> reqwest::Response {
        self.client
            .post(self.url("/admin/reload"))
            .send()
            .await
            .unwrap()
    }

    /// The `/metrics` page.
    pub async fn metrics(&self) -> String {
        let response = self.client.get(self.url("/metrics")).send().await.unwrap();
        response.text().await.unwrap()
    }

    /// GETs `path` and parses the JSON answer.
    pub async fn get_json(&self, path: &str) -> Value {
        self.client
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Begins graceful shutdown.
    pub fn shut_down(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Config text for [`TestGateway::over`]: providers `p0`, `p1`… with models `model-0`, `model-1`….
/// Parses config text; `${TEST_OPENAI_KEY}` resolves to `sk-test-key` and `${TEST_ADMIN_KEY}`
/// to `admin-secret`.
pub fn parse_config(text: &str) -> Config {
    parse_config_with_env(text, &[])
}

/// Like [`parse_config`], with more environment variables.
pub fn parse_config_with_env(text: &str, more: &[(&str, &str)]) -> Config {
    let env = |name: &str| match name {
        "TEST_OPENAI_KEY" => Some("sk-test-key".to_owned()),
        "TEST_ADMIN_KEY" => Some("admin-secret".to_owned()),
        _ => more
            .iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| (*value).to_owned()),
    };
    Config::parse("test.toml", text, &env).unwrap_or_else(|e| panic!("{e}"))
}

pub fn config_over(upstreams: &[&str], route_settings: &str) -> String {
    let mut config = String::new();
    let mut targets = Vec::new();
    for (i, base_url) in upstreams.iter().enumerate() {
        config.push_str(&format!(
            "[providers.p{i}]\nkind = \"openai\"\nbase_url = \"{base_url}\"\napi_key = \"${{TEST_OPENAI_KEY}}\"\n"
        ));
        targets.push(format!("{{ provider = \"p{i}\", model = \"model-{i}\" }}"));
    }
    config.push_str(&format!(
        "[routes.main]\ntargets = [{}]\nbackoff_ms = 1\n{route_settings}\n[[endpoints]]\nname = \"chat\"\nroute = \"main\"\n",
        targets.join(", ")
    ));
    config
}

/// A base URL where nothing listens.
pub async fn closed_port_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{address}/v1")
}

pub fn chat_body(content: &str) -> Value {
    json!({"model": "chat", "messages": [{"role": "user", "content": content}]})
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|frame| frame.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(str::to_owned)
        .collect()
}

/// The concatenated `delta.content` of a stream's chunks.
pub fn stream_text(frames: &[String]) -> String {
    frames
        .iter()
        .filter(|f| *f != "[DONE]")
        .filter_map(|f| serde_json::from_str::<Value>(f).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

/// Reads a streamed response body to the end.
pub async fn read_stream(response: reqwest::Response) -> String {
    let mut body = String::new();
    let mut stream = response.bytes_stream();
    while let Some(piece) = stream.next().await {
        body.push_str(std::str::from_utf8(&piece.unwrap()).unwrap());
    }
    body
}

/// A fresh, empty directory under the system temp dir.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir =
        std::env::temp_dir().join(format!("switchyard-test-{}-{n}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A `redis-server` of the test's own on a free loopback port (Debian's `redis-server`, which
/// `.ci/run` installs). Stopped when dropped.
pub struct RedisServer {
    pub port: u16,
    child: Option<std::process::Child>,
    /// More `redis-server` arguments (a password, a Unix socket).
    args: Vec<String>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(args: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let args = args.iter().map(|a| (*a).to_owned()).collect();
        let mut server = Self {
            port,
            child: None,
            args,
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port, empty, and waits until it answers PING.
    pub fn restart(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(&self.args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}); install Debian's redis-server (.ci/run does)"
                )
            });
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !self.answers_ping() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not come up on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends inline commands on one connection and returns the replies, one line each
    /// (commands whose replies are single lines: `AUTH`, `SELECT`, `DBSIZE`...).
    pub fn query(&self, commands: &[&str]) -> Vec<String> {
        use std::io::{BufRead, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        for command in commands {
            write!(stream, "{command}\r\n").unwrap();
        }
        let mut reader = std::io::BufReader::new(stream);
        (0..commands.len())
            .map(|_| {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                line.trim_end().to_owned()
            })
            .collect()
    }

    /// `+PONG`, or `-NOAUTH` when it wants a password: either way it is up.
    fn answers_ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let mut reply = [0u8; 1];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && matches!(&reply, b"+" | b"-")
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `switchyard serve` process on an ephemeral port; killed when dropped.
pub struct GatewayProcess {
    pub child: std::process::Child,
    pub address: String,
    /// Log lines up to and including "switchyard listening".
    pub startup_log: Vec<String>,
    /// The log lines after those.
    pub log: std::sync::mpsc::Receiver<String>,
}

impl GatewayProcess {
    /// Starts the binary on `config` (JSON logs) and waits for its "listening" line.
    pub fn start(config: &std::path::Path, env: &[(&str, &str)]) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args([
                "--log-format",
                "json",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--config",
            ])
            .arg(config)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (lines_tx, log) = std::sync::mpsc::channel::<String>();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                if lines_tx.send(line.unwrap_or_default()).is_err() {
                    break;
                }
            }
        });
        let mut startup_log = Vec::new();
        let address = loop {
            let line = log
                .recv_timeout(Duration::from_secs(20))
                .expect("the gateway did not start");
            let parsed: Value = serde_json::from_str(&line)
                .unwrap_or_else(|_| panic!("not a JSON log line: {line}"));
            startup_log.push(line);
            if parsed["message"] == "switchyard listening" {
                break parsed["address"].as_str().unwrap().to_owned();
            }
        };
        Self {
            child,
            address,
            startup_log,
            log,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// The next `count` request log lines (JSON), waiting up to 10 s for each.
    pub fn request_lines(&self, count: usize) -> Vec<Value> {
        let mut lines = Vec::new();
        while lines.len() < count {
            let line = self
                .log
                .recv_timeout(Duration::from_secs(10))
                .expect("request log lines");
            let parsed: Value = serde_json::from_str(&line).unwrap();
            if parsed["message"] == "request" {
                lines.push(parsed);
            }
        }
        lines
    }

    /// Stops the gateway with SIGTERM, waits for it to exit and returns its whole log.
    pub fn stop(&mut self) -> String {
        let terminated = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(terminated.success());
        assert!(self.child.wait().unwrap().success());
        // The reader thread ends at the end of stderr, after the last line the gateway wrote.
        let mut log = self.startup_log.join("\n");
        for line in self.log.iter() {
            log.push('\n');
            log.push_str(&line);
        }
        log
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response header's value, as text; panics when it is missing.
pub fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
        .to_owned()
}

/// A finished command's standard output; panics with its standard error if it failed.
/// Runs the `switchyard` CLI with `args` on the model store at `store`.
pub fn switchyard(store: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .env("SWITCHYARD_STORE", store)
        .output()
        .unwrap()
}

pub fn stdout(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

/// The most tokens a 1000-per-minute rule can have refilled since `start`: one per 60 ms, plus
/// one for rounding. Bounds what a test may find left without assuming how fast it ran.
pub fn refilled_since(start: std::time::Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis() / 60).unwrap_or(u64::MAX) + 1
}
