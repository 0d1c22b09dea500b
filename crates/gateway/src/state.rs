//! Building the live state of a gateway from a config: providers, routes and endpoints, with
//! chains loaded from their folders or from the model store.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::{Mutex, PoisonError};

use serde_json::{Value, json};
use switchyard_core::{
    Chain, ChainFolder, ChainResources, Llm, LoadedChain, Observer, Registry, Secret,
};
use switchyard_providers::{
    AnthropicProvider, Capped, HttpClient, MockProvider, OpenAiProvider, Route, Slots, Target,
};
use switchyard_serving::OnnxModel;
use switchyard_store::{ModelUri, ModelVersion, Store};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::config::{
    ApiKeyConfig, ChainEndpointConfig, ChainSource, Config, EndpointKind, ProviderKind,
};
use crate::limits::{Backend, Limits};
use crate::metrics::Metrics;

/// One generation of the gateway's state. Requests hold an `Arc` to the generation they
/// started on, so a reload never changes what an in-flight request sees.
pub(crate) struct Snapshot {
    pub endpoints: HashMap<String, Endpoint>,
    /// Endpoint names in config order, for `GET /v1/models`.
    pub endpoint_order: Vec<String>,
    /// What `GET /admin/endpoints` shows, in config order.
    pub endpoint_infos: Vec<Value>,
    pub admin_key: Option<Secret>,
    /// Client API keys; empty = open gateway. Shared, so that a request can keep its key
    /// without keeping the whole snapshot.
    pub keys: Vec<Arc<ApiKeyConfig>>,
    pub protect_metrics: bool,
    /// Endpoints whose request log lines carry the messages and the completion.
    pub log_payloads: std::collections::HashSet<String>,
    pub limits: Limits,
    pub loaded_at: u64,
    /// Providers' concurrency caps as this generation sets them, applied when it goes live.
    caps: Vec<(Arc<Slots>, usize)>,
}

impl Snapshot {
    /// One line per endpoint that serves a chain whose code is not the code compiled into this
    /// binary (a chain folder under development, or a logged version allowed to differ).
    pub(crate) fn code_warnings(&self) -> Vec<String> {
        self.endpoint_infos
            .iter()
            .filter(|info| info["code_matches"] == false)
            .map(|info| {
                format!(
                    "endpoint '{}' serves chain '{}' with code that differs from the code \
                     compiled into this binary (rebuild to serve it as it is now)",
                    info["name"].as_str().unwrap_or_default(),
                    info["chain"].as_str().unwrap_or_default()
                )
            })
            .collect()
    }

    /// Sets the providers' caps this generation was built with (calls in flight keep their
    /// slots and count against the new caps).
    pub(crate) fn apply_caps(&self) {
        for (slots, max) in &self.caps {
            slots.resize(*max);
        }
    }
}

/// A servable endpoint.
#[derive(Clone)]
pub(crate) enum Endpoint {
    Route(Arc<Route>),
    Chain(Arc<ChainEndpoint>),
    /// A logged artifact model (ONNX), served at `/endpoints/{name}/invocations`.
    Model(Arc<OnnxModel>),
}

impl Endpoint {
    /// What the endpoint serves, as logs and metrics name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Route(_) => "route",
            Self::Chain(_) => "chain",
            Self::Model(_) => "model",
        }
    }
}

/// A loaded chain with its templates and logical LLMs bound to routes.
pub(crate) struct ChainEndpoint {
    pub chain: Arc<dyn Chain>,
    pub resources: Arc<ChainResources>,
}

/// What outlives config generations: every build uses it, reloads keep it.
pub(crate) struct Lasting {
    pub registry: Registry,
    pub client: Arc<HttpClient>,
    pub metrics: Arc<Metrics>,
    /// Concurrency-cap slots per provider: a reload keeps them (resized to a changed
    /// `max_concurrency`), so calls in flight still count against the cap.
    provider_slots: Mutex<HashMap<String, Arc<Slots>>>,
    /// Model inference runs on blocking threads, at most one per core at a time: more would only
    /// add threads (and their memory) competing for the same cores. Excess requests wait.
    pub inference_slots: Arc<Semaphore>,
    /// The same for predictions expected to be small, so that they do not wait behind large
    /// batches (and still cannot start a thread each).
    pub small_inference_slots: Arc<Semaphore>,
}

