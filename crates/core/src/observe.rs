//! How upstream code reports what it did, without knowing about metrics or requests.
//!
//! Two channels: an [`Observer`] (metrics: routes, providers and chain steps call it with
//! bounded labels from config) and [`RequestStats`], a task-local of the request being served
//! (its time waiting on upstreams, its retries and fallbacks), so the gateway can say how much
//! of a request's time was its own.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// What became of one attempt of a route at one target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttemptOutcome {
    Ok,
    /// Failed; the same target is tried again.
    Retry,
    /// Failed; the route moves on to its next target.
    Fallback,
    /// The route's deadline passed.
    Timeout,
    /// Failed, and nothing is left to try.
    Error,
    /// Dropped while it ran: its request went away (the client left, the shutdown's deadline
    /// passed). The upstream may have worked on it all the same.
    Cancelled,
    /// Never sent: the provider's `max_concurrency` slots stayed taken for its queue timeout.
    Overloaded,
}

impl AttemptOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Ok => "ok",
            AttemptOutcome::Retry => "retry",
            AttemptOutcome::Fallback => "fallback",
            AttemptOutcome::Timeout => "timeout",
            AttemptOutcome::Error => "error",
            AttemptOutcome::Cancelled => "cancelled",
            AttemptOutcome::Overloaded => "overloaded",
        }
    }
}

/// Receives events for metrics. Every method has a no-op default.
pub trait Observer: Send + Sync {
    /// One attempt of `route` at `provider` ended; for streams, `duration` runs to the first chunk.
    fn upstream_attempt(
        &self,
        _route: &str,
        _provider: &str,
        _outcome: AttemptOutcome,
        _duration: Duration,
    ) {
    }
    /// A stream attempt's time to its first chunk.
    fn first_token(&self, _route: &str, _provider: &str, _duration: Duration) {}
    /// A provider's calls in flight changed (providers with a concurrency cap).
    fn provider_in_flight(&self, _provider: &str, _in_flight: usize) {}
    /// How long a call waited for a slot under a provider's concurrency cap.
    fn provider_queue_wait(&self, _provider: &str, _wait: Duration) {}
    /// A chain step (an LLM call or a template render) ended.
    fn chain_step(&self, _chain: &str, _step: &str, _duration: Duration, _ok: bool) {}
}

/// What one request spent upstream, filled in by routes as they work.
#[derive(Debug, Default)]
pub struct RequestStats {
    upstream_nanos: AtomicU64,
    /// Of that, time spent waiting for a provider's concurrency slot (`max_concurrency`).
    queue_nanos: AtomicU64,
    retries: AtomicU32,
    fallbacks: AtomicU32,
    /// An upstream call failed after it may have generated tokens (it timed out, broke off,
    /// answered something unreadable): the usage reported is then a lower bound.
    maybe_generated: AtomicBool,
}

tokio::task_local! {
    static CURRENT: Arc<RequestStats>;
}

impl RequestStats {
    /// Runs `future` with `stats` as the current request's stats.
    pub async fn scope<F: Future>(stats: Arc<RequestStats>, future: F) -> F::Output {
        CURRENT.scope(stats, future).await
    }

    /// Time spent waiting on upstream attempts (for streams: until their first chunk) and the
    /// backoff between them, but not in a provider's queue: see [`RequestStats::queue`].
    pub fn upstream(&self) -> Duration {
        let nanos = self.upstream_nanos.load(Ordering::Relaxed);
        Duration::from_nanos(nanos.saturating_sub(self.queue_nanos.load(Ordering::Relaxed)))
    }

    /// Time spent waiting for a slot of a provider with a concurrency cap.
    pub fn queue(&self) -> Duration {
        Duration::from_nanos(self.queue_nanos.load(Ordering::Relaxed))
    }

    pub fn retries(&self) -> u32 {
        self.retries.load(Ordering::Relaxed)
    }

    pub fn fallbacks(&self) -> u32 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    /// Whether a call failed after the upstream may have generated tokens.
    pub fn maybe_generated(&self) -> bool {
        self.maybe_generated.load(Ordering::Relaxed)
    }

    /// The current request's time queued for provider slots so far (zero outside a request).
    pub fn current_queue() -> Duration {
        CURRENT.try_with(|stats| stats.queue()).unwrap_or_default()
    }

    fn with(update: impl FnOnce(&RequestStats)) {
        // Outside a request (tests, background work) there is nothing to record into.
        let _ = CURRENT.try_with(|stats| update(stats));
    }

    /// Adds time spent waiting on an upstream.
    pub fn record_upstream(duration: Duration) {
        Self::with(|s| {
            let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
            s.upstream_nanos.fetch_add(nanos, Ordering::Relaxed);
        });
    }

    /// Adds time an attempt spent in a provider's queue (it counts as upstream time too, until
    /// [`RequestStats::upstream`] takes it out).
    pub fn record_queue_wait(duration: Duration) {
        Self::with(|s| {
            let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
            s.queue_nanos.fetch_add(nanos, Ordering::Relaxed);
        });
    }

    pub fn record_retry() {
        Self::with(|s| {
            s.retries.fetch_add(1, Ordering::Relaxed);
        });
    }

    pub fn record_fallback() {
        Self::with(|s| {
            s.fallbacks.fetch_add(1, Ordering::Relaxed);
        });
    }

    /// Notes a failed call, if the upstream may have generated tokens for it.
    pub fn record_failure(error: &crate::LlmError) {
        if error.may_have_generated() {
            Self::with(|s| s.maybe_generated.store(true, Ordering::Relaxed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_only_inside_a_scope() {
        RequestStats::record_retry();
        let stats = Arc::new(RequestStats::default());
        RequestStats::scope(stats.clone(), async {
            RequestStats::record_upstream(Duration::from_millis(3));
            RequestStats::record_upstream(Duration::from_millis(4));
            RequestStats::record_queue_wait(Duration::from_millis(2));
            RequestStats::record_retry();
            RequestStats::record_fallback();
        })
        .await;
        assert_eq!(stats.upstream(), Duration::from_millis(5));
        assert_eq!(stats.queue(), Duration::from_millis(2));
        assert_eq!((stats.retries(), stats.fallbacks()), (1, 1));
    }
}
