//! The Switchyard HTTP gateway.
//!
//! [`Config`] is loaded from TOML, [`Gateway::new`] turns it into live providers, routes and
//! endpoints (chains loaded from folders or the model store), [`Gateway::router`] is the axum
//! app, and [`serve`] runs it until a shutdown signal, letting in-flight requests finish. A
//! gateway made with [`Gateway::from_file`] can [`Gateway::reload`] its config (also on SIGHUP
//! and `POST /admin/reload`): the new state is swapped in atomically, and requests already
//! running finish on the state they started with. [`serve_on_threads`] is what the binary runs:
//! one single-threaded runtime per core.

mod admin;
mod auth;
mod config;
mod connections;
mod error;
mod extract;
mod handlers;
mod limits;
mod metrics;
mod request_log;
mod state;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{any, get, post};
use switchyard_core::Registry;
use tracing::{debug, error, info, warn};

use config::LimitsStoreConfig;
pub use config::{
    ApiKeyConfig, AuthConfig, ChainEndpointConfig, ChainSource, Config, ConfigError, ConfigProblem,
    EndpointConfig, EndpointKind, LimitRule, LimitScope, OnError, ProviderConfig, ProviderKind,
    RateConfig, RouteConfig, ServerConfig,
};
use connections::{CappedListener, Close, ConnectionSlots, Counted, Slot, UntilSent};
pub use error::{ApiError, MlflowError};
use limits::Backend;
use metrics::Metrics;
pub(crate) use state::{ChainEndpoint, Endpoint, Lasting, Snapshot};
use switchyard_providers::HttpClient;

/// Errors that stop a gateway from starting or reloading.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    HttpClient(#[from] switchyard_providers::HttpClientError),
    /// Endpoints that could not be loaded, each with why.
    #[error("{} endpoint(s) could not be loaded:{}", .0.len(), .0.iter().map(|p| format!("\n  - {p}")).collect::<String>())]
    Endpoints(Vec<String>),
    #[error("this gateway was not started from a config file, so it cannot reload")]
    NoConfigFile,
    #[error("the reload task failed: {0}")]
    ReloadTask(String),
    #[error("cannot call endpoint '{0}': {1}")]
    Call(String, String),
}

/// What a reload did.
#[derive(Debug)]
pub struct Reloaded {
    /// How many endpoints the new config serves.
    pub endpoints: usize,
    /// Changes of the config file that the reload did not apply.
    pub warnings: Vec<String>,
}

/// Where a gateway's config comes from, for reloads.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    pub path: PathBuf,
    /// Overrides `[store] path` (the `--store` flag / `SWITCHYARD_STORE`).
    pub store_override: Option<PathBuf>,
    /// `serve --allow-code-mismatch`: see [`Config::allow_code_mismatch`].
    pub allow_code_mismatch: bool,
}

impl ConfigSource {
    /// Reads the config file and applies the overrides.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut config = Config::load(&self.path)?;
        if let Some(store) = &self.store_override {
            config.store.clone_from(store);
        }
        config.allow_code_mismatch |= self.allow_code_mismatch;
        Ok(config)
    }
}

/// A gateway: its current state, and what it needs to rebuild it.
#[derive(Clone)]
pub struct Gateway {
    state: AppState,
}

/// What handlers share. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

