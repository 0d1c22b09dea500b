//! Routes: ordered provider targets with deadlines, retries and fallbacks.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::{StreamExt, stream};
use switchyard_core::{
    AttemptOutcome, ChatRequest, ChatResponse, ChunkBodyStream, ChunkStream, CompletionBody, Llm,
    LlmError, LlmErrorKind, Observer, RequestStats,
};
use tokio::time::{Instant, timeout_at};
use tracing::warn;

/// What providers' streams are: boxed, sendable.
type BoxStream<T> = std::pin::Pin<Box<dyn futures::Stream<Item = T> + Send>>;

/// One provider target of a route: which upstream, and which model name to send it.
#[derive(Clone)]
pub struct Target {
    pub provider_name: String,
    pub provider: Arc<dyn Llm>,
    pub model: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("provider", &self.provider_name)
            .field("model", &self.model)
            .finish()
    }
}

/// Timing and retry policy of a route.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteSettings {
    /// Deadline for the whole call, all attempts included; for a stream, until its last chunk.
    pub timeout: Duration,
    /// For streams: how long one attempt may take to deliver its first chunk.
    pub first_token_timeout: Duration,
    /// For complete (non-stream) calls: how long one attempt may take to answer; one that
    /// takes longer is retried, or falls back, like a failed one.
    pub attempt_timeout: Duration,
    /// Retries per target after the first attempt (on connect errors, timeouts, 429, 5xx).
    pub retries: u32,
    /// First backoff; doubles per retry, capped at `max_backoff`, with jitter.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RouteSettings {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            first_token_timeout: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(30),
            retries: 2,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// A named route. Implements [`Llm`], so endpoints and chains call it like a provider.
#[derive(Clone)]
pub struct Route {
    name: String,
    targets: Vec<Target>,
    settings: RouteSettings,
    observer: Option<Arc<dyn Observer>>,
}

impl Route {
    pub fn new(name: impl Into<String>, targets: Vec<Target>, settings: RouteSettings) -> Self {
        Self {
            name: name.into(),
            targets,
            settings,
            observer: None,
        }
    }

