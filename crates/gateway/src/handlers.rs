//! HTTP handlers: OpenAI chat completions and model list, MLflow invocations, health and
//! readiness.

use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, Path, Request, State};
use axum::http::header::{self, CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use axum::response::{IntoResponse, Response};
use futures::{FutureExt, StreamExt, stream};
use serde_json::{Value, json};
use switchyard_core::{
    ChainContext, ChainOutput, ChatRequest, ChatResponse, ChunkBody, ChunkBodyStream,
    CompletionBody, Llm, LlmError, LlmErrorKind, RequestMeta, Usage,
};
use tracing::{error, warn};

use crate::error::{ApiError, MlflowError};
use crate::extract::{from_value, parse_json, read_body};
use crate::limits::{Admission, Caller, Spent};
use crate::request_log::RequestRecord;
use crate::{ApiKeyConfig, AppState, ChainEndpoint, Endpoint, Snapshot, auth};
use switchyard_serving::{Batch, OnnxModel, ServingError, mlflow_csv_input, python_json};

/// The end user's header (the OpenAI `user` field is the other way to name them).
const USER: HeaderName = HeaderName::from_static("x-switchyard-user");

/// `POST /v1/chat/completions`: `model` names the endpoint.
pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(record): Extension<Arc<RequestRecord>>,
    mut request: Request,
) -> Result<Response, ApiError> {
    // The headers are taken rather than copied (axum's `HeaderMap` extractor clones them);
    // reading the body does not need them.
    let headers = std::mem::take(request.headers_mut());
    let snapshot = state.snapshot();
    // The key is checked before the body is read: a caller without one costs no parsing.
    let key = auth::authenticate(&snapshot.keys, &headers)?.cloned();
    let chat = match read_body(request, &state)
        .await
        .and_then(|body| parse_json(&body))
    {
        Ok(chat) => chat,
        Err(error) => {
            // A request refused before it reached an endpoint is still logged as the key's.
            record.update(|d| d.key_id = key.as_ref().map(|k| k.id.clone()));
            return Err(error);
        }
    };
    serve_chat(&state, Authorized { snapshot, key }, chat, &headers, record).await
}

/// `POST /endpoints/{name}/invocations` (MLflow): for chat endpoints the body is a chat request
/// (`model` may be left out: the path names the endpoint); errors come in MLflow's shape. The
/// name is what comes before `/invocations`, slashes included.
pub async fn invocations(
    State(state): State<AppState>,
    Path(path): Path<String>,
    Extension(record): Extension<Arc<RequestRecord>>,
    mut request: Request,
) -> Result<Response, MlflowError> {
    let Some(name) = path
        .strip_suffix("/invocations")
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
    else {
        return Err(ApiError::not_found_path(request.uri().path()).into());
    };
    if request.method() != Method::POST {
        let error = ApiError::method_not_allowed(request.method(), request.uri().path());
        let mut response = MlflowError(error).into_response();
        let allow = HeaderValue::from_static("POST");
        response.headers_mut().insert(header::ALLOW, allow);
        return Ok(response);
    }
    let headers = std::mem::take(request.headers_mut());
    let snapshot = state.snapshot();
    // The key and the endpoint are checked before the body is read.
    let key = auth::authenticate(&snapshot.keys, &headers)?.cloned();
    let Some(endpoint) = snapshot.endpoints.get(&name) else {
        return Err(ApiError::unknown_model(&name).into());
    };
    let model = match endpoint {
        Endpoint::Model(model) => Some(model.clone()),
        _ => None,
    };
    // The path names a configured endpoint: its log line and metrics say which, whatever
    // becomes of the request.
    record.update(|d| {
        d.endpoint = Some(name.clone());
        d.kind = endpoint.kind();
        d.key_id = key.as_ref().map(|k| k.id.clone());
    });
    // A key that may not call the endpoint learns nothing more about it (not even what it takes).
    auth::check_endpoint(key.as_deref(), &name)?;
    // MLflow's scoring protocol: JSON, or CSV for a model; no type at all is taken as JSON.
    let csv = match media_type(&headers) {
        None => false,
        Some(media) if media.eq_ignore_ascii_case("application/json") => false,
        Some(media) if media.eq_ignore_ascii_case("text/csv") && model.is_some() => true,
        Some(other) => {
            let accepted = if model.is_some() {
                "application/json or text/csv"
            } else {
                "application/json"
            };
            return Err(ApiError::unsupported_media_type(format!(
                "endpoint '{name}' takes {accepted}, not {other}"
            ))
            .into());
        }
    };
    let body = read_body(request, &state).await?;
    let caller = Authorized { snapshot, key };
    if let Some(model) = model {
        // A small body is read now, so that one that is no scoring request is refused before
        // it counts against a rate limit; a large one is read off the event loop, later.
        let request = if body.len() > LARGE_BODY {
            ScoringRequest::Large { body, csv }
        } else {
            ScoringRequest::Read {
                value: scoring_value(&body, csv, &model)?,
                csv,
            }
        };
        return Ok(serve_model(&state, caller, &name, model, request, &headers, &record).await?);
    }
    let mut value: Value = parse_json(&body)?;
    let Some(object) = value.as_object_mut() else {
        return Err(ApiError::bad_request("the request body must be a JSON object", None).into());
    };
    object.insert("model".to_owned(), Value::String(name));
    let request: ChatRequest = from_value(value)?;
    Ok(serve_chat(&state, caller, request, &headers, record).await?)
}

