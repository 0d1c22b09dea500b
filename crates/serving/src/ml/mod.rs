//! ONNX-ML operators that scikit-learn exports (skl2onnx) and tract 0.23 does not implement, gets
//! wrong or runs slowly, registered into tract's ONNX op table by name.
//!
//! Each operator is a [`Kernel`]: how its outputs are typed and how it computes them, in plain
//! Rust over ndarray. [`Custom`] turns a kernel into what tract needs: an inference-time
//! [`Expansion`] (type and shape rules) that wires itself as a typed op into the optimized plan.
//! `ZipMap` is special: its output type (a sequence of maps) does not exist in tract, so it is
//! registered as an identity and the caller reshapes the tensor into MLflow's list of dicts when
//! answering (see [`zipmaps`]).
//!
//! Semantics follow the ONNX-ML operator specification and were checked against onnxruntime on
//! the fixtures in `tests/fixtures/onnx` (see its README for the per-operator notes).

mod encode;
mod linear;
mod svm;
#[cfg(test)]
mod tests;
mod tree;

use std::fmt;

use tract_onnx::model::{Onnx, ParsingContext};
use tract_onnx::pb::{ModelProto, NodeProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;

/// Adds the operators this module implements to tract's ONNX op table.
pub(crate) fn register(onnx: &mut Onnx) {
    let ops = &mut onnx.op_register;
    ops.insert("Scaler", |_, node| {
        Ok((expand(Custom(encode::Scaler::parse(node)?)), vec![]))
    });
    ops.insert("Imputer", |_, node| {
        Ok((expand(Custom(encode::Imputer::parse(node)?)), vec![]))
    });
    ops.insert("OneHotEncoder", |_, node| {
        Ok((expand(Custom(encode::OneHotEncoder::parse(node)?)), vec![]))
    });
    ops.insert("FeatureVectorizer", |_, node| {
        Ok((
            expand(Custom(encode::FeatureVectorizer::parse(node)?)),
            vec![],
        ))
    });
    // tract's own builders stay for the binary layouts scored by one number.
    if let Some(tract) = ops.0.get("TreeEnsembleClassifier") {
        TRACT_TREE_CLASSIFIER.get_or_init(|| *tract);
    }
    if let Some(tract) = ops.0.get("LinearClassifier") {
        TRACT_LINEAR_CLASSIFIER.get_or_init(|| *tract);
    }
    ops.insert("LinearClassifier", |ctx, node| {
        if linear::is_single_row_binary(node)? {
            let Some(tract) = TRACT_LINEAR_CLASSIFIER.get() else {
                bail!("LinearClassifier: tract's builder is missing");
            };
            return tract(ctx, node);
        }
        Ok((
            expand(Custom(linear::LinearClassifier::parse(node)?)),
            vec![],
        ))
    });
    ops.insert("TreeEnsembleClassifier", |ctx, node| {
        if tree::is_single_score_binary(node)? {
            let Some(tract) = TRACT_TREE_CLASSIFIER.get() else {
                bail!("TreeEnsembleClassifier: tract's builder is missing");
            };
            return tract(ctx, node);
        }
        Ok((
            expand(Custom(tree::TreeEnsembleClassifier::parse(node)?)),
            vec![],
        ))
    });
    ops.insert("TreeEnsembleRegressor", |_, node| {
        Ok((
            expand(Custom(tree::TreeEnsembleRegressor::parse(node)?)),
            vec![],
        ))
    });
    ops.insert("SVMClassifier", |_, node| {
        Ok((expand(Custom(svm::SvmClassifier::parse(node)?)), vec![]))
    });
    ops.insert("SVMRegressor", |_, node| {
        Ok((expand(Custom(svm::SvmRegressor::parse(node)?)), vec![]))
    });
    ops.insert("ArrayFeatureExtractor", |ctx, node| {
        Ok((
            expand(Custom(encode::ArrayFeatureExtractor::parse(ctx, node)?)),
            vec![],
        ))
    });
    ops.insert(LABEL_LOOKUP, |_, node| {
        Ok((expand(Custom(encode::LabelLookup::parse(node)?)), vec![]))
    });
    ops.insert("ZipMap", zipmap_as_identity);
}

/// How tract builds an operator from an ONNX node.
type OpBuilder =
    fn(&ParsingContext, &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)>;

/// tract's builders, kept before ours replace them in the op table.
static TRACT_TREE_CLASSIFIER: std::sync::OnceLock<OpBuilder> = std::sync::OnceLock::new();
static TRACT_LINEAR_CLASSIFIER: std::sync::OnceLock<OpBuilder> = std::sync::OnceLock::new();

/// Our own op type for the lookup [`relabel_string_classifiers`] inserts.
const LABEL_LOOKUP: &str = "SwitchyardLabelLookup";

/// tract's `LinearClassifier` and `TreeEnsembleClassifier` (still used for the binary layouts
/// scored by one number) cannot produce string labels: their label lookup needs a zero value,
/// which strings lack. So every such node with string labels is rewritten to the class indices
/// `0..k` as integer labels, followed by a lookup node that turns the index back into the string,
/// under the original output name; whoever builds the node then only sees integer labels.
pub(crate) fn relabel_string_classifiers(proto: &mut ModelProto) {
    use tract_onnx::pb::AttributeProto;
    use tract_onnx::pb::attribute_proto::AttributeType;
    let Some(graph) = proto.graph.as_mut() else {
        return;
    };
    let mut nodes = Vec::with_capacity(graph.node.len());
    for mut node in std::mem::take(&mut graph.node) {
        let ints_attr = match node.op_type.as_str() {
            "LinearClassifier" => "classlabels_ints",
            "TreeEnsembleClassifier" => "classlabels_int64s",
            _ => "",
        };
        let strings = node
            .attribute
            .iter()
            .position(|a| a.name == "classlabels_strings");
        let (false, Some(at), Some(label)) =
            (ints_attr.is_empty(), strings, node.output.first().cloned())
        else {
            nodes.push(node);
            continue;
        };
        let labels = node.attribute.remove(at).strings;
        node.attribute.push(AttributeProto {
            name: ints_attr.to_owned(),
            r#type: AttributeType::Ints as i32,
            ints: (0..labels.len() as i64).collect(),
            ..AttributeProto::default()
        });
        let index = format!("{label}/class_index");
        node.output[0].clone_from(&index);
        let lookup = NodeProto {
            name: format!("{}/labels", node.name),
            op_type: LABEL_LOOKUP.to_owned(),
            domain: "ai.onnx.ml".to_owned(),
            input: vec![index],
            output: vec![label],
            attribute: vec![AttributeProto {
                name: "labels".to_owned(),
                r#type: AttributeType::Strings as i32,
                strings: labels,
                ..AttributeProto::default()
            }],
            ..NodeProto::default()
        };
        nodes.push(node);
        nodes.push(lookup);
    }
    graph.node = nodes;
}

/// Class labels or categories: an ONNX-ML node's `<ints>` or `<strings>` attribute.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Labels {
    Ints(Vec<i64>),
    Strings(Vec<String>),
}

