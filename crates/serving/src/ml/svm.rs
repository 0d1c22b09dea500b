//! `SVMClassifier` and `SVMRegressor` (scikit-learn's `SVC`, `NuSVC`, `SVR`, `NuSVR`,
//! `OneClassSVM`) with support vectors, computed as onnxruntime does: libsvm's one-vs-one
//! decision values, votes for the label, and Platt scaling + pairwise coupling for probabilities.

use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::{bail, ensure};

use super::{
    Kernel, Labels, Matrix, Out, PostTransform, Shape, classifier_outputs, label_tensor, output,
};

/// The kernel function `K(x, support vector)`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum KernelFn {
    Linear,
    Poly { gamma: f32, coef0: f32, degree: f32 },
    Rbf { gamma: f32 },
    Sigmoid { gamma: f32, coef0: f32 },
}

impl KernelFn {
    fn parse(node: &NodeProto) -> TractResult<Self> {
        let params: Vec<f32> = node.get_attr_opt_vec("kernel_params")?.unwrap_or_default();
        let param = |i: usize| params.get(i).copied().unwrap_or(0.0);
        let (gamma, coef0, degree) = (param(0), param(1), param(2));
        Ok(
            match node
                .get_attr_opt::<&str>("kernel_type")?
                .unwrap_or("LINEAR")
            {
                "LINEAR" => Self::Linear,
                "POLY" => Self::Poly {
                    gamma,
                    coef0,
                    degree,
                },
                "RBF" => Self::Rbf { gamma },
                "SIGMOID" => Self::Sigmoid { gamma, coef0 },
                other => bail!("{}: unknown kernel_type {other}", node.op_type),
            },
        )
    }

    fn eval(self, x: &[f32], sv: &[f32]) -> f32 {
        let dot = || x.iter().zip(sv).map(|(a, b)| a * b).sum::<f32>();
        match self {
            Self::Linear => dot(),
            Self::Poly {
                gamma,
                coef0,
                degree,
            } => (gamma * dot() + coef0).powf(degree),
            Self::Rbf { gamma } => {
                let distance: f32 = x.iter().zip(sv).map(|(a, b)| (a - b) * (a - b)).sum();
                (-gamma * distance).exp()
            }
            Self::Sigmoid { gamma, coef0 } => (gamma * dot() + coef0).tanh(),
        }
    }
}

/// Support vectors, `count` rows of `features` values.
#[derive(Debug, Clone, PartialEq)]
struct SupportVectors {
    values: Vec<f32>,
    features: usize,
}

impl SupportVectors {
    fn parse(node: &NodeProto, count: usize) -> TractResult<Self> {
        let values: Vec<f32> = node.get_attr_vec("support_vectors")?;
        node.expect_attr(
            "support_vectors",
            count > 0 && !values.is_empty() && values.len().is_multiple_of(count),
            || format!("a multiple of {count} values"),
        )?;
        Ok(Self {
            features: values.len() / count,
            values,
        })
    }

    /// `K(x, v)` for every support vector `v`, into `out`.
    fn kernels(&self, kernel: KernelFn, x: &[f32], out: &mut Vec<f32>) {
        out.clear();
        out.extend(
            self.values
                .chunks_exact(self.features)
                .map(|sv| kernel.eval(x, sv)),
        );
    }
}

/// A one-vs-one support vector classifier. Outputs the label and, per row, either the pairwise
/// decision values (`classes·(classes−1)/2` columns; for two classes `[−s, s]`, as onnxruntime)
/// or, with `prob_a`/`prob_b`, the class probabilities. The linear mode (no support vectors) is
/// refused at load.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SvmClassifier {
    labels: Labels,
    kernel: KernelFn,
    vectors: SupportVectors,
    /// Support vectors per class, and the index of each class's first one.
    per_class: Vec<usize>,
    starts: Vec<usize>,
    /// `(classes − 1) × vectors` dual coefficients, libsvm's layout.
    coefficients: Vec<f32>,
    /// One intercept per class pair.
    rho: Vec<f32>,
    /// Platt scaling per class pair.
    probability: Option<(Vec<f32>, Vec<f32>)>,
    post_transform: PostTransform,
}