/// The body's media type: `Content-Type` without its parameters.
fn media_type(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(CONTENT_TYPE)?.to_str().unwrap_or_default();
    let media = value.split(';').next().unwrap_or_default().trim();
    (!media.is_empty()).then_some(media)
}

/// A request's view of the gateway: the state it started with (a reload while it runs does not
/// change what it runs on) and its caller's key, checked before the body was read. The handlers
/// let go of the snapshot once the request is admitted, so that a reload's old endpoints and
/// limits are freed while long requests are still running.
struct Authorized {
    snapshot: Arc<Snapshot>,
    key: Option<Arc<ApiKeyConfig>>,
}

/// Serves a chat request on the endpoint its `model` names, as JSON or as an SSE stream: find
/// the endpoint, check the caller's key may call it, admit it through the rate limits, run the
/// route or chain, settle token usage.
async fn serve_chat(
    state: &AppState,
    Authorized { snapshot, key }: Authorized,
    mut request: ChatRequest,
    headers: &HeaderMap,
    record: Arc<RequestRecord>,
) -> Result<Response, ApiError> {
    let endpoint_name = request.model.clone();
    let key_id = key.as_ref().map(|k| k.id.clone());
    let Some(endpoint) = snapshot.endpoints.get(&endpoint_name).cloned() else {
        record.update(|d| d.key_id.clone_from(&key_id));
        return Err(ApiError::unknown_model(&endpoint_name));
    };
    let user = end_user(headers, &request);
    record.update(|d| {
        d.endpoint = Some(endpoint_name.clone());
        d.kind = endpoint.kind();
        d.key_id.clone_from(&key_id);
        d.user.clone_from(&user);
        d.stream = request.is_stream();
    });
    auth::check_endpoint(key.as_deref(), &endpoint_name)?;
    if matches!(endpoint, Endpoint::Model(_)) {
        return Err(ApiError::bad_request(
            format!(
                "endpoint '{endpoint_name}' serves an ONNX model, not chat: POST /endpoints/{endpoint_name}/invocations \
                 with MLflow's input formats"
            ),
            Some("model".to_owned()),
        ));
    }
    if request.messages.is_empty() {
        return Err(ApiError::bad_request(
            "'messages' must contain at least one message",
            Some("messages".to_owned()),
        ));
    }
    let request_id = record.request_id.clone();
    let caller = Caller {
        endpoint: &endpoint_name,
        api_key: key_id.as_deref(),
        user: user.as_deref(),
    };
    let mut admission = snapshot.limits.admit(&caller, Some(&request)).await?;
    // With `log_payloads`, the messages go into the log line (the completion is added below).
    let logged_messages = snapshot
        .log_payloads
        .contains(&endpoint_name)
        .then(|| serde_json::to_string(&request.messages).unwrap_or_default());
    drop(snapshot);

    let stream = request.is_stream();
    let client_wants_usage = request.wants_stream_usage();
    // A stream is asked for its usage: the log line, the token metrics and token limits count
    // it (without it, most SDK streams would count no tokens). The client gets the usage chunk
    // only if it asked for it.
    let strip_usage = stream && !client_wants_usage;
    if strip_usage {
        request.stream_options.get_or_insert_default().include_usage = Some(true);
    }
    let mut chain_tokens = None;
    let answer = match &endpoint {
        Endpoint::Route(route) if stream => route
            .chat_stream_body(request)
            .await
            .map(Answer::Stream)
            .map_err(ApiError::from),
        Endpoint::Route(route) => route
            .chat_body(request)
            .await
            .map(Answer::Body)
            .map_err(ApiError::from),
        Endpoint::Chain(chain) => {
            let meta = RequestMeta {
                endpoint: endpoint_name.clone(),
                request_id: request_id.clone(),
                api_key_id: key_id,
                user,
            };
            let ctx = ChainContext::new(chain.resources.clone(), meta);
            let output = run_chain(chain, &ctx, request).await;
            chain_tokens = Some(ctx);
            output.map(Answer::Chain)
        }
        Endpoint::Model(_) => {
            return Err(ApiError::internal("a model endpoint reached the chat path"));
        }
    };
    // What a chain's LLM calls used, whatever the chain reports or however it ends.
    let used_by_chain = || chain_tokens.as_ref().map_or(0, ChainContext::tokens_used);
    // What the request spent, given the usage its answer reported (`Some(0)` for a failure).
    let spent = |reported| Spent::of(reported, used_by_chain(), record.stats.maybe_generated());
    let answer = match answer {
        Ok(answer) => answer,
        Err(error) => {
            let error = error.with_headers(admission.take_headers());
            admission.settle(spent(Some(0)));
            return Err(error);
        }
    };
    if stream {
        let chunks = match answer {
            Answer::Stream(chunks) => chunks,
            Answer::Chain(output) => {
                let chunks = output.into_stream(client_wants_usage || strip_usage);
                Box::pin(chunks.map(|chunk| chunk.map(|chunk| ChunkBody::encode(&chunk))))
            }
            Answer::Body(_) => {
                admission.settle(Spent::Exactly(0));
                return Err(ApiError::internal("a complete body on the stream path"));
            }
        };
        let rate_limit_headers = admission.take_headers();
        record.update(|d| d.streamed = true);
        let log = StreamLog {
            record,
            state: state.clone(),
            logged: false,
            usage: None,
            admission: Some(admission),
            chain: chain_tokens,
            payload: logged_messages.map(|messages| (messages, String::new())),
        };
        let mut response = sse_body(chunks, log, strip_usage);
        response.headers_mut().extend(rate_limit_headers);
        Ok(response)
    } else {
        let logs_payload = logged_messages.is_some();
        let (body, text) = match answer {
            Answer::Body(body) => {
                let text = logs_payload.then(|| completion_text(&body));
                (body, text)
            }
            Answer::Stream(_) => {
                admission.settle(Spent::Exactly(0));
                return Err(ApiError::internal("a stream on the complete path"));
            }
            Answer::Chain(output) => match output.collect().await {
                Ok(completion) => (
                    CompletionBody::encode(&completion),
                    logs_payload.then(|| completion.text()),
                ),
                Err(error) => {
                    let error = ApiError::from(error).with_headers(admission.take_headers());
                    admission.settle(spent(Some(0)));
                    return Err(error);
                }
            },
        };
        let mut response = ([(CONTENT_TYPE, "application/json")], body.json).into_response();
        response.headers_mut().extend(admission.take_headers());
        admission.settle(spent(body.usage.as_ref().map(|u| u.total_tokens)));
        record.update(|d| {
            d.count_tokens(body.usage.as_ref(), chain_tokens.as_ref());
            d.payload = logged_messages.zip(text);
        });
        Ok(response)
    }
}

