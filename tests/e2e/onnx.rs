//! ONNX artifact models: logged into the store, served at `/endpoints/{name}/invocations` in
//! MLflow's formats, predictions equal to onnxruntime's (the committed fixtures).

use std::path::PathBuf;

use serde_json::{Value, json};
use switchyard_serving::OnnxModel;
use switchyard_store::Store;

use crate::common::{TestGateway, stdout, switchyard, temp_dir};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/onnx")).join(name)
}

fn fixture_json(file: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(file)).unwrap()).unwrap()
}

fn expected(name: &str) -> Value {
    fixture_json(&format!("{name}.expected.json"))
}

/// Labels equal, floats within 1e-5 (relative above 1).
fn assert_close(at: &str, got: &Value, want: &Value) {
    match (got, want) {
        (Value::Object(g), Value::Object(w)) => {
            assert_eq!(
                g.keys().collect::<Vec<_>>(),
                w.keys().collect::<Vec<_>>(),
                "{at}"
            );
            for (key, w) in w {
                assert_close(&format!("{at}.{key}"), &g[key], w);
            }
        }
        (Value::Array(g), Value::Array(w)) => {
            assert_eq!(g.len(), w.len(), "{at}");
            for (i, (g, w)) in g.iter().zip(w).enumerate() {
                assert_close(&format!("{at}[{i}]"), g, w);
            }
        }
        (Value::Number(g), Value::Number(w)) if w.is_i64() => {
            assert_eq!(g, w, "{at}: labels stay integers")
        }
        (Value::Number(g), Value::Number(w)) => {
            let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{at}: {g} vs {w}");
        }
        _ => assert_eq!(got, want, "{at}"),
    }
}

/// A gateway serving the given fixtures as `models:/<fixture>/1`.
async fn serve(fixtures: &[&str]) -> TestGateway {
    let work = temp_dir("onnx");
    let store = Store::new(work.join("store"));
    let mut config = format!("[store]\npath = \"{}\"\n", work.join("store").display());
    for name in fixtures {
        let path = fixture(&format!("{name}.onnx"));
        let signature = OnnxModel::load(&path).unwrap().signature();
        let logged = store.log_onnx(&path, name, signature, &[]).unwrap();
        assert_eq!(logged.version.uri(), format!("models:/{name}/1"));
        config.push_str(&format!(
            "[[endpoints]]\nname = \"{name}\"\nmodel = \"models:/{name}/1\"\n"
        ));
    }
    TestGateway::start(&config).await
}

/// The request bodies, one per MLflow format, that carry `inputs` (input name → rows).
fn every_format(inputs: &serde_json::Map<String, Value>) -> Vec<Value> {
    let rows_of = |name: &str| inputs[name].as_array().unwrap().clone();
    let count = inputs.values().next().unwrap().as_array().unwrap().len();
    if let [(name, rows)] = &inputs.iter().collect::<Vec<_>>()[..] {
        // One input: the columns are the row, in order.
        let width = rows[0].as_array().unwrap().len();
        let columns: Vec<String> = (0..width).map(|i| format!("f{i}")).collect();
        // Records name the columns by position, here written last to first: JSON objects keep
        // no key order, and none is read from them.
        let records: Vec<Value> = rows_of(name)
            .iter()
            .map(|row| {
                let cells = row.as_array().unwrap().iter().cloned().enumerate().rev();
                Value::Object(cells.map(|(i, cell)| (i.to_string(), cell)).collect())
            })
            .collect();
        return vec![
            json!({"inputs": rows}),
            json!({"inputs": {*name: rows}}),
            json!({"instances": rows}),
            json!({"dataframe_split": {"columns": columns, "data": rows}}),
            json!({"dataframe_records": records}),
        ];
    }
    // One input per column ([N, 1] each): columns by name, here in reverse order.
    let names: Vec<&String> = inputs.keys().rev().collect();
    let cell = |name: &str, i: usize| rows_of(name)[i][0].clone();
    let data: Vec<Value> = (0..count)
        .map(|i| Value::Array(names.iter().map(|n| cell(n, i)).collect()))
        .collect();
    let records: Vec<Value> = (0..count)
        .map(|i| Value::Object(names.iter().map(|n| ((*n).clone(), cell(n, i))).collect()))
        .collect();
    let instances: Vec<Value> = (0..count)
        .map(|i| {
            Value::Object(
                names
                    .iter()
                    .map(|n| ((*n).clone(), rows_of(n)[i].clone()))
                    .collect(),
            )
        })
        .collect();
    vec![
        json!({"inputs": inputs}),
        json!({"instances": instances}),
        json!({"dataframe_split": {"columns": names, "data": data}}),
        json!({"dataframe_records": records}),
    ]
}