impl SvmClassifier {
    pub fn parse(node: &NodeProto) -> TractResult<Self> {
        let labels = Labels::parse(node, "classlabels_ints", "classlabels_strings")?;
        let classes = labels.len();
        node.expect(classes >= 2, "at least two classes")?;
        let per_class: Vec<usize> = node
            .get_attr_opt_vec("vectors_per_class")?
            .unwrap_or_default();
        let Some(count) = per_class
            .iter()
            .try_fold(0usize, |sum, n| sum.checked_add(*n))
        else {
            bail!("SVMClassifier: vectors_per_class overflows");
        };
        if count == 0 {
            bail!("SVMClassifier without support vectors (the linear mode) is not supported");
        }
        node.expect_attr(
            "vectors_per_class",
            per_class.len() == classes,
            "one count per class",
        )?;
        let starts = per_class
            .iter()
            .scan(0, |start, &n| {
                let this = *start;
                *start += n;
                Some(this)
            })
            .collect();
        let pairs = classes * (classes - 1) / 2;
        let coefficients: Vec<f32> = node.get_attr_vec("coefficients")?;
        node.expect_attr(
            "coefficients",
            (classes - 1).checked_mul(count) == Some(coefficients.len()),
            || {
                format!(
                    "(classes − 1) × support vectors = {}",
                    (classes - 1) * count
                )
            },
        )?;
        let rho: Vec<f32> = node.get_attr_vec("rho")?;
        node.expect_attr("rho", rho.len() == pairs, "one value per class pair")?;
        let prob_a: Vec<f32> = node.get_attr_opt_vec("prob_a")?.unwrap_or_default();
        let prob_b: Vec<f32> = node.get_attr_opt_vec("prob_b")?.unwrap_or_default();
        let probability = if prob_a.is_empty() {
            None
        } else {
            node.expect(
                prob_a.len() == pairs && prob_b.len() == pairs,
                "prob_a and prob_b: one value per class pair",
            )?;
            Some((prob_a, prob_b))
        };
        let post_transform = PostTransform::parse(node)?;
        // onnxruntime writes [1 − s, s] untransformed in that case: an oddity we do not copy.
        if classes == 2 && probability.is_none() && post_transform != PostTransform::None {
            bail!("SVMClassifier: two classes without probabilities need post_transform NONE");
        }
        Ok(Self {
            vectors: SupportVectors::parse(node, count)?,
            kernel: KernelFn::parse(node)?,
            labels,
            per_class,
            starts,
            coefficients,
            rho,
            probability,
            post_transform,
        })
    }

    fn classes(&self) -> usize {
        self.labels.len()
    }

    fn score_columns(&self) -> usize {
        let classes = self.classes();
        if self.probability.is_some() || classes == 2 {
            classes
        } else {
            classes * (classes - 1) / 2
        }
    }

    /// The pairwise decision values of one row, and the winning class by votes.
    fn decide(&self, kernels: &[f32], decisions: &mut Vec<f32>) -> usize {
        let classes = self.classes();
        let count = kernels.len();
        let mut votes = vec![0usize; classes];
        decisions.clear();
        for (i, j) in pairs(classes) {
            let (si, ni) = (self.starts[i], self.per_class[i]);
            let (sj, nj) = (self.starts[j], self.per_class[j]);
            let from_i: f32 = self.coefficients[(j - 1) * count + si..][..ni]
                .iter()
                .zip(&kernels[si..si + ni])
                .map(|(c, k)| c * k)
                .sum();
            let from_j: f32 = self.coefficients[i * count + sj..][..nj]
                .iter()
                .zip(&kernels[sj..sj + nj])
                .map(|(c, k)| c * k)
                .sum();
            let decision = self.rho[decisions.len()] + from_i + from_j;
            votes[if decision > 0.0 { i } else { j }] += 1;
            decisions.push(decision);
        }
        // The first class with the most votes, as libsvm picks it.
        let mut winner = 0;
        for (class, &v) in votes.iter().enumerate() {
            if v > votes[winner] {
                winner = class;
            }
        }
        winner
    }
}

/// The class pairs `(i, j)`, `i < j`, in libsvm's order.
fn pairs(classes: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..classes).flat_map(move |i| (i + 1..classes).map(move |j| (i, j)))
}

/// Platt scaling: the probability that the pair's first class wins, from its decision value.
fn sigmoid_probability(decision: f32, a: f32, b: f32) -> f32 {
    let z = decision * a + b;
    if z >= 0.0 {
        (-z).exp() / (1.0 + (-z).exp())
    } else {
        1.0 / (1.0 + z.exp())
    }
}

/// libsvm's pairwise coupling (Wu, Lin and Weng 2004, method 2): class probabilities from the
/// pairwise ones, `r[i][j]` = P(i wins against j).
fn couple(r: &[Vec<f32>]) -> Vec<f32> {
    let k = r.len();
    let mut q = vec![vec![0f32; k]; k];
    for t in 0..k {
        for j in 0..t {
            q[t][t] += r[j][t] * r[j][t];
            q[t][j] = q[j][t];
        }
        for j in t + 1..k {
            q[t][t] += r[j][t] * r[j][t];
            q[t][j] = -r[j][t] * r[t][j];
        }
    }
    let mut p = vec![1.0 / k as f32; k];
    let mut qp = vec![0f32; k];
    let eps = 0.005 / k as f32;
    for _ in 0..k.max(100) {
        let mut pqp = 0.0;
        for t in 0..k {
            qp[t] = (0..k).map(|j| q[t][j] * p[j]).sum();
            pqp += p[t] * qp[t];
        }
        let max_error = qp.iter().map(|v| (v - pqp).abs()).fold(0f32, f32::max);
        if max_error < eps {
            break;
        }
        for t in 0..k {
            let diff = (-qp[t] + pqp) / q[t][t];
            p[t] += diff;
            pqp = (pqp + diff * (diff * q[t][t] + 2.0 * qp[t])) / (1.0 + diff) / (1.0 + diff);
            for j in 0..k {
                qp[j] = (qp[j] + diff * q[t][j]) / (1.0 + diff);
                p[j] /= 1.0 + diff;
            }
        }
    }
    p
}

