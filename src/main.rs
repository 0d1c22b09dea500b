//! `switchyard`: the command-line entry point. Parses arguments, sets up logging and hands over
//! to the gateway and store libraries.

mod log_writer;
mod telemetry;

/// mimalloc: the gateway allocates many small short-lived buffers per request; with glibc's
/// malloc that was a fifth of its CPU under load (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use switchyard_gateway::{ConfigSource, Gateway};
use switchyard_store::{DEFAULT_STORE, ModelUri, Store};

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "A GenAI gateway: serves LLM chains, artifact models and provider routes"
)]
struct Cli {
    /// Model store directory [default for serve: the config's [store] path, else .switchyard/store]
    #[arg(long, global = true, env = "SWITCHYARD_STORE")]
    store: Option<PathBuf>,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the endpoints of a gateway config over HTTP (SIGHUP reloads the config).
    Serve {
        /// Gateway config file (TOML).
        #[arg(long, default_value = "config/quickstart.toml")]
        config: PathBuf,
        /// Address to listen on; overrides `[server] listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Serve logged chains whose code differs from the code compiled into this binary, as
        /// if every chain endpoint said `allow_code_mismatch = true` (development only: a
        /// warning names each such chain).
        #[arg(long)]
        allow_code_mismatch: bool,
    },
    /// Log a model into the store as a new version.
    #[command(subcommand)]
    Log(LogCommand),
    /// Inspect and manage logged models.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Run one request without a server, as `/endpoints/{name}/invocations` would: an ONNX
    /// model's `{"predictions": ...}`, or a chain's or route's chat completion.
    Predict(PredictArgs),
}

#[derive(clap::Args)]
struct PredictArgs {
    /// A model URI (`models:/iris@production`, `models:/support-bot/2`), an endpoint of
    /// --config, or an .onnx file or MLflow model directory.
    target: String,
    /// For a model, an MLflow scoring request (`{"inputs": [[...]]}`, `dataframe_split`…); for
    /// a chain or route, a chat request (`{"messages": [...]}`). JSON text, `@file`, or `-` for
    /// standard input.
    #[arg(long)]
    input: String,
    /// Gateway config: its endpoint names and overrides, its [store], and the routes and
    /// providers a chain or route calls (needed for those; API keys and rate limits do not
    /// apply).
    #[arg(long)]
    config: Option<PathBuf>,
    /// As `serve --allow-code-mismatch`: run a logged chain whose code differs from the code
    /// compiled into this binary (development only).
    #[arg(long)]
    allow_code_mismatch: bool,
}

