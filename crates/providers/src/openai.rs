//! Client for OpenAI and any OpenAI-compatible server (vLLM, Ollama, Groq, Together, …).

use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use http::header::AUTHORIZATION;
use switchyard_core::{
    ChatChunk, ChatRequest, ChatResponse, ChunkBody, ChunkBodyStream, ChunkStream, CompletionBody,
    Llm, LlmError, LlmErrorKind, Secret,
};

use crate::http::{HttpClient, UpstreamBody};
use crate::upstream::{
    MAX_ANSWER, Upstream, finish_in_background, sse_events, stream_error, upstream_error_message,
};

/// One OpenAI-compatible upstream. Cheap to clone: the HTTP clients are shared.
#[derive(Debug, Clone)]
pub struct OpenAiProvider {
    /// `<base_url>/chat/completions`, with `Authorization: Bearer <key>` (sensitive: its `Debug`
    /// shows no key). Shared with the streams of its calls.
    upstream: Arc<Upstream>,
    /// Whether a stream may carry `stream_options` (the gateway asks every stream for its
    /// usage); false for servers that refuse the field.
    stream_usage: bool,
}

impl OpenAiProvider {
    /// `base_url` is the API root, e.g. `https://api.openai.com/v1`.
    pub fn new(
        name: impl Into<String>,
        client: Arc<HttpClient>,
        base_url: &str,
        api_key: Option<Secret>,
    ) -> Result<Self, String> {
        let name = name.into();
        let mut headers = Vec::new();
        if let Some(key) = api_key {
            let value = Upstream::secret_header(&name, format!("Bearer {}", key.expose()))?;
            headers.push((AUTHORIZATION, value));
        }
        let upstream = Upstream::new(
            name,
            "openai",
            client,
            base_url,
            "chat/completions",
            headers,
        )?;
        Ok(Self {
            upstream: Arc::new(upstream),
            stream_usage: true,
        })
    }

    /// With `false`, streams go out without `stream_options` (a server that refuses the field
    /// then still streams, without usage).
    pub fn with_stream_usage(mut self, stream_usage: bool) -> Self {
        self.stream_usage = stream_usage;
        self
    }

    /// Opens a stream: `request` as this server takes it.
    async fn send_stream(
        &self,
        mut request: ChatRequest,
    ) -> Result<(http::Response<UpstreamBody>, u64), LlmError> {
        if !self.stream_usage {
            request.stream_options = None;
        }
        let response = self.send(&request).await?;
        Ok((response, request.choices_asked()))
    }

    async fn send(&self, request: &ChatRequest) -> Result<http::Response<UpstreamBody>, LlmError> {
        self.upstream.post(&request.model, request).await
    }

    /// The body of a successful non-stream call.
    async fn completion(&self, request: &ChatRequest) -> Result<bytes::Bytes, LlmError> {
        let response = self.send(request).await?;
        self.upstream.read_answer(response).await
    }

    fn not_a_completion(&self, error: &serde_json::Error) -> LlmError {
        self.upstream
            .invalid("a body that is not a chat completion", error)
    }
}

#[async_trait]
impl Llm for OpenAiProvider {
    async fn chat(&self, request: ChatRequest) -> Result<ChatResponse, LlmError> {
        let body = self.completion(&request).await?;
        switchyard_core::json_from_bytes(&body).map_err(|e| self.not_a_completion(&e))
    }

    async fn chat_body(&self, request: ChatRequest) -> Result<CompletionBody, LlmError> {
        let body = self.completion(&request).await?;
        CompletionBody::parse(body).map_err(|e| self.not_a_completion(&e))
    }

    async fn chat_stream(&self, request: ChatRequest) -> Result<ChunkStream, LlmError> {
        let (response, choices) = self.send_stream(request).await?;
        Ok(Box::pin(sse_chunks(
            self.upstream.clone(),
            response,
            MAX_ANSWER,
            choices,
            |data| {
                serde_json::from_str::<ChatChunk>(&data)
                    .ok()
                    .filter(|chunk| !chunk.extra.contains_key("error"))
                    .ok_or(data)
            },
        )))
    }

    async fn chat_stream_body(&self, request: ChatRequest) -> Result<ChunkBodyStream, LlmError> {
        let (response, choices) = self.send_stream(request).await?;
        Ok(Box::pin(sse_chunks(
            self.upstream.clone(),
            response,
            MAX_ANSWER,
            choices,
            ChunkBody::parse,
        )))
    }
}

