//! One structured log line per request.
//!
//! The middleware times every request and logs it when the response is ready. Handlers add what
//! only they know (endpoint, time spent waiting on the upstream) as a [`RequestInfo`] response
//! extension. A streamed response is logged by its stream when the stream ends, so the line
//! carries the whole duration and how the stream finished.

use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use tracing::info;

/// When the gateway received the request; put in request extensions for handlers.
#[derive(Debug, Clone, Copy)]
pub struct RequestStart(pub Instant);

/// What a handler reports about the request it served.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    pub endpoint: String,
    pub upstream: Duration,
    /// The stream logs the request itself when it ends.
    pub streamed: bool,
}

pub async fn log_request(mut request: Request, next: Next) -> Response {
    let start = Instant::now();
    request.extensions_mut().insert(RequestStart(start));
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let request_id = request_id(request.headers());
    let response = next.run(request).await;
    let info = response.extensions().get::<RequestInfo>();
    if info.is_some_and(|i| i.streamed) {
        return response;
    }
    info!(
        request_id = %request_id,
        %method,
        path = %path,
        endpoint = info.map_or("", |i| i.endpoint.as_str()),
        status = response.status().as_u16(),
        latency_ms = millis(start.elapsed()),
        upstream_ms = info.map_or(0.0, |i| millis(i.upstream)),
        "request"
    );
    response
}

/// The `x-request-id` the request-id layer set (or the client sent).
pub fn request_id(headers: &axum::http::HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned()
}

pub fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1_000_000.0).round() / 1000.0
}
