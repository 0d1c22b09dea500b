//! Switchyard's shared vocabulary: the OpenAI chat wire types every crate speaks, the [`Llm`]
//! trait that providers and routes implement, [`LlmError`] (who is at fault, retryable or not),
//! and the chain API: [`Chain`], [`ChainContext`], prompt templates, chain folders and the
//! registry of compiled chains.

mod chain;
pub mod chain_dir;
pub mod code_hash;
mod context;
mod llm;
mod observe;
mod prompts;
mod secret;
mod util;
pub mod wire;

pub use chain::{
    Chain, ChainDefinition, ChainEntry, ChainError, ChainErrorKind, ChainOutput, Registry,
};
pub use chain_dir::{ChainFolder, LoadedChain};
pub use context::{ChainContext, ChainResources, LlmHandle, RequestMeta};
pub use llm::{ChunkBodyStream, ChunkStream, Llm, LlmError, LlmErrorKind};
pub use observe::{AttemptOutcome, Observer, RequestStats};
pub use prompts::Prompts;
pub use secret::Secret;
pub use util::{error_chain, json_from_bytes, unix_now};
pub use wire::{
    ChatChunk, ChatRequest, ChatResponse, Choice, ChunkBody, ChunkChoice, CompletionBody, Content,
    Delta, Message, StreamOptions, Usage,
};
