//! Preprocessing and plumbing operators: `Scaler`, `Imputer`, `OneHotEncoder`,
//! `FeatureVectorizer`, `ArrayFeatureExtractor`, and our label lookup.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::{bail, ensure, format_err};

use super::{DataError, Kernel, Labels, Matrix, Out, Shape, output, per_column};

/// The widest row FeatureVectorizer builds.
const MAX_WIDTH: usize = 1 << 20;

/// One float32 output shaped like the input.
fn float_like_input() -> Vec<Out> {
    vec![Out {
        dt: Some(DatumType::F32),
        shape: Shape::LikeInput,
    }]
}

/// The length of the input's last axis: the number of columns of its values.
fn columns(input: &TValue) -> usize {
    input.shape().last().copied().unwrap_or(1).max(1)
}

/// The input as float32, each value rewritten by `change(column, value)`.
fn map_floats(input: &TValue, mut change: impl FnMut(usize, &mut f32)) -> TractResult<Tensor> {
    let columns = columns(input);
    let mut tensor = input.cast_to::<f32>()?.into_owned();
    for (i, v) in tensor
        .to_plain_array_view_mut::<f32>()?
        .iter_mut()
        .enumerate()
    {
        change(i % columns, v);
    }
    Ok(tensor)
}

/// `y = (x - offset) * scale`, per column (`StandardScaler`, `MinMaxScaler`, `MaxAbsScaler`…).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Scaler {
    offset: Vec<f32>,
    scale: Vec<f32>,
}

impl Scaler {
    pub fn parse(node: &NodeProto) -> TractResult<Self> {
        Ok(Self {
            offset: node
                .get_attr_opt_vec("offset")?
                .unwrap_or_else(|| vec![0.0]),
            scale: node.get_attr_opt_vec("scale")?.unwrap_or_else(|| vec![1.0]),
        })
    }
}

impl Kernel for Scaler {
    const NAME: &'static str = "Scaler";

    fn outputs(&self) -> Vec<Out> {
        float_like_input()
    }

    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<Tensor>> {
        let columns = columns(&inputs[0]);
        let offset = per_column(&self.offset, columns, "Scaler offset")?;
        let scale = per_column(&self.scale, columns, "Scaler scale")?;
        let scaled = map_floats(&inputs[0], |c, v| *v = (*v - offset[c]) * scale[c])?;
        Ok(tvec![scaled])
    }
}

/// Replaces a marker value (NaN by default in scikit-learn exports) with a per-column value
/// (`SimpleImputer`). Float inputs only.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Imputer {
    imputed: Vec<f32>,
    replaced: f32,
}

impl Imputer {
    pub fn parse(node: &NodeProto) -> TractResult<Self> {
        if node
            .get_attr_opt_vec::<i64>("imputed_value_int64s")?
            .is_some()
        {
            bail!("Imputer: integer imputation (imputed_value_int64s) is not supported");
        }
        let imputed: Vec<f32> = node.get_attr_vec("imputed_value_floats")?;
        node.expect_attr(
            "imputed_value_floats",
            !imputed.is_empty(),
            "at least one value",
        )?;
        Ok(Self {
            imputed,
            replaced: node.get_attr_opt("replaced_value_float")?.unwrap_or(0.0),
        })
    }
}

impl Kernel for Imputer {
    const NAME: &'static str = "Imputer";

    fn outputs(&self) -> Vec<Out> {
        float_like_input()
    }

    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<Tensor>> {
        let imputed = per_column(
            &self.imputed,
            columns(&inputs[0]),
            "Imputer imputed_value_floats",
        )?;
        let replace_nan = self.replaced.is_nan();
        let filled = map_floats(&inputs[0], |c, v| {
            if (replace_nan && v.is_nan()) || *v == self.replaced {
                *v = imputed[c];
            }
        })?;
        Ok(tvec![filled])
    }
}

/// One-hot encoding: each value becomes a vector with a 1 at its category's index (a new last
/// axis). Integer inputs compare exactly; floats are truncated to integers as onnxruntime does
/// (NaN and infinities are unknown). An unknown value gives all zeros, or — with `zeros = 0`, what
/// skl2onnx writes for scikit-learn's default `handle_unknown="error"` — a 400 for the request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct OneHotEncoder {
    categories: Labels,
    unknown_is_zeros: bool,
}

impl OneHotEncoder {
    pub fn parse(node: &NodeProto) -> TractResult<Self> {
        Ok(Self {
            categories: Labels::parse(node, "cats_int64s", "cats_strings")?,
            unknown_is_zeros: node.get_attr_opt::<i64>("zeros")?.unwrap_or(1) != 0,
        })
    }
}

