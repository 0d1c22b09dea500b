//! One structured log line per request, and the request metrics.
//!
//! The middleware creates a [`RequestRecord`] for every request, puts it in the request's
//! extensions and runs the handler inside its [`RequestStats`] scope, so routes account their
//! upstream time, retries and fallbacks to it. Handlers fill in what only they know (endpoint,
//! key id, user, tokens). The middleware logs and measures when the response is ready; a
//! streamed response is logged and measured by its stream when the stream ends, so the line
//! carries the whole duration and how the stream finished.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TraceId};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use switchyard_core::{ChainContext, RequestStats, Usage};
use tracing::{Instrument, info, info_span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::AppState;

/// Everything known about one request, shared by the middleware, the handler and the stream.
#[derive(Debug)]
pub struct RequestRecord {
    pub start: Instant,
    pub request_id: String,
    pub method: String,
    pub path: String,
    pub stats: Arc<RequestStats>,
    details: Mutex<Details>,
    /// The request's span when traces are exported: kept here so that it lasts as long as the
    /// request does (a stream's until its end) and gets its outcome.
    span: Option<tracing::Span>,
}

/// What the handler learns while serving.
#[derive(Debug, Clone, Default)]
pub struct Details {
    /// A configured endpoint (never a name a client made up).
    pub endpoint: Option<String>,
    /// `route` or `chain`.
    pub kind: &'static str,
    pub key_id: Option<String>,
    pub user: Option<String>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// The client asked for a stream (the log line's `stream`, also when it failed before
    /// streaming).
    pub stream: bool,
    /// The stream logs the request itself when it ends.
    pub streamed: bool,
    /// The request's messages (JSON) and the completion, for endpoints with `log_payloads`.
    pub payload: Option<(String, String)>,
}

impl Details {
    /// The request's tokens: what its answer reported or, for a chain whose LLM calls reported
    /// more in all (its answer may report its last call only), what they did — the larger total
    /// is what token limits settle too. Nothing if neither reported any.
    pub fn count_tokens(&mut self, reported: Option<&Usage>, chain: Option<&ChainContext>) {
        let used = chain
            .map(ChainContext::usage)
            .filter(|u| u.total_tokens > 0 || u.prompt_tokens > 0 || u.completion_tokens > 0);
        let usage = match (reported, &used) {
            (None, None) => return,
            (Some(usage), None) | (None, Some(usage)) => usage,
            (Some(reported), Some(used)) if used.total_tokens > reported.total_tokens => used,
            (Some(reported), Some(_)) => reported,
        };
        self.prompt_tokens = Some(usage.prompt_tokens);
        self.completion_tokens = Some(usage.completion_tokens);
    }
}

impl RequestRecord {
    pub fn update(&self, change: impl FnOnce(&mut Details)) {
        change(&mut self.details.lock().unwrap_or_else(PoisonError::into_inner));
    }

    pub fn details(&self) -> Details {
        self.details
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Writes the request's metrics and its log line, with the time until now, and gives its
    /// span (if traced) its outcome.
    pub fn finish(&self, state: &AppState, status: u16, outcome: &str) {
        let details = self.details();
        let elapsed = self.start.elapsed();
        self.trace(&details, status, Some(outcome));
        self.count(state, &details, status, elapsed);
        self.log(&details, status, outcome, elapsed);
    }

    /// Records the request's attributes on its span, if it is traced: an error status for a
    /// 5xx, or for a stream that broke off, timed out or was cut off by the shutdown after its
    /// 200 (not for a client that left).
    fn trace(&self, details: &Details, status: u16, outcome: Option<&str>) {
        let Some(span) = &self.span else {
            return;
        };
        span.record("http.request.method", self.method.as_str());
        span.record("url.path", self.path.as_str());
        // An integer attribute (tracing-opentelemetry exports unsigned values as strings).
        span.record("http.response.status_code", i64::from(status));
        if let Some(endpoint) = &details.endpoint {
            span.record("endpoint", endpoint.as_str());
        }
        if let Some(outcome) = outcome {
            span.record("outcome", outcome);
        }
        if status >= 500 || matches!(outcome, Some("upstream_error" | "timeout" | "shutdown")) {
            span.record("otel.status_code", "error");
        }
        // The exported span ends when it was last exited (tracing-opentelemetry), not when it
        // closes: a stream's ends now.
        span.in_scope(|| {});
    }

    /// The request's metrics.
    fn count(&self, state: &AppState, details: &Details, status: u16, elapsed: Duration) {
        if is_chat_path(&self.path) {
            let endpoint = details.endpoint.as_deref().unwrap_or("");
            let metrics = state.metrics();
            metrics.request(endpoint, details.kind, status, elapsed);
            if let (Some(prompt), Some(completion)) =
                (details.prompt_tokens, details.completion_tokens)
            {
                metrics.tokens(endpoint, details.kind, prompt, completion);
            }
        }
    }

    /// The request's log line.
    fn log(&self, details: &Details, status: u16, outcome: &str, elapsed: Duration) {
        info!(
            request_id = self.request_id.as_str(),
            method = self.method.as_str(),
            path = self.path.as_str(),
            endpoint = details.endpoint.as_deref().unwrap_or(""),
            key_id = details.key_id.as_deref().unwrap_or(""),
            user = &*fit_for_a_log_line(details.user.as_deref().unwrap_or("")),
            status,
            stream = details.stream,
            outcome,
            latency_ms = millis(elapsed),
            upstream_ms = millis(self.stats.upstream()),
            queue_ms = (!self.stats.queue().is_zero()).then(|| millis(self.stats.queue())),
            retries = self.stats.retries(),
            fallbacks = self.stats.fallbacks(),
            prompt_tokens = details.prompt_tokens,
            completion_tokens = details.completion_tokens,
            messages = details.payload.as_ref().map(|p| p.0.as_str()),
            completion = details.payload.as_ref().map(|p| p.1.as_str()),
            "request"
        );
    }
}

fn is_chat_path(path: &str) -> bool {
    path == "/v1/chat/completions"
        || (path.starts_with("/endpoints/") && path.ends_with("/invocations"))
}

pub async fn log_request(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let start = Instant::now();
    // The client's `x-request-id` if it is fit to go into log lines, else one of ours; the
    // response carries it either way.
    let (request_id, request_id_header) = match request.headers().get(REQUEST_ID) {
        Some(id) if fits_a_log_line(id.as_bytes()) => (
            String::from_utf8_lossy(id.as_bytes()).into_owned(),
            id.clone(),
        ),
        _ => {
            let id = uuid::Uuid::new_v4().hyphenated().to_string();
            let header = HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("-"));
            (id, header)
        }
    };
    // The request's span: chain steps and upstream calls are its children in a trace, and log
    // lines written inside it start with `request{request_id="…"}`. The fields only a trace
    // reads are declared only when traces are exported: the log layer visits every field a
    // span is made with.
    let traced = state.exports_traces();
    let span = if traced {
        info_span!(
            "request",
            request_id = request_id.as_str(),
            "http.request.method" = tracing::field::Empty,
            "url.path" = tracing::field::Empty,
            endpoint = tracing::field::Empty,
            "http.response.status_code" = tracing::field::Empty,
            outcome = tracing::field::Empty,
            // Read by the OpenTelemetry layer when the span is made (log lines leave `otel.*`
            // fields out).
            "otel.kind" = "server",
            "otel.status_code" = tracing::field::Empty,
        )
    } else {
        info_span!("request", request_id = request_id.as_str())
    };
    // A caller's W3C `traceparent` makes the request part of its trace.
    if traced && request.headers().contains_key(TRACEPARENT) {
        let parent = TraceContextPropagator::new().extract(&Headers(request.headers()));
        // An unreadable traceparent yields no parent, and the request starts its own trace.
        let _ = span.set_parent(parent);
    }
    let record = Arc::new(RequestRecord {
        start,
        request_id,
        method: request.method().to_string(),
        path: request.uri().path().to_owned(),
        stats: Arc::new(RequestStats::default()),
        details: Mutex::new(Details::default()),
        span: traced.then(|| span.clone()),
    });
    request.extensions_mut().insert(record.clone());
    // A client that hangs up drops this future mid-way: the guard still logs and counts it.
    let mut unfinished = Unfinished {
        record: Some(record.clone()),
        state: state.clone(),
    };
    let mut response = RequestStats::scope(record.stats.clone(), next.run(request))
        .instrument(span.clone())
        .await;
    response
        .headers_mut()
        .entry(REQUEST_ID)
        .or_insert(request_id_header);
    let details = record.details();
    let status = response.status().as_u16();
    let outcome = match status {
        200..=299 => "ok",
        429 => "rate_limited",
        _ => "error",
    };
    // A trace gets the request's attributes (a stream's outcome when it ends), and the response
    // says which trace to look for.
    let trace_id = if traced {
        span.context().span().span_context().trace_id()
    } else {
        TraceId::INVALID
    };
    if trace_id != TraceId::INVALID {
        record.trace(&details, status, (!details.streamed).then_some(outcome));
        if let Ok(value) = HeaderValue::from_str(&trace_id.to_string()) {
            response.headers_mut().insert("x-trace-id", value);
        }
    }
    // What the gateway added: time to the response, minus the time spent waiting on upstreams
    // (for a stream, that is until its first chunk).
    let elapsed = record.start.elapsed();
    if let Some(endpoint) = &details.endpoint {
        let overhead = elapsed.saturating_sub(record.stats.upstream());
        state.metrics().overhead(endpoint, details.kind, overhead);
    }
    unfinished.record = None;
    if !details.streamed {
        record.count(&state, &details, status, elapsed);
        // Formatting the log line is the larger part of this work: it is done once the response
        // is on its way (the metrics are counted before, so a client that reads /metrics next
        // finds its request there).
        state.after_response(move || record.log(&details, status, outcome, elapsed));
    }
    response
}

/// Writes the trace context of an upstream call's span into its request (W3C `traceparent`),
/// for [`switchyard_providers::HttpClient::trace_calls`]: the provider's own spans, if it
/// traces, become children of the gateway's.
pub(crate) fn write_traceparent(span: &tracing::Span, headers: &mut axum::http::HeaderMap) {
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeadersMut(headers));
}

