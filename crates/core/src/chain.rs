//! Chains: LLM programs written in Rust, served as chat endpoints.
//!
//! A chain implements [`Chain`] (what it does with a request) and [`ChainDefinition`] (its
//! name, typed config, and the templates and logical LLMs it needs). The `chains` crate lists
//! every compiled chain in a [`Registry`] of [`ChainEntry`]s, each with the `code_sha256` of its
//! source folder, so a loader can check that a chain folder is the code compiled in.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use serde::de::DeserializeOwned;

use crate::context::ChainContext;
use crate::llm::{ChunkStream, LlmError};
use crate::wire::{ChatRequest, ChatResponse, Usage};

/// What a chain returns: a complete response or a stream of chunks. The gateway adapts either to
/// what the client asked for (a response can be streamed as chunks, a stream can be collected).
// One per request, moved a couple of times: boxing the response would cost an allocation for
// nothing.
#[allow(clippy::large_enum_variant)]
pub enum ChainOutput {
    Response(ChatResponse),
    Stream(ChunkStream),
}

impl fmt::Debug for ChainOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChainOutput::Response(response) => f.debug_tuple("Response").field(response).finish(),
            ChainOutput::Stream(_) => f.write_str("Stream(..)"),
        }
    }
}

/// An LLM chain. Implementations get everything they may touch through the [`ChainContext`].
#[async_trait]
pub trait Chain: Send + Sync {
    async fn invoke(
        &self,
        ctx: &ChainContext,
        request: ChatRequest,
    ) -> Result<ChainOutput, ChainError>;
}

/// The static description of a chain type: how the registry builds it from its config.
pub trait ChainDefinition: Chain + Sized + 'static {
    /// The chain's name: its folder name under `chains/`.
    const NAME: &'static str;
    /// Templates (`prompts/<name>.tera`) the chain renders; loading fails if one is missing.
    const TEMPLATES: &'static [&'static str];
    /// Logical LLM names the chain calls; `chain.toml`'s `[llms]` must map each to a route.
    const LLMS: &'static [&'static str];
    /// The typed config (`[config]` in `chain.toml`); use `#[serde(deny_unknown_fields)]`.
    type Config: DeserializeOwned;

    fn new(config: Self::Config) -> Self;
}

/// A failure inside a chain, naming the step that failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("chain step '{step}' failed: {kind}")]
pub struct ChainError {
    pub step: String,
    pub kind: ChainErrorKind,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ChainErrorKind {
    /// An LLM call failed (after the route's retries and fallbacks).
    #[error("{0}")]
    Llm(LlmError),
    /// A template failed to render (e.g. an undefined variable).
    #[error("template error: {0}")]
    Template(String),
    /// The client's request cannot be served by this chain.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A bug or broken invariant in the chain.
    #[error("{0}")]
    Internal(String),
}

impl ChainError {
    pub fn new(step: impl Into<String>, kind: ChainErrorKind) -> Self {
        Self {
            step: step.into(),
            kind,
        }
    }

    pub fn invalid_request(step: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(step, ChainErrorKind::InvalidRequest(message.into()))
    }

    pub fn internal(step: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(step, ChainErrorKind::Internal(message.into()))
    }
}

type BuildFn = fn(serde_json::Value) -> Result<Arc<dyn Chain>, String>;

/// One compiled chain in the registry.
#[derive(Clone)]
pub struct ChainEntry {
    pub name: &'static str,
    /// SHA-256 of the chain folder's `.rs` files as compiled into this binary.
    pub code_sha256: &'static str,
    pub templates: &'static [&'static str],
    pub llms: &'static [&'static str],
    build: BuildFn,
}

impl fmt::Debug for ChainEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChainEntry")
            .field("name", &self.name)
            .field("code_sha256", &self.code_sha256)
            .finish_non_exhaustive()
    }
}

impl ChainEntry {
    /// The entry for chain type `C`, whose compiled code hashes to `code_sha256`.
    pub fn of<C: ChainDefinition>(code_sha256: &'static str) -> Self {
        Self {
            name: C::NAME,
            code_sha256,
            templates: C::TEMPLATES,
            llms: C::LLMS,
            build: |config| {
                let config: C::Config = serde_path_to_error::deserialize(config).map_err(|e| {
                    let path = e.path().to_string();
                    if path == "." {
                        e.into_inner().to_string()
                    } else {
                        format!("{path}: {}", e.into_inner())
                    }
                })?;
                Ok(Arc::new(C::new(config)))
            },
        }
    }