    /// Reports every attempt (and streams' time to first token) to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = Some(observer);
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// Tries each target in order, retrying retryable failures with backoff, until one answers
    /// or the deadline passes. Returns the last error when every target failed.
    async fn call<T, F, Fut>(
        &self,
        mut request: ChatRequest,
        deadline: Instant,
        stream: bool,
        attempt: F,
    ) -> Result<T, LlmError>
    where
        F: Fn(Arc<dyn Llm>, ChatRequest) -> Fut,
        Fut: Future<Output = Result<T, LlmError>>,
    {
        let mut last_error = None;
        // A deadline's message says how much of it the call spent queued for provider slots.
        let queued_before = RequestStats::current_queue();
        for (index, target) in self.targets.iter().enumerate() {
            request.model.clone_from(&target.model);
            let mut last_attempt = Duration::ZERO;
            for attempt_number in 0..=self.settings.retries {
                let timing = UpstreamTime(Instant::now());
                let started = timing.0;
                let queued_at_start = RequestStats::current_queue();
                let mut running = RunningAttempt {
                    route: self,
                    target,
                    started,
                    ended: false,
                };
                // A complete call's attempt has its own deadline within the route's (one timer
                // for both); a stream's attempt bounds its wait for the first chunk itself.
                let attempt_deadline = if stream {
                    deadline
                } else {
                    deadline.min(started + self.settings.attempt_timeout)
                };
                let outcome = timeout_at(
                    attempt_deadline,
                    attempt(target.provider.clone(), request.clone()),
                )
                .await;
                running.ended = true;
                last_attempt = started.elapsed();
                drop(timing);
                let error = match outcome {
                    Ok(Ok(value)) => {
                        self.observe(target, AttemptOutcome::Ok, last_attempt);
                        if stream && let Some(observer) = &self.observer {
                            observer.first_token(&self.name, &target.provider_name, last_attempt);
                        }
                        return Ok(value);
                    }
                    Ok(Err(error)) => error,
                    // Retried or fallen back from like a failure (and observed as such).
                    Err(_elapsed) if attempt_deadline < deadline => LlmError::timeout(format!(
                        "provider '{}' gave no answer within attempt_timeout_ms ({} ms){}",
                        target.provider_name,
                        self.settings.attempt_timeout.as_millis(),
                        queued_note(queued_at_start)
                    )),
                    Err(_elapsed) => {
                        self.observe(target, AttemptOutcome::Timeout, last_attempt);
                        return Err(LlmError::timeout(format!(
                            "route '{}' timed out after {} ms (provider '{}'){}",
                            self.name,
                            self.settings.timeout.as_millis(),
                            target.provider_name,
                            queued_note(queued_before)
                        )));
                    }
                };
                RequestStats::record_failure(&error);
                let retryable = error.is_retryable();
                warn!(
                    route = %self.name,
                    provider = %target.provider_name,
                    attempt = attempt_number + 1,
                    retryable,
                    error = %error,
                    "upstream attempt failed"
                );
                let retry_after = error.retry_after();
                last_error = Some(error);
                if !retryable || attempt_number == self.settings.retries {
                    break;
                }
                let wait = self.backoff(attempt_number, retry_after);
                if Instant::now()
                    .checked_add(wait)
                    .is_none_or(|at| at >= deadline)
                {
                    // The upstream asks for a longer wait than we have left: try the next target.
                    break;
                }
                self.observe(target, AttemptOutcome::Retry, last_attempt);
                RequestStats::record_retry();
                // Waiting out the backoff (an upstream's `Retry-After`) is waiting on the
                // upstream, not time the gateway spent.
                let _waiting = UpstreamTime(Instant::now());
                tokio::time::sleep(wait).await;
            }
            let falls_back = last_error.as_ref().is_some_and(is_worth_falling_back)
                && index + 1 < self.targets.len();
            // A call that never got a slot of a capped provider was not an upstream's failure;
            // a deadline that ends the call is a timeout whichever deadline it was.
            let outcome = match last_error.as_ref().map(|e| &e.kind) {
                Some(LlmErrorKind::Overloaded) => AttemptOutcome::Overloaded,
                _ if falls_back => AttemptOutcome::Fallback,
                Some(LlmErrorKind::Timeout) => AttemptOutcome::Timeout,
                _ => AttemptOutcome::Error,
            };
            self.observe(target, outcome, last_attempt);
            if falls_back {
                RequestStats::record_fallback();
            } else {
                break;
            }
        }
        Err(last_error.unwrap_or_else(|| {
            LlmError::new(
                LlmErrorKind::Connect,
                format!("route '{}' has no targets", self.name),
            )
        }))
    }

    /// A non-stream call: `attempt` asks one provider for the whole completion.
    async fn call_complete<T, F, Fut>(
        &self,
        mut request: ChatRequest,
        attempt: F,
    ) -> Result<T, LlmError>
    where
        F: Fn(Arc<dyn Llm>, ChatRequest) -> Fut,
        Fut: Future<Output = Result<T, LlmError>>,
    {
        let deadline = Instant::now() + self.settings.timeout;
        request.stream = None;
        self.call(request, deadline, false, attempt).await
    }

    /// A stream call: `open` starts one provider's stream. An attempt counts as answered once
    /// its first chunk is here, so an upstream that is slow to answer or never starts streaming
    /// is retried before anything reaches the client; the route's deadline then ends the stream.
    async fn call_stream<T, F, Fut>(
        &self,
        mut request: ChatRequest,
        open: F,
    ) -> Result<BoxStream<Result<T, LlmError>>, LlmError>
    where
        T: Send + 'static,
        F: Fn(Arc<dyn Llm>, ChatRequest) -> Fut,
        Fut: Future<Output = Result<BoxStream<Result<T, LlmError>>, LlmError>>,
    {
        let deadline = Instant::now() + self.settings.timeout;
        let first_token_timeout = self.settings.first_token_timeout;
        request.stream = Some(true);
        let route: Arc<str> = self.name.as_str().into();
        let stream = self
            .call(request, deadline, true, |provider, request| {
                let queued_before = RequestStats::current_queue();
                let opening = open(provider, request);
                async move {
                    let first_token_deadline = deadline.min(Instant::now() + first_token_timeout);
                    let first = timeout_at(first_token_deadline, async {
                        let mut stream = opening.await?;
                        match stream.next().await {
                            Some(Ok(first)) => Ok(stream::iter([Ok(first)]).chain(stream)),
                            Some(Err(error)) => Err(error),
                            None => Err(LlmError::new(
                                LlmErrorKind::StreamInterrupted,
                                "upstream stream ended before its first chunk",
                            )),
                        }
                    })
                    .await;
                    first.unwrap_or_else(|_| {
                        Err(LlmError::timeout(format!(
                            "no first token within {} ms{}",
                            first_token_timeout.as_millis(),
                            queued_note(queued_before)
                        )))
                    })
                }
            })
            .await?;
        Ok(Box::pin(with_deadline(stream, deadline, route)))
    }