/// What a chat endpoint produced: a chain's output, or a route's answer as the upstream's JSON
/// (its complete body, or its stream's chunks), passed on without re-encoding.
enum Answer {
    Chain(ChainOutput),
    Body(CompletionBody),
    Stream(ChunkBodyStream),
}

/// The text of a completion body's first choice, for `log_payloads`.
fn completion_text(body: &CompletionBody) -> String {
    serde_json::from_slice::<ChatResponse>(&body.json)
        .map(|completion| completion.text())
        .unwrap_or_default()
}

/// Predictions expected to take less than this run on the async worker that received them.
const INLINE_BUDGET: std::time::Duration = std::time::Duration::from_micros(50);
/// Predictions expected to take up to this long run on blocking threads of their own (one per
/// core), not behind the large batches queued for the others.
const SMALL_BUDGET: std::time::Duration = std::time::Duration::from_millis(5);

/// Serves an MLflow scoring request on an ONNX model endpoint: `{"predictions": {...}}`. The
/// caller ([`invocations`]) has checked that the key may call it and recorded the endpoint.
async fn serve_model(
    state: &AppState,
    Authorized { snapshot, key }: Authorized,
    name: &str,
    model: Arc<OnnxModel>,
    request: ScoringRequest,
    headers: &HeaderMap,
    record: &RequestRecord,
) -> Result<Response, ApiError> {
    let user = user_header(headers);
    let key_id = key.as_ref().map(|k| k.id.clone());
    // The endpoint, its kind and the key are on the record already.
    record.update(|d| d.user.clone_from(&user));
    let caller = Caller {
        endpoint: name,
        api_key: key_id.as_deref(),
        user: user.as_deref(),
    };
    // A prediction uses no LLM tokens: only request rules count it.
    let rate_limit_headers = snapshot.limits.admit(&caller, None).await?.take_headers();
    drop(snapshot);
    match predict(state, model, request, record).await {
        Ok(json) => {
            let mut response = ([(CONTENT_TYPE, "application/json")], json).into_response();
            response.headers_mut().extend(rate_limit_headers);
            Ok(response)
        }
        Err(error) => Err(error.with_headers(rate_limit_headers)),
    }
}