struct Shared {
    current: ArcSwap<Snapshot>,
    lasting: Arc<Lasting>,
    /// The rate limiter's store and the settings it was made from: kept across reloads that do
    /// not change `[limits_store]`, so counters survive.
    limiter: std::sync::Mutex<(LimitsStoreConfig, Arc<Backend>)>,
    source: Option<ConfigSource>,
    /// `[server]`: fixed at start-up (the body limit is a layer of the router, the timeouts
    /// settings of each connection).
    server: ServerConfig,
    /// One reload at a time.
    reload_lock: tokio::sync::Mutex<()>,
    /// Work done after a response has gone out (its log line, a Redis token settlement):
    /// serving waits for it before it returns, so nothing is lost at shutdown.
    after_response: tokio_util::task::TaskTracker,
    /// Cancelled when serving stops taking connections: requests still waiting for their body
    /// then give up (503) instead of holding the shutdown up.
    shutting_down: tokio_util::sync::CancellationToken,
    /// Whether spans are exported (OpenTelemetry): requests then join a caller's trace and
    /// their spans get the attributes only a trace reads.
    traces: std::sync::atomic::AtomicBool,
    /// Cancelled when `shutdown_timeout_ms` has passed and the connections still busy are
    /// closed: streams end with an error frame and `[DONE]` first, and requests are logged as cut
    /// by the shutdown, not by their clients.
    cut_off: tokio_util::sync::CancellationToken,
}

impl AppState {
    /// The current state. Hold the `Arc` for the whole request.
    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.0.current.load_full()
    }

    /// Blocking threads for predictions: `small` ones (expected under a few milliseconds) have
    /// slots of their own, so they never wait behind large batches.
    pub(crate) fn inference_slots(&self, small: bool) -> &Arc<tokio::sync::Semaphore> {
        match small {
            true => &self.0.lasting.small_inference_slots,
            false => &self.0.lasting.inference_slots,
        }
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.0.lasting.metrics
    }

    pub(crate) fn max_body_bytes(&self) -> usize {
        self.0.server.max_body_bytes
    }

    /// Completes once the gateway has begun to shut down.
    pub(crate) fn shutting_down(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.0.shutting_down.cancelled()
    }

    pub(crate) fn exports_traces(&self) -> bool {
        self.0.traces.load(Ordering::Relaxed)
    }

    /// Why a request that never finished did not: its client left, or the shutdown's deadline
    /// closed its connection.
    pub(crate) fn unfinished_outcome(&self) -> &'static str {
        if self.is_cut_off() {
            "shutdown"
        } else {
            "client_closed"
        }
    }

    /// Whether the shutdown's deadline has passed (requests still running are being closed).
    pub(crate) fn is_cut_off(&self) -> bool {
        self.0.cut_off.is_cancelled()
    }

    /// Completes when the shutdown's deadline has passed: a stream then ends at once. Waits on
    /// the serving thread's own token where there is one (its lock is taken on every poll).
    pub(crate) fn cut_off(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        THREAD_CUT_OFF
            .try_with(tokio_util::sync::CancellationToken::clone)
            .unwrap_or_else(|_| self.0.cut_off.clone())
            .cancelled_owned()
    }

    /// `[server] client_timeout_ms`: how long to wait for a request body.
    pub(crate) fn client_timeout(&self) -> std::time::Duration {
        self.0.server.client_timeout
    }

    /// Runs `work` once the current task yields: on the gateway's single-threaded runtimes, that
    /// is after the connection's task has written the response, so the work is not in its
    /// latency.
    pub(crate) fn after_response(&self, work: impl FnOnce() + Send + 'static) {
        self.0.after_response.spawn(async move { work() });
    }

    pub(crate) fn gateway(&self) -> Gateway {
        Gateway {
            state: self.clone(),
        }
    }
}

impl Gateway {
    /// Builds providers, routes and endpoints from a validated config; chain endpoints are
    /// loaded and checked against the compiled chains in `registry`, and every endpoint that
    /// fails is reported at once.
    pub fn new(config: Config, registry: &Registry) -> Result<Self, GatewayError> {
        let gateway = Self::build(config, registry, None)?;
        gateway.warn_if_open();
        Ok(gateway)
    }

    /// Like [`Gateway::new`], from a config file that [`Gateway::reload`] reads again.
    pub fn from_file(source: ConfigSource, registry: &Registry) -> Result<Self, GatewayError> {
        let config = source.load()?;
        let gateway = Self::build(config, registry, Some(source))?;
        gateway.warn_if_open();
        Ok(gateway)
    }

