//! Switchyard's shared vocabulary: the OpenAI chat wire types every crate speaks, the [`Llm`]
//! trait that providers, routes (and, later, chains' LLM handles) implement, and [`LlmError`],
//! which says who is at fault when a call fails and whether trying again may help.

mod llm;
mod secret;
pub mod wire;

pub use llm::{ChunkStream, Llm, LlmError, LlmErrorKind};
pub use secret::Secret;
pub use wire::{
    ChatChunk, ChatRequest, ChatResponse, Choice, ChunkChoice, Content, Delta, Message,
    StreamOptions, Usage,
};