impl Kernel for SvmClassifier {
    const NAME: &'static str = "SVMClassifier";

    fn outputs(&self) -> Vec<Out> {
        classifier_outputs(&self.labels, self.score_columns())
    }

    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<Tensor>> {
        let x = Matrix::of(&inputs[0])?;
        ensure!(
            x.cols == self.vectors.features,
            "SVMClassifier: rows have {} values, the support vectors {}",
            x.cols,
            self.vectors.features
        );
        let classes = self.classes();
        let mut winners = Vec::with_capacity(x.rows);
        let (mut kernels, mut decisions) = (Vec::new(), Vec::new());
        let mut rows = x.iter();
        let scores = output(x.rows, self.score_columns(), |_, out| {
            let row = rows.next().unwrap_or_default();
            self.vectors.kernels(self.kernel, row, &mut kernels);
            winners.push(self.decide(&kernels, &mut decisions));
            match &self.probability {
                None if classes == 2 => out.copy_from_slice(&[-decisions[0], decisions[0]]),
                None => out.copy_from_slice(&decisions),
                Some((a, b)) => {
                    let mut r = vec![vec![0f32; classes]; classes];
                    for (pair, (i, j)) in pairs(classes).enumerate() {
                        let p = sigmoid_probability(decisions[pair], a[pair], b[pair])
                            .clamp(1e-7, 1.0 - 1e-7);
                        r[i][j] = p;
                        r[j][i] = 1.0 - p;
                    }
                    out.copy_from_slice(&couple(&r));
                }
            }
            self.post_transform.apply(out);
            Ok(())
        })?;
        Ok(tvec![label_tensor(&self.labels, &winners), scores])
    }
}

/// A support vector regressor: `Σ coefficient·K(x, v) + rho`, or its sign for a one-class SVM.
/// `post_transform` is ignored, as onnxruntime ignores it. The linear mode (no support vectors)
/// is refused at load.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SvmRegressor {
    kernel: KernelFn,
    vectors: SupportVectors,
    coefficients: Vec<f32>,
    rho: f32,
    one_class: bool,
}

impl SvmRegressor {
    pub fn parse(node: &NodeProto) -> TractResult<Self> {
        let count: usize = node.get_attr_opt("n_supports")?.unwrap_or(0);
        if count == 0 {
            bail!("SVMRegressor without support vectors (the linear mode) is not supported");
        }
        let coefficients: Vec<f32> = node.get_attr_vec("coefficients")?;
        node.expect_attr(
            "coefficients",
            coefficients.len() == count,
            "one per support vector",
        )?;
        let rho: Vec<f32> = node.get_attr_vec("rho")?;
        node.expect_attr("rho", rho.len() == 1, "one value")?;
        Ok(Self {
            vectors: SupportVectors::parse(node, count)?,
            kernel: KernelFn::parse(node)?,
            coefficients,
            rho: rho[0],
            one_class: node.get_attr_opt::<i64>("one_class")?.unwrap_or(0) != 0,
        })
    }
}

impl Kernel for SvmRegressor {
    const NAME: &'static str = "SVMRegressor";

    fn outputs(&self) -> Vec<Out> {
        vec![Out {
            dt: Some(DatumType::F32),
            shape: Shape::Matrix(1),
        }]
    }

    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<Tensor>> {
        let x = Matrix::of(&inputs[0])?;
        ensure!(
            x.cols == self.vectors.features,
            "SVMRegressor: rows have {} values, the support vectors {}",
            x.cols,
            self.vectors.features
        );
        let mut kernels = Vec::new();
        let mut rows = x.iter();
        let out = output(x.rows, 1, |_, y| {
            let row = rows.next().unwrap_or_default();
            self.vectors.kernels(self.kernel, row, &mut kernels);
            let mut score = self.rho
                + self
                    .coefficients
                    .iter()
                    .zip(&kernels)
                    .map(|(c, k)| c * k)
                    .sum::<f32>();
            if self.one_class {
                score = if score > 0.0 { 1.0 } else { -1.0 };
            }
            y[0] = score;
            Ok(())
        })?;
        Ok(tvec![out])
    }
}