/// The chunks of an SSE response, each `data:` payload read by `parse` (which hands back what it
/// cannot read, to be quoted). The stream ends at `[DONE]`, and with an error if the upstream
/// sends something else than a chunk (some servers send an `{"error": ...}` object mid-stream:
/// classified by [`stream_error`], with its `param` and `code`),
/// sends more than `max_event` bytes without completing an event, or closes the stream before
/// `[DONE]` while one of the `choices` asked for has not finished.
fn sse_chunks<T: Chunk>(
    upstream: Arc<Upstream>,
    response: http::Response<UpstreamBody>,
    max_event: usize,
    choices: u64,
    parse: impl Fn(String) -> Result<T, String> + Send + 'static,
) -> impl futures::Stream<Item = Result<T, LlmError>> + Send + 'static {
    // For an answer that is no event stream at all (a JSON error, an HTML page), to say so.
    let content_type = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
    // Taken out at `[DONE]`, to be read to its end in the background.
    let mut events = Some(Box::pin(sse_events(response, max_event)));
    let mut seen_events = false;
    let mut done = false;
    // Once every choice has finished, a stream that closes without `[DONE]` has given its
    // answer (some servers never send it). The set of finished choices, bit `i` for index `i`.
    let mut finished = 0u128;
    let choices = choices.min(128);
    futures::stream::poll_fn(move |cx| {
        let Some(stream) = events.as_mut().filter(|_| !done) else {
            return std::task::Poll::Ready(None);
        };
        let item = match futures::ready!(stream.poll_next_unpin(cx)) {
            None if u64::from(finished.count_ones()) >= choices => {
                done = true;
                return std::task::Poll::Ready(None);
            }
            None if !seen_events => Err(upstream.invalid(
                "no events",
                &format_args!("content-type {}", content_type.as_deref().unwrap_or("none")),
            )),
            None => Err(upstream.interrupted("closed the stream before [DONE]")),
            Some(Err(e)) => Err(upstream.interrupted(format_args!("stream broke off: {e}"))),
            Some(Ok(event)) if event.data.trim() == "[DONE]" => {
                done = true;
                if let Some(rest) = events.take() {
                    finish_in_background(rest);
                }
                return std::task::Poll::Ready(None);
            }
            Some(Ok(event)) => parse(String::from(&*event.data)).map_err(|data| {
                match serde_json::from_str::<serde_json::Value>(&data) {
                    Ok(value) if value.get("error").is_some() => {
                        let (kind, message) = stream_error(&value, &data);
                        let error = upstream.stream_fault(kind, message);
                        // As for an error status: nothing of an auth failure's body.
                        if matches!(
                            error.kind,
                            LlmErrorKind::Status {
                                status: 401 | 403,
                                ..
                            }
                        ) {
                            return error;
                        }
                        let (param, code) = upstream.param_and_code(data.as_bytes());
                        LlmError {
                            param,
                            code,
                            ..error
                        }
                    }
                    _ => upstream.interrupted(format_args!(
                        "sent an event that is not a chat completion chunk: {}",
                        upstream_error_message(data.as_bytes())
                    )),
                }
            }),
        };
        match &item {
            Ok(chunk) => {
                seen_events = true;
                finished |= chunk.finished_choices();
            }
            Err(_) => done = true,
        }
        std::task::Poll::Ready(Some(item))
    })
}

/// What [`sse_chunks`] needs to know of a chunk.
trait Chunk {
    /// The choices that finish in it, bit `i` for index `i`.
    fn finished_choices(&self) -> u128;
}

impl Chunk for ChunkBody {
    fn finished_choices(&self) -> u128 {
        self.finished
    }
}