    /// `switchyard predict` on a chain or route endpoint: loads only `endpoint` of `config`,
    /// sends it one MLflow invocations request with `body` (a chat request) without a server, and
    /// returns the answer's status and body once the work after it (its log line) is done. The
    /// operator runs the config, so its API keys and rate limits do not apply.
    pub async fn call_once(
        mut config: Config,
        registry: &Registry,
        endpoint: &str,
        body: bytes::Bytes,
    ) -> Result<(http::StatusCode, bytes::Bytes), GatewayError> {
        use tower::ServiceExt;
        config.endpoints.retain(|e| e.name == endpoint);
        config.auth = AuthConfig::default();
        config.limits.clear();
        config.limits_store = LimitsStoreConfig::Memory;
        let gateway = Self::build(config, registry, None)?;
        let request = http::Request::post(format!("/endpoints/{endpoint}/invocations"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(axum::body::Body::from(body))
            .map_err(|e| GatewayError::Call(endpoint.to_owned(), e.to_string()))?;
        let Ok(response) = gateway.router().oneshot(request).await;
        let status = response.status();
        // A stream's body is only produced as it is read: read it all before waiting for the
        // work that follows it.
        let answer = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .map_err(|e| GatewayError::Call(endpoint.to_owned(), e.to_string()))?;
        let after_response = &gateway.state.0.after_response;
        after_response.close();
        after_response.wait().await;
        Ok((status, answer))
    }

    fn build(
        config: Config,
        registry: &Registry,
        source: Option<ConfigSource>,
    ) -> Result<Self, GatewayError> {
        let client = Arc::new(HttpClient::new()?);
        let after_response = tokio_util::task::TaskTracker::new();
        let backend = Arc::new(
            Backend::new(&config.limits_store, &after_response)
                .map_err(|e| GatewayError::Endpoints(vec![format!("limits_store: {e}")]))?,
        );
        let lasting = Arc::new(Lasting::new(
            registry.clone(),
            client,
            Arc::new(Metrics::new()),
        ));
        let snapshot =
            state::build(&config, &lasting, backend.clone()).map_err(GatewayError::Endpoints)?;
        lasting.metrics.set_endpoints(&snapshot.endpoint_infos);
        Ok(Self {
            state: AppState(Arc::new(Shared {
                current: ArcSwap::from_pointee(snapshot),
                lasting,
                limiter: std::sync::Mutex::new((config.limits_store.clone(), backend)),
                source,
                server: config.server.clone(),
                reload_lock: tokio::sync::Mutex::new(()),
                after_response,
                shutting_down: tokio_util::sync::CancellationToken::new(),
                traces: std::sync::atomic::AtomicBool::new(false),
                cut_off: tokio_util::sync::CancellationToken::new(),
            })),
        })
    }

    /// Says at start-up what is open to anyone.
    fn warn_if_open(&self) {
        let snapshot = self.state.snapshot();
        if snapshot.keys.is_empty() {
            warn!("no [auth] keys: the gateway is open to anyone who can reach it");
        }
        if snapshot.admin_key.is_none() && snapshot.keys.is_empty() {
            warn!(
                "no [auth] admin_key: the admin API (/admin/*) is open to anyone who can reach the gateway"
            );
        } else if snapshot.admin_key.is_none() {
            warn!("no [auth] admin_key: the admin API (/admin/*) is closed (403)");
        }
    }

    /// Re-reads the config file, re-resolves `models:/` aliases and swaps the new state in.
    /// On any error the running state stays as it was. Returns the number of endpoints, and a
    /// warning if `[server]` changed (it needs a restart).
    pub async fn reload(&self) -> Result<Reloaded, GatewayError> {
        let shared = &self.state.0;
        let source = shared.source.clone().ok_or(GatewayError::NoConfigFile)?;
        let _one_at_a_time = shared.reload_lock.lock().await;
        let lasting = shared.lasting.clone();
        let settling = shared.after_response.clone();
        let current_limiter = shared
            .limiter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let current_backend = current_limiter.1.clone();
        let server = shared.server.clone();
        // Reading config, chain folders and the store is file IO: keep it off the async workers.
        let (snapshot, limiter, server_changed) =
            tokio::task::spawn_blocking(move || -> Result<_, GatewayError> {
                let config = source.load()?;
                let server_changed = config.server != server;
                let limiter = if config.limits_store == current_limiter.0 {
                    current_limiter
                } else {
                    let backend = Backend::new(&config.limits_store, &settling)
                        .map_err(|e| GatewayError::Endpoints(vec![format!("limits_store: {e}")]))?;
                    (config.limits_store.clone(), Arc::new(backend))
                };
                let snapshot = state::build(&config, &lasting, limiter.1.clone())
                    .map_err(GatewayError::Endpoints)?;
                Ok((snapshot, limiter, server_changed))
            })
            .await
            .map_err(|e| GatewayError::ReloadTask(e.to_string()))??;
        *shared
            .limiter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = limiter;
        let endpoints = snapshot.endpoints.len();
        shared
            .lasting
            .metrics
            .set_endpoints(&snapshot.endpoint_infos);
        snapshot.apply_caps();
        // What the log said while loading that the caller of a reload should see too.
        let code_warnings = snapshot.code_warnings();
        shared.current.store(Arc::new(snapshot));
        info!(endpoints, "config reloaded");
        let mut warnings = code_warnings;
        // A new limits store is asked at once whether it answers (within its timeout_ms), as at
        // start-up, and the caller hears if it does not.
        let new_store = !Arc::ptr_eq(
            &current_backend,
            &shared
                .limiter
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .1,
        );
        if new_store && self.state.snapshot().limits.probe_degraded().await {
            warnings.push(
                "limits_store: the new store does not answer (the log says why): decisions \
                 apply its on_error until it does"
                    .to_owned(),
            );
        }
        if server_changed {
            let warning = "[server] changed in the config file: it applies at the next restart, not on reload";
            warn!("{warning}");
            warnings.push(warning.to_owned());
        }
        Ok(Reloaded {
            endpoints,
            warnings,
        })
    }

    /// The axum app: all routes and middleware.
    pub fn router(&self) -> Router {
        let routes = Router::new()
            .route("/v1/chat/completions", post(handlers::chat_completions))
            .route("/v1/models", get(handlers::list_models))
            .route("/v1/models/{*model}", get(handlers::retrieve_model))
            // `{*path}`, not `{name}/invocations`: endpoint names may hold slashes. Every
            // method, so that a path other than `…/invocations` is a 404 whatever the method.
            .route("/endpoints/{*path}", any(handlers::invocations))
            .route("/api/2.0/endpoints/", get(handlers::mlflow_endpoints))
            .route("/api/2.0/endpoints", get(handlers::mlflow_endpoints))
            .route(
                "/api/2.0/endpoints/{*name}",
                get(handlers::mlflow_get_endpoint),
            )
            .route("/health", get(handlers::health))
            .route("/ready", get(handlers::ready))
            .route("/metrics", get(admin::metrics))
            .route("/admin/endpoints", get(admin::endpoints))
            .route("/admin/reload", post(admin::reload))
            .fallback(handlers::not_found)
            .method_not_allowed_fallback(handlers::method_not_allowed)
            .with_state(self.state.clone());
        // The middleware wraps the router once rather than every route (`Router::layer`), which
        // would box and clone each layer again for every request.
        // The request log also gives every request its id (the client's `x-request-id` if it
        // is fit for log lines, else a UUID) and every response, errors included, carries it.
        let app = tower::ServiceBuilder::new()
            .layer(axum::middleware::from_fn_with_state(
                self.state.clone(),
                request_log::log_request,
            ))
            .layer(DefaultBodyLimit::max(self.state.max_body_bytes()))
            .service(routes);
        Router::new().fallback_service(app)
    }

    /// Says that spans are exported (the binary sets up OpenTelemetry when
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` is set): requests then join a caller's `traceparent` and
    /// their spans carry the HTTP attributes, responses the trace id, and every upstream call
    /// is a client span whose `traceparent` the provider receives.
    pub fn export_traces(&self) {
        self.state.0.traces.store(true, Ordering::Relaxed);
        self.state
            .0
            .lasting
            .client
            .trace_calls(request_log::write_traceparent);
    }

    /// `[server] listen` of the config the gateway started with.
    pub fn listen_address(&self) -> std::net::SocketAddr {
        self.state.0.server.listen
    }

    /// The slots of `[server] max_connections`, for the one listener that serves this gateway.
    fn connection_slots(&self) -> ConnectionSlots {
        ConnectionSlots::new(
            self.state.0.server.max_connections,
            self.state.metrics().connections_open(),
        )
    }

    /// Where this gateway's config comes from, if it was started from a file.
    pub fn config_path(&self) -> Option<&Path> {
        self.state.0.source.as_ref().map(|s| s.path.as_path())
    }
}

/// Serves the gateway on `listener` until `shutdown` completes; then stops accepting and waits
/// for in-flight requests (streams included) to finish. On Unix, SIGHUP reloads the config.
/// Runs on the caller's runtime; the `switchyard` binary uses [`serve_on_threads`]. A gateway
/// is served once: its shutdown is for good (requests still waiting for their body get 503).
pub async fn serve(
    listener: tokio::net::TcpListener,
    gateway: Gateway,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let address = listener.local_addr()?;
    let slots = gateway.connection_slots();
    info!(%address, endpoints = gateway.state.snapshot().endpoints.len(), max_connections = slots.max(), "switchyard listening");
    let listener = CappedListener {
        inner: listener.tap_io(|tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                warn!(%error, "cannot set TCP_NODELAY");
            }
        }),
        slots: slots.clone(),
    };
    let reloader = tokio::spawn(reload_on_sighup(gateway.clone()));
    tokio::spawn(probe_limits_store(gateway.clone()));
    serve_connections(listener, slots, &gateway, shutdown).await;
    reloader.abort();
    info!("switchyard stopped");
    Ok(())
}

/// Asks the rate limiter's store (Redis) whether it answers, at start-up and when a reload
/// changes it: a Redis that is out of reach or refuses the password shows in the log (and
/// `/ready`) without waiting for a request.
async fn probe_limits_store(gateway: Gateway) {
    gateway.state.snapshot().limits.probe_degraded().await;
}

/// Like [`serve`], on `threads` event-loop threads of its own: each runs a single-threaded
/// runtime that handles its connections to the end, upstream calls included (the HTTP client is
/// per thread too), so a request never waits for another thread to wake up. The calling thread
/// is one of them and also accepts connections, handing them out in turn so every thread gets
/// its share (threads racing to accept gave all of a benchmark's 32 connections to one thread in
/// one run out of three). Returns when every thread has finished its in-flight requests; if one
/// thread stops early (an error, a panic), all of them stop, and its error is returned.
pub fn serve_on_threads(
    listener: std::net::TcpListener,
    gateway: Gateway,
    threads: std::num::NonZeroUsize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let address = listener.local_addr()?;
    let stop = Arc::new(tokio::sync::watch::channel(false).0);
    let slots = gateway.connection_slots();
    let mut hand_to = Vec::new();
    let mut workers = Vec::new();
    let mut started = Ok(());
    for i in 1..threads.get() {
        match spawn_event_loop(i, &gateway, &slots, address, &stop) {
            Ok((sender, worker)) => {
                hand_to.push(sender);
                workers.push(worker);
            }
            Err(error) => {
                started = Err(error);
                break;
            }
        }
    }
    let served = started.and_then(|()| {
        let (sender, connections) = tokio::sync::mpsc::unbounded_channel();
        hand_to.push(sender);
        let own = HandedOut {
            connections,
            address,
        };
        info!(%address, threads, endpoints = gateway.state.snapshot().endpoints.len(), max_connections = slots.max(), "switchyard listening");
        event_loop_runtime()?.block_on(async {
            let reloader = tokio::spawn(reload_on_sighup(gateway.clone()));
            tokio::spawn(probe_limits_store(gateway.clone()));
            let listener = CappedListener {
                inner: tokio::net::TcpListener::from_std(listener)?,
                slots: slots.clone(),
            };
            let acceptor = tokio::spawn(hand_out(listener, hand_to, StopOnExit(stop.clone())));
            let signal = {
                let stop = stop.clone();
                async move {
                    shutdown.await;
                    stop.send_replace(true);
                }
            };
            let stopped = stopped(&stop);
            serve_connections(own, slots, &gateway, async move {
                tokio::select! {
                    () = signal => {},
                    () = stopped => {},
                }
            })
            .await;
            reloader.abort();
            // The acceptor stops at the same signal; waiting for it makes sure the port is closed.
            let _ = acceptor.await;
            Ok(())
        })
    });
    // However this thread got here, the others stop too (and finish their in-flight requests).
    stop.send_replace(true);
    let mut joined = Ok(());
    for worker in workers {
        let result = worker
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("a gateway thread panicked")));
        joined = joined.and(result);
    }
    served.and(joined)?;
    info!("switchyard stopped");
    Ok(())
}

fn event_loop_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Where the acceptor sends one event-loop thread's connections (each with its slot).
type HandTo = tokio::sync::mpsc::UnboundedSender<(std::net::TcpStream, SocketAddr, Slot)>;

/// Starts event-loop thread `index`: it serves the connections sent to it until `stop` is set.
fn spawn_event_loop(
    index: usize,
    gateway: &Gateway,
    slots: &ConnectionSlots,
    address: SocketAddr,
    stop: &Arc<tokio::sync::watch::Sender<bool>>,
) -> std::io::Result<(HandTo, std::thread::JoinHandle<std::io::Result<()>>)> {
    let (sender, connections) = tokio::sync::mpsc::unbounded_channel();
    let listener = HandedOut {
        connections,
        address,
    };
    let (gateway, slots, runtime) = (gateway.clone(), slots.clone(), event_loop_runtime()?);
    let (stopped, stop_on_exit) = (stopped(stop), StopOnExit(stop.clone()));
    let worker = std::thread::Builder::new()
        .name(format!("switchyard-{index}"))
        .spawn(move || {
            let _stop_on_exit = stop_on_exit;
            runtime.block_on(serve_connections(listener, slots, &gateway, stopped));
            Ok(())
        })?;
    Ok((sender, worker))
}

/// Completes once `stop` is set.
fn stopped(stop: &tokio::sync::watch::Sender<bool>) -> impl Future<Output = ()> + Send + 'static {
    let mut stopping = stop.subscribe();
    async move {
        // Fails only if the sender is gone, and then nothing is left to wait for.
        let _ = stopping.wait_for(|stop| *stop).await;
    }
}

/// Sets `stop` when dropped: a thread or task that ends for any reason, a panic included, stops
/// the whole gateway rather than leaving it to run with a part missing.
struct StopOnExit(Arc<tokio::sync::watch::Sender<bool>>);

impl Drop for StopOnExit {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

/// Accepts connections until the gateway stops and hands them to the event-loop threads in
/// turn; then closes the listening socket.
async fn hand_out(
    mut listener: CappedListener<tokio::net::TcpListener>,
    threads: Vec<HandTo>,
    stop_on_exit: StopOnExit,
) {
    let stopped = stopped(&stop_on_exit.0);
    tokio::pin!(stopped);
    for thread in threads.iter().cycle() {
        // axum's accept logs and retries failed accepts (and waits a second on EMFILE).
        let (Counted { io: stream, slot }, peer) = tokio::select! {
            () = &mut stopped => return,
            accepted = axum::serve::Listener::accept(&mut listener) => accepted,
        };
        if let Err(error) = stream.set_nodelay(true) {
            warn!(%error, "cannot set TCP_NODELAY");
        }
        // A thread's socket must be registered with its own runtime: hand over the plain socket.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => {
                warn!(%error, "cannot hand a connection over");
                continue;
            }
        };
        if thread.send((stream, peer, slot)).is_err() {
            // That thread has stopped, so the gateway is stopping (see `StopOnExit`).
            warn!(%peer, "connection closed unanswered: the gateway is stopping");
        }
    }
}

/// The connections [`hand_out`] gives one event-loop thread, as a listener for
/// `serve_connections`.
struct HandedOut {
    connections: tokio::sync::mpsc::UnboundedReceiver<(std::net::TcpStream, SocketAddr, Slot)>,
    address: SocketAddr,
}

impl axum::serve::Listener for HandedOut {
    type Io = Counted<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Some((stream, peer, slot)) = self.connections.recv().await else {
                // The acceptor has stopped, so the gateway is shutting down: nothing more comes.
                return std::future::pending().await;
            };
            match tokio::net::TcpStream::from_std(stream) {
                Ok(io) => return (Counted { io, slot }, peer),
                Err(error) => warn!(%error, "cannot take a connection over"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.address)
    }
}

/// `Connection: close`: hyper closes the connection once the response is written.
const CONNECTION_CLOSE: http::HeaderValue = http::HeaderValue::from_static("close");

tokio::task_local! {
    /// The shutdown's cut-off as one serving thread's connections see it: a child of the
    /// gateway's token, so that the streams of two threads do not share its lock.
    static THREAD_CUT_OFF: tokio_util::sync::CancellationToken;
}

/// How long streams still running at the shutdown's deadline have to write their last frames.
const FINAL_FRAMES: std::time::Duration = std::time::Duration::from_millis(250);

/// Serves the connections `listener` accepts until `shutdown`, then waits for in-flight
/// requests. Each connection is HTTP/1 with `[server]`'s timeouts: its request heads must arrive
/// within `header_timeout` (hyper closes the connection otherwise, idle keep-alive connections
/// included), and a write the client does not take within `client_timeout` fails, which closes
/// the connection and ends whatever its response was waiting on (a stream's upstream call, its
/// provider slot).
async fn serve_connections<L>(
    mut listener: L,
    slots: ConnectionSlots,
    gateway: &Gateway,
    shutdown: impl Future<Output = ()> + Send + 'static,
) where
    L: axum::serve::Listener<Io = Counted<tokio::net::TcpStream>, Addr = SocketAddr>,
{
    let timer = tokio::spawn(keep_a_timer_pending());
    let server = &gateway.state.0.server;
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(server.header_timeout);
    let service = hyper_util::service::TowerToHyperService::new(gateway.router());
    let cut_off = gateway.state.0.cut_off.child_token();
    // The connections' tasks: waited for at shutdown, and closed if still busy when its time
    // is up.
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        while tasks.try_join_next().is_some() {}
        let mut watch = slots.watch(stream.slot.state.clone());
        let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
        stream.set_write_timeout(Some(server.client_timeout));
        let service = {
            let (service, state) = (service.clone(), watch.state.clone());
            hyper::service::service_fn(move |request| {
                state.request_started();
                let response = hyper::service::Service::call(&service, request);
                let state = state.clone();
                futures::FutureExt::map(response, move |result| {
                    result.map(|mut response| {
                        // A client waits for a connection slot: this connection may close after
                        // this response for it, and then says so (`response_head`).
                        if state.response_head() {
                            response
                                .headers_mut()
                                .insert(http::header::CONNECTION, CONNECTION_CLOSE);
                        }
                        response.map(|body| UntilSent { body, state })
                    })
                })
            })
        };
        let connection =
            http.serve_connection(hyper_util::rt::TokioIo::new(Box::pin(stream)), service);
        tasks.spawn(THREAD_CUT_OFF.scope(cut_off.clone(), async move {
            // Closed when `connections` says: an idle one to make room for a waiting client,
            // all at shutdown. hyper's graceful shutdown waits on a connection that has not
            // finished its first request head (up to `header_timeout_ms`): such a connection
            // has nothing to lose, so at shutdown it is dropped.
            let mut connection = std::pin::pin!(connection);
            let mut closing = false;
            let closed = std::future::poll_fn(|cx| {
                loop {
                    if let std::task::Poll::Ready(result) = connection.as_mut().poll(cx) {
                        return std::task::Poll::Ready(Some(result));
                    }
                    if closing {
                        return std::task::Poll::Pending;
                    }
                    match watch.poll_close(cx) {
                        None => return std::task::Poll::Pending,
                        Some(Close::Drop) => return std::task::Poll::Ready(None),
                        // Polled again: an idle connection closes at once.
                        Some(Close::Gracefully) => {
                            closing = true;
                            connection.as_mut().graceful_shutdown();
                        }
                    }
                }
            });
            match closed.await {
                // A connection's errors are the client's (it went away, timed out, sent
                // garbage); its requests have their own log lines.
                Some(Err(error)) => debug!(%error, "connection closed"),
                Some(Ok(())) => {}
                None => debug!("connection with a request head half-way closed at shutdown"),
            }
        }));
    }
    // No more connections: the listening socket closes, idle connections close now (and those
    // that never finished a request head), busy ones after their response; requests still
    // waiting for their body are refused.
    drop(listener);
    gateway.state.0.shutting_down.cancel();
    slots.close_all();
    let deadline = server.shutdown_timeout;
    let all_closed = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(deadline, all_closed).await.is_err() {
        // Streams end with an error frame and `[DONE]`, and get a moment to write them; then
        // dropping a connection's task drops its request. Each request is still logged and
        // settles its tokens (below) before the process exits.
        gateway.state.0.cut_off.cancel();
        while tasks.try_join_next().is_some() {}
        warn!(
            connections = tasks.len(),
            "shutdown_timeout_ms ({} ms) passed: closing the connections still busy on this thread",
            deadline.as_millis()
        );
        let _ = tokio::time::timeout(FINAL_FRAMES, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    timer.abort();
    let after_response = &gateway.state.0.after_response;
    after_response.close();
    after_response.wait().await;
}

/// Keeps a timer pending on this thread's runtime, never more than a second away. tokio's timer
/// wakes its driver (a `write` to an eventfd, and an `epoll_wait` that then returns at once)
/// whenever a new timer is due sooner than every pending one, even when the runtime's own thread
/// registers it while running. With no timer pending, that was the first deadline of every
/// request (the route's timeout): one more `write` and `epoll_wait` per request
/// (`bench/syscalls.sh`). With this one pending, deadlines seconds away never are the soonest.
async fn keep_a_timer_pending() {
    let mut ticks = tokio::time::interval(std::time::Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
    }
}

#[cfg(unix)]
async fn reload_on_sighup(gateway: Gateway) {
    if gateway.config_path().is_none() {
        return;
    }
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => signal,
        Err(error) => {
            warn!(%error, "cannot listen for SIGHUP; reload with POST /admin/reload");
            return;
        }
    };
    while hangups.recv().await.is_some() {
        info!("SIGHUP: reloading the config");
        if let Err(error) = gateway.reload().await {
            error!(%error, "reload failed; still serving the previous config");
        }
    }
}

#[cfg(not(unix))]
async fn reload_on_sighup(_gateway: Gateway) {}

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
