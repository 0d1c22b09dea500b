//! One HTTP upstream of a provider: the URL its calls go to, the headers every call sends (its
//! credentials, built once and marked sensitive), and what every provider does with the answers:
//! a failed status becomes a classified error quoting the upstream's message (never the body of
//! an auth failure), and bodies and stream events are read up to a limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::header::{CONTENT_TYPE, HOST, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use http_body_util::BodyExt;
use switchyard_core::{LlmError, LlmErrorKind, Secret};
use tracing::Instrument;

use crate::http::{HttpClient, Path, UpstreamBody, read_body};

/// Upstream error bodies are quoted in our errors, cut to this many bytes.
const MAX_QUOTED_ERROR: usize = 512;
/// What an auth failure's error says instead of the upstream's message, which may quote part of
/// the provider key ("Incorrect API key provided: sk-…wxyz").
const CREDENTIALS_REJECTED: &str = "the provider rejected the gateway's credentials for it";
/// An error answer's body is read up to this much (only its message is quoted).
const MAX_ERROR_BODY: usize = 64 * 1024;
/// The most a complete answer, or one event of a stream, may hold, so that a misbehaving
/// upstream cannot grow the gateway's memory without bound. Far above real answers: a
/// 16k-token completion with 20 `top_logprobs` per token is ~20 MB.
pub(crate) const MAX_ANSWER: usize = 64 * 1024 * 1024;

/// The span of one traced call, which says how the call ended — also when it never did: a
/// route's deadline drops the call mid-way.
struct CallSpan {
    span: tracing::Span,
    ended: bool,
}

impl CallSpan {
    fn end(&mut self, result: &Result<http::Response<UpstreamBody>, LlmError>) {
        self.ended = true;
        match result {
            Ok(response) => {
                // Integers as i64: tracing-opentelemetry exports unsigned values as strings.
                let status = i64::from(response.status().as_u16());
                self.span.record("http.response.status_code", status);
            }
            Err(error) => {
                if let LlmErrorKind::Status { status, .. } = error.kind {
                    self.span
                        .record("http.response.status_code", i64::from(status));
                }
                self.fail(&error.kind.error_type());
            }
        }
    }

    fn fail(&self, error_type: &str) {
        self.span.record("error.type", error_type);
        self.span.record("otel.status_code", "error");
    }
}

impl Drop for CallSpan {
    fn drop(&mut self) {
        if !self.ended {
            self.fail("cancelled");
        }
    }
}

/// Where a provider's calls go. Cheap to clone: the HTTP clients are shared.
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    /// The provider's name, which every error of its calls starts with.
    pub name: String,
    /// The API it speaks, as OpenTelemetry's `gen_ai.provider.name` says it (`openai`,
    /// `anthropic`).
    api: &'static str,
    client: Arc<HttpClient>,
    /// Parsed once: parsing it per request showed up in profiles.
    pub url: http::Uri,
    /// On this upstream's own HTTP/1 pool (plain HTTP), hyper-util's client (HTTPS), or through
    /// the proxy the environment names for `url`.
    path: Path,
    /// Sent with every call: the provider's own (credentials, API version) and the `Host` of a
    /// plain-HTTP upstream sent directly, built once (hyper's HTTP/1 connection, which the
    /// upstream's own pool sends on, adds no `Host`). (HTTPS may negotiate HTTP/2, which names
    /// the host in `:authority` instead; hyper-util's client adds `Host` for HTTP/1 there.)
    headers: Vec<(HeaderName, HeaderValue)>,
    /// The credentials those headers carry, to be cut out of whatever the upstream says: a
    /// server may quote the request's `Authorization` in an error message, which the gateway
    /// passes on to its client, its logs and its traces.
    secrets: Vec<Secret>,
}

