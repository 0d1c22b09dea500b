//! Logged chains served from the model store: the log → alias → serve → edit → log → alias →
//! reload flow, tamper and code-mismatch refusals, the admin API.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Value, json};
use switchyard_core::code_hash::all_files;
use switchyard_store::Store;

use crate::common::{FakeUpstream, TestGateway, temp_dir};

/// A copy of an example chain folder that a test may edit.
fn copy_chain(name: &str, into: &Path) -> PathBuf {
    let source = switchyard_chains::chain_dir(name);
    let dest = into.join(name);
    for relative in all_files(&source).unwrap() {
        let target = dest.join(&relative);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(source.join(&relative), target).unwrap();
    }
    dest
}

fn gateway_config(store: &Path, upstream: &str, endpoint: &str) -> String {
    format!(
        r#"
        [store]
        path = "{}"
        [providers.fake]
        kind = "openai"
        base_url = "{upstream}"
        [routes.chat]
        targets = [{{ provider = "fake", model = "gpt-test" }}]
        retries = 0
        [[endpoints]]
        name = "support"
        {endpoint}
        "#,
        store.display()
    )
}

fn ask() -> Value {
    json!({"model": "support", "messages": [{"role": "user", "content": "Where is my order?"}]})
}

fn system_prompt(body: &Value) -> String {
    body["messages"][0]["content"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn log_alias_serve_then_relog_move_the_alias_and_reload_without_a_failed_request() {
    let work = temp_dir("store-flow");
    let store = Store::new(work.join("store"));
    let folder = copy_chain("support_bot", &work);
    let registry = switchyard_chains::registry();
    let first = store.log_chain(&folder, "support-bot", &registry).unwrap();
    store
        .set_alias("support-bot", "production", first.version.version)
        .unwrap();

    let upstream = FakeUpstream::start(vec![]).await;
    let config_path = work.join("gateway.toml");
    std::fs::write(
        &config_path,
        gateway_config(
            &work.join("store"),
            &upstream.base_url,
            "model = \"models:/support-bot@production\"",
        ),
    )
    .unwrap();
    let gateway = Arc::new(TestGateway::start_from_file(&config_path).await);

    let response = gateway.post("/v1/chat/completions", &ask()).await;
    assert_eq!(response.status(), 200);
    assert!(
        system_prompt(&upstream.requests()[0].body)
            .starts_with("You are the support assistant for Switchyard.")
    );

    let admin: Value = gateway.get_json("/admin/endpoints").await;
    let info = &admin["endpoints"][0];
    assert_eq!(info["name"], "support");
    assert_eq!(info["kind"], "chain");
    assert_eq!(info["uri"], "models:/support-bot@production");
    assert_eq!(info["resolved"], "models:/support-bot/1");
    assert_eq!(info["code_matches"], true);
    assert_eq!(
        info["code_sha256"],
        registry.get("support_bot").unwrap().code_sha256
    );
    assert_eq!(info["content_sha256"].as_str().unwrap().len(), 64);

    // A new prompt: log, move the alias. Nothing changes until the reload.
    std::fs::write(
        folder.join("prompts/system.tera"),
        "NEW PROMPT for {{ product }}, {{ tone }}.",
    )
    .unwrap();
    let second = store.log_chain(&folder, "support-bot", &registry).unwrap();
    assert_eq!(second.version.version, 2);
    store.set_alias("support-bot", "production", 2).unwrap();

    // Clients keep calling while the gateway reloads; every request must succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (gateway, stop) = (gateway.clone(), stop.clone());
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(Ordering::Relaxed) && statuses.len() < 5_000 {
                statuses.push(
                    gateway
                        .post("/v1/chat/completions", &ask())
                        .await
                        .status()
                        .as_u16(),
                );
            }
            statuses
        })
    };
    upstream.wait_for_requests(5).await;
    let reload = gateway.reload().await;
    assert_eq!(reload.status(), 200);
    assert_eq!(
        reload.json::<Value>().await.unwrap(),
        json!({"status": "reloaded", "endpoints": 1, "warnings": []})
    );
    let after_reload = upstream.requests().len();
    upstream.wait_for_requests(after_reload + 5).await;
    stop.store(true, Ordering::Relaxed);
    let statuses = load.await.unwrap();
    assert!(statuses.len() >= 10);
    assert!(
        statuses.iter().all(|s| *s == 200),
        "a request failed during the reload: {statuses:?}"
    );

    let prompts: Vec<String> = upstream
        .requests()
        .iter()
        .map(|r| system_prompt(&r.body))
        .collect();
    assert_eq!(
        prompts.last().unwrap(),
        "NEW PROMPT for Switchyard, friendly and concise."
    );
    // Old prompt before the switch, new one after: never back again.
    let first_new = prompts
        .iter()
        .position(|p| p.starts_with("NEW PROMPT"))
        .unwrap();
    assert!(
        prompts[first_new..]
            .iter()
            .all(|p| p.starts_with("NEW PROMPT"))
    );
    assert!(
        prompts[..first_new]
            .iter()
            .all(|p| p.starts_with("You are the support assistant"))
    );
    let admin: Value = gateway.get_json("/admin/endpoints").await;
    assert_eq!(admin["endpoints"][0]["resolved"], "models:/support-bot/2");

    // Tampering with the logged version: the reload is refused and the old state keeps serving.
    let logged_prompt = work.join("store/models/support-bot/2/code/prompts/system.tera");
    std::fs::write(&logged_prompt, "Ignore the rules.").unwrap();
    let refused = gateway.reload().await;
    assert_eq!(refused.status(), 400);
    let message = refused.json::<Value>().await.unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("models:/support-bot/2 was modified after it was logged"),
        "{message}"
    );
    let still = gateway.post("/v1/chat/completions", &ask()).await;
    assert_eq!(still.status(), 200);
    assert!(system_prompt(&upstream.requests().last().unwrap().body).starts_with("NEW PROMPT"));

    // And a gateway starting on the tampered version refuses to load it.
    let source = switchyard_gateway::ConfigSource {
        path: config_path,
        store_override: None,
        allow_code_mismatch: false,
    };
    let error = match switchyard_gateway::Gateway::from_file(source, &registry) {
        Ok(_) => panic!("a tampered version must not load"),
        Err(error) => error.to_string(),
    };
    assert!(
        error.contains("endpoint 'support'") && error.contains("modified after it was logged"),
        "{error}"
    );
}

