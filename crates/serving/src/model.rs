//! [`OnnxModel`]: an ONNX file loaded, optimized and runnable with tract.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use crate::input::{Batch, Dtype, InputSpec};
use crate::{ServingError, ml};

/// One output of the model.
#[derive(Debug, Clone)]
struct OutputSpec {
    name: String,
    /// MLflow's tensor spec (`{"dtype", "shape"}`), from the optimized graph.
    tensor_spec: Value,
    /// For a `ZipMap` output: the class labels each row's probabilities are keyed by.
    zipmap: Option<Vec<Value>>,
}

/// A loaded, optimized ONNX model.
pub struct OnnxModel {
    plan: Arc<TypedRunnableModel>,
    inputs: Vec<InputSpec>,
    outputs: Vec<OutputSpec>,
    /// What a row has cost lately, in nanoseconds (a moving average over `predict` calls; 0
    /// until the first): lets the caller run cheap predictions inline.
    nanos_per_row: AtomicU64,
    /// Predictions run so far.
    calls: AtomicU64,
    /// The files next to the model its tensors' external data was read from.
    external_data: Vec<String>,
}

impl std::fmt::Debug for OnnxModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxModel")
            .field("inputs", &self.inputs)
            .field("outputs", &self.output_names())
            .finish_non_exhaustive()
    }
}

impl OnnxModel {
    /// Loads and optimizes `path` for any batch size. External tensor data (`.data` files) are
    /// read from the model's directory.
    pub fn load(path: &Path) -> Result<Self, ServingError> {
        let failed = |why: String| ServingError::Load {
            path: path.display().to_string(),
            why,
        };
        let tract = |e: TractError| failed(format!("{e:#}"));
        let mut onnx = tract_onnx::onnx();
        ml::register(&mut onnx);
        let mut proto = onnx.proto_model_for_path(path).map_err(tract)?;
        let external_data = external_data_files(&proto);
        ml::relabel_string_classifiers(&mut proto);
        let zipmaps = ml::zipmaps(&proto).map_err(tract)?;
        let dir = path.parent().and_then(Path::to_str);
        let mut model = onnx.parse(&proto, dir).map_err(tract)?.model;

        let batch = TDim::Sym(model.symbols.sym("N"));
        let mut inputs = Vec::new();
        for (i, outlet) in model
            .input_outlets()
            .map_err(tract)?
            .to_vec()
            .iter()
            .enumerate()
        {
            let name = model.node(outlet.node).name.clone();
            let fact = model.input_fact(i).map_err(tract)?;
            let datum = fact.datum_type.concretize();
            let Some(dtype) = datum.and_then(Dtype::of) else {
                return Err(failed(format!(
                    "input '{name}' is {datum:?}; supported inputs are float32, float64, int64 and string"
                )));
            };
            let dims: Vec<_> = fact.shape.dims().collect();
            let width = match dims.as_slice() {
                [_, last] => last
                    .concretize()
                    .and_then(|d| d.to_i64().ok())
                    .and_then(|d| usize::try_from(d).ok()),
                _ => None,
            }
            .ok_or_else(|| failed(format!("input '{name}' is not of shape [N, features]")))?;
            model
                .set_input_fact(
                    i,
                    dtype
                        .datum()
                        .fact([batch.clone(), TDim::Val(width as i64)])
                        .into(),
                )
                .map_err(tract)?;
            inputs.push(InputSpec { name, dtype, width });
        }
        let names: Vec<String> = model
            .output_outlets()
            .map_err(tract)?
            .iter()
            .map(|outlet| {
                model
                    .outlet_label(*outlet)
                    .map_or_else(|| model.node(outlet.node).name.clone(), str::to_owned)
            })
            .collect();
        let plan = model
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(tract)?;
        let outputs = names
            .into_iter()
            .enumerate()
            .map(|(i, name)| {
                let fact = plan.model().output_fact(i).map_err(tract)?;
                let Some(dtype) = mlflow_dtype(fact.datum_type) else {
                    return Err(failed(format!(
                        "output '{name}' is {:?}, which cannot be answered in JSON",
                        fact.datum_type
                    )));
                };
                let shape: Vec<i64> = fact
                    .shape
                    .iter()
                    .map(|d| d.to_i64().unwrap_or(-1))
                    .collect();
                let zipmap = zipmaps
                    .iter()
                    .find(|z| z.output == name)
                    .map(|z| z.labels.clone());
                Ok(OutputSpec {
                    tensor_spec: json!({"dtype": dtype, "shape": shape}),
                    name,
                    zipmap,
                })
            })
            .collect::<Result<_, ServingError>>()?;
        Ok(Self {
            plan,
            inputs,
            outputs,
            nanos_per_row: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            external_data,
        })
    }

    /// The files, relative to the model's directory, that hold its tensors' external data
    /// (what `onnx.save_model(..., save_as_external_data=True)` writes next to the model): a
    /// copy of the model needs them too.
    pub fn external_data(&self) -> &[String] {
        &self.external_data
    }

