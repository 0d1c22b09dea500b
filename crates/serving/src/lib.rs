//! Artifact models made servable.
//!
//! [`OnnxModel`] runs an ONNX model in pure Rust with tract. [`parse_mlflow_input`] reads the
//! request formats of MLflow's scoring protocol (`inputs`, `instances`, `dataframe_split`,
//! `dataframe_records`) into rows for the model's one input tensor, and [`OnnxModel::predict`]
//! answers as `mlflow models serve` does: `{"<output name>": <nested arrays>, ...}`.
//!
//! Scope today: models with one float32 input of shape `[N, features]` (what skl2onnx exports
//! for numeric features) and the ONNX-ML operators tract implements (LinearClassifier,
//! LinearRegressor, Normalizer, TreeEnsembleClassifier). Scaler, ZipMap and
//! TreeEnsembleRegressor are not implemented yet: such a model fails to load with tract's error.

use std::path::Path;

use serde_json::{Map, Value};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

/// Why a model cannot be loaded or a request cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    /// The model file is unusable.
    #[error("cannot load the ONNX model {path}: {why}")]
    Load { path: String, why: String },
    /// The request does not fit the model (the client's fault: a 400).
    #[error("{0}")]
    BadInput(String),
    /// Inference failed on input that fit the model's signature.
    #[error("inference failed: {0}")]
    Inference(String),
}

/// A loaded, optimized ONNX model.
pub struct OnnxModel {
    plan: std::sync::Arc<TypedRunnableModel>,
    input: String,
    features: usize,
    outputs: Vec<String>,
    /// MLflow tensor specs of the outputs (`{"dtype", "shape"}`), from the optimized graph.
    output_specs: Vec<Value>,
}

impl std::fmt::Debug for OnnxModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxModel")
            .field("input", &self.input)
            .field("features", &self.features)
            .field("outputs", &self.outputs)
            .finish_non_exhaustive()
    }
}

impl OnnxModel {
    /// Loads and optimizes `path` for any batch size.
    pub fn load(path: &Path) -> Result<Self, ServingError> {
        let failed = |why: String| ServingError::Load {
            path: path.display().to_string(),
            why,
        };
        let mut model = tract_onnx::onnx()
            .model_for_path(path)
            .map_err(|e| failed(format!("{e:#}")))?;
        let inputs = model
            .input_outlets()
            .map_err(|e| failed(format!("{e:#}")))?
            .to_vec();
        let [input_outlet] = inputs[..] else {
            return Err(failed(format!(
                "the model has {} inputs; only models with one input tensor are supported yet",
                inputs.len()
            )));
        };
        let input = model.node(input_outlet.node).name.clone();
        let fact = model
            .input_fact(0)
            .map_err(|e| failed(format!("{e:#}")))?
            .clone();
        let datum = fact.datum_type.concretize();
        if datum != Some(f32::datum_type()) {
            return Err(failed(format!(
                "input '{input}' is {datum:?}; only float32 inputs are supported yet"
            )));
        }
        let dims: Vec<_> = fact.shape.dims().collect();
        let features = match dims.as_slice() {
            [_, last] => last
                .concretize()
                .and_then(|d| d.to_i64().ok())
                .and_then(|d| usize::try_from(d).ok()),
            _ => None,
        }
        .ok_or_else(|| failed(format!("input '{input}' is not of shape [N, features]")))?;
        let outputs: Vec<String> = model
            .output_outlets()
            .map_err(|e| failed(format!("{e:#}")))?
            .iter()
            .map(|outlet| {
                model
                    .outlet_label(*outlet)
                    .map_or_else(|| model.node(outlet.node).name.clone(), str::to_owned)
            })
            .collect();
        let batch = model.symbols.sym("N");
        model
            .set_input_fact(
                0,
                f32::fact([TDim::Sym(batch), TDim::Val(features as i64)]).into(),
            )
            .map_err(|e| failed(format!("{e:#}")))?;
        let plan = model
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(|e| failed(format!("{e:#}")))?;
        let output_specs = (0..outputs.len())
            .map(|i| {
                let fact = plan
                    .model()
                    .output_fact(i)
                    .map_err(|e| failed(format!("{e:#}")))?;
                let shape: Vec<i64> = fact
                    .shape
                    .iter()
                    .map(|d| d.to_i64().unwrap_or(-1))
                    .collect();
                Ok(serde_json::json!({"dtype": mlflow_dtype(fact.datum_type), "shape": shape}))
            })
            .collect::<Result<Vec<_>, ServingError>>()?;
        Ok(Self {
            plan,
            input,
            features,
            outputs,
            output_specs,
        })
    }

