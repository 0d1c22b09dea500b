//! The one place where failures become HTTP responses.
//!
//! `/v1/*` answers in OpenAI's error shape `{"error":{"message","type","param","code"}}`, so any
//! OpenAI SDK raises the matching exception. Upstream failures are classified by who is at fault:
//! a client error the upstream reported (400, 404, 422…) is passed on with its status; an outage,
//! a bad answer or a broken stream is 502; a deadline is 504.

use std::borrow::Cow;
use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use switchyard_core::{ChainError, ChainErrorKind, LlmError, LlmErrorKind};

/// An error answer of the gateway.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `rate_limit_error`, `api_error`, …
    pub error_type: &'static str,
    pub code: Option<Cow<'static, str>>,
    /// The request field at fault, e.g. `messages[0].role`.
    pub param: Option<String>,
    pub retry_after: Option<Duration>,
    /// Extra response headers (rate-limit state on a 429); boxed, as most errors have none.
    pub headers: Option<Box<Vec<(http::HeaderName, HeaderValue)>>>,
}

impl ApiError {
    fn new(status: StatusCode, error_type: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            error_type,
            code: None,
            param: None,
            retry_after: None,
            headers: None,
        }
    }

    /// Adds response headers: the rate-limit state of a request that was admitted, then failed.
    pub fn with_headers(mut self, headers: Vec<(http::HeaderName, HeaderValue)>) -> Self {
        if !headers.is_empty() {
            self.headers.get_or_insert_default().extend(headers);
        }
        self
    }

    fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(Cow::Borrowed(code));
        self
    }

    pub fn bad_request(message: impl Into<String>, param: Option<String>) -> Self {
        Self {
            param,
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    pub fn unknown_model(name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{name}` does not exist: no endpoint has that name (GET /v1/models lists them)"),
        )
        .with_code("model_not_found")
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
            .with_code("invalid_api_key")
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "invalid_request_error", message)
            .with_code("endpoint_not_allowed")
    }

    /// A request a rate limit refused.
    pub fn rate_limited(message: impl Into<String>, retry_after: Duration) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
                .with_code("rate_limit_exceeded")
        }
    }

    /// The rate limiter's store is down and the policy is to deny.
    pub fn limiter_unavailable(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(Duration::from_secs(1)),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "api_error", message)
                .with_code("rate_limiter_unavailable")
        }
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!(
                "request body is larger than the gateway's limit of {limit} bytes ([server] max_body_bytes)"
            ),
        )
        .with_code("request_too_large")
    }

    /// A request whose body was still arriving when the gateway began to shut down.
    pub fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_error",
            "the gateway is shutting down and the request body had not arrived yet: send it again",
        )
        .with_code("shutting_down")
    }

    /// A stream still running when the shutdown's deadline (`shutdown_timeout_ms`) passed.
    pub fn cut_off_by_shutdown() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_error",
            "the gateway is shutting down and could not wait for the end of this stream: send the request again",
        )
        .with_code("shutting_down")
    }

    /// A request body that did not arrive in time (`[server] client_timeout_ms`).
    pub fn request_timeout(timeout: Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!(
                "the request body did not arrive within {} ms",
                timeout.as_millis()
            ),
        )
        .with_code("request_timeout")
    }

    /// A bug on our side (a chain that failed or panicked). The message carries the request id
    /// so the operator can find the log line.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
            .with_code("internal_error")
    }

    /// A chain's failure: upstream step failures keep the upstream classification (502/504/…),
    /// bad client input is 400, anything else is a 500 naming the step and the request id, not
    /// the error: a template's error quotes its source (the prompt), a chain's own error may
    /// hold anything. The caller logs it.
    pub fn from_chain(error: ChainError, chain: &str, request_id: &str) -> Self {
        let step = error.step;
        match error.kind {
            ChainErrorKind::Llm(llm) => {
                let mut api = Self::from(llm);
                api.message = format!("chain '{chain}' step '{step}': {}", api.message);
                // A field the upstream named is one of the chain's own request, not the client's.
                api.param = None;
                api
            }
            ChainErrorKind::InvalidRequest(message) => Self::bad_request(
                format!("chain '{chain}' cannot serve this request: {message}"),
                None,
            ),
            ChainErrorKind::Template(_) | ChainErrorKind::Internal(_) => Self::internal(format!(
                "chain '{chain}' failed in step '{step}' (request id {request_id}; the gateway's \
                 log has the error)"
            )),
        }
    }

    pub fn not_found_path(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("no such path: {path}"),
        )
        .with_code("unknown_url")
    }

    /// A body of a media type the path does not take.
    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            message,
        )
        .with_code("unsupported_media_type")
    }

    pub fn method_not_allowed(method: &http::Method, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("{method} is not allowed on {path}"),
        )
        .with_code("method_not_allowed")
    }

    /// The JSON body of this error in OpenAI's shape.
    pub fn openai_body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

/// MLflow's `error_code` for a status, as the MLflow scoring server and gateway use them.
fn mlflow_error_code(error: &ApiError) -> &'static str {
    match error.status.as_u16() {
        400 if error.param.is_some() => "INVALID_PARAMETER_VALUE",
        400 | 405 | 408 | 413 | 415 => "BAD_REQUEST",
        404 => "RESOURCE_DOES_NOT_EXIST",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        429 => "REQUEST_LIMIT_EXCEEDED",
        502 | 503 => "TEMPORARILY_UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "INTERNAL_ERROR",
    }
}

/// An [`ApiError`] answered in MLflow's shape `{"error_code": ..., "message": ...}`, for
/// `/endpoints/{name}/invocations`.
#[derive(Debug)]
pub struct MlflowError(pub ApiError);

impl From<ApiError> for MlflowError {
    fn from(error: ApiError) -> Self {
        Self(error)
    }
}

impl IntoResponse for MlflowError {
    fn into_response(self) -> Response {
        let body = json!({"error_code": mlflow_error_code(&self.0), "message": self.0.message});
        let mut response = (self.0.status, Json(body)).into_response();
        if let Some(value) = retry_after_header(self.0.retry_after) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        for (name, value) in self.0.headers.into_iter().flat_map(|h| *h) {
            response.headers_mut().insert(name, value);
        }
        response
    }
}

/// `Retry-After` in whole seconds, rounded up, so a client that waits this long is not refused
/// again.
fn retry_after_header(after: Option<Duration>) -> Option<HeaderValue> {
    let after = after?;
    let seconds = after.as_secs() + u64::from(after.subsec_nanos() > 0);
    HeaderValue::from_str(&seconds.to_string()).ok()
}

impl From<LlmError> for ApiError {
    fn from(error: LlmError) -> Self {
        let message = error.message;
        match error.kind {
            LlmErrorKind::Timeout => Self::new(StatusCode::GATEWAY_TIMEOUT, "api_error", message)
                .with_code("upstream_timeout"),
            LlmErrorKind::Status {
                status: 429,
                retry_after,
            } => Self {
                // Clients always get a Retry-After with a 429, even when the upstream sent none.
                retry_after: Some(retry_after.unwrap_or(Duration::from_secs(1))),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
                    .with_code("upstream_rate_limited")
            },
            // The client's request was at fault: pass the upstream's verdict on, with the field
            // at fault and the code it named.
            LlmErrorKind::Status {
                status: status @ (400 | 404 | 413 | 422),
                ..
            } => Self {
                param: error.param,
                code: error.code.map(Cow::Owned),
                ..Self::new(
                    StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                    "invalid_request_error",
                    message,
                )
            },
            LlmErrorKind::BadRequest | LlmErrorKind::Unsupported => Self {
                param: error.param,
                ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
            },
            LlmErrorKind::Overloaded => Self {
                retry_after: Some(Duration::from_secs(1)),
                ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "api_error", message)
                    .with_code("provider_overloaded")
            },
            // 401/403 from an upstream mean the gateway's provider credentials are wrong, which is
            // not the client's fault; everything else is an upstream failure.
            LlmErrorKind::Status { .. }
            | LlmErrorKind::Connect
            | LlmErrorKind::InvalidResponse
            | LlmErrorKind::StreamInterrupted => {
                Self::new(StatusCode::BAD_GATEWAY, "api_error", message).with_code("upstream_error")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.openai_body())).into_response();
        if let Some(value) = retry_after_header(self.retry_after) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        for (name, value) in self.headers.into_iter().flat_map(|h| *h) {
            response.headers_mut().insert(name, value);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(kind: LlmErrorKind) -> StatusCode {
        ApiError::from(LlmError::new(kind, "x")).status
    }

    #[test]
    fn upstream_failures_map_by_fault() {
        let status = |s| LlmErrorKind::Status {
            status: s,
            retry_after: None,
        };
        assert_eq!(
            status_of(LlmErrorKind::Timeout),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(status_of(LlmErrorKind::Connect), StatusCode::BAD_GATEWAY);
        assert_eq!(status_of(status(500)), StatusCode::BAD_GATEWAY);
        assert_eq!(status_of(status(401)), StatusCode::BAD_GATEWAY);
        assert_eq!(status_of(status(400)), StatusCode::BAD_REQUEST);
        assert_eq!(status_of(status(422)), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(status_of(status(429)), StatusCode::TOO_MANY_REQUESTS);
    }

    #[test]
    fn mlflow_shape_uses_mlflow_error_codes() {
        let response = MlflowError(ApiError::unknown_model("x")).into_response();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            mlflow_error_code(&ApiError::bad_request("x", Some("m".to_owned()))),
            "INVALID_PARAMETER_VALUE"
        );
        assert_eq!(
            mlflow_error_code(&ApiError::bad_request("x", None)),
            "BAD_REQUEST"
        );
        assert_eq!(
            mlflow_error_code(&ApiError::unknown_model("x")),
            "RESOURCE_DOES_NOT_EXIST"
        );
        assert_eq!(
            mlflow_error_code(&ApiError::internal("x")),
            "INTERNAL_ERROR"
        );
        assert_eq!(
            mlflow_error_code(&ApiError::from(LlmError::timeout("slow"))),
            "DEADLINE_EXCEEDED"
        );
    }

    #[test]
    fn chain_step_failures_keep_the_upstream_classification() {
        let upstream = ChainError::new(
            "answerer",
            ChainErrorKind::Llm(LlmError::timeout("too slow")),
        );
        let error = ApiError::from_chain(upstream, "bot", "req-1");
        assert_eq!(error.status, StatusCode::GATEWAY_TIMEOUT);
        assert!(
            error
                .message
                .starts_with("chain 'bot' step 'answerer': too slow")
        );

        let bug = ChainError::internal("parse", "index out of range");
        let error = ApiError::from_chain(bug, "bot", "req-2");
        assert_eq!(error.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            error.message.contains("step 'parse' (request id req-2;"),
            "{}",
            error.message
        );
        // What went wrong stays in the log: a template's error quotes the prompt.
        assert!(!error.message.contains("index out of range"));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let error = ApiError::from(LlmError::new(
            LlmErrorKind::Status {
                status: 429,
                retry_after: Some(Duration::from_millis(1200)),
            },
            "slow down",
        ));
        let response = error.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
    }
}