impl Chunk for ChatChunk {
    fn finished_choices(&self) -> u128 {
        ChatChunk::finished_choices(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_core::LlmErrorKind;

    /// What [`sse_chunks`] makes of a response with these `data:` payloads.
    async fn chunks_of(
        events: &[&str],
        max_event: usize,
        choices: u64,
    ) -> Vec<Result<ChunkBody, LlmError>> {
        let response = sse_response(events);
        sse_chunks(upstream(), response, max_event, choices, ChunkBody::parse)
            .collect()
            .await
    }

    /// An SSE response with these `data:` payloads.
    fn sse_response(events: &[&str]) -> http::Response<UpstreamBody> {
        let events: Vec<(&str, &str)> = events.iter().map(|data| ("", *data)).collect();
        crate::upstream::tests::sse_response(&events)
    }

    fn upstream() -> Arc<Upstream> {
        crate::upstream::tests::test_upstream("p")
    }

    #[tokio::test]
    async fn a_stream_s_connection_is_reused_when_its_last_bytes_come_after_done() {
        // The upstream sends `[DONE]`, then the chunked encoding's end only when told (servers
        // often send it in a packet of its own): the stream ends at `[DONE]`, the rest of its
        // body is read in the background, and the next stream goes out on the same connection.
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let end = Arc::new(tokio::sync::Notify::new());
        let (counted, told) = (accepted.clone(), end.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                let told = told.clone();
                tokio::spawn(async move {
                    let mut stream = BufReader::new(stream);
                    while let Some((_, length)) = crate::http1::tests::read_head(&mut stream).await
                    {
                        stream.read_exact(&mut vec![0; length]).await.unwrap();
                        let chunk = |data: &str| {
                            let event = format!("data: {data}\n\n");
                            format!("{:x}\r\n{event}\r\n", event.len())
                        };
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                             transfer-encoding: chunked\r\n\r\n{}{}",
                            chunk(
                                r#"{"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":"stop"}]}"#
                            ),
                            chunk("[DONE]")
                        );
                        stream.get_mut().write_all(answer.as_bytes()).await.unwrap();
                        told.notified().await;
                        stream.get_mut().write_all(b"0\r\n\r\n").await.unwrap();
                    }
                });
            }
        });
        let client = Arc::new(HttpClient::new().unwrap());
        let provider = OpenAiProvider::new("p", client, &url, None).unwrap();
        for _ in 0..2 {
            let mut request = ChatRequest::new("m", vec![switchyard_core::Message::user("hi")]);
            request.stream = Some(true);
            let stream = provider.chat_stream_body(request).await.unwrap();
            let chunks: Vec<_> = stream.collect().await;
            assert_eq!(chunks.len(), 1);
            assert_eq!(chunks[0].as_ref().unwrap().text(), "x");
            end.notify_one();
            crate::http1::tests::until(|| provider.upstream.idle_connections() == 1).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

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
            provider.upstream.url,
            "http://127.0.0.1:1/v1/chat/completions"
        );
        let authorization = provider.upstream.header(AUTHORIZATION).unwrap();
        assert_eq!(authorization, "Bearer sk-do-not-show");
        assert!(authorization.is_sensitive());
        assert!(!format!("{provider:?}").contains("sk-do-not-show"));
    }

    #[tokio::test]
    async fn stream_chunks_pass_through_as_they_came_until_done_or_an_error_object() {
        let first = r#"{"id":"1","choices":[{"index":0,"delta":{"content":"x"}}],"x_vendor":1}"#;
        let usage = r#"{"id":"1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
        let after_done = r#"{"choices":[]}"#;
        let chunks: Vec<_> = chunks_of(&[first, usage, "[DONE]", after_done], 1024, 1).await;
        let chunks: Vec<ChunkBody> = chunks.into_iter().map(Result::unwrap).collect();
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].json, first);
        assert!(chunks[0].has_choices);
        assert_eq!(chunks[0].text(), "x");
        assert_eq!(chunks[1].json, usage);
        assert!(!chunks[1].has_choices);
        assert_eq!(chunks[1].usage, Some(switchyard_core::Usage::new(3, 1)));

        for broken in [r#"{"error":{"message":"overloaded"}}"#, "not json"] {
            let items: Vec<_> = chunks_of(&[first, broken, usage], 1024, 1).await;
            assert_eq!(items.len(), 2, "the stream ends at the error");
            let error = items[1].as_ref().unwrap_err();
            assert_eq!(error.kind, LlmErrorKind::StreamInterrupted);
            let said = if broken.contains("overloaded") {
                "sent an error in the stream: overloaded"
            } else {
                "sent an event that is not a chat completion chunk: not json"
            };
            assert!(error.message.contains(said), "{}", error.message);
        }

        let cut: Vec<_> = chunks_of(&[first], 1024, 1).await;
        assert!(
            cut[1]
                .as_ref()
                .unwrap_err()
                .message
                .contains("before [DONE]")
        );
        // Closed without [DONE] after its answer finished: the answer is whole, no error.
        let last = r#"{"id":"1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#;
        let finished: Vec<_> = chunks_of(&[first, last], 1024, 1).await;
        assert_eq!(finished.len(), 2);
        assert!(finished.iter().all(Result::is_ok));
        assert_eq!(finished[1].as_ref().unwrap().finished, 1);
        assert_eq!(finished[0].as_ref().unwrap().finished, 0);
        // With `n = 2`, one finished choice is not the whole answer; two (in one chunk or in
        // two) are.
        let second = r#"{"id":"1","choices":[{"index":1,"delta":{},"finish_reason":"length"}]}"#;
        let both = r#"{"id":"1","choices":[{"index":0,"delta":{},"finish_reason":"stop"},{"index":1,"delta":{},"finish_reason":"stop"}]}"#;
        for (events, whole) in [
            (vec![first, last], false),
            // The same choice finishing twice is still one choice.
            (vec![first, last, last], false),
            (vec![first, last, second], true),
            (vec![first, both], true),
        ] {
            let items: Vec<_> = chunks_of(&events, 1024, 2).await;
            let cut_off = items
                .last()
                .unwrap()
                .as_ref()
                .is_err_and(|e| e.message.contains("before [DONE]"));
            assert_eq!(cut_off, !whole, "{events:?}");
            assert_eq!(items.len(), events.len() + usize::from(!whole));
        }
        // A choice without an index (or a null one) is choice 0.
        let null_index = r#"{"choices":[{"index":null,"delta":{},"finish_reason":"stop"}]}"#;
        let items: Vec<_> = chunks_of(&[first, null_index], 1024, 1).await;
        assert_eq!(items.len(), 2);
        assert_eq!(items[1].as_ref().unwrap().finished, 1);
    }

    #[tokio::test]
    async fn a_200_that_is_no_event_stream_says_so() {
        // The body of a JSON answer holds no `data:` line: not one event.
        use http_body_util::BodyExt;
        let json = bytes::Bytes::from_static(b"{\"error\": \"nope\"}");
        let body = http_body_util::Full::new(json)
            .map_err(|never| match never {})
            .boxed_unsync();
        let mut response = http::Response::new(body);
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        let items: Vec<_> = sse_chunks(upstream(), response, 1024, 1, ChunkBody::parse)
            .collect()
            .await;
        let error = items[0].as_ref().unwrap_err();
        assert_eq!(error.kind, LlmErrorKind::InvalidResponse);
        assert_eq!(
            error.message,
            "provider 'p' sent no events: content-type application/json"
        );
    }

    #[tokio::test]
    async fn an_error_object_in_a_stream_is_the_error_its_status_would_be() {
        let status = |status| LlmErrorKind::Status {
            status,
            retry_after: None,
        };
        let cases = [
            // vLLM puts the status in `code`.
            (
                r#"{"error":{"object":"error","message":"too long","type":"BadRequestError","param":"messages","code":400}}"#,
                status(400),
                "too long",
                Some("messages"),
            ),
            (
                r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#,
                status(429),
                "Rate limit reached",
                None,
            ),
            (
                r#"{"error":{"message":"The server had an error","type":"server_error","code":"503"}}"#,
                status(503),
                "The server had an error",
                None,
            ),
            (
                r#"{"error":{"message":"Overloaded","type":"overloaded_error"}}"#,
                status(529),
                "Overloaded",
                None,
            ),
            // TGI sends the message as the error itself, its type beside it.
            (
                r#"{"error":"Input validation error: inputs too long","error_type":"validation"}"#,
                status(400),
                "Input validation error: inputs too long",
                None,
            ),
            (
                r#"{"error":"Model is overloaded","error_type":"overloaded"}"#,
                status(503),
                "Model is overloaded",
                None,
            ),
            (
                r#"{"error":"odd"}"#,
                LlmErrorKind::StreamInterrupted,
                "odd",
                None,
            ),
            // An auth failure's message may quote the key: not repeated.
            (
                r#"{"error":{"message":"Incorrect API key provided: sk-abc123","type":"invalid_request_error","code":"invalid_api_key"}}"#,
                status(401),
                "the provider rejected the gateway's credentials for it",
                None,
            ),
            (
                r#"{"error":{"message":"odd","type":"something_new","code":7}}"#,
                LlmErrorKind::StreamInterrupted,
                "odd",
                None,
            ),
        ];
        for (event, kind, said, param) in cases {
            let items: Vec<_> = chunks_of(&[event], 1024, 1).await;
            assert_eq!(items.len(), 1, "{event}");
            let error = items[0].as_ref().unwrap_err();
            assert_eq!(error.kind, kind, "{event}");
            assert_eq!(
                error.message,
                format!("provider 'p' sent an error in the stream: {said}")
            );
            assert_eq!(error.param.as_deref(), param);
            assert!(!format!("{error:?}").contains("sk-abc123"));
        }
    }

    #[tokio::test]
    async fn a_stream_event_over_the_limit_ends_the_stream() {
        let event = |n| format!(r#"{{"choices":[{{"index":0,"delta":{{"content":"{n}"}}}}]}}"#);
        let small: Vec<String> = (0..20).map(|n| event(n % 10)).collect();
        let small: Vec<&str> = small.iter().map(String::as_str).collect();
        // Twenty events of ~56 bytes each, over 1 KB in all: the limit is per event.
        let mut all = small.clone();
        all.push("[DONE]");
        let items: Vec<_> = chunks_of(&all, 100, 1).await;
        assert_eq!(items.len(), 20);
        assert!(items.iter().all(Result::is_ok));

        let big = event(7).repeat(3);
        let items: Vec<_> = chunks_of(&[small[0], &big, "[DONE]"], 100, 1).await;
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
