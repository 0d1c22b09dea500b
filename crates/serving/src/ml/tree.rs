//! `TreeEnsembleRegressor` (random forests, gradient boosting, decision trees).
//!
//! Our own evaluation rather than tract's `TreeEnsemble` kernel, which reads `BRANCH_GTE` nodes
//! as leaves and starts `MIN`/`MAX` aggregation from 0 instead of the first tree's value.

use std::collections::HashMap;

use tract_onnx::pb::{NodeProto, TensorProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::{bail, ensure, format_err};

use super::{Kernel, Matrix, Out, PostTransform, Shape, output};

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
    /// Reads the `nodes_*` and `target_*` attribute lists.
    fn parse(node: &NodeProto) -> TractResult<Self> {
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

        let leaf_trees: Vec<i64> = node.get_attr_vec("target_treeids")?;
        let leaf_nodes: Vec<i64> = node.get_attr_vec("target_nodeids")?;
        let leaf_targets: Vec<usize> = node.get_attr_vec("target_ids")?;
        let leaf_weights: Vec<f32> = node.get_attr_vec("target_weights")?;
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
        let trees = Trees::parse(node)?;
        let targets: usize = node.get_attr_opt("n_targets")?.unwrap_or(1);
        node.expect_attr("n_targets", (1..=MAX_TARGETS).contains(&targets), || {
            format!("between 1 and {MAX_TARGETS}")
        })?;
        if let Some(bad) = trees
            .nodes
            .iter()
            .flat_map(|n| &n.weights)
            .find(|(t, _)| *t >= targets)
        {
            bail!(
                "TreeEnsembleRegressor: a leaf writes target {} of {targets}",
                bad.0
            );
        }
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
        let base_values: Vec<f32> = node
            .get_attr_opt_vec("base_values")?
            .unwrap_or_else(|| vec![0.0; targets]);
        node.expect_attr(
            "base_values",
            base_values.len() == targets,
            "one value per target",
        )?;
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
