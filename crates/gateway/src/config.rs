//! Gateway config: TOML in, validated runtime config out.
//!
//! Loading has two stages. First every section (and every provider, route and endpoint on its
//! own) is deserialized from the TOML tree with `deny_unknown_fields`; then the parts are checked
//! against each other (routes name existing providers, endpoints existing routes, secrets'
//! environment variables are set). Every problem found in either stage is reported at once, each
//! with its path, so an operator fixes a config in one pass.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use switchyard_core::Secret;
use switchyard_providers::{MockConfig, RouteSettings};
use switchyard_store::ModelUri;

/// A validated gateway config.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub limits: Vec<LimitRule>,
    pub limits_store: LimitsStoreConfig,
    /// The model store `models:/` endpoints load from.
    pub store: PathBuf,
    pub auth: AuthConfig,
    pub providers: BTreeMap<String, ProviderConfig>,
    pub routes: BTreeMap<String, RouteConfig>,
    pub endpoints: Vec<EndpointConfig>,
    /// Every chain endpoint may serve logged code that differs from the compiled code, as if
    /// each said `allow_code_mismatch = true`: `switchyard serve --allow-code-mismatch`
    /// (development only). Not a config key.
    pub allow_code_mismatch: bool,
}

/// `[auth]`: who may call what.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// Guards `/admin/*`. Without it the admin API is open (a warning says so at start-up).
    pub admin_key: Option<Secret>,
    /// Client API keys. Without any the gateway is open (a warning says so at start-up).
    pub keys: Vec<ApiKeyConfig>,
    /// `GET /metrics` needs the admin key too.
    pub protect_metrics: bool,
}

/// One client API key: an id for logs, metrics and limits, and the SHA-256 of the secret.
#[derive(Debug, Clone)]
pub struct ApiKeyConfig {
    pub id: String,
    pub sha256: [u8; 32],
    /// The endpoints this key may call; `None` = all.
    pub endpoints: Option<Vec<String>>,
}

/// What a rate-limit rule counts by. Rules key their counters by the values of their scopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitScope {
    Global,
    Endpoint,
    ApiKey,
    User,
}

/// One `[[limits]]` rule.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitRule {
    pub scope: Vec<LimitScope>,
    /// Only these endpoints; `None` = all.
    pub endpoints: Option<Vec<String>>,
    /// Requests per `period`, plus `burst` more at once.
    pub requests: Option<RateConfig>,
    pub tokens_per_minute: Option<u64>,
    /// Completion tokens reserved for a request without `max_tokens`.
    pub default_max_tokens: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateConfig {
    pub count: u64,
    pub period: Duration,
    pub burst: u64,
}

/// `[limits_store]`: where counters live.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LimitsStoreConfig {
    #[default]
    Memory,
    Redis {
        /// May hold a password: a `Secret`, given literally or as `${ENV}`.
        url: Secret,
        /// `password = "${ENV}"`: sent instead of any password in `url`.
        password: Option<Secret>,
        /// Deny or allow requests while Redis cannot be reached.
        on_error: OnError,
        timeout: Duration,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    #[default]
    Deny,
    Allow,
}

/// `max_concurrency` of a provider: at most `max` calls in flight; more wait up to
/// `queue_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConcurrencyCap {
    pub max: usize,
    pub queue_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Request bodies above this size get 413.
    pub max_body_bytes: usize,
    /// How long a client may take to send a request's head; also how long an idle keep-alive
    /// connection is kept open.
    pub header_timeout: Duration,
    /// How long the gateway waits on a client mid-request: for the whole request body, and for
    /// a write of the response to make progress (a reader that stopped reading).
    pub client_timeout: Duration,
    /// How long a shutdown waits for requests in flight; then their connections are closed
    /// (each still logged and its tokens settled) and the process exits.
    pub shutdown_timeout: Duration,
    /// How many client connections may be open at once; further clients wait to be accepted.
    /// `None`: half of the open-files limit the gateway finds when it starts serving.
    pub max_connections: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    pub concurrency: Option<ConcurrencyCap>,
}

#[derive(Debug, Clone)]
pub enum ProviderKind {
    OpenAi {
        base_url: String,
        api_key: Option<Secret>,
        /// Whether streams ask for their usage (`stream_options.include_usage`); off for a
        /// server that refuses `stream_options`.
        stream_usage: bool,
    },
    /// Anthropic's Messages API, translated to and from OpenAI's chat format.
    Anthropic {
        base_url: String,
        api_key: Option<Secret>,
    },
    Mock(MockConfig),
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub targets: Vec<TargetConfig>,
    pub settings: RouteSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub provider: String,
    pub model: String,
}

#[derive(Debug, Clone)]
pub struct EndpointConfig {
    pub name: String,
    pub kind: EndpointKind,
    /// Log each request's messages and the completion in its log line (off by default:
    /// prompts and answers may hold personal data).
    pub log_payloads: bool,
}

#[derive(Debug, Clone)]
pub enum EndpointKind {
    /// Pass-through to a route.
    Route(String),
    /// A chain: a logged version or a chain folder.
    Chain(ChainEndpointConfig),
}

#[derive(Debug, Clone)]
pub struct ChainEndpointConfig {
    pub source: ChainSource,
    /// Merged into the chain's `[config]`, then type-checked by the chain.
    pub config: Option<serde_json::Value>,
    /// Replaces entries of the chain's `[llms]` (logical LLM -> route).
    pub llms: BTreeMap<String, String>,
    /// Serve a logged chain even if its code differs from the compiled code (development only).
    pub allow_code_mismatch: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainSource {
    /// `model = "models:/<name>/<version>"` (or `@alias`, `/latest`): a logged version.
    Logged(ModelUri),
    /// `chain_dir = "chains/<name>"`: a folder, for development.
    Dir(PathBuf),
}

/// Every problem found in a config, each with where it is.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub source_name: String,
    pub problems: Vec<ConfigProblem>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted path into the config, e.g. `routes.default.targets[0].provider`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.problems.len();
        let noun = if count == 1 { "problem" } else { "problems" };
        write!(f, "invalid config {}: {count} {noun}", self.source_name)?;
        for problem in &self.problems {
            if problem.path.is_empty() {
                write!(f, "\n  - {}", problem.message)?;
            } else {
                write!(f, "\n  - {}: {}", problem.path, problem.message)?;
            }
        }
        Ok(())
    }
}

impl Config {
    /// Reads and validates a config file; `${VAR}` secrets come from the process environment.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with_env(path, &|name| std::env::var(name).ok())
    }

    /// Like [`Config::load`], with `env` looking up the variables that secrets refer to.
    pub fn load_with_env(
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let source_name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: source_name.clone(),
            problems: vec![ConfigProblem {
                path: String::new(),
                message: format!("cannot read the file: {e}"),
            }],
        })?;
        Self::parse(&source_name, &text, env)
    }

    /// Parses and validates config text. `env` looks up the variables that secrets refer to.
    pub fn parse(
        source_name: &str,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut problems = Problems::default();
        let config = match text.parse::<toml::Table>() {
            Ok(table) => compile(table, env, &mut problems),
            Err(e) => {
                // Not the error's `Display`: it quotes the line, which may hold a secret (an
                // `api_key = "sk-…` missing its closing quote).
                let at = e.span().map_or(0, |span| span.start).min(text.len());
                let before = text.get(..at).unwrap_or_default();
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                problems.add(
                    "",
                    format!("TOML syntax, line {line}, column {column}: {}", e.message()),
                );
                None
            }
        };
        match config {
            Some(config) if problems.0.is_empty() => Ok(config),
            _ => Err(ConfigError {
                source_name: source_name.to_owned(),
                problems: problems.0,
            }),
        }
    }
}