    fn observe(&self, target: &Target, outcome: AttemptOutcome, duration: Duration) {
        if let Some(observer) = &self.observer {
            observer.upstream_attempt(&self.name, &target.provider_name, outcome, duration);
        }
    }

    /// Exponential backoff with full jitter over its upper half; an upstream `Retry-After` wins
    /// when it asks for longer.
    fn backoff(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        let exponential = self
            .settings
            .backoff
            .saturating_mul(2u32.saturating_pow(retry))
            .min(self.settings.max_backoff);
        let jittered = exponential.mul_f64(0.5 + fastrand::f64() / 2.0);
        retry_after.map_or(jittered, |after| after.max(jittered))
    }
}

/// Counts an attempt as [`AttemptOutcome::Cancelled`] if its request drops it while it runs.
struct RunningAttempt<'a> {
    route: &'a Route,
    target: &'a Target,
    started: Instant,
    ended: bool,
}

impl Drop for RunningAttempt<'_> {
    fn drop(&mut self) {
        if !self.ended {
            let elapsed = self.started.elapsed();
            self.route
                .observe(self.target, AttemptOutcome::Cancelled, elapsed);
        }
    }
}

/// Adds an attempt's time (or a backoff's) to the request's upstream time when it ends, also
/// when the request is dropped during it (its client went away).
struct UpstreamTime(Instant);

impl Drop for UpstreamTime {
    fn drop(&mut self) {
        RequestStats::record_upstream(self.0.elapsed());
    }
}

/// A client error (400, 413, 422) would fail the same way on every target, so it is returned at
/// once; anything else (outages, rate limits, auth problems of one provider) may be fixed by the
/// next target — a 404 too: it names a model or deployment this provider does not have (a
/// retired model), which the next target may well have. So does a request a target's API cannot
/// serve ([`LlmErrorKind::Unsupported`]): it is valid, only not for that target.
fn is_worth_falling_back(error: &LlmError) -> bool {
    match error.kind {
        LlmErrorKind::Status { status, .. } => !matches!(status, 400 | 413 | 422),
        LlmErrorKind::BadRequest => false,
        _ => true,
    }
}

#[async_trait]
impl Llm for Route {
    async fn chat(&self, request: ChatRequest) -> Result<ChatResponse, LlmError> {
        self.call_complete(request, |provider, request| async move {
            provider.chat(request).await
        })
        .await
    }

    async fn chat_body(&self, request: ChatRequest) -> Result<CompletionBody, LlmError> {
        self.call_complete(request, |provider, request| async move {
            provider.chat_body(request).await
        })
        .await
    }

    async fn chat_stream(&self, request: ChatRequest) -> Result<ChunkStream, LlmError> {
        self.call_stream(request, |provider, request| async move {
            provider.chat_stream(request).await
        })
        .await
    }

    async fn chat_stream_body(&self, request: ChatRequest) -> Result<ChunkBodyStream, LlmError> {
        self.call_stream(request, |provider, request| async move {
            provider.chat_stream_body(request).await
        })
        .await
    }
}