impl Upstream {
    /// Calls go to `url` (`base_url` joined with the API's path) with `headers`.
    pub fn new(
        name: String,
        api: &'static str,
        client: Arc<HttpClient>,
        base_url: &str,
        api_path: &str,
        mut headers: Vec<(HeaderName, HeaderValue)>,
    ) -> Result<Self, String> {
        let url = format!("{}/{api_path}", base_url.trim_end_matches('/'));
        let invalid = |e: &dyn std::fmt::Display| format!("invalid base_url '{base_url}': {e}");
        // `Url` also normalises what `Uri` refuses (an international host name, a space).
        let url = reqwest::Url::parse(&url).map_err(|e| invalid(&e))?;
        let url: http::Uri = url.as_str().parse().map_err(|e| invalid(&e))?;
        let path = client.path_to(&url);
        if matches!(path, Path::Plain(_)) {
            headers.extend(host_header(&url).map(|host| (HOST, host)));
        }
        let secrets = headers
            .iter()
            .filter(|(_, value)| value.is_sensitive())
            .filter_map(|(_, value)| value.to_str().ok())
            .flat_map(|value| [Some(value), value.strip_prefix("Bearer ")])
            .flatten()
            // Long enough never to match ordinary text.
            .filter(|secret| secret.len() >= 8)
            .map(Secret::new)
            .collect();
        Ok(Self {
            name,
            api,
            client,
            url,
            path,
            headers,
            secrets,
        })
    }

    /// `text` (something the upstream said) without this upstream's credentials.
    pub(crate) fn redact(&self, text: String) -> String {
        self.secrets.iter().fold(text, |text, secret| {
            if text.contains(secret.expose()) {
                text.replace(secret.expose(), "[redacted]")
            } else {
                text
            }
        })
    }

    /// How many idle connections to it this thread keeps (a plain-HTTP upstream's).
    #[cfg(test)]
    pub(crate) fn idle_connections(&self) -> usize {
        match &self.path {
            Path::Plain(pool) => pool.idle_here(),
            _ => 0,
        }
    }

    /// The value of a header every call sends.
    #[cfg(test)]
    pub fn header(&self, name: HeaderName) -> Option<&HeaderValue> {
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
    }

    /// A header carrying a credential: refused if it is no valid header value, marked sensitive
    /// (neither its `Debug` nor hyper's HTTP/2 header compression shows it).
    pub fn secret_header(name: &str, value: String) -> Result<HeaderValue, String> {
        let mut value = HeaderValue::try_from(value)
            .map_err(|_| format!("the API key of provider '{name}' is not a valid header value"))?;
        value.set_sensitive(true);
        Ok(value)
    }

    /// POSTs `body` (a chat request for `model`) as JSON and returns the response once its head
    /// arrived with a success status; any other status is an error with the upstream's message.
    /// When calls are traced, the call is a client span (until the answer's head, or the error
    /// body, has arrived) whose context the upstream receives as `traceparent`.
    pub async fn post(
        &self,
        model: &str,
        body: &impl serde::Serialize,
    ) -> Result<http::Response<UpstreamBody>, LlmError> {
        let Some(trace_headers) = self.client.trace_headers() else {
            return self.call(body, |_| {}).await;
        };
        let mut call = CallSpan {
            span: self.call_span(model),
            ended: false,
        };
        let result = self
            .call(body, |headers| trace_headers(&call.span, headers))
            .instrument(call.span.clone())
            .await;
        call.end(&result);
        result
    }

    /// The span of one call, with OpenTelemetry's GenAI and HTTP client attributes.
    fn call_span(&self, model: &str) -> tracing::Span {
        let host = self.url.host().unwrap_or_default();
        let port = self.url.port_u16().unwrap_or(match self.url.scheme_str() {
            Some("http") => 80,
            _ => 443,
        });
        tracing::info_span!(
            "upstream",
            "otel.name" = format!("chat {model}"),
            "otel.kind" = "client",
            "otel.status_code" = tracing::field::Empty,
            provider = self.name.as_str(),
            "gen_ai.operation.name" = "chat",
            "gen_ai.provider.name" = self.api,
            "gen_ai.request.model" = model,
            "server.address" = host,
            "server.port" = i64::from(port),
            "http.request.method" = "POST",
            "http.response.status_code" = tracing::field::Empty,
            "error.type" = tracing::field::Empty,
        )
    }

