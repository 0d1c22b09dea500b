//! Artifact models made servable.
//!
//! [`OnnxModel`] runs an ONNX model in pure Rust with tract, including the ONNX-ML operators
//! scikit-learn exports and tract lacks (Scaler, Imputer, OneHotEncoder, FeatureVectorizer,
//! TreeEnsembleRegressor, SVMClassifier, SVMRegressor, ZipMap: see [`ml`]).
//! [`parse_mlflow_input`] reads the request formats of MLflow's scoring protocol (`inputs`,
//! `instances`, `dataframe_split`, `dataframe_records`) into one tensor per model input, and
//! [`OnnxModel::predict`] answers as `mlflow models serve` does: `{"<output name>": [...], ...}`.
//!
//! Scope: inputs of shape `[N, features]` in float32, float64, int64 or string.

mod csv_input;
mod input;
mod ml;
mod model;

pub use csv_input::mlflow_csv_input;
pub use input::{Batch, Dtype, InputSpec, parse_mlflow_input, python_json};
pub use model::OnnxModel;

/// Why a model cannot be loaded or a request cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    /// The model file is unusable.
    #[error("cannot load the ONNX model {path}: {why}")]
    Load { path: String, why: String },
    /// The request is not an MLflow scoring request (the client's fault: a 400).
    #[error("{0}")]
    BadInput(String),
    /// The request's `format` (`inputs`, `dataframe_split`…) holds values that do not fit the
    /// model's inputs (the client's fault: a 400).
    #[error("{message}")]
    Schema {
        format: &'static str,
        message: String,
    },
    /// Inference failed on input that fit the model's signature.
    #[error("inference failed: {0}")]
    Inference(String),
}

#[cfg(test)]
mod fixture_tests {
    //! The committed scikit-learn fixtures (tests/fixtures/onnx, made by generate.py) against
    //! onnxruntime's outputs: every `<name>.expected.json` there, every case.
    use super::*;
    use serde_json::Value;
    use std::path::PathBuf;

    fn fixtures() -> PathBuf {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/onnx"
        ))
    }

    /// Labels equal, floats within 1e-5 (relative above 1), object keys in the same order.
    fn assert_close(name: &str, got: &Value, expected: &Value) {
        match (got, expected) {
            (Value::Array(g), Value::Array(e)) => {
                assert_eq!(g.len(), e.len(), "{name}: {got} vs {expected}");
                for (g, e) in g.iter().zip(e) {
                    assert_close(name, g, e);
                }
            }
            (Value::Object(g), Value::Object(e)) => {
                assert_eq!(
                    g.keys().collect::<Vec<_>>(),
                    e.keys().collect::<Vec<_>>(),
                    "{name}: keys"
                );
                for (key, e) in e {
                    assert_close(&format!("{name}.{key}"), &g[key], e);
                }
            }
            (Value::Number(g), Value::Number(e)) if e.is_i64() || e.is_u64() => {
                assert_eq!(g, e, "{name}: labels must be equal integers");
            }
            (Value::Number(g), Value::Number(e)) => {
                let (g, e) = (
                    g.as_f64().unwrap_or(f64::NAN),
                    e.as_f64().unwrap_or(f64::NAN),
                );
                assert!(
                    (g - e).abs() <= 1e-5 * e.abs().max(1.0),
                    "{name}: {g} vs {e}"
                );
            }
            _ => assert_eq!(got, expected, "{name}"),
        }
    }

    fn expected_files() -> Vec<(String, Value)> {
        let mut files: Vec<_> = std::fs::read_dir(fixtures())
            .unwrap()
            .filter_map(|entry| {
                let name = entry.unwrap().file_name().into_string().unwrap();
                let stem = name.strip_suffix(".expected.json")?.to_owned();
                let text = std::fs::read_to_string(fixtures().join(&name)).unwrap();
                Some((stem, serde_json::from_str(&text).unwrap()))
            })
            .collect();
        files.sort_by(|a, b| a.0.cmp(&b.0));
        files
    }

    #[test]
    fn every_fixture_matches_onnxruntime() {
        let files = expected_files();
        assert!(files.len() >= 17, "fixtures missing: {}", files.len());
        // Every fixture runs, so one failure does not hide the next.
        let failures: Vec<String> = files
            .into_iter()
            .filter_map(|(name, expected)| {
                std::panic::catch_unwind(|| {
                    let model = OnnxModel::load(&fixtures().join(format!("{name}.onnx")))
                        .unwrap_or_else(|e| panic!("{e}"));
                    for case in expected["cases"].as_array().unwrap() {
                        let body = serde_json::json!({"inputs": case["inputs"]});
                        let batch = model.parse_input(&body).unwrap();
                        let got = Value::Object(model.predict(batch).unwrap());
                        assert_close(&format!("{name}/{}", case["name"]), &got, &case["outputs"]);
                    }
                })
                .err()
                .map(|_| name)
            })
            .collect();
        assert!(failures.is_empty(), "fixtures that differ: {failures:?}");
    }

    #[test]
    fn an_unknown_operator_fails_to_load_with_its_name() {
        // Same-length rename keeps the protobuf valid: the graph now uses an op nobody knows.
        let mut bytes = std::fs::read(fixtures().join("logreg.onnx")).unwrap();
        let (from, to) = (b"LinearClassifier", b"LinearClassifiez");
        while let Some(at) = bytes.windows(from.len()).position(|w| w == from) {
            bytes[at..at + from.len()].copy_from_slice(to);
        }
        let dir = std::env::temp_dir().join(format!("serving-unknown-op-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.onnx");
        std::fs::write(&path, bytes).unwrap();
        let error = OnnxModel::load(&path).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(error.starts_with("cannot load the ONNX model"), "{error}");
        assert!(error.contains("LinearClassifiez"), "{error}");
    }

    #[test]
    fn a_model_learns_what_a_row_costs() {
        let model = OnnxModel::load(&fixtures().join("logreg.onnx")).unwrap();
        assert_eq!(model.expected_time(10), None);
        let batch = model
            .parse_input(&serde_json::json!({"inputs": [[5.1, 3.5, 1.4, 0.2]]}))
            .unwrap();
        model.predict(batch).unwrap();
        let ten = model.expected_time(10).unwrap();
        assert!(ten > std::time::Duration::ZERO && ten < std::time::Duration::from_secs(1));
        assert_eq!(model.expected_time(20).unwrap(), ten * 2);
    }

    #[test]
    fn zero_rows_give_empty_outputs() {
        let model = OnnxModel::load(&fixtures().join("logreg.onnx")).unwrap();
        let batch = model
            .parse_input(&serde_json::json!({"inputs": []}))
            .unwrap();
        let got = model.predict(batch).unwrap();
        assert_eq!(
            Value::Object(got),
            serde_json::json!({"label": [], "probabilities": []})
        );
    }
}
