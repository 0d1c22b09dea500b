//! The model store: logged versions of models, with aliases and MLflow `MLmodel` manifests.
//!
//! ```text
//! <store>/models/<name>/aliases.toml            alias -> version
//! <store>/models/<name>/<version>/MLmodel       YAML, MLflow's MLmodel format
//! <store>/models/<name>/<version>/code/...      chain snapshot (*.rs, prompts/, chain.toml)
//! ```
//!
//! A version is written into a hidden temp directory next to the versions and then renamed to
//! the next free number. `rename` onto an existing (non-empty) version fails, so concurrent
//! loggers never share a number, and a crash mid-log leaves only a hidden temp directory that
//! listing and resolving ignore.

mod mlmodel;
mod secrets;
mod uri;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use switchyard_core::code_hash::{self, all_files, code_sha256, files_sha256, rs_files};
use switchyard_core::{ChainFolder, Registry};

pub use mlmodel::{CHAIN_FLAVOR, ChainFlavor, MlModel, ONNX_FLAVOR};
pub use secrets::{find_secrets, find_secrets_in_text};
pub use uri::{ModelUri, Selector, check_name};

/// Where a store lives when nothing says otherwise (relative to the working directory).
pub const DEFAULT_STORE: &str = ".switchyard/store";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid model URI '{uri}': {why}")]
    BadUri { uri: String, why: String },
    #[error("{0}")]
    InvalidName(String),
    #[error("no model named '{name}' in the store at {store}")]
    NoSuchModel { name: String, store: PathBuf },
    #[error("model '{name}' has no version {version}")]
    NoSuchVersion { name: String, version: u64 },
    #[error("model '{name}' has no alias '{alias}'")]
    NoSuchAlias { name: String, alias: String },
    #[error("model '{name}' has no versions yet")]
    NoVersions { name: String },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: {why}", path.display())]
    Corrupt { path: PathBuf, why: String },
    /// The files of a stored version changed after it was logged.
    #[error(
        "{uri} was modified after it was logged: its content_sha256 is {actual}, the MLmodel says {expected}; the store must not be edited by hand — log a new version instead"
    )]
    Tampered {
        uri: String,
        expected: String,
        actual: String,
    },
    /// A stored version's MLmodel changed after it was logged.
    #[error(
        "{uri} was modified after it was logged: its MLmodel is not the one it was logged with (the mlmodel_sha256 on its last line does not match); the store must not be edited by hand — log a new version instead"
    )]
    MlModelEdited { uri: String },
    /// The chain folder cannot be logged; every reason is listed.
    #[error("cannot log {}:{}", dir.display(), problems.iter().map(|p| format!("\n  - {p}")).collect::<String>())]
    Invalid { dir: PathBuf, problems: Vec<String> },
    #[error("{0}")]
    Other(String),
}

impl StoreError {
    fn io(path: &Path, source: io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// One stored version of a model.
#[derive(Debug, Clone)]
pub struct ModelVersion {
    pub name: String,
    pub version: u64,
    pub dir: PathBuf,
    pub mlmodel: MlModel,
    /// Whether `mlmodel` was parsed from a text that still carries its seal (checked on the
    /// bytes parsed, not on a second read that a concurrent edit could slip between).
    pub seal: Seal,
}

/// What the last line of a version's MLmodel says about the text above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seal {
    /// Sealed, and the text is what was sealed.
    Intact,
    /// Neither sealed nor marked as sealed: logged before seals existed.
    Absent,
    /// Edited since it was sealed, or rewritten without its seal.
    Broken,
}

impl ModelVersion {
    /// `models:/<name>/<version>`.
    pub fn uri(&self) -> String {
        format!("models:/{}/{}", self.name, self.version)
    }
}

/// The result of logging: the version, and whether it was created or already existed.
#[derive(Debug, Clone)]
pub struct Logged {
    pub version: ModelVersion,
    pub created: bool,
    /// Things worth telling the user that do not stop the log.
    pub warnings: Vec<String>,
    /// A chain whose code is not the code compiled into this binary: a gateway built like this
    /// one refuses to serve it.
    pub code_differs: bool,
}

/// A model's versions and aliases, for `models list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSummary {
    pub name: String,
    pub versions: Vec<u64>,
    pub aliases: BTreeMap<String, u64>,
}