    /// One call: `body` POSTed with the provider's headers and what `more_headers` adds.
    async fn call(
        &self,
        body: &impl serde::Serialize,
        more_headers: impl FnOnce(&mut HeaderMap),
    ) -> Result<http::Response<UpstreamBody>, LlmError> {
        let body = serde_json::to_vec(body).map_err(|e| {
            LlmError::new(
                LlmErrorKind::BadRequest,
                format!(
                    "cannot encode the request for provider '{}': {e}",
                    self.name
                ),
            )
        })?;
        let mut builder =
            http::Request::post(self.url.clone()).header(CONTENT_TYPE, "application/json");
        for (name, value) in &self.headers {
            builder = builder.header(name, value.clone());
        }
        let mut request = builder.body(Bytes::from(body)).map_err(|e| {
            LlmError::new(
                LlmErrorKind::BadRequest,
                format!("provider '{}': {e}", self.name),
            )
        })?;
        more_headers(request.headers_mut());
        let response = self
            .client
            .send(&self.path, request)
            .await
            .map_err(|e| self.named(e))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let retry_after = retry_after(response.headers());
        let (detail, body) = if matches!(status, 401 | 403) {
            // The body of an auth failure may quote part of the provider key ("Incorrect API key
            // provided: sk-…wxyz"): it must not reach clients or logs.
            (CREDENTIALS_REJECTED.to_owned(), None)
        } else if status == 407 {
            // Only a proxy says this: a plain-HTTP upstream behind `HTTP_PROXY`. (An HTTPS one's
            // tunnel refused says the same through the proxy client.)
            let detail = "proxy authorization required: the egress proxy wants credentials \
                          (in the HTTP_PROXY/ALL_PROXY URL) or refused the ones given";
            (detail.to_owned(), None)
        } else {
            match read_body(response.into_body(), MAX_ERROR_BODY).await {
                Ok(body) => (upstream_error_message(&body), Some(body)),
                Err(_) => (
                    format!("(its error body was cut off or over {MAX_ERROR_BODY} bytes)"),
                    None,
                ),
            }
        };
        let (param, code) = body.map_or((None, None), |body| self.param_and_code(&body));
        Err(LlmError {
            param,
            code,
            ..LlmError::new(
                LlmErrorKind::Status {
                    status,
                    retry_after,
                },
                format!(
                    "provider '{}' returned HTTP {status}: {}",
                    self.name,
                    self.redact(detail)
                ),
            )
        })
    }

    /// The whole body of a successful answer, up to [`MAX_ANSWER`].
    pub async fn read_answer(
        &self,
        response: http::Response<UpstreamBody>,
    ) -> Result<Bytes, LlmError> {
        read_body(response.into_body(), MAX_ANSWER)
            .await
            .map_err(|e| self.named(e))
    }

    /// Puts the provider's name in a transport error.
    pub fn named(&self, error: LlmError) -> LlmError {
        LlmError {
            message: self.redact(format!("provider '{}': {}", self.name, error.message)),
            ..error
        }
    }

    /// An answer that is not what the API promises.
    pub fn invalid(&self, what: &str, error: &dyn std::fmt::Display) -> LlmError {
        LlmError::new(
            LlmErrorKind::InvalidResponse,
            self.redact(format!("provider '{}' sent {what}: {error}", self.name)),
        )
    }

    /// `error.param` and `error.code` of an error body in OpenAI's shape, redacted.
    pub(crate) fn param_and_code(&self, body: &[u8]) -> (Option<String>, Option<String>) {
        let (param, code) = error_param_and_code(body);
        (
            param.map(|param| self.redact(param)),
            code.map(|code| self.redact(code)),
        )
    }

    /// A stream that broke off or carried something else than the API's events.
    pub fn interrupted(&self, message: impl std::fmt::Display) -> LlmError {
        self.stream_fault(LlmErrorKind::StreamInterrupted, message)
    }

    /// A stream that ended with an error of this kind: `message` says what this upstream did.
    pub fn stream_fault(&self, kind: LlmErrorKind, message: impl std::fmt::Display) -> LlmError {
        LlmError::new(
            kind,
            self.redact(format!("provider '{}' {message}", self.name)),
        )
    }
}

