//! [`ChainContext`]: everything a chain may touch while it serves one request.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use futures::StreamExt;
use serde::Serialize;
use tracing::{Instrument, debug, info_span};

use crate::chain::{ChainError, ChainErrorKind, ChainOutput};
use crate::llm::{ChunkStream, Llm};
use crate::observe::{Observer, RequestStats};
use crate::prompts::Prompts;
use crate::wire::{ChatRequest, ChatResponse, Usage};

/// Who is asking: request metadata a chain may read (e.g. to personalise a prompt).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RequestMeta {
    /// The endpoint the client called.
    pub endpoint: String,
    pub request_id: String,
    /// The id (never the secret) of the API key that authenticated the request.
    pub api_key_id: Option<String>,
    /// The end user (`x-switchyard-user` header, or the request's `user` field).
    pub user: Option<String>,
}

/// What a loaded chain shares across requests: its templates and its logical LLMs.
pub struct ChainResources {
    pub chain: String,
    pub prompts: Prompts,
    pub llms: HashMap<String, Arc<dyn Llm>>,
    /// Where step durations and errors go (metrics); `None` in tests.
    pub observer: Option<Arc<dyn Observer>>,
}

/// The only thing a chain touches: logical LLMs, templates, request metadata. Cheap to create
/// per request (two `Arc`s and the metadata). Clones share one count of tokens used.
#[derive(Clone)]
pub struct ChainContext {
    resources: Arc<ChainResources>,
    meta: RequestMeta,
    tokens_used: Arc<TokensUsed>,
}

/// The usage reported for a context's LLM calls, summed.
#[derive(Default)]
struct TokensUsed {
    prompt: AtomicU64,
    completion: AtomicU64,
    total: AtomicU64,
}

impl TokensUsed {
    /// Adds what `usage` reports beyond `before` (a stream's usage reported so far, counted
    /// already; zero for a complete answer).
    fn add(&self, usage: &Usage, before: &Usage) {
        for (count, now, then) in [
            (&self.prompt, usage.prompt_tokens, before.prompt_tokens),
            (
                &self.completion,
                usage.completion_tokens,
                before.completion_tokens,
            ),
            (&self.total, usage.total_tokens, before.total_tokens),
        ] {
            count.fetch_add(now.saturating_sub(then), Ordering::Relaxed);
        }
    }
}

impl ChainContext {
    pub fn new(resources: Arc<ChainResources>, meta: RequestMeta) -> Self {
        Self {
            resources,
            meta,
            tokens_used: Arc::default(),
        }
    }

    pub fn meta(&self) -> &RequestMeta {
        &self.meta
    }

    /// The tokens (`usage.total_tokens`) the upstream reported for this context's LLM calls so
    /// far: complete answers when they arrive, streams when their usage chunk passes. The
    /// gateway settles token limits with it when a chain fails after some of its calls, or
    /// reports less usage than its calls had.
    pub fn tokens_used(&self) -> u64 {
        self.tokens_used.total.load(Ordering::Relaxed)
    }

    /// The same count by direction: the usage of all this context's LLM calls together (a
    /// chain's own answer may report only its last call's), for the request's log line and
    /// token metrics.
    pub fn usage(&self) -> Usage {
        let used = &self.tokens_used;
        let mut usage = Usage::new(
            used.prompt.load(Ordering::Relaxed),
            used.completion.load(Ordering::Relaxed),
        );
        usage.total_tokens = used.total.load(Ordering::Relaxed);
        usage
    }

