//! The one interface to "something that answers chat requests".

use std::fmt;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;

use crate::wire::{ChatChunk, ChatRequest, ChatResponse, ChunkBody, CompletionBody};

/// A stream of chat completion chunks. An `Err` item ends the stream: the upstream broke off.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<ChatChunk, LlmError>> + Send>>;

/// A stream of chunks as JSON, for a client (see [`Llm::chat_stream_body`]).
pub type ChunkBodyStream = Pin<Box<dyn Stream<Item = Result<ChunkBody, LlmError>> + Send>>;

/// Anything that answers OpenAI-style chat requests: a provider target, a route with retries and
/// fallbacks, or a scripted mock in tests.
#[async_trait]
pub trait Llm: Send + Sync {
    /// A complete (non-streaming) chat completion.
    async fn chat(&self, request: ChatRequest) -> Result<ChatResponse, LlmError>;

    /// A complete chat completion as JSON, for a client: an HTTP upstream's body is passed on
    /// as it came (decoding and re-encoding it was 8 % of the instructions the gateway spends
    /// on a proxied request). By default, `chat`'s answer encoded.
    async fn chat_body(&self, request: ChatRequest) -> Result<CompletionBody, LlmError> {
        Ok(CompletionBody::encode(&self.chat(request).await?))
    }

    /// A streaming chat completion. Returns once the upstream has accepted the request; the
    /// chunks follow on the stream.
    async fn chat_stream(&self, request: ChatRequest) -> Result<ChunkStream, LlmError>;

    /// A streaming chat completion as JSON chunks, for a client: an HTTP upstream's chunks are
    /// passed on as they came, like [`Llm::chat_body`]'s body. By default, `chat_stream`'s
    /// chunks encoded.
    async fn chat_stream_body(&self, request: ChatRequest) -> Result<ChunkBodyStream, LlmError> {
        use futures::StreamExt;
        let chunks = self.chat_stream(request).await?;
        Ok(Box::pin(
            chunks.map(|chunk| chunk.map(|chunk| ChunkBody::encode(&chunk))),
        ))
    }
}

/// Why an LLM call failed, classified by who is at fault and whether a retry may help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LlmErrorKind {
    /// No connection could be made (refused, DNS, TLS). Retryable.
    Connect,
    /// The deadline passed before the upstream answered.
    Timeout,
    /// The upstream answered with a non-success HTTP status.
    Status {
        status: u16,
        /// The upstream's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
    },
    /// The upstream answered 2xx with a body we could not understand.
    InvalidResponse,
    /// A stream broke off after it had started.
    StreamInterrupted,
    /// The request itself is not acceptable to this target (e.g. a mock asked to fail).
    BadRequest,
    /// A valid request this target's API cannot serve (say, tools on a provider whose
    /// translation has none): not retried, but the next target of a route may serve it.
    Unsupported,
    /// The gateway's own cap on calls to this provider is reached and no slot freed in time.
    Overloaded,
}

/// A failed LLM call. `message` never contains credentials.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct LlmError {
    pub kind: LlmErrorKind,
    pub message: String,
    /// What an upstream that refused the request said of it in OpenAI's error shape: the
    /// field at fault (`param`) and the error's `code`, for the client.
    pub param: Option<String>,
    pub code: Option<String>,
}

impl LlmError {
    pub fn new(kind: LlmErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(LlmErrorKind::Timeout, message)
    }

    /// Whether the upstream may have generated (and billed) tokens for the failed call: it
    /// timed out, broke off mid-answer, or answered with something unreadable.
    pub fn may_have_generated(&self) -> bool {
        matches!(
            self.kind,
            LlmErrorKind::Timeout | LlmErrorKind::StreamInterrupted | LlmErrorKind::InvalidResponse
        )
    }

    /// Whether trying the same target again may succeed: connect errors, timeouts of a single
    /// attempt, 408, 409, 429 and 5xx.
    pub fn is_retryable(&self) -> bool {
        match &self.kind {
            LlmErrorKind::Connect | LlmErrorKind::Timeout => true,
            LlmErrorKind::Status { status, .. } => {
                matches!(status, 408 | 409 | 429) || (500..=599).contains(status)
            }
            LlmErrorKind::InvalidResponse
            | LlmErrorKind::StreamInterrupted
            | LlmErrorKind::BadRequest
            | LlmErrorKind::Unsupported
            | LlmErrorKind::Overloaded => false,
        }
    }

    /// The upstream's requested wait before a retry, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self.kind {
            LlmErrorKind::Status { retry_after, .. } => retry_after,
            _ => None,
        }
    }
}

impl LlmErrorKind {
    /// A short name for traces (`error.type`): an upstream's status code, else the kind.
    pub fn error_type(&self) -> std::borrow::Cow<'static, str> {
        match self {
            LlmErrorKind::Connect => "connect".into(),
            LlmErrorKind::Timeout => "timeout".into(),
            LlmErrorKind::Status { status, .. } => status.to_string().into(),
            LlmErrorKind::InvalidResponse => "invalid_response".into(),
            LlmErrorKind::StreamInterrupted => "stream_interrupted".into(),
            LlmErrorKind::BadRequest => "bad_request".into(),
            LlmErrorKind::Unsupported => "unsupported".into(),
            LlmErrorKind::Overloaded => "overloaded".into(),
        }
    }
}

impl fmt::Display for LlmErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LlmErrorKind::Connect => f.write_str("connect error"),
            LlmErrorKind::Timeout => f.write_str("timeout"),
            LlmErrorKind::Status { status, .. } => write!(f, "upstream status {status}"),
            LlmErrorKind::InvalidResponse => f.write_str("invalid upstream response"),
            LlmErrorKind::StreamInterrupted => f.write_str("stream interrupted"),
            LlmErrorKind::BadRequest => f.write_str("bad request"),
            LlmErrorKind::Unsupported => f.write_str("not supported by the target"),
            LlmErrorKind::Overloaded => f.write_str("provider at its concurrency cap"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_statuses() {
        let status = |s| {
            LlmError::new(
                LlmErrorKind::Status {
                    status: s,
                    retry_after: None,
                },
                "x",
            )
        };
        assert!(status(429).is_retryable());
        assert!(status(500).is_retryable());
        assert!(status(503).is_retryable());
        assert!(!status(400).is_retryable());
        assert!(!status(401).is_retryable());
        assert!(!status(404).is_retryable());
        assert!(LlmError::new(LlmErrorKind::Connect, "x").is_retryable());
        assert!(!LlmError::new(LlmErrorKind::InvalidResponse, "x").is_retryable());
    }
}
