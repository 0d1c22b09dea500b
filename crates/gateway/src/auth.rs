//! Client API keys: `Authorization: Bearer <key>` or `api-key: <key>`, checked in constant time
//! against SHA-256 digests, so the gateway holds no key in clear after start-up. The key's id —
//! never the key — is what logs, limits and chains see.

use std::sync::Arc;

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::ApiKeyConfig;
use crate::error::ApiError;

/// SHA-256 of a key.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Parses 64 hex characters.
pub fn parse_sha256_hex(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut digest = [0u8; 32];
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(digest)
}

/// Azure OpenAI's key header, accepted as well as `Authorization: Bearer`.
const API_KEY: http::HeaderName = http::HeaderName::from_static("api-key");

/// The token of `Authorization: Bearer <token>` (the scheme's name in any case, RFC 9110 §11.1).
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

/// Who is calling. With no keys configured the gateway is open and every caller is anonymous.
pub fn authenticate<'k>(
    keys: &'k [Arc<ApiKeyConfig>],
    headers: &HeaderMap,
) -> Result<Option<&'k Arc<ApiKeyConfig>>, ApiError> {
    if keys.is_empty() {
        return Ok(None);
    }
    let given = bearer_token(headers)
        .or_else(|| headers.get(API_KEY).and_then(|v| v.to_str().ok()))
        .map(str::trim)
        .filter(|key| !key.is_empty())
        .ok_or_else(|| {
            ApiError::unauthorized(
                "You didn't provide an API key: send `Authorization: Bearer <key>`",
            )
        })?;
    let digest = sha256(given.as_bytes());
    // Compare against every key, so the time taken does not say which key came close.
    let mut found = None;
    for key in keys {
        if bool::from(key.sha256.ct_eq(&digest)) {
            found = Some(key);
        }
    }
    found
        .map(Some)
        .ok_or_else(|| ApiError::unauthorized("Incorrect API key provided"))
}

/// Whether `key` may call `endpoint`.
pub fn check_endpoint(key: Option<&ApiKeyConfig>, endpoint: &str) -> Result<(), ApiError> {
    match key.and_then(|k| k.endpoints.as_ref().map(|e| (k, e))) {
        Some((key, allowed)) if !allowed.iter().any(|e| e == endpoint) => Err(ApiError::forbidden(
            format!("API key '{}' may not call endpoint '{endpoint}'", key.id),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn key(id: &str, secret: &str, endpoints: Option<Vec<&str>>) -> Arc<ApiKeyConfig> {
        Arc::new(ApiKeyConfig {
            id: id.to_owned(),
            sha256: sha256(secret.as_bytes()),
            endpoints: endpoints.map(|e| e.into_iter().map(str::to_owned).collect()),
        })
    }

    #[test]
    fn finds_the_key_by_either_header() {
        let keys = [
            key("a", "secret-a", None),
            key("b", "secret-b", Some(vec!["chat"])),
        ];
        let mut headers = HeaderMap::new();
        assert_eq!(authenticate(&keys, &headers).unwrap_err().status, 401);
        headers.insert("authorization", HeaderValue::from_static("Bearer secret-b"));
        assert_eq!(authenticate(&keys, &headers).unwrap().unwrap().id, "b");
        headers.insert("authorization", HeaderValue::from_static("bearer secret-b"));
        assert_eq!(authenticate(&keys, &headers).unwrap().unwrap().id, "b");
        headers.insert("authorization", HeaderValue::from_static("Basic secret-b"));
        assert_eq!(authenticate(&keys, &headers).unwrap_err().status, 401);
        let mut headers = HeaderMap::new();
        headers.insert("api-key", HeaderValue::from_static("secret-a"));
        assert_eq!(authenticate(&keys, &headers).unwrap().unwrap().id, "a");
        headers.insert("api-key", HeaderValue::from_static("secret-c"));
        assert_eq!(authenticate(&keys, &headers).unwrap_err().status, 401);
        assert!(
            authenticate(&[], &HeaderMap::new()).unwrap().is_none(),
            "open without keys"
        );
    }

    #[test]
    fn restricted_keys_reach_only_their_endpoints() {
        let restricted = key("b", "s", Some(vec!["chat"]));
        assert!(check_endpoint(Some(&restricted), "chat").is_ok());
        assert_eq!(
            check_endpoint(Some(&restricted), "other")
                .unwrap_err()
                .status,
            403
        );
        assert!(check_endpoint(None, "other").is_ok());
    }

    #[test]
    fn parses_hex_digests() {
        let digest = sha256(b"abc");
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(parse_sha256_hex(&hex), Some(digest));
        assert_eq!(parse_sha256_hex(&hex.to_uppercase()), Some(digest));
        assert_eq!(parse_sha256_hex("abc"), None);
        assert_eq!(parse_sha256_hex(&"zz".repeat(32)), None);
    }
}
