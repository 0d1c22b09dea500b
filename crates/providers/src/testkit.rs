//! A test kit for chain authors: run a chain with scripted LLMs, no server, no network.
//!
//! ```text
//! let llm = ScriptedLlm::new(["Hi! How can I help?"]);
//! let chain = TestChain::load::<SupportBot>(dir)?.with_llm("default", llm.clone());
//! let reply = chain.chat(ChatRequest::new("support", vec![Message::user("hello")])).await?;
//! assert_eq!(reply.text(), "Hi! How can I help?");
//! assert!(llm.requests()[0].messages[0].text().contains("Switchyard"));
//! ```

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use switchyard_core::{
    Chain, ChainContext, ChainDefinition, ChainEntry, ChainError, ChainFolder, ChainOutput,
    ChainResources, ChatRequest, ChatResponse, ChunkStream, Llm, LlmError, LlmErrorKind, Registry,
    RequestMeta,
};

use crate::mock::{MockConfig, MockProvider};

/// An LLM that answers from a queue of scripted replies and records every request it gets, so
/// tests can assert on the prompts a chain sent. Streams split a reply into `chunks` pieces.
pub struct ScriptedLlm {
    script: Mutex<VecDeque<Result<String, LlmError>>>,
    requests: Mutex<Vec<ChatRequest>>,
    chunks: usize,
}

impl ScriptedLlm {
    pub fn new<S: Into<String>>(replies: impl IntoIterator<Item = S>) -> Arc<Self> {
        Arc::new(Self {
            script: Mutex::new(replies.into_iter().map(|r| Ok(r.into())).collect()),
            requests: Mutex::new(Vec::new()),
            chunks: 3,
        })
    }

    /// Queues a failure as the next answer.
    pub fn push_error(&self, error: LlmError) {
        lock(&self.script).push_back(Err(error));
    }

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<ChatRequest> {
        lock(&self.requests).clone()
    }

    fn next(&self, request: &ChatRequest) -> Result<MockProvider, LlmError> {
        lock(&self.requests).push(request.clone());
        let reply = lock(&self.script).pop_front().unwrap_or_else(|| {
            Err(LlmError::new(
                LlmErrorKind::BadRequest,
                "ScriptedLlm has no more scripted replies",
            ))
        })?;
        Ok(MockProvider::new(MockConfig {
            reply: Some(reply),
            chunks: self.chunks,
            latency_ms: 0,
        }))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[async_trait]
impl Llm for ScriptedLlm {
    async fn chat(&self, request: ChatRequest) -> Result<ChatResponse, LlmError> {
        self.next(&request)?.chat(request).await
    }

    async fn chat_stream(&self, mut request: ChatRequest) -> Result<ChunkStream, LlmError> {
        // Recorded as a route would send it.
        request.stream = Some(true);
        self.next(&request)?.chat_stream(request).await
    }
}

/// A chain loaded from its folder (templates and `chain.toml`), with its logical LLMs bound to
/// test doubles.
pub struct TestChain {
    chain: Arc<dyn Chain>,
    folder: ChainFolder,
    /// The chain's logical LLMs (`ChainDefinition::LLMS`): each needs a [`TestChain::with_llm`].
    needs: &'static [&'static str],
    llms: HashMap<String, Arc<dyn Llm>>,
    meta: RequestMeta,
}

impl TestChain {
    /// Loads the chain folder `dir` for chain type `C` with its own `[config]`.
    pub fn load<C: ChainDefinition>(dir: &Path) -> Result<Self, String> {
        Self::load_with_config::<C>(dir, None)
    }

    /// Like [`TestChain::load`], with config overrides merged into `[config]`.
    pub fn load_with_config<C: ChainDefinition>(
        dir: &Path,
        config_override: Option<&serde_json::Value>,
    ) -> Result<Self, String> {
        let folder = ChainFolder::load(dir)?;
        if folder.chain != C::NAME {
            return Err(format!(
                "{}: its chain.toml names the chain '{}', not '{}' (the type loaded)",
                dir.display(),
                folder.chain,
                C::NAME
            ));
        }
        // The code check is the gateway's business; tests run whatever code they compiled.
        let registry = Registry::new(vec![ChainEntry::of::<C>("")]);
        let loaded = folder
            .instantiate(&registry, config_override, &BTreeMap::new())
            .map_err(|problems| problems.join("; "))?;
        Ok(Self {
            chain: loaded.chain,
            folder,
            needs: C::LLMS,
            llms: HashMap::new(),
            meta: RequestMeta {
                endpoint: "test".to_owned(),
                request_id: "test-request".to_owned(),
                ..RequestMeta::default()
            },
        })
    }

    /// Binds logical LLM `name` to `llm` (usually a [`ScriptedLlm`]).
    pub fn with_llm(mut self, name: &str, llm: Arc<dyn Llm>) -> Self {
        self.llms.insert(name.to_owned(), llm);
        self
    }

    /// Sets the request metadata chains see.
    pub fn with_meta(mut self, meta: RequestMeta) -> Self {
        self.meta = meta;
        self
    }

    /// The context a chain gets for one request.
    pub fn context(&self) -> ChainContext {
        let resources = ChainResources {
            chain: self.folder.chain.clone(),
            prompts: self.folder.prompts.clone(),
            llms: self.llms.clone(),
            observer: None,
        };
        ChainContext::new(Arc::new(resources), self.meta.clone())
    }

    /// Runs the chain once; every LLM it has must be bound first.
    pub async fn invoke(&self, request: ChatRequest) -> Result<ChainOutput, ChainError> {
        if let Some(unbound) = self.needs.iter().find(|n| !self.llms.contains_key(**n)) {
            return Err(ChainError::internal(
                *unbound,
                format!(
                    "TestChain: the chain's LLM '{unbound}' is not bound to a test double: add \
                     .with_llm(\"{unbound}\", ScriptedLlm::new([...]))"
                ),
            ));
        }
        self.chain.invoke(&self.context(), request).await
    }

    /// Invokes the chain and collects its output into one response.
    pub async fn chat(&self, request: ChatRequest) -> Result<ChatResponse, ChainError> {
        let output = self.invoke(request).await?;
        output
            .collect()
            .await
            .map_err(|e| ChainError::new("collect", switchyard_core::ChainErrorKind::Llm(e)))
    }
}
