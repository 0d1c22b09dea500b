//! Loading a chain folder (`chain.toml`, `prompts/*.tera`, `*.rs`) into a servable chain.
//!
//! ```toml
//! chain = "support_bot"     # which compiled chain runs this folder
//!
//! [llms]                    # logical LLM name -> gateway route
//! default = "chat"
//!
//! [config]                  # the chain's typed config
//! product = "Switchyard"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use crate::chain::{Chain, ChainEntry, Registry};
use crate::code_hash::code_sha256;
use crate::prompts::Prompts;

/// A chain folder as read from disk, not yet checked against the compiled chains.
#[derive(Debug, Clone)]
pub struct ChainFolder {
    pub dir: PathBuf,
    /// The compiled chain this folder is for.
    pub chain: String,
    /// Logical LLM name -> route name.
    pub llms: BTreeMap<String, String>,
    /// `[config]` as JSON.
    pub config: Value,
    pub prompts: Prompts,
    /// SHA-256 of the folder's `.rs` files (see [`crate::code_hash`]).
    pub code_sha256: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChainToml {
    chain: String,
    #[serde(default)]
    llms: BTreeMap<String, String>,
    #[serde(default)]
    config: toml::Table,
}

/// A chain built from a folder: ready to serve once its logical LLMs are bound to routes.
#[derive(Clone)]
pub struct LoadedChain {
    pub entry: ChainEntry,
    pub chain: Arc<dyn Chain>,
    pub prompts: Prompts,
    pub llms: BTreeMap<String, String>,
    /// The effective config (folder config with overrides merged).
    pub config: Value,
    /// Whether the folder's code is the code compiled into this binary.
    pub code_matches: bool,
    pub folder_code_sha256: String,
}

impl ChainFolder {
    /// Reads `chain.toml` and compiles `prompts/*.tera`. Errors name the file.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let manifest_path = dir.join("chain.toml");
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(|e| format!("{}: cannot read: {e}", manifest_path.display()))?;
        let manifest: ChainToml = toml::from_str(&text)
            .map_err(|e| format!("{}: {}", manifest_path.display(), e.to_string().trim_end()))?;
        let config = serde_json::to_value(&manifest.config).map_err(|e| {
            format!(
                "{}: [config] is not representable as JSON: {e}",
                manifest_path.display()
            )
        })?;
        let prompts_dir = dir.join("prompts");
        let prompts = if prompts_dir.is_dir() {
            Prompts::from_dir(&prompts_dir)?
        } else {
            Prompts::from_sources([])?
        };
        let code_sha256 = code_sha256(dir)
            .map_err(|e| format!("{}: cannot hash the code: {e}", dir.display()))?;
        Ok(Self {
            dir: dir.to_owned(),
            chain: manifest.chain,
            llms: manifest.llms,
            config,
            prompts,
            code_sha256,
        })
    }

    /// Checks the folder against the compiled chain it names and builds it: config overrides are
    /// merged into `[config]` and the result type-checked; LLM overrides replace `[llms]` entries;
    /// every template and logical LLM the chain needs must be there. Returns every problem found.
    pub fn instantiate(
        &self,
        registry: &Registry,
        config_override: Option<&Value>,
        llm_override: &BTreeMap<String, String>,
    ) -> Result<LoadedChain, Vec<String>> {
        let Some(entry) = registry.get(&self.chain) else {
            return Err(vec![format!(
                "chain '{}' is not compiled into this binary (compiled chains: {})",
                self.chain,
                registry.names().join(", ")
            )]);
        };
        let mut problems = Vec::new();
        let mut config = self.config.clone();
        if let Some(overrides) = config_override {
            merge(&mut config, overrides);
        }
        let chain = entry
            .build(config.clone())
            .map_err(|e| {
                // Whose value it is: the endpoint's override, if chain.toml's own builds.
                let whose = match config_override {
                    None => "chain.toml [config]",
                    Some(_) if entry.build(self.config.clone()).is_ok() => {
                        "the endpoint's config override"
                    }
                    Some(_) => "chain.toml [config] with the endpoint's config override",
                };
                problems.push(format!("config ({whose}): {e}"));
            })
            .ok();
        for template in entry.templates {
            if !self.prompts.contains(template) {
                problems.push(format!("missing template prompts/{template}.tera"));
            }
        }
        // A misspelt override would leave the LLM it meant on its chain.toml route, silently.
        problems.extend(unknown_llms(entry, "llms", llm_override));
        let mut llms = self.llms.clone();
        llms.extend(llm_override.iter().map(|(k, v)| (k.clone(), v.clone())));
        for llm in entry.llms {
            if !llms.contains_key(*llm) {
                problems.push(format!("[llms] has no route for the chain's LLM '{llm}'"));
            }
        }
        match chain {
            Some(chain) if problems.is_empty() => Ok(LoadedChain {
                entry: entry.clone(),
                chain,
                prompts: self.prompts.clone(),
                llms,
                config,
                code_matches: self.code_sha256 == entry.code_sha256,
                folder_code_sha256: self.code_sha256.clone(),
            }),
            _ => Err(problems),
        }
    }
}

impl ChainFolder {
    /// `chain.toml`'s `[llms]` entries for LLMs the chain does not have (a typo leaves the LLM
    /// it meant unmapped or on another route), as problems; none if the chain is not compiled
    /// in (`instantiate` says so). Not part of `instantiate`: `log chain` and a chain folder an
    /// endpoint serves refuse them, but a version logged before that check only gets a warning.
    pub fn unknown_llms(&self, registry: &Registry) -> Vec<String> {
        registry.get(&self.chain).map_or_else(Vec::new, |entry| {
            unknown_llms(entry, "chain.toml [llms]", &self.llms)
        })
    }
}

/// The names in `names` that are not LLMs of `entry`, as problems of `whose`.
fn unknown_llms(entry: &ChainEntry, whose: &str, names: &BTreeMap<String, String>) -> Vec<String> {
    names
        .keys()
        .filter(|name| !entry.llms.contains(&name.as_str()))
        .map(|name| {
            format!(
                "{whose}: the chain has no LLM '{name}' (its LLMs: {})",
                entry.llms.join(", ")
            )
        })
        .collect()
}

/// Merges `overrides` into `base`: objects merge key by key (recursively), anything else
/// replaces. Unknown keys are not dropped here; the typed config check rejects them.
pub fn merge(base: &mut Value, overrides: &Value) {
    match (base, overrides) {
        (Value::Object(base), Value::Object(overrides)) => {
            for (key, value) in overrides {
                match base.get_mut(key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (base, overrides) => *base = overrides.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_is_deep_for_objects_and_replaces_the_rest() {
        let mut base = json!({"a": 1, "b": {"c": 2, "d": [1, 2]}, "e": "x"});
        merge(
            &mut base,
            &json!({"b": {"c": 3, "d": [9]}, "e": null, "f": true}),
        );
        assert_eq!(
            base,
            json!({"a": 1, "b": {"c": 3, "d": [9]}, "e": null, "f": true})
        );
    }
}