/// What a stream event carrying an `error` says (`{"error": {"message", "type", "code"}}`, or
/// TGI's `{"error": "<message>", "error_type": …}`; `data` is the event's text): the error the
/// same failure would have been before the stream, by the status the API answers it with — a
/// numeric `code` (vLLM and other OpenAI-compatible servers send the status there), else its
/// `code` or `type` by name — so a route retries, falls back from or passes it on as it would
/// that status; an unknown error is a stream that broke off. Its message is quoted (the whole
/// event when there is none), but not an auth failure's (see [`CREDENTIALS_REJECTED`]).
pub(crate) fn stream_error(event: &serde_json::Value, data: &str) -> (LlmErrorKind, String) {
    let error = &event["error"];
    let field = |name| match error {
        serde_json::Value::String(_) if name == "type" => event.get("error_type"),
        _ => error.get(name),
    };
    let numeric = field("code").and_then(|code| match code {
        serde_json::Value::Number(number) => number.as_u64(),
        serde_json::Value::String(text) => text.parse().ok(),
        _ => None,
    });
    let status = numeric
        .and_then(|status| u16::try_from(status).ok())
        .filter(|status| (400..=599).contains(status))
        .or_else(|| {
            ["code", "type"]
                .into_iter()
                .find_map(|name| field(name)?.as_str().and_then(error_type_status))
        });
    let kind = status.map_or(LlmErrorKind::StreamInterrupted, |status| {
        LlmErrorKind::Status {
            status,
            retry_after: None,
        }
    });
    let message = match status {
        Some(401 | 403) => CREDENTIALS_REJECTED,
        _ => field("message").unwrap_or(error).as_str().unwrap_or(data),
    };
    (
        kind,
        format!("sent an error in the stream: {}", quoted(message)),
    )
}

/// The HTTP status an API answers an error of this `type` (or OpenAI `code`) with: Anthropic's
/// error types (its errors page) and OpenAI's.
fn error_type_status(error_type: &str) -> Option<u16> {
    Some(match error_type {
        "invalid_request_error" => 400,
        "authentication_error" | "invalid_api_key" => 401,
        "billing_error" => 402,
        "permission_error" => 403,
        "not_found_error" | "model_not_found" => 404,
        "request_too_large" => 413,
        // Hugging Face TGI's `error_type`s.
        "validation" => 400,
        "overloaded" => 503,
        "rate_limit_error"
        | "rate_limit_exceeded"
        | "insufficient_quota"
        | "tokens"
        | "requests" => 429,
        "api_error" | "server_error" => 500,
        "timeout_error" => 504,
        "overloaded_error" => 529,
        _ => return None,
    })
}

/// How long, and for how many more events, [`finish_in_background`] reads a stream's body after
/// its last event.
const FINISH_WITHIN: Duration = Duration::from_secs(1);
const FINISH_EVENTS: usize = 16;

/// Reads what is left of a stream's body after its last event (`[DONE]`, `message_stop`), in
/// the background, so that its connection can carry another request. An upstream often sends
/// the body's last bytes (the chunked encoding's end) in a packet of their own, and a body
/// dropped before they arrive has its connection closed (hyper finishes only what it has
/// already received). At most [`FINISH_WITHIN`] and [`FINISH_EVENTS`] events more: an
/// upstream that keeps sending has its connection closed. Only for a stream that has ended: one
/// whose client left midway is dropped at once, so that the upstream stops generating.
pub(crate) fn finish_in_background(rest: impl Stream + Send + 'static) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let rest = rest.take(FINISH_EVENTS).for_each(|_| async {});
        let _ = tokio::time::timeout(FINISH_WITHIN, rest).await;
    });
}

