//! `TreeEnsembleRegressor` and `TreeEnsembleClassifier` (random forests, gradient boosting,
//! decision trees).
//!
//! Our own evaluation rather than tract's `TreeEnsemble` kernel, which reads `BRANCH_GTE` nodes
//! as leaves, starts `MIN`/`MAX` aggregation from 0 instead of the first tree's value, and tells a
//! leaf from a branch by building an error (an allocation per leaf and row: a 100-row random
//! forest request took 0.4 ms, 4 ms with `RUST_BACKTRACE=1`).

use std::collections::HashMap;

use tract_onnx::pb::{NodeProto, TensorProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::{bail, ensure, format_err};

use super::{
    Kernel, Labels, Matrix, Out, PostTransform, Shape, classifier_outputs, classify, output,
};

/// More targets than any real regressor has; bounds what a model file can make us allocate.
const MAX_TARGETS: usize = 1 << 16;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Leq,
    Lt,
    Gte,
    Gt,
    Eq,
    Neq,
    Leaf,
}

#[derive(Debug, Clone, PartialEq)]
struct Node {
    mode: Mode,
    feature: usize,
    value: f32,
    nan_goes_true: bool,
    /// Indices into `Trees::nodes`.
    if_true: usize,
    if_false: usize,
    /// `(target, weight)` of a leaf.
    weights: Vec<(usize, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Aggregate {
    Sum,
    Average,
    Min,
    Max,
}

/// The trees of an ensemble, nodes addressed by index.
#[derive(Debug, Clone, PartialEq)]
struct Trees {
    nodes: Vec<Node>,
    roots: Vec<usize>,
    features: usize,
}

impl Trees {
    /// Reads the `nodes_*` and `<leaf>_*` attribute lists (`leaf`: `target` for regressors,
    /// `class` for classifiers).
    fn parse(node: &NodeProto, leaf: &str) -> TractResult<Self> {
        for attr in ["nodes_values_as_tensor", "base_values_as_tensor"] {
            if node.get_attr_opt::<&TensorProto>(attr)?.is_some() {
                bail!(
                    "{}: {attr} (ai.onnx.ml opset 3 doubles) is not supported",
                    node.op_type
                );
            }
        }
        let tree_ids: Vec<i64> = node.get_attr_vec("nodes_treeids")?;
        let node_ids: Vec<i64> = node.get_attr_vec("nodes_nodeids")?;
        let features: Vec<usize> = node.get_attr_vec("nodes_featureids")?;
        let values: Vec<f32> = node.get_attr_vec("nodes_values")?;
        let modes: Vec<&str> = node.get_attr_vec("nodes_modes")?;
        let true_ids: Vec<i64> = node.get_attr_vec("nodes_truenodeids")?;
        let false_ids: Vec<i64> = node.get_attr_vec("nodes_falsenodeids")?;
        let n = tree_ids.len();
        let missing: Vec<i64> = node
            .get_attr_opt_vec("nodes_missing_value_tracks_true")?
            .unwrap_or_else(|| vec![0; n]);
        for (name, len) in [
            ("nodes_nodeids", node_ids.len()),
            ("nodes_featureids", features.len()),
            ("nodes_values", values.len()),
            ("nodes_modes", modes.len()),
            ("nodes_truenodeids", true_ids.len()),
            ("nodes_falsenodeids", false_ids.len()),
            ("nodes_missing_value_tracks_true", missing.len()),
        ] {
            node.expect_attr(name, len == n, || format!("{n} values like nodes_treeids"))?;
        }
        node.expect_attr("nodes_treeids", n > 0, "at least one node")?;

        let index: HashMap<(i64, i64), usize> = tree_ids
            .iter()
            .zip(&node_ids)
            .enumerate()
            .map(|(i, (&t, &id))| ((t, id), i))
            .collect();
        let child = |tree: i64, id: i64| {
            index
                .get(&(tree, id))
                .copied()
                .ok_or_else(|| format_err!("{}: tree {tree} has no node {id}", node.op_type))
        };
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let mode = match modes[i] {
                "BRANCH_LEQ" => Mode::Leq,
                "BRANCH_LT" => Mode::Lt,
                "BRANCH_GTE" => Mode::Gte,
                "BRANCH_GT" => Mode::Gt,
                "BRANCH_EQ" => Mode::Eq,
                "BRANCH_NEQ" => Mode::Neq,
                "LEAF" => Mode::Leaf,
                other => bail!("{}: unknown node mode {other}", node.op_type),
            };
            let (if_true, if_false) = if mode == Mode::Leaf {
                (0, 0)
            } else {
                (
                    child(tree_ids[i], true_ids[i])?,
                    child(tree_ids[i], false_ids[i])?,
                )
            };
            nodes.push(Node {
                mode,
                feature: features[i],
                value: values[i],
                nan_goes_true: missing[i] != 0,
                if_true,
                if_false,
                weights: Vec::new(),
            });
        }

        let leaf_trees: Vec<i64> = node.get_attr_vec(&format!("{leaf}_treeids"))?;
        let leaf_nodes: Vec<i64> = node.get_attr_vec(&format!("{leaf}_nodeids"))?;
        let leaf_targets: Vec<usize> = node.get_attr_vec(&format!("{leaf}_ids"))?;
        let leaf_weights: Vec<f32> = node.get_attr_vec(&format!("{leaf}_weights"))?;
        let m = leaf_trees.len();
        node.expect(
            leaf_nodes.len() == m && leaf_targets.len() == m && leaf_weights.len() == m,
            "as many leaf node ids, target ids and weights as leaf tree ids",
        )?;
        for i in 0..m {
            let at = child(leaf_trees[i], leaf_nodes[i])?;
            nodes[at].weights.push((leaf_targets[i], leaf_weights[i]));
        }

        // Roots: the first node of each tree, trees in order of first appearance.
        let mut roots: Vec<(i64, usize)> = Vec::new();
        for (i, &tree) in tree_ids.iter().enumerate() {
            if !roots.iter().any(|(t, _)| *t == tree) {
                let root = index.get(&(tree, 0)).copied().unwrap_or(i);
                roots.push((tree, root));
            }
        }
        let features = nodes
            .iter()
            .filter(|n| n.mode != Mode::Leaf)
            .map(|n| n.feature + 1)
            .max()
            .unwrap_or(0);
        let trees = Self {
            nodes,
            roots: roots.into_iter().map(|(_, root)| root).collect(),
            features,
        };
        trees.check_acyclic(node)?;
        Ok(trees)
    }

    /// The trees are trees: walking every one from its root reaches each node at most once in
    /// all (no cycle, no shared subtree), so a row's walk is bounded by a tree's depth.
    fn check_acyclic(&self, node: &NodeProto) -> TractResult<()> {
        let mut visits = 0usize;
        let mut stack = self.roots.clone();
        while let Some(at) = stack.pop() {
            visits += 1;
            ensure!(
                visits <= self.nodes.len(),
                "{}: the nodes do not form trees (a cycle or a shared subtree)",
                node.op_type
            );
            let n = &self.nodes[at];
            if n.mode != Mode::Leaf {
                stack.extend([n.if_true, n.if_false]);
            }
        }
        Ok(())
    }

    /// Checks that every leaf writes one of the `outputs` targets or classes, and reads the
    /// node's `base_values` (one per output, zeros when absent).
    fn base_values(&self, node: &NodeProto, outputs: usize) -> TractResult<Vec<f32>> {
        if let Some((bad, _)) = self
            .nodes
            .iter()
            .flat_map(|n| &n.weights)
            .find(|(output, _)| *output >= outputs)
        {
            bail!("{}: a leaf writes output {bad} of {outputs}", node.op_type);
        }
        let base_values: Vec<f32> = node
            .get_attr_opt_vec("base_values")?
            .unwrap_or_else(|| vec![0.0; outputs]);
        node.expect_attr(
            "base_values",
            base_values.len() == outputs,
            "one value per target or class",
        )?;
        Ok(base_values)
    }

    /// The leaf `row` reaches in the tree rooted at `root`.
    fn leaf(&self, root: usize, row: &[f32]) -> &Node {
        let mut node = &self.nodes[root];
        // Trees are checked at load; the bound is a second guard.
        for _ in 0..=self.nodes.len() {
            if node.mode == Mode::Leaf {
                return node;
            }
            let x = row[node.feature];
            let goes_true = if x.is_nan() {
                node.nan_goes_true
            } else {
                match node.mode {
                    Mode::Leq => x <= node.value,
                    Mode::Lt => x < node.value,
                    Mode::Gte => x >= node.value,
                    Mode::Gt => x > node.value,
                    Mode::Eq => x == node.value,
                    Mode::Neq => x != node.value,
                    Mode::Leaf => unreachable!("handled above"),
                }
            };
            node = &self.nodes[if goes_true {
                node.if_true
            } else {
                node.if_false
            }];
        }
        node
    }
}

/// A tree ensemble regressor: each tree adds its leaf's weights to the targets.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TreeEnsembleRegressor {
    trees: Trees,
    targets: usize,
    aggregate: Aggregate,
    base_values: Vec<f32>,
    post_transform: PostTransform,
}

