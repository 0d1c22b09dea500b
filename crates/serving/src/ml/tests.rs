//! Cases the scikit-learn fixtures do not reach: binary SVMs, refused model files, data errors.

use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::{AttributeProto, NodeProto};
use tract_onnx::prelude::*;

use super::encode::{FeatureVectorizer, OneHotEncoder};
use super::svm::SvmClassifier;
use super::tree::TreeEnsembleRegressor;
use super::{DataError, Kernel};

fn ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: values.to_vec(),
        ..AttributeProto::default()
    }
}

fn floats(name: &str, values: &[f32]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Floats as i32,
        floats: values.to_vec(),
        ..AttributeProto::default()
    }
}

fn strings(name: &str, values: &[&str]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Strings as i32,
        strings: values.iter().map(|v| v.as_bytes().to_vec()).collect(),
        ..AttributeProto::default()
    }
}

fn node(op: &str, inputs: usize, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        input: (0..inputs).map(|i| format!("x{i}")).collect(),
        attribute,
        ..NodeProto::default()
    }
}

fn run<K: Kernel>(kernel: &K, input: Tensor) -> TractResult<TVec<Tensor>> {
    kernel.eval(tvec![input.into_tvalue()])
}

#[test]
fn a_binary_svm_answers_minus_s_and_s_like_onnxruntime() {
    // Two classes, one support vector each, linear kernel: s = 0.5 + 1·(sv0·x) − 1·(sv1·x).
    let svm = SvmClassifier::parse(&node(
        "SVMClassifier",
        1,
        vec![
            ints("classlabels_ints", &[7, 9]),
            ints("vectors_per_class", &[1, 1]),
            floats("support_vectors", &[0.0, 0.0, 1.0, 1.0]),
            floats("coefficients", &[1.0, -1.0]),
            floats("rho", &[0.5]),
            AttributeProto {
                name: "kernel_type".into(),
                r#type: AttributeType::String as i32,
                s: b"LINEAR".to_vec(),
                ..AttributeProto::default()
            },
        ],
    ))
    .unwrap();
    let out = run(&svm, tensor2(&[[2f32, 2.0], [-1.0, 0.0]])).unwrap();
    // Row 0: s = 0.5 − 4 = −3.5 → the second class wins; row 1: s = 0.5 + 1 = 1.5 → the first.
    assert_eq!(out[0], tensor1(&[9i64, 7]));
    assert_eq!(out[1], tensor2(&[[3.5f32, -3.5], [-1.5, 1.5]]));
}

#[test]
fn an_unknown_category_with_zeros_0_is_the_requests_fault() {
    let encoder = OneHotEncoder::parse(&node(
        "OneHotEncoder",
        1,
        vec![
            ints("cats_int64s", &[1, 2]),
            AttributeProto {
                name: "zeros".into(),
                r#type: AttributeType::Int as i32,
                i: 0,
                ..AttributeProto::default()
            },
        ],
    ))
    .unwrap();
    let known = run(&encoder, tensor2(&[[2f32], [1.9]])).unwrap();
    assert_eq!(known[0], tensor3(&[[[0f32, 1.0]], [[1.0, 0.0]]]));
    let error = run(&encoder, tensor2(&[[3f32]])).unwrap_err();
    assert!(error.chain().any(|e| e.is::<DataError>()), "{error:?}");
    // NaN is never a category (it would truncate to 0).
    let nan = run(&encoder, tensor2(&[[f32::NAN]])).unwrap_err();
    assert!(nan.chain().any(|e| e.is::<DataError>()), "{nan:?}");
}

#[test]
fn model_files_that_would_loop_or_allocate_without_bound_are_refused() {
    // Node 0 branches to itself.
    let looping = node(
        "TreeEnsembleRegressor",
        1,
        vec![
            ints("nodes_treeids", &[0, 0]),
            ints("nodes_nodeids", &[0, 1]),
            ints("nodes_featureids", &[0, 0]),
            floats("nodes_values", &[0.5, 0.0]),
            strings("nodes_modes", &["BRANCH_LEQ", "LEAF"]),
            ints("nodes_truenodeids", &[0, 0]),
            ints("nodes_falsenodeids", &[1, 0]),
            ints("target_treeids", &[0]),
            ints("target_nodeids", &[1]),
            ints("target_ids", &[0]),
            floats("target_weights", &[1.0]),
        ],
    );
    let error = TreeEnsembleRegressor::parse(&looping).unwrap_err();
    assert!(
        format!("{error:#}").contains("do not form trees"),
        "{error:#}"
    );

    let wide = node(
        "FeatureVectorizer",
        2,
        vec![ints("inputdimensions", &[1 << 40, 1 << 40])],
    );
    let error = FeatureVectorizer::parse(&wide).unwrap_err();
    assert!(format!("{error:#}").contains("at most"), "{error:#}");

    let none = node("FeatureVectorizer", 0, vec![ints("inputdimensions", &[])]);
    assert!(FeatureVectorizer::parse(&none).is_err());

    let overflow = node(
        "SVMClassifier",
        1,
        vec![
            ints("classlabels_ints", &[0, 1, 2]),
            ints("vectors_per_class", &[i64::MAX, i64::MAX, 4]),
            floats("support_vectors", &[0.0; 4]),
            floats("coefficients", &[0.0; 4]),
            floats("rho", &[0.0; 3]),
        ],
    );
    assert!(SvmClassifier::parse(&overflow).is_err());
}