impl Labels {
    /// Exactly one of the two attributes must be set.
    pub fn parse(node: &NodeProto, ints: &str, strings: &str) -> TractResult<Self> {
        match (
            node.get_attr_opt_vec::<i64>(ints)?,
            node.get_attr_opt_vec::<String>(strings)?,
        ) {
            (Some(ints), None) => Ok(Self::Ints(ints)),
            (None, Some(strings)) => Ok(Self::Strings(strings)),
            _ => bail!("{} needs exactly one of {ints} and {strings}", node.op_type),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Self::Ints(l) => l.len(),
            Self::Strings(l) => l.len(),
        }
    }

    pub fn datum_type(&self) -> DatumType {
        match self {
            Self::Ints(_) => DatumType::I64,
            Self::Strings(_) => DatumType::String,
        }
    }

    fn json(&self) -> Vec<serde_json::Value> {
        match self {
            Self::Ints(l) => l.iter().map(|&v| v.into()).collect(),
            Self::Strings(l) => l.iter().map(|v| v.as_str().into()).collect(),
        }
    }
}

/// The label of each row's winning class.
pub(crate) fn label_tensor(labels: &Labels, winners: &[usize]) -> Tensor {
    match labels {
        Labels::Ints(l) => {
            tract_ndarray::Array1::from_iter(winners.iter().map(|&w| l[w])).into_tensor()
        }
        Labels::Strings(l) => {
            tract_ndarray::Array1::from_iter(winners.iter().map(|&w| l[w].clone())).into_tensor()
        }
    }
}

