//! Refusing secrets in logged config: a logged version is shared, copied and shown, so a key in
//! it would leak. Keys belong in the gateway config as `${ENV}` references.

use serde_json::Value;

/// Well-known API key shapes: (prefix, minimum total length, what it is).
const KEY_PREFIXES: &[(&str, usize, &str)] = &[
    ("sk-", 20, "an OpenAI/Anthropic-style API key"),
    ("AKIA", 20, "an AWS access key id"),
    ("ASIA", 20, "an AWS temporary access key id"),
    ("ghp_", 30, "a GitHub token"),
    ("github_pat_", 30, "a GitHub token"),
    ("xoxb-", 20, "a Slack token"),
    ("xoxp-", 20, "a Slack token"),
    ("AIza", 30, "a Google API key"),
    ("hf_", 30, "a Hugging Face token"),
    ("gsk_", 30, "a Groq API key"),
    ("glpat-", 20, "a GitLab token"),
];

/// Key names whose literal value is a credential whatever it looks like.
const SECRET_KEY_NAMES: &[&str] = &[
    "api_key",
    "apikey",
    "secret",
    "password",
    "token",
    "access_key",
    "private_key",
];

/// Every place in `value` that looks like a secret, as `(path, why)`. The value itself is never
/// part of the answer.
pub fn find_secrets(path: &str, value: &Value) -> Vec<(String, String)> {
    let mut found = Vec::new();
    walk(path, None, value, &mut found);
    found
}

fn walk(path: &str, key: Option<&str>, value: &Value, found: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                walk(&format!("{path}.{k}"), Some(k), v, found);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                walk(&format!("{path}[{i}]"), key, v, found);
            }
        }
        Value::String(text) => {
            if let Some(why) = looks_like_secret(text) {
                found.push((path.to_owned(), why));
            } else if let Some(key) = key.filter(|k| is_secret_name(k))
                && !text.is_empty()
                && !is_vocabulary_marker(key, text)
            {
                // A chain's config is not expanded: `${VAR}` would reach the chain as written.
                let why = match text.starts_with("${") && text.ends_with('}') {
                    true => format!(
                        "`{key}` holds an ${{ENV}} reference, which a chain's config does not expand"
                    ),
                    false => format!("`{key}` holds a literal value"),
                };
                found.push((path.to_owned(), why));
            }
        }
        _ => {}
    }
}

/// Secrets in a text file of an imported model directory (`requirements.txt`, `conda.yaml`…),
/// as `(where, why)`: key-shaped words, and URLs carrying a password (`https://user:pw@host`).
pub fn find_secrets_in_text(file: &str, text: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = format!("{file}:{}", n + 1);
        if is_private_key(line) {
            found.push((at.clone(), PRIVATE_KEY.to_owned()));
        }
        for word in words(line) {
            if let Some(why) = looks_like_secret(word) {
                found.push((at.clone(), why));
            }
        }
    }
    found
}

const PRIVATE_KEY: &str = "holds a private key";

/// Why `text` (a config value, or one word of a text file) is a secret whatever its key, if it
/// is one: a known key shape, or a word of it that is a JSON web token or a URL with a
/// password, or a PEM private key.
fn looks_like_secret(text: &str) -> Option<String> {
    if let Some(what) = looks_like_key(text) {
        return Some(format!("looks like {what}"));
    }
    let why = if words(text).any(is_jwt) {
        "looks like a JSON web token"
    } else if words(text).any(url_has_password) {
        "is a URL with a password"
    } else if is_private_key(text) {
        PRIVATE_KEY
    } else {
        return None;
    };
    Some(why.to_owned())
}

/// The words of a line or value: what is between spaces, quotes and punctuation around values.
fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| c.is_whitespace() || "\"'=,;()[]{}".contains(c))
        .filter(|word| !word.is_empty())
}

