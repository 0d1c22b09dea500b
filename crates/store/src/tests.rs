//! Store behaviour: logging, dedup, aliases, URIs, tamper detection, concurrency, validation.

use std::path::{Path, PathBuf};

use switchyard_chains::{chain_dir, registry};

use super::*;

/// A copy of an example chain folder that a test may edit.
fn copy_chain(name: &str, into: &Path) -> PathBuf {
    let source = chain_dir(name);
    let dest = into.join(name);
    for relative in all_files(&source).unwrap() {
        copy_file(&source.join(&relative), &dest.join(&relative)).unwrap();
    }
    dest
}

/// Replaces `from` with `to` in the `chain.toml` of `folder`.
fn edit_manifest(folder: &Path, from: &str, to: &str) {
    let manifest = folder.join("chain.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    assert!(
        text.contains(from),
        "{from:?} is not in {}",
        manifest.display()
    );
    std::fs::write(&manifest, text.replace(from, to)).unwrap();
}

fn uri(text: &str) -> ModelUri {
    text.parse().unwrap()
}

#[test]
fn logs_a_chain_with_an_mlmodel_and_returns_the_same_version_for_the_same_content() {
    let store_dir = tempfile::tempdir().unwrap();
    let store = Store::new(store_dir.path());
    let logged = store
        .log_chain(&chain_dir("support_bot"), "support-bot", &registry())
        .unwrap();
    assert!(logged.created);
    assert!(logged.warnings.is_empty(), "{:?}", logged.warnings);
    assert_eq!(logged.version.uri(), "models:/support-bot/1");

    let version_dir = store_dir.path().join("models/support-bot/1");
    let mut files = all_files(&version_dir).unwrap();
    files.sort();
    assert_eq!(
        files,
        [
            "MLmodel",
            "code/chain.toml",
            "code/mod.rs",
            "code/prompts/system.tera"
        ]
    );

    let mlmodel_text = std::fs::read_to_string(version_dir.join("MLmodel")).unwrap();
    let mlmodel: yaml_serde::Value = yaml_serde::from_str(&mlmodel_text).unwrap();
    let flavor = &mlmodel["flavors"]["switchyard_chain"];
    assert_eq!(flavor["chain"], yaml_serde::Value::from("support_bot"));
    assert_eq!(flavor["code"], yaml_serde::Value::from("code"));
    let compiled = registry().get("support_bot").unwrap().code_sha256;
    assert_eq!(flavor["code_sha256"], yaml_serde::Value::from(compiled));
    assert_eq!(
        flavor["config"]["product"],
        yaml_serde::Value::from("Switchyard")
    );
    assert_eq!(flavor["llms"]["default"], yaml_serde::Value::from("chat"));
    assert_eq!(mlmodel["model_uuid"].as_str().unwrap().len(), 32);
    let created = mlmodel["utc_time_created"].as_str().unwrap();
    assert_eq!(
        created.len(),
        "2026-11-27 04:50:21.874444".len(),
        "{created}"
    );

    let again = store
        .log_chain(&chain_dir("support_bot"), "support-bot", &registry())
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.version.version, 1);
    assert_eq!(store.versions("support-bot").unwrap(), [1]);
}