    /// A handle to the logical LLM `name` (mapped to a gateway route by `chain.toml`'s `[llms]`).
    /// Calls through the handle are traced as a step named after the LLM.
    pub fn llm(&self, name: &str) -> Result<LlmHandle<'_>, ChainError> {
        let llm = self.resources.llms.get(name).ok_or_else(|| {
            let mut known: Vec<&str> = self.resources.llms.keys().map(String::as_str).collect();
            known.sort_unstable();
            ChainError::internal(
                name,
                format!(
                    "no LLM named '{name}' in this chain's [llms] (known: {})",
                    known.join(", ")
                ),
            )
        })?;
        Ok(LlmHandle {
            ctx: self,
            name: name.to_owned(),
            llm: llm.as_ref(),
        })
    }

    /// Renders template `name` (`prompts/<name>.tera` of the loaded chain) with `vars`. Strict:
    /// an undefined variable is an error; nothing is HTML-escaped.
    pub fn render(&self, name: &str, vars: &impl Serialize) -> Result<String, ChainError> {
        let _span =
            info_span!("chain.render", chain = %self.resources.chain, template = name).entered();
        let start = Instant::now();
        let step = format!("render:{name}");
        let rendered = self.resources.prompts.render(name, vars);
        self.step_done(&step, start, rendered.is_ok());
        rendered.map_err(|message| ChainError::new(step, ChainErrorKind::Template(message)))
    }

    fn step_done(&self, step: &str, start: Instant, ok: bool) {
        if let Some(observer) = &self.resources.observer {
            observer.chain_step(&self.resources.chain, step, start.elapsed(), ok);
        }
    }
}

/// A logical LLM of a chain; each call is one traced step.
pub struct LlmHandle<'a> {
    ctx: &'a ChainContext,
    name: String,
    llm: &'a dyn Llm,
}

