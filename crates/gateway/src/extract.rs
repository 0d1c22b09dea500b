//! Reading and parsing request bodies, with rejections in OpenAI's error shape: a bad body is a
//! 400 naming the field at fault (`param`), an oversize body a 413, a late one a 408. The
//! `Content-Type` is not checked: curl users forget it, and the body must parse as JSON either
//! way.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::AppState;
use crate::error::ApiError;

/// Reads a request's whole body: too large is a 413, broken off a 400, not there within
/// `[server] client_timeout_ms` a 408.
pub async fn read_body(request: Request, state: &AppState) -> Result<Bytes, ApiError> {
    // A body declared too large (`Content-Length`, which hyper gives as the body's size hint;
    // the handlers may have taken the headers) is refused at once, not after waiting for it.
    if axum::body::HttpBody::size_hint(request.body()).lower() > state.max_body_bytes() as u64 {
        return Err(ApiError::payload_too_large(state.max_body_bytes()));
    }
    let timeout = state.client_timeout();
    // A body that has already arrived (the usual case) is read without the timer ever being
    // registered (`timeout` polls the read first) or the shutdown ever being looked at.
    let read = tokio::time::timeout(timeout, Bytes::from_request(request, state));
    let read = tokio::select! {
        biased;
        read = read => read,
        // Nothing of the request has been done: the client can send it again elsewhere.
        () = state.shutting_down() => return Err(ApiError::shutting_down()),
    };
    read.map_err(|_| ApiError::request_timeout(timeout))?
        .map_err(|rejection| body_rejection(&rejection, state))
}

/// Why a body could not be read: too large (413) or broken off (400).
fn body_rejection(rejection: &BytesRejection, state: &AppState) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::payload_too_large(state.max_body_bytes())
    } else {
        ApiError::bad_request(
            format!("could not read the request body: {}", rejection.body_text()),
            None,
        )
    }
}

/// Deserializes a body, reporting the path of the first field that does not fit.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // Tracking the path costs on every field; only a body that fails is parsed again with it.
    switchyard_core::json_from_bytes(bytes).or_else(|_| parse_json_tracking_path(bytes))
}

fn parse_json_tracking_path<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return unparsable(&inner);
        }
        field_error(path, &inner)
    })?;
    deserializer.end().map_err(|e| unparsable(&e))?;
    Ok(value)
}

/// Deserializes an already parsed JSON value, reporting the path of the first field that does
/// not fit.
pub fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        field_error(path, &error.into_inner())
    })
}

fn unparsable(error: &serde_json::Error) -> ApiError {
    ApiError::bad_request(
        format!("We could not parse the JSON body of your request: {error}"),
        None,
    )
}

/// A body that is JSON but does not fit the request type: 400 naming the field.
fn field_error(path: String, error: &serde_json::Error) -> ApiError {
    let message = error.to_string();
    let param = missing_field(&message)
        .map(|field| {
            if path == "." {
                field.to_owned()
            } else {
                format!("{path}.{field}")
            }
        })
        .unwrap_or(path);
    ApiError::bad_request(
        format!("Invalid value for '{param}': {message}"),
        Some(param),
    )
}

/// serde reports a missing field at its parent's path, naming it in the message.
fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_core::ChatRequest;

    fn error_of(body: &str) -> ApiError {
        parse_json::<ChatRequest>(body.as_bytes()).unwrap_err()
    }

    #[test]
    fn names_the_field_at_fault() {
        let missing = error_of(r#"{"model":"m"}"#);
        assert_eq!(missing.param.as_deref(), Some("messages"));
        assert!(missing.message.contains("missing field `messages`"));

        let not_a_list = error_of(r#"{"model":"m","messages":"hi"}"#);
        assert_eq!(not_a_list.param.as_deref(), Some("messages"));
        assert!(
            not_a_list.message.contains("expected a sequence"),
            "{}",
            not_a_list.message
        );

        let no_role = error_of(r#"{"model":"m","messages":[{"content":"hi"}]}"#);
        assert_eq!(no_role.param.as_deref(), Some("messages[0].role"));
    }

    #[test]
    fn syntax_errors_have_no_param() {
        for body in [
            "{",
            "",
            "not json",
            r#"{"model":"m","messages":[]} trailing"#,
        ] {
            let error = error_of(body);
            assert_eq!(error.status, StatusCode::BAD_REQUEST);
            assert_eq!(error.param, None, "{body}");
            assert!(
                error.message.starts_with("We could not parse"),
                "{}",
                error.message
            );
        }
    }
}