/// A scoring request: read, or a large body (JSON or CSV) to read on a blocking thread.
enum ScoringRequest {
    Read { value: Value, csv: bool },
    Large { body: bytes::Bytes, csv: bool },
}

/// Bodies larger than this are read on a blocking thread, with the prediction and its answer:
/// parsing megabytes of JSON on the event loop stalled every other request of its thread (a
/// 24 MB batch held small requests for up to 0.97 s; BENCHMARKS.md).
const LARGE_BODY: usize = 256 * 1024;

/// A scoring body as JSON: CSV read as MLflow reads it, and JSON with Python's bare `NaN` and
/// `Infinity` (what MLflow's own helpers write) too.
fn scoring_value(body: &[u8], csv: bool, model: &OnnxModel) -> Result<Value, ApiError> {
    if csv {
        return mlflow_csv_input(body, model.inputs())
            .map_err(|e| ApiError::bad_request(e.to_string(), None));
    }
    parse_json(body).or_else(|error| match python_json(body) {
        Some(fixed) => parse_json(&fixed).map_err(|_| error),
        None => Err(error),
    })
}

impl ScoringRequest {
    /// The request's rows, one tensor per model input.
    fn batch(self, model: &OnnxModel) -> Result<Batch, ApiError> {
        let (value, csv) = match self {
            Self::Read { value, csv } => (value, csv),
            Self::Large { body, csv } => (scoring_value(&body, csv, model)?, csv),
        };
        // MLflow's codes: a body that is no scoring request is BAD_REQUEST, values that do not
        // fit the model's inputs INVALID_PARAMETER_VALUE (an error with a `param`).
        model.parse_input(&value).map_err(|e| match e {
            // A CSV body is read as the `dataframe_split` request pandas makes of it; its errors
            // name what the client sent.
            ServingError::Schema { format, message } if csv => ApiError::bad_request(
                message.replacen(format, "the CSV body", 1),
                Some("csv".to_owned()),
            ),
            ServingError::Schema { format, message } => {
                ApiError::bad_request(message, Some(format.to_owned()))
            }
            other => ApiError::bad_request(other.to_string(), None),
        })
    }
}

/// Runs an ONNX model on a scoring request; the answer's JSON.
async fn predict(
    state: &AppState,
    model: Arc<OnnxModel>,
    request: ScoringRequest,
    record: &RequestRecord,
) -> Result<Vec<u8>, ApiError> {
    if matches!(request, ScoringRequest::Large { .. }) {
        let request_id = record.request_id.clone();
        return on_blocking_thread(state, record, false, move || {
            let batch = request.batch(&model)?;
            model
                .predict(batch)
                .map(|predictions| predictions_json(&predictions))
                .map_err(|e| inference_error(e, &request_id))
        })
        .await?;
    }
    let batch = request.batch(&model)?;
    // Inference is CPU work. A prediction this model has shown to take under INLINE_BUDGET runs
    // right here: handing it to a blocking thread costs more than the work (a thread wake-up).
    // Anything else — the first call, large batches, slow models — runs on a blocking thread, one
    // per core at most, so a large batch never stalls chat traffic; one expected under
    // SMALL_BUDGET has slots of its own (one per core too), so it does not wait behind large
    // batches (8 batches of 3 s each held a 1-row prediction of another model for 11 s).
    let expected = model.expected_time(batch.rows());
    let result = if expected.is_some_and(|time| time <= INLINE_BUDGET) {
        // A panic in the model (tract's code included) is this request's 500, as on a blocking
        // thread, not a dropped connection.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.predict(batch))).map_err(
            |_| {
                ApiError::internal(format!(
                    "inference panicked (request id {})",
                    record.request_id
                ))
            },
        )?
    } else {
        let small = expected.is_some_and(|time| time <= SMALL_BUDGET);
        on_blocking_thread(state, record, small, move || model.predict(batch)).await?
    };
    result
        .map(|predictions| predictions_json(&predictions))
        .map_err(|e| inference_error(e, &record.request_id))
}