/// A classifier's outputs: the label of each row, and `columns` float scores per row.
pub(crate) fn classifier_outputs(labels: &Labels, columns: usize) -> Vec<Out> {
    vec![
        Out {
            dt: Some(labels.datum_type()),
            shape: Shape::Rows,
        },
        Out {
            dt: Some(DatumType::F32),
            shape: Shape::Matrix(columns),
        },
    ]
}

/// Runs a classifier whose `score` fills each row's raw class scores: the label is the class
/// with the highest raw score (the first on ties), then `post_transform` applies to the scores,
/// as onnxruntime does.
pub(crate) fn classify(
    x: &Matrix,
    labels: &Labels,
    post_transform: PostTransform,
    mut score: impl FnMut(&[f32], &mut [f32]),
) -> TractResult<TVec<Tensor>> {
    let mut winners = Vec::with_capacity(x.rows);
    let mut rows = x.iter();
    let scores = output(x.rows, labels.len(), |_, scores| {
        score(rows.next().unwrap_or_default(), scores);
        let mut best = 0;
        for (class, value) in scores.iter().enumerate() {
            if *value > scores[best] {
                best = class;
            }
        }
        winners.push(best);
        post_transform.apply(scores);
        Ok(())
    })?;
    Ok(tvec![label_tensor(labels, &winners), scores])
}

/// A failure caused by the request's values (an unknown category…), not by the model: the
/// caller answers 400.
#[derive(Debug)]
pub(crate) struct DataError(pub String);

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DataError {}

/// Largest output a kernel allocates per request, in values: a hostile model or request cannot
/// make the process abort on allocation.
const MAX_OUTPUT_VALUES: usize = 1 << 28;

/// A graph output produced by `ZipMap`: the probabilities tensor `[N, classes]` that MLflow
/// answers as one `{label: probability}` object per row.
#[derive(Debug, Clone)]
pub(crate) struct ZipMap {
    pub output: String,
    pub labels: Vec<serde_json::Value>,
}

/// The `ZipMap` nodes of `proto` whose output is a graph output.
pub(crate) fn zipmaps(proto: &ModelProto) -> TractResult<Vec<ZipMap>> {
    let Some(graph) = &proto.graph else {
        return Ok(Vec::new());
    };
    graph
        .node
        .iter()
        .filter(|node| node.op_type == "ZipMap")
        .filter_map(|node| {
            let output = node.output.first()?;
            graph
                .output
                .iter()
                .any(|o| &o.name == output)
                .then(|| (node, output.clone()))
        })
        .map(|(node, output)| {
            let labels = Labels::parse(node, "classlabels_int64s", "classlabels_strings")?;
            Ok(ZipMap {
                output,
                labels: labels.json(),
            })
        })
        .collect()
}

fn zipmap_as_identity(
    _: &ParsingContext,
    _: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expand(Custom(ZipMapPassThrough)), vec![]))
}

/// Where an output's shape comes from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Shape {
    /// `[N]`, N the first input's first dimension.
    Rows,
    /// `[N, k]`.
    Matrix(usize),
    /// The first input's shape.
    LikeInput,
    /// The first input's shape with one more axis of `k` at the end.
    Append(usize),
    /// The first input's shape with its last axis resized to `k` (a vector `[C]` gives `[1, k]`);
    /// `None`: to as many as the second input has elements.
    LastAxis(Option<usize>),
}

/// One output of a kernel.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Out {
    /// The element type; `None`: the first input's.
    pub dt: Option<DatumType>,
    pub shape: Shape,
}

/// An operator computed by our own code.
pub(crate) trait Kernel: fmt::Debug + Clone + PartialEq + Send + Sync + 'static {
    const NAME: &'static str;

    /// How many inputs the node takes.
    fn inputs(&self) -> usize {
        1
    }

    fn outputs(&self) -> Vec<Out>;

    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<Tensor>>;
}