/// A directory-backed model store.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// The folder name of a chain snapshot inside a version.
const CODE_DIR: &str = "code";

/// The ONNX file inside a version, as MLflow names it.
const ONNX_DATA: &str = "model.onnx";

impl Store {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn model_dir(&self, name: &str) -> PathBuf {
        self.root.join("models").join(name)
    }

    /// Logs the chain folder `dir` as a new version of model `name`, after checking it against
    /// the compiled chains: the chain exists, its templates compile, its config type-checks and
    /// holds no secret. Identical content returns the existing version.
    pub fn log_chain(
        &self,
        dir: &Path,
        name: &str,
        registry: &Registry,
    ) -> Result<Logged, StoreError> {
        check_name("model name", name).map_err(StoreError::InvalidName)?;
        let folder = ChainFolder::load(dir).map_err(|e| StoreError::Invalid {
            dir: dir.to_owned(),
            problems: vec![e],
        })?;
        let mut problems = Vec::new();
        let mut warnings = Vec::new();
        let mut code_differs = false;
        match folder.instantiate(registry, None, &BTreeMap::new()) {
            Ok(loaded) if !loaded.code_matches => {
                code_differs = true;
                warnings.push(format!(
                    "the code in {} differs from the '{}' chain compiled into this binary \
                     (code_sha256 {} vs {}): the gateway will refuse to serve this version until it is rebuilt from it",
                    dir.display(),
                    folder.chain,
                    folder.code_sha256,
                    loaded.entry.code_sha256
                ));
            }
            Ok(_) => {}
            Err(found) => problems.extend(found),
        }
        problems.extend(folder.unknown_llms(registry));
        let llms = serde_json::to_value(&folder.llms).unwrap_or_default();
        for (path, why) in find_secrets("[config]", &folder.config)
            .into_iter()
            .chain(find_secrets("[llms]", &llms))
        {
            problems.push(format!(
                "chain.toml: {path} {why}; secrets must not be logged with a model (upstream keys belong in the gateway config's providers, as ${{ENV}} references)"
            ));
        }
        // The templates are logged too, and sent to the upstream with every request.
        for template in folder.prompts.names() {
            let file = format!("prompts/{template}.tera");
            if let Ok(text) = std::fs::read_to_string(folder.dir.join(&file)) {
                for (at, why) in find_secrets_in_text(&file, &text) {
                    problems.push(format!(
                        "{at} {why}; secrets must not be logged with a model"
                    ));
                }
            }
        }
        if !problems.is_empty() {
            return Err(StoreError::Invalid {
                dir: dir.to_owned(),
                problems,
            });
        }

        self.check_no_case_twin(name)?;
        let model_dir = self.model_dir(name);
        std::fs::create_dir_all(&model_dir).map_err(|e| StoreError::io(&model_dir, e))?;
        let temp = model_dir.join(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
        let result = self.write_chain_version(&folder, &model_dir, &temp, name);
        if temp.exists() {
            // Best effort: a leftover temp directory is invisible anyway.
            let _ = std::fs::remove_dir_all(&temp);
        }
        let (version, created) = result?;
        Ok(Logged {
            version,
            created,
            warnings,
            code_differs,
        })
    }

    /// The version `folder` is now: a new one, or (`false`) one with the same content.
    fn write_chain_version(
        &self,
        folder: &ChainFolder,
        model_dir: &Path,
        temp: &Path,
        name: &str,
    ) -> Result<(ModelVersion, bool), StoreError> {
        let code = temp.join(CODE_DIR);
        snapshot_chain(&folder.dir, &code)?;
        let content_sha256 = files_sha256(
            &code,
            &all_files(&code).map_err(|e| StoreError::io(&code, e))?,
        )
        .map_err(|e| StoreError::io(&code, e))?;
        // Held from the duplicate check to the version claim, so that concurrent logs of the same
        // content end up as one version.
        let _lock = lock_model(model_dir)?;
        self.check_same_kind(name, false)?;
        if let Some(existing) = self.find_by_content(name, &content_sha256)? {
            return Ok((existing, false));
        }
        let flavor = ChainFlavor {
            chain: folder.chain.clone(),
            code: CODE_DIR.to_owned(),
            code_sha256: code_sha256(&code).map_err(|e| StoreError::io(&code, e))?,
            content_sha256,
            config: folder.config.clone(),
            llms: folder.llms.clone(),
            switchyard_version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let flavor_value =
            yaml_serde::to_value(&flavor).map_err(|e| StoreError::Other(e.to_string()))?;
        let mut mlmodel = MlModel::new(CHAIN_FLAVOR, flavor_value);
        mlmodel.metadata.insert(
            "source".to_owned(),
            yaml_serde::Value::from(absolute(&folder.dir).display().to_string()),
        );
        let mlmodel_path = temp.join("MLmodel");
        std::fs::write(&mlmodel_path, sealed(&mut mlmodel)?)
            .map_err(|e| StoreError::io(&mlmodel_path, e))?;

        let version = claim_next_version(model_dir, temp)?;
        let dir = model_dir.join(version.to_string());
        let version = ModelVersion {
            name: name.to_owned(),
            version,
            dir,
            mlmodel,
            seal: Seal::Intact,
        };
        Ok((version, true))
    }

    fn find_by_content(
        &self,
        name: &str,
        content_sha256: &str,
    ) -> Result<Option<ModelVersion>, StoreError> {
        for version in self.versions(name)? {
            let found = self.version(name, version)?;
            if found.mlmodel.content_sha256().as_deref() == Some(content_sha256) {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// Refuses a version of the other kind (chain or ONNX model) than the model's versions so
    /// far: an endpoint serving `models:/<name>/latest` would change kind at its next reload.
    /// Called with the model's lock held.
    fn check_same_kind(&self, name: &str, onnx: bool) -> Result<(), StoreError> {
        let Some(&latest) = self.versions(name)?.last() else {
            return Ok(());
        };
        if self.version(name, latest)?.mlmodel.onnx_data().is_some() == onnx {
            return Ok(());
        }
        let (held, logged) = if onnx {
            ("chains", "an ONNX model")
        } else {
            ("ONNX models", "a chain")
        };
        Err(StoreError::Other(format!(
            "model '{name}' holds {held}: log {logged} under another name"
        )))
    }

    /// Refuses `name` if another model's name differs from it in case only: on a file system
    /// that ignores case (macOS, Windows) the two would be one folder.
    fn check_no_case_twin(&self, name: &str) -> Result<(), StoreError> {
        let Ok(entries) = std::fs::read_dir(self.root.join("models")) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let other = entry.file_name().to_string_lossy().into_owned();
            if other != name && other.eq_ignore_ascii_case(name) {
                return Err(StoreError::Other(format!(
                    "model '{name}' differs from model '{other}' in case only (one folder on \
                     macOS or Windows): log it as '{other}', or under another name"
                )));
            }
        }
        Ok(())
    }

    /// The version numbers of `name`, ascending (empty if the model does not exist).
    pub fn versions(&self, name: &str) -> Result<Vec<u64>, StoreError> {
        check_name("model name", name).map_err(StoreError::InvalidName)?;
        version_numbers(&self.model_dir(name))
    }

    fn version(&self, name: &str, version: u64) -> Result<ModelVersion, StoreError> {
        let model_dir = self.model_dir(name);
        if !model_dir.is_dir() {
            return Err(StoreError::NoSuchModel {
                name: name.to_owned(),
                store: self.root.clone(),
            });
        }
        let dir = model_dir.join(version.to_string());
        if !dir.is_dir() {
            return Err(StoreError::NoSuchVersion {
                name: name.to_owned(),
                version,
            });
        }
        let path = dir.join("MLmodel");
        let text = std::fs::read_to_string(&path).map_err(|e| StoreError::io(&path, e))?;
        let mlmodel = MlModel::parse(&text, &path)?;
        let seal = seal_of(&text, &mlmodel);
        Ok(ModelVersion {
            name: name.to_owned(),
            version,
            dir,
            mlmodel,
            seal,
        })
    }

    /// Resolves a URI to a stored version (reading its MLmodel).
    pub fn resolve(&self, uri: &ModelUri) -> Result<ModelVersion, StoreError> {
        let model_dir = self.model_dir(&uri.name);
        if !model_dir.is_dir() {
            return Err(StoreError::NoSuchModel {
                name: uri.name.clone(),
                store: self.root.clone(),
            });
        }
        let version = match &uri.selector {
            Selector::Version(v) => *v,
            Selector::Latest => {
                *self
                    .versions(&uri.name)?
                    .last()
                    .ok_or_else(|| StoreError::NoVersions {
                        name: uri.name.clone(),
                    })?
            }
            Selector::Alias(alias) => {
                *self
                    .aliases(&uri.name)?
                    .get(alias)
                    .ok_or_else(|| StoreError::NoSuchAlias {
                        name: uri.name.clone(),
                        alias: alias.clone(),
                    })?
            }
        };
        self.version(&uri.name, version)
    }

    /// Logs an ONNX model as a new version of `name`. `source` is either
    /// - an `.onnx` file: stored as `model.onnx` with MLflow's `onnx` and `python_function`
    ///   flavors (so `mlflow.pyfunc.load_model` can load it) and `signature` (`inputs`, and
    ///   `outputs` when the model has a describable one, as MLflow's JSON strings), and next
    ///   to it the files of `external_data` (the model's tensors kept outside it, by their
    ///   locations relative to the file's directory); or
    /// - an MLflow model directory with an `onnx` flavor (what `mlflow.onnx.save_model` writes):
    ///   imported with every file (external tensor data too) and every MLmodel key; only
    ///   `metadata.content_sha256`/`source` are added, and `signature` when it has none (then
    ///   it is sealed, as every MLmodel the store writes).
    ///
    /// The caller has checked that the model loads. Identical content returns the existing
    /// version.
    pub fn log_onnx(
        &self,
        source: &Path,
        name: &str,
        signature: (String, Option<String>),
        external_data: &[String],
    ) -> Result<Logged, StoreError> {
        check_name("model name", name).map_err(StoreError::InvalidName)?;
        // Checked before the copy too, which can be large (and again under the lock).
        self.check_same_kind(name, true)?;
        let imported = if source.is_dir() {
            Some(read_mlflow_onnx_dir(source)?)
        } else {
            None
        };
        self.check_no_case_twin(name)?;
        let model_dir = self.model_dir(name);
        std::fs::create_dir_all(&model_dir).map_err(|e| StoreError::io(&model_dir, e))?;
        let temp = model_dir.join(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
        let result = (|| {
            let (mut mlmodel, files) = match imported {
                Some((mlmodel, files)) => {
                    for file in &files {
                        copy_file(&source.join(file), &temp.join(file))?;
                    }
                    (mlmodel, files)
                }
                None => {
                    copy_file(source, &temp.join(ONNX_DATA))?;
                    let from = source.parent().unwrap_or(Path::new(""));
                    for location in external_data {
                        let file = external_data_file(location)?;
                        check_no_symlink(from, &file)?;
                        copy_file(&from.join(&file), &temp.join(&file))?;
                    }
                    let files = content_files(&temp).map_err(|e| StoreError::io(&temp, e))?;
                    (onnx_mlmodel()?, files)
                }
            };
            let content_sha256 =
                files_sha256(&temp, &files).map_err(|e| StoreError::io(&temp, e))?;
            let _lock = lock_model(&model_dir)?;
            self.check_same_kind(name, true)?;
            // Same files, same data file: the same model (an MLflow dir with two .onnx files
            // and a different `data` is not).
            if let Some(existing) = self
                .find_by_content(name, &content_sha256)?
                .filter(|v| v.mlmodel.onnx_data() == mlmodel.onnx_data())
            {
                return Ok(Logged {
                    version: existing,
                    created: false,
                    warnings: Vec::new(),
                    code_differs: false,
                });
            }
            if mlmodel.signature.is_none() {
                let (inputs, outputs) = signature;
                mlmodel.signature = Some(
                    yaml_serde::to_value(
                        serde_json::json!({"inputs": inputs, "outputs": outputs, "params": null}),
                    )
                    .map_err(|e| StoreError::Other(e.to_string()))?,
                );
            }
            for (key, value) in [
                ("content_sha256", content_sha256),
                ("source", absolute(source).display().to_string()),
            ] {
                mlmodel
                    .metadata
                    .insert(key.to_owned(), yaml_serde::Value::from(value));
            }
            let mlmodel_path = temp.join("MLmodel");
            std::fs::write(&mlmodel_path, sealed(&mut mlmodel)?)
                .map_err(|e| StoreError::io(&mlmodel_path, e))?;
            let version = claim_next_version(&model_dir, &temp)?;
            Ok(Logged {
                version: ModelVersion {
                    name: name.to_owned(),
                    version,
                    dir: model_dir.join(version.to_string()),
                    mlmodel,
                    seal: Seal::Intact,
                },
                created: true,
                warnings: Vec::new(),
                code_differs: false,
            })
        })();
        if temp.exists() {
            let _ = std::fs::remove_dir_all(&temp);
        }
        result
    }

    /// Checks that a stored ONNX version's file is what was logged, and returns its path.
    pub fn verify_onnx(&self, version: &ModelVersion) -> Result<PathBuf, StoreError> {
        check_sealed(version)?;
        let data = version.mlmodel.onnx_data().ok_or_else(|| {
            StoreError::Other(format!(
                "{} is not an ONNX model (its MLmodel has no onnx flavor)",
                version.uri()
            ))
        })?;
        check_relative(&data).map_err(|why| StoreError::Corrupt {
            path: version.dir.join("MLmodel"),
            why,
        })?;
        if let Some(expected) = version
            .mlmodel
            .metadata
            .get("content_sha256")
            .and_then(|v| v.as_str())
        {
            let actual = content_files(&version.dir)
                .and_then(|files| files_sha256(&version.dir, &files))
                .map_err(|e| StoreError::io(&version.dir, e))?;
            if actual != expected {
                return Err(StoreError::Tampered {
                    uri: version.uri(),
                    expected: expected.to_owned(),
                    actual,
                });
            }
        }
        Ok(version.dir.join(data))
    }

    /// Checks that a stored chain version's files are what was logged, and returns its flavor
    /// and the snapshot folder.
    pub fn verify_chain(
        &self,
        version: &ModelVersion,
    ) -> Result<(ChainFlavor, PathBuf), StoreError> {
        check_sealed(version)?;
        let flavor = version
            .mlmodel
            .chain_flavor()
            .map_err(|why| StoreError::Corrupt {
                path: version.dir.join("MLmodel"),
                why,
            })?
            .ok_or_else(|| {
                StoreError::Other(format!(
                    "{} is not a logged chain (its MLmodel has no {CHAIN_FLAVOR} flavor)",
                    version.uri()
                ))
            })?;
        check_relative(&flavor.code).map_err(|why| StoreError::Corrupt {
            path: version.dir.join("MLmodel"),
            why,
        })?;
        let code = version.dir.join(&flavor.code);
        let files = all_files(&code).map_err(|e| StoreError::io(&code, e))?;
        let actual = files_sha256(&code, &files).map_err(|e| StoreError::io(&code, e))?;
        if actual != flavor.content_sha256 {
            return Err(StoreError::Tampered {
                uri: version.uri(),
                expected: flavor.content_sha256,
                actual,
            });
        }
        Ok((flavor, code))
    }

    /// The aliases of `name` (alias -> version).
    pub fn aliases(&self, name: &str) -> Result<BTreeMap<String, u64>, StoreError> {
        check_name("model name", name).map_err(StoreError::InvalidName)?;
        let path = self.model_dir(name).join("aliases.toml");
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|e| StoreError::Corrupt {
                path,
                why: e.to_string(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(StoreError::io(&path, e)),
        }
    }

    /// Points `alias` of model `name` at `version` (which must exist). The aliases file is
    /// replaced atomically.
    pub fn set_alias(&self, name: &str, alias: &str, version: u64) -> Result<(), StoreError> {
        check_name("alias", alias).map_err(StoreError::InvalidName)?;
        if alias == "latest" {
            return Err(StoreError::InvalidName(
                "`latest` is not an alias: models:/<name>/latest always means the newest version"
                    .to_owned(),
            ));
        }
        if alias.bytes().all(|b| b.is_ascii_digit()) {
            return Err(StoreError::InvalidName(format!(
                "`{alias}` is not an alias: a number reads as a version (models:/<name>/{alias})"
            )));
        }
        self.version(name, version)?;
        // Read-modify-write of aliases.toml: one writer at a time, or an alias can be lost.
        let _lock = lock_model(&self.model_dir(name))?;
        let mut aliases = self.aliases(name)?;
        aliases.insert(alias.to_owned(), version);
        let model_dir = self.model_dir(name);
        let text = toml::to_string(&aliases).map_err(|e| StoreError::Other(e.to_string()))?;
        let temp = model_dir.join(format!(".aliases-{}.tmp", uuid::Uuid::new_v4().simple()));
        std::fs::write(&temp, text).map_err(|e| StoreError::io(&temp, e))?;
        let path = model_dir.join("aliases.toml");
        std::fs::rename(&temp, &path).map_err(|e| StoreError::io(&path, e))
    }

    /// Every model with its versions and aliases.
    pub fn list(&self) -> Result<Vec<ModelSummary>, StoreError> {
        let models = self.root.join("models");
        let entries = match std::fs::read_dir(&models) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StoreError::io(&models, e)),
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .filter(|name| check_name("model name", name).is_ok())
            .collect();
        names.sort();
        names
            .into_iter()
            .map(|name| {
                Ok(ModelSummary {
                    versions: self.versions(&name)?,
                    aliases: self.aliases(&name)?,
                    name,
                })
            })
            .collect()
    }

    /// Writes a logged version of `uri` out to `dest` (which must not exist yet), after checking
    /// it is intact: a chain's folder (its `.rs` files, prompts and `chain.toml`, e.g. to rebuild
    /// from), or an ONNX model's MLflow model directory (`MLmodel`, `model.onnx` and what an
    /// imported directory held), which MLflow loads and `log onnx` takes back.
    pub fn restore(&self, uri: &ModelUri, dest: &Path) -> Result<ModelVersion, StoreError> {
        let version = self.resolve(uri)?;
        let source = if version.mlmodel.onnx_data().is_some() {
            self.verify_onnx(&version)?;
            version.dir.clone()
        } else {
            self.verify_chain(&version)?.1
        };
        if dest.exists() {
            return Err(StoreError::Other(format!(
                "{} already exists; restore into a new folder",
                dest.display()
            )));
        }
        for relative in all_files(&source).map_err(|e| StoreError::io(&source, e))? {
            copy_file(&source.join(&relative), &dest.join(&relative))?;
        }
        Ok(version)
    }
}

/// An exclusive lock on a model's directory (released when the file is dropped).
fn lock_model(model_dir: &Path) -> Result<std::fs::File, StoreError> {
    let path = model_dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::io(&path, e))?;
    file.lock().map_err(|e| StoreError::io(&path, e))?;
    Ok(file)
}

/// Copies what a chain snapshot holds: every `.rs` file, `prompts/*.tera` and `chain.toml`.
fn snapshot_chain(source: &Path, code: &Path) -> Result<(), StoreError> {
    let mut files = rs_files(source).map_err(|e| StoreError::io(source, e))?;
    files.push("chain.toml".to_owned());
    // The templates, as the loader reads them (`prompts/*.tera`): not an editor's backup
    // (`system.tera~`) or notes lying next to them, which would make a new version.
    let prompts = source.join("prompts");
    if prompts.is_dir() {
        files.extend(
            all_files(&prompts)
                .map_err(|e| StoreError::io(&prompts, e))?
                .into_iter()
                .filter(|f| !f.contains('/') && f.ends_with(".tera"))
                .map(|f| format!("prompts/{f}")),
        );
    }
    for relative in files {
        copy_file(&source.join(&relative), &code.join(&relative))?;
    }
    Ok(())
}

/// The MLmodel of a fresh `.onnx` log: MLflow's `onnx` and `python_function` flavors.
fn onnx_mlmodel() -> Result<MlModel, StoreError> {
    let yaml = |value: serde_json::Value| {
        yaml_serde::to_value(value).map_err(|e| StoreError::Other(e.to_string()))
    };
    let mut mlmodel = MlModel::new(
        ONNX_FLAVOR,
        yaml(serde_json::json!({
            "code": null,
            "data": ONNX_DATA,
            "onnx_session_options": null,
            "providers": ["CPUExecutionProvider"],
        }))?,
    );
    mlmodel.flavors.insert(
        "python_function".to_owned(),
        yaml(serde_json::json!({"loader_module": "mlflow.onnx", "data": ONNX_DATA}))?,
    );
    Ok(mlmodel)
}

/// The last line of an MLmodel the store wrote: a YAML comment (MLflow reads past it) with
/// the SHA-256 of the text above it, so that an edit of the MLmodel itself (its `data` file,
/// its signature, its content hash) shows as one. Hashed as written, not as re-serialised: a
/// newer YAML library must not make old versions look edited.
const SEAL: &str = "# switchyard mlmodel_sha256: ";

/// And a key in its `metadata` saying the file was sealed: a YAML tool that rewrites the file
/// (`yq -i`, a `yaml.safe_load`/`dump` round trip) drops comments but keeps keys.
const SEALED_KEY: &str = "mlmodel_sealed";

/// `mlmodel` as the store writes it: marked as sealed, then sealed.
fn sealed(mlmodel: &mut MlModel) -> Result<String, StoreError> {
    mlmodel
        .metadata
        .insert(SEALED_KEY.to_owned(), yaml_serde::Value::from(true));
    let yaml = mlmodel.to_yaml()?;
    let digest = code_hash::hex(&Sha256::digest(yaml.as_bytes()));
    Ok(format!("{yaml}{SEAL}{digest}\n"))
}

/// Reads the seal on the last line of an MLmodel's `text` (which `mlmodel` was parsed from). A
/// version logged before seals existed has neither seal nor mark (its files are still checked
/// against `content_sha256`); a marked one without its seal was rewritten.
fn seal_of(text: &str, mlmodel: &MlModel) -> Seal {
    let body = text.strip_suffix('\n').unwrap_or(text);
    let (yaml, last) = body
        .rsplit_once('\n')
        .map_or(("", body), |(yaml, last)| (yaml, last));
    let Some(seal) = last.strip_prefix(SEAL) else {
        return match mlmodel.metadata.contains_key(SEALED_KEY) {
            true => Seal::Broken,
            false => Seal::Absent,
        };
    };
    // The hashed text ends with the newline before the seal.
    let digest = code_hash::hex(&Sha256::digest(&text.as_bytes()[..yaml.len() + 1]));
    match seal == digest {
        true => Seal::Intact,
        false => Seal::Broken,
    }
}

/// Refuses a version whose MLmodel was edited after the store wrote it.
fn check_sealed(version: &ModelVersion) -> Result<(), StoreError> {
    match version.seal {
        Seal::Intact | Seal::Absent => Ok(()),
        Seal::Broken => Err(StoreError::MlModelEdited { uri: version.uri() }),
    }
}

/// Every file of a version except its MLmodel: what the content hash covers.
fn content_files(dir: &Path) -> io::Result<Vec<String>> {
    Ok(all_files(dir)?
        .into_iter()
        .filter(|f| f != "MLmodel")
        .collect())
}

/// The ONNX file of `path`: the file itself, or the `onnx` flavor's `data` of an MLflow model
/// directory (which must stay inside it).
pub fn onnx_model_file(path: &Path) -> Result<PathBuf, StoreError> {
    if !path.is_dir() {
        return Ok(path.to_owned());
    }
    let (_, data) = onnx_flavor_data(path)?;
    Ok(path.join(data))
}

/// An MLflow model directory's MLmodel and its `onnx` flavor's data file.
fn onnx_flavor_data(dir: &Path) -> Result<(MlModel, String), StoreError> {
    let invalid = |problem: String| StoreError::Invalid {
        dir: dir.to_owned(),
        problems: vec![problem],
    };
    let mlmodel = MlModel::read(&dir.join("MLmodel"))?;
    let Some(data) = mlmodel.onnx_data() else {
        return Err(invalid(
            "MLmodel has no onnx flavor (with a `data` file); only ONNX models import".to_owned(),
        ));
    };
    check_relative(&data).map_err(|why| invalid(format!("onnx flavor data: {why}")))?;
    Ok((mlmodel, data))
}

/// An MLflow model directory to import: its MLmodel (which must have an `onnx` flavor whose data
/// file is inside the directory) and its other files. Refused: symbolic links (what they point
/// to would not be imported) and secrets in the MLmodel or any text file.
fn read_mlflow_onnx_dir(dir: &Path) -> Result<(MlModel, Vec<String>), StoreError> {
    let (mlmodel, data) = onnx_flavor_data(dir)?;
    let mut problems = Vec::new();
    find_symlinks(dir, dir, &mut problems).map_err(|e| StoreError::io(dir, e))?;
    let files = content_files(dir).map_err(|e| StoreError::io(dir, e))?;
    if !files.contains(&data) {
        problems.push(format!("the onnx flavor's data file {data} is missing"));
    }
    let mut secrets = Vec::new();
    for file in files.iter().map(String::as_str).chain(["MLmodel"]) {
        // Text files only: a model's weights are binary.
        if let Ok(text) = std::fs::read_to_string(dir.join(file)) {
            secrets.extend(find_secrets_in_text(file, &text));
        }
    }
    problems.extend(
        secrets
            .into_iter()
            .map(|(at, why)| format!("{at} {why}; secrets must not be logged")),
    );
    if !problems.is_empty() {
        return Err(StoreError::Invalid {
            dir: dir.to_owned(),
            problems,
        });
    }
    Ok((mlmodel, files))
}

/// Every symbolic link under `dir`, as a problem.
fn find_symlinks(root: &Path, dir: &Path, problems: &mut Vec<String>) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let path = entry.path();
        if kind.is_symlink() {
            let relative = path.strip_prefix(root).unwrap_or(&path);
            problems.push(format!(
                "{} is a symbolic link: copy the file into the directory",
                relative.display()
            ));
        } else if kind.is_dir() {
            find_symlinks(root, &path, problems)?;
        }
    }
    Ok(())
}

/// `path` as an absolute path (for `metadata.source`: where a version came from), or as given
/// if the working directory is gone.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

fn copy_file(from: &Path, to: &Path) -> Result<(), StoreError> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(|e| StoreError::io(parent, e))?;
    }
    std::fs::copy(from, to).map_err(|e| StoreError::io(from, e))?;
    Ok(())
}