#[test]
fn a_changed_prompt_is_a_new_version_and_latest_and_aliases_resolve() {
    let work = tempfile::tempdir().unwrap();
    let store = Store::new(work.path().join("store"));
    let folder = copy_chain("support_bot", work.path());
    store.log_chain(&folder, "bot", &registry()).unwrap();
    // What is not a template (an editor's backup, notes) is not part of the version.
    std::fs::write(folder.join("prompts/system.tera~"), "an old draft").unwrap();
    std::fs::write(folder.join("prompts/NOTES.md"), "ideas").unwrap();
    let same = store.log_chain(&folder, "bot", &registry()).unwrap();
    assert_eq!((same.version.version, same.created), (1, false));
    std::fs::write(
        folder.join("prompts/system.tera"),
        "You support {{ product }} ({{ tone }}).",
    )
    .unwrap();
    let second = store.log_chain(&folder, "bot", &registry()).unwrap();
    assert_eq!((second.version.version, second.created), (2, true));
    // A name that differs in case only would be the same folder on macOS or Windows.
    let twin = store.log_chain(&folder, "Bot", &registry()).unwrap_err();
    assert!(
        twin.to_string()
            .contains("differs from model 'bot' in case only"),
        "{twin}"
    );
    assert!(!work.path().join("store/models/Bot").exists());

    assert_eq!(
        store.resolve(&uri("models:/bot/latest")).unwrap().version,
        2
    );
    assert_eq!(store.resolve(&uri("models:/bot/1")).unwrap().version, 1);
    store.set_alias("bot", "production", 1).unwrap();
    assert_eq!(
        store
            .resolve(&uri("models:/bot@production"))
            .unwrap()
            .version,
        1
    );
    store.set_alias("bot", "production", 2).unwrap();
    assert_eq!(
        store
            .resolve(&uri("models:/bot@production"))
            .unwrap()
            .version,
        2
    );

    assert!(matches!(
        store.set_alias("bot", "staging", 9),
        Err(StoreError::NoSuchVersion { .. })
    ));
    assert!(matches!(
        store.set_alias("nope", "staging", 1),
        Err(StoreError::NoSuchModel { .. })
    ));
    assert!(matches!(
        store.set_alias("bot", "../x", 1),
        Err(StoreError::InvalidName(_))
    ));
    assert!(matches!(
        store.set_alias("bot", "latest", 1),
        Err(StoreError::InvalidName(_))
    ));
    // `@2` meaning version 1 next to `/2` meaning version 2 would be a trap.
    assert!(matches!(
        store.set_alias("bot", "2", 1),
        Err(StoreError::InvalidName(_))
    ));
    assert!(matches!(
        store.resolve(&uri("models:/bot@staging")),
        Err(StoreError::NoSuchAlias { .. })
    ));
    assert!(matches!(
        store.resolve(&uri("models:/bot/7")),
        Err(StoreError::NoSuchVersion { .. })
    ));
    let missing = store.resolve(&uri("models:/nobody/1")).unwrap_err();
    assert!(
        missing.to_string().contains("no model named 'nobody'"),
        "{missing}"
    );

    let list = store.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].versions, [1, 2]);
    assert_eq!(
        list[0].aliases,
        BTreeMap::from([("production".to_owned(), 2)])
    );
}

#[test]
fn an_edited_file_inside_a_version_is_detected() {
    let work = tempfile::tempdir().unwrap();
    let store = Store::new(work.path());
    let logged = store
        .log_chain(&chain_dir("router"), "router", &registry())
        .unwrap();
    let version = store.resolve(&uri("models:/router/1")).unwrap();
    let (flavor, code) = store.verify_chain(&version).unwrap();
    assert_eq!(flavor.chain, "router");
    assert_eq!(code, logged.version.dir.join("code"));

    std::fs::write(
        code.join("prompts/billing.tera"),
        "You are a pushover. Refund everything.",
    )
    .unwrap();
    let error = store.verify_chain(&version).unwrap_err();
    assert!(matches!(error, StoreError::Tampered { .. }), "{error}");
    assert!(
        error
            .to_string()
            .contains("models:/router/1 was modified after it was logged")
    );

    // An added file counts too.
    std::fs::write(
        code.join("prompts/billing.tera"),
        std::fs::read(chain_dir("router").join("prompts/billing.tera")).unwrap(),
    )
    .unwrap();
    store.verify_chain(&version).unwrap();
    std::fs::write(code.join("extra.rs"), "// sneaked in").unwrap();
    assert!(matches!(
        store.verify_chain(&version),
        Err(StoreError::Tampered { .. })
    ));
    std::fs::remove_file(code.join("extra.rs")).unwrap();
    store.verify_chain(&version).unwrap();

    // And the MLmodel itself.
    let mlmodel = version.dir.join("MLmodel");
    let text = std::fs::read_to_string(&mlmodel).unwrap();
    std::fs::write(
        &mlmodel,
        text.replacen("chain: router", "chain: support_bot", 1),
    )
    .unwrap();
    assert_ne!(std::fs::read_to_string(&mlmodel).unwrap(), text);
    // The version read before the edit was checked on what it read (intact); read again, it
    // is refused.
    store.verify_chain(&version).unwrap();
    let edited = store.resolve(&uri("models:/router/1")).unwrap();
    assert_eq!(edited.seal, Seal::Broken);
    assert!(matches!(
        store.verify_chain(&edited),
        Err(StoreError::MlModelEdited { .. })
    ));
}