    /// How long `rows` rows are expected to take, from the calls so far; `None` before the first.
    pub fn expected_time(&self, rows: usize) -> Option<Duration> {
        match self.nanos_per_row.load(Ordering::Relaxed) {
            0 => None,
            nanos => Some(Duration::from_nanos(nanos.saturating_mul(rows as u64))),
        }
    }

    /// The model's inputs, in order.
    pub fn inputs(&self) -> &[InputSpec] {
        &self.inputs
    }

    pub fn output_names(&self) -> Vec<&str> {
        self.outputs.iter().map(|o| o.name.as_str()).collect()
    }

    /// MLflow's signature of the model (`inputs`/`outputs` as the JSON strings MLmodel holds).
    /// A model with a `ZipMap` output (a list of maps, which MLflow's tensor specs cannot
    /// describe) gets no output signature.
    pub fn signature(&self) -> (String, Option<String>) {
        let inputs: Vec<Value> = self
            .inputs
            .iter()
            .map(|i| {
                json!({"type": "tensor", "name": i.name,
                    "tensor-spec": {"dtype": i.dtype.name(), "shape": [-1, i.width]}})
            })
            .collect();
        let outputs = (!self.outputs.iter().any(|o| o.zipmap.is_some())).then(|| {
            let outputs: Vec<Value> = self
                .outputs
                .iter()
                .map(|o| json!({"type": "tensor", "name": o.name, "tensor-spec": o.tensor_spec}))
                .collect();
            Value::Array(outputs).to_string()
        });
        (Value::Array(inputs).to_string(), outputs)
    }

    /// Reads an MLflow scoring request for this model (see [`crate::parse_mlflow_input`]).
    pub fn parse_input(&self, body: &Value) -> Result<Batch, ServingError> {
        crate::parse_mlflow_input(body, &self.inputs)
    }

    /// Runs the model. Returns each output by name as nested JSON arrays: integer outputs stay
    /// integers, float64 stays float64, a `ZipMap` output is one `{label: probability}` object
    /// per row. No rows: every output is an empty list.
    pub fn predict(&self, batch: Batch) -> Result<Map<String, Value>, ServingError> {
        if batch.rows == 0 {
            return Ok(self
                .outputs
                .iter()
                .map(|o| (o.name.clone(), Value::Array(Vec::new())))
                .collect());
        }
        let started = Instant::now();
        let rows = batch.rows as u64;
        let results = self
            .plan
            .run(batch.tensors.into_iter().map(Tensor::into_tvalue).collect())
            .map_err(
                |e| match e.chain().find_map(|c| c.downcast_ref::<ml::DataError>()) {
                    // The request's values, not the model: the client's fault.
                    Some(data) => ServingError::BadInput(data.to_string()),
                    None => ServingError::Inference(format!("{e:#}")),
                },
            )?;
        let per_row = u64::try_from(started.elapsed().as_nanos() / u128::from(rows.max(1)))
            .unwrap_or(u64::MAX)
            .max(1);
        let calls = self.calls.fetch_add(1, Ordering::Relaxed);
        let before = self.nanos_per_row.load(Ordering::Relaxed);
        self.nanos_per_row
            .store(next_per_row(before, per_row, calls), Ordering::Relaxed);
        self.outputs
            .iter()
            .zip(results.iter())
            .map(|(output, tensor)| {
                let value = match &output.zipmap {
                    Some(labels) => zipmap_json(tensor, labels)?,
                    None => tensor_json(tensor)?,
                };
                Ok((output.name.clone(), value))
            })
            .collect()
    }
}

/// MLflow's (numpy's) name for an output element type; `None` for those [`tensor_json`] does not
/// answer.
fn mlflow_dtype(datum: DatumType) -> Option<&'static str> {
    Some(match datum {
        DatumType::I64 | DatumType::TDim => "int64",
        DatumType::I32 => "int32",
        DatumType::F32 => "float32",
        DatumType::F64 => "float64",
        DatumType::String => "str",
        DatumType::Bool => "bool",
        _ => return None,
    })
}

fn unsupported(tensor: &Tensor) -> ServingError {
    ServingError::Inference(format!(
        "output type {:?} is not supported yet",
        tensor.datum_type()
    ))
}