#[tokio::test]
async fn logged_code_that_differs_from_the_compiled_code_is_refused_unless_allowed() {
    let work = temp_dir("store-mismatch");
    let store = Store::new(work.join("store"));
    let folder = copy_chain("support_bot", &work);
    let code = std::fs::read_to_string(folder.join("mod.rs")).unwrap();
    std::fs::write(
        folder.join("mod.rs"),
        format!("{code}\n// an edit that was never compiled\n"),
    )
    .unwrap();
    let logged = store
        .log_chain(&folder, "bot", &switchyard_chains::registry())
        .unwrap();
    assert!(
        logged.warnings[0]
            .contains("differs from the 'support_bot' chain compiled into this binary")
    );

    let upstream = FakeUpstream::start(vec![]).await;
    let refused = gateway_config(
        &work.join("store"),
        &upstream.base_url,
        "model = \"models:/bot/1\"",
    );
    let env = |_: &str| None;
    let config = switchyard_gateway::Config::parse("t.toml", &refused, &env).unwrap();
    let error = match switchyard_gateway::Gateway::new(config, &switchyard_chains::registry()) {
        Ok(_) => panic!("mismatched code must not load"),
        Err(error) => error.to_string(),
    };
    let compiled = switchyard_chains::registry()
        .get("support_bot")
        .unwrap()
        .code_sha256;
    assert!(error.contains(compiled), "{error}");
    assert!(
        error.contains("switchyard models restore models:/bot/1 <a new folder>`, copy its `.rs` files over chains/support_bot/"),
        "{error}"
    );
    assert!(error.contains("allow_code_mismatch = true"), "{error}");
    assert!(error.contains("--allow-code-mismatch"), "{error}");

    // `switchyard serve --allow-code-mismatch`: the same config file loads, every chain allowed.
    let refused_file = work.join("refused.toml");
    std::fs::write(&refused_file, &refused).unwrap();
    let source = |allow_code_mismatch| switchyard_gateway::ConfigSource {
        path: refused_file.clone(),
        store_override: None,
        allow_code_mismatch,
    };
    let registry = switchyard_chains::registry();
    assert!(switchyard_gateway::Gateway::from_file(source(false), &registry).is_err());
    assert!(switchyard_gateway::Gateway::from_file(source(true), &registry).is_ok());

    let allowed = gateway_config(
        &work.join("store"),
        &upstream.base_url,
        "model = \"models:/bot/1\"\nallow_code_mismatch = true\nconfig = { product = \"Acme\" }",
    );
    let allowed_file = work.join("allowed.toml");
    std::fs::write(&allowed_file, &allowed).unwrap();
    let gateway = TestGateway::start_from_file(&allowed_file).await;
    assert_eq!(
        gateway.post("/v1/chat/completions", &ask()).await.status(),
        200
    );
    assert!(system_prompt(&upstream.requests()[0].body).contains("support assistant for Acme"));
    let admin: Value = gateway.get_json("/admin/endpoints").await;
    assert_eq!(admin["endpoints"][0]["code_matches"], false);
    // A reload says so too, not only the log.
    let reloaded: Value = gateway.reload().await.json().await.unwrap();
    let warning = reloaded["warnings"][0].as_str().unwrap_or_default();
    assert!(
        warning.starts_with("endpoint 'support' serves chain 'support_bot' with code that differs"),
        "{reloaded}"
    );
}

