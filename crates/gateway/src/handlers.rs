//! HTTP handlers: OpenAI chat completions and model list, health and readiness.

use std::convert::Infallible;
use std::time::Instant;

use axum::Json;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, Uri};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt, stream};
use serde_json::json;
use switchyard_core::{ChatRequest, ChunkStream, Llm};
use tracing::{info, warn};

use crate::error::ApiError;
use crate::extract::OpenAiJson;
use crate::request_log::{RequestInfo, RequestStart, millis, request_id};
use crate::{AppState, Endpoint};

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `POST /v1/chat/completions`: `model` names the endpoint.
pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(RequestStart(start)): Extension<RequestStart>,
    headers: HeaderMap,
    OpenAiJson(request): OpenAiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let endpoint_name = request.model.clone();
    let Some(endpoint) = state.endpoint(&endpoint_name) else {
        return Err(ApiError::unknown_model(&endpoint_name));
    };
    if request.messages.is_empty() {
        return Err(ApiError::bad_request(
            "'messages' must contain at least one message",
            Some("messages".to_owned()),
        ));
    }
    let Endpoint::Route(route) = endpoint;
    let upstream_start = Instant::now();
    let info = |streamed| RequestInfo {
        endpoint: endpoint_name.clone(),
        upstream: upstream_start.elapsed(),
        streamed,
    };
    if request.is_stream() {
        let chunks = route.chat_stream(request).await.map_err(ApiError::from)?;
        let time_to_first_chunk = upstream_start.elapsed();
        let log = StreamLog {
            request_id: request_id(&headers),
            endpoint: endpoint_name.clone(),
            start,
            time_to_first_chunk,
            chunks: 0,
            logged: false,
        };
        let mut response = Sse::new(sse_events(chunks, log)).into_response();
        response.extensions_mut().insert(info(true));
        Ok(response)
    } else {
        let completion = route.chat(request).await.map_err(ApiError::from)?;
        let mut response = Json(completion).into_response();
        response.extensions_mut().insert(info(false));
        Ok(response)
    }
}

/// What the stream needs to write its request log line when it ends. A stream the client
/// abandons is dropped unfinished, and logs itself as such.
struct StreamLog {
    request_id: String,
    endpoint: String,
    start: Instant,
    time_to_first_chunk: std::time::Duration,
    chunks: usize,
    logged: bool,
}

impl StreamLog {
    fn finish(&mut self, outcome: &str) {
        self.logged = true;
        info!(
            request_id = %self.request_id,
            method = "POST",
            path = "/v1/chat/completions",
            endpoint = %self.endpoint,
            status = 200,
            stream = true,
            chunks = self.chunks,
            outcome,
            latency_ms = millis(self.start.elapsed()),
            upstream_ms = millis(self.time_to_first_chunk),
            "request"
        );
    }
}

impl Drop for StreamLog {
    fn drop(&mut self) {
        if !self.logged {
            self.finish("client_closed");
        }
    }
}

enum Phase {
    Streaming(ChunkStream),
    /// An error frame went out; `[DONE]` follows.
    Closing,
    Done,
}

/// Chunks become SSE `data:` frames; the stream always ends with `data: [DONE]`, after an error
/// frame in OpenAI's shape if the upstream broke off.
fn sse_events(
    chunks: ChunkStream,
    log: StreamLog,
) -> impl Stream<Item = Result<Event, Infallible>> {
    stream::unfold(
        (Phase::Streaming(chunks), log),
        |(phase, mut log)| async move {
            let (event, next) = match phase {
                Phase::Done => return None,
                Phase::Closing => (done_event(), Phase::Done),
                Phase::Streaming(mut chunks) => match chunks.next().await {
                    Some(Ok(chunk)) => {
                        log.chunks += 1;
                        match Event::default().json_data(&chunk) {
                            Ok(event) => (event, Phase::Streaming(chunks)),
                            Err(error) => {
                                // Cannot happen for our own types; end the stream rather than hang.
                                warn!(%error, "cannot serialize a chunk");
                                log.finish("serialize_error");
                                (done_event(), Phase::Done)
                            }
                        }
                    }
                    Some(Err(error)) => {
                        warn!(request_id = %log.request_id, endpoint = %log.endpoint, %error, "stream ended by an upstream error");
                        log.finish("upstream_error");
                        let body = ApiError::from(error).openai_body();
                        (Event::default().data(body.to_string()), Phase::Closing)
                    }
                    None => {
                        log.finish("ok");
                        (done_event(), Phase::Done)
                    }
                },
            };
            Some((Ok(event), (next, log)))
        },
    )
}

fn done_event() -> Event {
    Event::default().data("[DONE]")
}

/// `GET /v1/models`: every endpoint, in OpenAI's list format.
pub async fn list_models(State(state): State<AppState>) -> Json<serde_json::Value> {
    let data: Vec<_> = state
        .0
        .endpoint_order
        .iter()
        .map(|name| json!({"id": name, "object": "model", "created": state.0.started_at, "owned_by": "switchyard"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

pub async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Ready once the config is loaded and every endpoint built, which [`crate::Gateway::new`]
/// guarantees before the server starts.
pub async fn ready(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({"status": "ready", "endpoints": state.0.endpoints.len()}))
}

pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found_path(uri.path())
}