/// The SSE events of `response`. A transport failure, or more than `max_event` bytes received
/// without completing an event, is an error item; the stream ends where the body does. (The
/// count restarts when an event comes out, so it is exact to within one read from the socket:
/// far below the 64 MiB it guards.)
pub(crate) fn sse_events(
    response: http::Response<UpstreamBody>,
    max_event: usize,
) -> impl Stream<Item = Result<sseer::event::Event, String>> + Send + 'static {
    // Bytes received since the last event: the SSE parser buffers them until an event is whole.
    let pending = Arc::new(AtomicUsize::new(0));
    let received = pending.clone();
    let data = response.into_body().into_data_stream().map(
        move |piece| -> Result<Bytes, Box<dyn std::error::Error + Send + Sync + 'static>> {
            let piece = piece?;
            if received.fetch_add(piece.len(), Ordering::Relaxed) + piece.len() > max_event {
                return Err(format!("an event is over {max_event} bytes").into());
            }
            Ok(piece)
        },
    );
    sseer::EventStream::new(data).map(move |event| {
        pending.store(0, Ordering::Relaxed);
        event.map_err(|e| e.to_string())
    })
}

/// `host[:port]` of `url`, the port only when it is not the scheme's default (as clients write
/// it).
fn host_header(url: &http::Uri) -> Option<HeaderValue> {
    let host = url.host()?;
    let value = match url.port_u16() {
        Some(port) if port != 80 => format!("{host}:{port}"),
        _ => host.to_owned(),
    };
    HeaderValue::try_from(value).ok()
}

/// `retry-after-ms` (OpenAI) or `Retry-After` in seconds.
/// Values an upstream sends are not trusted: negative, infinite or absurd ones are ignored.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds = |name, scale: f64| {
        let value = headers
            .get(name)?
            .to_str()
            .ok()?
            .trim()
            .parse::<f64>()
            .ok()?;
        Duration::try_from_secs_f64(value / scale).ok()
    };
    seconds("retry-after-ms", 1000.0).or_else(|| seconds(RETRY_AFTER.as_str(), 1.0))
}

/// The `error.message` of an error body (OpenAI's and Anthropic's shapes both have one), or the
/// start of the raw body; either way at most [`MAX_QUOTED_ERROR`] bytes of it.
pub(crate) fn upstream_error_message(body: &[u8]) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let text = match parsed
        .as_ref()
        .and_then(|v| v.pointer("/error/message"))
        .and_then(|m| m.as_str())
    {
        Some(message) => std::borrow::Cow::Borrowed(message),
        None => String::from_utf8_lossy(body),
    };
    quoted(&text)
}

/// `text` cut to [`MAX_QUOTED_ERROR`] bytes (at a character boundary) and trimmed.
fn quoted(text: &str) -> String {
    let mut end = text.len().min(MAX_QUOTED_ERROR);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].trim().to_owned()
}