/// A `dataframe_split` body as MLflow's other content type, `text/csv`: a header row, then a
/// line per row (strings quoted, missing values empty).
fn as_csv(body: &Value) -> Option<String> {
    let frame = body.get("dataframe_split")?;
    let cell = |value: &Value| match value {
        Value::String(text) => format!("\"{}\"", text.replace('"', "\"\"")),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    let line = |values: &Vec<Value>| values.iter().map(cell).collect::<Vec<_>>().join(",");
    let mut csv = line(frame["columns"].as_array()?);
    for row in frame["data"].as_array()? {
        csv.push('\n');
        csv.push_str(&line(row.as_array()?));
    }
    Some(csv)
}

/// Every fixture (`*.expected.json`), every case, every request format (and the
/// `dataframe_split` ones again as CSV): the gateway's answer equals onnxruntime's (labels
/// equal, floats within 1e-5).
#[tokio::test]
async fn predictions_through_the_gateway_equal_onnxruntimes_in_every_format() {
    let mut models: Vec<String> = std::fs::read_dir(fixture(""))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".expected.json").map(str::to_owned)
        })
        .collect();
    models.sort();
    assert!(models.len() >= 24, "{models:?}");
    let names: Vec<&str> = models.iter().map(String::as_str).collect();
    let gateway = serve(&names).await;
    for name in &names {
        let expected = expected(name);
        for case in expected["cases"].as_array().unwrap() {
            for body in every_format(case["inputs"].as_object().unwrap()) {
                let response = gateway
                    .post(&format!("/endpoints/{name}/invocations"), &body)
                    .await;
                assert_eq!(response.status(), 200, "{name} {body}");
                let got: Value = response.json().await.unwrap();
                assert_close(
                    &format!("{name}/{}", case["name"]),
                    &got["predictions"],
                    &case["outputs"],
                );
                let Some(csv) = as_csv(&body) else {
                    continue;
                };
                let response = gateway
                    .client
                    .post(gateway.url(&format!("/endpoints/{name}/invocations")))
                    .header("content-type", "text/csv; charset=utf-8")
                    .body(csv.clone())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200, "{name} {csv}");
                let got: Value = response.json().await.unwrap();
                assert_close(
                    &format!("{name}/{} as CSV", case["name"]),
                    &got["predictions"],
                    &case["outputs"],
                );
            }
        }
    }
}

/// A batch of over 256 KiB is read, run and answered on a blocking thread (so that parsing it
/// does not stall the event loop): the same answers as a small one, the same errors.
#[tokio::test]
async fn a_large_batch_is_answered_like_a_small_one() {
    let gateway = serve(&["logreg_zipmap", "multi_input"]).await;
    for name in ["logreg_zipmap", "multi_input"] {
        let case = &expected(name)["cases"][0];
        let repeat = |rows: &Value, times: usize| -> Value {
            let rows = rows.as_array().unwrap();
            Value::Array(
                rows.iter()
                    .cycle()
                    .take(rows.len() * times)
                    .cloned()
                    .collect(),
            )
        };
        let times = 1000;
        let inputs: serde_json::Map<String, Value> = case["inputs"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(input, rows)| (input.clone(), repeat(rows, times)))
            .collect();
        let outputs: serde_json::Map<String, Value> = case["outputs"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(output, rows)| (output.clone(), repeat(rows, times)))
            .collect();
        let body = json!({"inputs": inputs});
        assert!(body.to_string().len() > 256 * 1024, "{name}: a large body");
        let url = format!("/endpoints/{name}/invocations");
        let response = gateway.post(&url, &body).await;
        assert_eq!(response.status(), 200, "{name}");
        let got: Value = response.json().await.unwrap();
        assert_close(name, &got["predictions"], &Value::Object(outputs));

        // A bad value deep in it, and a body cut short: the errors of a small batch.
        let mut bad = inputs.clone();
        let rows = bad.values_mut().next().unwrap().as_array_mut().unwrap();
        let last = rows.len() - 1;
        rows[last] = json!({"not": "a row"});
        let response = gateway.post(&url, &json!({"inputs": bad})).await;
        assert_eq!(response.status(), 400, "{name}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error_code"], "INVALID_PARAMETER_VALUE", "{error}");
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains(&format!("row {last}")),
            "{error}"
        );
        let text = body.to_string();
        let cut = gateway
            .client
            .post(gateway.url(&url))
            .header("content-type", "application/json")
            .body(text[..text.len() - 10].to_owned())
            .send()
            .await
            .unwrap();
        assert_eq!(cut.status(), 400, "{name}");
        let error: Value = cut.json().await.unwrap();
        assert_eq!(error["error_code"], "BAD_REQUEST", "{error}");
    }
}