    /// The input tensor's name.
    pub fn input_name(&self) -> &str {
        &self.input
    }

    /// Values per row.
    pub fn features(&self) -> usize {
        self.features
    }

    pub fn output_names(&self) -> &[String] {
        &self.outputs
    }

    /// MLflow's signature of the model (`inputs`/`outputs` as the JSON strings MLmodel holds).
    pub fn signature(&self) -> (String, String) {
        let inputs = serde_json::json!([{"type": "tensor", "name": self.input,
            "tensor-spec": {"dtype": "float32", "shape": [-1, self.features]}}]);
        let outputs: Vec<Value> = self
            .outputs
            .iter()
            .zip(&self.output_specs)
            .map(|(name, spec)| serde_json::json!({"type": "tensor", "name": name, "tensor-spec": spec}))
            .collect();
        (inputs.to_string(), Value::Array(outputs).to_string())
    }

    /// Runs the model on `rows` (each `features` long). Returns each output by name, as nested
    /// JSON arrays: integer outputs stay integers. No rows: every output is an empty list.
    pub fn predict(&self, rows: &[Vec<f32>]) -> Result<Map<String, Value>, ServingError> {
        if rows.is_empty() {
            return Ok(self
                .outputs
                .iter()
                .map(|o| (o.clone(), Value::Array(Vec::new())))
                .collect());
        }
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let input = tract_ndarray::Array2::from_shape_vec((rows.len(), self.features), flat)
            .map_err(|e| {
                ServingError::BadInput(format!(
                    "rows do not form a [N, {}] matrix: {e}",
                    self.features
                ))
            })?;
        let results = self
            .plan
            .run(tvec!(input.into_tvalue()))
            .map_err(|e| ServingError::Inference(format!("{e:#}")))?;
        self.outputs
            .iter()
            .zip(results.iter())
            .map(|(name, tensor)| Ok((name.clone(), tensor_json(tensor)?)))
            .collect()
    }
}

/// MLflow's (numpy's) name for a tensor element type.
fn mlflow_dtype(datum: DatumType) -> &'static str {
    match datum {
        DatumType::I64 => "int64",
        DatumType::I32 => "int32",
        DatumType::F64 => "float64",
        DatumType::String => "str",
        DatumType::Bool => "bool",
        _ => "float32",
    }
}

/// A tensor as nested JSON arrays.
fn tensor_json(tensor: &Tensor) -> Result<Value, ServingError> {
    fn nest<T>(view: tract_ndarray::ArrayViewD<'_, T>, leaf: &dyn Fn(&T) -> Value) -> Value {
        if view.ndim() == 0 {
            return view.iter().next().map_or(Value::Null, leaf);
        }
        Value::Array(view.outer_iter().map(|sub| nest(sub, leaf)).collect())
    }
    let unsupported = || {
        ServingError::Inference(format!(
            "output type {:?} is not supported yet",
            tensor.datum_type()
        ))
    };
    let value = match tensor.datum_type() {
        DatumType::I64 => nest(
            tensor
                .to_plain_array_view::<i64>()
                .map_err(|_| unsupported())?,
            &|v| Value::from(*v),
        ),
        DatumType::I32 => nest(
            tensor
                .to_plain_array_view::<i32>()
                .map_err(|_| unsupported())?,
            &|v| Value::from(*v),
        ),
        DatumType::F32 => nest(
            tensor
                .to_plain_array_view::<f32>()
                .map_err(|_| unsupported())?,
            &|v| Value::from(f64::from(*v)),
        ),
        DatumType::F64 => nest(
            tensor
                .to_plain_array_view::<f64>()
                .map_err(|_| unsupported())?,
            &|v| Value::from(*v),
        ),
        DatumType::String => nest(
            tensor
                .to_plain_array_view::<String>()
                .map_err(|_| unsupported())?,
            &|v| Value::from(v.as_str()),
        ),
        _ => return Err(unsupported()),
    };
    Ok(value)
}