/// `error.param` and `error.code` of an error body in OpenAI's shape (a numeric code as its
/// digits), each only if it is short enough to be a field name or a code.
fn error_param_and_code(body: &[u8]) -> (Option<String>, Option<String>) {
    let Ok(parsed) = serde_json::from_slice::<serde_json::Value>(body) else {
        return (None, None);
    };
    let field = |name: &str| {
        let text = match parsed.get("error")?.get(name)? {
            serde_json::Value::String(text) => text.clone(),
            serde_json::Value::Number(number) => number.to_string(),
            _ => return None,
        };
        (!text.is_empty() && text.len() <= 256).then_some(text)
    };
    (field("param"), field("code"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An upstream named `name` that no test calls (its streams are fed by hand).
    pub(crate) fn test_upstream(name: &str) -> Arc<Upstream> {
        upstream_with_headers(name, vec![])
    }

    /// An upstream named `name` that sends `value` in the secret header `header`.
    pub(crate) fn test_upstream_with_key(
        name: &str,
        header: HeaderName,
        value: &str,
    ) -> Arc<Upstream> {
        let key = Upstream::secret_header(name, value.to_owned()).unwrap();
        upstream_with_headers(name, vec![(header, key)])
    }

    fn upstream_with_headers(name: &str, headers: Vec<(HeaderName, HeaderValue)>) -> Arc<Upstream> {
        let client = Arc::new(HttpClient::new().unwrap());
        let url = "http://127.0.0.1:1";
        Arc::new(Upstream::new(name.into(), "openai", client, url, "x", headers).unwrap())
    }

    #[test]
    fn what_the_upstream_says_loses_the_credentials_sent_to_it() {
        let upstream =
            test_upstream_with_key("p", http::header::AUTHORIZATION, "Bearer sk-abcdef123456");
        let error = upstream
            .interrupted("sent an error: bad key Bearer sk-abcdef123456 (or sk-abcdef123456)");
        assert_eq!(
            error.message,
            "provider 'p' sent an error: bad key [redacted] (or [redacted])"
        );
    }

    #[test]
    fn the_host_header_of_a_plain_http_upstream_is_built_once_with_its_port() {
        let client = Arc::new(HttpClient::new().unwrap());
        let host = |url: &str| {
            let upstream =
                Upstream::new("p".into(), "openai", client.clone(), url, "x", vec![]).unwrap();
            upstream
                .header(HOST)
                .map(|value| value.to_str().unwrap().to_owned())
        };
        assert_eq!(
            host("http://127.0.0.1:8000/v1").as_deref(),
            Some("127.0.0.1:8000")
        );
        assert_eq!(
            host("http://llm.internal/v1").as_deref(),
            Some("llm.internal")
        );
        assert_eq!(host("http://[::1]:8080/v1").as_deref(), Some("[::1]:8080"));
        // HTTPS may speak HTTP/2 (no `Host`): hyper-util's client decides there.
        assert_eq!(host("https://api.openai.com/v1"), None);
    }

    #[test]
    fn reads_retry_after_in_either_header() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
        headers.insert("retry-after-ms", HeaderValue::from_static("150"));
        assert_eq!(retry_after(&headers), Some(Duration::from_millis(150)));
        for junk in ["inf", "-5", "NaN", "1e300", "soon"] {
            let mut headers = HeaderMap::new();
            headers.insert("retry-after-ms", HeaderValue::from_static(junk));
            headers.insert(RETRY_AFTER, HeaderValue::from_static(junk));
            assert_eq!(retry_after(&headers), None, "{junk}");
        }
    }

    #[test]
    fn quotes_error_messages() {
        let body = br#"{"error":{"message":"Rate limit reached","type":"requests"}}"#;
        assert_eq!(upstream_error_message(body), "Rate limit reached");
        let body =
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        assert_eq!(upstream_error_message(body), "Overloaded");
        assert_eq!(upstream_error_message(b"Bad Gateway\n"), "Bad Gateway");
        let openai = br#"{"error":{"message":"bad","type":"invalid_request_error","param":"temperature","code":"invalid_value"}}"#;
        assert_eq!(
            error_param_and_code(openai),
            (
                Some("temperature".to_owned()),
                Some("invalid_value".to_owned())
            )
        );
        let numeric = br#"{"error":{"message":"bad","param":null,"code":400}}"#;
        assert_eq!(
            error_param_and_code(numeric),
            (None, Some("400".to_owned()))
        );
        assert_eq!(error_param_and_code(b"Bad Gateway"), (None, None));
        // Long ones are cut, on a character boundary.
        let long = format!(r#"{{"error":{{"message":"{}"}}}}"#, "é".repeat(400));
        assert_eq!(upstream_error_message(long.as_bytes()), "é".repeat(256));
        assert_eq!(
            upstream_error_message(&[b'x'; 2000]).len(),
            MAX_QUOTED_ERROR
        );
    }

    /// An SSE response with these events (`event:` lines where a name is given), as an upstream
    /// would send it: the odd ones with CRLF line ends, and the whole arriving in reads of 7
    /// bytes, so events and lines are split.
    pub(crate) fn sse_response(events: &[(&str, &str)]) -> http::Response<UpstreamBody> {
        let text: String = events
            .iter()
            .enumerate()
            .map(|(i, (name, data))| {
                let end = if i % 2 == 1 { "\r\n" } else { "\n" };
                let name = if name.is_empty() {
                    String::new()
                } else {
                    format!("event: {name}{end}")
                };
                format!("{name}data: {data}{end}{end}")
            })
            .collect();
        let reads: Vec<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>> = text
            .as_bytes()
            .chunks(7)
            .map(|piece| Ok(hyper::body::Frame::data(Bytes::copy_from_slice(piece))))
            .collect();
        let body = http_body_util::StreamBody::new(futures::stream::iter(reads))
            .map_err(|never| match never {})
            .boxed_unsync();
        http::Response::new(body)
    }
}