/// Ends a stream with a timeout error once the route's deadline passes, so no stream hangs.
fn with_deadline<T: Send + 'static>(
    inner: impl futures::Stream<Item = Result<T, LlmError>> + Send + Unpin + 'static,
    deadline: Instant,
    route: Arc<str>,
) -> impl futures::Stream<Item = Result<T, LlmError>> + Send {
    stream::unfold(Some(inner), move |state| {
        let route = route.clone();
        async move {
            let mut inner = state?;
            match timeout_at(deadline, inner.next()).await {
                Ok(Some(Ok(chunk))) => Some((Ok(chunk), Some(inner))),
                Ok(Some(Err(error))) => Some((Err(error), None)),
                Ok(None) => None,
                Err(_) => Some((
                    Err(LlmError::timeout(format!(
                        "route '{route}' stream passed its deadline"
                    ))),
                    None,
                )),
            }
        }
    })
}

/// What a deadline's message adds when the call spent part of it queued for a slot of a
/// provider's `max_concurrency` (the upstream was not even called for that long): the request's
/// queue time since `before`, when the call began.
fn queued_note(before: Duration) -> String {
    let queued = RequestStats::current_queue().saturating_sub(before);
    if queued.is_zero() {
        return String::new();
    }
    format!(
        ", {} ms of it queued for a max_concurrency slot",
        queued.as_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use switchyard_core::{ChatChunk, Message};

    /// Fails with the queued errors, then answers.
    struct Flaky {
        failures: Mutex<Vec<LlmError>>,
        calls: Mutex<Vec<String>>,
    }

    impl Flaky {
        fn new(failures: Vec<LlmError>) -> Arc<Self> {
            Arc::new(Self {
                failures: Mutex::new(failures),
                calls: Mutex::new(Vec::new()),
            })
        }
        fn next(&self, request: &ChatRequest) -> Result<(), LlmError> {
            self.calls.lock().unwrap().push(request.model.clone());
            match self.failures.lock().unwrap().pop() {
                Some(error) => Err(error),
                None => Ok(()),
            }
        }
    }

    #[async_trait]
    impl Llm for Flaky {
        async fn chat(&self, request: ChatRequest) -> Result<ChatResponse, LlmError> {
            self.next(&request)?;
            Ok(ChatResponse::assistant(
                "id",
                request.model,
                0,
                "ok",
                Default::default(),
            ))
        }
        async fn chat_stream(&self, request: ChatRequest) -> Result<ChunkStream, LlmError> {
            self.next(&request)?;
            let chunk = ChatChunk::delta(
                "id",
                request.model,
                0,
                switchyard_core::Delta::content("ok"),
                None,
            );
            Ok(Box::pin(stream::iter([Ok(chunk)])))
        }
    }

    fn status(code: u16) -> LlmError {
        LlmError::new(
            LlmErrorKind::Status {
                status: code,
                retry_after: None,
            },
            format!("HTTP {code}"),
        )
    }

    fn route(targets: Vec<(&str, Arc<Flaky>)>, retries: u32) -> Route {
        let targets = targets
            .into_iter()
            .map(|(model, provider)| Target {
                provider_name: model.to_owned(),
                provider,
                model: model.to_owned(),
            })
            .collect();
        let settings = RouteSettings {
            retries,
            backoff: Duration::from_millis(1),
            ..RouteSettings::default()
        };
        Route::new("r", targets, settings)
    }

    fn request() -> ChatRequest {
        ChatRequest::new("endpoint", vec![Message::user("hi")])
    }

    /// Never answers.
    struct Hung;

    #[async_trait]
    impl Llm for Hung {
        async fn chat(&self, _: ChatRequest) -> Result<ChatResponse, LlmError> {
            std::future::pending().await
        }
        async fn chat_stream(&self, _: ChatRequest) -> Result<ChunkStream, LlmError> {
            std::future::pending().await
        }
    }

    #[test]
    fn an_attempt_its_request_drops_is_counted_as_cancelled() {
        #[derive(Default)]
        struct Attempts(Mutex<Vec<(String, AttemptOutcome)>>);
        impl Observer for Attempts {
            fn upstream_attempt(
                &self,
                _: &str,
                provider: &str,
                outcome: AttemptOutcome,
                _: Duration,
            ) {
                self.0.lock().unwrap().push((provider.to_owned(), outcome));
            }
        }
        let attempts = Arc::new(Attempts::default());
        let target = Target {
            provider_name: "hung".to_owned(),
            provider: Arc::new(Hung),
            model: "m".to_owned(),
        };
        let route =
            Route::new("r", vec![target], RouteSettings::default()).with_observer(attempts.clone());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        // The call runs until the upstream would answer; then its client goes away.
        let _guard = runtime.enter();
        assert!(futures::FutureExt::now_or_never(route.chat(request())).is_none());
        assert_eq!(
            *attempts.0.lock().unwrap(),
            [("hung".to_owned(), AttemptOutcome::Cancelled)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_complete_call_s_attempt_that_outlasts_attempt_timeout_falls_back() {
        let spare = Flaky::new(vec![]);
        let targets = vec![
            Target {
                provider_name: "hung".to_owned(),
                provider: Arc::new(Hung),
                model: "hung".to_owned(),
            },
            Target {
                provider_name: "spare".to_owned(),
                provider: spare.clone(),
                model: "spare".to_owned(),
            },
        ];
        let settings = RouteSettings {
            timeout: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(2),
            retries: 1,
            backoff: Duration::from_millis(1),
            ..RouteSettings::default()
        };
        let started = tokio::time::Instant::now();
        let answer = Route::new("r", targets.clone(), settings)
            .chat(request())
            .await
            .unwrap();
        assert_eq!(answer.model, "spare");
        // Two attempts of 2 s on the hung target (and a backoff), not the route's 30 s.
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(4) && took < Duration::from_secs(5),
            "{took:?}"
        );

        // Without a spare, the hung target's timeouts are the error, within the route's deadline.
        let error = Route::new("r", targets[..1].to_vec(), settings)
            .chat(request())
            .await
            .unwrap_err();
        assert_eq!(error.kind, LlmErrorKind::Timeout);
        assert!(
            error
                .message
                .contains("no answer within attempt_timeout_ms (2000 ms)")
        );
    }

    #[tokio::test]
    async fn retries_5xx_then_succeeds_on_the_same_target() {
        let first = Flaky::new(vec![status(503), status(500)]);
        let answer = route(vec![("a", first.clone())], 2)
            .chat(request())
            .await
            .unwrap();
        assert_eq!(answer.model, "a");
        assert_eq!(*first.calls.lock().unwrap(), vec!["a", "a", "a"]);
    }

    #[tokio::test]
    async fn falls_back_after_retries_run_out() {
        let first = Flaky::new(vec![status(502), status(502)]);
        let second = Flaky::new(vec![]);
        let answer = route(vec![("a", first.clone()), ("b", second.clone())], 1)
            .chat_stream(request())
            .await
            .unwrap()
            .next()
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer.model, "b");
        assert_eq!(first.calls.lock().unwrap().len(), 2);
        assert_eq!(second.calls.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn client_errors_are_neither_retried_nor_fallen_back() {
        let first = Flaky::new(vec![status(400)]);
        let second = Flaky::new(vec![]);
        let error = route(vec![("a", first.clone()), ("b", second.clone())], 3)
            .chat(request())
            .await
            .unwrap_err();
        assert_eq!(
            error.kind,
            LlmErrorKind::Status {
                status: 400,
                retry_after: None
            }
        );
        assert_eq!(first.calls.lock().unwrap().len(), 1);
        assert!(second.calls.lock().unwrap().is_empty());
    }

    #[test]
    fn backoff_grows_caps_and_honours_retry_after() {
        let r = route(vec![], 0);
        let r = Route {
            settings: RouteSettings {
                backoff: Duration::from_millis(100),
                max_backoff: Duration::from_millis(300),
                ..r.settings
            },
            ..r
        };
        for _ in 0..50 {
            let first = r.backoff(0, None);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let capped = r.backoff(5, None);
            assert!(capped >= Duration::from_millis(150) && capped <= Duration::from_millis(300));
            assert_eq!(
                r.backoff(0, Some(Duration::from_secs(2))),
                Duration::from_secs(2)
            );
        }
    }
}