// ---- stage 1: the raw, deserialized shape of the file ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    #[serde(default = "default_listen")]
    listen: String,
    #[serde(default = "default_max_body_bytes")]
    max_body_bytes: usize,
    #[serde(default = "default_header_timeout_ms")]
    header_timeout_ms: u64,
    #[serde(default = "default_client_timeout_ms")]
    client_timeout_ms: u64,
    #[serde(default = "default_shutdown_timeout_ms")]
    shutdown_timeout_ms: u64,
    #[serde(default)]
    max_connections: Option<usize>,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            max_body_bytes: default_max_body_bytes(),
            header_timeout_ms: default_header_timeout_ms(),
            client_timeout_ms: default_client_timeout_ms(),
            shutdown_timeout_ms: default_shutdown_timeout_ms(),
            max_connections: None,
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:8080".to_owned()
}

fn default_max_body_bytes() -> usize {
    4 * 1024 * 1024
}

/// Above the 60 s idle timeout of common load balancers and proxies (AWS ALB, nginx's upstream
/// `keepalive_timeout`): hyper's header timer also closes idle keep-alive connections, and a
/// gateway that closes an idle connection before the proxy in front does races the proxy's next
/// request on it (a 502 for that request).
fn default_header_timeout_ms() -> u64 {
    120_000
}

fn default_client_timeout_ms() -> u64 {
    60_000
}

fn default_stream_usage() -> bool {
    true
}

/// Under Kubernetes' default grace period (30 s) before its SIGKILL, with time to spare for
/// writing the last log lines and settling tokens.
fn default_shutdown_timeout_ms() -> u64 {
    25_000
}

/// A `[providers.<name>]` table, read by its `kind` (`Problems::take_kind`).
#[derive(Debug)]
enum RawProvider {
    OpenAi(RawOpenAi),
    Anthropic(RawAnthropic),
    Mock(RawMock),
}