/// A [`Kernel`] as a tract operator, both at inference (rules) and in the typed plan.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Custom<K>(pub K);

// Parameters are floats, so equality is PartialEq (NaN parameters make two nodes unequal, which
// only means tract will not merge them).
impl<K: Kernel> Eq for Custom<K> {}

impl<K: Kernel> Expansion for Custom<K> {
    fn name(&self) -> StaticName {
        K::NAME.into()
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(self.0.outputs().len())
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        let specs = self.0.outputs();
        ensure!(self.0.inputs() > 0, "{} needs at least one input", K::NAME);
        check_input_arity(inputs, self.0.inputs())?;
        check_output_arity(outputs, specs.len())?;
        for (output, spec) in outputs.iter().zip(specs) {
            match spec.dt {
                Some(dt) => s.equals(&output.datum_type, dt)?,
                None => s.equals(&output.datum_type, &inputs[0].datum_type)?,
            }
            match spec.shape {
                // Kernels reading rows take matrices [N, C] only.
                Shape::Rows => {
                    s.equals(&inputs[0].rank, 2)?;
                    s.equals(&output.rank, 1)?;
                    s.equals(&output.shape[0], &inputs[0].shape[0])?;
                }
                Shape::Matrix(k) => {
                    s.equals(&inputs[0].rank, 2)?;
                    s.equals(&output.rank, 2)?;
                    s.equals(&output.shape[0], &inputs[0].shape[0])?;
                    s.equals(&output.shape[1], k.to_dim())?;
                }
                Shape::LikeInput => s.equals(&output.shape, &inputs[0].shape)?,
                Shape::Append(k) => {
                    s.equals(&output.rank, inputs[0].rank.bex() + 1)?;
                    s.given(&inputs[0].rank, move |s, rank| {
                        let rank = rank as usize;
                        for axis in 0..rank {
                            s.equals(&output.shape[axis], &inputs[0].shape[axis])?;
                        }
                        s.equals(&output.shape[rank], k.to_dim())
                    })?;
                }
                // onnxruntime: a vector [C] gives [1, k].
                Shape::LastAxis(k) => {
                    let last_axis = move |s: &mut Solver<'r>, rank: i64, k: TDim| {
                        ensure!(rank > 0, "{} needs an input of rank 1 or more", K::NAME);
                        let rank = rank as usize;
                        if rank == 1 {
                            s.equals(&output.rank, 2)?;
                            s.equals(&output.shape[0], 1.to_dim())?;
                            return s.equals(&output.shape[1], k);
                        }
                        s.equals(&output.rank, rank as i64)?;
                        for axis in 0..rank - 1 {
                            s.equals(&output.shape[axis], &inputs[0].shape[axis])?;
                        }
                        s.equals(&output.shape[rank - 1], k)
                    };
                    match k {
                        Some(k) => s.given(&inputs[0].rank, move |s, rank| {
                            last_axis(s, rank, k.to_dim())
                        })?,
                        None => {
                            s.given_2(&inputs[0].rank, &inputs[1].shape, move |s, rank, picked| {
                                last_axis(s, rank, picked.iter().product())
                            })?
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, self.clone(), inputs)
    }
}

impl<K: Kernel> Op for Custom<K> {
    fn name(&self) -> StaticName {
        K::NAME.into()
    }

    op_as_typed_op!();
}

impl<K: Kernel> EvalOp for Custom<K> {
    op_out_of_plan!();

    fn eval(&self, _: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        Ok(self
            .0
            .eval(inputs)?
            .into_iter()
            .map(Tensor::into_tvalue)
            .collect())
    }
}

impl<K: Kernel> TypedOp for Custom<K> {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let Some(first) = inputs.first().map(|fact| &fact.shape) else {
            bail!("{} needs at least one input", K::NAME);
        };
        let rows = first.iter().next().cloned().unwrap_or_else(|| 1.to_dim());
        self.0
            .outputs()
            .into_iter()
            .map(|out| {
                let shape: TVec<TDim> = match out.shape {
                    Shape::Rows => tvec![rows.clone()],
                    Shape::Matrix(k) => tvec![rows.clone(), k.to_dim()],
                    Shape::LikeInput => first.iter().cloned().collect(),
                    Shape::Append(k) => first.iter().cloned().chain([k.to_dim()]).collect(),
                    Shape::LastAxis(k) => {
                        let k = match (k, inputs.get(1)) {
                            (Some(k), _) => k.to_dim(),
                            (None, Some(picked)) => picked.shape.iter().product(),
                            (None, None) => bail!("{} needs its indices", K::NAME),
                        };
                        let keep = first.len().saturating_sub(1);
                        if first.len() == 1 {
                            tvec![1.to_dim(), k]
                        } else {
                            first.iter().take(keep).cloned().chain([k]).collect()
                        }
                    }
                };
                Ok(out.dt.unwrap_or(inputs[0].datum_type).fact(shape))
            })
            .collect()
    }

    as_op!();
}

/// `ZipMap` at inference: the probabilities go through unchanged.
#[derive(Debug, Clone, PartialEq)]
struct ZipMapPassThrough;

impl Kernel for ZipMapPassThrough {
    const NAME: &'static str = "ZipMap";

    fn outputs(&self) -> Vec<Out> {
        vec![Out {
            dt: None,
            shape: Shape::LikeInput,
        }]
    }

    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<Tensor>> {
        Ok(inputs.into_iter().map(TValue::into_tensor).collect())
    }
}

/// A float32 matrix, row-major.
pub(crate) struct Matrix {
    values: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl Matrix {
    /// An input as a float32 matrix `[N, C]`, cast if needed.
    fn of(input: &TValue) -> TractResult<Self> {
        let floats = input.cast_to::<f32>()?;
        let view = floats.to_plain_array_view::<f32>()?;
        let [rows, cols] = *view.shape() else {
            bail!("expected a matrix [N, C], got shape {:?}", view.shape());
        };
        ensure!(
            cols > 0,
            "expected a matrix [N, C] with C > 0, got {:?}",
            view.shape()
        );
        Ok(Self {
            values: view.iter().copied().collect(),
            rows,
            cols,
        })
    }

    fn iter(&self) -> std::slice::ChunksExact<'_, f32> {
        self.values.chunks_exact(self.cols)
    }
}

/// A float32 output `[rows, cols]` filled row by row by `fill`.
fn output(
    rows: usize,
    cols: usize,
    mut fill: impl FnMut(usize, &mut [f32]) -> TractResult<()>,
) -> TractResult<Tensor> {
    let size = rows
        .checked_mul(cols)
        .filter(|size| *size <= MAX_OUTPUT_VALUES)
        .ok_or_else(|| DataError(format!("an output of {rows} × {cols} values is too large")))?;
    let mut values = vec![0f32; size];
    if cols > 0 {
        for (i, row) in values.chunks_exact_mut(cols).enumerate() {
            fill(i, row)?;
        }
    }
    Tensor::from_shape(&[rows, cols], &values)
}

/// A float list attribute, broadcast to `columns` when it has one value.
fn per_column(values: &[f32], columns: usize, what: &str) -> TractResult<Vec<f32>> {
    match values.len() {
        1 => Ok(vec![values[0]; columns]),
        n if n == columns => Ok(values.to_vec()),
        n => bail!("{what} has {n} values for {columns} columns"),
    }
}

/// `post_transform` of the ONNX-ML classifiers and regressors. `SOFTMAX_ZERO` and `PROBIT`
/// (which scikit-learn exports never use) are refused when the model loads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum PostTransform {
    None,
    Softmax,
    Logistic,
}

impl PostTransform {
    fn parse(node: &NodeProto) -> TractResult<Self> {
        Ok(
            match node
                .get_attr_opt::<&str>("post_transform")?
                .unwrap_or("NONE")
            {
                "NONE" => Self::None,
                "SOFTMAX" => Self::Softmax,
                "LOGISTIC" => Self::Logistic,
                other => bail!("{}: post_transform {other} is not supported", node.op_type),
            },
        )
    }

    /// Applies the transform to one row of scores, in place.
    fn apply(self, row: &mut [f32]) {
        match self {
            Self::None => {}
            Self::Logistic => row.iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp())),
            Self::Softmax => {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for v in row.iter_mut() {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                row.iter_mut().for_each(|v| *v /= sum);
            }
        }
    }
}
