//! The Switchyard HTTP gateway.
//!
//! [`Config`] is loaded from TOML, [`Gateway::new`] turns it into live providers, routes and
//! endpoints, [`Gateway::router`] is the axum app, and [`serve`] runs it until a shutdown signal,
//! letting in-flight requests finish.

mod config;
mod error;
mod extract;
mod handlers;
mod request_log;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use http::HeaderName;
use switchyard_core::{Chain, ChainFolder, ChainResources, Llm, Registry};
use switchyard_providers::{MockProvider, OpenAiProvider, Route, Target};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tracing::{info, warn};

pub use config::{
    Config, ConfigError, ConfigProblem, EndpointConfig, EndpointKind, ProviderConfig, RouteConfig,
    ServerConfig,
};
pub use error::{ApiError, MlflowError};

/// Errors that stop a gateway from starting.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot build the HTTP client for upstream providers: {0}")]
    HttpClient(#[from] reqwest::Error),
    /// Endpoints that could not be loaded, each with why.
    #[error("{} endpoint(s) could not be loaded:{}", .0.len(), .0.iter().map(|p| format!("\n  - {p}")).collect::<String>())]
    Endpoints(Vec<String>),
}

/// A gateway built from a config: every endpoint resolved and ready to serve.
#[derive(Clone)]
pub struct Gateway {
    state: AppState,
}

/// What handlers share. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

struct Inner {
    endpoints: HashMap<String, Endpoint>,
    /// Endpoint names in config order, for `GET /v1/models`.
    endpoint_order: Vec<String>,
    max_body_bytes: usize,
    started_at: u64,
}

/// A servable endpoint.
#[derive(Clone)]
pub(crate) enum Endpoint {
    Route(Arc<Route>),
    Chain(Arc<ChainEndpoint>),
}

/// A loaded chain with its templates and logical LLMs bound to routes.
pub(crate) struct ChainEndpoint {
    pub chain: Arc<dyn Chain>,
    pub resources: Arc<ChainResources>,
}

impl AppState {
    pub(crate) fn endpoint(&self, name: &str) -> Option<&Endpoint> {
        self.0.endpoints.get(name)
    }

    pub(crate) fn max_body_bytes(&self) -> usize {
        self.0.max_body_bytes
    }
}

impl Gateway {
    /// Builds providers, routes and endpoints. The config has been validated, so every name
    /// it refers to exists; chain endpoints are loaded from their folders and checked against
    /// the compiled chains in `registry`, and every endpoint that fails is reported at once.
    pub fn new(config: Config, registry: &Registry) -> Result<Self, GatewayError> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()?;
        let providers: HashMap<&str, Arc<dyn Llm>> = config
            .providers
            .iter()
            .map(|(name, provider)| {
                let llm: Arc<dyn Llm> = match provider {
                    ProviderConfig::OpenAi { base_url, api_key } => Arc::new(OpenAiProvider::new(
                        name.clone(),
                        client.clone(),
                        base_url,
                        api_key.clone(),
                    )),
                    ProviderConfig::Mock(mock) => Arc::new(MockProvider::new(mock.clone())),
                };
                (name.as_str(), llm)
            })
            .collect();
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
                    Arc::new(Route::new(name.clone(), targets, route.settings)),
                )
            })
            .collect();
        let mut endpoints = HashMap::new();
        let mut problems = Vec::new();
        for endpoint in &config.endpoints {
            let built = match &endpoint.kind {
                EndpointKind::Route(route) => routes
                    .get(route.as_str())
                    .map(|route| Endpoint::Route(route.clone()))
                    .ok_or_else(|| vec![format!("unknown route '{route}'")]),
                EndpointKind::Chain { dir, config, llms } => {
                    load_chain(dir, config.as_ref(), llms, registry, &routes).map(Endpoint::Chain)
                }
            };
            match built {
                Ok(built) => {
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
            return Err(GatewayError::Endpoints(problems));
        }
        Ok(Self {
            state: AppState(Arc::new(Inner {
                endpoint_order: config.endpoints.iter().map(|e| e.name.clone()).collect(),
                endpoints,
                max_body_bytes: config.server.max_body_bytes,
                started_at: handlers::unix_now(),
            })),
        })
    }

    /// The axum app: all routes and middleware.
    pub fn router(&self) -> Router {
        let request_id = HeaderName::from_static("x-request-id");
        Router::new()
            .route("/v1/chat/completions", post(handlers::chat_completions))
            .route("/v1/models", get(handlers::list_models))
            .route("/endpoints/{name}/invocations", post(handlers::invocations))
            .route("/health", get(handlers::health))
            .route("/ready", get(handlers::ready))
            .fallback(handlers::not_found)
            .layer(DefaultBodyLimit::max(self.state.max_body_bytes()))
            .layer(axum::middleware::from_fn(request_log::log_request))
            // Outermost: every response, errors included, carries the request id.
            .layer(PropagateRequestIdLayer::new(request_id.clone()))
            .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
            .with_state(self.state.clone())
    }
}

/// Loads a chain folder and binds its logical LLMs to routes.
fn load_chain(
    dir: &std::path::Path,
    config_override: Option<&serde_json::Value>,
    llm_override: &std::collections::BTreeMap<String, String>,
    registry: &Registry,
    routes: &HashMap<&str, Arc<Route>>,
) -> Result<Arc<ChainEndpoint>, Vec<String>> {
    let at = |problem: String| format!("{}: {problem}", dir.display());
    let folder = ChainFolder::load(dir).map_err(|e| vec![e])?;
    let loaded = folder
        .instantiate(registry, config_override, llm_override)
        .map_err(|problems| problems.into_iter().map(at).collect::<Vec<_>>())?;
    if !loaded.code_matches {
        // A development folder whose code differs from the build: say so, but serve.
        warn!(
            chain = loaded.entry.name,
            folder = %dir.display(),
            folder_code_sha256 = %loaded.folder_code_sha256,
            compiled_code_sha256 = loaded.entry.code_sha256,
            "the chain folder's code differs from the code compiled into this binary; rebuild to serve it"
        );
    }
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
    Ok(Arc::new(ChainEndpoint {
        chain: loaded.chain,
        resources: Arc::new(ChainResources {
            chain: loaded.entry.name.to_owned(),
            prompts: loaded.prompts,
            llms,
        }),
    }))
}

/// Serves the gateway on `listener` until `shutdown` completes; then stops accepting and waits
/// for in-flight requests (streams included) to finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    gateway: Gateway,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let address = listener.local_addr()?;
    info!(%address, endpoints = gateway.state.0.endpoints.len(), "switchyard listening");
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            warn!(%error, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, gateway.router())
        .with_graceful_shutdown(shutdown)
        .await?;
    info!("switchyard stopped");
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            warn!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    info!("shutdown signal received: finishing in-flight requests");
}
