//! Client for OpenAI and any OpenAI-compatible server (vLLM, Ollama, Groq, Together, …).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderMap, HeaderValue, RETRY_AFTER};
use http_body_util::BodyExt;
use switchyard_core::{
    ChatChunk, ChatRequest, ChatResponse, ChunkBody, ChunkBodyStream, ChunkStream, CompletionBody,
    Llm, LlmError, LlmErrorKind, Secret,
};

use crate::http::{HttpClient, Path, UpstreamBody, read_body};

/// Upstream error bodies are quoted in our errors, cut to this many bytes.
const MAX_QUOTED_ERROR: usize = 512;
/// An error answer's body is read up to this much (only its message is quoted).
const MAX_ERROR_BODY: usize = 64 * 1024;
/// The most a complete answer, or one event of a stream, may hold, so that a misbehaving
/// upstream cannot grow the gateway's memory without bound. Far above real answers: a
/// 16k-token completion with 20 `top_logprobs` per token is ~20 MB.
const MAX_ANSWER: usize = 64 * 1024 * 1024;

/// One OpenAI-compatible upstream. Cheap to clone: the HTTP clients are shared.
#[derive(Debug, Clone)]
pub struct OpenAiProvider {
    name: String,
    client: Arc<HttpClient>,
    /// Parsed once: parsing it per request showed up in profiles.
    completions_url: http::Uri,
    /// Direct, or through the proxy the environment names for `completions_url`.
    path: Path,
    /// `Bearer <key>`, marked sensitive (its `Debug` shows no key).
    authorization: Option<HeaderValue>,
    /// The `Host` header of a plain-HTTP upstream sent directly, built once: hyper-util's client
    /// formats it for every request that has none. (HTTPS may negotiate HTTP/2, which names the
    /// host in `:authority` instead; the client adds `Host` for HTTP/1 there.)
    host: Option<HeaderValue>,
}

impl OpenAiProvider {
    /// `base_url` is the API root, e.g. `https://api.openai.com/v1`.
    pub fn new(
        name: impl Into<String>,
        client: Arc<HttpClient>,
        base_url: &str,
        api_key: Option<Secret>,
    ) -> Result<Self, String> {
        let url = format!("{}/chat/completions", base_url.trim_end_matches('/'));
        let invalid = |e: &dyn std::fmt::Display| format!("invalid base_url '{base_url}': {e}");
        // `Url` also normalises what `Uri` refuses (an international host name, a space).
        let url = reqwest::Url::parse(&url).map_err(|e| invalid(&e))?;
        let completions_url: http::Uri = url.as_str().parse().map_err(|e| invalid(&e))?;
        let name = name.into();
        let authorization = api_key
            .map(|key| {
                let mut value =
                    HeaderValue::try_from(format!("Bearer {}", key.expose())).map_err(|_| {
                        format!("the API key of provider '{name}' is not a valid header value")
                    })?;
                value.set_sensitive(true);
                Ok::<_, String>(value)
            })
            .transpose()?;
        let path = client.path_to(&completions_url);
        let host = (path == Path::Direct
            && completions_url.scheme() == Some(&http::uri::Scheme::HTTP))
        .then(|| host_header(&completions_url))
        .flatten();
        Ok(Self {
            name,
            path,
            client,
            completions_url,
            authorization,
            host,
        })
    }

    async fn send(&self, request: &ChatRequest) -> Result<http::Response<UpstreamBody>, LlmError> {
        let body = serde_json::to_vec(request).map_err(|e| {
            LlmError::new(
                LlmErrorKind::BadRequest,
                format!(
                    "cannot encode the request for provider '{}': {e}",
                    self.name
                ),
            )
        })?;
        let mut builder = http::Request::post(self.completions_url.clone())
            .header(CONTENT_TYPE, "application/json");
        if let Some(authorization) = &self.authorization {
            builder = builder.header(AUTHORIZATION, authorization.clone());
        }
        if let Some(host) = &self.host {
            builder = builder.header(HOST, host.clone());
        }
        let request = builder.body(Bytes::from(body)).map_err(|e| {
            LlmError::new(
                LlmErrorKind::BadRequest,
                format!("provider '{}': {e}", self.name),
            )
        })?;
        let response = self
            .client
            .send(self.path, request)
            .await
            .map_err(|e| self.named(e))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let retry_after = retry_after(response.headers());
        let detail = if matches!(status, 401 | 403) {
            // The body of an auth failure may quote part of the provider key ("Incorrect API key
            // provided: sk-…wxyz"): it must not reach clients or logs.
            "the provider rejected the gateway's credentials for it".to_owned()
        } else {
            match read_body(response.into_body(), MAX_ERROR_BODY).await {
                Ok(body) => upstream_error_message(&body),
                Err(_) => format!("(its error body was cut off or over {MAX_ERROR_BODY} bytes)"),
            }
        };
        Err(LlmError::new(
            LlmErrorKind::Status {
                status,
                retry_after,
            },
            format!("provider '{}' returned HTTP {status}: {detail}", self.name),
        ))
    }