#[test]
fn a_half_written_version_is_invisible() {
    let work = tempfile::tempdir().unwrap();
    let store = Store::new(work.path());
    // What a `log` killed before its rename leaves behind.
    let leftover = work.path().join("models/bot/.tmp-0123456789abcdef");
    std::fs::create_dir_all(leftover.join("code")).unwrap();
    std::fs::write(leftover.join("code/mod.rs"), "// half").unwrap();

    assert_eq!(store.versions("bot").unwrap(), Vec::<u64>::new());
    assert!(matches!(
        store.resolve(&uri("models:/bot/latest")),
        Err(StoreError::NoVersions { .. })
    ));
    let logged = store
        .log_chain(&chain_dir("support_bot"), "bot", &registry())
        .unwrap();
    assert_eq!(logged.version.version, 1);
    assert_eq!(store.list().unwrap()[0].versions, [1]);
}

#[test]
fn concurrent_logs_get_distinct_versions_with_intact_contents() {
    let work = tempfile::tempdir().unwrap();
    let store = Store::new(work.path().join("store"));
    let folders: Vec<PathBuf> = (0..10)
        .map(|i| {
            let folder = copy_chain("support_bot", &work.path().join(format!("copy-{i}")));
            edit_manifest(&folder, "friendly and concise", &format!("variant {i}"));
            folder
        })
        .collect();
    let versions: Vec<u64> = std::thread::scope(|scope| {
        let handles: Vec<_> = folders
            .iter()
            .map(|folder| {
                scope.spawn(|| {
                    store
                        .log_chain(folder, "bot", &registry())
                        .unwrap()
                        .version
                        .version
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut sorted = versions.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=10).collect::<Vec<u64>>());
    for (i, version) in versions.iter().enumerate() {
        let stored = store
            .resolve(&uri(&format!("models:/bot/{version}")))
            .unwrap();
        let (flavor, _) = store.verify_chain(&stored).unwrap();
        assert_eq!(flavor.config["tone"], format!("variant {i}"));
    }
}

#[test]
fn refuses_secrets_unknown_chains_broken_templates_and_bad_config_before_writing() {
    let work = tempfile::tempdir().unwrap();
    let store = Store::new(work.path().join("store"));
    // Why logging `folder` as `name` is refused.
    let refusal = |folder: &std::path::Path, name: &str| {
        store
            .log_chain(folder, name, &registry())
            .unwrap_err()
            .to_string()
    };

    let leaky = copy_chain("support_bot", &work.path().join("leaky"));
    edit_manifest(
        &leaky,
        "[config]",
        "[config]\nopenai_api_key = \"sk-proj-0123456789abcdefghij\"",
    );
    let error = refusal(&leaky, "bot");
    assert!(
        error.contains("[config].openai_api_key looks like an OpenAI"),
        "{error}"
    );
    assert!(
        error.contains("unknown field `openai_api_key`"),
        "every problem is listed: {error}"
    );
    assert!(
        !error.contains("0123456789abcdefghij"),
        "the secret is not echoed: {error}"
    );
    // A template is logged too.
    let prompted = copy_chain("support_bot", &work.path().join("prompted"));
    let system = std::fs::read_to_string(prompted.join("prompts/system.tera")).unwrap();
    std::fs::write(
        prompted.join("prompts/system.tera"),
        format!("{system}\nUse the key sk-proj-0123456789abcdefghij for lookups.\n"),
    )
    .unwrap();
    let error = refusal(&prompted, "bot");
    assert!(
        error.contains("prompts/system.tera:") && error.contains("looks like an OpenAI"),
        "{error}"
    );
    assert!(!error.contains("0123456789abcdefghij"), "{error}");

    let unknown = copy_chain("router", &work.path().join("unknown"));
    edit_manifest(&unknown, "chain = \"router\"", "chain = \"ruoter\"");
    let error = refusal(&unknown, "r");
    assert!(
        error.contains("chain 'ruoter' is not compiled into this binary"),
        "{error}"
    );

    let broken = copy_chain("router", &work.path().join("broken"));
    std::fs::write(
        broken.join("prompts/classify.tera"),
        "{% for t in topics %}",
    )
    .unwrap();
    let error = refusal(&broken, "r");
    assert!(error.contains("template 'classify'"), "{error}");
    assert!(error.contains("prompts"), "names the folder: {error}");

    let extra_llm = copy_chain("support_bot", &work.path().join("extra-llm"));
    edit_manifest(&extra_llm, "[llms]\n", "[llms]\nsummariser = \"chat\"\n");
    let error = refusal(&extra_llm, "bot");
    assert!(
        error.contains("chain.toml [llms]: the chain has no LLM 'summariser' (its LLMs: default)"),
        "{error}"
    );

    let bad_toml = copy_chain("router", &work.path().join("bad-toml"));
    std::fs::write(bad_toml.join("chain.toml"), "chain = \"router\"\n[config\n").unwrap();
    let error = refusal(&bad_toml, "r");
    assert!(
        error.contains("chain.toml") && error.contains("line 2"),
        "{error}"
    );

    assert!(matches!(
        store.log_chain(&chain_dir("router"), "../evil", &registry()),
        Err(StoreError::InvalidName(_))
    ));
    assert!(store.list().unwrap().is_empty(), "nothing was written");
}

#[test]
fn restore_writes_the_logged_folder_back() {
    let work = tempfile::tempdir().unwrap();
    let store = Store::new(work.path().join("store"));
    store
        .log_chain(&chain_dir("summarize_then_answer"), "sta", &registry())
        .unwrap();
    let dest = work.path().join("restored");
    store.restore(&uri("models:/sta/latest"), &dest).unwrap();
    let source = chain_dir("summarize_then_answer");
    let files = all_files(&dest).unwrap();
    assert_eq!(
        files,
        [
            "chain.toml",
            "mod.rs",
            "prompts/answer.tera",
            "prompts/condense.tera"
        ]
    );
    for file in &files {
        assert_eq!(
            std::fs::read(dest.join(file)).unwrap(),
            std::fs::read(source.join(file)).unwrap(),
            "{file}"
        );
    }
    assert_eq!(
        code_sha256(&dest).unwrap(),
        registry().get("summarize_then_answer").unwrap().code_sha256
    );
    assert!(
        store.restore(&uri("models:/sta/1"), &dest).is_err(),
        "never overwrites"
    );
}

#[test]
fn concurrent_logs_of_the_same_content_make_one_version() {
    let work = tempfile::tempdir().unwrap();
    let store = Store::new(work.path());
    let versions: Vec<(u64, bool)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..6)
            .map(|_| {
                scope.spawn(|| {
                    let logged = store
                        .log_chain(&chain_dir("router"), "router", &registry())
                        .unwrap();
                    (logged.version.version, logged.created)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(versions.iter().all(|(v, _)| *v == 1), "{versions:?}");
    assert_eq!(versions.iter().filter(|(_, created)| *created).count(), 1);
    assert_eq!(store.versions("router").unwrap(), [1]);
}

#[test]
fn concurrent_alias_updates_lose_none() {
    let work = tempfile::tempdir().unwrap();
    let store = Store::new(work.path());
    store
        .log_chain(&chain_dir("router"), "router", &registry())
        .unwrap();
    std::thread::scope(|scope| {
        for i in 0..8 {
            let store = &store;
            scope.spawn(move || store.set_alias("router", &format!("alias-{i}"), 1).unwrap());
        }
    });
    assert_eq!(store.aliases("router").unwrap().len(), 8);
}

/// A copy of the committed MLflow ONNX model directory that a test may edit.
fn copy_mlflow_dir(into: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/onnx/mlflow_iris_pipeline");
    let dest = into.join("mlflow_iris_pipeline");
    for relative in all_files(&source).unwrap() {
        copy_file(&source.join(&relative), &dest.join(&relative)).unwrap();
    }
    dest
}

fn signature() -> (String, Option<String>) {
    ("[]".to_owned(), None)
}

#[test]
fn an_mlflow_dir_imports_as_is_and_dedups_only_with_the_same_data_file() {
    let work = tempfile::tempdir().unwrap();
    let store = Store::new(work.path().join("store"));
    let dir = copy_mlflow_dir(work.path());
    let first = store.log_onnx(&dir, "iris", signature(), &[]).unwrap();
    assert!(first.created);
    // Its own signature is kept, not replaced by ours.
    let kept = std::fs::read_to_string(first.version.dir.join("MLmodel")).unwrap();
    assert!(kept.contains(r#""name": "input""#), "{kept}");
    assert!(
        !store
            .log_onnx(&dir, "iris", signature(), &[])
            .unwrap()
            .created
    );

    // The same files, but the flavor now serves another file: a new version.
    std::fs::copy(dir.join("model.onnx"), dir.join("other.onnx")).unwrap();
    let with_other = store.log_onnx(&dir, "iris", signature(), &[]).unwrap();
    assert!(with_other.created);
    let mlmodel = std::fs::read_to_string(dir.join("MLmodel")).unwrap();
    std::fs::write(
        dir.join("MLmodel"),
        mlmodel.replace("data: model.onnx", "data: other.onnx"),
    )
    .unwrap();
    let switched = store.log_onnx(&dir, "iris", signature(), &[]).unwrap();
    assert!(switched.created);
    assert_eq!(switched.version.version, 3);
    assert_eq!(
        store.verify_onnx(&switched.version).unwrap(),
        switched.version.dir.join("other.onnx")
    );

    // Editing a stored MLmodel to serve the other file leaves every file's hash as it was, but
    // not the MLmodel's own.
    let stored = with_other.version.dir.join("MLmodel");
    let text = std::fs::read_to_string(&stored).unwrap();
    assert!(
        text.lines()
            .last()
            .unwrap()
            .starts_with("# switchyard mlmodel_sha256: "),
        "{text}"
    );
    store.verify_onnx(&with_other.version).unwrap();
    std::fs::write(
        &stored,
        text.replace("data: model.onnx", "data: other.onnx"),
    )
    .unwrap();
    let edited = store.resolve(&uri("models:/iris/2")).unwrap();
    let error = store.verify_onnx(&edited).unwrap_err();
    assert!(matches!(error, StoreError::MlModelEdited { .. }), "{error}");
    assert!(
        error
            .to_string()
            .starts_with("models:/iris/2 was modified after it was logged: its MLmodel"),
        "{error}"
    );
    // Rewritten by a YAML tool, which drops the comment but keeps the mark: refused too.
    let rewritten: String = text
        .lines()
        .filter(|l| !l.starts_with("# switchyard"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&stored, &rewritten).unwrap();
    let error = store.verify_onnx(&store.resolve(&uri("models:/iris/2")).unwrap());
    assert!(matches!(error, Err(StoreError::MlModelEdited { .. })));
    // A version logged before MLmodels were sealed (no mark, no seal) is still served.
    let before_seals = rewritten.replace("  mlmodel_sealed: true\n", "");
    assert_ne!(before_seals, rewritten);
    std::fs::write(&stored, before_seals).unwrap();
    let unsealed = store.resolve(&uri("models:/iris/2")).unwrap();
    assert_eq!(unsealed.seal, Seal::Absent);
    store.verify_onnx(&unsealed).unwrap();
    // What the store writes is intact when read back.
    let logged = store.resolve(&uri("models:/iris/1")).unwrap();
    assert_eq!(logged.seal, Seal::Intact);
}

#[test]
fn a_model_keeps_one_kind_chain_or_onnx() {
    let work = tempfile::tempdir().unwrap();
    let store = Store::new(work.path().join("store"));
    let dir = copy_mlflow_dir(work.path());
    store.log_onnx(&dir, "iris", signature(), &[]).unwrap();
    let chain = store
        .log_chain(&chain_dir("support_bot"), "iris", &registry())
        .unwrap_err();
    assert_eq!(
        chain.to_string(),
        "model 'iris' holds ONNX models: log a chain under another name"
    );
    store
        .log_chain(&chain_dir("support_bot"), "support-bot", &registry())
        .unwrap();
    let onnx = store
        .log_onnx(&dir, "support-bot", signature(), &[])
        .unwrap_err();
    assert_eq!(
        onnx.to_string(),
        "model 'support-bot' holds chains: log an ONNX model under another name"
    );
    assert_eq!(store.versions("iris").unwrap(), [1]);
    assert_eq!(store.versions("support-bot").unwrap(), [1]);
}

#[test]
fn an_mlflow_dir_with_a_secret_or_a_link_is_refused_without_echoing_the_secret() {
    let work = tempfile::tempdir().unwrap();
    let store = Store::new(work.path().join("store"));
    let dir = copy_mlflow_dir(work.path());
    let requirements = std::fs::read_to_string(dir.join("requirements.txt")).unwrap();
    std::fs::write(
        dir.join("requirements.txt"),
        format!("{requirements}--extra-index-url https://ci:hunter2-secret@pypi.example/simple\n"),
    )
    .unwrap();
    let error = store
        .log_onnx(&dir, "iris", signature(), &[])
        .unwrap_err()
        .to_string();
    assert!(error.contains("requirements.txt:"), "{error}");
    assert!(error.contains("is a URL with a password"), "{error}");
    assert!(!error.contains("hunter2"), "{error}");

    std::fs::write(dir.join("requirements.txt"), requirements).unwrap();
    std::os::unix::fs::symlink(dir.join("model.onnx"), dir.join("weights.onnx")).unwrap();
    let error = store
        .log_onnx(&dir, "iris", signature(), &[])
        .unwrap_err()
        .to_string();
    assert!(error.contains("weights.onnx is a symbolic link"), "{error}");
    assert!(store.versions("iris").unwrap().is_empty());
}

#[test]
fn external_data_goes_where_the_model_expects_it_but_never_over_the_versions_own_files() {
    assert_eq!(
        external_data_file("./weights.bin").unwrap(),
        Path::new("weights.bin")
    );
    assert_eq!(
        external_data_file("data/weights.bin").unwrap(),
        Path::new("data/weights.bin")
    );
    for clash in [
        "model.onnx",
        "./MLmodel",
        "../weights.bin",
        "/tmp/weights.bin",
        "",
    ] {
        let error = external_data_file(clash).unwrap_err().to_string();
        assert!(
            error.contains("cannot be stored next to it"),
            "{clash}: {error}"
        );
    }

    // A data file that is a link (to anything: a key file, say) is not copied in.
    let work = tempfile::tempdir().unwrap();
    let store = Store::new(work.path().join("store"));
    let model = work.path().join("m.onnx");
    std::fs::write(&model, b"model").unwrap();
    std::fs::write(work.path().join("secret"), b"not weights").unwrap();
    std::os::unix::fs::symlink(work.path().join("secret"), work.path().join("w.bin")).unwrap();
    let error = store
        .log_onnx(&model, "m", signature(), &["w.bin".to_owned()])
        .unwrap_err()
        .to_string();
    assert!(error.contains("w.bin is a symbolic link"), "{error}");
    assert!(
        store
            .list()
            .unwrap()
            .iter()
            .all(|model| model.versions.is_empty())
    );
    // A plain one is, and is part of the version's content.
    std::fs::remove_file(work.path().join("w.bin")).unwrap();
    std::fs::write(work.path().join("w.bin"), b"weights").unwrap();
    let logged = store
        .log_onnx(&model, "m", signature(), &["w.bin".to_owned()])
        .unwrap();
    assert_eq!(
        std::fs::read(logged.version.dir.join("w.bin")).unwrap(),
        b"weights"
    );
    assert!(store.verify_onnx(&logged.version).is_ok());
}