#[derive(Subcommand)]
enum LogCommand {
    /// Log an ONNX model (a .onnx file, or an MLflow model directory with an onnx flavor) as an
    /// artifact model; it must load and run here first.
    Onnx {
        /// The .onnx file or MLflow model directory.
        path: PathBuf,
        /// Model name in the store.
        #[arg(long)]
        name: String,
        /// Point this alias at the logged version.
        #[arg(long)]
        alias: Option<String>,
    },
    /// Log a chain folder (its .rs files, prompts/*.tera and chain.toml) as a code model.
    Chain {
        /// The chain folder, e.g. chains/support_bot.
        dir: PathBuf,
        /// Model name in the store.
        #[arg(long)]
        name: String,
        /// Point this alias (e.g. production) at the logged version.
        #[arg(long)]
        alias: Option<String>,
        /// Move the alias even if the chain's code is not the code compiled into this binary
        /// (which would refuse to serve it), e.g. when the serving binary is built elsewhere.
        #[arg(long)]
        allow_code_mismatch: bool,
    },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// List models with their versions and aliases.
    List,
    /// Show a version's MLmodel, check its files, and for a chain say whether its code is the
    /// code compiled into this binary.
    Show {
        /// The version: `models:/name/3`, `models:/name@alias` or `models:/name/latest`.
        uri: String,
    },
    /// Point an alias of a model at a version.
    Alias {
        /// The model's name in the store.
        model: String,
        /// The alias, e.g. production.
        alias: String,
        /// The version number it is to point at.
        version: u64,
        /// Move the alias even if the version is a chain whose code is not the code compiled
        /// into this binary (which would refuse to serve it), e.g. when the serving binary is
        /// built elsewhere.
        #[arg(long)]
        allow_code_mismatch: bool,
    },
    /// Write a logged version back out (checked intact first): a chain's folder, to rebuild
    /// from the logged code, or an ONNX model's MLflow model directory.
    Restore {
        /// The version: `models:/name/3`, `models:/name@alias` or `models:/name/latest`.
        uri: String,
        /// A folder that does not exist yet.
        dir: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = telemetry::init(matches!(cli.log_format, LogFormat::Json))?;
    let store = || {
        Store::new(
            cli.store
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STORE)),
        )
    };
    match cli.command {
        Command::Serve {
            config,
            listen,
            allow_code_mismatch,
        } => {
            let source = ConfigSource {
                path: config,
                store_override: cli.store.clone(),
                allow_code_mismatch,
            };
            raise_open_files_limit();
            let gateway = Gateway::from_file(source, &switchyard_chains::registry())?;
            if telemetry.exports_traces() {
                gateway.export_traces();
            }
            let listen = listen.unwrap_or_else(|| gateway.listen_address());
            let listener = std::net::TcpListener::bind(listen)
                .with_context(|| format!("cannot listen on {listen}"))?;
            switchyard_gateway::serve_on_threads(
                listener,
                gateway,
                event_loop_threads(),
                switchyard_gateway::shutdown_signal(),
            )?;
        }
        Command::Log(LogCommand::Onnx { path, name, alias }) => {
            let store = store();
            // What would refuse the log anyway is checked before a long load.
            switchyard_store::check_name("model name", &name).map_err(anyhow::Error::msg)?;
            // Loading checks the model and can take a while for a large one: say what is going on.
            let file = switchyard_store::onnx_model_file(&path)?;
            let megabytes = std::fs::metadata(&file)
                .with_context(|| format!("cannot read {}", file.display()))?
                .len() as f64
                / 1e6;
            eprintln!(
                "loading {} ({megabytes:.1} MB) to check it…",
                file.display()
            );
            let started = std::time::Instant::now();
            let model = switchyard_serving::OnnxModel::load(&file)?;
            eprintln!(
                "loaded in {:.1} s; copying it into the store…",
                started.elapsed().as_secs_f64()
            );
            let logged = store.log_onnx(&path, &name, model.signature(), model.external_data())?;
            report(&store, &logged, &name, alias)?;
        }
        Command::Log(LogCommand::Chain {
            dir,
            name,
            alias,
            allow_code_mismatch,
        }) => {
            let store = store();
            let logged = store.log_chain(&dir, &name, &switchyard_chains::registry())?;
            if let Some(alias) = &alias
                && logged.code_differs
                && !allow_code_mismatch
            {
                report(&store, &logged, &name, None)?;
                eprintln!(
                    "error: models:/{name}@{alias} was not moved: a gateway built like this binary \
                     would refuse {} (its code is not the code compiled in; see the warning). \
                     Build the gateway from this code first, or pass --allow-code-mismatch",
                    logged.version.uri()
                );
                // Logged, alias kept: not the failure that status 1 means.
                std::process::exit(ALIAS_NOT_MOVED);
            }
            report(&store, &logged, &name, alias)?;
        }
        Command::Models(command) => models(&store(), command)?,
        Command::Predict(args) => predict(args, cli.store.clone())?,
    }
    Ok(())
}

/// The providers endpoint `name` of `config` can call: its route's targets, or those of the
/// routes its chain's LLMs are bound to (`chain.toml`'s `[llms]`, the logged version's for a
/// `models:/` endpoint, with the endpoint's `llms` over them). `None` when that cannot be read.
fn providers_of(
    config: &switchyard_gateway::Config,
    name: &str,
    version: Option<&switchyard_store::ModelVersion>,
) -> Option<std::collections::BTreeSet<String>> {
    use switchyard_gateway::{ChainSource, EndpointKind};
    let endpoint = config.endpoints.iter().find(|e| e.name == name)?;
    let routes: Vec<String> = match &endpoint.kind {
        EndpointKind::Route(route) => vec![route.clone()],
        EndpointKind::Chain(chain) => {
            let mut llms = match &chain.source {
                ChainSource::Dir(dir) => switchyard_core::ChainFolder::load(dir).ok()?.llms,
                ChainSource::Logged(_) => version?.mlmodel.chain_flavor().ok()??.llms,
            };
            llms.extend(chain.llms.clone());
            llms.into_values().collect()
        }
    };
    Some(
        routes
            .iter()
            .filter_map(|route| config.routes.get(route))
            .flat_map(|route| route.targets.iter().map(|t| t.provider.clone()))
            .collect(),
    )
}

