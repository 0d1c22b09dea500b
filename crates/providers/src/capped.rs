//! A provider's concurrency cap (`max_concurrency`): protects the provider's own quota.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::{Stream, StreamExt};
use switchyard_core::{
    ChatRequest, ChatResponse, ChunkBodyStream, ChunkStream, CompletionBody, Llm, LlmError,
    LlmErrorKind, Observer,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// At most `max` calls in flight to the wrapped provider; a call beyond that waits for a slot up
/// to `queue_timeout`, then fails with [`LlmErrorKind::Overloaded`] (a route then falls back to
/// its next target). A stream holds its slot until it ends.
pub struct Capped {
    name: String,
    inner: Arc<dyn Llm>,
    slots: Arc<Semaphore>,
    max: usize,
    queue_timeout: Duration,
    observer: Option<Arc<dyn Observer>>,
}

impl Capped {
    pub fn new(
        name: impl Into<String>,
        inner: Arc<dyn Llm>,
        max: usize,
        queue_timeout: Duration,
    ) -> Self {
        Self::with_slots(
            name,
            inner,
            Arc::new(Semaphore::new(max)),
            max,
            queue_timeout,
        )
    }

    /// Like [`Capped::new`], sharing `slots` (a semaphore of `max` permits) with earlier
    /// instances, so that rebuilding the provider (a config reload) does not reset the cap.
    pub fn with_slots(
        name: impl Into<String>,
        inner: Arc<dyn Llm>,
        slots: Arc<Semaphore>,
        max: usize,
        queue_timeout: Duration,
    ) -> Self {
        Self {
            name: name.into(),
            inner,
            slots,
            max,
            queue_timeout,
            observer: None,
        }
    }

    /// Reports calls in flight and queue waits to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> usize {
        self.max - self.slots.available_permits()
    }

    async fn slot(&self) -> Result<Slot, LlmError> {
        let overloaded = || {
            LlmError::new(
                LlmErrorKind::Overloaded,
                format!(
                    "provider '{}' is at its concurrency cap of {} and no call finished within {} ms",
                    self.name,
                    self.max,
                    self.queue_timeout.as_millis()
                ),
            )
        };
        let started = std::time::Instant::now();
        let slot = match tokio::time::timeout(
            self.queue_timeout,
            self.slots.clone().acquire_owned(),
        )
        .await
        {
            Ok(Ok(permit)) => Ok(Slot {
                permit: Some(permit),
                slots: self.slots.clone(),
                max: self.max,
                provider: self.name.clone(),
                observer: self.observer.clone(),
            }),
            Ok(Err(_)) | Err(_) => Err(overloaded()),
        };
        if let Some(observer) = &self.observer {
            observer.provider_queue_wait(&self.name, started.elapsed());
            observer.provider_in_flight(&self.name, self.in_flight());
        }
        slot
    }
}

/// A held slot; reports the new in-flight count when released.
struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    slots: Arc<Semaphore>,
    max: usize,
    provider: String,
    observer: Option<Arc<dyn Observer>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        drop(self.permit.take());
        if let Some(observer) = &self.observer {
            observer.provider_in_flight(&self.provider, self.max - self.slots.available_permits());
        }
    }
}

#[async_trait]
impl Llm for Capped {
    async fn chat(&self, request: ChatRequest) -> Result<ChatResponse, LlmError> {
        let _slot = self.slot().await?;
        self.inner.chat(request).await
    }

    async fn chat_body(&self, request: ChatRequest) -> Result<CompletionBody, LlmError> {
        let _slot = self.slot().await?;
        self.inner.chat_body(request).await
    }

    async fn chat_stream(&self, request: ChatRequest) -> Result<ChunkStream, LlmError> {
        let slot = self.slot().await?;
        let stream = self.inner.chat_stream(request).await?;
        Ok(Box::pin(holding(slot, stream)))
    }

    async fn chat_stream_body(&self, request: ChatRequest) -> Result<ChunkBodyStream, LlmError> {
        let slot = self.slot().await?;
        let stream = self.inner.chat_stream_body(request).await?;
        Ok(Box::pin(holding(slot, stream)))
    }
}

/// The stream, holding `slot` until it ends (or is dropped).
fn holding<S: Stream + Send + 'static>(
    slot: Slot,
    stream: S,
) -> impl Stream<Item = S::Item> + Send {
    stream.map(move |item| {
        let _held_until_the_stream_ends = &slot;
        item
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MockConfig, MockProvider};
    use switchyard_core::Message;

    #[tokio::test]
    async fn excess_calls_wait_then_fail_and_streams_hold_their_slot() {
        let mock = Arc::new(MockProvider::new(MockConfig::default()));
        let capped = Capped::new("m", mock, 1, Duration::from_millis(50));
        let request = ChatRequest::new("m", vec![Message::user("hi")]);
        let stream = capped.chat_stream(request.clone()).await.unwrap();
        assert_eq!(capped.in_flight(), 1);
        let error = capped.chat(request.clone()).await.unwrap_err();
        assert_eq!(error.kind, LlmErrorKind::Overloaded);
        assert!(
            error.message.contains("concurrency cap of 1"),
            "{}",
            error.message
        );
        let chunks: Vec<_> = stream.collect().await;
        assert!(chunks.iter().all(Result::is_ok));
        assert_eq!(capped.in_flight(), 0);
        assert_eq!(capped.chat(request).await.unwrap().text(), "hi");
    }
}