impl LlmHandle<'_> {
    /// The step's span, with OpenTelemetry GenAI attributes where they fit.
    fn span(&self, stream: bool) -> tracing::Span {
        info_span!(
            "chain.llm",
            chain = %self.ctx.resources.chain,
            step = %self.name,
            endpoint = %self.ctx.meta.endpoint,
            request_id = %self.ctx.meta.request_id,
            stream,
            "gen_ai.operation.name" = "chat",
            "gen_ai.usage.input_tokens" = tracing::field::Empty,
            "gen_ai.usage.output_tokens" = tracing::field::Empty,
            "error.type" = tracing::field::Empty,
            "otel.status_code" = tracing::field::Empty,
        )
    }

    fn error(&self, error: crate::LlmError) -> ChainError {
        // (A route notes its own failures; this covers any other `Llm`.)
        RequestStats::record_failure(&error);
        ChainError::new(self.name.clone(), ChainErrorKind::Llm(error))
    }

    /// A complete chat completion.
    pub async fn chat(&self, request: ChatRequest) -> Result<ChatResponse, ChainError> {
        let start = Instant::now();
        async {
            let result = self.llm.chat(request).await;
            let usage = result
                .as_ref()
                .ok()
                .and_then(|r| r.usage.clone())
                .unwrap_or_default();
            self.ctx.tokens_used.add(&usage, &Usage::default());
            let span = tracing::Span::current();
            record_usage(&span, &usage);
            if let Err(error) = &result {
                record_failure(&span, error);
            }
            debug!(
                latency_ms = start.elapsed().as_secs_f64() * 1000.0,
                prompt_tokens = usage.prompt_tokens,
                completion_tokens = usage.completion_tokens,
                ok = result.is_ok(),
                "chain step done"
            );
            self.ctx.step_done(&self.name, start, result.is_ok());
            result.map_err(|e| self.error(e))
        }
        .instrument(self.span(false))
        .await
    }

    /// Answers the client the way it asked: `call` streams (with the client's `stream_options`)
    /// when `client` is a streaming request, and is a complete response otherwise. What the
    /// client asked of the answer and `call` leaves unset goes with it: its length cap
    /// (`max_tokens` or `max_completion_tokens`, unless `call` has one) and every other option
    /// (`temperature`, `tools`, `response_format`, `seed`, `n`, …). What `call` sets wins.
    pub async fn answer(
        &self,
        mut call: ChatRequest,
        client: &ChatRequest,
    ) -> Result<ChainOutput, ChainError> {
        if call.max_tokens.is_none() && call.max_completion_tokens.is_none() {
            call.max_tokens = client.max_tokens;
            call.max_completion_tokens = client.max_completion_tokens;
        }
        for (field, value) in &client.extra {
            if !call.extra.contains_key(field) {
                call.extra.insert(field.clone(), value.clone());
            }
        }
        if client.is_stream() {
            call.stream_options.clone_from(&client.stream_options);
            Ok(ChainOutput::Stream(self.chat_stream(call).await?))
        } else {
            Ok(ChainOutput::Response(self.chat(call).await?))
        }
    }

    /// A streaming chat completion; returns once the first chunk is there.
    pub async fn chat_stream(&self, request: ChatRequest) -> Result<ChunkStream, ChainError> {
        let start = Instant::now();
        let span = self.span(true);
        let stream = self.llm.chat_stream(request).instrument(span.clone()).await;
        // A streamed step is timed to its first chunk: the rest is paced by the client.
        self.ctx.step_done(&self.name, start, stream.is_ok());
        let stream = stream.map_err(|e| {
            record_failure(&span, &e);
            self.error(e)
        })?;
        span.in_scope(|| {
            debug!(
                time_to_first_chunk_ms = start.elapsed().as_secs_f64() * 1000.0,
                "chain step streaming"
            )
        });
        let step = self.name.clone();
        // The count only, not the whole context (its metadata's strings).
        let tokens_used = self.ctx.tokens_used.clone();
        // Some servers report the usage so far on every chunk (vLLM's `continuous_usage_stats`):
        // only what a report adds to the last one is counted.
        let mut counted = Usage::default();
        // Stream errors are LLM errors of this step; the message says which step broke off. The
        // step's span lasts as long as its stream, and gets its usage or its failure.
        // The exported span ends when it was last exited: entered once more when the stream is
        // dropped (at its end, or when its client left), it ends then.
        let span = EndOnDrop(span);
        Ok(Box::pin(stream.map(move |item| {
            let span = &span.0;
            match item {
                Ok(chunk) => {
                    if let Some(usage) = &chunk.usage {
                        tokens_used.add(usage, &counted);
                        counted.prompt_tokens = counted.prompt_tokens.max(usage.prompt_tokens);
                        counted.completion_tokens =
                            counted.completion_tokens.max(usage.completion_tokens);
                        counted.total_tokens = counted.total_tokens.max(usage.total_tokens);
                        record_usage(span, &counted);
                    }
                    Ok(chunk)
                }
                Err(mut e) => {
                    // A step's stream that broke off: what it generated is not reported.
                    RequestStats::record_failure(&e);
                    record_failure(span, &e);
                    e.message = format!("chain step '{step}': {}", e.message);
                    Err(e)
                }
            }
        })))
    }
}

/// A span that, when this is dropped, is entered and exited once more: tracing-opentelemetry
/// ends an exported span at its last exit, not when it closes.
struct EndOnDrop(tracing::Span);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.in_scope(|| {});
    }
}

/// A step's tokens on its span (as integers: tracing-opentelemetry exports unsigned values as
/// strings).
fn record_usage(span: &tracing::Span, usage: &Usage) {
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    span.record("gen_ai.usage.input_tokens", count(usage.prompt_tokens));
    span.record("gen_ai.usage.output_tokens", count(usage.completion_tokens));
}

