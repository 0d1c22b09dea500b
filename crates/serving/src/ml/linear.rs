//! `LinearClassifier` (logistic regression, linear SVMs) with one coefficient row per class.
//!
//! Ours rather than tract's, which applies its softmax through 64-lane vector kernels one row at a
//! time (most of a 100-row request's time for three classes) and cannot produce string labels.
//! The single-row binary layout stays tract's: see [`is_single_row_binary`].

use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::{bail, ensure};

use super::{Kernel, Labels, Matrix, Out, PostTransform, classifier_outputs, classify};

/// `scores = x · coefficientsᵀ + intercepts`; the label is the class with the highest score (the
/// first on ties), then `post_transform` applies to the scores, as onnxruntime does.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LinearClassifier {
    labels: Labels,
    /// `classes × features`, row-major.
    coefficients: Vec<f32>,
    intercepts: Vec<f32>,
    features: usize,
    post_transform: PostTransform,
}

/// One coefficient row for two classes: onnxruntime derives the second score from the first in
/// ways that depend on post_transform, which tract reproduces.
pub(crate) fn is_single_row_binary(node: &NodeProto) -> TractResult<bool> {
    let intercepts: Vec<f32> = node.get_attr_opt_vec("intercepts")?.unwrap_or_default();
    Ok(intercepts.len() == 1)
}

impl LinearClassifier {
    pub fn parse(node: &NodeProto) -> TractResult<Self> {
        let labels = Labels::parse(node, "classlabels_ints", "classlabels_strings")?;
        let classes = labels.len();
        let coefficients: Vec<f32> = node.get_attr_vec("coefficients")?;
        let intercepts: Vec<f32> = node
            .get_attr_opt_vec("intercepts")?
            .unwrap_or_else(|| vec![0.0; classes]);
        node.expect_attr("intercepts", intercepts.len() == classes, "one per class")?;
        ensure!(
            classes > 0 && !coefficients.is_empty() && coefficients.len().is_multiple_of(classes),
            "LinearClassifier: {} coefficients for {classes} classes",
            coefficients.len()
        );
        if classes == 1 {
            bail!("LinearClassifier: one class");
        }
        Ok(Self {
            features: coefficients.len() / classes,
            labels,
            coefficients,
            intercepts,
            post_transform: PostTransform::parse(node)?,
        })
    }
}

impl Kernel for LinearClassifier {
    const NAME: &'static str = "LinearClassifier";

    fn outputs(&self) -> Vec<Out> {
        classifier_outputs(&self.labels, self.labels.len())
    }

    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<Tensor>> {
        let x = Matrix::of(&inputs[0])?;
        ensure!(
            x.cols == self.features,
            "LinearClassifier: rows have {} values, the coefficients {}",
            x.cols,
            self.features
        );
        let weights = self.coefficients.chunks_exact(self.features);
        classify(&x, &self.labels, self.post_transform, |row, scores| {
            for ((score, w), b) in scores.iter_mut().zip(weights.clone()).zip(&self.intercepts) {
                *score = b + row.iter().zip(w).map(|(x, w)| x * w).sum::<f32>();
            }
        })
    }
}