struct HeadersMut<'a>(&'a mut axum::http::HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        // Upstreams (public APIs too) get the ids only: `tracestate` would carry the caller's
        // vendor data to them (and an empty one is not to be sent).
        if key != TRACEPARENT.as_str() {
            return;
        }
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(key), HeaderValue::try_from(value)) {
            self.0.insert(name, value);
        }
    }
}

/// A request's headers as OpenTelemetry's propagators read them.
struct Headers<'a>(&'a axum::http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// Logs a request whose handler was dropped before it answered: the client went away (nginx's
/// 499), or the shutdown's deadline closed the connection (503).
struct Unfinished {
    record: Option<Arc<RequestRecord>>,
    state: AppState,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(record) = self.record.take() {
            let status = if self.state.is_cut_off() { 503 } else { 499 };
            record.finish(&self.state, status, self.state.unfinished_outcome());
        }
    }
}

/// The request id's header. Header names are constants on the request path: looking one up by
/// `&str` parses the name on every call.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// W3C Trace Context's header.
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The longest `x-request-id` of a client's that is kept.
const MAX_REQUEST_ID: usize = 128;

/// Whether a client's `x-request-id` may go into log lines as it is: 1 to [`MAX_REQUEST_ID`]
/// printable ASCII characters.
fn fits_a_log_line(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID).contains(&id.len()) && id.iter().all(|b| (b' '..=b'~').contains(b))
}

/// The longest end-user name a log line quotes whole.
const MAX_LOGGED_USER: usize = 256;

/// `user` as a log line quotes it: a name from a client (a header, or the `user` field of a
/// body of up to `max_body_bytes`) is cut at [`MAX_LOGGED_USER`] bytes, marked with `…`.
fn fit_for_a_log_line(user: &str) -> std::borrow::Cow<'_, str> {
    if user.len() <= MAX_LOGGED_USER {
        return user.into();
    }
    let mut end = MAX_LOGGED_USER;
    while !user.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &user[..end]).into()
}

pub fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_user_names_are_cut_for_log_lines() {
        assert_eq!(fit_for_a_log_line("alice"), "alice");
        let long = "é".repeat(200);
        let cut = fit_for_a_log_line(&long);
        assert_eq!(cut, format!("{}…", "é".repeat(128)));
        assert_eq!(fit_for_a_log_line(&"x".repeat(256)), "x".repeat(256));
    }
}