#[tokio::test]
async fn bad_input_is_a_400_in_mlflows_shape_and_the_model_keeps_serving() {
    let gateway = serve(&["logreg"]).await;
    let url = "/endpoints/logreg/invocations";
    // To MLflow's deployments client, a model endpoint is a type of its own at the same URL.
    let described: Value = gateway.get_json("/api/2.0/endpoints/logreg").await;
    assert_eq!(described["endpoint_type"], "model/v1/predict");
    assert_eq!(described["endpoint_url"], url);
    for (body, says) in [
        (
            json!({"inputs": [[1.0, 2.0, 3.0]]}),
            "row 0 has 3 values: input 'input' expects float32 rows of shape [-1, 4]",
        ),
        (
            json!({"inputs": [[1.0, 2.0, "x", 4.0]]}),
            "row 0, column 2 is not a number",
        ),
        (
            json!({"inputs": [[1, 2, 3, 4]], "instances": [[1, 2, 3, 4]]}),
            "exactly one of",
        ),
        (
            json!({"rows": [[1, 2, 3, 4]]}),
            "it has none (its keys: rows)",
        ),
        (json!({}), "it has none"),
        (
            json!({"dataframe_records": [{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}]}),
            "JSON objects do not keep the order of their keys",
        ),
    ] {
        let response = gateway.post(url, &body).await;
        assert_eq!(response.status(), 400, "{body}");
        let error: Value = response.json().await.unwrap();
        assert!(
            ["INVALID_PARAMETER_VALUE", "BAD_REQUEST"]
                .contains(&error["error_code"].as_str().unwrap()),
            "{error}"
        );
        assert!(error["message"].as_str().unwrap().contains(says), "{error}");
    }
    let not_json = gateway
        .client
        .post(gateway.url(url))
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), 400);
    // Python's bare NaN, as MLflow's own helpers write it, is a missing value.
    let python = gateway
        .client
        .post(gateway.url(url))
        .body(r#"{"inputs": [[NaN, 3.5, 1.4, 0.2]]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(python.status(), 200);
    let python: Value = python.json().await.unwrap();
    let null = gateway
        .post(url, &json!({"inputs": [[null, 3.5, 1.4, 0.2]]}))
        .await;
    let null: Value = null.json().await.unwrap();
    assert_eq!(python, null);
    let empty = gateway.client.post(gateway.url(url)).send().await.unwrap();
    assert_eq!(empty.status(), 400);
    // MLflow's scoring protocol takes JSON and CSV; anything else is a 415 before the body is
    // read, and CSV that is no table a 400.
    let post_as = |content_type: &'static str, body: &'static str| {
        gateway
            .client
            .post(gateway.url(url))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let form = post_as("application/x-www-form-urlencoded", "a=1")
        .await
        .unwrap();
    assert_eq!(form.status(), 415);
    let error: Value = form.json().await.unwrap();
    assert_eq!(error["error_code"], "BAD_REQUEST");
    assert_eq!(
        error["message"],
        "endpoint 'logreg' takes application/json or text/csv, not application/x-www-form-urlencoded"
    );
    let ragged = post_as("text/csv", "a,b,c,d\n1,2,3,4\n5,6,7,8,9\n")
        .await
        .unwrap();
    assert_eq!(ragged.status(), 400);
    let error: Value = ragged.json().await.unwrap();
    assert_eq!(
        error["message"],
        "the CSV body cannot be read: row 2 has 5 fields, the header names 4"
    );
    // Errors name the CSV body, not the `dataframe_split` request it is read as.
    let narrow = post_as("text/csv", "a,b,c\n1,2,3\n").await.unwrap();
    assert_eq!(narrow.status(), 400);
    let error: Value = narrow.json().await.unwrap();
    let message = error["message"].as_str().unwrap();
    assert!(
        message.starts_with("the CSV body has 3 columns"),
        "{message}"
    );
    // A short row is padded with missing values, as pandas pads it with NaN (and onnxruntime
    // answers NaN probabilities for it: null in JSON).
    let short = post_as("text/csv", "a,b,c,d\n5,6\n").await.unwrap();
    assert_eq!(short.status(), 200);
    let answer: Value = short.json().await.unwrap();
    assert_eq!(
        answer["predictions"]["probabilities"],
        json!([[null, null, null]])
    );

    let none = gateway.post(url, &json!({"inputs": []})).await;
    assert_eq!(none.status(), 200);
    assert_eq!(
        none.json::<Value>().await.unwrap(),
        json!({"predictions": {"label": [], "probabilities": []}})
    );

    let chat = gateway
        .post(
            "/v1/chat/completions",
            &json!({"model": "logreg", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(chat.status(), 400);
    assert!(chat.text().await.unwrap().contains("serves an ONNX model"));

    let ok = gateway
        .post(url, &json!({"inputs": [[5.1, 3.5, 1.4, 0.2]]}))
        .await;
    assert_eq!(
        ok.json::<Value>().await.unwrap()["predictions"]["label"],
        json!([0])
    );
    let admin = gateway.get_json("/admin/endpoints").await;
    assert_eq!(admin["endpoints"][0]["kind"], "model");
    assert_eq!(
        admin["endpoints"][0]["inputs"],
        json!([{"name": "input", "dtype": "float32", "shape": [-1, 4]}])
    );
    assert_eq!(admin["endpoints"][0]["resolved"], "models:/logreg/1");

    // Metrics name the endpoint for every request its path or body named, refused ones too
    // (the 415 and the unparsable bodies above), with the model kind.
    let metrics = gateway.metrics().await;
    assert!(
        metrics
            .contains(r#"switchyard_requests_total{endpoint="logreg",kind="model",status="4xx"}"#),
        "{metrics}"
    );
    assert!(
        !metrics.contains(r#"switchyard_requests_total{endpoint="""#),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"switchyard_endpoint_info{endpoint="logreg",kind="model",model="models:/logreg/1""#
        ),
        "{metrics}"
    );
}

#[test]
fn the_cli_logs_onnx_files_and_refuses_models_it_cannot_run() {
    let work = temp_dir("onnx-cli");
    let store = work.join("store");
    let run = |args: &[&str]| switchyard(&store, args);
    let logged = run(&[
        "log",
        "onnx",
        fixture("ridge.onnx").to_str().unwrap(),
        "--name",
        "ridge",
        "--alias",
        "production",
    ]);
    assert_eq!(stdout(&logged), "models:/ridge/1\n");
    let shown = run(&["models", "show", "models:/ridge@production"]);
    let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
    assert!(
        shown.contains("loader_module: mlflow.onnx") && shown.contains("data: model.onnx"),
        "{shown}"
    );
    // The signature comes from the graph, outputs included: MLflow refuses specs without
    // `tensor-spec` (mlflow.pyfunc.load_model of such a version was checked by hand to predict).
    assert!(
        shown.contains(r#"{"type":"tensor","name":"variable","tensor-spec":{"dtype":"float32","shape":[-1,1]}}"#),
        "{shown}"
    );
    assert!(
        shown.ends_with("# files: intact (content_sha256 matches)\n"),
        "{shown}"
    );

    // An MLflow model directory imports as is: its files and MLmodel keys are kept.
    let imported = run(&[
        "log",
        "onnx",
        fixture("mlflow_iris_pipeline").to_str().unwrap(),
        "--name",
        "pipeline",
    ]);
    stdout(&imported);
    let version = work.join("store/models/pipeline/1");
    for file in [
        "model.onnx",
        "conda.yaml",
        "python_env.yaml",
        "requirements.txt",
    ] {
        assert_eq!(
            std::fs::read(version.join(file)).unwrap(),
            std::fs::read(fixture("mlflow_iris_pipeline").join(file)).unwrap(),
            "{file}"
        );
    }
    let mlmodel = std::fs::read_to_string(version.join("MLmodel")).unwrap();
    for kept in [
        "mlflow_version: 3.17.2",
        "model_uuid: '00000000000000000000000000000000'",
        "virtualenv: python_env.yaml",
        "- CUDAExecutionProvider",
        "content_sha256:",
    ] {
        assert!(mlmodel.contains(kept), "{kept} in {mlmodel}");
    }

    // Restored, a version is an MLflow model directory again: the same files, and logging it
    // back is the same content.
    let restored = work.join("restored");
    let restore = run(&[
        "models",
        "restore",
        "models:/pipeline/1",
        restored.to_str().unwrap(),
    ]);
    assert_eq!(
        stdout(&restore),
        format!("restored models:/pipeline/1 into {}\n", restored.display())
    );
    for file in [
        "MLmodel",
        "model.onnx",
        "conda.yaml",
        "python_env.yaml",
        "requirements.txt",
    ] {
        assert_eq!(
            std::fs::read(restored.join(file)).unwrap(),
            std::fs::read(version.join(file)).unwrap(),
            "{file}"
        );
    }
    let relogged = run(&[
        "log",
        "onnx",
        restored.to_str().unwrap(),
        "--name",
        "pipeline",
    ]);
    assert_eq!(stdout(&relogged), "models:/pipeline/1\n");

    // One prediction without a server, by URI, equals onnxruntime's.
    let expected = expected("scaler_logreg");
    let case = &expected["cases"][0];
    let body = json!({"inputs": case["inputs"]["input"]}).to_string();
    let predicted = run(&["predict", "models:/pipeline/1", "--input", &body]);
    let got: Value = serde_json::from_str(&stdout(&predicted)).unwrap();
    assert_close("predict", &got["predictions"], &case["outputs"]);
    // By endpoint name, from a production config whose secrets are not set here: a prediction
    // uses none of them.
    let config = work.join("production.toml");
    std::fs::write(
        &config,
        r#"
        [auth]
        admin_key = "${SWITCHYARD_TEST_UNSET_ADMIN_KEY}"
        [limits_store]
        kind = "redis"
        url = "${SWITCHYARD_TEST_UNSET_REDIS_URL}"
        on_error = "deny"
        [providers.openai]
        kind = "openai"
        base_url = "https://api.openai.com/v1"
        api_key = "${SWITCHYARD_TEST_UNSET_OPENAI_KEY}"
        [routes.chat]
        targets = [{ provider = "openai", model = "gpt-4o-mini" }]
        [[endpoints]]
        name = "chat"
        route = "chat"
        [[endpoints]]
        name = "iris"
        model = "models:/pipeline/1"
        "#,
    )
    .unwrap();
    let by_endpoint = run(&[
        "predict",
        "iris",
        "--config",
        config.to_str().unwrap(),
        "--input",
        &body,
    ]);
    let got: Value = serde_json::from_str(&stdout(&by_endpoint)).unwrap();
    assert_close("predict --config", &got["predictions"], &case["outputs"]);
    let bad = run(&[
        "predict",
        "models:/pipeline/1",
        "--input",
        r#"{"inputs": [[1, 2]]}"#,
    ]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr)
            .contains("row 0 has 2 values: input 'input' expects float32 rows of shape [-1, 4]"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    // A file that is not a model is refused with the reason, and nothing is written.
    let refused = run(&[
        "log",
        "onnx",
        fixture("README.md").to_str().unwrap(),
        "--name",
        "notamodel",
    ]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("cannot load the ONNX model"));
    let listed = run(&["models", "list"]);
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout),
        "pipeline\tversions: 1\taliases: \nridge\tversions: 1\taliases: production=1\n"
    );
}

#[test]
fn a_model_file_with_external_data_is_logged_with_its_data() {
    // The tensors of a model saved with external data live in files next to it: logged
    // without them, the version could not be loaded, restored or served.
    let work = temp_dir("onnx-external");
    let store = work.join("store");
    let run = |args: &[&str]| switchyard(&store, args);
    let source = fixture("external_data");
    let model = source.join("mlp_clf.onnx");
    let logged = run(&["log", "onnx", model.to_str().unwrap(), "--name", "mlp"]);
    assert_eq!(stdout(&logged), "models:/mlp/1\n");
    let version = work.join("store/models/mlp/1");
    assert_eq!(
        std::fs::read(version.join("mlp_clf.weights")).unwrap(),
        std::fs::read(source.join("mlp_clf.weights")).unwrap()
    );
    let mlmodel = switchyard_store::MlModel::read(&version.join("MLmodel")).unwrap();
    assert_eq!(
        mlmodel.metadata["source"].as_str(),
        Some(model.to_str().unwrap())
    );

    let expected = fixture_json("external_data/expected.json");
    let body = json!({"inputs": expected["inputs"]["input"]}).to_string();
    let predicted = run(&["predict", "models:/mlp/1", "--input", &body]);
    let got: Value = serde_json::from_str(&stdout(&predicted)).unwrap();
    assert_close("predict", &got["predictions"], &expected["outputs"]);

    let restored = work.join("restored");
    stdout(&run(&[
        "models",
        "restore",
        "models:/mlp/1",
        restored.to_str().unwrap(),
    ]));
    assert!(restored.join("mlp_clf.weights").is_file());

    // The data file is part of the version's content: changed, the version is refused.
    std::fs::write(version.join("mlp_clf.weights"), [0u8; 268]).unwrap();
    let tampered = run(&["predict", "models:/mlp/1", "--input", &body]);
    assert!(!tampered.status.success());
    let stderr = String::from_utf8_lossy(&tampered.stderr);
    assert!(stderr.contains("content_sha256"), "{stderr}");
}

/// Every request the fixtures recorded against MLflow 3.17.2's scoring server
/// (`<name>.expected_invocations.json`, made by generate.py), replayed through the gateway.
/// Where MLflow answers 200, so do we, with the same predictions. Where MLflow refuses, we refuse
/// too, except for requests we deliberately accept (each listed with why) — and those must then
/// give the right predictions.
#[tokio::test]
async fn requests_recorded_against_mlflow_get_the_same_answers() {
    // (invocations file, section, the fixture we serve for it)
    let replays = [
        ("multi_input", "signature_inferred", "multi_input"),
        (
            "scaler_logreg_zipmap",
            "signature_inferred",
            "scaler_logreg_zipmap",
        ),
        (
            "scaler_logreg_zipmap",
            "signature_tensor_outputs",
            "scaler_logreg_zipmap",
        ),
        (
            "mlflow_iris_pipeline",
            "signature_named_input",
            "scaler_logreg",
        ),
        (
            "mlflow_iris_pipeline",
            "signature_unnamed_tensor",
            "scaler_logreg",
        ),
    ];
    // MLflow refuses these, we accept them.
    let lenient = [
        // One-input models: dataframe columns are the row in order, whatever their names (MLflow
        // does this only when the signature's tensor is unnamed).
        "dataframe_split",
        "dataframe_records",
        // A zero-row batch gets zero-row outputs (MLflow: a shape error).
        "empty_inputs",
        // An [N, 1] input may be sent as a flat list of N values.
        "inputs_named_1d",
        // `instances` as a list of objects keyed by input name (TF-serving's row format), which
        // MLflow parses but then fails on.
        "instances_records",
        // `inputs` as an object keyed by input name also for an unnamed-signature model.
        "inputs_named",
    ];
    let gateway = serve(&["multi_input", "scaler_logreg_zipmap", "scaler_logreg"]).await;
    for (file, section, model) in replays {
        let recorded = fixture_json(&format!("{file}.expected_invocations.json"));
        let cases = recorded[section]
            .get("invocations")
            .unwrap_or(&recorded[section]);
        let full_batch = &cases[0]["response"]["predictions"];
        assert_eq!(cases[0]["status"], 200, "{file}/{section}: first case");
        for case in cases.as_array().unwrap() {
            let format = case["format"].as_str().unwrap();
            let at = format!("{file}/{section}/{format}");
            let response = gateway
                .post(&format!("/endpoints/{model}/invocations"), &case["request"])
                .await;
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            if case["status"] == 200 {
                assert_eq!(status, 200, "{at}: {body}");
                assert_close(&at, &body["predictions"], &case["response"]["predictions"]);
            } else if lenient.contains(&format) {
                assert_eq!(status, 200, "{at}: {body}");
                let want = if format == "empty_inputs" {
                    let empty: serde_json::Map<String, Value> = full_batch
                        .as_object()
                        .unwrap()
                        .keys()
                        .map(|k| (k.clone(), json!([])))
                        .collect();
                    Value::Object(empty)
                } else {
                    full_batch.clone()
                };
                assert_close(&at, &body["predictions"], &want);
            } else {
                assert_eq!(status, 400, "{at}: {body}");
                assert_eq!(body["error_code"], "INVALID_PARAMETER_VALUE", "{at}");
            }
        }
    }
}