/// Runs `work` on a blocking thread, one per core at most (so that big batches also bound the
/// memory their parsing takes); `small` work has slots of its own.
async fn on_blocking_thread<T: Send + 'static>(
    state: &AppState,
    record: &RequestRecord,
    small: bool,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    let slot = state
        .inference_slots(small)
        .clone()
        .acquire_owned()
        .await
        .map_err(|e| ApiError::internal(format!("inference slots closed: {e}")))?;
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        work()
    })
    .await
    .map_err(|e| {
        ApiError::internal(format!(
            "inference task failed: {e} (request id {})",
            record.request_id
        ))
    })
}

/// `{"predictions": ...}`.
fn predictions_json(predictions: &serde_json::Map<String, Value>) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Answer<'a> {
        predictions: &'a serde_json::Map<String, Value>,
    }
    // Maps, strings and numbers: encoding cannot fail.
    serde_json::to_vec(&Answer { predictions }).unwrap_or_default()
}

fn inference_error(error: ServingError, request_id: &str) -> ApiError {
    match error {
        ServingError::BadInput(message) => ApiError::bad_request(message, None),
        other => ApiError::internal(format!("{other} (request id {request_id})")),
    }
}

/// The end user: the `x-switchyard-user` header, else the OpenAI `user` field.
fn end_user(headers: &HeaderMap, request: &ChatRequest) -> Option<String> {
    // `safety_identifier` is OpenAI's successor to `user`.
    let field = |name| request.extra.get(name).and_then(Value::as_str);
    user_header(headers).or_else(|| {
        field("user")
            .or_else(|| field("safety_identifier"))
            .map(str::to_owned)
    })
}