impl TreeEnsembleRegressor {
    pub fn parse(node: &NodeProto) -> TractResult<Self> {
        let trees = Trees::parse(node, "target")?;
        let targets: usize = node.get_attr_opt("n_targets")?.unwrap_or(1);
        node.expect_attr("n_targets", (1..=MAX_TARGETS).contains(&targets), || {
            format!("between 1 and {MAX_TARGETS}")
        })?;
        let base_values = trees.base_values(node, targets)?;
        let aggregate = match node
            .get_attr_opt::<&str>("aggregate_function")?
            .unwrap_or("SUM")
        {
            "SUM" => Aggregate::Sum,
            "AVERAGE" => Aggregate::Average,
            "MIN" => Aggregate::Min,
            "MAX" => Aggregate::Max,
            other => bail!("TreeEnsembleRegressor: unknown aggregate_function {other}"),
        };
        Ok(Self {
            trees,
            targets,
            aggregate,
            base_values,
            post_transform: PostTransform::parse(node)?,
        })
    }
}

impl Kernel for TreeEnsembleRegressor {
    const NAME: &'static str = "TreeEnsembleRegressor";

    fn outputs(&self) -> Vec<Out> {
        vec![Out {
            dt: Some(DatumType::F32),
            shape: Shape::Matrix(self.targets),
        }]
    }

    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<Tensor>> {
        let x = Matrix::of(&inputs[0])?;
        ensure!(
            x.cols >= self.trees.features,
            "TreeEnsembleRegressor: rows have {} values, the trees read feature {}",
            x.cols,
            self.trees.features.saturating_sub(1)
        );
        let mut seen = vec![false; self.targets];
        let mut rows = x.iter();
        let out = output(x.rows, self.targets, |_, scores| {
            let row = rows.next().unwrap_or_default();
            seen.fill(false);
            for &root in &self.trees.roots {
                for &(target, weight) in &self.trees.leaf(root, row).weights {
                    let score = &mut scores[target];
                    *score = match self.aggregate {
                        Aggregate::Sum | Aggregate::Average => *score + weight,
                        Aggregate::Min if seen[target] => score.min(weight),
                        Aggregate::Max if seen[target] => score.max(weight),
                        Aggregate::Min | Aggregate::Max => weight,
                    };
                    seen[target] = true;
                }
            }
            let trees = self.trees.roots.len() as f32;
            for (score, base) in scores.iter_mut().zip(&self.base_values) {
                if self.aggregate == Aggregate::Average {
                    *score /= trees;
                }
                *score += base;
            }
            self.post_transform.apply(scores);
            Ok(())
        })?;
        Ok(tvec![out])
    }
}