/// For a logged chain whose code is not the code compiled into this binary, how it differs
/// (a gateway built like this binary refuses to serve it).
fn code_differs(version: &switchyard_store::ModelVersion) -> Option<String> {
    let flavor = match version.mlmodel.chain_flavor() {
        Ok(Some(flavor)) => flavor,
        Ok(None) => return None,
        Err(why) => return Some(format!("has a chain flavor that cannot be read ({why})")),
    };
    let registry = switchyard_chains::registry();
    match registry.get(&flavor.chain) {
        None => Some(format!(
            "runs the chain '{}', which is not compiled into this binary",
            flavor.chain
        )),
        Some(entry) if entry.code_sha256 != flavor.code_sha256 => Some(format!(
            "has code that differs from the '{}' chain compiled into this binary (code_sha256 {} \
             vs {})",
            flavor.chain, flavor.code_sha256, entry.code_sha256
        )),
        Some(_) => None,
    }
}

/// The exit status of `log chain --alias` when the version was logged but the alias kept.
const ALIAS_NOT_MOVED: i32 = 2;

/// One event-loop thread per core, or `TOKIO_WORKER_THREADS` of them.
fn event_loop_threads() -> std::num::NonZeroUsize {
    let cores = std::thread::available_parallelism().unwrap_or(std::num::NonZeroUsize::MIN);
    match std::env::var("TOKIO_WORKER_THREADS") {
        Err(_) => cores,
        Ok(value) => value.trim().parse().unwrap_or_else(|_| {
            tracing::warn!(
                value,
                "TOKIO_WORKER_THREADS is not a positive number: running one thread per core"
            );
            cores
        }),
    }
}

/// Tells what `log` did, moves the alias if asked, and prints the version's URI.
fn report(
    store: &Store,
    logged: &switchyard_store::Logged,
    name: &str,
    alias: Option<String>,
) -> anyhow::Result<()> {
    for warning in &logged.warnings {
        eprintln!("warning: {warning}");
    }
    if logged.code_differs && logged.created {
        eprintln!(
            "warning: models:/{name}/latest is this version now: an endpoint that serves it \
             refuses to start or reload on a gateway built like this binary"
        );
    }
    if !logged.created {
        eprintln!(
            "content unchanged since {}: nothing new logged",
            logged.version.uri()
        );
    }
    if let Some(alias) = alias {
        store.set_alias(name, &alias, logged.version.version)?;
        eprintln!(
            "models:/{name}@{alias} -> version {}",
            logged.version.version
        );
    }
    println!("{}", logged.version.uri());
    Ok(())
}