impl Lasting {
    pub fn new(registry: Registry, client: Arc<HttpClient>, metrics: Arc<Metrics>) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Self {
            registry,
            client,
            metrics,
            provider_slots: Mutex::new(HashMap::new()),
            inference_slots: Arc::new(Semaphore::new(cores)),
            small_inference_slots: Arc::new(Semaphore::new(cores)),
        }
    }

    /// The provider's slots, made with `max` if it has none yet (a reload resizes them when
    /// its new snapshot goes live: [`Snapshot::apply_caps`]).
    fn slots(&self, provider: &str, max: usize) -> Arc<Slots> {
        self.provider_slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(provider.to_owned())
            .or_insert_with(|| Slots::new(max))
            .clone()
    }
}

/// Builds a snapshot. The config has been validated, so the names it uses exist; chain
/// endpoints are loaded and checked, and every endpoint that fails is reported.
pub(crate) fn build(
    config: &Config,
    lasting: &Lasting,
    limiter: Arc<Backend>,
) -> Result<Snapshot, Vec<String>> {
    let (registry, client, metrics) = (&lasting.registry, &lasting.client, &lasting.metrics);
    let observer: Arc<dyn Observer> = metrics.clone();
    let mut problems = Vec::new();
    let mut providers: HashMap<&str, Arc<dyn Llm>> = HashMap::new();
    let mut caps = Vec::new();
    for (name, provider) in &config.providers {
        let mut llm: Arc<dyn Llm> = match &provider.kind {
            ProviderKind::OpenAi {
                base_url,
                api_key,
                stream_usage,
            } => {
                match OpenAiProvider::new(name.clone(), client.clone(), base_url, api_key.clone()) {
                    Ok(openai) => Arc::new(openai.with_stream_usage(*stream_usage)),
                    Err(e) => {
                        problems.push(format!("provider '{name}': {e}"));
                        continue;
                    }
                }
            }
            ProviderKind::Anthropic { base_url, api_key } => {
                match AnthropicProvider::new(
                    name.clone(),
                    client.clone(),
                    base_url,
                    api_key.clone(),
                ) {
                    Ok(anthropic) => Arc::new(anthropic),
                    Err(e) => {
                        problems.push(format!("provider '{name}': {e}"));
                        continue;
                    }
                }
            }
            ProviderKind::Mock(mock) => Arc::new(MockProvider::new(mock.clone())),
        };
        if let Some(cap) = provider.concurrency {
            let slots = lasting.slots(name, cap.max);
            caps.push((slots.clone(), cap.max));
            llm = Arc::new(
                Capped::with_slots(name.clone(), llm, slots.clone(), cap.queue_timeout)
                    .with_observer(observer.clone()),
            );
        }
        providers.insert(name.as_str(), llm);
    }
    let routes: HashMap<&str, Arc<Route>> = config
        .routes
        .iter()
        .map(|(name, route)| {
            let targets = route
                .targets
                .iter()
                .filter_map(|target| {
                    Some(Target {
                        provider_name: target.provider.clone(),
                        provider: providers.get(target.provider.as_str())?.clone(),
                        model: target.model.clone(),
                    })
                })
                .collect();
            (
                name.as_str(),
                Arc::new(
                    Route::new(name.clone(), targets, route.settings)
                        .with_observer(observer.clone()),
                ),
            )
        })
        .collect();

    let store = Store::new(&config.store);
    let mut endpoints = HashMap::new();
    let mut infos = Vec::new();
    for endpoint in &config.endpoints {
        let started = std::time::Instant::now();
        let built = match &endpoint.kind {
            EndpointKind::Route(route) => routes
                .get(route.as_str())
                .map(|r| {
                    (
                        Endpoint::Route(r.clone()),
                        json!({"kind": "route", "route": route}),
                    )
                })
                .ok_or_else(|| vec![format!("unknown route '{route}'")]),
            EndpointKind::Chain(chain) => {
                // A logged version is resolved once; its flavor says chain or ONNX model.
                let version = match &chain.source {
                    ChainSource::Logged(uri) => match store.resolve(uri) {
                        Ok(version) => Some(version),
                        Err(e) => {
                            problems.push(format!("endpoint '{}': {e}", endpoint.name));
                            continue;
                        }
                    },
                    ChainSource::Dir(_) => None,
                };
                match version {
                    Some(version) if version.mlmodel.onnx_data().is_some() => {
                        load_onnx(chain, &version, &store)
                            .map(|(model, info)| (Endpoint::Model(model), info))
                    }
                    version => load_chain(
                        chain,
                        config.allow_code_mismatch,
                        version.as_ref(),
                        registry,
                        &store,
                        &routes,
                        &observer,
                    )
                    .map(|(built, info)| (Endpoint::Chain(built), info)),
                }
            }
        };
        match built {
            Ok((built, mut info)) => {
                // Start-up and reloads say what each endpoint serves as they go: loading a
                // large ONNX model takes a while.
                let source = ["resolved", "chain_dir", "route"]
                    .into_iter()
                    .find_map(|field| info.get(field).and_then(Value::as_str))
                    .unwrap_or_default();
                info!(
                    endpoint = %endpoint.name,
                    kind = built.kind(),
                    source,
                    load_ms = started.elapsed().as_millis() as u64,
                    "endpoint loaded"
                );
                if let Some(object) = info.as_object_mut() {
                    object.insert("name".to_owned(), json!(endpoint.name));
                }
                infos.push(info);
                endpoints.insert(endpoint.name.clone(), built);
            }
            Err(reasons) => problems.extend(
                reasons
                    .into_iter()
                    .map(|reason| format!("endpoint '{}': {reason}", endpoint.name)),
            ),
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Snapshot {
        endpoint_order: config.endpoints.iter().map(|e| e.name.clone()).collect(),
        endpoints,
        endpoint_infos: infos,
        admin_key: config.auth.admin_key.clone(),
        keys: config.auth.keys.iter().cloned().map(Arc::new).collect(),
        protect_metrics: config.auth.protect_metrics,
        log_payloads: config
            .endpoints
            .iter()
            .filter(|e| e.log_payloads)
            .map(|e| e.name.clone())
            .collect(),
        limits: Limits::new(&config.limits, limiter, metrics.clone()),
        caps,
        loaded_at: switchyard_core::unix_now(),
    })
}

/// Loads a chain endpoint (from the store or a folder) and binds its logical LLMs to routes.
/// A loaded endpoint and what `/admin/endpoints` says of it, or every reason it failed.
type Loaded<T> = Result<(Arc<T>, Value), Vec<String>>;

/// A `model = "models:/…"` endpoint whose version is an ONNX model: loaded and checked.
fn load_onnx(
    endpoint: &ChainEndpointConfig,
    version: &ModelVersion,
    store: &Store,
) -> Loaded<OnnxModel> {
    if endpoint.config.is_some() || !endpoint.llms.is_empty() || endpoint.allow_code_mismatch {
        return Err(vec![format!(
            "{} is an ONNX model: `config`, `llms` and `allow_code_mismatch` apply to chains only",
            version.uri()
        )]);
    }
    let path = store
        .verify_onnx(version)
        .map_err(|e| vec![e.to_string()])?;
    let model = OnnxModel::load(&path).map_err(|e| vec![e.to_string()])?;
    let uri = match &endpoint.source {
        ChainSource::Logged(uri) => uri.to_string(),
        ChainSource::Dir(_) => version.uri(),
    };
    let info = json!({
        "kind": "model",
        "uri": uri,
        "resolved": version.uri(),
        "version": version.version,
        "model_uuid": version.mlmodel.model_uuid,
        "content_sha256": version.mlmodel.content_sha256(),
        "inputs": model.inputs().iter().map(|i| json!({
            "name": i.name, "dtype": i.dtype.name(), "shape": [-1, i.width as i64],
        })).collect::<Vec<_>>(),
        "outputs": model.output_names(),
    });
    Ok((Arc::new(model), info))
}

fn load_chain(
    endpoint: &ChainEndpointConfig,
    allow_any_mismatch: bool,
    version: Option<&ModelVersion>,
    registry: &Registry,
    store: &Store,
    routes: &HashMap<&str, Arc<Route>>,
    observer: &Arc<dyn Observer>,
) -> Loaded<ChainEndpoint> {
    let (folder, mut info) = match (&endpoint.source, version) {
        (ChainSource::Dir(dir), _) => (
            ChainFolder::load(dir).map_err(|e| vec![e])?,
            json!({"chain_dir": dir}),
        ),
        (ChainSource::Logged(uri), Some(version)) => load_logged(uri, version, store)?,
        // The caller resolves logged versions first.
        (ChainSource::Logged(uri), None) => return Err(vec![format!("{uri} was not resolved")]),
    };
    // Where the chain comes from, as its problems name it: the folder, or the logged version
    // (not its folder inside the store, which is not to be edited).
    let origin = match (&endpoint.source, version) {
        (ChainSource::Logged(uri), Some(version)) if uri.to_string() != version.uri() => {
            format!("{uri} ({})", version.uri())
        }
        (ChainSource::Logged(uri), _) => uri.to_string(),
        (ChainSource::Dir(_), _) => folder.dir.display().to_string(),
    };
    let at = |problem: String| format!("{origin}: {problem}");
    // `log chain` refuses these now; a version logged before is served, with a warning.
    let mut unknown_llms = Vec::new();
    for unknown in folder.unknown_llms(registry) {
        match &endpoint.source {
            ChainSource::Dir(_) => unknown_llms.push(unknown),
            ChainSource::Logged(_) => warn!(source = %origin, "{unknown}"),
        }
    }
    let loaded = match folder.instantiate(registry, endpoint.config.as_ref(), &endpoint.llms) {
        Ok(loaded) if unknown_llms.is_empty() => loaded,
        Ok(_) => return Err(unknown_llms.into_iter().map(at).collect()),
        Err(found) => return Err(found.into_iter().chain(unknown_llms).map(at).collect()),
    };
    check_code(
        &endpoint.source,
        version,
        &origin,
        &loaded,
        endpoint.allow_code_mismatch || allow_any_mismatch,
    )?;

    let mut llms: HashMap<String, Arc<dyn Llm>> = HashMap::new();
    let mut problems = Vec::new();
    for (logical, route) in &loaded.llms {
        match routes.get(route.as_str()) {
            Some(route) => {
                llms.insert(logical.clone(), route.clone());
            }
            None => problems.push(at(format!(
                "[llms] {logical} = '{route}': no such route in the gateway config"
            ))),
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    if let Some(object) = info.as_object_mut() {
        object.insert("kind".to_owned(), json!("chain"));
        object.insert("chain".to_owned(), json!(loaded.entry.name));
        object.insert("code_sha256".to_owned(), json!(loaded.folder_code_sha256));
        object.insert(
            "compiled_code_sha256".to_owned(),
            json!(loaded.entry.code_sha256),
        );
        object.insert("code_matches".to_owned(), json!(loaded.code_matches));
        object.insert("llms".to_owned(), json!(loaded.llms));
        object.insert("config".to_owned(), loaded.config.clone());
    }
    let endpoint = ChainEndpoint {
        chain: loaded.chain,
        resources: Arc::new(ChainResources {
            chain: loaded.entry.name.to_owned(),
            prompts: loaded.prompts,
            llms,
            observer: Some(observer.clone()),
        }),
    };
    Ok((Arc::new(endpoint), info))
}

/// Resolves a logged chain and checks that its files are what was logged.
fn load_logged(
    uri: &ModelUri,
    version: &ModelVersion,
    store: &Store,
) -> Result<(ChainFolder, Value), Vec<String>> {
    let (flavor, code) = store
        .verify_chain(version)
        .map_err(|e| vec![e.to_string()])?;
    let folder = ChainFolder::load(&code).map_err(|e| vec![e])?;
    let info = json!({
        "uri": uri.to_string(),
        "resolved": version.uri(),
        "version": version.version,
        "model_uuid": version.mlmodel.model_uuid,
        "content_sha256": flavor.content_sha256,
        "logged_code_sha256": flavor.code_sha256,
    });
    Ok((folder, info))
}

/// The gateway never silently serves code other than what was logged: a logged chain whose
/// code differs from the compiled chain is refused unless the endpoint allows it. A chain folder
/// is development, so a difference there is a warning.
fn check_code(
    source: &ChainSource,
    version: Option<&ModelVersion>,
    origin: &str,
    loaded: &LoadedChain,
    allow_mismatch: bool,
) -> Result<(), Vec<String>> {
    if loaded.code_matches {
        return Ok(());
    }
    let chain = loaded.entry.name;
    match source {
        ChainSource::Logged(uri) if !allow_mismatch => Err(vec![format!(
            "{origin} was logged with code_sha256 {logged}, but the '{chain}' chain compiled into this binary has \
             code_sha256 {compiled}. Serve the logged code by rebuilding from it \
             (`switchyard models restore {resolved} <a new folder>`, copy its `.rs` files over \
             chains/{chain}/, rebuild), serve a version logged from the code this binary was built \
             from (`switchyard models show` says whether a version's code is), or set `allow_code_mismatch = true` \
             on the endpoint or pass `--allow-code-mismatch` to `switchyard serve` or `predict` (development only)",
            resolved = version.map_or_else(|| uri.to_string(), ModelVersion::uri),
            logged = loaded.folder_code_sha256,
            compiled = loaded.entry.code_sha256,
        )]),
        _ => {
            warn!(
                chain,
                source = origin,
                folder_code_sha256 = %loaded.folder_code_sha256,
                compiled_code_sha256 = loaded.entry.code_sha256,
                "serving a chain whose code differs from the code compiled into this binary"
            );
            Ok(())
        }
    }
}