/// A failed step on its span: an error status and the error's type.
fn record_failure(span: &tracing::Span, error: &crate::LlmError) {
    span.record("error.type", &*error.kind.error_type());
    span.record("otel.status_code", "error");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{ChatChunk, Delta, Message, Usage};
    use crate::{LlmError, LlmErrorKind};
    use async_trait::async_trait;

    /// Answers with `usage`, streams a content chunk then a usage chunk, or fails. A
    /// `cumulative` stream reports the usage so far on its content chunk too.
    struct Fixed {
        usage: Usage,
        fail: Option<LlmErrorKind>,
        cumulative: bool,
    }

    #[async_trait]
    impl Llm for Fixed {
        async fn chat(&self, _: ChatRequest) -> Result<ChatResponse, LlmError> {
            if let Some(kind) = &self.fail {
                return Err(LlmError::new(kind.clone(), "no"));
            }
            Ok(ChatResponse::assistant(
                "1",
                "m",
                0,
                "hi",
                self.usage.clone(),
            ))
        }

        async fn chat_stream(&self, _: ChatRequest) -> Result<ChunkStream, LlmError> {
            let mut content = ChatChunk::delta("1", "m", 0, Delta::content("hi"), None);
            if self.cumulative {
                content.usage = Some(Usage::new(self.usage.prompt_tokens, 1));
            }
            let chunks = vec![
                Ok(content),
                Ok(ChatChunk::usage("1", "m", 0, self.usage.clone())),
            ];
            Ok(Box::pin(futures::stream::iter(chunks)))
        }
    }

    #[tokio::test]
    async fn counts_the_tokens_of_answers_and_of_streams_once_their_usage_chunk_passes() {
        let llm = |prompt, completion, fail, cumulative| -> Arc<dyn Llm> {
            Arc::new(Fixed {
                usage: Usage::new(prompt, completion),
                fail,
                cumulative,
            })
        };
        let resources = ChainResources {
            chain: "c".to_owned(),
            prompts: Prompts::from_sources([]).unwrap(),
            llms: HashMap::from([
                ("a".to_owned(), llm(10, 4, None, false)),
                ("b".to_owned(), llm(20, 3, None, false)),
                ("c".to_owned(), llm(5, 2, None, true)),
                (
                    "broken".to_owned(),
                    llm(1, 1, Some(LlmErrorKind::BadRequest), false),
                ),
                (
                    "slow".to_owned(),
                    llm(1, 1, Some(LlmErrorKind::Timeout), false),
                ),
            ]),
            observer: None,
        };
        let ctx = ChainContext::new(Arc::new(resources), RequestMeta::default());
        let request = || ChatRequest::new("m", vec![Message::user("x")]);

        ctx.llm("a").unwrap().chat(request()).await.unwrap();
        assert_eq!(ctx.tokens_used(), 14);
        assert!(ctx.llm("broken").unwrap().chat(request()).await.is_err());
        assert_eq!(ctx.tokens_used(), 14, "a failed call reports no usage");

        let mut stream = ctx.llm("b").unwrap().chat_stream(request()).await.unwrap();
        stream.next().await.unwrap().unwrap();
        assert_eq!(ctx.tokens_used(), 14, "not before the usage chunk");
        stream.next().await.unwrap().unwrap();
        assert_eq!(ctx.tokens_used(), 37);
        assert_eq!(ctx.clone().tokens_used(), 37, "clones share the count");
        let usage = ctx.usage();
        assert_eq!(
            (
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.total_tokens
            ),
            (30, 7, 37),
            "by direction too"
        );

        // Usage so far on every chunk (6, then 7 in all): counted once.
        let mut stream = ctx.llm("c").unwrap().chat_stream(request()).await.unwrap();
        stream.next().await.unwrap().unwrap();
        assert_eq!(ctx.tokens_used(), 37 + 6);
        stream.next().await.unwrap().unwrap();
        assert_eq!(ctx.tokens_used(), 37 + 7);

        // A call that timed out may have been generated and billed: the request's count is a
        // lower bound. One that was refused generated nothing.
        let stats = Arc::new(RequestStats::default());
        RequestStats::scope(stats.clone(), async {
            assert!(ctx.llm("broken").unwrap().chat(request()).await.is_err());
        })
        .await;
        assert!(!stats.maybe_generated());
        RequestStats::scope(stats.clone(), async {
            assert!(ctx.llm("slow").unwrap().chat(request()).await.is_err());
        })
        .await;
        assert_eq!(ctx.tokens_used(), 37 + 7);
        assert!(stats.maybe_generated());
    }
}