impl RawProvider {
    fn take(problems: &mut Problems, path: &str, value: toml::Value) -> Option<Self> {
        problems.take_kind(
            path,
            value,
            &[
                ("openai", |p, path, rest| {
                    p.take(path, rest).map(Self::OpenAi)
                }),
                ("anthropic", |p, path, rest| {
                    p.take(path, rest).map(Self::Anthropic)
                }),
                ("mock", |p, path, rest| p.take(path, rest).map(Self::Mock)),
            ],
        )
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOpenAi {
    #[serde(default = "default_openai_base_url")]
    base_url: String,
    #[serde(default)]
    api_key: Option<String>,
    #[serde(default = "default_stream_usage")]
    stream_usage: bool,
    #[serde(default)]
    max_concurrency: Option<usize>,
    #[serde(default)]
    queue_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAnthropic {
    #[serde(default = "default_anthropic_base_url")]
    base_url: String,
    #[serde(default)]
    api_key: Option<String>,
    #[serde(default)]
    max_concurrency: Option<usize>,
    #[serde(default)]
    queue_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMock {
    #[serde(default)]
    reply: Option<String>,
    #[serde(default)]
    chunks: Option<usize>,
    #[serde(default)]
    latency_ms: u64,
    #[serde(default)]
    max_concurrency: Option<usize>,
    #[serde(default)]
    queue_timeout_ms: Option<u64>,
}

fn default_openai_base_url() -> String {
    "https://api.openai.com/v1".to_owned()
}

fn default_anthropic_base_url() -> String {
    "https://api.anthropic.com".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    targets: Vec<TargetConfig>,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    #[serde(default)]
    first_token_timeout_ms: Option<u64>,
    #[serde(default)]
    attempt_timeout_ms: Option<u64>,
    #[serde(default = "default_retries")]
    retries: u32,
    #[serde(default = "default_backoff_ms")]
    backoff_ms: u64,
}

fn default_timeout_ms() -> u64 {
    30_000
}

fn default_retries() -> u32 {
    2
}

fn default_backoff_ms() -> u64 {
    100
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    name: String,
    #[serde(default)]
    route: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    chain_dir: Option<PathBuf>,
    #[serde(default)]
    allow_code_mismatch: bool,
    #[serde(default)]
    log_payloads: bool,
    #[serde(default)]
    config: Option<toml::Table>,
    #[serde(default)]
    llms: Option<BTreeMap<String, String>>,
}

// ---- stage 2: check the parts against each other ----

#[derive(Default)]
struct Problems(Vec<ConfigProblem>);

/// Reads one part of the tree (at a path) into a `T`, recording its problems.
type TakeFn<T> = fn(&mut Problems, &str, toml::Value) -> Option<T>;

impl Problems {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigProblem {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Deserializes one part of the tree, recording its problems (each with its path inside
    /// the part) instead of failing. serde stops at a table's first problem: the key at fault is
    /// taken out and the rest read again, so that every key's problem is reported at once.
    fn take<T: DeserializeOwned>(&mut self, path: &str, mut value: toml::Value) -> Option<T> {
        let mut taken_out = Vec::new();
        loop {
            let error = match serde_path_to_error::deserialize::<_, T>(value.clone()) {
                Ok(v) => return taken_out.is_empty().then_some(v),
                Err(error) => error,
            };
            let inner = error.path().to_string();
            let full = match (path, inner.as_str()) {
                (p, ".") => p.to_owned(),
                ("", i) => i.to_owned(),
                (p, i) if i.starts_with('[') => format!("{p}{i}"),
                (p, i) => format!("{p}.{i}"),
            };
            let key = match error.path().iter().next() {
                Some(serde_path_to_error::Segment::Map { key }) => Some(key.clone()),
                _ => None,
            };
            // toml appends "\nin `<key>`" lines that repeat the path we already give.
            let message = error.into_inner().to_string();
            let message = message.lines().next().unwrap_or_default();
            // A required key taken out for its problem is missing now: already reported. (serde
            // reports a missing key once every key present has been read, and names the first
            // missing one only: a second required key that is missing goes unreported then.)
            let missing = message
                .strip_prefix("missing field `")
                .and_then(|rest| rest.split_once('`'))
                .map(|(key, _)| key)
                .filter(|_| inner == ".");
            if missing.is_some_and(|key| taken_out.iter().any(|k| k == key)) {
                return None;
            }
            self.add(full, message);
            let toml::Value::Table(table) = &mut value else {
                return None;
            };
            match key {
                Some(key) if table.remove(&key).is_some() => taken_out.push(key),
                _ => return None,
            }
        }
    }

    /// A table whose `kind` names one of `kinds`: the rest of the table read by that kind's
    /// function, as that kind's own struct. (serde's internally tagged enums would do it in one
    /// step, but they buffer the table first and lose the path of any problem inside it.)
    fn take_kind<T>(
        &mut self,
        path: &str,
        value: toml::Value,
        kinds: &[(&str, TakeFn<T>)],
    ) -> Option<T> {
        let toml::Value::Table(mut table) = value else {
            self.add(
                path,
                format!("expected a table, found {}", value.type_str()),
            );
            return None;
        };
        let expected = || {
            let kinds: Vec<String> = kinds.iter().map(|(k, _)| format!("`{k}`")).collect();
            format!("expected one of {}", kinds.join(", "))
        };
        match table.remove("kind") {
            Some(toml::Value::String(kind)) => {
                if let Some((_, take)) = kinds.iter().find(|(k, _)| *k == kind) {
                    return take(self, path, toml::Value::Table(table));
                }
                self.add(
                    format!("{path}.kind"),
                    format!("unknown kind `{kind}`, {}", expected()),
                );
                None
            }
            Some(other) => {
                self.add(
                    format!("{path}.kind"),
                    format!("expected a string, found {}", other.type_str()),
                );
                None
            }
            None => {
                self.add(path, format!("missing field `kind`, {}", expected()));
                None
            }
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    #[serde(default)]
    path: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    #[serde(default)]
    admin_key: Option<String>,
    /// Each checked on its own (see `compile_auth`), so that one bad entry hides no other
    /// problem.
    #[serde(default)]
    keys: Vec<toml::Value>,
    #[serde(default)]
    protect_metrics: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApiKey {
    id: String,
    /// The environment variable holding the key.
    #[serde(default)]
    key_env: Option<String>,
    /// Or the hex SHA-256 of the key, so the key itself is stored nowhere.
    #[serde(default)]
    key_sha256: Option<String>,
    #[serde(default)]
    endpoints: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    scope: Vec<LimitScope>,
    #[serde(default)]
    endpoints: Option<Vec<String>>,
    #[serde(default)]
    requests_per_second: Option<u64>,
    #[serde(default)]
    requests_per_minute: Option<u64>,
    #[serde(default)]
    burst: u64,
    #[serde(default)]
    tokens_per_minute: Option<u64>,
    /// 1024 when not given.
    #[serde(default)]
    default_max_tokens: Option<u64>,
}

/// A token rule's estimate of the completion when the request sets no `max_tokens`.
const DEFAULT_MAX_TOKENS_ESTIMATE: u64 = 1024;

/// `[limits_store]`, read by its `kind` (`Problems::take_kind`).
#[derive(Debug)]
enum RawLimitsStore {
    Memory,
    Redis(RawRedisStore),
}

impl RawLimitsStore {
    fn take(problems: &mut Problems, value: toml::Value) -> Option<Self> {
        problems.take_kind(
            "limits_store",
            value,
            &[
                ("memory", |p, path, rest| {
                    p.take::<RawMemoryStore>(path, rest)
                        .map(|RawMemoryStore {}| Self::Memory)
                }),
                ("redis", |p, path, rest| p.take(path, rest).map(Self::Redis)),
            ],
        )
    }
}

/// No settings: any key is unknown.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMemoryStore {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedisStore {
    url: String,
    password: Option<String>,
    /// Fail closed unless told otherwise: the provider's quota is what limits protect.
    #[serde(default)]
    on_error: OnError,
    #[serde(default = "default_redis_timeout_ms")]
    timeout_ms: u64,
}

fn default_redis_timeout_ms() -> u64 {
    200
}

const SECTIONS: &[&str] = &[
    "server",
    "store",
    "auth",
    "limits",
    "limits_store",
    "providers",
    "routes",
    "endpoints",
];

fn compile(
    mut table: toml::Table,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> Option<Config> {
    for key in table.keys() {
        if !SECTIONS.contains(&key.as_str()) {
            problems.add(
                key.clone(),
                format!("unknown section, expected one of: {}", SECTIONS.join(", ")),
            );
        }
    }
    let server = match table.remove("server") {
        Some(value) => problems.take::<RawServer>("server", value),
        None => Some(RawServer::default()),
    };
    let server = server.and_then(|raw| compile_server(raw, problems));
    let store = match table.remove("store") {
        Some(value) => problems.take::<RawStore>("store", value),
        None => Some(RawStore::default()),
    }
    .map(|raw| {
        raw.path
            .unwrap_or_else(|| PathBuf::from(switchyard_store::DEFAULT_STORE))
    });
    // Keys and limit rules name endpoints: checked against the names the file declares, so
    // that neither a broken [auth] nor a broken endpoint hides or adds a problem.
    let declared_endpoints = endpoint_names(&table);
    let auth = match table.remove("auth") {
        Some(value) => problems.take::<RawAuth>("auth", value),
        None => Some(RawAuth::default()),
    }
    .and_then(|raw| compile_auth(raw, &declared_endpoints, env, problems));
    let limits_store = match table.remove("limits_store") {
        Some(value) => RawLimitsStore::take(problems, value)
            .and_then(|raw| compile_limits_store(raw, env, problems)),
        None => Some(LimitsStoreConfig::Memory),
    };

    let providers: BTreeMap<String, ProviderConfig> =
        named_items(&mut table, "providers", problems, RawProvider::take)
            .into_iter()
            .filter_map(|(name, raw)| {
                Some((name.clone(), compile_provider(&name, raw, env, problems)?))
            })
            .collect();

    let routes: BTreeMap<String, RouteConfig> =
        named_items(&mut table, "routes", problems, Problems::take::<RawRoute>)
            .into_iter()
            .filter_map(|(name, raw)| Some((name.clone(), compile_route(&name, raw, problems)?)))
            .collect();
    // A route that names an unknown provider is a problem only if the provider is not merely
    // broken itself (already reported); so check against the names the file declares.
    let declared_providers: HashSet<&str> = table_keys(&table, "providers");
    for (name, route) in &routes {
        for (i, target) in route.targets.iter().enumerate() {
            if !providers.contains_key(&target.provider)
                && !declared_providers.contains(target.provider.as_str())
            {
                problems.add(
                    format!("routes.{name}.targets[{i}].provider"),
                    format!("unknown provider '{}'", target.provider),
                );
            }
        }
    }

    let endpoints = compile_endpoints(&mut table, &routes, problems);
    let limits = compile_limits(&mut table, &declared_endpoints, problems);
    Some(Config {
        server: server?,
        limits,
        limits_store: limits_store?,
        store: store?,
        auth: auth?,
        providers,
        routes,
        endpoints,
        allow_code_mismatch: false,
    })
}

/// The names of the `[[endpoints]]` entries that have one, valid or not.
fn endpoint_names(table: &toml::Table) -> HashSet<String> {
    let items = table.get("endpoints").and_then(toml::Value::as_array);
    items
        .into_iter()
        .flatten()
        .filter_map(|item| item.get("name")?.as_str().map(str::to_owned))
        .collect()
}

/// A problem for each of `names` that is not an endpoint's.
fn check_endpoint_names(
    path: &str,
    names: Option<&[String]>,
    declared: &HashSet<String>,
    problems: &mut Problems,
) {
    for name in names.into_iter().flatten() {
        if !declared.contains(name) {
            problems.add(
                format!("{path}.endpoints"),
                format!("unknown endpoint '{name}'"),
            );
        }
    }
}

fn table_keys<'a>(table: &'a toml::Table, section: &str) -> HashSet<&'a str> {
    table
        .get(section)
        .and_then(toml::Value::as_table)
        .map(|t| t.keys().map(String::as_str).collect())
        .unwrap_or_default()
}

/// Deserializes each entry of a `[section.<name>]` table on its own.
fn named_items<T>(
    table: &mut toml::Table,
    section: &str,
    problems: &mut Problems,
    take: TakeFn<T>,
) -> Vec<(String, T)> {
    let Some(value) = table.get(section).cloned() else {
        return Vec::new();
    };
    let toml::Value::Table(items) = value else {
        problems.add(section, format!("expected a table of named {section}"));
        return Vec::new();
    };
    items
        .into_iter()
        .filter_map(|(name, value)| {
            let path = format!("{section}.{name}");
            if let Err(message) = check_name(&name) {
                problems.add(&path, message);
            }
            let item = take(problems, &path, value)?;
            Some((name, item))
        })
        .collect()
}

fn compile_server(raw: RawServer, problems: &mut Problems) -> Option<ServerConfig> {
    let listen = match raw.listen.parse::<SocketAddr>() {
        Ok(addr) => Some(addr),
        Err(_) => {
            problems.add(
                "server.listen",
                format!("'{}' is not an IP:port address", raw.listen),
            );
            None
        }
    };
    if raw.max_body_bytes == 0 {
        problems.add("server.max_body_bytes", "must be greater than 0");
    }
    if raw.max_connections == Some(0) {
        problems.add("server.max_connections", "must be greater than 0");
    }
    for (key, value) in [
        ("server.header_timeout_ms", raw.header_timeout_ms),
        ("server.client_timeout_ms", raw.client_timeout_ms),
    ] {
        if value == 0 {
            problems.add(key, "must be greater than 0");
        }
    }
    Some(ServerConfig {
        listen: listen?,
        max_body_bytes: raw.max_body_bytes,
        header_timeout: Duration::from_millis(raw.header_timeout_ms),
        client_timeout: Duration::from_millis(raw.client_timeout_ms),
        shutdown_timeout: Duration::from_millis(raw.shutdown_timeout_ms),
        max_connections: raw.max_connections,
    })
}

/// Checks an HTTP provider's `base_url` and resolves its `api_key` reference.
fn check_http_provider(
    name: &str,
    base_url: &str,
    api_key: Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> Option<Secret> {
    if !(base_url.starts_with("http://") || base_url.starts_with("https://"))
        || reqwest::Url::parse(base_url).is_err()
    {
        problems.add(
            format!("providers.{name}.base_url"),
            format!("'{base_url}' is not an http:// or https:// URL"),
        );
    }
    api_key.and_then(|reference| match resolve_secret(&reference, env) {
        Ok(secret) => Some(secret),
        Err(message) => {
            problems.add(format!("providers.{name}.api_key"), message);
            None
        }
    })
}

fn compile_provider(
    name: &str,
    raw: RawProvider,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> Option<ProviderConfig> {
    let before = problems.0.len();
    let (kind, max_concurrency, queue_timeout_ms) = match raw {
        RawProvider::OpenAi(RawOpenAi {
            base_url,
            api_key,
            stream_usage,
            max_concurrency,
            queue_timeout_ms,
        }) => {
            let api_key = check_http_provider(name, &base_url, api_key, env, problems);
            (
                ProviderKind::OpenAi {
                    base_url,
                    api_key,
                    stream_usage,
                },
                max_concurrency,
                queue_timeout_ms,
            )
        }
        RawProvider::Anthropic(RawAnthropic {
            base_url,
            api_key,
            max_concurrency,
            queue_timeout_ms,
        }) => {
            let api_key = check_http_provider(name, &base_url, api_key, env, problems);
            (
                ProviderKind::Anthropic { base_url, api_key },
                max_concurrency,
                queue_timeout_ms,
            )
        }
        RawProvider::Mock(RawMock {
            reply,
            chunks,
            latency_ms,
            max_concurrency,
            queue_timeout_ms,
        }) => {
            let chunks = chunks.unwrap_or(MockConfig::default().chunks);
            if chunks == 0 {
                problems.add(format!("providers.{name}.chunks"), "must be at least 1");
            }
            let mock = MockConfig {
                reply,
                chunks,
                latency_ms,
            };
            (ProviderKind::Mock(mock), max_concurrency, queue_timeout_ms)
        }
    };
    let concurrency = match max_concurrency {
        Some(0) => {
            problems.add(
                format!("providers.{name}.max_concurrency"),
                "must be at least 1",
            );
            None
        }
        Some(max) => Some(ConcurrencyCap {
            max,
            queue_timeout: Duration::from_millis(queue_timeout_ms.unwrap_or(5_000)),
        }),
        None => {
            if queue_timeout_ms.is_some() {
                problems.add(
                    format!("providers.{name}.queue_timeout_ms"),
                    "applies only with max_concurrency",
                );
            }
            None
        }
    };
    (problems.0.len() == before).then_some(ProviderConfig { kind, concurrency })
}

fn compile_auth(
    raw: RawAuth,
    declared_endpoints: &HashSet<String>,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> Option<AuthConfig> {
    let before = problems.0.len();
    let admin_key = raw
        .admin_key
        .and_then(|reference| match resolve_secret(&reference, env) {
            Ok(secret) => Some(secret),
            Err(message) => {
                problems.add("auth.admin_key", message);
                None
            }
        });
    let mut ids = HashSet::new();
    let mut keys = Vec::new();
    for (i, key) in raw.keys.into_iter().enumerate() {
        let path = format!("auth.keys[{i}]");
        let Some(key) = problems.take::<RawApiKey>(&path, key) else {
            continue;
        };
        if let Err(message) = check_name(&key.id) {
            problems.add(format!("{path}.id"), message);
        }
        check_endpoint_names(
            &path,
            key.endpoints.as_deref(),
            declared_endpoints,
            problems,
        );
        if !ids.insert(key.id.clone()) {
            problems.add(
                format!("{path}.id"),
                format!("key id '{}' is used twice", key.id),
            );
        }
        let sha256 = match (key.key_env, key.key_sha256) {
            (Some(var), None) => match env_value(&var, env) {
                Ok(value) => Some(crate::auth::sha256(value.as_bytes())),
                Err(message) => {
                    problems.add(format!("{path}.key_env"), message);
                    None
                }
            },
            (None, Some(hex)) => match crate::auth::parse_sha256_hex(&hex) {
                Some(digest) => Some(digest),
                None => {
                    problems.add(
                        format!("{path}.key_sha256"),
                        "must be 64 hex characters (the SHA-256 of the key)",
                    );
                    None
                }
            },
            _ => {
                problems.add(
                    &path,
                    "give exactly one of `key_env` (an environment variable) or `key_sha256`",
                );
                None
            }
        };
        if let Some(sha256) = sha256 {
            // One key is one caller: a second id for it would never be seen (its endpoints
            // and limits would silently not apply).
            if let Some(first) = keys.iter().find(|k: &&ApiKeyConfig| k.sha256 == sha256) {
                problems.add(
                    format!("{path}.id"),
                    format!("'{}' has the same key as '{}'", key.id, first.id),
                );
            }
            keys.push(ApiKeyConfig {
                id: key.id,
                sha256,
                endpoints: key.endpoints,
            });
        }
    }
    let admin_digest = admin_key
        .as_ref()
        .map(|admin| crate::auth::sha256(admin.expose().as_bytes()));
    if let Some(digest) = admin_digest
        && let Some(key) = keys.iter().find(|k| k.sha256 == digest)
    {
        problems.add(
            "auth.admin_key",
            format!(
                "is the key of '{}': the admin key must be a key of its own",
                key.id
            ),
        );
    }
    if raw.protect_metrics && admin_key.is_none() {
        problems.add(
            "auth.protect_metrics",
            "needs auth.admin_key: the admin key is what protects /metrics",
        );
    }
    (problems.0.len() == before).then_some(AuthConfig {
        admin_key,
        keys,
        protect_metrics: raw.protect_metrics,
    })
}

fn compile_limits_store(
    raw: RawLimitsStore,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> Option<LimitsStoreConfig> {
    match raw {
        RawLimitsStore::Memory => Some(LimitsStoreConfig::Memory),
        RawLimitsStore::Redis(RawRedisStore {
            url,
            password,
            on_error,
            timeout_ms,
        }) => {
            // Reported with the URL's problems, if it has any.
            let password = match password.map(|p| resolve_secret(&p, env)).transpose() {
                Ok(password) => Some(password),
                Err(message) => {
                    problems.add("limits_store.password", message);
                    None
                }
            };
            // A URL with a password belongs in the environment: `url = "${REDIS_URL}"`. (A user
            // name alone, `redis://user@host`, is no secret.)
            let user_info = url
                .split_once("://")
                .map(|(_, rest)| rest.split(['/', '?', '#']).next().unwrap_or_default())
                .and_then(|authority| authority.rsplit_once('@'))
                .map(|(user_info, _)| user_info);
            let url = if url.starts_with("${") {
                match resolve_secret(&url, env) {
                    Ok(secret) => secret,
                    Err(message) => {
                        problems.add("limits_store.url", message);
                        return None;
                    }
                }
            } else if user_info.is_some_and(|u| u.contains(':')) || url.contains("pass=") {
                // Not quoted: it holds a password.
                problems.add(
                    "limits_store.url",
                    "a URL with credentials belongs in the environment: url = \"${REDIS_URL}\" \
                     (or the password alone: password = \"${REDIS_PASSWORD}\")",
                );
                return None;
            } else {
                Secret::new(url)
            };
            let scheme_ok = ["redis://", "unix://", "redis+unix://"]
                .iter()
                .any(|s| url.expose().starts_with(s));
            if !scheme_ok {
                // Not quoted: the value may hold a password.
                problems.add(
                    "limits_store.url",
                    "must be a redis:// or unix:// URL (TLS, rediss://, is not supported)",
                );
                return None;
            }
            if timeout_ms == 0 {
                problems.add("limits_store.timeout_ms", "must be greater than 0");
                return None;
            }
            Some(LimitsStoreConfig::Redis {
                url,
                password: password?,
                on_error,
                timeout: Duration::from_millis(timeout_ms),
            })
        }
    }
}

fn compile_limits(
    table: &mut toml::Table,
    declared_endpoints: &HashSet<String>,
    problems: &mut Problems,
) -> Vec<LimitRule> {
    let Some(value) = table.remove("limits") else {
        return Vec::new();
    };
    let toml::Value::Array(items) = value else {
        problems.add("limits", "expected an array of tables ([[limits]])");
        return Vec::new();
    };
    let mut rules = Vec::new();
    for (i, value) in items.into_iter().enumerate() {
        let path = format!("limits[{i}]");
        let Some(raw) = problems.take::<RawLimit>(&path, value) else {
            continue;
        };
        let before = problems.0.len();
        if raw.scope.is_empty() {
            problems.add(
                format!("{path}.scope"),
                "name at least one of global, endpoint, api_key, user",
            );
        }
        check_endpoint_names(
            &path,
            raw.endpoints.as_deref(),
            declared_endpoints,
            problems,
        );
        let both_request_rates =
            raw.requests_per_second.is_some() && raw.requests_per_minute.is_some();
        let requests = match (raw.requests_per_second, raw.requests_per_minute) {
            (Some(count), None) => Some((count, Duration::from_secs(1))),
            (None, Some(count)) => Some((count, Duration::from_secs(60))),
            _ => None,
        };
        if both_request_rates {
            problems.add(
                &path,
                "give requests_per_second or requests_per_minute, not both",
            );
        }
        if requests.is_some_and(|(count, _)| count == 0) || raw.tokens_per_minute == Some(0) {
            problems.add(
                &path,
                "a limit of 0 would refuse everything; remove the endpoint instead",
            );
        }
        if requests.is_none() && raw.tokens_per_minute.is_none() && !both_request_rates {
            problems.add(
                &path,
                "a rule needs requests_per_second, requests_per_minute or tokens_per_minute",
            );
        }
        if requests.is_none() && raw.burst > 0 && !both_request_rates {
            problems.add(format!("{path}.burst"), "applies to request limits only");
        }
        if raw.tokens_per_minute.is_none() && raw.default_max_tokens.is_some() {
            problems.add(
                format!("{path}.default_max_tokens"),
                "applies to token limits only (tokens_per_minute)",
            );
        }
        if problems.0.len() > before {
            continue;
        }
        // In one order, so that `[user, api_key]` and `[api_key, user]` count alike.
        let mut scope = raw.scope;
        scope.sort_unstable();
        scope.dedup();
        let endpoints = raw.endpoints.map(|mut endpoints| {
            endpoints.sort_unstable();
            endpoints.dedup();
            endpoints
        });
        rules.push(LimitRule {
            scope,
            endpoints,
            requests: requests.map(|(count, period)| RateConfig {
                count,
                period,
                burst: raw.burst,
            }),
            tokens_per_minute: raw.tokens_per_minute,
            default_max_tokens: raw
                .default_max_tokens
                .unwrap_or(DEFAULT_MAX_TOKENS_ESTIMATE),
        });
    }
    rules
}

/// Secrets are written as `${ENV_VAR}` and read from the environment; a literal value is refused
/// so that keys never sit in config files (or in the logs that quote them).
fn resolve_secret(reference: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Secret, String> {
    let var = reference
        .strip_prefix("${")
        .and_then(|r| r.strip_suffix('}'))
        .filter(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    let Some(var) = var else {
        return Err(
            "must be a reference to an environment variable, like \"${OPENAI_API_KEY}\"; \
             secrets are never written into config files"
                .to_owned(),
        );
    };
    env_value(var, env).map(Secret::new)
}

/// The value of environment variable `var`, without the whitespace around it (`echo key |
/// kubectl create secret` leaves a newline that no client's header can match: an admin key
/// with one locked the admin API without a word); it must be set and not blank.
fn env_value(var: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    match env(var) {
        Some(value) if !value.trim().is_empty() => Ok(value.trim().to_owned()),
        Some(_) => Err(format!("environment variable {var} is empty or blank")),
        None => Err(format!("environment variable {var} is not set")),
    }
}

fn compile_route(name: &str, raw: RawRoute, problems: &mut Problems) -> Option<RouteConfig> {
    let path = format!("routes.{name}");
    let before = problems.0.len();
    if raw.targets.is_empty() {
        problems.add(
            format!("{path}.targets"),
            "a route needs at least one target",
        );
    }
    if raw.timeout_ms == 0 {
        problems.add(format!("{path}.timeout_ms"), "must be greater than 0");
    }
    // Unset, they are `timeout_ms` (whose own problem is said above).
    let mut within_timeout = |key: &str, value: Option<u64>| {
        let value = value.unwrap_or(raw.timeout_ms);
        if value != raw.timeout_ms && (value == 0 || value > raw.timeout_ms) {
            problems.add(
                format!("{path}.{key}"),
                format!("must be between 1 and timeout_ms ({})", raw.timeout_ms),
            );
        }
        Duration::from_millis(value)
    };
    let first_token_timeout = within_timeout("first_token_timeout_ms", raw.first_token_timeout_ms);
    let attempt_timeout = within_timeout("attempt_timeout_ms", raw.attempt_timeout_ms);
    if problems.0.len() > before {
        return None;
    }
    let backoff = Duration::from_millis(raw.backoff_ms);
    Some(RouteConfig {
        targets: raw.targets,
        settings: RouteSettings {
            timeout: Duration::from_millis(raw.timeout_ms),
            first_token_timeout,
            attempt_timeout,
            retries: raw.retries,
            backoff,
            max_backoff: RouteSettings::default().max_backoff.max(backoff),
        },
    })
}

fn compile_endpoints(
    table: &mut toml::Table,
    routes: &BTreeMap<String, RouteConfig>,
    problems: &mut Problems,
) -> Vec<EndpointConfig> {
    let Some(value) = table.remove("endpoints") else {
        return Vec::new();
    };
    let toml::Value::Array(items) = value else {
        problems.add("endpoints", "expected an array of tables ([[endpoints]])");
        return Vec::new();
    };
    let declared_routes = table_keys(table, "routes");
    let mut seen = HashSet::new();
    let mut endpoints = Vec::new();
    for (i, value) in items.into_iter().enumerate() {
        let path = format!("endpoints[{i}]");
        let Some(raw) = problems.take::<RawEndpoint>(&path, value) else {
            continue;
        };
        if let Err(message) = check_name(&raw.name) {
            problems.add(format!("{path}.name"), message);
        }
        if !seen.insert(raw.name.clone()) {
            problems.add(
                format!("{path}.name"),
                format!("endpoint '{}' is defined twice", raw.name),
            );
        }
        let route_exists =
            |route: &str| routes.contains_key(route) || declared_routes.contains(route);
        let chain_keys_given =
            raw.config.is_some() || raw.llms.is_some() || raw.allow_code_mismatch;
        let source = match (raw.route, raw.model, raw.chain_dir) {
            (Some(route), None, None) => {
                if chain_keys_given {
                    problems.add(
                        &path,
                        "`config`, `llms` and `allow_code_mismatch` apply to chain endpoints only",
                    );
                }
                if !route_exists(&route) {
                    problems.add(format!("{path}.route"), format!("unknown route '{route}'"));
                    continue;
                }
                endpoints.push(EndpointConfig {
                    name: raw.name,
                    kind: EndpointKind::Route(route),
                    log_payloads: raw.log_payloads,
                });
                continue;
            }
            (None, Some(uri), None) => match uri.parse::<ModelUri>() {
                Ok(uri) => ChainSource::Logged(uri),
                Err(e) => {
                    problems.add(format!("{path}.model"), e.to_string());
                    continue;
                }
            },
            (None, None, Some(dir)) => ChainSource::Dir(dir),
            (None, None, None) => {
                problems.add(
                    &path,
                    "an endpoint needs one of `route = \"<route>\"`, `model = \"models:/<name>@<alias>\"` or `chain_dir = \"<chain folder>\"`",
                );
                continue;
            }
            _ => {
                problems.add(&path, "give only one of `route`, `model` and `chain_dir`");
                continue;
            }
        };
        let llms = raw.llms.unwrap_or_default();
        let mut ok = true;
        for (logical, route) in &llms {
            if !route_exists(route) {
                problems.add(
                    format!("{path}.llms.{logical}"),
                    format!("unknown route '{route}'"),
                );
                ok = false;
            }
        }
        let config = match raw
            .config
            .map(|table| serde_json::to_value(&table))
            .transpose()
        {
            Ok(config) => config,
            Err(e) => {
                problems.add(format!("{path}.config"), e.to_string());
                ok = false;
                None
            }
        };
        if !ok {
            continue;
        }
        let kind = EndpointKind::Chain(ChainEndpointConfig {
            source,
            config,
            llms,
            allow_code_mismatch: raw.allow_code_mismatch,
        });
        endpoints.push(EndpointConfig {
            name: raw.name,
            kind,
            log_payloads: raw.log_payloads,
        });
    }
    endpoints
}

/// Names of providers, routes and endpoints appear in URLs, logs and metric labels.
fn check_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid name '{name}': use 1-128 characters from A-Z a-z 0-9 - _ . : /"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "TEST_KEY").then(|| "sk-test-secret".to_owned())
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse("test.toml", text, &env)
    }

    fn problems(text: &str) -> Vec<(String, String)> {
        parse(text)
            .unwrap_err()
            .problems
            .into_iter()
            .map(|p| (p.path, p.message))
            .collect()
    }

    const VALID: &str = r#"
        [server]
        listen = "127.0.0.1:9000"
        [providers.openai]
        kind = "openai"
        base_url = "http://127.0.0.1:1/v1"
        api_key = "${TEST_KEY}"
        [providers.mock]
        kind = "mock"
        reply = "hello"
        [routes.default]
        targets = [{ provider = "openai", model = "gpt-4o-mini" }, { provider = "mock", model = "m" }]
        timeout_ms = 5000
        first_token_timeout_ms = 1000
        [[endpoints]]
        name = "chat"
        route = "default"
    "#;

    #[test]
    fn parses_a_valid_config() {
        let config = parse(VALID).unwrap();
        assert_eq!(config.server.listen.port(), 9000);
        assert_eq!(config.server.header_timeout, Duration::from_secs(120));
        assert_eq!(config.server.client_timeout, Duration::from_secs(60));
        assert_eq!(config.routes["default"].targets.len(), 2);
        assert_eq!(
            config.routes["default"].settings.first_token_timeout,
            Duration::from_secs(1)
        );
        let ProviderKind::OpenAi { api_key, .. } = &config.providers["openai"].kind else {
            panic!("not openai");
        };
        assert_eq!(api_key.as_ref().unwrap().expose(), "sk-test-secret");
        // The secret never shows in Debug output.
        assert!(!format!("{config:?}").contains("sk-test-secret"));
    }

    #[test]
    fn a_limit_rule_is_read_in_one_order() {
        let rule = "[[endpoints]]\nname = \"b\"\nroute = \"default\"\n[[limits]]\nscope = [\"user\", \"api_key\", \"user\"]\nendpoints = [\"chat\", \"b\", \"chat\"]\nrequests_per_minute = 5\n";
        let config = parse(&format!("{VALID}{rule}")).unwrap();
        // `[user, api_key]` and `[api_key, user]` are one rule, with the same counters.
        assert_eq!(
            config.limits[0].scope,
            [LimitScope::ApiKey, LimitScope::User]
        );
        assert_eq!(
            config.limits[0].endpoints.as_deref(),
            Some(&["b".to_owned(), "chat".to_owned()][..])
        );
    }

    #[test]
    fn a_limit_rule_says_what_is_wrong_with_it_once() {
        let found = problems(&format!(
            "{VALID}[[limits]]\nscope = [\"global\"]\nrequests_per_second = 1\nrequests_per_minute = 60\nburst = 2\n\
             [[limits]]\nscope = [\"global\"]\nrequests_per_minute = 6\ndefault_max_tokens = 10\n"
        ));
        assert_eq!(
            found,
            [
                (
                    "limits[0]".to_owned(),
                    "give requests_per_second or requests_per_minute, not both".to_owned()
                ),
                (
                    "limits[1].default_max_tokens".to_owned(),
                    "applies to token limits only (tokens_per_minute)".to_owned()
                ),
            ]
        );
    }

    #[test]
    fn every_problem_of_one_table_is_reported() {
        let mut found = problems(
            r#"
            [server]
            listen = 5
            max_body_bytes = "big"
            bogus = 1
            [providers.b]
            kind = "openai"
            base_url = 7
            queue_timeout_ms = 1.5
            stream_usage = "yes"
            [routes.main]
            targets = [{ provider = "b", model = "m" }]
            retries = -2
            timeout_ms = "soon"
            [[endpoints]]
            name = "chat"
            route = "main"
        "#,
        );
        found.sort();
        let paths: Vec<&str> = found.iter().map(|(path, _)| path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "providers.b.base_url",
                "providers.b.queue_timeout_ms",
                "providers.b.stream_usage",
                "routes.main.retries",
                "routes.main.timeout_ms",
                "server.bogus",
                "server.listen",
                "server.max_body_bytes",
            ],
            "{found:#?}"
        );
        assert_eq!(
            found[5].1,
            "unknown field `bogus`, expected one of `listen`, `max_body_bytes`, `header_timeout_ms`, `client_timeout_ms`, `shutdown_timeout_ms`, `max_connections`"
        );
        assert_eq!(found[6].1, "invalid type: integer `5`, expected a string");
    }

    #[test]
    fn a_problem_inside_a_kind_tagged_table_names_its_key() {
        let found = problems(
            r#"
            [limits_store]
            kind = "redis"
            url = "redis://127.0.0.1:6379"
            on_error = "maybe"
            [providers.a]
            kind = "mock"
            chunks = "many"
            [providers.b]
            kind = "openai"
            stream_usage = "yes"
            [providers.c]
            kind = "gemini"
            [providers.d]
            base_url = "http://127.0.0.1:1"
            [providers.e]
            kind = 1
            [providers.f]
            kind = "anthropic"
            base_url = "http://127.0.0.1:1"
            max_concurrency = -1
            [routes.main]
            targets = [{ provider = "a", model = "m" }]
            [[endpoints]]
            name = "chat"
            route = "main"
        "#,
        );
        let found: Vec<(&str, &str)> = found
            .iter()
            .map(|(path, message)| (path.as_str(), message.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                (
                    "limits_store.on_error",
                    "unknown variant `maybe`, expected `deny` or `allow`"
                ),
                (
                    "providers.a.chunks",
                    "invalid type: string \"many\", expected usize"
                ),
                (
                    "providers.b.stream_usage",
                    "invalid type: string \"yes\", expected a boolean"
                ),
                (
                    "providers.c.kind",
                    "unknown kind `gemini`, expected one of `openai`, `anthropic`, `mock`"
                ),
                (
                    "providers.d",
                    "missing field `kind`, expected one of `openai`, `anthropic`, `mock`"
                ),
                ("providers.e.kind", "expected a string, found integer"),
                (
                    "providers.f.max_concurrency",
                    "invalid value: integer `-1`, expected usize"
                ),
            ]
        );
        // A memory store has no settings.
        let found = problems("[limits_store]\nkind = \"memory\"\nurl = \"redis://x\"\n");
        assert_eq!(found[0].0, "limits_store.url");
        assert!(found[0].1.starts_with("unknown field `url`"), "{found:?}");
    }

    #[test]
    fn reports_every_problem_with_its_path() {
        let found = problems(
            r#"
            [server]
            listen = "nowhere"
            [providers.openai]
            kind = "openai"
            api_key = "sk-literal-key"
            [providers.other]
            kind = "openai"
            api_key = "${MISSING_VAR}"
            [providers.typo]
            kind = "mock"
            replay = "x"
            [routes.default]
            targets = [{ provider = "nope", model = "m" }]
            [routes.broken]
            targets = [{ provider = "openai", modle = "m" }]
            [[endpoints]]
            name = "a"
            route = "missing"
            [[endpoints]]
            name = "a"
            route = "default"
            [extra]
            x = 1
        "#,
        );
        let paths: Vec<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "extra",
                "server.listen",
                "providers.typo.replay",
                "providers.openai.api_key",
                "providers.other.api_key",
                "routes.broken.targets[0].modle",
                "routes.default.targets[0].provider",
                "endpoints[0].route",
                "endpoints[1].name",
            ],
            "{found:#?}"
        );
        assert!(
            found[2].1.starts_with("unknown field `replay`"),
            "{}",
            found[2].1
        );
        assert!(found[3].1.contains("${OPENAI_API_KEY}"));
        assert!(found[4].1.contains("MISSING_VAR is not set"));
        assert_eq!(
            found[5].1,
            "unknown field `modle`, expected `provider` or `model`"
        );
        // The literal key is not echoed back.
        assert!(!found.iter().any(|(_, m)| m.contains("sk-literal-key")));
    }

    #[test]
    fn a_key_is_one_caller_and_not_the_admin_key() {
        // TEST_KEY's value, as a digest.
        let digest: String = crate::auth::sha256(b"sk-test-secret")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let found = problems(&format!(
            "{VALID}\n[auth]\nadmin_key = \"${{TEST_KEY}}\"\n\
             [[auth.keys]]\nid = \"team-a\"\nkey_env = \"TEST_KEY\"\n\
             [[auth.keys]]\nid = \"team-b\"\nkey_sha256 = \"{digest}\"\n"
        ));
        assert_eq!(
            found,
            [
                (
                    "auth.keys[1].id".to_owned(),
                    "'team-b' has the same key as 'team-a'".to_owned()
                ),
                (
                    "auth.admin_key".to_owned(),
                    "is the key of 'team-a': the admin key must be a key of its own".to_owned()
                ),
            ]
        );
    }

    #[test]
    fn keys_and_limit_rules_are_checked_against_the_declared_endpoints() {
        // A bad key does not hide another key's unknown endpoint, and an endpoint that is
        // declared but broken is not also "unknown" to the keys and rules that name it.
        let found = problems(&format!(
            "{VALID}\n[[endpoints]]\nname = \"broken\"\nroute = \"nowhere\"\n\
             [[limits]]\nscope = [\"api_key\"]\nendpoints = [\"broken\", \"nope\"]\n\
             requests_per_minute = 5\n\
             [auth]\n\
             [[auth.keys]]\nid = \"team-a\"\nkey_sha256 = \"not-hex\"\n\
             [[auth.keys]]\nid = \"team-b\"\nkey_env = \"TEST_KEY\"\n\
             endpoints = [\"chat\", \"broken\", \"chta\"]\n"
        ));
        let found: Vec<(&str, &str)> = found
            .iter()
            .map(|(path, message)| (path.as_str(), message.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                (
                    "auth.keys[0].key_sha256",
                    "must be 64 hex characters (the SHA-256 of the key)"
                ),
                ("auth.keys[1].endpoints", "unknown endpoint 'chta'"),
                ("endpoints[1].route", "unknown route 'nowhere'"),
                ("limits[0].endpoints", "unknown endpoint 'nope'"),
            ]
        );
    }

    #[test]
    fn a_bad_key_entry_hides_no_problem_of_the_others() {
        let found = problems(&format!(
            "{VALID}\n[auth]\n\
             [[auth.keys]]\nid = \"team-a\"\nkey = \"sk-literal-123\"\n\
             [[auth.keys]]\nid = \"team-b\"\nkey_sha256 = \"not-hex\"\n\
             [[auth.keys]]\nid = \"team-b\"\nkey_env = \"TEST_KEY\"\n"
        ));
        let paths: Vec<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "auth.keys[0].key",
                "auth.keys[1].key_sha256",
                "auth.keys[2].id"
            ],
            "{found:#?}"
        );
        assert!(!found.iter().any(|(_, m)| m.contains("sk-literal-123")));
    }

    #[test]
    fn a_blank_secret_is_an_empty_one_and_whitespace_around_one_is_not_part_of_it() {
        let env = |name: &str| match name {
            "BLANK" => Some("  ".to_owned()),
            "ECHOED" => Some(" sk-admin-key\n".to_owned()),
            other => env(other),
        };
        let text = format!("{VALID}\n[auth]\nadmin_key = \"${{ECHOED}}\"\n");
        let config = Config::parse("test.toml", &text, &env).unwrap();
        let admin = config.auth.admin_key.unwrap();
        assert_eq!(admin.expose(), "sk-admin-key");
        let text = format!("{VALID}\n[auth]\nadmin_key = \"${{BLANK}}\"\n");
        let error = Config::parse("test.toml", &text, &env).unwrap_err();
        let found: Vec<(String, String)> = error
            .problems
            .into_iter()
            .map(|p| (p.path, p.message))
            .collect();
        assert_eq!(
            found,
            [(
                "auth.admin_key".to_owned(),
                "environment variable BLANK is empty or blank".to_owned()
            )]
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let error = parse("[server\nlisten = 1").unwrap_err();
        assert_eq!(error.problems.len(), 1);
        assert!(error.to_string().contains("line 1"), "{error}");
        // The line itself is not quoted: it may hold a secret.
        let error = parse("[server]\n\n  api_key = \"sk-BROKEN-SECRET\n").unwrap_err();
        let text = error.to_string();
        assert!(text.contains("TOML syntax, line 3, column "), "{text}");
        assert!(!text.contains("sk-BROKEN"), "{text}");
    }

    #[test]
    fn chain_endpoints_take_a_folder_config_and_llm_overrides() {
        let config = parse(&format!(
            "{VALID}\n[[endpoints]]\nname = \"bot\"\nchain_dir = \"chains/support_bot\"\n\
             config = {{ tone = \"formal\", rules = [\"a\"] }}\nllms = {{ default = \"default\" }}\n"
        ))
        .unwrap();
        let EndpointKind::Chain(chain) = &config.endpoints[1].kind else {
            panic!("not a chain endpoint");
        };
        let ChainEndpointConfig {
            source,
            config,
            llms,
            allow_code_mismatch,
        } = chain;
        assert_eq!(
            source,
            &ChainSource::Dir(PathBuf::from("chains/support_bot"))
        );
        assert!(!allow_code_mismatch);
        assert_eq!(
            config.as_ref().unwrap(),
            &serde_json::json!({"tone": "formal", "rules": ["a"]})
        );
        assert_eq!(llms["default"], "default");

        let found = problems(
            r#"
            [[endpoints]]
            name = "a"
            [[endpoints]]
            name = "b"
            route = "x"
            chain_dir = "y"
            [[endpoints]]
            name = "c"
            chain_dir = "y"
            llms = { default = "nowhere" }
        "#,
        );
        let paths: Vec<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            ["endpoints[0]", "endpoints[1]", "endpoints[2].llms.default"]
        );
    }

    #[test]
    fn a_redis_url_with_credentials_must_come_from_the_environment() {
        for url in [
            "redis://:hunter2-secret@127.0.0.1:6379",
            "unix:///run/redis.sock?pass=hunter2-secret",
        ] {
            let found = problems(&format!(
                "[limits_store]\nkind = \"redis\"\nurl = \"{url}\"\n{VALID}"
            ));
            assert_eq!(found.len(), 1, "{found:#?}");
            assert_eq!(found[0].0, "limits_store.url", "{found:#?}");
            assert!(found[0].1.contains("${REDIS_URL}"), "{}", found[0].1);
            assert!(found[0].1.contains("${REDIS_PASSWORD}"), "{}", found[0].1);
            assert!(!found[0].1.contains("hunter2"));
        }

        // Or the password alone, from the environment; a literal one is refused.
        // (A user name in the URL is no secret.)
        let store = |url: &str, password: &str| {
            format!(
                "[limits_store]\nkind = \"redis\"\n\
                 url = \"{url}\"\npassword = \"{password}\"\n{VALID}"
            )
        };
        let config = parse(&store("redis://app@127.0.0.1:6379/2", "${TEST_KEY}")).unwrap();
        let LimitsStoreConfig::Redis {
            url,
            password,
            on_error,
            ..
        } = &config.limits_store
        else {
            panic!("{:?}", config.limits_store);
        };
        assert_eq!(url.expose(), "redis://app@127.0.0.1:6379/2");
        assert_eq!(*on_error, OnError::Deny);
        assert_eq!(password.as_ref().unwrap().expose(), "sk-test-secret");
        // An '@' after the host is no user information.
        assert!(parse(&store("redis://127.0.0.1:6379/0?x=a@b", "${TEST_KEY}")).is_ok());
        // Every problem at once: the password's and the URL's.
        let found = problems(&store("rediss://127.0.0.1:6379", "hunter2-secret"));
        let paths: Vec<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            ["limits_store.password", "limits_store.url"],
            "{found:#?}"
        );
        assert!(!found[0].1.contains("hunter2"), "{}", found[0].1);
    }

    #[test]
    fn rejects_bad_timeouts_and_names() {
        let found = problems(
            r#"
            [server]
            header_timeout_ms = 0
            client_timeout_ms = 0
            max_connections = 0
            [providers."bad name"]
            kind = "mock"
            [providers.m]
            kind = "mock"
            chunks = 0
            [routes.r]
            targets = []
            timeout_ms = 100
            first_token_timeout_ms = 200
            attempt_timeout_ms = 0
            [routes.zero]
            targets = [{ provider = "m", model = "x" }]
            timeout_ms = 0
        "#,
        );
        let paths: Vec<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "server.max_connections",
                "server.header_timeout_ms",
                "server.client_timeout_ms",
                "providers.bad name",
                "providers.m.chunks",
                "routes.r.targets",
                "routes.r.first_token_timeout_ms",
                "routes.r.attempt_timeout_ms",
                // Not also the two timeouts it was not given (they default to it).
                "routes.zero.timeout_ms",
            ]
        );
    }
}