    /// The body of a successful non-stream call.
    async fn completion(&self, request: &ChatRequest) -> Result<Bytes, LlmError> {
        let response = self.send(request).await?;
        read_body(response.into_body(), MAX_ANSWER)
            .await
            .map_err(|e| self.named(e))
    }

    fn not_a_completion(&self, error: &serde_json::Error) -> LlmError {
        LlmError::new(
            LlmErrorKind::InvalidResponse,
            format!(
                "provider '{}' sent a body that is not a chat completion: {error}",
                self.name
            ),
        )
    }

    /// Puts the provider's name in a transport error.
    fn named(&self, error: LlmError) -> LlmError {
        LlmError::new(
            error.kind,
            format!("provider '{}': {}", self.name, error.message),
        )
    }
}

#[async_trait]
impl Llm for OpenAiProvider {
    async fn chat(&self, request: ChatRequest) -> Result<ChatResponse, LlmError> {
        let body = self.completion(&request).await?;
        serde_json::from_slice(&body).map_err(|e| self.not_a_completion(&e))
    }

    async fn chat_body(&self, request: ChatRequest) -> Result<CompletionBody, LlmError> {
        let body = self.completion(&request).await?;
        CompletionBody::parse(body).map_err(|e| self.not_a_completion(&e))
    }

    async fn chat_stream(&self, request: ChatRequest) -> Result<ChunkStream, LlmError> {
        let response = self.send(&request).await?;
        Ok(Box::pin(sse_chunks(
            self.name.clone(),
            response,
            MAX_ANSWER,
            |data| {
                serde_json::from_str::<ChatChunk>(&data)
                    .ok()
                    .filter(|chunk| !chunk.extra.contains_key("error"))
                    .ok_or(data)
            },
        )))
    }

    async fn chat_stream_body(&self, request: ChatRequest) -> Result<ChunkBodyStream, LlmError> {
        let response = self.send(&request).await?;
        Ok(Box::pin(sse_chunks(
            self.name.clone(),
            response,
            MAX_ANSWER,
            ChunkBody::parse,
        )))
    }
}

/// The chunks of an SSE response, each `data:` payload read by `parse` (which hands back what it
/// cannot read, to be quoted). The stream ends at `[DONE]`, and with an error if the upstream
/// sends something else than a chunk (some servers send an `{"error": ...}` object mid-stream),
/// sends more than `max_event` bytes without completing an event, or closes the stream before
/// `[DONE]`.
fn sse_chunks<T>(
    name: String,
    response: http::Response<UpstreamBody>,
    max_event: usize,
    parse: impl Fn(String) -> Result<T, String> + Send + 'static,
) -> impl futures::Stream<Item = Result<T, LlmError>> + Send + 'static {
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
    let mut events = sseer::EventStream::new(data);
    let mut done = false;
    futures::stream::poll_fn(move |cx| {
        if done {
            return std::task::Poll::Ready(None);
        }
        let item = match futures::ready!(events.poll_next_unpin(cx)) {
            None => Err(LlmError::new(
                LlmErrorKind::StreamInterrupted,
                format!("provider '{name}' closed the stream before [DONE]"),
            )),
            Some(Err(e)) => Err(LlmError::new(
                LlmErrorKind::StreamInterrupted,
                format!("provider '{name}' stream broke off: {e}"),
            )),
            Some(Ok(event))
                if {
                    pending.store(0, Ordering::Relaxed);
                    event.data.trim() == "[DONE]"
                } =>
            {
                done = true;
                return std::task::Poll::Ready(None);
            }
            Some(Ok(event)) => parse(String::from(&*event.data)).map_err(|data| {
                LlmError::new(
                    LlmErrorKind::StreamInterrupted,
                    format!(
                        "provider '{name}' sent an error in the stream: {}",
                        upstream_error_message(data.as_bytes())
                    ),
                )
            }),
        };
        done = item.is_err();
        std::task::Poll::Ready(Some(item))
    })
}

/// `host[:port]` of `url`, the port only when it is not the scheme's default (as hyper-util's
/// client writes it).
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