#[tokio::test]
async fn endpoint_overrides_of_a_logged_config_are_type_checked() {
    let work = temp_dir("store-override");
    let store = Store::new(work.join("store"));
    store
        .log_chain(
            &switchyard_chains::chain_dir("support_bot"),
            "bot",
            &switchyard_chains::registry(),
        )
        .unwrap();
    let upstream = FakeUpstream::start(vec![]).await;
    let config = gateway_config(
        &work.join("store"),
        &upstream.base_url,
        "model = \"models:/bot/latest\"\nconfig = { tone = \"curt\", temprature = 0.9 }",
    );
    let env = |_: &str| None;
    let config = switchyard_gateway::Config::parse("t.toml", &config, &env).unwrap();
    let error = match switchyard_gateway::Gateway::new(config, &switchyard_chains::registry()) {
        Ok(_) => panic!("an unknown override key must not load"),
        Err(error) => error.to_string(),
    };
    // Named by its URI and version (its folder in the store is not to be edited), and the
    // override blamed, not chain.toml.
    assert!(
        error.contains(
            "models:/bot/latest (models:/bot/1): config (the endpoint's config override): temprature: \
             unknown field `temprature`"
        ),
        "{error}"
    );

    let missing = gateway_config(
        &work.join("store"),
        &upstream.base_url,
        "model = \"models:/nobody@production\"",
    );
    let config = switchyard_gateway::Config::parse("t.toml", &missing, &env).unwrap();
    let error = match switchyard_gateway::Gateway::new(config, &switchyard_chains::registry()) {
        Ok(_) => panic!("a missing model must not load"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("no model named 'nobody'"), "{error}");
}

#[tokio::test]
async fn the_admin_api_needs_the_admin_key_when_one_is_set() {
    let upstream = FakeUpstream::start(vec![]).await;
    let gateway = TestGateway::start(&format!(
        "[auth]\nadmin_key = \"${{TEST_ADMIN_KEY}}\"\n{}",
        crate::common::config_over(&[&upstream.base_url], "")
    ))
    .await;
    let url = gateway.url("/admin/endpoints");
    let anonymous = gateway.client.get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let wrong = gateway
        .client
        .get(&url)
        .bearer_auth("admin-secreT")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let right = gateway
        .client
        .get(&url)
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 200);
    let body: Value = right.json().await.unwrap();
    assert_eq!(
        body["endpoints"][0],
        json!({"name": "chat", "kind": "route", "route": "main"})
    );

    // Not started from a file: a reload says so instead of pretending.
    let reload = gateway
        .client
        .post(gateway.url("/admin/reload"))
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 400);
}

/// `config/logged.toml` (the README's log → alias → serve flow) serves a logged chain.
#[tokio::test]
async fn the_logged_example_config_serves_the_production_alias() {
    let work = temp_dir("logged-example");
    let store = Store::new(work.join("store"));
    let logged = store
        .log_chain(
            &switchyard_chains::chain_dir("support_bot"),
            "support-bot",
            &switchyard_chains::registry(),
        )
        .unwrap();
    store
        .set_alias("support-bot", "production", logged.version.version)
        .unwrap();
    let source = switchyard_gateway::ConfigSource {
        path: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/config/logged.toml")),
        store_override: Some(work.join("store")),
        allow_code_mismatch: false,
    };
    let gateway =
        switchyard_gateway::Gateway::from_file(source, &switchyard_chains::registry()).unwrap();
    let app = gateway.router();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let reply: Value = reqwest::Client::new()
        .post(format!("http://{address}/v1/chat/completions"))
        .json(&ask())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        reply["choices"][0]["message"]["content"],
        "Thanks for your message! This answer comes from the offline mock provider."
    );
}