/// Version directories are named by their number; anything else (temp dirs, aliases) is not a
/// version.
fn version_numbers(model_dir: &Path) -> Result<Vec<u64>, StoreError> {
    let entries = match std::fs::read_dir(model_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io(model_dir, e)),
    };
    let mut versions: Vec<u64> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
        .filter(|v| *v > 0)
        .collect();
    versions.sort_unstable();
    Ok(versions)
}

/// Renames the finished temp directory to the next free version number, retrying when another
/// logger took that number first.
fn claim_next_version(model_dir: &Path, temp: &Path) -> Result<u64, StoreError> {
    loop {
        let next = version_numbers(model_dir)?.last().map_or(1, |v| v + 1);
        let target = model_dir.join(next.to_string());
        match std::fs::rename(temp, &target) {
            Ok(()) => return Ok(next),
            Err(e)
                if e.kind() == io::ErrorKind::DirectoryNotEmpty
                    || e.kind() == io::ErrorKind::AlreadyExists =>
            {
                continue;
            }
            Err(e) => return Err(StoreError::io(&target, e)),
        }
    }
}

/// Where an ONNX file's external data `location` goes in a version: the same plain path
/// relative to the model, but neither the model's file nor the MLmodel.
fn external_data_file(location: &str) -> Result<PathBuf, StoreError> {
    let file: PathBuf = Path::new(location)
        .components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect();
    let plain = file.to_str().is_some_and(|f| check_relative(f).is_ok());
    if !plain || file == Path::new(ONNX_DATA) || file == Path::new("MLmodel") {
        return Err(StoreError::Other(format!(
            "the model's external data file '{location}' cannot be stored next to it: \
             save the model with its data inside, or as an MLflow model directory"
        )));
    }
    Ok(file)
}

/// Refuses `file` (relative to `dir`) if it or a folder on its way is a symbolic link: what it
/// points to may be anywhere (as for an imported directory, whose links are refused too).
fn check_no_symlink(dir: &Path, file: &Path) -> Result<(), StoreError> {
    let mut path = dir.to_owned();
    for component in file.components() {
        path.push(component);
        let metadata = std::fs::symlink_metadata(&path).map_err(|e| StoreError::io(&path, e))?;
        if metadata.file_type().is_symlink() {
            return Err(StoreError::Other(format!(
                "{} is a symbolic link (not followed, even within the folder): copy the model's external data file next to it",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Whether `path` is a plain relative path: a path inside a version must stay inside it.
fn check_relative(path: &str) -> Result<(), String> {
    let p = Path::new(path);
    if path.is_empty()
        || p.is_absolute()
        || p.components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(format!("'{path}' is not a plain relative path"));
    }
    Ok(())
}