impl Kernel for OneHotEncoder {
    const NAME: &'static str = "OneHotEncoder";

    fn outputs(&self) -> Vec<Out> {
        vec![Out {
            dt: Some(DatumType::F32),
            shape: Shape::Append(self.categories.len()),
        }]
    }

    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<Tensor>> {
        let input = &inputs[0];
        let indices: Vec<Option<usize>> = match (&self.categories, input.datum_type()) {
            (Labels::Strings(categories), _) => input
                .to_plain_array_view::<String>()?
                .iter()
                .map(|v| categories.iter().position(|c| c == v))
                .collect(),
            (Labels::Ints(categories), DatumType::F32 | DatumType::F64) => input
                .cast_to::<f64>()?
                .to_plain_array_view::<f64>()?
                .iter()
                .map(|v| {
                    v.is_finite()
                        .then(|| categories.iter().position(|c| *c == v.trunc() as i64))
                        .flatten()
                })
                .collect(),
            (Labels::Ints(categories), _) => input
                .cast_to::<i64>()?
                .to_plain_array_view::<i64>()?
                .iter()
                .map(|v| categories.iter().position(|c| c == v))
                .collect(),
        };
        if !self.unknown_is_zeros && indices.contains(&None) {
            return Err(DataError(
                "OneHotEncoder: a value is not one of the categories the model knows".to_owned(),
            )
            .into());
        }
        let k = self.categories.len();
        let shape: Vec<usize> = input.shape().iter().copied().chain([k]).collect();
        let out = output(indices.len(), k, |i, row| {
            if let Some(index) = indices[i] {
                row[index] = 1.0;
            }
            Ok(())
        })?;
        Ok(tvec![out.into_shape(&shape)?])
    }
}

/// Concatenates its inputs' columns into one float matrix; input `i` contributes exactly
/// `inputdimensions[i]` columns (cut, or padded with zeros).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FeatureVectorizer {
    dimensions: Vec<usize>,
}

impl FeatureVectorizer {
    pub fn parse(node: &NodeProto) -> TractResult<Self> {
        let dimensions: Vec<usize> = node.get_attr_vec("inputdimensions")?;
        node.expect_attr(
            "inputdimensions",
            !dimensions.is_empty() && dimensions.len() == node.input.len(),
            "one dimension per input, at least one input",
        )?;
        let width = dimensions
            .iter()
            .try_fold(0usize, |sum, d| sum.checked_add(*d));
        node.expect_attr(
            "inputdimensions",
            width.is_some_and(|w| w <= MAX_WIDTH),
            || format!("a total of at most {MAX_WIDTH} columns"),
        )?;
        Ok(Self { dimensions })
    }
}

impl Kernel for FeatureVectorizer {
    const NAME: &'static str = "FeatureVectorizer";

    fn inputs(&self) -> usize {
        self.dimensions.len()
    }

    fn outputs(&self) -> Vec<Out> {
        vec![Out {
            dt: Some(DatumType::F32),
            shape: Shape::Matrix(self.dimensions.iter().sum()),
        }]
    }

    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<Tensor>> {
        let matrices = inputs
            .iter()
            .map(Matrix::of)
            .collect::<TractResult<Vec<_>>>()?;
        let rows = matrices.first().map_or(0, |m| m.rows);
        ensure!(
            matrices.iter().all(|m| m.rows == rows),
            "FeatureVectorizer: inputs have different row counts"
        );
        let mut sources: Vec<_> = matrices.iter().map(Matrix::iter).collect();
        let out = output(rows, self.dimensions.iter().sum(), |_, out| {
            let mut start = 0;
            for (source, &dimension) in sources.iter_mut().zip(&self.dimensions) {
                let from = source.next().unwrap_or_default();
                let take = dimension.min(from.len());
                out[start..start + take].copy_from_slice(&from[..take]);
                start += dimension;
            }
            Ok(())
        })?;
        Ok(tvec![out])
    }
}

/// Picks columns of the last axis by index. Unlike a gather, the picked axis stays: a scalar
/// index on `[N, C]` gives `[N, 1]`, as onnxruntime does (skl2onnx's SVC graphs rely on it).
/// The indices are a constant of the graph (columns picked from a batch) or computed (skl2onnx
/// maps each row's `ArgMax` to its class label by picking from the constant list of classes:
/// `[C]` and `N` indices give `[1, N]`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ArrayFeatureExtractor {
    /// How many indices, when they are a constant.
    count: Option<usize>,
}