/// The MLflow request formats, read into rows for a model whose one input is `input` with
/// `features` values per row. Exactly one format key, plus an optional `params`.
pub fn parse_mlflow_input(
    body: &Value,
    input: &str,
    features: usize,
) -> Result<Vec<Vec<f32>>, ServingError> {
    let bad = |message: String| ServingError::BadInput(message);
    let Some(object) = body.as_object() else {
        return Err(bad("the body must be a JSON object".to_owned()));
    };
    const FORMATS: [&str; 4] = [
        "inputs",
        "instances",
        "dataframe_split",
        "dataframe_records",
    ];
    let given: Vec<&str> = FORMATS
        .iter()
        .copied()
        .filter(|k| object.contains_key(*k))
        .collect();
    if let Some(unknown) = object
        .keys()
        .find(|k| !FORMATS.contains(&k.as_str()) && k.as_str() != "params")
    {
        return Err(bad(format!(
            "unknown key '{unknown}': the body takes exactly one of {} (and optionally params)",
            FORMATS.join(", ")
        )));
    }
    let [format] = given[..] else {
        return Err(bad(format!(
            "the body must have exactly one of {}; it has {}",
            FORMATS.join(", "),
            if given.is_empty() {
                "none".to_owned()
            } else {
                given.join(" and ")
            }
        )));
    };
    let value = &object[format];
    let rows: Vec<&Value> = match format {
        "inputs" | "instances" => match value {
            Value::Object(named) => match named.get(input) {
                Some(Value::Array(rows)) if named.len() == 1 => rows.iter().collect(),
                _ => {
                    return Err(bad(format!(
                        "{format} as an object must hold exactly the model's input '{input}' as a list of rows"
                    )));
                }
            },
            Value::Array(rows) => rows.iter().collect(),
            _ => {
                return Err(bad(format!(
                    "{format} must be a list of rows or an object keyed by input name"
                )));
            }
        },
        "dataframe_split" => match value.get("data") {
            Some(Value::Array(rows)) => {
                if let Some(columns) = value.get("columns").and_then(Value::as_array)
                    && columns.len() != features
                {
                    return Err(bad(format!(
                        "dataframe_split has {} columns; input '{input}' takes {features} (in order)",
                        columns.len()
                    )));
                }
                rows.iter().collect()
            }
            _ => {
                return Err(bad(
                    "dataframe_split needs \"data\": a list of rows".to_owned()
                ));
            }
        },
        _ => return records(value, input, features),
    };
    rows.iter()
        .enumerate()
        .map(|(i, row)| row_values(i, row, input, features))
        .collect()
}

/// `dataframe_records`: columns in the order of the first record's keys.
fn records(value: &Value, input: &str, features: usize) -> Result<Vec<Vec<f32>>, ServingError> {
    let bad = |message: String| ServingError::BadInput(message);
    let Some(records) = value.as_array() else {
        return Err(bad("dataframe_records must be a list of objects".to_owned()));
    };
    let Some(first) = records.first() else {
        return Ok(Vec::new());
    };
    let Some(columns) = first
        .as_object()
        .map(|o| o.keys().cloned().collect::<Vec<_>>())
    else {
        return Err(bad("dataframe_records[0] is not an object".to_owned()));
    };
    records
        .iter()
        .enumerate()
        .map(|(i, record)| {
            let object = record
                .as_object()
                .filter(|o| o.len() == columns.len() && columns.iter().all(|c| o.contains_key(c)))
                .ok_or_else(|| {
                    bad(format!(
                        "dataframe_records[{i}] must have the columns {columns:?}"
                    ))
                })?;
            let row = Value::Array(columns.iter().map(|c| object[c].clone()).collect());
            row_values(i, &row, input, features)
        })
        .collect()
}