/// A tree ensemble classifier: each class's score is the sum of its leaf weights over the trees
/// plus its base value; the label is the class with the highest score (the first on ties), then
/// `post_transform` applies to the scores, as onnxruntime does. The single-score binary layout
/// (two classes, every leaf writing class 0) is left to tract: see [`is_single_score_binary`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TreeEnsembleClassifier {
    trees: Trees,
    labels: Labels,
    base_values: Vec<f32>,
    post_transform: PostTransform,
}

/// Two classes scored by one number (every leaf writes class 0): onnxruntime then derives the
/// second column in ways that depend on signs and post_transform, which tract reproduces.
pub(crate) fn is_single_score_binary(node: &NodeProto) -> TractResult<bool> {
    let labels = Labels::parse(node, "classlabels_int64s", "classlabels_strings")?;
    let ids: Vec<i64> = node.get_attr_opt_vec("class_ids")?.unwrap_or_default();
    Ok(labels.len() < 3 && ids.iter().all(|id| *id == 0))
}

impl TreeEnsembleClassifier {
    pub fn parse(node: &NodeProto) -> TractResult<Self> {
        let labels = Labels::parse(node, "classlabels_int64s", "classlabels_strings")?;
        let classes = labels.len();
        let trees = Trees::parse(node, "class")?;
        let base_values = trees.base_values(node, classes)?;
        Ok(Self {
            trees,
            labels,
            base_values,
            post_transform: PostTransform::parse(node)?,
        })
    }
}

impl Kernel for TreeEnsembleClassifier {
    const NAME: &'static str = "TreeEnsembleClassifier";

    fn outputs(&self) -> Vec<Out> {
        classifier_outputs(&self.labels, self.labels.len())
    }

    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<Tensor>> {
        let x = Matrix::of(&inputs[0])?;
        ensure!(
            x.cols >= self.trees.features,
            "TreeEnsembleClassifier: rows have {} values, the trees read feature {}",
            x.cols,
            self.trees.features.saturating_sub(1)
        );
        classify(&x, &self.labels, self.post_transform, |row, scores| {
            scores.copy_from_slice(&self.base_values);
            for &root in &self.trees.roots {
                for &(class, weight) in &self.trees.leaf(root, row).weights {
                    scores[class] += weight;
                }
            }
        })
    }
}