impl ArrayFeatureExtractor {
    pub fn parse(ctx: &ParsingContext, node: &NodeProto) -> TractResult<Self> {
        let indices = node.input.get(1).map(String::as_str).unwrap_or_default();
        let graphs = || {
            ctx.model
                .graph
                .iter()
                .chain(ctx.parent_graphs.iter().copied())
        };
        // An initializer, or the `value` of a Constant node.
        let constant = graphs()
            .flat_map(|g| &g.initializer)
            .find(|t| t.name == indices)
            .or_else(|| {
                graphs()
                    .flat_map(|g| &g.node)
                    .find(|n| n.op_type == "Constant" && n.output.iter().any(|o| o == indices))
                    .and_then(|n| n.attribute.iter().find(|a| a.name == "value"))
                    .and_then(|a| a.t.as_ref())
            });
        let count = constant.map(|constant| {
            let count = constant.dims.iter().product::<i64>();
            usize::try_from(count).unwrap_or(0)
        });
        Ok(Self { count })
    }
}

impl Kernel for ArrayFeatureExtractor {
    const NAME: &'static str = "ArrayFeatureExtractor";

    fn inputs(&self) -> usize {
        2
    }

    fn outputs(&self) -> Vec<Out> {
        vec![Out {
            dt: None,
            shape: Shape::LastAxis(self.count),
        }]
    }

    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<Tensor>> {
        fn pick<T: Datum + Clone>(x: &Tensor, indices: &[usize]) -> TractResult<Tensor> {
            let view = x.to_plain_array_view::<T>()?;
            let columns = x.shape().last().copied().unwrap_or(1);
            let values: Vec<T> = view
                .iter()
                .cloned()
                .collect::<Vec<T>>()
                .chunks(columns.max(1))
                .flat_map(|row| indices.iter().map(|&i| row[i].clone()))
                .collect();
            // onnxruntime: a vector [C] gives [1, k].
            let mut shape: Vec<usize> = match x.shape() {
                [_] => vec![1, 0],
                other => other.to_vec(),
            };
            if let Some(last) = shape.last_mut() {
                *last = indices.len();
            }
            Ok(tract_ndarray::ArrayD::from_shape_vec(shape, values)?.into_tensor())
        }
        let x = &inputs[0];
        let columns = x.shape().last().copied().unwrap_or(1);
        let indices = inputs[1]
            .cast_to::<i64>()?
            .to_plain_array_view::<i64>()?
            .iter()
            .map(|&i| {
                usize::try_from(i)
                    .ok()
                    .filter(|i| *i < columns)
                    .ok_or_else(|| format_err!("ArrayFeatureExtractor: index {i} out of {columns}"))
            })
            .collect::<TractResult<Vec<usize>>>()?;
        let picked = match x.datum_type() {
            DatumType::F32 => pick::<f32>(x, &indices)?,
            DatumType::F64 => pick::<f64>(x, &indices)?,
            DatumType::I64 => pick::<i64>(x, &indices)?,
            DatumType::I32 => pick::<i32>(x, &indices)?,
            // tract computes a Cast to int64 as TDim.
            DatumType::TDim => pick::<TDim>(x, &indices)?,
            DatumType::String => pick::<String>(x, &indices)?,
            other => bail!("ArrayFeatureExtractor: {other:?} inputs are not supported"),
        };
        Ok(tvec![picked])
    }
}

/// Class indices (int64) to string labels: see [`super::relabel_string_classifiers`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LabelLookup {
    labels: Vec<String>,
}

impl LabelLookup {
    pub fn parse(node: &NodeProto) -> TractResult<Self> {
        Ok(Self {
            labels: node.get_attr_vec("labels")?,
        })
    }
}

impl Kernel for LabelLookup {
    const NAME: &'static str = super::LABEL_LOOKUP;

    fn outputs(&self) -> Vec<Out> {
        vec![Out {
            dt: Some(DatumType::String),
            shape: Shape::LikeInput,
        }]
    }

    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<Tensor>> {
        let indices = inputs[0].cast_to::<i64>()?;
        let view = indices.to_plain_array_view::<i64>()?;
        let labels = view.map(|&i| {
            usize::try_from(i)
                .ok()
                .and_then(|i| self.labels.get(i))
                .cloned()
                .unwrap_or_default()
        });
        Ok(tvec![labels.into_tensor()])
    }
}