/// `switchyard predict`: an ONNX model is loaded as the gateway would (logged versions are
/// verified first) and run on the request; a chain or route endpoint (or a logged chain, bound to
/// the config's routes) is loaded with the config's providers and sent the request in process.
/// Prints the answer; an error answer is the command's error.
fn predict(args: PredictArgs, store: Option<PathBuf>) -> anyhow::Result<()> {
    let PredictArgs {
        target,
        input,
        config: config_path,
        allow_code_mismatch,
    } = args;
    let text = match input.as_str() {
        "-" => std::io::read_to_string(std::io::stdin()).context("cannot read standard input")?,
        _ => match input.strip_prefix('@') {
            Some(file) => {
                std::fs::read_to_string(file).with_context(|| format!("cannot read {file}"))?
            }
            None => input.clone(),
        },
    };
    let body: serde_json::Value =
        serde_json::from_str(&text).context("--input is not valid JSON")?;
    // One request needs few of the config's secrets (a model none, a chain only its providers'
    // keys; API keys and the Redis store are not used): a `${VAR}` that is not set stands in as
    // a value that passes the config's checks (a Redis URL must start with redis://; two keys
    // must differ) and opens nothing, and is named below if it is a provider's key.
    const PLACEHOLDER: &str = "redis://unset-for-predict/";
    let env = |name: &str| {
        std::env::var(name)
            .ok()
            .or_else(|| Some(format!("{PLACEHOLDER}{name}")))
    };
    let config = config_path
        .as_deref()
        .map(|path| switchyard_gateway::Config::load_with_env(path, &env))
        .transpose()?;
    let store = Store::new(
        store
            .or_else(|| config.as_ref().map(|c| c.store.clone()))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STORE)),
    );
    fn logged_uri(endpoint: &switchyard_gateway::EndpointConfig) -> Option<&ModelUri> {
        match &endpoint.kind {
            switchyard_gateway::EndpointKind::Chain(switchyard_gateway::ChainEndpointConfig {
                source: switchyard_gateway::ChainSource::Logged(uri),
                ..
            }) => Some(uri),
            _ => None,
        }
    }
    let endpoints = config.as_ref().map_or(&[][..], |c| &c.endpoints[..]);
    let (endpoint, logged) = if target.starts_with("models:/") {
        let uri = target.parse::<ModelUri>()?;
        // An endpoint of the config that serves this URI lends it its overrides; with several,
        // the first, and the command says which.
        let mut serving = endpoints.iter().filter(|e| logged_uri(e) == Some(&uri));
        let first = serving.next();
        if let Some(first) = first
            && serving.next().is_some()
        {
            eprintln!(
                "note: several endpoints serve {uri}; running it as endpoint '{}' (name the \
                 endpoint instead of the URI to choose)",
                first.name
            );
        }
        (first.map(|e| e.name.clone()), Some(uri))
    } else {
        let endpoint = endpoints.iter().find(|e| e.name == target);
        (
            endpoint.map(|e| e.name.clone()),
            endpoint.and_then(logged_uri).cloned(),
        )
    };
    let version = logged.as_ref().map(|uri| store.resolve(uri)).transpose()?;
    let target_path = std::path::Path::new(&target);
    let onnx = match &version {
        Some(version) if version.mlmodel.onnx_data().is_some() => Some(store.verify_onnx(version)?),
        Some(_) => None,
        None if endpoint.is_some() => None,
        None if target_path.exists() => Some(switchyard_store::onnx_model_file(target_path)?),
        None => anyhow::bail!(
            "{target} is not a models:/ URI, an endpoint of the --config, or an existing file or directory"
        ),
    };
    if let Some(path) = onnx {
        let model = switchyard_serving::OnnxModel::load(&path)?;
        let batch = model.parse_input(&body)?;
        let predictions = model.predict(batch)?;
        println!("{}", serde_json::json!({"predictions": predictions}));
        return Ok(());
    }

    // A chain or a route: its LLM calls go through the config's routes and providers.
    let Some(mut config) = config else {
        anyhow::bail!(
            "{target} is a chain: its LLMs are routes of a gateway config, so give --config (e.g. config/quickstart.toml)"
        );
    };
    config.store = store.root().to_owned();
    config.allow_code_mismatch = allow_code_mismatch;
    let name = match (endpoint, logged) {
        (Some(endpoint), _) => endpoint,
        // A logged chain that no endpoint serves: served as one named after its model.
        (None, Some(uri)) => {
            let name = uri.name.clone();
            config.endpoints = vec![switchyard_gateway::EndpointConfig {
                name: name.clone(),
                kind: switchyard_gateway::EndpointKind::Chain(
                    switchyard_gateway::ChainEndpointConfig {
                        source: switchyard_gateway::ChainSource::Logged(uri),
                        config: None,
                        llms: Default::default(),
                        allow_code_mismatch: false,
                    },
                ),
                log_payloads: false,
            }];
            name
        }
        (None, None) => unreachable!("a target that is neither an endpoint nor a URI is a file"),
    };
    // Only a provider's key matters to one request (keys, limits and the Redis store do not);
    // one the endpoint can call that is not set is named if the call fails.
    let called = providers_of(&config, &name, version.as_ref());
    let unset_keys: Vec<String> = config
        .providers
        .iter()
        .filter(|(name, _)| called.as_ref().is_none_or(|called| called.contains(*name)))
        .filter_map(|(name, provider)| {
            let (switchyard_gateway::ProviderKind::OpenAi { api_key, .. }
            | switchyard_gateway::ProviderKind::Anthropic { api_key, .. }) = &provider.kind
            else {
                return None;
            };
            let variable = api_key.as_ref()?.expose().strip_prefix(PLACEHOLDER)?;
            Some(format!("{variable} (provider '{name}')"))
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (status, answer) = runtime.block_on(switchyard_gateway::Gateway::call_once(
        config,
        &switchyard_chains::registry(),
        &name,
        text.into(),
    ))?;
    let answer = String::from_utf8_lossy(&answer);
    if !status.is_success() {
        if !unset_keys.is_empty() {
            eprintln!(
                "note: these providers' api_key variables are not set, and a provider refuses \
                 calls without its key: {}",
                unset_keys.join(", ")
            );
        }
        anyhow::bail!("endpoint {name} answered {status}: {answer}");
    }
    println!("{}", answer.trim_end());
    Ok(())
}

fn models(store: &Store, command: ModelsCommand) -> anyhow::Result<()> {
    match command {
        ModelsCommand::List => {
            let models = store.list()?;
            if !store.root().is_dir() {
                eprintln!(
                    "no store at {} (give --store or SWITCHYARD_STORE, or log a model to create it)",
                    store.root().display()
                );
            } else if models.is_empty() {
                eprintln!("no models in {}", store.root().display());
            }
            for model in models {
                let versions: Vec<String> = model.versions.iter().map(u64::to_string).collect();
                let aliases: Vec<String> = model
                    .aliases
                    .iter()
                    .map(|(a, v)| format!("{a}={v}"))
                    .collect();
                println!(
                    "{}\tversions: {}\taliases: {}",
                    model.name,
                    versions.join(","),
                    aliases.join(",")
                );
            }
        }
        ModelsCommand::Show { uri } => {
            let version = store.resolve(&uri.parse::<ModelUri>()?)?;
            println!("# {} ({})", version.uri(), version.dir.display());
            print!("{}", version.mlmodel.to_yaml()?);
            let intact = if version.mlmodel.onnx_data().is_some() {
                store.verify_onnx(&version).map(|_| ())
            } else {
                store.verify_chain(&version).map(|_| ())
            };
            // The manifest is shown either way; files that are not what was logged fail the
            // command, so that scripts can use `show` as an integrity check.
            match intact {
                Ok(()) => println!("# files: intact (content_sha256 matches)"),
                Err(error) => {
                    println!("# files: {error}");
                    anyhow::bail!("{} is not intact: {error}", version.uri());
                }
            }
            if let Some(differs) = code_differs(&version) {
                println!("# code: {differs}");
            } else if version.mlmodel.onnx_data().is_none() {
                println!("# code: the code compiled into this binary (code_sha256 matches)");
            }
        }
        ModelsCommand::Alias {
            model,
            alias,
            version,
            allow_code_mismatch,
        } => {
            let uri = format!("models:/{model}/{version}");
            if !allow_code_mismatch
                && let Some(differs) = code_differs(&store.resolve(&uri.parse::<ModelUri>()?)?)
            {
                anyhow::bail!(
                    "models:/{model}@{alias} was not moved: {uri} {differs}, so a gateway built \
                     like this binary would refuse it. Build the gateway from its code first, or \
                     pass --allow-code-mismatch"
                );
            }
            store.set_alias(&model, &alias, version)?;
            println!("models:/{model}@{alias} -> {uri}");
        }
        ModelsCommand::Restore { uri, dir } => {
            let version = store.restore(&uri.parse::<ModelUri>()?, &dir)?;
            println!("restored {} into {}", version.uri(), dir.display());
        }
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard one, as servers do: every connection is a
/// file, and the usual soft default of 1024 let ~1000 idle connections lock out every client
/// (`accept` failing with "too many open files").
fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "open files limit"),
        Err(error) => tracing::warn!(%error, "could not raise the open files limit"),
    }
}