/// `eyJ…` (a JSON header, base64url) `.` payload `.` signature.
fn is_jwt(text: &str) -> bool {
    let parts: Vec<&str> = text.split('.').collect();
    text.starts_with("eyJ")
        && parts.len() == 3
        && parts[..2].iter().all(|part| part.len() >= 10)
        && parts.iter().all(|part| {
            part.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// A PEM private key's armour (`-----BEGIN RSA PRIVATE KEY-----`, …).
fn is_private_key(text: &str) -> bool {
    text.contains("-----BEGIN") && text.contains("PRIVATE KEY-----")
}

/// `scheme://user:password@host…`, but not a placeholder (`USER:PASSWORD`, `<password>`,
/// `${PASSWORD}`, `{{ password }}`) that a prompt documenting a format would show.
fn url_has_password(word: &str) -> bool {
    let Some((_, rest)) = word.split_once("://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let Some((credentials, _)) = authority.rsplit_once('@') else {
        return false;
    };
    let Some((_, password)) = credentials.split_once(':') else {
        return false;
    };
    let placeholder = password.is_empty()
        || password.contains(['<', '{', '$', '*'])
        || password.eq_ignore_ascii_case("password")
        || password.eq_ignore_ascii_case("pass");
    !placeholder
}

/// Keys named like credentials that name the markers of an LLM's vocabulary instead
/// (`stop_token = "</answer>"`, `eos_token = "<|im_end|>"`).
const VOCABULARY_TOKENS: &[&str] = &[
    "bos_token",
    "eos_token",
    "pad_token",
    "unk_token",
    "sep_token",
    "cls_token",
    "mask_token",
    "stop_token",
    "start_token",
    "end_token",
];

/// A `*_token` whose value is a marker in an LLM's vocabulary (`<|eot_id|>`, `</answer>`,
/// `[INST]`): markup no credential looks like.
fn is_vocabulary_marker(key: &str, text: &str) -> bool {
    let wrapped =
        |open: char, close: char| text.len() > 2 && text.starts_with(open) && text.ends_with(close);
    key.to_ascii_lowercase().ends_with("_token")
        && !text.contains(char::is_whitespace)
        && (wrapped('<', '>') || wrapped('[', ']'))
}

fn is_secret_name(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    if VOCABULARY_TOKENS.contains(&key.as_str()) || key.contains("special_token") {
        return false;
    }
    SECRET_KEY_NAMES
        .iter()
        .any(|name| key == *name || key.ends_with(&format!("_{name}")))
}

fn looks_like_key(text: &str) -> Option<&'static str> {
    let text = text.trim();
    if text.contains(char::is_whitespace) {
        return None;
    }
    KEY_PREFIXES
        .iter()
        .find(|(prefix, min_len, _)| text.starts_with(prefix) && text.len() >= *min_len)
        .map(|(_, _, what)| *what)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_key_shapes_and_secret_names_but_not_prose() {
        let config = json!({
            "product": "Switchyard",
            "rules": ["Never share sk- prefixed keys.", "sk-proj-abcdefghijklmnopqrstu"],
            "nested": {"openai_api_key": "hunter2", "token": "${TOKEN}", "aws": "AKIAABCDEFGHIJKLMNOP"},
            "password": "",
            // An LLM's vocabulary markers; tokens that are credentials, whatever they look like.
            "stop_token": "</translation>",
            "eos_token": "<|im_end|>",
            "image_special_token": "IMG",
            "eot_token": "<|eot_id|>",
            "inst_token": "[INST]",
            "hub_token": "abcdefghijklmnopqrstuvwx",
            "auth_token": "Bearer abc def",
            "api_token": "12|abc",
        });
        let found = find_secrets("config", &config);
        // In the config's own order.
        let paths: Vec<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "config.rules[1]",
                "config.nested.openai_api_key",
                "config.nested.token",
                "config.nested.aws",
                "config.hub_token",
                "config.auth_token",
                "config.api_token"
            ]
        );
        assert!(
            found
                .iter()
                .all(|(_, why)| !why.contains("hunter2") && !why.contains("abcdefgh"))
        );
        assert!(found[2].1.contains("does not expand"), "{:?}", found[2]);
    }

    #[test]
    fn finds_tokens_urls_and_private_keys_under_any_name() {
        let config = json!({
            "header": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
            "db": "postgres://admin:hunter2@db.internal:5432/app",
            "ci": "glpat-abcdefghij0123456789",
            "pem": "-----BEGIN RSA PRIVATE KEY-----\nMIIEow...",
            // Not secrets: a version string, a URL without a password, prose about keys and
            // URLs, a format a prompt documents.
            "version": "eyJ.1.2",
            "docs": "https://user@example.com/docs",
            "note": "never paste a private key here",
            "prose": "Docs: https://example.com. Hours: 9-5. Email: ops@example.com",
            "format": "Connect with postgres://USER:PASSWORD@host/db or postgres://u:<password>@h",
        });
        let found = find_secrets("config", &config);
        let why: Vec<(&str, &str)> = found
            .iter()
            .map(|(path, why)| (path.as_str(), why.as_str()))
            .collect();
        assert_eq!(
            why,
            [
                ("config.header", "looks like a JSON web token"),
                ("config.db", "is a URL with a password"),
                ("config.ci", "looks like a GitLab token"),
                ("config.pem", "holds a private key"),
            ]
        );
        let text = "You are helpful.\nAuthorization: Bearer sk-proj-abcdefghijklmnopqrstu\n";
        let found = find_secrets_in_text("prompts/system.tera", text);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, "prompts/system.tera:2");
    }
}
