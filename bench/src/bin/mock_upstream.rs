//! `mock-upstream`: a fast OpenAI-compatible upstream for load benchmarks.
//!
//! `POST /v1/chat/completions` answers a fixed completion, or with `"stream": true` an SSE
//! stream of `--chunks` content chunks (role chunk first, a finish chunk, a usage chunk when
//! `stream_options.include_usage` is true, then `data: [DONE]`). Every body is built once at
//! start-up and handed out as reference-counted `Bytes`, so a request costs one small JSON parse
//! of its body and nothing else: the mock must never be what a benchmark measures.
//! `--delay-ms` waits before answering (time to first token), `--chunk-delay-ms` between chunks.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use bytes::Bytes;
use clap::Parser;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(
    name = "mock-upstream",
    about = "Fast OpenAI-compatible mock upstream for benchmarks"
)]
struct Args {
    /// Address to listen on (loopback only is sensible).
    #[arg(long, default_value = "127.0.0.1:9100")]
    listen: SocketAddr,
    /// Content chunks in a streamed reply.
    #[arg(long, default_value_t = 16)]
    chunks: usize,
    /// Wait this long before answering each request (milliseconds, fractions allowed).
    #[arg(long, default_value_t = 0.0)]
    delay_ms: f64,
    /// Wait this long before each streamed chunk after the first (milliseconds).
    #[arg(long, default_value_t = 0.0)]
    chunk_delay_ms: f64,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

/// The parts of a request the mock looks at; everything else is skipped by serde.
#[derive(Deserialize)]
struct RequestShape {
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Pre-built bodies and the configured delays.
struct Replies {
    completion: Bytes,
    /// Role chunk, content chunks, finish chunk.
    frames: Vec<Bytes>,
    usage_frame: Bytes,
    done_frame: Bytes,
    delay: Option<Duration>,
    chunk_delay: Option<Duration>,
}

const MODEL: &str = "mock-model";
const ID: &str = "chatcmpl-mock";
const CREATED: u64 = 1_700_000_000;

impl Replies {
    fn new(args: &Args) -> Self {
        // One "word" per chunk; the non-stream reply carries the same text.
        let words: Vec<String> = (0..args.chunks).map(|i| format!("word{i} ")).collect();
        let text: String = words.concat();
        let completion_tokens = args.chunks as u64;
        let usage = json!({"prompt_tokens": 10, "completion_tokens": completion_tokens,
                           "total_tokens": 10 + completion_tokens});
        let completion = json!({
            "id": ID, "object": "chat.completion", "created": CREATED, "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": usage,
        });
        let chunk = |delta: serde_json::Value, finish: Option<&str>| {
            sse(
                &json!({"id": ID, "object": "chat.completion.chunk", "created": CREATED,
                        "model": MODEL,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}),
            )
        };
        let mut frames = vec![chunk(json!({"role": "assistant", "content": ""}), None)];
        frames.extend(words.iter().map(|w| chunk(json!({"content": w}), None)));
        frames.push(chunk(json!({}), Some("stop")));
        let usage_frame = sse(&json!({"id": ID, "object": "chat.completion.chunk",
                                      "created": CREATED, "model": MODEL, "choices": [],
                                      "usage": usage}));
        Self {
            completion: Bytes::from(completion.to_string()),
            frames,
            usage_frame,
            done_frame: Bytes::from_static(b"data: [DONE]\n\n"),
            delay: positive_duration(args.delay_ms),
            chunk_delay: positive_duration(args.chunk_delay_ms),
        }
    }
}

fn sse(value: &serde_json::Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

fn positive_duration(ms: f64) -> Option<Duration> {
    (ms > 0.0).then(|| Duration::from_secs_f64(ms / 1000.0))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let replies = Arc::new(Replies::new(&args));
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { "ok" }))
        .with_state(replies);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    eprintln!(
        "mock-upstream listening on http://{}/v1 (chunks={}, delay_ms={}, chunk_delay_ms={})",
        listener.local_addr()?,
        args.chunks,
        args.delay_ms,
        args.chunk_delay_ms
    );
    // Without TCP_NODELAY, Nagle's algorithm holds back the small SSE frames after the first
    // until the client's delayed ACK (~40 ms): every stream would take 40 ms.
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            eprintln!("cannot set TCP_NODELAY: {error}");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("server error")
}

async fn models() -> Response {
    axum::Json(json!({"object": "list",
                      "data": [{"id": MODEL, "object": "model", "created": CREATED, "owned_by": "mock"}]}))
        .into_response()
}

async fn completions(State(replies): State<Arc<Replies>>, body: Bytes) -> Response {
    let shape: RequestShape = match serde_json::from_slice(&body) {
        Ok(shape) => shape,
        Err(error) => {
            let body = json!({"error": {"message": format!("bad request body: {error}"),
                                        "type": "invalid_request_error", "param": null, "code": null}});
            return (StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
        }
    };
    if let Some(delay) = replies.delay {
        tokio::time::sleep(delay).await;
    }
    if !shape.stream {
        return (
            [(header::CONTENT_TYPE, "application/json")],
            replies.completion.clone(),
        )
            .into_response();
    }
    let include_usage = shape.stream_options.is_some_and(|o| o.include_usage);
    let mut frames = replies.frames.clone();
    if include_usage {
        frames.push(replies.usage_frame.clone());
    }
    frames.push(replies.done_frame.clone());
    let body = match replies.chunk_delay {
        None => Body::from_stream(futures::stream::iter(
            frames.into_iter().map(Ok::<_, Infallible>),
        )),
        Some(pause) => {
            // The first frame goes out at once; each later one after `pause`.
            let paced = futures::stream::iter(frames.into_iter().enumerate()).then(
                move |(i, frame)| async move {
                    if i > 0 {
                        tokio::time::sleep(pause).await;
                    }
                    Ok::<_, Infallible>(frame)
                },
            );
            Body::from_stream(paced)
        }
    };
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}