fn row_values(
    index: usize,
    row: &Value,
    input: &str,
    features: usize,
) -> Result<Vec<f32>, ServingError> {
    let expected = || format!("input '{input}' expects float32 rows of shape [-1, {features}]");
    let Some(values) = row.as_array() else {
        return Err(ServingError::BadInput(format!(
            "row {index} is not a list: {}",
            expected()
        )));
    };
    if values.len() != features {
        return Err(ServingError::BadInput(format!(
            "row {index} has {} values: {}",
            values.len(),
            expected()
        )));
    }
    values
        .iter()
        .enumerate()
        .map(|(column, v)| {
            v.as_f64().map(|f| f as f32).ok_or_else(|| {
                ServingError::BadInput(format!(
                    "row {index}, column {column} is not a number: {}",
                    expected()
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_every_mlflow_format_into_the_same_rows() {
        let rows = vec![vec![1.0, 2.0], vec![3.0, 4.0]];
        for body in [
            json!({"inputs": [[1, 2], [3, 4]]}),
            json!({"inputs": {"x": [[1, 2], [3, 4]]}}),
            json!({"instances": [[1, 2], [3, 4]], "params": {}}),
            json!({"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2], [3, 4]]}}),
            json!({"dataframe_records": [{"b": 1, "a": 2}, {"a": 4, "b": 3}]}),
        ] {
            assert_eq!(parse_mlflow_input(&body, "x", 2).unwrap(), rows, "{body}");
        }
        assert!(
            parse_mlflow_input(&json!({"inputs": []}), "x", 2)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn explains_what_does_not_fit() {
        let error = |body: Value| parse_mlflow_input(&body, "x", 2).unwrap_err().to_string();
        assert!(error(json!({})).contains("has none"));
        assert!(
            error(json!({"inputs": [[1, 2]], "instances": [[1, 2]]}))
                .contains("inputs and instances")
        );
        assert!(error(json!({"input": [[1, 2]]})).contains("unknown key 'input'"));
        assert!(
            error(json!({"inputs": [[1, 2, 3]]}))
                .contains("row 0 has 3 values: input 'x' expects float32 rows of shape [-1, 2]")
        );
        assert!(error(json!({"inputs": [[1, "a"]]})).contains("row 0, column 1 is not a number"));
        assert!(error(json!({"inputs": {"y": [[1, 2]]}})).contains("the model's input 'x'"));
        assert!(error(json!([1, 2])).contains("JSON object"));
    }
}

#[cfg(test)]
mod fixture_tests {
    //! The committed scikit-learn fixtures (tests/fixtures/onnx, made by generate.py) against
    //! onnxruntime's outputs.
    use super::*;
    use std::path::PathBuf;

    /// The fixtures tract runs today; the others need Scaler, ZipMap or TreeEnsembleRegressor.
    const SUPPORTED: &[&str] = &[
        "logreg",
        "linear_svc",
        "decision_tree_clf",
        "random_forest_clf",
        "gradient_boosting_clf",
        "linear_regression",
        "ridge",
    ];

    fn fixtures() -> PathBuf {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/onnx"
        ))
    }

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
                    "{name}: output names"
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

    #[test]
    fn predictions_match_onnxruntime() {
        for name in SUPPORTED {
            let model = OnnxModel::load(&fixtures().join(format!("{name}.onnx"))).unwrap();
            let expected: Value = serde_json::from_str(
                &std::fs::read_to_string(fixtures().join(format!("{name}.expected.json"))).unwrap(),
            )
            .unwrap();
            for case in expected["cases"].as_array().unwrap() {
                let body = serde_json::json!({"inputs": case["inputs"]});
                let rows = parse_mlflow_input(&body, model.input_name(), model.features()).unwrap();
                let got = Value::Object(model.predict(&rows).unwrap());
                assert_close(&format!("{name}/{}", case["name"]), &got, &case["outputs"]);
            }
        }
    }

    #[test]
    fn models_needing_missing_operators_fail_to_load_with_a_reason() {
        let error = OnnxModel::load(&fixtures().join("scaler_logreg.onnx"))
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("cannot load the ONNX model"), "{error}");
    }

    #[test]
    fn zero_rows_give_empty_outputs() {
        let model = OnnxModel::load(&fixtures().join("logreg.onnx")).unwrap();
        let got = model.predict(&[]).unwrap();
        assert_eq!(
            Value::Object(got),
            serde_json::json!({"label": [], "probabilities": []})
        );
    }
}
