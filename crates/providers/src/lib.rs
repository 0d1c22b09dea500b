//! LLM provider clients and routes.
//!
//! A provider ([`OpenAiProvider`], [`AnthropicProvider`], [`MockProvider`]) sends one request to
//! one upstream. A
//! [`Route`] is what endpoints and chains call: an ordered list of provider targets with a total
//! deadline, a time-to-first-token deadline for streams, retries with backoff and jitter, and
//! fallback to the next target. All of them implement [`switchyard_core::Llm`].

mod anthropic;
mod capped;
mod http;
mod http1;
mod mock;
mod openai;
mod route;
pub mod testkit;
mod upstream;

pub use anthropic::AnthropicProvider;
pub use capped::{Capped, Slots};
pub use http::{HttpClient, HttpClientError, TraceHeaders};
pub use mock::{MockConfig, MockProvider, count_tokens};
pub use openai::OpenAiProvider;
pub use route::{Route, RouteSettings, Target};