    /// Builds the chain from its config, which is type-checked against the chain's config struct
    /// (unknown keys are errors).
    pub fn build(&self, config: serde_json::Value) -> Result<Arc<dyn Chain>, String> {
        (self.build)(config)
    }
}

/// Every chain compiled into the binary.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    entries: Vec<ChainEntry>,
}

impl Registry {
    pub fn new(entries: Vec<ChainEntry>) -> Self {
        Self { entries }
    }

    pub fn get(&self, name: &str) -> Option<&ChainEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    pub fn entries(&self) -> &[ChainEntry] {
        &self.entries
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.entries.iter().map(|e| e.name).collect()
    }
}

impl ChainOutput {
    /// Adds `extra` (e.g. the usage of earlier steps) to the output's usage: the response's, or
    /// the stream's usage chunk if it has one.
    pub fn add_usage(self, extra: &Usage) -> Self {
        let extra = extra.clone();
        match self {
            ChainOutput::Response(mut response) => {
                if let Some(usage) = response.usage.as_mut() {
                    usage.add(&extra);
                }
                ChainOutput::Response(response)
            }
            ChainOutput::Stream(stream) => {
                use futures::StreamExt;
                ChainOutput::Stream(Box::pin(stream.map(move |chunk| {
                    chunk.map(|mut chunk| {
                        if let Some(usage) = chunk.usage.as_mut() {
                            usage.add(&extra);
                        }
                        chunk
                    })
                })))
            }
        }
    }

    /// The output as one response; a stream is collected (content joined, last finish reason,
    /// usage from the usage chunk). Tool-call deltas are not merged.
    pub async fn collect(self) -> Result<ChatResponse, LlmError> {
        match self {
            ChainOutput::Response(response) => Ok(response),
            ChainOutput::Stream(stream) => collect_stream(stream).await,
        }
    }

    /// The output as a stream; a response becomes a role+content chunk, a finish chunk, and a usage
    /// chunk when `include_usage`.
    pub fn into_stream(self, include_usage: bool) -> ChunkStream {
        match self {
            ChainOutput::Stream(stream) => stream,
            ChainOutput::Response(response) => Box::pin(futures::stream::iter(
                response_chunks(response, include_usage).into_iter().map(Ok),
            )),
        }
    }
}

async fn collect_stream(mut stream: ChunkStream) -> Result<ChatResponse, LlmError> {
    use futures::StreamExt;
    let mut text = String::new();
    let mut first: Option<crate::wire::ChatChunk> = None;
    let mut finish_reason = None;
    let mut usage = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        text.push_str(chunk.text());
        if let Some(reason) = chunk.choices.first().and_then(|c| c.finish_reason.clone()) {
            finish_reason = Some(reason);
        }
        if chunk.usage.is_some() {
            usage.clone_from(&chunk.usage);
        }
        first.get_or_insert(chunk);
    }
    let first =
        first.unwrap_or_else(|| crate::wire::ChatChunk::delta("", "", 0, Default::default(), None));
    let mut response =
        ChatResponse::assistant(first.id, first.model, first.created, text, Usage::default());
    response.usage = usage;
    if let Some(choice) = response.choices.first_mut() {
        choice.finish_reason = finish_reason;
    }
    Ok(response)
}

fn response_chunks(response: ChatResponse, include_usage: bool) -> Vec<crate::wire::ChatChunk> {
    use crate::wire::{ChatChunk, Delta};
    let chunk = |delta, finish: Option<&str>| {
        ChatChunk::delta(
            response.id.clone(),
            response.model.clone(),
            response.created,
            delta,
            finish,
        )
    };
    let choice = response.choices.first();
    let delta = Delta {
        role: Some(choice.map_or_else(|| "assistant".to_owned(), |c| c.message.role.clone())),
        content: Some(response.text()),
        ..Delta::default()
    };
    let finish = choice
        .and_then(|c| c.finish_reason.as_deref())
        .unwrap_or("stop");
    let mut chunks = vec![chunk(delta, None), chunk(Delta::default(), Some(finish))];
    if let Some(usage) = response.usage.clone().filter(|_| include_usage) {
        chunks.push(ChatChunk::usage(
            response.id.clone(),
            response.model.clone(),
            response.created,
            usage,
        ));
    }
    chunks
}