/// The `x-switchyard-user` header as text: UTF-8 (a name like "José" is not ASCII), with any
/// invalid bytes replaced, so that no user falls into the bucket of requests without one.
fn user_header(headers: &HeaderMap) -> Option<String> {
    headers
        .get(USER)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// Runs a chain. A chain that fails or panics (while answering or while streaming) becomes an
/// error for this request only; the gateway keeps serving.
async fn run_chain(
    endpoint: &ChainEndpoint,
    ctx: &ChainContext,
    request: ChatRequest,
) -> Result<ChainOutput, ApiError> {
    let chain_name = endpoint.resources.chain.clone();
    let request_id = ctx.meta().request_id.clone();
    let outcome = AssertUnwindSafe(endpoint.chain.invoke(ctx, request))
        .catch_unwind()
        .await;
    match outcome {
        Ok(Ok(ChainOutput::Stream(stream))) => {
            let (chain, id) = (chain_name.clone(), request_id.clone());
            let guarded = AssertUnwindSafe(stream).catch_unwind().map(move |item| {
                item.unwrap_or_else(|panic| {
                    // What panicked goes to the log; the client gets the request id to ask with.
                    let message = panic_message(&*panic);
                    error!(request_id = %id, chain = %chain, panic = %message, "chain panicked while streaming");
                    Err(LlmError::new(
                        LlmErrorKind::StreamInterrupted,
                        format!("chain '{chain}' panicked while streaming (request id {id})"),
                    ))
                })
            });
            Ok(ChainOutput::Stream(Box::pin(guarded)))
        }
        Ok(Ok(output)) => Ok(output),
        Ok(Err(error)) => {
            warn!(request_id = %request_id, chain = %chain_name, step = %error.step, error = %error.kind, "chain failed");
            Err(ApiError::from_chain(error, &chain_name, &request_id))
        }
        Err(panic) => {
            let message = panic_message(&*panic);
            error!(request_id = %request_id, chain = %chain_name, panic = %message, "chain panicked");
            Err(ApiError::internal(format!(
                "chain '{chain_name}' panicked (request id {request_id}; the gateway's log has \
                 what happened)"
            )))
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

/// What the stream needs to log, measure and settle when it ends. A stream the client abandons
/// is dropped unfinished, and logs and settles itself as such.
struct StreamLog {
    record: Arc<RequestRecord>,
    state: AppState,
    logged: bool,
    usage: Option<Usage>,
    admission: Option<Admission>,
    /// A chain's context, for the tokens its LLM calls used.
    chain: Option<ChainContext>,
    /// Messages and the completion so far, for endpoints with `log_payloads`.
    payload: Option<(String, String)>,
}

impl StreamLog {
    fn finish(&mut self, outcome: &str) {
        self.logged = true;
        if let Some(admission) = self.admission.take() {
            // A stream without its usage chunk (it broke off) keeps its estimate; a chain
            // counts at least what its LLM calls used.
            admission.settle(Spent::of(
                self.usage.as_ref().map(|u| u.total_tokens),
                self.chain.as_ref().map_or(0, ChainContext::tokens_used),
                self.record.stats.maybe_generated(),
            ));
        }
        let payload = self.payload.take();
        self.record.update(|d| {
            d.count_tokens(self.usage.as_ref(), self.chain.as_ref());
            d.payload = payload;
        });
        self.record.finish(&self.state, 200, outcome);
    }
}

impl Drop for StreamLog {
    fn drop(&mut self) {
        if !self.logged {
            let outcome = self.state.unfinished_outcome();
            self.finish(outcome);
        }
    }
}

enum Phase {
    Streaming(ChunkBodyStream),
    /// An error frame went out; `[DONE]` follows.
    Closing,
    Done,
}

/// At most this many events go into one write to the client.
const MAX_GATHERED: usize = 16;
/// Turns the upstream connection's task is given to hand over a chunk it has already received
/// (hyper's HTTP/1 client takes two: measured, one was never enough).
const GATHER_TURNS: usize = 2;

/// The SSE body of a stream: chunks become `data:` events, and it always ends with
/// `data: [DONE]`, after an error event in OpenAI's shape if the upstream broke off. With
/// `strip_usage`, the usage chunk the gateway asked for (to settle token limits) is noted and
/// not sent on.
///
/// The first event is written at once (time to first token). After it, events the upstream has
/// already sent are gathered into one write: the upstream connection's task hands its chunks
/// over one at a time, so without turns for it between two events every event was its own
/// `writev` and woke the client once (20 per proxied stream of 16 chunks). An event that is not
/// there yet costs those turns (a few microseconds) and goes out with what was gathered.
fn sse_body(chunks: ChunkBodyStream, log: StreamLog, strip_usage: bool) -> Response {
    let events = SseEvents {
        phase: Phase::Streaming(chunks),
        cut_off: Box::pin(log.state.cut_off()),
        log,
        strip_usage,
        started: false,
    };
    let frames = stream::unfold(events, |mut events| async move {
        let mut frame = String::new();
        if !events.next(&mut frame, true).await {
            return None;
        }
        if events.started {
            'gather: for _ in 1..MAX_GATHERED {
                for _ in 0..GATHER_TURNS {
                    yield_once().await;
                    // `next` only waits for the upstream's next chunk: dropping it then loses
                    // nothing.
                    match events.next(&mut frame, false).now_or_never() {
                        Some(true) => continue 'gather,
                        Some(false) => break 'gather,
                        None => {}
                    }
                }
                break;
            }
        }
        events.started = true;
        Some((Ok::<_, Infallible>(frame), events))
    });
    (
        [
            (CONTENT_TYPE, "text/event-stream"),
            (CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(frames),
    )
        .into_response()
}

struct SseEvents {
    phase: Phase,
    /// The shutdown's deadline: the stream then ends with an error frame and `[DONE]`.
    cut_off: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    log: StreamLog,
    strip_usage: bool,
    /// Whether the first event went out.
    started: bool,
}

impl SseEvents {
    /// Appends the next event to `frame`; false once the stream has ended. With `waiting`, also
    /// ends the stream at the shutdown's cut-off (a look that takes two locks: not done for the
    /// events gathered without waiting, which the next wait follows anyway).
    async fn next(&mut self, frame: &mut String, waiting: bool) -> bool {
        let chunks = match &mut self.phase {
            Phase::Done => return false,
            Phase::Closing => {
                self.phase = Phase::Done;
                push_event(frame, "[DONE]");
                return true;
            }
            Phase::Streaming(chunks) => chunks,
        };
        loop {
            let next = tokio::select! {
                biased;
                next = chunks.next() => next,
                () = self.cut_off.as_mut(), if waiting => {
                    self.log.finish("shutdown");
                    push_event(frame, &ApiError::cut_off_by_shutdown().openai_body().to_string());
                    self.phase = Phase::Closing;
                    return true;
                }
            };
            match next {
                Some(Ok(chunk)) => {
                    if let Some((_, completion)) = self.log.payload.as_mut() {
                        completion.push_str(&chunk.text());
                    }
                    if let Some(usage) = chunk.usage {
                        self.log.usage = Some(usage);
                        if self.strip_usage && !chunk.has_choices {
                            continue;
                        }
                    }
                    push_event(frame, &chunk.json);
                    return true;
                }
                Some(Err(error)) => {
                    let reason = match error.kind {
                        LlmErrorKind::Timeout => "timeout",
                        _ => "upstream_error",
                    };
                    warn!(request_id = %self.log.record.request_id, %error, reason, "stream ended by an upstream error");
                    let details = self.log.record.details();
                    let endpoint = details.endpoint.as_deref().unwrap_or("");
                    self.log
                        .state
                        .metrics()
                        .stream_error(endpoint, details.kind, reason);
                    self.log.finish(reason);
                    push_event(frame, &ApiError::from(error).openai_body().to_string());
                    self.phase = Phase::Closing;
                    return true;
                }
                None => {
                    self.log.finish("ok");
                    push_event(frame, "[DONE]");
                    self.phase = Phase::Done;
                    return true;
                }
            }
        }
    }
}

/// Appends one SSE event with `data` (a `data:` line per line of it).
fn push_event(frame: &mut String, data: &str) {
    for line in data.split('\n') {
        frame.push_str("data: ");
        frame.push_str(line.strip_suffix('\r').unwrap_or(line));
        frame.push('\n');
    }
    frame.push('\n');
}

/// Lets the thread's other ready tasks run once (a plain wake: `tokio::task::yield_now` waits
/// for an I/O poll too, one more system call).
async fn yield_once() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            std::task::Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await;
}

/// The endpoints the caller's key may call, in config order (401 without a valid key).
fn visible_endpoints<'s>(
    snapshot: &'s Snapshot,
    headers: &HeaderMap,
    record: &RequestRecord,
) -> Result<impl Iterator<Item = (&'s str, &'s Endpoint)>, ApiError> {
    let key = auth::authenticate(&snapshot.keys, headers)?.cloned();
    record.update(|d| d.key_id = key.as_ref().map(|k| k.id.clone()));
    Ok(snapshot.endpoint_order.iter().filter_map(move |name| {
        auth::check_endpoint(key.as_deref(), name).ok()?;
        Some((name.as_str(), snapshot.endpoints.get(name)?))
    }))
}

/// One endpoint the caller's key may call; 404 also for one it may not, as lists leave it out.
fn visible_endpoint<'s>(
    snapshot: &'s Snapshot,
    headers: &HeaderMap,
    record: &RequestRecord,
    name: &str,
) -> Result<&'s Endpoint, ApiError> {
    let key = auth::authenticate(&snapshot.keys, headers)?;
    record.update(|d| d.key_id = key.map(|k| k.id.clone()));
    match snapshot.endpoints.get(name) {
        Some(endpoint) if auth::check_endpoint(key.map(|k| &**k), name).is_ok() => Ok(endpoint),
        _ => Err(ApiError::unknown_model(name)),
    }
}

/// `GET /v1/models`: the endpoints the caller may use, in OpenAI's list format.
pub async fn list_models(
    State(state): State<AppState>,
    Extension(record): Extension<Arc<RequestRecord>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let snapshot = state.snapshot();
    let data: Vec<_> = visible_endpoints(&snapshot, &headers, &record)?
        .map(|(name, _)| model_object(name, snapshot.loaded_at))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

/// `GET /v1/models/{model}` (the OpenAI SDK's `models.retrieve`).
pub async fn retrieve_model(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Extension(record): Extension<Arc<RequestRecord>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let snapshot = state.snapshot();
    visible_endpoint(&snapshot, &headers, &record, &name)?;
    Ok(Json(model_object(&name, snapshot.loaded_at)))
}

/// `GET /api/2.0/endpoints/` (MLflow's deployments client: `list_endpoints`): every endpoint the
/// caller's key may call, in one page.
pub async fn mlflow_endpoints(
    State(state): State<AppState>,
    Extension(record): Extension<Arc<RequestRecord>>,
    headers: HeaderMap,
) -> Result<Json<Value>, MlflowError> {
    let snapshot = state.snapshot();
    let endpoints: Vec<Value> = visible_endpoints(&snapshot, &headers, &record)?
        .map(|(name, endpoint)| mlflow_endpoint(name, endpoint))
        .collect();
    Ok(Json(json!({"endpoints": endpoints})))
}

/// `GET /api/2.0/endpoints/{name}` (MLflow's deployments client: `get_endpoint`).
pub async fn mlflow_get_endpoint(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Extension(record): Extension<Arc<RequestRecord>>,
    headers: HeaderMap,
) -> Result<Json<Value>, MlflowError> {
    let snapshot = state.snapshot();
    let endpoint = visible_endpoint(&snapshot, &headers, &record, &name)?;
    Ok(Json(mlflow_endpoint(&name, endpoint)))
}

/// An endpoint as MLflow's AI gateway describes one: chat endpoints are `llm/v1/chat` (a
/// route's model is its first target's), an ONNX model `model/v1/predict` (a type MLflow's
/// gateway does not have: its scoring protocol, at the same URL).
fn mlflow_endpoint(name: &str, endpoint: &Endpoint) -> Value {
    let (endpoint_type, model, provider) = match endpoint {
        Endpoint::Route(route) => {
            let first = route.targets().first();
            (
                "llm/v1/chat",
                first.map(|t| t.model.clone()),
                first.map_or_else(String::new, |t| t.provider_name.clone()),
            )
        }
        Endpoint::Chain(chain) => (
            "llm/v1/chat",
            Some(chain.resources.chain.clone()),
            "switchyard-chain".to_owned(),
        ),
        Endpoint::Model(_) => ("model/v1/predict", None, "onnx".to_owned()),
    };
    json!({
        "name": name,
        "endpoint_type": endpoint_type,
        "model": {"name": model, "provider": provider},
        "endpoint_url": format!("/endpoints/{name}/invocations"),
        "limit": null,
    })
}

/// An endpoint as OpenAI describes a model.
fn model_object(name: &str, created: u64) -> Value {
    json!({"id": name, "object": "model", "created": created, "owned_by": "switchyard"})
}

pub async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Ready once the config is loaded and every endpoint built, which [`crate::Gateway::new`]
/// guarantees before the server starts.
pub async fn ready(State(state): State<AppState>) -> Json<serde_json::Value> {
    let snapshot = state.snapshot();
    let limiter = if snapshot.limits.probe_degraded().await {
        "degraded"
    } else {
        "ok"
    };
    Json(json!({"status": "ready", "endpoints": snapshot.endpoints.len(), "rate_limiter": limiter}))
}

/// Paths of MLflow's APIs (scoring and deployments), whose errors come in MLflow's shape.
fn is_mlflow_path(path: &str) -> bool {
    path.starts_with("/endpoints/") || path.starts_with("/api/2.0/")
}

pub async fn not_found(uri: Uri) -> Response {
    let error = ApiError::not_found_path(uri.path());
    if is_mlflow_path(uri.path()) {
        MlflowError(error).into_response()
    } else {
        error.into_response()
    }
}

/// A method a path does not serve: 405, in MLflow's shape under MLflow's paths.
pub async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let error = ApiError::method_not_allowed(&method, uri.path());
    if is_mlflow_path(uri.path()) {
        MlflowError(error).into_response()
    } else {
        error.into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::push_event;

    #[test]
    fn an_event_gets_a_data_line_per_line_of_its_data() {
        let mut frame = String::new();
        push_event(&mut frame, r#"{"a":1}"#);
        push_event(&mut frame, "{\"b\":\r\n2}");
        push_event(&mut frame, "[DONE]");
        assert_eq!(
            frame,
            "data: {\"a\":1}\n\ndata: {\"b\":\ndata: 2}\n\ndata: [DONE]\n\n"
        );
    }
}
