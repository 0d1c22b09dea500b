//! A provider's concurrency cap (`max_concurrency`): protects the provider's own quota.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use futures::{Stream, StreamExt};
use switchyard_core::{
    ChatRequest, ChatResponse, ChunkBodyStream, ChunkStream, CompletionBody, Llm, LlmError,
    LlmErrorKind, Observer, RequestStats,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A provider's slots: at most `max` calls in flight. Kept across config reloads, and resized
/// by them while calls hold slots, so that those calls count against the new cap.
pub struct Slots {
    semaphore: Arc<Semaphore>,
    cap: Mutex<Cap>,
}

struct Cap {
    max: usize,
    /// Slots too many after a cap was lowered while they were held: taken back as calls end.
    owed: usize,
}

impl Cap {
    /// Calls in flight, with `free` permits left: the semaphore holds `max + owed` in all.
    fn in_flight(&self, free: usize) -> usize {
        (self.max + self.owed).saturating_sub(free)
    }
}

impl Slots {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            semaphore: Arc::new(Semaphore::new(max)),
            cap: Mutex::new(Cap { max, owed: 0 }),
        })
    }

    fn cap(&self) -> std::sync::MutexGuard<'_, Cap> {
        self.cap.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cap now.
    pub fn max(&self) -> usize {
        self.cap().max
    }

    /// Sets a new cap. A larger one frees its extra slots at once; a smaller one takes free
    /// slots back now and held ones as their calls end.
    pub fn resize(&self, max: usize) {
        let mut cap = self.cap();
        if max >= cap.max {
            let more = max - cap.max;
            let repaid = more.min(cap.owed);
            cap.owed -= repaid;
            self.semaphore.add_permits(more - repaid);
        } else {
            let fewer = cap.max - max;
            cap.owed += fewer - self.semaphore.forget_permits(fewer);
        }
        cap.max = max;
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> usize {
        self.cap().in_flight(self.semaphore.available_permits())
    }

    /// Gives a call's slot back, or keeps it if the cap was lowered meanwhile (under the lock,
    /// so a resize cannot slip in between); returns the calls then in flight.
    fn release(&self, permit: OwnedSemaphorePermit) -> usize {
        let mut cap = self.cap();
        if cap.owed > 0 {
            cap.owed -= 1;
            permit.forget();
        } else {
            drop(permit);
        }
        cap.in_flight(self.semaphore.available_permits())
    }
}

/// At most its [`Slots`]' cap of calls in flight to the wrapped provider; a call beyond that
/// waits for a slot up to `queue_timeout`, then fails with [`LlmErrorKind::Overloaded`] (a route
/// then falls back to its next target). A stream holds its slot until it ends.
pub struct Capped {
    name: String,
    inner: Arc<dyn Llm>,
    slots: Arc<Slots>,
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
        Self::with_slots(name, inner, Slots::new(max), queue_timeout)
    }

    /// Like [`Capped::new`], sharing `slots` with earlier instances, so that rebuilding the
    /// provider (a config reload) does not reset the count of calls in flight.
    pub fn with_slots(
        name: impl Into<String>,
        inner: Arc<dyn Llm>,
        slots: Arc<Slots>,
        queue_timeout: Duration,
    ) -> Self {
        Self {
            name: name.into(),
            inner,
            slots,
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
        self.slots.in_flight()
    }

    async fn slot(&self) -> Result<Slot, LlmError> {
        let overloaded = || {
            LlmError::new(
                LlmErrorKind::Overloaded,
                format!(
                    "provider '{}' is at its concurrency cap of {}: this call waited {} ms (queue_timeout_ms) without getting a slot",
                    self.name,
                    self.slots.max(),
                    self.queue_timeout.as_millis()
                ),
            )
        };
        let waiting = QueueWait {
            started: std::time::Instant::now(),
            provider: &self.name,
            observer: self.observer.as_deref(),
        };
        let slot = match tokio::time::timeout(
            self.queue_timeout,
            self.slots.semaphore.clone().acquire_owned(),
        )
        .await
        {
            Ok(Ok(permit)) => Ok(Slot {
                permit: Some(permit),
                slots: self.slots.clone(),
                provider: self.name.clone(),
                observer: self.observer.clone(),
            }),
            Ok(Err(_)) | Err(_) => Err(overloaded()),
        };
        drop(waiting);
        if let Some(observer) = &self.observer {
            observer.provider_in_flight(&self.name, self.in_flight());
        }
        slot
    }
}

/// A wait for a slot: the request's queue time, and the provider's queue-wait metric, when it
/// ends — also when the request drops it (its client left, an attempt deadline passed), which
/// is when the provider is overloaded.
struct QueueWait<'a> {
    started: std::time::Instant,
    provider: &'a str,
    observer: Option<&'a dyn Observer>,
}

impl Drop for QueueWait<'_> {
    fn drop(&mut self) {
        let waited = self.started.elapsed();
        RequestStats::record_queue_wait(waited);
        if let Some(observer) = self.observer {
            observer.provider_queue_wait(self.provider, waited);
        }
    }
}

/// A held slot; reports the new in-flight count when released.
struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    slots: Arc<Slots>,
    provider: String,
    observer: Option<Arc<dyn Observer>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            let in_flight = self.slots.release(permit);
            if let Some(observer) = &self.observer {
                observer.provider_in_flight(&self.provider, in_flight);
            }
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
        // The wait is the request's queue time, which its upstream time leaves out.
        let stats = Arc::new(RequestStats::default());
        let error = RequestStats::scope(stats.clone(), capped.chat(request.clone()))
            .await
            .unwrap_err();
        assert!(stats.queue() >= Duration::from_millis(50), "{stats:?}");
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

    #[tokio::test]
    async fn a_new_cap_counts_the_calls_already_in_flight() {
        let mock: Arc<dyn Llm> = Arc::new(MockProvider::new(MockConfig::default()));
        let slots = Slots::new(2);
        let capped = Capped::with_slots("m", mock, slots.clone(), Duration::from_millis(20));
        let request = ChatRequest::new("m", vec![Message::user("hi")]);
        let first = capped.chat_stream(request.clone()).await.unwrap();
        let second = capped.chat_stream(request.clone()).await.unwrap();

        // Raised to 3 with two held: one more call, not three.
        slots.resize(3);
        let third = capped.chat_stream(request.clone()).await.unwrap();
        assert_eq!(capped.in_flight(), 3);
        assert!(capped.chat(request.clone()).await.is_err());

        // Lowered to 1 with three held: none until two of them have ended.
        slots.resize(1);
        assert_eq!(capped.in_flight(), 3);
        drop(first);
        assert!(capped.chat(request.clone()).await.is_err());
        drop(second);
        assert_eq!(capped.in_flight(), 1);
        assert!(capped.chat(request.clone()).await.is_err());
        drop(third);
        assert_eq!(capped.in_flight(), 0);
        assert_eq!(capped.chat(request.clone()).await.unwrap().text(), "hi");

        // Raised again while slots are owed: the debt is paid first.
        let held = capped.chat_stream(request.clone()).await.unwrap();
        slots.resize(0);
        slots.resize(2);
        assert_eq!(capped.in_flight(), 1);
        let one_more = capped.chat_stream(request.clone()).await.unwrap();
        assert!(capped.chat(request.clone()).await.is_err());
        drop((held, one_more));
        assert_eq!(capped.in_flight(), 0);
    }
}