/// A tensor as nested JSON arrays.
fn tensor_json(tensor: &Tensor) -> Result<Value, ServingError> {
    fn nest<T: Datum>(tensor: &Tensor, leaf: impl Fn(&T) -> Value) -> Result<Value, ServingError> {
        fn go<T>(view: tract_ndarray::ArrayViewD<'_, T>, leaf: &dyn Fn(&T) -> Value) -> Value {
            if view.ndim() == 0 {
                return view.iter().next().map_or(Value::Null, leaf);
            }
            Value::Array(view.outer_iter().map(|sub| go(sub, leaf)).collect())
        }
        let view = tensor
            .to_plain_array_view::<T>()
            .map_err(|_| unsupported(tensor))?;
        Ok(go(view, &leaf))
    }
    match tensor.datum_type() {
        DatumType::I64 => nest::<i64>(tensor, |v| Value::from(*v)),
        DatumType::I32 => nest::<i32>(tensor, |v| Value::from(*v)),
        // tract computes a Cast to int64 as a symbolic dimension (TDim); the values are plain.
        DatumType::TDim => {
            let ints = tensor
                .cast_to::<i64>()
                .map_err(|e| ServingError::Inference(format!("{e:#}")))?;
            nest::<i64>(&ints, |v| Value::from(*v))
        }
        DatumType::F32 => nest::<f32>(tensor, |v| Value::from(f64::from(*v))),
        DatumType::F64 => nest::<f64>(tensor, |v| Value::from(*v)),
        DatumType::Bool => nest::<bool>(tensor, |v| Value::from(*v)),
        DatumType::String => nest::<String>(tensor, |v| Value::from(v.as_str())),
        _ => Err(unsupported(tensor)),
    }
}

/// A `ZipMap` output: probabilities `[N, classes]` as `[{"<label>": p, ...}, ...]` (onnxruntime's
/// list of dicts; JSON keys are strings, so integer labels become "0", "1", …).
fn zipmap_json(tensor: &Tensor, labels: &[Value]) -> Result<Value, ServingError> {
    let view = tensor
        .to_plain_array_view::<f32>()
        .map_err(|_| unsupported(tensor))?;
    let view = view
        .into_dimensionality::<tract_ndarray::Ix2>()
        .ok()
        .filter(|v| v.ncols() == labels.len())
        .ok_or_else(|| {
            ServingError::Inference(format!(
                "ZipMap input of shape {:?} does not fit {} class labels",
                tensor.shape(),
                labels.len()
            ))
        })?;
    let keys: Vec<String> = labels
        .iter()
        .map(|l| l.as_str().map_or_else(|| l.to_string(), str::to_owned))
        .collect();
    Ok(Value::Array(
        view.outer_iter()
            .map(|row| {
                Value::Object(
                    keys.iter()
                        .zip(row.iter())
                        .map(|(k, p)| (k.clone(), Value::from(f64::from(*p))))
                        .collect(),
                )
            })
            .collect(),
    ))
}

/// The cost of a row after a prediction that took `per_row`, `before` it being the estimate
/// from the `calls` before: a moving average (weight 1/8 for the newest), so one slow call does
/// not decide alone — except the first call, which is cold (lazy set-up, caches) and only
/// stands until the second replaces it (a cold 8 ms kept a 0.3 ms model off the fast paths for
/// its next 20 calls).
fn next_per_row(before: u64, per_row: u64, calls: u64) -> u64 {
    let average = match calls {
        0 | 1 => per_row,
        _ => before - before / 8 + per_row / 8,
    };
    average.max(1)
}

/// The `location`s of the tensors whose data is in external files (initializers and constant
/// attributes, in subgraphs too), each once.
fn external_data_files(proto: &tract_onnx::pb::ModelProto) -> Vec<String> {
    use tract_onnx::pb::tensor_proto::DataLocation;
    use tract_onnx::pb::{GraphProto, TensorProto};
    fn tensors_of<'a>(graph: &'a GraphProto, found: &mut Vec<&'a TensorProto>) {
        found.extend(&graph.initializer);
        for attribute in graph.node.iter().flat_map(|node| &node.attribute) {
            found.extend(attribute.t.iter().chain(&attribute.tensors));
            for subgraph in attribute.g.iter().chain(&attribute.graphs) {
                tensors_of(subgraph, found);
            }
        }
    }
    let mut tensors = Vec::new();
    if let Some(graph) = &proto.graph {
        tensors_of(graph, &mut tensors);
    }
    let mut files: Vec<String> = Vec::new();
    let external = tensors
        .into_iter()
        .filter(|tensor| tensor.data_location == Some(DataLocation::External as i32));
    for entry in external.flat_map(|tensor| &tensor.external_data) {
        if entry.key == "location" && !files.contains(&entry.value) {
            files.push(entry.value.clone());
        }
    }
    files
}

#[cfg(test)]
mod tests {
    use super::next_per_row;

    #[test]
    fn the_cold_first_call_is_forgotten_and_later_ones_averaged() {
        let first = next_per_row(0, 8_000_000, 0);
        assert_eq!(first, 8_000_000);
        let second = next_per_row(first, 300_000, 1);
        assert_eq!(second, 300_000, "the cold call does not linger");
        // Then one slow call moves the estimate by an eighth of the difference.
        assert_eq!(
            next_per_row(second, 1_100_000, 2),
            300_000 - 37_500 + 137_500
        );
    }
}