/// The `error.message` of an OpenAI error body, or the start of the raw body; either way at
/// most [`MAX_QUOTED_ERROR`] bytes of it.
fn upstream_error_message(body: &[u8]) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let text = match parsed
        .as_ref()
        .and_then(|v| v.pointer("/error/message"))
        .and_then(|m| m.as_str())
    {
        Some(message) => std::borrow::Cow::Borrowed(message),
        None => String::from_utf8_lossy(body),
    };
    let mut end = text.len().min(MAX_QUOTED_ERROR);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_sent_as_a_bearer_token_and_never_shown() {
        let client = Arc::new(HttpClient::new().unwrap());
        let provider = OpenAiProvider::new(
            "p",
            client,
            "http://127.0.0.1:1/v1/",
            Some(Secret::new("sk-do-not-show".to_owned())),
        )
        .unwrap();
        assert_eq!(
            provider.completions_url,
            "http://127.0.0.1:1/v1/chat/completions"
        );
        let authorization = provider.authorization.as_ref().unwrap();
        assert_eq!(authorization, "Bearer sk-do-not-show");
        assert!(authorization.is_sensitive());
        assert!(!format!("{provider:?}").contains("sk-do-not-show"));
    }

    #[test]
    fn the_host_header_of_a_plain_http_upstream_is_built_once_with_its_port() {
        let client = Arc::new(HttpClient::new().unwrap());
        let provider = |url: &str| OpenAiProvider::new("p", client.clone(), url, None).unwrap();
        let host = |url: &str| provider(url).host.map(|h| h.to_str().unwrap().to_owned());
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
    fn quotes_openai_error_messages() {
        let body = br#"{"error":{"message":"Rate limit reached","type":"requests"}}"#;
        assert_eq!(upstream_error_message(body), "Rate limit reached");
        assert_eq!(upstream_error_message(b"Bad Gateway\n"), "Bad Gateway");
        // Long ones are cut, on a character boundary.
        let long = format!(r#"{{"error":{{"message":"{}"}}}}"#, "é".repeat(400));
        assert_eq!(upstream_error_message(long.as_bytes()), "é".repeat(256));
        assert_eq!(
            upstream_error_message(&[b'x'; 2000]).len(),
            MAX_QUOTED_ERROR
        );
    }

    /// An SSE response with these events, as an upstream would send it: the odd ones with CRLF
    /// line ends, and the whole arriving in reads of 7 bytes, so events and lines are split.
    fn sse_response(events: &[&str]) -> http::Response<UpstreamBody> {
        let text: String = events
            .iter()
            .enumerate()
            .map(|(i, data)| {
                let end = if i % 2 == 1 { "\r\n" } else { "\n" };
                format!("data: {data}{end}{end}")
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

    #[tokio::test]
    async fn stream_chunks_pass_through_as_they_came_until_done_or_an_error_object() {
        let first = r#"{"id":"1","choices":[{"index":0,"delta":{"content":"x"}}],"x_vendor":1}"#;
        let usage = r#"{"id":"1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
        let after_done = r#"{"choices":[]}"#;
        let chunks: Vec<_> = sse_chunks(
            "p".into(),
            sse_response(&[first, usage, "[DONE]", after_done]),
            1024,
            ChunkBody::parse,
        )
        .collect()
        .await;
        let chunks: Vec<ChunkBody> = chunks.into_iter().map(Result::unwrap).collect();
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].json, first);
        assert!(chunks[0].has_choices);
        assert_eq!(chunks[0].text(), "x");
        assert_eq!(chunks[1].json, usage);
        assert!(!chunks[1].has_choices);
        assert_eq!(chunks[1].usage, Some(switchyard_core::Usage::new(3, 1)));

        for broken in [r#"{"error":{"message":"overloaded"}}"#, "not json"] {
            let items: Vec<_> = sse_chunks(
                "p".into(),
                sse_response(&[first, broken, usage]),
                1024,
                ChunkBody::parse,
            )
            .collect()
            .await;
            assert_eq!(items.len(), 2, "the stream ends at the error");
            let error = items[1].as_ref().unwrap_err();
            assert_eq!(error.kind, LlmErrorKind::StreamInterrupted);
            let quoted = if broken.contains("overloaded") {
                "overloaded"
            } else {
                "not json"
            };
            assert!(error.message.contains(quoted), "{}", error.message);
        }

        let cut: Vec<_> = sse_chunks("p".into(), sse_response(&[first]), 1024, ChunkBody::parse)
            .collect()
            .await;
        assert!(
            cut[1]
                .as_ref()
                .unwrap_err()
                .message
                .contains("before [DONE]")
        );
    }

    #[tokio::test]
    async fn a_stream_event_over_the_limit_ends_the_stream() {
        let event = |n| format!(r#"{{"choices":[{{"index":0,"delta":{{"content":"{n}"}}}}]}}"#);
        let small: Vec<String> = (0..20).map(|n| event(n % 10)).collect();
        let small: Vec<&str> = small.iter().map(String::as_str).collect();
        // Twenty events of ~56 bytes each, over 1 KB in all: the limit is per event.
        let mut all = small.clone();
        all.push("[DONE]");
        let items: Vec<_> = sse_chunks("p".into(), sse_response(&all), 100, ChunkBody::parse)
            .collect()
            .await;
        assert_eq!(items.len(), 20);
        assert!(items.iter().all(Result::is_ok));

        let big = event(7).repeat(3);
        let items: Vec<_> = sse_chunks(
            "p".into(),
            sse_response(&[small[0], &big, "[DONE]"]),
            100,
            ChunkBody::parse,
        )
        .collect()
        .await;
        assert_eq!(items.len(), 2, "the stream ends at the big event");
        assert_eq!(items[0].as_ref().unwrap().text(), "0");
        let error = items[1].as_ref().unwrap_err();
        assert_eq!(error.kind, LlmErrorKind::StreamInterrupted);
        assert!(
            error.message.contains("an event is over 100 bytes"),
            "{}",
            error.message
        );
    }
}
