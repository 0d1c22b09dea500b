//! The `MLmodel` manifest, in MLflow's YAML format.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::StoreError;

/// The flavor Switchyard writes for a logged chain.
pub const CHAIN_FLAVOR: &str = "switchyard_chain";

/// MLflow's flavor for ONNX models.
pub const ONNX_FLAVOR: &str = "onnx";

/// An `MLmodel` file. Keys MLflow writes that Switchyard does not use are kept as they are.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MlModel {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_path: Option<String>,
    pub flavors: BTreeMap<String, yaml_serde::Value>,
    pub model_uuid: String,
    pub utc_time_created: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<yaml_serde::Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, yaml_serde::Value>,
    #[serde(flatten)]
    pub other: BTreeMap<String, yaml_serde::Value>,
}

/// The `switchyard_chain` flavor: what a logged chain is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainFlavor {
    /// The compiled chain that runs this version.
    pub chain: String,
    /// The snapshot's folder inside the version directory.
    pub code: String,
    /// SHA-256 of the snapshot's `.rs` files: must equal the compiled chain's.
    pub code_sha256: String,
    /// SHA-256 of every file of the snapshot: detects edits inside the store.
    pub content_sha256: String,
    /// The logged `[config]` of `chain.toml`.
    pub config: serde_json::Value,
    /// The logged `[llms]` of `chain.toml`.
    pub llms: BTreeMap<String, String>,
    pub switchyard_version: String,
}

impl MlModel {
    pub fn new(flavor: &str, value: yaml_serde::Value) -> Self {
        Self {
            artifact_path: None,
            flavors: BTreeMap::from([(flavor.to_owned(), value)]),
            model_uuid: uuid::Uuid::new_v4().simple().to_string(),
            // MLflow's format: '2026-11-27 04:50:21.874444'
            utc_time_created: chrono::Utc::now()
                .format("%Y-%m-%d %H:%M:%S%.6f")
                .to_string(),
            signature: None,
            metadata: BTreeMap::new(),
            other: BTreeMap::new(),
        }
    }

    pub fn read(path: &Path) -> Result<Self, StoreError> {
        let text = std::fs::read_to_string(path).map_err(|e| StoreError::io(path, e))?;
        Self::parse(&text, path)
    }

    /// `text`, read from `path` (named in the error).
    pub fn parse(text: &str, path: &Path) -> Result<Self, StoreError> {
        yaml_serde::from_str(text).map_err(|e| StoreError::Corrupt {
            path: path.to_owned(),
            why: e.to_string(),
        })
    }

    pub fn to_yaml(&self) -> Result<String, StoreError> {
        yaml_serde::to_string(self).map_err(|e| StoreError::Corrupt {
            path: "MLmodel".into(),
            why: e.to_string(),
        })
    }

    /// The `content_sha256` this version was logged with: the chain flavor's, or (for artifact
    /// models) `metadata.content_sha256`.
    pub fn content_sha256(&self) -> Option<String> {
        if let Ok(Some(flavor)) = self.chain_flavor() {
            return Some(flavor.content_sha256);
        }
        self.metadata
            .get("content_sha256")?
            .as_str()
            .map(str::to_owned)
    }

    /// The ONNX file of an `onnx`-flavored version (its `data`), if this is one.
    pub fn onnx_data(&self) -> Option<String> {
        self.flavors
            .get(ONNX_FLAVOR)?
            .get("data")?
            .as_str()
            .map(str::to_owned)
    }

    /// The chain flavor, if this version is a logged chain.
    pub fn chain_flavor(&self) -> Result<Option<ChainFlavor>, String> {
        self.flavors
            .get(CHAIN_FLAVOR)
            .map(|value| yaml_serde::from_value(value.clone()).map_err(|e| e.to_string()))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_mlflow_keys_it_does_not_use() {
        let text = "\
artifact_path: model
flavors:
  onnx:
    data: model.onnx
    onnx_version: 1.23.2
mlflow_version: 3.17.2
model_uuid: 6c1d0000000000000000000000000000
run_id: abc
utc_time_created: '2026-11-27 05:01:02.123456'
signature:
  inputs: '[{\"type\": \"tensor\"}]'
";
        let model: MlModel = yaml_serde::from_str(text).unwrap();
        assert_eq!(
            model.other["mlflow_version"],
            yaml_serde::Value::from("3.17.2")
        );
        assert_eq!(model.chain_flavor().unwrap(), None);
        let again: MlModel = yaml_serde::from_str(&model.to_yaml().unwrap()).unwrap();
        assert_eq!(again.other["run_id"], yaml_serde::Value::from("abc"));
        assert_eq!(again.utc_time_created, "2026-11-27 05:01:02.123456");
        assert!(again.signature.is_some());
    }
}
